// Pieces shared by the save and restore recipes in core/: opening RAM files,
// filling them from an image, and the common parts of reports and metadata.

#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/image_io.h"
#include "core/reporter.h"
#include "core/vmsave.h"
#include "core/watchdog.h"
#include "io/fd.h"
#include "lib/common.h"

namespace vmsave {

class QemuCommand;
class QmpClient;

// `name` (a disk file as QEMU or its command spells it) as an absolute,
// normalized path, a relative one taken from `cwd`; "" for what is no local
// file (json:, a protocol, an fd set) or a relative one without `cwd`.
std::string absolute_disk_path(const std::string& name, const std::string& cwd);
// Has QEMU take its disks' locks now (blockdev-set-active): an incoming or
// migrated-away VM takes them only at cont. False where QEMU (before 10.0)
// has no such command.
Result<bool> take_disk_locks(QmpClient& qmp);

// The guest's disks as QEMU has them now (query-block), for the image's
// metadata: device, file, format, read_only, backing_file, temporary (a
// -snapshot overlay), and "path" and "backing_chain" made absolute against
// `cwd` (QEMU's directory; "" leaves relative ones out).
nlohmann::json disks_now(QmpClient& qmp, const std::vector<std::string>& cmdline,
                         const std::string& cwd);
// Warns where a restored QEMU's disks (`now`) are an older layer of, or
// another format of, the files the VM wrote at the save (`saved`).
void warn_of_changed_disks(const nlohmann::json& saved, const nlohmann::json& now, Reporter& rep);

// A disk image file a QEMU command opens, and whether QEMU writes it.
struct DiskFile {
  std::string path;
  bool write;
  bool locked = true;  // false: locking=off, QEMU neither takes nor checks locks
};
// The local disk image files of `cmd` whose locks QEMU checks as it opens
// them (see check_disks_free).
std::vector<DiskFile> locked_disk_files(const QemuCommand& cmd);
// Refuses a command one of whose disk images another process holds the way
// QEMU would refuse it, but before QEMU starts (QEMU refuses an incoming
// guest's disks only at cont); warns of one that locking=off lets this VM
// write beside another. `qemu`: the QEMU running `cmd`, waiting for its
// migration (the two-step form), whose open files say where its relative
// paths led (a daemon has left its directory); it holds no locks yet.
Status check_disks_free(const QemuCommand& cmd, Reporter& rep, pid_t qemu = 0);

// Page size of the filesystem holding `fd`: the huge page size on
// hugetlbfs, the system page size elsewhere.
i64 file_page_size(int fd);

// Warns a restore that bytes follow the image's end (verify calls the
// image damaged; restores ignore them) rather than take it without a word.
void warn_bytes_past_end(const ImageReader& img, Reporter& rep);

// Whether `pid` runs: it exists and is neither a zombie nor dead.
bool process_alive(pid_t pid);

// While vmsave writes or fills RAM itself it does not hear from QEMU: if
// QEMU exits meanwhile (killed, crashed), this stops that work at once
// (cancel_with the error `gone` returns) rather than run it to its end for
// a VM that is no more.
class ExitWatch {
 public:
  ExitWatch(pid_t pid, std::function<Error()> gone);
  ~ExitWatch();
  ExitWatch(const ExitWatch&) = delete;
  ExitWatch& operator=(const ExitWatch&) = delete;

