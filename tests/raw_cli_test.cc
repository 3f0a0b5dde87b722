// The command line in raw mode, adversarially: images cut at every size and
// flipped in every section (ninja's DepsLogTest.Truncated, run against the
// real binary), refusals to overwrite, file modes and symlinks, usage
// errors, and the exit status and one-line message of each failure.
//
// Every case runs build/vmsave; status >= 128 means it crashed (under
// ASan/UBSan an error report also ends the process that way).

#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <fmt/core.h>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "core/vmsave.h"
#include "format/hash.h"
#include "format/image.h"
#include "io/fd.h"
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

// The failure contract: the expected status, and one error line,
// "vmsave: error: ...", ending stderr (after any finished-phase lines).
bool fails_cleanly(const RunResult& r, int status, const std::string& needle = "") {
  if (r.status != status || r.err.empty() || r.err.back() != '\n') return false;
  size_t start = r.err.rfind('\n', r.err.size() - 2);
  start = start == std::string::npos ? 0 : start + 1;
  std::string last = r.err.substr(start);
  if (last.rfind("vmsave: error: ", 0) != 0) return false;
  if (r.err.find("vmsave: error: ") != start) return false;  // only one
  return needle.empty() || contains(last, needle);
}
#define CHECK_FAILS(r, status, needle) CHECK_MESSAGE(fails_cleanly(r, status, needle), show(r))

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  for (auto& e : std::filesystem::directory_iterator(dir)) out.push_back(e.path().filename());
  std::sort(out.begin(), out.end());
  return out;
}

void require_shm() {
  if (access("/dev/shm", W_OK) != 0) test::skip("/dev/shm is not writable");
}

void write_string(const std::string& path, const std::string& s) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  REQUIRE(fd >= 0);
  REQUIRE(write(fd, s.data(), s.size()) == static_cast<ssize_t>(s.size()));
  close(fd);
}

u8 xor_byte(const std::string& path, i64 off, u8 x) {
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);
  u8 b;
  REQUIRE(pread(fd, &b, 1, off) == 1);
  u8 nb = b ^ x;
  REQUIRE(pwrite(fd, &nb, 1, off) == 1);
  close(fd);
  return b;
}

std::vector<u8> read_bytes(const std::string& path, i64 off, i64 len) {
  std::vector<u8> out(len);
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(pread(fd, out.data(), len, off) == len);
  close(fd);
  return out;
}

// The image's layout, decoded in-test with format/ (info --json does not
// give the tail's offsets).
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

// A small image of two 256 KiB blocks of mixed memory: every section
// present, small enough to cut at every 4 KiB boundary.
struct SmallImage {
  TempDir shm{"/dev/shm"};
  TempDir disk;
  std::string image = disk / "image.vmsave";
  std::vector<std::string> ids = {"ram0", "ram1"};

  SmallImage() {
    std::vector<std::string> args = {"save"};
    for (size_t i = 0; i < ids.size(); i++) {
      test::write_pattern_file(shm / ids[i], 256 * kKiB, "mixed", 21 + i);
      args.push_back("--ram");
      args.push_back(ids[i] + "=" + (shm / ids[i]));
    }
    args.push_back(image);
    RunResult r = run_vmsave(args);
    REQUIRE_RUN(r, 0);
  }
};

// Cuts a copy of the image at every 4 KiB boundary and a few odd sizes,
// largest first (so one file is shrunk in place), and runs `cmd` on each.
void truncation_sweep(const std::string& cmd) {
  require_shm();
  SmallImage s;
  std::string cut = s.disk / "cut.vmsave";
  std::filesystem::copy_file(s.image, cut);
  const i64 size = test::file_size(cut);
  REQUIRE(size % kPage == 0);
  std::vector<i64> sizes = {size - 1, 4095, 100, 1, 0};
  for (i64 n = size - kPage; n > 0; n -= kPage) sizes.push_back(n);
  std::sort(sizes.rbegin(), sizes.rend());
  TempDir out;
  i64 ran = 0;
  for (i64 n : sizes) {
    REQUIRE(truncate(cut.c_str(), n) == 0);
    ran++;
    if (n % (16 * kPage) != 0 && n % kPage == 0) {
      // Most boundaries run in-process through the same core functions the
      // binary calls (fast under ASan, like ninja's DepsLogTest.Truncated);
      // every 16th boundary and the odd sizes run the real binary below.
      NullReporter quiet;
      Result<nlohmann::json> res = Error{"unset"};
      if (cmd == "info") res = vmsave::info(cut);
      if (cmd == "verify") res = vmsave::verify(cut, EngineConfig{}, quiet);
      if (cmd == "restore") {
        RestoreOptions o;
        o.image = cut;
        o.ram_dir = out.path();
        res = restore_raw(o, quiet);
      }
      if (res.ok() || res.error().status != Exit::kDamaged) {
        CAPTURE(n);
        FAIL_CHECK((res.ok() ? std::string("accepted") : res.error().message()));
      }
    } else {
      std::vector<std::string> args = {cmd, cut};
      if (cmd == "restore") args = {"restore", cut, "--ram-dir", out.path()};
      RunResult r = run_vmsave(args, 30);
      if (!fails_cleanly(r, 3)) {
        CAPTURE(n);
        FAIL_CHECK(show(r));
      }
      if (r.status >= 128) FAIL("vmsave crashed on an image cut to ", n, " bytes");
    }
    if (cmd == "restore" && !list_dir(out.path()).empty()) FAIL("restore left files at size ", n);
  }
  CHECK(ran > 1000);  // every boundary of a ~4.3 MiB image
  test::record_figure("truncations_" + cmd, ran);
}

}  // namespace

// ------------------------------------------------------------- truncation

TEST_CASE("raw: info refuses an image cut at any size") {
  truncation_sweep("info");
}
TEST_CASE("raw: verify refuses an image cut at any size") {
  truncation_sweep("verify");
}
TEST_CASE("raw: restore refuses an image cut at any size and writes nothing") {
  truncation_sweep("restore");
}

// ------------------------------------------------------------- byte flips

TEST_CASE("raw: a flipped byte in any section is damage that verify finds and restore refuses") {
  require_shm();
  SmallImage s;
  const ImageLayout img = layout_of(s.image);
  REQUIRE(img.blocks.size() == 2);
  TempDir out;

  struct Flip {
    std::string what;
    i64 offset;
    bool info_reads;  // info fails too (header, table, metadata)
  };
  std::vector<Flip> flips;
  for (i64 off :
       {0, 5, 7, 12, 16, 23, 24, 39, 40, 48, 55, 56, 64, 72, 79, 80, 1000, 4087, 4088, 4095})
    flips.push_back({"header", off, true});
  for (size_t b = 0; b < img.blocks.size(); b++) {
    const BlockLayout& bl = img.blocks[b];
    std::vector<u8> bitmap = read_bytes(s.image, bl.bitmap.offset, bl.bitmap.length);
    i64 data = 0;
    for (i64 p = 0; p < bl.pages(); p++) {
      if (!bitmap_test(bitmap.data(), p)) continue;
      // A different byte of each page: first, last and in between.
      i64 in_page = (p * 997) % kPage;
      if (data == 0) in_page = 0;
      flips.push_back({"RAM page " + std::to_string(p) + " of " + bl.id,
                       bl.region.offset + p * kPage + in_page, false});
      data++;
    }
    CHECK(data == bl.data_pages);
    CHECK(data > 0);
    for (i64 off : {i64(0), bl.bitmap.length - 1})
      flips.push_back({"bitmap of " + bl.id, bl.bitmap.offset + off, false});
    for (i64 off : {i64(0), bl.sums.length / 2 + 3, bl.sums.length - 1})
      flips.push_back({"chunk table of " + bl.id, bl.sums.offset + off, false});
  }
  for (i64 off : {i64(0), img.metadata.length / 2, img.metadata.length - 1})
    flips.push_back({"metadata", img.metadata.offset + off, true});
  for (i64 off : {i64(0), i64(40), img.table.length / 2, img.table.length - 1})
    flips.push_back({"section table", img.table.offset + off, true});

  for (const Flip& f : flips) {
    CAPTURE(f.what);
    CAPTURE(f.offset);
    u8 before = xor_byte(s.image, f.offset, 0x5a);
    // The major version field can only read as a newer version.
    bool version = f.what == "header" && f.offset >= 8 && f.offset < 12;
    std::string needle = version ? "too new" : "damaged";

    RunResult r = run_vmsave({"verify", s.image});
    CHECK_FAILS(r, 3, needle);
    if (f.what.rfind("RAM page", 0) == 0) CHECK_MESSAGE(contains(r.err, "chunk"), r.err);

    r = run_vmsave({"restore", s.image, "--ram-dir", out.path()});
    CHECK_FAILS(r, 3, needle);
    CHECK_MESSAGE(list_dir(out.path()).empty(), "restore left files behind");
    std::filesystem::remove_all(out.path());
    std::filesystem::create_directory(out.path());

    r = run_vmsave({"info", s.image});
    if (f.info_reads)
      CHECK_FAILS(r, 3, needle);
    else
      CHECK_RUN(r, 0);  // info reads no RAM, bitmaps or chunk tables

    xor_byte(s.image, f.offset, 0x5a);
    REQUIRE(read_bytes(s.image, f.offset, 1)[0] == before);
  }
  // Undone, the image is intact again.
  CHECK_RUN(run_vmsave({"verify", s.image}), 0);
  test::record_figure("byte_flips", flips.size());
}

TEST_CASE("raw: a byte outside every section (padding, gaps between regions) is damage to verify") {
  // No checksum covers those bytes and no restore reads them: verify called
  // an image with one flipped there intact.
  require_shm();
  SmallImage s;
  const ImageLayout img = layout_of(s.image);
  REQUIRE(img.blocks.size() == 2);
  const BlockLayout& b0 = img.blocks[0];
  std::vector<std::pair<std::string, i64>> places = {
      {"after the header", kHeaderSize + 10},
      {"between the RAM regions", b0.region.offset + b0.region.length + 4096},
      {"after the metadata", img.metadata.offset + img.metadata.length},
      {"the file's last byte", img.file_size - 1},
  };
  REQUIRE(b0.region.offset + b0.region.length + 4096 < img.blocks[1].region.offset);
  REQUIRE(img.metadata.length % 4096 != 0);
  REQUIRE(img.file_size - 1 >= img.table.offset + img.table.length);
  TempDir out;
  for (auto& [what, at] : places) {
    CAPTURE(what);
    CAPTURE(at);
    xor_byte(s.image, at, 0x5a);
    CHECK_FAILS(run_vmsave({"verify", s.image}), 3,
                fmt::format("at offset {}: a byte outside every section is not zero", at));
    // What restores read is intact: they go on.
    CHECK_RUN(run_vmsave({"restore", "--force", s.image, "--ram-dir", out.path()}), 0);
    CHECK_RUN(run_vmsave({"info", s.image}), 0);
    xor_byte(s.image, at, 0x5a);
  }
  CHECK_RUN(run_vmsave({"verify", s.image}), 0);
}

TEST_CASE("raw: a section of a newer minor version is skipped, its bytes no damage") {
  // "Newer minors only add section kinds": verify called such a section's
  // bytes "a byte outside every section" (trial L).
  require_shm();
  SmallImage s;
  ImageLayout img = layout_of(s.image);
  const BlockLayout& b0 = img.blocks[0];
  const i64 at = b0.region.offset + b0.region.length + 4096;  // in the gap before block 1
  REQUIRE(at + 4096 <= img.blocks[1].region.offset);
  const std::string future = "a section this vmsave does not know";
  std::vector<u8> data(4096, 0);
  std::memcpy(data.data(), future.data(), future.size());
  std::vector<u8> table = read_bytes(s.image, img.table.offset, img.table.length);
  SectionEntry e{};
  e.kind = 10;
  e.block = kNoBlock;
  e.offset = at;
  e.length = data.size();
  e.checksum = xxh3(data.data(), data.size());
  const u8* ep = reinterpret_cast<const u8*>(&e);
  table.insert(table.end(), ep, ep + sizeof(e));
  // And one of block 0 with flags and reserved bytes of its own: what they
  // mean is that minor's business (they were called damage, trial O).
  SectionEntry e2 = e;
  e2.kind = 11;
  e2.block = 0;
  e2.flags = 1;
  e2.reserved[3] = 7;
  e2.offset = at + 8192;
  const u8* ep2 = reinterpret_cast<const u8*>(&e2);
  table.insert(table.end(), ep2, ep2 + sizeof(e2));
  img.minor = kFormatMinor + 1;
  img.table.length = table.size();
  img.table.checksum = xxh3(table.data(), table.size());
  img.file_size = std::max(img.file_size, img.table.offset + img.table.length);
  std::vector<u8> header = encode_header(img);
  {
    UniqueFd fd(open(s.image.c_str(), O_WRONLY | O_CLOEXEC));
    REQUIRE(fd);
    REQUIRE(pwrite(fd.get(), data.data(), data.size(), at) == i64(data.size()));
    REQUIRE(pwrite(fd.get(), data.data(), data.size(), at + 8192) == i64(data.size()));
    REQUIRE(pwrite(fd.get(), table.data(), table.size(), img.table.offset) == i64(table.size()));
    REQUIRE(pwrite(fd.get(), header.data(), header.size(), 0) == i64(header.size()));
  }
  RunResult v = run_vmsave({"verify", s.image});
  CHECK_RUN(v, 0);
  // Intact as far as this vmsave can tell, and it says how far that is.
  CHECK_MESSAGE(contains(v.err, fmt::format("not checked: 2 sections of format v1.{}, newer than "
                                            "this vmsave (v1.{})",
                                            kFormatMinor + 1, kFormatMinor)),
                v.err);
  RunResult vj = run_vmsave({"verify", s.image, "--json"});
  CHECK_RUN(vj, 0);
  CHECK(json::parse(vj.out).value("unchecked_sections", 0) == 2);
  CHECK_RUN(run_vmsave({"info", s.image}), 0);
  TempDir out;
  CHECK_RUN(run_vmsave({"restore", s.image, "--ram-dir", out.path()}), 0);
  // Its bytes are its own, not a place for anything else.
  xor_byte(s.image, at + 5000, 0x5a);
  RunResult r = run_vmsave({"verify", s.image});
  CHECK_FAILS(r, 3,
              fmt::format("at offset {}: a byte outside every section is not zero; use an intact "
                          "copy of the image\n",
                          at + 5000));
  // verify's own error does not send the user to verify.
  CHECK_MESSAGE(!contains(r.err, "vmsave verify names"), r.err);
}

