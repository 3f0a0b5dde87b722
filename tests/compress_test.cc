// Compressed images (save --compress): round trips of every codec over
// every kind of memory and chunk sizes that do and do not divide the block,
// holes where the format promises them, damage in compressed data and chunk
// records found by verify and refused by restore (status 3, never a crash),
// the device-state stream, and the refusals (--lazy, bad --compress).
//
// Sources and restored RAM live in /dev/shm (tmpfs: exact SEEK_DATA), images
// on disk (real O_DIRECT), all in RAII temporary directories.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <functional>

#include <fmt/core.h>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/image_io.h"
#include "format/codec.h"
#include "format/image.h"
#include "tests/test_util.h"

using namespace vmsave;
using json = nlohmann::json;
using test::run_vmsave;
using test::contains;
using test::RunResult;
using test::show;
using test::TempDir;

namespace {

constexpr i64 kPage = 4096;

void require_shm() {
  if (access("/dev/shm", W_OK) != 0) test::skip("/dev/shm is not writable");
}

i64 allocated(const std::string& path) {
  struct stat st;
  REQUIRE(stat(path.c_str(), &st) == 0);
  return static_cast<i64>(st.st_blocks) * 512;
}

std::vector<u8> read_bytes(const std::string& path, i64 off, i64 len) {
  std::vector<u8> out(len);
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(pread(fd, out.data(), len, off) == len);
  close(fd);
  return out;
}

void write_bytes(const std::string& path, i64 off, const std::vector<u8>& b) {
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(pwrite(fd, b.data(), b.size(), off) == static_cast<ssize_t>(b.size()));
  close(fd);
}

void xor_byte(const std::string& path, i64 off, u8 x) {
  std::vector<u8> b = read_bytes(path, off, 1);
  b[0] ^= x;
  write_bytes(path, off, b);
}

ImageLayout layout_of(const std::string& image) {
  i64 size = test::file_size(image);
  auto h = decode_header(read_bytes(image, 0, kHeaderSize), size, image);
  REQUIRE_MESSAGE(h.ok(), h.error().message());
  ImageLayout img = *h;
  Status st =
      decode_section_table(read_bytes(image, img.table.offset, img.table.length), img, image);
  REQUIRE_MESSAGE(st.ok(), st.error().message());
  return img;
}

std::vector<ChunkInfo> chunks_of(const std::string& image, const BlockLayout& b) {
  auto r =
      decode_chunk_records(read_bytes(image, b.chunk_table.offset, b.chunk_table.length), b, image);
  REQUIRE_MESSAGE(r.ok(), r.error().message());
  return *r;
}

// Rewrites the image's tail checksums after an edit of chunk records, so
// only the edit itself can be refused: the chunk table's section entry, the
// section table's checksum and the header's.
void reseal(const std::string& image, ImageLayout img) {
  for (auto& b : img.blocks)
    b.chunk_table.checksum =
        checksum(read_bytes(image, b.chunk_table.offset, b.chunk_table.length));
  std::vector<u8> table = encode_section_table(img);
  REQUIRE(static_cast<i64>(table.size()) == img.table.length);
  img.table.checksum = checksum(table);
  write_bytes(image, img.table.offset, table);
  write_bytes(image, 0, encode_header(img));
}

const std::vector<std::string> kCodecs = {"lz4", "zstd", "zstd:9"};

// One source file of `kind`: save with each codec and chunk size, check
// the report, info, holes, verify, and a restore that equals the source
// and keeps zero pages as holes. `dense`: the source's zero pages are
// written zeros rather than holes (as in a guest that has used them).
void round_trips(const std::string& kind, bool dense = false) {
  require_shm();
  TempDir shm("/dev/shm"), disk, out("/dev/shm");
  // 4 MiB + 8 KiB + 100: not a multiple of any chunk size or of a page.
  const i64 size = 4 * kMiB + 8 * kKiB + 100;
  std::string src = shm / "ram";
  test::write_pattern_file(src, size, kind, 11);
  if (dense) {
    std::ifstream in(src, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream(src, std::ios::binary | std::ios::trunc) << bytes;
    REQUIRE(allocated(src) >= size);
  }
  std::string plain = disk / "plain.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--ram", "ram=" + src, plain}), 0);
  const i64 data_bytes = layout_of(plain).blocks[0].data_pages * kPage;

  for (const std::string& codec : kCodecs) {
    for (const char* chunk : {"64K", "1M", "4M"}) {
      CAPTURE(codec);
      CAPTURE(chunk);
      std::string image = disk / "image.vmsave";
      RunResult r = run_vmsave({"save", "--json", "--ram", "ram=" + src, image, "--compress", codec,
                                "--chunk-size", chunk, "--jobs", "2"});
      REQUIRE_RUN(r, 0);
      json rep = json::parse(r.out);
      CHECK(rep["compress"] == (codec == "zstd" ? "zstd:3" : codec));
      CHECK(rep["uncompressed_bytes"] == data_bytes);
      const i64 stored = rep["stored_bytes"].get<i64>();
      CHECK(stored <= data_bytes);
      if (kind == "random") CHECK(stored == data_bytes);  // nothing shrinks: all raw
      if (kind == "text") CHECK(stored < data_bytes / 2);
      if (kind == "mixed") CHECK(stored < data_bytes * 9 / 10);
      if (kind == "zero") CHECK(stored == 0);
      // lz4 reports the mean acceleration its effort control chose.
      if (codec == "lz4" && rep["compressed_chunks"].get<i64>() > 0) {
        REQUIRE(rep.contains("lz4_acceleration"));
        CHECK(rep["lz4_acceleration"].get<double>() >= 1);
        CHECK(rep["lz4_acceleration"].get<double>() <= kMaxLz4Acceleration);
      }
      if (codec != "lz4") CHECK_FALSE(rep.contains("lz4_acceleration"));
      // Nothing compressed (random data): no effort to report.
      if (rep["compressed_chunks"].get<i64>() == 0) CHECK_FALSE(rep.contains("lz4_acceleration"));

      // info agrees, and the image occupies about what it stores.
      RunResult ir = run_vmsave({"info", "--json", image});
      REQUIRE_RUN(ir, 0);
      json info = json::parse(ir.out);
      CHECK(info["format_version"] == "1.1");
      CHECK(info["compression"]["codec"] == rep["compress"]);
      CHECK(info["compression"]["stored_bytes"] == stored);
      CHECK(info["compression"]["uncompressed_bytes"] == data_bytes);
      CHECK(info["compression"]["compressed_chunks"] == rep["compressed_chunks"]);
      if (data_bytes)
        CHECK(info["compression"]["ratio"].get<double>() ==
              doctest::Approx(double(stored) / double(data_bytes)));
      CHECK(allocated(image) <= stored + 256 * kKiB);
      RunResult hr = run_vmsave({"info", image});
      REQUIRE_RUN(hr, 0);
      CHECK_MESSAGE(contains(hr.out, "compression:  " + rep["compress"].get<std::string>()),
                    hr.out);

      // Each compressed chunk: its bytes at the chunk's own offset, the
      // rest of its slot a hole.
      ImageLayout img = layout_of(image);
      const BlockLayout& b = img.blocks[0];
      std::vector<ChunkInfo> cs = chunks_of(image, b);
      int fd = open(image.c_str(), O_RDONLY | O_CLOEXEC);
      REQUIRE(fd >= 0);
      i64 compressed = 0;
      for (i64 c = 0; c < b.chunks(); c++) {
        if (cs[c].codec == Codec::kRaw) continue;
        compressed++;
        i64 at = b.region.offset + c * b.chunk_size;
        i64 used = align_up(cs[c].stored_length, kPage);
        CHECK(lseek(fd, at, SEEK_DATA) == at);
        off_t next = lseek(fd, at + used, SEEK_DATA);
        if (next >= 0 && next < at + b.chunk_length(c)) {
          CAPTURE(c);
          FAIL_CHECK("data in the slot after a compressed chunk, at ", next);
        }
      }
      close(fd);
      CHECK(compressed == rep["compressed_chunks"].get<i64>());
      if (kind == "text") CHECK(compressed == b.chunks());
      if (kind == "random" || kind == "zero") CHECK(compressed == 0);

      RunResult vr = run_vmsave({"verify", "--json", image});
      REQUIRE_RUN(vr, 0);
      CHECK(json::parse(vr.out)["chunks_checked"] == b.chunks());

      std::string rdir = out / "restored";
      REQUIRE(mkdir(rdir.c_str(), 0700) == 0);
      RunResult rr = run_vmsave({"restore", image, "--ram-dir", rdir, "--jobs", "2"});
      REQUIRE_RUN(rr, 0);
      std::string why;
      CHECK_MESSAGE(test::files_equal(src, rdir + "/ram", &why), why);
      // Zero pages stay holes in the restored file, compressed or not.
      CHECK(allocated(rdir + "/ram") <= data_bytes);
      std::filesystem::remove_all(rdir);
      REQUIRE(unlink(image.c_str()) == 0);
    }
  }
}

