// Opening files for O_DIRECT, with the buffered fallback, and the parallel
// driver that runs work items over worker threads, each with its own ring.

#pragma once

#include <sys/stat.h>

#include <atomic>
#include <functional>
#include <string>

#include "io/fd.h"
#include "io/histogram.h"
#include "io/queue.h"
#include "lib/common.h"

namespace vmsave {

// A file opened for I/O by the engine. `direct` says whether O_DIRECT is in
// effect; when the filesystem refuses it (EINVAL at open or at the first
// aligned write), the file is reopened buffered and the caller warns once.
struct DirectFile {
  UniqueFd fd;
  std::string path;
  bool direct = false;
};

// Opens `path` with `flags` (O_RDONLY, O_WRONLY|O_CREAT|O_EXCL, ...) plus
// O_DIRECT when `want_direct`, and O_CLOEXEC. Opens that may write get
// O_NOFOLLOW: vmsave never writes guest memory through a symlink.
Result<DirectFile> open_direct(const std::string& path, int flags, mode_t mode, bool want_direct);

// Whether two stat results are of one file (a name, a hard link, a descriptor).
inline bool same_file(const struct stat& a, const struct stat& b) {
  return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

// Reopens `f` without O_DIRECT (same inode, via /proc/self/fd).
Status reopen_buffered(DirectFile& f);

// Writes/reads the whole buffer at `offset`, retrying short transfers and
// EINTR. For the small sections (header, tables); bulk data goes through
// IoQueue.
Status pwrite_all(int fd, const void* buf, size_t len, i64 offset, const std::string& path);
Status pread_all(int fd, void* buf, size_t len, i64 offset, const std::string& path);

struct EngineConfig {
  int jobs = 0;          // worker threads; 0 = default_jobs()
  u32 queue_depth = 32;  // requests in flight per worker (fio's usual 32)
  // Told, once per process, when io_uring is unavailable and the workers
  // read and write synchronously instead.
  std::function<void(const std::string&)> warn;
};

int default_jobs();

// Progress shared with the reporter thread: workers add, the reporter reads
// at most ten times a second. Relaxed atomics: it is a display.
struct Progress {
  std::atomic<i64> done{0};
  std::atomic<i64> total{0};
  // The bytes the phase must read, where known (0: not known): a save's
  // sources' allocated bytes, its holes passed over in no time. The line's
  // percentage, rate and time left then count these: with the data in the
  // low part of RAM, 61% of the address space had been scanned until the
  // last second, and the time left grew as the end came (trial U).
  std::atomic<i64> data_done{0};
  std::atomic<i64> data_total{0};

  // Bytes that are data and address space alike (a section read whole).
  void add_done(i64 n) {
    done.fetch_add(n, std::memory_order_relaxed);
    data_done.fetch_add(n, std::memory_order_relaxed);
  }
};

struct EngineStats {
  LatencyHistogram latency;
  i64 bytes = 0;
  int jobs = 0;
};

// Runs `task(queue, i)` for i in [0, n) over the configured workers, each
// worker pulling the next index from a shared counter and owning one
// IoQueue. `setup(queue)` runs once per worker before its first task
// (installs completion callbacks, names fds). The first error stops all
// workers; every queue is drained before returning, on success and error.
Status run_parallel(const EngineConfig& cfg, i64 n,
                    const std::function<void(IoQueue&, int worker)>& setup,
                    const std::function<Status(IoQueue&, int worker, i64 i)>& task,
                    EngineStats* stats);

}  // namespace vmsave
