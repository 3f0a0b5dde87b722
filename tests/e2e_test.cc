// End-to-end tests: the real vmsave binary saves and restores a real QEMU
// guest (tests/vm_fixture.h: TCG, RAM in a shared file under /dev/shm).
//
// The guest's memcheck prints `memcheck ok <iteration> <checksum>` every
// ~200 ms, and its iteration counter lives in guest RAM. So a guest that was
// restored correctly continues the serial log as one unbroken story: every
// iteration is the previous one plus one, with the same checksum, and no
// line says CORRUPT. A reboot (iteration 1 again), a stale or wrong RAM
// image, or lost device state all break that story, which is what these
// tests assert on, together with exit statuses, messages and the files
// left behind.
//
// Every QEMU these tests start, directly or through vmsave, has the
// fixture's directories on its command line, so TestVm's destructor kills
// it even when a check fails; the cases also kill what they started
// explicitly, as soon as they are done with it.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/internal.h"
#include "core/qmp.h"
#include "tests/test_util.h"
#include "tests/vm_fixture.h"

using namespace vmsave;
using json = nlohmann::json;
using test::MemcheckLine;
using test::run_vmsave;
using test::contains;
using test::RunResult;
using test::show;
using test::skip;
using test::TempMount;
using test::TestVm;
using test::VmOptions;

namespace {

// A TCG boot to memcheck iteration 3 takes ~5 s on an idle 2-core machine;
// other test processes may be booting guests at the same time.
constexpr double kBootTimeout = 90;
// One vmsave run: a 512 MiB save or restore takes well under a second.
constexpr double kRunTimeout = 60;
// A restored guest prints its next line within ~200 ms; a few iterations on
// a loaded machine take seconds, not tens of seconds.
constexpr double kCarryOnTimeout = 45;
// Iterations a restored or resumed guest must add to count as carrying on.
constexpr i64 kMoreIterations = 4;
constexpr auto kPoll = std::chrono::milliseconds(50);

const VmOptions kSmallVm{.ram_mib = 256, .memcheck_mib = 64};
// A --live save's guest rewrites this much of its 64 MiB per iteration:
// most of its time goes to writing, so pieces change during every pass and
// a missing catch-up pass shows as CORRUPT.
constexpr int kLiveDirtyMib = 48;

using test::now_s;

json parse_json(const RunResult& r) {
  json j = json::parse(r.out, nullptr, false);
  REQUIRE_MESSAGE(j.is_object(), "stdout is not a JSON object: " << show(r));
  return j;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (auto& e : std::filesystem::directory_iterator(dir, ec))
    names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (auto& x : v) s += (s.empty() ? "" : " ") + x;
  return s.empty() ? "(none)" : s;
}

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// --- The memcheck story in a serial log ---------------------------------

struct Story {
  std::optional<MemcheckLine> last;
  std::string broken;  // why the log is not one unbroken run, or ""
};

bool parse_ok(const std::string& line, MemcheckLine* out) {
  static const std::string kTag = "memcheck ok ";
  size_t at = line.find(kTag);
  if (at == std::string::npos) return false;
  const char* p = line.c_str() + at + kTag.size();
  char* end = nullptr;
  long long iteration = std::strtoll(p, &end, 10);
  if (end == p || *end != ' ') return false;
  std::string checksum;
  for (const char* c = end + 1; std::isxdigit(static_cast<unsigned char>(*c)); c++)
    checksum.push_back(*c);
  if (checksum.size() != 16) return false;
  *out = MemcheckLine{iteration, checksum};
  return true;
}

// Reads every complete line of `log`: each `memcheck ok` line must follow
// the previous one by exactly one iteration with the same checksum (any
// checksum when `dirty`: the guest rewrites part of its buffer each time).
Story read_story(const std::string& log, bool dirty = false) {
  Story s;
  size_t pos = 0;
  for (size_t nl; (nl = log.find('\n', pos)) != std::string::npos; pos = nl + 1) {
    std::string line = log.substr(pos, nl - pos);
    while (!line.empty() && line.back() == '\r') line.pop_back();
    if (contains(line, "memcheck CORRUPT")) {
      s.broken = "the guest reported corruption: \"" + line + "\"";
      return s;
    }
    MemcheckLine m;
    if (!parse_ok(line, &m)) continue;
    if (s.last && (m.iteration != s.last->iteration + 1 ||
                   (!dirty && m.checksum != s.last->checksum))) {
      s.broken = fmt::format("\"memcheck ok {} {}\" follows \"memcheck ok {} {}\"", m.iteration,
                             m.checksum, s.last->iteration, s.last->checksum);
      return s;
    }
    s.last = m;
  }
  return s;
}

std::string tail(const std::string& text, size_t n = 1500) {
  return text.size() <= n ? text : "..." + text.substr(text.size() - n);
}

bool process_runs(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t paren = stat.rfind(')');
  if (stat.empty() || paren == std::string::npos || paren + 2 >= stat.size()) return false;
  return stat[paren + 2] != 'Z' && stat[paren + 2] != 'X';
}

// Polls the log `read_log` returns until its story reaches `min_iteration`.
// Fails at once when the story breaks or when `pid` (the QEMU writing it, if
// given) no longer runs.
bool wait_story(const std::function<std::string()>& read_log, i64 min_iteration, double timeout_s,
                pid_t pid, MemcheckLine* out, std::string* why, bool dirty = false) {
  double deadline = now_s() + timeout_s;
  for (;;) {
    bool alive = pid <= 0 || process_runs(pid);
    std::string log = read_log();
    Story s = read_story(log, dirty);
    if (!s.broken.empty()) {
      *why = s.broken + "\nlog:\n" + tail(log);
      return false;
    }
    if (s.last && s.last->iteration >= min_iteration) {
      if (out) *out = *s.last;
      return true;
    }
    std::string last = s.last ? fmt::format("last was {}", s.last->iteration) : "none yet";
    if (!alive || now_s() > deadline) {
      *why = fmt::format("{} before memcheck iteration {} ({}); log:\n{}",
                         alive ? "timed out" : fmt::format("QEMU {} exited", pid), min_iteration,
                         last, tail(log));
      return false;
    }
    std::this_thread::sleep_for(kPoll);
  }
}

// Waits until the guest of `vm`, running now, gets `more` iterations past the
// one it has printed last: it runs, and its memory is intact.
bool carries_on(const TestVm& vm, i64 more, std::string* why) {
  i64 now = read_story(vm.serial_log()).last->iteration;
  return wait_story([&] { return vm.serial_log(); }, now + more, kCarryOnTimeout, vm.pid(), nullptr,
                    why);
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// --- Processes ------------------------------------------------------------

// Waits for our child `pid` to exit without reaping it (the fixture reaps
// its own QEMU). Returns its exit status, or nullopt on timeout.
std::optional<int> wait_exit_unreaped(pid_t pid, double timeout_s) {
  double deadline = now_s() + timeout_s;
  for (;;) {
    siginfo_t info{};
    if (waitid(P_PID, pid, &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == pid)
      return info.si_code == CLD_EXITED ? info.si_status : 128 + info.si_status;
    if (now_s() > deadline) return std::nullopt;
    std::this_thread::sleep_for(kPoll);
  }
}

// SIGKILLs a QEMU vmsave started (not our child) and waits until it is gone.
void kill_and_wait(pid_t pid) {
  if (pid <= 0) return;
  kill(pid, SIGKILL);
  double deadline = now_s() + 10;
  while (process_runs(pid) && now_s() < deadline) std::this_thread::sleep_for(kPoll);
}

// A QEMU that vmsave started: killed when the case ends, pass or fail.
struct StartedQemu {
  pid_t pid = -1;
  ~StartedQemu() { kill_and_wait(pid); }
};

// A child of this test process, killed and reaped when it goes out of scope.
class Child {
 public:
  // Starts argv with stdout and stderr to `log`, fd 3 the write end of
  // `fd3` if given, and `env` (NAME=VALUE) added to the environment. The
  // child dies with the test process.
  Child(const std::vector<std::string>& argv, const std::string& log, int fd3 = -1,
        const std::vector<std::string>& env = {}) {
    std::vector<std::string> vars = env;
    std::vector<std::string> args = argv;
    std::vector<char*> cargv;
    for (auto& a : args) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    int log_fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    REQUIRE_MESSAGE((log_fd >= 0 && null_fd >= 0), "open " << log << ": " << strerror(errno));
    const pid_t parent = getpid();
    pid_ = fork();
    REQUIRE_MESSAGE(pid_ >= 0, "fork: " << strerror(errno));
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      dup2(null_fd, STDIN_FILENO);
      dup2(log_fd, STDOUT_FILENO);
      dup2(log_fd, STDERR_FILENO);
      if (fd3 >= 0) {
        if (fd3 == 3) {
          fcntl(3, F_SETFD, 0);
        } else {
          dup2(fd3, 3);
        }
      }
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);
      for (auto& v : vars) putenv(v.data());
      execvp(cargv[0], cargv.data());
      _exit(127);
    }
    ::close(log_fd);
    ::close(null_fd);
  }
  ~Child() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  Child(const Child&) = delete;

  pid_t pid() const { return pid_; }
  void signal(int sig) const {
    if (pid_ > 0) kill(pid_, sig);
  }
  // Exit status, 128 + signal, or -1 after `timeout_s` (the child is then
  // killed).
  int wait(double timeout_s) {
    double deadline = now_s() + timeout_s;
    for (;;) {
      int st = 0;
      pid_t r = waitpid(pid_, &st, WNOHANG);
      if (r == pid_) {
        pid_ = -1;
        return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      }
      if (now_s() > deadline) return -1;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

 private:
  pid_t pid_ = -1;
};

// --- QMP ------------------------------------------------------------------

Result<json> qmp_execute(const std::string& socket, const std::string& cmd) {
  auto c = QmpClient::connect(socket, 10);
  if (!c.ok()) return c.error();
  return c->execute(cmd);
}

// "running", "paused", ... or the error that kept us from asking.
std::string qmp_status(const std::string& socket) {
  auto r = qmp_execute(socket, "query-status");
  if (!r.ok()) return "(query-status failed: " + r.error().message() + ")";
  return r->value("status", "(no status)");
}

// Whether QEMU has x-ignore-shared set (a save or restore left it behind).
bool capability(const TestVm& vm, const std::string& name) {
  auto caps = qmp_execute(vm.qmp_path(), "query-migrate-capabilities");
  REQUIRE_MESSAGE(caps.ok(), caps.error().message());
  for (auto& c : *caps)
    if (c.value("capability", "") == name) return c.value("state", false);
  return false;
}

bool x_ignore_shared(const TestVm& vm) {
  return capability(vm, "x-ignore-shared");
}

// --- Steps shared by the cases ----------------------------------------------

// Starts `vm` and waits until memcheck has verified its buffer `iterations`
// times.
MemcheckLine boot(TestVm& vm, i64 iterations = 3) {
  std::string err;
  REQUIRE_MESSAGE(vm.start(&err), err);
  MemcheckLine line;
  REQUIRE_MESSAGE(vm.wait_for_memcheck(iterations, kBootTimeout, &line, &err), err);
  return line;
}

// The restored guest carries on: memcheck passes the saved iteration by
// kMoreIterations with the saved checksum, and never says CORRUPT.
void check_carries_on(const TestVm& vm, const MemcheckLine& saved, pid_t qemu) {
  MemcheckLine line;
  std::string err;
  CHECK_MESSAGE(wait_story([&] { return vm.serial_log(); }, saved.iteration + kMoreIterations,
                           kCarryOnTimeout, qemu, &line, &err),
                err);
  CHECK(line.checksum == saved.checksum);
}

// `save` in its default form: QEMU quits once the image is safe. Returns
// the serial log as the guest left it (its last line may be unfinished; the
// restored guest finishes it).
std::string save_and_quit(TestVm& vm, const std::string& image,
                          const std::vector<std::string>& extra = {}, json* report = nullptr) {
  std::vector<std::string> args = {"save", "--qmp", vm.qmp_path(), image, "--json"};
  args.insert(args.end(), extra.begin(), extra.end());
  RunResult r = run_vmsave(args, kRunTimeout);
  REQUIRE_RUN(r, 0);
  json j = parse_json(r);
  if (report) *report = j;
  if (std::find(extra.begin(), extra.end(), "--compress") != extra.end()) {
    CHECK(j.value("compressed_chunks", i64(0)) > 0);
    CHECK(j.value("stored_bytes", i64(0)) < j.value("uncompressed_bytes", i64(0)));
  }
  CHECK(j.value("after", "") == "quit");
  CHECK(j.value("ram_bytes", i64(0)) == vm.options().ram_mib * kMiB);
  std::optional<int> exit = wait_exit_unreaped(vm.pid(), 15);
  REQUIRE_MESSAGE(exit.has_value(), "QEMU still runs after save (pid " << vm.pid() << ")");
  CHECK_MESSAGE(*exit == 0, "QEMU exited with " << *exit);
  vm.kill_qemu();  // reaps it
  REQUIRE(exists(image));
  std::string log = vm.serial_log();
  Story s = read_story(log, vm.options().dirty_mib > 0);
  REQUIRE_MESSAGE(s.broken.empty(), s.broken);
  REQUIRE(s.last.has_value());
  return log;
}

// Boots `vm` and saves it into DIR/vm.vmsave, QEMU quitting: the image, the
// serial log as the save left it, and the last memcheck line in it.
struct SavedVm {
  std::string image;
  std::string log;
  MemcheckLine last;
};

SavedVm boot_and_save(TestVm& vm) {
  boot(vm);
  SavedVm s{vm.dir() + "/vm.vmsave", "", {}};
  s.log = save_and_quit(vm, s.image);
  s.last = *read_story(s.log).last;
  return s;
}

// The two-step form: the VM's command with each backend `prepare` printed
// in place of the one of the same id, plus the rest of its arguments
// (-incoming defer).
std::vector<std::string> with_prepared(std::vector<std::string> cmd,
                                       const std::vector<std::string>& prepared) {
  std::vector<std::string> rest;
  for (size_t i = 0; i < prepared.size(); i++) {
    if (prepared[i] == "-object" && i + 1 < prepared.size()) {
      const std::string& obj = prepared[++i];
      std::string id = obj.substr(obj.find("id=") + 3);
      id = "id=" + id.substr(0, id.find(',')) + ",";
      bool replaced = false;
      for (size_t k = 0; k + 1 < cmd.size(); k++)
        if (cmd[k] == "-object" && contains(cmd[k + 1], id)) {
          cmd[k + 1] = obj;
          replaced = true;
        }
      REQUIRE_MESSAGE(replaced, "no -object with " << id << " in the VM's command");
    } else {
      rest.push_back(prepared[i]);
    }
  }
  cmd.insert(cmd.end(), rest.begin(), rest.end());
  return cmd;
}

// Waits until `qemu`, started on `vm`'s command line, has its QMP socket.
void await_qmp_socket(const std::string& qmp, const Child& qemu, const std::string& log) {
  double deadline = now_s() + 30;
  struct stat st;
  while (!(::stat(qmp.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) && now_s() < deadline)
    std::this_thread::sleep_for(kPoll);
  REQUIRE_MESSAGE(process_runs(qemu.pid()), slurp(log));
}
void await_qmp_socket(const TestVm& vm, const Child& qemu, const std::string& log) {
  await_qmp_socket(vm.qmp_path(), qemu, log);
}

// Boots `vm` to its first memcheck line, saves it to DIR/vm.vmsave (QEMU
// quits) and removes its RAM file, so that a restore must rebuild it from
// the image alone. Returns the image's path.
std::string saved_without_ram(TestVm& vm) {
  boot(vm, 1);
  const std::string image = vm.dir() + "/vm.vmsave";
  save_and_quit(vm, image);
  REQUIRE(::unlink(vm.ram_path().c_str()) == 0);
  return image;
}


// The argv with every occurrence of `from` in any argument replaced by `to`.
std::vector<std::string> rewrite(std::vector<std::string> argv, const std::string& from,
                                 const std::string& to) {
  for (auto& a : argv)
    for (size_t at; (at = a.find(from)) != std::string::npos;) a.replace(at, from.size(), to);
  return argv;
}

std::vector<std::string> plus(std::vector<std::string> argv, const std::vector<std::string>& more) {
  argv.insert(argv.end(), more.begin(), more.end());
  return argv;
}

std::vector<std::string> restore_args(const std::string& image, const std::string& qemu_log,
                                      bool lazy, const std::vector<std::string>& qemu) {
  std::vector<std::string> args = {"restore", image, "--json", "--qemu-log", qemu_log};
  if (lazy) args.push_back("--lazy");
  args.push_back("--");
  args.insert(args.end(), qemu.begin(), qemu.end());
  return args;
}

// Saves a guest whose memcheck rewrites `dirty_mib` MiB per iteration with
// `save --live`, restores it eagerly and checks it carries on from the
// iteration it was stopped at, without CORRUPT. Returns the save report.
json live_save_then_restore(VmOptions opts, bool try_flush_timeout = false,
                            bool try_live_timeout = false) {
  TestVm vm(opts);
  boot(vm);
  const std::string image = vm.dir() + "/vm.vmsave";
  if (try_live_timeout) {
    // QEMU cannot finish a live migration in 1 ms: vmsave stops the guest
    // so it does, saves a complete image, and resumes the guest.
    const std::string early = vm.dir() + "/early.vmsave";
    // vmsave's own passes: none after the first once the time is up.
    RunResult r = run_vmsave({"save", "--qmp", vm.qmp_path(), early, "--live", "--leave-running",
                              "--live-timeout", "0.001", "--json"},
                             kRunTimeout);
    REQUIRE_RUN(r, 0);
    CHECK(parse_json(r).value("live_timeout_reached", false));
    CHECK_MESSAGE(!contains(r.err, "no effect"), r.err);  // it has, on either path
    if (opts.shared_file_ram) CHECK(parse_json(r).value("passes", 0) == 2);
    CHECK(qmp_status(vm.qmp_path()) == "running");
    RunResult v = run_vmsave({"verify", early}, kRunTimeout);
    CHECK_RUN(v, 0);
    // The image says so too, whoever wrote the RAM (only QEMU's did).
    RunResult info = run_vmsave({"info", "--json", early}, kRunTimeout);
    REQUIRE_RUN(info, 0);
    CHECK_MESSAGE(parse_json(info)["metadata"].value("live_timeout_reached", false), info.out);
    ::unlink(early.c_str());
  }
  if (try_flush_timeout) {
    // A flush that stalls for 3 s (injected) against a 0.2 s timeout: the
    // save fails cleanly, with no image, and the guest (resumed before the
    // commit) keeps running. (A real flush raced a 1 us timeout, and lost
    // it when a busy machine descheduled vmsave for the flush's duration.)
    // --max-downtime is QEMU's downtime-limit: for RAM vmsave writes it is
    // accepted (a wrapper need not know the backing) but said to do nothing.
    RunResult r = run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--live", "--leave-running",
                              "--flush-timeout", "0.2", "--max-downtime", "50"},
                             kRunTimeout, {"VMSAVE_FAULT=slow-flush:3000"});
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(contains(r.err, "warning: --max-downtime only applies to RAM QEMU saves"), r.err);
    CHECK_MESSAGE(contains(r.err, "--flush-timeout"), r.err);
    CHECK_MESSAGE(contains(r.err, "no image was saved"), r.err);
    CHECK_FALSE(exists(image));
    CHECK(qmp_status(vm.qmp_path()) == "running");
  }
  json j;
  const std::string log_at_save = save_and_quit(vm, image, {"--live"}, &j);
  const MemcheckLine saved = *read_story(log_at_save, true).last;
  CHECK(j.value("live", false));
  CHECK(j.value("passes", 0) >= 2);
  CHECK(j.contains("downtime_s"));
  CHECK(j.contains("bytes_rewritten"));
  CHECK(j.contains("flush_s"));
  if (opts.shared_file_ram) {  // vmsave's own passes: its requests counted
    CHECK(j.value("jobs", 0) > 0);
    CHECK(j["io_latency_us"].value("count", i64(0)) > 0);
    // Each pass reported, the stopped one last; what all but the first
    // wrote is what was rewritten.
    REQUIRE_MESSAGE(j["live_passes"].is_array(), j.dump());
    const json& passes = j["live_passes"];
    CHECK(passes.size() == j.value("passes", size_t(0)));
    CHECK(passes.back().value("guest_stopped", false));
    i64 rewritten = 0;
    for (size_t i = 1; i < passes.size(); i++)
      rewritten += passes[i].value("bytes_written", i64(0));
    CHECK(rewritten == j.value("bytes_rewritten", i64(-1)));
    CHECK(passes[0].value("bytes_written", i64(0)) > 0);
  }
  RunResult v = run_vmsave({"verify", image}, kRunTimeout);
  CHECK_RUN(v, 0);
  if (opts.shared_file_ram) REQUIRE(::unlink(vm.ram_path().c_str()) == 0);

  // Through QEMU, the stream of a live save says the guest ran to the end,
  // and QEMU starts it by itself once loaded: --paused must still hold.
  std::vector<std::string> args =
      restore_args(image, vm.dir() + "/restore.log", false, vm.command());
  if (!opts.shared_file_ram) args.insert(args.begin() + 1, "--paused");
  RunResult r = run_vmsave(args, kRunTimeout);
  REQUIRE_RUN(r, 0);
  StartedQemu qemu{parse_json(r).value("pid", -1)};
  REQUIRE(qemu.pid > 0);
  if (!opts.shared_file_ram) {
    // QEMU started with -S (the user's command has none): else it starts
    // the guest by itself once loaded, and it ran ~10 ms before vmsave
    // stopped it (seen in a trial's QMP trace).
    const std::string argv = slurp(fmt::format("/proc/{}/cmdline", qemu.pid));
    CHECK(contains(argv, std::string("\0-S\0", 4)));
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    CHECK(qmp_status(vm.qmp_path()) == "paused");
    auto c = qmp_execute(vm.qmp_path(), "cont");
    REQUIRE_MESSAGE(c.ok(), c.error().message());
  }
  std::string err;
  CHECK_MESSAGE(wait_story([&] { return vm.serial_log(); }, saved.iteration + kMoreIterations,
                           kCarryOnTimeout, qemu.pid, nullptr, &err, /*dirty=*/true),
                err);
  return j;
}

// The files QEMU `pid` maps, one per line of /proc/PID/maps.
std::string maps_of(pid_t pid) {
  return slurp(fmt::format("/proc/{}/maps", pid));
}

bool maps_file(pid_t pid, const std::string& path) {
  std::string maps = maps_of(pid);
  size_t pos = 0;
  for (size_t nl; (nl = maps.find('\n', pos)) != std::string::npos; pos = nl + 1) {
    std::string line = maps.substr(pos, nl - pos);
    if (line.size() >= path.size() &&
        line.compare(line.size() - path.size(), path.size(), path) == 0)
      return true;
  }
  return false;
}

// Boots a guest, saves it (QEMU quits), restores it with the same command
// line and checks that it carries on from the saved iteration.
// `prealloc`: the restore's command asks QEMU to preallocate the RAM
// backends, which makes vmsave fill them before QEMU starts, not while.
void save_then_restore(const VmOptions& opts, bool lazy, const std::string& compress = "",
                       bool prealloc = false) {
  TestVm vm(opts);
  boot(vm);
  const std::string image = vm.dir() + "/vm.vmsave";
  std::vector<std::string> extra;
  if (!compress.empty()) extra = {"--compress", compress};
  json save_report;
  const std::string log_at_save = save_and_quit(vm, image, extra, &save_report);
  const MemcheckLine saved = *read_story(log_at_save).last;
  const i64 vmstate_bytes = save_report.value("vmstate_bytes", i64(-1));
  // QEMU quit, its RAM files stay: the report names them.
  std::vector<std::string> left;
  for (auto& f : save_report.value("ram_files_left", json::array())) left.push_back(f);
  std::vector<std::string> files;
  for (int i = 0; i < opts.numa_nodes; i++) files.push_back(vm.ram_path(i));
  std::sort(left.begin(), left.end());
  std::sort(files.begin(), files.end());
  CHECK_MESSAGE(left == files, joined(left));

  RunResult info = run_vmsave({"info", image, "--json"}, kRunTimeout);
  REQUIRE_RUN(info, 0);
  // The device state's size means what QEMU sent everywhere; compressed,
  // what it takes in the image is beside it.
  CHECK(parse_json(info).value("vmstate_bytes", i64(0)) == vmstate_bytes);
  CHECK(parse_json(info).contains("vmstate_stored_bytes") == !compress.empty());
  if (!compress.empty())
    CHECK(parse_json(info).value("vmstate_stored_bytes", i64(0)) < vmstate_bytes);
  // The save's report says the same.
  CHECK(save_report.contains("vmstate_stored_bytes") == !compress.empty());
  CHECK(save_report.value("vmstate_stored_bytes", i64(-1)) ==
        parse_json(info).value("vmstate_stored_bytes", i64(-1)));
  // One block per backend, in whatever order QEMU lists them.
  std::vector<std::string> ids, want;
  const json blocks = parse_json(info)["blocks"];
  for (auto& b : blocks) {
    ids.push_back(b.value("id", ""));
    CHECK(b.value("size", i64(0)) == opts.ram_mib / opts.numa_nodes * kMiB);
  }
  for (int i = 0; i < opts.numa_nodes; i++) want.push_back(fmt::format("ram{}", i));
  std::sort(ids.begin(), ids.end());
  CHECK_MESSAGE(ids == want, joined(ids));
  // The text form shows the command line to restore with, quoted for a
  // shell where it must be (-append's value has spaces).
  RunResult text = run_vmsave({"info", image}, kRunTimeout);
  REQUIRE_RUN(text, 0);
  CHECK_MESSAGE(contains(text.out, "command:      " + vm.command()[0] + " "), text.out);
  for (size_t a = 0; a + 1 < vm.command().size(); a++)
    if (vm.command()[a] == "-append")
      CHECK_MESSAGE(contains(text.out, " -append '" + vm.command()[a + 1] + "'"), text.out);
  if (!compress.empty()) {
    const json z = parse_json(info)["compression"];
    CHECK(z.value("codec", "") == compress);
    CHECK(z.value("vmstate_codec", "") == "zstd");
    CHECK(z.value("ratio", 1.0) < 1.0);
    CHECK_RUN(run_vmsave({"verify", image}, kRunTimeout), 0);
  }

  // Eager: the restore must rebuild the RAM files from the image alone.
  if (!lazy)
    for (int i = 0; i < opts.numa_nodes; i++) REQUIRE(::unlink(vm.ram_path(i).c_str()) == 0);

  std::vector<std::string> command = vm.command();
  if (prealloc)
    for (auto& a : command)
      if (a.starts_with("memory-backend-file,")) a += ",prealloc=on";
  RunResult r =
      run_vmsave(restore_args(image, vm.dir() + "/restore.log", lazy, command), kRunTimeout);
  REQUIRE_RUN(r, 0);
  json j = parse_json(r);
  StartedQemu qemu{j.value("pid", -1)};
  REQUIRE(qemu.pid > 0);
  CHECK(j.value("mode", "") == (lazy ? "lazy" : "eager"));
  CHECK(j.value("running", false));
  CHECK(j.value("qmp", "") == vm.qmp_path());
  CHECK(j.value("vmstate_bytes", i64(0)) == vmstate_bytes);
  // Loaded, the VM migrates like any other: the capability is off again.
  CHECK_FALSE(x_ignore_shared(vm));

  check_carries_on(vm, saved, qemu.pid);
  CHECK(qmp_status(vm.qmp_path()) == "running");

  // A backend's offset= (in MiB here, "offset=64M") puts the RAM that far in.
  i64 offset = 0;
  if (size_t at = opts.file_backend_props.find("offset="); at != std::string::npos)
    offset = std::stoll(opts.file_backend_props.substr(at + 7)) * kMiB;
  for (int i = 0; i < opts.numa_nodes; i++) {
    if (lazy) {
      CHECK_MESSAGE(!maps_file(qemu.pid, vm.ram_path(i)), maps_of(qemu.pid));
    } else {
      CHECK(test::file_size(vm.ram_path(i)) == offset + opts.ram_mib / opts.numa_nodes * kMiB);
      CHECK_MESSAGE(maps_file(qemu.pid, vm.ram_path(i)), maps_of(qemu.pid));
    }
  }
  if (lazy) CHECK_MESSAGE(maps_file(qemu.pid, image), maps_of(qemu.pid));
  if (opts.cpus > 1) {
    auto cpus = qmp_execute(vm.qmp_path(), "query-cpus-fast");
    REQUIRE_MESSAGE(cpus.ok(), cpus.error().message());
    CHECK(cpus->size() == size_t(opts.cpus));
  }
}

// What happened when a signal was sent to a save once it was writing RAM.
struct Interrupted {
  bool caught = false;  // the signal was sent in the phase
  int status = -1;
  std::string err;
  std::string log;  // where the save's stderr went (and its watchdog's)
};

// Runs `argv` (whose --progress-fd is 3) with stderr to `log`, and sends
// `sig` as soon as the progress says `phase` has begun (`times` times, 0.2 s
// apart); or, when `act` is given, runs it instead of sending a signal.
// `env` is added to its environment.
Interrupted interrupt_at_phase(const std::vector<std::string>& argv, const std::string& log,
                               int sig, const std::function<void()>& act, const std::string& phase,
                               const std::vector<std::string>& env = {}, int times = 1) {
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  Interrupted res;
  {
    Child child(argv, log, p[1], env);
    ::close(p[1]);
    std::string got;
    double deadline = now_s() + kRunTimeout;
    while (!res.caught && now_s() < deadline) {
      pollfd pfd{p[0], POLLIN, 0};
      if (poll(&pfd, 1, 100) <= 0) continue;
      char buf[4096];
      ssize_t n = ::read(p[0], buf, sizeof buf);
      if (n <= 0) break;  // it is over
      got.append(buf, size_t(n));
      // One JSON object per line: {"phase": ..., "done": ..., "final": ...}.
      for (size_t nl; !res.caught && (nl = got.find('\n')) != std::string::npos;) {
        json j = json::parse(got.substr(0, nl), nullptr, false);
        got.erase(0, nl + 1);
        if (j.is_object() && j.value("phase", "") == phase && !j.value("final", true)) {
          for (int i = 0; !act && i < times; i++) {
            if (i) std::this_thread::sleep_for(std::chrono::milliseconds(200));
            child.signal(sig);
          }
          if (act) act();
          res.caught = true;
        }
      }
    }
    res.status = child.wait(kRunTimeout);
  }
  ::close(p[0]);
  res.err = slurp(log);
  res.log = log;
  return res;
}

// `save --leave-running` of `vm`, interrupted as interrupt_at_phase does
// (by default once RAM is being written, so the guest is stopped).
Interrupted interrupt_save(const TestVm& vm, const std::string& image, int sig,
                           const std::function<void()>& act = nullptr,
                           const std::string& phase = "writing RAM (guest paused)",
                           const std::vector<std::string>& env = {},
                           const std::vector<std::string>& extra = {}) {
  std::vector<std::string> argv = {VMSAVE_BINARY,   "save", "--qmp",
                                   vm.qmp_path(),   image,  "--leave-running",
                                   "--progress-fd", "3"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return interrupt_at_phase(argv, vm.dir() + "/interrupted-save.log", sig, act, phase, env);
}

// interrupt_save with SIGKILL, tried up to 3 times (a save may finish
// before the kill lands); nullopt when no try was killed part-way.
std::optional<Interrupted> kill_save(const TestVm& vm, const std::string& image,
                                     const std::string& phase) {
  for (int attempt = 0; attempt < 3; attempt++) {
    Interrupted in = interrupt_save(vm, image, SIGKILL, nullptr, phase);
    if (in.caught && in.status == 128 + SIGKILL) return in;
    CHECK_MESSAGE(in.status == 0, "status " << in.status << ": " << in.err);
    std::filesystem::remove(image);
  }
  return std::nullopt;
}

// Flips one byte of `path` at `offset` (a hole reads as zero and becomes
// 0xff).
void flip_byte(const std::string& path, i64 offset) {
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE_MESSAGE(fd >= 0, "open " << path << ": " << strerror(errno));
  unsigned char b = 0;
  REQUIRE(::pread(fd, &b, 1, offset) == 1);
  b ^= 0xff;
  REQUIRE(::pwrite(fd, &b, 1, offset) == 1);
  ::close(fd);
}

// `info --json` of an image saved through QEMU: every block says so, and
// the QEMU migration section is there.
json check_saved_by_qemu(const std::string& image, const std::vector<std::string>& want_ids) {
  RunResult info = run_vmsave({"info", image, "--json"}, kRunTimeout);
  REQUIRE_RUN(info, 0);
  json j = parse_json(info);
  std::vector<std::string> ids;
  for (auto& b : j["blocks"]) {
    ids.push_back(b.value("id", ""));
    CHECK_MESSAGE(b.value("saved_by", "") == "qemu", b.dump());
    CHECK_MESSAGE(b.value("page_size", 0) == 4096, b.dump());  // it had none (trial L)
  }
  std::sort(ids.begin(), ids.end());
  CHECK_MESSAGE(ids == want_ids, joined(ids));
  CHECK(j["format_version"] == "1.1");
  REQUIRE(j["qemu_migration_section"].is_object());
  CHECK(j["qemu_migration_section"].value("length", i64(0)) > 0);
  CHECK(j["qemu_migration_section"].value("offset", i64(0)) % (2 * kMiB) == 0);
  const i64 in_section = j["qemu_migration_section"].value("stored_bytes", i64(0));
  CHECK(in_section > 0);
  CHECK(in_section <= j.value("allocated_bytes", i64(0)));
  RunResult text = run_vmsave({"info", image}, kRunTimeout);
  CHECK_MESSAGE(contains(text.out, "saved by QEMU (mapped-ram"), text.out);
  const std::string stored = "(" + human_bytes(j.value("stored_bytes", 0.0)) + " stored RAM,";
  CHECK_MESSAGE(contains(text.out, stored), text.out);
  CHECK(j.value("stored_bytes", i64(0)) > 0);
  return j;
}

}  // namespace

TEST_SUITE_BEGIN("e2e");

TEST_CASE("e2e: an eagerly restored guest carries on from the saved iteration") {
  test::require_guest_kit();
  save_then_restore(kSmallVm, /*lazy=*/false);
}

TEST_CASE(
    "e2e: a guest saved with --compress zstd restores eagerly into prealloc=on backends and "
    "carries on") {
  test::require_guest_kit();
  save_then_restore(kSmallVm, /*lazy=*/false, "zstd:3", /*prealloc=*/true);
}

TEST_CASE("e2e: a lazily restored guest maps the image and carries on") {
  test::require_guest_kit();
  save_then_restore(kSmallVm, /*lazy=*/true);
}

TEST_CASE(
    "e2e: with io_uring refused (a container's seccomp profile) a guest is saved live and "
    "restored eagerly") {
  test::require_guest_kit();
  // Live, while memcheck writes: its passes reuse piece buffers, which a
  // synchronous queue hands back before submit() returns.
  VmOptions opts = kSmallVm;
  opts.dirty_mib = kLiveDirtyMib;
  TestVm vm(opts);
  boot(vm);
  const std::string image = vm.dir() + "/vm.vmsave";
  // The QEMU the restore starts runs under the same filter, as in a container.
  auto refused = [](std::vector<std::string> args) {
    args.insert(args.begin(), {NO_IO_URING_BINARY, VMSAVE_BINARY});
    return test::run_program(args, kRunTimeout);
  };
  RunResult s = refused({"save", "--qmp", vm.qmp_path(), image, "--live", "--json"});
  REQUIRE_RUN(s, 0);
  CHECK_MESSAGE(contains(s.err, "io_uring is unavailable"), s.err);
  CHECK(parse_json(s).value("passes", 0) >= 2);
  std::optional<int> exit = wait_exit_unreaped(vm.pid(), 15);
  REQUIRE_MESSAGE(exit.has_value(), "QEMU still runs after save (pid " << vm.pid() << ")");
  vm.kill_qemu();
  const MemcheckLine saved = *read_story(vm.serial_log(), true).last;
  CHECK_RUN(refused({"verify", image}), 0);

  REQUIRE(::unlink(vm.ram_path().c_str()) == 0);
  RunResult r = refused(restore_args(image, vm.dir() + "/restore.log", false, vm.command()));
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(contains(r.err, "io_uring is unavailable"), r.err);
  StartedQemu qemu{parse_json(r).value("pid", -1)};
  REQUIRE(qemu.pid > 0);
  std::string err;
  CHECK_MESSAGE(wait_story([&] { return vm.serial_log(); }, saved.iteration + kMoreIterations,
                           kCarryOnTimeout, qemu.pid, nullptr, &err, /*dirty=*/true),
                err);
}

TEST_CASE("e2e: a backend with offset= (its RAM further into the file) restores eagerly") {
  test::require_guest_kit();
  // QEMU maps size bytes from offset: a RAM file holding the block at 0 was
  // refused ("backing store size ... is too small").
  VmOptions opts = kSmallVm;
  opts.file_backend_props = "offset=64M";
  save_then_restore(opts, /*lazy=*/false);
}

TEST_CASE("e2e: a mem-path that is a symbolic link is saved, and a restore does not write through it") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  // The link QEMU follows, to a file it can map.
  const std::string real = vm.ram_path(0) + ".real";
  {
    UniqueFd fd(::open(real.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600));
    REQUIRE(fd.valid());
    REQUIRE(::ftruncate(fd.get(), kSmallVm.ram_mib * kMiB) == 0);
  }
  REQUIRE(::symlink(real.c_str(), vm.ram_path(0).c_str()) == 0);
  boot(vm);
  const std::string image = vm.dir() + "/vm.vmsave";
  // It was "open: Too many levels of symbolic links", and no image.
  const MemcheckLine saved = *read_story(save_and_quit(vm, image)).last;

  // Dangling now: it was "RAM file exists", and --force the way out.
  REQUIRE(::unlink(real.c_str()) == 0);
  RunResult r =
      run_vmsave(restore_args(image, vm.dir() + "/restore.log", false, vm.command()), kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "cannot create RAM file (" + vm.ram_path(0) +
                                    "): it is a symbolic link, and vmsave does not write "
                                    "through one; give the real path, or remove the link"),
                r.err);
  CHECK(test::kill_qemu_mentioning(vm.dir()) == 0);

