// TestVm: boots the memcheck test guest under real QEMU for end-to-end tests
// (see vm_fixture.h). It exists so that every test that saves or restores a
// running VM starts from the same known guest, reads its health from the
// serial log the same way, and can never leave a QEMU process or a RAM file
// in /dev/shm behind, whatever the test does or however it fails.
//
// Plain POSIX on purpose: fork/exec, /proc scanning and polling with fixed
// intervals, no other project code, so the fixture stays usable even when the
// code under test is broken.

#include "tests/vm_fixture.h"

#include "tests/test_util.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/core.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <thread>

namespace vmsave::test {
namespace {

constexpr const char* kQemu = "qemu-system-x86_64";
constexpr const char* kDirPrefix = "vmsave-test-";
constexpr const char* kShmRoot = "/dev/shm";
// Written into the /dev/shm directory: "<pid>\n<other dir>\n", so a later
// TestVm can sweep directories whose test process was killed.
constexpr const char* kOwnerFile = ".owner";
// QEMU creates its QMP socket before the guest runs; 30 s covers a loaded
// 2-core CI machine allocating a few GiB of backing files.
constexpr double kStartTimeout = 30;
// After SIGKILL a process is normally gone within milliseconds; a QEMU
// tearing down gigabytes of mappings can take a second or two.
constexpr double kKillTimeout = 10;
constexpr auto kPollInterval = std::chrono::milliseconds(20);
// The guest prints a line every ~200 ms, so 50 ms polling adds little delay.
constexpr auto kSerialPollInterval = std::chrono::milliseconds(50);
constexpr size_t kTailLines = 15;

std::string errno_text(int e) {
  return std::strerror(e);
}

// Whole file, or "" if it cannot be read (a log that does not exist yet).
std::string slurp(const std::string& path) {
  std::string data;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return data;
  char buf[65536];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    data.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return data;
}

// Complete lines only (a line still being written has no '\n' yet), each
// without its trailing "\r".
std::vector<std::string> complete_lines(const std::string& log) {
  std::vector<std::string> lines;
  size_t pos = 0;
  for (;;) {
    size_t nl = log.find('\n', pos);
    if (nl == std::string::npos) break;
    size_t end = nl;
    while (end > pos && (log[end - 1] == '\r')) end--;
    lines.emplace_back(log, pos, end - pos);
    pos = nl + 1;
  }
  return lines;
}

std::string tail_of(const std::string& text, size_t max_lines) {
  if (text.empty()) return "(empty)";
  size_t pos = text.size();
  if (pos > 0 && text[pos - 1] == '\n') pos--;
  for (size_t n = 0; n < max_lines && pos > 0; n++) {
    size_t nl = text.rfind('\n', pos - 1);
    if (nl == std::string::npos) return text;
    pos = nl;
  }
  return pos == 0 ? text : text.substr(pos + 1);
}

// Finds "memcheck ok <iteration> <checksum>" anywhere in the line, since a
// console escape sequence or a stray kernel message may precede it.
bool parse_ok_line(const std::string& line, MemcheckLine* out) {
  static const std::string kTag = "memcheck ok ";
  size_t at = line.find(kTag);
  if (at == std::string::npos) return false;
  const char* p = line.c_str() + at + kTag.size();
  char* end = nullptr;
  errno = 0;
  long long iteration = std::strtoll(p, &end, 10);
  if (errno || end == p || *end != ' ') return false;
  std::string checksum;
  for (const char* c = end + 1; std::isxdigit(static_cast<unsigned char>(*c)); c++) {
    checksum.push_back(*c);
  }
  if (checksum.empty()) return false;
  out->iteration = iteration;
  out->checksum = checksum;
  return true;
}

bool is_corrupt_line(const std::string& line) {
  return line.find("memcheck CORRUPT") != std::string::npos;
}

bool find_in_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  size_t pos = 0;
  while (pos <= dirs.size()) {
    size_t colon = dirs.find(':', pos);
    if (colon == std::string::npos) colon = dirs.size();
    std::string dir = dirs.substr(pos, colon - pos);
    if (dir.empty()) dir = ".";
    if (access((dir + "/" + name).c_str(), X_OK) == 0) return true;
    pos = colon + 1;
  }
  return false;
}

bool want_kvm() {
  const char* accel = std::getenv("VMSAVE_TEST_ACCEL");
  return accel && std::string(accel) == "kvm";
}

// The parent directory for the non-RAM files: $TMPDIR unless the QMP socket
// path would not fit in sockaddr_un (108 bytes).
std::string tmp_parent() {
  const char* tmpdir = std::getenv("TMPDIR");
  std::string parent = tmpdir && *tmpdir ? tmpdir : "/tmp";
  size_t needed = parent.size() + 1 + std::strlen(kDirPrefix) + 6 + std::strlen("/qmp.sock");
  if (needed >= sizeof(sockaddr_un::sun_path)) parent = "/tmp";
  return parent;
}

bool make_temp_dir(const std::string& parent, std::string* out, std::string* err) {
  std::string templ = parent + "/" + kDirPrefix + "XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) {
    *err = fmt::format("mkdtemp {}: {}", templ, errno_text(errno));
    return false;
  }
  *out = buf.data();
  return true;
}