// A compressed image of two blocks of text and mixed memory, with the
// offsets of its compressed chunks.
struct CompressedImage {
  TempDir shm{"/dev/shm"};
  TempDir disk;
  std::string image = disk / "image.vmsave";
  CompressedImage(const std::string& codec = "zstd") {
    test::write_pattern_file(shm / "ram0", 2 * kMiB + 4 * kKiB, "text", 3);
    test::write_pattern_file(shm / "ram1", 3 * kMiB, "mixed", 4);
    RunResult r = run_vmsave({"save", "--ram", "ram0=" + (shm / "ram0"), "--ram",
                              "ram1=" + (shm / "ram1"), image, "--compress", codec});
    REQUIRE_RUN(r, 0);
  }
};

// The failure contract: the status and one "vmsave: error:" line at the end.
void check_fails(const RunResult& r, int status, const std::string& needle) {
  CHECK_MESSAGE(r.status == status, show(r));
  CHECK_MESSAGE(contains(r.err, "vmsave: error: "), show(r));
  CHECK_MESSAGE(contains(r.err, needle), show(r));
}

}  // namespace

TEST_CASE("compress: round trips of random memory store every chunk raw") {
  round_trips("random");
}
TEST_CASE("compress: round trips of zero memory store nothing") {
  round_trips("zero");
}
TEST_CASE("compress: round trips of text memory compress every chunk") {
  round_trips("text");
}
TEST_CASE("compress: round trips of mixed memory keep holes") {
  round_trips("mixed");
}
TEST_CASE("compress: round trips of mixed memory whose zero pages are written zeros") {
  round_trips("mixed", /*dense=*/true);
}

