// Talking to QEMU beyond plain QMP: RAM discovery, migration capabilities,
// device state through pipes, and starting QEMU for restores.
//
// Device state goes through a pipe passed with getfd (`fd:` migration), not
// a file: vmsave appends it to the image as it arrives, with its own
// checksum, and never needs to know its size in advance (a VFIO device can
// produce gigabytes). With x-ignore-shared the RAM of shared file backends
// is skipped by QEMU; what remains is small (about 300 KB for a 1 GiB q35
// guest, measured here).

#include "core/qemu.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <optional>
#include <sstream>
#include <system_error>
#include <thread>

#include <fmt/core.h>

#include "core/internal.h"
#include "core/qemu_args.h"
#include "lib/cancel.h"

namespace vmsave {

namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kMigFdName = "vmsave-migration";
// How long device state may take. QEMU's own downtime for this is ~30 ms
// for a small guest; VFIO state can take minutes, so the limit is generous
// and exists only to turn a wedged QEMU into an error.
constexpr double kDeviceStateTimeout = 600;

std::string json_string(const nlohmann::json& j) {
  return j.is_string() ? j.get<std::string>() : j.dump();
}

// The pause between two looks at something QEMU is about to finish: short
// at first, then doubling up to `cap_ms`. A flat 5 ms put a step that
// QEMU finishes in 3 ms at 5-10 ms: a lazy restore's device-state load
// took 3 ms at 1 GiB and 9 ms at 16 GiB, one more look.
class Backoff {
 public:
  explicit Backoff(int cap_ms) : cap_us_(cap_ms * 1000) {}
  void wait() {
    std::this_thread::sleep_for(std::chrono::microseconds(us_));
    us_ = std::min(us_ * 2, cap_us_);
  }

 private:
  int us_ = 250;
  int cap_us_;
};

}  // namespace

Result<std::vector<RamBackend>> list_ram_backends(QmpClient& qmp) {
  auto list = qmp.execute("qom-list", {{"path", "/objects"}});
  if (!list.ok()) return list.error();
  std::vector<RamBackend> out;
  for (auto& child : *list) {
    std::string type = child.value("type", "");
    // "child<memory-backend-file>"
    if (type.rfind("child<memory-backend-", 0) != 0) continue;
    RamBackend b;
    b.id = child.value("name", "");
    b.qom_type = type.substr(6, type.size() - 7);
    std::string path = "/objects/" + b.id;
    auto get = [&](const char* prop) { return qmp.execute("qom-get", {{"path", path}, {"property", prop}}); };
    auto size = get("size");
    if (!size.ok()) return size.error();
    b.size = size->get<i64>();
    auto share = get("share");
    if (share.ok() && share->is_boolean()) b.share = share->get<bool>();
    if (b.qom_type == "memory-backend-file") {
      auto mp = get("mem-path");
      if (!mp.ok()) return mp.error();
      b.mem_path = json_string(*mp);
      // "offset" exists since QEMU 8.2; older QEMU maps from 0.
      auto off = get("offset");
      if (off.ok() && off->is_number_integer()) b.offset = off->get<i64>();
    }
    // Property and its default; one a backend type lacks is an error, skipped.
    static const std::pair<const char*, nlohmann::json> kProps[] = {
        {"merge", true},     {"dump", true},          {"prealloc", false},
        {"reserve", true},   {"policy", "default"},   {"host-nodes", nlohmann::json::array()},
        {"align", 0},        {"discard-data", false}, {"pmem", false},
        {"readonly", false}, {"hugetlb", false},      {"hugetlbsize", 0},
        {"seal", true}};
    for (const auto& [name, dflt] : kProps) {
      auto v = get(name);
      if (v.ok() && !v->is_null() && *v != dflt) b.props[name] = *v;
    }
    out.push_back(std::move(b));
  }
  return out;
}

std::optional<nlohmann::json> memory_devices(QmpClient& qmp) {
  auto r = qmp.execute("query-memory-devices");
  if (!r.ok() || !r->is_array()) return std::nullopt;
  nlohmann::json out = nlohmann::json::array();
  for (auto& d : *r) {
    auto data = d.find("data");
    if (data == d.end() || !data->is_object()) continue;
    const std::string type = d.value("type", "");
    // DIMMs say "addr", virtio-mem and virtio-pmem "memaddr".
    const char* addr_key = data->contains("addr") ? "addr" : "memaddr";
    std::string memdev = data->value("memdev", "");
    if (memdev.starts_with("/objects/")) memdev.erase(0, 9);
    if (memdev.empty() || !(*data)[addr_key].is_number_unsigned()) continue;
    const std::string id = data->value("id", "");
    const u64 addr = (*data)[addr_key].get<u64>();
    // The -device that puts it back where it was.
    const std::string driver = type == "dimm" ? "pc-dimm" : type == "nvdimm" ? type : type + "-pci";
    std::string arg = fmt::format("{}{},memdev={},{}={:#x}", driver, id.empty() ? "" : ",id=" + id,
                                  memdev, addr_key, addr);
    nlohmann::json rec = {{"type", type}, {"id", id}, {"memdev", memdev}, {"addr", addr}};
    if (auto n = data->find("node"); n != data->end() && n->is_number_unsigned()) {
      rec["node"] = *n;
      if (n->get<u64>() != 0) arg += fmt::format(",node={}", n->get<u64>());
    }
    if (auto z = data->find("size"); z != data->end() && z->is_number_unsigned()) rec["size"] = *z;
    if (auto q = data->find("requested-size"); q != data->end() && q->is_number_unsigned())
      arg += fmt::format(",requested-size={}", q->get<u64>());
    if (type == "nvdimm" && !id.empty()) {
      auto label = qmp.execute("qom-get",
                               {{"path", "/machine/peripheral/" + id}, {"property", "label-size"}});
      if (label.ok() && label->is_number_unsigned() && label->get<u64>() > 0)
        arg += fmt::format(",label-size={}", label->get<u64>());
    }
    rec["device"] = arg;
    out.push_back(std::move(rec));
  }
  return out;
}

