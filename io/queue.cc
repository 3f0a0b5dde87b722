// IoQueue: a worker's io_uring ring with per-slot request state.
//
// The shape follows liburing's io_uring-cp.c: a fixed number of slots, each
// request's slot index in user_data, completions reaped in batches with
// io_uring_for_each_cqe + io_uring_cq_advance, short transfers resubmitted
// for the remainder. The ring is set up with SINGLE_ISSUER|DEFER_TASKRUN
// (one thread submits and reaps, so completion work runs when we wait rather
// than interrupting the scanning/hashing the worker is doing), falling back
// to a plain ring on kernels that refuse those flags.

#include "io/queue.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include <fmt/core.h>

namespace vmsave {

const FaultPlan& FaultPlan::get() {
  static const FaultPlan plan = [] {
    FaultPlan p;
    const char* s = std::getenv("VMSAVE_FAULT");
    if (!s) return p;
    std::string v = s;
    if (v == "no-space-check") {
      p.no_space_check = true;
      return p;
    }
    // "NAME:NUMBER" settings, each a number in one field.
    const std::pair<const char*, double*> seconds[] = {{"qmp-timeout:", &p.qmp_timeout_s},
                                                       {"vmstate-timeout:", &p.vmstate_timeout_s}};
    const std::pair<const char*, int*> millis[] = {{"after-commit:", &p.after_commit_ms},
                                                   {"slow-load:", &p.slow_load_ms},
                                                   {"slow-connect:", &p.slow_connect_ms},
                                                   {"slow-flush:", &p.flush_delay_ms}};
    for (auto [name, field] : seconds)
      if (v.starts_with(name)) {
        *field = std::atof(v.c_str() + std::strlen(name));
        return p;
      }
    for (auto [name, field] : millis)
      if (v.starts_with(name)) {
        *field = std::atoi(v.c_str() + std::strlen(name));
        return p;
      }
    size_t colon = v.find(':');
    if (colon == std::string::npos) return p;
    p.nth = std::atoll(v.substr(0, colon).c_str());
    std::string kind = v.substr(colon + 1);
    if (kind == "eio") p.err = EIO;
    else if (kind == "enospc") p.err = ENOSPC;
    else if (kind == "short") p.short_io = true;
    else p.nth = 0;
    return p;
  }();
  return plan;
}

static std::atomic<i64> g_requests{0};

std::unique_ptr<IoQueue> IoQueue::create(u32 depth, std::string* why_not_ring) {
  std::unique_ptr<IoQueue> q(new IoQueue());
  io_uring_params p{};
  p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
  int ret = io_uring_queue_init_params(depth, &q->ring_, &p);
  if (ret == -EINVAL) {
    // Kernels before 6.1 do not know these flags.
    p = {};
    ret = io_uring_queue_init_params(depth, &q->ring_, &p);
  }
  if (ret < 0) {
    const char* hint =
        ret == -EPERM || ret == -ENOSYS ? " (a seccomp profile, or sysctl kernel.io_uring_disabled)"
        : ret == -ENOMEM ? "; raise the locked-memory limit (ulimit -l), or use a smaller "
                           "--queue-depth"
        : ret == -EMFILE || ret == -ENFILE ? "; raise the open-file limit (ulimit -n)"
                                           : "";
    if (why_not_ring)
      *why_not_ring = fmt::format("io_uring_setup: {}{}", std::strerror(-ret), hint);
    return synchronous();
  }
  q->ring_ok_ = true;
  q->slots_.resize(depth);
  for (u32 i = 0; i < depth; i++) q->free_.push_back(depth - 1 - i);
  return q;
}

std::unique_ptr<IoQueue> IoQueue::synchronous() {
  return std::unique_ptr<IoQueue>(new IoQueue());
}

IoQueue::~IoQueue() {
  if (!ring_ok_) return;
  waiting_.clear();  // an error unwinds: never made
  (void)drain();
  io_uring_queue_exit(&ring_);
}

void IoQueue::name_fd(int fd, std::string path) { names_.emplace_back(fd, std::move(path)); }

std::string IoQueue::fd_name(int fd) const {
  for (auto& [f, p] : names_)
    if (f == fd) return p;
  return fmt::format("fd {}", fd);
}

bool IoQueue::register_memory(std::span<const std::pair<u8*, i64>> ranges) {
  // One iovec may cover at most 1 GiB (the kernel's limit per fixed buffer).
  constexpr i64 kMaxFixed = 1 * kGiB;
  std::vector<iovec> iov;
  std::vector<FixedRange> fixed;
  for (auto [base, len] : ranges)
    for (i64 off = 0; off < len; off += kMaxFixed) {
      i64 n = std::min(kMaxFixed, len - off);
      iov.push_back({base + off, static_cast<size_t>(n)});
      fixed.push_back({base + off, n});
    }
  if (iov.empty() || !fixed_.empty() || !ring_ok_) return false;
  if (io_uring_register_buffers(&ring_, iov.data(), static_cast<unsigned>(iov.size())) < 0) return false;
  fixed_ = std::move(fixed);
  return true;
}

void slice_iov(const std::vector<iovec>& all, u32 from, u32 to, std::vector<iovec>& out) {
  out.clear();
  size_t at = 0;
  for (const iovec& v : all) {
    size_t a = std::max<size_t>(at, from), z = std::min<size_t>(at + v.iov_len, to);
    if (a < z) out.push_back({static_cast<u8*>(v.iov_base) + (a - at), z - a});
    at += v.iov_len;
  }
}

void IoQueue::prep(u32 idx) {
  Slot& s = slots_[idx];
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  // Never null: at most `depth` slots are busy and the SQ has `depth` entries;
  // unsubmitted entries are flushed before a slot is reused.
  u8* buf = s.req.buf + s.done;
  u32 len = s.req.len - s.done;
  i64 off = s.req.offset + s.done;
  if (!s.req.iov.empty()) {
    slice_iov(s.req.iov, s.done, s.req.len, s.cur);
    auto n = static_cast<unsigned>(s.cur.size());
    if (s.req.write)
      io_uring_prep_writev(sqe, s.req.fd, s.cur.data(), n, off);
    else
      io_uring_prep_readv(sqe, s.req.fd, s.cur.data(), n, off);
    io_uring_sqe_set_data64(sqe, idx);
    unsubmitted_++;
    return;
  }
  int fixed = -1;
  for (size_t i = 0; i < fixed_.size(); i++)
    if (buf >= fixed_[i].base && buf + len <= fixed_[i].base + fixed_[i].len) {
      fixed = static_cast<int>(i);
      break;
    }
  if (fixed >= 0 && s.req.write)
    io_uring_prep_write_fixed(sqe, s.req.fd, buf, len, off, fixed);
  else if (fixed >= 0)
    io_uring_prep_read_fixed(sqe, s.req.fd, buf, len, off, fixed);
  else if (s.req.write)
    io_uring_prep_write(sqe, s.req.fd, buf, len, off);
  else
    io_uring_prep_read(sqe, s.req.fd, buf, len, off);
  io_uring_sqe_set_data64(sqe, idx);
  unsubmitted_++;
}

Status IoQueue::submit(const IoRequest& req) {
  if (!first_error_.ok()) return first_error_;
  const FaultPlan& fault = FaultPlan::get();
  const bool faulty = fault.nth && ++g_requests == fault.nth;
  if (!faulty && req.write && req.fd == serial_fd_) {
    // Enough waiting to scan on for a while; beyond that, wait for the turn.
    constexpr size_t kMaxWaiting = 1024;
    waiting_.push_back(req);
    return write_waiting(waiting_.size() >= kMaxWaiting);
  }
  if (!ring_ok_ && faulty && fault.err) return first_error_ = transfer_error(req, 0, fault.err);
  if (!ring_ok_ || (!faulty && !req.write && req.fd == inline_read_fd_)) {
    if (!ring_ok_ && req.fd != inline_read_fd_ && on_ring_missed_)
      std::exchange(on_ring_missed_, {})();
    if (Status st = transfer_now(req); !st.ok()) return first_error_ = st;
    Status st = on_done_ ? on_done_(req) : Status();
    if (!st.ok() && first_error_.ok()) first_error_ = st;
    return first_error_;
  }
  while (free_.empty()) {  // a short or -EAGAIN completion is resubmitted, freeing no slot
    Status st = reap(1);
    if (!st.ok()) return st;
  }
  u32 idx = free_.back();
  free_.pop_back();
  Slot& s = slots_[idx];
  s.req = req;
  s.done = 0;
  s.busy = true;
  s.start = std::chrono::steady_clock::now();
  in_flight_++;

  if (faulty) {
    if (fault.err) {
      first_error_ = complete(idx, -fault.err);
      return first_error_;
    }
    // A short transfer of half the request; the remainder is resubmitted
    // and must still land, which is what the fault tests check.
    if (fault.short_io && req.len >= 2 * kDirectAlign) {
      s.req.len = static_cast<u32>(align_down(req.len / 2, kDirectAlign));
    }
  }
  prep(idx);
  s.req.len = req.len;  // after a short fault's first half: the remainder is resubmitted
  // Submit in batches of a quarter ring (fewer syscalls); flush() after each
  // work item submits the rest, so the device never waits for a batch to fill.
  if (unsubmitted_ >= slots_.size() / 4 + 1) return flush();
  return first_error_;
}

Status IoQueue::write_waiting(bool wait) {
  if (waiting_.empty() || !first_error_.ok()) return first_error_;
  std::unique_lock turn(*turn_, std::defer_lock);
  if (wait)
    turn.lock();
  else if (!turn.try_lock())
    return first_error_;
  std::vector<IoRequest> done;
  done.swap(waiting_);
  for (const IoRequest& r : done)
    if (Status st = transfer_now(r); !st.ok()) return first_error_ = st;
  turn.unlock();
  for (const IoRequest& r : done) {
    Status st = on_done_ ? on_done_(r) : Status();
    if (!st.ok() && first_error_.ok()) first_error_ = st;
  }
  return first_error_;
}

// Moves `r` with pread/pwrite on this thread, to its end or the first error.
Status IoQueue::transfer_now(const IoRequest& r) {
  auto start = std::chrono::steady_clock::now();
  std::vector<iovec> rest;
  for (u32 at = 0; at < r.len;) {
    ssize_t n;
    if (!r.iov.empty()) {
      slice_iov(r.iov, at, r.len, rest);
      auto cnt = static_cast<int>(rest.size());
      n = r.write ? ::pwritev(r.fd, rest.data(), cnt, r.offset + at)
                  : ::preadv(r.fd, rest.data(), cnt, r.offset + at);
    } else {
      n = r.write ? ::pwrite(r.fd, r.buf + at, r.len - at, r.offset + at)
                  : ::pread(r.fd, r.buf + at, r.len - at, r.offset + at);
    }
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return transfer_error(r, at, n < 0 ? errno : 0);
    at += static_cast<u32>(n);
  }
  count_done(r, start);
  return Status();
}

Status IoQueue::flush() {
  VMSAVE_TRY(write_waiting(false));
  if (unsubmitted_ == 0) return first_error_;
  int ret = io_uring_submit(&ring_);
  if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
    return Error{"io_uring_submit", "", std::strerror(-ret)};
  if (ret >= 0) unsubmitted_ = 0;
  return first_error_;
}

Status IoQueue::reap(u32 min_complete) {
  int ret;
  do {
    ret = io_uring_submit_and_wait(&ring_, min_complete);
    // EAGAIN/EBUSY: the kernel is short of resources or the CQ overflowed;
    // reaping what is there below makes room.
  } while (ret == -EINTR);
  if (ret < 0 && ret != -EAGAIN && ret != -EBUSY) {
    // The ring is unusable; requests may still be in flight but the kernel
    // will not report them. Mark it broken so drain() stops waiting.
    broken_ = true;
    Error e{"io_uring_submit_and_wait", "", std::strerror(-ret)};
    if (first_error_.ok()) first_error_ = e;
    return e;
  }
  unsubmitted_ = 0;
  return collect();
}

Status IoQueue::poll() {
  VMSAVE_TRY(flush());  // writes waiting for the turn too
  if (in_flight_ == 0) return first_error_;
  // With DEFER_TASKRUN completions are posted only inside io_uring_enter
  // with GETEVENTS; this one never waits.
  int ret = io_uring_get_events(&ring_);
  if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
    broken_ = true;
    Error e{"io_uring_get_events", "", std::strerror(-ret)};
    if (first_error_.ok()) first_error_ = e;
    return e;
  }
  return collect();
}