TEST_CASE("compress: damaged compressed chunks are found by verify and refused by restore") {
  require_shm();
  for (const char* codec : {"lz4", "zstd"}) {
    CAPTURE(codec);
    CompressedImage s(codec);
    const ImageLayout img = layout_of(s.image);
    TempDir out("/dev/shm");
    struct Flip {
      std::string what;
      i64 offset;
      std::string needle;
    };
    std::vector<Flip> flips;
    for (size_t bi = 0; bi < img.blocks.size(); bi++) {
      const BlockLayout& b = img.blocks[bi];
      std::vector<ChunkInfo> cs = chunks_of(s.image, b);
      i64 c = 0;
      while (c < b.chunks() && cs[c].codec == Codec::kRaw) c++;
      REQUIRE(c < b.chunks());
      i64 at = b.region.offset + c * b.chunk_size;
      std::string chunk = fmt::format("RAM block {} chunk {}", b.id, c);
      for (i64 o : {i64(0), cs[c].stored_length / 2, cs[c].stored_length - 1})
        flips.push_back({"stored data", at + o, chunk});
      if (cs[c].stored_length % kPage)  // padding, not covered by the checksum
        flips.push_back({"padding", at + cs[c].stored_length, chunk});
      for (i64 o : {i64(0), i64(4), i64(8), b.chunk_table.length - 1})
        flips.push_back({"chunk codec table", b.chunk_table.offset + o, "chunk codec table"});
    }
    i64 vm_len = img.vmstate.length;  // raw mode: no device state
    CHECK(vm_len == 0);
    for (const Flip& f : flips) {
      CAPTURE(f.what);
      CAPTURE(f.offset);
      xor_byte(s.image, f.offset, 0x5a);
      RunResult r = run_vmsave({"verify", s.image});
      check_fails(r, 3, f.needle);
      CHECK(contains(r.err, "offset"));
      r = run_vmsave({"restore", s.image, "--ram-dir", out.path()});
      check_fails(r, 3, f.needle);
      CHECK(std::filesystem::is_empty(out.path()));
      xor_byte(s.image, f.offset, 0x5a);
    }
    CHECK_RUN(run_vmsave({"verify", s.image}), 0);

    // Past the padded data, the rest of the chunk's slot is read by no
    // restore: verify called a byte there intact.
    const BlockLayout& b = img.blocks[0];
    std::vector<ChunkInfo> cs = chunks_of(s.image, b);
    i64 c = 0;
    while (c < b.chunks() && (cs[c].codec == Codec::kRaw ||
                              align_up(cs[c].stored_length, kPage) + kPage > b.chunk_length(c)))
      c++;
    REQUIRE(c < b.chunks());
    const i64 tail = b.region.offset + c * b.chunk_size + b.chunk_length(c) - 10;
    xor_byte(s.image, tail, 0x5a);
    check_fails(run_vmsave({"verify", s.image}), 3,
                fmt::format("RAM block {} chunk {} byte {} of its slot, after the compressed data, "
                            "is not zero",
                            b.id, c, b.chunk_length(c) - 10));
    CHECK_RUN(run_vmsave({"restore", s.image, "--ram-dir", out.path()}), 0);
    xor_byte(s.image, tail, 0x5a);
    CHECK_RUN(run_vmsave({"verify", s.image}), 0);
  }
}