Error unsaveable_ram_error(const RamBackend& b) {
  std::string why = fmt::format(
      "it is {}{}, which vmsave cannot read, and this QEMU lacks the mapped-ram migration "
      "(QEMU 9.0 or newer) that would save it",
      b.qom_type, b.qom_type == "memory-backend-file" ? " with share=off" : "");
  return Error{"cannot save RAM backend " + b.id, "", why}.fix(fmt::format(
      "start QEMU with -object memory-backend-file,id={},size={},share=on,mem-path=/dev/shm/{}",
      b.id, b.size, b.id));
}

namespace {

struct MapsEntry {
  u64 start = 0, end = 0, offset = 0, inode = 0;
  unsigned dev_major = 0, dev_minor = 0;
  bool shared = false;  // MAP_SHARED ('s' in its permissions)
  std::string path;
};

std::vector<MapsEntry> read_maps(pid_t pid) {
  std::vector<MapsEntry> out;
  std::ifstream in(fmt::format("/proc/{}/maps", pid));
  std::string line;
  while (std::getline(in, line)) {
    MapsEntry e;
    char perms[8];
    int pos = 0;
    if (sscanf(line.c_str(), "%lx-%lx %7s %lx %x:%x %lu %n", &e.start, &e.end, perms, &e.offset,
               &e.dev_major, &e.dev_minor, &e.inode, &pos) < 7)
      continue;
    if (pos > 0 && static_cast<size_t>(pos) < line.size()) e.path = line.substr(pos);
    e.shared = perms[3] == 's';
    out.push_back(e);
  }
  return out;
}

}  // namespace

// Whether `pid` runs: it exists and is neither a zombie nor dead.
bool process_alive(pid_t pid) {
  char state = process_state(pid);
  return state != '?' && state != 'Z' && state != 'X';
}

ExitWatch::ExitWatch(pid_t pid, std::function<Error()> gone) : pidfd_(open_pidfd(pid)) {
  int p[2];
  if (!pidfd_.valid() || pipe2(p, O_CLOEXEC) < 0) return;  // then QMP finds out later
  stop_r_ = UniqueFd(p[0]);
  stop_w_ = UniqueFd(p[1]);
  try {
    thread_ = std::thread([this, gone = std::move(gone)] {
      pollfd fds[2] = {{pidfd_.get(), POLLIN, 0}, {stop_r_.get(), POLLIN, 0}};
      while (::poll(fds, 2, -1) < 0 && errno == EINTR) {
      }
      if (fds[0].revents & POLLIN) cancel_with(gone());
    });
  } catch (const std::system_error&) {
    // Out of threads: QMP finds out later, as without a pidfd.
  }
}

ExitWatch::~ExitWatch() {
  if (!thread_.joinable()) return;
  (void)!::write(stop_w_.get(), "x", 1);
  thread_.join();
}

std::vector<FileMapping> file_mappings(pid_t pid) {
  std::vector<FileMapping> out;
  for (auto& m : read_maps(pid))
    if (m.inode != 0)
      out.push_back(FileMapping{m.start, m.end, static_cast<i64>(m.offset),
                                makedev(m.dev_major, m.dev_minor), static_cast<ino_t>(m.inode)});
  return out;
}

namespace {

pid_t run_dir_owner(const std::string& dir) {
  std::ifstream in(dir + "/qemu.pid");
  pid_t pid = 0;
  return in >> pid ? pid : 0;
}

// Whether `pid` is alive and still the QEMU started with `dir` (pids wrap).
bool runs_in(pid_t pid, const std::string& dir) {
  if (!process_alive(pid)) return false;
  std::ifstream in(fmt::format("/proc/{}/cmdline", pid));
  std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return cmdline.find(dir + "/qmp.sock") != std::string::npos;
}

}  // namespace

std::string resolve_machine(const std::string& qemu, const std::string& type) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) < 0) return type;
  UniqueFd rd(fds[0]), wr(fds[1]);
  pid_t pid = fork();
  if (pid < 0) return type;
  if (pid == 0) {
    int null = ::open("/dev/null", O_RDWR);
    dup2(null, 0);
    dup2(wr.get(), 1);
    dup2(null, 2);
    execlp(qemu.c_str(), qemu.c_str(), "-machine", "help", static_cast<char*>(nullptr));
    _exit(127);
  }
  wr.reset();
  std::string out;
  char buf[4096];
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (;;) {
    pollfd p{rd.get(), POLLIN, 0};
    int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                    deadline - std::chrono::steady_clock::now())
                                    .count());
    if (left <= 0 || ::poll(&p, 1, left) <= 0) break;
    ssize_t n = ::read(rd.get(), buf, sizeof(buf));
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  // "pc     Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)"
  std::istringstream lines(out);
  for (std::string line; std::getline(lines, line);) {
    if (line.compare(0, type.size(), type) != 0 || line.size() == type.size() ||
        line[type.size()] != ' ')
      continue;
    size_t at = line.find("(alias of ");
    if (at == std::string::npos) return type;
    size_t end = line.find(')', at);
    return line.substr(at + 10, end == std::string::npos ? std::string::npos : end - at - 10);
  }
  return type;
}

void note_run_dir_owner(const std::string& run_dir, pid_t qemu) {
  std::ofstream(run_dir + "/qemu.pid") << qemu << "\n";
}

std::optional<struct stat> empty_log_beside(const std::string& qmp_socket) {
  struct stat st;
  const std::string log = qmp_socket + ".qemu.log";
  if (lstat(log.c_str(), &st) == 0 && S_ISREG(st.st_mode) && st.st_size == 0 &&
      st.st_uid == geteuid())
    return st;
  return std::nullopt;
}

void remove_empty_log(const std::string& qmp_socket, const struct stat& before) {
  struct stat st;
  const std::string log = qmp_socket + ".qemu.log";
  // The same file, untouched since: not a log the next restore of this
  // command has just made (or emptied) there.
  if (lstat(log.c_str(), &st) == 0 && same_file(st, before) && st.st_size == 0 &&
      st.st_mtim.tv_sec == before.st_mtim.tv_sec && st.st_mtim.tv_nsec == before.st_mtim.tv_nsec)
    ::unlink(log.c_str());
}