Status IoQueue::collect() {
  io_uring_cqe* cqe;
  unsigned head;
  unsigned seen = 0;
  std::vector<std::pair<u32, int>> done;
  io_uring_for_each_cqe(&ring_, head, cqe) {
    done.emplace_back(static_cast<u32>(io_uring_cqe_get_data64(cqe)), cqe->res);
    seen++;
  }
  io_uring_cq_advance(&ring_, seen);
  for (auto [idx, res] : done) {
    Status st = complete(idx, res);
    if (!st.ok() && first_error_.ok()) first_error_ = st;
  }
  return first_error_;
}

Status IoQueue::complete(u32 idx, int res) {
  Slot& s = slots_[idx];
  auto release = [&] {
    s.busy = false;
    free_.push_back(idx);
    in_flight_--;
  };
  if (res == -EAGAIN || res == -EINTR) {
    prep(idx);
    return Status();
  }
  if (res < 0 || (res == 0 && s.req.len > s.done)) {
    release();
    return transfer_error(s.req, s.done, -res);
  }
  s.done += res;
  if (s.done < s.req.len) {
    // Short transfer: resubmit the remainder.
    prep(idx);
    return Status();
  }
  count_done(s.req, s.start);
  IoRequest req = std::move(s.req);
  release();
  if (on_done_) return on_done_(req);
  return Status();
}

// A request that failed after `done` bytes: with `err` (a positive errno),
// or at the end of the file when `err` is 0.
Error IoQueue::transfer_error(const IoRequest& r, u32 done, int err) const {
  const char* call = r.write ? "write" : "read";
  Error e = err ? sys_error(call, fd_name(r.fd), err)
                : Error{call, fd_name(r.fd), "unexpected end of file"};
  return e.at(r.offset + done);
}

void IoQueue::count_done(const IoRequest& r, std::chrono::steady_clock::time_point start) {
  auto took = std::chrono::steady_clock::now() - start;
  latency_.add(std::chrono::duration_cast<std::chrono::microseconds>(took).count());
  bytes_done_ += r.len;
}

Status IoQueue::drain() {
  (void)write_waiting(true);  // an error is first_error_; the ring is drained all the same
  while (in_flight_ > 0 && !broken_) {
    Status st = reap(1);
    if (!st.ok() && in_flight_ == 0) return st;
    // On error keep reaping: nothing may be left in flight.
    if (!st.ok() && first_error_.ok()) first_error_ = st;
  }
  return first_error_;
}

}  // namespace vmsave
