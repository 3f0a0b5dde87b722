// vmsave's command line: CLI11 fills one options struct per command and
// calls one function in core/. This file alone prints results, turns errors
// into one line and an exit status, and owns the signal handlers.

#include <fcntl.h>
#include <linux/magic.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "cli/terminal.h"
#include "core/qemu_args.h"
#include "core/vmsave.h"
#include "lib/cancel.h"

using namespace vmsave;

namespace {

struct Common {
  bool json = false;
  bool quiet = false;
  bool stats = false;
  int progress_fd = -1;
  int jobs = 0;
  u32 queue_depth = 32;
};

void on_signal(int sig) {
  cancel_signal().store(sig);
  signals_received().fetch_add(1);
}

// Standard fds the caller closed (`>&-`) would be taken by the first files
// vmsave opens, and its output would land in them: the JSON report in an
// image, say. /dev/null takes their place; a closed stdout is then a
// report that could not be written. Returns whether stdout was closed.
bool reopen_closed_std_fds() {
  bool stdout_closed = false;
  for (int fd = 0; fd <= 2; fd++) {
    if (fcntl(fd, F_GETFD) >= 0 || errno != EBADF) continue;
    if (::open("/dev/null", O_RDWR) != fd) std::abort();  // the lowest free number
    stdout_closed |= fd == 1;
  }
  return stdout_closed;
}

void install_signal_handlers() {
  // No SA_RESTART: blocking calls return EINTR and the loops around them
  // check cancelled(), then unwind through the normal error paths.
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigset_t mask;
  sigemptyset(&mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
    // Ignored on entry stays ignored, as nohup and a shell's background
    // jobs (SIGINT) mean it to be.
    struct sigaction old {};
    if (sigaction(sig, nullptr, &old) == 0 && old.sa_handler == SIG_IGN) continue;
    sigaction(sig, &sa, nullptr);
    sigaddset(&mask, sig);  // blocked by the parent: vmsave could not be stopped
  }
  sigprocmask(SIG_UNBLOCK, &mask, nullptr);
  signal(SIGPIPE, SIG_IGN);
  signal(SIGXFSZ, SIG_IGN);  // past ulimit -f: EFBIG from the write, said as an error
}

// A JSON value of an unexpected type, from a QMP peer that is not quite
// QEMU or in an image's metadata (checksummed, so written that way), makes
// nlohmann::json throw from deep in core/. main() catches it around the
// command, so the stack unwinds (a stopped guest is resumed on the way out)
// and the user gets one line instead of std::terminate.
Error unexpected_json(const nlohmann::json::exception& e) {
  return Error{"unexpected JSON from QEMU or in the image's metadata", "", e.what(),
               "is the QMP socket QEMU's, and the image one vmsave wrote?"};
}

// With --json, a failure is an object on stdout too: wrappers parse stdout
// whatever happened.
void print_failure_json(const std::string& cmd, const std::string& error, Exit status,
                        const std::string& image = "",
                        const std::vector<std::string>& warnings = {}) {
  nlohmann::json j = {{"command", cmd}, {"ok", false}, {"error", error},
                      {"exit_status", static_cast<int>(status)}};
  if (!image.empty()) j["image"] = image;
  if (!warnings.empty()) j["warnings"] = warnings;
  say(stdout, "{}\n", j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace));
  std::fflush(stdout);
}

// A share in whole percent, but never 100 or 0 for what is not all or
// nothing: 12 KiB of data in 10 MiB is "99.9% zero", not "100% zero".
std::string percent(double share) {
  double p = 100 * share;
  if (p > 99.5 && share < 1) return fmt::format("{:.1f}", std::min(p, 99.9));
  if (p < 0.5 && share > 0) return fmt::format("{:.1f}", std::max(p, 0.1));
  return fmt::format("{:.0f}", p);
}

int fail(Error e, const std::string& cmd = "") {
  std::fflush(stdout);
  if (e.status == Exit::kDamaged && e.hint.empty())
    e.hint = cmd == "verify" ? "use an intact copy of the image"
                             : "use an intact copy of the image (vmsave verify names the first "
                               "damaged place)";
  // After Ctrl-C the terminal has echoed "^C" where its cursor was: the
  // error gets a line of its own.
  if (e.status == Exit::kInterrupted && isatty(STDERR_FILENO)) {
    const char* term = std::getenv("TERM");
    say(stderr, "{}", term && std::strcmp(term, "dumb") != 0 ? "\r\x1b[K" : "\n");
  }
  say(stderr, "vmsave: error: {}\n", visible(e.message()));
  return static_cast<int>(e.status);
}

// Seconds for a timeout: a positive, finite number (CLI11's PositiveNumber
// lets nan and inf through, which would mean waiting forever).
const CLI::Validator kSeconds(
    [](std::string& text) -> std::string {
      double v = 0;
      if (!CLI::detail::lexical_cast(text, v) || !std::isfinite(v) || v <= 0 || v > 1e6)
        return "a number of seconds, more than 0 and at most 1000000: " + text;
      return "";
    },
    "SECONDS");

// A whole number in [lo, hi]; CLI11's Range calls "abc" out of range.
CLI::Validator whole_number(i64 lo, i64 hi) {
  return CLI::Validator(
      [lo, hi](std::string& text) -> std::string {
        i64 v = 0;
        if (CLI::detail::lexical_cast(text, v) && v >= lo && v <= hi) return "";
        return fmt::format("a whole number from {} to {}: {}", lo, hi, text);
      },
      fmt::format("INT in [{} - {}]", lo, hi));
}