void remove_run_dir_of(const std::string& qmp_socket, pid_t qemu) {
  std::string dir = std::filesystem::path(qmp_socket).parent_path().string();
  if (!std::filesystem::path(dir).filename().string().starts_with("vmsave-")) return;
  if (run_dir_owner(dir) == qemu && !runs_in(qemu, dir)) {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
}

void remove_stale_run_dirs(const std::string& parent) {
  std::error_code ec;
  for (auto& e : std::filesystem::directory_iterator(parent, ec)) {
    std::string dir = e.path().string();
    struct stat st;
    if (!e.path().filename().string().starts_with("vmsave-") || lstat(dir.c_str(), &st) < 0 ||
        !S_ISDIR(st.st_mode) || st.st_uid != geteuid())
      continue;
    // Without qemu.pid: a restore setting up right now, or one whose
    // watchdog removes the directory itself.
    pid_t owner = run_dir_owner(dir);
    if (owner > 0 && !runs_in(owner, dir)) std::filesystem::remove_all(dir, ec);
  }
}

namespace {

// The first process but vmsave for which `matches` holds, with its name.
Mapper find_process(const std::function<bool(pid_t)>& matches) {
  DIR* proc = opendir("/proc");
  if (!proc) return {};
  Mapper found;
  const pid_t self = getpid();
  while (dirent* d = readdir(proc)) {
    char* end;
    long pid = std::strtol(d->d_name, &end, 10);
    if (*end || pid <= 0 || pid == self || !matches(static_cast<pid_t>(pid))) continue;
    found.pid = static_cast<pid_t>(pid);
    std::ifstream comm(fmt::format("/proc/{}/comm", pid));
    std::getline(comm, found.name);
    break;
  }
  closedir(proc);
  return found;
}

}  // namespace

Mapper find_mapper(const struct stat& st, bool shared_only) {
  return find_process([&](pid_t pid) {
    for (auto& m : read_maps(pid))
      if (m.inode == st.st_ino && makedev(m.dev_major, m.dev_minor) == st.st_dev &&
          (m.shared || !shared_only))
        return true;
    return false;
  });
}

Mapper find_writer(const std::vector<struct stat>& files, size_t* which) {
  return find_process([&](pid_t pid) {
    const std::string fds = fmt::format("/proc/{}/fd", pid);
    DIR* dir = opendir(fds.c_str());
    if (!dir) return false;  // gone, or not ours to see
    bool writes = false;
    while (dirent* f = readdir(dir)) {
      struct stat fst;
      if (f->d_name[0] == '.' || stat((fds + "/" + f->d_name).c_str(), &fst) < 0) continue;
      auto it = std::find_if(files.begin(), files.end(), [&](const struct stat& st) {
        return fst.st_ino == st.st_ino && fst.st_dev == st.st_dev;
      });
      if (it == files.end()) continue;
      std::ifstream info(fmt::format("/proc/{}/fdinfo/{}", pid, f->d_name));
      unsigned long flags = O_RDONLY;
      for (std::string line; std::getline(info, line);)
        if (line.starts_with("flags:")) flags = std::strtoul(line.c_str() + 6, nullptr, 8);
      if ((flags & O_ACCMODE) == O_RDONLY) continue;
      *which = static_cast<size_t>(it - files.begin());
      writes = true;
      break;
    }
    closedir(dir);
    return writes;
  });
}

Status open_backend_files(std::vector<RamBackend>& backends, pid_t pid) {
  std::vector<MapsEntry> maps = read_maps(pid);
  if (maps.empty())
    return Error{"cannot read QEMU's memory map", fmt::format("/proc/{}/maps", pid),
                 "permission denied or QEMU exited"}
        .fix("run vmsave as the user QEMU runs as, or as root");
  // QEMU opened a relative mem-path in its working directory, which it
  // may have left since (-daemonize moves to /): the mappings show where
  // the file really is, as an absolute path ending in the relative one.
  std::error_code ec;
  std::filesystem::path cwd = std::filesystem::read_symlink(fmt::format("/proc/{}/cwd", pid), ec);
  for (RamBackend& b : backends) {
    const bool relative = !b.mem_path.empty() && b.mem_path[0] != '/';
    const std::string rel = std::filesystem::path(b.mem_path).lexically_normal().string();
    b.path = relative && !ec ? (cwd / rel).lexically_normal().string() : b.mem_path;
    // The file mapping of this backend: the VMA(s) of one inode whose file
    // offsets cover [offset, offset + size).
    auto covers = [&](const MapsEntry& m) {
      return m.inode != 0 && m.offset <= u64(b.offset) && m.end - m.start >= 4096;
    };
    // The device too, not the inode number alone: a QEMU in a mount
    // namespace of its own can map a file of any number on a filesystem of
    // its own and name another file of that number as mem-path.
    struct stat st;
    bool direct = false;
    if (stat(b.path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
      for (auto& m : maps)
        if (covers(m) && m.inode == st.st_ino && makedev(m.dev_major, m.dev_minor) == st.st_dev &&
            m.offset == u64(b.offset) && m.end - m.start == u64(b.size))
          direct = true;
    }
    if (direct) {
      // mem-path may be a symbolic link, which QEMU followed: what counts is
      // that the file opened is the one found in QEMU's mappings.
      UniqueFd fd(::open(b.path.c_str(), O_RDONLY | O_CLOEXEC));
      if (!fd) return sys_error("open", b.path, errno);
      struct stat opened;
      if (fstat(fd.get(), &opened) < 0 || !same_file(opened, st))
        return Error{"the RAM file changed while vmsave opened it", b.path,
                     "it is no longer the file QEMU maps"}
            .fix("leave the RAM files alone during a save, and save again");
      b.fd = std::move(fd);
      b.file = b.path;
    } else {
      // Unlinked or replaced file, or a directory mem-path: find the
      // mapping of the backend's length whose path is mem-path or lies
      // in it, and open it through /proc/PID/map_files.
      auto names = [&](const std::string& p) {
        if (p == b.path || p.starts_with(b.path + "/")) return true;
        const std::string tail = "/" + rel;
        return relative && (p.ends_with(tail) ||
                            std::filesystem::path(p).parent_path().string().ends_with(tail));
      };
      const MapsEntry* found = nullptr;
      std::string found_path;  // the mapping's, when the file is still there
      for (auto& m : maps) {
        if (!covers(m) || m.end - m.start != u64(b.size) || m.offset != u64(b.offset)) continue;
        std::string p = m.path;
        const std::string deleted = " (deleted)";
        const bool gone = p.size() > deleted.size() &&
                          p.compare(p.size() - deleted.size(), deleted.size(), deleted) == 0;
        if (gone) p.resize(p.size() - deleted.size());
        if (names(p)) {
          found = &m;
          if (!gone) found_path = p;
          break;
        }
      }
      if (!found)
        return Error{"cannot find the RAM file of backend " + b.id, b.mem_path,
                     "QEMU has no mapping of it"};
      // A relative mem-path of a QEMU that has since changed directory: the
      // file is where the mapping says (a save that quits QEMU names it as
      // left behind; from the working directory it was not found).
      struct stat there;
      if (relative && !found_path.empty() && stat(found_path.c_str(), &there) == 0 &&
          S_ISREG(there.st_mode) && there.st_ino == found->inode &&
          there.st_dev == makedev(found->dev_major, found->dev_minor))
        b.path = found_path;
      b.file = fmt::format("/proc/{}/map_files/{:x}-{:x}", pid, found->start, found->end);
      UniqueFd fd(::open(b.file.c_str(), O_RDONLY | O_CLOEXEC));
      if (!fd)
        return sys_error("open", b.file, errno)
            .fix(
                "opening an unlinked RAM file needs CAP_SYS_ADMIN in the host's user "
                "namespace: run vmsave as root there (not in a container's namespace), or keep "
                "the RAM file linked");
      b.fd = std::move(fd);
    }
    b.page_size = file_page_size(b.fd.get());
    struct stat fst;
    if (fstat(b.fd.get(), &fst) < 0) return sys_error("fstat", b.file, errno);
    if (fst.st_size < b.offset + b.size)
      return Error{"RAM file of backend " + b.id + " is smaller than the backend", b.file, ""};
  }
  return Status();
}

Status Capabilities::set(QmpClient& qmp, const std::vector<std::pair<std::string, bool>>& want,
                         const std::vector<std::string>& required) {
  auto cur = qmp.execute("query-migrate-capabilities");
  if (!cur.ok()) return cur.error();
  nlohmann::json caps = nlohmann::json::array();
  for (auto& [name, value] : want) {
    bool known = false;
    for (auto& c : *cur) {
      if (c.value("capability", "") != name) continue;
      known = true;
      bool old = c.value("state", false);
      if (old != value) {
        old_.emplace_back(name, old);
        caps.push_back({{"capability", name}, {"state", value}});
      }
    }
    if (!known && std::find(required.begin(), required.end(), name) != required.end())
      return Error{"QEMU lacks the migration capability " + name, qmp.path(), ""}.fix(
          "use QEMU 9.1 or newer, as README.md says");
  }
  if (caps.empty()) return Status();
  nlohmann::json undo = nlohmann::json::array();
  for (auto& [name, value] : old_) undo.push_back({{"capability", name}, {"state", value}});
  qmp.note_undo("migrate-set-capabilities", {{"capabilities", undo}});
  auto r = qmp.execute("migrate-set-capabilities", {{"capabilities", caps}});
  if (!r.ok()) {
    old_.clear();
    return r.error();
  }
  return Status();
}

bool Capabilities::restore(QmpClient& qmp) {
  if (old_.empty()) return true;
  nlohmann::json caps = nlohmann::json::array();
  for (auto& [name, value] : old_) caps.push_back({{"capability", name}, {"state", value}});
  bool ok = qmp.execute("migrate-set-capabilities", {{"capabilities", caps}}, 5).ok();
  old_.clear();
  return ok;
}

bool wait_migration_ended(QmpClient& qmp, double timeout_s) {
  auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  Backoff pause(5);
  for (;;) {
    auto r = qmp.execute("query-migrate", nullptr, 5);
    if (!r.ok()) return false;
    std::string status = r->value("status", "");
    if (status.empty() || status == "completed" || status == "failed" || status == "cancelled")
      return true;
    if (Clock::now() > deadline) return false;
    pause.wait();
  }
}

Status wait_migration(QmpClient& qmp, double timeout_s, const char* what, bool finish) {
  auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  Backoff pause(5);
  for (;;) {
    auto r = qmp.execute("query-migrate");
    if (!r.ok()) return r.error();
    std::string status = r->value("status", "");
    if (status == "completed") return Status();
    if (status == "failed" || status == "cancelled")
      return Error{fmt::format("QEMU's {} {}", what, status), qmp.path(),
                   r->value("error-desc", "no reason given")};
    if (status.empty() && std::string(what) != "device-state load") return Status();
    if (Clock::now() > deadline)
      return Error{fmt::format("QEMU's {} did not finish in {:.0f} s", what, timeout_s), qmp.path(),
                   "status " + status};
    if (finish ? cancelled_twice() : cancelled()) return interrupted_error();
    pause.wait();
  }
}

std::vector<std::pair<std::string, bool>> mapped_ram_capabilities() {
  return {{"mapped-ram", true},   {"multifd", true},   {"x-ignore-shared", false},
          {"postcopy-ram", false}, {"background-snapshot", false}, {"xbzrle", false}};
}

Status mapped_ram_migrate(QmpClient& qmp, bool incoming, const MappedRamFds& fds, i64 offset,
                          const std::function<void(const nlohmann::json&)>& on_status,
                          const std::function<bool()>& on_interrupt) {
  const char* what = incoming ? "mapped-ram load" : "mapped-ram save";
  // direct-io: the multifd threads write/read pages with O_DIRECT.
  std::optional<bool> old_direct;
  bool direct = bool(fds.direct);
  if (direct) {
    auto p = qmp.execute("query-migrate-parameters");
    if (p.ok() && p->contains("direct-io")) {
      old_direct = (*p)["direct-io"].get<bool>();
      qmp.note_undo("migrate-set-parameters", {{"direct-io", *old_direct}});
      auto r = qmp.execute("migrate-set-parameters", {{"direct-io", true}});
      if (!r.ok()) return r.error();
    } else {
      direct = false;  // QEMU without direct-io: the buffered fd serves all
    }
  }
  struct Undo {
    QmpClient& qmp;
    std::optional<bool> old_direct;
    std::optional<i64> fdset;
    ~Undo() {
      if (fdset) (void)qmp.execute("remove-fd", {{"fdset-id", *fdset}}, 5);
      if (old_direct && !*old_direct)
        (void)qmp.execute("migrate-set-parameters", {{"direct-io", false}}, 5);
    }
  } undo{qmp, old_direct, std::nullopt};

  // The set's removal is noted before the set exists: vmsave killed
  // between adding the fd and noting it left the fd set in QEMU (1 kill in
  // about 40 under load). So vmsave picks its id, one no set has.
  i64 set = 1 << 20;  // above the ids QEMU hands out from 0
  if (auto sets = qmp.execute("query-fdsets"); sets.ok() && sets->is_array())
    for (auto& s : *sets) set = std::max(set, s.value("fdset-id", i64(0)) + 1);
  qmp.note_undo("remove-fd", {{"fdset-id", set}});
  auto added = qmp.add_fd(fds.buffered.get(), set, "vmsave image");
  if (!added.ok()) return added.error();
  undo.fdset = set;
  if (direct) {
    auto r = qmp.add_fd(fds.direct.get(), set, "vmsave image (O_DIRECT)");
    if (!r.ok()) return r.error();
  }
  std::string uri = fmt::format("file:/dev/fdset/{},offset={}", set, offset);
  auto m = qmp.execute(incoming ? "migrate-incoming" : "migrate", {{"uri", uri}});
  if (!m.ok()) return m.error();

  // No overall limit (RAM may be large and the disk slow), but a migration
  // that moves no byte for this long is wedged.
  constexpr double kStall = 600;
  i64 last = -1;
  auto last_change = Clock::now();
  int finishing_after = 0;  // the signals that came before QEMU was let finish
  for (;;) {
    if (cancelled() && !finishing_after) {
      if (!incoming && on_interrupt && on_interrupt())
        finishing_after = std::max(1, signals_received().load());
      else if (!incoming)
        (void)qmp.execute("migrate_cancel", nullptr, 5);
      if (!finishing_after) return interrupted_error();
    }
    if (finishing_after && signals_received().load() > finishing_after) {
      (void)qmp.execute("migrate_cancel", nullptr, 5);
      return interrupted_error();
    }
    auto r = qmp.execute("query-migrate");
    if (!r.ok()) return r.error();
    if (on_status) on_status(*r);
    std::string status = r->value("status", "");
    if (status == "completed") return finishing_after ? interrupted_error() : Status();
    if (status == "failed" || status == "cancelled") {
      if (finishing_after) return interrupted_error();  // stopping anyway
      Error e{fmt::format("QEMU's {} {}", what, status), qmp.path(),
              r->value("error-desc", "no reason given")};
      if (!incoming && e.detail.find(std::strerror(ENOSPC)) != std::string::npos)
        e.hint = "free space on the image's filesystem, or save the image elsewhere";
      return e;
    }
    i64 moved = r->contains("ram") ? (*r)["ram"].value("transferred", i64(0)) : 0;
    if (moved != last) {
      last = moved;
      last_change = Clock::now();
    } else if (Clock::now() - last_change > std::chrono::duration<double>(kStall)) {
      if (!incoming) (void)qmp.execute("migrate_cancel", nullptr, 5);
      return Error{fmt::format("QEMU's {} made no progress for {:.0f} s", what, kStall),
                   qmp.path(), "status " + status};
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(incoming ? 5 : 20));
  }
}

Status save_device_state(QmpClient& qmp, const std::function<Status(const u8*, size_t)>& sink,
                         const std::function<void(i64)>& on_bytes) {
  int p[2];
  if (pipe2(p, O_CLOEXEC) < 0) return sys_error("pipe2", "", errno);
  UniqueFd rd(p[0]), wr(p[1]);
  // A bigger pipe means fewer wake-ups per MiB of device state.
  fcntl(wr.get(), F_SETPIPE_SZ, 1 << 20);
  VMSAVE_TRY(qmp.getfd(kMigFdName, wr.get()));
  wr.reset();  // QEMU holds the only write end now: EOF means it is done
  auto m = qmp.execute("migrate", {{"uri", fmt::format("fd:{}", kMigFdName)}});
  if (!m.ok()) {
    (void)qmp.execute("closefd", {{"fdname", kMigFdName}}, 5);
    return m.error();
  }
  std::vector<u8> buf(1 << 20);
  i64 total = 0;
  const double limit_s = FaultPlan::get().vmstate_timeout_s > 0 ? FaultPlan::get().vmstate_timeout_s
                                                                : kDeviceStateTimeout;
  auto deadline = Clock::now() + std::chrono::duration<double>(limit_s);
  for (;;) {
    if (cancelled()) {
      (void)qmp.execute("migrate_cancel", nullptr, 5);
      return interrupted_error();
    }
    // Looked at whatever arrives: a QEMU that trickles bytes (an untrusted
    // one, trial S) kept the guest paused and vmsave writing for ever.
    if (Clock::now() > deadline) {
      (void)qmp.execute("migrate_cancel", nullptr, 5);
      return Error{
          "QEMU's device state did not end in time", qmp.path(),
          fmt::format("{} came in {:.0f} s, the most vmsave waits", human_bytes(total), limit_s)}
          .fix("look at QEMU's log for why it is stuck, and save again");
    }
    pollfd pfd{rd.get(), POLLIN, 0};
    int n = poll(&pfd, 1, 100);
    if (n < 0 && errno != EINTR) return sys_error("poll", "migration pipe", errno);
    if (n <= 0) continue;
    ssize_t got = ::read(rd.get(), buf.data(), buf.size());
    if (got < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return sys_error("read", "migration pipe", errno);
    }
    if (got == 0) break;
    Status st = sink(buf.data(), static_cast<size_t>(got));
    if (!st.ok()) {
      (void)qmp.execute("migrate_cancel", nullptr, 5);
      return st;
    }
    total += got;
    if (on_bytes) on_bytes(total);
  }
  return wait_migration(qmp, 60, "device-state save");
}

Status load_device_state(
    QmpClient& qmp, const std::function<void()>& started,
    const std::function<Status(const std::function<Status(const u8*, size_t)>&)>& source) {
  int p[2];
  if (pipe2(p, O_CLOEXEC) < 0) return sys_error("pipe2", "", errno);
  UniqueFd rd(p[0]), wr(p[1]);
  fcntl(wr.get(), F_SETPIPE_SZ, 1 << 20);
  VMSAVE_TRY(qmp.getfd(kMigFdName, rd.get()));
  rd.reset();
  if (cancelled()) return interrupted_error();
  auto m = qmp.execute("migrate-incoming", {{"uri", fmt::format("fd:{}", kMigFdName)}});
  if (!m.ok()) return m.error();
  if (started) started();
  // QEMU takes one incoming migration: stopped part-way, this one would
  // leave it waiting for good (a pipe closed before its first byte is never
  // read) or failed, and no retry could load it. So from here a first
  // signal lets the device state go in whole; a second stops at once.
  for (int ms = 0; ms < FaultPlan::get().slow_load_ms && !cancelled_twice(); ms += 10)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  auto writer = [&](const u8* data, size_t len) -> Status {
    while (len > 0) {
      if (cancelled_twice()) return interrupted_error();
      ssize_t n = ::write(wr.get(), data, len);
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        if (errno == EPIPE) {
          // QEMU stopped reading: its own error says why.
          auto r = qmp.execute("query-migrate", nullptr, 5);
          std::string why = r.ok() ? r->value("error-desc", "it closed the stream") : "it closed the stream";
          return Error{"QEMU refused the device state", qmp.path(), why};
        }
        return sys_error("write", "migration pipe", errno);
      }
      data += n;
      len -= n;
    }
    return Status();
  };
  VMSAVE_TRY(source(writer));
  wr.reset();
  return wait_migration(qmp, kDeviceStateTimeout, "device-state load", /*finish=*/true);
}

std::vector<std::string> process_cmdline(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/cmdline", pid), std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t i = 0; i < all.size(); i++) {
    if (all[i] == '\0') {
      out.push_back(all.substr(start, i - start));
      start = i + 1;
    }
  }
  return out;
}

