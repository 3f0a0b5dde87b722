// Tests for core/qmp: a scripted fake QMP server on a Unix socket (one
// std::thread per case) for the protocol's edges, then a real QEMU.

#include "core/qmp.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>
#include <fmt/core.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <thread>

#include "tests/test_util.h"
#include "tests/vm_fixture.h"

using namespace vmsave;
using json = nlohmann::json;

namespace {

const char* kGreeting =
    R"({"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""},)"
    R"( "capabilities": ["oob"]}})";

// A listening Unix socket whose one connection is served by `script` on a
// thread. The destructor joins the thread and closes everything.
class FakeQmp {
 public:
  explicit FakeQmp(const std::string& path) : path_(path) {
    listen_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    REQUIRE(listen_.valid());
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    REQUIRE(path.size() < sizeof(addr.sun_path));
    memcpy(addr.sun_path, path.data(), path.size());
    REQUIRE(::bind(listen_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
    REQUIRE(::listen(listen_.get(), 4) == 0);
  }
  ~FakeQmp() {
    join();
    ::unlink(path_.c_str());
  }

  // Waits for the script to finish; what it recorded is safe to read after.
  void join() {
    if (thread_.joinable()) thread_.join();
  }

  void serve(std::function<void(FakeQmp&)> script) {
    thread_ = std::thread([this, script] {
      conn_.reset(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (conn_) script(*this);
      conn_.reset();
    });
  }

  void send(const std::string& s) {
    size_t off = 0;
    while (off < s.size()) {
      ssize_t n = ::send(conn_.get(), s.data() + off, s.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return;
      off += n;
    }
  }

  // The next "\n"-terminated request as JSON (null on EOF or a 10 s stall),
  // taking any fd that came with it into `fd`.
  json request(UniqueFd* fd = nullptr) {
    for (;;) {
      size_t nl = buf_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return json::parse(line, nullptr, false);
      }
      pollfd p{conn_.get(), POLLIN, 0};
      if (::poll(&p, 1, 10000) <= 0) return nullptr;
      char data[4096];
      iovec iov{data, sizeof(data)};
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control;
      msg.msg_controllen = sizeof(control);
      ssize_t n = ::recvmsg(conn_.get(), &msg, MSG_CMSG_CLOEXEC);
      if (n <= 0) return nullptr;
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && fd) {
          int got;
          memcpy(&got, CMSG_DATA(c), sizeof(int));
          fd->reset(got);
        }
      }
      buf_.append(data, n);
    }
  }

  // Answers one request with {"return": ret}, echoing its id.
  json reply(const json& ret = json::object()) {
    json r = request();
    if (!r.is_null()) send(json{{"return", ret}, {"id", r["id"]}}.dump() + "\r\n");
    return r;
  }

  // Answers the next request with an error of `cls` saying `desc`.
  void refuse(const std::string& cls, const std::string& desc) {
    json r = request();
    send(json{{"error", {{"class", cls}, {"desc", desc}}}, {"id", r["id"]}}.dump() + "\r\n");
  }

  // The usual opening: greeting, then the capabilities handshake.
  void handshake() {
    send(std::string(kGreeting) + "\r\n");
    json caps = reply();
    CHECK(caps["execute"] == "qmp_capabilities");
  }

  const std::string& path() const { return path_; }

 private:
  std::string path_;
  UniqueFd listen_;
  UniqueFd conn_;
  std::string buf_;
  std::thread thread_;
};

QmpClient connect_ok(const std::string& path, double timeout_s = 5) {
  auto c = QmpClient::connect(path, timeout_s);
  REQUIRE_MESSAGE(c.ok(), (c.ok() ? "" : c.error().message()));
  return std::move(*c);
}

std::string message_of(const Status& s) {
  return s.ok() ? "(ok)" : s.error().message();
}

}  // namespace

TEST_CASE("qmp: greeting, capabilities and a command") {
  test::TempDir dir;
  FakeQmp server(dir / "qmp.sock");
  json seen_status;
  server.serve([&](FakeQmp& s) {
    s.handshake();
    seen_status = s.reply({{"status", "running"}, {"running", true}});
  });
  QmpClient c = connect_ok(server.path());
  CHECK(c.greeting()["QMP"]["version"]["qemu"]["major"] == 10);
  CHECK(c.peer_pid() == getpid());
  CHECK(c.path() == server.path());
  auto st = c.execute("query-status");
  REQUIRE_MESSAGE(st.ok(), message_of(st.status()));
  CHECK((*st)["status"] == "running");
  server.join();
  CHECK(seen_status["execute"] == "query-status");
  CHECK_FALSE(seen_status.contains("arguments"));
  CHECK(seen_status["id"].is_string());
}

