#include "core/watchdog.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <vector>

#include <fmt/core.h>

#include "core/qemu.h"

namespace vmsave {

namespace {

// Closes every descriptor from 3 up except those in `keep`.
void close_all_but(std::vector<int> keep) {
  std::sort(keep.begin(), keep.end());
  unsigned from = 3;
  for (int fd : keep) {
    if (fd < static_cast<int>(from)) continue;
    if (static_cast<unsigned>(fd) > from) ::close_range(from, fd - 1, 0);
    from = fd + 1;
  }
  ::close_range(from, ~0U, 0);
}

// One note to the watchdog: a JSON object per line.
void send_note(int sock, const nlohmann::json& note) {
  std::string line = note.dump() + "\n";
  (void)::send(sock, line.data(), line.size(), MSG_NOSIGNAL);
}

// A note naming the file `fd` is by its inode: `note` with "dev" and "ino"
// added, so that the watchdog acts on that file only (see still_there).
nlohmann::json with_identity(nlohmann::json note, int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return nullptr;
  note["dev"] = st.st_dev;
  note["ino"] = st.st_ino;
  return note;
}

// Whether `path` is still the file `note` names by inode (not followed
// through a link: vmsave made neither the image nor a RAM file one).
bool still_there(const std::string& path, const nlohmann::json& note) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0 && st.st_dev == note.value("dev", dev_t(0)) &&
         st.st_ino == note.value("ino", ino_t(0));
}

// The watchdog process: waits for "done" or for vmsave to die, and then
// undoes the notes newest first. Never returns.
[[noreturn]] void watch(QmpClient* qmp, int sock, bool resume, const char* command) {
  // Its own session, deaf to the signals vmsave handles itself: a Ctrl-C or
  // hangup reaches vmsave, which cleans up and sends "done".
  ::setsid();
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE}) ::signal(sig, SIG_IGN);
  int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null >= 0) {
    ::dup2(null, STDIN_FILENO);
    ::dup2(null, STDOUT_FILENO);
  }
  if (qmp)
    close_all_but({qmp->socket_fd(), sock});
  else
    close_all_but({sock});

  std::vector<nlohmann::json> notes;
  std::string in;
  char buf[4096];
  bool patient = false;
  for (;;) {
    ssize_t n = ::read(sock, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // vmsave is gone without saying "done"
    in.append(buf, n);
    for (size_t nl; (nl = in.find('\n')) != std::string::npos; in.erase(0, nl + 1)) {
      std::string line = in.substr(0, nl);
      if (line == "done") ::_exit(0);
      if (line == "patient") patient = true;
      auto note = nlohmann::json::parse(line, nullptr, false);
      if (!note.is_object()) continue;
      if (note.contains("kill")) note["pidfd"] = open_pidfd(note["kill"].get<pid_t>()).release();
      notes.push_back(std::move(note));
    }
  }

  if (qmp && patient) {
    // vmsave has said what is left and gone: nobody reads our stderr now
    // (and a wrapper waiting for the pipe to close must not wait for us).
    // Opened again: close_all_but() closed the first one, and the line
    // below ("the save was killed part-way") went to the user's terminal
    // after vmsave had exited with its own error.
    int quiet = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (quiet >= 0) ::dup2(quiet, STDERR_FILENO);
    auto give_up =
        std::chrono::steady_clock::now() + std::chrono::duration<double>(Watchdog::kPatience);
    for (;;) {
      qmp->resync(0.2);
      if (qmp->execute("query-status", nullptr, 5).ok()) break;
      if (qmp->broken()) ::_exit(0);  // QEMU is gone: nothing to put back
      if (std::chrono::steady_clock::now() > give_up) break;
    }
  }
  // Killed once the image was linked: the save is complete, and undoing it
  // would resume a guest whose image is there to be restored (two of one
  // VM, each writing its disks).
  for (auto& note : notes) {
    if (!qmp || !note.contains("commit")) continue;
    const std::string path = note.value("commit", "");
    if (!still_there(path, note)) break;  // not linked: undone below
    qmp->resync(0.2);
    const std::string after = note.value("after", "");
    std::string done = "the guest stays paused";
    if (after == "quit" && qmp->execute("quit", nullptr, 5).ok())
      done = "QEMU was told to quit, as the save does";
    else if (after == "quit")
      done = qmp->broken() ? "QEMU has quit" : "QEMU did not take the quit command";
    else if (after == "running")
      done = "the guest runs on";
    std::string msg = fmt::format(
        "vmsave: the save was killed after its image was committed ({}): {}\n", path, done);
    (void)!::write(STDERR_FILENO, msg.data(), msg.size());
    ::_exit(0);
  }
  if (qmp) {
    qmp->resync(0.2);
    // QEMU's own save of the RAM (mapped-ram with multifd) is let finish
    // into the temporary file, the guest stopped so that a live one ends:
    // cancelling it can crash QEMU (see mapped_ram_migrate). The guest is
    // resumed below if it ran.
    if (auto caps = qmp->execute("query-migrate-capabilities", nullptr, 5); caps.ok())
      for (auto& c : *caps)
        if (c.value("capability", "") == "multifd" && c.value("state", false)) {
          (void)qmp->execute("stop", nullptr, 5);
          (void)wait_migration_ended(*qmp, Watchdog::kPatience);
        }
    (void)qmp->execute("migrate_cancel", nullptr, 5);
    (void)wait_migration_ended(*qmp, 30);
  }
  bool killed = false, removed = false;
  for (auto it = notes.rbegin(); it != notes.rend(); ++it) {
    if (qmp && it->contains("execute")) {
      (void)qmp->execute(it->value("execute", ""), it->value("arguments", nlohmann::json()), 5);
    } else if (it->contains("kill") && it->value("pidfd", -1) >= 0) {
      // A pidfd, opened when the note came, cannot hit a reused pid.
      kill_and_wait(it->value("pidfd", -1));
      killed = true;
    } else if (it->contains("kill_marked")) {
      killed |= kill_marked(it->value("kill_marked", "")) > 0;
    } else if (it->contains("remove")) {
      const std::string path = it->value("remove", "");
      if (it->contains("ino") && !still_there(path, *it))
        continue;  // never linked there, or replaced since
      std::error_code ec;
      removed |= std::filesystem::remove_all(path, ec) > 0;
    }
  }
  for (auto& note : notes)
    if (note.contains("left")) removed |= remove_left_behind(note.value("left", ""));
  bool resumed = false;
  if (qmp && resume) {
    auto st = qmp->execute("query-status", nullptr, 5);
    if (st.ok() && !st->value("running", true)) resumed = qmp->execute("cont", nullptr, 5).ok();
  }
  std::string msg;
  if (qmp)
    msg = fmt::format(
        "vmsave: the save was killed part-way: no image was written, QEMU's migration settings "
        "are back as they were{}\n",
        resumed ? ", and the guest runs again" : "");
  else if (killed || removed)
    msg = fmt::format("vmsave: the {} was killed part-way: {}{}{}\n", command,
                      killed ? "the QEMU it started is stopped" : "",
                      killed && removed ? " and " : "",
                      removed ? "the files it made are removed" : "");
  // write(2), not stdio: a thread of vmsave may have held stderr's lock
  // when it forked.
  (void)!::write(STDERR_FILENO, msg.data(), msg.size());
  ::_exit(0);
}

}  // namespace

