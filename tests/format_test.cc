// Tests for format/: the header and section table encoders and decoders,
// and the region planner. Pure functions on byte vectors, no files: the
// decoders are the one place that checks every number read from disk, so
// every field they refuse is refused here on purpose, one at a time, with
// all other fields (and checksums) valid.

#include "format/image.h"

#include <doctest/doctest.h>

#include <cstring>
#include <functional>
#include <random>

#include <fmt/core.h>
#include <string>
#include <vector>

using namespace vmsave;

namespace {

const std::string kPath = "/images/test.vmsave";

// A consistent layout of `n` 4 KiB-page blocks (sizes chosen so none is a
// chunk or page multiple), with its tail placed the way ImageWriter::commit
// places it: bitmap and chunk table per block, metadata, section table.
ImageLayout make_layout(int n = 2, bool compressed = false, i64 block_size = 0,
                        i64 chunk_size = kDefaultChunkSize) {
  ImageLayout img;
  if (compressed) {
    img.flags = kFlagCompressed;
    img.vmstate_codec = Codec::kZstd;
  }
  for (int i = 0; i < n; i++) {
    BlockLayout b;
    b.id = "ram" + std::to_string(i);
    b.size = block_size ? block_size : 3 * kMiB + 8 * kKiB + 100 * i;
    b.page_size = 4096;
    img.blocks.push_back(b);
  }
  img.vmstate.offset = plan_regions(img.blocks, chunk_size);
  img.vmstate.length = 10000;
  img.vmstate.checksum = 42;
  i64 off = img.vmstate.offset + align_up(img.vmstate.length, kSectionAlign);
  auto place = [&](Extent& e, i64 len) {
    off = align_up(off, kSectionAlign);
    e.offset = off;
    e.length = len;
    e.checksum = 0x1234 + len;
    off += len;
  };
  for (auto& b : img.blocks) {
    b.data_pages = b.pages() / 2;
    place(b.bitmap, (b.pages() + 7) / 8);
    place(b.sums, b.chunks() * 8);
    if (compressed) place(b.chunk_table, b.chunks() * i64(sizeof(ChunkRecord)));
  }
  place(img.metadata, 300);
  std::vector<u8> table = encode_section_table(img);
  place(img.table, static_cast<i64>(table.size()));
  img.table.checksum = checksum(table);
  img.file_size = align_up(off, kSectionAlign);
  img.created_ns = 1700000000123456789;
  for (int i = 0; i < 16; i++) img.uuid[i] = static_cast<u8>(0xa0 + i);
  return img;
}

// Decodes `table` against the header fields of `hdr`, as ImageReader does.
Status decode_table(const std::vector<u8>& table, const ImageLayout& hdr,
                    ImageLayout* out = nullptr, bool fix_checksum = true) {
  ImageLayout img;
  img.major = hdr.major;
  img.minor = hdr.minor;
  img.flags = hdr.flags;
  img.file_size = hdr.file_size;
  img.table = {hdr.table.offset, static_cast<i64>(table.size()),
               fix_checksum ? checksum(table) : hdr.table.checksum};
  Status st = decode_section_table(table, img, kPath);
  if (out) *out = img;
  return st;
}

// Where each entry of an encoded table starts.
struct EntryPos {
  size_t pos;
  SectionKind kind;
  u32 block;
};
std::vector<EntryPos> entries(const std::vector<u8>& table) {
  std::vector<EntryPos> out;
  for (size_t pos = 0; pos < table.size();) {
    SectionEntry s;
    std::memcpy(&s, table.data() + pos, sizeof(s));
    out.push_back({pos, static_cast<SectionKind>(u32(s.kind)), s.block});
    pos += sizeof(s) + (u32(s.kind) == u32(SectionKind::kBlock) ? sizeof(BlockRecord) : 0);
  }
  return out;
}

size_t find_entry(const std::vector<u8>& table, SectionKind kind, u32 block = kNoBlock) {
  for (auto& e : entries(table))
    if (e.kind == kind && (block == kNoBlock || e.block == block)) return e.pos;
  FAIL("no such entry");
  return 0;
}

SectionEntry get_entry(const std::vector<u8>& t, size_t pos) {
  SectionEntry s;
  std::memcpy(&s, t.data() + pos, sizeof(s));
  return s;
}
void put_entry(std::vector<u8>& t, size_t pos, const SectionEntry& s) {
  std::memcpy(t.data() + pos, &s, sizeof(s));
}

// Edits the BlockRecord after the kBlock entry at `pos` and refreshes the
// entry's record checksum, so only the edit itself can be refused.
void edit_record(std::vector<u8>& t, size_t pos, const std::function<void(BlockRecord&)>& fn) {
  BlockRecord r;
  std::memcpy(&r, t.data() + pos + sizeof(SectionEntry), sizeof(r));
  fn(r);
  std::memcpy(t.data() + pos + sizeof(SectionEntry), &r, sizeof(r));
  SectionEntry s = get_entry(t, pos);
  s.checksum = checksum({t.data() + pos + sizeof(SectionEntry), sizeof(r)});
  put_entry(t, pos, s);
}

DiskHeader header_of(const std::vector<u8>& bytes) {
  DiskHeader h;
  std::memcpy(&h, bytes.data(), sizeof(h));
  return h;
}
std::vector<u8> bytes_of(DiskHeader h, bool fix_checksum = true) {
  const u8* p = reinterpret_cast<const u8*>(&h);
  if (fix_checksum) h.checksum = checksum({p, offsetof(DiskHeader, checksum)});
  return std::vector<u8>(p, p + sizeof(h));
}

void check_damaged(const Status& st, const std::string& needle = "") {
  REQUIRE_FALSE(st.ok());
  CHECK(st.error().status == Exit::kDamaged);
  CHECK(st.error().path == kPath);
  if (!needle.empty())
    CHECK_MESSAGE(st.error().message().find(needle) != std::string::npos, st.error().message());
}

template <class T>
void check_damaged(const Result<T>& r, const std::string& needle = "") {
  check_damaged(r.status(), needle);
}

}  // namespace

// ------------------------------------------------------------------ header

TEST_CASE("format: header encodes and decodes to the same fields") {
  ImageLayout img = make_layout();
  std::vector<u8> h = encode_header(img);
  REQUIRE(h.size() == size_t(kHeaderSize));
  CHECK(std::memcmp(h.data(), kMagic.data(), 8) == 0);
  // Little-endian on disk whatever the host: major 1 is 01 00 00 00.
  CHECK(h[8] == 1);
  CHECK(h[9] == 0);
  CHECK(h[10] == 0);
  CHECK(h[11] == 0);

  auto d = decode_header(h, img.file_size, kPath);
  REQUIRE_MESSAGE(d.ok(), d.error().message());
  CHECK(d->major == kFormatMajor);
  CHECK(d->minor == kFormatMinor);
  CHECK(d->uuid == img.uuid);
  CHECK(d->created_ns == img.created_ns);
  CHECK(d->file_size == img.file_size);
  CHECK(d->table.offset == img.table.offset);
  CHECK(d->table.length == img.table.length);
  CHECK(d->table.checksum == img.table.checksum);

  // A file longer than the header says (e.g. preallocated) is still fine.
  CHECK(decode_header(h, img.file_size + 4096, kPath).ok());
}