  r = run_vmsave(restore_args(image, vm.dir() + "/lazy.log", true, vm.command()), kRunTimeout);
  REQUIRE_RUN(r, 0);
  StartedQemu qemu{parse_json(r).value("pid", -1)};
  check_carries_on(vm, saved, qemu.pid);
}

TEST_CASE(
    "e2e: a relative mem-path is found from QEMU's directory, and a save never replaces the RAM "
    "file it reads") {
  test::require_guest_kit();
  VmOptions opts = kSmallVm;
  opts.relative_mem_path = true;
  TestVm vm(opts);
  boot(vm);
  // --force over the VM's RAM file: it was saved, the image took the RAM
  // file's name and the guest ran on, unnamed; a later save called the
  // image "its RAM file" and said to remove it.
  RunResult r = run_vmsave(
      {"save", "--qmp", vm.qmp_path(), "--force", "--leave-running", vm.ram_path(0)}, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "cannot save there (" + vm.ram_path(0) +
                                    "): it is the memory file of block ram0, which this save "
                                    "reads; choose another path for the image"),
                r.err);
  CHECK(test::file_size(vm.ram_path(0)) == kSmallVm.ram_mib * kMiB);
  CHECK(qmp_status(vm.qmp_path()) == "running");

  // vmsave runs in another directory: it was "cannot find the RAM file of
  // backend ram0 (ram0): QEMU has no mapping of it".
  const std::string image = vm.dir() + "/vm.vmsave";
  json report;
  const MemcheckLine saved = *read_story(save_and_quit(vm, image, {}, &report)).last;
  CHECK(report["ram_files_left"] == json::array({vm.ram_path(0)}));
  r = run_vmsave(restore_args(image, vm.dir() + "/lazy.log", true, vm.command()), kRunTimeout);
  REQUIRE_RUN(r, 0);
  StartedQemu qemu{parse_json(r).value("pid", -1)};
  check_carries_on(vm, saved, qemu.pid);
}

TEST_CASE("e2e: a guest with two vCPUs carries on after save and restore") {
  test::require_guest_kit();
  VmOptions opts = kSmallVm;
  opts.cpus = 2;
  save_then_restore(opts, /*lazy=*/false);
}

TEST_CASE("e2e: a guest with two RAM backends (NUMA nodes) carries on after save and restore") {
  test::require_guest_kit();
  VmOptions opts = kSmallVm;
  opts.numa_nodes = 2;
  save_then_restore(opts, /*lazy=*/false);
}

TEST_CASE("e2e: a restore with the NUMA nodes' backends swapped is refused before QEMU starts") {
  test::require_guest_kit();
  VmOptions opts = kSmallVm;
  opts.numa_nodes = 2;
  TestVm vm(opts);
  const auto [image, log_at_save, saved] = boot_and_save(vm);
  // Lazily, QEMU took it, and the guest died at once (its pages at other
  // guest addresses); eagerly QEMU failed on "Mismatched GPAs".
  auto swapped =
      rewrite(rewrite(vm.command(), "node,nodeid=0,memdev=ram0", "node,nodeid=0,memdev=ram1"),
              "node,nodeid=1,memdev=ram1", "node,nodeid=1,memdev=ram0");
  REQUIRE(swapped != vm.command());
  for (bool lazy : {true, false}) {
    CAPTURE(lazy);
    const std::string qemu_log = vm.dir() + "/swapped-qemu.log";
    RunResult r = run_vmsave(restore_args(image, qemu_log, lazy, swapped), kRunTimeout);
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(contains(r.err,
                           "the QEMU command does not fit the image: NUMA node 0 has "
                           "memdev=ram1, the VM was saved with memdev=ram0"),
                  r.err);
    CHECK_FALSE(exists(qemu_log));
  }
  // Another node, without memory: another machine (its ACPI tables).
  RunResult r = run_vmsave(restore_args(image, vm.dir() + "/three-nodes-qemu.log", true,
                                        plus(vm.command(), {"-numa", "node,nodeid=2"})),
                           kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "-numa gives 3 nodes, the VM was saved with 2"), r.err);
}

TEST_CASE("e2e: save --leave-running keeps the guest running and --paused stops it until cont") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  boot(vm);
  auto log = [&] { return vm.serial_log(); };
  std::string err;

  RunResult r = run_vmsave(
      {"save", "--qmp", vm.qmp_path(), vm.dir() + "/running.vmsave", "--leave-running", "--json"},
      kRunTimeout);
  REQUIRE_RUN(r, 0);
  CHECK(parse_json(r).value("after", "") == "running");
  MemcheckLine at_save = *read_story(vm.serial_log()).last;
  CHECK(qmp_status(vm.qmp_path()) == "running");
  CHECK_MESSAGE(wait_story(log, at_save.iteration + kMoreIterations, kCarryOnTimeout, vm.pid(),
                           nullptr, &err),
                err);
  RunResult verified = run_vmsave({"verify", vm.dir() + "/running.vmsave"}, kRunTimeout);
  CHECK_RUN(verified, 0);

  r = run_vmsave(
      {"save", "--qmp", vm.qmp_path(), vm.dir() + "/paused.vmsave", "--paused", "--json"},
      kRunTimeout);
  REQUIRE_RUN(r, 0);
  CHECK(parse_json(r).value("after", "") == "paused");
  CHECK(process_runs(vm.pid()));
  // QEMU calls the state after a completed outgoing migration (which the
  // device state was) "postmigrate": paused, and `cont` resumes it.
  auto status = qmp_execute(vm.qmp_path(), "query-status");
  REQUIRE_MESSAGE(status.ok(), status.error().message());
  CHECK_FALSE(status->value("running", true));
  CHECK_MESSAGE(
      (status->value("status", "") == "paused" || status->value("status", "") == "postmigrate"),
      status->dump());
  // A paused guest prints nothing: five passes' worth of time, no new byte.
  const std::string paused_log = vm.serial_log();
  std::this_thread::sleep_for(std::chrono::seconds(1));
  CHECK_MESSAGE(vm.serial_log() == paused_log, "the guest ran while paused:\n"
                                                   << tail(vm.serial_log()));

  // QEMU will not migrate a guest paused by a completed migration: vmsave
  // says so before touching anything, and how to get past it.
  const std::string again = vm.dir() + "/again.vmsave";
  r = run_vmsave({"save", "--qmp", vm.qmp_path(), again, "--paused"}, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "postmigrate"), r.err);
  CHECK_MESSAGE(contains(r.err, "cont"), r.err);
  CHECK_FALSE(exists(again));

  // --live of a guest paused by `stop` has nothing to overlap with: it says
  // so and saves the guest as it is, still paused.
  REQUIRE(qmp_execute(vm.qmp_path(), "cont").ok());
  REQUIRE(qmp_execute(vm.qmp_path(), "stop").ok());
  const std::string stopped_log = vm.serial_log();
  r = run_vmsave({"save", "--qmp", vm.qmp_path(), vm.dir() + "/live-paused.vmsave", "--live",
                  "--paused", "--json"},
                 kRunTimeout);
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(contains(r.err, "--live has nothing to overlap with"), r.err);
  CHECK_FALSE(parse_json(r).value("live", true));
  CHECK(qmp_status(vm.qmp_path()) != "running");

  auto cont = qmp_execute(vm.qmp_path(), "cont");
  REQUIRE_MESSAGE(cont.ok(), cont.error().message());
  CHECK(qmp_status(vm.qmp_path()) == "running");
  i64 paused_at = read_story(stopped_log).last->iteration;
  CHECK_MESSAGE(
      wait_story(log, paused_at + kMoreIterations, kCarryOnTimeout, vm.pid(), nullptr, &err), err);
}

// Memory hot-plug over QMP: each backend a 64 MiB shared file, and a
// pc-dimm for those given a device id (on `node` when it is not 0).
struct PluggedBackend {
  std::string id, file, dimm;
  int node = 0;
  json props = json::object();  // more object-add properties
};

void hot_plug(const TestVm& vm, const std::vector<PluggedBackend>& backends) {
  auto q = QmpClient::connect(vm.qmp_path(), 10);
  REQUIRE(q.ok());
  for (const PluggedBackend& b : backends) {
    json add = {{"qom-type", "memory-backend-file"},
                {"id", b.id},
                {"size", 64 * kMiB},
                {"share", true},
                {"mem-path", b.file}};
    add.update(b.props);
    auto o = q->execute("object-add", add);
    REQUIRE_MESSAGE(o.ok(), o.error().message());
    if (b.dimm.empty()) continue;
    json dev = {{"driver", "pc-dimm"}, {"id", b.dimm}, {"memdev", b.id}};
    if (b.node) dev["node"] = b.node;
    auto d = q->execute("device_add", dev);
    REQUIRE_MESSAGE(d.ok(), d.error().message());
  }
}

// Saves `vm` into `image` (QEMU quits) and removes its RAM files and
// `files`, as a host that restores it elsewhere would have them: the last
// memcheck line before the save.
MemcheckLine save_and_clear(TestVm& vm, const std::string& image,
                            const std::vector<std::string>& files) {
  REQUIRE_RUN(run_vmsave({"save", "--qmp", vm.qmp_path(), image}, kRunTimeout), 0);
  REQUIRE(wait_exit_unreaped(vm.pid(), 15).has_value());
  vm.kill_qemu();  // reaps it
  for (int i = 0; i < vm.options().numa_nodes; i++) REQUIRE(::unlink(vm.ram_path(i).c_str()) == 0);
  for (auto& f : files) REQUIRE(::unlink(f.c_str()) == 0);
  return *read_story(vm.serial_log()).last;
}

TEST_CASE(
    "e2e: DIMMs hot-plugged before the save: refused without their -device or in another order, "
    "and carry on with them") {
  test::require_guest_kit();
  VmOptions opts = kSmallVm;
  opts.extra_args = {"-m", "256M,slots=2,maxmem=512M"};
  TestVm vm(opts);
  boot(vm);
  const std::string dir = std::filesystem::path(vm.ram_path()).parent_path().string();
  const std::string dimm_files[] = {dir + "/dimm1", dir + "/dimm2"};
  hot_plug(vm, {{"dimm1", dimm_files[0], "d1"}, {"dimm2", dimm_files[1], "d2"}});
  const std::string image = vm.dir() + "/vm.vmsave";
  const MemcheckLine saved = save_and_clear(vm, image, {dimm_files[0], dimm_files[1]});
  // Where the DIMMs were, as the image recorded them.
  RunResult info = run_vmsave({"info", image, "--json"}, kRunTimeout);
  REQUIRE_RUN(info, 0);
  const json devices = parse_json(info)["metadata"]["memory_devices"];
  REQUIRE_MESSAGE(devices.size() == 2, devices.dump());
  CHECK(devices[0].value("memdev", "") == "dimm1");
  CHECK(devices[1].value("memdev", "") == "dimm2");
  const u64 addr1 = devices[0].value("addr", u64(0));
  const u64 addr2 = devices[1].value("addr", u64(0));
  CHECK(addr2 > addr1);
  RunResult text = run_vmsave({"info", image}, kRunTimeout);
  REQUIRE_RUN(text, 0);
  // Plugged after start, the backends are in no command line: info gives
  // their -object too.
  for (int i = 0; i < 2; i++)
    CHECK_MESSAGE(contains(text.out, fmt::format("memory dev:   -object memory-backend-file,"
                                                 "id=dimm{0},size=67108864,share=on,mem-path={1} "
                                                 "-device pc-dimm,id=d{0},memdev=dimm{0},"
                                                 "addr={2:#x}\n",
                                                 i + 1, dimm_files[i], i ? addr2 : addr1)),
                  text.out);

  // The backends without the DIMMs that used them: QEMU failed in the
  // device state ("Unknown ramblock dimm1") after it had started.
  std::vector<std::string> objects;
  for (int i = 0; i < 2; i++)
    objects.insert(objects.end(),
                   {"-object", fmt::format("memory-backend-file,id=dimm{},size=64M,share=on,"
                                           "mem-path={}",
                                           i + 1, dimm_files[i])});
  const std::string qemu_log = vm.dir() + "/restore-qemu.log";
  RunResult r =
      run_vmsave(restore_args(image, qemu_log, false, plus(vm.command(), objects)), kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err,
                         "vmsave: error: the QEMU command does not fit the image: no "
                         "device, NUMA node or -machine memory-backend uses memory backend "
                         "dimm1; the VM got it after it started (memory hot-plug)"),
                r.err);
  CHECK_MESSAGE(contains(r.err, "-device pc-dimm,id=DIMM,memdev=dimm1"), r.err);
  CHECK_FALSE(exists(qemu_log));
  for (auto& f : dimm_files) CHECK_FALSE(exists(f));

  // The two-step form checks the QEMU it is given the same way, which
  // still waits.
  RunResult prepared = run_vmsave({"prepare", image, "--lazy", "--json"}, kRunTimeout);
  REQUIRE_RUN(prepared, 0);
  const auto prepared_args = parse_json(prepared)["qemu_args"].get<std::vector<std::string>>();
  ::unlink(vm.qmp_path().c_str());  // a stale socket would look ready
  {
    const std::string log = vm.dir() + "/two-step-qemu.log";
    Child waiting(with_prepared(plus(vm.command(), objects), prepared_args), log);
    await_qmp_socket(vm, waiting, log);
    r = run_vmsave({"restore", image, "--qmp", vm.qmp_path()}, kRunTimeout);
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(contains(r.err, "uses memory backend dimm1; the VM got it after it started"),
                  r.err);
    CHECK(qmp_status(vm.qmp_path()) == "inmigrate");
  }
  ::unlink(vm.qmp_path().c_str());

  // The DIMMs in the other order swap their guest addresses: a lazy
  // restore ran the guest with each one's memory at the other's place and
  // said it ran. Refused once QEMU has placed them, in both forms.
  const std::vector<std::string> swapped = {"-device", "pc-dimm,id=d2,memdev=dimm2", "-device",
                                            "pc-dimm,id=d1,memdev=dimm1"};
  const std::string misplaced = fmt::format(
      "vmsave: error: the QEMU command does not fit the image: memory device d1 "
      "(backend dimm1) is at guest address {:#x}, the saved VM had it at {:#x}; list "
      "the -device options of hot-plugged memory in the order it was plugged, or "
      "give each as vmsave info lists it: -device pc-dimm,id=d1,memdev=dimm1,addr={:#x}",
      addr2, addr1, addr1);
  r = run_vmsave(restore_args(image, qemu_log, true, plus(plus(vm.command(), objects), swapped)),
                 kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, misplaced), r.err);
  CHECK(test::qemu_pids_mentioning(vm.dir()).empty());
  {
    const std::string log = vm.dir() + "/two-step-qemu.log";
    Child waiting(with_prepared(plus(plus(vm.command(), objects), swapped), prepared_args), log);
    await_qmp_socket(vm, waiting, log);
    r = run_vmsave({"restore", image, "--qmp", vm.qmp_path()}, kRunTimeout);
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(contains(r.err, misplaced + "; this QEMU still waits"), r.err);
    CHECK(qmp_status(vm.qmp_path()) == "inmigrate");
  }
  ::unlink(vm.qmp_path().c_str());

  // In the order they were plugged, or in any order with the address the
  // fix names, they carry on.
  r = run_vmsave(
      restore_args(
          image, qemu_log, false,
          plus(plus(vm.command(), objects),
               {"-device", "pc-dimm,id=d2,memdev=dimm2,addr=" + fmt::format("{:#x}", addr2),
                "-device", "pc-dimm,id=d1,memdev=dimm1"})),
      kRunTimeout);
  REQUIRE_RUN(r, 0);
  StartedQemu qemu{parse_json(r).value("pid", -1)};
  REQUIRE(qemu.pid > 0);
  check_carries_on(vm, saved, qemu.pid);
}

