// One io_uring ring and the requests in flight on it.
//
// An IoQueue belongs to one worker thread. submit() queues a read or write
// and, when all `depth` slots are busy, first reaps completions. Each request
// carries its slot index in user_data; the slot remembers the request, so a
// short transfer or -EAGAIN is resubmitted for the remainder, and the
// caller's completion callback runs only once the whole request is done.
// Nothing returns while requests are in flight: drain() waits for all of
// them, and the destructor drains too, so no error path leaves the kernel
// writing into memory that is about to be freed or unmapped.
//
// Where the kernel refuses a ring (a container's seccomp profile, sysctl
// kernel.io_uring_disabled, the locked-memory or open-file limit) a queue
// is synchronous instead: submit() makes
// the transfer with pread/pwrite and runs the callback before it returns,
// so callers must count a request as pending before they submit it, as
// they must anyway for a completion reaped while submit() waits for a slot.

#pragma once

#include <liburing.h>
#include <sys/uio.h>

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "io/fd.h"
#include "io/histogram.h"
#include "lib/common.h"

namespace vmsave {

struct IoRequest {
  int fd = -1;
  u8* buf = nullptr;
  u32 len = 0;
  i64 offset = 0;
  bool write = false;
  u64 tag = 0;  // handed back to the completion callback
  // When not empty, the transfer gathers from (or scatters into) these
  // pieces instead of `buf`, `len` being their sum; the queue keeps its own
  // copy until the request is done.
  std::vector<iovec> iov;
};

// Test-only fault injection (issue: reliability): when the environment
// variable VMSAVE_FAULT is "N:KIND" with KIND one of eio, enospc, short, the
// N-th request submitted by this process (1-based, counted over all queues)
// fails that way; "slow-flush:MS" makes the image's commit wait MS
// milliseconds before its flush (a stalled NFS server or busy disk), so
// --flush-timeout can be tested without racing a real flush;
// "after-commit:MS" makes a QEMU save wait MS milliseconds once its image
// is committed, before it tells QEMU to quit (a kill lands there);
// "no-space-check" skips a restore's check for room for its RAM files, so
// a full filesystem is met part-way through the fill (as when something
// else fills it meanwhile); "slow-load:MS" makes a restore wait MS
// milliseconds once QEMU has begun loading the device state, before it
// sends the first byte (a signal lands there); "slow-connect:MS" makes a
// restore wait MS milliseconds once QEMU has started, before it connects
// to its QMP socket (a kill lands before the daemon's pid is known);
// "vmstate-timeout:S" shortens the 600 s a save waits for device state. Read
// once at start-up.
struct FaultPlan {
  i64 nth = 0;
  int err = 0;       // positive errno to fail with, or 0
  bool short_io = false;
  int flush_delay_ms = 0;
  int after_commit_ms = 0;
  bool no_space_check = false;
  double qmp_timeout_s = 0;  // "qmp-timeout:S": QMP commands wait S seconds
  int slow_load_ms = 0;
  int slow_connect_ms = 0;
  double vmstate_timeout_s = 0;  // "vmstate-timeout:S": the most a device state may take
  static const FaultPlan& get();
};

// The bytes [from, to) of the pieces `all`, as pieces, into `out` (what a
// vectored transfer cut short still has to move).
void slice_iov(const std::vector<iovec>& all, u32 from, u32 to, std::vector<iovec>& out);

class IoQueue {
 public:
  // Called with the request's tag once it has fully completed.
  using OnDone = std::function<Status(const IoRequest&)>;

  // A ring of `depth` entries; where the kernel refuses one (io_uring
  // disabled, out of locked memory or descriptors) a synchronous queue, and
  // the reason, with its fix, in `why_not_ring`.
  static std::unique_ptr<IoQueue> create(u32 depth, std::string* why_not_ring = nullptr);
  // A synchronous queue, without trying io_uring.
  static std::unique_ptr<IoQueue> synchronous();
  bool is_synchronous() const { return !ring_ok_; }
  ~IoQueue();
  IoQueue(const IoQueue&) = delete;

