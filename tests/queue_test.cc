// Tests of IoQueue itself (io/queue.cc): fixed buffers when the kernel pins
// them and plain requests when it refuses, on a real O_DIRECT file.

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <cstring>
#include <string>

#include "io/fd.h"
#include "io/file.h"
#include "io/queue.h"
#include "tests/test_util.h"

using namespace vmsave;
using test::TempDir;

namespace {

void fill(u8* p, i64 len, u8 seed) {
  for (i64 i = 0; i < len; i++) p[i] = static_cast<u8>(i * 131 + seed + (i >> 12));
}

// Writes `len` bytes from `src` at `offset` and reads them back into `dst`
// through one queue, draining after each.
void round_trip(IoQueue& q, int fd, u8* src, u8* dst, i64 len, i64 offset) {
  IoRequest w{fd, src, static_cast<u32>(len), offset, true, 1};
  REQUIRE(q.submit(w).ok());
  REQUIRE(q.drain().ok());
  IoRequest r{fd, dst, static_cast<u32>(len), offset, false, 2};
  REQUIRE(q.submit(r).ok());
  REQUIRE(q.drain().ok());
  CHECK(std::memcmp(src, dst, len) == 0);
}

}  // namespace

TEST_CASE("queue: registered buffers carry reads and writes, others go out plain") {
  TempDir dir;
  auto f = open_direct(dir / "data", O_RDWR | O_CREAT | O_EXCL, 0600, true);
  REQUIRE(f.ok());
  auto q = IoQueue::create(8);
  REQUIRE(q.ok());
  constexpr i64 kLen = 1 * kMiB;
  AlignedBuffer a(kLen), b(kLen), c(kLen);
  fill(a.data(), kLen, 1);
  fill(c.data(), kLen, 2);

  std::pair<u8*, i64> ranges[] = {{a.data(), kLen}, {b.data(), kLen}};
  bool fixed = (*q)->register_memory(ranges);
  CHECK((*q)->fixed_buffers() == fixed);
  // Kernels since 5.1 pin anonymous memory for io_uring, and root is not held
  // to the memlock limit; for other users a refusal is the fallback below.
  if (::geteuid() == 0) CHECK(fixed);

  round_trip(**q, f->fd.get(), a.data(), b.data(), kLen, 0);
  // A buffer outside the registered ranges, and one straddling a range's end.
  round_trip(**q, f->fd.get(), c.data(), b.data(), kLen, kLen);
  round_trip(**q, f->fd.get(), a.data() + kLen / 2, c.data(), kLen / 2, 2 * kLen);
  // Registering twice is refused: one table per ring.
  CHECK_FALSE((*q)->register_memory(ranges));
}

TEST_CASE("queue: a file-backed mapping the kernel will not pin still transfers") {
  TempDir dir;
  std::string src_path = dir / "src";
  constexpr i64 kLen = 2 * kMiB;
  test::write_pattern_file(src_path, kLen, "random", 7);
  UniqueFd sfd(::open(src_path.c_str(), O_RDWR | O_CLOEXEC));
  REQUIRE(sfd.get() >= 0);
  void* m = ::mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_SHARED, sfd.get(), 0);
  REQUIRE(m != MAP_FAILED);
  Mapping map(m, kLen);

  auto f = open_direct(dir / "copy", O_RDWR | O_CREAT | O_EXCL, 0600, true);
  REQUIRE(f.ok());
  auto q = IoQueue::create(8);
  REQUIRE(q.ok());
  std::pair<u8*, i64> ranges[] = {{map.data(), kLen}};
  bool fixed = (*q)->register_memory(ranges);
  MESSAGE(std::string(fixed ? "file-backed mapping registered" : "file-backed mapping refused: plain requests"));
  AlignedBuffer back(kLen);
  round_trip(**q, f->fd.get(), map.data(), back.data(), kLen, 0);
}
