// The QMP client: connect, greet, run commands, pass fds, collect events.
//
// Everything is poll() with a steady_clock deadline on a non-blocking socket,
// so no call can hang on a QEMU that stopped answering, and no thread is
// needed. Messages are framed by tracking JSON brace depth rather than by
// newlines: QEMU ends each message with "\r\n", but a -qmp-pretty monitor
// spreads one message over many lines, and a user may hand us either.
//
// Failure modes each get their own message, because "vmsave: error:
// connection refused" does not tell anyone what to do: a missing socket, a
// stale one nobody listens on, a path that is not a socket, an HMP monitor
// instead of QMP, a second client queued behind libvirt, and a QEMU that
// exited mid-command.

#include "core/qmp.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <fmt/core.h>

#include <climits>
#include <cmath>
#include <thread>

#include "lib/cancel.h"

namespace vmsave {

namespace {

using Clock = std::chrono::steady_clock;

// Upper bound on one message. The largest replies vmsave asks for
// (query-qmp-schema, qom-list of a big machine) are a few hundred KiB; a
// peer that sends 64 MiB without closing a brace is not QEMU.
constexpr size_t kMaxMessage = 64 << 20;

// How long an interruptible wait sleeps at most before it looks at the
// cancel flag again.
constexpr int kInterruptPollMs = 200;

// How often connect() is retried while the listen backlog is full, which is
// what a second client sees when QEMU's single monitor slot is taken.
constexpr auto kConnectRetry = std::chrono::milliseconds(20);

Clock::time_point deadline_in(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(std::max(seconds, 0.0)));
}

// Milliseconds left, rounded up so that poll() never returns early.
int ms_left(Clock::time_point deadline) {
  auto left = deadline - Clock::now();
  if (left <= Clock::duration::zero()) return 0;
  double ms = std::ceil(std::chrono::duration<double, std::milli>(left).count());
  return ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
}

std::string dump(const nlohmann::json& j) {
  // QEMU expects UTF-8; a stray invalid byte is replaced rather than making
  // nlohmann throw.
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// What the peer sent, short and printable, for an error message.
std::string snippet(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 80)) {
    if (c == '\r' || c == '\n') break;
    out += (c >= 0x20 && c < 0x7f) ? c : '?';
  }
  return out;
}

// What a QEMU that does not answer is doing, if it is known: a stopped
// process was blamed on another client or a busy main loop.
std::optional<Error> stopped_error(const std::string& what, const std::string& path, pid_t pid) {
  if (pid <= 0 || !process_stopped(pid)) return std::nullopt;
  return Error{what, path, fmt::format("its process {} is stopped (SIGSTOP, or a debugger)", pid),
               fmt::format("continue it (kill -CONT {}) and try again", pid)};
}

Error another_client_error(const std::string& path, double timeout_s, pid_t pid) {
  std::string what = fmt::format("QEMU did not greet on {} within {:g} s", path, timeout_s);
  if (auto e = stopped_error(what, "", pid)) return *e;
  return Error{what, "", "another QMP client (libvirt, another vmsave?) is probably connected",
               "QMP serves one client at a time"};
}

}  // namespace