TEST_CASE("format: a file too small for a header, or without one, is damaged") {
  ImageLayout img = make_layout();
  std::vector<u8> h = encode_header(img);
  check_damaged(decode_header(std::span<const u8>(h.data(), 100), 100, kPath), "smaller");
  check_damaged(decode_header(h, 4095, kPath), "smaller");
  check_damaged(decode_header(std::span<const u8>(h.data(), 0), 0, kPath));

  std::vector<u8> zeros(kHeaderSize, 0);
  check_damaged(decode_header(zeros, img.file_size, kPath), "did not finish");

  std::vector<u8> bad = h;
  bad[3] ^= 0x20;  // "VMSaVE"
  check_damaged(decode_header(bad, img.file_size, kPath), "bad magic");
}

TEST_CASE("format: a newer major version is 'too new', naming both versions") {
  ImageLayout img = make_layout();
  DiskHeader h = header_of(encode_header(img));
  h.major = 2;
  for (bool fix : {true, false}) {
    // A future format may checksum differently: without a matching
    // checksum it is "damaged, or newer", naming both versions still.
    CAPTURE(fix);
    auto d = decode_header(bytes_of(h, fix), img.file_size, kPath);
    REQUIRE_FALSE(d.ok());
    CHECK(d.error().status == Exit::kDamaged);
    std::string m = d.error().message();
    if (fix)
      CHECK_MESSAGE(m.find("too new") != std::string::npos, m);
    else
      CHECK_MESSAGE(m.find("header checksum mismatch, or an image from a newer vmsave") !=
                        std::string::npos,
                    m);
    CHECK_MESSAGE(m.find("v2") != std::string::npos, m);
    CHECK_MESSAGE(m.find("v1") != std::string::npos, m);
    CHECK_MESSAGE(m.find(kPath) != std::string::npos, m);
  }
  h.major = 0xffffffff;
  CHECK(decode_header(bytes_of(h), img.file_size, kPath).error().what == "image too new");
  // Far past this version with a checksum that does not match: damage, not
  // an image from the future ("format v1482162177").
  h.major = 1482162177;
  {
    auto d = decode_header(bytes_of(h, false), img.file_size, kPath);
    REQUIRE_FALSE(d.ok());
    CHECK(d.error().message() ==
          std::string("image damaged (") + kPath + ") at offset 0: header checksum mismatch");
  }

  h.major = 0;
  check_damaged(decode_header(bytes_of(h), img.file_size, kPath), "version 0");

  // A newer minor version of the same major is readable.
  h.major = 1;
  h.minor = 7;
  auto d = decode_header(bytes_of(h), img.file_size, kPath);
  REQUIRE(d.ok());
  CHECK(d->minor == 7);
}

TEST_CASE("format: a change to any header byte is refused") {
  ImageLayout img = make_layout();
  std::vector<u8> h = encode_header(img);
  for (size_t i = 0; i < h.size(); i++) {
    for (u8 x : {u8(0x01), u8(0x80)}) {
      std::vector<u8> bad = h;
      bad[i] ^= x;
      auto d = decode_header(bad, img.file_size, kPath);
      if (d.ok()) FAIL("byte ", i, " ^ ", int(x), " was accepted");
      CHECK(d.error().status == Exit::kDamaged);
      // Damage, never "too new": the checksum does not match. Only the
      // major version field may add "or from a newer vmsave".
      CHECK(d.error().what != "image too new");
      if (d.error().message().find("newer vmsave") != std::string::npos) {
        CHECK(i >= 8);
        CHECK(i < 12);
      }
    }
  }
}

TEST_CASE("format: an unknown header flag means the image needs a newer vmsave") {
  ImageLayout img = make_layout();
  DiskHeader good = header_of(encode_header(img));
  for (int bit = 0; bit < 64; bit++) {
    if ((u64(1) << bit) & kKnownFlags) continue;
    DiskHeader h = good;
    h.flags = u64(1) << bit;
    CAPTURE(bit);
    check_damaged(decode_header(bytes_of(h), img.file_size, kPath), "needs a newer vmsave");
  }
  // The QEMU migration flag is known: the header alone decodes.
  DiskHeader h = good;
  h.flags = kFlagQemuMigration;
  auto d = decode_header(bytes_of(h), img.file_size, kPath);
  REQUIRE_MESSAGE(d.ok(), d.error().message());
  CHECK(d->has_qemu_section());
  // A flipped flag bit without a fixed checksum is damage, not "too new".
  h = good;
  h.flags = 1;
  check_damaged(decode_header(bytes_of(h, false), img.file_size, kPath), "header checksum");
}

TEST_CASE("format: every reserved header field must be zero") {
  ImageLayout img = make_layout();
  DiskHeader good = header_of(encode_header(img));
  // Feature flags: bits 0 and 1 are known; any other bit is a feature of a
  // newer vmsave, refused as such (status 3), not as damage.
  for (int bit = 1; bit < 64; bit++) {
    if ((u64(1) << bit) & kKnownFlags) continue;
    CAPTURE(bit);
    DiskHeader h = good;
    h.flags = (u64(1) << bit) | (bit % 2 ? kFlagCompressed : 0);
    auto d = decode_header(bytes_of(h), img.file_size, kPath);
    REQUIRE_FALSE(d.ok());
    CHECK(d.error().status == Exit::kDamaged);
    std::string m = d.error().message();
    // Said once, with both versions (it was "image needs a newer vmsave
    // (...): this image needs a newer vmsave (...)", trial O).
    CHECK_MESSAGE(m.find(fmt::format("image needs a newer vmsave ({}): format v1.{} with feature "
                                     "flags 0x",
                                     kPath, kFormatMinor)) != std::string::npos,
                  m);
    CHECK_MESSAGE(m.find(fmt::format("of which this vmsave (v1.{}) knows 0x{:x}", kFormatMinor,
                                     kKnownFlags)) != std::string::npos,
                  m);
    CHECK_MESSAGE(m.find("needs a newer vmsave") == m.rfind("needs a newer vmsave"), m);
    CHECK_MESSAGE(m.find(fmt::format("0x{:x}", u64(h.flags))) != std::string::npos, m);
  }
  for (size_t i = 0; i < sizeof(good.reserved); i++) {
    DiskHeader h = good;
    h.reserved[i] = 0x01;
    auto d = decode_header(bytes_of(h), img.file_size, kPath);
    if (d.ok() || d.error().message().find("reserved") == std::string::npos)
      FAIL("reserved byte ", i, " accepted or misreported");
  }
}

TEST_CASE("format: header sizes and table location are checked against the file") {
  ImageLayout img = make_layout();
  DiskHeader good = header_of(encode_header(img));
  i64 fsize = img.file_size;

  SUBCASE("a truncated file") {
    for (i64 real : {i64(kHeaderSize), fsize / 2, fsize - 4096, fsize - 1})
      check_damaged(decode_header(bytes_of(good), real, kPath), "truncated");
  }
  SUBCASE("implausible file size fields") {
    for (u64 v : {u64(0), u64(4095), u64(fsize - 1), u64(fsize + 1)}) {
      DiskHeader h = good;
      h.file_size = v;
      CAPTURE(v);
      check_damaged(decode_header(bytes_of(h), fsize + 4096, kPath));
    }
    DiskHeader h = good;
    h.file_size = ~u64(0);
    check_damaged(decode_header(bytes_of(h), fsize, kPath), "truncated");
  }
  SUBCASE("section table out of bounds") {
    struct Case {
      u64 off, size;
    };
    u64 toff = good.table_offset, tsz = good.table_size;
    for (Case c : {Case{toff, 0}, Case{toff + 1, tsz}, Case{toff + 8, tsz}, Case{0, tsz},
                   Case{4095, tsz}, Case{u64(fsize), tsz}, Case{u64(fsize) + 4096, tsz},
                   Case{toff, u64(fsize) - toff + 1}, Case{toff, u64(kMaxTableSize) + 1},
                   Case{~u64(0) & ~u64(4095), tsz}, Case{toff, ~u64(0)}}) {
      CAPTURE(c.off);
      CAPTURE(c.size);
      DiskHeader h = good;
      h.table_offset = c.off;
      h.table_size = c.size;
      check_damaged(decode_header(bytes_of(h), fsize, kPath), "section table");
    }
  }
}