TEST_CASE("compress: garbage behind a valid checksum is refused by the decompressor") {
  require_shm();
  for (const char* codec : {"lz4", "zstd"}) {
    CAPTURE(codec);
    CompressedImage s(codec);
    ImageLayout img = layout_of(s.image);
    const BlockLayout& b = img.blocks[0];
    std::vector<ChunkInfo> cs = chunks_of(s.image, b);
    REQUIRE(cs[0].codec != Codec::kRaw);
    const std::vector<u8> table = read_bytes(s.image, b.chunk_table.offset, b.chunk_table.length);
    const std::vector<u8> data = read_bytes(s.image, b.region.offset, cs[0].stored_length);
    TempDir out("/dev/shm");
    // Each edit keeps every checksum right (record, tables, header), so
    // only the decoder and the decompressor stand between it and a crash.
    struct Edit {
      const char* what;
      std::function<void(std::vector<ChunkInfo>&, std::vector<u8>&)> fn;
      const char* needle;
    };
    std::vector<Edit> edits = {
        {"flipped data", [](auto&, auto& d) { d[d.size() / 2] ^= 0x40; }, "chunk 0"},
        {"garbage data",
         [](auto&, auto& d) {
           for (size_t i = 0; i < d.size(); i++) d[i] = u8(i * 131);
         },
         "does not decompress"},
        {"cut short", [](auto& c, auto&) { c[0].stored_length /= 2; }, "chunk 0"},
        {"longer", [](auto& c, auto&) { c[0].stored_length += 100; }, "chunk 0"},
        {"other codec",
         [](auto& c, auto&) {
           c[0].codec = c[0].codec == Codec::kLz4 ? Codec::kZstd : Codec::kLz4;
         },
         "does not decompress"},
        {"too long", [](auto& c, auto&) { c[0].stored_length = kMiB; }, "stored length"},
        {"raw with length", [](auto& c, auto&) { c[0].codec = Codec::kRaw; }, "raw chunk"},
    };
    for (auto& e : edits) {
      CAPTURE(e.what);
      std::vector<ChunkInfo> c = cs;
      std::vector<u8> d = data;
      e.fn(c, d);
      i64 n = std::min<i64>(c[0].stored_length, align_up(cs[0].stored_length, kPage));
      d.resize(std::max<i64>(n, 0), 0);
      c[0].checksum = c[0].codec == Codec::kRaw ? 0 : checksum(d);
      write_bytes(s.image, b.region.offset, d);
      write_bytes(s.image, b.chunk_table.offset, encode_chunk_records(c));
      reseal(s.image, img);
      RunResult r = run_vmsave({"verify", s.image});
      check_fails(r, 3, e.needle);
      r = run_vmsave({"restore", s.image, "--ram-dir", out.path()});
      check_fails(r, 3, e.needle);
      CHECK(std::filesystem::is_empty(out.path()));
      // Put the original back.
      std::vector<u8> orig_slot = data;
      orig_slot.resize(align_up(cs[0].stored_length, kPage), 0);
      write_bytes(s.image, b.region.offset, orig_slot);
      write_bytes(s.image, b.chunk_table.offset, table);
      reseal(s.image, img);
      REQUIRE_RUN(run_vmsave({"verify", s.image}), 0);
    }
  }
}