Result<QmpClient> QmpClient::connect(const std::string& path, double timeout_s) {
  auto deadline = deadline_in(timeout_s);
  if (path.starts_with("tcp:") || path.starts_with("unix:") || path.starts_with("fd:"))
    return Error{"give the QMP socket as a path", path,
                 "vmsave talks QMP over a Unix socket only (it passes file descriptors to QEMU)"}
        .fix(path.starts_with("unix:")
                 ? "drop the unix: prefix and the options after the path"
                 : "start QEMU with -qmp unix:PATH,server=on,wait=off and give PATH")
        .as(Exit::kUsage);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return Error{"QMP socket path is unusable", path,
                 fmt::format("{} bytes; a Unix socket path holds 1 to {}", path.size(),
                             sizeof(addr.sun_path) - 1),
                 "use a shorter path for -qmp unix:PATH"};
  }
  memcpy(addr.sun_path, path.data(), path.size());

  struct stat st;
  if (::stat(path.c_str(), &st) < 0) {
    int err = errno;
    if (err == ENOENT) {
      return Error{"QMP socket does not exist", path, strerror(err),
                   "is QEMU running with -qmp unix:PATH,server=on,wait=off?"};
    }
    return sys_error("stat of QMP socket", path, err);
  }
  if (!S_ISSOCK(st.st_mode)) {
    return Error{"not a socket", path,
                 S_ISDIR(st.st_mode) ? "it is a directory" : "it is a file or device",
                 "give the path QEMU was started with in -qmp unix:PATH,server=on"};
  }

  QmpClient c;
  c.path_ = path;
  c.fd_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!c.fd_) return sys_error("socket(AF_UNIX)", path, errno);
  for (;;) {
    if (::connect(c.fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) break;
    int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN) {
      // The listen backlog is full: QEMU stops accepting while its monitor
      // has a client, so queued connections pile up here.
      if (cancelled()) return interrupted_error();
      if (Clock::now() >= deadline) return another_client_error(path, timeout_s, 0);
      std::this_thread::sleep_for(kConnectRetry);
      continue;
    }
    if (err == ECONNREFUSED) {
      return Error{"nothing is listening on the QMP socket", path, strerror(err),
                   "QEMU has exited and left the socket file behind, or was started with a "
                   "different -qmp path"};
    }
    if (err == EACCES || err == EPERM) {
      return Error{"no permission to connect to the QMP socket", path, strerror(err),
                   "run vmsave as the user QEMU runs as, or as root"};
    }
    return sys_error("connect to QMP socket", path, err);
  }

  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(c.fd_.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
    return sys_error("getsockopt(SO_PEERCRED) on QMP socket", path, errno);
  }
  c.peer_pid_ = cred.pid;

  // QEMU greets a client only once the one before it has gone: this wait
  // may be long, and nothing has been changed yet, so a signal ends it.
  auto greeting = c.read_message(deadline, true);
  // Gone before a word: while another client had it, which may have told
  // it to quit (a second save of one VM got only "has QEMU exited?").
  if (!greeting.ok() && c.broken_ && process_exited(c.peer_pid_, 2000))
    return Error{"QEMU exited before it greeted vmsave", path,
                 fmt::format("process {} is gone; a QMP client before vmsave (another save?) may "
                             "have told it to quit",
                             c.peer_pid_)}
        .fix("start the VM again if it should run");
  VMSAVE_TRY(greeting);
  if (!*greeting) return another_client_error(path, timeout_s, c.peer_pid_);
  if (!(*greeting)->contains("QMP") || !(**greeting)["QMP"].is_object()) {
    return c.protocol_error(dump(**greeting));
  }
  c.greeting_ = std::move(**greeting);
  // Capabilities negotiation runs on QEMU's main loop like any command, so
  // it gets the ordinary command timeout, not the greeting's.
  VMSAVE_TRY(c.execute("qmp_capabilities"));
  return c;
}

Error QmpClient::protocol_error(std::string_view got) const {
  if (greeting_.is_null()) {
    return Error{"the socket does not speak QMP", path_,
                 fmt::format("it sent \"{}\"", snippet(got)),
                 "is this an HMP (-monitor) or another program's socket? vmsave needs "
                 "QEMU's QMP socket (-qmp unix:PATH,server=on,wait=off)"};
  }
  return Error{"QEMU sent a malformed QMP message", path_, fmt::format("\"{}\"", snippet(got))};
}

Result<std::optional<nlohmann::json>> QmpClient::read_message(Deadline deadline,
                                                               bool interruptible) {
  for (;;) {
    // Between messages: drop the "\r\n" separator; anything but '{' next
    // means the peer is not speaking QMP.
    if (depth_ == 0) {
      in_.erase(0, std::min(in_.find_first_not_of(" \t\r\n"), in_.size()));
      scanned_ = 0;
      if (!in_.empty() && in_[0] != '{') {
        broken_ = protocol_error(in_);
        return *broken_;
      }
    }
    // Find the end of the next top-level object in what we already have.
    for (; scanned_ < in_.size(); scanned_++) {
      char c = in_[scanned_];
      if (in_string_) {
        if (escaped_) {
          escaped_ = false;
        } else if (c == '\\') {
          escaped_ = true;
        } else if (c == '"') {
          in_string_ = false;
        }
      } else if (c == '"') {
        in_string_ = true;
      } else if (c == '{' || c == '[') {
        depth_++;
      } else if ((c == '}' || c == ']') && --depth_ == 0) {
        size_t end = scanned_ + 1;
        auto msg = nlohmann::json::parse(in_.begin(), in_.begin() + end, nullptr, false);
        if (msg.is_discarded() || !msg.is_object()) {
          broken_ = protocol_error(in_.substr(0, end));
          return *broken_;
        }
        in_.erase(0, end);
        scanned_ = 0;
        return std::optional<nlohmann::json>(std::move(msg));
      }
    }
    if (in_.size() > kMaxMessage) {
      broken_ = protocol_error(in_);
      broken_->detail += fmt::format(" ... ({} bytes without an end)", in_.size());
      return *broken_;
    }

    if (interruptible && cancelled()) return interrupted_error();
    pollfd p{fd_.get(), POLLIN, 0};
    // Interruptible waits wake now and then: a signal that lands between
    // the check above and poll() must not wait for the deadline.
    int timeout = ms_left(deadline);
    if (interruptible) timeout = std::min(timeout, kInterruptPollMs);
    int n = ::poll(&p, 1, timeout);
    if (n < 0) {
      if (errno == EINTR) continue;
      return sys_error("poll on QMP socket", path_, errno);
    }
    if (n == 0) {
      if (Clock::now() < deadline) continue;
      return std::optional<nlohmann::json>();
    }

    // Straight into in_: a 64 KiB buffer on the stack overflowed a stack
    // of `ulimit -s 64`.
    constexpr size_t kChunk = 64 * 1024;
    const size_t had = in_.size();
    in_.resize(had + kChunk);
    ssize_t got = ::recv(fd_.get(), in_.data() + had, kChunk, 0);
    in_.resize(had + std::max<ssize_t>(got, 0));
    if (got < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      if (errno != ECONNRESET) return sys_error("recv on QMP socket", path_, errno);
      got = 0;
    }
    if (got == 0) {
      broken_ = Error{"QEMU closed the QMP connection", path_, "",
                      "has QEMU exited? its log or stderr says why"};
      return *broken_;
    }
  }
}

