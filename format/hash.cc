// XXH3-64 with run-time choice of the vector unit (see hash.h). The library
// provides reset and digest (they touch only the state); update and the
// one-shot hash come from hash_x86.cc, compiled once per unit.

#include "format/hash.h"

#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t
#include <xxhash.h>

#include <algorithm>
#include <cstdlib>
#include <new>
#include <string_view>
#include <vector>

namespace vmsave {

namespace detail {
#if defined(__x86_64__)
std::uint64_t xxh3_avx2(const void* data, size_t len);
void xxh3_update_avx2(void* st, const void* data, size_t len);
std::uint64_t xxh3_avx512(const void* data, size_t len);
void xxh3_update_avx512(void* st, const void* data, size_t len);
#endif
}  // namespace detail

namespace {

u64 xxh3_lib(const void* data, size_t len) { return XXH3_64bits(data, len); }
void update_lib(void* st, const void* data, size_t len) {
  XXH3_64bits_update(static_cast<XXH3_state_t*>(st), data, len);
}

struct Impl {
  u64 (*hash)(const void*, size_t);
  void (*update)(void*, const void*, size_t);
  const char* name;
};

// The units this CPU has, widest first.
std::vector<Impl> units() {
  std::vector<Impl> out;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f"))
    out.push_back({detail::xxh3_avx512, detail::xxh3_update_avx512, "avx512"});
  if (__builtin_cpu_supports("avx2")) out.push_back({detail::xxh3_avx2, detail::xxh3_update_avx2, "avx2"});
#endif
  out.push_back({xxh3_lib, update_lib, "sse2"});
  return out;
}

Impl& impl() {
  static Impl i = units().front();
  return i;
}

XXH3_state_t* as_state(void* p) { return static_cast<XXH3_state_t*>(p); }

}  // namespace

u64 xxh3(const void* data, size_t len) { return impl().hash(data, len); }

const char* hash_unit() { return impl().name; }

bool set_hash_unit(std::string_view name) {
  for (const Impl& u : units())
    if (name == u.name) {
      impl() = u;
      return true;
    }
  return false;
}

Hasher::Hasher() : state_(::operator new(sizeof(XXH3_state_t), std::align_val_t(64))) { reset(); }

Hasher::~Hasher() { ::operator delete(state_, std::align_val_t(64)); }

void Hasher::reset() { XXH3_64bits_reset(as_state(state_)); }

void Hasher::update(const void* data, size_t len) { impl().update(state_, data, len); }

void Hasher::update_zeros(i64 len) {
  static const std::vector<u8> zeros(1 * kMiB);
  for (; len > 0; len -= static_cast<i64>(zeros.size()))
    update(zeros.data(), static_cast<size_t>(std::min<i64>(len, zeros.size())));
}

u64 Hasher::digest() const { return XXH3_64bits_digest(as_state(state_)); }

}  // namespace vmsave
