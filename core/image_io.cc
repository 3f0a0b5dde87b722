// ImageWriter and ImageReader: the RAM pass, the vmstate stream and the
// commit protocol of a vmsave image.
//
// The RAM pass is one parallel loop over 1 MiB chunks. A worker takes a
// chunk, skips pages that are holes in the source (found with SEEK_DATA /
// SEEK_HOLE, and never touched: reading a tmpfs hole through a shared
// mapping would allocate it), tests the others for zero, hashes the chunk's
// logical content, and queues O_DIRECT writes of its non-zero runs straight
// from the source mapping: no bounce copy. The restore pass mirrors it,
// reading a chunk's runs into a buffer, checking its checksum once its reads
// complete and writing its data pages into the RAM file.
//
// Commit: data, tail and vmstate are flushed, then the header is written and
// flushed, then the nameless O_TMPFILE inode is linked at the target and the
// directory flushed. Until the link, nothing exists at the target path; a
// killed save leaves no file anywhere.

#include "core/image_io.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/vfs.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <random>
#include <thread>

#include <fmt/core.h>

#include "core/internal.h"
#include "lib/cancel.h"

namespace vmsave {

namespace {

// The largest single request. fio's and the kernel's sweet spot on NVMe and
// on this project's ext4 disk: larger requests are split by the block layer
// anyway, smaller ones cost more submissions per byte.
constexpr i64 kMaxIoSize = 1 * kMiB;
// The largest chunk a save reads from a hugetlbfs file into buffers of its
// own (8 per worker): 2 MiB pages make 2 MiB chunks.
constexpr i64 kMaxHugeCopyChunk = 4 * kMiB;
// vmstate is copied through one buffer of this size.
constexpr size_t kStreamBuffer = 1 * kMiB;
// Chunk buffers a worker keeps busy while their I/O is in flight share a
// pool of `pool_bytes` over all workers: each gets what its share holds,
// at least one and at most `most`. vmsave's memory must not grow with the
// host's CPU count, which sets the default --jobs: verify with 16 MiB per
// worker took 533 MiB at --jobs 32, a save into /dev/shm 271 MiB.
int buffers_per_worker(i64 pool_bytes, int jobs, i64 buffer_size, int most) {
  i64 n = pool_bytes / (std::max(jobs, 1) * std::max<i64>(buffer_size, 1));
  return static_cast<int>(std::clamp<i64>(n, 1, most));
}
// Verify reads chunks into buffers: 16 of 1 MiB per worker with 2 workers.
constexpr i64 kVerifyPoolBytes = 32 * kMiB;
constexpr int kMaxVerifyBuffers = 16;
// Compressed saves and restores: 4 per worker at most, enough to keep the
// disk busy while the worker compresses the next chunk (plus one staging
// chunk per worker). With 1 MiB chunks: 2 workers use 10 MiB, 16 workers
// 48 MiB, 32 workers 64 MiB.
constexpr i64 kCompressPoolBytes = 32 * kMiB;
constexpr int kMaxCompressSlots = 4;
// A save reading its source into buffers (Block::copy: tmpfs, hugetlbfs).
constexpr i64 kCopyPoolBytes = 32 * kMiB;
constexpr int kMaxCopyBuffers = 8;

// The bytes of a block's last page past its end hold nothing: a lazy
// restore maps them.
constexpr const char* kTailNotZero = "holds data past the block's end, in its last page";

int compress_slots(int jobs, i64 chunk_size) {
  return buffers_per_worker(kCompressPoolBytes, jobs, chunk_size, kMaxCompressSlots);
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Joins sorted runs [start, end) separated by fewer than `min_hole` bytes.
// Returns the bytes of the gaps joined.
i64 coalesce(std::vector<std::pair<i64, i64>>& runs, i64 min_hole) {
  size_t n = 0;
  i64 joined = 0;
  for (size_t i = 0; i < runs.size(); i++) {
    if (n > 0 && runs[i].first - runs[n - 1].second < min_hole) {  // overlapping too
      joined += std::max<i64>(runs[i].first - runs[n - 1].second, 0);
      runs[n - 1].second = std::max(runs[n - 1].second, runs[i].second);
    } else {
      runs[n++] = runs[i];
    }
  }
  runs.resize(n);
  return joined;
}

bool is_zero(const u8* p, i64 n) {
  // Random pages fail on the first word; zero pages are read once at
  // memory bandwidth. Eight words per step lets the compiler vectorize;
  // the bytes after the last whole step (a partial last page) one by one,
  // and those before the first whole word (the tail of a block's last
  // page starts anywhere).
  for (; n > 0 && reinterpret_cast<uintptr_t>(p) % 8; p++, n--)
    if (*p) return false;
  const u64* w = reinterpret_cast<const u64*>(p);
  if (n >= 8 && w[0]) return false;
  const i64 words = n / 64 * 8;
  for (i64 i = 0; i < words; i += 8) {
    u64 acc = w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
    if (acc) return false;
  }
  for (i64 i = words * 8; i < n; i++)
    if (p[i]) return false;
  return true;
}

// Aligned for O_DIRECT, like every buffer a write goes out from.
const u8* zero_block() {
  static const AlignedBuffer z(kMaxIoSize);
  return z.data();
}

// Adds bytes [from, to) of a chunk's logical content to `st`: what `data`
// holds (data[0] is byte `from`) in the pages for which present(page) is
// true, zeros that must not be read from memory in the others.
template <class Present>
void hash_chunk_part(Hasher& st, const u8* data, i64 from, i64 to, i64 page_size, i64 first_page,
                     Present present) {
  for (i64 off = from; off < to;) {
    bool present_here = present(first_page + off / page_size);
    i64 end = align_down(off, page_size) + page_size;
    while (end < to && present(first_page + end / page_size) == present_here) end += page_size;
    end = std::min(end, to);
    if (present_here) {
      st.update(data + (off - from), end - off);
    } else {
      st.update_zeros(end - off);
    }
    off = end;
  }
}

// XXH3-64 of a chunk's logical content: `len` bytes starting at `base`.
template <class Present>
u64 chunk_checksum(const u8* base, i64 len, i64 page_size, i64 first_page, Present present) {
  Hasher st;
  hash_chunk_part(st, base, 0, len, page_size, first_page, present);
  return st.digest();
}

// Data extents [start, end) of `size` bytes of `fd` from `offset`, relative
// to `offset`. A filesystem without SEEK_DATA reports everything as data.
// With `reach`, also where the last extent really ends (the hole SEEK_HOLE
// found, relative to `offset`), which may be far past `size`: finding it
// took the filesystem a walk that far.
std::vector<std::pair<i64, i64>> data_extents(int fd, i64 offset, i64 size, i64* reach = nullptr) {
  std::vector<std::pair<i64, i64>> out;
  i64 pos = offset, end = offset + size;
  if (reach) *reach = 0;
  while (pos < end) {
    off_t d = lseek(fd, pos, SEEK_DATA);
    if (d < 0 && errno == ENXIO) break;  // only holes from here on
    off_t h = d < 0 || d >= end ? d : lseek(fd, d, SEEK_HOLE);
    if (d < 0 || h < 0) {
      if (reach) *reach = 0;
      return {{0, size}};
    }
    if (d >= end) break;
    out.emplace_back(d - offset, std::min<i64>(h, end) - offset);
    if (reach) *reach = h - offset;
    pos = h;
  }
  return out;
}

// Where `size` bytes of `fd` from `offset` have data, to `chunk` bytes:
// from the first data byte of each chunk holding any to that chunk's end,
// relative to `offset`, touching ranges joined. One SEEK_DATA per such
// chunk, where data_extents() takes two per extent.
std::vector<std::pair<i64, i64>> data_chunks(int fd, i64 offset, i64 size, i64 chunk) {
  std::vector<std::pair<i64, i64>> out;
  for (i64 pos = 0; pos < size;) {
    off_t d = lseek(fd, offset + pos, SEEK_DATA);
    if (d < 0 && errno == ENXIO) break;
    if (d < 0) return {{0, size}};  // no SEEK_DATA: all data
    i64 a = d - offset;
    if (a >= size) break;
    i64 z = std::min(size, align_down(a, chunk) + chunk);
    if (!out.empty() && out.back().second == a)
      out.back().second = z;
    else
      out.emplace_back(a, z);
    pos = z;
  }
  return out;
}

// The data extents of a file chunk by chunk, for one worker taking chunks
// in order. On tmpfs SEEK_HOLE walks the file page by page to the next
// hole, however far: to the end of a file without holes, from every chunk
// (4 GiB of random RAM took 74 s to save into /dev/shm so, and its image
// 72 s to verify there). So the extent found last is kept, and the chunks
// inside it need no walk of their own.
class ExtentCursor {
 public:
  // The extents of [start, start + len) of `fd` from `base`, relative to base.
  std::vector<std::pair<i64, i64>> chunk(int fd, i64 base, i64 start, i64 len) {
    if (fd == fd_ && base == base_ && known_.first <= start && start + len <= known_.second)
      return {{start, start + len}};
    i64 reach = 0;
    std::vector<std::pair<i64, i64>> out = data_extents(fd, base + start, len, &reach);
    for (auto& [a, z] : out) a += start, z += start;
    if (!out.empty()) {
      fd_ = fd;
      base_ = base;
      known_ = {out.back().first, start + reach};
    }
    return out;
  }

 private:
  int fd_ = -1;
  i64 base_ = 0;
  std::pair<i64, i64> known_{0, 0};
};

// Allocates the image's blocks for `ranges` (sorted, disjoint) with
// fallocate, if the filesystem has room for them and 256 MiB more; returns
// the ranges it allocated (none when it had no room or no fallocate).
std::vector<std::pair<i64, i64>> preallocate(int fd,
                                             const std::vector<std::pair<i64, i64>>& ranges) {
  i64 total = 0;
  for (auto [a, z] : ranges) total += z - a;
  struct statvfs sv;
  if (total == 0 || fstatvfs(fd, &sv) < 0 ||
      static_cast<i64>(sv.f_bavail) * static_cast<i64>(sv.f_frsize) < total + 256 * kMiB)
    return {};
  std::vector<std::pair<i64, i64>> done;
  for (auto [a, z] : ranges) {
    if (::fallocate(fd, 0, a, z - a) < 0) break;
    done.emplace_back(a, z);
  }
  return done;
}

// Punches the parts of `unwritten` (sorted, disjoint) that lie in
// `allocated` (sorted, disjoint): allocated blocks the save did not write.
Status punch_unwritten(int fd, const std::vector<std::pair<i64, i64>>& allocated,
                       const std::vector<std::pair<i64, i64>>& unwritten, const std::string& path) {
  size_t j = 0;
  for (auto [a, z] : allocated) {
    while (j < unwritten.size() && unwritten[j].second <= a) j++;
    for (size_t k = j; k < unwritten.size() && unwritten[k].first < z; k++) {
      i64 from = std::max(a, unwritten[k].first), to = std::min(z, unwritten[k].second);
      if (to <= from) continue;
      if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, from, to - from) < 0)
        return sys_error("fallocate(PUNCH_HOLE)", path, errno).at(from);
    }
  }
  return Status();
}

// Atomic: with 1 GiB pages, chunks of one page share bitmap bytes.
void atomic_bitmap_put(u8* bitmap, i64 i, bool on) {
  if (on)
    __atomic_fetch_or(&bitmap[i / 8], static_cast<u8>(1u << (i % 8)), __ATOMIC_RELAXED);
  else
    __atomic_fetch_and(&bitmap[i / 8], static_cast<u8>(~(1u << (i % 8))), __ATOMIC_RELAXED);
}

std::string dir_of(const std::string& path) {
  std::filesystem::path p(path);
  std::string d = p.parent_path().string();
  return d.empty() ? "." : d;
}

// XXH3-64 of `len` bytes of `fd` from `offset`, holes read as zeros without
// touching the disk. `direct`: the fd has O_DIRECT (aligned buffer; the
// last read may run past the end of the file and come back short).
Result<u64> hash_range(int fd, bool direct, i64 offset, i64 len, const std::string& path,
                       Progress* progress) {
  constexpr i64 kPiece = 8 * kMiB;
  AlignedBuffer buf(kPiece);
  Hasher st;
  const i64 end = offset + len;
  // Skip only large holes: reading a small hole costs less than a separate
  // read per extent (a mixed guest's zero pages make tens of thousands).
  std::vector<std::pair<i64, i64>> extents = data_extents(fd, offset, len);
  coalesce(extents, kPiece);
  i64 pos = offset;
  auto zeros = [&](i64 upto) {
    if (upto > pos) {
      st.update_zeros(upto - pos);
      if (progress) progress->add_done(upto - pos);
    }
    pos = std::max(pos, upto);
  };
  for (auto [ds, de] : extents) {
    if (cancelled()) return interrupted_error();
    zeros(offset + ds);
    // O_DIRECT reads start aligned; the extents are block-aligned anyway.
    i64 stop = offset + de;
    while (pos < stop) {
      i64 want = std::min(kPiece, stop - pos);
      i64 rd_at = direct ? align_down(pos, kDirectAlign) : pos;
      i64 skip = pos - rd_at;
      i64 rd_len = direct ? align_up(skip + want, kDirectAlign) : want;
      ssize_t n = ::pread(fd, buf.data(), rd_len, rd_at);
      if (n < 0) {
        if (errno == EINTR) continue;
        return sys_error("read", path, errno);
      }
      if (n <= skip) return Error{"unexpected end of file", path, fmt::format("at {}", pos)};
      i64 got = std::min<i64>(n - skip, want);
      st.update(buf.data() + skip, got);
      pos += got;
      if (progress) progress->add_done(got);
    }
  }
  zeros(end);
  return st.digest();
}

// The hidden name a save links its image under before renaming it over an
// existing target (--force), or writes it under where O_TMPFILE is missing.
// The name up to the pid: ".NAME.vmsave-".
std::string temp_prefix(const std::string& target) {
  return "." + std::filesystem::path(target).filename().string() + ".vmsave-";
}
std::string temp_name(const std::string& dir, const std::string& target, pid_t pid) {
  return fmt::format("{}/{}{}.tmp", dir, temp_prefix(target), pid);
}

// Removes the temporary files of earlier saves to `target` whose process is
// gone: one killed between link and rename (--force), or while writing a
// named temporary. A live process's file is its own business.
void remove_stale_temps(const std::string& dir, const std::string& target) {
  const std::string prefix = temp_prefix(target);
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    std::string name = e.path().filename().string();
    if (!name.starts_with(prefix) || !name.ends_with(".tmp")) continue;
    std::string digits = name.substr(prefix.size(), name.size() - prefix.size() - 4);
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) continue;
    pid_t pid = static_cast<pid_t>(std::stol(digits));
    if (pid > 0 && ::kill(pid, 0) < 0 && errno == ESRCH) ::unlink(e.path().c_str());
  }
}