// ------------------------------------------------------------ section table

TEST_CASE("format: section table round trip") {
  ImageLayout img = make_layout(3);
  std::vector<u8> table = encode_section_table(img);
  CHECK(table.size() == 3 * (64 + 512 + 3 * 64) + 2 * 64);
  ImageLayout d;
  Status st = decode_table(table, img, &d);
  REQUIRE_MESSAGE(st.ok(), st.error().message());
  REQUIRE(d.blocks.size() == 3);
  for (size_t i = 0; i < 3; i++) {
    const BlockLayout &a = img.blocks[i], &b = d.blocks[i];
    CHECK(a.id == b.id);
    CHECK(a.size == b.size);
    CHECK(a.page_size == b.page_size);
    CHECK(a.chunk_size == b.chunk_size);
    CHECK(a.data_pages == b.data_pages);
    for (auto [x, y] : {std::pair{a.region, b.region}, {a.bitmap, b.bitmap}, {a.sums, b.sums}}) {
      CHECK(x.offset == y.offset);
      CHECK(x.length == y.length);
      CHECK(x.checksum == y.checksum);
    }
  }
  CHECK(d.vmstate.offset == img.vmstate.offset);
  CHECK(d.vmstate.length == img.vmstate.length);
  CHECK(d.vmstate.checksum == img.vmstate.checksum);
  CHECK(d.metadata.offset == img.metadata.offset);
  CHECK(d.metadata.length == img.metadata.length);

  // The table's own checksum is checked first.
  ImageLayout wrong = img;
  wrong.table.checksum ^= 1;
  check_damaged(decode_table(table, wrong, nullptr, false), "section table checksum");
}

TEST_CASE("format: every reserved section and block field must be zero") {
  ImageLayout img = make_layout(1);
  const std::vector<u8> good = encode_section_table(img);
  REQUIRE(decode_table(good, img).ok());
  for (auto& e : entries(good)) {
    CAPTURE(int(e.kind));
    for (int byte = 0; byte < 8; byte++) {
      std::vector<u8> t = good;
      SectionEntry s = get_entry(t, e.pos);
      s.flags = u64(1) << (8 * byte);
      put_entry(t, e.pos, s);
      check_damaged(decode_table(t, img), "reserved");
    }
    for (size_t i = 0; i < sizeof(SectionEntry::reserved); i++) {
      std::vector<u8> t = good;
      SectionEntry s = get_entry(t, e.pos);
      s.reserved[i] = 0x80;
      put_entry(t, e.pos, s);
      check_damaged(decode_table(t, img), "reserved");
    }
  }
  size_t bpos = find_entry(good, SectionKind::kBlock, 0);
  for (int byte = 0; byte < 8; byte++) {
    std::vector<u8> t = good;
    edit_record(t, bpos, [&](BlockRecord& r) { r.flags = u64(1) << (8 * byte); });
    check_damaged(decode_table(t, img), "reserved");
  }
  for (size_t i = 0; i < sizeof(BlockRecord::reserved); i++) {
    std::vector<u8> t = good;
    edit_record(t, bpos, [&](BlockRecord& r) { r.reserved[i] = 1; });
    Status st = decode_table(t, img);
    if (st.ok() || st.error().message().find("reserved") == std::string::npos)
      FAIL("block record reserved byte ", i, " accepted or misreported");
  }
}

TEST_CASE("format: block records are checked") {
  ImageLayout img = make_layout(2);
  const std::vector<u8> good = encode_section_table(img);
  size_t pos = find_entry(good, SectionKind::kBlock, 1);
  auto with = [&](const std::function<void(BlockRecord&)>& fn) {
    std::vector<u8> t = good;
    edit_record(t, pos, fn);
    return decode_table(t, img);
  };

  SUBCASE("record checksum") {
    std::vector<u8> t = good;
    t[pos + 64 + 300] ^= 1;  // inside the record, entry checksum not refreshed
    check_damaged(decode_table(t, img), "block record checksum");
  }
  SUBCASE("record length") {
    for (u64 len : {u64(0), u64(511), u64(513), ~u64(0)}) {
      std::vector<u8> t = good;
      SectionEntry s = get_entry(t, pos);
      s.length = len;
      put_entry(t, pos, s);
      CAPTURE(len);
      check_damaged(decode_table(t, img));
    }
    // A kBlock entry at the very end, with no room for its record.
    std::vector<u8> t(good.begin(), good.begin() + 64 + 100);
    check_damaged(decode_table(t, img), "wrong size");
  }
  SUBCASE("ids") {
    check_damaged(with([](BlockRecord& r) { std::memset(r.id, 0, sizeof(r.id)); }), "block id");
    check_damaged(with([](BlockRecord& r) { std::memset(r.id, 'x', sizeof(r.id)); }), "block id");
    CHECK(with([](BlockRecord& r) {
            std::memset(r.id, 'x', kMaxBlockIdLength);
            r.id[kMaxBlockIdLength] = 0;
          }).ok());
  }
  SUBCASE("ids that are no name") {
    // A newline would split prepare's one-argument-per-line output into
    // arguments of the image's choosing.
    check_damaged(with([](BlockRecord& r) { std::strcpy(r.id, "ram1\n-monitor\ntcp:x:1"); }),
                  "control characters");
    check_damaged(with([](BlockRecord& r) { std::strcpy(r.id, "ram0"); }),
                  "two RAM blocks are named ram0");
    // Ids name files under --ram-dir: verify and info called these intact,
    // while restore refused them as damage.
    for (const char* id : {"a/kA", "..", ".", "../escape"}) {
      CAPTURE(std::string(id));
      check_damaged(with([&](BlockRecord& r) { std::strcpy(r.id, id); }), "cannot be a file name");
    }
  }
  SUBCASE("sizes") {
    for (u64 v : {u64(0), u64(kMaxBlockSize) + 1, ~u64(0), u64(1) << 63}) {
      CAPTURE(v);
      check_damaged(with([&](BlockRecord& r) { r.size = v; }), "implausible size");
    }
    for (u64 v : {u64(0), u64(512), u64(4097), u64(12288), u64(kMaxPageSize) * 2, ~u64(0)}) {
      CAPTURE(v);
      check_damaged(with([&](BlockRecord& r) { r.page_size = v; }), "page size");
    }
    for (u64 v : {u64(0), u64(2048), u64(3 * kMiB), u64(kMaxChunkSize) * 2, ~u64(0)}) {
      CAPTURE(v);
      check_damaged(with([&](BlockRecord& r) { r.chunk_size = v; }), "chunk size");
    }
    i64 pages = img.blocks[1].pages();
    CHECK(with([&](BlockRecord& r) { r.data_pages = pages; }).ok());
    check_damaged(with([&](BlockRecord& r) { r.data_pages = pages + 1; }), "more data pages");
    check_damaged(with([&](BlockRecord& r) { r.data_pages = ~u64(0); }), "more data pages");
    // A record whose size no longer matches its region, bitmap and table.
    check_damaged(with([&](BlockRecord& r) { r.size = u64(r.size) + 4 * kMiB; }));
    check_damaged(with([&](BlockRecord& r) { r.size = u64(r.size) - 64 * kKiB; }));
  }
}

