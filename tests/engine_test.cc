// End-to-end tests of the RAM engine (io/ and core/image_io) through the
// real binary in raw mode: round trips of every kind of memory content and
// size over worker and queue-depth settings, holes that stay holes, the
// O_DIRECT fallback, a full filesystem, injected I/O faults and signals.
//
// Source RAM files live in a private /dev/shm directory (tmpfs, where
// SEEK_DATA and st_blocks are exact), images in a temporary directory on
// disk (real O_DIRECT). Every directory and mount is a RAII fixture, so a
// failing check leaves nothing behind.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>
#include <fmt/core.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/image_io.h"
#include "tests/test_util.h"

using namespace vmsave;
using json = nlohmann::json;
using test::run_vmsave;
using test::contains;
using test::RunResult;
using test::show;
using test::TempDir;
using test::require_mount;
using test::TempMount;

namespace {

constexpr i64 kPage = 4096;
const std::vector<i64> kSizes = {4096, 5000, 1 * kMiB, 3 * kMiB + 8 * kKiB, 64 * kMiB};

// Pages of `path` that hold a non-zero byte (the last page may be partial).
std::vector<bool> data_page_map(const std::string& path) {
  std::string s = test::read_file(path);
  std::vector<bool> out;
  for (size_t off = 0; off < s.size(); off += kPage) {
    size_t n = std::min<size_t>(kPage, s.size() - off);
    bool data = false;
    for (size_t i = 0; i < n && !data; i++) data = s[off + i] != 0;
    out.push_back(data);
  }
  return out;
}

i64 count(const std::vector<bool>& v) {
  return std::count(v.begin(), v.end(), true);
}

// Bytes of zero pages a save with `min_hole` writes along with the data:
// the gaps shorter than min_hole between data runs of one 1 MiB chunk.
i64 filled_gaps(const std::vector<bool>& map, i64 min_hole) {
  const i64 per_chunk = kMiB / kPage;
  i64 filled = 0;
  for (i64 first = 0; first < static_cast<i64>(map.size()); first += per_chunk) {
    i64 last_end = -1;  // end (page) of the previous data page in this chunk
    for (i64 p = first; p < std::min<i64>(first + per_chunk, map.size()); p++) {
      if (!map[p]) continue;
      i64 gap = (p - last_end) * kPage;
      if (last_end >= 0 && gap > 0 && gap < min_hole) filled += gap;
      last_end = p + 1;
    }
  }
  return filled;
}

// default_min_hole() of the filesystem holding `dir`.
i64 min_hole_of(const std::string& dir) {
  int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  i64 m = default_min_hole(fd);
  close(fd);
  return m;
}

i64 allocated(const std::string& path) {
  struct stat st;
  REQUIRE(stat(path.c_str(), &st) == 0);
  return static_cast<i64>(st.st_blocks) * 512;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  for (auto& e : std::filesystem::directory_iterator(dir)) out.push_back(e.path().filename());
  std::sort(out.begin(), out.end());
  return out;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (auto& x : v) s += x + " ";
  return s;
}

json info_json(const std::string& image) {
  RunResult r = run_vmsave({"info", "--json", image});
  REQUIRE_RUN(r, 0);
  return json::parse(r.out);
}

// Skips the case unless /dev/shm is a usable tmpfs.
void require_shm() {
  if (access("/dev/shm", W_OK) != 0) test::skip("/dev/shm is not writable");
}

// Source RAM in /dev/shm, images on disk, restored RAM in /dev/shm.
struct Dirs {
  TempDir shm{"/dev/shm"};
  TempDir disk;
  TempDir out{"/dev/shm"};
};

// save -> info -> verify -> restore -> compare for one memory file under
// every engine setting, checking holes and stored sizes on the way.
void round_trips(const std::string& kind) {
  require_shm();
  Dirs d;
  for (i64 size : kSizes) {
    CAPTURE(kind);
    CAPTURE(size);
    std::string src = d.shm / ("src-" + std::to_string(size));
    test::write_pattern_file(src, size, kind, static_cast<u64>(size));
    REQUIRE(test::file_size(src) == size);
    std::vector<bool> map = data_page_map(src);
    const i64 pages = static_cast<i64>(map.size());
    const i64 data_pages = count(map);
    if (kind == "zero") REQUIRE(data_pages == 0);
    if (kind == "random" || kind == "text") REQUIRE(data_pages == pages);

    // Zero pages closer than the disk's min_hole travel with the data (on
    // tmpfs it is 0); --min-hole 0 keeps every one a hole.
    const i64 fs_min_hole = min_hole_of(d.disk.path());
    const i64 gaps = filled_gaps(map, fs_min_hole);
    if (kind == "mixed" && size >= kMiB && fs_min_hole > 0) REQUIRE(gaps > 0);
    for (int jobs : {1, 2}) {
      for (int qd : {1, 32}) {
       for (bool exact : {false, true}) {
        CAPTURE(jobs);
        CAPTURE(qd);
        CAPTURE(exact);
        const std::vector<std::string> engine = {"--jobs", std::to_string(jobs), "--queue-depth",
                                                 std::to_string(qd)};
        std::string image = d.disk / "image.vmsave";
        std::vector<std::string> args = {"save", "--json", "--ram", "ram=" + src, image};
        if (exact) args.insert(args.end(), {"--min-hole", "0"});
        args.insert(args.end(), engine.begin(), engine.end());
        RunResult r = run_vmsave(args);
        REQUIRE_RUN(r, 0);
        json rep = json::parse(r.out);
        CHECK(rep["ok"] == true);
        CHECK(rep["ram_bytes"] == size);
        CHECK(rep["stored_bytes"] == data_pages * kPage);
        CHECK(rep["zero_filled_bytes"] == (exact ? 0 : gaps));
        CHECK(rep["direct_io"] == true);

        // What info reports is what was written.
        json info = info_json(image);
        CHECK(info["complete"] == true);
        CHECK(info["file_size"] == test::file_size(image));
        CHECK(info["allocated_bytes"] == allocated(image));
        CHECK(info["stored_bytes"] == data_pages * kPage);
        REQUIRE(info["blocks"].size() == 1);
        json b = info["blocks"][0];
        CHECK(b["id"] == "ram");
        CHECK(b["size"] == size);
        CHECK(b["page_size"] == kPage);
        CHECK(b["stored_bytes"] == data_pages * kPage);
        CHECK(b["region_offset"].get<i64>() % (2 * kMiB) == 0);
        CHECK(b["zero_ratio"].get<double>() ==
              doctest::Approx(1.0 - double(data_pages) / double(pages)));

        // Other zero pages are holes in the image: it occupies about the
        // data and the short gaps written with it.
        i64 alloc = allocated(image);
        i64 stored = data_pages * kPage + (exact ? 0 : gaps);
        CHECK(alloc >= stored);
        CHECK(alloc <= stored + 256 * kKiB + stored / 64);

        args = {"verify", "--json", image};
        args.insert(args.end(), engine.begin(), engine.end());
        r = run_vmsave(args);
        REQUIRE_RUN(r, 0);
        json v = json::parse(r.out);
        CHECK(v["ok"] == true);
        CHECK(v["chunks_checked"] == (size + kMiB - 1) / kMiB);
        CHECK(v["bytes_read"] == data_pages * kPage + gaps);  // verify joins short gaps too

        std::string rdir = d.out / "restored";
        REQUIRE(mkdir(rdir.c_str(), 0700) == 0);
        args = {"restore", "--json", image, "--ram-dir", rdir};
        args.insert(args.end(), engine.begin(), engine.end());
        r = run_vmsave(args);
        REQUIRE_RUN(r, 0);
        CHECK(list_dir(rdir) == std::vector<std::string>{"ram"});
        std::string restored = rdir + "/ram";
        std::string why;
        CHECK_MESSAGE(test::files_equal(src, restored, &why), why);
        struct stat st;
        REQUIRE(stat(restored.c_str(), &st) == 0);
        CHECK((st.st_mode & 0777) == 0600);

        // Holes stay holes: tmpfs counts exactly the pages written, and the
        // restore writes only the image's data pages.
        i64 ralloc = allocated(restored);
        CHECK(ralloc <= allocated(src));
        CHECK(ralloc <= data_pages * kPage);
        if (kind == "zero") CHECK(ralloc == 0);
        if (kind == "mixed" && size >= kMiB) CHECK(ralloc < size * 9 / 10);
        // SEEK_DATA from the start of every zero page finds no data there.
        int fd = open(restored.c_str(), O_RDONLY | O_CLOEXEC);
        REQUIRE(fd >= 0);
        i64 holes = 0, bad = -1;
        for (i64 p = 0; p < pages; p++) {
          if (map[p]) continue;
          off_t next = lseek(fd, p * kPage, SEEK_DATA);
          if (next == p * kPage && bad < 0) bad = p * kPage;
          holes++;
        }
        close(fd);
        CHECK(holes == pages - data_pages);
        CHECK_MESSAGE(bad < 0, "SEEK_DATA found data in the zero page at offset ", bad);

        std::filesystem::remove_all(rdir);
        REQUIRE(unlink(image.c_str()) == 0);
       }
      }
    }
    REQUIRE(unlink(src.c_str()) == 0);
  }
}

// A child vmsave whose progress lines (--progress-fd 3) we watch, so a
// signal can be sent while it is provably inside a RAM phase (or, given
// `act`, something else done then instead).
struct Interrupted {
  bool caught = false;  // the signal was sent mid-phase
  RunResult result;
};

Interrupted interrupt_mid_phase(std::vector<std::string> args, const std::string& phase, int sig,
                                const std::function<void()>& act = nullptr) {
  Interrupted out;
  args.insert(args.begin(), VMSAVE_BINARY);
  args.push_back("--progress-fd");
  args.push_back("3");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int prog[2], err[2];
  REQUIRE(pipe2(prog, O_CLOEXEC) == 0);
  REQUIRE(pipe2(err, O_CLOEXEC) == 0);
  pid_t parent = getpid();
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    dup2(prog[1], 3);  // dup2 clears O_CLOEXEC on the new fd
    dup2(err[1], 2);
    int devnull = open("/dev/null", O_RDWR);
    dup2(devnull, 0);
    dup2(devnull, 1);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(prog[1]);
  close(err[1]);
  std::string lines;
  char buf[4096];
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  pollfd p[2] = {{prog[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  int open_fds = 2;
  while (open_fds > 0 && std::chrono::steady_clock::now() < deadline) {
    if (poll(p, 2, 1000) <= 0) continue;
    for (int i = 0; i < 2; i++) {
      if (p[i].fd < 0 || !p[i].revents) continue;
      ssize_t n = read(p[i].fd, buf, sizeof(buf));
      if (n <= 0) {
        close(p[i].fd);
        p[i].fd = -1;
        open_fds--;
        continue;
      }
      if (i == 1) {
        out.result.err.append(buf, n);
        continue;
      }
      lines.append(buf, n);
      size_t nl;
      while ((nl = lines.find('\n')) != std::string::npos) {
        json j = json::parse(lines.substr(0, nl), nullptr, false);
        lines.erase(0, nl + 1);
        if (out.caught || j.is_discarded()) continue;
        i64 done = j.value("done", i64(0)), total = j.value("total", i64(0));
        if (j.value("phase", "") == phase && !j.value("final", true) && done > 0 &&
            done < total * 3 / 4) {
          if (act)
            act();
          else
            kill(pid, sig);
          out.caught = true;
        }
      }
    }
  }
  for (auto& f : p)
    if (f.fd >= 0) close(f.fd);
  int ws = 0;
  if (std::chrono::steady_clock::now() >= deadline) kill(pid, SIGKILL);
  waitpid(pid, &ws, 0);
  out.result.status = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
  return out;
}

}  // namespace

TEST_CASE("engine: zero pages the source wrote (not holes) end up holes in an image on disk") {
  require_shm();
  // The blocks for the source's data are allocated before the writes (on a
  // block device's filesystem), zero ranges included when the source
  // wrote them, and punched out again after: the image holds the data only.
  Dirs d;
  if (min_hole_of(d.disk.path()) == 0) test::skip("the test directory is on a memory filesystem");
  std::string src = d.shm / "src";
  {
    // 128 KiB of random data, then 128 KiB of written zeros, 32 times; the
    // last MiB written zeros (a whole zero chunk).
    std::string bytes;
    std::mt19937_64 rng(7);
    for (int i = 0; i < 32; i++) {
      for (int j = 0; j < 128 * 1024 / 8; j++) {
        u64 v = rng();
        bytes.append(reinterpret_cast<const char*>(&v), 8);
      }
      bytes.append(128 * 1024, '\0');
    }
    bytes.append(kMiB, '\0');
    std::ofstream(src, std::ios::binary) << bytes;
  }
  const i64 size = test::file_size(src);
  const i64 data = 32 * 128 * kKiB;
  REQUIRE(allocated(src) == size);  // no holes in the source
  for (const char* min_hole : {"64K", "0"}) {
    CAPTURE(min_hole);
    std::string image = d.disk / "image.vmsave";
    RunResult r = run_vmsave(
        {"save", "--json", "--force", "--min-hole", min_hole, "--ram", "ram=" + src, image});
    REQUIRE_RUN(r, 0);
    json rep = json::parse(r.out);
    CHECK(rep["stored_bytes"] == data);
    CHECK(rep["zero_filled_bytes"] == 0);
    i64 alloc = allocated(image);
    CHECK(alloc >= data);
    CHECK(alloc <= data + 256 * kKiB);
    CHECK_RUN(run_vmsave({"verify", image}), 0);
    std::string rdir = d.out / min_hole;
    REQUIRE(mkdir(rdir.c_str(), 0700) == 0);
    REQUIRE_RUN(run_vmsave({"restore", image, "--ram-dir", rdir}), 0);
    std::string why;
    CHECK_MESSAGE(test::files_equal(src, rdir + "/ram", &why), why);
    CHECK(allocated(rdir + "/ram") == data);
  }
}

TEST_CASE("engine: round trip of random memory over jobs and queue depths") {
  round_trips("random");
}

TEST_CASE("engine: round trip of zero memory keeps holes") {
  round_trips("zero");
}

TEST_CASE("engine: round trip of text memory over jobs and queue depths") {
  round_trips("text");
}

TEST_CASE("engine: round trip of mixed memory keeps holes") {
  round_trips("mixed");
}


// Into a file in memory the workers take turns writing with pwrite()
// (IoQueue::serialize_writes), so writes wait in a worker's queue until its
// turn: every one must land, once, from plain and from compressed chunks.
TEST_CASE("engine: an image in /dev/shm holds every page, whichever worker wrote it") {
  require_shm();
  Dirs d;
  std::string src = d.shm / "ram";
  std::string image = d.out / "image.vmsave";
  // The workers read the source into buffers they reuse: a hole page must
  // not take what an earlier chunk left there, nor a partial last page.
  for (i64 size : {48 * kMiB + 12 * kKiB, 3 * kMiB + 5000}) {
    test::write_pattern_file(src, size, "mixed", 21);
    std::vector<bool> map = data_page_map(src);
    const i64 data_pages = count(map);
    REQUIRE(data_pages > 0);
    REQUIRE(data_pages < static_cast<i64>(map.size()));
    for (const char* codec : {"", "lz4"}) {
      for (int jobs : {1, 2, 4}) {
        CAPTURE(size);
        CAPTURE(std::string(codec));
        CAPTURE(jobs);
        std::vector<std::string> args = {"save",       "--json", "--force", "--ram",
                                         "ram=" + src, image,    "--jobs",  std::to_string(jobs)};
        if (*codec) args.insert(args.end(), {"--compress", codec});
        RunResult r = run_vmsave(args);
        REQUIRE_RUN(r, 0);
        json rep = json::parse(r.out);
        // Zero pages stay holes (no --min-hole on tmpfs): the RAM region
        // occupies the data pages, or less compressed.
        if (!*codec) {
          CHECK(rep["stored_bytes"] == data_pages * kPage);
          CHECK(rep["zero_filled_bytes"] == 0);
          CHECK(allocated(image) <= data_pages * kPage + 64 * kKiB);
        }
        CHECK(rep["io_latency_us"]["count"].get<i64>() > 0);
        CHECK_RUN(run_vmsave({"verify", image}), 0);
        std::string rdir = d.shm / "restored";
        REQUIRE(mkdir(rdir.c_str(), 0700) == 0);
        REQUIRE_RUN(run_vmsave({"restore", image, "--ram-dir", rdir}), 0);
        std::string why;
        CHECK_MESSAGE(test::files_equal(src, rdir + "/ram", &why), why);
        std::filesystem::remove_all(rdir);
      }
    }
  }
}

TEST_CASE("engine: data extents longer than a chunk, and holes between them, are found per chunk") {
  // Each worker keeps the last source extent it found and skips the search
  // for the chunks inside it: a hole after such an extent must still be
  // found (never read, never made data in the source), and so must the
  // image's holes when verify looks for pages marked zero.
  require_shm();
  Dirs d;
  std::string src = d.shm / "ram";
  const std::vector<std::pair<i64, i64>> data = {
      {0, 3 * kMiB}, {5 * kMiB, 6 * kMiB + 512 * kKiB}, {10 * kMiB + 512 * kKiB, 12 * kMiB}};
  const i64 size = 16 * kMiB;
  {
    UniqueFd fd(::open(src.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    REQUIRE(fd.get() >= 0);
    REQUIRE(ftruncate(fd.get(), size) == 0);
    std::mt19937_64 rng(11);
    for (auto [a, z] : data) {
      std::vector<u64> words((z - a) / 8);
      for (u64& v : words) v = rng() | 1;
      REQUIRE(pwrite(fd.get(), words.data(), z - a, a) == z - a);
    }
  }
  i64 data_bytes = 0;
  for (auto [a, z] : data) data_bytes += z - a;
  REQUIRE(allocated(src) == data_bytes);
  for (const TempDir* to : {&d.out, &d.disk}) {
    for (int jobs : {1, 2}) {
      CAPTURE(to->path());
      CAPTURE(jobs);
      std::string image = *to / "image.vmsave";
      RunResult r = run_vmsave({"save", "--json", "--force", "--min-hole", "0", "--jobs",
                                std::to_string(jobs), "--ram", "ram=" + src, image});
      REQUIRE_RUN(r, 0);
      CHECK(json::parse(r.out)["stored_bytes"] == data_bytes);
      CHECK(allocated(src) == data_bytes);  // no hole of the source filled
      CHECK(allocated(image) <= data_bytes + 256 * kKiB);
      CHECK_RUN(run_vmsave({"verify", "--jobs", std::to_string(jobs), image}), 0);
      std::string rdir = d.shm / "restored";
      REQUIRE(mkdir(rdir.c_str(), 0700) == 0);
      REQUIRE_RUN(run_vmsave({"restore", image, "--ram-dir", rdir}), 0);
      std::string why;
      CHECK_MESSAGE(test::files_equal(src, rdir + "/ram", &why), why);
      CHECK(allocated(rdir + "/ram") == data_bytes);
      std::filesystem::remove_all(rdir);
    }
  }
}

TEST_CASE("engine: several blocks in one image keep their ids, sizes and order") {
  require_shm();
  Dirs d;
  struct Src {
    std::string id, kind;
    i64 size;
  };
  const std::vector<Src> srcs = {{"pc.ram", "mixed", 3 * kMiB + 8 * kKiB},
                                 {"zeros", "zero", 1 * kMiB},
                                 {"vga.vram", "random", 5000}};
  std::vector<std::string> save = {"save", "--ram", "", "--ram", "", "--ram", ""};
  i64 stored = 0;
  for (size_t i = 0; i < srcs.size(); i++) {
    std::string path = d.shm / srcs[i].id;
    test::write_pattern_file(path, srcs[i].size, srcs[i].kind, 7 + i);
    save[2 + 2 * i] = srcs[i].id + "=" + path;
    stored += count(data_page_map(path)) * kPage;
  }
  const std::vector<std::pair<std::string, i64>> chunks = {
      {"4K", 4 * kKiB}, {"64K", 64 * kKiB}, {"1M", kMiB}, {"2M", 2 * kMiB}};
  for (auto& [chunk, chunk_bytes] : chunks) {
    for (int jobs : {1, 2}) {
      CAPTURE(chunk);
      CAPTURE(jobs);
      std::string image = d.disk / "multi.vmsave";
      std::vector<std::string> args = save;
      args.insert(args.end(), {image, "--chunk-size", chunk, "--jobs", std::to_string(jobs)});
      RunResult r = run_vmsave(args);
      REQUIRE_RUN(r, 0);
      json info = info_json(image);
      CHECK(info["stored_bytes"] == stored);
      REQUIRE(info["blocks"].size() == srcs.size());
      i64 prev_end = 0;
      for (size_t i = 0; i < srcs.size(); i++) {
        json b = info["blocks"][i];
        CHECK(b["id"] == srcs[i].id);
        CHECK(b["size"] == srcs[i].size);
        CHECK(b["chunk_size"] == chunk_bytes);
        i64 off = b["region_offset"].get<i64>();
        CHECK(off % (2 * kMiB) == 0);
        CHECK(off >= prev_end);
        prev_end = off + srcs[i].size;
      }
      r = run_vmsave({"verify", image, "--jobs", std::to_string(jobs)});
      REQUIRE_RUN(r, 0);
      std::string rdir = d.out / "r";
      REQUIRE(mkdir(rdir.c_str(), 0700) == 0);
      r = run_vmsave({"restore", image, "--ram-dir", rdir, "--jobs", std::to_string(jobs)});
      REQUIRE_RUN(r, 0);
      CHECK(list_dir(rdir) == std::vector<std::string>{"pc.ram", "vga.vram", "zeros"});
      for (auto& s : srcs) {
        std::string why;
        CHECK_MESSAGE(test::files_equal(d.shm / s.id, rdir + "/" + s.id, &why), s.id, ": ", why);
      }
      CHECK(allocated(rdir + "/zeros") == 0);
      std::filesystem::remove_all(rdir);
      REQUIRE(unlink(image.c_str()) == 0);
    }
  }
}

TEST_CASE(
    "engine: metadata of the wrong shape is damage that verify, info and restore refuse alike") {
  require_shm();
  TempDir shm("/dev/shm"), disk;
  test::write_pattern_file(shm / "ram", kMiB, "mixed", 4);
  // Checksums valid, content wrong: a restore read "vmstate_bytes" only once
  // its VM ran, and failed with the VM left running; deep nesting crashed
  // info.
  nlohmann::json deep = 1;
  for (int i = 0; i < 100; i++) deep = nlohmann::json::array({deep});
  const std::vector<std::pair<nlohmann::json, std::string>> cases = {
      {{{"vmstate_bytes", "x"}}, "metadata field \"vmstate_bytes\" has the wrong type (string)"},
      {{{"guest_running", "yes"}}, "metadata field \"guest_running\" has the wrong type (string)"},
      {{{"qemu_cmdline", nlohmann::json::array({"qemu", 1})}},
       "metadata field \"qemu_cmdline\" has the wrong type (array)"},
      {{{"qemu_migration", {{"offset", "0"}}}}, "metadata field \"qemu_migration\""},
      {{{"memory_devices", nlohmann::json::array({{{"memdev", "m0"}, {"addr", -1}}})}},
       "metadata field \"memory_devices\" has the wrong type (array)"},
      {{{"memory_devices", nlohmann::json::array({{{"memdev", 7}, {"addr", 4096}}})}},
       "metadata field \"memory_devices\" has the wrong type (array)"},
      {{{"x", deep}}, "metadata is nested deeper than 64 levels"},
  };
  for (auto& [extra, why] : cases) {
    CAPTURE(why);
    const std::string image = disk / "image.vmsave";
    nlohmann::json meta = {{"mode", "raw"}};
    meta.update(extra);
    test::write_image_of(image, shm / "ram", "", "", meta);
    const std::string out = shm / "out";
    std::filesystem::create_directory(out);
    for (std::vector<std::string> args : {std::vector<std::string>{"verify", image},
                                          {"info", image},
                                          {"info", "--json", image},
                                          {"restore", image, "--ram-dir", out}}) {
      CAPTURE(args[0]);
      RunResult r = run_vmsave(args);
      CHECK_RUN(r, 3);
      CHECK_MESSAGE(contains(r.err, why), r.err);
    }
    CHECK(std::filesystem::is_empty(out));
  }
}

TEST_CASE(
    "engine: prepare refuses saved backend properties that would split into extra QEMU options") {
  // prepare prints one argument per line for a wrapper to pass to QEMU: a
  // newline in a saved -object made its tail separate options, run by root's
  // QEMU (`-pidfile FILE` overwrote FILE; trial S).
  require_shm();
  TempDir shm("/dev/shm"), disk;
  test::write_pattern_file(shm / "ram", kMiB, "mixed", 5);
  const std::string image = disk / "image.vmsave";
  const std::string victim = disk / "victim";
  test::write_image_of(image, shm / "ram", "", "",
                       {{"mode", "qemu"},
                        {"qemu_cmdline",
                         {"qemu-system-x86_64", "-object",
                          "memory-backend-file,id=ram,size=1M,share=on,mem-path=/dev/shm/x,"
                          "x-use-canonical-path-for-ramblock-id=off\n-pidfile\n" +
                              victim}}});
  const std::string out = shm / "out";
  REQUIRE(::mkdir(out.c_str(), 0700) == 0);
  for (std::vector<std::string> args : {std::vector<std::string>{"prepare", image, "--lazy"},
                                        {"prepare", image, "--lazy", "--json"},
                                        {"prepare", image, "--ram-dir", out}}) {
    CAPTURE(args.back());
    RunResult r = run_vmsave(args);
    CHECK_RUN(r, 3);
    CHECK_MESSAGE(
        contains(r.err, "the image's saved QEMU command line holds a control character (" + image +
                            "): in the -object of backend ram: "),
        r.err);
    CHECK_MESSAGE(contains(r.err, "=off\\x0a-pidfile\\x0a"), r.err);
    CHECK_FALSE(contains(r.out, "\n-pidfile\n"));
  }
  CHECK(std::filesystem::is_empty(out));  // refused before any RAM file was filled
  CHECK_FALSE(std::filesystem::exists(victim));
}

TEST_CASE("engine: info shows a saved argument with a control character as one that pastes back") {
  // 'a\x0ab' in single quotes pasted back as the six characters (trial S).
  require_shm();
  TempDir shm("/dev/shm"), disk;
  test::write_pattern_file(shm / "ram", kMiB, "mixed", 6);
  const std::string image = disk / "image.vmsave";
  test::write_image_of(image, shm / "ram", "", "",
                       {{"mode", "qemu"}, {"qemu_cmdline", {"qemu", "a\nb", "it's \\", "c d"}}});
  RunResult r = run_vmsave({"info", image});
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(contains(r.out, "command:      qemu $'a\\x0ab' 'it'\\''s \\' 'c d'\n"), r.out);
  RunResult bash =
      test::run_program({"/bin/bash", "-c", "printf '%s|' " + std::string("$'a\\x0ab'")});
  CHECK(bash.out == "a\nb|");
}

TEST_CASE("engine: a filesystem without O_DIRECT falls back to buffered I/O with a warning") {
  require_shm();
  require_mount("ramfs");
  TempDir shm("/dev/shm");
  TempMount ramfs("ramfs", "");
  REQUIRE_MESSAGE(ramfs.ok(), ramfs.error());
  std::string src = shm / "ram";
  test::write_pattern_file(src, 3 * kMiB + 8 * kKiB, "mixed", 3);
  std::string image = ramfs / "image.vmsave";
  RunResult r = run_vmsave({"save", "--ram", "ram=" + src, image});
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(contains(r.err, "vmsave: warning:"), r.err);
  CHECK_MESSAGE(contains(r.err, "O_DIRECT"), r.err);
  CHECK_MESSAGE(contains(r.err, ramfs.path()), r.err);

  r = run_vmsave({"save", "--json", "--force", "--ram", "ram=" + src, image});
  REQUIRE_RUN(r, 0);
  CHECK(json::parse(r.out)["direct_io"] == false);

  r = run_vmsave({"verify", image});
  CHECK_RUN(r, 0);
  CHECK_MESSAGE(contains(r.err, "O_DIRECT"), r.err);
  // Restoring from, and into, the same filesystem.
  r = run_vmsave({"restore", image, "--ram-dir", ramfs.path()});
  REQUIRE_RUN(r, 0);
  std::string why;
  CHECK_MESSAGE(test::files_equal(src, ramfs / "ram", &why), why);
}

TEST_CASE("engine: a full filesystem fails the save cleanly, naming the image") {
  require_shm();
  require_mount("tmpfs");
  TempDir shm("/dev/shm");
  TempMount small("tmpfs", "size=8m");
  REQUIRE_MESSAGE(small.ok(), small.error());
  std::string src = shm / "ram";
  test::write_pattern_file(src, 32 * kMiB, "random", 5);
  for (int jobs : {1, 2}) {
    CAPTURE(jobs);
    std::string image = small / "image.vmsave";
    RunResult r =
        run_vmsave({"save", "--ram", "ram=" + src, image, "--jobs", std::to_string(jobs)});
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(contains(r.err, "vmsave: error: "), r.err);
    CHECK_MESSAGE(contains(r.err, image), r.err);
    CHECK_MESSAGE(contains(r.err, "No space left on device"), r.err);
    CHECK_MESSAGE(list_dir(small.path()).empty(), joined(list_dir(small.path())));
  }
  // The space is given back: a save that fits still works there.
  std::string fits = shm / "fits";
  test::write_pattern_file(fits, 1 * kMiB, "random", 6);
  RunResult r = run_vmsave({"save", "--ram", "ram=" + fits, small / "ok.vmsave"});
  CHECK_RUN(r, 0);
  CHECK_RUN(run_vmsave({"verify", small / "ok.vmsave"}), 0);
}

TEST_CASE("engine: a restore into a full filesystem fails cleanly and removes the RAM files") {
  require_shm();
  require_mount("tmpfs");
  TempDir shm("/dev/shm");
  TempDir disk;
  TempMount small("tmpfs", "size=8m");
  REQUIRE_MESSAGE(small.ok(), small.error());
  // random: every page written out; mixed: scattered zero pages, so only
  // the data runs; text with lz4: decompressed, then written.
  for (auto [kind, codec] : {std::pair{"random", ""}, {"mixed", ""}, {"text", "lz4"}}) {
    CAPTURE(std::string(kind));
    std::string src = shm / "ram";
    test::write_pattern_file(src, 32 * kMiB, kind, 8);
    std::string image = disk / "image.vmsave";
    std::vector<std::string> save = {"save", "--force", "--ram", "ram=" + src, image};
    if (*codec) save.insert(save.end(), {"--compress", codec});
    REQUIRE_RUN(run_vmsave(save), 0);
    std::filesystem::remove(src);
    // Said before anything is written.
    RunResult r = run_vmsave({"restore", image, "--ram-dir", small.path()});
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(contains(r.err, "vmsave: error: not enough space for RAM file (" +
                                      small.path() + "/ram): it needs "),
                  r.err);
    CHECK_MESSAGE(contains(r.err, "its filesystem has 8.0 MiB free"), r.err);
    CHECK_MESSAGE(list_dir(small.path()).empty(), joined(list_dir(small.path())));
    // With --force, a file already there is replaced only once the checks
    // pass: refused for want of room, it keeps what it held.
    test::write_pattern_file(small / "ram", 1 * kMiB, "text", 2);
    const std::string before = test::read_file(small / "ram");
    r = run_vmsave({"restore", image, "--ram-dir", small.path(), "--force"});
    CHECK_RUN(r, 1);
    CHECK_MESSAGE(contains(r.err, "vmsave: error: not enough space for RAM file"), r.err);
    CHECK(test::read_file(small / "ram") == before);
    std::filesystem::remove(small / "ram");
    // Met part-way (the space taken by something else meanwhile).
    for (int jobs : {1, 2}) {
      CAPTURE(jobs);
      r = run_vmsave({"restore", image, "--ram-dir", small.path(), "--jobs", std::to_string(jobs)},
                     120, {"VMSAVE_FAULT=no-space-check"});
      CHECK_RUN(r, 1);
      CHECK_MESSAGE(contains(r.err, "vmsave: error: cannot fill RAM file (" + small.path() +
                                        "/ram): No space left on device"),
                    r.err);
      CHECK_MESSAGE(list_dir(small.path()).empty(), joined(list_dir(small.path())));
    }
    CHECK_RUN(run_vmsave({"verify", image}), 0);
  }
  // Two blocks that each fit but not together: also said before anything
  // is written, naming what the first one takes.
  std::string a = shm / "a", b = shm / "b";
  test::write_pattern_file(a, 5 * kMiB, "random", 9);
  test::write_pattern_file(b, 5 * kMiB, "random", 10);
  std::string image = disk / "two.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--ram", "a=" + a, "--ram", "b=" + b, image}), 0);
  RunResult r = run_vmsave({"restore", image, "--ram-dir", small.path()});
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: not enough space for RAM file (" + small.path() +
                                    "/b): it needs 5.0 MiB for block b (and 5.0 MiB for the RAM "
                                    "files before it there), its filesystem has 8.0 MiB free"),
                r.err);
  CHECK_MESSAGE(list_dir(small.path()).empty(), joined(list_dir(small.path())));
}

// The pool of 2 MiB huge pages, resized for a test and put back after it.
// The pool is the machine's: a test holds a lock on it throughout, so that
// tests run side by side (ctest -j) neither take each other's pages nor
// give them back early (a page missing under a mapping without a
// reservation is a SIGBUS).
class HugePagePool {
 public:
  HugePagePool() : lock_(take_lock()), old_(pages()) {}
  ~HugePagePool() {
    if (old_ >= 0) resize(old_);
  }
  static i64 pages() {
    std::ifstream in(kPath);
    i64 n = -1;
    in >> n;
    return in ? n : -1;
  }
  // The pool's size afterwards (the kernel may find fewer free pages).
  static i64 resize(i64 n) {
    std::ofstream(kPath) << n << "\n";
    return pages();
  }

