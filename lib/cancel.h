// Cooperative cancellation. cli/ installs SIGINT/SIGTERM handlers that set
// the flag; long loops in io/ and core/ poll it between units of work and
// unwind through their normal error paths, so every in-flight request is
// reaped and every temporary file removed, exactly as on any other error.

#pragma once

#include <atomic>
#include <csignal>
#include <cstring>

#include <fmt/core.h>

#include "lib/common.h"

namespace vmsave {

inline std::atomic<int>& cancel_signal() {
  static std::atomic<int> sig{0};
  return sig;
}

inline bool cancelled() { return cancel_signal().load(std::memory_order_relaxed) != 0; }

// How many signals have come: work that finishes before it stops (QEMU's
// own save, see mapped_ram_migrate) stops at once on the second.
inline std::atomic<int>& signals_received() {
  static std::atomic<int> n{0};
  return n;
}

// Not a signal: cancel_with() stopped the work for a reason of its own.
constexpr int kCancelledWithError = -1;

// For work that must not stop half-way once begun (a device-state load
// QEMU has started, which it cannot take again): a first signal lets it
// finish, a second stops it, as does a reason of cancel_with().
inline bool cancelled_twice() {
  return cancelled() &&
         (signals_received().load() >= 2 || cancel_signal().load() == kCancelledWithError);
}

inline Error& cancel_reason() {
  static Error e;
  return e;
}

// Stops the work the way a signal does, for `why` (the QEMU being saved has
// exited): the loops unwind as on SIGINT, and interrupted_error() returns
// `why`. The first reason stays; a signal that comes later takes over.
inline void cancel_with(Error why) {
  static std::atomic<bool> taken{false};
  if (taken.exchange(true)) return;
  cancel_reason() = std::move(why);
  int none = 0;
  cancel_signal().compare_exchange_strong(none, kCancelledWithError);
}

inline Error interrupted_error() {
  int sig = cancel_signal().load();
  if (sig == kCancelledWithError) return cancel_reason();
  Error e{sig ? fmt::format("interrupted by SIG{}", sigabbrev_np(sig)) : "interrupted", "", ""};
  e.status = Exit::kInterrupted;
  return e;
}

}  // namespace vmsave
