// O_DIRECT file opening with a buffered fallback, whole-buffer pread/pwrite
// for small sections, and the worker pool that drives the rings.

#include "io/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <algorithm>

#include <system_error>
#include <thread>
#include <vector>

#include <fmt/core.h>

#include "lib/cancel.h"

namespace vmsave {

// Online CPUs, at most 32: each worker keeps chunk buffers, so vmsave's
// memory would otherwise grow with the host (at least 1 MiB per worker
// where it reads into buffers), and 32 rings of 32 requests keep any disk
// busy.
int default_jobs() {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(std::min<long>(n, 32)) : 1;
}

Result<DirectFile> open_direct(const std::string& path, int flags, mode_t mode,
                               bool want_direct) {
  // Images are read through links (latest.vmsave -> ...) but never
  // written through one.
  const bool writes = flags & (O_WRONLY | O_RDWR | O_CREAT);
  flags |= O_CLOEXEC | (writes ? O_NOFOLLOW : 0);
  DirectFile f;
  f.path = path;
  if (want_direct) {
    int fd = ::open(path.c_str(), flags | O_DIRECT, mode);
    if (fd >= 0) {
      f.fd.reset(fd);
      f.direct = true;
      return f;
    }
    // EINVAL: the filesystem has no O_DIRECT (ramfs, some FUSE). Anything
    // else is a real failure and is reported as such below.
    if (errno != EINVAL) return sys_error("open", path, errno);
    // O_EXCL|O_CREAT may have failed after creating nothing; retry plainly.
  }
  int fd = ::open(path.c_str(), flags, mode);
  if (fd < 0) {
    Error e = sys_error("open", path, errno);
    if (errno == ELOOP && writes) e.detail = "is a symbolic link; vmsave does not write through links";
    return e;
  }
  f.fd.reset(fd);
  return f;
}

Status reopen_buffered(DirectFile& f) {
  int flags = fcntl(f.fd.get(), F_GETFL);
  if (flags < 0) return sys_error("fcntl", f.path, errno);
  if (fcntl(f.fd.get(), F_SETFL, flags & ~O_DIRECT) < 0) return sys_error("fcntl", f.path, errno);
  f.direct = false;
  return Status();
}

Status pwrite_all(int fd, const void* buf, size_t len, i64 offset, const std::string& path) {
  const u8* p = static_cast<const u8*>(buf);
  while (len > 0) {
    ssize_t n = ::pwrite(fd, p, len, offset);
    if (n < 0) {
      if (errno == EINTR) continue;
      return sys_error("write", path, errno).at(offset);
    }
    p += n;
    len -= n;
    offset += n;
  }
  return Status();
}

Status pread_all(int fd, void* buf, size_t len, i64 offset, const std::string& path) {
  u8* p = static_cast<u8*>(buf);
  while (len > 0) {
    ssize_t n = ::pread(fd, p, len, offset);
    if (n < 0) {
      if (errno == EINTR) continue;
      return sys_error("read", path, errno).at(offset);
    }
    if (n == 0) return Error{"read", path, "unexpected end of file"}.at(offset);
    p += n;
    len -= n;
    offset += n;
  }
  return Status();
}

Status run_parallel(const EngineConfig& cfg, i64 n,
                    const std::function<void(IoQueue&, int worker)>& setup,
                    const std::function<Status(IoQueue&, int worker, i64 i)>& task,
                    EngineStats* stats) {
  int jobs = cfg.jobs > 0 ? cfg.jobs : default_jobs();
  if (jobs > n) jobs = n > 0 ? static_cast<int>(n) : 1;

  // Each worker creates its own ring: with IORING_SETUP_SINGLE_ISSUER the
  // ring belongs to the thread that set it up. Worker 0 is this thread and
  // creates its ring first. Where the kernel refuses one (Docker's default
  // seccomp profile does; or the locked-memory or open-file limit runs out)
  // a worker transfers synchronously, one request at a time, which a disk
  // feels but a tmpfs hardly does; if worker 0 cannot have a ring, no
  // worker tries.
  static std::atomic<bool> told{false};
  auto make_queue = [&cfg](bool try_ring) {
    if (!try_ring) return IoQueue::synchronous();
    std::string why_not;
    std::unique_ptr<IoQueue> q = IoQueue::create(cfg.queue_depth, &why_not);
    // Said once the queue first does what a ring would have done: work
    // between files in memory bypasses rings anyway.
    if (q->is_synchronous() && cfg.warn)
      q->set_on_ring_missed([warn = cfg.warn, why_not] {
        if (!told.exchange(true))
          warn(
              fmt::format("io_uring is unavailable ({}): reading and writing with "
                          "pread/pwrite instead, one request per worker at a time, "
                          "which is slower on a disk",
                          why_not));
      });
    return q;
  };
  std::vector<std::unique_ptr<IoQueue>> queues(jobs);
  queues[0] = make_queue(true);
  const bool rings = !queues[0]->is_synchronous();

  std::atomic<i64> next{0};
  std::atomic<bool> stop{false};
  std::vector<Status> results(jobs);
  std::vector<std::thread> threads;

  auto worker = [&](int w) {
    if (!queues[w]) queues[w] = make_queue(rings);
    IoQueue& q = *queues[w];
    if (setup) setup(q, w);
    Status st;
    while (!stop.load(std::memory_order_relaxed)) {
      if (cancelled()) {
        st = interrupted_error();
        break;
      }
      i64 i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) break;
      st = task(q, w, i);
      if (st.ok()) st = q.flush();
      if (!st.ok()) break;
    }
    // Completions may fail too (e.g. ENOSPC on the last writes).
    Status drained = q.drain();
    if (st.ok()) st = std::move(drained);
    if (!st.ok()) stop = true;
    results[w] = std::move(st);
  };

  // Out of threads (ulimit -u, a pids cgroup), the work is shared by the
  // workers that could start: this thread at least.
  for (int w = 1; w < jobs; w++) {
    try {
      threads.emplace_back(worker, w);
    } catch (const std::system_error&) {
      break;
    }
  }
  worker(0);
  for (auto& t : threads) t.join();

  if (stats) {
    stats->jobs = static_cast<int>(threads.size()) + 1;
    for (auto& q : queues) {
      if (!q) continue;
      stats->latency.merge(q->latency());
      stats->bytes += q->bytes_done();
    }
  }
  // Report an interruption only if nothing more specific happened.
  Status first;
  for (auto& r : results) {
    if (r.ok()) continue;
    if (first.ok() || first.error().status == Exit::kInterrupted) first = r;
  }
  return first;
}

}  // namespace vmsave
