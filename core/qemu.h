// What vmsave needs from a live QEMU, on top of the QMP client: finding the
// guest RAM files behind its memory backends, the migration capabilities
// it changes (and puts back), streaming device state out of and into QEMU
// through a pipe, and starting QEMU for a restore.

#pragma once

#include <signal.h>

#include <sys/types.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/qmp.h"
#include "io/fd.h"
#include "lib/common.h"

namespace vmsave {

// A memory backend object in a running QEMU.
struct RamBackend {
  std::string id;        // object id (== RAM block name in the image)
  std::string qom_type;  // memory-backend-file, -ram, -memfd, ...
  i64 size = 0;
  bool share = false;
  std::string mem_path;  // memory-backend-file only, as QEMU has it
  i64 offset = 0;        // file offset QEMU maps from
  // Its other properties where they differ from QEMU's defaults (merge=off,
  // align=2M, ...): what re-creating a hot-plugged backend needs.
  nlohmann::json props = nlohmann::json::object();
  // Resolved for saving: the file QEMU maps (opened read-only), and
  // mem-path as vmsave reaches it (a relative one is QEMU's, not vmsave's).
  UniqueFd fd;
  std::string path;
  std::string file;      // what we opened: mem-path or /proc/PID/map_files/...
  i64 page_size = 4096;
};

// Lists the memory-backend-* objects under /objects with their properties.
Result<std::vector<RamBackend>> list_ram_backends(QmpClient& qmp);

// Memory devices (pc-dimm, virtio-mem, ...) with their backend and guest
// address, as [{"type", "id", "memdev", "addr"}]; nullopt if QEMU cannot
// say.
std::optional<nlohmann::json> memory_devices(QmpClient& qmp);

// Opens the file behind each backend, checking it is what QEMU `pid` maps:
// mem-path itself when its inode is mapped, otherwise the mapping found in
// /proc/PID/maps (a directory mem-path makes QEMU create and unlink a
// file; it is reached through /proc/PID/map_files). A relative mem-path
// is looked up from QEMU's directory.
Status open_backend_files(std::vector<RamBackend>& backends, pid_t pid);

// The explanation for RAM vmsave cannot read when QEMU lacks mapped-ram,
// with the QEMU option that would make it saveable.
Error unsaveable_ram_error(const RamBackend& b);

// Migration capabilities: set some, remember the old values, put them back.
class Capabilities {
 public:
  // Sets `want` (name -> bool); a name QEMU does not know is an error when
  // `required` contains it, ignored otherwise.
  Status set(QmpClient& qmp, const std::vector<std::pair<std::string, bool>>& want,
             const std::vector<std::string>& required);
  // Puts back the values that were changed. Best effort (this runs on error
  // paths): false when QEMU did not take the command.
  bool restore(QmpClient& qmp);