// Drops the page-table entries of the whole pages in [p, p + len) of a
// MAP_SHARED file mapping that is done with; the data stays in the file.
// A save does it request by request, in the workers while the disk works,
// rather than in one munmap at the end: 4 GiB random to disk went from
// 3.05-3.16 s to 2.82-2.90 s (4 runs each; the munmap took 0.22 s). A
// restore gains nothing (its workers are busy with first-touch page
// allocation) and does not. A hugetlbfs mapping refuses ranges that are not
// whole huge pages (EINVAL) and is left to munmap.
void drop_mapped(const u8* p, i64 len) {
  constexpr uintptr_t kPage = 4096;
  auto a = reinterpret_cast<uintptr_t>(p);
  uintptr_t from = (a + kPage - 1) & ~(kPage - 1), to = (a + len) & ~(kPage - 1);
  if (to > from) ::madvise(reinterpret_cast<void*>(from), to - from, MADV_DONTNEED);
}

}  // namespace

// ---------------------------------------------------------------- writer

namespace {

// What a save may find at its target: nothing; with --force an earlier
// image or any regular file, or a symlink (replaced itself, never
// followed). A directory, device, FIFO or socket is never replaced: a
// rename would put the image in place of /dev/null as readily.
Status check_target(const std::string& target, bool force) {
  // Said now, not at the link once all RAM is written; the temporary name
  // beside the target is longer by its prefix and suffix.
  const size_t name = std::filesystem::path(target).filename().string().size();
  const size_t room = NAME_MAX - (temp_name(".", target, INT32_MAX).size() - 2 - name);
  if (name > room)
    return Error{"cannot save there", target,
                 fmt::format("its file name is {} bytes long, more than the {} vmsave can use",
                             name, room)}
        .fix("choose a shorter name")
        .as(Exit::kUsage);
  struct stat st;
  if (lstat(target.c_str(), &st) < 0) return Status();
  if (S_ISDIR(st.st_mode))
    return Error{"cannot save there", target, "it is a directory"}.fix(
        "name the image file, e.g. " + (std::filesystem::path(target) / "vm.vmsave").string());
  if (!S_ISREG(st.st_mode) && !S_ISLNK(st.st_mode))
    return Error{"cannot replace", target, "it is not a regular file"}.fix(
        "choose another path for the image");
  // A file mounted on the target (a bind mount) cannot be renamed over:
  // said now, not with EBUSY once all RAM is written (trial R).
  struct statx sx;
  if (statx(AT_FDCWD, target.c_str(), AT_SYMLINK_NOFOLLOW, STATX_TYPE, &sx) == 0 &&
      (sx.stx_attributes_mask & sx.stx_attributes & STATX_ATTR_MOUNT_ROOT))
    return Error{"cannot replace", target, "a file is mounted on it (a bind mount)"}.fix(
        "unmount it, or choose another path for the image");
  if (!force && S_ISLNK(st.st_mode))  // dangling or not: the link is what is replaced
    return Error{"a symbolic link is at the image path", target,
                 "refusing to replace it (vmsave does not write through a link)"}
        .fix("pass --force to replace the link with the image, or give the real path");
  if (!force)
    return Error{"image exists", target, "refusing to replace it"}.fix(
        "pass --force to replace it, or choose another path");
  return Status();
}

}  // namespace

Status check_target_not_source(const std::string& target, const std::vector<RamSource>& sources) {
  struct stat st, src;
  if (lstat(target.c_str(), &st) < 0 || !S_ISREG(st.st_mode)) return Status();
  for (const RamSource& s : sources)
    if (fstat(s.fd, &src) == 0 && same_file(src, st))
      return Error{"cannot save there", target,
                   fmt::format("it is the memory file of block {}, which this save reads", s.id)}
          .fix("choose another path for the image");
  // Another VM's RAM file, say (a typo in the path): the image would take
  // its name, and that VM would run on a file nobody can find (trial Q).
  // A lazy clone's private mapping of an image is no obstacle: it keeps
  // the old file.
  if (const Mapper m = find_mapper(st, true); m.pid > 0)
    return Error{"cannot save there", target,
                 fmt::format("process {} ({}) maps it shared: it is a running VM's RAM file, or "
                             "memory another program uses",
                             m.pid, m.name)}
        .fix("choose another path for the image");
  return Status();
}

Result<std::unique_ptr<ImageWriter>> ImageWriter::create(const std::string& target, bool force,
                                                         std::vector<BlockLayout> blocks,
                                                         i64 chunk_size, const WarnFn& warn) {
  std::unique_ptr<ImageWriter> w(new ImageWriter());
  w->target_ = target;
  w->force_ = force;
  w->dir_ = dir_of(target);
  w->warn_ = warn;

  if (target.empty())
    return Error{"no image path", "", "the image argument is empty"}.as(Exit::kUsage);
  VMSAVE_TRY(check_target(target, force));
  struct stat dst;
  if (stat(w->dir_.c_str(), &dst) < 0) {
    Error e = sys_error("stat", w->dir_, errno);
    if (errno == ENOENT) e.hint = "create that directory first, or save the image elsewhere";
    return e;
  }
  struct statfs dfs;
  if (statfs(w->dir_.c_str(), &dfs) == 0 && dfs.f_type == HUGETLBFS_MAGIC)
    return Error{"cannot write an image on hugetlbfs", target,
                 "its files take no write(), only mappings"}
        .fix("save the image on tmpfs or a disk filesystem");
  remove_stale_temps(w->dir_, target);

  // O_TMPFILE: an inode with no name until commit links it. Mode 0600:
  // guest memory holds keys and passwords.
  int flags = O_RDWR | O_TMPFILE;
  auto f = open_direct(w->dir_, flags, 0600, true);
  if (!f.ok()) {
    // Filesystems without O_TMPFILE: a named temporary beside the target.
    w->temp_name_ = temp_name(w->dir_, target, getpid());
    f = open_direct(w->temp_name_, O_RDWR | O_CREAT | O_EXCL, 0600, true);
    if (!f.ok()) {
      w->temp_name_.clear();
      Error e = f.error();
      e.what = "cannot create image";
      e.path = target;
      if (e.detail == std::strerror(EROFS) || e.detail == std::strerror(EACCES))
        e.hint = "save the image on a filesystem and in a directory vmsave can write";
      return e;
    }
  }
  w->file_ = std::move(*f);
  // The finished image is linked from /proc/self/fd: without /proc (a
  // bare container) that would fail only once all the work was done.
  if (w->temp_name_.empty() &&
      access(fmt::format("/proc/self/fd/{}", w->file_.fd.get()).c_str(), F_OK) < 0)
    return Error{"cannot create image", target, "/proc is not mounted, and vmsave links the "
                                                "finished image through /proc/self/fd"}
        .fix("mount /proc (mount -t proc proc /proc)");
  if (w->file_.direct) {
    // Some filesystems accept O_DIRECT at open and refuse it at the first
    // write. Probe with the header's own block, rewritten at commit.
    AlignedBuffer probe(kHeaderSize);
    if (::pwrite(w->file_.fd.get(), probe.data(), kHeaderSize, 0) < 0) {
      if (errno != EINVAL) return sys_error("write", target, errno);
      VMSAVE_TRY(reopen_buffered(w->file_));
    }
  }
  if (!w->file_.direct && warn)
    warn(fmt::format("{} does not support O_DIRECT; writing through the page cache", w->dir_));

  w->min_hole_ = default_min_hole(w->file_.fd.get());
  w->block_fs_ = w->file_.direct && !in_memory_fs(w->file_.fd.get());
  w->img_.blocks = std::move(blocks);
  w->img_.vmstate.offset = plan_regions(w->img_.blocks, chunk_size);
  i64 chunks = 0;
  for (auto& b : w->img_.blocks) chunks += b.via_qemu() ? 0 : b.chunks();
  if (chunks > kMaxChunks)
    return Error{"too many checksum chunks", target,
                 fmt::format("{} of RAM in {} chunks makes {} chunks, more than the {} an image "
                             "may have",
                             human_bytes(double(chunks) * double(chunk_size)),
                             human_bytes(double(chunk_size)), chunks, kMaxChunks)}
        .fix("use a larger --chunk-size")
        .as(Exit::kUsage);
  for (auto& b : w->img_.blocks)
    if (b.via_qemu()) w->img_.flags |= kFlagQemuMigration;
  if (w->img_.has_qemu_section()) w->img_.qemu.offset = align_up(w->img_.vmstate.offset, kRegionAlign);
  // The image's size up to its RAM regions' end, now: a filesystem with a
  // smaller file size limit (ext2, ext4 without extents) says so before
  // the guest is paused, not part-way through its RAM. Holes, no space.
  const i64 extent = w->img_.has_qemu_section() ? w->img_.qemu.offset : w->img_.vmstate.offset;
  if (::ftruncate(w->file_.fd.get(), extent) < 0) {
    // Made, but not given its size (fusefat refuses to grow a file: EPERM).
    if (const int err = errno; err != EFBIG) {
      Error e = sys_error("cannot set the new image's size", target, err);
      if (err == EPERM || err == EOPNOTSUPP)
        e.hint = "this filesystem does not let a file grow that way: save the image elsewhere";
      return e;
    }
    return file_too_large("cannot create image", target, extent);
  }
  std::random_device rd;
  for (auto& b : w->img_.uuid) b = static_cast<u8>(rd());
  w->img_.uuid[6] = (w->img_.uuid[6] & 0x0f) | 0x40;
  w->img_.uuid[8] = (w->img_.uuid[8] & 0x3f) | 0x80;
  w->img_.created_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                           std::chrono::system_clock::now().time_since_epoch())
                           .count();
  for (auto& b : w->img_.blocks) {
    w->bitmaps_.emplace_back(b.via_qemu() ? 0 : (b.pages() + 7) / 8);
    w->sums_.emplace_back(b.via_qemu() ? 0 : b.chunks());
  }
  w->vm_buf_ = AlignedBuffer(kStreamBuffer);
  return w;
}

Status ImageWriter::set_compression(const CodecSpec& spec) {
  if (!spec.enabled()) return Status();
  for (auto& b : img_.blocks)
    if (b.chunk_size > kMaxCompressedChunkSize)
      return Error{"cannot compress", target_,
                   fmt::format("block {} has {} chunks; compressed chunks are at most {}", b.id,
                               human_bytes(b.chunk_size), human_bytes(kMaxCompressedChunkSize))}
          // A chunk is at least a page: no --chunk-size helps 1 GiB pages.
          .fix(b.page_size > kMaxCompressedChunkSize
                   ? fmt::format("its pages are {}: save it without --compress",
                                 human_bytes(b.page_size))
                   : "use a smaller --chunk-size, or save without --compress")
          .as(Exit::kUsage);
  compress_ = spec;
  img_.flags |= kFlagCompressed;
  chunk_info_.clear();
  for (auto& b : img_.blocks) chunk_info_.emplace_back(b.chunks());
  return Status();
}

// The magic number of the filesystem `fd` is on, 0 if unknown.
static u64 fs_magic(int fd) {
  struct statfs sf;
  return fstatfs(fd, &sf) == 0 ? static_cast<u64>(sf.f_type) : 0;
}

// A file that lives in the page cache alone: tmpfs, ramfs (not hugetlbfs,
// which has no write()).
static bool page_cache_only(int fd) {
  const u64 magic = fs_magic(fd);
  return magic == TMPFS_MAGIC || magic == RAMFS_MAGIC;
}

bool in_memory_fs(int fd) { return page_cache_only(fd) || fs_magic(fd) == HUGETLBFS_MAGIC; }

i64 default_min_hole(int fd) { return in_memory_fs(fd) ? 0 : kDefaultMinHole; }

void ImageWriter::set_min_hole(i64 bytes) {
  min_hole_ = bytes < 0 ? default_min_hole(file_.fd.get()) : bytes;
}

ImageWriter::~ImageWriter() {
  if (!committed_ && !temp_name_.empty()) ::unlink(temp_name_.c_str());
}

// Maps a memory file to read. On hugetlbfs a mapping that reserves (no
// MAP_NORESERVE) needs a free huge page for each hole of the file, and
// fails with ENOMEM, which is no memory limit: said as the pool.
static Result<Mapping> map_source(const RamSource& s, int flags) {
  auto m = Mapping::map(s.fd, s.offset, s.size, PROT_READ, flags, s.path);
  if (!m.ok() && m.error().detail == std::strerror(ENOMEM) && fs_magic(s.fd) == HUGETLBFS_MAGIC)
    return Error{"not enough free huge pages to read memory file", s.path,
                 "reading it through a mapping (a --live or --compress save, or 1 GiB pages) "
                 "takes a huge page for each of its holes"}
        .fix("add huge pages (sysctl vm.nr_hugepages), or save without --live and --compress");
  if (!m.ok() && m.error().detail == std::strerror(ENOMEM))
    return m.error().fix(
        fmt::format("this save maps the whole memory file ({}): raise the "
                    "address-space limit (ulimit -v) above that",
                    human_bytes(double(s.size))));
  return m;
}

// The bytes of `sources` that hold data (their files' allocated blocks),
// or 0 when that is not known: a file that is not a regular one, or holds
// more than its block (one file for several, offset=), or one of them
// allocates nothing (hugetlbfs need not count).
static i64 allocated_bytes(const std::vector<RamSource>& sources) {
  i64 sum = 0;
  for (const RamSource& s : sources) {
    struct stat st;
    if (fstat(s.fd, &st) < 0 || !S_ISREG(st.st_mode) || s.offset != 0 ||
        st.st_size > align_up(s.size, std::max<i64>(s.page_size, 4096)) || st.st_blocks == 0)
      return 0;
    sum += std::min<i64>(i64(st.st_blocks) * 512, s.size);
  }
  return sum;
}