void remove_tree(const std::string& path) {
  if (path.empty()) return;
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
}

// Waits up to `timeout_s` for our child `pid` to exit and reaps it.
// Returns its wait status, or -1 if it did not exit in time.
int reap_child(pid_t pid, double timeout_s) {
  double deadline = now_s() + timeout_s;
  for (;;) {
    int status = 0;
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) return status;
    if (r < 0 && errno != EINTR) return -1;  // not our child (anymore)
    if (now_s() > deadline) return -1;
    std::this_thread::sleep_for(kPollInterval);
  }
}

// True once `pid` no longer runs: gone, or a zombie its parent has yet to reap.
// A zombie leader is gone only once its other threads are: until the last
// has exited, QEMU's files (its disks' locks, its sockets) stay open.
bool process_gone(pid_t pid) {
  std::string stat = slurp(fmt::format("/proc/{}/stat", pid));
  if (stat.empty()) return true;
  size_t paren = stat.rfind(')');
  if (paren == std::string::npos || paren + 2 >= stat.size() ||
      (stat[paren + 2] != 'Z' && stat[paren + 2] != 'X'))
    return false;
  std::error_code ec;
  auto threads = std::filesystem::directory_iterator(fmt::format("/proc/{}/task", pid), ec);
  return ec || std::distance(threads, std::filesystem::directory_iterator()) <= 1;
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with status {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return fmt::format("killed by signal {}", WTERMSIG(status));
  return fmt::format("wait status {}", status);
}

// Removes /dev/shm/vmsave-test-* directories whose owning test process no
// longer exists (it was killed before its destructor ran), along with the
// other directory it recorded and any QEMU still using them.
void sweep_stale_dirs() {
  DIR* d = opendir(kShmRoot);
  if (!d) return;
  std::vector<std::string> stale;
  while (dirent* e = readdir(d)) {
    if (std::strncmp(e->d_name, kDirPrefix, std::strlen(kDirPrefix)) != 0) continue;
    std::string dir = std::string(kShmRoot) + "/" + e->d_name;
    // No owner file yet: a TestVm being constructed right now. Leave it.
    std::string owner = slurp(dir + "/" + kOwnerFile);
    pid_t pid = static_cast<pid_t>(std::atol(owner.c_str()));
    if (pid <= 0 || kill(pid, 0) == 0 || errno != ESRCH) continue;
    stale.push_back(dir);
  }
  closedir(d);
  for (const std::string& dir : stale) {
    auto lines = complete_lines(slurp(dir + "/" + kOwnerFile));
    kill_qemu_mentioning(dir);
    if (lines.size() >= 2 && lines[1].find(std::string("/") + kDirPrefix) != std::string::npos) {
      kill_qemu_mentioning(lines[1]);
      remove_tree(lines[1]);
    }
    remove_tree(dir);
  }
}

}  // namespace

std::string guest_kit_dir() {
  if (const char* env = std::getenv("VMSAVE_GUEST_DIR"); env && *env) return env;
#ifdef VMSAVE_GUEST_DIR
  return VMSAVE_GUEST_DIR;
#else
  return "";
#endif
}

void require_guest_kit() {
  std::string why;
  if (!guest_kit_available(&why)) skip(why);
}

