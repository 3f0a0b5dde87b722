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

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <system_error>

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
}

void TerminalReporter::ticker() {
  while (!stop_) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::lock_guard lock(mu_);
    if (!phase_.empty()) draw(false);
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

void TerminalReporter::draw(bool final) {
  double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - phase_start_).count();
  i64 done = progress_ ? progress_->done.load(std::memory_order_relaxed) : 0;
  i64 total = progress_ ? progress_->total.load(std::memory_order_relaxed) : 0;

  if (progress_fd_ >= 0) {
    nlohmann::json j = {{"phase", phase_}, {"done", done}, {"elapsed_s", secs},
                        {"final", final}};
    if (total > 0) j["total"] = total;
    if (final && cancelled()) j["interrupted"] = true;
    write_progress(j.dump() + "\n");
  }
  if (quiet_) return;

  std::string text = phase_;
  if (progress_) {
    if (total > 0) {
      double pct = 100.0 * double(done) / double(total);
      text += fmt::format(": {} of {} ({:.0f}%), {}", human_bytes(done), human_bytes(total), pct,
                          rate_text(done, secs));
      if (!final && done > 0 && done < total) {
        double eta = secs * double(total - done) / double(done);
        text += fmt::format(", {:.0f} s left", eta);
      }
    } else {
      text += fmt::format(": {}, {}", human_bytes(done), rate_text(done, secs));
    }
  }
  if (final) text += fmt::format(" in {:.2f} s", secs);
  if (final && cancelled()) text += " (interrupted)";
  if (smart_ && !final && !in_foreground()) return;  // its final line only, as plain
  if (smart_ && (line_dirty_ || !final)) {
    // One row, redrawn: a line wider than the terminal wraps, and "\r"
    // and "\x1b[K" redraw only its last row, leaving the others behind.
    const size_t columns = terminal_columns();
    say(stderr, "\r{}\x1b[K", final || !columns ? text : elide_middle(text, columns - 1));
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
// pipe has no room for is dropped (a pipe with room for one page takes a
// line whole: they are far shorter). Called with mu_ held.
void TerminalReporter::write_progress(const std::string& line) {
  pollfd pfd{progress_fd_, POLLOUT, 0};
  if (::poll(&pfd, 1, 0) != 1 || !(pfd.revents & POLLOUT)) {
    if (pfd.revents & (POLLERR | POLLHUP)) progress_fd_ = -1;  // the reader is gone
    return;
  }
  ssize_t n = ::write(progress_fd_, line.data(), line.size());
  if (n >= 0 || errno == EAGAIN || errno == EINTR) return;
  if (errno != EPIPE) {
    clear_line();
    say(stderr,
        "vmsave: warning: cannot write progress to descriptor {}: {}; no more progress "
        "lines\n",
        progress_fd_, std::strerror(errno));
  }
  progress_fd_ = -1;
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

void TerminalReporter::end_phase() {
  std::lock_guard lock(mu_);
  if (!phase_.empty()) draw(true);
  phase_.clear();
  progress_ = nullptr;
}

void TerminalReporter::warn(const std::string& msg) {
  std::lock_guard lock(mu_);
  clear_line();
  say(stderr, "vmsave: warning: {}\n", visible(msg));
}

void TerminalReporter::note(const std::string& msg) {
  std::lock_guard lock(mu_);
  if (quiet_) return;
  clear_line();
  say(stderr, "{}\n", visible(msg));
}

}  // namespace vmsave