std::vector<std::string> as_started_by_user(std::vector<std::string> argv, pid_t pid) {
  auto given = QemuCommand::parse(argv);
  if (!given.ok()) return argv;
  std::vector<bool> added(argv.size());
  for (auto& o : given->options()) {
    if (!o.value) continue;
    bool ours = o.name == "incoming" && *o.value == "defer";
    if (o.name == "qmp" && o.value->starts_with("unix:")) {
      auto kv = KeyvalList::parse(std::string_view(*o.value).substr(5), "path",
                                  KeyvalSyntax::kQemuOpts);  // a ",," in the path is one ','
      if (!kv.ok() || !kv->get("path")) continue;
      std::filesystem::path sock = *kv->get("path");
      std::filesystem::path dir = sock.parent_path();
      ours = sock.filename() == "qmp.sock" && dir.filename().string().starts_with("vmsave-") &&
             run_dir_owner(dir.string()) == pid;
    }
    if (ours) added[o.index] = added[o.index + 1] = true;
  }
  // The -S a restore puts right after the -incoming defer it adds, and the
  // -D LOG it gives a daemonizing QEMU after those.
  for (size_t i = 0; i + 1 < argv.size(); i++) {
    if (!added[i] || argv[i] != "-incoming") continue;
    size_t next = i + 2;
    if (next < argv.size() && argv[next] == "-S") added[next++] = true;
    if (next + 1 < argv.size() && argv[next] == "-D") added[next] = added[next + 1] = true;
  }
  std::vector<std::string> out;
  for (size_t i = 0; i < argv.size(); i++)
    if (!added[i]) out.push_back(std::move(argv[i]));
  // DIR/vmsave-ID-PID, unlinked: the file a restore made for mem-path=DIR.
  auto cmd = QemuCommand::parse(out);
  if (!cmd.ok()) return out;
  auto objs = cmd->objects();
  if (!objs.ok()) return out;
  for (auto& o : *objs) {
    auto mp = o.object.get_string("mem-path");
    if (o.object.qom_type != "memory-backend-file" || !mp) continue;
    std::filesystem::path file = *mp;
    struct stat st;
    if (file.filename().string().starts_with("vmsave-" + o.object.id + "-") &&
        lstat(file.c_str(), &st) < 0 && errno == ENOENT &&
        std::filesystem::is_directory(file.parent_path())) {
      o.object.set("mem-path", file.parent_path().string());
      out[o.index] = format_object(o.object);
    }
  }
  return out;
}