 private:
  static constexpr const char* kPath = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
  static UniqueFd take_lock() {
    UniqueFd fd(::open("/tmp/vmsave-test-hugepages.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    REQUIRE(fd.get() >= 0);
    REQUIRE(::flock(fd.get(), LOCK_EX) == 0);
    return fd;
  }
  UniqueFd lock_;
  i64 old_;
};

TEST_CASE("engine: a restore into hugetlbfs says up front when the huge page pool is short") {
  require_shm();
  HugePagePool pool;
  if (HugePagePool::pages() < 0) test::skip("no 2 MiB huge pages here");
  const i64 have = HugePagePool::resize(HugePagePool::pages() + 4);
  if (have < 4 || HugePagePool::pages() < 0) test::skip("cannot grow the huge page pool");
  TempMount huge("hugetlbfs", "pagesize=2M");
  if (!huge.ok()) test::skip(huge.error());
  TempDir shm("/dev/shm");
  TempDir disk;
  // More pages than the pool has, though its data pages alone would fit.
  const i64 pages = have + 4;
  std::string src = shm / "ram";
  test::write_pattern_file(src, pages * 2 * kMiB, "mixed", 12);
  std::string image = disk / "image.vmsave";
  REQUIRE_RUN(run_vmsave({"save", "--ram", "ram=" + src, image}), 0);
  RunResult r = run_vmsave({"restore", image, "--ram-dir", huge.path()});
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, fmt::format("vmsave: error: not enough free huge pages for RAM "
                                            "file ({}/ram): block ram needs {} pages of 2.0 MiB, "
                                            "{} are free",
                                            huge.path(), pages, have)),
                r.err);
  CHECK_MESSAGE(contains(r.err, "vm.nr_hugepages"), r.err);
  CHECK_MESSAGE(list_dir(huge.path()).empty(), joined(list_dir(huge.path())));
  // Pages taken after that check: the mapping cannot reserve them.
  r = run_vmsave({"restore", image, "--ram-dir", huge.path()}, 120,
                 {"VMSAVE_FAULT=no-space-check"});
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, fmt::format("vmsave: error: not enough free huge pages for RAM "
                                            "file ({}/ram): block ram needs {} pages of 2.0 MiB, "
                                            "the pool has fewer free; add huge pages",
                                            huge.path(), pages)),
                r.err);
  CHECK_MESSAGE(list_dir(huge.path()).empty(), joined(list_dir(huge.path())));
  // Nor can an image go there: hugetlbfs files take no write().
  r = run_vmsave({"save", "--ram", "ram=" + src, huge / "image.vmsave"});
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: cannot write an image on hugetlbfs"), r.err);
  CHECK_MESSAGE(list_dir(huge.path()).empty(), joined(list_dir(huge.path())));
  // Enough pages: the same restore goes through.
  if (HugePagePool::resize(pages) < pages) test::skip("cannot grow the huge page pool further");
  REQUIRE_RUN(run_vmsave({"restore", image, "--ram-dir", huge.path()}), 0);
  std::string why;
  CHECK_MESSAGE(test::files_equal(src, huge / "ram", &why), why);
}