TEST_CASE(
    "e2e: a DIMM on another NUMA node, and a backend added with no device, restore as they were") {
  test::require_guest_kit();
  VmOptions opts = kSmallVm;
  opts.numa_nodes = 2;
  opts.extra_args = {"-m", "256M,slots=1,maxmem=512M"};
  TestVm vm(opts);
  boot(vm);
  const std::string dir = std::filesystem::path(vm.ram_path(0)).parent_path().string();
  const std::string dimm_file = dir + "/dimm1", spare_file = dir + "/spare";
  // Properties besides size and mem-path: info's -object used to drop them.
  hot_plug(vm, {{"dimm1",
                 dimm_file,
                 "d1",
                 1,
                 {{"merge", false}, {"align", 2 * kMiB}, {"discard-data", true}}},
                {"spare", spare_file, ""}});
  const std::string image = vm.dir() + "/vm.vmsave";
  const MemcheckLine saved = save_and_clear(vm, image, {dimm_file, spare_file});

  RunResult info = run_vmsave({"info", image, "--json"}, kRunTimeout);
  REQUIRE_RUN(info, 0);
  const json devices = parse_json(info)["metadata"]["memory_devices"];
  REQUIRE_MESSAGE(devices.size() == 1, devices.dump());
  const std::string device = devices[0].value("device", "");
  CHECK(device == fmt::format("pc-dimm,id=d1,memdev=dimm1,addr={:#x},node=1",
                              devices[0].value("addr", u64(0))));
  RunResult text = run_vmsave({"info", image}, kRunTimeout);
  CHECK_MESSAGE(
      contains(text.out,
               "memory dev:   -object memory-backend-file,id=dimm1,"
               "size=67108864,share=on,mem-path=" +
                   dimm_file + ",align=2097152,discard-data=on,merge=off -device " + device + "\n"),
      text.out);

  std::vector<std::string> objects;
  for (auto [id, path] : {std::pair{"dimm1", dimm_file}, std::pair{"spare", spare_file}})
    objects.insert(objects.end(),
                   {"-object", fmt::format("memory-backend-file,id={},size=64M,share=on,"
                                           "mem-path={}",
                                           id, path)});
  // The DIMM on node 0 (node= left out): the guest would see its memory
  // move nodes. Refused once QEMU placed it, before the device state loads.
  const std::string qemu_log = vm.dir() + "/restore-qemu.log";
  RunResult r = run_vmsave(
      restore_args(image, qemu_log, true,
                   plus(plus(vm.command(), objects), {"-device", "pc-dimm,id=d1,memdev=dimm1"})),
      kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err,
                         "memory device d1 (backend dimm1) is on NUMA node 0, the saved "
                         "VM had it on node 1; give it as vmsave info lists it: -device " +
                             device),
                r.err);
  CHECK(test::qemu_pids_mentioning(vm.dir()).empty());

  // As info lists it, and the backend no device used given no device
  // either (it was refused as "the VM got it after it started").
  r = run_vmsave(
      restore_args(image, qemu_log, false, plus(plus(vm.command(), objects), {"-device", device})),
      kRunTimeout);
  REQUIRE_RUN(r, 0);
  StartedQemu qemu{parse_json(r).value("pid", -1)};
  REQUIRE(qemu.pid > 0);
  check_carries_on(vm, saved, qemu.pid);
}

TEST_CASE("e2e: a save of a guest whose disk writes go to a -snapshot overlay warns of it") {
  test::require_guest_kit();
  test::TempDir disk_dir;
  const std::string disk = disk_dir / "disk.raw";
  { std::ofstream(disk) << std::string(kMiB, '\0'); }
  const std::string warning =
      "vmsave: warning: the guest's disk writes go to a temporary overlay (-snapshot, "
      "snapshot=on) that the image does not hold";
  struct Case {
    std::vector<std::string> extra;
    bool warns;
  };
  // It was said of a -snapshot VM without disks, and of one whose only
  // disk has snapshot=off (trial X): QEMU's disks decide, not the options.
  const Case cases[] = {
      {{"-snapshot", "-drive", "file=" + disk + ",format=raw,if=virtio"}, true},
      {{"-drive", "file=" + disk + ",format=raw,if=virtio,snapshot=on"}, true},
      {{"-drive", "file=" + disk + ",format=raw,if=virtio"}, false},
      {{"-snapshot"}, false},
      {{"-snapshot", "-drive", "file=" + disk + ",format=raw,if=virtio,snapshot=off"}, false},
      // A drive no device uses: the guest cannot write it (trial Y).
      {{"-snapshot", "-drive", "file=" + disk + ",format=raw,if=none,id=d9"}, false},
  };
  for (const Case& c : cases) {
    CAPTURE(joined(c.extra));
    VmOptions opts = kSmallVm;
    opts.extra_args = c.extra;
    TestVm vm(opts);
    boot(vm);
    RunResult r = run_vmsave({"save", "--qmp", vm.qmp_path(), vm.dir() + "/vm.vmsave", "--json"},
                             kRunTimeout);
    CHECK_RUN(r, 0);
    CHECK_MESSAGE(contains(r.err, warning) == c.warns, r.err);
    CHECK(exists(vm.dir() + "/vm.vmsave"));
    // A wrapper reading --json's report hears of it too.
    json warnings = parse_json(r).value("warnings", json());
    REQUIRE(warnings.is_array());
    CHECK(warnings.size() == (c.warns ? 1u : 0u));
    if (c.warns) CHECK(contains(warnings[0].get<std::string>(), warning.substr(17)));
    // info shows the overlay for what it is, not as QEMU's json: spelling
    // of a file it has deleted.
    RunResult info = run_vmsave({"info", vm.dir() + "/vm.vmsave"});
    CHECK_MESSAGE(contains(info.out, "disk:         virtio0 a temporary overlay of " + disk +
                                         " (-snapshot: gone with its QEMU)\n") == c.warns,
                  info.out);
  }
}

TEST_CASE(
    "e2e: a save after an external snapshot names the disk file QEMU writes, which the command "
    "line does not, and --leave-running warns that the disks change") {
  // The image recorded QEMU's command line, which names the disk's old
  // layer: a restore with it silently met older disks than its RAM, and
  // info did not show the file QEMU wrote (trial X).
  test::require_guest_kit();
  test::TempDir disks;
  // The overlay has the base's file name, in another directory: another
  // file all the same (a base-name match silenced the warning; review).
  const std::string base = disks / "base.qcow2", overlay = disks / "snap/base.qcow2",
                    iso = disks / "cd.iso";
  REQUIRE(::mkdir((disks / "snap").c_str(), 0700) == 0);
  REQUIRE_RUN(test::run_program({"qemu-img", "create", "-q", "-f", "qcow2", base, "16M"}), 0);
  test::write_pattern_file(iso, kMiB, "zero", 0);
  VmOptions opts = kSmallVm;
  // And an empty CD drive, whose medium changes too.
  opts.extra_args = {"-drive",  "file=" + base + ",if=virtio,id=disk0",
                     "-drive",  "if=none,id=cd0,media=cdrom",
                     "-device", "ide-cd,drive=cd0,bus=ide.2"};
  TestVm vm(opts);
  boot(vm);
  const std::string image = vm.dir() + "/vm.vmsave";
  // Before the snapshot: the command names the file, only the running on is
  // worth a word.
  RunResult r =
      run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--leave-running", "--json"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(contains(r.err,
                         "vmsave: warning: the guest runs on and writes its disks "
                         "(disk0: " +
                             base +
                             "): the image restores only with them as "
                             "they are at this save; to keep a copy, save with --paused, "
                             "copy the disks, then resume the guest (QMP cont)\n"),
                r.err);
  CHECK(parse_json(r)["warnings"].size() == 1);

  {
    auto qmp = QmpClient::connect(vm.qmp_path(), 10);
    REQUIRE(qmp.ok());
    auto snap =
        qmp->execute("blockdev-snapshot-sync",
                     {{"device", "disk0"}, {"snapshot-file", overlay}, {"format", "qcow2"}});
    REQUIRE_MESSAGE(snap.ok(), snap.error().message());
    auto cd = qmp->execute("blockdev-change-medium",
                           {{"device", "cd0"}, {"filename", iso}, {"format", "raw"}});
    REQUIRE_MESSAGE(cd.ok(), cd.error().message());
  }
  r = run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--force", "--paused"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(contains(r.err,
                         "vmsave: warning: QEMU's command line does not name a file a "
                         "disk uses now (disk0 writes " +
                             overlay + ", cd0 reads " + iso + "; "),
                r.err);
  CHECK_FALSE(contains(r.err, "the guest runs on"));  // paused
  r = run_vmsave({"info", image});
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(
      contains(r.out, "disk:         disk0 " + overlay + " (qcow2, backing " + base + ")\n"),
      r.out);
  json meta = parse_json(run_vmsave({"info", "--json", image}))["metadata"];
  REQUIRE(meta["disks"].size() == 2);
  CHECK(meta["disks"][1].value("read_only", false) == true);
  CHECK(meta["disks"][0].value("file", "") == overlay);
  CHECK(meta["disks"][0].value("read_only", true) == false);
  CHECK(meta["disks"][0].value("path", "") == overlay);
  CHECK(meta["disks"][0]["backing_chain"] == json::array({base}));

  // Restored with the command the VM was started with, QEMU opens the
  // layer below what the VM wrote; with format=raw, it reads the qcow2
  // file's bytes as the disk (trial Y: both silent). The overlay itself,
  // as a qcow2, draws no word.
  REQUIRE(test::kill_qemu_mentioning(vm.qmp_path()) == 1);
  ::unlink(vm.ram_path().c_str());
  const std::string restore_log = vm.dir() + "/restore.log";
  struct Case {
    std::vector<std::string> command;
    std::string warning;
  };
  const Case cases[] = {
      {vm.command(), "vmsave: warning: disk disk0 opens " + base + ", which lies below " + overlay +
                         " that the VM wrote at the save: the guest finds its disk as "
                         "it was before that snapshot, older than its RAM (its file systems may "
                         "break); open " +
                         overlay + " (vmsave info lists the disks)\n"},
      {rewrite(vm.command(), base + ",", overlay + ",format=raw,"),
       "vmsave: warning: disk disk0 opens " + overlay +
           " as raw, but the VM wrote it as qcow2 "
           "at the save: the guest would read qcow2's bytes as its disk and its writes damage the "
           "file; give the command format=qcow2\n"},
      {rewrite(vm.command(), base + ",", overlay + ","), ""},
  };
  for (const Case& c : cases) {
    CAPTURE(joined(c.command));
    auto args = restore_args(image, restore_log, false, c.command);
    args.insert(args.begin() + 2, "--paused");
    r = run_vmsave(args, kRunTimeout);
    CHECK_RUN(r, 0);
    if (c.warning.empty())
      CHECK_MESSAGE(!contains(r.err, "warning"), r.err);
    else
      CHECK_MESSAGE(contains(r.err, c.warning), r.err);
    CHECK(test::kill_qemu_mentioning(vm.qmp_path()) == 1);
    ::unlink(vm.ram_path().c_str());
  }
}

TEST_CASE("e2e: another QMP client resuming the guest mid-save fails the save, and pausing it mid-live-save keeps it paused") {
  test::require_guest_kit();
  test::TempDir other_dir;  // a second monitor, as a management tool would hold
  const std::string other = other_dir / "other.sock";
  // 384 MiB of data: the RAM write lasts several 100 ms progress ticks, so
  // the other client acts while it runs (with 64 MiB it was often over
  // before the first tick, and nothing was tried).
  VmOptions opts{.ram_mib = 512, .memcheck_mib = 384, .dirty_mib = 16};
  opts.extra_args = {"-qmp", "unix:" + other + ",server=on,wait=off"};
  TestVm vm(opts);
  boot(vm, 1);

  // A cont while vmsave writes RAM: the guest ran, the RAM written is not
  // the RAM the device state goes with. It used to exit 0 with an image
  // that verify rejected.
  const std::string image = vm.dir() + "/resumed.vmsave";
  Interrupted in = interrupt_save(vm, image, 0, [&] { REQUIRE(qmp_execute(other, "cont").ok()); });
  REQUIRE(in.caught);
  CHECK_MESSAGE(in.status == 1, in.err);
  CHECK_MESSAGE(contains(in.err, "vmsave: error: the guest ran during the save"), in.err);
  CHECK_FALSE(exists(image));
  CHECK(qmp_status(vm.qmp_path()) == "running");

  // x-ignore-shared switched off while vmsave writes RAM: QEMU sent all
  // RAM in the device state too, and the save exited 0 with an image that
  // verified but that no restore could load.
  const std::string unignored = vm.dir() + "/unignored.vmsave";
  in = interrupt_save(vm, unignored, 0, [&] {
    auto c = QmpClient::connect(other, 10);
    REQUIRE(c.ok());
    json off = {{"capability", "x-ignore-shared"}, {"state", false}};
    auto r = c->execute("migrate-set-capabilities", {{"capabilities", json::array({off})}});
    REQUIRE_MESSAGE(r.ok(), r.error().message());
  });
  REQUIRE(in.caught);
  CHECK_MESSAGE(in.status == 1, in.err);
  CHECK_MESSAGE(contains(in.err,
                         "vmsave: error: QEMU's migration capabilities changed during the "
                         "save"),
                in.err);
  CHECK_FALSE(exists(unignored));
  CHECK(qmp_status(vm.qmp_path()) == "running");

  // A stop while --live writes RAM: the operator's pause stands.
  const std::string live = vm.dir() + "/live.vmsave";
  in = interrupt_save(vm, live, 0, [&] { REQUIRE(qmp_execute(other, "stop").ok()); },
                      "writing RAM live", {}, {"--live", "--json"});
  REQUIRE(in.caught);
  CHECK_MESSAGE(in.status == 0, in.err);
  CHECK_MESSAGE(contains(in.err, "another QMP client paused the guest during the live save; it "
                                 "stays paused"),
                in.err);
  CHECK(qmp_status(vm.qmp_path()) != "running");
  CHECK_RUN(run_vmsave({"verify", live}, kRunTimeout), 0);
}

TEST_CASE(
    "e2e: a lazy restore whose image is replaced as its QEMU starts fails, not runs a dead guest") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  boot(vm, 1);
  const std::string image = vm.dir() + "/vm.vmsave";
  const std::string newer = vm.dir() + "/newer.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--leave-running"}, kRunTimeout),
              0);
  std::string err;
  i64 then = read_story(vm.serial_log()).last->iteration;
  REQUIRE_MESSAGE(wait_story([&] { return vm.serial_log(); }, then + 3, kCarryOnTimeout, vm.pid(),
                             nullptr, &err),
                  err);
  save_and_quit(vm, newer);
  const MemcheckLine saved = *read_story(vm.serial_log()).last;

  // A QEMU wrapper that moves the newer image over the one vmsave opened,
  // just before QEMU opens it by its path: what a save --force or an mv of
  // a new image at that moment does. QEMU used to map the newer image's
  // RAM under the older one's device state, and the restore said it ran.
  const std::string wrapper = vm.dir() + "/qemu-wrapper";
  {
    std::ofstream w(wrapper);
    w << "#!/bin/sh\ncase \"$*\" in *incoming*) mv -f '" << newer << "' '" << image
      << "' ;; esac\nexec qemu-system-x86_64 \"$@\"\n";
  }
  REQUIRE(::chmod(wrapper.c_str(), 0755) == 0);
  std::vector<std::string> wrapped = vm.command();
  wrapped[0] = wrapper;
  const std::string log = vm.dir() + "/restore.log";
  RunResult r = run_vmsave(restore_args(image, log, true, wrapped), kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err,
                         "vmsave: error: the image was replaced while the restore started "
                         "QEMU (" +
                             image + "): QEMU maps another file's RAM for block ram0"),
                r.err);
  CHECK_FALSE(exists(newer));
  CHECK(test::qemu_pids_mentioning(vm.dir()).empty());

  // The retry restores the image now at the path: the newer save.
  r = run_vmsave(restore_args(image, log, true, vm.command()), kRunTimeout);
  REQUIRE_RUN(r, 0);
  StartedQemu qemu{parse_json(r).value("pid", -1)};
  check_carries_on(vm, saved, qemu.pid);
}

TEST_CASE("e2e: two lazy clones of one image run at once, each carrying on") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  const auto [image, log_at_save, saved] = boot_and_save(vm);

  StartedQemu clones[2];
  std::string clone_logs[2];
  for (int i = 0; i < 2; i++) {
    // Each clone gets its own QMP socket and serial log.
    std::string sock = vm.dir() + fmt::format("/clone{}.sock", i);
    clone_logs[i] = vm.dir() + fmt::format("/clone{}.log", i);
    auto cmd = rewrite(rewrite(vm.command(), vm.qmp_path(), sock), vm.serial_path(), clone_logs[i]);
    // The second clone's backend in JSON syntax, which vmsave rewrites in
    // kind (QEMU wants "rom" as a string there, "share" as a boolean).
    if (i == 1) {
      bool json_backend = false;
      for (size_t a = 0; a + 1 < cmd.size(); a++) {
        if (cmd[a] != "-object" || !contains(cmd[a + 1], "id=ram0,")) continue;
        json o = {{"qom-type", "memory-backend-file"}};
        std::istringstream kv(cmd[a + 1]);
        std::string item;
        std::getline(kv, item, ',');  // the type
        while (std::getline(kv, item, ',')) {
          auto eq = item.find('=');
          std::string k = item.substr(0, eq), v = item.substr(eq + 1);
          if (k == "size")
            o[k] = std::stoll(v) << 20;  // "512M"
          else if (k == "share")
            o[k] = v == "on";
          else
            o[k] = v;
        }
        cmd[a + 1] = o.dump();
        json_backend = true;
      }
      REQUIRE(json_backend);
      // And QEMU's default CPU spelled out: the same machine the VM was
      // saved as without -cpu (it was refused as "-cpu qemu64 differs").
      cmd = plus(cmd, {"-cpu", "qemu64"});
    } else {
      // Through a wrapper: still QEMU's default CPU (it was refused as
      // "-cpu (none) differs from the saved qemu64").
      cmd.insert(cmd.begin(), "env");
    }
    auto args = restore_args(image, vm.dir() + fmt::format("/clone{}-qemu.log", i), true, cmd);
    if (i == 0) args.erase(args.begin() + 3, args.begin() + 5);  // no --qemu-log
    RunResult r = run_vmsave(args, kRunTimeout);
    REQUIRE_RUN(r, 0);
    json j = parse_json(r);
    clones[i].pid = j.value("pid", -1);
    REQUIRE(clones[i].pid > 0);
    CHECK(j.value("qmp", "") == sock);
    // Without --qemu-log, QEMU's log lies beside the command's own socket.
    if (i == 0) {
      CHECK(j.value("qemu_log", "") == sock + ".qemu.log");
      CHECK(exists(sock + ".qemu.log"));
    }
  }
  for (int i = 0; i < 2; i++) {
    CAPTURE(i);
    // A clone's log continues the original's (it may first finish the
    // original's last, unfinished line).
    std::string err;
    CHECK_MESSAGE(wait_story([&] { return log_at_save + slurp(clone_logs[i]); },
                             saved.iteration + kMoreIterations, kCarryOnTimeout, clones[i].pid,
                             nullptr, &err),
                  err);
    CHECK_MESSAGE(maps_file(clones[i].pid, image), maps_of(clones[i].pid));
  }
  // Both at once, not one after the other.
  CHECK(process_runs(clones[0].pid));
  CHECK(process_runs(clones[1].pid));
  // The original's log got nothing from the clones.
  CHECK(vm.serial_log() == log_at_save);

  // A third clone started with the first one's command (its QMP socket is
  // taken) is refused before QEMU starts, and the first clone is untouched:
  // its socket still its own, its migration settings as they were.
  const std::string sock0 = vm.dir() + "/clone0.sock";
  auto cmd = rewrite(rewrite(vm.command(), vm.qmp_path(), sock0), vm.serial_path(),
                     vm.dir() + "/clone2.log");
  for (bool lazy : {true, false}) {
    CAPTURE(lazy);
    RunResult r = run_vmsave(restore_args(image, vm.dir() + "/clone2-qemu.log", lazy, cmd),
                             kRunTimeout);
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(contains(r.err, "vmsave: error: the QEMU command's QMP socket is in use (" +
                                      sock0 + "): process " + std::to_string(clones[0].pid) +
                                      " listens on it"),
                  r.err);
    CHECK_FALSE(exists(vm.dir() + "/clone2-qemu.log"));
  }
  // Nor may another socket of its command take the first clone's (QEMU
  // unlinks and binds anew: the first clone lost its monitor), or take the
  // place of a file, which QEMU would remove (trial Z).
  const std::string notes = vm.dir() + "/notes.txt";
  std::ofstream(notes) << "keep me\n";
  struct Taken {
    std::vector<std::string> extra;
    std::string message;
  };
  const Taken taken[] = {
      {{"-chardev", "socket,id=ch9,path=" + sock0 + ",server=on,wait=off"},
       "vmsave: error: the QEMU command's socket (-chardev id=ch9) is in use (" + sock0 +
           "): process " + std::to_string(clones[0].pid) + " listens on it; give each VM its " +
           "own path for -chardev id=ch9"},
      {{"-monitor", "unix:" + notes + ",server,nowait"},
       "vmsave: error: the QEMU command's socket (-monitor) names a file that is not a socket (" +
           notes + "): QEMU would remove it to listen there; give the socket a path where no " +
           "file is"},
  };
  for (const auto& t : taken) {
    auto clone2 = plus(rewrite(cmd, sock0, vm.dir() + "/clone2.sock"), t.extra);
    RunResult r =
        run_vmsave(restore_args(image, vm.dir() + "/clone2-qemu.log", true, clone2), kRunTimeout);
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(contains(r.err, t.message), r.err);
    CHECK_FALSE(exists(vm.dir() + "/clone2-qemu.log"));
  }
  CHECK(slurp(notes) == "keep me\n");
  auto caps = qmp_execute(sock0, "query-migrate-capabilities");
  REQUIRE_MESSAGE(caps.ok(), caps.error().message());
  for (auto& c : *caps) CHECK_MESSAGE(!c.value("state", false), c.dump());
  CHECK(qmp_status(sock0) == "running");

  // Saving a clone (QEMU saves its RAM: the image is mapped share=off).
  {
    // Not compressed, which QEMU cannot do: the refusal names the lazy
    // restore as the cause (it told the user to use share=on, as it had).
    RunResult z = run_vmsave(
        {"save", "--qmp", sock0, vm.dir() + "/clone0.vmsave", "--compress", "lz4"}, kRunTimeout);
    CHECK_RUN(z, 2);
    CHECK_MESSAGE(contains(z.err,
                           "backend ram0 is a vmsave image mapped with share=off (a lazy "
                           "restore)"),
                  z.err);
    CHECK_MESSAGE(contains(z.err, "restore the VM eagerly (not --lazy)"), z.err);
    CHECK(qmp_status(sock0) == "running");
    // The summary says what a lazy restore of the new image would meet.
    RunResult r = run_vmsave({"save", "--qmp", sock0, vm.dir() + "/clone0.vmsave"}, kRunTimeout);
    REQUIRE_RUN(r, 0);
    CHECK_MESSAGE(
        contains(r.err, "(RAM saved by QEMU mapped-ram: the image restores eagerly only)"), r.err);
    // The image is not a RAM file QEMU left behind: removing it, as the
    // summary says of those, would take clone 1's memory away.
    CHECK_MESSAGE(!contains(r.err, "left its RAM file"), r.err);
    CHECK_FALSE(contains(r.err, image));
    CHECK(exists(image));
    // Nor the empty log its restore made beside its socket (trials V, W).
    CHECK_FALSE(exists(sock0 + ".qemu.log"));
    // The command it records is the one its user gave, with the VM's own
    // backend, not the mapping of the image the restore made of it: after
    // a save --force over that image, nothing showed the backend (trial V).
    RunResult i = run_vmsave({"info", "--json", vm.dir() + "/clone0.vmsave"});
    REQUIRE_RUN(i, 0);
    auto own = parse_json(i)["metadata"]["qemu_cmdline"].get<std::vector<std::string>>();
    CHECK_MESSAGE(contains(joined(own), "mem-path=" + vm.ram_path()), joined(own));
    CHECK_MESSAGE(!contains(joined(own), image), joined(own));
    // A command mapping that image read-only, as the clone's does: refused
    // before QEMU starts, with the image there (it would show through) and
    // moved away (QEMU failed: "can't open backing store ... for guest RAM").
    std::vector<std::string> mapping = own;
    {
      std::ifstream in(fmt::format("/proc/{}/cmdline", clones[1].pid), std::ios::binary);
      std::vector<std::string> clone1;
      for (std::string a; std::getline(in, a, '\0');) clone1.push_back(a);
      std::string lazy_object;
      for (auto& a : clone1)
        if (contains(a, "\"id\":\"ram0\"") || contains(a, "id=ram0")) lazy_object = a;
      REQUIRE_MESSAGE(contains(lazy_object, image), lazy_object);
      for (auto& a : mapping)
        if (contains(a, "id=ram0")) a = lazy_object;
      REQUIRE(mapping != own);
    }
    const std::string moved = image + ".moved";
    for (bool there : {true, false}) {
      CAPTURE(there);
      if (!there) REQUIRE(::rename(image.c_str(), moved.c_str()) == 0);
      const std::string log = vm.dir() + "/own-qemu.log";
      r = run_vmsave(restore_args(vm.dir() + "/clone0.vmsave", log, false, mapping), kRunTimeout);
      CHECK_RUN(r, 1);
      CHECK_MESSAGE(contains(r.err, there ? "over a private mapping (" + image + ")"
                                          : "backend ram0 maps a file that does not exist (" +
                                                image + "): read-only"),
                    r.err);
      CHECK_FALSE(exists(log));
    }
    REQUIRE(::rename(moved.c_str(), image.c_str()) == 0);
    // With the command it records, the clone's image restores and the
    // clone carries on (into the VM's RAM file, which the first save left).
    const MemcheckLine at = *read_story(slurp(clone_logs[0])).last;
    std::vector<std::string> args =
        restore_args(vm.dir() + "/clone0.vmsave", vm.dir() + "/own-qemu.log", false, own);
    args.insert(args.begin() + 1, "--force");
    r = run_vmsave(args, kRunTimeout);
    REQUIRE_RUN(r, 0);
    StartedQemu again{parse_json(r).value("pid", -1)};
    std::string err;
    CHECK_MESSAGE(wait_story([&] { return slurp(clone_logs[0]); }, at.iteration + kMoreIterations,
                             kCarryOnTimeout, again.pid, nullptr, &err),
                  err);

    // No file at that path since clone 1 started (moved away): its save
    // keeps the mapping too, and says so (trial Z: it was silent).
    REQUIRE(::rename(image.c_str(), moved.c_str()) == 0);
    r = run_vmsave({"save", "--qmp", vm.dir() + "/clone1.sock", vm.dir() + "/clone1-moved.vmsave",
                    "--leave-running"},
                   kRunTimeout);
    REQUIRE(::rename(moved.c_str(), image.c_str()) == 0);
    REQUIRE_RUN(r, 0);
    CHECK_MESSAGE(contains(r.err, "warning: backend ram0 maps " + image +
                                      " privately (a lazy restore), and no file is at that path "
                                      "now (moved or removed since)"),
                  r.err);

    // Another image at that path since clone 1 started (a copy renamed
    // over it): its backends could be another VM's, so clone 1's save
    // keeps the mapping it runs on, and says so.
    const std::string copy = image + ".copy";
    std::filesystem::copy_file(image, copy);
    REQUIRE(::rename(copy.c_str(), image.c_str()) == 0);
    const std::string saved1 = vm.dir() + "/clone1.vmsave";
    r = run_vmsave({"save", "--qmp", vm.dir() + "/clone1.sock", saved1}, kRunTimeout);
    REQUIRE_RUN(r, 0);
    CHECK_MESSAGE(contains(r.err, "warning: backend ram0 maps " + image +
                                      " privately (a lazy restore), and the image there now is "
                                      "not the file QEMU maps"),
                  r.err);
    RunResult info1 = run_vmsave({"info", "--json", saved1});
    REQUIRE_RUN(info1, 0);
    CHECK_MESSAGE(
        contains(
            joined(parse_json(info1)["metadata"]["qemu_cmdline"].get<std::vector<std::string>>()),
            image),
        info1.out);
  }

  // The log beside a command's socket may sit in a directory others can
  // write: a link planted there is not followed (nor truncated through).
  const std::string victim = vm.dir() + "/victim", sock3 = vm.dir() + "/clone3.sock";
  std::ofstream(victim) << "not QEMU's log\n";
  REQUIRE(::symlink(victim.c_str(), (sock3 + ".qemu.log").c_str()) == 0);
  auto cmd3 = rewrite(rewrite(vm.command(), vm.qmp_path(), sock3), vm.serial_path(),
                      vm.dir() + "/clone3.log");
  auto args = restore_args(image, "", true, cmd3);
  args.erase(args.begin() + 3, args.begin() + 5);  // no --qemu-log
  RunResult r = run_vmsave(args, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: cannot write QEMU's log (" + sock3 +
                                    ".qemu.log): it is not a regular file (a link, a FIFO?); "
                                    "remove it, or choose the log with --qemu-log"),
                r.err);
  CHECK(slurp(victim) == "not QEMU's log\n");
  CHECK_FALSE(exists(sock3));
  // Nor a link named with --qemu-log: it emptied the file it pointed to.
  const std::string named = vm.dir() + "/named-qemu.log";
  REQUIRE(::symlink(victim.c_str(), named.c_str()) == 0);
  r = run_vmsave(restore_args(image, named, true, cmd3), kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: cannot write QEMU's log (" + named +
                                    "): it is a symbolic link to a regular file; give "
                                    "--qemu-log the file's own path"),
                r.err);
  CHECK(slurp(victim) == "not QEMU's log\n");
  CHECK_FALSE(exists(sock3));
  // Nor another user's file there: it got QEMU's output, and its text was
  // quoted in vmsave's errors (trial S).
  if (geteuid() == 0) {
    const std::string planted = sock3 + ".qemu.log";
    REQUIRE(::unlink(planted.c_str()) == 0);
    std::ofstream(planted) << "theirs\n";
    REQUIRE(::chown(planted.c_str(), 65534, 65534) == 0);
    r = run_vmsave(args, kRunTimeout);
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(contains(r.err, "vmsave: error: cannot write QEMU's log (" + planted +
                                      "): it exists and belongs to uid 65534; remove it, or "
                                      "choose the log with --qemu-log"),
                  r.err);
    CHECK(slurp(planted) == "theirs\n");
    CHECK_FALSE(exists(sock3));
  }

  // A relative -qmp path: the report names the socket and log absolute, for
  // a wrapper in another directory (trial Z: "rl/qmp.sock").
  auto cmd4 = rewrite(rewrite(vm.command(), vm.qmp_path(), "clone4.sock"), vm.serial_path(),
                      vm.dir() + "/clone4.log");
  auto args4 = restore_args(image, "", true, cmd4);
  args4.erase(args4.begin() + 3, args4.begin() + 5);  // no --qemu-log
  args4.insert(args4.begin(),
               {"/bin/sh", "-c", "cd \"$0\" && exec \"$@\"", vm.dir(), VMSAVE_BINARY});
  r = test::run_program(args4, kRunTimeout);
  REQUIRE_RUN(r, 0);
  StartedQemu clone4{parse_json(r).value("pid", -1)};
  CHECK(parse_json(r).value("qmp", "") == vm.dir() + "/clone4.sock");
  CHECK(parse_json(r).value("qemu_log", "") == vm.dir() + "/clone4.sock.qemu.log");
}