Status ImageWriter::write_ram(const std::vector<RamSource>& sources, const EngineConfig& cfg,
                              Progress* progress, RamStats* stats) {
  auto t0 = Clock::now();
  struct Block {
    Mapping map;
    std::vector<std::pair<i64, i64>> data;  // source chunks with data (prealloc)
    i64 first_chunk = 0;
    bool copy = false;  // read with pread() into a buffer, not through `map`
  };
  // Each task finds its chunk's source data extents, in parallel with the
  // others' writes: a mixed 4 GiB source takes half a million lseek() calls
  // (0.13 s), which had kept every worker waiting when they were found up
  // front. The image's blocks allocated first (below) are found up front,
  // but by the chunk: one lseek() per chunk with data.
  const bool prealloc = block_fs_ && !compress_.enabled() && min_hole_ >= kDefaultMinHole;
  i64 max_chunk = 0;
  for (auto& b : img_.blocks) max_chunk = std::max(max_chunk, b.chunk_size);
  const bool copy_from_memory = !compress_.enabled() && max_chunk <= kMaxIoSize;
  const bool serialize = page_cache_only(file_.fd.get());  // an image in memory: see below
  std::vector<Block> bs(sources.size());
  i64 n_chunks = 0;
  i64 total = 0;
  for (size_t i = 0; i < sources.size(); i++) {
    const RamSource& s = sources[i];
    // hugetlbfs has no SEEK_DATA, and a hole read through a shared mapping
    // takes a huge page from the pool for good, where read() returns zeros:
    // a save of a 256 MiB guest that had used 154 MiB left its file at
    // 256 MiB. And the mapping reserves pages for the whole file, so with
    // the pool short of that the save failed (ENOMEM). So such a file is
    // read with pread(), and not mapped at all. Not for chunks of 1 GiB
    // pages (buffers of 1 GiB), nor compressed (read through a mapping).
    bs[i].copy = fs_magic(s.fd) == HUGETLBFS_MAGIC && !compress_.enabled() &&
                 img_.blocks[i].chunk_size <= kMaxHugeCopyChunk;
    // From tmpfs too, or into an image there (see kCopyTag below).
    bs[i].copy |= copy_from_memory && (page_cache_only(s.fd) || serialize);
    // Read with pread(), a block is not mapped: a save took address space
    // for all of guest RAM (ulimit -v) for nothing (trial N).
    if (!bs[i].copy) {
      auto m = map_source(s, MAP_SHARED);
      if (!m.ok()) return m.error();
      bs[i].map = std::move(*m);
    }
    if (prealloc) bs[i].data = data_chunks(s.fd, s.offset, s.size, img_.blocks[i].chunk_size);
    bs[i].first_chunk = n_chunks;
    n_chunks += img_.blocks[i].chunks();
    total += s.size;
  }
  if (progress) {
    progress->total += total;
    progress->data_total += allocated_bytes(sources);
  }

  std::vector<u64> zero_sums;  // checksum of an all-zero chunk, per block
  for (auto& b : img_.blocks) zero_sums.push_back(zero_checksum(b.chunk_size));
  int fd = file_.fd.get();

  // Compression: each worker owns a codec context, a staging buffer (a
  // chunk with holes gathered into one piece) and a few output buffers that
  // stay busy until their write completes.
  const bool compress = compress_.enabled();
  const int jobs = cfg.jobs > 0 ? cfg.jobs : default_jobs();
  const i64 slot_size = compress ? max_chunk : std::min(max_chunk, kMaxIoSize);
  const int slots = compress ? compress_slots(jobs, slot_size) : 0;
  struct Worker {
    std::unique_ptr<Compressor> codec;
    Lz4Effort effort;
    AlignedBuffer staging;
    std::vector<AlignedBuffer> out;
    std::vector<int> free;
    std::vector<std::pair<i64, i64>> unwritten;  // image ranges, when preallocated
    ExtentCursor extents;                        // of the source, when not found up front
    std::vector<AlignedBuffer> copies;           // chunks read from the source (Block::copy)
    std::vector<int> copies_free;
    std::vector<u32> copy_users;  // the task and its writes not yet made
  };
  std::vector<Worker> workers(jobs);
  std::atomic<i64> written{0}, compressed_chunks{0}, filled{0}, acceleration_sum{0},
      lz4_chunks{0};

  // On a block device's filesystem an O_DIRECT write into blocks not yet
  // allocated needs the inode lock exclusively (ext4, XFS): io_uring cannot
  // issue it without blocking and hands it to kernel worker threads, where
  // the writes queue on that lock. Into blocks fallocate reserved, it runs
  // under the shared lock and is issued inline. So, as fio does by default,
  // the blocks for every chunk the source has data in are allocated first,
  // in one pass (a fallocate waits for every write in flight, so never per
  // chunk: that made it slower than none), and the ranges then left
  // unwritten (zero pages) are punched out again, so they stay holes.
  // From /dev/shm to the bench's ext4, 3 alternating runs each: 4 GiB mixed
  // 3.09-3.41 s without, 2.58-2.90 s with; 2 GiB of 128 KiB data and 128 KiB
  // written zeros (16k punches) 2.07-2.19 s without, 0.99-1.05 s with. Only
  // with runs under --min-hole joined (the default): with every zero page a
  // hole the punches would outnumber the writes.
  std::vector<std::pair<i64, i64>> allocated;
  if (prealloc) {
    std::vector<std::pair<i64, i64>> want;
    for (size_t i = 0; i < bs.size(); i++) {
      const BlockLayout& b = img_.blocks[i];
      for (auto [a, z] : bs[i].data)
        want.emplace_back(b.region.offset + align_down(a, b.page_size),
                          b.region.offset + std::min(align_up(z, b.page_size), b.region.length));
    }
    // In block order, so sorted. Zero pages between data closer than
    // min_hole are written anyway.
    coalesce(want, min_hole_);
    allocated = preallocate(fd, want);
  }
  const bool track_unwritten = !allocated.empty();

  // Into a file in memory the workers take turns to write (see
  // IoQueue::serialize_writes). 4 GiB of mixed RAM from /dev/shm into an
  // image there, 6 alternating runs with the host's free page reporting off:
  // 1.80-2.35 s (median 1.97) and 3.1-4.1 CPU-seconds, against 2.11-2.84 s
  // (2.37) and 3.6-5.0 through the ring; fio writing the same 3 GiB took
  // 1.73-2.35 s (1.77). With it on, fresh pages cost so much that the runs
  // of both spread over 2.3-3.9 s.
  std::mutex turn;
  // There the copy into the image is the kernel's whole work, and mapping
  // the source cost as much again: MADV_POPULATE_READ of its pages was 29%
  // of the CPU samples of a 4 GiB mixed save. So the workers read each
  // chunk's data pages into one of a few buffers of their own instead (one
  // copy, into a buffer that stays in the CPU's cache for the scan, hash
  // and write). 5 alternating runs, 4 GiB mixed from /dev/shm into an image
  // there: 1.33-1.43 s (median 1.33) and 1.6-1.8 CPU-seconds, against
  // 1.51-1.54 s and 2.2-2.3 mapped; fio's fallocate and write, 1.31 s.
  // From a source in memory to a disk too: O_DIRECT writes straight from
  // the mapping cost the kernel more per 4 KiB page (populating the
  // mapping, pinning each page for its write, unmapping it after) than one
  // copy does. 4 GiB mixed from /dev/shm to the bench's ext4, 3 alternating
  // runs: 0.55-0.58 CPU-seconds and 1.24-1.31 s copied, against 1.56-1.61
  // CPU-seconds (1.50-1.60 of them the kernel's) and 1.28-1.49 s mapped.
  constexpr u64 kCopyTag = u64(1) << 63;
  i64 copy_size = 0;  // the copy buffers' size: the largest chunk read so
  for (size_t i = 0; i < bs.size(); i++)
    if (bs[i].copy) copy_size = std::max(copy_size, img_.blocks[i].chunk_size);

  // The RAM mapping is not registered as fixed buffers: pinning it made no
  // difference (1 GiB random, tmpfs to tmpfs: 0.708 against 0.704 CPU-seconds,
  // medians of 8), while it would pin all guest RAM once per worker ring.
  auto setup = [&](IoQueue& q, int w) {
    q.name_fd(fd, target_);
    if (serialize) q.serialize_writes(fd, &turn);
    Worker& wk = workers[w];
    if (compress) {
      wk.codec = std::make_unique<Compressor>(compress_);
      wk.staging = AlignedBuffer(max_chunk);
    }
    for (int i = 0; i < slots; i++) {
      wk.out.emplace_back(slot_size);
      wk.free.push_back(i);
    }
    const int copies = buffers_per_worker(kCopyPoolBytes, jobs, copy_size, kMaxCopyBuffers);
    for (int i = 0; copy_size > 0 && i < copies; i++) {
      wk.copies.emplace_back(copy_size);
      wk.copies_free.push_back(i);
    }
    wk.copy_users.assign(wk.copies.size(), 0);
    // Tag = output buffer + 1 for writes from one; kCopyTag | buffer for
    // writes from a chunk read into one; 0 for writes straight from the
    // source mapping, whose pages are done with once written
    // (hashed before). Only large writes to a disk: there the workers wait
    // for the device anyway. Into tmpfs the kernel copies on worker threads
    // sharing this address space, so every drop interrupts them to flush
    // their TLBs, and scattered zero pages make writes of a page or two:
    // 4 GiB mixed into /dev/shm took 8-15 s so, against 3.5-4 s.
    q.set_on_done([&wk, this](const IoRequest& r) -> Status {
      if (r.tag & kCopyTag) {
        int i = static_cast<int>(r.tag & ~kCopyTag);
        if (--wk.copy_users[i] == 0) wk.copies_free.push_back(i);
      } else if (r.tag)
        wk.free.push_back(static_cast<int>(r.tag - 1));
      else if (block_fs_ && r.len >= kDefaultMinHole)
        drop_mapped(r.buf, r.len);
      return Status();
    });
  };
  auto task = [&](IoQueue& q, int w, i64 ci) -> Status {
    size_t bi = 0;
    while (bi + 1 < bs.size() && ci >= bs[bi + 1].first_chunk) bi++;
    const BlockLayout& b = img_.blocks[bi];
    Block& blk = bs[bi];
    i64 c = ci - blk.first_chunk;
    i64 start = c * b.chunk_size;
    i64 len = b.chunk_length(c);
    i64 page = b.page_size;
    i64 first_page = start / page;
    const u8* base = blk.copy ? nullptr : blk.map.data() + start;  // else set below
    u8* bitmap = bitmaps_[bi].data();

    // Which pages of this chunk are in source holes.
    const std::vector<std::pair<i64, i64>> data =  // relative to the block
        workers[w].extents.chunk(sources[bi].fd, sources[bi].offset, start, len);
    auto it = std::upper_bound(data.begin(), data.end(), std::make_pair(start, INT64_MAX));
    if (it != data.begin()) --it;
    auto in_data = [&](i64 off) {  // off relative to block
      while (it != data.end() && it->second <= off) ++it;
      return it != data.end() && it->first <= off + page - 1 && off < it->second;
    };

    // A chunk entirely in source holes: nothing to scan, hash or write.
    if (it == data.end() || it->first >= start + len || it->second <= start) {
      bool any = false;
      for (auto e = it; e != data.end() && e->first < start + len; ++e)
        if (e->second > start) any = true;
      if (!any) {
        sums_[bi][c] = len == b.chunk_size ? zero_sums[bi] : zero_checksum(len);
        if (progress) progress->done.fetch_add(len, std::memory_order_relaxed);
        if (track_unwritten)
          workers[w].unwritten.emplace_back(b.region.offset + start,
                                            b.region.offset + start + align_up(len, page));
        return Status();
      }
    }

    // Map the chunk's data pages in one call rather than one fault each
    // (never its holes: reading a tmpfs hole through a mapping allocates it).
    // 1 GiB random, tmpfs to tmpfs: 154k page faults down to 740, 0.797 to
    // 0.759 CPU-seconds (medians of 8). The same on the restore side
    // (MADV_POPULATE_WRITE before the reads) cost 6% more, so it is not done.
    // Or read them into a buffer (Block::copy): whole pages, a hole's part
    // of one read as zeros, and zeros past the file's end.
    int copy = -1;
    if (blk.copy) {
      Worker& wk = workers[w];
      while (wk.copies_free.empty()) VMSAVE_TRY(q.reap_some());
      copy = wk.copies_free.back();
      wk.copies_free.pop_back();
      wk.copy_users[copy] = 1;
      u8* buf = wk.copies[copy].data();
      const RamSource& src = sources[bi];
      i64 done_to = 0;  // relative to the chunk
      for (auto e = it; e != data.end() && e->first < start + len; ++e) {
        i64 from = std::max(align_down(e->first, page), start + done_to);
        i64 to = std::min(align_up(e->second, page), start + len);
        if (from >= to) continue;  // within the pages read already
        Status st = pread_all(src.fd, buf + (from - start), to - from, src.offset + from, src.path);
        struct stat now;
        if (!st.ok() && fstat(src.fd, &now) == 0 && now.st_size < src.offset + to)
          return Error{"a memory file shrank while it was saved", src.path,
                       fmt::format("it has {} bytes now; no image was made", i64(now.st_size))}
              .fix("stop whatever resizes it and save again");
        VMSAVE_TRY(st);
        done_to = std::max(done_to, to - start);
      }
      if (len % page) std::memset(buf + len, 0, align_up(len, page) - len);
      base = buf;
    }
    for (auto e = it; copy < 0 && e != data.end() && e->first < start + len; ++e) {
      i64 from = std::max(e->first, start), to = std::min(e->second, start + len);
      if (to > from) {
        i64 a = align_down(from, kDirectAlign), z = align_up(to, kDirectAlign);
        ::madvise(const_cast<u8*>(blk.map.data()) + a, z - a, MADV_POPULATE_READ);
      }
    }

    // Scan: which pages hold data, and the runs of data pages. A run ends
    // at the first zero page; short gaps are joined below.
    std::vector<bool> present, src_hole;
    present.reserve((len + page - 1) / page);
    src_hole.reserve((len + page - 1) / page);
    std::vector<std::pair<i64, i64>> runs;
    i64 raw_bytes = 0;
    for (i64 off = 0; off < len; off += page) {
      i64 plen = std::min(page, len - off);
      bool hole = !in_data(start + off);
      bool data = !hole && !is_zero(base + off, plen);
      present.push_back(data);
      src_hole.push_back(hole);
      if (!data) continue;
      atomic_bitmap_put(bitmap, first_page + off / page, true);
      // The last page may be partial; its write covers the whole page (the
      // region is page-aligned and the mapping readable to the page's end).
      i64 end = std::min(off + page, align_up(len, std::min<i64>(page, kDirectAlign)));
      if (!runs.empty() && runs.back().second == off)
        runs.back().second = end;
      else
        runs.emplace_back(off, end);
      raw_bytes += end - off;
    }
    if (progress) {
      progress->done.fetch_add(len, std::memory_order_relaxed);
      i64 in_data = 0;
      for (auto [a, z] : data)
        in_data += std::max<i64>(0, std::min(z, start + len) - std::max(a, start));
      progress->data_done.fetch_add(in_data, std::memory_order_relaxed);
    }
    // A huge page holds data if one byte does, but its zero 4 KiB blocks
    // stay holes all the same (read back as zeros): a guest on 1 GiB pages
    // stored 2 GiB for 169 MiB of data (trial M).
    // Only the source's data extents are looked at: reading a tmpfs hole
    // through the mapping would allocate it.
    if (page > kDirectAlign) {
      std::vector<std::pair<i64, i64>> blocks;
      raw_bytes = 0;
      i64 scanned = 0;  // chunk-relative: extents rounded out may meet
      for (auto [s, e] : runs)
        for (const auto& [xa, xz] : data) {
          i64 a = std::max({s, align_down(xa - start, kDirectAlign), scanned});
          i64 z = std::min(e, align_up(xz - start, kDirectAlign));
          for (i64 o = a; o < z; o += kDirectAlign) {
            if (is_zero(base + o, std::min(kDirectAlign, len - o))) continue;
            if (!blocks.empty() && blocks.back().second == o)
              blocks.back().second = o + kDirectAlign;
            else
              blocks.emplace_back(o, o + kDirectAlign);
            raw_bytes += kDirectAlign;
          }
          scanned = std::max(scanned, z);
        }
      runs = std::move(blocks);
    }

    // Compressed: only when it saves at least one 4 KiB block over the raw
    // pages, so the output buffer's capacity is that and no more.
    if (compress && raw_bytes > kDirectAlign) {
      Worker& wk = workers[w];
      const auto t_start = Clock::now();
      // Straight from the mapping, zero pages and all, unless the source has
      // holes there (reading a tmpfs hole through a mapping allocates it):
      // then the data runs are gathered with zeros between them.
      const u8* in = base;
      if (std::find(src_hole.begin(), src_hole.end(), true) != src_hole.end()) {
        u8* st = wk.staging.data();
        i64 from = 0;  // zeros only between the runs
        for (auto [s, e] : runs) {
          std::memset(st + from, 0, s - from);
          from = std::min(e, len);
          std::memcpy(st + s, base + s, from - s);
        }
        std::memset(st + from, 0, len - from);
        in = st;
      }
      sums_[bi][c] = xxh3(in, len);
      const bool lz4 = compress_.codec == Codec::kLz4;
      u32 deep = 0;
      auto t_wait = Clock::now();
      if (lz4) {
        VMSAVE_TRY(q.poll());
        deep = q.in_flight();
        wk.codec->set_acceleration(wk.effort.acceleration());
        acceleration_sum.fetch_add(wk.effort.acceleration(), std::memory_order_relaxed);
        lz4_chunks.fetch_add(1, std::memory_order_relaxed);
      }
      while (wk.free.empty()) VMSAVE_TRY(q.reap_some());
      int slot = wk.free.back();
      u8* out = wk.out[slot].data();
      auto t_work = Clock::now();
      size_t n = wk.codec->compress({in, static_cast<size_t>(len)}, out, raw_bytes - kDirectAlign);
      if (lz4) {  // hashing and compressing against waiting for the disk
        double waited = std::chrono::duration<double>(t_work - t_wait).count();
        wk.effort.add(deep, waited, seconds_since(t_start) - waited);
      }
      if (n > 0) {
        wk.free.pop_back();
        i64 padded = align_up(static_cast<i64>(n), kDirectAlign);
        std::memset(out + n, 0, padded - n);
        chunk_info_[bi][c] = ChunkInfo{compress_.codec, static_cast<i64>(n), checksum({out, n})};
        written.fetch_add(padded, std::memory_order_relaxed);
        compressed_chunks.fetch_add(1, std::memory_order_relaxed);
        IoRequest r;
        r.fd = fd;
        r.buf = out;
        r.len = static_cast<u32>(padded);
        r.offset = b.region.offset + start;
        r.write = true;
        r.tag = static_cast<u64>(slot) + 1;
        return q.submit(r);
      }
      // Does not shrink enough: stored raw below, like any other chunk.
    }

    // Zero pages between runs closer than min_hole_ go out as zeros with
    // them, in the same request (gathered below where the source has holes
    // among them).
    const bool join = min_hole_ > std::min(page, kDirectAlign);
    if (join) filled.fetch_add(coalesce(runs, min_hole_), std::memory_order_relaxed);
    if (track_unwritten) {  // what the runs leave out of the chunk
      const i64 at = b.region.offset + start;
      i64 from = 0;
      for (auto [s, e] : runs) {
        if (s > from) workers[w].unwritten.emplace_back(at + from, at + s);
        from = e;
      }
      const i64 end = align_up(len, page);
      if (end > from) workers[w].unwritten.emplace_back(at + from, at + end);
    }
    // The pages of [o, o + n) as pieces: data straight from the source's
    // pages, its holes from the shared zero block (never read through the
    // mapping, and no copy: 4 GiB mixed to disk spent its time copying into
    // a few output buffers and waiting for them).
    auto gather = [&](i64 o, i64 n) {
      std::vector<iovec> v;
      bool in_zeros = false;
      for (i64 p = o; p < o + n; p += page) {
        const bool hole = src_hole[p / page];
        const i64 m = std::min(page, o + n - p);
        u8* end = v.empty() ? nullptr : static_cast<u8*>(v.back().iov_base) + v.back().iov_len;
        u8* at = const_cast<u8*>(base + p);
        if (hole) at = in_zeros ? end : const_cast<u8*>(zero_block());
        if (at == end)
          v.back().iov_len += m;
        else
          v.push_back({at, static_cast<size_t>(m)});
        in_zeros = hole;
      }
      return v;
    };
    for (auto [s, e] : runs) {
      for (i64 o = s; o < e; o += slot_size) {
        IoRequest r;
        r.fd = fd;
        r.buf = const_cast<u8*>(base + o);
        r.len = static_cast<u32>(std::min(slot_size, e - o));
        r.offset = b.region.offset + start + o;
        r.write = true;
        bool gaps = false;  // only joined runs span source holes
        for (i64 p = o / page; join && p * page < o + r.len; p++) gaps |= bool(src_hole[p]);
        if (gaps) r.iov = gather(o, r.len);
        if (copy >= 0) {
          r.tag = kCopyTag | static_cast<u64>(copy);
          workers[w].copy_users[copy]++;
        }
        VMSAVE_TRY(q.submit(r));
      }
    }
    written.fetch_add(raw_bytes, std::memory_order_relaxed);
    sums_[bi][c] = chunk_checksum(base, len, page, 0, [&](i64 p) { return bool(present[p]); });
    if (copy >= 0 && --workers[w].copy_users[copy] == 0) workers[w].copies_free.push_back(copy);
    return Status();
  };

  RamStats local;
  EngineConfig c2 = cfg;
  c2.jobs = jobs;
  Status st = run_parallel(c2, n_chunks, setup, task, &local.engine);
  if (!st.ok()) return st;
  // All of it read (the allocated figure may count blocks SEEK_DATA calls
  // holes: ext4's unwritten extents).
  if (progress) progress->data_done = progress->data_total.load();
  if (track_unwritten) {
    std::vector<std::pair<i64, i64>> unwritten;
    for (auto& wk : workers)
      unwritten.insert(unwritten.end(), wk.unwritten.begin(), wk.unwritten.end());
    std::sort(unwritten.begin(), unwritten.end());
    coalesce(unwritten, 1);  // ranges that touch
    VMSAVE_TRY(punch_unwritten(fd, allocated, unwritten, target_));
  }
  if (!file_.direct) {
    // Buffered fallback: push the pages out now and drop them from the page
    // cache, so a save does not evict the host's working set.
    if (fdatasync(fd) < 0) return sys_error("fdatasync", target_, errno);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  }
  for (size_t i = 0; i < bs.size(); i++) {
    i64 n = 0;
    for (u8 byte : bitmaps_[i]) n += __builtin_popcount(byte);
    img_.blocks[i].data_pages = n;
    local.data_bytes += n * img_.blocks[i].page_size;
    local.total_bytes += img_.blocks[i].pages() * img_.blocks[i].page_size;
    local.stored_bytes += n * img_.blocks[i].page_size;
  }
  if (compress) {
    local.compressed = true;
    local.uncompressed_bytes = local.stored_bytes;
    local.stored_bytes = written.load();
    local.compressed_chunks = compressed_chunks.load();
    if (lz4_chunks.load() > 0)
      local.lz4_acceleration = double(acceleration_sum.load()) / double(lz4_chunks.load());
  }
  local.ram_bytes = total;
  local.zero_filled_bytes = filled.load();
  local.seconds = seconds_since(t0);
  if (stats) *stats = local;
  return Status();
}

