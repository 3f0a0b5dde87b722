// Raw mode: snapshots of plain memory files (guest RAM in /dev/shm or
// hugetlbfs, or the memory files other VMMs write) into an image and back,
// with no QEMU involved. Also the helpers every restore path shares.

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <fmt/core.h>

#include "core/internal.h"
#include "core/vmsave.h"

namespace vmsave {

i64 file_page_size(int fd) {
  struct statfs fs;
  if (fstatfs(fd, &fs) == 0 && fs.f_type == HUGETLBFS_MAGIC) return fs.f_bsize;
  return sysconf(_SC_PAGESIZE);
}

// The huge page pool of `file_page` bytes has too few pages for `path`.
static Error short_huge_pool(const std::string& path, std::string detail, i64 file_page) {
  return Error{"not enough free huge pages for RAM file", path, std::move(detail)}.fix(
      fmt::format("add huge pages (sysctl vm.nr_hugepages, or "
                  "/sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages)",
                  file_page / 1024));
}

// The number a sysfs or cgroup file holds, -1 when it holds none ("max")
// or cannot be read.
static i64 read_number(const std::string& path) {
  std::ifstream f(path);
  long long v = -1;
  return f >> v && v >= 0 ? v : -1;
}

// Huge pages of `page_size` bytes the pool can still give out: free ones
// that no mapping has reserved. -1 when the kernel does not say.
i64 free_huge_pages(i64 page_size) {
  auto read = [&](const char* what) {
    return read_number(
        fmt::format("/sys/kernel/mm/hugepages/hugepages-{}kB/{}", page_size / 1024, what));
  };
  i64 free = read("free_hugepages"), resv = read("resv_hugepages");
  return free < 0 || resv < 0 ? -1 : std::max<i64>(free - resv, 0);
}

// The least memory limit over the memory cgroup this process is in and
// its ancestors (cgroup v2 memory.max, v1 memory.limit_in_bytes), with
// that cgroup's path in `where`; -1 when there is none. The pages written
// into tmpfs are charged to it: past it, the kernel's OOM killer ends
// vmsave part-way (trial N: a 64 MiB cgroup, a 256 MiB guest).
static i64 memory_cgroup_limit(std::string* where) {
  std::ifstream in("/proc/self/cgroup");
  std::string line, v1, v2;
  bool have_v2 = false;
  while (std::getline(in, line)) {  // "0::/PATH" (v2), "N:CONTROLLERS:/PATH" (v1)
    const size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = "," + line.substr(a + 1, b - a - 1) + ",";
    if (controllers == ",,") {
      v2 = line.substr(b + 1);
      have_v2 = true;
    } else if (controllers.find(",memory,") != std::string::npos) {
      v1 = line.substr(b + 1);
    }
  }
  i64 least = -1;
  auto walk = [&](const std::string& mount, std::string cg, const char* file) {
    for (;;) {
      const i64 v = read_number(fmt::format("{}{}/{}", mount, cg == "/" ? "" : cg, file));
      if (v >= 0 && v < (i64(1) << 60) && (least < 0 || v < least)) {
        least = v;  // "max" (v2) and v1's huge "no limit" are not read as limits
        *where = fmt::format("{}{}", mount, cg == "/" ? "" : cg);
      }
      if (cg.empty() || cg == "/") break;
      const size_t slash = cg.rfind('/');
      cg = slash == 0 || slash == std::string::npos ? "/" : cg.substr(0, slash);
    }
  };
  if (!v1.empty()) walk("/sys/fs/cgroup/memory", v1, "memory.limit_in_bytes");
  if (have_v2) walk("/sys/fs/cgroup", v2, "memory.max");
  return least;
}

void warn_bytes_past_end(const ImageReader& img, Reporter& rep) {
  struct stat st;
  if (fstat(img.fd(), &st) == 0 && st.st_size > img.layout().file_size)
    rep.warn(
        fmt::format("{} bytes follow the end of image {} (vmsave verify calls it damaged); "
                    "the restore ignores them",
                    st.st_size - img.layout().file_size, img.path()));
}

std::string hostname() {
  char buf[256] = {};
  gethostname(buf, sizeof(buf) - 1);
  return buf;
}

nlohmann::json base_metadata(const std::string& mode, const std::string& description) {
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  char when[64];
  std::strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return {{"vmsave_version", VMSAVE_VERSION},
          {"mode", mode},
          {"host", hostname()},
          {"created", when},
          {"description", description}};
}

void add_ram_report(nlohmann::json& j, const RamStats& s, const std::string& prefix) {
  j["ram_bytes"] = s.ram_bytes;
  j["stored_bytes"] = s.stored_bytes;
  j["zero_ratio"] = s.total_bytes ? 1.0 - double(s.data_bytes) / double(s.total_bytes) : 0.0;
  j["zero_filled_bytes"] = s.zero_filled_bytes;
  j[prefix + "_s"] = s.seconds;
  j["throughput_bps"] = s.seconds > 0 ? double(s.stored_bytes) / s.seconds : 0.0;
  j["jobs"] = s.engine.jobs;
  j["io_latency_us"] = latency_json(s.engine.latency);
  if (s.compressed) {
    // stored_bytes: what the RAM regions hold; the ratio is against the
    // same data pages stored raw.
    j["uncompressed_bytes"] = s.uncompressed_bytes;
    j["compressed_chunks"] = s.compressed_chunks;
    j["compression_ratio"] =
        s.uncompressed_bytes ? double(s.stored_bytes) / double(s.uncompressed_bytes) : 1.0;
    // The documented "when lz4 compressed any chunk": the effort it chose
    // means nothing when every chunk was stored raw (random data).
    if (s.lz4_acceleration > 0 && s.compressed_chunks > 0)
      j["lz4_acceleration"] = s.lz4_acceleration;
  }
}

void add_vmstate_report(nlohmann::json& j, const ImageLayout& img, const nlohmann::json& meta) {
  j["vmstate_bytes"] = meta.value("vmstate_bytes", img.vmstate.length);
  if (img.vmstate_codec != Codec::kRaw) j["vmstate_stored_bytes"] = img.vmstate.length;
}

nlohmann::json latency_json(const LatencyHistogram& h) {
  return {{"count", h.count()},
          {"p50", h.percentile(50)},
          {"p90", h.percentile(90)},
          {"p99", h.percentile(99)},
          {"max", h.max()}};
}

Status refuse_lazy_qemu_section(const ImageReader& img) {
  if (!img.layout().has_qemu_section()) return Status();
  std::string ids;
  for (auto& b : img.layout().blocks)
    if (b.via_qemu()) ids += (ids.empty() ? "" : ", ") + b.id;
  return Error{"cannot restore this image lazily", img.path(),
               fmt::format("RAM block(s) {} were saved by QEMU's mapped-ram migration, which QEMU "
                           "must read in full; there is no region to map",
                           ids)}
      .fix("restore it eagerly (drop --lazy)")
      .as(Exit::kUsage);
}

Status check_not_mapped(const std::string& path, const struct stat& st) {
  Mapper m = find_mapper(st);
  if (!m.pid) return Status();
  return Error{
      "RAM file is in use", path,
      fmt::format("process {} ({}) maps it; replacing it would kill that process", m.pid, m.name)}
      .fix(
          "stop that VM first, or restore into another file (another mem-path, or another "
          "--ram-dir)");
}

// Whether the open file `fd` begins with the image magic; unreadable
// (a write-only file) counts as one: it is not emptied unseen.
static bool begins_like_an_image(int fd, const struct stat& st) {
  if (!S_ISREG(st.st_mode) || st.st_size < i64(kMagic.size())) return false;
  std::array<u8, 8> head{};
  return ::pread(fd, head.data(), head.size(), 0) != ssize_t(head.size()) || head == kMagic;
}

Status not_an_image(int fd, const std::string& path, const std::string& ids) {
  struct stat st;
  if (fstat(fd, &st) < 0 || !begins_like_an_image(fd, st)) return Status();
  std::string what = ids.empty() ? "the restore would write over it"
                                 : fmt::format("block {} would be written over it", ids);
  return Error{"the RAM file is a vmsave image", path, what + " (or it cannot be read to tell)"}
      .fix("give the RAM files another directory (or mem-path), or move that image away");
}

Status check_not_an_image(const std::string& path, const struct stat& st, const ImageReader& img,
                          const std::string& ids) {
  struct stat own;
  if (fstat(img.fd(), &own) == 0 && same_file(st, own))
    return Error{"the RAM file is the image itself", path,
                 fmt::format("block {} would be written over the image it comes from", ids)}
        .fix("give the RAM files another directory (or mem-path)");
  if (!S_ISREG(st.st_mode)) return Status();  // never opening a FIFO or a tty to look
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd && errno == EACCES) {
    // Write-only to us (it can be written, so emptied): look through one
    // that can write, as what empties it will.
    fd = UniqueFd(::open(path.c_str(), O_WRONLY | O_NONBLOCK | O_NOCTTY | O_NOFOLLOW | O_CLOEXEC));
  }
  return fd ? not_an_image(fd.get(), path, ids) : Status();
}