TEST_CASE(
    "e2e: a clone given a running VM's serial log is refused, and one given its own MAC is told "
    "the guest keeps the saved one") {
  test::require_guest_kit();
  VmOptions opts = kSmallVm;
  opts.extra_args = {"-netdev", "user,id=n0", "-device",
                     "virtio-net-pci,id=net0,netdev=n0,mac=52:54:00:12:34:56"};
  TestVm vm(opts);
  const MemcheckLine saved = boot(vm);
  const std::string image = vm.dir() + "/vm.vmsave";
  RunResult r = run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--leave-running"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  const std::string sock = vm.dir() + "/clone.sock", log = vm.dir() + "/clone.log";
  const std::string qemu_log = vm.dir() + "/clone-qemu.log";

  // Its own socket, but the running VM's serial log: QEMU would have mixed
  // both guests' lines in it (trial Z).
  const std::string before = vm.serial_log();
  r = run_vmsave(restore_args(image, qemu_log, true, rewrite(vm.command(), vm.qmp_path(), sock)),
                 kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err,
                         "vmsave: error: the QEMU command's file for -chardev id=serial0 is "
                         "open in another process (" +
                             vm.serial_path() + "): process " + std::to_string(vm.pid()) +
                             " (qemu-system-x86) writes it; give each VM its own file "
                             "for -chardev id=serial0"),
                r.err);
  CHECK_FALSE(exists(qemu_log));
  CHECK_FALSE(exists(sock));
  // Nor QEMU's log there: a restore empties it first.
  r = run_vmsave(
      restore_args(image, vm.serial_path(), true,
                   rewrite(rewrite(vm.command(), vm.qmp_path(), sock), vm.serial_path(), log)),
      kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: QEMU's log is open in another process (" +
                                    vm.serial_path() + "): process " + std::to_string(vm.pid()) +
                                    " (qemu-system-x86) writes it; give each restore its own "
                                    "--qemu-log"),
                r.err);
  CHECK_FALSE(exists(sock));
  CHECK(vm.serial_log().starts_with(before));
  std::string err;
  CHECK_MESSAGE(carries_on(vm, 2, &err), err);

  // Nor QEMU's log on its own serial log, nor one socket twice (trial Z2:
  // the history in the log was emptied; the second listener took the path).
  const std::string history = vm.dir() + "/history.log";
  std::ofstream(history) << "history\n";
  auto own = rewrite(rewrite(vm.command(), vm.qmp_path(), sock), vm.serial_path(), history);
  r = run_vmsave(restore_args(image, history, true, own), kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err,
                         "vmsave: error: QEMU's log is the QEMU command's file for "
                         "-chardev id=serial0 (" +
                             history +
                             "): a restore empties its log before QEMU starts; give "
                             "--qemu-log a file of its own"),
                r.err);
  CHECK(slurp(history) == "history\n");
  r = run_vmsave(restore_args(image, qemu_log, true,
                              plus(own, {"-monitor", "unix:" + sock + ",server=on,wait=off"})),
                 kRunTimeout);
  CHECK_RUN(r, 2);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: the QEMU command names one socket twice (" + sock +
                                    "): -qmp and -monitor both listen there; give each its own "
                                    "path"),
                r.err);
  CHECK_FALSE(exists(sock));
  // A console on a FIFO nothing reads: QEMU hangs starting up, and is not
  // said to have another QMP client (trial Z2).
  const std::string fifo = vm.dir() + "/fifo";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  auto hangs =
      restore_args(image, qemu_log, true,
                   rewrite(rewrite(vm.command(), vm.qmp_path(), sock), vm.serial_path(), fifo));
  hangs.insert(hangs.begin() + 1, {"--qmp-timeout", "2"});
  r = run_vmsave(hangs, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err,
                         "vmsave: error: the QEMU this restore started did not answer on "
                         "its QMP socket in time (" +
                             sock +
                             "): it hangs starting up: does its command open a FIFO "
                             "nothing reads, or connect to a socket nothing answers?"),
                r.err);
  CHECK(test::qemu_pids_mentioning(sock).empty());
  CHECK_FALSE(exists(sock));

  // Its own MAC: the guest keeps the saved one (the device state's), and
  // the restore says so rather than let the user believe it changed.
  auto clone = rewrite(rewrite(rewrite(vm.command(), vm.qmp_path(), sock), vm.serial_path(), log),
                       "mac=52:54:00:12:34:56", "mac=52:54:00:00:00:02");
  r = run_vmsave(restore_args(image, qemu_log, true, clone), kRunTimeout);
  REQUIRE_RUN(r, 0);
  StartedQemu started{parse_json(r).value("pid", -1)};
  const std::string warning =
      "network card net0: the guest keeps its saved MAC address 52:54:00:12:34:56; the "
      "command's 52:54:00:00:00:02 changes only the address QEMU announces: set it inside the "
      "guest";
  CHECK_MESSAGE(contains(r.err, "warning: " + warning), r.err);
  CHECK(parse_json(r)["warnings"] == json::array({warning}));
  CHECK_MESSAGE(wait_story([&] { return slurp(log); }, saved.iteration + kMoreIterations,
                           kCarryOnTimeout, started.pid, nullptr, &err),
                err);
}

TEST_CASE("e2e: two saves of one VM at once: one image, and the other told QEMU quit meanwhile") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  boot(vm);
  // QMP serves one client at a time: the second waits for the first, whose
  // save tells QEMU to quit. It said only "has QEMU exited?".
  std::vector<std::unique_ptr<Child>> saves;
  for (int i = 0; i < 2; i++)
    saves.push_back(std::make_unique<Child>(
        std::vector<std::string>{VMSAVE_BINARY, "save", "--qmp", vm.qmp_path(),
                                 vm.dir() + fmt::format("/both{}.vmsave", i), "--qmp-timeout",
                                 "60"},
        vm.dir() + fmt::format("/both{}.out", i)));
  int won = -1;
  for (int i = 0; i < 2; i++) {
    int status = saves[i]->wait(kRunTimeout);
    std::string out = slurp(vm.dir() + fmt::format("/both{}.out", i));
    CAPTURE(out);
    if (status == 0) {
      CHECK(won < 0);
      won = i;
      continue;
    }
    CHECK(status == 1);
    CHECK(contains(out, "vmsave: error: QEMU exited before it greeted vmsave (" + vm.qmp_path() +
                            "): process "));
    CHECK(contains(out, "may have told it to quit"));
    CHECK_FALSE(exists(vm.dir() + fmt::format("/both{}.vmsave", i)));
  }
  REQUIRE(won >= 0);
  CHECK_RUN(run_vmsave({"verify", vm.dir() + fmt::format("/both{}.vmsave", won)}), 0);
}

TEST_CASE("e2e: two restores --force into one RAM file at once: one runs, the other is refused") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  const auto [image, log_at_save, saved] = boot_and_save(vm);
  // Both passed the check that no VM maps the file, filled it together, and
  // two QEMUs ran on it: both guests crashed, both restores said success.
  std::vector<std::unique_ptr<Child>> twins;
  std::vector<std::string> logs, serials;
  for (int i = 0; i < 2; i++) {
    serials.push_back(vm.dir() + fmt::format("/twin{}-serial.log", i));
    logs.push_back(vm.dir() + fmt::format("/twin{}.out", i));
    auto cmd =
        rewrite(rewrite(vm.command(), vm.qmp_path(), vm.dir() + fmt::format("/twin{}.sock", i)),
                vm.serial_path(), serials[i]);
    auto args = restore_args(image, vm.dir() + fmt::format("/twin{}-qemu.log", i), false, cmd);
    args.insert(args.begin(), VMSAVE_BINARY);
    args.insert(args.begin() + 2, "--force");
    twins.push_back(std::make_unique<Child>(args, logs[i]));
  }
  int won = -1, lost = 0;
  for (int i = 0; i < 2; i++) {
    int status = twins[i]->wait(kRunTimeout);
    std::string out = slurp(logs[i]);
    CAPTURE(out);
    if (status == 0) {
      CHECK(won < 0);
      won = i;
      continue;
    }
    lost++;
    CHECK(status == 1);
    // Refused while the other fills the file, or once its QEMU maps it.
    CHECK(contains(out, "vmsave: error: RAM file is in use (" + vm.ram_path() + ")"));
  }
  REQUIRE(won >= 0);
  CHECK(lost == 1);
  StartedQemu winner{json::parse(slurp(logs[won]), nullptr, false).value("pid", -1)};
  REQUIRE(winner.pid > 0);
  std::string err;
  CHECK_MESSAGE(
      wait_story([&] { return log_at_save + slurp(serials[won]); },
                 saved.iteration + kMoreIterations, kCarryOnTimeout, winner.pid, nullptr, &err),
      err);
  CHECK(test::kill_qemu_mentioning(vm.dir() + "/twin" + std::to_string(1 - won)) == 0);
}

TEST_CASE(
    "e2e: restore refuses a command whose memory size or backend id differs, "
    "before starting QEMU") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  const std::string image = saved_without_ram(vm);

  const std::vector<std::string> cmd = vm.command();
  auto without_ram0 = [](std::vector<std::string> argv) {
    for (size_t a = 0; a + 1 < argv.size(); a++)
      if (argv[a] == "-object" && contains(argv[a + 1], "id=ram0,")) {
        argv.erase(argv.begin() + a, argv.begin() + a + 2);
        break;
      }
    return argv;
  };
  struct Misfit {
    const char* what;
    std::vector<std::string> argv;
    const char* detail;
  };
  const Misfit misfits[] = {
      {"bigger backend", rewrite(cmd, "id=ram0,size=256M", "id=ram0,size=512M"),
       "memory backend ram0 has size 512M, the image's block has 256M"},
      {"other backend id",
       rewrite(rewrite(cmd, "id=ram0,", "id=mem0,"), "memory-backend=ram0", "memory-backend=mem0"),
       "memory backend mem0 is not in the image"},
      // Under TCG the guest ran on with another CPU model, looping in a
      // fault handler; another CPU count failed in the device state.
      {"other -cpu", plus(cmd, {"-cpu", "max"}), "-cpu max differs from the saved "},
      {"more CPUs", plus(cmd, {"-smp", "cpus=2"}), "-smp gives 2 CPUs, the VM was saved with 1"},
      {"other machine", rewrite(cmd, "q35,", "pc,"), "machine type pc differs from the saved q35"},
      // The backend left unused: QEMU made RAM of its own and failed in
      // the device state.
      {"backend unused", rewrite(cmd, ",memory-backend=ram0", ""),
       "no device, NUMA node or -machine memory-backend uses memory backend ram0; the VM was "
       "saved with a device using it"},
      // Memory hot-plug slots: QEMU failed in the device state.
      {"hot-plug slots", plus(cmd, {"-m", "256M,slots=1,maxmem=1G"}),
       "-m has slots=1, the VM was saved without"},
      // The backend in a -readconfig file, which vmsave does not read.
      {"-readconfig", plus(without_ram0(cmd), {"-readconfig", "/dev/null"}),
       "not from -readconfig files: give that -object on the command line"},
  };
  for (const Misfit& m : misfits) {
    REQUIRE_MESSAGE(m.argv != cmd, "the rewrite did not apply to " << joined(cmd));
    for (bool lazy : {false, true}) {
      CAPTURE(m.what);
      CAPTURE(lazy);
      std::string qemu_log = vm.dir() + "/misfit-qemu.log";
      RunResult r = run_vmsave(restore_args(image, qemu_log, lazy, m.argv), kRunTimeout);
      CHECK_RUN(r, 1);
      CHECK_MESSAGE(contains(r.err, "the QEMU command does not fit the image"), r.err);
      CHECK_MESSAGE(contains(r.err, m.detail), r.err);
      // QEMU never started: it would have created its log and its RAM file.
      CHECK_FALSE(exists(qemu_log));
      CHECK_FALSE(exists(vm.ram_path()));
      CHECK(test::kill_qemu_mentioning(vm.dir()) == 0);
    }
  }
  // Room for another number of CPUs, which -smp spells many ways: QEMU
  // failed in the device state ("Missing section footer for
  // 0000:00:1f.0/ICH9LPC"). Refused once QEMU has counted, before it loads.
  for (bool lazy : {false, true}) {
    CAPTURE(lazy);
    std::string qemu_log = vm.dir() + "/misfit-qemu.log";
    RunResult r = run_vmsave(
        restore_args(image, qemu_log, lazy, plus(cmd, {"-smp", "1,maxcpus=2"})), kRunTimeout);
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(contains(r.err,
                           "vmsave: error: the QEMU command does not fit the image: -smp "
                           "makes room for 2 CPUs (maxcpus), the VM was saved with 1; give "
                           "-smp the maxcpus and topology the VM was saved with"),
                  r.err);
    CHECK_FALSE(exists(vm.ram_path()));
    CHECK(test::qemu_pids_mentioning(vm.dir()).empty());
    ::unlink(qemu_log.c_str());
  }
  // A backend a virtio-mem device uses cannot be mapped read-only: QEMU
  // discards its unplugged memory as the device state loads, and failed
  // then. Refused before QEMU starts, in both syntaxes.
  for (const char* dev : {"virtio-mem-pci,id=vmem0,memdev=ram0,requested-size=0",
                          R"({"driver":"virtio-mem-pci","id":"vmem0","memdev":"ram0"})"}) {
    CAPTURE(dev);
    std::string qemu_log = vm.dir() + "/misfit-qemu.log";
    RunResult r =
        run_vmsave(restore_args(image, qemu_log, true, plus(cmd, {"-device", dev})), kRunTimeout);
    CHECK_RUN(r, 2);
    CHECK_MESSAGE(contains(r.err, "vmsave: error: cannot restore lazily: memory backend ram0 "
                                  "belongs to a virtio-mem device"),
                  r.err);
    CHECK_FALSE(exists(qemu_log));
  }
  // A -qmp socket in a directory that does not exist: said as that, before
  // any RAM file is made (it was "cannot write QEMU's log (DIR/qmp.sock.qemu.log)").
  {
    const std::string gone = vm.dir() + "/no-such-dir";
    auto args = restore_args(image, "", false, rewrite(cmd, vm.qmp_path(), gone + "/qmp.sock"));
    args.erase(args.begin() + 3, args.begin() + 5);  // no --qemu-log: beside the socket
    RunResult r = run_vmsave(args, kRunTimeout);
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(
        contains(r.err, "vmsave: error: no directory for the QEMU command's QMP socket (" + gone +
                            "): it does not exist; create it"),
        r.err);
    CHECK_FALSE(exists(vm.ram_path()));
  }
  // A --qemu-log vmsave cannot write is said before --force truncates an
  // existing RAM file.
  test::write_pattern_file(vm.ram_path(), 4096, "text", 3);
  const std::string before = slurp(vm.ram_path());
  std::vector<std::string> args = restore_args(image, "/nonexistent/dir/q.log", false, cmd);
  args.insert(args.begin() + 1, "--force");
  RunResult r = run_vmsave(args, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: cannot write --qemu-log (/nonexistent/dir/q.log)"),
                r.err);
  CHECK(slurp(vm.ram_path()) == before);
  REQUIRE(::unlink(vm.ram_path().c_str()) == 0);
  // The image itself was fine all along, q35 is the versioned machine it
  // stands for (a new user's "pc-i440fx-10.0" for "pc" was refused), and
  // slots=0 and maxmem equal to the size are QEMU's defaults spelled out.
  const std::string q35 = resolve_machine(cmd[0], "q35");
  REQUIRE(q35.starts_with("pc-q35-"));
  r = run_vmsave(
      restore_args(image, vm.dir() + "/restore.log", true,
                   plus(rewrite(cmd, "q35,", q35 + ","), {"-m", "256M,slots=0,maxmem=256M"})),
      kRunTimeout);
  REQUIRE_RUN(r, 0);
  StartedQemu qemu{parse_json(r).value("pid", -1)};
  CHECK(qemu.pid > 0);
}

TEST_CASE("e2e: a guest with anonymous RAM (-m only) is saved through QEMU and carries on") {
  test::require_guest_kit();
  VmOptions opts = kSmallVm;
  opts.shared_file_ram = false;
  TestVm vm(opts);
  boot(vm);
  const std::string image = vm.dir() + "/vm.vmsave";
  // QEMU's mapped-ram cannot compress: refused while the guest still runs.
  RunResult z = run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--compress", "lz4"}, kRunTimeout);
  CHECK_RUN(z, 2);
  CHECK_MESSAGE(contains(z.err, "cannot compress this VM's RAM"), z.err);
  CHECK_MESSAGE(contains(z.err, "without --compress"), z.err);
  CHECK_FALSE(exists(image));
  // QEMU's max-bandwidth held a paused guest's save to it (128 MiB/s by
  // default): at 1 MiB/s this one would take over a minute. Lifted while
  // the save runs, and put back after.
  {
    auto q = QmpClient::connect(vm.qmp_path(), 10);
    REQUIRE(q.ok());
    REQUIRE(q->execute("migrate-set-parameters", {{"max-bandwidth", kMiB}}).ok());
  }
  RunResult limited =
      run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--leave-running", "--json"}, kRunTimeout);
  REQUIRE_RUN(limited, 0);
  CHECK(parse_json(limited).value("total_s", 99.0) < 30);
  {
    auto q = QmpClient::connect(vm.qmp_path(), 10);
    REQUIRE(q.ok());
    auto p = q->execute("query-migrate-parameters");
    REQUIRE(p.ok());
    CHECK(p->value("max-bandwidth", i64(0)) == kMiB);
  }
  REQUIRE(::unlink(image.c_str()) == 0);
  json report;
  const std::string log_at_save = save_and_quit(vm, image, {}, &report);
  CHECK(report.value("qemu_ram_bytes", i64(0)) == opts.ram_mib * kMiB);
  const MemcheckLine saved = *read_story(log_at_save).last;
  json info = check_saved_by_qemu(image, {"pc.ram"});
  // The RAM stored is what the save said it stored (info said 0), and the
  // section holds that and the device state.
  CHECK(info.value("stored_bytes", i64(-1)) == report.value("stored_bytes", i64(-2)));
  CHECK(info["qemu_migration_section"].value("ram_stored_bytes", i64(-1)) ==
        report.value("stored_bytes", i64(-2)));
  CHECK(info["qemu_migration_section"].value("stored_bytes", i64(0)) >
        report.value("stored_bytes", i64(0)));

  RunResult v = run_vmsave({"verify", image}, kRunTimeout);
  CHECK_RUN(v, 0);
  // It was "intact (0 chunks, ...)".
  CHECK_MESSAGE(contains(v.err, image + ": intact (QEMU's section, "), v.err);
  // Every finished phase got to 100% (holes in QEMU's section count too).
  CHECK_MESSAGE(contains(v.err, "%)"), v.err);
  for (size_t at = v.err.find("%)"); at != std::string::npos; at = v.err.find("%)", at + 1))
    CHECK_MESSAGE(v.err.compare(at - 4, 6, "(100%)") == 0, v.err);

  // --lazy cannot map RAM that only QEMU's stream holds: refused before any
  // QEMU starts, saying to restore eagerly.
  RunResult lazy =
      run_vmsave(restore_args(image, vm.dir() + "/lazy.log", true, vm.command()), kRunTimeout);
  CHECK_RUN(lazy, 2);
  CHECK_MESSAGE(contains(lazy.err, "mapped-ram"), lazy.err);
  CHECK_MESSAGE(contains(lazy.err, "eagerly"), lazy.err);
  CHECK_FALSE(exists(vm.dir() + "/lazy.log"));
  CHECK(test::kill_qemu_mentioning(vm.dir()) == 0);
  // Nor can vmsave write it into RAM files by itself.
  const std::string ram_dir = vm.dir() + "/ramdir";
  REQUIRE(::mkdir(ram_dir.c_str(), 0755) == 0);
  RunResult raw = run_vmsave({"restore", image, "--ram-dir", ram_dir}, kRunTimeout);
  CHECK_RUN(raw, 2);
  CHECK_MESSAGE(contains(raw.err, "only QEMU can load"), raw.err);
  CHECK_MESSAGE(list_dir(ram_dir).empty(), joined(list_dir(ram_dir)));

  RunResult r =
      run_vmsave(restore_args(image, vm.dir() + "/restore.log", false, vm.command()), kRunTimeout);
  REQUIRE_RUN(r, 0);
  json j = parse_json(r);
  StartedQemu qemu{j.value("pid", -1)};
  REQUIRE(qemu.pid > 0);
  CHECK(j.value("qemu_ram_bytes", i64(0)) == opts.ram_mib * kMiB);  // not "0 B of RAM"
  check_carries_on(vm, saved, qemu.pid);
  kill_and_wait(qemu.pid);
  qemu.pid = -1;

  // Damage in QEMU's section is found by verify.
  const json& sec = info["qemu_migration_section"];
  flip_byte(image, sec["offset"].get<i64>() + sec["length"].get<i64>() / 2);
  v = run_vmsave({"verify", image}, kRunTimeout);
  CHECK_RUN(v, 3);
  CHECK_MESSAGE(contains(v.err, "QEMU migration section"), v.err);
}

