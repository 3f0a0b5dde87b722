// The terminal side of core's Reporter: one redrawn progress line on a
// terminal (ninja's LinePrinter: "\r" ... "\x1b[K", only when stderr is a
// tty and TERM is not dumb), plain lines otherwise, JSON lines on
// --progress-fd, nothing with --quiet.

#pragma once

#include <atomic>
#include <cstdio>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include "core/reporter.h"

namespace vmsave {

// fmt::print, minus the exception it throws when the write fails (stderr on
// a full disk, a closed pipe): vmsave's output never decides its outcome
// halfway; main() looks at ferror(stdout) once the work is done.
template <typename... T>
void say(std::FILE* f, fmt::format_string<T...> format, T&&... args) {
  std::string s = fmt::format(format, std::forward<T>(args)...);
  (void)!std::fwrite(s.data(), 1, s.size(), f);
}

// say(), with every string argument made visible(): for lines that show
// text from an image or from QEMU, whose format strings are vmsave's own.
inline std::string visible_arg(const std::string& s) {
  return visible(s);
}
inline std::string visible_arg(const char* s) {
  return visible(s);
}
template <typename T>
const T& visible_arg(const T& v) {
  return v;
}
template <typename... T>
void show(std::FILE* f, fmt::format_string<T...> format, T&&... args) {
  std::string s =
      fmt::vformat(fmt::string_view(format), fmt::make_format_args(visible_arg(args)...));
  (void)!std::fwrite(s.data(), 1, s.size(), f);
}

// `s` in at most `width` columns, its middle elided with "...".
std::string elide_middle(const std::string& s, size_t width);

class TerminalReporter : public Reporter {
 public:
  TerminalReporter(bool quiet, int progress_fd);
  ~TerminalReporter() override;

  void begin_phase(const std::string& name, const Progress* progress) override;
  void end_phase(bool failed) override;
  void warn(const std::string& msg) override;
  void note(const std::string& msg) override;
  // Every warning so far, for --json's "warnings" (on stderr they scroll
  // past a wrapper that parses stdout).
  std::vector<std::string> warnings();

 private:
  void ticker();
  void draw(bool final, bool failed = false);
  void clear_line();
  void write_progress(const std::string& line, bool final);
  void send_unsent();

  bool quiet_;
  int progress_fd_;
  bool smart_;  // stderr is a terminal that understands escapes
  std::mutex mu_;
  std::string phase_;
  const Progress* progress_ = nullptr;
  std::chrono::steady_clock::time_point phase_start_;
  bool line_dirty_ = false;
  std::vector<std::string> warnings_;
  // Progress lines the descriptor had no room for, sent as soon as it has:
  // every phase's final line, in order, and the latest other line.
  std::deque<std::pair<std::string, bool>> unsent_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace vmsave
