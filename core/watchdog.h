// The watchdog: a process that undoes what vmsave did if vmsave dies.
//
// SIGINT, SIGTERM and errors unwind through vmsave's own clean-up. SIGKILL,
// the OOM killer or a crash do not. A killed save would leave the guest
// paused and x-ignore-shared set, so that the user's next migration of this
// VM would silently leave its RAM behind; a killed restore would leave a
// QEMU waiting for a migration that never comes, and RAM files the size of
// the guest in /dev/shm. So both fork a watchdog that waits on a socket.
// vmsave sends it what to undo before each change it makes, and "done" when
// nothing needs undoing any more. If the socket closes without "done",
// vmsave died, and the watchdog undoes the changes newest first:
//  - a save's QMP commands (QmpClient::note_undo), on the save's own QMP
//    connection, after cancelling the migration; then it resumes the guest
//    if it ran; unless the image was committed (note_commit), and the save
//    is then finished as it would have been;
//  - a restore's QEMU (note_kill) is killed and the files and directories
//    it made (note_remove) are removed.
// Then it says what it did in one line on stderr.

#pragma once

#include <sys/types.h>

#include <string>

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

  // A save's watchdog: shares `qmp` and takes its undo notes. `resume`: the
  // guest ran when the save began.
  static Result<Watchdog> start(QmpClient& qmp, bool resume);
  // A restore's (or prepare's: `command`) watchdog, told what to undo
  // through note_kill/note_remove.
  static Result<Watchdog> start(const char* command);

  // The process `pid` (a QEMU this run started) is killed if vmsave dies.
  void note_kill(pid_t pid);
  // So is every process whose environment holds `mark` (new_qemu_mark()):
  // a daemonizing QEMU, whose pid is not known yet.
  void note_kill_marked(const std::string& mark);
  // `path` (a file, or a directory with everything in it) is removed if
  // vmsave dies. Note only what this run created or truncated.
  void note_remove(const std::string& path);
  // The file `fd`, about to be linked at `path` (or just made there), is
  // removed if vmsave dies and `path` is still that file.
  void note_remove(const std::string& path, int fd);
  // What the QEMU it started may leave at `path` (its socket, log or
  // pidfile) is removed once that QEMU is killed: see remove_left_behind().
  void note_left(const std::string& path);

  // A save is about to link the image whose file `fd` is at `path`. If
  // vmsave dies after that, the watchdog finds that file at `path` and,
  // rather than undo a save that is complete, does what the save does once
  // its image is safe: `after` is "quit" (tells QEMU to quit), "running" or
  // "paused" (leaves the guest as it is).
  void note_commit(const std::string& path, int fd, const std::string& after);

  // Nothing is left to undo: the watchdog exits without touching anything,
  // and this waits for it. Idempotent.
  void disarm();

  // A save's clean-up that QEMU did not answer (its main loop stuck, or the
  // process stopped): the watchdog waits up to kPatience for QEMU to answer
  // again, then undoes the save as if vmsave had died. vmsave goes on
  // without waiting for it. Returns the watchdog's pid, or -1 if none.
  static constexpr double kPatience = 600;
  pid_t hand_over();

 private:
  static Result<Watchdog> fork_watch(QmpClient* qmp, bool resume, const char* command);

  pid_t pid_ = -1;
  UniqueFd sock_;
  QmpClient* qmp_ = nullptr;
};

}  // namespace vmsave