TEST_CASE("raw: verify --json reports damage, and a zeroed header is an unfinished save") {
  require_shm();
  SmallImage s;
  const ImageLayout img = layout_of(s.image);
  {
    const BlockLayout& bl = img.blocks[1];
    std::vector<u8> bitmap = read_bytes(s.image, bl.bitmap.offset, bl.bitmap.length);
    i64 p = 0;
    while (!bitmap_test(bitmap.data(), p)) p++;
    xor_byte(s.image, bl.region.offset + p * kPage + 17, 1);
    RunResult r = run_vmsave({"verify", "--json", s.image});
    CHECK_FAILS(r, 3, "ram1");
    json j = json::parse(r.out);
    CHECK(j["ok"] == false);
    CHECK(contains(j["error"].get<std::string>(), "chunk 0"));
  }
  {
    int fd = open(s.image.c_str(), O_RDWR | O_CLOEXEC);
    REQUIRE(fd >= 0);
    std::vector<u8> zeros(kHeaderSize, 0);
    REQUIRE(pwrite(fd, zeros.data(), zeros.size(), 0) == kHeaderSize);
    close(fd);
    for (const char* cmd : {"info", "verify"})
      CHECK_FAILS(run_vmsave({cmd, s.image}), 3, "did not finish");
    // With --json every command's failure is a JSON object on stdout too.
    TempDir out;
    for (std::vector<std::string> args : {std::vector<std::string>{"info", s.image},
                                          {"verify", s.image},
                                          {"restore", s.image, "--ram-dir", out.path()},
                                          {"save", "--ram", "ram=" + out / "missing", s.image}}) {
      args.push_back("--json");
      CAPTURE(args[0]);
      RunResult r = run_vmsave(args);
      const int status = args[0] == "save" ? 1 : 3;
      CHECK_RUN(r, status);
      json j = json::parse(r.out, nullptr, false);
      REQUIRE_MESSAGE(j.is_object(), r.out);
      CHECK(j["command"] == args[0]);
      CHECK(j["ok"] == false);
      CHECK(j["exit_status"] == status);
      CHECK_MESSAGE(contains(r.err, "vmsave: error: " + j["error"].get<std::string>()), r.err);
    }
  }
}

// ------------------------------------------------------ refusals and modes

TEST_CASE("raw: restore refuses an existing RAM file without --force and overwrites with it") {
  require_shm();
  SmallImage s;
  TempDir out("/dev/shm");
  const std::string precious = "precious data, not a RAM block\n";
  // Only the second block's file exists: nothing may be written for the
  // first either (refused up front, not half-way).
  write_string(out / "ram1", precious);
  RunResult r = run_vmsave({"restore", s.image, "--ram-dir", out.path()});
  CHECK_FAILS(r, 1, "exists");
  CHECK_MESSAGE(contains(r.err, out / "ram1"), r.err);
  CHECK(test::read_file(out / "ram1") == precious);
  CHECK(list_dir(out.path()) == std::vector<std::string>{"ram1"});

  r = run_vmsave({"restore", s.image, "--ram-dir", out.path(), "--force"});
  REQUIRE_RUN(r, 0);
  for (auto& id : s.ids) {
    std::string why;
    CHECK_MESSAGE(test::files_equal(s.shm / id, out / id, &why), id, ": ", why);
  }
  // Overwriting a bigger file shrinks it to the block.
  test::write_pattern_file(out / "ram0", 3 * kMiB, "random", 99);
  REQUIRE_RUN(run_vmsave({"restore", s.image, "--ram-dir", out.path(), "-f"}), 0);
  std::string why;
  CHECK_MESSAGE(test::files_equal(s.shm / "ram0", out / "ram0", &why), why);

  // Never over the image itself, by its own name or a hard link.
  for (const char* how : {"same name", "hard link"}) {
    CAPTURE(std::string(how));
    TempDir dir;
    std::string image = dir / "ram1";
    std::filesystem::copy_file(s.image, image);
    if (std::string(how) == "hard link") {
      std::filesystem::rename(image, dir / "image.vmsave");
      std::filesystem::create_hard_link(dir / "image.vmsave", image);
    }
    r = run_vmsave({"restore", image, "--ram-dir", dir.path(), "--force"});
    CHECK_FAILS(r, 1, "the RAM file is the image itself (" + image + ")");
    CHECK_RUN(run_vmsave({"verify", image}), 0);
  }
  // Nor over another image, such as a lazy clone's base given as the RAM
  // file by mistake: --force deleted one (trial V).
  {
    TempDir dir;
    const std::string other = dir / "ram1";
    std::filesystem::copy_file(s.image, other);
    r = run_vmsave({"restore", s.image, "--ram-dir", dir.path(), "--force"});
    CHECK_FAILS(r, 1, "the RAM file is a vmsave image (" + other + ")");
    CHECK_RUN(run_vmsave({"verify", other}), 0);
  }

  // Nor under a process that maps the file (a VM running on it): truncating
  // it would kill that process with SIGBUS.
  int gate[2];
  REQUIRE(pipe(gate) == 0);
  pid_t vm = fork();
  REQUIRE(vm >= 0);
  if (vm == 0) {
    int fd = ::open((out / "ram1").c_str(), O_RDWR);
    void* p = fd < 0 ? MAP_FAILED : mmap(nullptr, 4096, PROT_READ, MAP_SHARED, fd, 0);
    char ok = p != MAP_FAILED;
    (void)!write(gate[1], &ok, 1);
    pause();
    _exit(0);
  }
  char mapped = 0;
  REQUIRE(read(gate[0], &mapped, 1) == 1);
  REQUIRE(mapped);
  const std::string before = test::read_file(out / "ram1");
  r = run_vmsave({"restore", s.image, "--ram-dir", out.path(), "--force"});
  CHECK_FAILS(r, 1,
              fmt::format("RAM file is in use ({}): process {} (", out / "ram1", vm) +
                  "vmsave_tests) maps it");
  CHECK(test::read_file(out / "ram1") == before);
  kill(vm, SIGKILL);
  REQUIRE(waitpid(vm, nullptr, 0) == vm);
  close(gate[0]);
  close(gate[1]);
  CHECK_RUN(run_vmsave({"restore", s.image, "--ram-dir", out.path(), "--force"}), 0);
}

TEST_CASE("raw: output nobody can take (a full disk, closed fds) never aborts or misplaces work") {
  require_shm();
  SmallImage s;
  const std::string vmsave = VMSAVE_BINARY;
  auto sh = [&](const std::string& line) {
    return test::run_program({"/bin/sh", "-c", "\"$0\" " + line, vmsave});
  };
  // stderr on a full disk: the save succeeds (it used to abort, status 134).
  const std::string img = s.disk / "full.vmsave";
  RunResult r = sh(fmt::format("save --ram ram0={} {} 2>/dev/full", s.shm / "ram0", img));
  CHECK_RUN(r, 0);
  CHECK_RUN(run_vmsave({"verify", img}), 0);
  CHECK_RUN(sh("info /nonexistent.vmsave 2>/dev/full"), 1);
  // A report stdout cannot take: info's output is the command, so it fails;
  // a save's report is a warning beside finished work.
  r = sh("info " + s.image + " >/dev/full");
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: cannot write to standard output: No space left on device"),
                r.err);
  r = sh(fmt::format("save --json --ram ram0={} {} --force >/dev/full", s.shm / "ram0", img));
  CHECK_RUN(r, 0);
  CHECK_MESSAGE(contains(r.err, "vmsave: warning: save succeeded, but its report could not be "
                                "written to standard output: No space left on device"),
                r.err);
  // A closed stdout is not handed to the first file vmsave opens (the JSON
  // report used to be able to land in whatever took fd 1).
  const std::string closed = s.disk / "closed.vmsave";
  r = sh(fmt::format("save --json --ram ram0={} {} >&-", s.shm / "ram0", closed));
  CHECK_RUN(r, 0);
  CHECK_MESSAGE(contains(r.err, "could not be written to standard output: it is closed"), r.err);
  CHECK_RUN(run_vmsave({"verify", closed}), 0);
  CHECK_RUN(sh("info " + s.image + " >&-"), 1);
}

TEST_CASE("raw: an image larger than its filesystem (or ulimit -f) takes is refused before any RAM is written") {
  require_shm();
  TempDir shm("/dev/shm"), disk;
  const std::string mem = shm / "ram", image = disk / "big.vmsave";
  test::write_pattern_file(mem, 8 * kMiB, "mixed", 3);
  // ulimit -f (sh counts 512-byte blocks) fails the same way as ext2's or ext4-without-extents'
  // file size limit (a tester's 64 GiB save failed with EFBIG at 26%), and is named: it was said to
  // be the filesystem's, with advice to use ext4.
  RunResult r = test::run_program(
      {"/bin/sh", "-c", "ulimit -f 1024; exec \"$0\" save --ram ram=\"$1\" \"$2\"", VMSAVE_BINARY,
       mem, image});
  CHECK_FAILS(r, 1, "cannot create image (" + image + "): it would be ");
  CHECK_MESSAGE(contains(r.err,
                         "more than this process may write to a file (ulimit -f: 524288 "
                         "bytes); raise the file size limit (ulimit -f unlimited)"),
                r.err);
  CHECK_MESSAGE(!contains(r.err, "writing RAM"), r.err);
  CHECK(list_dir(disk.path()).empty());
  // A RAM file a restore makes: it was "ftruncate (...): File too large".
  REQUIRE_RUN(run_vmsave({"save", "--ram", "ram=" + mem, image}), 0);
  const std::string ram_dir = disk / "ram-dir";
  REQUIRE(::mkdir(ram_dir.c_str(), 0700) == 0);
  r = test::run_program({"/bin/sh", "-c",
                         "ulimit -f 1024; exec \"$0\" restore \"$1\" --ram-dir \"$2\"",
                         VMSAVE_BINARY, image, ram_dir});
  CHECK_FAILS(r, 1,
              "cannot create RAM file (" + ram_dir +
                  "/ram): it would be 8388608 bytes, more "
                  "than this process may write to a file (ulimit -f: 524288 bytes)");
  CHECK(list_dir(ram_dir).empty());
}

TEST_CASE("raw: too low an open file limit is named, with its fix") {
  require_shm();
#if defined(__SANITIZE_ADDRESS__)
  // UBSan's vptr check opens a pipe of its own to probe memory; out of
  // descriptors it reports every virtual call as one on an invalid object.
  test::skip("the sanitizers need file descriptors of their own");
#endif
  TempDir shm("/dev/shm"), disk;
  const std::string mem = shm / "ram", image = disk / "few-fds.vmsave";
  test::write_pattern_file(mem, 1 * kMiB, "mixed", 3);
  // It was "cannot set up io_uring: Too many open files", without a fix.
  // With only 0-2 open when it starts (whatever the runner left open is
  // closed), 4 descriptors run out at the image; at 5 the ring does not
  // fit, the workers do without, and the commit runs out (a save failed so
  // with its whole image at the target); 6 are enough.
  for (int limit : {4, 5, 6}) {
    CAPTURE(limit);
    const std::string sh = fmt::format(
        "for fd in $(ls /proc/$$/fd); do [ $fd -gt 2 ] && eval \"exec $fd>&-\"; done; "
        "ulimit -n {}; exec \"$0\" save --ram ram=\"$1\" \"$2\"",
        limit);
    RunResult r = test::run_program({"/bin/bash", "-c", sh, VMSAVE_BINARY, mem, image});
    if (limit == 5)
      CHECK_MESSAGE(contains(r.err,
                             "vmsave: warning: io_uring is unavailable (io_uring_setup: "
                             "Too many open files; raise the open-file limit (ulimit -n))"),
                    r.err);
    if (limit < 6) {
      CHECK_FAILS(r, 1, "raise the open-file limit (ulimit -n) or use fewer --jobs");
      CHECK(list_dir(disk.path()).empty());
    } else {
      CHECK_RUN(r, 0);
      CHECK_RUN(run_vmsave({"verify", image}), 0);
    }
  }
}

TEST_CASE("raw: a save without /proc is refused before any RAM is written") {
  require_shm();
  if (geteuid() != 0) return;  // a mount namespace of its own needs root
  TempDir shm("/dev/shm"), disk;
  const std::string mem = shm / "ram", image = disk / "np.vmsave";
  test::write_pattern_file(mem, 1 * kMiB, "mixed", 3);
  // It used to write everything and fail at the link: "linkat: No such file".
  // (Under ASan, its leak checker needs /proc and its runtime warns without
  // it: both kept out of the way of what vmsave says.)
  RunResult r = test::run_program(
      {"unshare", "-m", "--propagation", "private", "/bin/sh", "-c",
       "umount -l /proc && exec \"$0\" save --ram ram=\"$1\" \"$2\"", VMSAVE_BINARY, mem, image},
      120, {"ASAN_OPTIONS=detect_leaks=0"});
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: cannot create image (" + image +
                                    "): /proc is not mounted"),
                r.err);
  CHECK(list_dir(disk.path()).empty());
}

