// XXH3-64's update loop and one-shot hash compiled for AVX512 (CMakeLists.txt
// sets the compiler flag for this file only); hash.cc calls them only when
// the CPU has AVX512. Inlined from xxhash.h, so nothing here clashes with the
// library's symbols.

#if defined(__x86_64__)

#define XXH_STATIC_LINKING_ONLY
#define XXH_INLINE_ALL
#define XXH_VECTOR XXH_AVX512
#include <xxhash.h>

#include <cstddef>
#include <cstdint>

// Nothing with inline functions of its own is included here: a copy of one
// compiled for this unit could be the one the linker keeps for every caller.

namespace vmsave::detail {

std::uint64_t xxh3_avx512(const void* data, size_t len) { return XXH3_64bits(data, len); }

// `st` is the library's XXH3_state_t: the same struct under another name here.
void xxh3_update_avx512(void* st, const void* data, size_t len) {
  XXH3_64bits_update(static_cast<XXH3_state_t*>(st), data, len);
}

}  // namespace vmsave::detail

#endif