i64 stored_from(int fd, i64 offset) {
  struct stat st;
  if (fstat(fd, &st) < 0 || st.st_size <= offset) return 0;
  i64 n = 0;
  for (auto [a, z] : data_extents(fd, offset, st.st_size - offset)) n += z - a;
  return n;
}

namespace {

// The bytes of [from, to), offsets in a chunk whose first page is page
// `first` of its block, that lie in pages the bitmap marks as stored.
i64 stored_bytes_in(const std::vector<u8>& bitmap, i64 first, i64 page, i64 from, i64 to) {
  i64 n = 0;
  for (i64 p = from / page; p * page < to; p++)
    if (bitmap_test(bitmap.data(), first + p))
      n += std::min(to, (p + 1) * page) - std::max(from, p * page);
  return n;
}

// The first byte in [from, to) of `fd` that is not zero, or -1. Reads only
// what the file stores (holes are zeros) into `buf`, whole aligned blocks,
// so that an O_DIRECT descriptor takes the reads.
Result<i64> first_nonzero_byte(int fd, i64 from, i64 to, const AlignedBuffer& buf,
                               const std::string& path) {
  for (auto [a, z] : data_extents(fd, from, to - from)) {
    for (i64 at = from + a; at < from + z;) {
      const i64 base = align_down(at, kDirectAlign);
      const i64 n = std::min<i64>(buf.size(), align_up(from + z, kDirectAlign) - base);
      VMSAVE_TRY(pread_all(fd, buf.data(), n, base, path));
      for (i64 k = at - base; k < std::min(n, from + z - base); k++)
        if (buf.data()[k] != 0) return base + k;
      at = base + n;
    }
  }
  return i64(-1);
}

}  // namespace

Result<i64> first_nonzero(int fd, i64 offset, i64 size, const std::string& path) {
  AlignedBuffer buf(kMiB);
  for (auto [a, z] : data_extents(fd, offset, size)) {
    for (i64 at = a; at < z; at += kMiB) {
      const i64 n = std::min(kMiB, z - at);
      VMSAVE_TRY(pread_all(fd, buf.data(), n, offset + at, path));
      for (i64 page = 0; page < n; page += 4096)
        if (!is_zero(buf.data() + page, std::min<i64>(4096, n - page))) return at + page;
    }
  }
  return -1;
}

i64 ImageWriter::qemu_section_stored() const {
  return stored_from(file_.fd.get(), img_.qemu.offset);
}

Result<UniqueFd> ImageWriter::reopen(int flags) const {
  std::string proc = fmt::format("/proc/self/fd/{}", file_.fd.get());
  UniqueFd fd(::open(proc.c_str(), flags | O_CLOEXEC));
  if (!fd) return sys_error("reopen", target_, errno);
  return fd;
}

Status ImageWriter::finish_qemu_section(Progress* progress) {
  struct stat st;
  if (fstat(file_.fd.get(), &st) < 0) return sys_error("fstat", target_, errno);
  i64 start = img_.qemu.offset;
  if (st.st_size <= start)
    return Error{"QEMU's migration left nothing in the image", target_,
                 fmt::format("file ends at {}, QEMU's section starts at {}", i64(st.st_size), start)};
  img_.qemu.length = st.st_size - start;
  if (progress) progress->total += img_.qemu.length;
  auto sum = hash_range(file_.fd.get(), file_.direct, start, img_.qemu.length, target_, progress);
  if (!sum.ok()) return sum.error();
  img_.qemu.checksum = *sum;
  // The tail (and the empty vmstate section) go after QEMU's bytes.
  img_.vmstate.offset = align_up(st.st_size, kSectionAlign);
  vm_written_ = 0;
  vm_fill_ = 0;
  vmstate_len_ = 0;
  return Status();
}

namespace {
constexpr i64 kLivePiece = 64 * kKiB;

// A block's live piece: 64 KiB, but never more than a chunk. Chunks smaller
// than a piece each stored their own hash in the one slot of the piece they
// share, so every pass found them all changed: with --chunk-size 4K each
// pass rewrote the whole of RAM (388 MiB of 144 stored). Nor a huge page:
// pieces of a page each took a buffer of the page's size, so a guest on
// 1 GiB pages had vmsave allocate 32 GiB per worker (killed at 20 GiB),
// and one changed byte rewrote its whole page.
i64 live_piece(const BlockLayout& b) {
  return std::min(kLivePiece, b.chunk_size);
}
constexpr u64 kNoSlot = ~u64(0);
}