// A wrapper that stops reading its --progress-fd pipe: the save and the
// restore go on (they used to wait for the reader, a QEMU save with its
// guest paused), dropping the lines that do not fit. A descriptor that
// fails is said once, and the work goes on.
TEST_CASE("raw: a --progress-fd nobody reads, or that fails, never holds up the work") {
  require_shm();
  TempDir shm("/dev/shm"), disk;
  const std::string src = shm / "ram", image = disk / "image.vmsave";
  test::write_pattern_file(src, 16 * kMiB, "mixed", 4);
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  REQUIRE(fcntl(p[1], F_SETFD, 0) == 0);  // vmsave inherits the write end
  REQUIRE(fcntl(p[1], F_SETPIPE_SZ, 4096) >= 0);
  REQUIRE(fcntl(p[1], F_SETFL, O_NONBLOCK) == 0);
  const std::string page(4096, 'x');
  while (write(p[1], page.data(), page.size()) > 0) {
  }
  REQUIRE(fcntl(p[1], F_SETFL, 0) == 0);  // full, and blocking as vmsave gets it
  const std::string fd = std::to_string(p[1]);
  RunResult r = run_vmsave({"save", "--ram", "ram=" + src, image, "--progress-fd", fd}, 30);
  CHECK_RUN(r, 0);
  CHECK_RUN(run_vmsave({"verify", image, "--progress-fd", fd}, 30), 0);
  const std::string out = shm / "out";
  REQUIRE(mkdir(out.c_str(), 0700) == 0);
  r = run_vmsave({"restore", image, "--ram-dir", out, "--progress-fd", fd}, 30);
  CHECK_RUN(r, 0);
  std::string why;
  CHECK_MESSAGE(test::files_equal(src, out + "/ram", &why), why);
  close(p[0]);
  close(p[1]);

  int full = open("/dev/full", O_WRONLY);
  REQUIRE(full >= 0);
  r = run_vmsave({"save", "--force", "--ram", "ram=" + src, image, "--progress-fd",
                  std::to_string(full)});
  close(full);
  CHECK_RUN(r, 0);
  CHECK_MESSAGE(contains(r.err, "vmsave: warning: cannot write progress to descriptor " +
                                    std::to_string(full) + ": No space left on device"),
                r.err);
  CHECK_RUN(run_vmsave({"verify", image}), 0);
}

TEST_CASE("raw: --progress-fd is refused with --json when it is stdout under another number") {
  // 5>&1 mixed progress lines into the report: no longer JSON.
  require_shm();
  TempDir shm("/dev/shm");
  test::write_pattern_file(shm / "ram", 64 * kKiB, "random", 5);
  const std::string image = shm / "image.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--ram", "ram=" + (shm / "ram"), image}), 0);
  RunResult r =
      test::run_program({"/bin/sh", "-c", "exec \"$0\" verify --json --progress-fd 5 \"$1\" 5>&1",
                         VMSAVE_BINARY, image});
  CHECK_FAILS(r, 2, "--progress-fd 5 is stdout, where --json prints the report: give another fd");
  CHECK(json::parse(r.out)["ok"] == false);  // the error report alone
  // Another file is fine, and so is /dev/null for both.
  r = test::run_program({"/bin/sh", "-c",
                         "exec \"$0\" verify --json --progress-fd 5 \"$1\" 5>\"$1.progress\"",
                         VMSAVE_BINARY, image});
  REQUIRE_RUN(r, 0);
  CHECK(json::parse(r.out)["ok"] == true);
  CHECK(contains(test::read_file(image + ".progress"), "\"phase\""));
  r = test::run_program({"/bin/sh", "-c",
                         "exec \"$0\" verify --json --progress-fd 5 \"$1\" >/dev/null 5>&1",
                         VMSAVE_BINARY, image});
  CHECK_RUN(r, 0);
}

TEST_CASE("raw: save refuses an existing image without --force and replaces it with it") {
  require_shm();
  TempDir shm("/dev/shm");
  TempDir disk;
  std::string a = shm / "a", b = shm / "b";
  test::write_pattern_file(a, 1 * kMiB, "mixed", 1);
  test::write_pattern_file(b, 2 * kMiB + 4096, "text", 2);
  std::string image = disk / "image.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--ram", "first=" + a, image}), 0);
  const std::string original = test::read_file(image);

  RunResult r = run_vmsave({"save", "--ram", "second=" + b, image});
  CHECK_FAILS(r, 1, "exists");
  CHECK_MESSAGE(contains(r.err, image), r.err);
  CHECK(test::read_file(image) == original);
  CHECK_RUN(run_vmsave({"verify", image}), 0);
  CHECK(list_dir(disk.path()) == std::vector<std::string>{"image.vmsave"});

  REQUIRE_RUN(run_vmsave({"save", "--force", "--ram", "second=" + b, image}), 0);
  r = run_vmsave({"info", "--json", image});
  REQUIRE_RUN(r, 0);
  json j = json::parse(r.out);
  CHECK(j["blocks"][0]["id"] == "second");
  CHECK(j["blocks"][0]["size"] == 2 * kMiB + 4096);
  CHECK_RUN(run_vmsave({"verify", image}), 0);
  CHECK(list_dir(disk.path()) == std::vector<std::string>{"image.vmsave"});

  // A save killed between linking its hidden name and renaming it over the
  // target (--force) leaves .NAME.vmsave-PID.tmp: the next save to that
  // target removes it once PID is gone, and never a live process's.
  pid_t dead = fork();
  REQUIRE(dead >= 0);
  if (dead == 0) _exit(0);
  REQUIRE(waitpid(dead, nullptr, 0) == dead);
  const std::string stale = fmt::format(".image.vmsave.vmsave-{}.tmp", dead);
  const std::string live = fmt::format(".image.vmsave.vmsave-{}.tmp", getpid());
  const std::string other = fmt::format(".other.vmsave.vmsave-{}.tmp", dead);
  for (const std::string& name : {stale, live, other}) std::ofstream(disk / name) << "partial";
  REQUIRE_RUN(run_vmsave({"save", "--force", "--ram", "first=" + a, image}), 0);
  CHECK(list_dir(disk.path()) == std::vector<std::string>{live, other, "image.vmsave"});
  std::filesystem::remove(disk / live);
  std::filesystem::remove(disk / other);

  // A directory at the target is never replaced.
  std::string dir = disk / "adir";
  REQUIRE(mkdir(dir.c_str(), 0700) == 0);
  r = run_vmsave({"save", "--force", "--ram", "x=" + a, dir});
  CHECK_FAILS(r, 1, "directory");
  CHECK(std::filesystem::is_directory(dir));
}

