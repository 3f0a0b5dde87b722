// libFuzzer target: the image reader (header, section table, block records,
// bitmaps, chunk tables, metadata JSON, vmstate) on arbitrary bytes.
//
// The input is an image with the zero gap between the header and the first
// RAM region cut out: the file written for ImageReader is
//   input[0, 4096) ++ zeros up to 2 MiB ++ input[4096, end)
// so that a small image (a 16 KiB RAM file) is a ~40 KiB input instead of a
// 2 MiB one, and every mutation lands on bytes the reader interprets.
//
// Checksums stop almost every random mutation at the first check, so half of
// the inputs (the low bit of the last byte set) get their checksums fixed up
// before the file is written: block records, bitmaps, chunk tables,
// metadata, vmstate, the section table and the header. That lets the fuzzer
// reach the bounds and consistency checks behind the checksums.

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "core/image_io.h"
#include "core/reporter.h"
#include "core/vmsave.h"
#include "format/image.h"

using namespace vmsave;

namespace {

constexpr size_t kGap = kRegionAlign;  // where input[4096] lands in the file

std::string g_dir, g_path;

void fix_checksums(std::vector<u8>& f) {
  if (f.size() < sizeof(DiskHeader)) return;
  DiskHeader h;
  std::memcpy(&h, f.data(), sizeof(h));
  u64 toff = h.table_offset, tsize = h.table_size;
  if (toff <= f.size() && tsize <= f.size() - toff && tsize <= u64(kMaxTableSize)) {
    u8* t = f.data() + toff;
    size_t pos = 0;
    while (tsize - pos >= sizeof(SectionEntry)) {
      SectionEntry s;
      std::memcpy(&s, t + pos, sizeof(s));
      size_t entry = pos;
      pos += sizeof(s);
      if (u32(s.kind) == u32(SectionKind::kBlock)) {
        if (tsize - pos < sizeof(BlockRecord)) break;
        s.checksum = checksum({t + pos, sizeof(BlockRecord)});
        pos += sizeof(BlockRecord);
      } else if (u32(s.kind) != u32(SectionKind::kRamRegion)) {
        u64 o = s.offset, l = s.length;
        if (o <= f.size() && l <= f.size() - o) s.checksum = checksum({f.data() + o, l});
      }
      std::memcpy(t + entry, &s, sizeof(s));
    }
    h.table_checksum = checksum({t, tsize});
  }
  const u8* p = reinterpret_cast<const u8*>(&h);
  h.checksum = checksum({p, offsetof(DiskHeader, checksum)});
  std::memcpy(f.data(), &h, sizeof(h));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* base = getenv("VMSAVE_FUZZ_DIR");
  std::string tmpl = std::string(base ? base : "/dev/shm") + "/vmsave-fuzz-XXXXXX";
  if (!mkdtemp(tmpl.data())) abort();
  g_dir = tmpl;
  g_path = g_dir + "/image";
  // The directory goes when the fuzzer exits, also after a crash report.
  atexit([] {
    unlink(g_path.c_str());
    rmdir(g_dir.c_str());
  });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const u8* data, size_t size) {
  if (size < 1) return 0;
  bool fix = data[size - 1] & 1;
  std::vector<u8> file;
  if (size <= kHeaderSize) {
    file.assign(data, data + size);
  } else {
    file.assign(kGap + (size - kHeaderSize), 0);
    std::memcpy(file.data(), data, kHeaderSize);
    std::memcpy(file.data() + kGap, data + kHeaderSize, size - kHeaderSize);
  }
  if (fix) fix_checksums(file);

  int fd = ::open(g_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) abort();
  // Sparse: the gap stays a hole, as in a real image.
  size_t head = std::min<size_t>(file.size(), kHeaderSize);
  if (::pwrite(fd, file.data(), head, 0) != ssize_t(head)) abort();
  if (file.size() > kGap &&
      ::pwrite(fd, file.data() + kGap, file.size() - kGap, kGap) != ssize_t(file.size() - kGap))
    abort();
  // Checksum fix-ups may have written into the gap (a table placed there).
  // (memcmp, not a loop: the harness is instrumented too, byte loops crawl.)
  static const std::vector<u8> zeros(kGap);
  if (fix && file.size() > size_t(kHeaderSize)) {
    size_t n = std::min(file.size(), kGap) - kHeaderSize;
    if (std::memcmp(file.data() + kHeaderSize, zeros.data(), n) != 0 &&
        ::pwrite(fd, file.data() + kHeaderSize, n, kHeaderSize) != ssize_t(n))
      abort();
  }
  if (::ftruncate(fd, file.size()) < 0) abort();
  ::close(fd);

  // info: header, table, metadata JSON.
  auto i = info(g_path);
  (void)i;
  // verify: everything else, one worker (the fuzzer runs many inputs a second).
  EngineConfig cfg;
  cfg.jobs = 1;
  cfg.queue_depth = 4;
  NullReporter rep;
  auto v = verify(g_path, cfg, rep);
  (void)v;
  // read_ram into a buffer the size of each block: the restore path.
  auto r = ImageReader::open(g_path, nullptr);
  if (r.ok()) {
    for (size_t b = 0; b < (*r)->layout().blocks.size(); b++) {
      const BlockLayout& bl = (*r)->layout().blocks[b];
      if (bl.size > i64(64) * kMiB) continue;  // bounded by the file anyway
      AlignedBuffer dest(align_up(bl.size, bl.page_size));
      Status st = (*r)->read_ram(b, RamDest{-1, 0, dest.data()}, cfg, nullptr, nullptr);
      (void)st;
    }
  }
  return 0;
}
