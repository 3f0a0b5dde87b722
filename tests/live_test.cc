// In-process tests of the live-save engine (ImageWriter::live_pass): the
// test itself plays the guest, changing memory between passes, so what a
// catch-up pass must rewrite is known exactly. The image is then read back
// with ImageReader and compared with memory as it was at the last pass.

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/image_io.h"
#include "tests/test_util.h"

using namespace vmsave;
using test::TempDir;

namespace {

// A RAM file on tmpfs mapped writable: the "guest" writes through `mem`.
struct RamFile {
  std::string path;
  int fd = -1;
  u8* mem = nullptr;
  i64 size = 0;
  RamFile(const std::string& p, i64 n) : path(p), size(n) {
    fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    REQUIRE(fd >= 0);
    REQUIRE(ftruncate(fd, n) == 0);
    void* m = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    REQUIRE(m != MAP_FAILED);
    mem = static_cast<u8*>(m);
  }
  ~RamFile() {
    if (mem) munmap(mem, size);
    if (fd >= 0) ::close(fd);
    ::unlink(path.c_str());
  }
};

// The block read back from the image (into an aligned buffer: O_DIRECT).
AlignedBuffer read_back(const std::string& image, size_t block, i64 size) {
  auto r = ImageReader::open(image, nullptr);
  REQUIRE_MESSAGE(r.ok(), r.error().message());
  EngineConfig cfg{2, 8};
  Status v;
  VerifyReport report;
  v = (*r)->verify(cfg, nullptr, &report);
  CHECK_MESSAGE(v.ok(), v.error().message());
  AlignedBuffer out(size);
  Status st = (*r)->read_ram(block, RamDest{-1, 0, out.data()}, cfg, nullptr, nullptr);
  REQUIRE_MESSAGE(st.ok(), st.error().message());
  return out;
}

}  // namespace

TEST_CASE("live: catch-up passes rewrite exactly the changed pieces, and the image equals memory") {
  TempDir shm("/dev/shm");
  TempDir dir;
  const i64 size = 8 * kMiB;
  RamFile ram(shm / "ram0", size);
  std::mt19937_64 rng(7);
  // Random data in the first 6 MiB, the rest a hole.
  for (i64 i = 0; i < 6 * kMiB; i += 8) {
    u64 v = rng();
    std::memcpy(ram.mem + i, &v, 8);
  }
  BlockLayout b;
  b.id = "ram0";
  b.size = size;
  b.page_size = 4096;
  const std::string image = dir / "vm.vmsave";
  auto w = ImageWriter::create(image, false, {b}, kDefaultChunkSize, nullptr);
  REQUIRE_MESSAGE(w.ok(), w.error().message());
  std::vector<RamSource> src = {RamSource{"ram0", ram.path, ram.fd, 0, size, 4096}};
  EngineConfig cfg{2, 8};

  ImageWriter::PassStats ps;
  REQUIRE((*w)->live_pass(src, cfg, nullptr, &ps).ok());
  CHECK(ps.bytes_written == 6 * kMiB);

  // Between passes the "guest": one byte in piece 3; a byte changed and
  // changed back in piece 10 (no change: nothing to rewrite); a whole page
  // zeroed in piece 20; data in the former hole (piece 100); piece 40
  // handed back to the host (a hole punched in the RAM file, as a balloon's
  // free page reporting does): written as zeros from the shared zero block,
  // which must be aligned for O_DIRECT like any other buffer.
  REQUIRE(fallocate(ram.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 40 * 65536, 65536) == 0);
  ram.mem[3 * 65536 + 17] ^= 0x5a;
  ram.mem[10 * 65536 + 5] ^= 0x01;
  ram.mem[10 * 65536 + 5] ^= 0x01;
  std::memset(ram.mem + 20 * 65536 + 4096, 0, 4096);
  std::memset(ram.mem + 100 * 65536 + 8192, 0x77, 100);
  Status pass = (*w)->live_pass(src, cfg, nullptr, &ps);
  REQUIRE_MESSAGE(pass.ok(), pass.error().message());
  CHECK(ps.pieces_rewritten == 4);
  // Pieces 3, 20 and 40 whole (16 pages each, zeroed pages written as zeros
  // over their old data), piece 100's one data page.
  CHECK(ps.bytes_written == 3 * 65536 + 4096);

  // Nothing changed: the stopped pass writes nothing.
  REQUIRE((*w)->live_pass(src, cfg, nullptr, &ps).ok());
  CHECK(ps.pieces_rewritten == 0);
  CHECK(ps.bytes_written == 0);

  RamStats stats;
  REQUIRE((*w)->finish_live(&stats).ok());
  // 6 MiB of data pages, one zeroed, one new, 16 punched.
  CHECK(stats.data_bytes == 6 * kMiB - 16 * 4096);
  Status st = (*w)->commit(nlohmann::json{{"mode", "raw"}});
  REQUIRE_MESSAGE(st.ok(), st.error().message());

  AlignedBuffer back = read_back(image, 0, size);
  CHECK(std::memcmp(back.data(), ram.mem, size) == 0);
}