TEST_CASE("raw: images and RAM files are created mode 0600 whatever the umask") {
  require_shm();
  TempDir shm("/dev/shm");
  TempDir disk;
  TempDir out("/dev/shm");
  std::string src = shm / "ram";
  test::write_pattern_file(src, 64 * kKiB, "mixed", 3);
  std::string image = disk / "image.vmsave";
  mode_t old = umask(0);  // inherited by the child: the mode must be explicit
  RunResult r = run_vmsave({"save", "--ram", "ram=" + src, image});
  RunResult r2 = run_vmsave({"restore", image, "--ram-dir", out.path()});
  umask(old);
  REQUIRE_RUN(r, 0);
  REQUIRE_RUN(r2, 0);
  struct stat st;
  REQUIRE(stat(image.c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0600);
  REQUIRE(stat((out / "ram").c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0600);
  // A world-readable file replaced with --force becomes private too.
  REQUIRE(chmod((out / "ram").c_str(), 0644) == 0);
  REQUIRE_RUN(run_vmsave({"restore", image, "--ram-dir", out.path(), "--force"}), 0);
  REQUIRE(stat((out / "ram").c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0600);
}

TEST_CASE("raw: a symlink at the target is replaced by --force, never followed") {
  require_shm();
  TempDir shm("/dev/shm");
  TempDir disk;
  std::string src = shm / "ram";
  test::write_pattern_file(src, 256 * kKiB, "random", 4);
  std::string victim = disk / "victim";
  const std::string content = "the link's target must not change\n";
  write_string(victim, content);
  std::string image = disk / "image.vmsave";
  REQUIRE(symlink(victim.c_str(), image.c_str()) == 0);

  // Said as a link (a dangling one was "image exists", with no image).
  RunResult r = run_vmsave({"save", "--ram", "ram=" + src, image});
  CHECK_FAILS(r, 1,
              "vmsave: error: a symbolic link is at the image path (" + image +
                  "): refusing to replace it (vmsave does not write through a link); pass "
                  "--force to replace the link with the image, or give the real path");
  CHECK(test::read_file(victim) == content);

  REQUIRE_RUN(run_vmsave({"save", "--force", "--ram", "ram=" + src, image}), 0);
  struct stat st;
  REQUIRE(lstat(image.c_str(), &st) == 0);
  CHECK(S_ISREG(st.st_mode));
  CHECK(test::read_file(victim) == content);
  CHECK_RUN(run_vmsave({"verify", image}), 0);

  // A dangling link too.
  std::string dangling = disk / "dangling.vmsave";
  std::string nowhere = disk / "nowhere";
  REQUIRE(symlink(nowhere.c_str(), dangling.c_str()) == 0);
  REQUIRE_RUN(run_vmsave({"save", "--force", "--ram", "ram=" + src, dangling}), 0);
  REQUIRE(lstat(dangling.c_str(), &st) == 0);
  CHECK(S_ISREG(st.st_mode));
  CHECK(access(nowhere.c_str(), F_OK) != 0);

  SUBCASE("restore --force does not write through a symlinked RAM file") {
    TempDir out("/dev/shm");
    REQUIRE(symlink(victim.c_str(), (out / "ram").c_str()) == 0);
    r = run_vmsave({"restore", image, "--ram-dir", out.path(), "--force"});
    CHECK(r.status == 1);
    CHECK_MESSAGE(contains(r.err, "it is a symbolic link, and vmsave does not write through one"),
                  r.err);
    CHECK(test::read_file(victim) == content);
  }
  SUBCASE("save does not read RAM through a symlink") {
    std::string link = shm / "link";
    REQUIRE(symlink(src.c_str(), link.c_str()) == 0);
    r = run_vmsave({"save", "--ram", "ram=" + link, disk / "other.vmsave"});
    CHECK(r.status == 1);
    CHECK_MESSAGE(contains(r.err, "it is a symbolic link, and vmsave reads memory files by their "
                                  "own path; give the path it points to"),
                  r.err);
    CHECK(access((disk / "other.vmsave").c_str(), F_OK) != 0);
  }
}

// ------------------------------------------------------------ usage errors

TEST_CASE("raw: usage errors exit 2 and create nothing") {
  require_shm();
  TempDir shm("/dev/shm");
  TempDir disk;
  std::string src = shm / "ram";
  test::write_pattern_file(src, 64 * kKiB, "random", 5);
  std::string image = disk / "image.vmsave";
  const std::vector<std::vector<std::string>> cases = {
      {},
      {"bogus-command"},
      {"save", image},                         // neither --qmp nor --ram
      {"save", "--ram", src, image},           // no '='
      {"save", "--ram", "=" + src, image},     // empty id
      {"save", "--ram", "ram=", image},        // empty file
      {"save", "--ram", "a/b=" + src, image},  // id is not a file name
      {"save", "--ram", "..=" + src, image},
      {"save", "--ram", "a=" + src, "--ram", "a=" + src, image},  // duplicate id
      {"save", "--ram", "ram=" + src, "--qmp", disk / "qmp.sock", image},
      {"save", "--ram", "ram=" + src, "--bogus", image},
      {"save", "--ram", "ram=" + src, "--chunk-size", "3K", image},
      {"save", "--ram", "ram=" + src, "--chunk-size", "2K", image},
      {"save", "--ram", "ram=" + src, "--min-hole", "-4K", image},
      {"save", "--ram", "ram=" + src, "--min-hole", "2G", image},
      {"save", "--ram", "ram=" + src, "--min-hole", "lots", image},
      {"save", "--ram", "ram=" + src, "--jobs", "0", image},
      {"save", "--ram", "ram=" + src, "--queue-depth", "0", image},
      {"save", "--ram", "ram=" + src, "--paused", image},
      {"save", "--ram", "ram=" + src, "--progress-fd", "9", image},  // not open
      {"save", "--qmp", disk / "qmp.sock", "--qmp-timeout", "nan", image},
      {"save", "--qmp", disk / "qmp.sock", "--qmp-timeout", "inf", image},
      {"save", "--qmp", disk / "qmp.sock", "--qmp-timeout", "0", image},
      {"save", "--qmp", disk / "qmp.sock", "--live", "--live-timeout", "-1", image},
      {"save", "--qmp", disk / "qmp.sock", "--max-downtime", "100", image},  // no --live
      // Past QEMU's own limit, which failed the save after it had begun.
      {"save", "--qmp", disk / "qmp.sock", "--live", "--max-downtime", "2000001", image},
      {"save", "--qmp", disk / "qmp.sock", "--live", "--compress", "lz4", image},
      {"save", "--ram", "ram=" + src, "--flush-timeout", "5", image},  // QEMU mode only
      {"save", "--ram", "ram=" + src, "--qmp-timeout", "5", image},
      {"save", "--ram", "ram=" + src, "--compress", "lz4", "--chunk-size", "4K", image},
      {"save", "--ram", "a\nb=" + src, image},                        // control character in the id
      {"save", "--ram", "ram=" + src, "--min-hole", "3K", image},     // not a page multiple
      {"save", "--ram", "ram=" + src, disk / std::string(240, 'x')},  // no room for a temp name
      {"save", "--qmp", disk / "qmp.sock", "--live-timeout", "5", image},
      {"save", "--ram", "ram=" + src, "--progress-fd", "1", "--json", image},
      {"save", "--ram", "ram=" + src},  // no image
      {"restore", image},               // no form
      {"restore", image, "--ram-dir", disk.path(), "--qmp", disk / "qmp.sock"},
      {"restore", image, "--ram-dir", disk.path(), "--lazy"},
      {"restore", image, "--ram-dir", disk.path(), "--bogus"},
      {"restore", image, "--ram-dir", disk.path(), "--progress-fd", "9"},
      {"restore", image, "--ram-dir", disk.path(), "--qemu-log", disk / "q.log"},
      {"restore", image, "--qmp", disk / "qmp.sock", "--qemu-log", disk / "q.log"},
      {"restore", image, "--qmp", disk / "qmp.sock", "--qmp-timeout", "nan"},
      {"restore", image, "--qmp", disk / "qmp.sock", "--force"},  // makes no files
      {"prepare", disk / "a\nb.vmsave", "--lazy"},                // cannot be printed one per line
      {"info"},
      {"verify", image, "extra"},
  };
  for (auto& args : cases) {
    std::string line;
    for (auto& a : args) line += a + " ";
    CAPTURE(line);
    RunResult r = run_vmsave(args);
    CHECK_RUN(r, 2);
    CHECK(!r.err.empty());
    CHECK(list_dir(disk.path()).empty());
  }
  // With --json, a usage error is a JSON object on stdout as well, whether
  // vmsave or CLI11 finds it.
  for (std::vector<std::string> args :
       {std::vector<std::string>{"save", "--json", image}, {"save", "--json", "--bogus", image}}) {
    RunResult r = run_vmsave(args);
    CHECK_RUN(r, 2);
    json j = json::parse(r.out, nullptr, false);
    REQUIRE_MESSAGE(j.is_object(), r.out);
    CHECK(j["command"] == "save");
    CHECK(j["ok"] == false);
    CHECK(j["exit_status"] == 2);
    CHECK(!j["error"].get<std::string>().empty());
  }
  // Parser errors read like vmsave's own: one line, where to look.
  RunResult p = run_vmsave({"save", "--bogus", image});
  CHECK_MESSAGE(p.err == "vmsave: error: The following argument was not expected: --bogus; see "
                         "vmsave save --help\n",
                p.err);
  // Each names the rule its argument breaks.
  const std::pair<std::vector<std::string>, std::string> named[] = {
      {{"save", "--ram", "ram=" + src, "--jobs", "abc", image},
       "--jobs: a whole number from 1 to 256: abc"},
      {{"save", "--ram", "ram=" + src, "--queue-depth", "1.5", image},
       "--queue-depth: a whole number from 1 to 4096: 1.5"},
      {{"save", "--ram", ".=" + src, image},
       "bad RAM block id: \".\"; use another name: it becomes a file name under --ram-dir"},
      // An option where a value belongs was taken for the value.
      {{"save", "--qmp", "--force", image},
       "--qmp needs a value, but the next argument is the option --force (a value that starts "
       "with '-' is written --qmp=VALUE)"},
      {{"save", "--ram", "ram=" + src, "--description", "-j", "2", image},
       "--description needs a value, but the next argument is the option -j"},
  };
  for (auto& [args, message] : named) {
    CAPTURE(message);
    p = run_vmsave(args);
    CHECK_RUN(p, 2);
    CHECK_MESSAGE(contains(p.err, "vmsave: error: " + message), p.err);
    CHECK(list_dir(disk.path()).empty());
  }
  // Where the value is given with '=', it may start with '-'.
  CHECK_RUN(run_vmsave({"save", "--ram", "ram=" + src, "--description=-j 2", image}), 0);
  CHECK(contains(run_vmsave({"info", "--json", image}).out, "\"description\": \"-j 2\""));
  REQUIRE(::unlink(image.c_str()) == 0);
  // An empty path is named, not read as the option left out.
  for (std::vector<std::string> args : {std::vector<std::string>{"restore", image, "--ram-dir", ""},
                                        {"prepare", image, "--ram-dir", ""},
                                        {"save", "--qmp", "", image},
                                        {"restore", image, "--qmp", ""}}) {
    p = run_vmsave(args);
    CHECK_RUN(p, 2);
    CHECK_MESSAGE(p.err == fmt::format("vmsave: error: {}: an empty path; see vmsave {} --help\n",
                                       args[0] == "save" ? args[1] : args[2],
                                       args[0]),
                  p.err);
  }
  p = run_vmsave({"info", ""});
  CHECK_MESSAGE(p.err == "vmsave: error: image: an empty path; see vmsave info --help\n", p.err);
  p = run_vmsave({"frob"});
  CHECK_RUN(p, 2);
  CHECK_MESSAGE(contains(p.err, "vmsave: error: unknown command 'frob'"), p.err);
  // An option before the command: CLI11 said "The following argument was
  // not expected", and the JSON object's command was "" (trial W).
  p = run_vmsave({"--json", "info", image});
  CHECK_RUN(p, 2);
  CHECK_MESSAGE(p.err == "vmsave: error: options go after the command: vmsave info --json ...\n",
                p.err);
  CHECK_MESSAGE(json::parse(p.out).value("command", "") == "info", p.out);
  p = run_vmsave({});  // was CLI11's "A subcommand is required"
  CHECK_MESSAGE(p.err ==
                    "vmsave: error: no command: vmsave has save, restore, prepare, info and "
                    "verify (vmsave --help)\n",
                p.err);
  RunResult r = run_vmsave({"--version"});
  CHECK_RUN(r, 0);
  CHECK(r.out == fmt::format("vmsave {} (image format v1.{})\n", VMSAVE_VERSION, kFormatMinor));
  CHECK_RUN(run_vmsave({"save", "--help"}), 0);
}

TEST_CASE("raw: a missing RAM directory and a QEMU command without -- say how to fix them") {
  require_shm();
  SmallImage s;
  RunResult r = run_vmsave({"restore", s.image, "--ram-dir", s.disk / "missing"});
  CHECK_FAILS(r, 1, "missing");
  CHECK_MESSAGE(contains(r.err, "; create that directory first"), r.err);
  // A directory where a RAM file goes.
  TempDir out;
  REQUIRE(mkdir((out / "ram1").c_str(), 0700) == 0);
  r = run_vmsave({"restore", s.image, "--ram-dir", out.path()});
  CHECK_FAILS(r, 1, "cannot create RAM file (" + (out / "ram1") + "): a directory is in the way");
  r = run_vmsave({"restore", s.image, "--ram-dir", out.path(), "--force"});
  CHECK_FAILS(r, 1, "remove that directory or choose another place for the file");
  CHECK(list_dir(out.path()) == std::vector<std::string>{"ram1"});
  r = run_vmsave({"restore", s.image, "/usr/bin/qemu-system-x86_64", "-m", "512",
                  "-qmp", "unix:" + (s.disk / "qmp.sock") + ",server=on"});
  CHECK_RUN(r, 2);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: put -- before the QEMU command: vmsave restore "
                                "IMAGE [OPTIONS] -- /usr/bin/qemu-system-x86_64 ..."),
                r.err);
  CHECK_FALSE(contains(r.err, "-mp"));
}

TEST_CASE("raw: info shows control characters from an image as \\xNN, and any bytes save") {
  require_shm();
  TempDir shm("/dev/shm");
  TempDir disk;
  std::string src = shm / "ram";
  test::write_pattern_file(src, 64 * kKiB, "mixed", 5);
  std::string image = disk / "image.vmsave";
  // An escape sequence that would retitle the terminal, and a byte that is
  // not UTF-8 (JSON, and so the metadata, cannot hold it as it is).
  RunResult r = run_vmsave({"save", "--ram", "ram=" + src, image, "--description",
                            "x\x1b]0;pwned\x07 \xfe y"});
  REQUIRE_RUN(r, 0);
  r = run_vmsave({"info", image});
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(contains(r.out, "description:  x\\x1b]0;pwned\\x07 \xef\xbf\xbd y\n"), r.out);
  CHECK(r.out.find('\x1b') == std::string::npos);
  CHECK(r.out.find('\x07') == std::string::npos);
  r = run_vmsave({"info", "--json", image});
  REQUIRE_RUN(r, 0);
  CHECK(json::parse(r.out)["metadata"]["description"] == "x\x1b]0;pwned\x07 \xef\xbf\xbd y");
  // A newline in a value (the image's own name) is shown too: one line per field.
  const std::string odd = disk / "new\nline.vmsave";
  std::filesystem::rename(image, odd);
  r = run_vmsave({"info", odd});
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(contains(r.out, "image:        " + (disk / "new\\x0aline.vmsave") + "\n"), r.out);
}

TEST_CASE("raw: every option --help lists is described in the man page") {
  const std::string man = test::read_file(std::string(VMSAVE_SOURCE_DIR) + "/man/vmsave.1");
  for (std::string cmd : {"save", "restore", "prepare", "info", "verify"}) {
    RunResult r = run_vmsave({cmd, "--help"});
    REQUIRE_RUN(r, 0);
    // CLI11 starts a line with each option: "  -j,--jobs INT ...", "  --lazy".
    std::istringstream lines(r.out);
    for (std::string line; std::getline(lines, line);) {
      size_t at = line.find_first_not_of(' ');
      if (at == std::string::npos || line[at] != '-') continue;
      at = line.find("--", at);
      if (at == std::string::npos) continue;
      std::string opt = line.substr(at, line.find_first_of(" ,=", at) - at);
      if (opt == "--help") continue;
      // groff writes a dash in an option as "\-".
      std::string roff;
      for (char c : opt) roff += c == '-' ? std::string("\\-") : std::string(1, c);
      CAPTURE(cmd);
      CAPTURE(opt);
      CHECK(contains(man, roff));
    }
  }
}

// ------------------------------------------------- what is not an image

TEST_CASE("raw: an image is read through a symbolic link (latest.vmsave -> ...)") {
  require_shm();
  SmallImage s;
  const std::string link = s.disk / "latest.vmsave";
  REQUIRE(symlink(s.image.c_str(), link.c_str()) == 0);
  CHECK_RUN(run_vmsave({"info", link}), 0);
  CHECK_RUN(run_vmsave({"verify", link}), 0);
  TempDir out("/dev/shm");
  REQUIRE_RUN(run_vmsave({"restore", link, "--ram-dir", out.path()}), 0);
  for (auto& id : s.ids) {
    std::string why;
    CHECK_MESSAGE(test::files_equal(s.shm / id, out / id, &why), id, ": ", why);
  }
  // Never the image itself through the link either.
  TempDir dir;
  std::filesystem::copy_file(s.image, dir / "ram1");
  const std::string to_ram1 = dir / "image-link.vmsave";
  REQUIRE(symlink((dir / "ram1").c_str(), to_ram1.c_str()) == 0);
  RunResult r = run_vmsave({"restore", to_ram1, "--ram-dir", dir.path(), "--force"});
  CHECK_FAILS(r, 1, "the RAM file is the image itself (" + (dir / "ram1") + ")");
  CHECK_RUN(run_vmsave({"verify", dir / "ram1"}), 0);
}

TEST_CASE("raw: missing, empty, foreign and newer images are refused with the right status") {
  require_shm();
  TempDir disk;
  TempDir out;
  std::string missing = disk / "missing.vmsave";
  for (const char* cmd : {"info", "verify", "restore"}) {
    CAPTURE(std::string(cmd));
    std::vector<std::string> args = {cmd, missing};
    if (std::string(cmd) == "restore") args = {cmd, missing, "--ram-dir", out.path()};
    RunResult r = run_vmsave(args);
    CHECK_FAILS(r, 1, "No such file or directory");
    CHECK_MESSAGE(contains(r.err, missing), r.err);
  }
  // A directory is the wrong path too, not a damaged image.
  std::string dir = disk / "adir.vmsave";
  REQUIRE(mkdir(dir.c_str(), 0700) == 0);
  for (const char* cmd : {"info", "verify", "restore"}) {
    CAPTURE(std::string(cmd));
    std::vector<std::string> args = {cmd, dir};
    if (std::string(cmd) == "restore") args = {cmd, dir, "--ram-dir", out.path()};
    RunResult r = run_vmsave(args);
    CHECK_FAILS(r, 1, "not an image file (" + dir + "): a directory; give the path of an image");
  }
  std::string empty = disk / "empty.vmsave";
  write_string(empty, "");
  std::string foreign = disk / "foreign.vmsave";
  test::write_pattern_file(foreign, 1 * kMiB, "random", 6);
  std::string text = disk / "text.vmsave";
  test::write_pattern_file(text, 5000, "text", 6);

  // A real image, then patched to major version 2 with a valid checksum.
  std::string newer = disk / "newer.vmsave";
  {
    TempDir shm("/dev/shm");
    test::write_pattern_file(shm / "ram", 64 * kKiB, "mixed", 6);
    REQUIRE_RUN(run_vmsave({"save", "--ram", "ram=" + (shm / "ram"), newer}), 0);
  }
  {
    std::vector<u8> h = read_bytes(newer, 0, kHeaderSize);
    DiskHeader dh;
    std::memcpy(&dh, h.data(), sizeof(dh));
    dh.major = 2;
    dh.checksum = checksum({reinterpret_cast<const u8*>(&dh), offsetof(DiskHeader, checksum)});
    int fd = open(newer.c_str(), O_WRONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    REQUIRE(pwrite(fd, &dh, sizeof(dh), 0) == kHeaderSize);
    close(fd);
  }

  struct Case {
    std::string path, needle;
  };
  for (const Case& c :
       {Case{empty, "smaller than an image header"}, Case{foreign, "not a vmsave image"},
        Case{text, "not a vmsave image"}, Case{newer, "too new"}}) {
    for (const char* cmd : {"info", "verify", "restore"}) {
      CAPTURE(c.path);
      CAPTURE(std::string(cmd));
      std::vector<std::string> args = {cmd, c.path};
      if (std::string(cmd) == "restore") args = {cmd, c.path, "--ram-dir", out.path()};
      RunResult r = run_vmsave(args);
      CHECK_FAILS(r, 3, c.needle);
      CHECK_MESSAGE(contains(r.err, c.path), r.err);
      if (c.path == newer) {
        CHECK_MESSAGE(contains(r.err, "v2"), r.err);
        CHECK_MESSAGE(contains(r.err, "v1"), r.err);
      }
      // Every refusal says what to do: a fix after the cause.
      CHECK_MESSAGE(contains(r.err, "; "), r.err);
      if (c.path == foreign)
        CHECK_MESSAGE(contains(r.err, "give the path of an image vmsave saved"), r.err);
      CHECK(list_dir(out.path()).empty());
    }
  }
}

TEST_CASE("raw: a RAM directory that takes no new files is named as such") {
  require_shm();
  TempDir shm("/dev/shm"), disk;
  test::write_pattern_file(shm / "ram", 64 * kKiB, "mixed", 5);
  const std::string image = disk / "image.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--ram", "ram=" + (shm / "ram"), image}), 0);
  // It said "create its directory first" of /proc, which exists.
  CHECK_FAILS(run_vmsave({"restore", image, "--ram-dir", "/proc"}), 1,
              "cannot create RAM file (/proc/ram): No such file or directory; its directory "
              "takes no new files (/proc, /sys?)");
  CHECK_FAILS(run_vmsave({"restore", image, "--ram-dir", shm / "no-such-dir"}), 1,
              "create that directory first");
}