 private:
  UniqueFd pidfd_, stop_r_, stop_w_;
  std::thread thread_;
};

// A file mapping of a process, as /proc/PID/maps shows it.
struct FileMapping {
  u64 start = 0, end = 0;
  i64 offset = 0;
  dev_t dev = 0;
  ino_t inode = 0;
};
std::vector<FileMapping> file_mappings(pid_t pid);

// The machine type `type` names in QEMU binary `qemu` (`-machine help`
// says "alias of pc-i440fx-10.0" for "pc"); `type` itself if it names no
// alias or QEMU cannot tell.
std::string resolve_machine(const std::string& qemu, const std::string& type);

// A restore whose QEMU command has no QMP socket gives it one in a private
// run directory (vmsave-XXXXXX, with QEMU's log), which must outlive vmsave
// as long as QEMU runs. Its qemu.pid names that QEMU; once it is gone, the
// directory is stale: a save that quits that QEMU removes it, and the next
// restore removes any stale one of this user in `parent`.
void note_run_dir_owner(const std::string& run_dir, pid_t qemu);
// The log a restore made beside the command's own socket (SOCKET.qemu.log)
// was left, empty, beside every socket whose QEMU a save made quit (trials
// V and W). Taken while QEMU runs: the log if empty and ours; removed once
// QEMU is gone if it is the same file, still empty and untouched.
std::optional<struct stat> empty_log_beside(const std::string& qmp_socket);
void remove_empty_log(const std::string& qmp_socket, const struct stat& before);
void remove_run_dir_of(const std::string& qmp_socket, pid_t qemu);
void remove_stale_run_dirs(const std::string& parent);

// A process other than vmsave that maps the file `st` describes (a VM
// running on it, a lazy clone of it), found in /proc/*/maps: pid 0 if none
// (or none vmsave may see). Truncating such a file kills that process.
struct Mapper {
  pid_t pid = 0;
  std::string name;  // its comm
};
// `shared_only`: only a shared mapping counts (a VM's RAM, not a lazy
// clone's private mapping of its image).
Mapper find_mapper(const struct stat& st, bool shared_only = false);

// A process other than vmsave that has one of `files` open for writing (a
// VM writing its serial log there): pid 0 if none; `which` says which file.
Mapper find_writer(const std::vector<struct stat>& files, size_t* which);

// --force replaces files, never one a process maps: an error naming it.
Status check_not_mapped(const std::string& path, const struct stat& st);

// Nor a vmsave image: the one being restored (the same name, a hard link)
// or any other (a lazy clone's base given as a mem-path), whatever its
// name. `ids`: the blocks that would go into `path`, for the message.
Status check_not_an_image(const std::string& path, const struct stat& st, const ImageReader& img,
                          const std::string& ids);
// The same of a file open at `fd`, about to be emptied: refused if it
// begins with the image magic or cannot be read to tell. `ids` may be "".
Status not_an_image(int fd, const std::string& path, const std::string& ids);

// A RAM file a restore creates and fills: created (mode 0600, never through
// a symlink; an existing file only with `force`) and sized to its block,
// then filled from the image, leaving holes where the image has them. It is
// removed again unless keep() is called, and `watchdog` removes it if vmsave
// dies. Creating before filling lets QEMU start while the files fill.
// `claims` holds, per filesystem, the bytes the files created before this
// one (and not filled yet) will take there: the room check counts them too.
using SpaceClaims = std::map<dev_t, i64>;
// The key under which SpaceClaims sums what goes into tmpfs on any device:
// those pages are charged to vmsave's memory cgroup.
constexpr dev_t kChargedToCgroup = ~dev_t(0);

class RamFile {
 public:
  // A block and where it goes in the file (its backend's offset=).
  struct Part {
    size_t block = 0;
    i64 offset = 0;
  };
  // The file holds `parts` (several backends may map one file at different
  // offsets): it is as long as the furthest one ends, holes elsewhere. With
  // --force an existing file is replaced; one holding a part at an offset is
  // kept, with only the parts' ranges emptied, since what lies outside them
  // is not this VM's RAM.
  static Result<RamFile> create(const ImageReader& img, const std::vector<Part>& parts,
                                const std::string& path, bool force, Watchdog* watchdog,
                                SpaceClaims& claims);
  RamFile() = default;
  RamFile(RamFile&&) noexcept = default;
  RamFile& operator=(RamFile&&) noexcept = default;
  ~RamFile();

  Status fill(const ImageReader& img, const EngineConfig& cfg, Progress* progress,
              RamStats* stats);
  void keep() { keep_ = true; }

  // Set when the file's filesystem (tmpfs with size=) holds its data pages
  // but not all of its blocks: the guest may fill more of its memory later
  // and then die of SIGBUS. For a warning; the restore goes on.
  std::string short_room;

 private:
  Status fill_part(const ImageReader& img, const Part& part, const EngineConfig& cfg,
                   Progress* progress, RamStats* stats);

  std::string path_;
  std::vector<Part> parts_;
  UniqueFd fd_;
  bool keep_ = false;
};

// Fills DIR/ID for every block of the image (raw restore and `prepare`):
// checks the directory and the ids, refuses existing files without --force
// before writing anything, and removes what it wrote if a block fails or
// vmsave dies (its watchdog names `command`). Returns the files' absolute
// paths: none when QEMU loads every block itself.
Result<std::vector<std::string>> fill_ram_dir(const ImageReader& img, const RestoreOptions& opts,
                                              const char* command, Reporter& rep, RamStats* ram);

// Refuses a lazy restore of an image whose RAM (some of it) is in QEMU's
// migration section: QEMU reads that section itself, there is nothing to map.
Status refuse_lazy_qemu_section(const ImageReader& img);

// The metadata fields every image carries.
nlohmann::json base_metadata(const std::string& mode, const std::string& description);

// Report fields for a RAM pass.
void add_ram_report(nlohmann::json& j, const RamStats& s, const std::string& prefix);

// vmstate_bytes: the device state's size as QEMU sent it (as the save
// reported it); vmstate_stored_bytes: what it takes in the image, when
// compressed.
void add_vmstate_report(nlohmann::json& j, const ImageLayout& img, const nlohmann::json& meta);

// Is a RAM file's directory on a filesystem vmsave's restore can write
// with O_DIRECT? Used only for warnings.
std::string hostname();

}  // namespace vmsave