// A size as QEMU spells them (64K, 1M), and as people write them too: 1MiB,
// 1mib, 64KB and 64kb are the same binary sizes here, as info prints them.
Result<i64> option_size(std::string text) {
  auto ends_with_unit = [&](std::string_view unit) {  // either case
    if (text.size() <= unit.size() + 1) return false;
    for (size_t i = 0; i < unit.size(); i++)
      if (std::tolower(static_cast<unsigned char>(text[text.size() - unit.size() + i])) != unit[i])
        return false;
    return std::string_view("KMGTkmgt").find(text[text.size() - unit.size() - 1]) !=
           std::string_view::npos;
  };
  for (std::string_view unit : {"ib", "b"})
    if (ends_with_unit(unit)) {
      text.resize(text.size() - unit.size());
      break;
    }
  return parse_size(text);
}

// A size option's usage error: the spelling's fault (with the parser's
// reason), or the value's (`rule`).
std::string size_usage(const std::string& option, const Result<i64>& size,
                       const std::string& rule) {
  if (!size.ok())
    return fmt::format("{}: {} ({}); sizes are a number and K, M, G or T, as 64K, 1MiB, 2MB",
                       option, size.error().what, size.error().detail);
  return fmt::format("{} {}", option, rule);
}

// A path: "" would otherwise read as the option left out ("restore needs
// exactly one of ...") or fail later naming no option.
const CLI::Validator kPath(
    [](std::string& text) -> std::string { return text.empty() ? "an empty path" : ""; }, "");

void add_common(CLI::App* cmd, Common& c, bool engine) {
  cmd->add_flag("--json", c.json, "Print the report as one JSON object on stdout");
  cmd->add_flag("-q,--quiet", c.quiet, "Print no progress and no summary");
  cmd->add_option("--progress-fd", c.progress_fd, "Write progress as JSON lines to this fd")
      ->check(CLI::Validator(
          [](std::string& text) -> std::string {
            int fd = -1;
            return CLI::detail::lexical_cast(text, fd) && fd >= 0
                       ? ""
                       : "a file descriptor number, 0 or more: " + text;
          },
          "FD"));
  if (engine) {
    cmd->add_flag("--stats", c.stats, "Show the I/O latency histogram in the summary");
    cmd->add_option("-j,--jobs", c.jobs, "I/O worker threads (default: online CPUs, at most 32)")
        ->check(whole_number(1, 256));
    cmd->add_option("--queue-depth", c.queue_depth, "Requests in flight per worker")
        ->default_val(32)
        ->check(whole_number(1, 4096));
  }
}

std::string secs(const nlohmann::json& j, const char* key) {
  return j.contains(key) ? fmt::format("{:.2f} s", j[key].get<double>()) : "-";
}

std::string latency_line(const nlohmann::json& j) {
  if (!j.contains("io_latency_us")) return "";
  auto& l = j["io_latency_us"];
  return fmt::format("I/O latency: p50 {} us, p90 {} us, p99 {} us, max {} us ({} requests)",
                     l["p50"].get<i64>(), l["p90"].get<i64>(), l["p99"].get<i64>(),
                     l["max"].get<i64>(), l["count"].get<i64>());
}