TEST_CASE("e2e: a memfd guest is saved through QEMU and restored in two steps") {
  test::require_guest_kit();
  VmOptions opts = kSmallVm;
  opts.node_backends = {"memfd"};
  TestVm vm(opts);
  const auto [image, log_at_save, saved] = boot_and_save(vm);
  check_saved_by_qemu(image, {"ram0"});

  // prepare adds no backend (QEMU loads ram0 from the image itself).
  RunResult r = run_vmsave({"prepare", image, "--ram-dir", vm.dir(), "--json"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  CHECK(parse_json(r)["steps_s"].is_object());  // as every report but info's
  // Nothing for vmsave to fill: no files, no reading phase, no I/O report.
  CHECK(parse_json(r)["ram_files"].empty());
  CHECK_FALSE(parse_json(r).contains("io_latency_us"));
  CHECK_MESSAGE(!contains(r.err, "reading RAM"), r.err);
  std::vector<std::string> extra = parse_json(r)["qemu_args"].get<std::vector<std::string>>();
  CHECK_MESSAGE((extra == std::vector<std::string>{"-incoming", "defer"}), joined(extra));
  RunResult lazy = run_vmsave({"prepare", image, "--lazy"}, kRunTimeout);
  CHECK_RUN(lazy, 2);
  CHECK_MESSAGE(contains(lazy.err, "eagerly"), lazy.err);

  // Restored into a shared file, which QEMU fills: on a tmpfs too small,
  // refused before QEMU starts (QEMU died of SIGBUS part-way, leaving a
  // partial file); a QEMU that fails does not leave the file it made.
  {
    TempMount small("tmpfs", "size=16m");
    REQUIRE_MESSAGE(small.ok(), small.error());
    auto into = [&](const std::string& dir) {
      return rewrite(vm.command(), "memory-backend-memfd,id=ram0,size=256M",
                     "memory-backend-file,id=ram0,size=256M,share=on,mem-path=" + dir + "/ram0");
    };
    REQUIRE(into(small.path()) != vm.command());
    const std::string qemu_log = vm.dir() + "/into-file-qemu.log";
    RunResult s = run_vmsave(restore_args(image, qemu_log, false, into(small.path())), kRunTimeout);
    CHECK_RUN(s, 1);
    CHECK_MESSAGE(contains(s.err, "vmsave: error: not enough space for RAM file (" + small.path() +
                                      "/ram0): QEMU loads up to"),
                  s.err);
    CHECK_FALSE(exists(qemu_log));
    CHECK(list_dir(small.path()).empty());
    s = run_vmsave(
        restore_args(image, qemu_log, false, plus(into(vm.dir()), {"-device", "no-such-device"})),
        kRunTimeout);
    CHECK_RUN(s, 1);
    CHECK_MESSAGE(contains(s.err, "vmsave: error: QEMU exited before it was ready (" + qemu_log +
                                      "): qemu-system-x86_64: -device no-such-device:"),
                  s.err);
    CHECK_FALSE(exists(vm.dir() + "/ram0"));

    // Never into the image itself (by its name or a hard link), nor into
    // another image: with --force vmsave emptied it for QEMU, and QEMU,
    // failing on the zeros, left none (trial V).
    const std::string link = vm.dir() + "/link.vmsave", other = vm.dir() + "/other.vmsave";
    REQUIRE(::link(image.c_str(), link.c_str()) == 0);
    std::filesystem::copy_file(image, other);
    const std::vector<std::pair<std::string, std::string>> cases = {
        {image, "the RAM file is the image itself"},
        {link, "the RAM file is the image itself"},
        {other, "the RAM file is a vmsave image"}};
    for (const auto& [path, why] : cases) {
      CAPTURE(path);
      std::vector<std::string> cmd =
          rewrite(vm.command(), "memory-backend-memfd,id=ram0,size=256M",
                  "memory-backend-file,id=ram0,size=256M,share=on,mem-path=" + path);
      for (bool force : {false, true}) {
        const std::string refused_log = vm.dir() + "/refused-qemu.log";
        std::vector<std::string> args = restore_args(image, refused_log, false, cmd);
        if (force) args.insert(args.begin() + 1, "--force");
        s = run_vmsave(args, kRunTimeout);
        CHECK_RUN(s, 1);
        CHECK_MESSAGE(
            contains(s.err, "vmsave: error: " + why + " (" + path + "): block ram0 would be"),
            s.err);
        CHECK_FALSE(exists(refused_log));
      }
      CHECK_RUN(run_vmsave({"verify", path}, kRunTimeout), 0);
    }
    ::unlink(link.c_str());
    ::unlink(other.c_str());
  }

  // Without the backend QEMU loads ram0 into (plain -m instead), or with it
  // but unused: refused before QEMU starts, as for blocks vmsave wrote (QEMU
  // said "Unknown ramblock" once it had started).
  {
    const std::string qemu_log = vm.dir() + "/no-backend-qemu.log";
    std::vector<std::string> plain;
    const std::vector<std::string> cmd = vm.command();
    for (size_t i = 0; i < cmd.size(); i++) {
      if (cmd[i] == "-object" && i + 1 < cmd.size() && contains(cmd[i + 1], "id=ram0")) {
        i++;
        continue;
      }
      plain.push_back(rewrite({cmd[i]}, ",memory-backend=ram0", "")[0]);
    }
    REQUIRE(plain.size() == cmd.size() - 2);
    RunResult s = run_vmsave(restore_args(image, qemu_log, false, plain), kRunTimeout);
    CHECK_RUN(s, 1);
    CHECK_MESSAGE(contains(s.err,
                           "vmsave: error: the QEMU command does not fit the image: the "
                           "image has RAM block ram0 (256M) but the command has no memory "
                           "backend with id=ram0"),
                  s.err);
    CHECK_FALSE(exists(qemu_log));
    s = run_vmsave(restore_args(image, qemu_log, false,
                                plus(plain, {"-object", "memory-backend-memfd,id=ram0,size=256M"})),
                   kRunTimeout);
    CHECK_RUN(s, 1);
    CHECK_MESSAGE(contains(s.err,
                           "no device, NUMA node or -machine memory-backend uses memory "
                           "backend ram0; the VM was saved with a device using it"),
                  s.err);
    CHECK_FALSE(exists(qemu_log));
  }

  ::unlink(vm.qmp_path().c_str());
  Child qemu(with_prepared(vm.command(), extra), vm.dir() + "/two-step-qemu.log");
  await_qmp_socket(vm, qemu, vm.dir() + "/two-step-qemu.log");

  r = run_vmsave({"restore", image, "--qmp", vm.qmp_path(), "--json"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  CHECK(parse_json(r).value("running", false));
  CHECK(parse_json(r).value("qemu_ram_bytes", i64(0)) == opts.ram_mib * kMiB);
  check_carries_on(vm, saved, qemu.pid());
}

TEST_CASE("e2e: a guest mixing a shared-file block and an anonymous block carries on") {
  test::require_guest_kit();
  VmOptions opts = kSmallVm;
  opts.numa_nodes = 2;
  opts.node_backends = {"file", "ram"};
  TestVm vm(opts);
  const auto [image, log_at_save, saved] = boot_and_save(vm);
  check_saved_by_qemu(image, {"ram0", "ram1"});
  // QEMU would load ram0 into the file the save left (another VM's RAM, for
  // all vmsave knows): refused without --force, the file untouched.
  const std::string left = slurp(vm.ram_path(0));
  RunResult r =
      run_vmsave(restore_args(image, vm.dir() + "/restore.log", false, vm.command()), kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: RAM file exists (" + vm.ram_path(0) +
                                    "): QEMU would load block ram0 into it"),
                r.err);
  CHECK(slurp(vm.ram_path(0)) == left);
  CHECK(test::kill_qemu_mentioning(vm.dir()) == 0);

  // QEMU loads only the non-zero pages. Over a private mapping (share=off)
  // of an existing file the guest would see that file where it had zeros:
  // refused, --force or not, and the file left as it is.
  std::vector<std::string> priv = vm.command();
  for (auto& a : priv)
    if (contains(a, "id=ram0,") && contains(a, "share=on"))
      a.replace(a.find("share=on"), 8, "share=off");
  r = run_vmsave(restore_args(image, vm.dir() + "/restore.log", false, priv), kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: cannot load block ram0 over a private mapping (" +
                                    vm.ram_path(0) + ")"),
                r.err);
  auto forced = restore_args(image, vm.dir() + "/restore.log", false, priv);
  forced.insert(forced.begin() + 2, "--force");
  r = run_vmsave(forced, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "give backend ram0 a mem-path that does not exist"), r.err);
  CHECK(slurp(vm.ram_path(0)) == left);
  CHECK(test::kill_qemu_mentioning(vm.dir()) == 0);
  // A file of zeros (what QEMU leaves of a share=off backend it created:
  // its writes never reach the file) shows the guest only zeros: taken.
  REQUIRE(::truncate(vm.ram_path(0).c_str(), 0) == 0);
  REQUIRE(::truncate(vm.ram_path(0).c_str(), i64(left.size())) == 0);
  {
    r = run_vmsave(restore_args(image, vm.dir() + "/restore.log", false, priv), kRunTimeout);
    REQUIRE_RUN(r, 0);
    StartedQemu zeros{parse_json(r).value("pid", -1)};
    REQUIRE(zeros.pid > 0);
    check_carries_on(vm, saved, zeros.pid);
    // The user's own private file, never restored lazily: the refusal of
    // --compress blamed a lazy restore all the same.
    RunResult z = run_vmsave(
        {"save", "--qmp", vm.qmp_path(), vm.dir() + "/z.vmsave", "--compress", "lz4"}, kRunTimeout);
    CHECK_RUN(z, 2);
    CHECK_MESSAGE(contains(z.err, "backend ram0 is a file mapped with share=off, so QEMU's"),
                  z.err);
    CHECK_MESSAGE(contains(z.err, "start the VM with share=on on that backend"), z.err);
    CHECK_MESSAGE(!contains(z.err, "lazy"), z.err);
  }
  CHECK(test::kill_qemu_mentioning(vm.dir()) == 0);

  // With --force a shared file is overwritten: emptied first, so that the
  // guest's zero pages are zeros and not what the file held (every byte
  // 0xAA here, as another VM's RAM would be something).
  {
    std::ofstream stale(vm.ram_path(0), std::ios::binary | std::ios::trunc);
    stale << std::string(left.size(), '\xAA');
  }
  // The two-step form cannot empty it (QEMU maps it already): refused, the
  // QEMU left waiting (the guest had crashed on 0xAAAA... addresses).
  {
    ::unlink(vm.qmp_path().c_str());
    const std::string log = vm.dir() + "/two-step-qemu.log";
    Child waiting(with_prepared(vm.command(), {"-incoming", "defer"}), log);
    await_qmp_socket(vm, waiting, log);
    r = run_vmsave({"restore", image, "--qmp", vm.qmp_path()}, kRunTimeout);
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(contains(r.err, "vmsave: error: QEMU's RAM file holds data (" + vm.ram_path(0) +
                                      "): QEMU loads only block ram0's non-zero pages"),
                  r.err);
    CHECK(qmp_status(vm.qmp_path()) == "inmigrate");
  }
  CHECK(test::kill_qemu_mentioning(vm.dir()) == 0);
  forced = restore_args(image, vm.dir() + "/restore.log", false, vm.command());
  forced.insert(forced.begin() + 2, "--force");
  r = run_vmsave(forced, kRunTimeout);
  REQUIRE_RUN(r, 0);
  StartedQemu qemu{parse_json(r).value("pid", -1)};
  REQUIRE(qemu.pid > 0);
  check_carries_on(vm, saved, qemu.pid);
  CHECK_MESSAGE(maps_file(qemu.pid, vm.ram_path(0)), maps_of(qemu.pid));
  const std::string now = slurp(vm.ram_path(0));
  i64 stale_pages = 0;
  for (size_t p = 0; p + 4096 <= now.size(); p += 4096)
    stale_pages += now.find_first_not_of('\xAA', p) >= p + 4096;
  CHECK(stale_pages == 0);
}

TEST_CASE(
    "e2e: save --live of shared-file RAM while memcheck writes: the restored guest carries on, "
    "--live-timeout ends its passes, and --flush-timeout fails cleanly") {
  test::require_guest_kit();
  VmOptions opts = kSmallVm;
  opts.dirty_mib = kLiveDirtyMib;
  json j = live_save_then_restore(opts, /*try_flush_timeout=*/true, /*try_live_timeout=*/true);
  CHECK(j.value("ram_saved_by", "") == "vmsave");
}

TEST_CASE("e2e: save --live of anonymous RAM (QEMU live mapped-ram) while memcheck writes carries on, and --live-timeout stops the guest") {
  test::require_guest_kit();
  VmOptions opts = kSmallVm;
  opts.shared_file_ram = false;
  opts.dirty_mib = kLiveDirtyMib;
  json j = live_save_then_restore(opts, false, /*try_live_timeout=*/true);
  CHECK(j.value("ram_saved_by", "") == "qemu");
  CHECK_FALSE(j.value("live_timeout_reached", true));
  // Stored is what the image holds, not what QEMU sent: pages it rewrote
  // live counted again (a tester saw 841 MiB "stored" of 512, -64% zero).
  CHECK_MESSAGE(j.value("stored_bytes", i64(-1)) <= j.value("ram_bytes", i64(0)), j.dump());
  CHECK_MESSAGE(j.value("zero_ratio", -1.0) >= 0, j.dump());
  // And the zero share is of what it holds too (it counted pages sent, and
  // said 16% zero of a 384 MiB guest whose image held 197.5 MiB).
  const double held =
      double(j.value("stored_bytes", i64(0))) / double(j.value("ram_bytes", i64(1)));
  CHECK_MESSAGE(j.value("zero_ratio", -1.0) >= 1.0 - held - 0.01, j.dump());
}

TEST_CASE("e2e: SIGINT during a save resumes the guest and leaves no image or temporary file") {
  test::require_guest_kit();
  int interrupted = 0;
  {
    // 384 MiB of data makes the RAM write last ~0.4 s: several 100 ms
    // progress ticks, so the signal lands while it runs.
    TestVm vm({.ram_mib = 512, .memcheck_mib = 384});
    boot(vm, 1);
    const std::string out = vm.dir() + "/out";
    REQUIRE(::mkdir(out.c_str(), 0755) == 0);
    const std::string image = out + "/vm.vmsave";

    // Where the signal lands (a worker waiting for completions, the ticker,
    // a request being prepared) varies from run to run, so every save is
    // interrupted several times; each must end the same clean way.
    constexpr int kInterruptions = 3;
    for (int attempt = 0; attempt < 2 * kInterruptions && interrupted < kInterruptions; attempt++) {
      Interrupted in = interrupt_save(vm, image, SIGINT);
      if (!in.caught || in.status == 0) {
        // Finished before the signal landed: a complete save, not this case.
        CHECK_MESSAGE(in.status == 0, "status " << in.status << ": " << in.err);
        std::filesystem::remove(image);
        continue;
      }
      interrupted++;
      CAPTURE(interrupted);
      REQUIRE_MESSAGE(in.status == 130, "status " << in.status << ": " << in.err);
      CHECK_MESSAGE(contains(in.err, "vmsave: error: interrupted"), in.err);
      CHECK_MESSAGE(list_dir(out).empty(), joined(list_dir(out)));
      REQUIRE(qmp_status(vm.qmp_path()) == "running");
      // vmsave put back the migration capability it had set.
      CHECK_FALSE(x_ignore_shared(vm));
      std::string err;
      REQUIRE_MESSAGE(carries_on(vm, 2, &err), err);
    }
  }
  if (interrupted == 0) skip("could not interrupt a save while it wrote RAM in 6 tries");
}

TEST_CASE(
    "e2e: SIGINT while QEMU saves anonymous RAM cancels its migration and puts everything back, "
    "with no false warning") {
  test::require_guest_kit();
  int interrupted = 0;
  {
    TestVm vm({.ram_mib = 512, .memcheck_mib = 384, .shared_file_ram = false});
    boot(vm, 1);
    const std::string out = vm.dir() + "/out";
    REQUIRE(::mkdir(out.c_str(), 0755) == 0);
    const std::string image = out + "/vm.vmsave";
    for (int attempt = 0; attempt < 4 && interrupted < 2; attempt++) {
      Interrupted in = interrupt_save(vm, image, SIGINT, nullptr,
                                      "QEMU writing RAM and device state (guest paused)");
      if (!in.caught || in.status == 0) {
        CHECK_MESSAGE(in.status == 0, "status " << in.status << ": " << in.err);
        std::filesystem::remove(image);
        continue;
      }
      interrupted++;
      REQUIRE_MESSAGE(in.status == 130, "status " << in.status << ": " << in.err);
      // The clean-up took (QEMU answered throughout): it was said to have
      // failed, and the user told to kill the watchdog and run `cont`, while
      // QEMU still cancelled its migration and refused the capabilities.
      CHECK_MESSAGE(in.err.ends_with("\nvmsave: error: interrupted by SIGINT\n"), in.err);
      CHECK_MESSAGE(!contains(in.err, "warning"), in.err);
      CHECK_MESSAGE(list_dir(out).empty(), joined(list_dir(out)));
      // QEMU is let finish: cancelling its mapped-ram save killed it with
      // SIGSEGV in 3 of 34 runs ("failed to save SaveStateEntry with
      // id(name): 1(ram): -5", then exit 139).
      CHECK_MESSAGE(contains(in.err, "vmsave: interrupted: letting QEMU finish its save first"),
                    in.err);
      REQUIRE_MESSAGE(qmp_status(vm.qmp_path()) == "running",
                      in.err << "\nQEMU's log:\n"
                             << slurp(vm.qemu_log_path()) << "exit "
                             << wait_exit_unreaped(vm.pid(), 2).value_or(-1));
      for (const char* cap : {"mapped-ram", "multifd", "x-ignore-shared"}) {
        CAPTURE(cap);
        CHECK_FALSE(capability(vm, cap));
      }
      std::string err;
      REQUIRE_MESSAGE(carries_on(vm, 2, &err), err);
    }
  }
  if (interrupted == 0) skip("could not interrupt QEMU's save in 4 tries");
}

TEST_CASE(
    "e2e: after vmsave is killed during a save, no image exists and its watchdog resumes the "
    "guest and clears x-ignore-shared") {
  test::require_guest_kit();
  std::string why_skip;
  {
    TestVm vm({.ram_mib = 512, .memcheck_mib = 384});
    boot(vm, 1);
    const std::string out = vm.dir() + "/out";
    REQUIRE(::mkdir(out.c_str(), 0755) == 0);
    const std::string image = out + "/vm.vmsave";

    std::optional<Interrupted> in = kill_save(vm, image, "writing RAM (guest paused)");
    if (!in) {
      why_skip = "could not kill a save while it wrote RAM in 3 tries";
    } else {
      // The image is written to an unnamed (O_TMPFILE) or hidden temporary
      // file and linked at the end: nothing appears at the target.
      CHECK_FALSE(exists(image));
      // vmsave stopped the guest and died; its watchdog, holding the same
      // QMP connection, resumed it (this connection waits for it to leave).
      CHECK(qmp_status(vm.qmp_path()) == "running");
      CHECK_FALSE(x_ignore_shared(vm));
      // It says so where vmsave's errors go.
      std::string said = slurp(in->log);
      CHECK_MESSAGE(contains(said, "vmsave: the save was killed part-way: no image was written, "
                                   "QEMU's migration settings are back as they were, and the "
                                   "guest runs again"),
                    said);
      // Memory intact: the same checksum after the kill as before it.
      const MemcheckLine at_kill = *read_story(vm.serial_log()).last;
      std::string err;
      MemcheckLine line;
      CHECK_MESSAGE(wait_story([&] { return vm.serial_log(); }, at_kill.iteration + kMoreIterations,
                               kCarryOnTimeout, vm.pid(), &line, &err),
                    err);
      CHECK(line.checksum == at_kill.checksum);
      // And the VM can still be saved: the killed save wedged nothing.
      RunResult r =
          run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--leave-running"}, kRunTimeout);
      CHECK_RUN(r, 0);
      CHECK(qmp_status(vm.qmp_path()) == "running");
    }
  }
  if (!why_skip.empty()) skip(why_skip);
}

// Killed once the image is committed, the save is complete: the watchdog
// used to say "no image was written" and resume the guest beside its
// image, or, once told "done", leave it paused with nothing said.
TEST_CASE("e2e: after vmsave is killed with its image committed, the watchdog finishes the save") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  boot(vm, 1);
  const std::string image = vm.dir() + "/vm.vmsave";
  for (const char* after : {"--paused", ""}) {
    CAPTURE(std::string(after));
    std::filesystem::remove(image);
    std::vector<std::string> argv = {VMSAVE_BINARY, "save", "--qmp", vm.qmp_path(), image};
    if (*after) argv.push_back(after);
    const std::string log = vm.dir() + "/save.log";
    Child save(argv, log, -1, {"VMSAVE_FAULT=after-commit:30000"});
    const double deadline = now_s() + 60;
    while (!exists(image) && now_s() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    REQUIRE(exists(image));
    save.signal(SIGKILL);
    CHECK(save.wait(10) == 128 + SIGKILL);
    CHECK_RUN(run_vmsave({"verify", image}, kRunTimeout), 0);
    if (*after) {
      CHECK(qmp_status(vm.qmp_path()) == "postmigrate");  // paused, its state sent
      CHECK_MESSAGE(contains(slurp(log), "vmsave: the save was killed after its image was "
                                         "committed (" + image + "): the guest stays paused"),
                    slurp(log));
      CHECK_FALSE(x_ignore_shared(vm));
      REQUIRE(qmp_execute(vm.qmp_path(), "cont").ok());
    } else {
      std::optional<int> exit = wait_exit_unreaped(vm.pid(), 15);
      CHECK_MESSAGE(exit.has_value(), "QEMU did not quit");
      CHECK_MESSAGE(contains(slurp(log), "vmsave: the save was killed after its image was "
                                         "committed (" + image + "): QEMU was told to quit, as "
                                         "the save does"),
                    slurp(log));
    }
  }
  // What it committed carries on.
  const MemcheckLine saved = *read_story(vm.serial_log()).last;
  REQUIRE(::unlink(vm.ram_path().c_str()) == 0);
  RunResult r = run_vmsave(restore_args(image, vm.dir() + "/restore.log", false, vm.command()),
                           kRunTimeout);
  REQUIRE_RUN(r, 0);
  StartedQemu qemu{parse_json(r).value("pid", -1)};
  check_carries_on(vm, saved, qemu.pid);
}

TEST_CASE(
    "e2e: a save of anonymous RAM killed while QEMU writes it is undone by the watchdog: "
    "capabilities, direct-io and fd sets back, the guest running") {
  test::require_guest_kit();
  std::string why_skip;
  {
    VmOptions opts = kSmallVm;
    opts.shared_file_ram = false;
    TestVm vm(opts);
    boot(vm, 1);
    const std::string image = vm.dir() + "/vm.vmsave";
    auto settings = [&] {
      auto caps = qmp_execute(vm.qmp_path(), "query-migrate-capabilities");
      auto params = qmp_execute(vm.qmp_path(), "query-migrate-parameters");
      auto fdsets = qmp_execute(vm.qmp_path(), "query-fdsets");
      REQUIRE((caps.ok() && params.ok() && fdsets.ok()));
      return json{{"capabilities", *caps},
                  {"direct-io", params->value("direct-io", false)},
                  {"max-bandwidth", params->value("max-bandwidth", 0)},
                  {"fdsets", *fdsets}};
    };
    const json before = settings();

    if (!kill_save(vm, image, "QEMU writing RAM and device state (guest paused)")) {
      why_skip = "could not kill a save while QEMU wrote RAM in 3 tries";
    } else {
      CHECK_FALSE(exists(image));
      CHECK(qmp_status(vm.qmp_path()) == "running");
      CHECK(settings() == before);
      std::string err;
      CHECK_MESSAGE(carries_on(vm, 2, &err), err);
      // QEMU can migrate again: the killed one was cancelled.
      RunResult r =
          run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--leave-running"}, kRunTimeout);
      CHECK_RUN(r, 0);
    }
  }
  if (!why_skip.empty()) skip(why_skip);
}

TEST_CASE(
    "e2e: after vmsave is killed during a restore, its watchdog stops the QEMU it started and "
    "removes the RAM file it filled") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  const std::string image = saved_without_ram(vm);
  const std::string log = vm.dir() + "/killed-restore.log";
  std::vector<std::string> argv = {VMSAVE_BINARY};
  for (auto& a : restore_args(image, vm.dir() + "/restore.log", false, vm.command()))
    argv.push_back(a);

  // Two moments: while it fills the RAM file, and once its QEMU runs (and
  // waits for the device state).
  const std::pair<const char*, std::function<bool()>> moments[] = {
      {"filling the RAM file", [&] { return exists(vm.ram_path()); }},
      {"QEMU started", [&] { return !test::qemu_pids_mentioning(vm.dir()).empty(); }},
  };
  int killed = 0;
  for (auto& [what, now] : moments) {
    CAPTURE(what);
    for (int attempt = 0; attempt < 5; attempt++) {
      int status = -1;
      {
        Child restore(argv, log);
        double deadline = now_s() + kRunTimeout;
        while (!now() && now_s() < deadline && (status = restore.wait(0)) == -1)
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        if (status == -1) {
          restore.signal(SIGKILL);
          status = restore.wait(kRunTimeout);
        }
      }
      if (status != 128 + SIGKILL) {
        // It finished first: undo its restore and try again.
        CHECK_MESSAGE(status == 0, "status " << status << ": " << slurp(log));
        test::kill_qemu_mentioning(vm.dir());
        ::unlink(vm.ram_path().c_str());
        continue;
      }
      killed++;
      // The watchdog speaks once it has killed QEMU and removed the file.
      std::string err;
      double deadline = now_s() + 15;
      while (!contains(err = slurp(log), "vmsave: the restore was killed part-way") &&
             now_s() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      CHECK_MESSAGE(contains(err, "the files it made are removed"), err);
      if (std::string(what) == "QEMU started")
        CHECK_MESSAGE(contains(err, "the QEMU it started is stopped"), err);
      CHECK_FALSE(exists(vm.ram_path()));
      CHECK(test::qemu_pids_mentioning(vm.dir()).empty());
      // So the user's retry finds nothing in its way.
      RunResult r = run_vmsave(restore_args(image, vm.dir() + "/restore.log", false,
                                            vm.command()),
                               kRunTimeout);
      CHECK_RUN(r, 0);
      CHECK(test::kill_qemu_mentioning(vm.dir()) == 1);
      ::unlink(vm.ram_path().c_str());
      break;
    }
  }
  test::record_figure("restore_kills", killed);
  if (killed < 2) skip(fmt::format("killed {} of 2 restores part-way in 5 tries each", killed));
}

TEST_CASE(
    "e2e: a restore killed before its daemonized QEMU answers leaves no QEMU behind, and holds "
    "its QMP socket until then") {
  // The daemon's pid was learnt from its QMP connection: a restore killed
  // before that left it waiting for its device state for ever, holding its
  // RAM file and socket, and the retry found the socket in use (trial Q).
  // And a second restore with the same QMP socket is refused meanwhile.
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  const std::string image = saved_without_ram(vm);
  const MemcheckLine saved = *read_story(vm.serial_log()).last;
  const std::string log = vm.dir() + "/killed-restore.log";
  // QEMU's log goes beside its socket (vmsave's default), and QEMU writes
  // a pidfile: the killed QEMU left both and its socket behind (trial Q).
  const std::string pidfile = vm.dir() + "/qemu.pid";
  const std::string qemu_log = vm.qmp_path() + ".qemu.log";
  std::vector<std::string> restore = {"restore", image, "--json", "--"};
  for (const std::string& a : plus(vm.command(), {"-daemonize", "-pidfile", pidfile}))
    restore.push_back(a);
  std::vector<std::string> argv = {VMSAVE_BINARY};
  argv.insert(argv.end(), restore.begin(), restore.end());
  {
    Child held(argv, log, -1, {"VMSAVE_FAULT=slow-connect:60000"});
    // QEMU has daemonized (its first process gone) and listens.
    struct stat st;
    double deadline = now_s() + kRunTimeout;
    while (!(::stat(vm.qmp_path().c_str(), &st) == 0 && S_ISSOCK(st.st_mode) &&
             test::qemu_pids_mentioning(vm.dir()).size() == 1) &&
           now_s() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    REQUIRE(test::qemu_pids_mentioning(vm.dir()).size() == 1);
    CHECK(exists(pidfile));
    CHECK(exists(qemu_log));
    // A second restore of a command with the same QMP socket is refused
    // while this one runs: its QEMU would have taken the socket's path
    // (trial Q: one restore reported the other's VM).
    const std::string second_ram =
        std::filesystem::path(vm.ram_path()).parent_path().string() + "/second";
    RunResult second = run_vmsave(rewrite(restore, vm.ram_path(), second_ram), kRunTimeout);
    CHECK_RUN(second, 1);
    CHECK_MESSAGE(contains(second.err, "the QEMU command's QMP socket is in use (" + vm.qmp_path() +
                                           "): another vmsave is restoring a VM with this socket; "
                                           "give each VM its own -qmp socket, or wait for that "
                                           "restore to finish"),
                  second.err);
    CHECK_FALSE(exists(second_ram));
    held.signal(SIGKILL);
    REQUIRE(held.wait(10) == 128 + SIGKILL);
  }
  std::string err;
  double deadline = now_s() + 15;
  while (!contains(err = slurp(log), "vmsave: the restore was killed part-way") &&
         now_s() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK_MESSAGE(contains(err, "the QEMU it started is stopped"), err);
  CHECK_MESSAGE(test::qemu_pids_mentioning(vm.dir()).empty(), err);
  CHECK_FALSE(exists(vm.ram_path()));
  CHECK_FALSE(exists(vm.qmp_path()));
  CHECK_FALSE(exists(pidfile));
  CHECK_FALSE(exists(qemu_log));
  // So the retry finds nothing in its way, and the guest carries on.
  RunResult r = run_vmsave(restore, kRunTimeout);
  REQUIRE_RUN(r, 0);
  check_carries_on(vm, saved, parse_json(r).value("pid", -1));
  CHECK(test::kill_qemu_mentioning(vm.dir()) == 1);
}

TEST_CASE(
    "e2e: a QEMU killed during a restore is named as the cause, and the retry finds nothing in "
    "its way") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  const std::string image = saved_without_ram(vm);
  const std::string log = vm.dir() + "/restore.log";
  std::vector<std::string> argv = {VMSAVE_BINARY, "restore",       image, "--qemu-log",
                                   log,           "--progress-fd", "3",   "--"};
  const std::vector<std::string> qemu = vm.command();
  argv.insert(argv.end(), qemu.begin(), qemu.end());

  // QEMU killed while vmsave fills its RAM file (QEMU starts first), and
  // while QEMU loads the device state. It used to say "QEMU closed the QMP
  // connection" and blame the command line.
  // (Killed as the fill begins, QEMU stops it; the fill may be done first.)
  const std::pair<std::string, std::vector<std::string>> moments[] = {
      {"reading RAM",
       {"QEMU was killed by signal 9 (Killed) while vmsave filled its RAM",
        "QEMU was killed by signal 9 (Killed) before it was ready"}},
      {"loading device state", {"QEMU was killed by signal 9 (Killed) while loading the image"}},
  };
  int killed = 0;
  for (const auto& [phase, said] : moments) {
    CAPTURE(phase);
    for (int attempt = 0; attempt < 5; attempt++) {
      int p[2];
      REQUIRE(pipe2(p, O_CLOEXEC) == 0);
      const std::string out = vm.dir() + "/vmsave.out";
      int status;
      {
        Child restore(argv, out, p[1]);
        ::close(p[1]);
        std::string got;
        bool hit = false;
        double deadline = now_s() + kRunTimeout;
        while (!hit && now_s() < deadline) {
          pollfd pfd{p[0], POLLIN, 0};
          if (poll(&pfd, 1, 100) <= 0) continue;
          char buf[4096];
          ssize_t n = ::read(p[0], buf, sizeof buf);
          if (n <= 0) break;
          got.append(buf, size_t(n));
          for (size_t nl; !hit && (nl = got.find('\n')) != std::string::npos;) {
            json j = json::parse(got.substr(0, nl), nullptr, false);
            got.erase(0, nl + 1);
            hit = j.is_object() && j.value("phase", "") == phase && !j.value("final", true);
          }
        }
        if (hit) test::kill_qemu_mentioning(vm.dir());
        status = restore.wait(kRunTimeout);
      }
      ::close(p[0]);
      const std::string err = slurp(out);
      if (status == 0) {  // QEMU was done first: undo, try again
        test::kill_qemu_mentioning(vm.dir());
        ::unlink(vm.ram_path().c_str());
        continue;
      }
      killed++;
      CHECK_MESSAGE(status == 1, err);
      CHECK_MESSAGE(std::any_of(said.begin(), said.end(),
                                [&](const std::string& what) {
                                  return contains(err,
                                                  fmt::format("vmsave: error: {} ({})", what, log));
                                }),
                    err);
      CHECK_MESSAGE(contains(err, "find what killed it"), err);
      CHECK_MESSAGE(!contains(err, "command line"), err);
      CHECK_FALSE(exists(vm.ram_path()));
      CHECK(test::qemu_pids_mentioning(vm.dir()).empty());
      RunResult r = run_vmsave(restore_args(image, log, false, vm.command()), kRunTimeout);
      CHECK_RUN(r, 0);
      CHECK(test::kill_qemu_mentioning(vm.dir()) == 1);
      ::unlink(vm.ram_path().c_str());
      break;
    }
  }
  if (killed < 2) skip(fmt::format("killed QEMU in {} of 2 restores in 5 tries each", killed));
}

TEST_CASE("e2e: the two-step form (prepare --lazy, start QEMU, restore --qmp) carries on") {
  test::require_guest_kit();
  VmOptions opts = kSmallVm;
  opts.file_backend_props = "dump=off,merge=off";
  TestVm vm(opts);
  const auto [image, log_at_save, saved] = boot_and_save(vm);

  // Arguments that cannot be printed are a failure, and the RAM files
  // filled for them are removed: a retry finds nothing in its way.
  const std::string filled = vm.dir() + "/filled";
  REQUIRE(::mkdir(filled.c_str(), 0700) == 0);
  for (const char* json : {"", "--json"}) {
    CAPTURE(std::string(json));
    RunResult full = test::run_program(
        {"/bin/sh", "-c", "exec \"$0\" prepare \"$1\" --ram-dir \"$2\" $3 >/dev/full",
         VMSAVE_BINARY, image, filled, json},
        kRunTimeout);
    CHECK_RUN(full, 1);
    CHECK_MESSAGE(contains(full.err, "vmsave: error: cannot write to standard output: No space "
                                     "left on device; the RAM files it filled are removed"),
                  full.err);
    // Not first a summary that says they were restored (trial K).
    CHECK_MESSAGE(!contains(full.err, "restored "), full.err);
    CHECK_MESSAGE(list_dir(filled).empty(), joined(list_dir(filled)));
  }
  RunResult eager = run_vmsave({"prepare", image, "--ram-dir", filled, "--json"}, kRunTimeout);
  REQUIRE_RUN(eager, 0);
  CHECK(parse_json(eager)["ram_files"] == json::array({filled + "/ram0"}));
  std::filesystem::remove_all(filled);
  // A relative --ram-dir: the files are named absolute, as in qemu_args (a
  // wrapper may clean up from another directory).
  const std::string rel = vm.dir() + "/rel";
  REQUIRE(::mkdir(rel.c_str(), 0700) == 0);
  RunResult relative = test::run_program(
      {"/bin/sh", "-c", "cd \"$1\" && exec \"$0\" prepare \"$2\" --ram-dir rel --json",
       VMSAVE_BINARY, vm.dir(), image},
      kRunTimeout);
  REQUIRE_RUN(relative, 0);
  CHECK(parse_json(relative)["ram_files"] == json::array({rel + "/ram0"}));
  std::filesystem::remove_all(rel);

  // Plain: one argument per line, and a summary on stderr.
  RunResult plain = run_vmsave({"prepare", image, "--lazy"}, kRunTimeout);
  REQUIRE_RUN(plain, 0);
  std::vector<std::string> lines;
  std::istringstream in(plain.out);
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  REQUIRE(lines.size() == 4);
  CHECK(lines[0] == "-object");
  std::set<std::string> props;
  std::istringstream obj(lines[1]);
  for (std::string p; std::getline(obj, p, ',');) props.insert(p);
  // The backend's other properties are kept (dump=off: guest RAM stays out
  // of core dumps as the VM was started).
  const std::set<std::string> want = {"memory-backend-file", "id=ram0", "mem-path=" + image,
                                      "offset=2097152", "readonly=on", "rom=off", "share=off",
                                      "size=256M", "dump=off", "merge=off"};
  CHECK_MESSAGE(props == want, lines[1]);
  CHECK(lines[2] == "-incoming");
  CHECK(lines[3] == "defer");
  CHECK_MESSAGE(
      contains(plain.err, "these arguments map 256.0 MiB of RAM copy-on-write from the image"),
      plain.err);

  RunResult r = run_vmsave({"prepare", image, "--lazy", "--json"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  json doc = parse_json(r);
  CHECK(doc.value("ram_bytes", 0) == 256 * kMiB);
  json prepared = doc["qemu_args"];
  REQUIRE(prepared.is_array());
  std::vector<std::string> extra = prepared.get<std::vector<std::string>>();
  CHECK(extra == lines);

  // A wrapper that starts QEMU with another CPU count is told so, and its
  // QEMU still waits (QEMU itself would exit on the device state).
  std::vector<std::string> two_cpus = with_prepared(vm.command(), extra);
  for (size_t a = 0; a + 1 < two_cpus.size(); a++)
    if (two_cpus[a] == "-smp") two_cpus[a + 1] = "2";
  ::unlink(vm.qmp_path().c_str());  // a stale socket would look ready
  {
    Child wrong(two_cpus, vm.dir() + "/two-cpus-qemu.log");
    await_qmp_socket(vm, wrong, vm.dir() + "/two-cpus-qemu.log");
    r = run_vmsave({"restore", image, "--qmp", vm.qmp_path()}, kRunTimeout);
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(contains(r.err, "-smp gives 2 CPUs, the VM was saved with 1; start QEMU with "
                                  "the command line the VM was saved with"),
                  r.err);
    CHECK(qmp_status(vm.qmp_path()) == "inmigrate");
  }
  ::unlink(vm.qmp_path().c_str());

  Child qemu(with_prepared(vm.command(), extra), vm.dir() + "/two-step-qemu.log");
  await_qmp_socket(vm, qemu, vm.dir() + "/two-step-qemu.log");
  CHECK(qmp_status(vm.qmp_path()) == "inmigrate");

  r = run_vmsave({"restore", image, "--qmp", vm.qmp_path(), "--json", "--paused"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  json j = parse_json(r);
  CHECK(j.value("pid", -1) == qemu.pid());
  CHECK_FALSE(j.value("running", true));
  // Again, as a wrapper retries a restore it lost (killed before it sent
  // cont, it left the guest so): it is told how to resume the guest.
  r = run_vmsave({"restore", image, "--qmp", vm.qmp_path()}, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(
      contains(r.err, "vmsave: error: QEMU is not waiting for a migration (" + vm.qmp_path() +
                          "): its state is paused; it loaded a migration and its guest "
                          "is paused: if a restore was interrupted before it resumed "
                          "the guest, resume it with the QMP command cont\n"),
      r.err);
  // Killed before it switched x-ignore-shared back off, too (as here by
  // hand): the next ordinary migration would skip the guest's shared RAM.
  {
    auto q = QmpClient::connect(vm.qmp_path(), 10);
    REQUIRE(q.ok());
    REQUIRE(q->execute("migrate-set-capabilities",
                       {{"capabilities",
                         json::array({{{"capability", "x-ignore-shared"}, {"state", true}}})}})
                .ok());
  }
  r = run_vmsave({"restore", image, "--qmp", vm.qmp_path()}, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err,
                         "resume it with the QMP command cont; the restore left the "
                         "migration capabilities x-ignore-shared on: switch them off "
                         "(migrate-set-capabilities) before migrating this VM elsewhere"),
                r.err);
  REQUIRE(qmp_execute(vm.qmp_path(), "cont").ok());
  check_carries_on(vm, saved, qemu.pid());
  CHECK_MESSAGE(maps_file(qemu.pid(), image), maps_of(qemu.pid()));
}

TEST_CASE(
    "e2e: a signal while QEMU loads the device state (restore --qmp) lets the load finish, the "
    "guest paused, and a second stops it at once") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  const auto [image, log_at_save, saved] = boot_and_save(vm);
  RunResult r = run_vmsave({"prepare", image, "--lazy", "--json"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  const auto extra = parse_json(r)["qemu_args"].get<std::vector<std::string>>();
  const std::vector<std::string> restore = {VMSAVE_BINARY, "restore",       image, "--qmp",
                                            vm.qmp_path(), "--progress-fd", "3"};
  // The load waits (injected) before its first byte: a closed pipe QEMU
  // has never read from leaves it waiting for good. A Ctrl-C there had
  // QEMU refuse every retry ("The incoming migration has already been
  // started", trial P).
  {
    ::unlink(vm.qmp_path().c_str());
    Child qemu(with_prepared(vm.command(), extra), vm.dir() + "/twice-qemu.log");
    await_qmp_socket(vm, qemu, vm.dir() + "/twice-qemu.log");
    const double t0 = now_s();
    Interrupted in = interrupt_at_phase(restore, vm.dir() + "/twice.log", SIGINT, nullptr,
                                        "loading device state", {"VMSAVE_FAULT=slow-load:20000"},
                                        /*times=*/2);
    CHECK(in.caught);
    CHECK_MESSAGE(in.status == 130, in.err);
    CHECK(now_s() - t0 < 15);  // not after the 20 s wait
    RunResult again = run_vmsave({"restore", image, "--qmp", vm.qmp_path()}, kRunTimeout);
    CHECK_RUN(again, 1);
    CHECK_MESSAGE(
        contains(again.err, "QEMU has begun an incoming migration already (" + vm.qmp_path() +
                                "): its status is setup; it cannot "
                                "take another"),
        again.err);
  }
  ::unlink(vm.qmp_path().c_str());
  Child qemu(with_prepared(vm.command(), extra), vm.dir() + "/once-qemu.log");
  await_qmp_socket(vm, qemu, vm.dir() + "/once-qemu.log");
  Interrupted in = interrupt_at_phase(restore, vm.dir() + "/once.log", SIGINT, nullptr,
                                      "loading device state", {"VMSAVE_FAULT=slow-load:1000"});
  CHECK(in.caught);
  CHECK_MESSAGE(in.status == 130, in.err);
  CHECK_MESSAGE(contains(in.err,
                         "the load was let finish: the guest is paused (resume it with "
                         "the QMP command cont)"),
                in.err);
  CHECK(qmp_status(vm.qmp_path()) == "paused");
  // A retry says the same, and the capabilities are off again.
  RunResult again = run_vmsave({"restore", image, "--qmp", vm.qmp_path()}, kRunTimeout);
  CHECK_RUN(again, 1);
  CHECK_MESSAGE(contains(again.err, "resume it with the QMP command cont\n"), again.err);
  CHECK_FALSE(x_ignore_shared(vm));
  REQUIRE(qmp_execute(vm.qmp_path(), "cont").ok());
  check_carries_on(vm, saved, qemu.pid());
}

TEST_CASE(
    "e2e: QEMU refusing the device state under -daemonize gives its reason, from the -D log "
    "vmsave adds and a later save leaves out") {
  // "QEMU closed the QMP connection; has QEMU exited? its log or stderr
  // says why": a daemonized QEMU's stderr is /dev/null, its log empty
  // (trial O). Then it said the reason was lost (trial X).
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  const auto [image, log_at_save, saved] = boot_and_save(vm);
  REQUIRE(::unlink(vm.ram_path().c_str()) == 0);
  // Without the serial port the guest was saved with: QEMU meets an unknown
  // section in the device state, which vmsave does not compare.
  std::vector<std::string> cmd;
  for (size_t a = 0; a < vm.command().size(); a++) {
    if (vm.command()[a] == "-serial") {
      a++;
      continue;
    }
    cmd.push_back(vm.command()[a]);
  }
  cmd.insert(cmd.end(), {"-daemonize", "-pidfile", vm.dir() + "/daemon.pid"});
  std::vector<std::string> args = {"restore", image, "--qemu-log", vm.dir() + "/daemon.log", "--"};
  args.insert(args.end(), cmd.begin(), cmd.end());
  RunResult r = run_vmsave(args, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err,
                         "QEMU: qemu-system-x86_64: Unknown savevm section or instance "
                         "'serial' 0. Make sure that your current VM setup matches your "
                         "saved VM setup, including any hotplugged devices"),
                r.err);
  CHECK_MESSAGE(contains(r.err, "; start QEMU with the command line the VM was saved with"), r.err);
  CHECK_FALSE(contains(r.err, "reason is lost"));
  CHECK_FALSE(exists(vm.ram_path()));
  CHECK(test::qemu_pids_mentioning(vm.dir()).empty());

  // With its serial port it loads; saved again, the image records the
  // command as given, without the -D vmsave added.
  std::vector<std::string> daemon = vm.command();
  daemon.insert(daemon.end(), {"-daemonize", "-pidfile", vm.dir() + "/daemon.pid"});
  args = {"restore", image, "--qemu-log", vm.dir() + "/daemon.log", "--"};
  args.insert(args.end(), daemon.begin(), daemon.end());
  REQUIRE_RUN(run_vmsave(args, kRunTimeout), 0);
  const std::string again = vm.dir() + "/again.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--qmp", vm.qmp_path(), again}, kRunTimeout), 0);
  json recorded = parse_json(run_vmsave({"info", "--json", again}))["metadata"]["qemu_cmdline"];
  // (The -object as vmsave wrote it for QEMU: its keys in another order.)
  const auto got = recorded.get<std::vector<std::string>>();
  CHECK_MESSAGE(std::find(got.begin(), got.end(), "-D") == got.end(), recorded.dump());
  CHECK_MESSAGE(got.size() == daemon.size(), recorded.dump());
  CHECK(std::equal(got.end() - 4, got.end(), daemon.end() - 4));
}

// A small guest with one raw disk (virtio), booted: the disk-lock tests'
// VM, whose second instance on the same disk QEMU must refuse.
VmOptions with_raw_disk(const std::string& disk) {
  test::write_pattern_file(disk, kMiB, "zero", 0);
  VmOptions opts = kSmallVm;
  opts.extra_args = {"-drive", "file=" + disk + ",format=raw,if=virtio"};
  return opts;
}
bool qemu_takes_disk_locks(const std::string& qmp);
// A second instance of `vm`'s command: its own QMP socket, RAM file and
// serial log (named after `name`), the disk the same.
struct SecondInstance {
  std::string ram, qmp;
  std::vector<std::string> command;
};
SecondInstance second_instance(TestVm& vm, const std::string& name) {
  SecondInstance i{vm.dir() + "/" + name + "-ram0", vm.dir() + "/" + name + ".qmp", {}};
  i.command = rewrite(rewrite(rewrite(vm.command(), vm.qmp_path(), i.qmp), vm.ram_path(), i.ram),
                      vm.serial_path(), vm.dir() + "/" + name + "-serial.log");
  REQUIRE(i.command != vm.command());
  return i;
}
struct VmWithDisk {
  test::TempDir dir;
  const std::string disk = dir / "disk.raw";
  TestVm vm{with_raw_disk(disk)};
  // `lock_taking`: the test needs QEMU's blockdev-set-active, and skips
  // without it.
  explicit VmWithDisk(bool lock_taking = false) {
    boot(vm);
    if (lock_taking && !qemu_takes_disk_locks(vm.qmp_path()))
      test::skip("this QEMU has no blockdev-set-active (10.0 or newer has)");
  }
};

TEST_CASE(
    "e2e: a daemonized restore whose cont QEMU refuses (a disk the saved VM still holds) gives "
    "QEMU's reason and leaves nothing") {
  // The reason was shown, then said to be lost to -daemonize (trial V).
  test::require_guest_kit();
  VmWithDisk booted;
  TestVm& vm = booted.vm;
  const std::string& disk = booted.disk;
  const std::string image = vm.dir() + "/vm.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--leave-running"}, kRunTimeout),
              0);
  // A second instance of the VM, its own QMP socket and RAM file, the
  // disk the same: QEMU takes the disk's lock only as the guest resumes.
  // Named in json: syntax, the disk escapes vmsave's own look at its locks
  // before QEMU starts; QEMU's refusal is what is left.
  const auto [ram, qmp, second] = second_instance(vm, "second");
  std::vector<std::string> cmd =
      plus(rewrite(second, "file=" + disk + ",format=raw",
                   "file=json:{\"driver\":\"file\",,\"filename\":\"" + disk + "\"}"),
           {"-daemonize"});
  RunResult r = run_vmsave(restore_args(image, vm.dir() + "/second.log", false, cmd), kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: QEMU refused cont (" + qmp + "): GenericError: "),
                r.err);
  CHECK_MESSAGE(contains(r.err, "lock"), r.err);
  CHECK_MESSAGE(!contains(r.err, "reason is lost"), r.err);
  CHECK_MESSAGE(contains(r.err,
                         "holds a disk image it uses; stop that VM, or give this one its "
                         "own copy of the disks\n"),
                r.err);
  CHECK_FALSE(exists(ram));
  CHECK(test::qemu_pids_mentioning(qmp).empty());
  CHECK(qmp_status(vm.qmp_path()) == "running");
  // Nor the serial log QEMU created, empty (trial Z).
  CHECK_FALSE(exists(vm.dir() + "/second-serial.log"));
}

// QEMU 10.0's blockdev-set-active, which vmsave needs to take a paused
// VM's disk locks before cont; the tests of that skip without it.
bool qemu_takes_disk_locks(const std::string& qmp) {
  auto cmds = qmp_execute(qmp, "query-commands");
  if (!cmds.ok()) return false;
  for (auto& c : *cmds)
    if (c.value("name", "") == "blockdev-set-active") return true;
  return false;
}

TEST_CASE(
    "e2e: a paused restore onto a disk the saved VM still holds fails before it exits, not at "
    "the user's cont") {
  // QEMU takes an incoming guest's disk locks only as it resumes: the
  // restore exited 0 and the user's cont failed later (trial X).
  test::require_guest_kit();
  VmWithDisk booted(/*lock_taking=*/true);
  TestVm& vm = booted.vm;
  const std::string& disk = booted.disk;
  const std::string image = vm.dir() + "/vm.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--leave-running"}, kRunTimeout),
              0);
  auto [ram, qmp, cmd] = second_instance(vm, "second");
  // vmsave's own look at the disk's locks refuses it before QEMU starts.
  auto args = restore_args(image, vm.dir() + "/second.log", false, cmd);
  args.insert(args.begin() + 2, "--paused");
  RunResult r = run_vmsave(args, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(
      contains(r.err, "vmsave: error: a disk image of the QEMU command is in use (" + disk +
                          "): another process (a QEMU: the VM it was saved "
                          "from, still running?) is writing it; stop that VM, or "
                          "give this one its own copy of the disk"),
      r.err);
  CHECK_FALSE(contains(r.err, "reading RAM"));  // nothing was filled
  CHECK_FALSE(exists(ram));
  CHECK(test::qemu_pids_mentioning(qmp).empty());
  // In json: syntax it escapes that look: QEMU refuses it as it takes its
  // locks, before vmsave exits.
  cmd = rewrite(cmd, "file=" + disk + ",format=raw",
                "file=json:{\"driver\":\"file\",,\"filename\":\"" + disk + "\"}");
  args = restore_args(image, vm.dir() + "/second.log", false, cmd);
  args.insert(args.begin() + 2, "--paused");
  r = run_vmsave(args, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "lock"), r.err);
  CHECK_MESSAGE(contains(r.err,
                         "holds a disk image it uses; stop that VM, or give this one its "
                         "own copy of the disks\n"),
                r.err);
  CHECK_FALSE(exists(ram));
  CHECK(test::qemu_pids_mentioning(qmp).empty());
  CHECK(qmp_status(vm.qmp_path()) == "running");

  // Once the first VM is gone, the same paused restore succeeds and stays
  // paused with its disk taken.
  REQUIRE(test::kill_qemu_mentioning(vm.qmp_path()) == 1);
  r = run_vmsave(args, kRunTimeout);
  REQUIRE_RUN(r, 0);
  CHECK(qmp_status(qmp) == "paused");
  CHECK(test::kill_qemu_mentioning(qmp) == 1);
}