TEST_CASE("format: the chunks of all blocks are bounded, as the memory for their sums") {
  // A sparse file can claim any size: 64 GiB in 4 KiB chunks takes 12 KiB
  // on disk and 128 MiB of sums.
  const i64 at_most = kMaxChunks / 2 * 4096;
  ImageLayout fits = make_layout(2, false, at_most, 4096);
  CHECK(decode_table(encode_section_table(fits), fits).ok());
  ImageLayout over = make_layout(2, false, at_most + 4096, 4096);
  check_damaged(decode_table(encode_section_table(over), over), "checksum chunks");
}

TEST_CASE("format: section extents must lie inside the file, aligned") {
  ImageLayout img = make_layout(2);
  const std::vector<u8> good = encode_section_table(img);
  auto with = [&](SectionKind kind, u32 block, const std::function<void(SectionEntry&)>& fn) {
    std::vector<u8> t = good;
    size_t pos = find_entry(t, kind, block);
    SectionEntry s = get_entry(t, pos);
    fn(s);
    put_entry(t, pos, s);
    return decode_table(t, img);
  };
  i64 fsize = img.file_size;
  struct K {
    SectionKind kind;
    u32 block;
    i64 align;
  };
  for (K k :
       {K{SectionKind::kRamRegion, 0, kRegionAlign}, K{SectionKind::kRamRegion, 1, kRegionAlign},
        K{SectionKind::kRamBitmap, 1, 4096}, K{SectionKind::kChunkSums, 0, 4096},
        K{SectionKind::kVmstate, kNoBlock, 4096}, K{SectionKind::kMetadata, kNoBlock, 4096}}) {
    CAPTURE(int(k.kind));
    CAPTURE(k.block);
    for (u64 off :
         {u64(0), u64(fsize), u64(fsize) + kRegionAlign, ~u64(0), u64(1) << 63, u64(fsize - 4096)})
      check_damaged(with(k.kind, k.block, [&](SectionEntry& s) { s.offset = off; }));
    check_damaged(
        with(k.kind, k.block, [&](SectionEntry& s) { s.offset = u64(s.offset) + k.align / 2; }));
    check_damaged(with(k.kind, k.block, [&](SectionEntry& s) { s.offset = u64(s.offset) + 8; }));
    for (u64 len : {u64(fsize), ~u64(0), u64(1) << 63})
      check_damaged(with(k.kind, k.block, [&](SectionEntry& s) { s.length = len; }));
  }
  // Lengths must match the block they describe.
  check_damaged(
      with(SectionKind::kRamRegion, 0, [](SectionEntry& s) { s.length = u64(s.length) - 4096; }),
      "wrong length");
  check_damaged(
      with(SectionKind::kRamBitmap, 0, [](SectionEntry& s) { s.length = u64(s.length) + 1; }),
      "wrong length");
  check_damaged(
      with(SectionKind::kChunkSums, 1, [](SectionEntry& s) { s.length = u64(s.length) - 8; }),
      "wrong length");
  // Metadata larger than its limit (in a file big enough to hold it).
  {
    ImageLayout big = img;
    big.file_size = 64 * kMiB;
    std::vector<u8> t = good;
    size_t pos = find_entry(t, SectionKind::kMetadata);
    SectionEntry s = get_entry(t, pos);
    s.offset = 32 * kMiB;
    s.length = kMaxMetadataSize + 1;
    put_entry(t, pos, s);
    check_damaged(decode_table(t, big), "metadata");
  }
}

TEST_CASE("format: overlapping sections are refused") {
  ImageLayout img = make_layout(2);
  const std::vector<u8> good = encode_section_table(img);
  auto move_to = [&](SectionKind kind, u32 block, i64 offset) {
    std::vector<u8> t = good;
    size_t pos = find_entry(t, kind, block);
    SectionEntry s = get_entry(t, pos);
    s.offset = offset;
    put_entry(t, pos, s);
    return decode_table(t, img);
  };
  const BlockLayout &b0 = img.blocks[0], &b1 = img.blocks[1];
  check_damaged(move_to(SectionKind::kRamRegion, 1, b0.region.offset), "overlaps");
  check_damaged(move_to(SectionKind::kRamBitmap, 0, b0.sums.offset), "overlaps");
  check_damaged(move_to(SectionKind::kChunkSums, 1, b1.bitmap.offset), "overlaps");
  check_damaged(move_to(SectionKind::kMetadata, kNoBlock, img.table.offset), "overlaps");
  check_damaged(move_to(SectionKind::kVmstate, kNoBlock, b0.bitmap.offset), "overlaps");
  // A tail section placed inside a RAM region.
  check_damaged(move_to(SectionKind::kRamBitmap, 1, b1.region.offset + 4096), "overlaps");
  check_damaged(move_to(SectionKind::kVmstate, kNoBlock, b0.region.offset + 8192), "overlaps");
  // The section table itself, overlapped by a RAM region's end is covered
  // by bounds; a bitmap moved onto the table is an overlap.
  check_damaged(move_to(SectionKind::kRamBitmap, 0, img.table.offset), "overlaps");

  // Empty sections occupy nothing and may share an offset (raw mode has no
  // device state).
  std::vector<u8> t = good;
  size_t pos = find_entry(t, SectionKind::kVmstate);
  SectionEntry s = get_entry(t, pos);
  s.offset = img.metadata.offset;
  s.length = 0;
  put_entry(t, pos, s);
  Status st = decode_table(t, img);
  CHECK_MESSAGE(st.ok(), st.error().message());
}