bool guest_kit_available(std::string* why) {
  std::string dir = guest_kit_dir();
  auto fail = [&](std::string text) {
    if (why) *why = std::move(text);
    return false;
  };
  if (dir.empty()) return fail("no guest kit: VMSAVE_GUEST_DIR is not set");
  for (const char* name : {"vmlinuz", "initrd.img"}) {
    std::string path = dir + "/" + name;
    if (access(path.c_str(), R_OK) != 0) {
      return fail(fmt::format("no guest kit: {}: {} (run scripts/setup)", path, errno_text(errno)));
    }
  }
  if (!find_in_path(kQemu))
    return fail(fmt::format("{} not found in PATH (run scripts/setup)", kQemu));
  if (access(kShmRoot, W_OK | X_OK) != 0) {
    return fail(fmt::format("{} not writable: {}", kShmRoot, errno_text(errno)));
  }
  if (want_kvm()) {
    if (access("/dev/kvm", R_OK | W_OK) != 0) {
      return fail(fmt::format("VMSAVE_TEST_ACCEL=kvm but /dev/kvm: {}", errno_text(errno)));
    }
    // Inside a VM without nested virtualization /dev/kvm can exist while
    // guests never run (so on this project's machines: QEMU just hangs).
    std::string cpuinfo = slurp("/proc/cpuinfo");
    if (cpuinfo.find(" vmx") == std::string::npos && cpuinfo.find(" svm") == std::string::npos) {
      return fail(
          "VMSAVE_TEST_ACCEL=kvm but the CPU has no vmx/svm flag (no nested virtualization)");
    }
  }
  return true;
}

TestVm::TestVm(VmOptions opts) : opts_(std::move(opts)) {
  if (opts_.numa_nodes < 1) opts_.numa_nodes = 1;
  if (opts_.cpus < 1) opts_.cpus = 1;
  sweep_stale_dirs();
  if (!make_temp_dir(kShmRoot, &shm_dir_, &setup_error_)) return;
  if (!make_temp_dir(tmp_parent(), &dir_, &setup_error_)) return;
  int fd =
      open((shm_dir_ + "/" + kOwnerFile).c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd >= 0) {
    std::string owner = fmt::format("{}\n{}\n", getpid(), dir_);
    [[maybe_unused]] ssize_t n = write(fd, owner.data(), owner.size());
    close(fd);
  }
}

TestVm::~TestVm() {
  try {
    kill_qemu();
    kill_qemu_mentioning(shm_dir_);
    kill_qemu_mentioning(dir_);
    remove_tree(shm_dir_);
    remove_tree(dir_);
  } catch (...) {
    // A destructor that throws would end the test binary; cleanup is best effort.
  }
}

std::string TestVm::ram_path(int node) const {
  return fmt::format("{}/ram{}", shm_dir_, node);
}

std::vector<std::string> TestVm::command() const {
  const std::string kit = guest_kit_dir();
  const bool kvm = want_kvm();
  const int nodes = opts_.numa_nodes;
  const int64_t node_mib = opts_.ram_mib / nodes;
  const int64_t total_mib = node_mib * nodes;

  std::vector<std::string> argv = {kQemu, "-name", "vmsave-test"};
  auto add = [&](std::initializer_list<std::string> args) {
    argv.insert(argv.end(), args.begin(), args.end());
  };
  auto kind = [&](int node) -> std::string {
    if (!opts_.node_backends.empty()) return opts_.node_backends.at(size_t(node));
    return opts_.shared_file_ram ? "file" : "ram";
  };
  auto backend = [&](int node, int64_t mib) {
    if (kind(node) == "file") {
      const int file = opts_.one_ram_file ? 0 : node;
      return fmt::format(
          "memory-backend-file,id=ram{},size={}M,share=on,mem-path={}{}{}{}", node, mib,
          opts_.relative_mem_path ? fmt::format("ram{}", file) : ram_path(file),
          opts_.one_ram_file && node > 0 ? fmt::format(",offset={}M", node * mib) : "",
          opts_.file_backend_props.empty() ? "" : ",", opts_.file_backend_props);
    }
    return fmt::format("memory-backend-{},id=ram{},size={}M", kind(node), node, mib);
  };

  std::string machine = fmt::format("q35,accel={}", kvm ? "kvm" : "tcg");
  if (nodes == 1) {
    if (opts_.shared_file_ram || !opts_.node_backends.empty()) {
      add({"-object", backend(0, total_mib)});
      machine += ",memory-backend=ram0";
    }
  } else {
    for (int i = 0; i < nodes; i++) {
      add({"-object", backend(i, node_mib), "-numa",
           fmt::format("node,nodeid={},memdev=ram{}", i, i)});
    }
  }
  add({"-machine", machine, "-m", fmt::format("{}M", total_mib), "-smp",
       std::to_string(opts_.cpus)});
  if (kvm) add({"-cpu", "host"});
  add({"-display", "none", "-nodefaults", "-no-user-config", "-no-reboot"});
  add({"-qmp", fmt::format("unix:{},server=on,wait=off", qmp_path())});
  // append=on: a clone restored with the same command line adds to the log
  // instead of truncating it, so a test sees the whole story.
  add({"-chardev", fmt::format("file,id=serial0,path={},append=on", serial_path()), "-serial",
       "chardev:serial0"});
  add({"-kernel", kit + "/vmlinuz", "-initrd", kit + "/initrd.img", "-append",
       fmt::format("console=ttyS0 quiet panic=-1 memcheck={} memcheck_dirty={}", opts_.memcheck_mib,
                   opts_.dirty_mib)});
  argv.insert(argv.end(), opts_.extra_args.begin(), opts_.extra_args.end());
  return argv;
}