// A restore writes only the pages the bitmap marks, so a compressed chunk
// whose page holds data the bitmap calls zero would be restored wrong
// though its checksum matches: damage, for verify and restore alike.
TEST_CASE("compress: a page the bitmap marks zero must decompress to zeros") {
  require_shm();
  TempDir shm("/dev/shm"), disk, out("/dev/shm");
  std::string src = shm / "ram";
  test::write_pattern_file(src, 4 * kMiB, "text", 12);
  for (const std::string& codec : kCodecs) {
    CAPTURE(codec);
    std::string image = disk / "image.vmsave";
    REQUIRE_RUN(run_vmsave({"save", "--force", "--ram", "ram=" + src, image, "--compress", codec}),
                0);
    ImageLayout img = layout_of(image);
    BlockLayout& b = img.blocks[0];
    REQUIRE(chunks_of(image, b)[1].codec != Codec::kRaw);
    const i64 page = 300;  // in chunk 1
    std::vector<u8> bits = read_bytes(image, b.bitmap.offset, b.bitmap.length);
    REQUIRE(((bits[page / 8] >> (page % 8)) & 1) == 1);
    bits[page / 8] &= static_cast<u8>(~(1 << (page % 8)));
    write_bytes(image, b.bitmap.offset, bits);
    b.bitmap.checksum = checksum(bits);
    b.data_pages--;
    reseal(image, img);
    check_fails(run_vmsave({"verify", image}), 3, "page 300 is marked zero but holds data");
    check_fails(run_vmsave({"restore", image, "--ram-dir", out.path()}), 3,
                "page 300 is marked zero but holds data");
    CHECK(std::filesystem::is_empty(out.path()));
  }
}