TEST_CASE(
    "e2e: the two-step restore refuses a disk another VM writes before it loads anything, and "
    "its QEMU still waits") {
  test::require_guest_kit();
  VmWithDisk v;
  TestVm& vm = v.vm;
  const std::string image = vm.dir() + "/vm.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--leave-running"}, kRunTimeout),
              0);
  RunResult r = run_vmsave({"prepare", image, "--lazy", "--json"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  auto [ram, qmp, cmd] = second_instance(vm, "second");
  // Its disk named relative to its directory, which vmsave's is not.
  cmd = rewrite(cmd, "file=" + v.disk, "file=disk.raw");
  cmd.insert(cmd.begin(), {"/bin/sh", "-c", "cd \"$0\" && exec \"$@\"", v.dir.path()});
  const std::string qemu_log = vm.dir() + "/second-qemu.log";
  Child qemu(with_prepared(cmd, parse_json(r)["qemu_args"].get<std::vector<std::string>>()),
             qemu_log);
  await_qmp_socket(qmp, qemu, qemu_log);
  // QEMU took no lock yet (it does at cont): the device state loaded, and
  // then cont failed (trial Y's finding, left for the two-step form).
  r = run_vmsave({"restore", image, "--qmp", qmp}, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: a disk image of the QEMU command is in use (" +
                                    v.disk + "): another process (a QEMU: the VM it was saved " +
                                    "from, still running?) is writing it; stop that VM, or give " +
                                    "this one its own copy of the disk (an overlay: qemu-img " +
                                    "create -f qcow2 -b DISK -F FORMAT NEW.qcow2); this QEMU " +
                                    "still waits"),
                r.err);
  CHECK(qmp_status(qmp) == "inmigrate");
  CHECK(qmp_status(vm.qmp_path()) == "running");
  // That VM gone, the same QEMU takes the device state and runs.
  REQUIRE(test::kill_qemu_mentioning(vm.qmp_path()) == 1);
  r = run_vmsave({"restore", image, "--qmp", qmp}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  CHECK(qmp_status(qmp) == "running");
}

TEST_CASE(
    "e2e: a VM saved --paused keeps its disks locked, so a clone on the same disk is refused, "
    "and cont resumes it") {
  // A migration's end releases the disks' locks: a clone restored onto the
  // paused VM's disk ran and wrote it, and the original resumed on what the
  // clone wrote (trial Y).
  test::require_guest_kit();
  VmWithDisk booted(/*lock_taking=*/true);
  TestVm& vm = booted.vm;
  const std::string& disk = booted.disk;
  const std::string image = vm.dir() + "/vm.vmsave";
  RunResult r = run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--paused"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(contains(r.err, " so far (it stays paused: QMP cont resumes it)"), r.err);
  CHECK_FALSE(contains(r.err, "warning"));
  const auto [ram, qmp, cmd] = second_instance(vm, "clone");
  r = run_vmsave(restore_args(image, vm.dir() + "/clone.log", false, cmd), kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "a disk image of the QEMU command is in use (" + disk + ")"),
                r.err);
  CHECK_FALSE(exists(ram));
  CHECK(test::qemu_pids_mentioning(qmp).empty());
  REQUIRE(qmp_execute(vm.qmp_path(), "cont").ok());
  CHECK(qmp_status(vm.qmp_path()) == "running");
}

TEST_CASE(
    "e2e: a save while a block job works on the disks is refused before the guest pauses, and "
    "a deleted disk's failed save says what QEMU could not do") {
  // QEMU failed the save's end with only "Bad address", after the guest
  // had been paused for all of it (trial Y).
  test::require_guest_kit();
  test::TempDir disks;
  const std::string disk = disks / "disk.qcow2", backup = disks / "backup.qcow2";
  REQUIRE_RUN(test::run_program({"qemu-img", "create", "-q", "-f", "qcow2", disk, "64M"}), 0);
  REQUIRE_RUN(test::run_program({"qemu-io", "-c", "write -P 0x11 0 32M", disk}), 0);
  VmOptions opts = kSmallVm;
  opts.extra_args = {"-drive", "file=" + disk + ",if=virtio,id=disk0"};
  TestVm vm(opts);
  boot(vm);
  const std::string image = vm.dir() + "/vm.vmsave";
  {
    auto qmp = QmpClient::connect(vm.qmp_path(), 10);
    REQUIRE(qmp.ok());
    // 1 MiB/s: the 32 MiB backup outlasts the test.
    auto job = qmp->execute("drive-backup", {{"device", "disk0"},
                                             {"target", backup},
                                             {"format", "qcow2"},
                                             {"sync", "full"},
                                             {"speed", 1 << 20}});
    REQUIRE_MESSAGE(job.ok(), job.error().message());
  }
  RunResult r = run_vmsave({"save", "--qmp", vm.qmp_path(), image}, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: cannot save this guest now (" + vm.qmp_path() +
                                    "): a block job works on its disks (backup on disk0, "
                                    "running), and QEMU fails the end of a save while one does; "
                                    "wait for the job to end (QMP query-block-jobs), or cancel "
                                    "it (block-job-cancel), then save\n"),
                r.err);
  CHECK_FALSE(contains(r.err, "writing RAM"));  // the guest was not paused
  CHECK_FALSE(exists(image));
  CHECK(qmp_status(vm.qmp_path()) == "running");
  {
    auto qmp = QmpClient::connect(vm.qmp_path(), 10);
    REQUIRE(qmp.ok());
    REQUIRE(qmp->execute("block-job-cancel", {{"device", "disk0"}}).ok());
    bool ended = false;
    for (int i = 0; i < 500 && !ended; i++) {
      auto jobs = qmp->execute("query-block-jobs");
      ended = jobs.ok() && jobs->empty();
      if (!ended) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    REQUIRE(ended);
  }
  // Its disk removed under it, QEMU cannot hand it over at the end.
  REQUIRE(::unlink(disk.c_str()) == 0);
  r = run_vmsave({"save", "--qmp", vm.qmp_path(), image}, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "QEMU could not flush and release its disks as the save ended"),
                r.err);
  CHECK_FALSE(exists(image));
  CHECK(qmp_status(vm.qmp_path()) == "running");
}

TEST_CASE("e2e: a restore's private QMP directory lasts as long as its QEMU, and no longer") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  boot(vm);
  const std::string image = vm.dir() + "/vm.vmsave";
  save_and_quit(vm, image);

  // The command without its -qmp: vmsave adds one in XDG_RUNTIME_DIR. Its
  // RAM goes to a directory, where vmsave makes the file QEMU maps.
  std::vector<std::string> cmd = vm.command();
  for (size_t a = 0; a + 1 < cmd.size(); a++)
    if (cmd[a] == "-qmp") cmd.erase(cmd.begin() + a, cmd.begin() + a + 2);
  const std::string ram_dir = vm.dir() + "/ramdir";
  REQUIRE(::mkdir(ram_dir.c_str(), 0700) == 0);
  for (auto& a : cmd)
    if (contains(a, "mem-path=" + vm.ram_path(0)))
      a.replace(a.find(vm.ram_path(0)), vm.ram_path(0).size(), ram_dir);
  // A comma in it: QEMU took what followed for an option ("Invalid
  // parameter 'dir/vmsave-.../qmp.sock'") until vmsave doubled it.
  const std::string run = vm.dir() + "/run,dir";
  REQUIRE(::mkdir(run.c_str(), 0700) == 0);
  // One left by a restore whose QEMU is gone, one being set up right now.
  pid_t gone = fork();
  if (gone == 0) _exit(0);
  REQUIRE(waitpid(gone, nullptr, 0) == gone);
  REQUIRE(::mkdir((run + "/vmsave-stale").c_str(), 0700) == 0);
  REQUIRE(::mkdir((run + "/vmsave-young").c_str(), 0700) == 0);
  std::ofstream(run + "/vmsave-stale/qemu.pid") << gone << "\n";
  const std::vector<std::string> env = {"XDG_RUNTIME_DIR=" + run};

  auto args = restore_args(image, "", false, cmd);
  args.erase(args.begin() + 3, args.begin() + 5);  // no --qemu-log
  RunResult r = run_vmsave(args, kRunTimeout, env);
  REQUIRE_RUN(r, 0);
  json j = parse_json(r);
  StartedQemu qemu{j.value("pid", -1)};
  const std::string sock = j.value("qmp", "");
  const std::string dir = std::filesystem::path(sock).parent_path().string();
  CHECK(contains(dir, run + "/vmsave-"));
  CHECK(j.value("qemu_log", "") == dir + "/qemu.log");
  CHECK(slurp(dir + "/qemu.pid") == fmt::format("{}\n", qemu.pid));
  CHECK_FALSE(exists(run + "/vmsave-stale"));
  CHECK(exists(run + "/vmsave-young"));

  // Saving through that socket quits QEMU, and its directory goes too.
  r = run_vmsave({"save", "--qmp", sock, vm.dir() + "/again.vmsave"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  CHECK_FALSE(exists(dir));
  CHECK(exists(run + "/vmsave-young"));
  // The command it records is the user's: not the -qmp of that directory
  // (pasted from info, it failed on the log beside the gone socket), not
  // -incoming defer, and the RAM directory rather than the file made in it.
  CHECK(list_dir(ram_dir).empty());
  RunResult again = run_vmsave({"info", "--json", vm.dir() + "/again.vmsave"}, kRunTimeout);
  REQUIRE_RUN(again, 0);
  const auto recorded =
      parse_json(again)["metadata"]["qemu_cmdline"].get<std::vector<std::string>>();
  // (The restore spelled the backend's properties in its own order.)
  auto in_order = [](std::vector<std::string> argv) {
    for (auto& a : argv) {
      if (!a.starts_with("memory-backend-")) continue;
      std::vector<std::string> props;
      std::istringstream in(a);
      for (std::string p; std::getline(in, p, ',');) props.push_back(p);
      std::sort(props.begin(), props.end());
      a = joined(props);
    }
    return argv;
  };
  CHECK_MESSAGE(in_order(recorded) == in_order(cmd), joined(recorded));
  r = run_vmsave(restore_args(vm.dir() + "/again.vmsave", vm.dir() + "/again.log", false, recorded),
                 kRunTimeout, env);
  REQUIRE_RUN(r, 0);
  CHECK(test::kill_qemu_mentioning(vm.dir()) == 1);

  // A socket path too long for QEMU is said before QEMU starts.
  const std::string deep = run + "/" + std::string(100, 'd');
  REQUIRE(::mkdir(deep.c_str(), 0700) == 0);
  r = run_vmsave(args, kRunTimeout, {"XDG_RUNTIME_DIR=" + deep});
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "the QMP socket vmsave would give QEMU has too long a path"), r.err);
  CHECK(test::kill_qemu_mentioning(vm.dir()) == 0);

  // Another user's XDG_RUNTIME_DIR (root after `su`) is not used: its owner
  // could swap the run directory and QEMU's socket in it (trial S).
  if (geteuid() == 0) {
    const std::string theirs = vm.dir() + "/theirs";
    REQUIRE(::mkdir(theirs.c_str(), 0700) == 0);
    REQUIRE(::chown(theirs.c_str(), 65534, 65534) == 0);
    r = run_vmsave(args, kRunTimeout, {"XDG_RUNTIME_DIR=" + theirs});
    REQUIRE_RUN(r, 0);
    CHECK_MESSAGE(contains(r.err, "vmsave: warning: XDG_RUNTIME_DIR (" + theirs +
                                      ") is not this user's alone (its owner is uid 65534): "
                                      "QEMU's QMP socket goes under /tmp instead"),
                  r.err);
    const std::string at = parse_json(r).value("qmp", "");
    CHECK(at.starts_with("/tmp/vmsave-"));
    CHECK(list_dir(theirs).empty());
    CHECK(test::kill_qemu_mentioning(vm.dir()) == 1);
    std::filesystem::remove_all(std::filesystem::path(at).parent_path());
  }

  // A QEMU that fails at start-up does not leave the command's own socket.
  const std::string own = vm.dir() + "/own.sock";
  auto bad = plus(cmd, {"-qmp", "unix:" + own + ",server=on,wait=off", "-device", "no-such-device"});
  r = run_vmsave(restore_args(image, vm.dir() + "/bad-qemu.log", true, bad), kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_FALSE(exists(own));

  // One whose log is in a private directory: the error names the log, which
  // stays to be read (it was removed with the directory) until the next
  // restore finds its QEMU gone.
  std::vector<std::string> no_log =
      restore_args(image, "", true, plus(cmd, {"-device", "no-such-device"}));
  no_log.erase(no_log.begin() + 3, no_log.begin() + 5);  // no --qemu-log
  r = run_vmsave(no_log, kRunTimeout, env);
  CHECK_RUN(r, 1);
  const std::string named =
      r.err.substr(r.err.find("ready (") + 7, r.err.find("):") - r.err.find("ready (") - 7);
  CHECK_MESSAGE(named.ends_with("/qemu.log"), r.err);
  CHECK_MESSAGE(contains(slurp(named), "no-such-device"), named);
  const std::string failed_dir = std::filesystem::path(named).parent_path().string();
  r = run_vmsave(args, kRunTimeout, env);
  REQUIRE_RUN(r, 0);
  CHECK_FALSE(exists(failed_dir));
  CHECK(test::kill_qemu_mentioning(vm.dir()) == 1);
}

// The QEMU a restore starts outlives vmsave: holding the --progress-fd
// pipe, it kept a wrapper that reads the lines to their end waiting for
// as long as the VM ran.
TEST_CASE("e2e: the QEMU a restore starts does not hold the --progress-fd pipe") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  boot(vm);
  const std::string image = vm.dir() + "/vm.vmsave";
  save_and_quit(vm, image);
  REQUIRE(::unlink(vm.ram_path().c_str()) == 0);
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  REQUIRE(fcntl(p[1], F_SETFD, 0) == 0);  // vmsave inherits the write end
  auto args = plus(restore_args(image, vm.dir() + "/restore.log", false, vm.command()),
                   {"--progress-fd", std::to_string(p[1])});
  // The option goes before "--" and the QEMU command.
  auto dashes = std::find(args.begin(), args.end(), "--");
  std::rotate(dashes, args.end() - 2, args.end());
  RunResult r = run_vmsave(args, kRunTimeout);
  ::close(p[1]);
  REQUIRE_RUN(r, 0);
  StartedQemu qemu{parse_json(r).value("pid", -1)};
  REQUIRE(fcntl(p[0], F_SETFL, O_NONBLOCK) == 0);
  std::string lines;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(p[0], buf, sizeof buf)) > 0) lines.append(buf, n);
  CHECK_MESSAGE(n == 0, "the pipe has a writer left: ", std::strerror(errno));
  ::close(p[0]);
  CHECK_MESSAGE(contains(lines, "\"final\":true"), lines);
}