Status ImageWriter::live_pass(const std::vector<RamSource>& sources, const EngineConfig& cfg,
                              Progress* progress, PassStats* stats) {
  auto t0 = Clock::now();
  const bool first = live_passes_ == 0;
  std::vector<std::vector<std::pair<i64, i64>>> extents(sources.size());
  std::vector<i64> first_chunk(sources.size());
  // The checksum of a whole piece of zeros, per block: hole pieces compare
  // against it every pass (an idle 16 GiB guest has ~250k of them).
  std::vector<u64> zero_piece_sums;
  i64 n_chunks = 0, total = 0;
  for (size_t i = 0; i < sources.size(); i++) {
    const RamSource& s = sources[i];
    const BlockLayout& b = img_.blocks[i];
    zero_piece_sums.push_back(zero_checksum(live_piece(b)));
    if (first) {
      if (b.size % kDirectAlign)
        return Error{"cannot save RAM block " + b.id + " live", s.path,
                     "its size is not a multiple of 4 KiB"};
      auto m = map_source(s, MAP_SHARED);
      if (!m.ok()) return m.error();
      live_maps_.push_back(std::move(*m));
      const i64 piece = live_piece(b);
      piece_sums_.emplace_back((b.size + piece - 1) / piece);
      chunk_dirty_.emplace_back(b.chunks());
      piece_data_.emplace_back(b.page_size > piece ? piece_sums_.back().size() : 0);
    }
    // Holes are looked up again each pass: the guest may have filled one.
    extents[i] = data_extents(s.fd, s.offset, s.size);
    first_chunk[i] = n_chunks;
    n_chunks += b.chunks();
    total += s.size;
  }
  if (progress) progress->total += total;
  int fd = file_.fd.get();
  const int jobs = cfg.jobs > 0 ? cfg.jobs : default_jobs();
  const size_t pool = std::max<u32>(cfg.queue_depth, 4);

  struct Worker {
    std::vector<AlignedBuffer> buffers;
    std::vector<int> free;
    std::vector<u32> pending;
  };
  std::vector<Worker> workers(jobs);
  std::atomic<i64> written{0}, rewritten{0};

  auto setup = [&](IoQueue& q, int w) {
    q.name_fd(fd, target_);
    i64 piece = 0;
    for (auto& b : img_.blocks) piece = std::max(piece, live_piece(b));
    for (size_t i = 0; i < pool; i++) {
      workers[w].buffers.emplace_back(piece);
      workers[w].free.push_back(static_cast<int>(i));
    }
    workers[w].pending.assign(pool, 0);
    q.set_on_done([&, w](const IoRequest& r) -> Status {
      if (r.tag == kNoSlot) return Status();  // zeros from the shared block
      int slot = static_cast<int>(r.tag);
      if (--workers[w].pending[slot] == 0) workers[w].free.push_back(slot);
      return Status();
    });
  };

  auto task = [&](IoQueue& q, int w, i64 ci) -> Status {
    size_t bi = 0;
    while (bi + 1 < sources.size() && ci >= first_chunk[bi + 1]) bi++;
    const BlockLayout& b = img_.blocks[bi];
    const i64 c = ci - first_chunk[bi];
    const i64 start = c * b.chunk_size, len = b.chunk_length(c);
    const i64 page = b.page_size, piece = live_piece(b);
    const u64 zero_piece = zero_piece_sums[bi];
    auto hole_sum = [&](i64 plen) { return plen == piece ? zero_piece : zero_checksum(plen); };
    const u8* mem = live_maps_[bi].data();
    u8* bitmap = bitmaps_[bi].data();
    auto& ext = extents[bi];
    auto in_hole = [&](i64 off, i64 n) {  // [off, off+n) has no data extent
      auto it = std::upper_bound(ext.begin(), ext.end(), std::make_pair(off, INT64_MAX));
      if (it != ext.begin()) --it;
      for (; it != ext.end() && it->first < off + n; ++it)
        if (it->second > off) return false;
      return true;
    };
    Hasher chunk_hash;
    Worker& wk = workers[w];
    for (i64 off = start; off < start + len; off += piece) {
      const i64 plen = std::min(piece, start + len - off);
      const i64 pidx = off / piece;
      const bool hole = in_hole(off, plen);
      if (!first) {
        u64 now = hole ? hole_sum(plen) : xxh3(mem + off, plen);
        if (now == piece_sums_[bi][pidx]) continue;
        chunk_dirty_[bi][c] = 1;
        rewritten.fetch_add(1, std::memory_order_relaxed);
      }
      const u8* src;
      int slot = -1;
      if (hole) {
        src = zero_block();
      } else {
        while (wk.free.empty()) VMSAVE_TRY(q.reap_some());
        slot = wk.free.back();
        wk.free.pop_back();
        wk.pending[slot] = 1;  // held until its writes are all submitted
        std::memcpy(wk.buffers[slot].data(), mem + off, plen);
        src = wk.buffers[slot].data();
      }
      piece_sums_[bi][pidx] = hole ? hole_sum(plen) : xxh3(src, plen);
      if (first) {
        if (hole) {
          chunk_hash.update_zeros(plen);
        } else {
          chunk_hash.update(src, plen);
        }
      }
      // Write the pages that hold data now, and zeros over pages that held
      // data before (a hole piece has nothing to copy: zeros from a shared
      // zero block).
      i64 run_start = -1, run_end = 0;
      auto flush_run = [&]() -> Status {
        for (i64 o = run_start; o < run_end; o += kMaxIoSize) {
          IoRequest r;
          r.fd = fd;
          // A hole piece writes zeros from the shared 1 MiB zero block.
          r.buf = const_cast<u8*>(hole ? zero_block() : src + o);
          r.len = static_cast<u32>(std::min(kMaxIoSize, run_end - o));
          r.offset = b.region.offset + off + o;
          r.write = true;
          r.tag = slot < 0 ? kNoSlot : static_cast<u64>(slot);
          if (slot >= 0) wk.pending[slot]++;
          written.fetch_add(r.len, std::memory_order_relaxed);
          VMSAVE_TRY(q.submit(r));
        }
        run_start = -1;
        return Status();
      };
      if (page > piece) {
        // A piece of a huge page: written whole when it holds data, or
        // zeros over the data it held; the pages' bits are set below.
        const bool data = !hole && !is_zero(src, plen);
        u8& had = piece_data_[bi][pidx];
        if (data || had) {
          run_start = 0;
          run_end = plen;
          VMSAVE_TRY(flush_run());
        }
        had = data;
      }
      for (i64 po = 0; page <= piece && po < plen; po += page) {
        i64 pg = (off + po) / page;
        bool data = !hole && !is_zero(src + po, std::min(page, plen - po));
        bool had = bitmap_test(bitmap, pg);
        atomic_bitmap_put(bitmap, pg, data);
        // A gap shorter than min_hole_ goes out with the run: the piece's
        // copy holds its zeros.
        if (data || had) {
          if (run_start >= 0 && run_end != po && po - run_end >= min_hole_) VMSAVE_TRY(flush_run());
          if (run_start < 0) run_start = po;
          run_end = po + std::min(page, plen - po);
        }
      }
      if (run_start >= 0) VMSAVE_TRY(flush_run());
      // Writes from the zero block need no slot; a slot is free once its
      // writes are done, which may be now (or before: a synchronous queue).
      if (slot >= 0 && --wk.pending[slot] == 0) wk.free.push_back(slot);
    }
    // A huge page holds data if any of its pieces does (a chunk holds
    // whole pages, so they were all seen here).
    for (i64 pg = start / page; page > piece && pg < (start + len + page - 1) / page; pg++) {
      const auto& pieces = piece_data_[bi];
      auto from = pieces.begin() + pg * (page / piece);
      auto to = pieces.begin() + std::min<i64>((pg + 1) * (page / piece), pieces.size());
      atomic_bitmap_put(bitmap, pg, std::find(from, to, 1) != to);
    }
    if (first) sums_[bi][c] = chunk_hash.digest();
    if (progress) progress->done.fetch_add(len, std::memory_order_relaxed);
    return Status();
  };

  EngineConfig c2 = cfg;
  c2.jobs = jobs;
  EngineStats es;
  VMSAVE_TRY(run_parallel(c2, n_chunks, setup, task, &es));
  live_passes_++;
  live_bytes_ += written.load();
  live_engine_.latency.merge(es.latency);
  live_engine_.jobs = es.jobs;
  double secs = seconds_since(t0);
  live_seconds_ += secs;
  if (stats) *stats = PassStats{rewritten.load(), written.load(), secs};
  return Status();
}

Status ImageWriter::finish_live(RamStats* stats) {
  // Memory is stable now (guest stopped) and equal to what is on disk: the
  // chunks touched after the first pass get their checksum from it.
  RamStats local;
  for (size_t i = 0; i < img_.blocks.size(); i++) {
    BlockLayout& b = img_.blocks[i];
    const u8* base = live_maps_[i].data();
    const u8* bitmap = bitmaps_[i].data();
    for (i64 c = 0; c < b.chunks(); c++) {
      if (!chunk_dirty_[i][c]) continue;
      i64 start = c * b.chunk_size;
      sums_[i][c] = chunk_checksum(base + start, b.chunk_length(c), b.page_size,
                                   start / b.page_size,
                                   [&](i64 p) { return bitmap_test(bitmap, p); });
    }
    i64 n = 0;
    for (u8 byte : bitmaps_[i]) n += __builtin_popcount(byte);
    b.data_pages = n;
    local.data_bytes += n * b.page_size;
    local.total_bytes += b.pages() * b.page_size;
    local.stored_bytes += n * b.page_size;
    local.ram_bytes += b.size;
  }
  local.seconds = live_seconds_;
  local.engine = live_engine_;
  local.engine.bytes = live_bytes_;
  live_maps_.clear();
  if (!file_.direct) {
    if (fdatasync(file_.fd.get()) < 0) return sys_error("fdatasync", target_, errno);
    posix_fadvise(file_.fd.get(), 0, 0, POSIX_FADV_DONTNEED);
  }
  if (stats) *stats = local;
  return Status();
}

Status ImageWriter::sync_data() {
  if (fdatasync(file_.fd.get()) < 0) return sys_error("fdatasync", target_, errno);
  return Status();
}

Status ImageWriter::flush_vmstate_buffer(bool final) {
  size_t len = vm_fill_;
  if (final) {
    len = align_up(vm_fill_, kDirectAlign);
    std::memset(vm_buf_.data() + vm_fill_, 0, len - vm_fill_);
  }
  if (len == 0) return Status();
  VMSAVE_TRY(pwrite_all(file_.fd.get(), vm_buf_.data(), len, img_.vmstate.offset + vm_written_,
                        target_));
  vm_written_ += len;
  vm_fill_ = 0;
  return Status();
}

Status ImageWriter::append_vmstate(const u8* data, size_t len) {
  vmstate_len_ += len;
  if (!compress_.enabled()) return put_vmstate(data, len);
  // The device state goes through one zstd frame whatever the chunk codec:
  // lz4 has no checksummed streaming format as simple, and the stream is
  // small next to RAM. zstd level 1 for lz4 images (speed), else the level.
  if (!vm_codec_)
    vm_codec_ = std::make_unique<StreamCompressor>(
        compress_.codec == Codec::kZstd ? compress_.level : 1);
  return vm_codec_->write(data, len, [this](const u8* p, size_t n) { return put_vmstate(p, n); });
}

Status ImageWriter::put_vmstate(const u8* data, size_t len) {
  vm_hash_.update(data, len);
  vm_stored_ += len;
  while (len > 0) {
    size_t n = std::min(len, vm_buf_.size() - vm_fill_);
    std::memcpy(vm_buf_.data() + vm_fill_, data, n);
    vm_fill_ += n;
    data += n;
    len -= n;
    if (vm_fill_ == vm_buf_.size()) VMSAVE_TRY(flush_vmstate_buffer(false));
  }
  return Status();
}

Status ImageWriter::commit(const nlohmann::json& metadata) {
  if (vm_codec_) {
    VMSAVE_TRY(vm_codec_->finish([this](const u8* p, size_t n) { return put_vmstate(p, n); }));
    img_.vmstate_codec = Codec::kZstd;
  }
  VMSAVE_TRY(flush_vmstate_buffer(true));
  img_.vmstate.length = vm_stored_;
  img_.vmstate.checksum = vm_hash_.digest();

  // Lay out the tail: bitmaps, chunk tables, metadata, section table.
  // A source path or description need not be UTF-8; the metadata must be.
  std::string meta = metadata.dump(2, ' ', false, nlohmann::json::error_handler_t::replace);
  i64 off = img_.vmstate.offset + vm_written_;
  std::vector<std::pair<i64, std::vector<u8>>> pieces;
  auto place = [&](std::vector<u8> bytes, Extent* e) {
    off = align_up(off, kSectionAlign);
    e->offset = off;
    e->length = static_cast<i64>(bytes.size());
    e->checksum = checksum(bytes);
    off += e->length;
    pieces.emplace_back(e->offset, std::move(bytes));
  };
  for (size_t i = 0; i < img_.blocks.size(); i++) {
    if (img_.blocks[i].via_qemu()) continue;
    place(bitmaps_[i], &img_.blocks[i].bitmap);
    std::vector<u8> sums(sums_[i].size() * 8);
    for (size_t c = 0; c < sums_[i].size(); c++) {
      ul64 v = sums_[i][c];
      std::memcpy(&sums[c * 8], &v, 8);
    }
    place(std::move(sums), &img_.blocks[i].sums);
    if (compress_.enabled())
      place(encode_chunk_records(chunk_info_[i]), &img_.blocks[i].chunk_table);
  }
  place(std::vector<u8>(meta.begin(), meta.end()), &img_.metadata);
  std::vector<u8> table = encode_section_table(img_);
  place(std::move(table), &img_.table);
  img_.file_size = align_up(off, kSectionAlign);

  i64 tail_start = pieces.front().first;
  AlignedBuffer tail(img_.file_size - tail_start);
  for (auto& [o, bytes] : pieces) std::memcpy(tail.data() + (o - tail_start), bytes.data(), bytes.size());
  VMSAVE_TRY(pwrite_all(file_.fd.get(), tail.data(), tail.size(), tail_start, target_));
  if (int ms = FaultPlan::get().flush_delay_ms)
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  if (fdatasync(file_.fd.get()) < 0) return sys_error("fdatasync", target_, errno);

  std::vector<u8> header = encode_header(img_);
  AlignedBuffer hbuf(kHeaderSize);
  std::memcpy(hbuf.data(), header.data(), kHeaderSize);
  VMSAVE_TRY(pwrite_all(file_.fd.get(), hbuf.data(), kHeaderSize, 0, target_));
  if (fdatasync(file_.fd.get()) < 0) return sys_error("fdatasync", target_, errno);
  if (!file_.direct) posix_fadvise(file_.fd.get(), 0, 0, POSIX_FADV_DONTNEED);

  // Opened before the image is linked in: out of descriptors here, a save
  // failed with its whole image at the target.
  UniqueFd dir(::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir) return sys_error("open", dir_, errno);
  VMSAVE_TRY(link_into_place());
  committed_ = true;
  if (fsync(dir.get()) < 0) return sys_error("fsync", dir_, errno);
  return Status();
}