TEST_CASE("format: duplicate and missing sections are refused") {
  ImageLayout img = make_layout(2);
  const std::vector<u8> good = encode_section_table(img);
  auto all = entries(good);
  auto entry_bytes = [&](const EntryPos& e) {
    size_t len = 64 + (e.kind == SectionKind::kBlock ? 512 : 0);
    return std::vector<u8>(good.begin() + e.pos, good.begin() + e.pos + len);
  };
  auto without = [&](SectionKind kind, u32 block) {
    std::vector<u8> t;
    for (auto& e : all)
      if (!(e.kind == kind && e.block == block)) {
        auto b = entry_bytes(e);
        t.insert(t.end(), b.begin(), b.end());
      }
    return t;
  };
  auto with_twice = [&](SectionKind kind, u32 block) {
    std::vector<u8> t = good;
    for (auto& e : all)
      if (e.kind == kind && e.block == block) {
        auto b = entry_bytes(e);
        t.insert(t.end(), b.begin(), b.end());
      }
    return t;
  };

  for (SectionKind k : {SectionKind::kBlock, SectionKind::kRamRegion, SectionKind::kRamBitmap,
                        SectionKind::kChunkSums}) {
    CAPTURE(int(k));
    check_damaged(decode_table(with_twice(k, 0), img), "duplicate");
    check_damaged(decode_table(with_twice(k, 1), img), "duplicate");
    check_damaged(decode_table(without(k, 0), img), "incomplete");
    check_damaged(decode_table(without(k, 1), img), "incomplete");
  }
  check_damaged(decode_table(with_twice(SectionKind::kVmstate, kNoBlock), img), "duplicate");
  check_damaged(decode_table(with_twice(SectionKind::kMetadata, kNoBlock), img), "duplicate");
  check_damaged(decode_table(without(SectionKind::kVmstate, kNoBlock), img), "lacks");
  check_damaged(decode_table(without(SectionKind::kMetadata, kNoBlock), img), "lacks");

  SUBCASE("no blocks at all") {
    std::vector<u8> t;
    for (auto& e : all)
      if (e.block == kNoBlock) {
        auto b = entry_bytes(e);
        t.insert(t.end(), b.begin(), b.end());
      }
    check_damaged(decode_table(t, img), "no RAM block");
  }
  SUBCASE("block numbers with a gap") {
    std::vector<u8> t = good;
    for (auto& e : all)
      if (e.block == 1) {
        SectionEntry s = get_entry(t, e.pos);
        s.block = 2;
        put_entry(t, e.pos, s);
      }
    check_damaged(decode_table(t, img), "incomplete");
  }
  SUBCASE("block index out of range, and a global section naming a block") {
    for (u32 b : {kMaxBlocks, kMaxBlocks + 1, kNoBlock}) {
      std::vector<u8> t = good;
      size_t pos = find_entry(t, SectionKind::kRamBitmap, 1);
      SectionEntry s = get_entry(t, pos);
      s.block = b;
      put_entry(t, pos, s);
      CAPTURE(b);
      check_damaged(decode_table(t, img), "block index");
    }
    std::vector<u8> t = good;
    size_t pos = find_entry(t, SectionKind::kMetadata);
    SectionEntry s = get_entry(t, pos);
    s.block = 0;
    put_entry(t, pos, s);
    check_damaged(decode_table(t, img), "cannot have");
  }
  SUBCASE("an unknown kind is damage in v1.0 and skipped by a v1.0 reader of v1.1") {
    SectionEntry s{};
    s.kind = 99;
    s.block = kNoBlock;
    std::vector<u8> t = good;
    const u8* p = reinterpret_cast<const u8*>(&s);
    t.insert(t.end(), p, p + sizeof(s));
    check_damaged(decode_table(t, img), "unknown section kind");
    ImageLayout newer = img;
    newer.minor = kFormatMinor + 1;
    Status st = decode_table(t, newer);
    CHECK_MESSAGE(st.ok(), st.error().message());
    // Skipped, but it may not overlap what this reader knows.
    std::vector<u8> over = good;
    s.offset = img.blocks[0].bitmap.offset;
    s.length = 4096;
    over.insert(over.end(), p, p + sizeof(s));
    check_damaged(decode_table(over, newer), "overlaps a section of a newer minor version");
    s.kind = 0;
    std::vector<u8> t0 = good;
    t0.insert(t0.end(), p, p + sizeof(s));
    check_damaged(decode_table(t0, img), "unknown section kind");
  }
  SUBCASE("a RAM region's entry has no checksum") {
    std::vector<u8> t = good;
    size_t pos = find_entry(t, SectionKind::kRamRegion, 1);
    SectionEntry s = get_entry(t, pos);
    s.checksum = 1;
    put_entry(t, pos, s);
    check_damaged(decode_table(t, img), "a RAM region's entry has a checksum");
  }
  SUBCASE("a table that ends inside an entry") {
    for (size_t cut : {size_t(1), size_t(8), size_t(63)}) {
      std::vector<u8> t = good;
      t.resize(t.size() - cut);
      CAPTURE(cut);
      check_damaged(decode_table(t, img));
    }
    std::vector<u8> t = good;
    t.insert(t.end(), 17, 0);
    check_damaged(decode_table(t, img), "ends inside an entry");
  }
}

TEST_CASE("format: the section table survives every truncation and byte flip") {
  // Truncation and flips of the encoded table with its checksum refreshed:
  // the structural checks alone must refuse or accept, never crash (ASan).
  ImageLayout img = make_layout(2);
  const std::vector<u8> good = encode_section_table(img);
  for (size_t n = 0; n < good.size(); n++) {
    std::vector<u8> t(good.begin(), good.begin() + n);
    Status st = decode_table(t, img);
    if (st.ok()) FAIL("table cut to ", n, " bytes was accepted");
  }
  int accepted = 0;
  for (size_t i = 0; i < good.size(); i++) {
    std::vector<u8> t = good;
    t[i] ^= 0xff;
    Status st = decode_table(t, img);
    if (st.ok())
      accepted++;  // e.g. a checksum field of a section: caught on read
    else
      CHECK(st.error().status == Exit::kDamaged);
  }
  // Only the per-section checksum fields (8 bytes each) and the id bytes
  // after the terminator can change without breaking the structure.
  CHECK(accepted < int(good.size()) / 2);
}

// ------------------------------------------------------------------ layout

TEST_CASE("format: plan_regions aligns regions to 2 MiB or the page size") {
  SUBCASE("4 KiB pages: 2 MiB alignment, sizes not page multiples") {
    std::vector<BlockLayout> bs(3);
    bs[0] = {.id = "a", .size = 4096, .page_size = 4096};
    bs[1] = {.id = "b", .size = 5000, .page_size = 4096};
    bs[2] = {.id = "c", .size = 3 * kMiB + 8 * kKiB, .page_size = 4096};
    i64 vm = plan_regions(bs, kDefaultChunkSize);
    CHECK(bs[0].region.offset == 2 * kMiB);  // not 4096: a region can back THP guest RAM
    CHECK(bs[0].region.length == 4096);
    CHECK(bs[1].region.offset == 4 * kMiB);
    CHECK(bs[1].region.length == 8192);
    CHECK(bs[2].region.offset == 6 * kMiB);
    CHECK(bs[2].region.length == 3 * kMiB + 8 * kKiB);
    CHECK(vm == 9 * kMiB + 8 * kKiB);
    for (auto& b : bs) {
      CHECK(b.chunk_size == kDefaultChunkSize);
      CHECK(b.region.offset % kRegionAlign == 0);
    }
  }
  SUBCASE("a region that ends on a 2 MiB boundary is followed directly") {
    std::vector<BlockLayout> bs(2);
    bs[0] = {.id = "a", .size = 2 * kMiB, .page_size = 4096};
    bs[1] = {.id = "b", .size = 1, .page_size = 4096};
    i64 vm = plan_regions(bs, 4096);
    CHECK(bs[0].region.offset == 2 * kMiB);
    CHECK(bs[1].region.offset == 4 * kMiB);
    CHECK(bs[1].region.length == 4096);
    CHECK(vm == 4 * kMiB + 4096);
    CHECK(bs[0].chunk_size == 4096);
  }
  SUBCASE("2 MiB and 1 GiB huge pages") {
    std::vector<BlockLayout> bs(4);
    bs[0] = {.id = "small", .size = 12288, .page_size = 4096};
    bs[1] = {.id = "huge1g", .size = 3 * kGiB, .page_size = kGiB};
    bs[2] = {.id = "huge2m", .size = 5 * kMiB, .page_size = 2 * kMiB};
    bs[3] = {.id = "huge1g-b", .size = kGiB + 1, .page_size = kGiB};
    i64 vm = plan_regions(bs, kDefaultChunkSize);
    CHECK(bs[0].region.offset == 2 * kMiB);
    CHECK(bs[1].region.offset == 1 * kGiB);
    CHECK(bs[1].region.length == 3 * kGiB);
    CHECK(bs[1].chunk_size == kGiB);  // never smaller than a page
    CHECK(bs[2].region.offset == 4 * kGiB);
    CHECK(bs[2].region.length == 6 * kMiB);
    CHECK(bs[2].chunk_size == 2 * kMiB);
    CHECK(bs[3].region.offset == 5 * kGiB);
    CHECK(bs[3].region.length == 2 * kGiB);
    CHECK(vm == 7 * kGiB);
    for (auto& b : bs) {
      CHECK(b.region.offset % std::max(kRegionAlign, b.page_size) == 0);
      CHECK(b.region.offset >= kHeaderSize);
    }
  }
}