TEST_CASE("e2e: restore --qmp refuses RAM prepared from another image, then loads its own") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  boot(vm);
  // Two saves of one VM, a few memcheck rounds apart.
  const std::string first = vm.dir() + "/first.vmsave", second = vm.dir() + "/second.vmsave";
  RunResult r =
      run_vmsave({"save", "--qmp", vm.qmp_path(), first, "--leave-running"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  MemcheckLine line;
  std::string err;
  REQUIRE_MESSAGE(vm.wait_for_memcheck(read_story(vm.serial_log()).last->iteration + 3,
                                       kCarryOnTimeout, &line, &err),
                  err);
  const std::string log_at_save = save_and_quit(vm, second);
  const MemcheckLine saved = *read_story(log_at_save).last;

  const std::string ram_dir = vm.dir() + "/prepared";
  REQUIRE(::mkdir(ram_dir.c_str(), 0755) == 0);
  r = run_vmsave({"prepare", second, "--ram-dir", ram_dir, "--json"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  std::vector<std::string> extra = parse_json(r)["qemu_args"].get<std::vector<std::string>>();
  ::unlink(vm.qmp_path().c_str());
  const std::string qemu_log = vm.dir() + "/two-step-qemu.log";
  Child qemu(with_prepared(vm.command(), extra), qemu_log);
  await_qmp_socket(vm, qemu, qemu_log);

  // The first save's device state on the second save's RAM would wedge the
  // guest: refused, and QEMU still waits for the right one.
  r = run_vmsave({"restore", first, "--qmp", vm.qmp_path()}, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: QEMU's RAM is not this image's (" + first +
                                    "): backend ram0 (" + ram_dir +
                                    "/ram0) differs from the image's block ram0 in chunk "),
                r.err);
  CHECK_MESSAGE(contains(r.err, "vmsave prepare " + first), r.err);
  CHECK(qmp_status(vm.qmp_path()) == "inmigrate");

  r = run_vmsave({"restore", second, "--qmp", vm.qmp_path()}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(wait_story([&] { return vm.serial_log(); }, saved.iteration + kMoreIterations,
                           kCarryOnTimeout, qemu.pid(), &line, &err),
                err);
  CHECK(line.checksum == saved.checksum);
}
TEST_CASE(
    "e2e: save fails within --qmp-timeout on a busy QMP socket, and at once on a "
    "missing one") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  const std::string out = vm.dir() + "/out";
  REQUIRE(::mkdir(out.c_str(), 0755) == 0);
  const std::string image = out + "/vm.vmsave";

  double t0 = now_s();
  RunResult r =
      run_vmsave({"save", "--qmp", vm.dir() + "/missing.sock", image, "--qmp-timeout", "10"}, 30);
  double missing_s = now_s() - t0;
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "does not exist"), r.err);
  CHECK_MESSAGE(missing_s < 2, missing_s << " s");
  // QEMU's -qmp syntax instead of a path: a usage error that says so.
  for (std::string addr : {std::string("tcp:127.0.0.1:4444"), "unix:" + vm.qmp_path() + ",server=on"}) {
    r = run_vmsave({"save", "--qmp", addr, image}, 30);
    CHECK_RUN(r, 2);
    CHECK_MESSAGE(contains(r.err, "vmsave talks QMP over a Unix socket only"), r.err);
  }
  // A monitor that greets and never answers: --qmp-timeout is the wait for
  // each reply too (it was 30 s whatever was asked).
  {
    const std::string fake = vm.dir() + "/fake.sock";
    UniqueFd ls(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", fake.c_str());
    REQUIRE(::bind(ls.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
    REQUIRE(::listen(ls.get(), 1) == 0);
    std::thread monitor([&] {
      UniqueFd c(::accept(ls.get(), nullptr, nullptr));
      const std::string greeting =
          R"({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}}, )"
          R"("capabilities": []}})"
          "\r\n";
      (void)!::write(c.get(), greeting.data(), greeting.size());
      char buf[256];
      while (c && ::read(c.get(), buf, sizeof(buf)) > 0) {
      }
    });
    t0 = now_s();
    r = run_vmsave({"save", "--qmp", fake, image, "--qmp-timeout", "2"}, 60);
    const double silent_s = now_s() - t0;
    monitor.join();  // vmsave has hung up
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(contains(r.err, "within 2 s"), r.err);
    CHECK_MESSAGE(silent_s < 10, silent_s << " s");
  }

  boot(vm, 1);
  {
    auto holder = QmpClient::connect(vm.qmp_path(), 10);
    REQUIRE_MESSAGE(holder.ok(), holder.error().message());
    t0 = now_s();
    r = run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--qmp-timeout", "2"}, 30);
    double busy_s = now_s() - t0;
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(contains(r.err, "another QMP client"), r.err);
    CHECK_MESSAGE(busy_s >= 1.5, busy_s << " s");
    CHECK_MESSAGE(busy_s < 5, busy_s << " s");
    // Ctrl-C ends that wait at once, not when the other client lets go.
    const std::string log = vm.dir() + "/busy-save.log";
    Child save({VMSAVE_BINARY, "save", "--qmp", vm.qmp_path(), image, "--qmp-timeout", "60"}, log);
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    save.signal(SIGINT);
    t0 = now_s();
    CHECK(save.wait(30) == 130);
    double interrupted_s = now_s() - t0;
    CHECK_MESSAGE(interrupted_s < 2, interrupted_s << " s");
    CHECK_MESSAGE(contains(slurp(log), "vmsave: error: interrupted"), slurp(log));
    // The connection we hold still works, and the guest never stopped.
    auto status = holder->execute("query-status");
    REQUIRE_MESSAGE(status.ok(), status.error().message());
    CHECK(status->value("status", "") == "running");
  }
  CHECK_MESSAGE(list_dir(out).empty(), joined(list_dir(out)));
}

TEST_CASE("e2e: restoring an image with damaged device state exits 3 and leaves no QEMU") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  const std::string image = saved_without_ram(vm);

  RunResult r = run_vmsave({"info", image, "--json"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  json info = parse_json(r);
  i64 offset = info.value("vmstate_offset", i64(0));
  i64 length = info.value("vmstate_bytes", i64(0));
  REQUIRE(offset > 0);
  REQUIRE(length > 0);
  {
    // Flip one byte in the middle of the device state.
    int fd = ::open(image.c_str(), O_RDWR | O_CLOEXEC);
    REQUIRE(fd >= 0);
    u8 byte = 0;
    i64 at = offset + length / 2;
    REQUIRE(pread(fd, &byte, 1, at) == 1);
    byte ^= 0x5a;
    REQUIRE(pwrite(fd, &byte, 1, at) == 1);
    ::close(fd);
  }
  for (bool lazy : {false, true}) {
    CAPTURE(lazy);
    r = run_vmsave(restore_args(image, vm.dir() + "/restore.log", lazy, vm.command()), kRunTimeout);
    CHECK_RUN(r, 3);
    CHECK_MESSAGE(contains(r.err, "image damaged"), r.err);
    CHECK(test::kill_qemu_mentioning(vm.dir()) == 0);
    // An eager restore removes the RAM file it filled.
    CHECK_FALSE(exists(vm.ram_path()));
  }
}

TEST_CASE("e2e: a restore that fails while it fills RAM stops the QEMU that daemonized") {
  test::require_guest_kit();
  TestVm vm({.ram_mib = 512, .memcheck_mib = 384});
  const auto [image, log_at_save, saved] = boot_and_save(vm);
  REQUIRE(::unlink(vm.ram_path().c_str()) == 0);
  // The last data page of the RAM region damaged: the fill, one request at
  // a time, fails after QEMU has daemonized.
  RunResult r = run_vmsave({"info", image, "--json"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  const json block = parse_json(r)["blocks"][0];
  const i64 begin = block.value("region_offset", i64(0));
  const i64 end = begin + block.value("size", i64(0));
  {
    int fd = ::open(image.c_str(), O_RDWR | O_CLOEXEC);
    REQUIRE(fd >= 0);
    off_t last = -1;
    for (off_t at = begin; (at = ::lseek(fd, at, SEEK_DATA)) >= 0 && at < end;)
      at = std::min<off_t>(::lseek(fd, at, SEEK_HOLE), end), last = at - 1;
    REQUIRE(last > begin);
    u8 byte = 0;
    REQUIRE(pread(fd, &byte, 1, last) == 1);
    byte ^= 0x5a;
    REQUIRE(pwrite(fd, &byte, 1, last) == 1);
    ::close(fd);
  }
  // The daemon was left waiting for its device state, holding its RAM file
  // and QMP socket; then, killed, it left the socket and its pidfile.
  const std::string pidfile = vm.dir() + "/qemu.pid";
  std::vector<std::string> args =
      restore_args(image, vm.dir() + "/restore.log", false,
                   plus(vm.command(), {"-daemonize", "-pidfile", pidfile}));
  args.insert(args.begin() + 1, {"--jobs", "1", "--queue-depth", "1"});
  r = run_vmsave(args, kRunTimeout);
  CHECK_RUN(r, 3);
  CHECK_MESSAGE(contains(r.err, "image damaged"), r.err);
  CHECK(test::kill_qemu_mentioning(vm.dir()) == 0);
  CHECK_FALSE(exists(vm.ram_path()));
  CHECK_FALSE(exists(vm.qmp_path()));
  CHECK_FALSE(exists(pidfile));
}

// Compressed, a flipped byte decompresses to garbage QEMU may refuse before
// the section's end, where its checksum is compared: that is still damage
// (exit 3), not a command line that does not fit (exit 1).
TEST_CASE("e2e: a damaged compressed device state exits 3 wherever QEMU stops reading it") {
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  boot(vm, 1);
  const std::string image = vm.dir() + "/vm.vmsave";
  save_and_quit(vm, image, {"--compress", "zstd"});
  REQUIRE(::unlink(vm.ram_path().c_str()) == 0);
  json info = parse_json(run_vmsave({"info", image, "--json"}, kRunTimeout));
  const i64 offset = info.value("vmstate_offset", i64(0));
  const i64 length = info.value("vmstate_stored_bytes", i64(0));
  REQUIRE(offset > 0);
  REQUIRE(length > 64);
  auto flip = [&](i64 at) {
    int fd = ::open(image.c_str(), O_RDWR | O_CLOEXEC);
    REQUIRE(fd >= 0);
    u8 byte = 0;
    REQUIRE(pread(fd, &byte, 1, at) == 1);
    byte ^= 0xff;
    REQUIRE(pwrite(fd, &byte, 1, at) == 1);
    ::close(fd);
  };
  for (int eighth = 1; eighth < 8; eighth++) {
    CAPTURE(eighth);
    const i64 at = offset + length * eighth / 8;
    flip(at);
    RunResult r =
        run_vmsave(restore_args(image, vm.dir() + "/restore.log", false, vm.command()), kRunTimeout);
    CHECK_RUN(r, 3);
    CHECK_MESSAGE(contains(r.err, "image damaged"), r.err);
    CHECK_MESSAGE(!contains(r.err, "QEMU refused"), r.err);
    CHECK(test::kill_qemu_mentioning(vm.dir()) == 0);
    CHECK_FALSE(exists(vm.ram_path()));
    flip(at);  // back as saved
  }
  // Put back, it restores.
  REQUIRE_RUN(run_vmsave({"verify", image}, kRunTimeout), 0);
}

// Runs `vmsave ARGS` and returns its exit status (for info and verify).
int vmsave_status(const std::vector<std::string>& args) {
  return run_vmsave(args, kRunTimeout).status;
}

TEST_CASE(
    "e2e: SIGKILL at 20 or more points of a save never leaves an image that info accepts and "
    "verify rejects, and the guest resumes each time") {
  test::require_guest_kit();
  // 256 MiB of data: a save takes long enough (~0.5 s with process start)
  // that kill times spread evenly over it land in every step of it.
  TestVm vm({.ram_mib = 512, .memcheck_mib = 256});
  boot(vm, 1);
  const std::string out = vm.dir() + "/out";
  REQUIRE(::mkdir(out.c_str(), 0755) == 0);
  // Even points replace a previous image (--force), odd ones write a new
  // path: after a kill the first must still hold a complete image (old or
  // new), the second a complete image or nothing.
  const std::string previous = out + "/previous.vmsave";
  const std::string fresh = out + "/fresh.vmsave";
  auto save_args = [&](const std::string& image) {
    return std::vector<std::string>{VMSAVE_BINARY,     "save",   "--qmp", vm.qmp_path(), image,
                                    "--leave-running", "--force"};
  };

  // The save's duration T, the shorter of two full runs (the second has a
  // warm page cache, as every later one does).
  double T = 1e9;
  for (int i = 0; i < 2; i++) {
    double t0 = now_s();
    Child save(save_args(previous), out + "/../measure.log");
    REQUIRE(save.wait(kRunTimeout) == 0);
    T = std::min(T, now_s() - t0);
  }
  REQUIRE(vmsave_status({"verify", previous}) == 0);
  MESSAGE("a full save takes " << T << " s");

  // Kill times are fractions of T: 0/24 .. 23/24, then the midpoints
  // between them if fewer than 24 kills have landed. A save that finished
  // before its kill shows it ran faster than T (other tests load the
  // machine unevenly), so T shrinks to that delay and the later points
  // spread over the shorter run.
  constexpr int kWanted = 24;
  std::vector<double> fractions;
  for (int i = 0; i < kWanted; i++) fractions.push_back(double(i) / kWanted);
  for (int i = 0; i < kWanted; i++) fractions.push_back((i + 0.5) / kWanted);
  int killed = 0, finished = 0, points = 0;
  for (int i = 0; i < int(fractions.size()) && killed < kWanted; i++) {
    const std::string& target = i % 2 ? fresh : previous;
    const double delay = T * fractions[i];
    points++;
    CAPTURE(i);
    CAPTURE(delay);
    int status;
    {
      Child save(save_args(target), vm.dir() + "/killed-save.log");
      std::this_thread::sleep_for(std::chrono::duration<double>(delay));
      save.signal(SIGKILL);
      status = save.wait(kRunTimeout);
    }
    if (status == 128 + SIGKILL) {
      killed++;
    } else {
      CHECK_MESSAGE(status == 0,
                    "status " << status << ": " << slurp(vm.dir() + "/killed-save.log"));
      finished++;
      if (i > 0) T = std::min(T, delay);
    }
    // What is at the target is a complete image, or (new path) nothing.
    if (exists(target)) {
      int info = vmsave_status({"info", target});
      int verified = vmsave_status({"verify", target});
      CHECK_MESSAGE(info == 0, "info of " << target << " exits " << info);
      CHECK_MESSAGE(verified == 0, "info exits " << info << " but verify exits " << verified);
    } else {
      CHECK_MESSAGE(target == fresh, "the previous image is gone");
    }
    // No temporary file is left beside it (O_TMPFILE has no name).
    for (const std::string& name : list_dir(out))
      CHECK_MESSAGE((name == "previous.vmsave" || name == "fresh.vmsave"), "left behind: " << name);
    std::filesystem::remove(fresh);

    // The guest: vmsave died before stopping it, after resuming it, or
    // with it stopped, and then its watchdog resumed it (this connection
    // waits until the watchdog leaves). Either way it runs, x-ignore-shared
    // is off, and memcheck carries on intact.
    REQUIRE(qmp_status(vm.qmp_path()) == "running");
    CHECK_FALSE(x_ignore_shared(vm));
    // One more verified pass of its buffer is enough: it runs, intact.
    std::string err;
    REQUIRE_MESSAGE(carries_on(vm, 1, &err), err);
  }
  MESSAGE(killed << " saves killed part-way, " << finished << " finished before the kill");
  test::record_figure("kill_points", points);
  test::record_figure("kill_points_killed", killed);
  test::record_figure("kill_points_finished", finished);
  test::record_figure("kill_save_seconds", T);
  CHECK(killed >= 20);

  // A save still works after all that, and its image verifies.
  REQUIRE(vmsave_status({"verify", previous}) == 0);
  {
    Child save(save_args(previous), vm.dir() + "/final-save.log");
    CHECK(save.wait(kRunTimeout) == 0);
  }
  CHECK(vmsave_status({"verify", previous}) == 0);
}

TEST_CASE(
    "e2e: SIGTERM during a save stops cleanly with 130, a QEMU that stops answering gets its "
    "guest back from the watchdog, and a killed QEMU fails the save with 1") {
  test::require_guest_kit();
  TestVm vm({.ram_mib = 512, .memcheck_mib = 384});
  boot(vm, 1);
  const std::string out = vm.dir() + "/out";
  REQUIRE(::mkdir(out.c_str(), 0755) == 0);
  const std::string image = out + "/vm.vmsave";

  // SIGTERM, as SIGINT: exit 130, guest running, nothing at the target.
  Interrupted in;
  for (int attempt = 0; attempt < 4 && !(in.caught && in.status == 130); attempt++) {
    in = interrupt_save(vm, image, SIGTERM);
    if (in.status == 0) std::filesystem::remove(image);
  }
  REQUIRE_MESSAGE(in.caught, "no save reached its RAM phase");
  CHECK_MESSAGE(in.status == 130, "status " << in.status << ": " << in.err);
  CHECK_MESSAGE(contains(in.err, "vmsave: error: interrupted"), in.err);
  CHECK_MESSAGE(list_dir(out).empty(), joined(list_dir(out)));
  CHECK(qmp_status(vm.qmp_path()) == "running");
  std::string err;
  CHECK_MESSAGE(carries_on(vm, 2, &err), err);

  // QEMU stopped (SIGSTOP) while vmsave writes RAM: its next QMP command
  // gets no answer (within 2 s here instead of 30), nor does its clean-up.
  const pid_t qemu = vm.pid();
  in = interrupt_save(vm, image, 0, [&] { ::kill(qemu, SIGSTOP); }, "writing RAM (guest paused)",
                      {"VMSAVE_FAULT=qmp-timeout:2"});
  ::kill(qemu, SIGCONT);
  REQUIRE(in.caught);
  CHECK_MESSAGE(in.status == 1, "status " << in.status << ": " << in.err);
  CHECK_MESSAGE(contains(in.err, "vmsave: error: QEMU did not answer"), in.err);
  CHECK_MESSAGE(contains(in.err, "vmsave's watchdog (pid "), in.err);
  CHECK_MESSAGE(list_dir(out).empty(), joined(list_dir(out)));
  // QEMU answers again: the watchdog resumes the guest, puts x-ignore-shared
  // back and lets go of the QMP socket.
  double deadline = now_s() + 60;
  std::string status;
  while ((status = qmp_status(vm.qmp_path())) != "running" && now_s() < deadline)
    std::this_thread::sleep_for(kPoll);
  CHECK(status == "running");
  CHECK_FALSE(x_ignore_shared(vm));
  CHECK_MESSAGE(carries_on(vm, 2, &err), err);
  // Once vmsave has handed over, the watchdog says nothing: it told the
  // terminal "the save was killed part-way" after vmsave's own error.
  const size_t at = in.err.find("vmsave's watchdog (pid ");
  REQUIRE(at != std::string::npos);
  const pid_t watchdog = std::atoi(in.err.c_str() + at + 23);
  REQUIRE(watchdog > 0);
  for (double until = now_s() + 30; ::kill(watchdog, 0) == 0 && now_s() < until;)
    std::this_thread::sleep_for(kPoll);
  CHECK_MESSAGE(!contains(slurp(in.log), "killed part-way"), slurp(in.log));

  // QEMU killed while vmsave writes RAM: the save stops at once (it wrote
  // on to the end of the RAM file, then failed on the device state), fails
  // with 1 naming the cause, and no image appears. Nothing is left to put
  // back: no word of the watchdog or of `cont` (that was said too).
  const pid_t killed = vm.pid();
  in = interrupt_save(vm, image, 0, [&] { vm.kill_qemu(); });
  REQUIRE(in.caught);
  CHECK_MESSAGE(in.status == 1, "status " << in.status << ": " << in.err);
  CHECK_MESSAGE(contains(in.err, fmt::format("vmsave: error: QEMU exited during the save ({}): "
                                             "process {} is gone; no image was written",
                                             vm.qmp_path(), killed)),
                in.err);
  CHECK_MESSAGE(!contains(in.err, "warning"), in.err);
  CHECK_MESSAGE(list_dir(out).empty(), joined(list_dir(out)));
}

TEST_CASE(
    "e2e: an I/O fault or a full disk during a save fails it with 1, keeps the old image and "
    "resumes the guest") {
  test::require_guest_kit();
  test::require_mount("tmpfs");
  TestVm vm(kSmallVm);
  boot(vm);
  const std::string out = vm.dir() + "/out";
  REQUIRE(::mkdir(out.c_str(), 0755) == 0);
  const std::string image = out + "/vm.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--leave-running"}, kRunTimeout),
              0);
  auto uuid = [&] {
    RunResult i = run_vmsave({"info", image, "--json"}, kRunTimeout);
    REQUIRE_RUN(i, 0);
    return parse_json(i).value("uuid", "");
  };
  const std::string first = uuid();
  auto guest_runs_on = [&] {
    CHECK(qmp_status(vm.qmp_path()) == "running");
    std::string err;
    CHECK_MESSAGE(carries_on(vm, 2, &err), err);
  };

  // The Nth RAM write fails: the save (a plain one, that would make QEMU
  // quit) stops, the guest runs again, and the image already at the
  // target is the one that was there, whole.
  for (const char* kind : {"eio", "enospc"}) {
    for (int nth : {1, 20}) {
      CAPTURE(std::string(kind));
      CAPTURE(nth);
      RunResult r = run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--force"}, kRunTimeout,
                               {"VMSAVE_FAULT=" + std::to_string(nth) + ":" + kind});
      CHECK_RUN(r, 1);
      CHECK_MESSAGE(contains(r.err, std::string(kind) == "eio" ? "Input/output error"
                                                               : "No space left on device"),
                    r.err);
      CHECK_MESSAGE(contains(r.err, image), r.err);
      CHECK_MESSAGE(list_dir(out) == std::vector<std::string>{"vm.vmsave"}, joined(list_dir(out)));
      CHECK(uuid() == first);
      CHECK_RUN(run_vmsave({"verify", image}, kRunTimeout), 0);
      guest_runs_on();
      test::record_figure("faults_injected_e2e", 1);
    }
  }

  // A real full filesystem: 16 MiB cannot hold the guest's 64 MiB of data.
  TempMount small("tmpfs", "size=16m");
  REQUIRE_MESSAGE(small.ok(), small.error());
  RunResult r = run_vmsave({"save", "--qmp", vm.qmp_path(), small / "vm.vmsave"}, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "No space left on device"), r.err);
  CHECK_MESSAGE(contains(r.err, "free space"), r.err);
  CHECK_MESSAGE(list_dir(small.path()).empty(), joined(list_dir(small.path())));
  guest_runs_on();
}

// The permissions column of the first line of /proc/PID/maps that maps
// `path` ("r--p", "rw-s", ...), or "" when none does.
std::string map_perms(pid_t pid, const std::string& path) {
  std::string maps = maps_of(pid);
  size_t pos = 0;
  for (size_t nl; (nl = maps.find('\n', pos)) != std::string::npos; pos = nl + 1) {
    std::string line = maps.substr(pos, nl - pos);
    if (line.size() >= path.size() &&
        line.compare(line.size() - path.size(), path.size(), path) == 0) {
      size_t sp = line.find(' ');
      return sp == std::string::npos ? "" : line.substr(sp + 1, 4);
    }
  }
  return "";
}

TEST_CASE(
    "e2e: 8 lazy clones and an eager restore of one image at once, verify alongside, then two "
    "VMs saved at once into one directory, and every guest carries on") {
  test::require_guest_kit();
  // Small guests: nine TCG guests share two cores.
  TestVm vm({.ram_mib = 128, .memcheck_mib = 16});
  const auto [image, log_at_save, saved] = boot_and_save(vm);
  const std::string image_bytes = slurp(image);
  REQUIRE(::unlink(vm.ram_path().c_str()) == 0);  // the eager restore rebuilds it

  constexpr int kClones = 8;
  struct Guest {
    std::string sock, log;
    RunResult restore;
    StartedQemu qemu;
  };
  std::vector<Guest> guests(kClones + 1);  // [kClones] is the eager restore
  std::vector<std::vector<std::string>> args(kClones + 1);
  for (int i = 0; i < kClones; i++) {
    guests[i].sock = vm.dir() + fmt::format("/clone{}.sock", i);
    guests[i].log = vm.dir() + fmt::format("/clone{}.log", i);
    auto cmd = rewrite(rewrite(vm.command(), vm.qmp_path(), guests[i].sock), vm.serial_path(),
                       guests[i].log);
    args[i] = restore_args(image, vm.dir() + fmt::format("/clone{}-qemu.log", i), true, cmd);
  }
  guests[kClones].sock = vm.qmp_path();
  guests[kClones].log = vm.serial_path();
  args[kClones] = restore_args(image, vm.dir() + "/eager-qemu.log", false, vm.command());

  // All nine restores and two verifies start together.
  RunResult verifies[2];
  {
    std::vector<std::thread> threads;
    for (int i = 0; i <= kClones; i++)
      threads.emplace_back([&, i] { guests[i].restore = run_vmsave(args[i], 240); });
    for (auto& v : verifies)
      threads.emplace_back([&] { v = run_vmsave({"verify", image, "--json"}, 240); });
    for (auto& t : threads) t.join();
  }
  for (auto& v : verifies) CHECK_RUN(v, 0);
  for (int i = 0; i <= kClones; i++) {
    CAPTURE(i);
    REQUIRE_RUN(guests[i].restore, 0);
    json j = parse_json(guests[i].restore);
    guests[i].qemu.pid = j.value("pid", -1);
    REQUIRE(guests[i].qemu.pid > 0);
    CHECK(j.value("mode", "") == (i < kClones ? "lazy" : "eager"));
  }

  // Every guest carries on from the saved iteration, intact. The log of a
  // clone continues the original's; the eager one appends to it.
  auto story_of = [&](int i) {
    return i < kClones ? log_at_save + slurp(guests[i].log) : slurp(guests[i].log);
  };
  for (int i = 0; i <= kClones; i++) {
    CAPTURE(i);
    std::string err;
    CHECK_MESSAGE(wait_story([&] { return story_of(i); }, saved.iteration + 2, 240,
                             guests[i].qemu.pid, nullptr, &err),
                  err);
  }
  // A lazy clone maps the image privately (copy-on-write, opened read-only):
  // no guest can write to it, and nine guests later it is byte for byte
  // what was saved.
  for (int i = 0; i < kClones; i++) {
    std::string perms = map_perms(guests[i].qemu.pid, image);
    CHECK_MESSAGE((perms.size() == 4 && perms[3] == 'p'), "clone " << i << ": " << perms);
  }

  // Two running VMs saved at the same moment into one directory. Lazy
  // clones have private RAM, which cannot be saved, so the two are the
  // eager restore and a second eager restore with its own RAM file.
  Guest second;
  second.sock = vm.dir() + "/second.sock";
  second.log = vm.dir() + "/second.log";
  {
    auto cmd = rewrite(
        rewrite(rewrite(vm.command(), vm.qmp_path(), second.sock), vm.serial_path(), second.log),
        vm.ram_path(), vm.shm_dir() + "/second-ram");
    REQUIRE(cmd != vm.command());
    second.restore =
        run_vmsave(restore_args(image, vm.dir() + "/second-qemu.log", false, cmd), 240);
    REQUIRE_RUN(second.restore, 0);
    second.qemu.pid = parse_json(second.restore).value("pid", -1);
    REQUIRE(second.qemu.pid > 0);
  }
  const std::string out = vm.dir() + "/out";
  REQUIRE(::mkdir(out.c_str(), 0755) == 0);
  const std::string socks[2] = {guests[kClones].sock, second.sock};
  RunResult saves[2];
  {
    std::vector<std::thread> threads;
    for (int k = 0; k < 2; k++) {
      threads.emplace_back([&, k] {
        saves[k] = run_vmsave(
            {"save", "--qmp", socks[k], out + fmt::format("/vm{}.vmsave", k), "--leave-running"},
            240);
      });
    }
    for (auto& t : threads) t.join();
  }
  CHECK(list_dir(out) == std::vector<std::string>{"vm0.vmsave", "vm1.vmsave"});
  for (int k = 0; k < 2; k++) {
    CAPTURE(k);
    CHECK_RUN(saves[k], 0);
    CHECK_RUN(run_vmsave({"verify", out + fmt::format("/vm{}.vmsave", k)}, 240), 0);
    CHECK(qmp_status(socks[k]) == "running");
  }
  {
    std::string err;
    CHECK_MESSAGE(wait_story([&] { return log_at_save + slurp(second.log); }, saved.iteration + 2,
                             240, second.qemu.pid, nullptr, &err),
                  err);
  }
  // And every guest is still running its memcheck without a CORRUPT line.
  for (int i = 0; i <= kClones; i++) {
    CAPTURE(i);
    std::string err;
    i64 now = read_story(story_of(i)).last->iteration;
    CHECK_MESSAGE(
        wait_story([&] { return story_of(i); }, now + 1, 240, guests[i].qemu.pid, nullptr, &err),
        err);
  }
  CHECK(slurp(image) == image_bytes);
  test::record_figure("concurrent_lazy_clones", kClones);
  test::record_figure("concurrent_eager_restores", 1);
  test::record_figure("concurrent_verifies", 2);
  test::record_figure("concurrent_saves", 2);
}

TEST_SUITE_END();

TEST_CASE("e2e: an image cut while a restore reads it is damage (exit 3), not a failure to retry") {
  // Opening checks the file against its header; a read meeting the end
  // later said "unexpected end of file" with status 1.
  if (access("/dev/shm", W_OK) != 0) test::skip("/dev/shm is not writable");
  test::TempDir shm("/dev/shm"), disk;
  const std::string src = shm / "ram", image = disk / "image.vmsave", out = shm / "out";
  test::write_pattern_file(src, 512 * kMiB, "random", 17);
  REQUIRE_RUN(run_vmsave({"save", "--ram", "ram=" + src, image}), 0);
  REQUIRE(::unlink(src.c_str()) == 0);
  REQUIRE(::mkdir(out.c_str(), 0700) == 0);
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  const std::string log = disk / "restore.log";
  int status = -1;
  bool cut = false;
  {
    // One request at a time from a disk: the cut lands long before the end.
    Child restore({VMSAVE_BINARY, "restore", image, "--ram-dir", out, "--jobs", "1",
                   "--queue-depth", "1", "--progress-fd", "3"},
                  log, p[1]);
    ::close(p[1]);
    std::string got;
    for (double deadline = now_s() + kRunTimeout; !cut && now_s() < deadline;) {
      pollfd pfd{p[0], POLLIN, 0};
      if (poll(&pfd, 1, 100) <= 0) continue;
      char buf[4096];
      ssize_t n = ::read(p[0], buf, sizeof buf);
      if (n <= 0) break;
      got.append(buf, size_t(n));
      for (size_t nl; !cut && (nl = got.find('\n')) != std::string::npos;) {
        json j = json::parse(got.substr(0, nl), nullptr, false);
        got.erase(0, nl + 1);
        if (j.is_object() && j.value("phase", "") == "reading RAM" && !j.value("final", true)) {
          REQUIRE(::truncate(image.c_str(), 8 * kMiB) == 0);
          cut = true;
        }
      }
    }
    status = restore.wait(kRunTimeout);
  }
  ::close(p[0]);
  REQUIRE(cut);
  const std::string err = slurp(log);
  CHECK_MESSAGE(status == 3, status << ": " << err);
  CHECK_MESSAGE(contains(err, "the file was cut to 8388608 bytes while vmsave read it"), err);
  CHECK_MESSAGE(!exists(out + "/ram"), "the RAM file of a failed restore was left behind");
}

TEST_CASE(
    "e2e: two backends in one RAM file (offset=) restore eagerly, and --force keeps what lies "
    "outside them") {
  // The restore made the file for the first backend, then met it for the
  // second: "RAM file exists" without --force, "another vmsave is filling
  // it" with. And --force recreated the whole file of a backend at offset=,
  // zeroing bytes that were not guest RAM.
  test::require_guest_kit();
  VmOptions opts = kSmallVm;
  opts.numa_nodes = 2;
  opts.one_ram_file = true;
  TestVm vm(opts);
  const auto [image, log_at_save, saved] = boot_and_save(vm);
  CHECK(json::parse(run_vmsave({"info", "--json", image}).out)["blocks"].size() == 2);
  REQUIRE(::unlink(vm.ram_path(0).c_str()) == 0);
  RunResult r =
      run_vmsave(restore_args(image, vm.dir() + "/restore.log", false, vm.command()), kRunTimeout);
  REQUIRE_RUN(r, 0);
  const pid_t first = parse_json(r).value("pid", -1);
  {
    StartedQemu qemu{first};
    check_carries_on(vm, saved, first);
  }
  // QEMU gone, its file stays: a tail past both backends that no guest
  // uses, which --force must leave alone.
  const i64 end = kSmallVm.ram_mib * kMiB;
  REQUIRE(test::file_size(vm.ram_path(0)) == end);
  {
    std::ofstream out(vm.ram_path(0), std::ios::app | std::ios::binary);
    out << "not guest RAM";
  }
  // The next restore goes on from the same save: the log as it was then.
  {
    std::ofstream log(vm.serial_path(), std::ios::trunc | std::ios::binary);
    log << log_at_save;
  }
  r = run_vmsave(restore_args(image, vm.dir() + "/restore2.log", false, vm.command()), kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "RAM file exists (" + vm.ram_path(0) + ")"), r.err);
  std::vector<std::string> args =
      restore_args(image, vm.dir() + "/restore3.log", false, vm.command());
  args.insert(args.begin() + 1, "--force");
  r = run_vmsave(args, kRunTimeout);
  REQUIRE_RUN(r, 0);
  StartedQemu qemu{parse_json(r).value("pid", -1)};
  CHECK(test::read_file(vm.ram_path(0)).substr(size_t(end)) == "not guest RAM");
  check_carries_on(vm, saved, qemu.pid);
}

TEST_CASE(
    "e2e: the RAM file of a QEMU that daemonized after opening a relative mem-path is named as "
    "left") {
  // -daemonize moves QEMU to /: the save found the file through QEMU's
  // mappings, but looked for it from / to say it was left behind, and
  // said nothing while it kept the guest's memory in /dev/shm.
  test::require_guest_kit();
  VmOptions opts = kSmallVm;
  opts.relative_mem_path = true;
  TestVm vm(opts);  // QEMU started by hand below, daemonized
  const std::string dir = std::filesystem::path(vm.ram_path(0)).parent_path().string();
  std::vector<std::string> argv = {"sh", "-c", "cd \"$1\" && shift && exec \"$@\"", "sh", dir};
  for (auto& a : vm.command()) argv.push_back(a);
  argv.insert(argv.end(), {"-S", "-daemonize"});
  REQUIRE_RUN(test::run_program(argv, 60), 0);
  const std::string image = vm.dir() + "/vm.vmsave";
  RunResult r = run_vmsave({"save", "--qmp", vm.qmp_path(), image, "--json"}, kRunTimeout);
  CHECK(test::kill_qemu_mentioning(vm.dir()) == 0);  // it quit
  REQUIRE_RUN(r, 0);
  CHECK(parse_json(r)["ram_files_left"] == json::array({vm.ram_path(0)}));
  r = run_vmsave({"save", "--qmp", vm.qmp_path(), image}, 5);  // nothing to do: QEMU is gone
  CHECK(r.status != 0);
}

TEST_CASE(
    "e2e: restore --qmp refuses a lazy QEMU that maps another save of the VM (the image was "
    "replaced)") {
  // Content samples are all restore --qmp compared: with an image mv'd over
  // the one QEMU had opened, a trial's guest ran on one save's RAM under
  // the other's device state, exit 0, 3 runs of 3.
  test::require_guest_kit();
  TestVm vm(kSmallVm);
  boot(vm);
  const std::string first = vm.dir() + "/first.vmsave", second = vm.dir() + "/second.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--qmp", vm.qmp_path(), first, "--leave-running"}, kRunTimeout),
              0);
  const std::string log_at_first = vm.serial_log();
  const MemcheckLine saved = *read_story(log_at_first).last;
  save_and_quit(vm, second);

  const std::string image = vm.dir() + "/vm.vmsave";
  std::filesystem::copy_file(first, image);
  RunResult r = run_vmsave({"prepare", image, "--lazy", "--json"}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  const auto extra = parse_json(r)["qemu_args"].get<std::vector<std::string>>();
  ::unlink(vm.qmp_path().c_str());
  {
    std::ofstream log(vm.serial_path(), std::ios::trunc | std::ios::binary);
    log << log_at_first;
  }
  Child qemu(with_prepared(vm.command(), extra), vm.dir() + "/two-step-qemu.log");
  await_qmp_socket(vm, qemu, vm.dir() + "/two-step-qemu.log");
  // QEMU maps the first save; the path now names the second.
  std::filesystem::copy_file(second, image + ".new");
  std::filesystem::rename(image + ".new", image);
  r = run_vmsave({"restore", image, "--qmp", vm.qmp_path()}, kRunTimeout);
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(
      contains(r.err, "QEMU's RAM is not this image's (" + image + "): backend ram0 (" + image +
                          ") maps another vmsave image (replaced since QEMU opened it?)"),
      r.err);
  CHECK(qmp_status(vm.qmp_path()) == "inmigrate");
  // The save QEMU does map, under another name: its own device state.
  r = run_vmsave({"restore", first, "--qmp", vm.qmp_path()}, kRunTimeout);
  REQUIRE_RUN(r, 0);
  check_carries_on(vm, saved, qemu.pid());
}