TEST_CASE("raw: verify refuses bytes appended past an image's end, info names them") {
  require_shm();
  TempDir shm("/dev/shm"), disk;
  test::write_pattern_file(shm / "ram", 256 * kKiB, "mixed", 5);
  const std::string image = disk / "image.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--ram", "ram=" + (shm / "ram"), image}), 0);
  const i64 size = static_cast<i64>(std::filesystem::file_size(image));
  {
    std::ofstream out(image, std::ios::app | std::ios::binary);
    out << std::string(1000, 'x');
  }
  // A concatenation, or a copy over a longer file: verify called it intact.
  RunResult r = run_vmsave({"verify", image});
  CHECK_FAILS(r, 3,
              fmt::format("image damaged ({}) at offset {}: 1000 bytes past the image's end (the "
                          "header says it is {} bytes, the file has {})",
                          image, size, size, size + 1000));
  // info reads only what the header points at, and used to say "(complete)"
  // and nothing more.
  r = run_vmsave({"info", image});
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(contains(r.out,
                         "(complete, then 1000 bytes that are not part of it: vmsave verify "
                         "calls it damaged)"),
                r.out);
  r = run_vmsave({"info", "--json", image});
  REQUIRE_RUN(r, 0);
  CHECK(json::parse(r.out)["bytes_past_end"] == 1000);
  // A restore goes on (they are not read), but not without a word (trial K).
  REQUIRE(::mkdir((shm / "out").c_str(), 0700) == 0);
  r = run_vmsave({"restore", image, "--ram-dir", shm / "out"});
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(
      contains(r.err, fmt::format("vmsave: warning: 1000 bytes follow the end of image {} "
                                  "(vmsave verify calls it damaged); the restore ignores "
                                  "them",
                                  image)),
      r.err);
  REQUIRE(truncate(image.c_str(), size) == 0);
  r = run_vmsave({"info", "--json", image});
  REQUIRE_RUN(r, 0);
  CHECK_FALSE(json::parse(r.out).contains("bytes_past_end"));
}

TEST_CASE("raw: memory does not grow with --jobs (the default is the host's CPU count)") {
  // Buffers were sized per worker: on a 32-CPU host verify took 533 MiB
  // and a save into /dev/shm 271 MiB. Every run below is a child of this
  // process, so RUSAGE_CHILDREN's ru_maxrss is the largest of them.
  require_shm();
  TempDir shm("/dev/shm");
  test::write_pattern_file(shm / "ram", 32 * kMiB, "random", 11);
  const std::string image = shm / "image.vmsave";
  REQUIRE(::mkdir((shm / "out").c_str(), 0700) == 0);
  for (const char* jobs : {"32", "64"}) {
    CAPTURE(std::string(jobs));
    REQUIRE_RUN(
        run_vmsave({"save", "--force", "--jobs", jobs, "--ram", "ram=" + (shm / "ram"), image}), 0);
    REQUIRE_RUN(run_vmsave({"verify", "--jobs", jobs, image}), 0);
    REQUIRE_RUN(run_vmsave({"restore", "--force", "--jobs", jobs, image, "--ram-dir", shm / "out"}),
                0);
  }
  struct rusage ru;
  REQUIRE(getrusage(RUSAGE_CHILDREN, &ru) == 0);
#if defined(__SANITIZE_ADDRESS__)
  // ASan's shadow memory and quarantine come on top (85 MiB seen): a bound
  // that still catches the old 533 MiB.
  const long limit_kib = 160 * 1024;
#else
  const long limit_kib = 64 * 1024;
#endif
  CHECK_MESSAGE(ru.ru_maxrss <= limit_kib, "largest child RSS: ", ru.ru_maxrss, " KiB");
}

TEST_CASE("raw: an image another user cannot read is refused with status 1, naming the fix") {
  // Root reads any file: the other user is `nobody`, by setpriv(1).
  if (geteuid() != 0) test::skip("needs root to run vmsave as another user");
  if (access("/usr/bin/setpriv", X_OK) != 0) test::skip("setpriv (util-linux) is missing");
  require_shm();
  TempDir shm("/dev/shm");
  TempDir disk;
  REQUIRE(chmod(disk.path().c_str(), 0755) == 0);  // the directory is open, the image is not
  test::write_pattern_file(shm / "ram", 64 * kKiB, "mixed", 8);
  std::string image = disk / "image.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--ram", "ram=" + (shm / "ram"), image}), 0);
  for (const char* cmd : {"info", "verify"}) {
    CAPTURE(std::string(cmd));
    RunResult r = test::run_program({"/usr/bin/setpriv", "--reuid=65534", "--regid=65534",
                                     "--clear-groups", VMSAVE_BINARY, cmd, image});
    CHECK_FAILS(r, 1, "Permission denied");
    CHECK_MESSAGE(contains(r.err, image), r.err);
    CHECK_MESSAGE(contains(r.err, "mode 0600: run vmsave as the image's owner"), r.err);
  }
  CHECK(list_dir(disk.path()) == std::vector<std::string>{"image.vmsave"});
}

TEST_CASE(
    "raw: a FIFO as image or memory file is refused, not waited on, and other non-files too") {
  // Opening a FIFO for reading blocks until a writer appears: vmsave must
  // refuse it as "not a regular file" instead of hanging.
  TempDir disk;
  std::string fifo = disk / "fifo";
  REQUIRE(mkfifo(fifo.c_str(), 0600) == 0);
  // Nor is any other thing that is not a file a damaged image (exit 3):
  // it is the wrong path.
  std::string sock = disk / "sock";
  UniqueFd listener(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, sock.c_str(), sizeof(addr.sun_path) - 1);
  REQUIRE(::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  const std::pair<std::string, std::string> others[] = {{fifo, "a FIFO"},
                                                        {sock, "a socket"},
                                                        {disk.path(), "a directory"},
                                                        {"/dev/null", "a device"}};
  for (const char* cmd : {"info", "verify"}) {
    for (const auto& [path, what] : others) {
      CAPTURE(std::string(cmd));
      CAPTURE(path);
      RunResult r = run_vmsave({cmd, path}, 5);
      CHECK_FAILS(r, 1,
                  fmt::format("vmsave: error: not an image file ({}): {}; give the path of an "
                              "image vmsave saved\n",
                              path, what));
    }
  }
  RunResult r = run_vmsave({"save", "--ram", "ram=" + fifo, disk / "image.vmsave"}, 5);
  CHECK_FAILS(r, 1, "regular file");
}

TEST_CASE("raw: bad memory files and image directories fail the save with status 1") {
  require_shm();
  TempDir shm("/dev/shm");
  TempDir disk;
  std::string src = shm / "ram";
  test::write_pattern_file(src, 64 * kKiB, "random", 7);
  std::string empty = shm / "empty";
  write_string(empty, "");
  struct Case {
    std::vector<std::string> args;
    std::string needle;
  };
  std::string image = disk / "image.vmsave";
  const std::vector<Case> cases = {
      {{"save", "--ram", "ram=" + (shm / "missing"), image}, "No such file or directory"},
      {{"save", "--ram", "ram=" + empty, image},
       "empty memory file (" + empty + "): nothing to save"},
      // Not "empty": /proc says 0 of files that hold something.
      {{"save", "--ram", "ram=/proc/meminfo", image},
       "not a memory file (/proc/meminfo): files in /proc and /sys have no size to save"},
      {{"save", "--ram", "ram=" + shm.path(), image}, "regular file"},
      {{"save", "--ram", "ram=" + src, disk / "no/such/dir/image.vmsave"},
       "No such file or directory"},
  };
  for (auto& c : cases) {
    CAPTURE(c.needle);
    RunResult r = run_vmsave(c.args);
    CHECK_FAILS(r, 1, c.needle);
    CHECK(list_dir(disk.path()).empty());
  }
  // --ram-dir that is not a usable directory.
  REQUIRE_RUN(run_vmsave({"save", "--ram", "ram=" + src, image}), 0);
  CHECK_FAILS(run_vmsave({"restore", image, "--ram-dir", disk / "nope"}), 1,
              "No such file or directory");
  CHECK_FAILS(run_vmsave({"restore", image, "--ram-dir", src}), 1, "directory");
}

TEST_CASE(
    "raw: --force replaces files only, never a directory, FIFO, empty path or the file it saves") {
  require_shm();
  SmallImage s;
  const std::string before = test::read_file(s.image);
  std::vector<std::string> ram = {"--ram", "ram0=" + (s.shm / "ram0")};
  auto save = [&](const std::string& target, bool force) {
    std::vector<std::string> args = {"save"};
    args.insert(args.end(), ram.begin(), ram.end());
    if (force) args.push_back("--force");
    args.push_back(target);
    return run_vmsave(args);
  };
  CHECK_FAILS(save("", false), 2, "image: an empty path");
  // A directory, with or without a trailing slash, --force or not.
  for (bool force : {false, true}) {
    CAPTURE(force);
    for (const std::string& dir : {s.disk.path(), s.disk.path() + "/"}) {
      RunResult r = save(dir, force);
      CHECK_FAILS(r, 1, "it is a directory");
      CHECK_MESSAGE(contains(r.err, "vm.vmsave"), r.err);  // the fix names a file in it
    }
  }
  // A FIFO (or a device: /dev/null was replaced so once) is never replaced.
  const std::string fifo = s.disk / "fifo";
  REQUIRE(mkfifo(fifo.c_str(), 0600) == 0);
  CHECK_FAILS(save(fifo, true), 1, "not a regular file");
  struct stat st;
  REQUIRE(lstat(fifo.c_str(), &st) == 0);
  CHECK(S_ISFIFO(st.st_mode));
  // Nor is a FIFO where a restore would put a RAM file.
  TempDir out("/dev/shm");
  const std::string ram_fifo = out / "ram0";
  REQUIRE(mkfifo(ram_fifo.c_str(), 0600) == 0);
  CHECK_FAILS(run_vmsave({"restore", s.image, "--ram-dir", out.path(), "--force"}), 1,
              "not a regular file");
  REQUIRE(lstat(ram_fifo.c_str(), &st) == 0);
  CHECK(S_ISFIFO(st.st_mode));
  CHECK(list_dir(out.path()) == std::vector<std::string>{"ram0"});
  // Nor the memory file being saved, by its name or a hard link's.
  const std::string memory = test::read_file(s.shm / "ram0");
  const std::string link = s.shm / "ram0.link";
  REQUIRE(::link((s.shm / "ram0").c_str(), link.c_str()) == 0);
  for (const std::string& target : {s.shm / "ram0", link})
    CHECK_FAILS(save(target, true), 1,
                "(" + target + "): it is the memory file of block ram0, which this save reads");
  CHECK(test::read_file(s.shm / "ram0") == memory);
  // The image beside them is untouched.
  CHECK(test::read_file(s.image) == before);
}

TEST_CASE("raw: prepare and a QEMU restore refuse an image of memory files: there is no VM in it") {
  require_shm();
  SmallImage s;
  TempDir out("/dev/shm");
  const std::string want = "not a QEMU image (" + s.image +
                           "): it holds memory files saved with --ram; restore it with vmsave "
                           "restore IMAGE --ram-dir DIR";
  // Before this was refused, prepare printed -incoming defer for it: a QEMU
  // started so waits for device state no restore --qmp would give.
  for (auto args : std::vector<std::vector<std::string>>{
           {"prepare", "--lazy", s.image},
           {"prepare", s.image, "--ram-dir", out.path()},
           {"restore", "--lazy", s.image, "--", out / "no-such-qemu", "-m", "1G"},
           {"restore", s.image, "--", out / "no-such-qemu", "-m", "1G"}}) {
    CAPTURE(args[0]);
    RunResult r = run_vmsave(args);
    CHECK_FAILS(r, 2, want);
    CHECK(r.out.empty());
  }
  CHECK(list_dir(out.path()).empty());
}

TEST_CASE("raw: sizes take KiB/MiB spellings, and a share is never rounded to all or nothing") {
  require_shm();
  TempDir shm("/dev/shm"), disk;
  // 12 KiB of data in 10 MiB: 99.88% zero.
  const std::string src = shm / "ram";
  test::write_pattern_file(src, 12 * kKiB, "random", 3);
  REQUIRE(::truncate(src.c_str(), 10 * kMiB) == 0);
  for (auto [spelling, bytes] : {std::pair<std::string, i64>{"1MiB", kMiB},
                                 {"64KB", 64 * kKiB},
                                 {"2M", 2 * kMiB},
                                 {"1mib", kMiB},
                                 {"1mb", kMiB},
                                 {"64kib", 64 * kKiB}}) {
    CAPTURE(spelling);
    const std::string image = disk / ("image-" + spelling);
    RunResult r = run_vmsave({"save", "--ram", "r=" + src, "--chunk-size", spelling, image});
    REQUIRE_RUN(r, 0);
    CHECK_MESSAGE(contains(r.err, "12.0 KiB stored (99.9% zero)"), r.err);
    RunResult j = run_vmsave({"info", "--json", image});
    REQUIRE_RUN(j, 0);
    CHECK(json::parse(j.out)["blocks"][0]["chunk_size"] == bytes);
    RunResult text = run_vmsave({"info", image});
    CHECK_MESSAGE(contains(text.out, "  99.9% zero  saved by vmsave"), text.out);
  }
  // A memory file named relative to the directory the save ran in is
  // recorded absolute: info, run elsewhere, shows where it was.
  {
    const std::string image = disk / "relative.vmsave";
    RunResult r =
        test::run_program({"/bin/sh", "-c", "cd \"$1\" && exec \"$0\" save --ram r=ram \"$2\"",
                           VMSAVE_BINARY, shm.path(), image});
    REQUIRE_RUN(r, 0);
    RunResult j = run_vmsave({"info", "--json", image});
    REQUIRE_RUN(j, 0);
    CHECK(json::parse(j.out)["metadata"]["blocks"][0].value("source", "") == src);
  }
  // A spelling it cannot read is named as such, not as a wrong value.
  CHECK_FAILS(run_vmsave({"save", "--ram", "r=" + src, "--chunk-size", "1Mi", disk / "x"}), 2,
              "--chunk-size: invalid size '1Mi'");
  CHECK_FAILS(run_vmsave({"save", "--ram", "r=" + src, "--chunk-size", "3M", disk / "x"}), 2,
              "--chunk-size must be a power of two");
  // So many chunks their sums would not fit the bound a reader keeps to:
  // refused before anything is written (sparse, this takes no memory).
  const std::string huge = shm / "huge";
  test::write_pattern_file(huge, 4096, "random", 5);
  REQUIRE(::truncate(huge.c_str(), (kMaxChunks + 1) * 4096) == 0);
  CHECK_FAILS(run_vmsave({"save", "--ram", "r=" + huge, "--chunk-size", "4K", disk / "x"}), 2,
              "more than the 16777216 an image may have; use a larger --chunk-size");
  CHECK_FALSE(std::filesystem::exists(disk / "x"));
}

TEST_CASE("raw: verify finds data in pages the bitmap marks zero, which a lazy restore would map") {
  require_shm();
  TempDir shm("/dev/shm"), disk;
  // Chunk 0: data pages around one zero page, which a save on a disk writes
  // as zeros with them (a gap under --min-hole); chunk 1: all zero, a hole.
  std::string src = shm / "ram";
  test::write_pattern_file(src, 2 * kMiB, "random", 5);
  int fd = open(src.c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 16 * kPage, kPage) == 0);
  REQUIRE(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 32 * kPage, 2 * kMiB - 32 * kPage) == 0);
  close(fd);
  std::string image = disk / "image.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--ram", "ram=" + src, "--min-hole", "64K", image}), 0);
  CHECK_RUN(run_vmsave({"verify", image}), 0);
  const i64 region = layout_of(image).blocks[0].region.offset;
  for (i64 page : {16, 300}) {
    CAPTURE(page);
    xor_byte(image, region + page * kPage + 123, 0x40);
    RunResult r = run_vmsave({"verify", image});
    CHECK_FAILS(r, 3, fmt::format("page {} is marked zero but holds data", page));
    CHECK(contains(r.err, fmt::format("at offset {}:", region + page * kPage)));  // the page's
    xor_byte(image, region + page * kPage + 123, 0x40);
    CHECK_RUN(run_vmsave({"verify", image}), 0);
  }
}