// One human paragraph per command; the JSON report has every figure.
void print_summary(const std::string& cmd, const nlohmann::json& j, const Common& c) {
  if (cmd == "save") {
    show(stderr, "saved {}: {} of RAM, {} stored ({}% zero)", j["image"].get<std::string>(),
         human_bytes(j["ram_bytes"].get<double>()), human_bytes(j["stored_bytes"].get<double>()),
         percent(j["zero_ratio"].get<double>()));
    if (j.contains("compress"))
      show(stderr, ", {} ratio {:.2f} of {}", j["compress"].get<std::string>(),
           j["compression_ratio"].get<double>(),
           human_bytes(j["uncompressed_bytes"].get<double>()));
    if (j.value("zero_filled_bytes", i64(0)) > 0)
      show(stderr, " (+{} of short zero runs, see --min-hole)",
           human_bytes(j["zero_filled_bytes"].get<double>()));
    if (j.contains("vmstate_bytes") && j.value("ram_saved_by", "") != "qemu")  // else in QEMU's section
      show(stderr, ", device state {}", human_bytes(j["vmstate_bytes"].get<double>()));
    show(stderr, "\n  total {}, RAM written in {} ({}/s", secs(j, "total_s"),
         secs(j, "ram_write_s"), human_bytes(j["throughput_bps"].get<double>()));
    // Both rates, named: the progress line's is of the RAM, and with zero
    // pages or compression the stored bytes' rate is another figure.
    const double ram_s = j.value("ram_write_s", 0.0);
    if (ram_s > 0)
      show(stderr, " stored, {}/s of RAM", human_bytes(j["ram_bytes"].get<double>() / ram_s));
    show(stderr, ")");
    // A guest paused already was not paused by the save (it said 0.00 s).
    if (j.contains("downtime_s") && j.value("guest_was_running", true))
      show(
          stderr, ", guest paused {}{}", secs(j, "downtime_s"),
          j.value("after", "") == "paused" ? " so far (it stays paused: QMP cont resumes it)" : "");
    // Said now, not at the lazy restore a CI loop tries next (trial V).
    if (j.value("ram_saved_by", "") == "qemu")
      show(stderr, " (RAM saved by QEMU mapped-ram: the image restores eagerly only)");
    show(stderr, "\n");
    if (j.value("live", false))
      show(stderr, "  live: {} passes, {} rewritten, flush and commit {}\n", j.value("passes", 0),
           human_bytes(j.value("bytes_rewritten", 0.0)), secs(j, "flush_s"));
    for (auto& f : j.value("ram_files_left", nlohmann::json::array())) {
      // Empty with discard-data=on (QEMU dropped its pages as it quit).
      struct stat st;
      struct statfs fs;
      std::string path = f.get<std::string>();
      bool holds = stat(path.c_str(), &st) != 0 || st.st_blocks > 0;
      // Memory only on tmpfs and hugetlbfs; elsewhere the file takes disk.
      bool memory = statfs(path.c_str(), &fs) != 0 || fs.f_type == TMPFS_MAGIC ||
                    fs.f_type == HUGETLBFS_MAGIC;
      show(stderr,
           "  QEMU quit and left its RAM file {}: {} (a restore to it needs it gone, or "
           "--force)\n",
           path,
           !holds   ? "it holds no data"
           : memory ? "remove it to free that memory"
                    : "remove it to free that disk space");
    }
  } else if (cmd == "restore" || cmd == "prepare") {
    if (j.value("mode", "") == "lazy")  // prepare only prints the arguments that map it
      show(stderr, "{} {} of RAM copy-on-write from the image\n",
           cmd == "prepare" ? "these arguments map" : "mapped",
           human_bytes(j["ram_bytes"].get<double>()));
    else if (j.value("ram_bytes", 0.0) > 0)
      show(stderr, "restored {} of RAM ({} stored) in {}\n",
           human_bytes(j["ram_bytes"].get<double>()), human_bytes(j.value("stored_bytes", 0.0)),
           secs(j, "ram_read_s"));
    if (j.contains("qemu_ram_bytes"))
      show(stderr, "QEMU loaded {} of RAM from its migration section in the image\n",
           human_bytes(j["qemu_ram_bytes"].get<double>()));
    if (j.contains("pid"))
      show(stderr, "QEMU pid {} is {}; QMP socket {}{}\n", j["pid"].get<i64>(),
           j.value("running", false) ? "running" : "paused", j["qmp"].get<std::string>(),
           j.contains("qemu_log") ? "; its log " + j["qemu_log"].get<std::string>() : "");
    show(stderr, "  total {}\n", secs(j, "total_s"));
  } else if (cmd == "verify") {
    // An image QEMU saved all of has no chunks of vmsave's, only its section.
    const i64 chunks = j["chunks_checked"].get<i64>();
    const bool section = j.value("qemu_section_bytes", i64(0)) > 0;
    std::string what = fmt::format("{} chunks", chunks);
    if (section) what = chunks ? what + " and QEMU's section" : "QEMU's section";
    show(stderr, "{}: intact ({}, {} read in {})\n", j["image"].get<std::string>(), what,
         human_bytes(j["bytes_read"].get<double>()), secs(j, "verify_s"));
    if (const i64 n = j.value("unchecked_sections", i64(0)); n > 0)
      show(stderr, "  not checked: {} section{} of format v{}, newer than this vmsave (v{}.{})\n",
           n, n == 1 ? "" : "s", j["format_version"].get<std::string>(), kFormatMajor,
           kFormatMinor);
  }
  // None when QEMU moved all of it (an image whose RAM QEMU saved).
  if (c.stats && j.contains("io_latency_us") && j["io_latency_us"].value("count", i64(0)) > 0)
    show(stderr, "  {}\n", latency_line(j));
}

// An argument as a POSIX shell would need it: as is when it has nothing
// the shell treats specially, else in single quotes; with a control
// character in it, in bash's $'...' with \xNN for those, so that what is
// shown pastes back as the same argument (\x0a inside '...' did not).
std::string shell_word(const std::string& a) {
  const bool plain = !a.empty() && a.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                                     "0123456789_./=,:@%+-") == std::string::npos;
  if (plain) return a;
  if (std::any_of(a.begin(), a.end(), [](unsigned char c) { return c < 0x20 || c == 0x7f; })) {
    std::string out = "$'";
    for (unsigned char ch : a)
      out += ch < 0x20 || ch == 0x7f    ? fmt::format("\\x{:02x}", ch)
             : ch == '\'' || ch == '\\' ? std::string{'\\', static_cast<char>(ch)}
                                        : std::string(1, static_cast<char>(ch));
    return out + "'";
  }
  std::string out = "'";
  for (char ch : a) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return out + "'";
}

// Text from an image (ids, description, the saved command line) goes to
// the terminal: control characters in it are shown as \xNN, never obeyed
// (an image from elsewhere could otherwise retitle or clear the terminal).
template <class... Args>
void print_text(fmt::format_string<Args...> f, Args&&... args) {
  show(stdout, f, std::forward<Args>(args)...);
}

