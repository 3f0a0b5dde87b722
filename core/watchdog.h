// The save's watchdog: a process that puts QEMU back if vmsave dies.
//
// SIGINT, SIGTERM and errors unwind through the save's own clean-up. SIGKILL,
// the OOM killer or a crash do not: the guest would stay paused, and
// x-ignore-shared stay set, so that the user's next migration of this VM
// would silently leave its RAM behind. So a save forks a watchdog that shares
// its QMP connection and waits on a socket. The save sends it the undo
// commands it notes (QmpClient::note_undo) before each change it makes, and
// "done" when nothing needs undoing any more. If the socket closes without
// "done", the save died: the watchdog cancels the migration, runs the undo
// commands newest first, resumes the guest if it ran, and says so on stderr.

#pragma once

#include <sys/types.h>

#include "core/qmp.h"
#include "io/fd.h"
#include "lib/common.h"

namespace vmsave {

class Watchdog {
 public:
  Watchdog() = default;
  Watchdog(Watchdog&& o) noexcept;
  Watchdog& operator=(Watchdog&& o) noexcept;
  ~Watchdog() { disarm(); }

  // Forks the watchdog for `qmp` and routes qmp's undo notes to it.
  // `resume`: the guest ran when the save began.
  static Result<Watchdog> start(QmpClient& qmp, bool resume);

  // Nothing is left to undo: the watchdog exits without touching QEMU, and
  // this waits for it. Idempotent.
  void disarm();

 private:
  pid_t pid_ = -1;
  UniqueFd sock_;
  QmpClient* qmp_ = nullptr;
};

}  // namespace vmsave
