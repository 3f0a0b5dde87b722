// Tests of IoQueue itself (io/queue.cc): fixed buffers when the kernel pins
// them and plain requests when it refuses, on a real O_DIRECT file.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

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

// A new O_DIRECT file `name` in `dir` and a queue of depth 8 to use on it.
struct QueueOnFile {
  DirectFile file;
  std::unique_ptr<IoQueue> q;
  QueueOnFile(const TempDir& dir, const char* name) {
    auto f = open_direct(dir / name, O_RDWR | O_CREAT | O_EXCL, 0600, true);
    REQUIRE(f.ok());
    file = std::move(*f);
    q = IoQueue::create(8);
    REQUIRE_FALSE(q->is_synchronous());
  }
  int fd() const { return file.fd.get(); }
};

}  // namespace

TEST_CASE("queue: registered buffers carry reads and writes, others go out plain") {
  TempDir dir;
  QueueOnFile t(dir, "data");
  IoQueue& q = *t.q;
  constexpr i64 kLen = 1 * kMiB;
  AlignedBuffer a(kLen), b(kLen), c(kLen);
  fill(a.data(), kLen, 1);
  fill(c.data(), kLen, 2);

  std::pair<u8*, i64> ranges[] = {{a.data(), kLen}, {b.data(), kLen}};
  bool fixed = q.register_memory(ranges);
  CHECK(q.fixed_buffers() == fixed);
  // Kernels since 5.1 pin anonymous memory for io_uring, and root is not held
  // to the memlock limit; for other users a refusal is the fallback below.
  if (::geteuid() == 0) CHECK(fixed);

  round_trip(q, t.fd(), a.data(), b.data(), kLen, 0);
  // A buffer outside the registered ranges, and one straddling a range's end.
  round_trip(q, t.fd(), c.data(), b.data(), kLen, kLen);
  round_trip(q, t.fd(), a.data() + kLen / 2, c.data(), kLen / 2, 2 * kLen);
  // Registering twice is refused: one table per ring.
  CHECK_FALSE(q.register_memory(ranges));
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

  QueueOnFile t(dir, "copy");
  std::pair<u8*, i64> ranges[] = {{map.data(), kLen}};
  bool fixed = t.q->register_memory(ranges);
  MESSAGE(std::string(fixed ? "file-backed mapping registered"
                            : "file-backed mapping refused: plain requests"));
  AlignedBuffer back(kLen);
  round_trip(*t.q, t.fd(), map.data(), back.data(), kLen, 0);
}

TEST_CASE("queue: poll runs the callbacks of finished requests without waiting for the rest") {
  TempDir dir;
  QueueOnFile t(dir, "data");
  IoQueue& q = *t.q;
  constexpr i64 kLen = 256 * kKiB;
  AlignedBuffer a(4 * kLen);
  fill(a.data(), 4 * kLen, 3);
  std::vector<u64> done;
  q.set_on_done([&](const IoRequest& r) {
    done.push_back(r.tag);
    return Status();
  });
  // Nothing in flight: returns at once.
  REQUIRE(q.poll().ok());
  for (u64 i = 0; i < 4; i++)
    REQUIRE(q.submit({t.fd(), a.data() + i * kLen, kLen, i64(i) * kLen, true, i + 1}).ok());
  // poll() submits what is queued and never blocks: keep polling until the
  // writes have landed (the deadline only guards against a hang).
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (q.in_flight() > 0 && std::chrono::steady_clock::now() < until) {
    REQUIRE(q.poll().ok());
    CHECK(done.size() + q.in_flight() == 4);
  }
  CHECK(q.in_flight() == 0);
  std::sort(done.begin(), done.end());
  CHECK(done == std::vector<u64>{1, 2, 3, 4});
  AlignedBuffer back(4 * kLen);
  REQUIRE(pread(t.fd(), back.data(), 4 * kLen, 0) == 4 * kLen);
  CHECK(std::memcmp(a.data(), back.data(), 4 * kLen) == 0);
}

TEST_CASE("queue: a vectored request moves every piece, through the ring and by pwritev") {
  // Pieces of three buffers, some adjacent (as a run of data pages around
  // zeros from a shared block is gathered), written at one offset.
  TempDir dir;
  QueueOnFile t(dir, "data");
  constexpr i64 kPage = 4096;
  AlignedBuffer a(16 * kPage), zeros(4 * kPage), back(16 * kPage);
  fill(a.data(), 16 * kPage, 5);
  auto piece = [](u8* p, i64 n) { return iovec{p, static_cast<size_t>(n)}; };
  const std::vector<iovec> pieces = {
      piece(a.data(), 2 * kPage), piece(zeros.data(), kPage), piece(a.data() + 3 * kPage, kPage),
      piece(zeros.data(), 3 * kPage), piece(a.data() + 7 * kPage, 9 * kPage)};
  std::vector<u8> want(a.data(), a.data() + 16 * kPage);
  std::memset(want.data() + 2 * kPage, 0, kPage);
  std::memset(want.data() + 4 * kPage, 0, 3 * kPage);

  std::mutex turn;
  for (bool serial : {false, true}) {
    CAPTURE(serial);
    if (serial) t.q->serialize_writes(t.fd(), &turn);
    IoRequest w{t.fd(), nullptr, static_cast<u32>(16 * kPage), serial ? 16 * kPage : 0, true, 1};
    w.iov = pieces;
    REQUIRE(t.q->submit(w).ok());
    REQUIRE(t.q->drain().ok());
    REQUIRE(pread(t.fd(), back.data(), 16 * kPage, w.offset) == 16 * kPage);
    CHECK(std::memcmp(back.data(), want.data(), 16 * kPage) == 0);
  }

  // A scattered read back into two halves.
  AlignedBuffer lo(8 * kPage), hi(8 * kPage);
  IoRequest r{t.fd(), nullptr, static_cast<u32>(16 * kPage), 0, false, 2};
  r.iov = {piece(lo.data(), 8 * kPage), piece(hi.data(), 8 * kPage)};
  REQUIRE(t.q->submit(r).ok());
  REQUIRE(t.q->drain().ok());
  CHECK(std::memcmp(lo.data(), want.data(), 8 * kPage) == 0);
  CHECK(std::memcmp(hi.data(), want.data() + 8 * kPage, 8 * kPage) == 0);

  // What is left after a transfer cut short part-way through a piece.
  std::vector<iovec> rest;
  slice_iov(pieces, 2 * kPage + 100, 8 * kPage, rest);
  REQUIRE(rest.size() == 4);
  CHECK(rest[0].iov_base == zeros.data() + 100);
  CHECK(rest[0].iov_len == kPage - 100);
  CHECK(rest[1].iov_base == a.data() + 3 * kPage);
  CHECK(rest[2].iov_len == 3 * kPage);
  CHECK(rest[3].iov_base == a.data() + 7 * kPage);
  CHECK(rest[3].iov_len == kPage);
  slice_iov(pieces, 16 * kPage, 16 * kPage, rest);
  CHECK(rest.empty());
}

