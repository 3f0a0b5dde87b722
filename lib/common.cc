// Error formatting and byte counts for humans; the only text lib/ makes.

#include "lib/common.h"

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

}  // namespace vmsave
