// Little-endian integers for on-disk structs, after mold's ul32/ul64
// (lib/integers.h): byte arrays read and written through memcpy, so a struct
// of them has alignment 1, no padding, and one meaning on every host.

#pragma once

#include <cstring>

#include "lib/common.h"

namespace vmsave {

template <class T>
class LittleEndian {
 public:
  LittleEndian() = default;
  LittleEndian(T v) { *this = v; }

  operator T() const {
    T v = 0;
    for (size_t i = 0; i < sizeof(T); i++) v |= static_cast<T>(static_cast<T>(b_[i]) << (8 * i));
    return v;
  }
  LittleEndian& operator=(T v) {
    for (size_t i = 0; i < sizeof(T); i++) b_[i] = static_cast<u8>(v >> (8 * i));
    return *this;
  }

 private:
  u8 b_[sizeof(T)] = {};
};

using ul16 = LittleEndian<u16>;
using ul32 = LittleEndian<u32>;
using ul64 = LittleEndian<u64>;

static_assert(sizeof(ul64) == 8 && alignof(ul64) == 1);

}  // namespace vmsave
