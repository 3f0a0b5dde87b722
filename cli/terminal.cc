// TerminalReporter: progress lines for humans and JSON lines for wrappers.
//
// A ticker thread samples the phase's counters ten times a second: the I/O
// workers only bump atomics and never wait for the terminal. Estimates are
// honest: a phase whose total is unknown (QEMU's device state can be GBs
// from a VFIO device, and its size is not announced) shows bytes and rate,
// never an invented percentage.

#include "cli/terminal.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <system_error>
#include <vector>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include "lib/cancel.h"

namespace vmsave {

TerminalReporter::TerminalReporter(bool quiet, int progress_fd)
    : quiet_(quiet), progress_fd_(progress_fd) {
  // Not handed on to the QEMU a restore starts: a wrapper reading the
  // lines to their end would wait for as long as the VM runs.
  if (progress_fd_ >= 0)
    ::fcntl(progress_fd_, F_SETFD, ::fcntl(progress_fd_, F_GETFD) | FD_CLOEXEC);
  const char* term = std::getenv("TERM");
  smart_ = isatty(STDERR_FILENO) && term && std::strcmp(term, "dumb") != 0;
  try {
    if ((smart_ && !quiet_) || progress_fd_ >= 0) thread_ = std::thread([this] { ticker(); });
  } catch (const std::system_error&) {
    // Out of threads (ulimit -u): the work goes on without a progress line.
  }
}

TerminalReporter::~TerminalReporter() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
  // The last lines, if the reader made room meanwhile; never waited for.
  std::lock_guard lock(mu_);
  if (progress_fd_ >= 0) send_unsent();
}

void TerminalReporter::ticker() {
  while (!stop_) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::lock_guard lock(mu_);
    if (!phase_.empty())
      draw(false);
    else if (progress_fd_ >= 0)
      send_unsent();
  }
}

static std::string rate_text(double bytes, double secs) {
  if (secs <= 0) return "";
  return human_bytes(bytes / secs) + "/s";
}

// ninja's ElideMiddle: `s` in at most `width` columns, its middle given up
// for "..." (the phase at the start and the time left at the end say most).
std::string elide_middle(const std::string& s, size_t width) {
  if (s.size() <= width) return s;
  if (width < 4) return s.substr(0, width);
  const size_t head = (width - 3) / 2, tail = width - 3 - head;
  return s.substr(0, head) + "..." + s.substr(s.size() - tail);
}

// Whether the terminal on stderr is ours to redraw on: not when vmsave runs
// as a background job (`vmsave save ... &`), whose line would erase the
// shell's prompt ten times a second.
static bool in_foreground() {
  const pid_t fg = tcgetpgrp(STDERR_FILENO);
  return fg < 0 || fg == getpgrp();
}

// The terminal's width, 0 when it does not say.
static size_t terminal_columns() {
  winsize ws{};
  return ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 ? ws.ws_col : 0;
}

// The longest of `variants` (each shorter than the one before) that fits
// in `width` columns, else the last one with its middle elided: a narrow
// terminal loses the rate, then the byte counts, never half a number
// ("verifying: 2.2 GiB....2 GiB/s" read as a rate of 2 GiB/s; trial U).
static std::string fit(const std::vector<std::string>& variants, size_t width) {
  for (const std::string& v : variants)
    if (v.size() <= width) return v;
  return elide_middle(variants.back(), width);
}