  void set_on_done(OnDone fn) { on_done_ = std::move(fn); }
  // Called before the first request a synchronous queue makes that a ring
  // would have made (not those to files in memory, which bypass the ring):
  // a warning about a missing ring is then true of this work.
  void set_on_ring_missed(std::function<void()> fn) { on_ring_missed_ = std::move(fn); }

  // `path` names the file in errors. Returns the first error seen so far.
  Status submit(const IoRequest& req);
  // Hands queued requests to the kernel now; run_parallel calls it after
  // every work item so the device starts while the worker scans the next.
  Status flush();
  // Waits for every request in flight. Returns the first error seen.
  Status drain();
  // Waits until at least one request completes (its callback has run).
  Status reap_some() {
    if (!waiting_.empty()) return write_waiting(true);
    return in_flight_ ? reap(1) : first_error_;
  }
  // Runs the callbacks of requests that have completed, waiting for none.
  Status poll();
  // Requests not yet done: in the ring, or waiting for the turn to write.
  u32 in_flight() const { return in_flight_ + static_cast<u32>(waiting_.size()); }

  const LatencyHistogram& latency() const { return latency_; }
  i64 bytes_done() const { return bytes_done_; }
  // Names the file behind an fd in error messages.
  void name_fd(int fd, std::string path);

  // Registers memory the requests will read from or write into (a RAM
  // mapping, a worker's buffer) as io_uring fixed buffers, so the kernel pins
  // its pages once instead of on every request; requests whose buffer lies
  // inside a registered range then go out as READ_FIXED/WRITE_FIXED. An
  // optional feature: when the kernel refuses (memlock limit, page types it
  // cannot pin long-term, such as a regular file on ext4) it returns false
  // and requests go out as plain reads and writes.
  bool register_memory(std::span<const std::pair<u8*, i64>> ranges);
  bool fixed_buffers() const { return !fixed_.empty(); }

  // Writes to `fd` then bypass the ring: they are made with pwrite() by
  // this thread, by one queue at a time, under `turn`. For a file in memory
  // (tmpfs), whose write() copies under the inode's lock, so that the
  // ring's writes from several workers queued on that lock in kernel
  // threads, spinning. A write that finds the turn taken waits here while
  // the worker scans on, and goes out the next time this queue gets the
  // turn (flush, poll, or a wait).
  void serialize_writes(int fd, std::mutex* turn) {
    serial_fd_ = fd;
    turn_ = turn;
  }

  // Reads from `fd` then bypass the ring too: made with pread() by this
  // thread as they are submitted, their callback run before submit()
  // returns. For a file in memory, whose reads the ring could only hand
  // to kernel worker threads (they fault in the destination's pages).
  void read_inline(int fd) { inline_read_fd_ = fd; }

 private:
  IoQueue() = default;
  struct Slot {
    IoRequest req;
    u32 done = 0;  // bytes already transferred (short transfers)
    std::chrono::steady_clock::time_point start;
    bool busy = false;
    std::vector<iovec> cur;  // the pieces of req.iov still to transfer
  };

  void prep(u32 slot);
  Status reap(u32 min_complete);
  Status collect();  // the completions posted so far
  Status complete(u32 slot, int res);
  Status write_waiting(bool wait);
  Status transfer_now(const IoRequest& r);
  Error transfer_error(const IoRequest& r, u32 done, int err) const;
  void count_done(const IoRequest& r, std::chrono::steady_clock::time_point start);
  std::string fd_name(int fd) const;

  io_uring ring_{};
  bool ring_ok_ = false;
  std::vector<Slot> slots_;
  std::vector<u32> free_;
  u32 in_flight_ = 0;
  bool broken_ = false;
  u32 unsubmitted_ = 0;
  OnDone on_done_;
  std::function<void()> on_ring_missed_;
  Status first_error_;
  LatencyHistogram latency_;
  i64 bytes_done_ = 0;
  std::vector<std::pair<int, std::string>> names_;
  struct FixedRange {
    u8* base;
    i64 len;
  };
  std::vector<FixedRange> fixed_;  // index = io_uring buffer index
  int serial_fd_ = -1;
  int inline_read_fd_ = -1;
  std::mutex* turn_ = nullptr;
  std::vector<IoRequest> waiting_;  // serialized writes not yet made
};

}  // namespace vmsave
