// Out-of-line parts of the resource owners in io/fd.h.

#include "io/fd.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csetjmp>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <string_view>

namespace vmsave {

namespace {

thread_local sigjmp_buf* t_store_jump = nullptr;

// exit_on_sigbus()'s line: fixed storage, read by the handler.
char g_sigbus_line[1024];
std::atomic<size_t> g_sigbus_len{0};

void on_sigbus(int sig) {
  if (sigjmp_buf* j = t_store_jump) siglongjmp(*j, 1);
  if (size_t n = g_sigbus_len.load()) {
    (void)!::write(STDERR_FILENO, g_sigbus_line, n);
    ::_exit(1);
  }
  // Not from a guarded store: die of it as without this handler.
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

void install_sigbus_handler() {
  static std::once_flag installed;
  std::call_once(installed, [] {
    struct sigaction sa = {};
    sa.sa_handler = on_sigbus;
    // SA_NODEFER: the jump leaves the handler without restoring the signal
    // mask (sigsetjmp(j, 0) saves none, so no syscall per call), and SIGBUS
    // must not stay blocked after it.
    sa.sa_flags = SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, nullptr);
  });
}

}  // namespace

void exit_on_sigbus(const std::string& line) {
  size_t n = std::min(line.size(), sizeof(g_sigbus_line));
  std::memcpy(g_sigbus_line, line.data(), n);
  g_sigbus_len.store(n);
  install_sigbus_handler();
}

UniqueFd open_pidfd(pid_t pid) {
  // The raw system call: glibc 2.36's <sys/pidfd.h> declares its wrapper
  // without C linkage.
  return UniqueFd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
}

bool process_exited(pid_t pid, int wait_ms) {
  UniqueFd fd = open_pidfd(pid);
  if (!fd.valid()) return errno == ESRCH;
  pollfd p{fd.get(), POLLIN, 0};
  return ::poll(&p, 1, wait_ms) == 1;  // a signal meanwhile: not known to have
}

namespace {

// The fields of /proc/PID/stat after the command name, from the state on;
// empty when there is no such process.
std::string stat_fields(pid_t pid) {
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", static_cast<int>(pid));
  UniqueFd fd(::open(path, O_RDONLY | O_CLOEXEC));
  char buf[512];
  ssize_t n = fd.valid() ? ::read(fd.get(), buf, sizeof(buf) - 1) : -1;
  if (n <= 0) return "";
  std::string_view stat(buf, static_cast<size_t>(n));
  size_t paren = stat.rfind(')');  // the command name may hold anything
  return paren != std::string_view::npos && paren + 2 < stat.size()
             ? std::string(stat.substr(paren + 2))
             : "";
}

}  // namespace

char process_state(pid_t pid) {
  std::string f = stat_fields(pid);
  return f.empty() ? '?' : f[0];
}

bool process_going(pid_t pid) {
  constexpr unsigned long kPfExiting = 0x4;  // include/linux/sched.h
  std::istringstream f(stat_fields(pid));
  std::string state, skip;
  unsigned long flags = 0;
  // state ppid pgrp session tty_nr tpgid flags
  if (!(f >> state >> skip >> skip >> skip >> skip >> skip >> flags)) return true;
  return state == "Z" || state == "X" || (flags & kPfExiting);
}

bool store_guarded(const std::function<void()>& store) {
  install_sigbus_handler();
  sigjmp_buf jump;
  if (sigsetjmp(jump, 0) != 0) {
    t_store_jump = nullptr;
    return false;
  }
  t_store_jump = &jump;
  store();
  t_store_jump = nullptr;
  return true;
}

Result<Mapping> Mapping::map(int fd, i64 offset, i64 len, int prot, int flags,
                             const std::string& path) {
  if (len == 0) return Mapping();
  void* p = ::mmap(nullptr, len, prot, flags, fd, offset);
  if (p == MAP_FAILED) return sys_error("mmap", path, errno);
  return Mapping(p, len);
}

AlignedBuffer::AlignedBuffer(size_t size) : size_(size) {
  if (size == 0) return;
  void* p = nullptr;
  if (posix_memalign(&p, kDirectAlign, align_up(size, kDirectAlign)) != 0) throw std::bad_alloc();
  std::memset(p, 0, size);
  p_ = static_cast<u8*>(p);
}

AlignedBuffer::~AlignedBuffer() { std::free(p_); }

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& o) noexcept {
  if (this != &o) {
    std::free(p_);
    p_ = std::exchange(o.p_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

}  // namespace vmsave