std::string new_qemu_mark() {
  u8 bytes[16] = {};
  // Before the entropy pool is ready, a value no other run has will do.
  if (getrandom(bytes, sizeof(bytes), 0) != sizeof(bytes)) {
    const u64 t = static_cast<u64>(Clock::now().time_since_epoch().count()) ^ u64(getpid()) << 40;
    std::memcpy(bytes, &t, sizeof(t));
  }
  std::string mark = "VMSAVE_QEMU=";
  for (u8 b : bytes) mark += fmt::format("{:02x}", b);
  return mark;
}

bool has_mark(pid_t pid, const std::string& mark) {
  if (mark.empty() || pid <= 0) return false;
  std::ifstream in(fmt::format("/proc/{}/environ", pid), std::ios::binary);
  // NUL before each entry, as after each: whole entries only.
  std::string env(1, '\0');
  env.append(std::istreambuf_iterator<char>(in), {});
  std::string entry(1, '\0');
  entry += mark;
  entry += '\0';
  return env.find(entry) != std::string::npos;
}

std::string absolute_disk_path(const std::string& name, const std::string& cwd) {
  if (name.empty() || name.starts_with("json:") || name.find("://") != std::string::npos ||
      name.starts_with("nbd:") || name.starts_with("/dev/fdset/"))
    return "";
  if (name.starts_with('/')) return std::filesystem::path(name).lexically_normal().string();
  return cwd.empty() ? "" : (std::filesystem::path(cwd) / name).lexically_normal().string();
}