bool ImageWriter::abandon() {
  std::lock_guard lock(link_mu_);
  if (linked_) return false;
  abandoned_ = true;
  return true;
}

Status ImageWriter::link_into_place() {
  if (cancelled()) return interrupted_error();
  std::lock_guard lock(link_mu_);
  if (abandoned_) return Error{"commit abandoned", target_, "the flush took too long"};
  linked_ = true;  // from here the target may exist
  std::string from = temp_name_;
  if (from.empty()) {
    std::string proc = fmt::format("/proc/self/fd/{}", file_.fd.get());
    if (!force_) {
      // linkat fails with EEXIST if something appeared at the target since
      // the save began: nothing is ever replaced without --force.
      if (linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, target_.c_str(), AT_SYMLINK_FOLLOW) == 0)
        return Status();
      if (errno == EEXIST)
        return Error{"image exists", target_, "it appeared while saving"}.fix(
            "pass --force to replace it");
      return sys_error("linkat", target_, errno);
    }
    temp_name_ = temp_name(dir_, target_, getpid());
    ::unlink(temp_name_.c_str());
    if (linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, temp_name_.c_str(), AT_SYMLINK_FOLLOW) < 0) {
      temp_name_.clear();
      return sys_error("linkat", target_, errno);
    }
    from = temp_name_;
  }
  if (force_) {
    VMSAVE_TRY(check_target(target_, true));  // what appeared there while saving
    if (rename(from.c_str(), target_.c_str()) < 0) return sys_error("rename", target_, errno);
  } else {
    int err = renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, target_.c_str(), RENAME_NOREPLACE) < 0
                  ? errno
                  : 0;
    // FUSE (sshfs, fuse2fs, exfat-fuse) refuses the flag (EINVAL): a hard
    // link does not replace either; without links (exfat), a plain rename
    // once nothing is there. Every save there failed at its end (trial R).
    if (err == EINVAL || err == ENOSYS) {
      err = ::link(from.c_str(), target_.c_str()) < 0 ? errno : 0;
      if (!err) {
        ::unlink(from.c_str());
      } else if (err != EEXIST) {
        struct stat st;
        err = ::lstat(target_.c_str(), &st) == 0            ? EEXIST
              : ::rename(from.c_str(), target_.c_str()) < 0 ? errno
                                                            : 0;
      }
    }
    if (err == EEXIST)
      return Error{"image exists", target_, "it appeared while saving"}.fix(
          "pass --force to replace it");
    if (err) return sys_error("rename", target_, err);
  }
  temp_name_.clear();
  return Status();
}

// ---------------------------------------------------------------- reader

static Error not_a_file(const std::string& path, mode_t mode) {
  const char* what = S_ISDIR(mode)                    ? "a directory"
                     : S_ISFIFO(mode)                 ? "a FIFO"
                     : S_ISSOCK(mode)                 ? "a socket"
                     : S_ISCHR(mode) || S_ISBLK(mode) ? "a device"
                                                      : "not a regular file";
  return Error{"not an image file", path, what}.fix("give the path of an image vmsave saved");
}

Result<std::unique_ptr<ImageReader>> ImageReader::open(const std::string& path,
                                                       const WarnFn& warn) {
  std::unique_ptr<ImageReader> r(new ImageReader());
  // A path to something else is the wrong path, not a damaged image (a
  // socket cannot even be opened: ENXIO).
  struct stat st;
  if (stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) return not_a_file(path, st.st_mode);
  // O_NONBLOCK: opening a FIFO for reading would wait for a writer; it is
  // refused below as not a regular file, and the flag cleared for the rest
  // (io_uring would return -EAGAIN on a non-blocking fd).
  auto f = open_direct(path, O_RDONLY | O_NONBLOCK, 0, true);
  if (!f.ok()) {
    Error e = f.error();
    e.what = "cannot open image";
    if (errno == ENOENT) e.hint = "check the path";
    if (errno == EACCES)
      e.hint = "images are mode 0600: run vmsave as the image's owner (or root)";
    return e;
  }
  r->file_ = std::move(*f);
  r->min_hole_ = default_min_hole(r->fd());
  if (fstat(r->file_.fd.get(), &st) < 0) return sys_error("fstat", path, errno);
  if (!S_ISREG(st.st_mode)) return not_a_file(path, st.st_mode);
  if (fcntl(r->fd(), F_SETFL, fcntl(r->fd(), F_GETFL) & ~O_NONBLOCK) < 0)
    return sys_error("fcntl", path, errno);
  if (!r->file_.direct && warn)
    warn(fmt::format("{} does not support O_DIRECT; reading through the page cache", path));

  AlignedBuffer hb(kHeaderSize);
  i64 n = std::min<i64>(st.st_size, kHeaderSize);
  if (n == kHeaderSize) VMSAVE_TRY(pread_all(r->fd(), hb.data(), kHeaderSize, 0, path));
  auto img = decode_header({hb.data(), static_cast<size_t>(n)}, st.st_size, path);
  if (!img.ok()) return img.error();
  r->img_ = std::move(*img);
  auto table = r->read_section(r->img_.table, "section table");
  if (!table.ok()) return table.error();
  VMSAVE_TRY(decode_section_table(*table, r->img_, path));
  return r;
}

Result<std::vector<u8>> ImageReader::read_section(const Extent& e, const char* what) const {
  // Extents were bounds-checked against the (4096-aligned) file size, so the
  // padded read stays inside the file.
  AlignedBuffer buf(align_up(std::max<i64>(e.length, 1), kDirectAlign));
  if (e.length > 0) VMSAVE_TRY(pread_all(fd(), buf.data(), buf.size(), e.offset, path()));
  std::vector<u8> out(buf.data(), buf.data() + e.length);
  if (checksum(out) != e.checksum)
    return damaged(path(), fmt::format("{} checksum mismatch", what), e.offset);
  return out;
}

namespace {

// The metadata fields vmsave reads, with the JSON type each must have: one
// of another type (a crafted image, its checksums valid) would otherwise
// throw wherever it is read, after a restore has started its VM even.
// Missing fields are fine (older images, raw images).
std::string metadata_type_error(const nlohmann::json& m) {
  using T = nlohmann::json::value_t;
  auto is_int = [](const nlohmann::json& v) { return v.is_number_integer(); };
  auto is_str = [](const nlohmann::json& v) { return v.is_string(); };
  auto strings = [](const nlohmann::json& v) {
    return v.is_array() && std::all_of(v.begin(), v.end(), [](auto& a) { return a.is_string(); });
  };
  const std::pair<const char*, std::function<bool(const nlohmann::json&)>> fields[] = {
      {"mode", is_str},
      {"created", is_str},
      {"host", is_str},
      {"vmsave_version", is_str},
      {"qemu_version", is_str},
      {"description", is_str},
      {"machine_type", is_str},
      {"machine_qom_type", is_str},
      {"compress", is_str},
      {"vmstate_bytes", is_int},
      {"memory_size", is_int},
      {"qemu_pid", is_int},
      {"max_cpus", is_int},
      {"qemu_cmdline", strings},
      {"guest_running", [](auto& v) { return v.is_boolean() || v.is_null(); }},
      {"memory_devices",
       [&](auto& v) {
         return v.is_array() && std::all_of(v.begin(), v.end(), [&](auto& d) {
                  return d.is_object() && is_str(d.value("type", nlohmann::json(""))) &&
                         is_str(d.value("id", nlohmann::json(""))) &&
                         is_str(d.value("memdev", nlohmann::json(""))) &&
                         is_str(d.value("device", nlohmann::json(""))) &&
                         d.value("addr", nlohmann::json(0)).is_number_unsigned() &&
                         d.value("node", nlohmann::json(0)).is_number_unsigned() &&
                         d.value("size", nlohmann::json(0)).is_number_unsigned();
                });
       }},
      {"qemu_migration",
       [&](auto& v) {
         return v.is_object() && is_int(v.value("offset", nlohmann::json(0))) &&
                is_int(v.value("ram_bytes_written", nlohmann::json(0)));
       }},
  };
  for (auto& [key, ok] : fields)
    if (auto it = m.find(key); it != m.end() && !ok(*it))
      return fmt::format("metadata field \"{}\" has the wrong type ({})", key,
                         it->type() == T::null ? "null" : it->type_name());
  return "";
}

// Where the metadata's blocks disagree with the section table: info showed
// what the metadata said, and verify called the image intact (trial L).
std::string metadata_layout_error(const nlohmann::json& m, const ImageLayout& img) {
  auto blocks = m.find("blocks");
  if (blocks == m.end()) return "";
  if (!blocks->is_array() || blocks->size() != img.blocks.size())
    return fmt::format("metadata lists other RAM blocks than the section table's {}",
                       img.blocks.size());
  for (size_t i = 0; i < img.blocks.size(); i++) {
    const nlohmann::json& mb = (*blocks)[i];
    const BlockLayout& b = img.blocks[i];
    if (!mb.is_object()) return fmt::format("metadata's block {} is not an object", i);
    auto differs = [&](const char* key, const nlohmann::json& want) {
      auto it = mb.find(key);
      return it != mb.end() && *it != want;
    };
    if (differs("id", b.id) || differs("size", b.size) || differs("page_size", b.page_size))
      return fmt::format(
          "metadata's block {} ({}) disagrees with its record ({}, {} bytes, "
          "pages of {})",
          i, mb.value("id", nlohmann::json("?")).dump(), b.id, b.size, b.page_size);
  }
  return "";
}

}  // namespace

Result<nlohmann::json> ImageReader::metadata() const {
  auto bytes = read_section(img_.metadata, "metadata");
  if (!bytes.ok()) return bytes.error();
  // Nesting is bounded: copying or printing a deep document recurses (a
  // crafted image nested a million arrays deep crashed info).
  constexpr int kMaxDepth = 64;
  bool too_deep = false;
  auto j = nlohmann::json::parse(
      bytes->begin(), bytes->end(),
      [&](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
        too_deep |= depth > kMaxDepth;
        return depth <= kMaxDepth;  // deeper values are dropped, not built
      },
      false);
  if (j.is_discarded() || !j.is_object())
    return damaged(path(), "metadata is not a JSON object", img_.metadata.offset);
  if (too_deep)
    return damaged(path(), fmt::format("metadata is nested deeper than {} levels", kMaxDepth),
                   img_.metadata.offset);
  if (std::string why = metadata_type_error(j); !why.empty())
    return damaged(path(), why, img_.metadata.offset);
  if (std::string why = metadata_layout_error(j, img_); !why.empty())
    return damaged(path(), why, img_.metadata.offset);
  // A mode this vmsave does not know was restored as raw memory files.
  if (const std::string mode = j.value("mode", "raw"); mode != "raw" && mode != "qemu") {
    if (img_.minor > kFormatMinor)
      return Error{"image needs a newer vmsave", path(),
                   fmt::format("format v{}.{} saved in mode \"{}\", which this vmsave (v{}.{}) "
                               "does not know",
                               img_.major, img_.minor, mode, kFormatMajor, kFormatMinor)}
          .fix("use a newer vmsave")
          .as(Exit::kDamaged);
    return damaged(path(), fmt::format("metadata names an unknown mode \"{}\"", mode),
                   img_.metadata.offset);
  }
  return j;
}

Result<std::vector<u8>> ImageReader::bitmap(size_t block) const {
  const BlockLayout& b = img_.blocks[block];
  auto bits = read_section(b.bitmap, "bitmap");
  if (!bits.ok()) return bits.error();
  i64 n = 0;
  for (u8 byte : *bits) n += __builtin_popcount(byte);
  // Bits past the last page must be clear; the count must match the record.
  i64 pages = b.pages();
  if (pages % 8 && ((*bits)[pages / 8] >> (pages % 8)))
    return damaged(path(), fmt::format("bitmap of {} marks pages past the end", b.id),
                   b.bitmap.offset);
  if (n != b.data_pages)
    return damaged(path(), fmt::format("bitmap of {} disagrees with its page count", b.id),
                   b.bitmap.offset);
  return bits;
}

Result<std::vector<u64>> ImageReader::sums(size_t block) const {
  auto bytes = read_section(img_.blocks[block].sums, "chunk table");
  if (!bytes.ok()) return bytes.error();
  std::vector<u64> out(bytes->size() / 8);
  for (size_t i = 0; i < out.size(); i++) {
    ul64 v;
    std::memcpy(&v, bytes->data() + i * 8, 8);
    out[i] = v;
  }
  return out;
}

Result<std::vector<ChunkInfo>> ImageReader::chunk_table(size_t block) const {
  if (!(img_.flags & kFlagCompressed)) return std::vector<ChunkInfo>();
  const BlockLayout& b = img_.blocks[block];
  auto bytes = read_section(b.chunk_table, "chunk codec table");
  if (!bytes.ok()) return bytes.error();
  return decode_chunk_records(*bytes, b, path());
}