bool TestVm::start(std::string* err) {
  if (!setup_error_.empty()) {
    *err = setup_error_;
    return false;
  }
  if (pid_ > 0) {
    *err = fmt::format("QEMU already running (pid {})", pid_);
    return false;
  }
  // Everything the child needs is prepared before fork: between fork and
  // exec only async-signal-safe calls are allowed (the test may be threaded).
  std::vector<std::string> args = command();
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const char* cwd = opts_.relative_mem_path ? shm_dir_.c_str() : nullptr;
  // QEMU maps a backend at offset= only from a file already that long.
  if (opts_.one_ram_file &&
      truncate(ram_path(0).c_str(), opts_.ram_mib * (int64_t(1) << 20)) != 0) {
    int fd = open(ram_path(0).c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    bool sized = fd >= 0 && ftruncate(fd, opts_.ram_mib * (int64_t(1) << 20)) == 0;
    if (fd >= 0) close(fd);
    if (!sized) {
      *err = fmt::format("cannot size {}: {}", ram_path(0), errno_text(errno));
      return false;
    }
  }

  int log_fd = open(qemu_log_path().c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    *err = fmt::format("open {}: {}", qemu_log_path(), errno_text(errno));
    return false;
  }
  int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  int report[2];
  if (null_fd < 0 || pipe2(report, O_CLOEXEC) != 0) {
    *err = fmt::format("open /dev/null or pipe2: {}", errno_text(errno));
    close(log_fd);
    if (null_fd >= 0) close(null_fd);
    return false;
  }

  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    *err = fmt::format("fork: {}", errno_text(errno));
    close(log_fd);
    close(null_fd);
    close(report[0]);
    close(report[1]);
    return false;
  }
  if (pid == 0) {
    // QEMU must not outlive the test process, even when it is SIGKILLed.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);  // the parent died before prctl
    dup2(null_fd, STDIN_FILENO);
    dup2(log_fd, STDOUT_FILENO);
    dup2(log_fd, STDERR_FILENO);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    signal(SIGPIPE, SIG_DFL);
    if (cwd && chdir(cwd) != 0) _exit(127);
    execvp(argv[0], argv.data());
    int e = errno;
    [[maybe_unused]] ssize_t n = write(report[1], &e, sizeof e);
    _exit(127);
  }
  close(log_fd);
  close(null_fd);
  close(report[1]);
  int exec_errno = 0;
  ssize_t n;
  do {
    n = read(report[0], &exec_errno, sizeof exec_errno);
  } while (n < 0 && errno == EINTR);
  close(report[0]);
  if (n == sizeof exec_errno) {
    reap_child(pid, kKillTimeout);
    *err = fmt::format("exec {}: {}", kQemu, errno_text(exec_errno));
    return false;
  }
  pid_ = pid;

  double deadline = now_s() + kStartTimeout;
  for (;;) {
    struct stat st;
    if (stat(qmp_path().c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) return true;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      *err = fmt::format("QEMU {} at startup; qemu.log:\n{}", describe_status(status),
                         tail_of(slurp(qemu_log_path()), kTailLines));
      return false;
    }
    if (now_s() > deadline) {
      *err = fmt::format("QMP socket {} did not appear within {} s; qemu.log:\n{}", qmp_path(),
                         kStartTimeout, tail_of(slurp(qemu_log_path()), kTailLines));
      kill_qemu();
      return false;
    }
    std::this_thread::sleep_for(kPollInterval);
  }
}