void print_info(const nlohmann::json& j) {
  print_text("image:        {}\n", j["image"].get<std::string>());
  if (j.contains("bytes_past_end"))
    print_text(
        "format:       vmsave image v{} (complete, then {} bytes that are not part of it: "
        "vmsave verify calls it damaged)\n",
        j["format_version"].get<std::string>(), j["bytes_past_end"].get<i64>());
  else
    print_text("format:       vmsave image v{} (complete)\n",
               j["format_version"].get<std::string>());
  print_text("uuid:         {}\n", j["uuid"].get<std::string>());
  auto& m = j["metadata"];
  print_text("created:      {} on {} by vmsave {}\n", m.value("created", "?"), m.value("host", "?"),
             m.value("vmsave_version", "?"));
  print_text("mode:         {}\n", m.value("mode", "?"));
  if (m.contains("qemu_version")) print_text("qemu:         {}\n", m["qemu_version"].get<std::string>());
  if (m.contains("qemu_cmdline") && m["qemu_cmdline"].is_array()) {
    // What `restore -- QEMU-COMMAND` wants back (restore's mismatch errors
    // point here).
    std::string line;
    for (auto& a : m["qemu_cmdline"])
      if (a.is_string()) line += (line.empty() ? "" : " ") + shell_word(a.get<std::string>());
    print_text("command:      {}\n", line);
  }
  // What QEMU wrote to at the save: the files a restore must open, as they
  // were then (the command line above may name older ones).
  if (m.contains("disks") && m["disks"].is_array())
    for (auto& d : m["disks"]) {
      if (!d.is_object()) continue;
      auto text = [&](const char* key) {
        return d.contains(key) && d[key].is_string() ? d[key].get<std::string>() : std::string();
      };
      std::string about = text("format");
      const std::string backing = text("backing_file");
      if (d.contains("temporary") && d["temporary"] == true) {
        print_text("disk:         {} a temporary overlay of {} (-snapshot: gone with its QEMU)\n",
                   text("device"), backing);
        continue;
      }
      // The whole chain where the save recorded it (backing_file is QEMU's
      // spelling of the first layer only).
      std::string chain;
      for (auto& below : d.value("backing_chain", nlohmann::json::array()))
        if (below.is_string()) chain += (chain.empty() ? "" : ", then ") + below.get<std::string>();
      if (!chain.empty() || !backing.empty())
        about += ", backing " + (chain.empty() ? backing : chain);
      if (d.contains("read_only") && d["read_only"] == true) about += ", read-only";
      print_text("disk:         {} {} ({})\n", text("device"), text("file"), about);
    }
  // Where QEMU placed memory devices: hot-plugged ones need a -device in
  // the restore command, in that order or with that address.
  if (m.contains("memory_devices"))
    for (auto& d : m["memory_devices"]) {
      // A backend plugged after start is in no command line: its -object
      // too, from what the save recorded of it.
      const std::string memdev = d.value("memdev", "");
      std::string object;
      bool in_cmdline = false;
      if (m.contains("qemu_cmdline"))
        for (auto& a : m["qemu_cmdline"])
          in_cmdline |=
              a.is_string() &&
              (a.get<std::string>().find("id=" + memdev + ",") != std::string::npos ||
               a.get<std::string>().find("\"id\":\"" + memdev + "\"") != std::string::npos);
      if (!in_cmdline && m.contains("blocks"))
        for (auto& b : m["blocks"])
          if (b.value("id", "") == memdev &&
              b.value("qom_type", "").starts_with("memory-backend-")) {
            object = fmt::format("{},id={},size={}", b.value("qom_type", ""), memdev,
                                 b.value("size", i64(0)));
            if (b.contains("share") && b["share"].is_boolean())
              object += b["share"].get<bool>() ? ",share=on" : ",share=off";
            if (!b.value("mem_path", "").empty())
              object += ",mem-path=" + escape_commas(b.value("mem_path", ""));
            if (auto off = b.find("offset");
                off != b.end() && off->is_number_integer() && off->get<i64>() > 0)
              object += fmt::format(",offset={}", off->get<i64>());
            // The rest as QEMU had them (merge=off, align=...): a list is
            // the key repeated, as -object takes host-nodes.
            auto props = b.find("props");
            if (props == b.end() || !props->is_object()) continue;
            for (auto& [k, v] : props->items()) {
              auto one = [&](const nlohmann::json& x) {
                object += "," + k + "=" +
                          (x.is_boolean()  ? (x.get<bool>() ? "on" : "off")
                           : x.is_string() ? escape_commas(x.get<std::string>())
                                           : x.dump());
              };
              if (v.is_array())
                for (auto& x : v) one(x);
              else
                one(v);
            }
          }
      print_text("memory dev:   {}-device {}\n",
                 object.empty() ? "" : "-object " + shell_word(object) + " ",
                 shell_word(d.value("device", "")));
    }
  if (m.contains("guest_running") && !m["guest_running"].is_null())
    print_text("guest was:    {}\n", m["guest_running"].get<bool>() ? "running" : "paused");
  if (!m.value("description", "").empty())
    print_text("description:  {}\n", m["description"].get<std::string>());
  print_text("file size:    {} ({} stored RAM, {} allocated on disk)\n",
             human_bytes(j["file_size"].get<double>()), human_bytes(j["stored_bytes"].get<double>()),
             human_bytes(j["allocated_bytes"].get<double>()));
  if (j["qemu_migration_section"].is_object())
    print_text("device state: with RAM in QEMU's migration section ({} in all, {} stored, at "
               "offset {})\n",
               human_bytes(j["qemu_migration_section"]["length"].get<double>()),
               human_bytes(j["qemu_migration_section"]["stored_bytes"].get<double>()),
               j["qemu_migration_section"]["offset"].get<i64>());
  else
    print_text("device state: {}{}\n", human_bytes(j["vmstate_bytes"].get<double>()),
               j.contains("vmstate_stored_bytes")
                   ? fmt::format(" ({} stored, {})",
                                 human_bytes(j["vmstate_stored_bytes"].get<double>()),
                                 j["compression"]["vmstate_codec"].get<std::string>())
                   : "");
  if (j.contains("compression")) {
    auto& z = j["compression"];
    print_text("compression:  {}, ratio {:.2f} ({} of data pages stored as {}; {} of {} chunks "
               "compressed)\n",
               z["codec"].get<std::string>(), z["ratio"].get<double>(),
               human_bytes(z["uncompressed_bytes"].get<double>()),
               human_bytes(z["stored_bytes"].get<double>()), z["compressed_chunks"].get<i64>(),
               z["total_chunks"].get<i64>());
  }
  print_text("RAM blocks:\n");
  for (auto& b : j["blocks"]) {
    if (b["saved_by"] == "qemu") {
      print_text("  {:<16} {:>10}  saved by QEMU (mapped-ram, in the QEMU migration section)\n",
                 b["id"].get<std::string>(), human_bytes(b["size"].get<double>()));
      continue;
    }
    print_text("  {:<16} {:>10}  page {:>8}  stored {:>10}  {}% zero  saved by vmsave\n",
               b["id"].get<std::string>(), human_bytes(b["size"].get<double>()),
               human_bytes(b["page_size"].get<double>()), human_bytes(b["stored_bytes"].get<double>()),
               percent(b["zero_ratio"].get<double>()));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool stdout_closed = reopen_closed_std_fds();
  // First: a signal that arrives while the arguments are parsed is an
  // interruption too (130), not the default death (128+signal).
  install_signal_handlers();
  CLI::App app{
      "vmsave: save a running QEMU virtual machine into one random-access image and restore it.\n"
      "Shared file-backed guest RAM is written by vmsave itself (fastest; lazy restore), e.g.\n"
      "  -object memory-backend-file,id=ram0,size=4G,share=on,mem-path=/dev/shm/vm-ram0\n"
      "any other RAM (-m alone, memory-backend-ram/memfd) by QEMU's mapped-ram migration.\n"
      "See vmsave(1)."};
  app.require_subcommand(1);
  // The image format too: what an operator keeping images across upgrades
  // needs to know (every build said only "vmsave 0.1.0", trial O).
  app.set_version_flag("--version", fmt::format("vmsave {} (image format v{}.{})", VMSAVE_VERSION,
                                                kFormatMajor, kFormatMinor));
  Common c;
  SaveOptions save;
  RestoreOptions restore;
  std::string image;
  std::string chunk_size = "1M";
  std::string min_hole;  // empty: by the image's filesystem
  std::string compress;
  std::vector<std::string> rams;
  bool leave_running = false, paused = false, running = false, restore_paused = false;

  // save
  CLI::App* save_cmd = app.add_subcommand(
      "save", "Save a VM (--qmp) or plain memory files (--ram) into IMAGE");
  save_cmd->add_option("image", save.image, "Image file to create")
      ->required()
      ->check(kPath)
      ->type_name("FILE");
  auto* qmp_opt =
      save_cmd->add_option("--qmp", save.qmp, "QEMU's QMP socket (QEMU mode)")
          ->check(kPath)
          ->type_name("SOCKET");
  auto* ram_opt = save_cmd->add_option("--ram", rams, "ID=FILE: a memory file to save (raw mode); repeatable")
                      ->allow_extra_args(false);
  qmp_opt->excludes(ram_opt);
  save_cmd->add_flag("-f,--force", save.force, "Replace an existing image");
  auto* lr = save_cmd->add_flag("--leave-running", leave_running,
                                "Resume the guest after saving (default: QEMU quits)");
  auto* pz = save_cmd->add_flag("--paused", paused, "Leave the guest paused after saving");
  lr->excludes(pz);
  save_cmd->add_option("--description", save.description, "Free text stored in the metadata");
  save_cmd->add_option("--chunk-size", chunk_size, "Checksum chunk (power of two, default 1M)");
  save_cmd->add_option("--min-hole", min_hole,
                       "Shortest run of zero pages left as a hole between data pages; shorter "
                       "runs are written as zeros (default 64K, 0 on tmpfs; 0: every zero page a hole)");
  auto* compress_opt = save_cmd->add_option("--compress", compress,
                       "Compress each chunk: lz4 (effort follows the disk), zstd or zstd:LEVEL (1-19, "
                       "default 3); the image then restores eagerly only. Not with --live, nor "
                       "for RAM QEMU saves (not a shared file)");
  auto* save_qmp_timeout =
      save_cmd
          ->add_option("--qmp-timeout", save.qmp_timeout,
                       "Seconds to wait for QMP: to connect and for each reply (default 10 "
                       "to connect, 30 for a reply)")
          ->check(kSeconds);
  auto* live_opt = save_cmd->add_flag("--live", save.live,
                                      "Write RAM while the guest runs; stop it only to catch up "
                                      "and for the device state");
  save_cmd
      ->add_option("--max-downtime", save.max_downtime_ms,
                   "--live, RAM saved by QEMU: QEMU's downtime-limit in ms (at most 2000000)")
      ->check(whole_number(1, 2000000))  // QEMU refuses more (2000 s)
      ->needs(live_opt);
  auto* live_timeout =
      save_cmd
          ->add_option(
              "--live-timeout", save.live_timeout,
              "--live: stop the guest after SECONDS (RAM saved by QEMU: default 60; RAM vmsave "
              "writes: no pass starts after it)")
          ->check(kSeconds)
          ->needs(live_opt);
  auto* flush_timeout = save_cmd->add_option("--flush-timeout", save.flush_timeout,
                       "Fail the save (no image, guest as it was) if flushing and committing "
                       "take longer than SECONDS")
      ->check(kSeconds);
  add_common(save_cmd, c, true);

  // restore
  CLI::App* restore_cmd = app.add_subcommand(
      "restore",
      "Restore IMAGE: start QEMU (-- QEMU-COMMAND...), load into a QEMU started with the "
      "arguments from `prepare` (--qmp), or write memory files (--ram-dir)");
  restore_cmd->add_option("image", restore.image, "Image file")
      ->required()
      ->check(kPath)
      ->type_name("FILE");
  restore_cmd->add_option("qemu", restore.qemu_argv,
                          "After --: the QEMU command line the VM was started with");
  auto* rd = restore_cmd->add_option("--ram-dir", restore.ram_dir,
                                     "Raw mode: write each RAM block to DIR/ID")
                ->check(kPath)
                ->type_name("DIR");
  auto* rq = restore_cmd->add_option("--qmp", restore.qmp,
                                     "Two-step form: QMP socket of a QEMU started with `prepare`'s "
                                     "arguments")
                ->check(kPath)
                ->type_name("SOCKET");
  rd->excludes(rq);
  restore_cmd->add_flag("--lazy", restore.lazy,
                        "Map the image copy-on-write instead of reading RAM up front");
  auto* rr = restore_cmd->add_flag("--running", running, "Resume the guest when loaded");
  auto* rp = restore_cmd->add_flag("--paused", restore_paused, "Leave the guest paused when loaded");
  rr->excludes(rp);
  restore_cmd->add_flag("-f,--force", restore.force, "Overwrite existing RAM files");
  auto* qemu_log = restore_cmd->add_option("--qemu-log", restore.qemu_log,
                          "File for the started QEMU's output (default: beside its QMP socket)")
      ->check(kPath)
      ->type_name("FILE");
  auto* restore_qmp_timeout =
      restore_cmd
          ->add_option(
              "--qmp-timeout", restore.qmp_timeout,
              "Seconds to wait for QMP: to connect, for each reply and for a started QEMU's socket "
              "(default 10 to connect, 30 for the rest)")
          ->check(kSeconds);
  add_common(restore_cmd, c, true);

  // prepare
  CLI::App* prepare_cmd = app.add_subcommand(
      "prepare", "For wrappers that start QEMU: fill RAM files (--ram-dir) or plan a lazy "
                 "restore, and print the QEMU arguments to add");
  prepare_cmd->add_option("image", restore.image, "Image file")
      ->required()
      ->check(kPath)
      ->type_name("FILE");
  auto* pd = prepare_cmd->add_option("--ram-dir", restore.ram_dir, "Write RAM files to DIR/ID")
                 ->check(kPath)
                 ->type_name("DIR");
  auto* pl = prepare_cmd->add_flag("--lazy", restore.lazy, "Map the image copy-on-write");
  pd->excludes(pl);
  prepare_cmd->add_flag("-f,--force", restore.force, "Overwrite existing RAM files");
  add_common(prepare_cmd, c, true);

  // info, verify
  CLI::App* info_cmd = app.add_subcommand("info", "Describe an image");
  info_cmd->add_option("image", image, "Image file")->required()->check(kPath)->type_name("FILE");
  info_cmd->add_flag("--json", c.json, "Print JSON");
  CLI::App* verify_cmd =
      app.add_subcommand("verify", "Check every checksum of an image (exit 3 if damaged)");
  verify_cmd->add_option("image", image, "Image file")->required()->check(kPath)->type_name("FILE");
  add_common(verify_cmd, c, true);

  // --json asked for (before any --): usage errors are JSON on stdout too.
  bool want_json = false;
  std::string cmd_name = argc > 1 && argv[1][0] != '-' ? argv[1] : "";
  for (int i = 1; i < argc && std::string_view(argv[i]) != "--"; i++)
    want_json |= std::string_view(argv[i]) == "--json";
  auto usage = [&](const std::string& msg) {
    if (want_json) print_failure_json(cmd_name, msg, Exit::kUsage);
    say(stderr, "vmsave: error: {}\n", msg);
    return static_cast<int>(Exit::kUsage);
  };
  // `restore IMAGE qemu-system-x86_64 ...` without the `--`: CLI11 would
  // take the QEMU options for its own and list them, mangled. (A QEMU
  // binary's name has no dot; an image or log named after one does.)
  if (argc > 1 && std::string_view(argv[1]) == "restore")
    for (int i = 2; i < argc && std::string_view(argv[i]) != "--"; i++) {
      std::string_view base = argv[i];
      base = base.substr(base.rfind('/') == std::string_view::npos ? 0 : base.rfind('/') + 1);
      bool qemu = base.starts_with("qemu-system-") || base == "qemu-kvm";
      if (qemu && base.find('.') == std::string_view::npos && i + 1 < argc &&
          argv[i + 1][0] == '-') {
        return usage(fmt::format(
            "put -- before the QEMU command: vmsave restore IMAGE [OPTIONS] -- {} ...", argv[i]));
      }
    }
  std::vector<std::string> names;
  for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; }))
    names.push_back(sub->get_name());
  // `vmsave --json info IMAGE`: CLI11 said only "The following argument was
  // not expected: --json", and the JSON object named no command (trial W).
  if (cmd_name.empty() && argc > 2 && std::string_view(argv[1]) != "--help" &&
      std::string_view(argv[1]) != "-h" && std::string_view(argv[1]) != "--version") {
    for (int i = 2; i < argc && std::string_view(argv[i]) != "--"; i++)
      if (std::ranges::find(names, argv[i]) != names.end()) {
        cmd_name = argv[i];
        return usage(
            fmt::format("options go after the command: vmsave {} {} ...", cmd_name, argv[1]));
      }
  }
  const bool known = std::ranges::find(names, cmd_name) != names.end();
  if (argc == 1 || (!cmd_name.empty() && !known)) {
    std::string last = names.back();
    names.pop_back();
    return usage(fmt::format(
        "{}: vmsave has {} and {} (vmsave --help)",
        argc == 1 ? std::string("no command") : fmt::format("unknown command '{}'", cmd_name),
        fmt::join(names, ", "), last));
  }
  // `--qmp --force IMAGE`: CLI11 takes an option for the value before it
  // (a QMP socket named "--force"), and what fails later says nothing of that.
  if (known) {
    const CLI::App* sub = app.get_subcommand(cmd_name);
    auto option = [&](std::string_view arg) -> const CLI::Option* {
      if (!arg.starts_with('-')) return nullptr;
      return sub->get_option_no_throw(std::string(arg.substr(0, arg.find('='))));
    };
    for (int i = 2; i + 1 < argc && std::string_view(argv[i]) != "--"; i++) {
      const CLI::Option* o = option(argv[i]);
      if (!o || o->get_expected_min() == 0 ||
          std::string_view(argv[i]).find('=') != std::string_view::npos)
        continue;
      if (option(argv[i + 1]))
        return usage(
            fmt::format("{} needs a value, but the next argument is the option {} "
                        "(a value that starts with '-' is written {}=VALUE)",
                        argv[i], argv[i + 1], argv[i]));
      i++;  // its value
    }
  }
  // CLI11's own errors in vmsave's one-line form, with where to look.
  app.failure_message([&](const CLI::App*, const CLI::Error& e) {
    return fmt::format("vmsave: error: {}; see vmsave {}--help\n", e.what(),
                       known ? cmd_name + " " : "");
  });
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() != 0 && want_json)
      print_failure_json(cmd_name, e.what(), Exit::kUsage);
    int rc = app.exit(e);
    return rc == 0 ? 0 : static_cast<int>(Exit::kUsage);
  }

  if (c.progress_fd >= 0) {
    // Not open, it would be whatever vmsave opens next under that number
    // (a RAM file, the QMP socket) that the progress lines went into.
    int fl = fcntl(c.progress_fd, F_GETFL);
    if (fl < 0)
      return usage(fmt::format("--progress-fd {0}: descriptor {0} is not open (open it for "
                               "writing first, e.g. {0}>FILE in the shell)",
                               c.progress_fd));
    if ((fl & O_ACCMODE) == O_RDONLY)
      return usage(fmt::format("--progress-fd {0}: descriptor {0} is open for reading only",
                               c.progress_fd));
    // Nor stdout under another number (5>&1): the report would come after
    // progress lines in one stream. A terminal or /dev/null may be both.
    struct stat pst, ost;
    if (c.json && (c.progress_fd == STDOUT_FILENO ||
                   (fstat(c.progress_fd, &pst) == 0 && fstat(STDOUT_FILENO, &ost) == 0 &&
                    !S_ISCHR(pst.st_mode) && pst.st_dev == ost.st_dev && pst.st_ino == ost.st_ino)))
      return usage(
          fmt::format("--progress-fd {} is stdout, where --json prints the report: give another fd",
                      c.progress_fd));
  }
  EngineConfig engine{c.jobs, c.queue_depth};
  save.engine = restore.engine = engine;
  save.live_timeout_given = live_timeout->count() > 0;
  {
    auto cs = option_size(chunk_size);
    if (!cs.ok() || *cs < 4096 || *cs > kMaxChunkSize || !is_pow2(*cs))
      return usage(size_usage("--chunk-size", cs,
                              "must be a power of two from 4K to 1G (e.g. 64K, 1M, 2M)"));
    save.chunk_size = *cs;
  }
  if (!min_hole.empty()) {
    auto mh = option_size(min_hole);
    if (!mh.ok() || *mh > kMaxChunkSize || *mh % 4096)
      return usage(
          size_usage("--min-hole", mh, "takes a multiple of 4K from 0 to 1G (e.g. 0, 64K, 2M)"));
    save.min_hole = *mh;
  }
  if (compress_opt->count() > 0) {
    auto spec = parse_codec_spec(compress);
    if (!spec.ok()) return usage(spec.error().message());
    if (save.chunk_size > kMaxCompressedChunkSize)
      return usage("--compress needs a --chunk-size of at most 4M");
    if (save.chunk_size < 2 * kDirectAlign)  // must save a 4 KiB block to be kept
      return usage("--compress needs a --chunk-size of at least 8K");
    save.compress = *spec;
  }
  for (auto& r : rams) {
    size_t eq = r.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == r.size())
      return usage(fmt::format("--ram takes ID=FILE, not \"{}\"", r));
    save.rams.emplace_back(r.substr(0, eq), r.substr(eq + 1));
  }
  // "DIR/" named its files "DIR//ID" in every message and report.
  while (restore.ram_dir.size() > 1 && restore.ram_dir.back() == '/') restore.ram_dir.pop_back();
  save.after = leave_running ? AfterSave::kLeaveRunning
                             : paused ? AfterSave::kPaused : AfterSave::kQuit;
  if (running) restore.running = true;
  if (restore_paused) restore.running = false;

  TerminalReporter rep(c.quiet || c.json, c.progress_fd);
  engine.warn = [&rep](const std::string& m) { rep.warn(m); };  // io_uring refused
  save.engine.warn = restore.engine.warn = engine.warn;
  std::string cmd;
  Result<nlohmann::json> result = Error{"no command"};
  // See unexpected_json().
  try {
    if (cancelled()) {  // before the command began
      cmd = cmd_name;
      result = interrupted_error();
    } else if (*save_cmd) {
      cmd = "save";
      if (save.qmp.empty() && save.rams.empty())
        return usage("save needs --qmp SOCKET (a running QEMU) or --ram ID=FILE (memory files)");
      if (!save.rams.empty() && (leave_running || paused))
        return usage("--leave-running and --paused apply to QEMU mode (--qmp)");
      if (!save.rams.empty() && save.live)
        return usage("--live applies to QEMU mode (--qmp)");
      if (!save.rams.empty() && (save_qmp_timeout->count() || flush_timeout->count()))
        return usage("--qmp-timeout and --flush-timeout apply to QEMU mode (--qmp)");
      if (save.live && save.compress.enabled())
        return usage("--live rewrites RAM in place as the guest changes it, which compressed "
                     "chunks cannot take: save with --live or with --compress, not both");
      result = save.rams.empty() ? save_qemu(save, rep) : save_raw(save, rep);
    } else if (*restore_cmd) {
      cmd = "restore";
      int forms = !restore.ram_dir.empty() + !restore.qmp.empty() + !restore.qemu_argv.empty();
      if (forms != 1)
        return usage(
            "restore needs exactly one of: -- QEMU-COMMAND..., --qmp SOCKET, --ram-dir DIR");
      if (!restore.ram_dir.empty() && (restore.lazy || restore.running))
        return usage("--lazy, --running and --paused do not apply to --ram-dir");
      if (!restore.ram_dir.empty() && (restore_qmp_timeout->count() || qemu_log->count()))
        return usage("--qmp-timeout and --qemu-log do not apply to --ram-dir");
      if (!restore.qmp.empty() && qemu_log->count())
        return usage("--qemu-log applies to a restore that starts QEMU (-- QEMU-COMMAND)");
      if (!restore.qmp.empty() && restore.lazy)
        return usage("--lazy belongs to `prepare` in the two-step form");
      if (!restore.qmp.empty() && restore.force)
        return usage(
            "--force belongs to `prepare` in the two-step form (restore --qmp makes no "
            "files)");
      if (!restore.ram_dir.empty())
        result = restore_raw(restore, rep);
      else if (!restore.qmp.empty())
        result = restore_into_running(restore, rep);
      else
        result = restore_qemu(restore, rep);
    } else if (*prepare_cmd) {
      cmd = "prepare";
      if (restore.ram_dir.empty() && !restore.lazy)
        return usage("prepare needs --lazy or --ram-dir DIR");
      // Its plain output is one argument per line, and these paths (made
      // absolute) go into the arguments.
      std::error_code ec;
      std::string cwd = std::filesystem::current_path(ec).string();
      if (!c.json && (restore.image + restore.ram_dir + cwd).find('\n') != std::string::npos)
        return usage("a path holds a newline, which prepare's one argument per line cannot "
                     "carry: use --json");
      result = prepare(restore, rep);
    } else if (*info_cmd) {
      cmd = "info";
      result = info(image);
    } else if (*verify_cmd) {
      cmd = "verify";
      result = verify(image, engine, rep);
    }
  } catch (const nlohmann::json::exception& e) {
    result = unexpected_json(e);
  } catch (const std::bad_alloc&) {
    // Unwound: what the command made is removed, a guest it paused resumed.
    result = Error{"out of memory", "", "vmsave could not allocate what this needs"}.fix(
        "free memory or raise the limit (ulimit -v, a memory cgroup) and try again");
  } catch (const std::system_error& e) {
    // A thread that could not start (the workers do with fewer): unwound too.
    result = Error{"cannot start a thread", "", e.code().message()}.fix(
        "raise the process limit (ulimit -u, a pids cgroup's pids.max) and try again");
  }

  if (!result.ok()) {
    if (c.json)
      print_failure_json(cmd, result.error().message(), result.error().status,
                         cmd == "info" || cmd == "verify" ? image : "", rep.warnings());
    return fail(result.error(), cmd);
  }
  nlohmann::json& j = *result;
  try {
    if (c.json) {
      j["ok"] = true;  // as on failure, where it is false
      j["warnings"] = rep.warnings();
      say(stdout, "{}\n", j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace));
    } else if (cmd == "info") {
      print_info(j);
    } else if (cmd == "prepare") {
      // The arguments to add, one per line, for wrappers and humans alike;
      // the summary only once they are out (below).
      for (auto& a : j["qemu_args"]) say(stdout, "{}\n", a.get<std::string>());
    } else if (!c.quiet) {
      print_summary(cmd, j, c);
    }
  } catch (const nlohmann::json::exception& e) {
    if (cmd == "info") return fail(unexpected_json(e));  // showing the image is the command
    // The work is done (an image committed, a VM running): a report that
    // cannot be printed must not turn that into a failure.
    std::fflush(stdout);
    say(stderr, "vmsave: warning: {} succeeded, but its summary could not be printed: {}\n",
               cmd, e.what());
  }
  // The same for a report stdout did not take (a full disk, a closed pipe),
  // but for info and prepare, whose output is what the user asked for.
  bool to_stdout = c.json || cmd == "info" || cmd == "prepare";
  int err = std::fflush(stdout) != 0 || std::ferror(stdout) ? errno : 0;
  if (to_stdout && (stdout_closed || err)) {
    std::string why = stdout_closed ? "it is closed" : std::strerror(err ? err : EIO);
    if (cmd == "prepare" && j.contains("ram_files")) {
      // Filled for arguments nobody got: gone, as on any other failure, so
      // that a retry finds nothing in its way.
      for (auto& f : j["ram_files"]) ::unlink(f.get<std::string>().c_str());
      why += "; the RAM files it filled are removed";
    }
    if (cmd == "info" || cmd == "prepare")
      return fail(Error{"cannot write to standard output", "", why});
    say(stderr, "vmsave: warning: {} succeeded, but its report could not be written to standard "
                "output: {}\n", cmd, why);
  }
  // prepare's summary said the RAM was restored before its arguments failed
  // to reach stdout, and the files were removed (trial K).
  if (cmd == "prepare" && !c.json && !c.quiet) print_summary(cmd, j, c);
  return 0;
}