Status QmpClient::send(const std::string& bytes, int fd, Deadline deadline) {
  size_t off = 0;
  bool fd_sent = fd < 0;
  while (off < bytes.size()) {
    ssize_t n;
    if (!fd_sent) {
      // The fd travels with the first byte of the command, so QEMU has it
      // queued by the time it parses the command that names it.
      iovec iov{const_cast<char*>(bytes.data() + off), bytes.size() - off};
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control;
      msg.msg_controllen = sizeof(control);
      cmsghdr* cm = CMSG_FIRSTHDR(&msg);
      cm->cmsg_level = SOL_SOCKET;
      cm->cmsg_type = SCM_RIGHTS;
      cm->cmsg_len = CMSG_LEN(sizeof(int));
      memcpy(CMSG_DATA(cm), &fd, sizeof(int));
      n = ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL);
    } else {
      // MSG_NOSIGNAL: a dead QEMU must be an EPIPE error here, not a SIGPIPE
      // that kills vmsave halfway through a save.
      n = ::send(fd_.get(), bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
    }
    if (n < 0) {
      int err = errno;
      if (err == EINTR) continue;
      if (err == EAGAIN) {
        pollfd p{fd_.get(), POLLOUT, 0};
        int r = ::poll(&p, 1, ms_left(deadline));
        if (r < 0 && errno != EINTR) return sys_error("poll on QMP socket", path_, errno);
        if (r == 0) {
          return Error{"QEMU is not reading its QMP socket", path_,
                       "the command could not be sent before the timeout"};
        }
        continue;
      }
      if (err == EPIPE || err == ECONNRESET) {
        broken_ = Error{"QEMU closed the QMP connection", path_, "",
                        "has QEMU exited? its log or stderr says why"};
        return *broken_;
      }
      return sys_error(fd_sent ? "send on QMP socket" : "sendmsg(SCM_RIGHTS) on QMP socket", path_,
                       err);
    }
    off += n;
    fd_sent = true;
  }
  return {};
}

Result<nlohmann::json> QmpClient::call(const std::string& cmd, const nlohmann::json& args, int fd,
                                       double timeout_s) {
  if (broken_) return *broken_;
  // Stopped at the last command's timeout and still: clean-up commands
  // fail at once instead of each waiting out its own.
  if (stalled_) {
    if (auto e = stopped_error(fmt::format("QEMU did not answer {}", cmd), path_, peer_pid_))
      return *e;
    stalled_ = false;
  }
  auto deadline = deadline_in(timeout_s);
  // A fresh id per command: a reply that arrives after we gave up on its
  // command is recognised and dropped instead of answering the next one.
  nlohmann::json id = fmt::format("{}{}", id_prefix_, next_id_++);
  nlohmann::json msg = {{"execute", cmd}, {"id", id}};
  if (!args.is_null()) msg["arguments"] = args;
  VMSAVE_TRY(send(dump(msg) + "\r\n", fd, deadline));

  for (;;) {
    auto m = read_message(deadline);
    VMSAVE_TRY(m);
    if (!*m) {
      std::string what = fmt::format("QEMU did not answer {} within {:g} s", cmd, timeout_s);
      if (auto e = stopped_error(what, path_, peer_pid_)) {
        stalled_ = true;
        return *e;
      }
      return Error{what, path_, "", "QEMU's main loop is busy or stuck; see its log"};
    }
    nlohmann::json& r = **m;
    if (r.contains("event")) {
      events_.push_back(std::move(r));
      continue;
    }
    // QEMU copies our id into the reply; only a request it could not parse
    // at all gets an error without one, and ours is the only one in flight.
    if (r.contains("id") ? r["id"] != id : !r.contains("error")) continue;
    if (r.contains("error")) {
      // QEMU's error is {"class": string, "desc": string}; anything else
      // (a peer that is not quite QEMU) is shown as it came, never thrown.
      const auto& e = r["error"];
      auto field = [&](const char* key, const char* fallback) {
        auto it = e.is_object() ? e.find(key) : e.end();
        return it != e.end() && it->is_string() ? it->get<std::string>() : std::string(fallback);
      };
      std::string cls = field("class", "GenericError");
      std::string desc = e.is_object() ? field("desc", "") : snippet(dump(e));
      return Error{"QEMU refused " + cmd, path_, cls + ": " + desc};
    }
    if (r.contains("return")) return std::move(r["return"]);
    broken_ = protocol_error(dump(r));
    return *broken_;
  }
}

