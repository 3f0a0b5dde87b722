// Out-of-line parts of the resource owners in io/fd.h.

#include "io/fd.h"

#include <cstdlib>
#include <cstring>

namespace vmsave {

Result<Mapping> Mapping::map(int fd, i64 offset, i64 len, int prot, int flags,
                             const std::string& path) {
  if (len == 0) return Mapping();
  void* p = ::mmap(nullptr, len, prot, flags, fd, offset);
  if (p == MAP_FAILED) return sys_error("mmap", path, errno);
  return Mapping(p, len);
}

AlignedBuffer::AlignedBuffer(size_t size) : size_(size) {
  if (size == 0) return;
  void* p = nullptr;
  if (posix_memalign(&p, kDirectAlign, align_up(size, kDirectAlign)) != 0) std::abort();
  std::memset(p, 0, size);
  p_ = static_cast<u8*>(p);
}

AlignedBuffer::~AlignedBuffer() { std::free(p_); }

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& o) noexcept {
  if (this != &o) {
    std::free(p_);
    p_ = std::exchange(o.p_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

}  // namespace vmsave