TEST_CASE("format: checksums, bitmaps and uuids") {
  for (i64 len : {i64(0), i64(1), i64(4096), i64(5000), kDefaultChunkSize, kDefaultChunkSize + 3,
                  3 * kMiB + 8 * kKiB}) {
    std::vector<u8> z(len, 0);
    CAPTURE(len);
    CHECK(zero_checksum(len) == checksum(z));
  }
  std::vector<u8> bm(3, 0);
  for (i64 i : {0, 7, 8, 23}) bitmap_set(bm.data(), i);
  CHECK(bm[0] == 0x81);
  CHECK(bm[1] == 0x01);
  CHECK(bm[2] == 0x80);
  for (i64 i = 0; i < 24; i++)
    CHECK(bitmap_test(bm.data(), i) == (i == 0 || i == 7 || i == 8 || i == 23));

  std::array<u8, 16> u{};
  for (int i = 0; i < 16; i++) u[i] = static_cast<u8>(i * 17);
  CHECK(uuid_string(u) == "00112233-4455-6677-8899-aabbccddeeff");

  ul64 v = 0x0102030405060708ULL;
  u8 raw[8];
  std::memcpy(raw, &v, 8);
  CHECK(raw[0] == 0x08);
  CHECK(raw[7] == 0x01);
  CHECK(u64(v) == 0x0102030405060708ULL);
}

// ------------------------------------------------------------ compression

TEST_CASE("format: compressed images: flag, minor version and chunk codec tables") {
  ImageLayout img = make_layout(2, true);
  std::vector<u8> h = encode_header(img);
  auto d = decode_header(h, img.file_size, kPath);
  REQUIRE_MESSAGE(d.ok(), d.error().message());
  CHECK(d->flags == kFlagCompressed);
  CHECK(d->minor == 1);
  // The compressed flag cannot appear in a v1.0 image.
  DiskHeader old = header_of(h);
  old.minor = 0;
  check_damaged(decode_header(bytes_of(old), img.file_size, kPath), "v1.0");
  // An uncompressed v1.0 image (flags 0, minor 0) reads as before.
  ImageLayout plain = make_layout(2);
  plain.minor = 0;
  auto p = decode_header(encode_header(plain), plain.file_size, kPath);
  REQUIRE(p.ok());
  CHECK(p->flags == 0);
  CHECK(decode_table(encode_section_table(plain), plain).ok());

  const std::vector<u8> table = encode_section_table(img);
  CHECK(table.size() == 2 * (64 + 512 + 4 * 64) + 2 * 64);
  ImageLayout out;
  Status st = decode_table(table, img, &out);
  REQUIRE_MESSAGE(st.ok(), st.error().message());
  CHECK(out.vmstate_codec == Codec::kZstd);
  for (size_t i = 0; i < 2; i++) {
    CHECK(out.blocks[i].chunk_table.offset == img.blocks[i].chunk_table.offset);
    CHECK(out.blocks[i].chunk_table.length == img.blocks[i].chunk_table.length);
    CHECK(out.blocks[i].chunk_table.checksum == img.blocks[i].chunk_table.checksum);
  }

  SUBCASE("the table is refused without the flag") {
    ImageLayout noflag = img;
    noflag.flags = 0;
    check_damaged(decode_table(table, noflag));
  }
  SUBCASE("a missing chunk codec table is refused") {
    ImageLayout noflag = img;
    noflag.flags = 0;
    std::vector<u8> t = encode_section_table(noflag);  // no kind 7 entries
    check_damaged(decode_table(t, img), "incomplete");
  }
  SUBCASE("wrong length, misaligned, overlapping") {
    for (int how = 0; how < 3; how++) {
      CAPTURE(how);
      std::vector<u8> t = table;
      size_t pos = find_entry(t, SectionKind::kChunkTable, 1);
      SectionEntry s = get_entry(t, pos);
      if (how == 0) s.length = u64(s.length) + 16;
      if (how == 1) s.offset = u64(s.offset) + 8;
      if (how == 2) s.offset = img.blocks[1].sums.offset;
      put_entry(t, pos, s);
      check_damaged(decode_table(t, img));
    }
  }
  SUBCASE("vmstate codec must be known; other entries have no flags") {
    std::vector<u8> t = table;
    size_t pos = find_entry(t, SectionKind::kVmstate);
    SectionEntry s = get_entry(t, pos);
    s.flags = 1;  // lz4 is not a vmstate codec
    put_entry(t, pos, s);
    check_damaged(decode_table(t, img), "vmstate codec");
    t = table;
    pos = find_entry(t, SectionKind::kChunkTable, 0);
    s = get_entry(t, pos);
    s.flags = 2;
    put_entry(t, pos, s);
    check_damaged(decode_table(t, img), "reserved");
  }
  SUBCASE("chunks larger than 4 MiB cannot be compressed") {
    ImageLayout big = img;
    big.blocks.resize(1);
    plan_regions(big.blocks, 8 * kMiB);
    big.blocks[0].size = 16 * kMiB;
    big.vmstate.offset = plan_regions(big.blocks, 8 * kMiB);
    big.blocks[0].chunk_table.length = 2 * 16;
    big.blocks[0].sums.length = 2 * 8;
    big.blocks[0].bitmap.length = 4096 / 8;
    i64 off = big.vmstate.offset + 16 * kKiB;
    for (Extent* e : {&big.blocks[0].bitmap, &big.blocks[0].sums, &big.blocks[0].chunk_table,
                      &big.metadata}) {
      e->offset = off;
      off += 4096;
    }
    big.table.offset = off;
    big.file_size = off + 8192;
    big.blocks[0].data_pages = 1;
    check_damaged(decode_table(encode_section_table(big), big), "larger than");
  }
}

