// XXH3-64, the checksum of every section and chunk in an image (see
// image.h), computed with the widest vector unit the CPU offers.
//
// Debian's libxxhash is built for plain SSE2. Hashing is most of the user
// time of a save (1 GiB random, tmpfs to tmpfs: 0.132 user-seconds with
// SSE2, 0.091 with AVX2, 0.080 with AVX-512, medians of 8), so the update
// loop is compiled once per vector unit and picked at start-up. The result
// is the same bit for bit whichever unit computes it.

#pragma once

#include <cstddef>
#include <span>
#include <string_view>

#include "lib/common.h"

namespace vmsave {

// One-shot XXH3-64.
u64 xxh3(const void* data, size_t len);

// Streaming XXH3-64: update() with the pieces in order, digest() any time.
class Hasher {
 public:
  Hasher();
  ~Hasher();
  Hasher(const Hasher&) = delete;
  Hasher& operator=(const Hasher&) = delete;
  void reset();
  void update(const void* data, size_t len);
  // As update() with `len` zero bytes (holes, zero pages), from a shared
  // zero buffer.
  void update_zeros(i64 len);
  u64 digest() const;

 private:
  void* state_;  // XXH3_state_t, 64-byte aligned, owned
};

// Which implementation runs: "avx512", "avx2" or "sse2".
const char* hash_unit();
// Switches to the named unit if the CPU has it (tests compare them all).
// Not thread-safe: call before any hashing starts.
bool set_hash_unit(std::string_view name);

}  // namespace vmsave