TEST_CASE("qmp: arguments are sent, and events that arrive before a reply are kept") {
  test::TempDir dir;
  FakeQmp server(dir / "qmp.sock");
  json seen;
  server.serve([&](FakeQmp& s) {
    s.handshake();
    seen = s.request();
    s.send(R"({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}})"
           "\r\n");
    s.send(R"({"event": "RTC_CHANGE", "data": {"offset": 1}})"
           "\r\n");
    s.send(json{{"return", json::object()}, {"id", seen["id"]}}.dump() + "\r\n");
    // An event that comes later, while the client waits for it.
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    s.send(R"({"event": "RESUME", "data": {}})"
           "\r\n");
    s.request();  // holds the connection open until the client closes it
  });
  QmpClient c = connect_ok(server.path());
  auto r = c.execute("stop", {{"flag", true}});
  REQUIRE_MESSAGE(r.ok(), message_of(r.status()));
  CHECK(seen["arguments"]["flag"] == true);
  auto stop = c.wait_event("STOP", 0.1);
  REQUIRE_MESSAGE(stop.ok(), message_of(stop.status()));
  CHECK((*stop)["timestamp"]["seconds"] == 1);
  auto resume = c.wait_event(
      "RESUME", [](const json& ev) { return ev.contains("data"); }, 5);
  REQUIRE_MESSAGE(resume.ok(), message_of(resume.status()));
  auto rest = c.take_events();
  REQUIRE(rest.size() == 1);
  CHECK(rest[0]["event"] == "RTC_CHANGE");
  CHECK(c.take_events().empty());

  auto none = c.wait_event("SHUTDOWN", 0.2);
  REQUIRE_FALSE(none.ok());
  CHECK(none.error().what.find("no SHUTDOWN event") != std::string::npos);
}

TEST_CASE("qmp: an error reply names QEMU's class and description") {
  test::TempDir dir;
  FakeQmp server(dir / "qmp.sock");
  server.serve([&](FakeQmp& s) {
    s.handshake();
    s.refuse("CommandNotFound", "The command nope has not been found");
    s.reply({{"ok", 1}});
  });
  QmpClient c = connect_ok(server.path());
  auto r = c.execute("nope");
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().what == "QEMU refused nope");
  CHECK(r.error().path == server.path());
  CHECK(r.error().detail == "CommandNotFound: The command nope has not been found");
  // The connection is still good after a refusal.
  auto ok = c.execute("next");
  REQUIRE_MESSAGE(ok.ok(), message_of(ok.status()));
  CHECK((*ok)["ok"] == 1);
}

TEST_CASE("qmp: an error reply whose fields have the wrong JSON types is still an error value") {
  // Found by tests/fuzz/fuzz_qmp: {"error": {"desc": ["oob"]}} made
  // json::value() throw out of QmpClient::call.
  test::TempDir dir;
  FakeQmp server(dir / "qmp.sock");
  const json errors[] = {json{{"class", json::array({1})}, {"desc", json::array({"oob"})}},
                         json("a string"), json(42), json{{"desc", nullptr}}};
  server.serve([&](FakeQmp& s) {
    s.handshake();
    for (const json& e : errors) {
      json req = s.request();
      s.send(json{{"error", e}, {"id", req["id"]}}.dump() + "\r\n");
    }
    s.reply({{"ok", 1}});
  });
  QmpClient c = connect_ok(server.path());
  const char* want[] = {"GenericError: ", "GenericError: \"a string\"", "GenericError: 42",
                        "GenericError: "};
  for (int i = 0; i < 4; i++) {
    CAPTURE(i);
    auto r = c.execute("odd");
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().what == "QEMU refused odd");
    CHECK(r.error().detail == want[i]);
  }
  auto ok = c.execute("next");
  REQUIRE_MESSAGE(ok.ok(), message_of(ok.status()));
}

TEST_CASE("qmp: stale replies are dropped and a slow command times out") {
  test::TempDir dir;
  FakeQmp server(dir / "qmp.sock");
  server.serve([&](FakeQmp& s) {
    s.handshake();
    json slow = s.request();  // not answered in time
    json next = s.request();
    s.send(json{{"return", "late"}, {"id", slow["id"]}}.dump() + "\r\n");
    s.send(json{{"return", "fresh"}, {"id", next["id"]}}.dump() + "\r\n");
  });
  QmpClient c = connect_ok(server.path());
  auto t0 = std::chrono::steady_clock::now();
  auto slow = c.execute("slow", nullptr, 0.3);
  double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE_FALSE(slow.ok());
  CHECK(slow.error().what == "QEMU did not answer slow within 0.3 s");
  CHECK(took >= 0.29);
  CHECK(took < 2);
  auto next = c.execute("next");
  REQUIRE_MESSAGE(next.ok(), message_of(next.status()));
  CHECK(*next == "fresh");
}

