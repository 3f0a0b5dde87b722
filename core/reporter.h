// How core/ tells the user what it is doing without knowing about
// terminals: cli/ hands in a Reporter. Phases carry optional byte counters
// that the reporter samples on its own clock (at most ten times a second),
// never from the I/O completion loops.

#pragma once

#include <chrono>
#include <string>

#include <nlohmann/json.hpp>

#include "io/file.h"
#include "lib/common.h"

namespace vmsave {

class Reporter {
 public:
  virtual ~Reporter() = default;
  // A named phase starts. `progress` (may be null) stays valid until
  // end_phase(); `total` 0 means the size is unknown (device state).
  virtual void begin_phase(const std::string& name, const Progress* progress) = 0;
  // `failed`: an error stopped the phase (its last line says so, as for a
  // signal).
  virtual void end_phase(bool failed = false) = 0;
  virtual void warn(const std::string& msg) = 0;
  virtual void note(const std::string& msg) = 0;
};

// A Reporter that says nothing, for tests and --quiet callers.
class NullReporter : public Reporter {
 public:
  void begin_phase(const std::string&, const Progress*) override {}
  void end_phase(bool) override {}
  void warn(const std::string&) override {}
  void note(const std::string&) override {}
};

// Times the named steps of an operation; the step list becomes part of the
// JSON report, so every figure in a summary is one that was measured.
class StepTimer {
 public:
  using Clock = std::chrono::steady_clock;
  StepTimer() : start_(Clock::now()), last_(start_) {}
  // Ends the current step, naming it.
  double lap(const std::string& name) {
    auto now = Clock::now();
    double s = std::chrono::duration<double>(now - last_).count();
    last_ = now;
    steps_[name] = s;
    return s;
  }
  double total() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }
  Clock::time_point now() const { return Clock::now(); }
  const nlohmann::json& steps() const { return steps_; }

 private:
  Clock::time_point start_, last_;
  nlohmann::json steps_ = nlohmann::json::object();
};

// The I/O latency histogram as JSON: {"p50":..,"p90":..,"p99":..,"max":..}
nlohmann::json latency_json(const LatencyHistogram& h);

}  // namespace vmsave