TEST_CASE("format: chunk records are bounded by their chunk") {
  BlockLayout b;
  b.id = "ram0";
  b.size = 3 * kMiB + 8 * kKiB + 100;  // last chunk: 8292 bytes, slot 12 KiB
  b.page_size = 4096;
  b.chunk_size = kMiB;
  b.chunk_table = {1 << 20, b.chunks() * 16, 0};
  REQUIRE(b.chunks() == 4);
  std::vector<ChunkInfo> good(4);
  good[0] = {Codec::kLz4, 1000, 0x1111};
  good[1] = {Codec::kZstd, kMiB - 4096, 0x2222};  // the largest allowed
  good[3] = {Codec::kZstd, 8192, 0x3333};  // 8292 bytes: a 12 KiB slot holds 8 KiB + a saved 4 KiB
  std::vector<u8> bytes = encode_chunk_records(good);
  REQUIRE(bytes.size() == 64);
  auto d = decode_chunk_records(bytes, b, kPath);
  REQUIRE_MESSAGE(d.ok(), d.error().message());
  for (size_t c = 0; c < 4; c++) {
    CHECK((*d)[c].codec == good[c].codec);
    CHECK((*d)[c].stored_length == good[c].stored_length);
    CHECK((*d)[c].checksum == good[c].checksum);
  }
  // Little-endian fixed layout: codec, 3 reserved, ul32 length, ul64 sum.
  CHECK(bytes[0] == 1);
  CHECK(bytes[4] == (1000 & 0xff));
  CHECK(bytes[5] == (1000 >> 8));
  CHECK(bytes[8] == 0x11);

  struct Bad {
    size_t chunk;
    ChunkInfo info;
    const char* why;
  };
  for (const Bad& bad : {Bad{0, {Codec::kLz4, 0, 1}, "stored length"},
                         Bad{1, {Codec::kZstd, kMiB - 4095, 1}, "stored length"},
                         Bad{1, {Codec::kZstd, kMiB, 1}, "stored length"},
                         Bad{1, {Codec::kZstd, 0xffffffff, 1}, "stored length"},
                         Bad{3, {Codec::kLz4, 8193, 1}, "stored length"},
                         Bad{2, {Codec::kRaw, 10, 0}, "raw chunk"},
                         Bad{2, {Codec::kRaw, 0, 5}, "raw chunk"}}) {
    CAPTURE(bad.chunk);
    std::vector<ChunkInfo> v = good;
    v[bad.chunk] = bad.info;
    check_damaged(decode_chunk_records(encode_chunk_records(v), b, kPath), bad.why);
  }
  for (u8 codec : {u8(3), u8(0x80), u8(0xff)}) {
    std::vector<u8> t = bytes;
    t[0] = codec;
    check_damaged(decode_chunk_records(t, b, kPath), "unknown codec");
  }
  for (size_t i : {1, 2, 3}) {
    std::vector<u8> t = bytes;
    t[16 + i] = 1;
    check_damaged(decode_chunk_records(t, b, kPath), "reserved");
  }
  std::vector<u8> shorter(bytes.begin(), bytes.end() - 16);
  check_damaged(decode_chunk_records(shorter, b, kPath), "wrong length");
}

TEST_CASE("format: lz4's effort rises while the disk keeps up and falls when it waits") {
  Lz4Effort e;
  auto window = [&](u32 in_flight, double waited, double worked) {
    for (int i = 0; i < Lz4Effort::kWindow; i++) e.add(in_flight, waited, worked);
  };
  CHECK(e.acceleration() == 1);
  // Writes at most one deep, no waiting: the disk is short of work.
  for (int a : {2, 4, 8, 16, 32, 64, 64}) {
    window(1, 0, 1e-3);
    CHECK(e.acceleration() == a);
  }
  // Only whole windows count.
  for (int i = 0; i < Lz4Effort::kWindow - 1; i++) e.add(4, 1.0, 1e-3);
  CHECK(e.acceleration() == 64);
  e.add(4, 1.0, 1e-3);
  CHECK(e.acceleration() == 32);
  // Deeper writes but hardly any waiting: the balance, held.
  window(3, 1e-5, 1e-3);
  CHECK(e.acceleration() == 32);
  // One chunk in a window more than one deep holds it too.
  for (int i = 0; i < Lz4Effort::kWindow - 1; i++) e.add(0, 0, 1e-3);
  e.add(2, 0, 1e-3);
  CHECK(e.acceleration() == 32);
  // Waiting more than a twentieth of the time: down to 1 and no lower.
  for (int a : {16, 8, 4, 2, 1, 1}) {
    window(4, 1e-4, 1e-3);
    CHECK(e.acceleration() == a);
  }
}

TEST_CASE("format: codecs round trip, refuse what does not shrink, and survive garbage") {
  std::mt19937_64 rng(7);
  std::vector<u8> text(kMiB), random(kMiB);
  const char* words[] = {"guest ", "memory ", "page ", "qemu ", "\n", "vmsave "};
  for (size_t i = 0; i < text.size();) {
    const char* w = words[rng() % 6];
    for (const char* p = w; *p && i < text.size(); p++) text[i++] = static_cast<u8>(*p);
  }
  for (auto& b : random) b = static_cast<u8>(rng());
  for (const char* spec : {"lz4", "zstd", "zstd:1", "zstd:19"}) {
    CAPTURE(spec);
    auto cs = parse_codec_spec(spec);
    REQUIRE(cs.ok());
    Compressor comp(*cs);
    Decompressor dec;
    std::vector<u8> out(kMiB), back(kMiB);
    size_t n = comp.compress(text, out.data(), out.size() - 4096);
    REQUIRE(n > 0);
    CHECK(n < text.size() / 2);
    REQUIRE(dec.decompress(cs->codec, {out.data(), n}, back));
    CHECK(back == text);
    // Exact capacity only: one byte less or more is refused.
    std::vector<u8> small(kMiB - 1), large(kMiB + 1);
    CHECK_FALSE(dec.decompress(cs->codec, {out.data(), n}, small));
    CHECK_FALSE(dec.decompress(cs->codec, {out.data(), n}, large));
    // Truncated or flipped compressed data: an error, never a crash.
    CHECK_FALSE(dec.decompress(cs->codec, {out.data(), n / 2}, back));
    for (size_t at : {size_t(0), size_t(5), n / 3, n / 2, n - 1}) {
      std::vector<u8> bad(out.begin(), out.begin() + n);
      bad[at] ^= 0x5a;
      (void)dec.decompress(cs->codec, bad, back);  // may or may not fail; must not crash
    }
    // Random data does not shrink by 4 KiB: the caller stores it raw.
    CHECK(comp.compress(random, out.data(), random.size() - 4096) == 0);
    // Garbage: refused.
    CHECK_FALSE(dec.decompress(cs->codec, {random.data(), 5000}, back));
  }
  // lz4 at any acceleration: the same decoder, larger output the faster.
  {
    Compressor comp(CodecSpec{Codec::kLz4, 0});
    Decompressor dec;
    std::vector<u8> out(kMiB), back(kMiB);
    size_t last = 0;
    for (int a : {1, 8, kMaxLz4Acceleration}) {
      CAPTURE(a);
      comp.set_acceleration(a);
      size_t n = comp.compress(text, out.data(), out.size() - 4096);
      REQUIRE(n > 0);
      CHECK(n > last);
      last = n;
      REQUIRE(dec.decompress(Codec::kLz4, {out.data(), n}, back));
      CHECK(back == text);
    }
  }
  for (const char* bad : {"", "lz5", "zstd:", "zstd:0", "zstd:20", "zstd:x", "zstd:3x", "lz4:1",
                          "ZSTD", "zstd:-1"}) {
    CAPTURE(bad);
    auto cs = parse_codec_spec(bad);
    REQUIRE_FALSE(cs.ok());
    CHECK(cs.error().status == Exit::kUsage);
  }
  CHECK(parse_codec_spec("zstd")->level == kZstdDefaultLevel);
  CHECK(parse_codec_spec("zstd:12")->name() == "zstd:12");

  // The device-state stream: one zstd frame, fed and drained in odd pieces.
  StreamCompressor sc(3);
  std::vector<u8> frame;
  auto keep = [&](const u8* p, size_t n) {
    frame.insert(frame.end(), p, p + n);
    return Status();
  };
  for (size_t off = 0; off < text.size(); off += 77777)
    REQUIRE(sc.write(text.data() + off, std::min<size_t>(77777, text.size() - off), keep).ok());
  REQUIRE(sc.finish(keep).ok());
  CHECK(frame.size() < text.size() / 2);
  auto unpack = [&](const std::vector<u8>& f, std::vector<u8>* got, std::string* err) {
    StreamDecompressor sd;
    for (size_t off = 0; off < f.size() && err->empty(); off += 1000)
      REQUIRE(sd.write(f.data() + off, std::min<size_t>(1000, f.size() - off),
                       [&](const u8* p, size_t n) {
                         got->insert(got->end(), p, p + n);
                         return Status();
                       },
                       err)
                  .ok());
    return sd.finished();
  };
  std::vector<u8> got;
  std::string err;
  CHECK(unpack(frame, &got, &err));
  CHECK(err.empty());
  CHECK(got == text);
  // A flipped byte in the middle: zstd's content checksum or the block
  // decoder refuses it.
  std::vector<u8> bad = frame;
  bad[bad.size() / 2] ^= 0x10;
  got.clear();
  err.clear();
  bool done = unpack(bad, &got, &err);
  CHECK((!err.empty() || !done));
  // Cut short: not finished.
  std::vector<u8> cut(frame.begin(), frame.end() - 10);
  err.clear();
  got.clear();
  CHECK_FALSE(unpack(cut, &got, &err));
  // Bytes after the frame: refused.
  std::vector<u8> extra = frame;
  extra.push_back(0);
  err.clear();
  got.clear();
  unpack(extra, &got, &err);
  CHECK(!err.empty());
}