Result<bool> take_disk_locks(QmpClient& qmp) {
  auto r = qmp.execute("blockdev-set-active", {{"active", true}});
  if (r.ok()) return true;
  if (r.error().detail.find("CommandNotFound") != std::string::npos) return false;
  return r.error();
}

bool kill_and_wait(int pidfd) {
  if (::syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, nullptr, 0) < 0) return false;
  pollfd p{pidfd, POLLIN, 0};
  while (::poll(&p, 1, 5000) < 0 && errno == EINTR) {
  }
  return true;
}

int kill_marked(const std::string& mark) {
  if (mark.empty()) return 0;
  DIR* proc = opendir("/proc");
  if (!proc) return 0;
  std::vector<pid_t> pids;
  while (dirent* d = readdir(proc)) {
    char* end;
    const long pid = std::strtol(d->d_name, &end, 10);
    if (!*end && pid > 0 && pid != getpid() && has_mark(static_cast<pid_t>(pid), mark))
      pids.push_back(static_cast<pid_t>(pid));
  }
  closedir(proc);
  int killed = 0;
  for (pid_t pid : pids) {
    UniqueFd pidfd = open_pidfd(pid);
    // Looked at again through the pidfd: the pid may be another's by now.
    if (!pidfd || !has_mark(pid, mark) || !kill_and_wait(pidfd.get())) continue;
    killed++;
    waitpid(pid, nullptr, WNOHANG);  // a child of ours is reaped
  }
  return killed;
}