void QmpClient::resync(double quiet_s) {
  in_.clear();
  events_.clear();
  broken_.reset();
  char buf[4096];
  for (;;) {
    pollfd p{fd_.get(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(quiet_s * 1000)) <= 0) break;
    ssize_t n = ::read(fd_.get(), buf, sizeof(buf));
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) break;  // hung up: the next call reports it
    in_.append(buf, n);
  }
  // Messages end in "\r\n": what follows the last one is the start of the
  // next, unless it is the tail of one the dead process began reading.
  size_t nl = in_.rfind('\n');
  in_.erase(0, nl == std::string::npos ? 0 : nl + 1);
  if (!in_.empty() && in_[0] != '{') in_.clear();
  scanned_ = 0;
  depth_ = 0;
  in_string_ = escaped_ = false;
  id_prefix_ = fmt::format("vmsave-{}-", ::getpid());
}

Result<nlohmann::json> QmpClient::execute(const std::string& cmd, const nlohmann::json& args,
                                          double timeout_s) {
  return call(cmd, args, -1, timeout_s);
}

Status QmpClient::getfd(const std::string& name, int fd, double timeout_s) {
  auto r = call("getfd", {{"fdname", name}}, fd, timeout_s);
  return r.status();
}

Result<nlohmann::json> QmpClient::add_fd(int fd, std::optional<i64> fdset_id,
                                         const std::string& opaque, double timeout_s) {
  nlohmann::json args = nlohmann::json::object();
  if (fdset_id) args["fdset-id"] = *fdset_id;
  if (!opaque.empty()) args["opaque"] = opaque;
  return call("add-fd", args, fd, timeout_s);
}

std::vector<nlohmann::json> QmpClient::take_events() {
  // Pick up what QEMU already sent without waiting; replies read here are
  // stale ones (to commands that timed out) and are dropped.
  while (!broken_) {
    auto m = read_message(Clock::now());
    if (!m || !*m) break;
    if ((*m)->contains("event")) events_.push_back(std::move(**m));
  }
  std::vector<nlohmann::json> out(std::make_move_iterator(events_.begin()),
                                  std::make_move_iterator(events_.end()));
  events_.clear();
  return out;
}

Result<nlohmann::json> QmpClient::wait_event(const std::string& name, double timeout_s) {
  return wait_event(
      name, [](const nlohmann::json&) { return true; }, timeout_s);
}

Result<nlohmann::json> QmpClient::wait_event(
    const std::string& name, const std::function<bool(const nlohmann::json&)>& match,
    double timeout_s) {
  auto wanted = [&](const nlohmann::json& ev) {
    auto it = ev.find("event");
    return it != ev.end() && *it == name && match(ev);
  };
  for (auto it = events_.begin(); it != events_.end(); ++it) {
    if (wanted(*it)) {
      nlohmann::json ev = std::move(*it);
      events_.erase(it);
      return ev;
    }
  }
  if (broken_) return *broken_;
  auto deadline = deadline_in(timeout_s);
  for (;;) {
    auto m = read_message(deadline);
    VMSAVE_TRY(m);
    if (!*m) {
      return Error{fmt::format("no {} event from QEMU within {:g} s", name, timeout_s), path_};
    }
    if (!(*m)->contains("event")) continue;  // a stale reply
    if (wanted(**m)) return std::move(**m);
    events_.push_back(std::move(**m));
  }
}

}  // namespace vmsave
