// Owners of kernel resources: file descriptors and memory mappings.
//
// Nothing outside these types calls close() or munmap(). They are move-only,
// so ownership is visible in signatures, as in mold's and liburing's code.

#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <functional>
#include <utility>

#include "lib/common.h"

namespace vmsave {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { reset(); }
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  explicit operator bool() const { return valid(); }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

class Mapping {
 public:
  Mapping() = default;
  Mapping(void* addr, size_t len) : addr_(addr), len_(len) {}
  ~Mapping() { reset(); }
  Mapping(Mapping&& o) noexcept
      : addr_(std::exchange(o.addr_, nullptr)), len_(std::exchange(o.len_, 0)) {}
  Mapping& operator=(Mapping&& o) noexcept {
    if (this != &o) {
      reset();
      addr_ = std::exchange(o.addr_, nullptr);
      len_ = std::exchange(o.len_, 0);
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  u8* data() const { return static_cast<u8*>(addr_); }
  size_t size() const { return len_; }
  explicit operator bool() const { return addr_ != nullptr; }
  void reset() {
    if (addr_) ::munmap(addr_, len_);
    addr_ = nullptr;
    len_ = 0;
  }

  // mmap `len` bytes of `fd` at `offset`; `what` names the file in errors.
  static Result<Mapping> map(int fd, i64 offset, i64 len, int prot, int flags,
                             const std::string& path);

 private:
  void* addr_ = nullptr;
  size_t len_ = 0;
};

// A heap buffer aligned for O_DIRECT (4 KiB), zero-filled.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t size);
  ~AlignedBuffer();
  AlignedBuffer(AlignedBuffer&& o) noexcept
      : p_(std::exchange(o.p_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept;
  AlignedBuffer(const AlignedBuffer&) = delete;

  u8* data() const { return p_; }
  size_t size() const { return size_; }

 private:
  u8* p_ = nullptr;
  size_t size_ = 0;
};

// A pidfd for process `pid` (invalid if it is gone, or on kernels before
// 5.3): readable once the process has exited, never confused with a later
// process that reuses the number.
UniqueFd open_pidfd(pid_t pid);

// Whether process `pid` has exited (a zombie not yet reaped has), waiting
// up to `wait_ms` for it: a QEMU that is quitting closes its sockets first.
bool process_exited(pid_t pid, int wait_ms = 0);

// The state letter /proc/PID/stat gives process `pid` ('R', 'S', 'T' for
// stopped, 'Z' for a zombie...), or '?' when there is no such process.
char process_state(pid_t pid);

// Whether process `pid` is gone or going: no such process, a zombie, or
// one that has begun to exit (PF_EXITING; a QEMU killed a moment ago still
// holds its sockets and files while it frees its memory).
bool process_going(pid_t pid);

// Whether process `pid` is stopped (SIGSTOP, a debugger): it answers
// nothing until continued.
inline bool process_stopped(pid_t pid) {
  char s = process_state(pid);
  return s == 'T' || s == 't';
}

// Runs `store`, which writes into a shared file mapping, and returns false
// if the kernel raised SIGBUS for it instead of letting that kill vmsave: a
// page its filesystem has no room for (a full tmpfs, no huge page left) or
// one past a file that shrank. Only SIGBUS raised on this thread while
// `store` runs is caught; `store` is left by a long jump, so it may only
// copy or decompress (no locks, nothing to destroy).
bool store_guarded(const std::function<void()>& store);

// From now on a SIGBUS outside store_guarded() ends vmsave with `line` on
// stderr and exit status 1 rather than a crash: for reading files through
// mappings that another process may truncate meanwhile (a raw save's
// memory files). Nothing else has to be undone then: the image being
// written has no name yet.
void exit_on_sigbus(const std::string& line);

// The alignment O_DIRECT needs for offsets, lengths and buffers on every
// filesystem vmsave targets (ext4, xfs, tmpfs with 4 KiB logical blocks).
constexpr i64 kDirectAlign = 4096;

}  // namespace vmsave
