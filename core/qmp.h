// A QMP (QEMU Machine Protocol) client over a Unix socket.
//
// One connection, one command at a time, no threads: save and restore are
// sequential recipes, so a blocking call with a deadline is all they need.
// Events QEMU sends while we wait for a reply are queued, never dropped,
// because the one we need (STOP, MIGRATION, RESUME) often arrives before the
// reply to the command that caused it.

#pragma once

#include <sys/types.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <deque>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "io/fd.h"
#include "io/queue.h"
#include "lib/common.h"

namespace vmsave {

// The default wait for a reply or an event. QEMU answers most commands in
// microseconds, but it runs them on its main loop, which a guest under heavy
// I/O or a slow device (a stuck NFS-backed disk during "stop" flushes) can
// hold for seconds; 30 s is long enough not to fail a healthy but busy VM
// and short enough that a wedged QEMU is reported while the user waits.
constexpr double kQmpTimeout = 30;

// The wait the user chose with --qmp-timeout, for replies too; 0 if none.
inline double& chosen_qmp_timeout() {
  static double s = 0;
  return s;
}

// Takes the user's --qmp-timeout (0: none given) for every QMP wait from
// now on, and returns the wait to connect: that, or 10 s.
inline double use_qmp_timeout(double chosen) {
  if (chosen > 0) chosen_qmp_timeout() = chosen;
  return chosen > 0 ? chosen : 10;
}

// kQmpTimeout, or the user's --qmp-timeout, or what VMSAVE_FAULT=
// qmp-timeout:S says (tests of a QEMU that stops answering).
inline double qmp_timeout() {
  double s = FaultPlan::get().qmp_timeout_s;
  if (s > 0) return s;
  return chosen_qmp_timeout() > 0 ? chosen_qmp_timeout() : kQmpTimeout;
}

class QmpClient {
 public:
  QmpClient(QmpClient&&) = default;
  QmpClient& operator=(QmpClient&&) = default;
  QmpClient(const QmpClient&) = delete;
  QmpClient& operator=(const QmpClient&) = delete;

  // Connects to the socket at `path`, reads QEMU's greeting and negotiates
  // capabilities. A QMP socket serves one client at a time: a second client
  // is accepted by the kernel but greeted only when the first one leaves, so
  // the greeting wait has its own `timeout_s`, and running out of it says
  // another client is probably connected.
  static Result<QmpClient> connect(const std::string& path, double timeout_s = 5);

  // Runs {"execute": cmd, "arguments": args} (no "arguments" when `args` is
  // null) and returns the reply's "return" value. A QEMU error reply becomes
  // Error{"QEMU refused <cmd>", path, "<class>: <desc>"}.
  Result<nlohmann::json> execute(const std::string& cmd, const nlohmann::json& args = nullptr,
                                 double timeout_s = qmp_timeout());

  // getfd: hands `fd` to QEMU (SCM_RIGHTS) under `name`, for commands that
  // take "fd:name" (migrate, add_client). QEMU keeps its own copy.
  Status getfd(const std::string& name, int fd, double timeout_s = qmp_timeout());

  // add-fd: adds a copy of `fd` to fd set `fdset_id` (a new set when
  // nullopt), for "/dev/fdset/N" paths such as file: migration. Returns the
  // reply ({"fdset-id": N, "fd": M}).
  Result<nlohmann::json> add_fd(int fd, std::optional<i64> fdset_id, const std::string& opaque,
                                double timeout_s = qmp_timeout());

  // Every event received and not yet taken, oldest first; reads whatever is
  // already waiting on the socket first, without blocking.
  std::vector<nlohmann::json> take_events();

  // Waits for the next event called `name` (one already queued counts) and
  // removes it from the queue; other events stay queued in order.
  Result<nlohmann::json> wait_event(const std::string& name, double timeout_s = qmp_timeout());
  Result<nlohmann::json> wait_event(const std::string& name,
                                    const std::function<bool(const nlohmann::json&)>& match,
                                    double timeout_s = qmp_timeout());

  // How to put back what a save changes in QEMU: code that changes a
  // setting first notes the command that restores it. The save's watchdog
  // (core/watchdog.h) keeps the notes and runs them if vmsave dies part-way;
  // without one, notes are dropped.
  void set_undo_journal(std::function<void(const nlohmann::json& command)> journal) {
    undo_journal_ = std::move(journal);
  }
  void note_undo(const std::string& cmd, const nlohmann::json& args) {
    if (undo_journal_) undo_journal_({{"execute", cmd}, {"arguments", args}});
  }

  // For a process that takes over this connection from one that died with
  // a reply half-read (the watchdog): drops what was buffered and whatever
  // arrives until the line falls quiet for `quiet_s`, keeping only a
  // message that is still arriving, and numbers commands apart from the
  // dead process's, so its late replies are never taken for ours.
  void resync(double quiet_s);

  // The QEMU process on the other end (SO_PEERCRED at connect time).
  pid_t peer_pid() const { return peer_pid_; }
  // {"QMP": {"version": {...}, "capabilities": [...]}}
  const nlohmann::json& greeting() const { return greeting_; }
  const std::string& path() const { return path_; }
  int socket_fd() const { return fd_.get(); }
  // QEMU hung up or broke the protocol: every later call fails.
  bool broken() const { return broken_.has_value(); }

 private:
  QmpClient() = default;

  using Deadline = std::chrono::steady_clock::time_point;

  Status send(const std::string& bytes, int fd, Deadline deadline);
  // The next message; nullopt when the deadline passes first. With
  // `interruptible` (waiting to be greeted, before anything has changed),
  // SIGINT/SIGTERM end the wait.
  Result<std::optional<nlohmann::json>> read_message(Deadline deadline,
                                                     bool interruptible = false);
  Result<nlohmann::json> call(const std::string& cmd, const nlohmann::json& args, int fd,
                              double timeout_s);
  Error protocol_error(std::string_view got) const;

  UniqueFd fd_;
  bool stalled_ = false;  // the last command timed out with QEMU stopped
  std::string path_;
  nlohmann::json greeting_;
  pid_t peer_pid_ = -1;
  std::string in_;      // bytes received, not yet parsed
  size_t scanned_ = 0;  // how far in_ has been scanned for a message end
  int depth_ = 0;       // brace depth at scanned_
  bool in_string_ = false, escaped_ = false;
  std::deque<nlohmann::json> events_;
  u64 next_id_ = 1;
  std::string id_prefix_ = "vmsave-";
  std::function<void(const nlohmann::json&)> undo_journal_;
  // Set when QEMU hung up or broke the protocol: the stream cannot be
  // trusted again, so every later call returns this error.
  std::optional<Error> broken_;
};

}  // namespace vmsave