bool remove_left_behind(const std::string& path) {
  struct stat st;
  if (path.empty() || ::lstat(path.c_str(), &st) < 0) return false;
  if (S_ISSOCK(st.st_mode)) {
    sockaddr_un addr{};
    if (path.size() >= sizeof(addr.sun_path)) return false;
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, path.data(), path.size());
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    return fd && ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0 &&
           errno == ECONNREFUSED && ::unlink(path.c_str()) == 0;
  }
  if (!S_ISREG(st.st_mode)) return false;
  if (st.st_size == 0) return ::unlink(path.c_str()) == 0;
  if (st.st_size > 32) return false;
  std::ifstream in(path);
  long pid = 0;
  std::string rest;
  // A zombie is gone too: a daemon killed a moment ago, not yet reaped.
  return (in >> pid) && !(in >> rest) && pid > 0 && !process_alive(static_cast<pid_t>(pid)) &&
         ::unlink(path.c_str()) == 0;
}

std::string log_tail(const std::string& path, int lines) {
  // A regular file's last 64 KiB, lines cut at 500 bytes: a log that is a
  // device or FIFO (--qemu-log /dev/tty) is not read back, nor a huge one
  // whole (trial S: 1 MiB of a block device quoted as the log's tail).
  constexpr i64 kTailBytes = 64 * 1024;
  constexpr size_t kLineBytes = 500;
  struct stat st;
  if (::stat(path.c_str(), &st) < 0 || !S_ISREG(st.st_mode)) return "";
  std::ifstream in(path, std::ios::binary);
  if (st.st_size > kTailBytes) in.seekg(st.st_size - kTailBytes);
  std::vector<std::string> all;
  std::string line;
  while (std::getline(in, line))
    if (!line.empty())
      all.push_back(line.size() > kLineBytes ? line.substr(0, kLineBytes) + "..." : line);
  std::string out;
  for (size_t i = all.size() > size_t(lines) ? all.size() - lines : 0; i < all.size(); i++) {
    if (!out.empty()) out += " | ";
    out += all[i];
  }
  return out;
}