Status ImageReader::read_chunks(size_t block, const std::vector<u8>& bitmap,
                                const std::vector<u64>& sums, const std::vector<ChunkInfo>& codecs,
                                const RamDest& dest, const EngineConfig& cfg, Progress* progress,
                                RamStats* stats, VerifyReport* report) const {
  const BlockLayout& b = img_.blocks[block];
  const i64 page = b.page_size;
  const i64 pages_per_chunk = b.chunk_size / page;
  const bool verify_only = dest.fd < 0 && dest.map == nullptr;
  const bool to_fd = dest.fd >= 0;
  const bool compressed = !codecs.empty();
  const int jobs = cfg.jobs > 0 ? cfg.jobs : default_jobs();
  // Chunk buffers per worker: verify and a restore into the RAM file's
  // descriptor read every chunk into one (the restore then writes the data
  // pages out, so zero pages stay holes in the RAM file); a restore into a
  // mapping reads compressed chunks into one, and chunks whose data runs
  // lie closer than min_hole_. Never more buffers than chunks nor bigger
  // than the block's region (chunk size and block size come from the
  // image: a 16 KiB block with 1 GiB chunks must not allocate 1 GiB).
  // Runs closer than min_hole_ (as a save on a disk writes them) are read
  // in one request with their gaps.
  const bool may_gather = min_hole_ > page && (verify_only || b.chunk_size <= kMaxCompressedChunkSize);
  const i64 pool = verify_only ? std::min<i64>(buffers_per_worker(kVerifyPoolBytes, jobs,
                                                                  b.chunk_size, kMaxVerifyBuffers),
                                               b.chunks())
                   : compressed || may_gather || to_fd
                       ? std::min<i64>(compress_slots(jobs, b.chunk_size), b.chunks())
                       : 0;
  const i64 buffer_size = std::min(b.chunk_size, b.region.length);
  auto is_compressed = [&](i64 c) { return compressed && codecs[c].codec != Codec::kRaw; };

  struct Worker {
    std::vector<AlignedBuffer> buffers;
    std::vector<int> free;
    AlignedBuffer staging;  // decompressed chunk when it cannot go to `dest` directly
    std::unique_ptr<Decompressor> codec;
    ExtentCursor extents;  // of the image, for verify
  };
  std::vector<Worker> workers(jobs);
  // Chunk state, touched only by the worker that owns the chunk.
  std::vector<u32> pending(b.chunks(), 0);
  std::vector<u8*> chunk_buf(b.chunks(), nullptr);
  std::vector<int> chunk_slot(b.chunks(), -1);
  std::atomic<i64> data_bytes{0}, filled_bytes{0};

  auto present = [&](i64 p) { return bitmap_test(bitmap.data(), p); };
  // Chunk c of `len` bytes is read: the RAM, and the data it stored.
  auto count_done = [&](i64 c, i64 len) {
    if (!progress) return;
    progress->done.fetch_add(len, std::memory_order_relaxed);
    progress->data_done.fetch_add(stored_bytes_in(bitmap, c * pages_per_chunk, page, 0, len),
                                  std::memory_order_relaxed);
  };
  // The checksum of an all-hole chunk of full length (chunk 0's length:
  // the block's size when that is less than one chunk).
  const i64 full = b.chunk_length(0);
  const u64 zero_full = zero_checksum(full);
  auto chunk_damaged = [&](i64 c, const std::string& why, i64 bad_page = -1) -> Status {
    return this->chunk_damaged(b, c, why, bad_page, report);
  };
  // A full filesystem: ENOSPC from write(); stores into a mapping meet it
  // as SIGBUS, not an error code (reads into the mapping get EFAULT
  // instead, which RamFile::fill reports the same way).
  auto no_room = [] {
    return Error{"cannot fill RAM file", "", std::strerror(ENOSPC)}.fix(
        "free space on its filesystem or choose another place for it");
  };
  // The data pages of chunk c, from `src` (its logical content in a
  // buffer), into `dest`; zero pages are left alone so they stay holes.
  auto copy_out = [&](i64 c, const u8* src) -> Status {
    const i64 len = b.chunk_length(c), first = c * pages_per_chunk;
    const i64 at = c * b.chunk_size;
    // One run of data pages, [off, end) of the chunk.
    auto put = [&](i64 off, i64 end) -> Status {
      if (to_fd) {
        Status st = pwrite_all(dest.fd, src + off, end - off, dest.offset + at + off, "");
        if (st.ok()) return st;
        const std::string& why = st.error().detail;
        if (why == std::strerror(ENOSPC) || why == std::strerror(EDQUOT)) return no_room();
        return Error{"cannot fill RAM file", "", why};
      }
      return store_guarded([&] { std::memcpy(dest.map + at + off, src + off, end - off); })
                 ? Status()
                 : Status(no_room());
    };
    for (i64 off = 0; off < len;) {
      i64 end = off;
      while (end < len && present(first + end / page)) end += page;
      end = std::min(end, len);
      if (end > off) VMSAVE_TRY(put(off, end));
      off = end + page;  // past the zero page that ended the run
    }
    return Status();
  };
  // A compressed chunk has arrived in its buffer: check the stored bytes,
  // decompress (straight into `dest` when every page of the chunk holds
  // data, else into staging and copy the data pages, so zero pages stay
  // holes in the RAM file), check the logical content.
  auto finish_compressed = [&](int w, i64 c) -> Status {
    Worker& wk = workers[w];
    const ChunkInfo& ci = codecs[c];
    i64 start = c * b.chunk_size;
    i64 len = b.chunk_length(c);
    i64 npages = (len + page - 1) / page;
    const u8* src = chunk_buf[c];
    struct Release {  // the read buffer goes back to the pool when done
      std::vector<int>& free;
      int slot;
      ~Release() { free.push_back(slot); }
    } release{wk.free, chunk_slot[c]};
    count_done(c, len);
    if (checksum({src, static_cast<size_t>(ci.stored_length)}) != ci.checksum)
      return chunk_damaged(c, "compressed data checksum mismatch");
    i64 padded = align_up(ci.stored_length, kDirectAlign);
    for (i64 i = ci.stored_length; i < padded; i++)
      if (src[i]) return chunk_damaged(c, "padding after the compressed data is not zero");
    bool dense = !verify_only && !to_fd;
    for (i64 p = 0; dense && p < npages; p++) dense = present(c * pages_per_chunk + p);
    u8* out = dense ? dest.map + start : wk.staging.data();
    bool decoded = false;
    if (!store_guarded([&] {
          decoded = wk.codec->decompress(ci.codec, {src, static_cast<size_t>(ci.stored_length)},
                                         {out, static_cast<size_t>(len)});
        }))
      return no_room();
    if (!decoded)
      return chunk_damaged(c, fmt::format("{} data does not decompress", codec_name(ci.codec)));
    if (xxh3(out, len) != sums[c]) return chunk_damaged(c, "checksum mismatch");
    // Pages the bitmap marks zero are not restored: the checksum holds for
    // what is restored only if they are.
    for (i64 p = 0; !dense && p < npages; p++) {
      const i64 at = p * page;
      if (!present(c * pages_per_chunk + p) && !is_zero(out + at, std::min(page, len - at)))
        return chunk_damaged(
            c, fmt::format("page {} is marked zero but holds data", c * pages_per_chunk + p),
            c * pages_per_chunk + p);
    }
    if (!dense && !verify_only) return copy_out(c, out);
    // The rest of the chunk's slot, past its padded data, holds nothing a
    // save wrote (no restore reads it): zeros, a hole mostly.
    if (verify_only && padded < len) {
      const i64 slot = b.region.offset + start;
      auto at = first_nonzero_byte(fd(), slot + padded, slot + len, wk.staging, path());
      if (!at.ok()) return at.error();
      if (*at >= 0)
        return chunk_damaged(
            c,
            fmt::format("byte {} of its slot, after the compressed data, is not zero", *at - slot));
    }
    return Status();
  };
  auto finish_chunk = [&](int w, i64 c, bool empty) -> Status {
    if (is_compressed(c)) return finish_compressed(w, c);
    i64 len = b.chunk_length(c);
    u8* base = chunk_buf[c];
    u64 sum = empty ? (len == full ? zero_full : zero_checksum(len))
                    : chunk_checksum(base, len, page, c * pages_per_chunk, present);
    count_done(c, len);
    if (chunk_slot[c] >= 0) {
      workers[w].free.push_back(chunk_slot[c]);
      if (sum != sums[c]) return chunk_damaged(c, "checksum mismatch");
      if (verify_only) {
        if (!is_zero(base + len, align_up(len, page) - len)) return chunk_damaged(c, kTailNotZero);
        const i64 first = c * pages_per_chunk;
        for (i64 off = 0; off < len; off += page) {
          if (present(first + off / page)) continue;
          if (!is_zero(base + off, std::min(page, len - off)))
            return chunk_damaged(c,
                                 fmt::format("page {} is marked zero but holds data (a lazy "
                                             "restore would map it)",
                                             first + off / page),
                                 first + off / page);
        }
      }
      if (!verify_only) return copy_out(c, base);  // gathered
      return Status();
    }
    if (sum != sums[c]) return chunk_damaged(c, "checksum mismatch");
    return Status();
  };

  // From an image in memory (tmpfs) the ring's reads all went to kernel
  // worker threads, which faulted in the RAM file's pages there, and
  // switched between each other at that: each worker reads with pread()
  // itself instead. 4 GiB mixed from /dev/shm into a RAM file there, 4
  // alternating runs: 1.38-1.46 s and 2.6-2.8 CPU-seconds, against
  // 1.81-1.88 s and 3.5-3.6 through the ring; verify 0.31 s against 0.42.
  const bool image_in_memory = page_cache_only(fd());
  auto setup = [&](IoQueue& q, int w) {
    q.name_fd(fd(), path());
    if (image_in_memory) q.read_inline(fd());
    for (i64 i = 0; i < pool; i++) {
      workers[w].buffers.emplace_back(buffer_size);
      workers[w].free.push_back(static_cast<int>(i));
    }
    // The pool is reused for every chunk: pinned once as fixed buffers.
    std::vector<std::pair<u8*, i64>> ranges;
    for (auto& buf : workers[w].buffers) ranges.emplace_back(buf.data(), buffer_size);
    q.register_memory(ranges);
    if (compressed) {
      workers[w].staging = AlignedBuffer(buffer_size);
      workers[w].codec = std::make_unique<Decompressor>();
    }
    q.set_on_done([&, w](const IoRequest& r) -> Status {
      i64 c = static_cast<i64>(r.tag);
      if (--pending[c] == 0) return finish_chunk(w, c, false);
      return Status();
    });
  };

  auto task = [&](IoQueue& q, int w, i64 c) -> Status {
    i64 start = c * b.chunk_size;
    i64 len = b.chunk_length(c);
    // Collect runs to read, then submit, so the chunk's pending count is
    // complete before any completion can bring it to zero. A compressed
    // chunk is one run: its stored bytes, padded, at the chunk's offset.
    std::vector<std::pair<i64, i64>> runs;
    if (is_compressed(c)) {
      runs.emplace_back(0, align_up(codecs[c].stored_length, kDirectAlign));
    } else {
      i64 first = c * pages_per_chunk;
      i64 npages = (len + page - 1) / page;
      for (i64 p = 0; p < npages; p++) {
        if (!present(first + p)) continue;
        i64 off = p * page;
        if (!runs.empty() && runs.back().second == off)
          runs.back().second = off + page;
        else
          runs.emplace_back(off, off + page);
      }
    }
    if (verify_only && !is_compressed(c)) {
      // Pages the bitmap marks zero must hold zeros: a lazy restore maps the
      // region as it is on disk. So verify reads whatever the file has
      // allocated in the chunk too, and finish_chunk checks those pages.
      for (auto [a, z] : workers[w].extents.chunk(fd(), b.region.offset, start, len))
        runs.emplace_back(align_down(a - start, page),
                          std::min(align_up(z - start, page), align_up(len, page)));
      std::sort(runs.begin(), runs.end());
      coalesce(runs, 1);
    }
    if (runs.empty()) return finish_chunk(w, c, true);
    bool gather = false;
    if (may_gather && !is_compressed(c)) {
      i64 joined = coalesce(runs, min_hole_);
      filled_bytes.fetch_add(joined, std::memory_order_relaxed);
      gather = joined > 0;
    }
    if (verify_only || is_compressed(c) || gather || to_fd) {
      while (workers[w].free.empty()) VMSAVE_TRY(q.reap_some());
      int slot = workers[w].free.back();
      workers[w].free.pop_back();
      chunk_slot[c] = slot;
      chunk_buf[c] = workers[w].buffers[slot].data();
      if (verify_only && !is_compressed(c)) {  // what is not read is zeros
        i64 from = 0;
        for (auto [s, e] : runs) {
          std::memset(chunk_buf[c] + from, 0, s - from);
          from = e;
        }
        std::memset(chunk_buf[c] + from, 0, align_up(len, page) - from);
      }
    } else {
      chunk_buf[c] = dest.map + start;
    }
    std::vector<IoRequest> reqs;
    for (auto [s, e] : runs) {
      for (i64 o = s; o < e; o += kMaxIoSize) {
        IoRequest r;
        r.fd = fd();
        r.buf = chunk_buf[c] + o;
        r.len = static_cast<u32>(std::min(kMaxIoSize, e - o));
        r.offset = b.region.offset + start + o;
        r.tag = static_cast<u64>(c);
        reqs.push_back(r);
        data_bytes.fetch_add(r.len, std::memory_order_relaxed);
      }
    }
    pending[c] = static_cast<u32>(reqs.size());
    for (auto& r : reqs) VMSAVE_TRY(q.submit(r));
    return Status();
  };

  auto t0 = Clock::now();
  EngineConfig c2 = cfg;
  c2.jobs = jobs;
  EngineStats es;
  Status st = run_parallel(c2, b.chunks(), setup, task, &es);
  if (stats) {
    stats->ram_bytes += b.size;
    stats->stored_bytes += data_bytes.load() - filled_bytes.load();
    stats->zero_filled_bytes += filled_bytes.load();
    stats->data_bytes += b.data_pages * b.page_size;
    stats->total_bytes += b.pages() * b.page_size;
    stats->seconds += seconds_since(t0);
    stats->engine.latency.merge(es.latency);
    stats->engine.bytes += es.bytes;
    stats->engine.jobs = es.jobs;
  }
  if (report) {
    report->chunks_checked += b.chunks();
    report->bytes_read += data_bytes.load();
    report->engine.latency.merge(es.latency);
    report->engine.bytes += es.bytes;
    report->engine.jobs = es.jobs;
  }
  return st;
}