TEST_CASE("raw: chunks over 4 MiB are verified in windows, as strictly, and restored") {
  // verify read each chunk into a buffer of its size: with --chunk-size 1G
  // or 1 GiB pages it took 1 GiB of memory per worker.
  require_shm();
  TempDir shm("/dev/shm"), disk;
  // Not a whole number of pages: its last page has bytes past the end.
  const i64 size = 96 * kMiB + 1234;
  std::string src = shm / "ram";
  test::write_pattern_file(src, size, "random", 9);
  int fd = open(src.c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 16 * kPage, kPage) == 0);
  close(fd);
  for (const char* chunk : {"1M", "1G"}) {
    CAPTURE(std::string(chunk));
    std::string image = disk / "image.vmsave";
    REQUIRE_RUN(run_vmsave({"save", "--force", "--chunk-size", chunk, "--ram", "ram=" + src,
                            "--min-hole", "64K", image}),
                0);
    RunResult r = run_vmsave({"verify", image});
    CHECK_RUN(r, 0);
    // A child's peak counts what it shared with this process before exec:
    // ctest runs each case in a process of its own. Under ASan, its shadow
    // memory comes on top (as in the --jobs test).
#if defined(__SANITIZE_ADDRESS__)
    const long limit_kib = 160 * 1024;
#else
    const long limit_kib = 48 * 1024;
#endif
    CHECK_MESSAGE(r.max_rss_kib < limit_kib, "verify's peak RSS: ", r.max_rss_kib, " KiB");
    const i64 region = layout_of(image).blocks[0].region.offset;
    const i64 last = align_down(size, kPage) / kPage;
    struct Damage {
      i64 at;
      std::string says;
    };
    for (const Damage& d :
         {Damage{region + size + 10, "holds data past the block's end, in its last page"},
          Damage{region + 16 * kPage + 5, "page 16 is marked zero but holds data"},
          Damage{region + last * kPage + 7, "checksum mismatch"},
          Damage{region + 40 * kMiB, "checksum mismatch"}}) {
      CAPTURE(d.at);
      xor_byte(image, d.at, 0x10);
      CHECK_FAILS(run_vmsave({"verify", image}), 3, d.says);
      xor_byte(image, d.at, 0x10);
    }
    CHECK_RUN(run_vmsave({"verify", image}), 0);
    std::string out = shm / "out";
    ::mkdir(out.c_str(), 0700);
    REQUIRE_RUN(run_vmsave({"restore", "--force", image, "--ram-dir", out}), 0);
    std::string why;
    CHECK_MESSAGE(test::files_equal(src, out + "/ram", &why), why);
  }
}

namespace {

// vmsave started with `sig` blocked and pending, as a signal sent in the
// instant before it set its handlers; `ignored`: and set to SIG_IGN first,
// as nohup does with SIGHUP.
RunResult run_with_pending_signal(const std::vector<std::string>& args, int sig, bool ignored,
                                  const std::string& err_file) {
  std::vector<char*> argv{const_cast<char*>(VMSAVE_BINARY)};  // built before fork: no malloc after
  for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int fd = ::open(err_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || dup2(fd, 2) < 0) _exit(126);
    if (ignored) signal(sig, SIG_IGN);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, sig);
    sigprocmask(SIG_BLOCK, &mask, nullptr);
    raise(sig);  // pending across exec: delivered once vmsave unblocks it
    execv(argv[0], argv.data());
    _exit(127);
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  RunResult r;
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.err = test::read_file(err_file);
  return r;
}

}  // namespace

TEST_CASE("raw: a signal at start-up interrupts with 130, and one ignored on entry stays ignored") {
  require_shm();
  SmallImage s;
  TempDir out, ram;
  const std::string err = out / "stderr";
  // Before its handlers were set, SIGTERM killed vmsave with 143, and one
  // blocked by the parent could not stop it at all.
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
    CAPTURE(sig);
    RunResult r =
        run_with_pending_signal({"restore", s.image, "--ram-dir", ram.path()}, sig, false, err);
    CHECK_FAILS(r, 130, fmt::format("vmsave: error: interrupted by SIG{}", sigabbrev_np(sig)));
    CHECK(list_dir(ram.path()).empty());
  }
  // nohup's SIGHUP (and a background job's SIGINT) are the caller's word
  // that the job must not stop for them.
  for (int sig : {SIGHUP, SIGINT}) {
    CAPTURE(sig);
    RunResult r = run_with_pending_signal({"restore", s.image, "--ram-dir", ram.path(), "-q"}, sig,
                                          true, err);
    CHECK_MESSAGE(r.status == 0, show(r));
    CHECK(list_dir(ram.path()) == s.ids);
    for (auto& id : s.ids) std::filesystem::remove(ram / id);
  }
}

TEST_CASE("raw: every --json report has command and ok, and all but info's total_s and steps_s") {
  require_shm();
  SmallImage s;
  TempDir ram;
  const std::string again = s.disk / "again.vmsave";
  const std::vector<std::vector<std::string>> runs = {
      {"save", "--json", "--ram", "ram0=" + (s.shm / "ram0"), again},
      {"info", "--json", s.image},
      {"verify", "--json", s.image},
      {"restore", "--json", s.image, "--ram-dir", ram.path()},
  };
  for (auto& args : runs) {
    CAPTURE(args[0]);
    RunResult r = run_vmsave(args);
    REQUIRE_RUN(r, 0);
    json j = json::parse(r.out, nullptr, false);
    REQUIRE_MESSAGE(j.is_object(), r.out);
    CHECK(j.value("command", "") == args[0]);  // info had none
    CHECK(j.value("ok", false));
    if (args[0] == "info") continue;
    CHECK(j["total_s"].is_number());  // verify had neither
    CHECK_MESSAGE(j["steps_s"].is_object(), j.dump());
    CHECK(!j["steps_s"].empty());
  }
}

TEST_CASE(
    "raw: with io_uring refused (a container's seccomp profile) every command works, and says so "
    "once where a ring would have been used") {
  require_shm();
  TempDir shm{"/dev/shm"}, disk, out;
  // A block of 8 MiB and one of an odd size, whose last page is partial.
  const std::vector<std::pair<std::string, i64>> blocks = {{"ram0", 8 * kMiB},
                                                           {"ram1", 3 * kMiB + 5000}};
  for (size_t i = 0; i < blocks.size(); i++)
    test::write_pattern_file(shm / blocks[i].first, blocks[i].second, "mixed", 40 + i);
  auto refused = [](std::vector<std::string> args) {
    args.insert(args.begin(), {NO_IO_URING_BINARY, VMSAVE_BINARY});
    return test::run_program(args);
  };
  const std::string kSaid =
      "vmsave: warning: io_uring is unavailable (io_uring_setup: "
      "Operation not permitted";
  // Work between files in memory uses no ring: nothing to warn about there.
  std::string image;
  auto said_once = [&](const RunResult& r) {
    size_t at = r.err.find(kSaid);
    if (image.starts_with("/dev/shm/")) return at == std::string::npos;
    return at != std::string::npos && r.err.find(kSaid, at + 1) == std::string::npos;
  };
  // Into an image on a disk (O_DIRECT writes) and one in memory (tmpfs:
  // writes taken in turns, reads made inline).
  for (const std::string& path : {disk / "vm.vmsave", shm / "vm.vmsave"}) {
    image = path;
    CAPTURE(image);
    std::vector<std::string> save = {"save", image, "--json"};
    for (auto& [id, size] : blocks) save.insert(save.end(), {"--ram", id + "=" + (shm / id)});
    RunResult r = refused(save);
    REQUIRE_RUN(r, 0);
    CHECK_MESSAGE(said_once(r), r.err);
    CHECK(json::parse(r.out).value("ok", false));

    RunResult v = refused({"verify", image});
    CHECK_RUN(v, 0);
    CHECK_MESSAGE(said_once(v), v.err);

    const std::string dir = out / (image.starts_with("/dev/shm") ? "from-shm" : "from-disk");
    REQUIRE(::mkdir(dir.c_str(), 0700) == 0);
    RunResult back = refused({"restore", image, "--ram-dir", dir});
    REQUIRE_RUN(back, 0);
    CHECK_MESSAGE(said_once(back), back.err);
    for (auto& [id, size] : blocks) {
      std::string why;
      CHECK_MESSAGE(test::files_equal(shm / id, dir + "/" + id, &why), id << ": " << why);
    }

    // The reads are checked as closely as through the ring: one byte off in
    // a data page of ram1 is damage there.
    const ImageLayout img = layout_of(image);
    const BlockLayout& b1 = img.blocks[1];
    std::vector<u8> bitmap = read_bytes(image, b1.bitmap.offset, b1.bitmap.length);
    i64 page = 0;
    while (!bitmap_test(bitmap.data(), page)) page++;
    xor_byte(image, b1.region.offset + page * kPage + 77, 0x10);
    RunResult bad = refused({"verify", image});
    CHECK_FAILS(bad, 3, "ram1");
  }
  // Where the kernel gives a ring, nothing is said.
  RunResult ring = run_vmsave({"save", "--ram", "ram0=" + (shm / "ram0"), disk / "ring.vmsave"});
  CHECK_RUN(ring, 0);
  CHECK_FALSE(contains(ring.err, "io_uring"));
}

