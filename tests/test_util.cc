// Helpers shared by the test files (see test_util.h): reported skips,
// temporary directories that go away even when a case fails, running the
// real binary with a timeout, and deterministic memory-file contents.
//
// Plain POSIX and no project code beyond lib/common.h, so that the helpers
// keep working while the code under test is broken.

#include "tests/test_util.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>

#include "core/image_io.h"
#include "format/codec.h"
#include "io/fd.h"

extern char** environ;

namespace vmsave::test {
namespace {

constexpr i64 kPage = 4096;
// Files are written through one buffer of this many bytes.
constexpr i64 kWriteBuffer = 1 * kMiB;

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "test_util: %s: %s\n", what.c_str(), std::strerror(errno));
  std::abort();
}

u64 mix(u64 x) {  // splitmix64's finalizer: a well-spread hash of x
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

void fill_random(u8* p, i64 n, u64 state) {
  if (state == 0) state = 1;  // xorshift's only fixed point
  for (i64 i = 0; i < n; i += 8) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    std::memcpy(p + i, &state, std::min<i64>(8, n - i));
  }
}

void fill_text(u8* p, i64 n, i64 page, u64 seed) {
  // Distinct per page (the page number is in the text), so a page restored
  // at the wrong offset shows up in a comparison.
  char line[96];
  int len = std::snprintf(line, sizeof(line),
                          "vmsave test page %lld seed %llu: the quick brown fox jumps. ",
                          static_cast<long long>(page), static_cast<unsigned long long>(seed));
  for (i64 i = 0; i < n; i++) p[i] = static_cast<u8>(line[i % len]);
}

enum class PageKind { kZero, kText, kRandom };

PageKind page_kind(const std::string& kind, i64 page, u64 seed) {
  if (kind == "random") return PageKind::kRandom;
  if (kind == "zero") return PageKind::kZero;
  if (kind == "text") return PageKind::kText;
  if (kind == "mixed") {
    switch (mix(seed * 0x100000001b3ULL ^ static_cast<u64>(page)) % 4) {
      case 0:
        return PageKind::kZero;
      case 1:
        return PageKind::kText;
      default:
        return PageKind::kRandom;
    }
  }
  std::fprintf(stderr, "test_util: unknown pattern kind \"%s\"\n", kind.c_str());
  std::abort();
}

}  // namespace

double now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

void skip(const std::string& why) {
  std::fprintf(stderr, "SKIP: %s\n", why.c_str());
  std::fflush(stderr);
  std::exit(77);
}

TempDir::TempDir(const std::string& parent) {
  std::string base = parent;
  if (base.empty()) {
    const char* t = std::getenv("TMPDIR");
    base = t && *t ? t : "/tmp";
  }
  std::string tmpl = base + "/vmsave-test-XXXXXX";
  if (!mkdtemp(tmpl.data())) die("mkdtemp " + tmpl);
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
  if (ec)
    std::fprintf(stderr, "test_util: cannot remove %s: %s\n", path_.c_str(), ec.message().c_str());
}

RunResult run_vmsave(const std::vector<std::string>& args, double timeout_s,
                     const std::vector<std::string>& env) {
  std::vector<std::string> argv{VMSAVE_BINARY};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_program(argv, timeout_s, env);
}