bool TestVm::wait_for_memcheck(int64_t min_iteration, double timeout_s, MemcheckLine* out,
                               std::string* err) {
  double deadline = now_s() + timeout_s;
  std::optional<MemcheckLine> last;
  for (;;) {
    // Look at the exit first and the log after, so lines printed just
    // before QEMU exited are still seen.
    int status = 0;
    bool exited = pid_ > 0 && waitpid(pid_, &status, WNOHANG) == pid_;
    if (exited) pid_ = -1;

    std::string log = serial_log();
    last.reset();
    for (const std::string& line : complete_lines(log)) {
      if (is_corrupt_line(line)) {
        *err = fmt::format("guest reported corruption: \"{}\"", line);
        return false;
      }
      MemcheckLine parsed;
      if (parse_ok_line(line, &parsed)) last = parsed;
    }
    if (last && last->iteration >= min_iteration) {
      if (out) *out = *last;
      return true;
    }
    std::string last_text =
        last ? fmt::format("last was iteration {}", last->iteration) : "none seen yet";
    if (exited) {
      *err = fmt::format(
          "QEMU {} before memcheck reached iteration {} ({}); qemu.log:\n{}\nserial log:\n{}",
          describe_status(status), min_iteration, last_text,
          tail_of(slurp(qemu_log_path()), kTailLines), tail_of(log, kTailLines));
      return false;
    }
    if (now_s() > deadline) {
      *err = fmt::format(
          "timed out after {} s waiting for memcheck iteration {} ({}); serial log:\n{}", timeout_s,
          min_iteration, last_text, tail_of(log, kTailLines));
      return false;
    }
    std::this_thread::sleep_for(kSerialPollInterval);
  }
}

std::optional<MemcheckLine> TestVm::last_memcheck() const {
  std::optional<MemcheckLine> last;
  for (const std::string& line : serial_lines()) {
    MemcheckLine parsed;
    if (parse_ok_line(line, &parsed)) last = parsed;
  }
  return last;
}

bool TestVm::has_corruption() const {
  for (const std::string& line : serial_lines()) {
    if (is_corrupt_line(line)) return true;
  }
  return false;
}

void TestVm::kill_qemu() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  reap_child(pid_, kKillTimeout);
  pid_ = -1;
}

std::string TestVm::serial_log() const {
  return slurp(serial_path());
}

std::vector<std::string> TestVm::serial_lines() const {
  return complete_lines(serial_log());
}

std::vector<pid_t> qemu_pids_mentioning(const std::string& needle) {
  std::vector<pid_t> pids;
  if (needle.empty()) return pids;
  DIR* d = opendir("/proc");
  if (!d) return pids;
  const pid_t self = getpid();
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    long pid = std::strtol(e->d_name, &end, 10);
    if (*end != '\0' || pid <= 0 || pid == self) continue;
    std::string cmdline = slurp(fmt::format("/proc/{}/cmdline", pid));
    if (cmdline.empty()) continue;  // a kernel thread, or already gone
    std::string argv0 = cmdline.substr(0, cmdline.find('\0'));
    std::string base = argv0.substr(argv0.rfind('/') + 1);
    if (base.rfind("qemu-system-", 0) != 0) continue;
    if (cmdline.find(needle) == std::string::npos) continue;
    pids.push_back(static_cast<pid_t>(pid));
  }
  closedir(d);
  return pids;
}

int kill_qemu_mentioning(const std::string& needle) {
  std::vector<pid_t> victims;
  for (pid_t pid : qemu_pids_mentioning(needle))
    if (kill(pid, SIGKILL) == 0) victims.push_back(pid);

  double deadline = now_s() + kKillTimeout;
  for (pid_t pid : victims) {
    // Our own child (e.g. started by a test directly): reap it. Anyone
    // else's: wait until it no longer runs, so its RAM is released.
    for (;;) {
      int status = 0;
      pid_t r = waitpid(pid, &status, WNOHANG);
      if (r == pid) break;
      if (r < 0 && errno == EINTR) continue;
      if (r < 0 && process_gone(pid)) break;
      if (now_s() > deadline) break;
      std::this_thread::sleep_for(kPollInterval);
    }
  }
  return static_cast<int>(victims.size());
}

}  // namespace vmsave::test