// Creates the file at `path` (EEXIST if one is there) that the watchdog
// removes if vmsave dies: vmsave killed between making it and saying so
// left it behind, and the retry met "RAM file exists" (1 kill in 16). So
// the file is made unnamed, noted by its inode, and only then linked in;
// where the filesystem makes no unnamed files, it is noted once made.
static UniqueFd create_noted(const std::string& path, Watchdog* watchdog) {
  const std::string dir = std::filesystem::path(path).parent_path().string();
  UniqueFd fd(::open(dir.empty() ? "." : dir.c_str(), O_RDWR | O_TMPFILE | O_CLOEXEC, 0600));
  if (fd) {
    if (watchdog) watchdog->note_remove(path, fd.get());
    const std::string self = fmt::format("/proc/self/fd/{}", fd.get());
    if (::linkat(AT_FDCWD, self.c_str(), AT_FDCWD, path.c_str(), AT_SYMLINK_FOLLOW) == 0) return fd;
    // No /proc: linked by its descriptor, which root may do.
    if (errno == ENOENT && ::linkat(fd.get(), "", AT_FDCWD, path.c_str(), AT_EMPTY_PATH) == 0)
      return fd;
    if (errno == EEXIST) return UniqueFd();
  }
  fd = UniqueFd(::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (fd && watchdog) watchdog->note_remove(path, fd.get());
  return fd;
}

Result<RamFile> RamFile::create(const ImageReader& img, const std::vector<Part>& parts,
                                const std::string& path, bool force, Watchdog* watchdog,
                                SpaceClaims& claims) {
  const auto& blocks = img.layout().blocks;
  std::string ids;  // for messages: "ram0" or "m0 and m1"
  i64 length = 0;   // where the furthest part ends
  for (size_t i = 0; i < parts.size(); i++) {
    ids += (i == 0 ? "" : i + 1 == parts.size() ? " and " : ", ") + blocks[parts[i].block].id;
    length = std::max(length, parts[i].offset + blocks[parts[i].block].size);
  }
  // Two backends over the same bytes would each overwrite the other's RAM.
  for (size_t i = 0; i < parts.size(); i++)
    for (size_t j = i + 1; j < parts.size(); j++) {
      const Part &a = parts[i], &c = parts[j];
      if (a.offset < c.offset + blocks[c.block].size && c.offset < a.offset + blocks[a.block].size)
        return Error{"memory backends overlap in one RAM file", path,
                     fmt::format("{} (offset {}, {}) and {} (offset {}, {}) share bytes",
                                 blocks[a.block].id, a.offset, human_bytes(blocks[a.block].size),
                                 blocks[c.block].id, c.offset, human_bytes(blocks[c.block].size))}
            .fix("give each backend its own range (offset=) or its own file, as the VM had them");
    }
  struct stat at;
  if (stat(path.c_str(), &at) == 0) VMSAVE_TRY(check_not_an_image(path, at, img, ids));
  // An existing file (--force) is replaced only once every check below has
  // passed: a restore refused for want of room leaves it as it was.
  RamFile f;
  bool created = true;
  f.fd_ = create_noted(path, watchdog);
  if (!f.fd_ && errno == EEXIST) {
    struct stat in_way;
    if (lstat(path.c_str(), &in_way) == 0 && S_ISDIR(in_way.st_mode))
      return Error{"cannot create RAM file", path, "a directory is in the way"}.fix(
          "remove that directory or choose another place for the file");
    if (S_ISLNK(in_way.st_mode))  // dangling or not: never written through
      return Error{"cannot create RAM file", path,
                   "it is a symbolic link, and vmsave does not write through one"}
          .fix("give the real path, or remove the link");
    if (!force) {
      // Another VM's RAM: neither --force nor removing it would do.
      if (struct stat st; stat(path.c_str(), &st) == 0) VMSAVE_TRY(check_not_mapped(path, st));
      return Error{"RAM file exists", path, "refusing to overwrite it"}.fix(
          "pass --force to overwrite it, or remove it");
    }
    created = false;
    f.fd_ = UniqueFd(::open(path.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC));
    // Looked at again through the descriptor it is filled through: an
    // image renamed to that path since the check above is not emptied.
    if (f.fd_) VMSAVE_TRY(not_an_image(f.fd_.get(), path, ids));
    // Another user's file is replaced by a new one, not filled in place:
    // its owner could read and write the guest's memory through it, even
    // through a descriptor opened before (trial S).
    struct stat old;
    if (f.fd_ && fstat(f.fd_.get(), &old) == 0 && S_ISREG(old.st_mode) && old.st_uid != geteuid()) {
      if (parts.size() > 1 || parts[0].offset > 0)
        return Error{"RAM file belongs to another user", path,
                     fmt::format("its owner (uid {}) could read and write the guest's memory in "
                                 "it, and it holds more than block {}, so it is not replaced",
                                 old.st_uid, ids)}
            .fix("remove it first, or restore as its owner");
      VMSAVE_TRY(check_not_mapped(path, old));
      struct stat now;
      if (lstat(path.c_str(), &now) == 0 && same_file(now, old) && ::unlink(path.c_str()) < 0)
        return Error{"cannot replace RAM file", path,
                     fmt::format("it belongs to uid {}, and removing it failed: {}", old.st_uid,
                                 std::strerror(errno))}
            .fix("remove it first, or restore as its owner");
      created = true;
      f.fd_ = create_noted(path, watchdog);
    }
  }
  if (!f.fd_) {
    const int err = errno;
    Error e =
        sys_error(created ? "cannot create RAM file" : "cannot overwrite RAM file", path, err);
    if (!created && (err == EACCES || err == EPERM)) {
      // --force writes an existing file in place (its holes kept where the
      // image has zeros): one this user may not write is in the way, however
      // writable its directory (trial N).
      struct stat st {};
      ::stat(path.c_str(), &st);
      e.hint = fmt::format(
          "it exists and is not writable by this user (its owner is uid {}): "
          "remove it first, or restore as its owner",
          st.st_uid);
    }
    if (err == ENOENT) {
      // A directory that exists but takes no new files: /proc, /sys.
      struct stat dir;
      const std::string parent = std::filesystem::path(path).parent_path().string();
      e.hint = stat(parent.empty() ? "." : parent.c_str(), &dir) == 0 && S_ISDIR(dir.st_mode)
                   ? "its directory takes no new files (/proc, /sys?): put RAM files on tmpfs, "
                     "hugetlbfs or a disk"
                   : "create its directory first";
    }
    if (err == EROFS || (err == EACCES && created)) e.hint = "put it where vmsave can write";
    if (err == ELOOP) {
      e.detail = "it is a symbolic link, and vmsave does not write through one";
      e.hint = "give the real path, or remove the link";
    }
    return e;
  }
  // One restore at a time fills a file: two --force restores of the same
  // command at once both passed the check that no VM maps it, filled it
  // together, and two QEMUs ran on one RAM file, both guests crashing. The
  // lock lasts while this vmsave runs; by then its QEMU maps the file,
  // which check_not_mapped() refuses. Not unlinked when we made it: the
  // other restore took it in the instant between.
  if (::flock(f.fd_.get(), LOCK_EX | LOCK_NB) < 0)
    return errno == EWOULDBLOCK
               ? Error{"RAM file is in use", path, "another vmsave is filling it"}.fix(
                     "wait for that restore to finish, or give this one another path")
               : sys_error("cannot lock RAM file", path, errno);
  auto refuse = [&](Error e) {
    if (created) ::unlink(path.c_str());  // the empty file we just made
    return e;
  };
  struct stat st;
  if (fstat(f.fd_.get(), &st) < 0) return refuse(sys_error("fstat", path, errno));
  if (!S_ISREG(st.st_mode))  // --force replaces RAM files, never a device or FIFO
    return refuse(Error{"cannot fill RAM file", path, "it is not a regular file"}.fix(
        "give a path on tmpfs, hugetlbfs or a disk where a regular file can go"));
  if (!created)  // --force, but not under a running VM: truncating would kill it
    VMSAVE_TRY(check_not_mapped(path, st));
  // Room for its data pages, and for those of the files before it on the
  // same filesystem, said now rather than part-way through the fill (and,
  // for restore, before QEMU starts). Filesystems without a limit
  // (hugetlbfs or tmpfs without size=) report no blocks at all. A mapping
  // of a hugetlbfs file takes every page of it, from the huge page pool of
  // its size, which statvfs does not show. Elsewhere (ext4 and the like)
  // the page cache writes back whole large folios, zero pages beside data
  // included: count the whole block there. A file being replaced gives
  // back what it holds.
  struct statvfs sv;
  const i64 file_page = file_page_size(f.fd_.get());
  const bool huge = file_page > 4096;
  i64 need = 0;
  for (const Part& part : parts) {
    const BlockLayout& b = blocks[part.block];
    need += huge                        ? align_up(b.size, file_page)
            : in_memory_fs(f.fd_.get()) ? b.data_pages * b.page_size
                                        : align_up(b.size, 4096);
  }
  // Replaced whole (one block from its start), or emptied only where the
  // parts go, giving back no more than is known.
  const bool in_place = !created && (parts.size() > 1 || parts[0].offset > 0);
  const i64 freed = created || in_place ? 0 : static_cast<i64>(st.st_blocks) * 512;
  i64& claimed = claims[st.st_dev];
  const i64 pool = huge && !FaultPlan::get().no_space_check ? free_huge_pages(file_page) : -1;
  if (pool >= 0 && pool * file_page + freed < claimed + need) {
    std::string others =
        claimed ? fmt::format(" (and {} for the RAM files before it)", claimed / file_page) : "";
    return refuse(
        short_huge_pool(path,
                        fmt::format("block {} needs {} pages of {}{}, {} are free", ids,
                                    need / file_page, human_bytes(file_page), others, pool),
                        file_page));
  }
  if (!FaultPlan::get().no_space_check && fstatvfs(f.fd_.get(), &sv) == 0 && sv.f_blocks > 0) {
    const i64 room = static_cast<i64>(sv.f_bavail) * static_cast<i64>(sv.f_frsize);
    i64 whole = 0;
    for (const Part& part : parts) whole += align_up(blocks[part.block].size, file_page);
    if (!huge && room + freed >= claimed + need && room + freed < claimed + whole)
      f.short_room = fmt::format(
          "{} holds the guest's {} of data but not all its {} of RAM ({} free there): the guest "
          "dies of SIGBUS if it fills more; give the filesystem more room",
          path, human_bytes(need), human_bytes(whole), human_bytes(room + freed - claimed));
    if (room + freed < claimed + need) {
      std::string others =
          claimed ? fmt::format(" (and {} for the RAM files before it there)", human_bytes(claimed))
                  : "";
      // Exact when rounding would show the same figure twice (a page short).
      std::string needs = human_bytes(need), has = human_bytes(room);
      if (needs == has) needs = fmt::format("{} bytes", need), has = fmt::format("{} bytes", room);
      return refuse(Error{"not enough space for RAM file", path,
                          fmt::format("it needs {} for block {}{}, its filesystem has {} free",
                                      needs, ids, others, has)}
                        .fix("free space on that filesystem or choose another place for it"));
    }
  }
  // tmpfs pages are charged to vmsave's memory cgroup, all the files' together.
  if (!FaultPlan::get().no_space_check && !huge && in_memory_fs(f.fd_.get())) {
    std::string cgroup;
    i64& in_memory = claims[kChargedToCgroup];
    const i64 limit = memory_cgroup_limit(&cgroup);
    if (limit >= 0 && in_memory + need > limit + freed)
      return refuse(Error{"not enough memory for RAM file", path,
                          fmt::format("it needs {} for block {}{}, in memory charged to the "
                                      "memory cgroup vmsave runs in ({}), which is limited to {}",
                                      human_bytes(need), ids,
                                      in_memory ? fmt::format(" (and {} for the RAM files "
                                                              "before it)",
                                                              human_bytes(in_memory))
                                                : "",
                                      cgroup, human_bytes(limit))}
                        .fix("raise that cgroup's memory limit, or run vmsave outside it"));
    in_memory += need;
  }
  claimed += need;
  // From here on the file is ours: removed unless the restore completes.
  f.path_ = path;
  f.parts_ = parts;
  // Removed unless the restore completes; a file kept in place is not ours
  // to remove.
  if (in_place) f.keep_ = true;
  if (watchdog && !created && !in_place) watchdog->note_remove(path);
  // Guest memory holds secrets: a file replaced with --force gets the mode
  // a new one has (a 0644 file kept its mode, guest RAM world-readable).
  if (!created && fchmod(f.fd_.get(), 0600) < 0) return sys_error("fchmod", path, errno);
  auto size_error = [&](int err) {
    if (err == EFBIG) return file_too_large("cannot create RAM file", path, length);
    Error e = sys_error("cannot set the RAM file's size", path, err);
    if (err == EPERM || err == EOPNOTSUPP)  // fusefat refuses to grow a file
      e.hint = "this filesystem does not let a file grow that way: put the RAM files elsewhere";
    if (err == EINVAL && file_page > 4096)
      e.hint = "the block's size is not a multiple of this hugetlbfs page size";
    return e;
  };
  if (in_place) {
    for (const Part& part : parts) {
      const i64 n =
          std::min<i64>(blocks[part.block].size, std::max<i64>(st.st_size - part.offset, 0));
      if (n > 0 &&
          fallocate(f.fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, part.offset, n) < 0)
        return sys_error("cannot empty RAM file", path, errno).at(part.offset);
    }
    if (st.st_size < length && ftruncate(f.fd_.get(), length) < 0) return size_error(errno);
    return f;
  }
  if ((!created && ftruncate(f.fd_.get(), 0) < 0) || ftruncate(f.fd_.get(), length) < 0)
    return size_error(errno);
  return f;
}

RamFile::~RamFile() {
  if (fd_ && !keep_) ::unlink(path_.c_str());
}

Status RamFile::fill(const ImageReader& img, const EngineConfig& cfg, Progress* progress,
                     RamStats* stats) {
  for (const Part& part : parts_) VMSAVE_TRY(fill_part(img, part, cfg, progress, stats));
  // Filled, but into nothing anyone can reach if the file (its directory)
  // was removed meanwhile: not a restore.
  struct stat now;
  if (fstat(fd_.get(), &now) == 0 && now.st_nlink == 0)
    return Error{"RAM file was removed while it was being filled", path_, ""}.fix(
        "leave the RAM files and their directory alone until the restore ends");
  return Status();
}

Status RamFile::fill_part(const ImageReader& img, const Part& part, const EngineConfig& cfg,
                          Progress* progress, RamStats* stats) {
  const BlockLayout& b = img.layout().blocks[part.block];
  // write() fills the file without faulting in every page of a mapping
  // (the kernel clears a page it faults in, then the copy writes it again):
  // 4 GiB mixed from /dev/shm into a RAM file there, 3 alternating runs:
  // 1.23-1.40 s and 2.4-2.7 CPU-seconds against 1.50-1.58 s and 2.8-3.0.
  // hugetlbfs has no write(): that file is filled through a mapping, as
  // are chunks too large to read into a buffer first.
  RamDest dest{fd_.get(), part.offset, nullptr};
  Result<Mapping> m = Mapping();
  const i64 file_page = file_page_size(fd_.get());  // as create()
  if (file_page > 4096 || std::min(b.chunk_size, b.region.length) > kMaxChunkBuffer) {
    m = Mapping::map(fd_.get(), part.offset, align_up(b.size, b.page_size), PROT_READ | PROT_WRITE,
                     MAP_SHARED, path_);
    // The mapping reserves its huge pages: ENOMEM is a short pool (taken
    // since create() counted it), not a memory limit.
    if (!m.ok() && m.error().detail == std::strerror(ENOMEM))
      return short_huge_pool(
          path_,
          fmt::format("block {} needs {} pages of {}, the pool has fewer free", b.id,
                      align_up(b.size, file_page) / file_page, human_bytes(file_page)),
          file_page);
    if (!m.ok()) return m.error();
    dest = RamDest{-1, 0, m->data()};
  }
  Status st = img.read_ram(part.block, dest, cfg, progress, stats);
  if (!st.ok()) {
    // A full filesystem: read_ram says "cannot fill RAM file" without
    // knowing the file or, where it reads into a mapping (hugetlbfs), the
    // read fails with EFAULT, which would blame the image. Say what
    // happened, naming the file.
    // A filesystem failing its I/O (an xfs shut down) refuses pages the
    // same way, with room to spare: that is not told to free space.
    const Error& e = st.error();
    if (e.detail != std::strerror(EFAULT) && e.what != "cannot fill RAM file") return st;
    struct statvfs sv;
    if (fstatvfs(fd_.get(), &sv) < 0)
      return Error{"cannot fill RAM file", path_, std::strerror(errno)}.fix(
          "check that filesystem (dmesg), or choose another place for the file");
    if (static_cast<i64>(sv.f_bavail) * static_cast<i64>(sv.f_frsize) >= 16 * b.page_size)
      return Error{"cannot fill RAM file", path_,
                   "its filesystem refused a page though it has room (an I/O error?)"}
          .fix("check that filesystem (dmesg), or choose another place for the file");
    return Error{"cannot fill RAM file", path_, std::strerror(ENOSPC)}.fix(
        "free space on its filesystem or choose another place for it");
  }
  return Status();
}

Result<nlohmann::json> save_raw(const SaveOptions& opts, Reporter& rep) {
  StepTimer timer;
  std::vector<UniqueFd> fds;
  std::vector<RamSource> sources;
  std::vector<BlockLayout> blocks;
  std::vector<struct stat> before;  // each file as the save found it
  nlohmann::json meta = base_metadata("raw", opts.description);
  meta["guest_running"] = nullptr;
  for (auto& [id, file] : opts.rams) {
    if (!is_file_name_id(id))
      return Error{"bad RAM block id", "", fmt::format("\"{}\"", id)}
          .fix(id == "." || id == ".." ? "use another name: it becomes a file name under --ram-dir"
                                       : "use a name without '/' of at most 255 bytes")
          .as(Exit::kUsage);
    if (std::any_of(id.begin(), id.end(), [](unsigned char c) { return c < 0x20 || c == 0x7f; }))
      return Error{"bad RAM block id", "", "it holds control characters"}
          .fix("use a plain name: it becomes a file name under --ram-dir")
          .as(Exit::kUsage);
    for (auto& b : blocks)
      if (b.id == id)
        return Error{"duplicate RAM block id", "", id}
            .fix("give each --ram its own ID")
            .as(Exit::kUsage);
    // O_NONBLOCK: a FIFO must not block the open; fstat below refuses it.
    UniqueFd fd(::open(file.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK));
    if (!fd && errno == ELOOP)
      return Error{"cannot open memory file", file,
                   "it is a symbolic link, and vmsave reads memory files by their own path"}
          .fix("give the path it points to (readlink -f)");
    if (!fd)
      return sys_error("open", file, errno)
          .fix(errno == ENOENT                      ? "check the path"
               : errno == EACCES || errno == EPERM ? "run vmsave as a user who can read it"
                                                   : "");
    struct stat st;
    if (fstat(fd.get(), &st) < 0) return sys_error("fstat", file, errno);
    if (!S_ISREG(st.st_mode)) return Error{"not a regular file", file, "cannot save it as RAM"};
    if (st.st_size == 0) {
      // /proc and /sys files say 0 whatever they hold.
      struct statfs fs;
      bool pseudo = fstatfs(fd.get(), &fs) == 0 &&
                    (fs.f_type == PROC_SUPER_MAGIC || fs.f_type == SYSFS_MAGIC);
      return pseudo
                 ? Error{"not a memory file", file, "files in /proc and /sys have no size to save"}
                 : Error{"empty memory file", file, "nothing to save"};
    }
    RamSource s{id, file, fd.get(), 0, st.st_size, file_page_size(fd.get())};
    before.push_back(st);
    BlockLayout b;
    b.id = id;
    b.size = st.st_size;
    b.page_size = s.page_size;
    blocks.push_back(b);
    sources.push_back(s);
    // Where the file was, whichever directory info runs in.
    std::error_code ec;
    auto source = std::filesystem::absolute(file, ec);
    meta["blocks"].push_back({{"id", id},
                              {"size", s.size},
                              {"page_size", s.page_size},
                              {"source", ec ? file : source.lexically_normal().string()}});
    fds.push_back(std::move(fd));
  }
  // A memory file truncated while its mapping is read raises SIGBUS in the
  // workers: one line and status 1, as for a file written to meanwhile.
  // (On a terminal the progress line may be half drawn: start a new one.)
  exit_on_sigbus(std::string(isatty(STDERR_FILENO) ? "\n" : "") +
                 "vmsave: error: a memory file shrank while it was saved (reading it raised "
                 "SIGBUS); no image was made; stop whatever resizes it and save again\n");
  auto warn = [&](const std::string& m) { rep.warn(m); };
  VMSAVE_TRY(check_target_not_source(opts.image, sources));
  auto w = ImageWriter::create(opts.image, opts.force, blocks, opts.chunk_size, warn);
  if (!w.ok()) return w.error();
  (*w)->set_min_hole(opts.min_hole);
  VMSAVE_TRY((*w)->set_compression(opts.compress));
  if (opts.compress.enabled()) meta["compress"] = opts.compress.name();
  timer.lap("prepare");

  Progress progress;
  RamStats ram;
  rep.begin_phase("writing RAM", &progress);
  Status st = (*w)->write_ram(sources, opts.engine, &progress, &ram);
  rep.end_phase(!st.ok());
  if (!st.ok()) return st.error();
  timer.lap("ram");
  // A file written to meanwhile no longer matches what was hashed and
  // written: no image then (stores through a mapping leave no trace here;
  // raw mode saves files nothing writes to, as the man page says).
  for (size_t i = 0; i < fds.size(); i++) {
    struct stat now;
    if (fstat(fds[i].get(), &now) < 0) return sys_error("fstat", sources[i].path, errno);
    auto same = [](const timespec& a, const timespec& b) {
      return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec;
    };
    if (now.st_size != before[i].st_size || !same(now.st_mtim, before[i].st_mtim) ||
        !same(now.st_ctim, before[i].st_ctim))
      return Error{"memory file changed while it was saved", sources[i].path,
                   "it was written to or resized during the save; no image was made"}
          .fix("stop whatever writes it (pause the VM that owns it) and save again");
  }
  VMSAVE_TRY((*w)->commit(meta));
  timer.lap("commit");

  nlohmann::json j = {{"command", "save"}, {"mode", "raw"}, {"image", opts.image},
                      {"direct_io", (*w)->direct()}};
  add_ram_report(j, ram, "ram_write");
  if (opts.compress.enabled()) j["compress"] = opts.compress.name();
  j["steps_s"] = timer.steps();
  j["total_s"] = timer.total();
  return j;
}

Result<std::vector<std::string>> fill_ram_dir(const ImageReader& img, const RestoreOptions& opts,
                                              const char* command, Reporter& rep, RamStats* ram) {
  struct stat st;
  if (stat(opts.ram_dir.c_str(), &st) < 0) {
    Error e = sys_error("stat", opts.ram_dir, errno);
    if (errno == ENOENT) e.hint = "create that directory first";
    return e;
  }
  if (!S_ISDIR(st.st_mode)) return Error{"not a directory", opts.ram_dir, "--ram-dir needs one"};
  // Blocks saved through QEMU are restored by QEMU (from the image), not
  // into files.
  Progress progress;
  for (auto& b : img.layout().blocks)
    if (!b.via_qemu()) {
      progress.total += b.size;
      progress.data_total += b.data_bytes();
    }
  if (progress.total == 0) return std::vector<std::string>();  // QEMU loads all of it
  auto watchdog = Watchdog::start(command);
  if (!watchdog.ok()) return watchdog.error();
  // Every file is created (an existing one refused, room checked) before
  // any is filled, and each is removed again unless every block fills.
  std::vector<RamFile> files;
  std::vector<std::string> done;
  SpaceClaims claims;
  for (size_t i = 0; i < img.layout().blocks.size(); i++) {
    if (img.layout().blocks[i].via_qemu()) continue;
    std::string p = opts.ram_dir + "/" + img.layout().blocks[i].id;
    auto f = RamFile::create(img, {{i, 0}}, p, opts.force, &*watchdog, claims);
    if (!f.ok()) return f.error();
    if (!f->short_room.empty()) rep.warn(f->short_room);
    files.push_back(std::move(*f));
    // Absolute, as the arguments prepare prints: a wrapper may clean up
    // from another directory.
    std::error_code ec;
    auto abs = std::filesystem::absolute(p, ec);
    done.push_back(ec ? p : abs.lexically_normal().string());
  }
  rep.begin_phase("reading RAM", &progress);
  Status filled;
  for (size_t i = 0; i < files.size() && filled.ok(); i++)
    filled = files[i].fill(img, opts.engine, &progress, ram);
  if (filled.ok()) progress.data_done = progress.data_total.load();
  rep.end_phase(!filled.ok());
  if (!filled.ok()) return filled.error();
  for (auto& f : files) f.keep();
  return done;
}

Result<nlohmann::json> restore_raw(const RestoreOptions& opts, Reporter& rep) {
  StepTimer timer;
  auto warn = [&](const std::string& m) { rep.warn(m); };
  auto r = ImageReader::open(opts.image, warn);
  if (!r.ok()) return r.error();
  const ImageReader& img = **r;
  // Raw mode needs no metadata, but a damaged image is refused whole.
  if (auto meta = img.metadata(); !meta.ok()) return meta.error();
  warn_bytes_past_end(img, rep);
  if (img.layout().has_qemu_section())
    return Error{"cannot restore this image into RAM files", opts.image,
                 "its RAM was saved by QEMU's mapped-ram migration, which only QEMU can load"}
        .fix("restore it with QEMU: vmsave restore IMAGE -- QEMU-COMMAND")
        .as(Exit::kUsage);  // like --lazy of such an image: the image is fine
  timer.lap("open");
  RamStats ram;
  auto done = fill_ram_dir(img, opts, "restore", rep, &ram);
  if (!done.ok()) return done.error();
  timer.lap("ram");
  nlohmann::json j = {{"command", "restore"}, {"mode", "raw"}, {"image", opts.image},
                      {"ram_files", *done}};
  add_ram_report(j, ram, "ram_read");
  j["steps_s"] = timer.steps();
  j["total_s"] = timer.total();
  return j;
}

}  // namespace vmsave