Watchdog::Watchdog(Watchdog&& o) noexcept
    : pid_(std::exchange(o.pid_, -1)),
      sock_(std::move(o.sock_)),
      qmp_(std::exchange(o.qmp_, nullptr)) {}

Watchdog& Watchdog::operator=(Watchdog&& o) noexcept {
  if (this != &o) {
    disarm();
    pid_ = std::exchange(o.pid_, -1);
    sock_ = std::move(o.sock_);
    qmp_ = std::exchange(o.qmp_, nullptr);
  }
  return *this;
}

Result<Watchdog> Watchdog::start(QmpClient& qmp, bool resume) {
  auto w = fork_watch(&qmp, resume, "save");
  if (!w.ok()) return w;
  qmp.set_undo_journal([fd = w->sock_.get()](const nlohmann::json& cmd) { send_note(fd, cmd); });
  return w;
}

Result<Watchdog> Watchdog::start(const char* command) {
  return fork_watch(nullptr, false, command);
}

Result<Watchdog> Watchdog::fork_watch(QmpClient* qmp, bool resume, const char* command) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
    return sys_error("socketpair", "", errno);
  UniqueFd ours(sv[0]), theirs(sv[1]);
  pid_t pid = ::fork();
  if (pid < 0) {
    Error e = sys_error("fork (vmsave's watchdog)", "", errno);
    if (errno == EAGAIN) e.hint = "raise the process limit (ulimit -u, a pids cgroup's pids.max)";
    return e;
  }
  if (pid == 0) watch(qmp, theirs.get(), resume, command);
  Watchdog w;
  w.pid_ = pid;
  w.sock_ = std::move(ours);
  w.qmp_ = qmp;
  return w;
}

void Watchdog::note_kill(pid_t pid) {
  if (pid_ > 0 && pid > 0) send_note(sock_.get(), {{"kill", pid}});
}

void Watchdog::note_kill_marked(const std::string& mark) {
  if (pid_ > 0 && !mark.empty()) send_note(sock_.get(), {{"kill_marked", mark}});
}

void Watchdog::note_remove(const std::string& path) {
  if (pid_ > 0) send_note(sock_.get(), {{"remove", path}});
}

void Watchdog::note_remove(const std::string& path, int fd) {
  if (pid_ <= 0) return;
  if (auto note = with_identity({{"remove", path}}, fd); !note.is_null())
    send_note(sock_.get(), note);
}

void Watchdog::note_left(const std::string& path) {
  std::error_code ec;
  std::string abs = std::filesystem::absolute(path, ec).string();
  if (pid_ > 0) send_note(sock_.get(), {{"left", ec ? path : abs}});
}

void Watchdog::note_commit(const std::string& path, int fd, const std::string& after) {
  if (pid_ <= 0) return;
  // Absolute: the watchdog looks it up after vmsave has gone.
  std::error_code ec;
  std::string abs = std::filesystem::absolute(path, ec).string();
  if (auto note = with_identity({{"commit", ec ? path : abs}, {"after", after}}, fd);
      !note.is_null())
    send_note(sock_.get(), note);
}

pid_t Watchdog::hand_over() {
  if (pid_ <= 0) return -1;
  if (qmp_) qmp_->set_undo_journal(nullptr);
  (void)::send(sock_.get(), "patient\n", 8, MSG_NOSIGNAL);
  sock_.reset();  // end of notes: the watchdog takes over
  return std::exchange(pid_, -1);
}

void Watchdog::disarm() {
  if (pid_ <= 0) return;
  if (qmp_) qmp_->set_undo_journal(nullptr);
  (void)::send(sock_.get(), "done\n", 5, MSG_NOSIGNAL);
  sock_.reset();
  while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
  }
  pid_ = -1;
}

}  // namespace vmsave