// ------------------------------------------------------- QEMU migration

namespace {

// A layout whose second block went through QEMU's mapped-ram migration: no
// region, bitmap or chunk table of its own, a QEMU section after the first
// block's region, an empty vmstate section.
ImageLayout make_qemu_layout() {
  ImageLayout img;
  img.flags = kFlagQemuMigration;
  BlockLayout a;
  a.id = "ram0";
  a.size = 3 * kMiB;
  a.page_size = 4096;
  BlockLayout q = a;
  q.id = "pc.ram";
  q.flags = kBlockViaQemu;
  img.blocks = {a, q};
  i64 end = plan_regions(img.blocks, kDefaultChunkSize);
  img.qemu = {align_up(end, kRegionAlign), 5 * kMiB + 123, 77};
  i64 off = align_up(img.qemu.offset + img.qemu.length, kSectionAlign);
  img.vmstate = {off, 0, checksum({})};
  auto place = [&](Extent& e, i64 len) {
    off = align_up(off, kSectionAlign);
    e = {off, len, 0x99};
    off += len;
  };
  img.blocks[0].data_pages = 5;
  place(img.blocks[0].bitmap, (img.blocks[0].pages() + 7) / 8);
  place(img.blocks[0].sums, img.blocks[0].chunks() * 8);
  place(img.metadata, 300);
  std::vector<u8> table = encode_section_table(img);
  place(img.table, static_cast<i64>(table.size()));
  img.table.checksum = checksum(table);
  img.file_size = align_up(off, kSectionAlign);
  return img;
}

}  // namespace

TEST_CASE("format: a QEMU migration section and blocks saved through it round-trip") {
  ImageLayout img = make_qemu_layout();
  CHECK(img.blocks[1].region.length == 0);
  std::vector<u8> hb = encode_header(img);
  auto d = decode_header(hb, img.file_size, kPath);
  REQUIRE_MESSAGE(d.ok(), d.error().message());
  CHECK(d->flags == kFlagQemuMigration);
  std::vector<u8> table = encode_section_table(img);
  ImageLayout out;
  Status st = decode_table(table, img, &out);
  REQUIRE_MESSAGE(st.ok(), st.error().message());
  CHECK(out.qemu.offset == img.qemu.offset);
  CHECK(out.qemu.length == img.qemu.length);
  CHECK(out.qemu.checksum == 77);
  REQUIRE(out.blocks.size() == 2);
  CHECK_FALSE(out.blocks[0].via_qemu());
  CHECK(out.blocks[1].via_qemu());
  CHECK(out.blocks[1].id == "pc.ram");
  CHECK(out.blocks[1].size == 3 * kMiB);
}

TEST_CASE("format: the QEMU migration section and its flag must agree") {
  ImageLayout img = make_qemu_layout();
  std::vector<u8> table = encode_section_table(img);
  SUBCASE("section without the header flag") {
    ImageLayout no_flag = img;
    no_flag.flags = 0;
    check_damaged(decode_table(table, no_flag));
  }
  SUBCASE("flag without the section") {
    ImageLayout no_section = img;
    no_section.flags = 0;
    std::vector<u8> t = encode_section_table(no_section);
    // The via-QEMU block record is still in the table: both are refused.
    check_damaged(decode_table(t, img));
    ImageLayout plain = make_layout();
    plain.flags = kFlagQemuMigration;
    check_damaged(decode_table(encode_section_table(make_layout()), plain),
                  "lacks the QEMU migration section");
  }
  SUBCASE("a block through QEMU in an image without the section") {
    ImageLayout plain = make_layout(1);
    std::vector<u8> t = encode_section_table(plain);
    edit_record(t, find_entry(t, SectionKind::kBlock, 0),
                [](BlockRecord& r) { r.flags = kBlockViaQemu; });
    check_damaged(decode_table(t, plain));
  }
  SUBCASE("a QEMU section overlapping a region or out of the file") {
    ImageLayout bad = img;
    bad.qemu.offset = bad.blocks[0].region.offset;
    check_damaged(decode_table(encode_section_table(bad), bad), "overlaps");
    bad = img;
    bad.qemu.length = bad.file_size;
    check_damaged(decode_table(encode_section_table(bad), bad), "out of bounds");
  }
  SUBCASE("a duplicate QEMU section") {
    std::vector<u8> t = table;
    size_t pos = find_entry(t, SectionKind::kQemuMigration);
    t.insert(t.end(), t.begin() + pos, t.begin() + pos + sizeof(SectionEntry));
    check_damaged(decode_table(t, img), "duplicate");
  }
}

TEST_CASE("format: visible() shows control characters and bytes that are not UTF-8 as \\xNN") {
  // An image's block id with stray bytes reached damage messages raw.
  CHECK(visible("ram0") == "ram0");
  CHECK(visible("a\nb\x1b[2J\x7f") == "a\\x0ab\\x1b[2J\\x7f");
  CHECK(visible("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80") ==
        "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80");
  CHECK(visible("\xc2\x9b"
                "1m") == "\\xc2\\x9b1m");  // C1 CSI
  CHECK(visible("a\xff\xfe") == "a\\xff\\xfe");
  CHECK(visible("\x80x") == "\\x80x");  // a stray continuation byte
  CHECK(visible("\xc3") == "\\xc3");    // cut short
  CHECK(visible("\xe2\x82") == "\\xe2\\x82");
  CHECK(visible("\xc0\xaf") == "\\xc0\\xaf");                    // overlong '/'
  CHECK(visible("\xed\xa0\x80") == "\\xed\\xa0\\x80");           // a surrogate
  CHECK(visible("\xf4\x90\x80\x80") == "\\xf4\\x90\\x80\\x80");  // past U+10FFFF
}