TEST_CASE("queue: inline reads complete within submit, and a read past the end fails") {
  TempDir dir;
  QueueOnFile t(dir, "data");
  IoQueue& q = *t.q;
  constexpr i64 kLen = 256 * kKiB;
  AlignedBuffer a(kLen), back(kLen);
  fill(a.data(), kLen, 9);
  REQUIRE(pwrite(t.fd(), a.data(), kLen, 0) == kLen);
  std::vector<u64> done;
  q.set_on_done([&](const IoRequest& r) {
    done.push_back(r.tag);
    return Status();
  });
  q.read_inline(t.fd());
  REQUIRE(q.submit({t.fd(), back.data(), kLen / 2, 0, false, 1}).ok());
  CHECK(done == std::vector<u64>{1});  // before any wait
  CHECK(q.in_flight() == 0);
  REQUIRE(q.submit({t.fd(), back.data() + kLen / 2, kLen / 2, kLen / 2, false, 2}).ok());
  CHECK(done == std::vector<u64>{1, 2});
  CHECK(std::memcmp(a.data(), back.data(), kLen) == 0);
  CHECK(q.latency().count() == 2);
  // Past the file's end: the error names the offset, and sticks.
  Status st = q.submit({t.fd(), back.data(), kLen / 2, kLen - 4096, false, 3});
  REQUIRE_FALSE(st.ok());
  CHECK(st.error().message().find("unexpected end of file") != std::string::npos);
  CHECK(done.size() == 2);
  CHECK_FALSE(q.drain().ok());
}

TEST_CASE("queue: a synchronous queue (no io_uring) completes each request within submit") {
  TempDir dir;
  auto f = open_direct(dir / "data", O_RDWR | O_CREAT | O_EXCL, 0600, true);
  REQUIRE(f.ok());
  const int fd = f->fd.get();
  // Here the kernel gives a ring; where it refuses one the caller gets this.
  std::string why_not;
  CHECK_FALSE(IoQueue::create(8, &why_not)->is_synchronous());
  CHECK(why_not.empty());

  std::unique_ptr<IoQueue> q = IoQueue::synchronous();
  CHECK(q->is_synchronous());
  constexpr i64 kLen = 512 * kKiB;
  AlignedBuffer a(kLen), back(kLen);
  fill(a.data(), kLen, 4);
  std::pair<u8*, i64> ranges[] = {{a.data(), kLen}};
  CHECK_FALSE(q->register_memory(ranges));  // no ring to register with
  std::vector<u64> done;
  q->set_on_done([&](const IoRequest& r) {
    done.push_back(r.tag);
    return Status();
  });
  REQUIRE(q->submit({fd, a.data(), kLen / 2, 0, true, 1}).ok());
  CHECK(done == std::vector<u64>{1});
  CHECK(q->in_flight() == 0);
  IoRequest w{fd, nullptr, static_cast<u32>(kLen / 2), kLen / 2, true, 2};
  w.iov = {{a.data() + kLen / 2, kLen / 4}, {a.data() + 3 * kLen / 4, kLen / 4}};
  REQUIRE(q->submit(w).ok());
  CHECK(done == std::vector<u64>{1, 2});
  REQUIRE(q->poll().ok());
  REQUIRE(q->reap_some().ok());
  REQUIRE(q->drain().ok());
  round_trip(*q, fd, a.data(), back.data(), kLen, 0);
  CHECK(q->bytes_done() == 3 * kLen);

  // An error is the request's, with the file and offset, and stays.
  q->name_fd(fd, "data");
  Status st = q->submit({fd, back.data(), kLen, 2 * kLen, false, 3});
  REQUIRE_FALSE(st.ok());
  CHECK_MESSAGE(test::contains(st.error().message(), "data"), st.error().message());
  CHECK_MESSAGE(test::contains(st.error().message(), "unexpected end of file"),
                st.error().message());
  CHECK_FALSE(q->drain().ok());
}

TEST_CASE("fd: a process is going once it is a zombie or gone, not while it runs or sleeps") {
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::pause();
    ::_exit(0);
  }
  CHECK_FALSE(process_going(child));
  CHECK_FALSE(process_going(::getpid()));
  REQUIRE(::kill(child, SIGKILL) == 0);
  // Unreaped, it stays a zombie: going.
  for (int i = 0; i < 200 && process_state(child) != 'Z'; i++)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  CHECK(process_state(child) == 'Z');
  CHECK(process_going(child));
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(process_going(child));
}
