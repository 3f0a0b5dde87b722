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

std::string visible(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); i++) {
    const unsigned char ch = s[i];
    const bool c1 = ch == 0xc2 && i + 1 < s.size() &&
                    static_cast<unsigned char>(s[i + 1]) >= 0x80 &&
                    static_cast<unsigned char>(s[i + 1]) <= 0x9f;  // U+0080-U+009F
    if (ch < 0x20 || ch == 0x7f || c1) {
      out += fmt::format("\\x{:02x}", ch);
      if (c1) out += fmt::format("\\x{:02x}", static_cast<unsigned char>(s[++i]));
    } else {
      out += static_cast<char>(ch);
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