TEST_CASE("qmp: pretty-printed messages over several lines") {
  test::TempDir dir;
  FakeQmp server(dir / "qmp.sock");
  server.serve([&](FakeQmp& s) {
    s.send(json::parse(kGreeting).dump(4) + "\n");
    json caps = s.request();
    s.send(json{{"return", json::object()}, {"id", caps["id"]}}.dump(4) + "\n");
    json req = s.request();
    // Split mid-string, with braces and an escaped quote inside the string.
    std::string reply = json{{"return", {{"s", "a \"{[}\" b"}}}, {"id", req["id"]}}.dump(2) + "\n";
    s.send(reply.substr(0, 7));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    s.send(reply.substr(7));
  });
  QmpClient c = connect_ok(server.path());
  auto r = c.execute("x");
  REQUIRE_MESSAGE(r.ok(), message_of(r.status()));
  CHECK((*r)["s"] == "a \"{[}\" b");
}

TEST_CASE("qmp: garbage is a protocol error naming the socket") {
  test::TempDir dir;
  SUBCASE("before the greeting: not QMP at all") {
    FakeQmp server(dir / "hmp.sock");
    server.serve([&](FakeQmp& s) {
      s.send("QEMU 10.0.2 monitor - type 'help' for more information\r\n(qemu) ");
      s.request();
    });
    auto c = QmpClient::connect(server.path(), 2);
    REQUIRE_FALSE(c.ok());
    CHECK(c.error().what == "the socket does not speak QMP");
    CHECK(c.error().path == server.path());
    CHECK(c.error().detail.find("QEMU 10.0.2 monitor") != std::string::npos);
    CHECK(c.error().hint.find("HMP") != std::string::npos);
  }
  SUBCASE("a JSON greeting that is not QMP's") {
    FakeQmp server(dir / "json.sock");
    server.serve([&](FakeQmp& s) {
      s.send("{\"hello\": 1}\n");
      s.request();
    });
    auto c = QmpClient::connect(server.path(), 2);
    REQUIRE_FALSE(c.ok());
    CHECK(c.error().what == "the socket does not speak QMP");
  }
  for (std::string junk : {"this is not json\r\n", "{\"return\": nonsense}\r\n", "[1, 2]\r\n"}) {
    CAPTURE(junk);
    FakeQmp server(dir / "junk.sock");
    server.serve([&](FakeQmp& s) {
      s.handshake();
      s.request();
      s.send(junk);
      s.request();
    });
    QmpClient c = connect_ok(server.path());
    auto r = c.execute("query-status", nullptr, 5);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().what == "QEMU sent a malformed QMP message");
    CHECK(r.error().path == server.path());
    // The stream cannot be trusted again.
    auto again = c.execute("query-status", nullptr, 5);
    REQUIRE_FALSE(again.ok());
    CHECK(again.error().what == "QEMU sent a malformed QMP message");
  }
}

TEST_CASE("qmp: a server that never greets times out with the one-client message") {
  test::TempDir dir;
  FakeQmp server(dir / "busy.sock");
  server.serve([&](FakeQmp& s) { s.request(); });  // accepts, never greets
  auto t0 = std::chrono::steady_clock::now();
  auto c = QmpClient::connect(server.path(), 0.5);
  double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE_FALSE(c.ok());
  CHECK(took >= 0.45);
  CHECK(took < 3);
  std::string msg = c.error().message();
  CHECK(msg ==
        fmt::format("QEMU did not greet on {} within 0.5 s: another QMP client (libvirt, "
                    "another vmsave?) is probably connected; QMP serves one client at a time",
                    server.path()));
}

TEST_CASE("qmp: the client reads replies within a 64 KiB stack (ulimit -s 64)") {
  // Its 64 KiB receive buffer was on the stack: under `ulimit -s 64` the
  // first reply crashed vmsave with SIGSEGV (trial N).
#if defined(__SANITIZE_ADDRESS__)
  // AddressSanitizer's own frames and redzones need more than that.
  test::skip("a 64 KiB stack is too small for AddressSanitizer itself");
#endif
  test::TempDir dir;
  FakeQmp server(dir / "qmp.sock");
  server.serve([](FakeQmp& s) {
    s.handshake();
    s.refuse("GenericError", "the test ends here");
  });
  auto r = test::run_program({"/bin/sh", "-c", "ulimit -s 64 && exec \"$@\"", "sh", VMSAVE_BINARY,
                              "save", "--qmp", server.path(), dir / "vm.img"});
  server.join();
  REQUIRE_RUN(r, 1);
  CHECK(test::contains(r.err, "the test ends here"));
  CHECK_FALSE(std::filesystem::exists(dir / "vm.img"));
}

