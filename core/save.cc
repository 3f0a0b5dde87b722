// `vmsave save --qmp`: the whole save of a running QEMU, as a recipe.
//
//   connect → find RAM → create image → stop guest → write RAM →
//   device state → commit → quit QEMU / resume / leave paused
//
// When all guest RAM is shared files, vmsave writes it itself, from the
// files QEMU maps, with its own parallel O_DIRECT engine; QEMU contributes
// only the device state, with x-ignore-shared so it skips that RAM.
//
// Any other RAM (anonymous -m, memory-backend-ram, -memfd, a file with
// share=off) is saved by QEMU's own mapped-ram migration into a section of
// the image: QEMU's multifd threads write the pages at fixed offsets,
// O_DIRECT, then the device state, into the same nameless file; vmsave
// hashes what QEMU wrote and commits as always. QEMU 10.0 cannot combine
// mapped-ram with x-ignore-shared, so then QEMU saves every block.
//
// If any step fails, the guest is put back as it was (resumed if it ran),
// the capabilities vmsave changed are restored, and no image appears at the
// target; if vmsave itself dies, its watchdog process does the same.

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>

#include <algorithm>
#include <condition_variable>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include <fmt/core.h>

#include "core/internal.h"
#include "core/qemu.h"
#include "core/qemu_args.h"
#include "core/vmsave.h"
#include "core/watchdog.h"
#include "lib/cancel.h"