namespace {

// A cgroup of `controller` ("pids", "memory") for the test's children,
// removed when it goes: cgroup v1's hierarchy of that controller, or v2's
// where the root hands the controller down. Skips the case without one.
struct TestCgroup {
  std::string path;
  explicit TestCgroup(const std::string& controller) {
    if (geteuid() != 0) test::skip("a cgroup of its own needs root");
    std::string root;
    if (access(("/sys/fs/cgroup/" + controller + "/cgroup.procs").c_str(), W_OK) == 0)
      root = "/sys/fs/cgroup/" + controller;
    else if (access("/sys/fs/cgroup/cgroup.subtree_control", R_OK) == 0 &&
             contains(test::read_file("/sys/fs/cgroup/cgroup.subtree_control"), controller))
      root = "/sys/fs/cgroup";
    else
      test::skip("no " + controller + " cgroup controller here");
    path = fmt::format("{}/vmsave-test-{}-{}", root, controller, getpid());
    REQUIRE(::mkdir(path.c_str(), 0755) == 0);
  }
  ~TestCgroup() { ::rmdir(path.c_str()); }
  // `args` to vmsave, run in this cgroup.
  RunResult run(std::vector<std::string> args) const {
#if defined(__SANITIZE_ADDRESS__)
    // LeakSanitizer stops the world at exit with a thread of its own,
    // which a pids limit of 1 refuses: a fatal error of its own, not vmsave's.
    const char* script =
        "echo $$ > \"$0/cgroup.procs\" && "
        "ASAN_OPTIONS=\"$ASAN_OPTIONS:detect_leaks=0\" exec \"$@\"";
#else
    const char* script = "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"";
#endif
    args.insert(args.begin(), {"/bin/sh", "-c", script, path, VMSAVE_BINARY});
    return test::run_program(args);
  }
};

}  // namespace

TEST_CASE("raw: out of threads (a pids cgroup), the work goes on in the workers that started") {
  // It was "terminate called after throwing an instance of
  // 'std::system_error'", exit 134, whenever a worker thread could not
  // start (trial N).
  require_shm();
  TestCgroup cgroup("pids");
  const std::string& cg = cgroup.path;
  write_string(cg + "/pids.max", "1");  // vmsave's main thread and nothing more
  TempDir shm{"/dev/shm"}, disk, out;
  test::write_pattern_file(shm / "ram", 8 * kMiB, "mixed", 5);
  const std::string image = disk / "vm.vmsave";
  RunResult save =
      cgroup.run({"save", "--ram", "ram=" + (shm / "ram"), image, "--jobs", "4", "--json"});
  REQUIRE_RUN(save, 0);
  CHECK(json::parse(save.out).value("jobs", 0) == 1);
  CHECK_RUN(cgroup.run({"verify", image, "--jobs", "4"}), 0);
  // A restore has its watchdog (a process) besides: room for that alone.
  write_string(cg + "/pids.max", "2");
  RunResult back = cgroup.run({"restore", image, "--ram-dir", out.path(), "--jobs", "4"});
  CHECK_RUN(back, 0);
  std::string why;
  CHECK_MESSAGE(test::files_equal(shm / "ram", out / "ram", &why), why);
}

TEST_CASE("raw: a save maps no RAM it reads with pread, so ulimit -v need not cover it") {
#if defined(__SANITIZE_ADDRESS__)
  test::skip("the sanitizers reserve terabytes of address space");
#endif
  // A save took address space for all of guest RAM, which it reads with
  // pread, and said to use fewer --jobs when it had none (trial N).
  require_shm();
  TempDir shm{"/dev/shm"}, disk, out;
  const std::string mem = shm / "ram";
  test::write_pattern_file(mem, 8 * kMiB, "mixed", 9);
  REQUIRE(::truncate(mem.c_str(), 512 * kMiB) == 0);  // the rest holes
  auto limited = [&](const std::vector<std::string>& args) {
    std::vector<std::string> argv = {"/bin/sh", "-c", "ulimit -v 262144 && exec \"$@\"", "sh",
                                     VMSAVE_BINARY};
    argv.insert(argv.end(), args.begin(), args.end());
    return test::run_program(argv);
  };
  const std::string image = disk / "vm.vmsave";
  CHECK_RUN(limited({"save", "--ram", "ram=" + mem, image}), 0);
  CHECK_RUN(limited({"verify", image}), 0);
  CHECK_RUN(limited({"restore", image, "--ram-dir", out.path()}), 0);
  std::string why;
  CHECK_MESSAGE(test::files_equal(mem, out / "ram", &why), why);
  // Compressed, it does map the file, and says what the limit must cover.
  RunResult z = limited({"save", "--ram", "ram=" + mem, disk / "z.vmsave", "--compress", "lz4"});
  CHECK_FAILS(z, 1,
              "this save maps the whole memory file (512.0 MiB): raise the address-space limit "
              "(ulimit -v) above that");
}

namespace {

// Runs vmsave with stdout and stderr on a new terminal `columns` wide
// (TERM=xterm), as the terminal's foreground job or, with `background`, in
// a process group of its own; with `sigint_after_s`, Ctrl-C on that
// terminal then. Returns what the terminal showed; checks the exit status.
std::string run_on_terminal(const std::vector<std::string>& args, int columns, bool background,
                            double sigint_after_s = 0, int want_status = 0) {
  std::vector<std::string> argv = {VMSAVE_BINARY};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<char*> cargv;
  for (auto& a : argv) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  winsize ws{};
  ws.ws_row = 24;
  ws.ws_col = static_cast<unsigned short>(columns);
  int master = -1;
  pid_t pid = forkpty(&master, nullptr, nullptr, &ws);
  REQUIRE(pid >= 0);
  if (pid == 0) {  // the session leader, in the terminal's foreground
    ::setenv("TERM", "xterm", 1);
    if (background) {
      pid_t job = ::fork();
      if (job > 0) {
        int st = 0;
        ::waitpid(job, &st, 0);
        ::_exit(WIFEXITED(st) ? WEXITSTATUS(st) : 128);
      }
      ::setpgid(0, 0);  // a job of its own, not the foreground one
    }
    ::execv(cargv[0], cargv.data());
    ::_exit(127);
  }
  std::string shown;
  char buf[4096];
  const double t0 = test::now_s();
  bool sent = sigint_after_s <= 0;
  for (;;) {
    if (!sent && test::now_s() - t0 >= sigint_after_s) {
      const char ctrl_c = 3;  // the terminal's INTR character: SIGINT, and "^C" echoed
      REQUIRE(::write(master, &ctrl_c, 1) == 1);
      sent = true;
    }
    pollfd pfd{master, POLLIN, 0};
    if (::poll(&pfd, 1, 20) == 0) continue;
    ssize_t n = ::read(master, buf, sizeof buf);
    if (n <= 0) break;  // EIO once the terminal's last user is gone
    shown.append(buf, size_t(n));
  }
  int st = 0;
  ::waitpid(pid, &st, 0);
  ::close(master);
  CHECK_MESSAGE((WIFEXITED(st) && WEXITSTATUS(st) == want_status), shown);
  return shown;
}

// The progress lines redrawn in place: the text after each "\r" up to its
// "\x1b[K", but for a phase's last, which a newline ends (it may wrap).
std::vector<std::string> redrawn_lines(const std::string& shown) {
  std::vector<std::string> out;
  for (size_t at = 0; (at = shown.find('\r', at)) != std::string::npos; at++) {
    size_t end = shown.find("\x1b[K", at);
    if (end == std::string::npos) break;
    std::string line = shown.substr(at + 1, end - at - 1);
    const bool last =
        shown.compare(end + 3, 2, "\r\n") == 0 || shown.compare(end + 3, 1, "\n") == 0;
    if (!line.empty() && !last && line.find('\n') == std::string::npos) out.push_back(line);
  }
  return out;
}

}  // namespace

TEST_CASE("raw: the progress line fits the terminal, and a background job does not redraw it") {
  // It wrapped on a narrow terminal, leaving rows behind at every redraw,
  // and a background job redrew it over the shell's prompt (trial P).
  require_shm();
  TempDir shm{"/dev/shm"}, disk;
  test::write_pattern_file(shm / "ram", 24 * kMiB, "random", 4);  // zstd:19: seconds
  const std::vector<std::string> save = {
      "save", "--ram", "ram=" + (shm / "ram"), "--compress", "zstd:19", "--jobs", "1"};
  auto with = [&](const char* image) {
    std::vector<std::string> a = save;
    a.push_back(disk / image);
    return a;
  };
  const std::string narrow = run_on_terminal(with("narrow.vmsave"), 30, false);
  std::vector<std::string> lines = redrawn_lines(narrow);
  REQUIRE_MESSAGE(lines.size() >= 3, narrow);
  // Whole fields dropped to fit, the rate first; never a number cut in
  // two ("verifying: 2.2 GiB....2 GiB/s" read as a rate; trial U).
  const std::regex whole(R"(writing RAM(: \d+%(, \d+ s left)?)?)");
  for (auto& l : lines) {
    CHECK_MESSAGE(l.size() <= 29, l);
    CHECK_MESSAGE(std::regex_match(l, whole), l);
  }
  CHECK_MESSAGE(contains(narrow, "saved "), narrow);
  // Wide enough for the byte counts, but not the rate.
  const std::string medium = run_on_terminal(with("medium.vmsave"), 63, false);
  lines = redrawn_lines(medium);
  REQUIRE_MESSAGE(lines.size() >= 3, medium);
  const std::regex counts(
      R"(writing RAM: [\d.]+ [KMG]?i?B of 24\.0 MiB in use \(\d+%\)(, [\d.]+ [KMG]?i?B/s)?(, \d+ s left)?)");
  for (auto& l : lines) {
    CHECK_MESSAGE(l.size() <= 62, l);
    CHECK_MESSAGE(std::regex_match(l, counts), l);
  }

  const std::string bg = run_on_terminal(with("background.vmsave"), 80, true);
  CHECK_MESSAGE(redrawn_lines(bg).empty(), bg);
  // Its phases' final lines and summary still come, plain.
  CHECK_MESSAGE(contains(bg, "writing RAM: 24.0 MiB of 24.0 MiB in use (100%)"), bg);
  CHECK_MESSAGE(contains(bg, "saved "), bg);

  // Ctrl-C: the phase's line says so, and the error has a line of its own,
  // not after the "^C" the terminal echoed (trial P).
  const std::string stopped = run_on_terminal(with("stopped.vmsave"), 80, false, 0.3, 130);
  CHECK_MESSAGE(contains(stopped, " (interrupted)\x1b[K\r\n"), stopped);
  CHECK_MESSAGE(contains(stopped, "\r\x1b[Kvmsave: error: interrupted by SIGINT\r\n"), stopped);
  CHECK_FALSE(std::filesystem::exists(disk / "stopped.vmsave"));
}

TEST_CASE("raw: restore --force over a RAM file another user owns says so, and keeps it") {
  // "cannot create RAM file (...): Permission denied; put it where vmsave
  // can write", of a directory the user could write (trial N).
  require_shm();
  if (geteuid() != 0) test::skip("needs root to run vmsave as another user");
  if (access("/usr/bin/setpriv", X_OK) != 0) test::skip("no setpriv");
  SmallImage s;
  TempDir out;
  REQUIRE(::chmod(s.disk.path().c_str(), 0755) == 0);
  REQUIRE(::chmod(s.image.c_str(), 0644) == 0);
  REQUIRE(::chmod(out.path().c_str(), 0777) == 0);
  write_string(out / "ram0", "root's");
  REQUIRE(::chmod((out / "ram0").c_str(), 0600) == 0);
  RunResult r = test::run_program({"/usr/bin/setpriv", "--reuid=65534", "--regid=65534",
                                   "--clear-groups", VMSAVE_BINARY, "restore", s.image, "--ram-dir",
                                   out.path() + "//", "--force"});
  CHECK_FAILS(r, 1,
              "cannot overwrite RAM file (" + (out / "ram0") +
                  "): Permission denied; it exists and is not writable by this user (its owner "
                  "is uid 0): remove it first, or restore as its owner");
  CHECK(test::read_file(out / "ram0") == "root's");
}

TEST_CASE("raw: a save commits on FUSE, which refuses rename's RENAME_NOREPLACE") {
  // Every save to sshfs, fuse2fs or exfat-fuse failed at its very end with
  // "rename (...): Invalid argument", the guest paused all the while (trial R).
  require_shm();
  if (geteuid() != 0 || access("/dev/fuse", R_OK | W_OK) != 0) test::skip("no FUSE for root here");
  if (access("/usr/bin/fuse2fs", X_OK) != 0 || access("/sbin/mkfs.ext4", X_OK) != 0)
    test::skip("fuse2fs or mkfs.ext4 is missing");
  TempDir shm{"/dev/shm"}, disk;
  const std::string fs = disk / "fs.ext4", mnt = disk / "mnt";
  REQUIRE(::mkdir(mnt.c_str(), 0700) == 0);
  REQUIRE_RUN(test::run_program({"/usr/bin/truncate", "-s", "64M", fs}), 0);
  REQUIRE_RUN(test::run_program({"/sbin/mkfs.ext4", "-q", "-F", fs}), 0);
  REQUIRE_RUN(test::run_program({"/usr/bin/fuse2fs", fs, mnt, "-o", "fakeroot"}), 0);
  struct Unmount {
    std::string at;
    ~Unmount() { ::umount2(at.c_str(), MNT_DETACH); }
  } unmount{mnt};
  test::write_pattern_file(shm / "ram", 5 * kMiB + 4096, "mixed", 12);
  const std::string image = mnt + "/vm.vmsave";
  RunResult r = run_vmsave({"save", "--ram", "ram=" + (shm / "ram"), image});
  REQUIRE_RUN(r, 0);
  CHECK_RUN(run_vmsave({"verify", image}), 0);
  // The temporary file went into place: nothing else is left beside it.
  CHECK(list_dir(mnt) == std::vector<std::string>{"lost+found", "vm.vmsave"});
  // And a second save still never replaces it without --force.
  r = run_vmsave({"save", "--ram", "ram=" + (shm / "ram"), image});
  CHECK_FAILS(r, 1, "image exists");
  r = run_vmsave({"save", "--ram", "ram=" + (shm / "ram"), image, "--force"});
  CHECK_RUN(r, 0);
  const std::string out = shm / "out";
  REQUIRE(::mkdir(out.c_str(), 0700) == 0);
  REQUIRE_RUN(run_vmsave({"restore", image, "--ram-dir", out}), 0);
  std::string why;
  CHECK_MESSAGE(test::files_equal(shm / "ram", out + "/ram", &why), why);
}