TEST_CASE(
    "engine: a save reads a hugetlbfs file without filling its holes, however few pages are free") {
  require_shm();
  HugePagePool pool;
  if (HugePagePool::pages() < 0) test::skip("no 2 MiB huge pages here");
  // A file of 16 huge pages with data in every other one, made through a
  // mapping that reserves nothing (QEMU's reserve=off), and a pool with one
  // page free beside it: too few for the 8 holes.
  constexpr i64 kPages = 16, kHuge = 2 * kMiB;
  const i64 want = HugePagePool::pages() + kPages / 2 + 1;
  if (HugePagePool::resize(want) < want) test::skip("cannot grow the huge page pool");
  TempMount huge("hugetlbfs", "pagesize=2M");
  if (!huge.ok()) test::skip(huge.error());
  const std::string src = huge / "ram";
  {
    int fd = ::open(src.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    REQUIRE(fd >= 0);
    REQUIRE(::ftruncate(fd, kPages * kHuge) == 0);
    void* m =
        ::mmap(nullptr, kPages * kHuge, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    REQUIRE(m != MAP_FAILED);
    std::mt19937_64 rng(21);
    for (i64 p = 0; p < kPages; p += 2)
      for (i64 o = 0; o < kHuge; o += 8)
        *reinterpret_cast<u64*>(static_cast<u8*>(m) + p * kHuge + o) = rng();
    ::munmap(m, kPages * kHuge);
    ::close(fd);
  }
  auto blocks = [&] {
    struct stat st;
    REQUIRE(::stat(src.c_str(), &st) == 0);
    return i64(st.st_blocks);
  };
  const i64 before = blocks();
  CHECK(before * 512 == kPages / 2 * kHuge);
  TempDir disk, shm("/dev/shm");
  const std::string image = disk / "image.vmsave";
  // Its mapping reserved huge pages for the whole file (ENOMEM: "raise the
  // limit (ulimit -v ...)"), and reading holes through it filled them.
  RunResult r = run_vmsave({"save", "--ram", "ram=" + src, image});
  REQUIRE_RUN(r, 0);
  CHECK(blocks() == before);
  CHECK_RUN(run_vmsave({"verify", image}), 0);
  REQUIRE_RUN(run_vmsave({"restore", image, "--ram-dir", shm.path()}), 0);
  std::string why;
  CHECK_MESSAGE(test::files_equal(src, shm / "ram", &why), why);
  json info = json::parse(run_vmsave({"info", "--json", image}).out);
  CHECK(info["blocks"][0]["stored_bytes"] == kPages / 2 * kHuge);
  // Compressed, it is still read through a mapping: said as the pool.
  r = run_vmsave({"save", "--compress", "lz4", "--ram", "ram=" + src, disk / "lz4.vmsave"});
  CHECK_RUN(r, 1);
  CHECK_MESSAGE(contains(r.err, "vmsave: error: not enough free huge pages to read memory file (" +
                                    src + ")"),
                r.err);
  CHECK(blocks() == before);
}

TEST_CASE("engine: injected I/O faults fail cleanly and short transfers are resubmitted") {
  require_shm();
  int faults = 0;  // runs with a fault injected, for docs/reliability.md
  TempDir shm("/dev/shm");
  TempDir disk;
  std::string src = shm / "ram";
  test::write_pattern_file(src, 6 * kMiB + 12 * kKiB, "mixed", 11);
  std::string image = disk / "image.vmsave";

  SUBCASE("save: eio and enospc on one request") {
    for (const char* kind : {"eio", "enospc"}) {
      for (int nth : {1, 2, 5}) {
        for (int jobs : {1, 2}) {
          CAPTURE(std::string(kind));
          CAPTURE(nth);
          CAPTURE(jobs);
          RunResult r =
              run_vmsave({"save", "--ram", "ram=" + src, image, "--jobs", std::to_string(jobs)},
                         120, {"VMSAVE_FAULT=" + std::to_string(nth) + ":" + kind});
          faults++;
          CHECK_RUN(r, 1);
          CHECK_MESSAGE(contains(r.err, image), r.err);
          // Each with its fix.
          CHECK_MESSAGE(contains(r.err, std::string(kind) == "eio"
                                            ? "Input/output error; the device failed (dmesg"
                                            : "No space left on device; free space on that "
                                              "filesystem (or on the device under it)"),
                        r.err);
          CHECK_MESSAGE(list_dir(disk.path()).empty(), joined(list_dir(disk.path())));
        }
      }
    }
  }
  SUBCASE("save: short writes") {
    for (int nth : {1, 3}) {
      for (int qd : {1, 32}) {
        CAPTURE(nth);
        CAPTURE(qd);
        RunResult r =
            run_vmsave({"save", "--ram", "ram=" + src, image, "--queue-depth", std::to_string(qd)},
                       120, {"VMSAVE_FAULT=" + std::to_string(nth) + ":short"});
        faults++;
        REQUIRE_RUN(r, 0);
        CHECK_RUN(run_vmsave({"verify", image}), 0);
        TempDir out("/dev/shm");
        CHECK_RUN(run_vmsave({"restore", image, "--ram-dir", out.path()}), 0);
        std::string why;
        CHECK_MESSAGE(test::files_equal(src, out / "ram", &why), why);
        REQUIRE(unlink(image.c_str()) == 0);
      }
    }
  }
  SUBCASE("reading: an I/O error is a failure, not damage") {
    REQUIRE_RUN(run_vmsave({"save", "--ram", "ram=" + src, image}), 0);
    TempDir out("/dev/shm");
    for (int nth : {1, 3}) {
      CAPTURE(nth);
      std::vector<std::string> env = {"VMSAVE_FAULT=" + std::to_string(nth) + ":eio"};
      RunResult r = run_vmsave({"verify", image}, 120, env);
      faults += 3;  // verify, restore and a short-read restore
      CHECK_RUN(r, 1);
      CHECK_MESSAGE(contains(r.err, "Input/output error"), r.err);
      CHECK_MESSAGE(!contains(r.err, "damaged"), r.err);
      r = run_vmsave({"restore", image, "--ram-dir", out.path()}, 120, env);
      CHECK_RUN(r, 1);
      CHECK_MESSAGE(contains(r.err, "Input/output error"), r.err);
      CHECK_MESSAGE(list_dir(out.path()).empty(), joined(list_dir(out.path())));
      // Short reads are completed.
      r = run_vmsave({"restore", image, "--ram-dir", out.path()}, 120,
                     {"VMSAVE_FAULT=" + std::to_string(nth) + ":short"});
      CHECK_RUN(r, 0);
      std::string why;
      CHECK_MESSAGE(test::files_equal(src, out / "ram", &why), why);
      std::filesystem::remove(out / "ram");
    }
    // The image itself was never at fault.
    CHECK_RUN(run_vmsave({"verify", image}), 0);
  }
  test::record_figure("injected_faults", faults);
}

TEST_CASE("engine: SIGINT or SIGTERM during a save leaves nothing behind") {
  require_shm();
  std::string why_skip;
  {
    TempDir shm("/dev/shm");
    TempDir disk;
    std::string src = shm / "big";
    std::string image = disk / "image.vmsave";
    // An earlier image at the target: an interrupted --force save keeps it.
    std::string small = shm / "small";
    test::write_pattern_file(small, 1 * kMiB, "random", 2);
    auto save_small = [&] {
      REQUIRE_RUN(run_vmsave({"save", "--force", "--ram", "ram=" + small, image}), 0);
    };
    save_small();
    const std::string old = test::read_file(image);

    // Big enough that the write phase lasts several progress ticks (100 ms)
    // even on a fast disk; one worker with one request in flight slows it
    // further. Doubled when a save still finishes before the signal lands.
    i64 size = 512 * kMiB;
    for (int sig : {SIGINT, SIGTERM}) {
      CAPTURE(sig);
      Interrupted in;
      bool caught = false;
      for (int attempt = 0; attempt < 3 && !caught; attempt++) {
        if (test::file_size(src) != size) test::write_pattern_file(src, size, "random", 9);
        in = interrupt_mid_phase(
            {"save", "--force", "--ram", "ram=" + src, image, "--jobs", "1", "--queue-depth", "1"},
            "writing RAM", sig);
        // Not seen mid-way, or the signal landed after the link: a complete
        // save, which is fine but not what this case tests.
        caught = in.caught && in.result.status != 0;
        if (!caught) {
          CHECK_RUN(in.result, 0);
          save_small();
          size *= 2;
        }
      }
      if (!caught) {
        why_skip = "could not interrupt a save mid-way in 3 tries";
        break;
      }
      CHECK_RUN(in.result, 130);
      CHECK_MESSAGE(contains(in.result.err, "vmsave: error: interrupted"), in.result.err);
      // Its phase's line does not look finished (trial P).
      CHECK_MESSAGE(contains(in.result.err, " s (interrupted)\n"), in.result.err);
      CHECK_MESSAGE(list_dir(disk.path()) == std::vector<std::string>{"image.vmsave"},
                    joined(list_dir(disk.path())));
      CHECK_MESSAGE(test::read_file(image) == old, "the old image was changed");
    }
    if (why_skip.empty()) {
      // Without --force and without an old image: nothing at the target.
      REQUIRE(unlink(image.c_str()) == 0);
      Interrupted in = interrupt_mid_phase(
          {"save", "--ram", "ram=" + src, image, "--jobs", "1", "--queue-depth", "1"},
          "writing RAM", SIGINT);
      if (in.caught && in.result.status != 0) {
        CHECK_RUN(in.result, 130);
        CHECK_MESSAGE(list_dir(disk.path()).empty(), joined(list_dir(disk.path())));
      }
    }
  }  // the big file in /dev/shm is gone here, pass, fail or skip
  if (!why_skip.empty()) test::skip(why_skip);
}

TEST_CASE("engine: a memory file written to or truncated during a raw save makes no image") {
  require_shm();
  int caught = 0;
  {
    TempDir shm("/dev/shm");
    TempDir disk, shm_images("/dev/shm");
    std::string src = shm / "big";
    // Written to: seen at the end by its mtime. Truncated: the workers'
    // reads of the mapping beyond the new end raise SIGBUS; into an image
    // in memory they read the file instead, and find its end.
    for (auto [truncated, in_memory] : {std::pair{false, false}, {true, false}, {true, true}}) {
      CAPTURE(truncated);
      CAPTURE(in_memory);
      const TempDir& to = in_memory ? shm_images : disk;
      std::string image = to / "image.vmsave";
      i64 size = 512 * kMiB;
      for (int attempt = 0; attempt < 3; attempt++) {
        test::write_pattern_file(src, size, "random", 6);
        Interrupted in = interrupt_mid_phase(
            {"save", "--ram", "ram=" + src, image, "--jobs", "1", "--queue-depth", "1"},
            "writing RAM", 0, [&] {
              int fd = open(src.c_str(), O_WRONLY | O_CLOEXEC);
              REQUIRE(fd >= 0);
              if (truncated)
                REQUIRE(ftruncate(fd, 1 * kMiB) == 0);
              else
                REQUIRE(pwrite(fd, "changed", 7, 0) == 7);
              close(fd);
            });
        if (!(in.caught && in.result.status != 0)) {  // finished before it landed
          CHECK_RUN(in.result, 0);
          std::filesystem::remove(image);
          size *= 2;
          continue;
        }
        caught++;
        CHECK_RUN(in.result, 1);
        const std::string want = truncated ? "vmsave: error: a memory file shrank while it was saved"
                                           : "vmsave: error: memory file changed while it was "
                                             "saved (" + src + ")";
        CHECK_MESSAGE(contains(in.result.err, want), in.result.err);
        CHECK_MESSAGE(list_dir(to.path()).empty(), joined(list_dir(to.path())));
        break;
      }
    }
  }  // the big file in /dev/shm is gone here
  if (caught < 3) test::skip("could not change the file while a save ran, in 3 tries each");
}

TEST_CASE("engine: SIGINT or SIGKILL during a restore removes the RAM files") {
  require_shm();
  int caught = 0;
  {
    TempDir shm("/dev/shm");
    TempDir disk;
    std::string image = disk / "image.vmsave";
    i64 size = 512 * kMiB;
    auto save = [&] {
      std::string src = shm / "big";
      test::write_pattern_file(src, size, "random", 4);
      REQUIRE_RUN(run_vmsave({"save", "--force", "--ram", "a=" + src, image}), 0);
      std::filesystem::remove(src);  // one copy of the RAM in /dev/shm at a time
    };
    save();
    // SIGINT unwinds through vmsave's own clean-up; after SIGKILL its
    // watchdog process removes the file.
    for (int sig : {SIGINT, SIGKILL}) {
      CAPTURE(sig);
      for (int attempt = 0; attempt < 3; attempt++) {
        TempDir out("/dev/shm");
        Interrupted in = interrupt_mid_phase(
            {"restore", image, "--ram-dir", out.path(), "--jobs", "1", "--queue-depth", "1"},
            "reading RAM", sig);
        if (!in.caught || in.result.status == 0) {
          CHECK_RUN(in.result, 0);
          size *= 2;
          save();
          continue;
        }
        caught++;
        if (sig == SIGINT) {
          CHECK_RUN(in.result, 130);
          CHECK_MESSAGE(contains(in.result.err, "vmsave: error: interrupted"), in.result.err);
        } else {
          CHECK_RUN(in.result, 128 + SIGKILL);
          CHECK_MESSAGE(contains(in.result.err, "vmsave: the restore was killed part-way: the "
                                                "files it made are removed"),
                        in.result.err);
        }
        CHECK_MESSAGE(list_dir(out.path()).empty(), joined(list_dir(out.path())));
        break;
      }
    }
    if (caught) CHECK_RUN(run_vmsave({"verify", image}), 0);
  }
  if (caught < 2) test::skip("interrupted " + std::to_string(caught) + " of 2 restores mid-way");
}

TEST_CASE("engine: the zero share of blocks with different page sizes is counted in bytes") {
  // Pages were counted as pages: a 2 MiB page of data beside 4 KiB zero
  // pages made a half-data save "99.8% zero".
  require_shm();
  HugePagePool pool;
  if (HugePagePool::pages() < 0) test::skip("no 2 MiB huge pages here");
  constexpr i64 kPages = 8, kHuge = 2 * kMiB;
  const i64 want = HugePagePool::pages() + kPages;
  if (HugePagePool::resize(want) < want) test::skip("cannot grow the huge page pool");
  TempMount huge("hugetlbfs", "pagesize=2M");
  if (!huge.ok()) test::skip(huge.error());
  TempDir shm("/dev/shm"), disk;
  const std::string data = huge / "data", zeros = shm / "zeros";
  {
    UniqueFd fd(::open(data.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    REQUIRE(fd.get() >= 0);
    REQUIRE(ftruncate(fd.get(), kPages * kHuge) == 0);
    void* m = mmap(nullptr, kPages * kHuge, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    REQUIRE(m != MAP_FAILED);
    std::memset(m, 0x5a, kPages * kHuge);  // all data
    munmap(m, kPages * kHuge);
  }
  test::write_pattern_file(zeros, kPages * kHuge, "zero", 1);
  const std::string image = disk / "image.vmsave";
  RunResult r = run_vmsave({"save", "--json", "--ram", "a=" + zeros, "--ram", "b=" + data, image});
  REQUIRE_RUN(r, 0);
  CHECK(json::parse(r.out)["zero_ratio"].get<double>() == doctest::Approx(0.5));
  r = run_vmsave({"save", "--force", "--ram", "a=" + zeros, "--ram", "b=" + data, image});
  REQUIRE_RUN(r, 0);
  CHECK_MESSAGE(contains(r.err, "(50% zero)"), r.err);
  // Half the RAM stored: the rate of the stored bytes and that of the RAM
  // (the progress line's) are two figures, each named.
  CHECK_MESSAGE(contains(r.err, "/s stored, "), r.err);
  CHECK_MESSAGE(contains(r.err, "/s of RAM)"), r.err);
  TempDir out("/dev/shm");
  r = run_vmsave({"restore", "--json", image, "--ram-dir", out.path()});
  REQUIRE_RUN(r, 0);
  CHECK(json::parse(r.out)["zero_ratio"].get<double>() == doctest::Approx(0.5));
}

TEST_CASE("engine: zero 4 KiB blocks of a huge page with data stay holes in the image") {
  // A page holds data if one byte does, and was stored whole: a guest on
  // 1 GiB pages stored 2 GiB for 169 MiB of data.
  TempDir shm("/dev/shm");
  const i64 page = 2 * kMiB, size = 4 * page;
  const std::string src = shm / "ram";
  {
    UniqueFd fd(open(src.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    REQUIRE(fd);
    REQUIRE(ftruncate(fd.get(), size) == 0);
    std::string one(1, 'x'), some(100 * kKiB, 'y');
    REQUIRE(pwrite(fd.get(), one.data(), 1, 100) == 1);  // page 0: one byte
    REQUIRE(pwrite(fd.get(), some.data(), some.size(), 2 * page + 64 * kKiB) ==
            i64(some.size()));  // page 2: 100 KiB
    // page 3: data in the file, all zeros
    std::string zeros(kMiB, '\0');
    REQUIRE(pwrite(fd.get(), zeros.data(), zeros.size(), 3 * page) == i64(zeros.size()));
  }
  const std::string image = shm / "image.vmsave";
  {
    UniqueFd fd(open(src.c_str(), O_RDONLY | O_CLOEXEC));
    REQUIRE(fd);
    BlockLayout b;
    b.id = "ram";
    b.size = size;
    b.page_size = page;
    auto w = ImageWriter::create(image, false, {b}, kDefaultChunkSize, nullptr);
    REQUIRE_MESSAGE(w.ok(), w.error().message());
    RamStats st;
    Status s = (*w)->write_ram({RamSource{"ram", src, fd.get(), 0, size, page}}, EngineConfig{2, 8},
                               nullptr, &st);
    REQUIRE_MESSAGE(s.ok(), s.error().message());
    CHECK(st.data_bytes == 2 * page);  // the bitmap counts pages
    REQUIRE((*w)->commit({{"mode", "raw"}}).ok());
  }
  // 4 KiB + 100 KiB of data, and the tail's sections: not 4 MiB of pages.
  CHECK_MESSAGE(allocated(image) < 512 * kKiB, "allocated: ", allocated(image));
  CHECK_RUN(run_vmsave({"verify", image}), 0);
  TempDir out("/dev/shm");
  REQUIRE_RUN(run_vmsave({"restore", image, "--ram-dir", out.path()}), 0);
  std::string why;
  CHECK_MESSAGE(test::files_equal(src, out / "ram", &why), why);
}
