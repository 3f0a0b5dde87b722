// Small vocabulary shared by every layer: fixed-width integer names, the
// exit statuses the CLI documents, and the error value that travels up from
// io/, format/ and core/ to cli/, which alone turns it into one line of text.
//
// Errors are values (ninja's `bool + std::string* err`, liburing's -errno),
// never exceptions and never printing: library code has no terminal.

#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace vmsave {

using i8 = int8_t;
using i16 = int16_t;
using i32 = int32_t;
using i64 = int64_t;
using u8 = uint8_t;
using u16 = uint16_t;
using u32 = uint32_t;
using u64 = uint64_t;

constexpr i64 kKiB = 1024;
constexpr i64 kMiB = 1024 * kKiB;
constexpr i64 kGiB = 1024 * kMiB;

// The exit statuses documented in man/vmsave.1. One enum, so that a status
// cannot be invented at a call site.
enum class Exit : int {
  kOk = 0,
  kFailure = 1,      // the operation failed; nothing was lost
  kUsage = 2,        // the command line is wrong
  kDamaged = 3,      // the image is damaged, incomplete or too new
  kInterrupted = 130 // SIGINT/SIGTERM; cleaned up
};

// What went wrong, with enough context for one line naming cause and fix:
//   vmsave: error: <what> (<path>) at offset <offset>: <detail>; <hint>
struct Error {
  std::string what;
  std::string path;
  std::string detail;
  std::string hint;
  i64 offset = -1;
  Exit status = Exit::kFailure;

  Error& at(i64 off) {
    offset = off;
    return *this;
  }
  Error& fix(std::string h) {
    hint = std::move(h);
    return *this;
  }
  Error& as(Exit s) {
    status = s;
    return *this;
  }
  std::string message() const;
};

// The fix for an errno that has one whatever the call failed (a full disk,
// a failing device, a resource limit); "" for the others. A call site that
// knows better sets its own with .fix().
const char* errno_hint(int err);

// An error from a failed system call: which call (in `what`), which file,
// and the errno text. `err` is a positive errno value.
inline Error sys_error(std::string what, std::string path, int err) {
  Error e{std::move(what), std::move(path), std::strerror(err)};
  e.hint = errno_hint(err);
  return e;
}

inline Error damaged(std::string path, std::string detail, i64 offset = -1) {
  Error e{"image damaged", std::move(path), std::move(detail)};
  e.offset = offset;
  e.status = Exit::kDamaged;
  return e;
}

// Success or an Error. [[nodiscard]] so that a dropped failure is a warning.
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Error e) : err_(new Error(std::move(e))) {}
  Status(Status&&) = default;
  Status& operator=(Status&&) = default;
  Status(const Status& o) : err_(o.err_ ? new Error(*o.err_) : nullptr) {}
  Status& operator=(const Status& o) {
    if (this != &o) err_.reset(o.err_ ? new Error(*o.err_) : nullptr);
    return *this;
  }

  bool ok() const { return !err_; }
  explicit operator bool() const { return ok(); }
  const Error& error() const { return *err_; }
  Error& error() { return *err_; }

 private:
  std::unique_ptr<Error> err_;
};

// A value or an Error.
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T v) : v_(std::move(v)) {}
  Result(Error e) : v_(std::move(e)) {}
  Result(Status s) : v_(std::move(s.error())) {}

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& operator*() { return std::get<0>(v_); }
  const T& operator*() const { return std::get<0>(v_); }
  T* operator->() { return &std::get<0>(v_); }
  const T* operator->() const { return &std::get<0>(v_); }
  const Error& error() const { return std::get<1>(v_); }
  Error& error() { return std::get<1>(v_); }
  Status status() const { return ok() ? Status() : Status(error()); }

 private:
  std::variant<T, Error> v_;
};

// Propagate a failed Status or Result from the current function.
#define VMSAVE_TRY(expr)                           \
  do {                                             \
    auto _st = (expr);                             \
    if (!_st.ok()) return std::move(_st.error());  \
  } while (0)

inline i64 align_up(i64 v, i64 a) { return (v + a - 1) / a * a; }
inline i64 align_down(i64 v, i64 a) { return v / a * a; }
inline bool is_pow2(u64 v) { return v && !(v & (v - 1)); }

// "1.5 GiB", "300 KiB": for messages and summaries.
std::string human_bytes(double bytes);

// `s` for a terminal: control characters (C0, DEL, C1 in UTF-8) and bytes
// that are not UTF-8 shown as \xNN, never obeyed. Text from an image or from QEMU (ids, paths,
// QEMU's errors and log) could otherwise retitle or clear the terminal, or forge lines of vmsave's
// own.
std::string visible(std::string_view s);

// EFBIG for a file of `size` bytes at `path`: past this process's file size
// limit (ulimit -f, RLIMIT_FSIZE), or else more than the filesystem takes.
Error file_too_large(const std::string& what, const std::string& path, i64 size);

}  // namespace vmsave