Error ImageReader::chunk_damaged(const BlockLayout& b, i64 c, const std::string& why, i64 bad_page,
                                 VerifyReport* report) const {
  // Where: the chunk, or the page in it when one page is at fault.
  i64 at =
      bad_page < 0 ? b.region.offset + c * b.chunk_size : b.region.offset + bad_page * b.page_size;
  if (report) {
    report->ok = false;
    report->first_damage =
        bad_page < 0
            ? fmt::format("block {} chunk {} (image offset {})", b.id, c, at)
            : fmt::format("block {} chunk {} page {} (image offset {})", b.id, c, bad_page, at);
  }
  return damaged(path(), fmt::format("RAM block {} chunk {} {}", b.id, c, why), at);
}

Status ImageReader::verify_large_chunks(size_t block, const std::vector<u8>& bitmap,
                                        const std::vector<u64>& sums, const EngineConfig& cfg,
                                        Progress* progress, VerifyReport* report) const {
  const BlockLayout& b = img_.blocks[block];
  const i64 page = b.page_size;
  const i64 pages_per_chunk = b.chunk_size / page;
  auto present = [&](i64 p) { return bitmap_test(bitmap.data(), p); };
  struct Worker {
    AlignedBuffer window{kMaxChunkBuffer};
    ExtentCursor extents;
  };
  EngineConfig c2 = cfg;
  c2.jobs = cfg.jobs > 0 ? cfg.jobs : default_jobs();
  std::vector<Worker> workers(c2.jobs);
  std::atomic<i64> read_bytes{0};
  // Each window is read when the bitmap marks a page in it or the file
  // holds data there, and its pages marked zero must read as zeros (a
  // lazy restore maps the region as it is), the bytes past the block's
  // end in its last page too.
  auto task = [&](IoQueue&, int w, i64 c) -> Status {
    Worker& wk = workers[w];
    const i64 start = c * b.chunk_size, len = b.chunk_length(c);
    const i64 first = c * pages_per_chunk, stored = align_up(len, kDirectAlign);
    auto allocated = wk.extents.chunk(fd(), b.region.offset, start, stored);
    Hasher st;
    i64 bad_page = -1;
    bool bad_tail = false;
    for (i64 off = 0; off < stored; off += kMaxChunkBuffer) {
      if (cancelled()) return interrupted_error();
      const i64 n = std::min(kMaxChunkBuffer, stored - off);
      bool read = false;
      for (i64 p = off / page; !read && p * page < off + n; p++) read = present(first + p);
      for (auto [a, z] : allocated) read |= a - start < off + n && z - start > off;
      if (!read) {
        st.update_zeros(std::min(n, len - off));
      } else {
        VMSAVE_TRY(pread_all(fd(), wk.window.data(), n, b.region.offset + start + off, path()));
        read_bytes.fetch_add(n, std::memory_order_relaxed);
        hash_chunk_part(st, wk.window.data(), off, std::min(off + n, len), page, first, present);
        for (i64 at = off; bad_page < 0 && !bad_tail && at < off + n;) {
          const i64 end =
              std::min({align_down(at, page) + page, off + n, at < len ? len : off + n});
          const bool beyond = at >= len;  // past the block's end
          if ((beyond || !present(first + at / page)) &&
              !is_zero(wk.window.data() + (at - off), end - at)) {
            if (beyond)
              bad_tail = true;
            else
              bad_page = first + at / page;
          }
          at = end;
        }
      }
      if (progress) {
        const i64 to = std::min(off + n, len);
        progress->done.fetch_add(to - off, std::memory_order_relaxed);
        progress->data_done.fetch_add(stored_bytes_in(bitmap, first, page, off, to),
                                      std::memory_order_relaxed);
      }
    }
    if (st.digest() != sums[c]) return chunk_damaged(b, c, "checksum mismatch", -1, report);
    if (bad_page >= 0)
      return chunk_damaged(b, c,
                           fmt::format("page {} is marked zero but holds data (a lazy restore "
                                       "would map it)",
                                       bad_page),
                           bad_page, report);
    if (bad_tail) return chunk_damaged(b, c, kTailNotZero, -1, report);
    return Status();
  };
  EngineStats es;
  Status st = run_parallel(
      c2, b.chunks(), [](IoQueue&, int) {}, task, &es);
  report->chunks_checked += b.chunks();
  report->bytes_read += read_bytes.load();
  report->engine.jobs = es.jobs;
  return st;
}

Status ImageReader::read_ram(size_t block, const RamDest& dest, const EngineConfig& cfg,
                             Progress* progress, RamStats* stats) const {
  if (img_.blocks[block].via_qemu())
    return Error{"RAM block " + img_.blocks[block].id + " is in QEMU's migration section", path(),
                 "vmsave cannot read it by itself"}
        .fix("restore the image with QEMU (vmsave restore IMAGE -- QEMU-COMMAND)");
  auto read = [&]() -> Status {
    auto bits = bitmap(block);
    if (!bits.ok()) return bits.error();
    auto s = sums(block);
    if (!s.ok()) return s.error();
    auto codecs = chunk_table(block);
    if (!codecs.ok()) return codecs.error();
    return read_chunks(block, *bits, *s, *codecs, dest, cfg, progress, stats, nullptr);
  };
  Status st = read();
  if (!st.ok()) return named_cut(st.error());
  return st;
}

// Opening checked the file's size against the header: a read that meets its
// end means the file was cut since, which is damage, not a failure to retry.
Error ImageReader::named_cut(const Error& e) const {
  struct stat now;
  if (e.detail != "unexpected end of file" || fstat(fd(), &now) < 0 ||
      now.st_size >= img_.file_size)
    return e;
  return damaged(
      path(),
      fmt::format("the file was cut to {} bytes while vmsave read it (the header says {})",
                  i64(now.st_size), img_.file_size),
      i64(now.st_size));
}

Result<i64> ImageReader::first_differing_chunk(size_t block, int fd, i64 offset, int samples,
                                               const std::string& file) const {
  const BlockLayout& b = img_.blocks[block];
  auto bits = bitmap(block);
  if (!bits.ok()) return bits.error();
  auto s = sums(block);
  if (!s.ok()) return s.error();
  const i64 pages_per_chunk = b.chunk_size / b.page_size;
  auto present = [&](i64 p) { return bitmap_test(bits->data(), p); };
  std::vector<i64> with_data;
  for (i64 c = 0; c < b.chunks(); c++) {
    const i64 first = c * pages_per_chunk, n = (b.chunk_length(c) + b.page_size - 1) / b.page_size;
    for (i64 p = first; p < first + n; p++)
      if (present(p)) {
        with_data.push_back(c);
        break;
      }
  }
  const i64 n = std::min<i64>(samples, with_data.size());
  AlignedBuffer buf(std::min({b.chunk_size, align_up(b.size, b.page_size), kMaxChunkBuffer}));
  for (i64 i = 0; i < n; i++) {
    const i64 c = with_data[n == 1 ? 0 : i * (i64(with_data.size()) - 1) / (n - 1)];
    const i64 len = b.chunk_length(c);
    Hasher st;
    for (i64 off = 0; off < len;) {
      const i64 want = std::min<i64>(len - off, buf.size());
      ssize_t got = ::pread(fd, buf.data(), want, offset + c * b.chunk_size + off);
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) return sys_error("read", file, errno);
      if (got == 0) return c;  // the file ends before the block does
      hash_chunk_part(st, buf.data(), off, off + got, b.page_size, c * pages_per_chunk, present);
      off += got;
    }
    if (st.digest() != (*s)[c]) return c;
  }
  return i64(-1);
}

Result<UniqueFd> ImageReader::reopen(int flags) const {
  std::string proc = fmt::format("/proc/self/fd/{}", fd());
  UniqueFd f(::open(proc.c_str(), flags | O_CLOEXEC));
  if (!f) return sys_error("reopen", path(), errno);
  return f;
}

Status ImageReader::stream_vmstate(const std::function<Status(const u8*, size_t)>& sink) const {
  AlignedBuffer buf(kStreamBuffer);
  Hasher st;
  i64 left = img_.vmstate.length;
  i64 off = img_.vmstate.offset;
  // A compressed device state is one zstd frame; what QEMU gets is checked
  // by the frame's own content checksum, the stored bytes by ours.
  std::unique_ptr<StreamDecompressor> dec;
  if (img_.vmstate_codec == Codec::kZstd) dec = std::make_unique<StreamDecompressor>();
  // The metadata says how many bytes QEMU sent: a section cut short (its
  // checksum rewritten) or relabelled uncompressed was called intact, and
  // QEMU refused it with nothing better than a closed connection (trial L).
  auto meta = metadata();
  if (!meta.ok()) return meta.error();
  const i64 sent = meta->value("vmstate_bytes", i64(-1));
  auto wrong_size = [&](const char* what, i64 n) {
    return damaged(
        path(),
        fmt::format("the device state {} {} bytes, the metadata says QEMU sent {}", what, n, sent),
        img_.vmstate.offset);
  };
  if (sent >= 0 && !dec && img_.vmstate.length != sent)
    return wrong_size("is", img_.vmstate.length);
  i64 decoded = 0;
  auto count = [&](const u8* d, size_t n) -> Status {
    decoded += n;
    return sink ? sink(d, n) : Status();
  };
  std::string bad;
  while (left > 0) {
    if (!sink && cancelled()) return interrupted_error();  // a sink decides for itself
    i64 n = std::min<i64>(left, buf.size());
    VMSAVE_TRY(pread_all(fd(), buf.data(), align_up(n, kDirectAlign), off, path()));
    st.update(buf.data(), n);
    if (dec) {
      VMSAVE_TRY(dec->write(buf.data(), n, count, &bad));
      if (!bad.empty()) return damaged(path(), bad, img_.vmstate.offset);
    } else if (sink) {
      VMSAVE_TRY(sink(buf.data(), n));
    }
    left -= n;
    off += n;
  }
  if (st.digest() != img_.vmstate.checksum)
    return damaged(path(), "vmstate checksum mismatch", img_.vmstate.offset);
  if (dec && !dec->finished())
    return damaged(path(), "compressed device state ends early", img_.vmstate.offset);
  if (sent >= 0 && dec && decoded != sent) return wrong_size("decompresses to", decoded);
  return Status();
}

Status ImageReader::verify(const EngineConfig& cfg, Progress* progress,
                           VerifyReport* report) const {
  auto t0 = Clock::now();
  auto fail = [&](const Error& cause) {
    Error e = named_cut(cause);
    report->ok = false;
    if (report->first_damage.empty()) report->first_damage = e.message();
    return e;
  };
  auto m = metadata();
  if (!m.ok()) return fail(m.error());
  // Longer than the header says: bytes appended (a concatenation, a copy
  // over a longer file). Restores never read them; the image is not intact.
  struct stat st;
  if (fstat(fd(), &st) == 0 && st.st_size > img_.file_size)
    return fail(damaged(path(),
                        fmt::format("{} bytes past the image's end (the header says it is {} "
                                    "bytes, the file has {})",
                                    st.st_size - img_.file_size, img_.file_size, st.st_size),
                        img_.file_size));
  Status vs = stream_vmstate(nullptr);
  if (!vs.ok()) return fail(vs.error());
  // The progress counts the data to read, as a restore's does: QEMU's
  // section whole, and the pages each block stores.
  if (progress)
    for (auto& b : img_.blocks)
      if (!b.via_qemu()) {
        progress->total += b.size;
        progress->data_total += b.data_bytes();
      }
  if (img_.has_qemu_section()) {
    if (progress) {
      progress->total += img_.qemu.length;
      progress->data_total += img_.qemu.length;
    }
    auto sum = hash_range(fd(), file_.direct, img_.qemu.offset, img_.qemu.length, path(), progress);
    if (!sum.ok()) return fail(sum.error());
    report->bytes_read += img_.qemu.length;
    if (*sum != img_.qemu.checksum) {
      Error e = damaged(path(), "QEMU migration section checksum mismatch", img_.qemu.offset);
      report->first_damage = fmt::format("QEMU migration section (image offset {})", img_.qemu.offset);
      return fail(e);
    }
  }
  for (size_t i = 0; i < img_.blocks.size(); i++) {
    if (img_.blocks[i].via_qemu()) continue;
    auto bits = bitmap(i);
    if (!bits.ok()) return fail(bits.error());
    auto s = sums(i);
    if (!s.ok()) return fail(s.error());
    auto codecs = chunk_table(i);
    if (!codecs.ok()) return fail(codecs.error());
    const BlockLayout& b = img_.blocks[i];
    Status st = std::min(b.chunk_size, b.region.length) > kMaxChunkBuffer
                    ? verify_large_chunks(i, *bits, *s, cfg, progress, report)
                    : read_chunks(i, *bits, *s, *codecs, RamDest(), cfg, progress, nullptr, report);
    if (!st.ok()) return fail(st.error());
  }
  // What no checksum covers, the padding after each section and the gaps
  // between RAM regions, holds nothing a writer put there: zeros (holes,
  // mostly). A flipped byte there was called intact.
  std::vector<std::pair<i64, i64>> covered = {{0, kHeaderSize}};
  auto cover = [&](const Extent& e) {
    if (e.length > 0) covered.emplace_back(e.offset, e.offset + e.length);
  };
  for (auto& b : img_.blocks) {
    cover(b.region);
    cover(b.bitmap);
    cover(b.sums);
    cover(b.chunk_table);
  }
  for (const Extent* e : {&img_.vmstate, &img_.qemu, &img_.metadata, &img_.table}) cover(*e);
  for (const Extent& e : img_.unknown) cover(e);
  std::sort(covered.begin(), covered.end());
  AlignedBuffer buf(kStreamBuffer);
  i64 from = 0;
  covered.emplace_back(img_.file_size, img_.file_size);
  for (auto [a, z] : covered) {
    if (a > from) {
      auto at = first_nonzero_byte(fd(), from, a, buf, path());
      if (!at.ok()) return fail(at.error());
      if (*at >= 0) return fail(damaged(path(), "a byte outside every section is not zero", *at));
    }
    from = std::max(from, z);
  }
  report->seconds = seconds_since(t0);
  return Status();
}

}  // namespace vmsave