TEST_CASE("compress: the device state streams through zstd and is checked") {
  require_shm();
  TempDir shm("/dev/shm"), disk;
  test::write_pattern_file(shm / "ram", kMiB, "mixed", 9);
  std::string image = disk / "image.vmsave";
  // Device state: 3 MiB of text with some random (fed in odd pieces).
  std::string vm_src = shm / "vmstate";
  test::write_pattern_file(vm_src, 3 * kMiB + 123, "mixed", 10);
  std::string vm = test::read_file(vm_src);
  test::write_image_of(image, shm / "ram", "lz4", vm,
                       {{"mode", "qemu"}, {"vmstate_bytes", vm.size()}});
  ImageLayout img = layout_of(image);
  CHECK(img.vmstate_codec == Codec::kZstd);
  CHECK(img.vmstate.length < static_cast<i64>(vm.size()));
  auto read_back = [&](std::string* got) {
    auto r = ImageReader::open(image, nullptr);
    REQUIRE(r.ok());
    return (*r)->stream_vmstate([&](const u8* p, size_t n) {
      got->append(reinterpret_cast<const char*>(p), n);
      return Status();
    });
  };
  std::string got;
  Status st = read_back(&got);
  REQUIRE_MESSAGE(st.ok(), st.error().message());
  CHECK(got == vm);
  CHECK_RUN(run_vmsave({"verify", image}), 0);
  for (i64 off : {i64(0), img.vmstate.length / 2, img.vmstate.length - 1}) {
    CAPTURE(off);
    xor_byte(image, img.vmstate.offset + off, 0x21);
    got.clear();
    Status bad = read_back(&got);
    REQUIRE_FALSE(bad.ok());
    CHECK(bad.error().status == Exit::kDamaged);
    check_fails(run_vmsave({"verify", image}), 3, "device state");
    xor_byte(image, img.vmstate.offset + off, 0x21);
  }
}

TEST_CASE("compress: a device state of another size than QEMU sent is damage") {
  // A section cut short (its checksum rewritten to match) or relabelled
  // uncompressed was called intact; a restore failed in QEMU instead.
  require_shm();
  TempDir shm("/dev/shm"), disk;
  test::write_pattern_file(shm / "ram", kMiB, "mixed", 9);
  const std::string vm(200000, 'v');
  for (const char* codec : {"", "zstd"}) {
    for (i64 said : {i64(vm.size()), i64(vm.size()) - 1000, i64(vm.size()) + 1}) {
      CAPTURE(std::string(codec));
      CAPTURE(said);
      const std::string image = disk / "image.vmsave";
      test::write_image_of(image, shm / "ram", codec, vm,
                           {{"mode", "qemu"}, {"vmstate_bytes", said}});
      RunResult r = run_vmsave({"verify", image});
      if (said == i64(vm.size())) {
        CHECK_RUN(r, 0);
      } else if (*codec) {
        check_fails(r, 3,
                    fmt::format("the device state decompresses to {} bytes, the metadata says "
                                "QEMU sent {}",
                                vm.size(), said));
      } else {
        check_fails(r, 3,
                    fmt::format("the device state is {} bytes, the metadata says QEMU sent {}",
                                vm.size(), said));
      }
    }
  }
}

TEST_CASE("compress: chunks over 4 MiB are refused with a fix that can work") {
  // On 1 GiB pages it said to use a smaller --chunk-size, which a chunk of
  // at least a page cannot be (trial M).
  TempDir disk;
  for (i64 page : {i64(kPage), i64(kGiB)}) {
    CAPTURE(page);
    BlockLayout b;
    b.id = "ram";
    b.size = kGiB;
    b.page_size = page;
    auto w = ImageWriter::create(disk / "image.vmsave", true, {b}, kGiB, nullptr);
    REQUIRE_MESSAGE(w.ok(), w.error().message());
    Status st = (*w)->set_compression(*parse_codec_spec("lz4"));
    REQUIRE_FALSE(st.ok());
    CHECK(st.error().status == Exit::kUsage);
    CHECK_MESSAGE(
        st.error().hint == (page == kGiB ? "its pages are 1.0 GiB: save it without --compress"
                                         : "use a smaller --chunk-size, or save without "
                                           "--compress"),
        st.error().message());
  }
}