RunResult run_program(const std::vector<std::string>& argv, double timeout_s,
                      const std::vector<std::string>& env) {
  RunResult res;
  // Everything the child needs is built before fork: between fork and exec
  // only async-signal-safe calls are allowed.
  std::map<std::string, std::string> vars;
  for (char** e = environ; *e; e++) {
    std::string s = *e;
    size_t eq = s.find('=');
    vars[s.substr(0, eq)] = s;
  }
  for (const std::string& s : env) vars[s.substr(0, s.find('='))] = s;
  std::vector<std::string> env_strings;
  for (auto& [k, v] : vars) env_strings.push_back(v);
  std::vector<char*> envp, cargv;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_copy = argv;
  for (auto& s : argv_copy) cargv.push_back(s.data());
  cargv.push_back(nullptr);

  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) die("pipe2");
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    // The child dies with the test process, so a crashed test leaves no
    // vmsave running.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, STDIN_FILENO);
    dup2(out[1], STDOUT_FILENO);
    dup2(err[1], STDERR_FILENO);
    execvpe(cargv[0], cargv.data(), envp.data());
    const char msg[] = "test_util: exec failed\n";
    (void)!write(STDERR_FILENO, msg, sizeof(msg) - 1);
    _exit(127);
  }
  close(out[1]);
  close(err[1]);

  double deadline = now_s() + timeout_s;
  bool killed = false;
  struct pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  std::string* sinks[2] = {&res.out, &res.err};
  int open_fds = 2;
  char buf[65536];
  while (open_fds > 0) {
    double left = deadline - now_s();
    if (left <= 0 && !killed) {
      kill(pid, SIGKILL);
      killed = true;
      // Grandchildren may hold the pipes open; stop reading now.
      break;
    }
    int ms = static_cast<int>(std::min(left, 1.0) * 1000) + 1;
    int n = poll(fds, 2, ms);
    if (n < 0) {
      if (errno == EINTR) continue;
      die("poll");
    }
    for (int i = 0; i < 2; i++) {
      if (fds[i].fd < 0 || !fds[i].revents) continue;
      ssize_t r = read(fds[i].fd, buf, sizeof(buf));
      if (r > 0) {
        sinks[i]->append(buf, r);
      } else if (r == 0 || (errno != EINTR && errno != EAGAIN)) {
        close(fds[i].fd);
        fds[i].fd = -1;
        open_fds--;
      }
    }
  }
  for (auto& f : fds)
    if (f.fd >= 0) close(f.fd);

  int wstatus = 0;
  while (true) {
    struct rusage ru {};
    pid_t w = wait4(pid, &wstatus, killed ? 0 : WNOHANG, &ru);
    if (w == pid) {
      res.max_rss_kib = ru.ru_maxrss;
      break;
    }
    if (w < 0 && errno != EINTR) die("waitpid");
    if (w == 0) {
      // Output closed but the process lives on: wait out the deadline.
      if (now_s() >= deadline) {
        kill(pid, SIGKILL);
        killed = true;
      } else {
        usleep(2000);
      }
    }
  }
  if (WIFEXITED(wstatus))
    res.status = WEXITSTATUS(wstatus);
  else if (WIFSIGNALED(wstatus))
    res.status = 128 + WTERMSIG(wstatus);
  if (killed) {
    res.status = 128 + SIGKILL;
    res.err += "\ntest_util: killed after " + std::to_string(timeout_s) + " s timeout\n";
  }
  return res;
}

void write_image_of(const std::string& image, const std::string& ram, const std::string& codec,
                    const std::string& vmstate, const nlohmann::json& meta) {
  std::filesystem::remove(image);
  UniqueFd fd(open(ram.c_str(), O_RDONLY | O_CLOEXEC));
  REQUIRE(fd);
  BlockLayout b;
  b.id = "ram";
  b.size = kMiB;
  b.page_size = kPage;
  auto w = ImageWriter::create(image, false, {b}, kDefaultChunkSize, nullptr);
  REQUIRE_MESSAGE(w.ok(), w.error().message());
  if (!codec.empty()) REQUIRE((*w)->set_compression(*parse_codec_spec(codec)).ok());
  RamStats st;
  REQUIRE((*w)->write_ram({RamSource{"ram", ram, fd.get(), 0, kMiB, kPage}}, EngineConfig{2, 8},
                          nullptr, &st)
              .ok());
  CHECK(st.compressed == !codec.empty());
  // In odd pieces, as a pipe delivers them.
  for (size_t off = 0; off < vmstate.size(); off += 100003)
    REQUIRE((*w)->append_vmstate(reinterpret_cast<const u8*>(vmstate.data()) + off,
                                 std::min<size_t>(100003, vmstate.size() - off))
                .ok());
  REQUIRE((*w)->commit(meta).ok());
}