TEST_CASE("raw: save --force never takes the path of a file a process maps shared") {
  // A typo naming another VM's RAM file: the image took its path, and that
  // VM ran on a file nobody could find (trial Q). A private mapping (a lazy
  // clone's of its image) is no obstacle.
  require_shm();
  SmallImage s;
  const std::string other = s.shm / "other";
  test::write_pattern_file(other, kMiB, "text", 3);
  std::string before = test::read_file(other);
  UniqueFd fd(::open(other.c_str(), O_RDWR | O_CLOEXEC));
  REQUIRE(fd);
  for (int flags : {MAP_SHARED, MAP_PRIVATE}) {
    CAPTURE(flags);
    void* map = ::mmap(nullptr, kMiB, PROT_READ | PROT_WRITE, flags, fd.get(), 0);
    REQUIRE(map != MAP_FAILED);
    RunResult r = run_vmsave({"save", "--ram", "ram0=" + (s.shm / "ram0"), other, "--force"});
    ::munmap(map, kMiB);
    if (flags == MAP_SHARED) {
      CHECK_FAILS(r, 1,
                  fmt::format("cannot save there ({}): process {} (vmsave_tests) maps it shared: "
                              "it is a running VM's RAM file, or memory another program uses; "
                              "choose another path for the image",
                              other, getpid()));
      CHECK(test::read_file(other) == before);
    } else {
      CHECK_RUN(r, 0);
      CHECK_RUN(run_vmsave({"verify", other}), 0);
    }
  }
}

TEST_CASE("raw: save --force onto a bind-mounted file is refused before any RAM is written") {
  // It wrote all of the RAM, then failed at the rename: EBUSY (trial R).
  require_shm();
  if (geteuid() != 0) test::skip("needs root to bind-mount");
  SmallImage s;
  const std::string other = s.disk / "other.vmsave", target = s.disk / "target.vmsave";
  write_string(other, "other");
  write_string(target, "target");
  REQUIRE(::mount(other.c_str(), target.c_str(), nullptr, MS_BIND, nullptr) == 0);
  RunResult r = run_vmsave({"save", "--ram", "ram0=" + (s.shm / "ram0"), target, "--force"});
  ::umount2(target.c_str(), MNT_DETACH);
  CHECK_FAILS(r, 1,
              "cannot replace (" + target +
                  "): a file is mounted on it (a bind mount); unmount it, or choose another path "
                  "for the image");
  CHECK_FALSE(contains(r.err, "writing RAM"));
  CHECK(test::read_file(target) == "target");
  CHECK(test::read_file(other) == "other");
}

TEST_CASE(
    "raw: RAM files in a tmpfs that holds their data but not all of them are restored with a "
    "warning") {
  // Accepted silently: the guest died of SIGBUS once it filled more of its
  // memory than the tmpfs had room for (trial R).
  require_shm();
  test::require_mount("tmpfs");
  SmallImage s;  // two blocks of 256 KiB, a quarter of each zero
  test::TempMount small("tmpfs", "size=400k");
  REQUIRE(small.ok());
  RunResult r = run_vmsave({"restore", s.image, "--ram-dir", small.path()});
  CHECK_RUN(r, 0);
  CHECK_MESSAGE(contains(r.err, "vmsave: warning: " + (small / "ram1") + " holds the guest's "),
                r.err);
  CHECK_MESSAGE(contains(r.err,
                         "the guest dies of SIGBUS if it fills more; give the filesystem "
                         "more room"),
                r.err);
  std::string why;
  for (auto& id : s.ids) CHECK_MESSAGE(test::files_equal(s.shm / id, small / id, &why), why);
  // Room for all of it: nothing to say.
  test::TempMount roomy("tmpfs", "size=1m");
  REQUIRE(roomy.ok());
  r = run_vmsave({"restore", s.image, "--ram-dir", roomy.path()});
  CHECK_RUN(r, 0);
  CHECK_FALSE(contains(r.err, "warning"));
}

TEST_CASE("raw: restore --force replaces another user's RAM file with one of its own") {
  // Filled in place, the file stayed its owner's (mode 0600 or not): a user
  // who made it in a shared directory, and kept it open, read and wrote the
  // restored guest's memory (trial S).
  require_shm();
  if (geteuid() != 0) test::skip("needs root to give a file to another user");
  SmallImage s;
  TempDir out{"/dev/shm"};
  REQUIRE(::chmod(out.path().c_str(), 01777) == 0);  // like /tmp and /dev/shm
  const std::string ram0 = out / "ram0";
  write_string(ram0, "theirs");
  REQUIRE(::chown(ram0.c_str(), 65534, 65534) == 0);
  UniqueFd theirs(::open(ram0.c_str(), O_RDWR | O_CLOEXEC));  // held open, as its owner would
  REQUIRE(theirs);
  RunResult r = run_vmsave({"restore", s.image, "--ram-dir", out.path(), "--force"});
  REQUIRE_RUN(r, 0);
  struct stat st;
  REQUIRE(::stat(ram0.c_str(), &st) == 0);
  CHECK(st.st_uid == 0);
  CHECK((st.st_mode & 07777) == 0600);
  std::string why;
  CHECK_MESSAGE(test::files_equal(s.shm / "ram0", ram0, &why), why);
  // What its owner holds is the old file, with none of the guest in it.
  char buf[16] = {};
  CHECK(::pread(theirs.get(), buf, sizeof(buf), 0) == 6);
  CHECK(std::string(buf) == "theirs");
}

TEST_CASE(
    "raw: RAM files in tmpfs that a memory cgroup cannot hold are refused before any is written") {
  // tmpfs pages are charged to the cgroup that writes them: vmsave in a
  // 64 MiB cgroup was OOM-killed part-way through a restore (trial N).
  require_shm();
  TestCgroup cgroup("memory");
  const std::string limit_file = contains(cgroup.path, "/sys/fs/cgroup/memory/")
                                     ? cgroup.path + "/memory.limit_in_bytes"
                                     : cgroup.path + "/memory.max";
  write_string(limit_file, std::to_string(64 * kMiB));
  TempDir shm{"/dev/shm"}, disk, out{"/dev/shm"};
  for (int i = 0; i < 2; i++)
    test::write_pattern_file(shm / fmt::format("ram{}", i), 48 * kMiB, "random", 7 + i);
  const std::string image = disk / "vm.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--ram", "ram0=" + (shm / "ram0"), "--ram",
                          "ram1=" + (shm / "ram1"), image}),
              0);
  // 48 MiB fits, 96 do not: said of the second file, before either is filled.
  RunResult r = cgroup.run({"restore", image, "--ram-dir", out.path()});
  CHECK_FAILS(r, 1,
              "not enough memory for RAM file (" + (out / "ram1") +
                  "): it needs 48.0 MiB for block ram1 (and 48.0 MiB for the RAM files before "
                  "it), in memory charged to the memory cgroup vmsave runs in (" +
                  cgroup.path +
                  "), which is limited to 64.0 MiB; raise that cgroup's memory limit, or run "
                  "vmsave outside it");
  CHECK(list_dir(out.path()).empty());
  // Outside it, the same restore goes through.
  CHECK_RUN(run_vmsave({"restore", image, "--ram-dir", out.path()}), 0);
}

TEST_CASE("raw: a phase that fails ends with an interrupted final progress line") {
  // The man page says so; a save that ran out of room ended its phase with
  // a final line like a finished one, done short of total (trial U).
  require_shm();
  test::TempMount small("tmpfs", "size=4m");
  if (!small.ok()) test::skip(small.error());
  TempDir shm("/dev/shm");
  test::write_pattern_file(shm / "ram", 16 * kMiB, "random", 6);
  const std::string progress = shm / "progress";
  RunResult r = test::run_program(
      {"/bin/sh", "-c", "exec \"$0\" save --ram ram=\"$1\" \"$2\" --progress-fd 5 5>\"$3\"",
       VMSAVE_BINARY, shm / "ram", small / "image.vmsave", progress});
  CHECK_FAILS(r, 1, "No space left on device");
  std::vector<json> lines;
  std::istringstream in(test::read_file(progress));
  for (std::string l; std::getline(in, l);) lines.push_back(json::parse(l));
  REQUIRE_FALSE(lines.empty());
  const json& last = lines.back();
  CHECK_MESSAGE(last.value("phase", "") == "writing RAM", last.dump());
  CHECK(last.value("final", false));
  CHECK_MESSAGE(last.value("interrupted", false), last.dump());
  CHECK_MESSAGE(contains(r.err, " (failed)"), r.err);
  CHECK_FALSE(std::filesystem::exists(small / "image.vmsave"));
}

TEST_CASE(
    "raw: progress counts the data a save, restore or verify moves, which holes do not slow") {
  // With the data low in RAM, the line said 61% (of the address space)
  // until the last second, and the time left grew toward the end (trial U).
  require_shm();
  TempDir shm("/dev/shm");
  const std::string ram = shm / "ram", image = shm / "image.vmsave", out = shm / "out";
  test::write_pattern_file(ram, 16 * kMiB, "random", 7);
  REQUIRE(::truncate(ram.c_str(), 64 * kMiB) == 0);  // 48 MiB of holes after it
  REQUIRE(::mkdir(out.c_str(), 0700) == 0);
  const std::string progress = shm / "progress";
  // Runs vmsave with `args` and --progress-fd into `progress`; its lines.
  auto run_with_progress = [&](const std::vector<std::string>& args, RunResult* r) {
    std::vector<std::string> argv = {
        "/bin/sh", "-c",     "p=$1; shift; exec \"$@\" --progress-fd 5 5>\"$p\"",
        "sh",      progress, VMSAVE_BINARY};
    argv.insert(argv.end(), args.begin(), args.end());
    *r = test::run_program(argv);
    std::vector<json> lines;
    std::istringstream in(test::read_file(progress));
    for (std::string l; std::getline(in, l);) lines.push_back(json::parse(l));
    return lines;
  };
  RunResult r;
  std::vector<json> lines = run_with_progress({"save", "--ram", "ram=" + ram, image}, &r);
  REQUIRE_RUN(r, 0);
  REQUIRE_FALSE(lines.empty());
  const json last = lines.back();
  CHECK_MESSAGE(last.value("total", i64(0)) == 64 * kMiB, last.dump());
  for (const json& l : lines) CHECK(l.value("data_done", i64(0)) <= l.value("data_total", i64(0)));
  CHECK_MESSAGE(contains(r.err, "writing RAM: 16.0 MiB of 16.0 MiB in use (100%)"), r.err);

  // A restore counts the data the image stores (it too said 61% till the
  // end), and a verify too (it sat at 25%).
  std::vector<std::vector<json>> runs = {lines};
  runs.push_back(run_with_progress({"restore", image, "--ram-dir", out}, &r));
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(contains(r.err, "reading RAM: 16.0 MiB of 16.0 MiB in use (100%)"), r.err);
  std::string why;
  CHECK_MESSAGE(test::files_equal(ram, out + "/ram", &why), why);
  runs.push_back(run_with_progress({"verify", image}, &r));
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(contains(r.err, "verifying: 16.0 MiB of 16.0 MiB in use (100%)"), r.err);
  // Chunks of more than 4 MiB are verified in windows, another path.
  const std::string large = shm / "large.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--ram", "ram=" + ram, "--chunk-size", "16M", large}), 0);
  runs.push_back(run_with_progress({"verify", large}, &r));
  REQUIRE_RUN(r, 0);
  for (const auto& run : runs) {
    REQUIRE_FALSE(run.empty());
    CHECK_MESSAGE(run.back().value("data_total", i64(0)) == 16 * kMiB, run.back().dump());
    CHECK_MESSAGE(run.back().value("data_done", i64(0)) == 16 * kMiB, run.back().dump());
  }
}

TEST_CASE("raw: cmake --install puts vmsave and its manual under the prefix") {
  // There were no install rules: a packager had to copy files by hand.
  TempDir prefix;
  const std::string build = std::filesystem::path(VMSAVE_BINARY).parent_path();
  RunResult r = test::run_program({"cmake", "--install", build, "--prefix", prefix.path()});
  REQUIRE_RUN(r, 0);
  const std::string bin = prefix / "bin/vmsave";
  RunResult v = test::run_program({bin, "--version"});
  CHECK_RUN(v, 0);
  CHECK_MESSAGE(v.out == run_vmsave({"--version"}).out, v.out);
  std::string why;
  CHECK_MESSAGE(test::files_equal(std::string(VMSAVE_SOURCE_DIR) + "/man/vmsave.1",
                                  prefix / "share/man/man1/vmsave.1", &why),
                why);
}