TEST_CASE("live: each pass rewrites the pieces changed since the one before, and only those") {
  // The hash is of the copy that was written, so a change during or after
  // the pass (even one that is later undone, like a lock taken and released)
  // can never leave the image behind memory unnoticed.
  TempDir shm("/dev/shm");
  TempDir dir;
  const i64 size = 2 * kMiB;
  RamFile ram(shm / "ram0", size);
  std::memset(ram.mem, 0x11, size);
  BlockLayout b;
  b.id = "ram0";
  b.size = size;
  b.page_size = 4096;
  const std::string image = dir / "vm.vmsave";
  auto w = ImageWriter::create(image, false, {b}, kDefaultChunkSize, nullptr);
  REQUIRE(w.ok());
  std::vector<RamSource> src = {RamSource{"ram0", ram.path, ram.fd, 0, size, 4096}};
  EngineConfig cfg{1, 4};
  ImageWriter::PassStats ps;
  REQUIRE((*w)->live_pass(src, cfg, nullptr, &ps).ok());
  for (int round = 0; round < 3; round++) {
    for (i64 p = round; p < size / 65536; p += 3) ram.mem[p * 65536 + round] = u8(0x20 + round);
    REQUIRE((*w)->live_pass(src, cfg, nullptr, &ps).ok());
    CHECK(ps.pieces_rewritten == (size / 65536 - round + 2) / 3);
  }
  RamStats stats;
  REQUIRE((*w)->finish_live(&stats).ok());
  REQUIRE((*w)->commit(nlohmann::json{{"mode", "raw"}}).ok());
  AlignedBuffer back = read_back(image, 0, size);
  CHECK(std::memcmp(back.data(), ram.mem, size) == 0);
}

TEST_CASE("live: chunks smaller than a piece are pieces of their own, so unchanged ones stay") {
  // With --chunk-size 4K the sixteen chunks of a 64 KiB piece shared its
  // hash slot: every pass found them all changed and rewrote all of RAM.
  TempDir shm("/dev/shm");
  TempDir dir;
  const i64 size = 2 * kMiB;
  RamFile ram(shm / "ram0", size);
  std::mt19937_64 rng(11);
  for (i64 i = 0; i < size; i += 8) {
    u64 v = rng();
    std::memcpy(ram.mem + i, &v, 8);
  }
  for (i64 chunk : {i64(4096), i64(16 * kKiB), i64(32 * kKiB)}) {
    CAPTURE(chunk);
    BlockLayout b;
    b.id = "ram0";
    b.size = size;
    b.page_size = 4096;
    const std::string image = dir / "vm.vmsave";
    auto w = ImageWriter::create(image, true, {b}, chunk, nullptr);
    REQUIRE_MESSAGE(w.ok(), w.error().message());
    std::vector<RamSource> src = {RamSource{"ram0", ram.path, ram.fd, 0, size, 4096}};
    EngineConfig cfg{2, 8};
    ImageWriter::PassStats ps;
    REQUIRE((*w)->live_pass(src, cfg, nullptr, &ps).ok());
    CHECK(ps.bytes_written == size);
    REQUIRE((*w)->live_pass(src, cfg, nullptr, &ps).ok());  // nothing changed
    CHECK(ps.pieces_rewritten == 0);
    CHECK(ps.bytes_written == 0);
    ram.mem[5 * 4096 + 3] ^= 0x5a;  // one page: one chunk-sized piece
    REQUIRE((*w)->live_pass(src, cfg, nullptr, &ps).ok());
    CHECK(ps.pieces_rewritten == 1);
    CHECK(ps.bytes_written == chunk);
    RamStats stats;
    REQUIRE((*w)->finish_live(&stats).ok());
    REQUIRE((*w)->commit(nlohmann::json{{"mode", "raw"}}).ok());
    AlignedBuffer back = read_back(image, 0, size);
    CHECK(std::memcmp(back.data(), ram.mem, size) == 0);
  }
}