void TerminalReporter::draw(bool final, bool failed) {
  double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - phase_start_).count();
  i64 done = progress_ ? progress_->done.load(std::memory_order_relaxed) : 0;
  i64 total = progress_ ? progress_->total.load(std::memory_order_relaxed) : 0;
  const i64 data_total = progress_ ? progress_->data_total.load(std::memory_order_relaxed) : 0;
  // Clamped: the allocated figure is taken as the save begins, and a file
  // written to meanwhile (a raw save of one in use) may hold more by then.
  const i64 data_done =
      progress_ ? std::min(progress_->data_done.load(std::memory_order_relaxed), data_total) : 0;
  // A signal that came once all of the phase was done did not stop it.
  const bool stopped = final && (failed || (cancelled() && !(total > 0 && done >= total)));

  if (progress_fd_ >= 0) {
    nlohmann::json j = {{"phase", phase_}, {"done", done}, {"elapsed_s", secs},
                        {"final", final}};
    if (total > 0) j["total"] = total;
    if (data_total > 0) {
      j["data_done"] = data_done;
      j["data_total"] = data_total;
    }
    if (stopped) j["interrupted"] = true;
    write_progress(j.dump() + "\n", final);
  }
  if (quiet_) return;

  // Where the data to move is known, it is the work: holes go by in no time.
  const bool by_data = data_total > 0 && total > 0;
  const i64 d = by_data ? data_done : done, t = by_data ? data_total : total;
  std::string counts, pct, rate, eta;
  if (progress_) {
    rate = rate_text(d, secs);
    if (t > 0) {
      pct = fmt::format("{:.0f}%", 100.0 * double(d) / double(t));
      counts = fmt::format("{} of {}{} ({})", human_bytes(d), human_bytes(t),
                           by_data ? " in use" : "", pct);
      if (!final && d > 0 && d < t)
        eta = fmt::format("{:.0f} s left", secs * double(t - d) / double(d));
    } else {
      counts = human_bytes(d);
    }
  }
  std::string end;
  if (final) end += fmt::format(" in {:.2f} s", secs);
  if (stopped) end += cancelled() ? " (interrupted)" : " (failed)";
  auto line = [&](std::initializer_list<const std::string*> parts) {
    std::string t;
    for (const std::string* p : parts)
      if (!p->empty()) t += (t.empty() ? ": " : ", ") + *p;
    return phase_ + t + end;
  };
  const std::string text = line({&counts, &rate, &eta});
  if (smart_ && !final && !in_foreground()) return;  // its final line only, as plain
  if (smart_ && (line_dirty_ || !final)) {
    // One row, redrawn: a line wider than the terminal wraps, and "\r"
    // and "\x1b[K" redraw only its last row, leaving the others behind.
    const size_t columns = terminal_columns();
    const std::string& least = pct.empty() ? counts : pct;
    say(stderr, "\r{}\x1b[K",
        final || !columns ? text
                          : fit({text, line({&counts, &eta}), line({&least, &eta}), line({&least})},
                                columns - 1));
    line_dirty_ = true;
    if (final) {
      say(stderr, "\n");
      line_dirty_ = false;
    }
  } else if (final) {
    say(stderr, "{}\n", text);
  }
  std::fflush(stderr);
}

// Never waits for the reader: a wrapper that stops reading must not keep
// a guest paused, nor hold up a signal's handling behind mu_. A line the
// pipe has no room for waits in unsent_ (a pipe with room for one page
// takes a line whole: they are far shorter); of the lines that are not a
// phase's last, only the latest. A reader that drained its pipe only at
// the end got the first line and no final one (trial U). Called with mu_
// held.
void TerminalReporter::write_progress(const std::string& line, bool final) {
  if (!unsent_.empty() && !unsent_.back().second) unsent_.pop_back();  // superseded
  if (unsent_.size() < 1024) unsent_.emplace_back(line, final);
  send_unsent();
}

// Sends what it can of unsent_.
void TerminalReporter::send_unsent() {
  while (!unsent_.empty() && progress_fd_ >= 0) {
    pollfd pfd{progress_fd_, POLLOUT, 0};
    if (::poll(&pfd, 1, 0) != 1 || !(pfd.revents & POLLOUT)) {
      if (pfd.revents & (POLLERR | POLLHUP)) progress_fd_ = -1;  // the reader is gone
      break;
    }
    const std::string& line = unsent_.front().first;
    ssize_t n = ::write(progress_fd_, line.data(), line.size());
    if (n >= 0) {
      unsent_.pop_front();
      continue;
    }
    if (errno == EAGAIN || errno == EINTR) break;
    if (errno != EPIPE) {
      clear_line();
      say(stderr,
          "vmsave: warning: cannot write progress to descriptor {}: {}; no more progress "
          "lines\n",
          progress_fd_, std::strerror(errno));
    }
    progress_fd_ = -1;
  }
  if (progress_fd_ < 0) unsent_.clear();
}

void TerminalReporter::clear_line() {
  if (line_dirty_) {
    say(stderr, "\r\x1b[K");
    line_dirty_ = false;
  }
}

void TerminalReporter::begin_phase(const std::string& name, const Progress* progress) {
  std::lock_guard lock(mu_);
  phase_ = name;
  progress_ = progress;
  phase_start_ = std::chrono::steady_clock::now();
  // A line as the phase begins, so a wrapper hears of a phase shorter
  // than a tick too (before the first tick it only ever saw its end).
  if (progress_fd_ >= 0) draw(false);
}

void TerminalReporter::end_phase(bool failed) {
  std::lock_guard lock(mu_);
  if (!phase_.empty()) draw(true, failed);
  phase_.clear();
  progress_ = nullptr;
}

void TerminalReporter::warn(const std::string& msg) {
  std::lock_guard lock(mu_);
  warnings_.push_back(msg);
  clear_line();
  say(stderr, "vmsave: warning: {}\n", visible(msg));
}

std::vector<std::string> TerminalReporter::warnings() {
  std::lock_guard lock(mu_);
  return warnings_;
}

void TerminalReporter::note(const std::string& msg) {
  std::lock_guard lock(mu_);
  if (quiet_) return;
  clear_line();
  say(stderr, "{}\n", visible(msg));
}

}  // namespace vmsave