 private:
  std::vector<std::pair<std::string, bool>> old_;
};

// After migrate_cancel: polls until the migration has ended (QEMU refuses
// to change capabilities while it is "cancelling", as multifd threads stop),
// for at most timeout_s. Not cut short by a signal: it is the clean-up
// after one. False if QEMU does not answer or the migration goes on.
bool wait_migration_ended(QmpClient& qmp, double timeout_s);

// Polls query-migrate until the migration is no longer in progress; returns
// an Error naming QEMU's error-desc unless it completed. A signal stops the
// wait, or with `finish` only a second one (see cancelled_twice()).
Status wait_migration(QmpClient& qmp, double timeout_s, const char* what, bool finish = false);

// QEMU's mapped-ram migration to or from a section of the image file
// (QEMU >= 9.0): guest RAM at fixed offsets written by multifd threads,
// then the device state. QEMU opens "/dev/fdset/N" with exactly the access
// mode it needs (O_WRONLY to save, O_RDONLY to load), so the image is
// handed over as two descriptors of that mode: one with O_DIRECT, used by
// the multifd threads when direct-io is on, and one without, for the
// unaligned stream parts. `direct` may be empty (no O_DIRECT there).
struct MappedRamFds {
  UniqueFd direct;
  UniqueFd buffered;
};

// The capabilities both sides set. x-ignore-shared stays off: QEMU 10.0
// fails a mapped-ram save when it skips a shared block (it writes the
// skipped block's never-allocated bitmap, EFAULT), so with mapped-ram QEMU
// saves every RAM block itself.
std::vector<std::pair<std::string, bool>> mapped_ram_capabilities();

// Runs `migrate` (or `migrate-incoming` when `incoming`) to/from
// file:/dev/fdset/N,offset=`offset` and waits for it to complete, calling
// `on_status` with each query-migrate reply (for progress). Sets direct-io
// while it runs when `fds.direct` is open, and always removes the fd set.
//
// A signal during a save lets QEMU finish it (then the result is
// interrupted_error()) when `on_interrupt` says so, and cancels it on a
// second signal: QEMU 10.0 cancelling a mapped-ram save crashed about one
// time in ten (SIGSEGV in ramblock_set_file_bmap_atomic: its clean-up frees
// the file bitmap while multifd threads still write), and the guest with it.
Status mapped_ram_migrate(QmpClient& qmp, bool incoming, const MappedRamFds& fds, i64 offset,
                          const std::function<void(const nlohmann::json&)>& on_status,
                          const std::function<bool()>& on_interrupt = nullptr);

// Outgoing device state: `migrate` to a pipe whose read end is drained into
// `sink` as bytes arrive, until QEMU closes it and reports completion.
Status save_device_state(QmpClient& qmp, const std::function<Status(const u8*, size_t)>& sink,
                         const std::function<void(i64)>& on_bytes);

// Incoming device state: `migrate-incoming` from a pipe that `source` fills
// (it gets a writer callback), then waits for completion. `started` runs
// once QEMU has taken the migration; from then on a first signal lets the
// load finish (QEMU takes no second one) and only a second stops it.
Status load_device_state(
    QmpClient& qmp, const std::function<void()>& started,
    const std::function<Status(const std::function<Status(const u8*, size_t)>&)>& source);

// QEMU's command line, from /proc/PID/cmdline.
std::vector<std::string> process_cmdline(pid_t pid);

// The command line of QEMU `pid` as its user gave it, when a vmsave restore
// started it: without the -incoming defer every restore adds, the -qmp of
// the private directory a restore without one made (gone once QEMU is), and
// with a directory mem-path where the restore put the RAM file it made (and
// unlinked) in it. So the command `vmsave info` shows restores the VM again.
std::vector<std::string> as_started_by_user(std::vector<std::string> argv, pid_t pid);

// A QEMU started for a restore: in its own session, stdin from /dev/null,
// output to `log`, so it outlives vmsave and holds no pipe of its caller.
struct StartedQemu {
  pid_t pid = -1;
  std::string log;
  std::string mark;  // new_qemu_mark(), in its environment
};

// "VMSAVE_QEMU=" and 32 random hex digits, put in the environment of a
// QEMU a restore starts. It marks that QEMU and the daemon it forks
// (-daemonize), whose pid nobody learns until it answers on its QMP socket:
// the restore knows its QEMU on the socket by it, and a restore killed
// before then (or its watchdog) finds its QEMU by it.
std::string new_qemu_mark();
// Whether `pid`'s environment holds `mark`.
bool has_mark(pid_t pid, const std::string& mark);
// Kills the process behind `pidfd` (SIGKILL) and waits up to 5 s for it
// to go; false if the signal could not be sent.
bool kill_and_wait(int pidfd);
// Kills every process whose environment holds `mark` (SIGKILL, through a
// pidfd, waiting up to 5 s for each to go); returns how many.
int kill_marked(const std::string& mark);
// Removes what a QEMU vmsave started, and killed, left at `path`: a socket
// nobody listens on, an empty file (a log it never wrote to), or a pidfile
// naming a process that is gone. Anything else stays. True if it removed.
bool remove_left_behind(const std::string& path);
// `forked` is told the pid as soon as it exists, before exec (a restore's
// watchdog must know it before anything else can go wrong). A log the user
// did not name (`log_named` false: the one beside QEMU's socket, in a
// directory others may write) must be a regular file, not a link: vmsave,
// often root, must not be steered into truncating another file.
Result<StartedQemu> start_qemu(const std::vector<std::string>& argv, const std::string& log,
                               bool log_named, const std::string& mark,
                               const std::function<void(pid_t)>& forked = nullptr);

// Connects to `path` as soon as QEMU listens there; fails early with the
// tail of the log if the process exits first.
Result<QmpClient> connect_started(const StartedQemu& q, const std::string& path, double timeout_s,
                                  bool daemonize);

std::string log_tail(const std::string& path, int lines);

// "QEMU was killed by signal N (NAME) WHEN", with its log and a fix: the
// command line is not to blame when something else killed QEMU.
Error killed_error(int sig, const std::string& when, const std::string& log);

// How child `pid` ended, if it has: looked at, not reaped (waitid
// WNOWAIT), so a clean-up that reaps it later never signals a pid that may
// be another process's by then. Else nullopt, errno ECHILD if `pid` is
// not a child of ours (or reaped already).
std::optional<siginfo_t> peek_exit(pid_t pid);

// Why the QEMU a restore started has exited, `when` ("before it was
// ready"): the signal that killed it, or its log's last lines. Leaves it
// unreaped.
Error started_qemu_gone(const StartedQemu& q, const std::string& when);

}  // namespace vmsave