Result<StartedQemu> start_qemu(const std::vector<std::string>& argv, const std::string& log,
                               bool log_named, const std::string& mark,
                               const std::function<void(pid_t)>& forked) {
  UniqueFd logfd;
  if (log_named) {
    // A link is followed only to what is not a regular file (/dev/stderr):
    // one to a file, planted where logs go, had vmsave empty that file.
    logfd.reset(::open(log.c_str(), O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600));
    const bool link = !logfd && errno == ELOOP;
    if (link) logfd.reset(::open(log.c_str(), O_WRONLY | O_CLOEXEC));
    struct stat st;
    if (logfd && fstat(logfd.get(), &st) == 0 && (S_ISBLK(st.st_mode) || S_ISDIR(st.st_mode)))
      return Error{"cannot write QEMU's log", log,
                   S_ISBLK(st.st_mode) ? "it is a block device" : "it is a directory"}
          .fix("give --qemu-log a file, or a character device such as /dev/stderr");
    if (logfd && fstat(logfd.get(), &st) == 0 && S_ISREG(st.st_mode)) {
      if (link)
        return Error{"cannot write QEMU's log", log, "it is a symbolic link to a regular file"}.fix(
            "give --qemu-log the file's own path");
      if (ftruncate(logfd.get(), 0) < 0) return sys_error("cannot write QEMU's log", log, errno);
    }
  } else {  // truncated only once known to be a regular file; no FIFO to wait on
    logfd.reset(::open(log.c_str(), O_WRONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0600));
    struct stat st;
    if ((logfd && (fstat(logfd.get(), &st) < 0 || !S_ISREG(st.st_mode))) ||
        (!logfd && (errno == ELOOP || errno == ENXIO)))
      return Error{"cannot write QEMU's log", log, "it is not a regular file (a link, a FIFO?)"}.fix(
          "remove it, or choose the log with --qemu-log");
    // Another user's file, planted where the log goes, would get QEMU's
    // output and be quoted in vmsave's errors (trial S).
    if (logfd && st.st_uid != geteuid())
      return Error{"cannot write QEMU's log", log,
                   fmt::format("it exists and belongs to uid {}", st.st_uid)}
          .fix("remove it, or choose the log with --qemu-log");
    if (logfd && ftruncate(logfd.get(), 0) < 0) return sys_error("cannot write QEMU's log", log, errno);
  }
  if (!logfd) return sys_error("cannot write QEMU's log", log, errno);
  UniqueFd devnull(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::vector<char*> env;
  for (char** e = environ; *e; e++)
    if (!std::string_view(*e).starts_with("VMSAVE_QEMU=")) env.push_back(*e);
  if (!mark.empty()) env.push_back(const_cast<char*>(mark.c_str()));
  env.push_back(nullptr);
  // The exec error travels back through a close-on-exec pipe.
  int ep[2];
  if (pipe2(ep, O_CLOEXEC) < 0) return sys_error("pipe2", "", errno);
  UniqueFd erd(ep[0]), ewr(ep[1]);
  // The child waits to exec until `forked` has run (the watchdog knows its
  // pid); if vmsave dies before, it reads end of file and exits instead, so
  // no QEMU can outlive a vmsave killed right after fork.
  int gp[2];
  if (pipe2(gp, O_CLOEXEC) < 0) return sys_error("pipe2", "", errno);
  UniqueFd grd(gp[0]), gwr(gp[1]);
  pid_t pid = fork();
  if (pid < 0) return sys_error("fork", argv[0], errno);
  if (pid == 0) {
    gwr.reset();
    char go = 0;
    if (::read(grd.get(), &go, 1) != 1) _exit(127);
    setsid();
    // QEMU outlives vmsave: it starts with the signals vmsave changed as a
    // program expects them (SIGXFSZ kills, none blocked).
    for (int sig : {SIGPIPE, SIGINT, SIGTERM, SIGHUP, SIGXFSZ}) signal(sig, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    dup2(devnull.get(), 0);
    dup2(logfd.get(), 1);
    dup2(logfd.get(), 2);
    execvpe(args[0], args.data(), env.data());
    int e = errno;
    (void)!::write(ewr.get(), &e, sizeof(e));
    _exit(127);
  }
  if (forked) forked(pid);
  (void)!::write(gwr.get(), "g", 1);
  gwr.reset();
  ewr.reset();
  int e = 0;
  if (::read(erd.get(), &e, sizeof(e)) == sizeof(e)) {
    waitpid(pid, nullptr, 0);
    return sys_error("cannot start QEMU", argv[0], e).fix("check the command after --");
  }
  return StartedQemu{pid, log, mark};
}

Error killed_error(int sig, const std::string& when, const std::string& log) {
  Error e{fmt::format("QEMU was killed by signal {} ({}) {}", sig, strsignal(sig), when), log, ""};
  if (sig == SIGKILL)
    return e.fix(
        "find what killed it (the kernel log names the OOM killer when it was that), "
        "then run the restore again");
  return e.fix(
      "QEMU crashed or was killed: see its log and the kernel log, then run the restore "
      "again");
}

std::optional<siginfo_t> peek_exit(pid_t pid) {
  siginfo_t info{};
  errno = 0;  // ECHILD after: not a child of ours, or reaped already
  if (waitid(P_PID, id_t(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == pid)
    return info;
  return std::nullopt;
}

Error started_qemu_gone(const StartedQemu& q, const std::string& when) {
  if (auto info = peek_exit(q.pid); info && info->si_code != CLD_EXITED)
    return killed_error(info->si_status, when, q.log);
  std::string tail = log_tail(q.log, 3);
  return Error{"QEMU exited " + when, q.log, tail.empty() ? "no output" : tail};
}

Result<QmpClient> connect_started(const StartedQemu& q, const std::string& path, double timeout_s,
                                  bool daemonize) {
  auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  Backoff pause(5);
  pid_t other = -1;  // a process not ours that listens on `path`
  for (int ms = 0; ms < FaultPlan::get().slow_connect_ms && !cancelled(); ms += 10)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  for (;;) {
    auto info = peek_exit(q.pid);
    bool exited = info.has_value();
    if (exited && daemonize && info->si_code == CLD_EXITED && info->si_status == 0)
      waitpid(q.pid, nullptr, 0);  // the daemon's parent, done
    else if (exited)
      return started_qemu_gone(q, "before it was ready");
    struct stat st;
    if (stat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
      auto c = QmpClient::connect(path, std::max(1.0, timeout_s / 2));
      // Until our QEMU has bound the path anew, it may still lead to the
      // QEMU that had it before (one killed a moment ago, still exiting).
      // A daemon is ours by its mark: another QEMU may have bound the path
      // after ours (trial Q), or someone may have put a socket there.
      if (c.ok() &&
          (daemonize ? has_mark(c->peer_pid(), q.mark) || q.mark.empty() : c->peer_pid() == q.pid))
        return c;
      if (c.ok()) other = c->peer_pid();
      // Ours, just started, has no other client: it hangs before its main
      // loop (trial Z2 was told another client was probably connected).
      if (!c.ok() && Clock::now() > deadline && !process_stopped(q.pid))
        return Error{"the QEMU this restore started did not answer on its QMP socket in time", path,
                     "it hangs starting up: does its command open a FIFO nothing reads, or "
                     "connect to a socket nothing answers?"}
            .fix("check the command's chardevs and netdevs");
      if (!c.ok() && Clock::now() > deadline) return c.error();
    }
    if (Clock::now() > deadline && other > 0)
      return Error{
          "the QMP socket leads to another process", path,
          fmt::format("process {} listens there, not the QEMU this restore started", other)}
          .fix("give each VM its own -qmp socket");
    if (Clock::now() > deadline)
      return Error{"QEMU did not open its QMP socket in time", path, log_tail(q.log, 3)};
    if (cancelled()) return interrupted_error();
    pause.wait();
  }
}

}  // namespace vmsave
