// XXH3 through format/hash.h must equal libxxhash's result bit for bit on
// every vector unit the CPU has, one-shot and streamed in uneven pieces:
// images written on one machine are verified on another.

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include <doctest/doctest.h>

#include <random>
#include <string>
#include <vector>

#include "format/hash.h"

using namespace vmsave;

TEST_CASE("hash: every vector unit computes libxxhash's XXH3-64") {
  std::vector<u8> data(3 * kMiB + 777);
  std::mt19937_64 rng(42);
  for (auto& b : data) b = static_cast<u8>(rng());
  std::vector<size_t> lens = {0, 1, 3, 16, 17, 128, 129, 240, 241, 1023, 1024, 1025, 4096, 65536 + 5,
                              kMiB, data.size() - 3};  // from data + 3: up to the end
  const std::string chosen = hash_unit();
  int tried = 0;
  for (const char* unit : {"sse2", "avx2", "avx512"}) {
    if (!set_hash_unit(unit)) continue;
    tried++;
    CAPTURE(std::string(unit));
    for (size_t len : lens) {
      CAPTURE(len);
      u64 want = XXH3_64bits(data.data() + 3, len);  // unaligned on purpose
      CHECK(xxh3(data.data() + 3, len) == want);
      Hasher h;
      size_t off = 0;
      while (off < len) {  // pieces of 1 byte to 200 KiB
        size_t n = std::min<size_t>(len - off, 1 + rng() % (200 * 1024));
        h.update(data.data() + 3 + off, n);
        off += n;
      }
      CHECK(h.digest() == want);
    }
  }
  CHECK(tried >= 1);
  MESSAGE("units compared: " << tried << ", default " << chosen);
  CHECK(set_hash_unit(chosen));
}