TEST_CASE("compress: metadata whose blocks disagree with the section table is damage") {
  // info showed the metadata's size for a block, and verify called it intact.
  require_shm();
  TempDir shm("/dev/shm"), disk;
  test::write_pattern_file(shm / "ram", kMiB, "mixed", 9);
  const nlohmann::json right = {{"id", "ram"}, {"size", kMiB}, {"page_size", kPage}};
  struct Case {
    nlohmann::json blocks;
    std::string says;
  };
  for (const Case& c :
       {Case{{right}, ""},
        Case{{{{"id", "ram"}, {"size", kMiB + kPage}}},
             "metadata's block 0 (\"ram\") disagrees with its record (ram, 1048576 bytes, "
             "pages of 4096)"},
        Case{{{{"id", "other"}, {"size", kMiB}}}, "metadata's block 0 (\"other\") disagrees"},
        Case{{right, right}, "metadata lists other RAM blocks than the section table's 1"}}) {
    CAPTURE(c.blocks.dump());
    const std::string image = disk / "image.vmsave";
    test::write_image_of(image, shm / "ram", "", "", {{"mode", "raw"}, {"blocks", c.blocks}});
    for (const char* cmd : {"verify", "info"}) {
      RunResult r = run_vmsave({cmd, image});
      if (c.says.empty())
        CHECK_RUN(r, 0);
      else
        check_fails(r, 3, c.says);
    }
  }
}

TEST_CASE("compress: a metadata mode vmsave does not know is damage, not raw memory files") {
  // "container" was restored with --ram-dir as raw memory files, and
  // prepare said the image held files saved with --ram (trial O).
  require_shm();
  TempDir shm("/dev/shm"), disk, out;
  test::write_pattern_file(shm / "ram", kMiB, "mixed", 9);
  const std::string image = disk / "image.vmsave";
  test::write_image_of(image, shm / "ram", "", "", {{"mode", "container"}});
  for (std::vector<std::string> cmd : {std::vector<std::string>{"verify", image},
                                       {"info", image},
                                       {"restore", image, "--ram-dir", out.path()},
                                       {"prepare", image, "--lazy"}}) {
    CAPTURE(cmd[0]);
    check_fails(run_vmsave(cmd), 3, "metadata names an unknown mode \"container\"");
  }
  CHECK(std::filesystem::is_empty(out.path()));
  test::write_image_of(image, shm / "ram", "", "", {{"mode", "raw"}});
  CHECK_RUN(run_vmsave({"verify", image}), 0);
}

TEST_CASE("compress: --lazy on a compressed image is refused before anything starts") {
  require_shm();
  CompressedImage s;
  TempDir dir("/dev/shm");
  const std::string want = "restore it eagerly (without --lazy), or save the VM without --compress";
  // The QEMU binary would fail if it ran: a missing program.
  RunResult r = run_vmsave({"restore", "--lazy", s.image, "--", dir / "no-such-qemu", "-m", "1G"});
  check_fails(r, 2, want);
  r = run_vmsave({"prepare", "--lazy", s.image});
  check_fails(r, 2, want);
  CHECK(r.out.empty());
  CHECK(std::filesystem::is_empty(dir.path()));
}

TEST_CASE("compress: bad --compress values are usage errors that create nothing") {
  require_shm();
  TempDir shm("/dev/shm"), disk;
  test::write_pattern_file(shm / "ram", 64 * kKiB, "text", 5);
  std::string image = disk / "image.vmsave";
  for (std::vector<std::string> extra : {std::vector<std::string>{"--compress", "lz5"},
                                         {"--compress", "zstd:0"},
                                         {"--compress", "zstd:20"},
                                         {"--compress", "zstd:fast"},
                                         {"--compress", "lz4:1"},
                                         {"--compress", ""},
                                         {"--compress", "zstd", "--chunk-size", "8M"},
                                         {"--compress"}}) {
    std::vector<std::string> args = {"save", "--ram", "ram=" + (shm / "ram"), image};
    args.insert(args.end(), extra.begin(), extra.end());
    CAPTURE(extra.back());
    RunResult r = run_vmsave(args);
    CHECK_RUN(r, 2);
    CHECK(contains(r.err, "compress"));
    CHECK(std::filesystem::is_empty(disk.path()));
  }
}