void write_pattern_file(const std::string& path, i64 len, const std::string& kind, u64 seed) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) die("open " + path);
  std::vector<u8> buf(kWriteBuffer);
  // Runs of non-zero pages are gathered in `buf` and written with one
  // pwrite; zero pages are skipped and stay holes.
  i64 run_start = -1, run_len = 0;
  auto flush = [&] {
    if (run_len > 0) {
      i64 done = 0;
      while (done < run_len) {
        ssize_t n = pwrite(fd, buf.data() + done, run_len - done, run_start + done);
        if (n < 0) {
          if (errno == EINTR) continue;
          die("pwrite " + path);
        }
        done += n;
      }
    }
    run_start = -1;
    run_len = 0;
  };
  for (i64 off = 0; off < len; off += kPage) {
    i64 page = off / kPage;
    i64 n = std::min(kPage, len - off);
    PageKind k = page_kind(kind, page, seed);
    if (k == PageKind::kZero) {
      flush();
      continue;
    }
    if (run_start < 0) run_start = off;
    if (run_len + n > static_cast<i64>(buf.size())) {
      flush();
      run_start = off;
    }
    u8* p = buf.data() + run_len;
    if (k == PageKind::kText)
      fill_text(p, n, page, seed);
    else
      fill_random(p, n, mix(seed ^ mix(static_cast<u64>(page))));
    run_len += n;
  }
  flush();
  if (ftruncate(fd, len) < 0) die("ftruncate " + path);
  close(fd);
}

bool files_equal(const std::string& a, const std::string& b, std::string* why) {
  auto fail = [&](const std::string& w) {
    if (why) *why = w;
    return false;
  };
  int fa = open(a.c_str(), O_RDONLY | O_CLOEXEC);
  if (fa < 0) return fail(a + ": " + std::strerror(errno));
  int fb = open(b.c_str(), O_RDONLY | O_CLOEXEC);
  if (fb < 0) {
    close(fa);
    return fail(b + ": " + std::strerror(errno));
  }
  struct Closer {
    int a, b;
    ~Closer() {
      close(a);
      close(b);
    }
  } closer{fa, fb};
  struct stat sa, sb;
  fstat(fa, &sa);
  fstat(fb, &sb);
  if (sa.st_size != sb.st_size)
    return fail("sizes differ: " + std::to_string(sa.st_size) + " vs " +
                std::to_string(sb.st_size));
  std::vector<u8> ba(kWriteBuffer), bb(kWriteBuffer);
  for (i64 off = 0; off < sa.st_size;) {
    i64 n = std::min<i64>(kWriteBuffer, sa.st_size - off);
    if (pread(fa, ba.data(), n, off) != n || pread(fb, bb.data(), n, off) != n)
      return fail("short read at offset " + std::to_string(off));
    if (std::memcmp(ba.data(), bb.data(), n) != 0) {
      i64 i = 0;
      while (ba[i] == bb[i]) i++;
      return fail("first difference at offset " + std::to_string(off + i));
    }
    off += n;
  }
  return true;
}

i64 file_size(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) < 0) return -1;
  return st.st_size;
}

std::string read_file(const std::string& path) {
  std::string out;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  char buf[65536];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) != 0) {
    if (n < 0) {
      if (errno == EINTR) continue;
      break;
    }
    out.append(buf, n);
  }
  close(fd);
  return out;
}

void record_figure(const std::string& name, double value) {
  const char* path = std::getenv("VMSAVE_FIGURES");
  if (!path || !*path) return;
  // One write(2) of a short line with O_APPEND: tests running in parallel
  // do not interleave.
  std::string line = "{\"figure\": \"" + name + "\", \"value\": " + std::to_string(value) + "}\n";
  int fd = ::open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return;
  (void)!::write(fd, line.data(), line.size());
  ::close(fd);
}

void require_mount(const char* type) {
  std::string why;
  {
    TempDir probe;
    if (mount("none", probe.path().c_str(), type, 0, "size=1m") != 0)
      why = std::string("cannot mount ") + type + ": " + std::strerror(errno);
    else
      umount2(probe.path().c_str(), MNT_DETACH);
  }
  if (!why.empty()) skip(why);
}

TempMount::TempMount(const char* type, const std::string& opts) {
  ok_ = mount("none", dir_.path().c_str(), type, 0, opts.c_str()) == 0;
  if (!ok_) err_ = std::strerror(errno);
}

TempMount::~TempMount() {
  if (ok_) umount2(dir_.path().c_str(), MNT_DETACH);
}

}  // namespace vmsave::test