TEST_CASE("live: a huge page goes in 64 KiB pieces, so one changed byte rewrites 64 KiB") {
  // Pieces were a page at least: a guest on 1 GiB pages had vmsave take
  // 32 GiB of buffers per worker (killed by the OOM killer at 20 GiB), and
  // a changed byte rewrote its whole page.
  TempDir shm("/dev/shm");
  TempDir dir;
  std::vector<BlockLayout> blocks(2);
  blocks[0].id = "ram0";
  blocks[0].size = 8 * kMiB;
  blocks[0].page_size = 2 * kMiB;
  blocks[1].id = "ram1";
  blocks[1].size = kGiB;
  blocks[1].page_size = kGiB;
  RamFile ram0(shm / "ram0", blocks[0].size), ram1(shm / "ram1", blocks[1].size);
  std::mt19937_64 rng(5);
  auto fill = [&](u8* p, i64 n) {
    for (i64 i = 0; i < n; i += 8) {
      u64 v = rng();
      std::memcpy(p + i, &v, 8);
    }
  };
  fill(ram0.mem, 3 * kMiB);  // page 0 whole, page 1's first half
  fill(ram1.mem + 512 * kMiB, kMiB);
  const std::string image = dir / "vm.vmsave";
  auto w = ImageWriter::create(image, false, blocks, kDefaultChunkSize, nullptr);
  REQUIRE_MESSAGE(w.ok(), w.error().message());
  std::vector<RamSource> src = {
      RamSource{"ram0", ram0.path, ram0.fd, 0, blocks[0].size, blocks[0].page_size},
      RamSource{"ram1", ram1.path, ram1.fd, 0, blocks[1].size, blocks[1].page_size}};
  EngineConfig cfg{2, 8};
  ImageWriter::PassStats ps;
  REQUIRE((*w)->live_pass(src, cfg, nullptr, &ps).ok());
  CHECK(ps.bytes_written == 4 * kMiB);

  ram1.mem[3 * kMiB + 100] = 1;                  // a new piece in ram1's page
  std::memset(ram1.mem + 512 * kMiB, 0, 65536);  // a piece zeroed over data
  std::memset(ram0.mem + 2 * kMiB, 0, kMiB);     // ram0's page 1 all zeros now
  Status pass = (*w)->live_pass(src, cfg, nullptr, &ps);
  REQUIRE_MESSAGE(pass.ok(), pass.error().message());
  CHECK(ps.pieces_rewritten == 2 + 16);
  CHECK(ps.bytes_written == 2 * 65536 + kMiB);

  RamStats stats;
  REQUIRE((*w)->finish_live(&stats).ok());
  // ram0's page 0 and ram1's one page.
  CHECK(stats.data_bytes == 2 * kMiB + kGiB);
  REQUIRE((*w)->commit(nlohmann::json{{"mode", "raw"}}).ok());
  AlignedBuffer back0 = read_back(image, 0, blocks[0].size);
  CHECK(std::memcmp(back0.data(), ram0.mem, blocks[0].size) == 0);
  AlignedBuffer back1 = read_back(image, 1, blocks[1].size);
  CHECK(std::memcmp(back1.data(), ram1.mem, blocks[1].size) == 0);
}
