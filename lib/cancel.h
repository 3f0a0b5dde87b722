// Cooperative cancellation. cli/ installs SIGINT/SIGTERM handlers that set
// the flag; long loops in io/ and core/ poll it between units of work and
// unwind through their normal error paths, so every in-flight request is
// reaped and every temporary file removed, exactly as on any other error.

#pragma once

#include <atomic>
#include <csignal>

#include "lib/common.h"

namespace vmsave {

inline std::atomic<int>& cancel_signal() {
  static std::atomic<int> sig{0};
  return sig;
}

inline bool cancelled() { return cancel_signal().load(std::memory_order_relaxed) != 0; }

inline Error interrupted_error() {
  int sig = cancel_signal().load();
  Error e{"interrupted", "", sig ? strsignal(sig) : "cancelled"};
  e.status = Exit::kInterrupted;
  return e;
}

}  // namespace vmsave