TEST_CASE(
    "qmp: QEMU's error text reaches the terminal with its control characters shown, not obeyed") {
  // An untrusted QEMU's error could retitle or clear the terminal, or
  // forge a line of vmsave's own (trial S).
  test::TempDir dir;
  FakeQmp server(dir / "qmp.sock");
  server.serve([](FakeQmp& s) {
    s.handshake();
    s.refuse("GenericError", "boom\x1b]0;PWNED\x07\nvmsave: saved ok\r");
  });
  auto r = test::run_vmsave({"save", "--qmp", server.path(), dir / "vm.img"}, 30);
  server.join();
  REQUIRE_RUN(r, 1);
  CHECK_MESSAGE(test::contains(r.err, "boom\\x1b]0;PWNED\\x07\\x0avmsave: saved ok\\x0d"), r.err);
  CHECK(r.err.find('\x1b') == std::string::npos);
  CHECK(r.err.find('\r') == std::string::npos);
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);  // its own line's end only
}

namespace {

// A QMP server in a child process that stops itself (SIGSTOP), before it
// greets or once it has answered qmp_capabilities: SO_PEERCRED names the
// process that listens, so it must be another one than the test's.
pid_t stopping_server(const std::string& path, bool greet) {
  const std::string hello = std::string(kGreeting) + "\r\n";
  const std::string caps = "{\"return\": {}, \"id\": \"vmsave-1\"}\r\n";
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  REQUIRE(path.size() < sizeof(addr.sun_path));
  memcpy(addr.sun_path, path.data(), path.size());
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {  // async-signal-safe calls only: the test has threads
    int l = ::socket(AF_UNIX, SOCK_STREAM, 0);
    if (l < 0 || ::bind(l, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0 ||
        ::listen(l, 4) < 0)
      _exit(1);
    if (!greet) ::raise(SIGSTOP);
    int c = ::accept(l, nullptr, nullptr);
    if (c < 0 || ::write(c, hello.data(), hello.size()) < 0) _exit(1);
    char ch;
    while (::read(c, &ch, 1) == 1 && ch != '\n') {
    }
    if (::write(c, caps.data(), caps.size()) < 0) _exit(1);
    ::raise(SIGSTOP);
    _exit(0);
  }
  for (int i = 0; i < 500 && access(path.c_str(), F_OK) != 0; i++) usleep(10000);
  return pid;
}

void kill_server(pid_t pid) {
  ::kill(pid, SIGKILL);
  int status;
  ::waitpid(pid, &status, 0);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

TEST_CASE("qmp: a stopped QEMU is named as such, and commands after the first fail at once") {
  // It was blamed on another client, or on a busy main loop, and each
  // clean-up command then waited out its own timeout.
  test::TempDir dir;
  {
    const std::string path = dir / "stopped-early.sock";
    pid_t pid = stopping_server(path, false);
    auto c = QmpClient::connect(path, 0.5);
    REQUIRE_FALSE(c.ok());
    CHECK(c.error().message() ==
          fmt::format("QEMU did not greet on {} within 0.5 s: its process {} is stopped (SIGSTOP, "
                      "or a debugger); continue it (kill -CONT {}) and try again",
                      path, pid, pid));
    kill_server(pid);
  }
  const std::string path = dir / "stopped.sock";
  pid_t pid = stopping_server(path, true);
  QmpClient c = connect_ok(path);
  auto r = c.execute("query-status", nullptr, 0.5);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().message() ==
        fmt::format("QEMU did not answer query-status within 0.5 s ({}): its process {} is "
                    "stopped (SIGSTOP, or a debugger); continue it (kill -CONT {}) and try again",
                    path, pid, pid));
  auto t0 = std::chrono::steady_clock::now();
  r = c.execute("cont", nullptr, 5);
  REQUIRE_FALSE(r.ok());
  CHECK(seconds_since(t0) < 1);
  CHECK(r.error().message() ==
        fmt::format("QEMU did not answer cont ({}): its process {} is stopped (SIGSTOP, or a "
                    "debugger); continue it (kill -CONT {}) and try again",
                    path, pid, pid));
  kill_server(pid);
}

TEST_CASE("qmp: a peer that hangs up gives a clear error, every time") {
  test::TempDir dir;
  SUBCASE("after the handshake") {
    FakeQmp server(dir / "qmp.sock");
    server.serve([&](FakeQmp& s) {
      s.handshake();
      s.send(R"({"event": "SHUTDOWN", "data": {"guest": false}})"
             "\r\n");
    });  // returning closes the connection
    QmpClient c = connect_ok(server.path());
    // An event sent just before the hang-up is still delivered.
    auto ev = c.wait_event("SHUTDOWN", 5);
    REQUIRE_MESSAGE(ev.ok(), message_of(ev.status()));
    for (int i = 0; i < 3; i++) {
      auto r = c.execute("query-status");
      REQUIRE_FALSE(r.ok());
      CHECK(r.error().what == "QEMU closed the QMP connection");
      CHECK(r.error().path == server.path());
      CHECK(r.error().hint.find("exited") != std::string::npos);
    }
    auto w = c.wait_event("STOP", 1);
    REQUIRE_FALSE(w.ok());
    CHECK(w.error().what == "QEMU closed the QMP connection");
    UniqueFd devnull(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    CHECK(message_of(c.getfd("x", devnull.get())).find("closed the QMP connection") !=
          std::string::npos);
    CHECK(c.take_events().empty());
  }
  SUBCASE("before the greeting") {
    FakeQmp server(dir / "qmp.sock");
    server.serve([&](FakeQmp&) {});
    auto c = QmpClient::connect(server.path(), 5);
    REQUIRE_FALSE(c.ok());
    CHECK(c.error().what == "QEMU closed the QMP connection");
  }
}

TEST_CASE("qmp: connect errors say what is wrong with the path") {
  test::TempDir dir;
  auto missing = QmpClient::connect(dir / "nope.sock", 1);
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.error().what == "QMP socket does not exist");
  CHECK(missing.error().path == dir / "nope.sock");
  CHECK(missing.error().detail == strerror(ENOENT));

  std::ofstream(dir / "file") << "x";
  auto file = QmpClient::connect(dir / "file", 1);
  REQUIRE_FALSE(file.ok());
  CHECK(file.error().what == "not a socket");
  auto directory = QmpClient::connect(dir.path(), 1);
  REQUIRE_FALSE(directory.ok());
  CHECK(directory.error().detail == "it is a directory");

  {
    // Bound, never listened on, closed: the socket file a dead QEMU leaves.
    UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::string stale = dir / "stale.sock";
    memcpy(addr.sun_path, stale.data(), stale.size());
    REQUIRE(::bind(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  }
  auto refused = QmpClient::connect(dir / "stale.sock", 1);
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.error().what == "nothing is listening on the QMP socket");
  CHECK(refused.error().detail == strerror(ECONNREFUSED));

  auto too_long = QmpClient::connect("/" + std::string(200, 'x'), 1);
  REQUIRE_FALSE(too_long.ok());
  CHECK(too_long.error().what == "QMP socket path is unusable");
}

TEST_CASE("qmp: getfd and add-fd pass a working fd with SCM_RIGHTS") {
  test::TempDir dir;
  FakeQmp server(dir / "qmp.sock");
  json getfd_req, addfd_req;
  bool wrote = false;
  server.serve([&](FakeQmp& s) {
    s.handshake();
    UniqueFd got;
    getfd_req = s.request(&got);
    // Prove the fd works: write through it into the client's pipe.
    wrote = got && ::write(got.get(), "hello", 5) == 5;
    got.reset();
    s.send(json{{"return", json::object()}, {"id", getfd_req["id"]}}.dump() + "\r\n");
    UniqueFd got2;
    addfd_req = s.request(&got2);
    json ret = {{"fdset-id", 7}, {"fd", 42}};
    s.send(json{{"return", ret}, {"id", addfd_req["id"]}}.dump() + "\r\n");
  });
  QmpClient c = connect_ok(server.path());
  int p[2];
  REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
  UniqueFd rd(p[0]), wr(p[1]);
  Status st = c.getfd("mig", wr.get());
  REQUIRE_MESSAGE(st.ok(), message_of(st));
  wr.reset();  // the server's copy was the other writer, now closed too
  char buf[16] = {};
  CHECK(::read(rd.get(), buf, sizeof(buf)) == 5);
  CHECK(std::string(buf) == "hello");
  auto added = c.add_fd(rd.get(), 7, "rdonly:pipe");
  REQUIRE_MESSAGE(added.ok(), message_of(added.status()));
  CHECK((*added)["fdset-id"] == 7);
  server.join();
  CHECK(wrote);
  CHECK(getfd_req["execute"] == "getfd");
  CHECK(getfd_req["arguments"]["fdname"] == "mig");
  CHECK(addfd_req["execute"] == "add-fd");
  CHECK(addfd_req["arguments"]["fdset-id"] == 7);
  CHECK(addfd_req["arguments"]["opaque"] == "rdonly:pipe");
}

// A QEMU stand-in for `vmsave save --qmp`: a 2 MiB shared RAM file that
// this process maps (SO_PEERCRED names this process as "QEMU", so vmsave
// finds the mapping in our /proc/PID/maps), and canned replies by command.
struct FakeQemu {
  test::TempDir shm{"/dev/shm"};
  std::string ram = shm / "ram0";
  std::string mem_path = ram;  // what qom-get says
  bool share = true;
  void* map = nullptr;
  std::vector<std::string> commands;  // what vmsave asked, in order
  std::map<std::string, json> replies = {
      {"query-status", {{"status", "running"}, {"running", true}}},
      {"query-migrate", json::object()},
      {"qom-list", json::array({{{"name", "ram0"}, {"type", "child<memory-backend-file>"}}})},
      {"query-version", {{"qemu", {{"major", 10}, {"minor", 0}, {"micro", 2}}}}},
      {"query-migrate-capabilities",
       json::array({{{"capability", "xbzrle"}, {"state", false}},
                    {{"capability", "mapped-ram"}, {"state", false}}})},
  };

  explicit FakeQemu(const std::string& ram_path = "") {
    if (!ram_path.empty()) ram = mem_path = ram_path;
    test::write_pattern_file(ram, 2 * kMiB, "mixed", 3);
    int fd = ::open(ram.c_str(), O_RDWR | O_CLOEXEC);
    REQUIRE(fd >= 0);
    map = mmap(nullptr, 2 * kMiB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    REQUIRE(map != MAP_FAILED);
  }
  ~FakeQemu() {
    stop = true;
    if (trickling.joinable()) trickling.join();
    munmap(map, 2 * kMiB);
  }

  // migrate: with `trickle`, a byte of device state every 20 ms, for ever.
  bool trickle = false;
  UniqueFd migration;
  std::thread trickling;
  std::atomic<bool> stop{false};

  void serve(FakeQmp& s) {
    s.handshake();
    for (;;) {
      UniqueFd fd;
      json r = s.request(&fd);
      if (r.is_null()) break;
      std::string cmd = r.value("execute", "");
      commands.push_back(cmd);
      if (fd) migration = std::move(fd);
      if (cmd == "migrate" && trickle && migration)
        trickling = std::thread([this, w = migration.get()] {
          // vmsave closes its end: EPIPE for this thread, not SIGPIPE for the test.
          sigset_t pipe;
          sigemptyset(&pipe);
          sigaddset(&pipe, SIGPIPE);
          pthread_sigmask(SIG_BLOCK, &pipe, nullptr);
          while (!stop && ::write(w, "x", 1) == 1)
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        });
      json ret = json::object();
      if (cmd == "qom-get") {
        std::string prop = r["arguments"].value("property", "");
        ret = prop == "size"       ? json(2 * kMiB)
              : prop == "share"    ? json(share)
              : prop == "mem-path" ? json(mem_path)
              : prop == "offset"   ? json(0)
                                   : json("pc-q35-10.0-machine");
      } else if (replies.count(cmd)) {
        ret = replies[cmd];
      }
      s.send(json{{"return", ret}, {"id", r["id"]}}.dump() + "\r\n");
    }
  }
};

TEST_CASE(
    "qmp: save against a QEMU that is not one vmsave can use fails with 1, naming the cause") {
  test::TempDir dir;
  const std::string out = dir / "out";
  REQUIRE(::mkdir(out.c_str(), 0700) == 0);
  const std::string image = out + "/vm.vmsave";
  auto out_empty = [&] { return std::filesystem::is_empty(out); };

  SUBCASE("QEMU without the x-ignore-shared migration capability") {
    FakeQemu qemu;
    FakeQmp server(dir / "qmp.sock");
    server.serve([&](FakeQmp& s) { qemu.serve(s); });
    test::RunResult r = test::run_vmsave({"save", "--qmp", server.path(), image}, 30);
    server.join();
    CHECK_MESSAGE(r.status == 1, r.err);
    CHECK_MESSAGE(
        r.err.find("QEMU lacks the migration capability x-ignore-shared") != std::string::npos,
        r.err);
    CHECK_MESSAGE(r.err.find("use QEMU 9.1 or newer") != std::string::npos, r.err);
    // Refused before the guest was stopped, and nothing was written.
    CHECK(std::count(qemu.commands.begin(), qemu.commands.end(), "stop") == 0);
    CHECK(out_empty());
  }
  SUBCASE("a reply of the wrong JSON type") {
    FakeQemu qemu;
    qemu.replies["qom-list"] = "not a list of objects";
    FakeQmp server(dir / "qmp.sock");
    server.serve([&](FakeQmp& s) { qemu.serve(s); });
    test::RunResult r = test::run_vmsave({"save", "--qmp", server.path(), image}, 30);
    server.join();
    CHECK_MESSAGE(r.status == 1, r.err);
    CHECK_MESSAGE(r.err.find("vmsave: error: unexpected JSON from QEMU") != std::string::npos,
                  r.err);
    CHECK(out_empty());
  }
  SUBCASE("a socket that is not QEMU's") {
    FakeQmp server(dir / "qmp.sock");
    server.serve([&](FakeQmp& s) {
      s.send("220 smtp.example ESMTP ready\r\n");
      s.request();
    });
    test::RunResult r = test::run_vmsave({"save", "--qmp", server.path(), image}, 30);
    server.join();
    CHECK_MESSAGE(r.status == 1, r.err);
    CHECK_MESSAGE(r.err.find("the socket does not speak QMP") != std::string::npos, r.err);
    CHECK_MESSAGE(r.err.find("-qmp unix:PATH") != std::string::npos, r.err);
    CHECK(out_empty());
  }
}

TEST_CASE("qmp: a mem-path naming another file of the same inode number is not read") {
  // An untrusted QEMU (in a mount namespace of its own) maps a file whose
  // inode number matches one of root's on another filesystem, and names
  // that one as mem-path: vmsave took the inode number alone for a match
  // and saved root's file (trial S).
  test::require_mount("tmpfs");
  test::TempMount mine("tmpfs", "size=8m"), theirs("tmpfs", "size=8m");
  REQUIRE(mine.ok());
  REQUIRE(theirs.ok());
  const std::string secret = mine / "secret";
  test::write_pattern_file(secret, 2 * kMiB, "text", 9);
  struct stat want;
  REQUIRE(::stat(secret.c_str(), &want) == 0);
  // A file of the same inode number on the other tmpfs: each numbers its own.
  std::string ram;
  for (int i = 0; i < 1000 && ram.empty(); i++) {
    const std::string p = theirs / fmt::format("f{}", i);
    test::write_pattern_file(p, 0, "zero");
    struct stat st;
    REQUIRE(::stat(p.c_str(), &st) == 0);
    if (st.st_ino == want.st_ino) ram = p;
  }
  REQUIRE_MESSAGE(!ram.empty(), "no file of inode number " << want.st_ino);
  FakeQemu qemu(ram);
  qemu.mem_path = secret;
  test::TempDir dir;
  FakeQmp server(dir / "qmp.sock");
  server.serve([&](FakeQmp& s) { qemu.serve(s); });
  test::RunResult r = test::run_vmsave({"save", "--qmp", server.path(), dir / "vm.vmsave"}, 30);
  server.join();
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(test::contains(r.err, "cannot find the RAM file of backend ram0 (" + secret +
                                          "): QEMU has no mapping of it"),
                r.err);
  CHECK(std::count(qemu.commands.begin(), qemu.commands.end(), "stop") == 0);
  CHECK_FALSE(std::filesystem::exists(dir / "vm.vmsave"));
}

TEST_CASE("qmp: save --compress never waits on a FIFO that QEMU names as its mem-path") {
  // It opened the path to word its refusal, and an untrusted QEMU's FIFO
  // held that open (root's vmsave) for ever (trial S).
  test::TempDir dir;
  const std::string fifo = dir / "fifo";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  FakeQemu qemu;
  qemu.mem_path = fifo;
  qemu.share = false;
  FakeQmp server(dir / "qmp.sock");
  server.serve([&](FakeQmp& s) { qemu.serve(s); });
  test::RunResult r = test::run_vmsave(
      {"save", "--qmp", server.path(), dir / "vm.vmsave", "--compress", "lz4"}, 20);
  server.join();
  CHECK_RUN(r, 2);
  CHECK_MESSAGE(test::contains(r.err, "cannot compress this VM's RAM"), r.err);
  CHECK_MESSAGE(test::contains(r.err, "a file mapped with share=off"), r.err);
}

TEST_CASE("qmp: device state that trickles in for longer than the save waits is an error") {
  // The limit was looked at only when nothing came for 100 ms: an untrusted
  // QEMU sending a byte now and then kept its guest paused, and vmsave
  // writing, for ever (trial S).
  test::TempDir dir;
  FakeQemu qemu;
  qemu.trickle = true;
  qemu.replies["query-migrate-capabilities"] =
      json::array({{{"capability", "x-ignore-shared"}, {"state", false}},
                   {{"capability", "mapped-ram"}, {"state", false}},
                   {{"capability", "multifd"}, {"state", false}}});
  FakeQmp server(dir / "qmp.sock");
  server.serve([&](FakeQmp& s) { qemu.serve(s); });
  const double t0 = test::now_s();
  test::RunResult r =
      test::run_vmsave({"save", "--qmp", server.path(), dir / "vm.vmsave", "--leave-running"}, 60,
                       {"VMSAVE_FAULT=vmstate-timeout:2"});
  const double took = test::now_s() - t0;
  qemu.stop = true;
  server.join();
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(
      test::contains(r.err, "QEMU's device state did not end in time (" + server.path() + "): "),
      r.err);
  CHECK_MESSAGE(test::contains(r.err, " came in 2 s, the most vmsave waits"), r.err);
  CHECK(took < 20);
  CHECK(std::count(qemu.commands.begin(), qemu.commands.end(), "migrate_cancel") >= 1);
  CHECK(std::count(qemu.commands.begin(), qemu.commands.end(), "cont") == 1);  // running again
  CHECK_FALSE(std::filesystem::exists(dir / "vm.vmsave"));
}

TEST_CASE("qmp client drives a real QEMU") {
  test::require_guest_kit();

  test::TestVm vm({.ram_mib = 256, .memcheck_mib = 32});
  std::string err;
  REQUIRE_MESSAGE(vm.start(&err), err);
  test::MemcheckLine line;
  REQUIRE_MESSAGE(vm.wait_for_memcheck(1, 120, &line, &err), err);

  QmpClient c = connect_ok(vm.qmp_path());
  CHECK(c.peer_pid() == vm.pid());
  CHECK(c.greeting()["QMP"]["version"]["qemu"]["major"].get<int>() >= 10);

  auto status = [&]() {
    auto r = c.execute("query-status");
    REQUIRE_MESSAGE(r.ok(), message_of(r.status()));
    return (*r)["status"].get<std::string>();
  };
  CHECK(status() == "running");

  auto stop = c.execute("stop");
  REQUIRE_MESSAGE(stop.ok(), message_of(stop.status()));
  auto stop_ev = c.wait_event("STOP");
  REQUIRE_MESSAGE(stop_ev.ok(), message_of(stop_ev.status()));
  CHECK(status() == "paused");

  auto cont = c.execute("cont");
  REQUIRE_MESSAGE(cont.ok(), message_of(cont.status()));
  auto resume_ev = c.wait_event("RESUME");
  REQUIRE_MESSAGE(resume_ev.ok(), message_of(resume_ev.status()));
  CHECK(status() == "running");

  auto objects = c.execute("qom-list", {{"path", "/objects"}});
  REQUIRE_MESSAGE(objects.ok(), message_of(objects.status()));
  bool found = false;
  for (const auto& p : *objects) {
    if (p["name"] == "ram0") {
      found = true;
      CHECK(p["type"] == "child<memory-backend-file>");
    }
  }
  CHECK_MESSAGE(found, objects->dump());
  auto size = c.execute("qom-get", {{"path", "/objects/ram0"}, {"property", "size"}});
  REQUIRE_MESSAGE(size.ok(), message_of(size.status()));
  CHECK(size->get<i64>() == 256 * kMiB);

  auto unknown = c.execute("no-such-command");
  REQUIRE_FALSE(unknown.ok());
  CHECK(unknown.error().what == "QEMU refused no-such-command");
  CHECK(unknown.error().detail.find("CommandNotFound") != std::string::npos);

  int p[2];
  REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
  UniqueFd rd(p[0]), wr(p[1]);
  Status got = c.getfd("vmsave-test-pipe", wr.get());
  REQUIRE_MESSAGE(got.ok(), message_of(got));
  auto closed = c.execute("closefd", {{"fdname", "vmsave-test-pipe"}});
  REQUIRE_MESSAGE(closed.ok(), message_of(closed.status()));

  // QMP serves one client at a time: a second connection is queued, never
  // greeted, while this one is open.
  auto second = QmpClient::connect(vm.qmp_path(), 1);
  REQUIRE_FALSE(second.ok());
  CHECK(second.error().message().find("another QMP client (libvirt, another vmsave?) is probably "
                                      "connected; QMP serves one client at a time") !=
        std::string::npos);

  // The first client is unaffected, and the guest still runs.
  CHECK(status() == "running");
  REQUIRE_MESSAGE(vm.wait_for_memcheck(line.iteration + 1, 60, &line, &err), err);
}