namespace vmsave {

namespace {

// Puts the guest back the way it was when a save fails part-way.
struct GuestGuard {
  QmpClient* qmp = nullptr;
  Capabilities* caps = nullptr;
  Watchdog* watchdog = nullptr;
  Reporter* rep = nullptr;
  bool was_running = false;
  bool stopped = false;
  bool armed = true;
  ~GuestGuard() {
    if (!armed || !qmp) return;
    // The first command QEMU does not take ends the attempt: a QEMU that
    // does not answer (stuck, or stopped with SIGSTOP) would only make each
    // of the others wait out its timeout too.
    bool ok = qmp->execute("migrate_cancel", nullptr, 5).ok() && wait_migration_ended(*qmp, 10) &&
              caps->restore(*qmp) &&
              (!(stopped && was_running) || qmp->execute("cont", nullptr, 5).ok());
    // A QEMU that has exited has no guest to put back, nor a watchdog
    // anything to wait for.
    if (ok || !watchdog || process_exited(qmp->peer_pid(), 1000)) return;
    pid_t pid = watchdog->hand_over();
    if (pid > 0)
      rep->warn(fmt::format(
          "QEMU did not take vmsave's clean-up: the guest may still be paused and QEMU's "
          "migration settings changed; vmsave's watchdog (pid {}) puts them back as soon as "
          "QEMU answers again (for up to {:g} minutes); or kill it and run `cont` yourself",
          pid, Watchdog::kPatience / 60));
  }
};

// Running passes of a live save: at most this many, and no more once one
// rewrites less than kLiveGoodEnough, or more than kLiveShrink of the one
// before: a guest dirtying as fast as the disk takes it made passes of
// 3076, 3074.5 and 3074.5 MiB (trial U), each 15 s of writing for nothing.
constexpr int kMaxLivePasses = 4;
constexpr i64 kLiveGoodEnough = 16 * kMiB;
constexpr double kLiveShrink = 0.9;

// Commits `w` on a helper thread and waits at most `timeout_s` (0: no
// limit) for it: a flush can stall for minutes on NFS or a busy disk. On
// expiry the commit is told not to link the file, the writer is left to the
// helper (which may still be blocked in the kernel), and no image appears.
Status commit_within(std::unique_ptr<ImageWriter>& w, const nlohmann::json& meta,
                     double timeout_s) {
  if (timeout_s <= 0) return w->commit(meta);
  struct Shared {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    Status result;
  };
  auto shared = std::make_shared<Shared>();
  ImageWriter* writer = w.get();
  std::thread t([shared, writer, meta] {
    Status st = writer->commit(meta);
    std::lock_guard lock(shared->mu);
    shared->result = std::move(st);
    shared->done = true;
    shared->cv.notify_all();
  });
  std::unique_lock lock(shared->mu);
  if (shared->cv.wait_for(lock, std::chrono::duration<double>(timeout_s),
                          [&] { return shared->done; })) {
    lock.unlock();
    t.join();
    return shared->result;
  }
  lock.unlock();
  if (!writer->abandon()) {
    // Already linked: the commit is finishing; let it.
    t.join();
    return shared->result;
  }
  t.detach();
  (void)w.release();  // the helper still uses it
  return Error{fmt::format("flushing the image did not finish within --flush-timeout {:g} s",
                           timeout_s),
               "", "no image was saved, and the guest was put back as it was"}
      .fix("retry on a faster or less busy filesystem, or raise --flush-timeout");
}

// The RAM vmsave wrote matches the device state only if the guest did not
// run in between: another QMP client's cont (a RESUME event on every
// monitor) would make an image that restores into a corrupted guest.
Status check_still_stopped(QmpClient& qmp) {
  auto s = qmp.execute("query-status");  // also collects the events sent before it
  if (!s.ok()) return s.error();
  bool resumed = s->value("running", false);
  for (auto& e : qmp.take_events()) resumed |= e.value("event", "") == "RESUME";
  if (!resumed) return Status();
  return Error{"the guest ran during the save", qmp.path(),
               "another QMP client resumed it (cont) after vmsave had stopped it, so the RAM "
               "written does not match its device state; no image was made"}
      .fix("let no other client resume the guest while vmsave saves it, and save again");
}

}  // namespace

// -snapshot, or snapshot=on on a -drive: QEMU deletes that overlay when it
// exits, and never writes it back to the disk image.
static bool writes_disks_to_temporary_overlay(const std::vector<std::string>& cmdline) {
  auto cmd = QemuCommand::parse(cmdline);
  if (!cmd.ok()) return false;
  if (cmd->has_option("snapshot")) return true;
  for (const std::string& d : cmd->option_values("drive")) {
    auto kv = KeyvalList::parse(d, "", KeyvalSyntax::kQemuOpts);
    if (!kv.ok()) continue;
    auto v = kv->get("snapshot");
    if (!v) continue;
    auto on = parse_bool(*v, "snapshot");
    if (on.ok() && *on) return true;
  }
  return false;
}

// Every value in `cmdline` that could name a file: each argument whole
// (-hda FILE), each key=value element's value (its ",," one ','), and each
// string in a JSON argument.
static std::vector<std::string> values_in(const std::vector<std::string>& cmdline) {
  std::vector<std::string> out;
  std::function<void(const nlohmann::json&)> strings = [&](const nlohmann::json& j) {
    if (j.is_string()) out.push_back(j.get<std::string>());
    if (j.is_structured())
      for (auto& v : j) strings(v);
  };
  for (const std::string& a : cmdline) {
    out.push_back(a);
    if (a.starts_with('{')) {
      strings(nlohmann::json::parse(a, nullptr, false));
      continue;
    }
    std::string value;
    bool in_value = false;
    for (size_t i = 0; i <= a.size(); i++) {
      if (i < a.size() && a[i] == ',' && i + 1 < a.size() && a[i + 1] == ',') {
        value += ',';
        i++;
      } else if (i == a.size() || a[i] == ',') {
        if (in_value) out.push_back(value);
        value.clear();
        in_value = false;
      } else if (a[i] == '=' && !in_value) {
        in_value = true;
      } else if (in_value) {
        value += a[i];
      }
    }
  }
  return out;
}

// Whether `cmdline` names `file` as a whole value: the same string, or the
// same absolute path once a relative value is taken from QEMU's directory
// `cwd` (an external snapshot to /snap/debian.qcow2 of a VM started with
// /images/debian.qcow2 is another file, whatever their base names).
static bool names_file(const std::vector<std::string>& cmdline, const std::string& file,
                       const std::string& cwd) {
  if (file.empty()) return false;
  const std::string wanted = absolute_disk_path(file, cwd);
  for (const std::string& v : values_in(cmdline))
    if (v == file || (!wanted.empty() && absolute_disk_path(v, cwd) == wanted)) return true;
  return false;
}

// The guest's disks now, from query-block: an external snapshot, a mirror
// or a hot-plug since QEMU started leaves its command line naming older
// files (trial X). Each is named by its drive id, else its -device id,
// else its node; "temporary" marks a -snapshot overlay (its "file" a json:
// spelling of a file QEMU deletes). "path" and "backing_chain" are absolute
// (a relative file resolved against `cwd`, or left out without one), so a
// restore can tell which file the VM wrote. Drives without a medium, or
// that no device uses (the guest cannot see them), are left out.
nlohmann::json disks_now(QmpClient& qmp, const std::vector<std::string>& cmdline,
                         const std::string& cwd) {
  nlohmann::json disks = nlohmann::json::array();
  auto blocks = qmp.execute("query-block");
  if (!blocks.ok() || !blocks->is_array()) return disks;
  const bool temporary = writes_disks_to_temporary_overlay(cmdline);
  auto absolute_path = [&](const std::string& f) { return absolute_disk_path(f, cwd); };
  for (auto& b : *blocks) {
    auto in = b.find("inserted");
    const std::string qdev = b.value("qdev", "");
    if (in == b.end() || !in->is_object() || qdev.empty()) continue;
    std::string name = b.value("device", "");
    constexpr std::string_view kPeripheral = "/machine/peripheral/";
    if (name.empty() && qdev.starts_with(kPeripheral))
      name =
          qdev.substr(kPeripheral.size(), qdev.find('/', kPeripheral.size()) - kPeripheral.size());
    if (name.empty()) name = in->value("node-name", qdev);
    const std::string file = in->value("file", "");
    nlohmann::json d = {{"device", name},
                        {"file", file},
                        {"format", in->value("drv", "")},
                        {"read_only", in->value("ro", false)}};
    const std::string backing = in->value("backing_file", "");
    if (!backing.empty()) d["backing_file"] = backing;
    if (temporary && !names_file(cmdline, file, cwd) && names_file(cmdline, backing, cwd))
      d["temporary"] = true;
    if (std::string path = absolute_path(file); !path.empty()) d["path"] = path;
    // Each layer below: QEMU's full-backing-filename, resolved already.
    nlohmann::json chain = nlohmann::json::array();
    for (const nlohmann::json* image = in->contains("image") ? &(*in)["image"] : nullptr;
         image && image->is_object() && image->contains("backing-image");
         image = &(*image)["backing-image"]) {
      std::string below = absolute_path(image->value("full-backing-filename", ""));
      if (below.empty()) below = absolute_path((*image)["backing-image"].value("filename", ""));
      if (below.empty()) break;
      chain.push_back(below);
    }
    if (!chain.empty()) d["backing_chain"] = chain;
    disks.push_back(std::move(d));
  }
  return disks;
}

namespace {

// A restore with the command line the image records must find the disks
// as they were at the save, and cannot where the guest wrote to a temporary
// overlay (-snapshot), where QEMU writes files the command does not name,
// or where the guest runs on writing them.
void warn_of_disks(const nlohmann::json& disks, const std::vector<std::string>& cmdline,
                   const std::string& cwd, bool runs_on, Reporter& rep) {
  std::string overlaid, unnamed, written;
  auto add = [](std::string& list, const std::string& item) {
    list += (list.empty() ? "" : ", ") + item;
  };
  for (auto& d : disks) {
    const bool ro = d.value("read_only", false);
    const std::string device = d.value("device", ""), file = d.value("file", "");
    if (d.value("temporary", false)) {
      if (!ro) add(overlaid, device);
    } else if (names_file(cmdline, file, cwd)) {
      if (!ro) add(written, device + ": " + file);
    } else if (!file.starts_with("json:")) {  // one QEMU spelled itself: cannot tell
      // A CD changed since QEMU started, too: a restore would have another.
      add(unnamed, device + (ro ? " reads " : " writes ") + file);
      if (!ro) add(written, device + ": " + file);
    }
  }
  if (!overlaid.empty())
    rep.warn(fmt::format(
        "the guest's disk writes go to a temporary overlay (-snapshot, snapshot=on) that the "
        "image does not hold, so a restored guest finds its disks as they were when QEMU "
        "started, older than its RAM (its file systems may break): {}",
        overlaid));
  if (!unnamed.empty())
    rep.warn(fmt::format(
        "QEMU's command line does not name a file a disk uses now ({}; an external snapshot, "
        "a mirror, a changed medium or a hot-plug since QEMU started): the image records that "
        "command line, and a restore with it opens older disks than its RAM, or fails for want "
        "of a device; restore with a command that opens the files vmsave info lists as disks",
        unnamed));
  if (runs_on && !written.empty())
    rep.warn(fmt::format(
        "the guest runs on and writes its disks ({}): the image restores only with them as "
        "they are at this save; to keep a copy, save with --paused, copy the disks, then "
        "resume the guest (QMP cont)",
        written));
}

// QEMU fails a migration's end while a block job (backup, stream, commit,
// a mirror not yet ready) works on its disks, with only "Bad address", after
// the guest was paused for the whole save (trial Y). A ready mirror is let
// be: a migration completes beside it.
Status check_no_block_job(QmpClient& qmp) {
  auto jobs = qmp.execute("query-block-jobs");
  if (!jobs.ok() || !jobs->is_array()) return Status();
  for (auto& j : *jobs) {
    const std::string status = j.value("status", "");
    if (j.value("ready", false) || status == "concluded" || status == "null") continue;
    return Error{"cannot save this guest now", qmp.path(),
                 fmt::format("a block job works on its disks ({} on {}, {}), and QEMU fails the "
                             "end of a save while one does",
                             j.value("type", "?"), j.value("device", "?"), status)}
        .fix(
            "wait for the job to end (QMP query-block-jobs), or cancel it (block-job-cancel), "
            "then save");
  }
  return Status();
}

// "Error in migration completion": QEMU could not flush and hand over its
// disks as the save ended; QEMU says only "Bad address" (trial Y).
Error with_completion_hint(Error e) {
  if (e.detail.find("migration completion") != std::string::npos && e.hint.empty())
    e.hint =
        "QEMU could not flush and release its disks as the save ended (a disk file removed or "
        "moved since QEMU opened it? a relative disk path under -daemonize?); the guest is as "
        "it was";
  return e;
}

// A migration's end releases the VM's disks (their locks, for the VM it
// went to), and a paused VM takes them again only at cont: after save
// --paused a clone started on the same disk was let write it, and the
// original then resumed on what the clone wrote (trial Y). QEMU 10.0 can
// take them back at once.
void hold_disks_again(QmpClient& qmp, const nlohmann::json& disks, Reporter& rep) {
  if (disks.empty()) return;
  auto r = take_disk_locks(qmp);
  if (r.ok() && *r) return;
  rep.warn(fmt::format(
      "QEMU {} its disks back after the save: until the guest resumes, QEMU holds no lock on "
      "them, and nothing stops another VM from writing them; start none on them meanwhile",
      r.ok() ? "(before 10.0) cannot take" : "did not take (" + r.error().detail + ")"));
}

// Another QMP client that switched x-ignore-shared off during the save had
// QEMU send the RAM in the device state too, as a stream that QEMU refuses
// to load beside RAM it skips ("Capability x-ignore-shared is on, but
// received capability is off"): the image would verify, and never restore.
Status check_capabilities_kept(QmpClient& qmp) {
  auto caps = qmp.execute("query-migrate-capabilities");
  if (!caps.ok()) return caps.error();
  for (auto& c : *caps)
    if (c.value("capability", "") == "x-ignore-shared" && !c.value("state", false))
      return Error{"QEMU's migration capabilities changed during the save", qmp.path(),
                   "another QMP client set x-ignore-shared off, so the device state holds RAM "
                   "that no restore can load; no image was made"}
          .fix(
              "let no other client change migration capabilities while vmsave saves, and "
              "save again");
  return Status();
}

// A lazy clone runs with the backends its restore rewrote to map the image
// copy-on-write (mem-path=IMAGE, share=off, readonly=on); the command its
// user gave had the VM's own, which that image's metadata holds. The saved
// command gets those back, so that `vmsave info` shows a command the new
// image restores with: the clone's own named the image, which a save
// --force over it had just replaced, and the VM's first backend was
// nowhere to be seen (trial V). Only from the very file QEMU maps: another
// image moved to that path since holds another VM's backends; then the
// clone's mapping is kept, and a warning says so, as it does when no file
// is at that path any more. A file that is no image
// (a template of the user's own, mapped so) is left as it is, unsaid.
std::vector<std::string> with_backends_before_lazy_restore(std::vector<std::string> argv, pid_t pid,
                                                           const std::string& cwd, Reporter& rep) {
  auto cmd = QemuCommand::parse(argv);
  if (!cmd.ok()) return argv;
  auto objs = cmd->objects();
  if (!objs.ok()) return argv;
  for (auto& o : *objs) {
    auto mp = o.object.get_string("mem-path");
    auto share = o.object.get_bool("share");
    auto ro = o.object.get_bool("readonly");
    if (o.object.qom_type != "memory-backend-file" || !mp || mp->empty() || !share.ok() ||
        share->value_or(false) || !ro.ok() || !ro->value_or(false))
      continue;
    // QEMU opened a relative mem-path in its own working directory.
    const std::string path = (*mp)[0] == '/' || cwd.empty()
                                 ? *mp
                                 : (std::filesystem::path(cwd) / *mp).lexically_normal().string();
    auto keep = [&](const std::string& why) {
      rep.warn(fmt::format(
          "backend {} maps {} privately (a lazy restore), and {}: the command line this image "
          "records keeps that mapping; to restore it, give backend {} the mem-path the VM had "
          "before the lazy restore",
          o.object.id, path, why, o.object.id));
    };
    struct stat st;  // never opening a FIFO or a device that QEMU names
    if (stat(path.c_str(), &st) != 0) {
      // Moved or removed: the clone's mapping lives on, silently (trial Z).
      if (errno == ENOENT) keep("no file is at that path now (moved or removed since)");
      continue;
    }
    if (!S_ISREG(st.st_mode)) continue;
    // A file of the user's own mapped so (a template) is no image: silent.
    auto img = ImageReader::open(path, [](const std::string&) {});
    if (!img.ok()) continue;
    const auto maps = file_mappings(pid);
    if (std::none_of(maps.begin(), maps.end(), [&](const FileMapping& m) {
          return m.dev == st.st_dev && m.inode == st.st_ino;
        })) {
      keep("the image there now is not the file QEMU maps (replaced since the restore)");
      continue;
    }
    nlohmann::json meta;
    if (auto m = (*img)->metadata(); m.ok()) meta = std::move(*m);
    auto it = meta.is_object() ? meta.find("qemu_cmdline") : meta.end();
    if (!meta.is_object() || it == meta.end() || !it->is_array() ||
        !std::all_of(it->begin(), it->end(), [](auto& a) { return a.is_string(); })) {
      keep("that image records no command line to take the backend from");
      continue;
    }
    bool found = false;
    auto base = QemuCommand::parse(it->get<std::vector<std::string>>());
    if (base.ok())
      if (auto base_objs = base->objects(); base_objs.ok())
        for (auto& b : *base_objs)
          if (b.object.id == o.object.id) {
            argv[o.index] = base->argv()[b.index];
            found = true;
          }
    if (!found) keep("its image records no backend of that id");
  }
  return argv;
}

nlohmann::json qemu_metadata(QmpClient& qmp, const std::vector<std::string>& cmdline) {
  nlohmann::json m;
  auto v = qmp.execute("query-version");
  if (v.ok()) {
    auto& q = (*v)["qemu"];
    m["qemu_version"] = fmt::format("{}.{}.{}", q.value("major", 0), q.value("minor", 0),
                                    q.value("micro", 0));
  }
  auto mt = qmp.execute("qom-get", {{"path", "/machine"}, {"property", "type"}});
  if (mt.ok() && mt->is_string()) m["machine_qom_type"] = *mt;
  m["qemu_cmdline"] = cmdline;
  if (auto devs = memory_devices(qmp)) m["memory_devices"] = *devs;
  // Room for CPUs to hot-plug, -smp maxcpus as QEMU worked it out.
  if (auto cpus = qmp.execute("query-hotpluggable-cpus"); cpus.ok() && cpus->is_array())
    m["max_cpus"] = cpus->size();
  auto cmd = QemuCommand::parse(cmdline);
  if (cmd.ok()) {
    auto type = cmd->machine_type();
    if (type.ok() && *type) m["machine_type"] = **type;
    auto mem = cmd->memory_size();
    if (mem.ok() && *mem) m["memory_size"] = **mem;
  }
  return m;
}

}  // namespace

Result<nlohmann::json> save_qemu(const SaveOptions& opts, Reporter& rep) {
  StepTimer timer;
  auto qmp_r = QmpClient::connect(opts.qmp, use_qmp_timeout(opts.qmp_timeout));
  if (!qmp_r.ok()) return qmp_r.error();
  QmpClient& qmp = *qmp_r;
  pid_t pid = qmp.peer_pid();

  auto status = qmp.execute("query-status");
  if (!status.ok()) return status.error();
  bool was_running = status->value("running", false);
  std::string run_state = status->value("status", "");
  // After a completed migration (an earlier save --paused) QEMU refuses to
  // migrate again until the guest runs.
  if (run_state == "postmigrate")
    return Error{"cannot save this guest now", opts.qmp,
                 "it is paused after an earlier migration (QEMU state postmigrate), and QEMU "
                 "refuses to migrate it again"}
        .fix("resume it with the QMP command cont (and stop, if it must stay paused), then save");
  auto mig = qmp.execute("query-migrate");
  if (mig.ok() && (mig->value("status", "") == "active" || mig->value("status", "") == "setup"))
    return Error{"a migration is already running in QEMU", opts.qmp, ""}.fix(
        "wait for it to finish or cancel it with migrate_cancel");
  if (run_state == "inmigrate")
    return Error{"QEMU is waiting for an incoming migration", opts.qmp, "there is no VM to save yet"};
  VMSAVE_TRY(check_no_block_job(qmp));

  // Guest RAM: shared named files vmsave reads itself; anything else goes
  // through QEMU's mapped-ram migration.
  auto backends_r = list_ram_backends(qmp);
  if (!backends_r.ok()) return backends_r.error();
  std::vector<RamBackend>& backends = *backends_r;
  if (backends.empty())
    return Error{"QEMU has no memory backend object", opts.qmp,
                 "vmsave names the image's RAM blocks after them"}
        .fix("start QEMU with -object memory-backend-file,id=ram0,size=SIZE,share=on,"
             "mem-path=/dev/shm/NAME -machine memory-backend=ram0 (or -numa node,memdev=ram0)");
  const RamBackend* unshared = nullptr;
  for (auto& b : backends)
    if (b.qom_type != "memory-backend-file" || !b.share) unshared = &b;
  const bool through_qemu = unshared != nullptr;
  if (through_qemu && opts.compress.enabled()) {
    // share=off on a file: a lazy restore's mapping of its image, or a file
    // of the user's own (a legacy -mem-path) that was never restored lazily.
    const bool private_file = unshared->qom_type == "memory-backend-file";
    bool lazy_clone = false;
    if (private_file) {
      // Only to word the message: never waiting on a FIFO, nor reading a
      // device, that an untrusted QEMU names as its mem-path (trial S).
      UniqueFd f(::open(unshared->mem_path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
      struct stat st;
      char magic[8] = {};
      lazy_clone = f && fstat(f.get(), &st) == 0 && S_ISREG(st.st_mode) &&
                   ::pread(f.get(), magic, sizeof magic, 0) == ssize_t(sizeof magic) &&
                   std::memcmp(magic, kMagic.data(), sizeof magic) == 0;
    }
    return Error{"cannot compress this VM's RAM", opts.qmp,
                 fmt::format("backend {} is {}, so QEMU's mapped-ram migration writes the RAM, "
                             "and that format has no compression",
                             unshared->id,
                             lazy_clone ? "a vmsave image mapped with share=off (a lazy restore)"
                             : private_file ? "a file mapped with share=off"
                                            : "not a shared file")}
        .fix(lazy_clone ? "save without --compress, or restore the VM eagerly (not --lazy) if "
                          "it is to be saved compressed"
             : private_file
                 ? "save without --compress, or start the VM with share=on on that backend"
                 : "save without --compress, or give the VM shared file-backed RAM "
                   "(memory-backend-file,share=on,mem-path=...)")
        .as(Exit::kUsage);
  }
  if (through_qemu) {
    auto caps_now = qmp.execute("query-migrate-capabilities");
    if (!caps_now.ok()) return caps_now.error();
    bool mapped_ram = false;
    for (auto& c : *caps_now) mapped_ram |= c.value("capability", "") == "mapped-ram";
    if (!mapped_ram) return unsaveable_ram_error(*unshared);
  } else {
    VMSAVE_TRY(open_backend_files(backends, pid));
  }

  // QEMU's directory, which relative paths in its command are from.
  std::error_code ec;
  std::string cwd = std::filesystem::read_symlink(fmt::format("/proc/{}/cwd", pid), ec).string();
  if (ec) cwd.clear();
  std::vector<std::string> cmdline = with_backends_before_lazy_restore(
      as_started_by_user(process_cmdline(pid), pid), pid, cwd, rep);
  // A daemon's is / by now, not where it opened its disks.
  const auto parsed = QemuCommand::parse(cmdline);
  if (parsed.ok() && parsed->daemonize()) cwd.clear();
  const nlohmann::json disks = disks_now(qmp, cmdline, cwd);
  warn_of_disks(disks, cmdline, cwd, opts.after == AfterSave::kLeaveRunning && was_running, rep);
  nlohmann::json meta = base_metadata("qemu", opts.description);
  meta.update(qemu_metadata(qmp, cmdline));
  meta["disks"] = disks;
  meta["guest_running"] = was_running;
  meta["run_state"] = run_state;
  meta["qemu_pid"] = pid;

  std::vector<BlockLayout> blocks;
  std::vector<RamSource> sources;
  for (auto& b : backends) {
    if (b.id.size() > kMaxBlockIdLength)
      return Error{"RAM backend id too long", "", b.id};
    BlockLayout l;
    l.id = b.id;
    l.size = b.size;
    l.page_size = b.page_size;
    if (through_qemu) l.flags = kBlockViaQemu;
    blocks.push_back(l);
    if (!through_qemu)
      sources.push_back(RamSource{b.id, b.file, b.fd.get(), b.offset, b.size, b.page_size});
    meta["blocks"].push_back({{"id", b.id},
                              {"size", b.size},
                              {"page_size", b.page_size},
                              {"qom_type", b.qom_type},
                              {"mem_path", b.mem_path},
                              {"share", b.share},
                              {"offset", b.offset},
                              {"props", b.props},
                              {"saved_by", through_qemu ? "qemu" : "vmsave"}});
  }

  // Create the image before stopping the guest: a target that exists or a
  // directory we cannot write fails while the guest still runs.
  VMSAVE_TRY(check_target_not_source(opts.image, sources));
  auto w_r = ImageWriter::create(opts.image, opts.force, blocks, opts.chunk_size,
                                 [&](const std::string& m) { rep.warn(m); });
  if (!w_r.ok()) return w_r.error();
  ImageWriter& w = **w_r;
  w.set_min_hole(opts.min_hole);
  VMSAVE_TRY(w.set_compression(opts.compress));
  if (opts.compress.enabled()) meta["compress"] = opts.compress.name();

  // From the first change to QEMU on, a watchdog process undoes what this
  // save did if vmsave dies part-way (SIGKILL, a crash).
  auto watchdog = Watchdog::start(qmp, was_running);
  if (!watchdog.ok()) return watchdog.error();
  Capabilities caps;
  if (through_qemu)
    VMSAVE_TRY(caps.set(qmp, mapped_ram_capabilities(), {"mapped-ram", "multifd"}));
  else
    VMSAVE_TRY(caps.set(qmp, {{"x-ignore-shared", true}, {"mapped-ram", false}, {"multifd", false},
                              {"postcopy-ram", false}, {"background-snapshot", false}},
                        {"x-ignore-shared"}));
  GuestGuard guard{&qmp, &caps, &*watchdog, &rep, was_running};
  MappedRamFds fds;
  if (through_qemu) {
    // QEMU opens /dev/fdset/N write-only; it takes the O_DIRECT descriptor
    // for the multifd page writes and the other for the stream.
    if (w.direct()) {
      auto d = w.reopen(O_WRONLY | O_DIRECT);
      if (d.ok()) fds.direct = std::move(*d);
    }
    auto b = w.reopen(O_WRONLY);
    if (!b.ok()) return b.error();
    fds.buffered = std::move(*b);
  }
  const bool live = opts.live && was_running;
  if (opts.live && !was_running)
    rep.warn("the guest is paused: --live has nothing to overlap with, saving it as it is");
  // Accepted for any VM (a wrapper need not know how its RAM is backed),
  // but said when they do nothing.
  if (live && !through_qemu && opts.max_downtime_ms > 0)
    rep.warn(
        "--max-downtime only applies to RAM QEMU saves; vmsave writes this VM's RAM itself (at "
        "most four passes while the guest runs, then one with it stopped, as short as what "
        "changed), so it has no effect here");
  // QEMU throttles a migration to max-bandwidth (128 MiB/s by default), a
  // stopped guest's too: QEMU writing 256 MiB of paused RAM took 1.41 s
  // against 0.21 s unlimited, and a running guest dirtying memory faster
  // never converges under it. 0 lifts the limit while the save runs.
  struct ParamsBack {
    QmpClient& qmp;
    nlohmann::json old = nlohmann::json::object();
    void put_back() {
      if (!old.empty()) (void)qmp.execute("migrate-set-parameters", old, 5);
      old = nlohmann::json::object();
    }
    ~ParamsBack() { put_back(); }
  } params_back{qmp};
  {
    nlohmann::json want = {{"max-bandwidth", 0}};
    if (live && opts.max_downtime_ms > 0) want["downtime-limit"] = opts.max_downtime_ms;
    auto p = qmp.execute("query-migrate-parameters");
    if (!p.ok()) return p.error();
    nlohmann::json old = nlohmann::json::object();
    for (auto& [k, v] : want.items())
      if (p->contains(k)) old[k] = (*p)[k];
    qmp.note_undo("migrate-set-parameters", old);
    auto r = qmp.execute("migrate-set-parameters", want);
    if (!r.ok()) return r.error();
    params_back.old = std::move(old);
  }
  timer.lap("prepare");

  auto stop_guest = [&]() -> Status {
    if (!was_running || guard.stopped) return Status();
    auto r = qmp.execute("stop");
    if (!r.ok()) return r.error();
    guard.stopped = true;
    return Status();
  };

  std::chrono::steady_clock::time_point paused_at;
  bool paused_by_other = false;
  Progress progress;
  RamStats ram;
  double vmstate_s = 0;
  int passes = 1;
  i64 rewritten_bytes = 0;
  nlohmann::json pass_report = nlohmann::json::array();  // vmsave's own live passes
  double qemu_downtime_s = -1;
  bool live_timeout_reached = false;
  if (through_qemu) {
    // RAM and device state in one QEMU migration into the image. Live: the
    // guest runs while QEMU copies RAM (pages rewritten in place); QEMU
    // stops it for the last round within downtime-limit, or vmsave does at
    // --live-timeout.
    if (!live) VMSAVE_TRY(stop_guest());
    paused_at = timer.now();
    timer.lap("stop");
    for (auto& b : backends) progress.total += b.size;
    nlohmann::json last;
    rep.begin_phase(live            ? "QEMU writing RAM live"
                    : guard.stopped ? "QEMU writing RAM and device state (guest paused)"
                                    : "QEMU writing RAM and device state",
                    &progress);
    auto t0 = timer.now();
    bool forced_stop = false;
    i64 first_round_bytes = -1;  // pages QEMU wrote before its first re-sync
    i64 qemu_sent = 0;           // all it wrote, rewrites included
    Status st = mapped_ram_migrate(
        qmp, false, fds, w.qemu_offset(),
        [&](const nlohmann::json& r) {
          last = r;
          if (r.contains("ram") && first_round_bytes < 0 &&
              r["ram"].value("dirty-sync-count", 0) >= 2)
            first_round_bytes = r["ram"].value("normal-bytes", i64(0));
          if (r.contains("ram")) {
            i64 total = r["ram"].value("total", i64(0)),
                remaining = r["ram"].value("remaining", i64(0));
            // QEMU's remaining grows back at each dirty-bitmap sync; a stopped
            // guest dirties nothing, so the bar does not go back then (an
            // 8 GiB lazy clone's went back to 0% four times).
            i64 done = total > 0
                           ? std::max<i64>(0, progress.total.load() * (total - remaining) / total)
                           : 0;
            progress.done = live ? done : std::max<i64>(progress.done.load(), done);
          }
          if (live && !forced_stop && r.value("status", "") == "active" &&
              std::chrono::duration<double>(timer.now() - t0).count() > opts.live_timeout) {
            // QEMU could not converge in time: stop the guest so it finishes.
            forced_stop = true;
            paused_at = timer.now();
            (void)stop_guest();
          }
        },
        [&] {
          // Interrupted: QEMU finishes (into the temporary file, discarded
          // after), the guest stopped so that a live save ends soon; then the
          // guard resumes it.
          rep.note(
              "vmsave: interrupted: letting QEMU finish its save first, as cancelling it can "
              "crash QEMU; interrupt again to cancel it now");
          (void)stop_guest();
          return true;
        });
    if (st.ok()) progress.done = progress.total.load();  // the final line: all of it
    rep.end_phase(!st.ok());
    if (!st.ok()) return with_completion_hint(st.error());
    // A completed outgoing migration leaves the guest stopped (postmigrate).
    if (was_running) guard.stopped = true;
    ram.seconds = std::chrono::duration<double>(timer.now() - t0).count();
    ram.ram_bytes = progress.total;
    if (last.contains("ram")) {
      // QEMU's normal-bytes counts every page it sent, a page rewritten
      // live as often as it went: what the image holds is on disk.
      qemu_sent = last["ram"].value("normal-bytes", i64(0));
      ram.stored_bytes = std::min(qemu_sent, w.qemu_section_stored());
      const i64 page = std::max<i64>(1, last["ram"].value("page-size", i64(4096)));
      // "normal" counts a page again each time it went (live): the zero
      // share is from what the image holds.
      ram.data_bytes =
          std::min(last["ram"].value("normal", i64(0)), ram.stored_bytes / page) * page;
      ram.total_bytes = last["ram"].value("total", i64(0)) / page * page;
      // Stopped, QEMU still syncs its dirty bitmap a few times; one pass
      // over RAM all the same.
      if (live) passes = static_cast<int>(last["ram"].value("dirty-sync-count", i64(1)));
      if (live && first_round_bytes >= 0)
        rewritten_bytes = std::max<i64>(0, qemu_sent - first_round_bytes);
    }
    if (live && !forced_stop && last.contains("downtime")) {
      // QEMU stopped the guest itself for its last round: the downtime is
      // QEMU's, plus the time until vmsave resumes it.
      qemu_downtime_s = last["downtime"].get<double>() / 1000.0;
      paused_at = timer.now() - std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                    std::chrono::duration<double>(qemu_downtime_s));
    } else if (live && !forced_stop) {
      paused_at = timer.now();
    }
    live_timeout_reached = forced_stop;
    if (forced_stop) meta["live_timeout_reached"] = true;
    timer.lap("ram");
    fds = MappedRamFds{};
    meta["qemu_migration"] = {{"offset", w.qemu_offset()},
                              {"capabilities", nlohmann::json(mapped_ram_capabilities())},
                              {"direct_io", w.direct()},
                              {"live", live},
                              {"ram_bytes_written", qemu_sent}};
  } else {
    const pid_t qemu_pid = qmp.peer_pid();
    ExitWatch exit_watch(qemu_pid, [&] {
      return Error{"QEMU exited during the save", opts.qmp,
                   fmt::format("process {} is gone; no image was written", qemu_pid)}
          .fix("start the VM again, and save it then");
    });
    if (live) {
      // Passes while the guest runs, as long as each rewrites clearly less
      // than the one before (and --live-timeout allows); then the stopped
      // pass makes the image exact.
      const auto t0 = timer.now();
      i64 prev = INT64_MAX, first = 0;
      for (int p = 0; p < kMaxLivePasses; p++) {
        Progress pass_progress;
        ImageWriter::PassStats ps;
        rep.begin_phase(p == 0 ? "writing RAM live" : fmt::format("live pass {}", p + 1),
                        &pass_progress);
        Status st = w.live_pass(sources, opts.engine, &pass_progress, &ps);
        rep.end_phase(!st.ok());
        if (!st.ok()) return st.error();
        if (p == 0) {
          VMSAVE_TRY(w.sync_data());  // the guest runs: this costs no downtime
          first = ps.bytes_written;
        }
        pass_report.push_back({{"bytes_written", ps.bytes_written}, {"seconds", ps.seconds}});
        if (p > 0) {
          passes++;
          rewritten_bytes += ps.bytes_written;
          if (ps.bytes_written < kLiveGoodEnough) break;
          if (double(ps.bytes_written) > kLiveShrink * double(prev)) {
            // Said when the passes did little: a steady working set (a
            // guest rewriting the same 64 MiB) ends them quietly.
            if (ps.bytes_written * 2 > first)
              rep.warn(fmt::format(
                  "the guest rewrites its memory about as fast as vmsave writes it (live pass {} "
                  "rewrote {} in {:.1f} s, the one before {}): the guest is stopped now, for a "
                  "last pass about as long; a save without --live would have stopped it for all "
                  "of its RAM",
                  p + 1, human_bytes(double(ps.bytes_written)), ps.seconds,
                  human_bytes(double(prev))));
            break;
          }
        }
        prev = ps.bytes_written;
        if (opts.live_timeout_given &&
            std::chrono::duration<double>(timer.now() - t0).count() > opts.live_timeout) {
          live_timeout_reached = true;
          break;
        }
      }
      timer.lap("live_passes");
      // Someone else may have paused the guest meanwhile (a QMP stop): it
      // stays paused afterwards, whatever --leave-running says.
      auto s = qmp.execute("query-status");
      if (!s.ok()) return s.error();
      if (!s->value("running", false)) {
        paused_by_other = true;
        rep.warn("another QMP client paused the guest during the live save; it stays paused");
      }
    }
    if (!paused_by_other) VMSAVE_TRY(stop_guest());
    (void)qmp.take_events();  // from here the guest must not run until the device state is out
    paused_at = timer.now();
    timer.lap("stop");

    if (live) {
      ImageWriter::PassStats ps;
      rep.begin_phase("final pass (guest stopped)", &progress);
      Status st = w.live_pass(sources, opts.engine, &progress, &ps);
      rep.end_phase(!st.ok());
      if (!st.ok()) return st.error();
      passes++;
      rewritten_bytes += ps.bytes_written;
      pass_report.push_back(
          {{"bytes_written", ps.bytes_written}, {"seconds", ps.seconds}, {"guest_stopped", true}});
      VMSAVE_TRY(w.finish_live(&ram));
    } else {
      // The line says what the wait costs: a guest paused for it.
      rep.begin_phase(guard.stopped ? "writing RAM (guest paused)" : "writing RAM", &progress);
      Status st = w.write_ram(sources, opts.engine, &progress, &ram);
      rep.end_phase(!st.ok());
      if (!st.ok()) return st.error();
    }
    timer.lap("ram");

    Progress vm_progress;
    rep.begin_phase("saving device state", &vm_progress);
    Status st = save_device_state(
        qmp, [&](const u8* d, size_t n) { return w.append_vmstate(d, n); },
        [&](i64 total) { vm_progress.done = total; });
    rep.end_phase(!st.ok());
    if (!st.ok()) return with_completion_hint(st.error());
    vmstate_s = timer.lap("device_state");
    VMSAVE_TRY(check_still_stopped(qmp));
    VMSAVE_TRY(check_capabilities_kept(qmp));
  }
  params_back.put_back();
  caps.restore(qmp);
  if (cancelled()) return interrupted_error();

  // Resume early, commit late: RAM and device state are written, so a guest
  // that stays running resumes now; checksumming QEMU's section, flushing
  // and the commit happen while it runs. If they fail, no image appears and
  // the guest just keeps running.
  std::string after = "quit";
  bool resumed = false;
  double downtime = 0;
  if (opts.after == AfterSave::kLeaveRunning && was_running && !paused_by_other) {
    auto r = qmp.execute("cont");
    if (!r.ok()) return r.error();
    guard.stopped = false;
    resumed = true;
    downtime = std::chrono::duration<double>(timer.now() - paused_at).count();
  }

  if (through_qemu) {
    Progress hash_progress;
    rep.begin_phase("checksumming QEMU's section", &hash_progress);
    Status st = w.finish_qemu_section(&hash_progress);
    rep.end_phase(!st.ok());
    if (!st.ok()) return st.error();
    timer.lap("checksum");
  }

  meta["vmstate_bytes"] = w.vmstate_bytes();
  meta["live"] = live;
  if (live_timeout_reached) meta["live_timeout_reached"] = true;  // vmsave's passes too
  watchdog->note_commit(opts.image, w.fd(),
                        opts.after == AfterSave::kQuit ? "quit"
                        : resumed                      ? "running"
                                                       : "paused");
  // The last moment a signal undoes the save.
  if (cancelled()) return interrupted_error();
  Status st = commit_within(*w_r, meta, opts.flush_timeout);
  if (!st.ok()) return st.error();
  double flush_s = timer.lap("commit");

  // The image is safe on disk: from here, failures no longer undo the save,
  // and a watchdog that sees vmsave die finishes it instead.
  guard.armed = false;
  if (int ms = FaultPlan::get().after_commit_ms)
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  if (opts.after == AfterSave::kQuit) {
    // Until QEMU has exited it still maps its RAM files: a restore --force
    // run next would refuse them as in use. Tearing down its memory takes a
    // moment with a large guest; past 10 s vmsave stops waiting.
    const auto log = empty_log_beside(opts.qmp);
    if (qmp.execute("quit", nullptr, 5).ok())
      for (int i = 0; i < 1000 && process_alive(pid); i++)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (log && !process_alive(pid)) remove_empty_log(opts.qmp, *log);
    remove_run_dir_of(opts.qmp, pid);  // a restore's private socket and log
  } else if (opts.after == AfterSave::kLeaveRunning) {
    after = was_running && !paused_by_other ? "running" : "paused";
  } else {
    after = "paused";
  }
  if (after == "paused") hold_disks_again(qmp, disks, rep);
  watchdog->disarm();
  if (!resumed) downtime = std::chrono::duration<double>(timer.now() - paused_at).count();
  timer.lap("finish");
  // A wrapper's SIGTERM on a timeout got exit 0 and no word (trial U).
  if (cancelled())
    rep.warn("a signal came once the image was committed: the save is complete and stands");

  nlohmann::json j = {{"command", "save"},         {"mode", "qemu"},
                      {"image", opts.image},       {"qemu_pid", pid},
                      {"guest_was_running", was_running},
                      {"after", after},            {"vmstate_bytes", w.vmstate_bytes()},
                      {"ram_saved_by", through_qemu ? "qemu" : "vmsave"},
                      {"live", live},              {"passes", passes},
                      {"bytes_rewritten", rewritten_bytes},
                      {"flush_s", flush_s},
                      {"vmstate_s", vmstate_s},    {"direct_io", w.direct()},
                      {"downtime_s", was_running ? downtime : 0.0}};
  if (qemu_downtime_s >= 0) j["qemu_downtime_s"] = qemu_downtime_s;
  if (opts.after == AfterSave::kQuit) {
    // QEMU does not remove a named RAM file when it quits: the guest's
    // memory stays taken (in /dev/shm, say) until someone does, and a
    // restore to the same command line refuses it without --force. Only
    // shared files hold the guest's memory: a share=off file is what QEMU
    // read it from (a lazy clone's image, say), never to be removed for it.
    // Nor is a file that took mem-path's name after QEMU opened its own
    // (known when vmsave opened that, i.e. saved the block itself).
    nlohmann::json left = nlohmann::json::array();
    for (auto& b : backends) {
      const std::string& path = b.path.empty() ? b.mem_path : b.path;
      struct stat st, mapped;
      if (!b.share || path.empty() || stat(path.c_str(), &st) < 0 || !S_ISREG(st.st_mode)) continue;
      if (b.fd && (fstat(b.fd.get(), &mapped) < 0 || !same_file(st, mapped))) continue;
      if (std::find(left.begin(), left.end(), path) != left.end()) continue;  // backends sharing it
      left.push_back(path);
    }
    j["ram_files_left"] = left;
  }
  if (live) j["live_timeout_reached"] = live_timeout_reached;
  if (!pass_report.empty()) j["live_passes"] = pass_report;
  add_ram_report(j, ram, "ram_write");
  if (through_qemu) j["qemu_ram_bytes"] = ram.ram_bytes;  // as a restore reports it
  if (opts.compress.enabled()) {
    j["compress"] = opts.compress.name();
    j["vmstate_stored_bytes"] = w.vmstate_stored_bytes();  // as restore and info report it
  }
  j["steps_s"] = timer.steps();
  j["total_s"] = timer.total();
  return j;
}

}  // namespace vmsave
