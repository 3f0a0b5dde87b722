#include "core/watchdog.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
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

// The watchdog process: waits for "done" or for the save to die, and then
// puts QEMU back. Never returns.
[[noreturn]] void watch(QmpClient& qmp, int sock, bool resume) {
  // Its own session, deaf to the signals the save handles itself: a Ctrl-C
  // or hangup reaches the save, which cleans up and sends "done".
  ::setsid();
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE}) ::signal(sig, SIG_IGN);
  int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null >= 0) {
    ::dup2(null, STDIN_FILENO);
    ::dup2(null, STDOUT_FILENO);
  }
  close_all_but({qmp.socket_fd(), sock});

  std::vector<nlohmann::json> undo;
  std::string in;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(sock, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // the save is gone without saying "done"
    in.append(buf, n);
    for (size_t nl; (nl = in.find('\n')) != std::string::npos; in.erase(0, nl + 1)) {
      std::string line = in.substr(0, nl);
      if (line == "done") ::_exit(0);
      auto cmd = nlohmann::json::parse(line, nullptr, false);
      if (cmd.is_object()) undo.push_back(std::move(cmd));
    }
  }

  qmp.resync(0.2);
  (void)qmp.execute("migrate_cancel", nullptr, 5);
  (void)wait_migration(qmp, 30, "cancelled save");
  for (auto it = undo.rbegin(); it != undo.rend(); ++it)
    (void)qmp.execute(it->value("execute", ""), it->value("arguments", nlohmann::json()), 5);
  bool resumed = false;
  if (resume) {
    auto st = qmp.execute("query-status", nullptr, 5);
    if (st.ok() && !st->value("running", true)) resumed = qmp.execute("cont", nullptr, 5).ok();
  }
  // write(2), not stdio: a thread of the save may have held stderr's lock
  // when it forked.
  std::string msg = fmt::format(
      "vmsave: the save was killed part-way: no image was written, QEMU's migration settings "
      "are back as they were{}\n",
      resumed ? ", and the guest runs again" : "");
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
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
    return sys_error("socketpair", "", errno);
  UniqueFd ours(sv[0]), theirs(sv[1]);
  pid_t pid = ::fork();
  if (pid < 0) return sys_error("fork (the save's watchdog)", "", errno);
  if (pid == 0) watch(qmp, theirs.get(), resume);
  Watchdog w;
  w.pid_ = pid;
  w.sock_ = std::move(ours);
  w.qmp_ = &qmp;
  int fd = w.sock_.get();
  qmp.set_undo_journal([fd](const nlohmann::json& cmd) {
    std::string line = cmd.dump() + "\n";
    (void)::send(fd, line.data(), line.size(), MSG_NOSIGNAL);
  });
  return w;
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
