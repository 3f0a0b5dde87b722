// Error formatting and byte counts for humans; the only text lib/ makes.

#include "lib/common.h"

#include <sys/resource.h>

#include <cerrno>
#include <fmt/core.h>

namespace vmsave {

std::string Error::message() const {
  std::string s = what;
  if (!path.empty()) s += fmt::format(" ({})", path);
  if (offset >= 0) s += fmt::format(" at offset {}", offset);
  if (!detail.empty()) s += ": " + detail;
  if (!hint.empty()) s += "; " + hint;
  return s;
}

const char* errno_hint(int err) {
  switch (err) {
    case ENOSPC:
    case EDQUOT:
      return "free space on that filesystem (or on the device under it), or choose another "
             "filesystem";
    case EIO:
      return "the device failed (dmesg says more): use another disk, and verify what is on "
             "this one";
    case EROFS:
      return "that filesystem is read-only (remounted so after errors? dmesg says): use another";
    case ENOTCONN:
    case ECONNABORTED:
      return "the filesystem's server went away (a FUSE daemon, sshfs, NFS): mount it again";
    case EMFILE:
    case ENFILE:
      return "raise the open-file limit (ulimit -n) or use fewer --jobs";
    case ENOMEM:
      return "free memory or raise the limit (ulimit -v, a memory cgroup), or use fewer --jobs";
    default:
      return "";
  }
}

namespace {

// Bytes in the well-formed UTF-8 sequence at s[i] (Unicode's table 3-7: no
// overlong forms, surrogates or code points past U+10FFFF), 0 if there is
// none.
size_t utf8_length(std::string_view s, size_t i) {
  const unsigned char c = s[i];
  size_t n = c >= 0xc2 && c <= 0xdf   ? 2
             : c >= 0xe0 && c <= 0xef ? 3
             : c >= 0xf0 && c <= 0xf4 ? 4
                                      : 0;
  if (n == 0 || i + n > s.size()) return 0;
  const unsigned char c1 = s[i + 1];
  const unsigned char lo = c == 0xe0 ? 0xa0 : c == 0xf0 ? 0x90 : 0x80;
  const unsigned char hi = c == 0xed ? 0x9f : c == 0xf4 ? 0x8f : 0xbf;
  if (c1 < lo || c1 > hi) return 0;
  for (size_t k = 2; k < n; k++)
    if ((static_cast<unsigned char>(s[i + k]) & 0xc0) != 0x80) return 0;
  return n;
}

}  // namespace

std::string visible(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const unsigned char ch = s[i];
    if (ch >= 0x20 && ch < 0x7f) {
      out += static_cast<char>(ch);
      i++;
      continue;
    }
    // C0 and C1 controls (U+0080-U+009F, which terminals obey too) and
    // bytes that are not UTF-8 (a terminal shows them as it likes).
    const size_t n = ch < 0x80 ? 0 : utf8_length(s, i);
    const bool c1 = n == 2 && ch == 0xc2 && static_cast<unsigned char>(s[i + 1]) <= 0x9f;
    if (n == 0 || c1) {
      for (size_t k = 0; k < (c1 ? 2 : 1); k++)
        out += fmt::format("\\x{:02x}", static_cast<unsigned char>(s[i + k]));
      i += c1 ? 2 : 1;
    } else {
      out.append(s.substr(i, n));
      i += n;
    }
  }
  return out;
}

std::string human_bytes(double bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int i = 0;
  while (bytes >= 1024 && i < 4) {
    bytes /= 1024;
    i++;
  }
  if (i == 0) return fmt::format("{:.0f} B", bytes);
  return fmt::format("{:.1f} {}", bytes, units[i]);
}

Error file_too_large(const std::string& what, const std::string& path, i64 size) {
  struct rlimit lim;
  if (getrlimit(RLIMIT_FSIZE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY &&
      static_cast<u64>(size) > lim.rlim_cur)
    return Error{what, path,
                 fmt::format("it would be {} bytes, more than this process may write to a file "
                             "(ulimit -f: {} bytes)",
                             size, u64(lim.rlim_cur))}
        .fix("raise the file size limit (ulimit -f unlimited)");
  return Error{
      what, path,
      fmt::format("it would be {} bytes, more than its filesystem takes in one file", size)}
      .fix("put it on a filesystem that takes larger files (ext4, xfs)");
}

}  // namespace vmsave
