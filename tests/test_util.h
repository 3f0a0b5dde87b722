// Helpers shared by the test files: reported skips, temporary directories
// that are removed even when a case fails, and running the real binary.

#pragma once

#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

#include "lib/common.h"

namespace vmsave::test {

// Ends this test case's process with status 77, which CTest reports as a
// skip (SKIP_RETURN_CODE). Call before the case owns any resource.
[[noreturn]] void skip(const std::string& why);

// A fresh directory under `parent` (default: $TMPDIR or /tmp, which here is
// on the project's disk, so O_DIRECT is real), removed
// recursively on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& parent = "");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Can a filesystem of `type` be mounted here (root, not in a locked-down
// container)? Probed in its own directory before the case owns anything,
// because skip() exits without running destructors.
void require_mount(const char* type);

// A filesystem mounted on a fresh directory, unmounted (then removed) on
// destruction, whatever the case did.
class TempMount {
 public:
  TempMount(const char* type, const std::string& opts);
  ~TempMount();
  TempMount(const TempMount&) = delete;
  bool ok() const { return ok_; }
  const std::string& error() const { return err_; }
  const std::string& path() const { return dir_.path(); }
  std::string operator/(const std::string& n) const { return dir_ / n; }

 private:
  TempDir dir_;
  bool ok_ = false;
  std::string err_;
};

struct RunResult {
  int status = -1;  // exit status, or 128+signal
  std::string out;
  std::string err;
  long max_rss_kib = 0;  // the process's peak resident memory
};

// A run's status and output, for failure messages.
inline std::string show(const RunResult& r) {
  return "status " + std::to_string(r.status) + "\nstdout: " + r.out + "\nstderr: " + r.err;
}
#define REQUIRE_RUN(r, expected) REQUIRE_MESSAGE((r).status == (expected), ::vmsave::test::show(r))
#define CHECK_RUN(r, expected) CHECK_MESSAGE((r).status == (expected), ::vmsave::test::show(r))

inline bool contains(const std::string& s, const std::string& needle) {
  return s.find(needle) != std::string::npos;
}

// Runs build/vmsave with `args`, capturing stdout and stderr, with a timeout.
RunResult run_vmsave(const std::vector<std::string>& args, double timeout_s = 120,
                     const std::vector<std::string>& env = {});

// Seconds on the monotonic clock.
double now_s();

// Runs any program the same way.
RunResult run_program(const std::vector<std::string>& argv, double timeout_s = 120,
                      const std::vector<std::string>& env = {});

// Writes `len` bytes of deterministic content to `path`: kind is "random",
// "zero", "text" or "mixed" (25% zero pages, 25% text, 50% random).
void write_pattern_file(const std::string& path, i64 len, const std::string& kind, u64 seed = 1);

// Appends {"figure": NAME, "value": VALUE} as one JSON line to the file
// named by $VMSAVE_FIGURES, when set: scripts/reliability-report collects
// what the tests counted and measured into docs/reliability.md.
void record_figure(const std::string& name, double value);

// Writes an image of the 1 MiB memory file `ram` (one block "ram", 4 KiB
// pages) at `image` through ImageWriter, compressed with `codec` unless it
// is empty, with `vmstate` as its device state and `meta` as its metadata:
// every checksum valid, whatever the metadata claims.
void write_image_of(const std::string& image, const std::string& ram, const std::string& codec,
                    const std::string& vmstate, const nlohmann::json& meta);

bool files_equal(const std::string& a, const std::string& b, std::string* why = nullptr);
i64 file_size(const std::string& path);
std::string read_file(const std::string& path);

}  // namespace vmsave::test
