// `vmsave restore` with QEMU, and `prepare` for wrappers that start QEMU
// themselves.
//
//   open image → match the command's memory backends to the image's blocks
//   → eager: create the RAM files, start QEMU with -incoming defer and fill
//     them in parallel while it starts up | lazy: point the backends at the
//     image itself and start QEMU → device state → resume
//
// Lazy restore rewrites each backend to
//   memory-backend-file,mem-path=IMAGE,offset=REGION,share=off,readonly=on,rom=off
// (QEMU's docs/system/vm-templating.rst): QEMU maps the image read-only and
// private, the guest's writes land in copy-on-write anonymous pages, nothing
// is read up front, and many clones share the image's pages in the page
// cache. Everything that can be checked is checked before QEMU starts.
//
// An image with a QEMU migration section (RAM saved by QEMU's mapped-ram
// migration) is loaded by QEMU itself: migrate-incoming from
// file:/dev/fdset/N,offset=SECTION with the save's capabilities. Its blocks
// are not filled or mapped by vmsave, so such an image restores eagerly
// only.

#include <dirent.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/un.h>
#include <sys/vfs.h>
#include <sys/wait.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <thread>

#include <fmt/core.h>
#include <xxhash.h>

#include "core/internal.h"
#include "core/qemu.h"
#include "core/qemu_args.h"
#include "core/vmsave.h"
#include "lib/cancel.h"

namespace vmsave {

namespace {

// Properties that describe where and how a backend gets its memory; a lazy
// restore replaces them all with the image mapping.
const char* const kSourceProps[] = {"mem-path", "share",    "offset",   "readonly",
                                    "rom",      "discard-data", "align", "pmem",
                                    "prealloc", "prealloc-threads", "prealloc-context",
                                    "hugetlb",  "hugetlbsize", "seal", "reserve"};

struct BackendPlan {
  size_t arg_index = 0;
  size_t block = 0;
  QemuObject object;
  std::string ram_file;      // eager: the file filled from the image
  bool unlink_after = false;  // eager into a directory mem-path
};

std::string absolute(const std::string& p) {
  std::error_code ec;
  auto a = std::filesystem::absolute(p, ec);
  return ec ? p : a.lexically_normal().string();
}

Error mismatch(const std::string& what, const std::string& fix = "") {
  return Error{"the QEMU command does not fit the image", "", what}.fix(
      fix.empty() ? "pass the command line the VM was saved with (vmsave info shows it)" : fix);
}

// Matches memory backends on the command line to the image's RAM blocks.
// The command line the VM was saved with; none for images from vmsave
// before 0.1, or if it no longer parses.
std::optional<QemuCommand> saved_command(const nlohmann::json& meta) {
  auto it = meta.find("qemu_cmdline");
  if (it == meta.end() || !it->is_array()) return std::nullopt;
  auto cmd = QemuCommand::parse(it->get<std::vector<std::string>>());
  if (!cmd.ok()) return std::nullopt;
  return std::move(*cmd);
}

// Whether a memory device of the saved VM used backend `id`; nullopt for
// images that did not record them.
std::optional<bool> used_by_memory_device(const nlohmann::json& meta, const std::string& id) {
  auto devs = meta.find("memory_devices");
  if (devs == meta.end() || !devs->is_array()) return std::nullopt;
  return std::any_of(devs->begin(), devs->end(),
                     [&](const nlohmann::json& d) { return d.value("memdev", "") == id; });
}

// Whether the saved VM had memory backend `id` as an -object of its
// command line or one hot-plugged for a memory device.
bool had_backend(const nlohmann::json& meta, const std::string& id) {
  if (auto saved = saved_command(meta))
    if (auto objs = saved->objects(); objs.ok())
      for (auto& o : *objs)
        if (o.object.id == id && o.object.qom_type.starts_with("memory-backend-")) return true;
  return used_by_memory_device(meta, id).value_or(false);
}

Result<std::vector<BackendPlan>> plan_backends(const QemuCommand& cmd, const ImageReader& img,
                                               const nlohmann::json& meta, bool lazy) {
  auto objs = cmd.objects();
  if (!objs.ok()) return objs.error().as(Exit::kUsage);
  const auto& blocks = img.layout().blocks;
  std::vector<BackendPlan> plans;
  std::vector<bool> matched(blocks.size(), false);
  for (auto& o : *objs) {
    if (o.object.qom_type.rfind("memory-backend-", 0) != 0) continue;
    size_t i = 0;
    while (i < blocks.size() && blocks[i].id != o.object.id) i++;
    if (i == blocks.size())
      return mismatch(fmt::format("its memory backend {} is not in the image", o.object.id));
    auto size = o.object.get_size("size");
    if (!size.ok()) return size.error().as(Exit::kUsage);
    if (!*size || **size != blocks[i].size)
      return mismatch(fmt::format("memory backend {} has size {}, the image's block has {}",
                                  o.object.id, *size ? format_size(**size) : "unset",
                                  format_size(blocks[i].size)));
    // QEMU loads this block from the image's migration section itself.
    matched[i] = true;
    if (blocks[i].via_qemu()) continue;
    if (!lazy && o.object.qom_type != "memory-backend-file")
      return mismatch(fmt::format("memory backend {} is {}; an eager restore fills a file",
                                  o.object.id, o.object.qom_type),
                      "use memory-backend-file with share=on and a mem-path, or --lazy");
    matched[i] = true;
    plans.push_back(BackendPlan{o.index, i, o.object});
  }
  for (size_t i = 0; i < blocks.size(); i++)
    // A block QEMU saved may come from -m alone (no -object, QEMU's own
    // pc.ram): only one the VM had an -object for, on its command line or
    // hot-plugged, is missing (QEMU said "Unknown ramblock" after it started).
    if (!matched[i] && (!blocks[i].via_qemu() || had_backend(meta, blocks[i].id)))
      return mismatch(fmt::format("the image has RAM block {} ({}) but the command has no "
                                  "memory backend with id={}",
                                  blocks[i].id, format_size(blocks[i].size), blocks[i].id),
                      cmd.has_option("readconfig")
                          ? "vmsave reads memory backends from the command line, not from "
                            "-readconfig files: give that -object on the command line"
                          : "pass the command line the VM was saved with (vmsave info shows it), "
                            "with an -object and -device for memory hot-plugged after it started");
  return plans;
}

// The machine the device state was saved from: its type, -m, -cpu and CPU
// count, against what the save recorded.

Status check_machine(const QemuCommand& cmd, const nlohmann::json& meta) {
  if (meta.contains("machine_type")) {
    auto t = cmd.machine_type();
    const std::string saved = meta["machine_type"].get<std::string>();
    // "pc" and "pc-i440fx-10.0" are one machine in QEMU 10.0: compared as
    // QEMU resolved the saved one (its QOM type is "pc-i440fx-10.0-machine").
    std::string resolved = meta.value("machine_qom_type", "");
    if (resolved.ends_with("-machine")) resolved.resize(resolved.size() - 8);
    if (t.ok() && *t && **t != saved &&
        (resolved.empty() || resolve_machine(cmd.argv()[0], **t) != resolved))
      return mismatch(fmt::format("machine type {} differs from the saved {}{}", **t, saved,
                                  resolved.empty() || resolved == saved
                                      ? ""
                                      : fmt::format(" ({})", resolved)));
  }
  if (meta.contains("memory_size")) {
    auto m = cmd.memory_size();
    if (m.ok() && *m && **m != meta["memory_size"].get<i64>())
      return mismatch(fmt::format("-m {} differs from the saved {}", format_size(**m),
                                  format_size(meta["memory_size"].get<i64>())));
  }
  // What QEMU itself does not check before it has read the RAM, or at all:
  // under TCG a guest restored with another -cpu runs on, looping in a fault
  // handler, and another CPU count fails deep in the device state with a
  // message about some device. From the saved command line (images from
  // vmsave before 0.1 lack it).
  auto saved_cmd = saved_command(meta);
  if (!saved_cmd) return Status();
  // No -cpu is QEMU's default model, qemu64 on x86_64 whatever the machine.
  // The target is the saved VM's, told by its binary or its machine type
  // (the command may start with a wrapper, taskset or env, or a binary of
  // another name): a restore runs the same target, or its machine differs.
  const std::string& binary = saved_cmd->argv()[0];
  const std::string qom = meta.value("machine_qom_type", "");
  const bool x86_64 = binary.ends_with("qemu-system-x86_64") ||
                      (!binary.ends_with("qemu-system-i386") &&
                       (qom.starts_with("pc-") || qom.starts_with("microvm")));
  auto model = [&](const QemuCommand& c) {
    auto v = c.option_values("cpu");
    if (!v.empty()) return v.back();
    return std::string(x86_64 ? "qemu64" : "(none)");
  };
  if (!same_cpu(model(cmd), model(*saved_cmd)))
    return mismatch(fmt::format("-cpu {} differs from the saved {}", model(cmd), model(*saved_cmd)));
  // Memory hot-plug: slots and maxmem shape the machine (ACPI tables, the
  // device-memory region); QEMU fails in the device state on another
  // ("Missing section footer for 0000:00:1f.0/ICH9LPC"). slots=0 and a
  // maxmem equal to the size are QEMU's defaults, the same machine as none.
  for (std::string key : {"slots", "maxmem"}) {
    auto spelled = [&](const QemuCommand& c) -> std::string {
      auto v = c.memory_option(key);
      if (!v.ok() || !*v) return "";
      auto bytes = parse_size(**v);
      auto size = c.memory_size();
      if (key == "slots" && **v == "0") return "";
      if (key == "maxmem" && bytes.ok() && size.ok() && *size && *bytes == **size) return "";
      return key + "=" + (key == "maxmem" && bytes.ok() ? format_size(*bytes) : **v);
    };
    std::string now = spelled(cmd), was = spelled(*saved_cmd);
    if (now == was) continue;
    return mismatch(now.empty()   ? fmt::format("-m has no {}, the VM was saved with {}", key, was)
                    : was.empty() ? fmt::format("-m has {}, the VM was saved without", now)
                                  : fmt::format("-m {} differs from the saved {}", now, was));
  }
  // Which backend each NUMA node has sets where its RAM is in the guest:
  // another order puts the saved pages at other guest addresses. QEMU says
  // so for a file it fills ("Mismatched GPAs"), not for the image a lazy
  // restore maps, and the guest died at once.
  auto nodes = [](const QemuCommand& c) {
    std::map<i64, std::string> memdev;
    for (const std::string& v : c.option_values("numa")) {
      auto kv = KeyvalList::parse(v, "type", KeyvalSyntax::kQemuOpts);
      if (!kv.ok() || kv->get("type").value_or("node") != "node") continue;
      i64 id = i64(memdev.size());  // QEMU's default: the nodes so far
      if (auto n = kv->get("nodeid"); n) std::from_chars(n->data(), n->data() + n->size(), id);
      memdev[id] = kv->get("memdev").value_or("");
    }
    return memdev;
  };
  const auto now_nodes = nodes(cmd), was_nodes = nodes(*saved_cmd);
  if (now_nodes.size() != was_nodes.size())
    return mismatch(fmt::format("-numa gives {} nodes, the VM was saved with {}", now_nodes.size(),
                                was_nodes.size()));
  for (auto& [id, memdev] : was_nodes) {
    auto it = now_nodes.find(id);
    const std::string now = it == now_nodes.end() ? "" : it->second;
    if (now != memdev)
      return mismatch(fmt::format("NUMA node {} has {}, the VM was saved with {}", id,
                                  now.empty() ? "no memdev" : "memdev=" + now,
                                  memdev.empty() ? "none" : "memdev=" + memdev));
  }
  auto n = cmd.cpu_count();
  auto was = saved_cmd->cpu_count();
  if (n.ok() && was.ok() && *n != *was)
    return mismatch(fmt::format("-smp gives {} CPUs, the VM was saved with {}", *n, *was));
  return Status();
}

void make_lazy(QemuObject& o, const std::string& image, i64 offset) {
  for (const char* p : kSourceProps) o.erase(p);
  o.qom_type = "memory-backend-file";
  o.set("mem-path", image);
  o.set("offset", o.json_syntax ? nlohmann::json(offset) : nlohmann::json(std::to_string(offset)));
  o.set("share", o.json_syntax ? nlohmann::json(false) : nlohmann::json("off"));
  o.set("readonly", o.json_syntax ? nlohmann::json(true) : nlohmann::json("on"));
  o.set("rom", "off");  // OnOffAuto, a string in JSON syntax too
}

// Eager: creates the RAM file each backend will map, sized but not yet
// filled, so that QEMU can start while they fill.
Result<std::vector<RamFile>> create_ram_files(std::vector<BackendPlan>& plans,
                                              const ImageReader& img, bool force,
                                              Watchdog* watchdog) {
  for (auto& p : plans) {
    auto mp = p.object.get_string("mem-path");
    if (!mp) return mismatch(fmt::format("memory backend {} has no mem-path", p.object.id));
    struct stat st;
    if (stat(mp->c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
      // QEMU would create and unlink a file here; vmsave creates it, fills
      // it, points the backend at it and unlinks it once QEMU has it mapped.
      p.ram_file = fmt::format("{}/vmsave-{}-{}", *mp, p.object.id, getpid());
      p.unlink_after = true;
      p.object.set("mem-path", p.ram_file);
    } else {
      p.ram_file = *mp;
    }
  }
  // Backends may share a file at different offsets: one RamFile each file.
  struct Shared {
    std::string key;  // absolute and normal: one file however it is spelt
    std::string path;
    std::vector<RamFile::Part> parts;
  };
  std::vector<Shared> by_file;
  for (auto& p : plans) {
    auto offset = p.object.get_size("offset");
    if (!offset.ok()) return offset.error().as(Exit::kUsage);
    std::error_code ec;
    std::string key = std::filesystem::absolute(p.ram_file, ec).lexically_normal().string();
    auto it = std::find_if(by_file.begin(), by_file.end(), [&](auto& e) { return e.key == key; });
    if (it == by_file.end()) it = by_file.insert(by_file.end(), {key, p.ram_file, {}});
    it->parts.push_back({p.block, offset->value_or(0)});
  }
  std::vector<RamFile> files;
  SpaceClaims claims;
  for (auto& [key, path, parts] : by_file) {
    auto f = RamFile::create(img, parts, path, force, watchdog, claims);
    if (!f.ok()) return f.error();
    files.push_back(std::move(*f));
  }
  return files;
}

// The RAM QEMU loaded from its own section of the image (memfd, anonymous).
void add_qemu_ram(nlohmann::json& j, const ImageReader& img) {
  i64 by_qemu = 0;
  for (auto& b : img.layout().blocks)
    if (b.via_qemu()) by_qemu += b.size;
  if (by_qemu) j["qemu_ram_bytes"] = by_qemu;
}

// Loads the image's device state into a QEMU waiting with -incoming defer,
// then resumes the guest if `run`.
Status load_and_resume(QmpClient& qmp, const ImageReader& img, bool run, Reporter& rep,
                       double* vmstate_s) {
  auto t0 = std::chrono::steady_clock::now();
  Capabilities caps;
  Progress progress;
  Status st;
  if (img.layout().has_qemu_section()) {
    // RAM and device state come from the image's QEMU section, read by
    // QEMU's multifd threads (O_DIRECT where the filesystem allows).
    VMSAVE_TRY(caps.set(qmp, mapped_ram_capabilities(), {"mapped-ram", "multifd"}));
    MappedRamFds fds;
    auto d = img.reopen(O_RDONLY | O_DIRECT);
    if (d.ok()) fds.direct = std::move(*d);
    auto b = img.reopen(O_RDONLY);
    if (!b.ok()) return b.error();
    fds.buffered = std::move(*b);
    // QEMU reports no progress for an incoming migration: time only.
    rep.begin_phase("QEMU loading RAM and device state", nullptr);
    st = mapped_ram_migrate(qmp, true, fds, img.layout().qemu.offset, [&](const nlohmann::json&) {});
  } else {
    VMSAVE_TRY(caps.set(qmp, {{"x-ignore-shared", true}}, {"x-ignore-shared"}));
    // Compressed, the stored length is not what QEMU receives: bytes only.
    if (img.layout().vmstate_codec == Codec::kRaw) progress.total = img.layout().vmstate.length;
    auto started = [&] { rep.begin_phase("loading device state", &progress); };
    st =
        load_device_state(qmp, started, [&](const std::function<Status(const u8*, size_t)>& write) {
          return img.stream_vmstate([&](const u8* d, size_t n) {
            progress.done += n;
            return write(d, n);
          });
        });
    // QEMU may refuse a damaged stream before its end, where the section's
    // checksum is compared (a flipped byte decompresses to a wrong migration
    // flag): then the damage is the cause, not the command line.
    if (!st.ok() && st.error().status != Exit::kDamaged && !cancelled()) {
      Status whole = img.stream_vmstate(nullptr);
      if (!whole.ok() && whole.error().status == Exit::kDamaged) st = whole;
    }
  }
  rep.end_phase(!st.ok());
  if (!st.ok()) return st;
  *vmstate_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Loaded: the capabilities go back to what QEMU had, or the VM's next
  // ordinary migration would fail ("Capability x-ignore-shared is off, but
  // received capability is on").
  if (!caps.restore(qmp))
    rep.warn("QEMU did not switch the migration capabilities vmsave set back off; set them off "
             "(migrate-set-capabilities) before migrating this VM elsewhere");
  // Interrupted while QEMU loaded (which a first signal lets finish): the
  // guest stays paused, never resumed behind the user's back.
  if (cancelled()) {
    Error e = interrupted_error();
    if (e.status == Exit::kInterrupted)
      e.hint =
          "QEMU had begun loading the device state, which it cannot take twice, so the "
          "load was let finish: the guest is paused (resume it with the QMP command cont)";
    return e;
  }
  // Loaded, but it cannot run: a disk another QEMU holds, say.
  auto cannot_run = [](Error e) {
    // Failed to get "write" lock, or "consistent read" (not "#block12").
    e.hint = e.detail.find("\" lock") != std::string::npos
                 ? "the guest's state is loaded but QEMU cannot run it: another process (the "
                   "VM it was saved from, still running?) holds a disk image it uses; stop "
                   "that VM, or give this one its own copy of the disks"
                 : "the guest's state is loaded but QEMU cannot run it; see QEMU's message (a "
                   "disk image another QEMU still uses?)";
    return e;
  };
  if (run) {
    auto r = qmp.execute("cont");
    if (!r.ok()) return cannot_run(r.error());
  } else {
    // An incoming QEMU takes its disks' locks only at cont: a paused
    // restore onto a disk the saved VM still used exited 0, and the user's
    // cont failed later (trial X). QEMU 10.0 can take them now.
    if (auto r = take_disk_locks(qmp); !r.ok()) return cannot_run(r.error());
    // QEMU starts the guest by itself when the stream says it ran to the
    // end (a live save through QEMU stops it only for the last round).
    auto s = qmp.execute("query-status");
    if (!s.ok()) return s.error();
    if (s->value("running", false)) {
      auto r = qmp.execute("stop");
      if (!r.ok()) return r.error();
    }
  }
  return Status();
}

// The image and its metadata, both checked.
struct OpenedImage {
  std::unique_ptr<ImageReader> reader;
  nlohmann::json meta;
};

Result<OpenedImage> open_image(const std::string& path, Reporter& rep) {
  auto r = ImageReader::open(path, [&](const std::string& m) { rep.warn(m); });
  if (!r.ok()) return r.error();
  auto meta = (*r)->metadata();
  if (!meta.ok()) return meta.error();
  warn_bytes_past_end(**r, rep);
  return OpenedImage{std::move(*r), std::move(*meta)};
}

// Whether an argument of `cmd` other than argv[skip] (the backend's own
// -object) names backend `id`: every use does (memdev=ID,
// memory-backend=ID, "memdev": "ID").
bool names_backend(const QemuCommand& cmd, const std::string& id, size_t skip) {
  const auto& argv = cmd.argv();
  for (size_t a = 1; a < argv.size(); a++) {
    if (a == skip) continue;
    const std::string& arg = argv[a];
    for (size_t at = arg.find(id); at != std::string::npos; at = arg.find(id, at + 1)) {
      const size_t end = at + id.size();
      const char before = at ? arg[at - 1] : ',';
      const char after = end < arg.size() ? arg[end] : ',';
      if ((before == '=' || before == '"' || before == '/') && (after == ',' || after == '"'))
        return true;
    }
  }
  return false;
}

// Each memory backend of the command that is a block of the image, those
// QEMU loads itself included.
std::vector<BackendPlan> backends_in_image(const QemuCommand& cmd, const ImageReader& img) {
  std::vector<BackendPlan> out;
  if (auto objs = cmd.objects(); objs.ok())
    for (auto& o : *objs)
      for (size_t i = 0; i < img.layout().blocks.size(); i++)
        if (img.layout().blocks[i].id == o.object.id)
          out.push_back(BackendPlan{o.index, i, o.object});
  return out;
}

// A backend that nothing uses gives QEMU a RAM block it does not migrate,
// and the load fails deep in the stream ("Unknown ramblock dimm1"): a DIMM
// hot-plugged before the save, with its -device left out of the restore.
// Unused in the saved command too, it is the same VM.
Status check_backends_used(const QemuCommand& cmd, const std::vector<BackendPlan>& plans,
                           const nlohmann::json& meta) {
  if (cmd.has_option("readconfig")) return Status();  // uses may be in the file
  auto saved = saved_command(meta);
  if (!saved) return Status();
  auto saved_objs = saved->objects();
  if (!saved_objs.ok()) return Status();
  for (const BackendPlan& p : plans) {
    const std::string& id = p.object.id;
    if (names_backend(cmd, id, p.arg_index)) continue;
    auto was = std::find_if(saved_objs->begin(), saved_objs->end(),
                            [&](const ObjectArg& o) { return o.object.id == id; });
    if (was != saved_objs->end() && !names_backend(*saved, id, was->index)) continue;
    // Plugged after start, but no memory device used it when the VM was
    // saved (its DIMM unplugged, the object kept): unused then too.
    if (was == saved_objs->end() && used_by_memory_device(meta, id) == false) continue;
    const std::string why = was == saved_objs->end()
                                ? "the VM got it after it started (memory hot-plug)"
                                : "the VM was saved with a device using it";
    return mismatch(fmt::format("no device, NUMA node or -machine memory-backend uses memory "
                                "backend {}; {}",
                                id, why),
                    fmt::format("add the -device that uses it, as it was plugged in (e.g. "
                                "-device pc-dimm,id=DIMM,memdev={})",
                                id));
  }
  return Status();
}

// virtio-mem discards its unplugged memory when the device state loads,
// which QEMU cannot do in a read-only mapping ("Discarding RAM with
// readonly files is not supported"): the load fails after QEMU started.
Status check_lazy_devices(const QemuCommand& cmd, const std::vector<BackendPlan>& plans) {
  for (const std::string& dev : cmd.option_values("device")) {
    std::string driver, memdev;
    if (!dev.empty() && dev[0] == '{') {
      auto j = nlohmann::json::parse(dev, nullptr, false);
      driver = json_string(j, "driver").value_or("");
      memdev = json_string(j, "memdev").value_or("");
    } else {
      auto kv = KeyvalList::parse(dev, "driver", KeyvalSyntax::kQemuOpts);
      if (!kv) continue;
      driver = kv->get("driver").value_or("");
      memdev = kv->get("memdev").value_or("");
    }
    if (!driver.starts_with("virtio-mem")) continue;
    for (auto& p : plans)
      if (p.object.id == memdev)
        return Error{"cannot restore lazily", "",
                     fmt::format("memory backend {} belongs to a virtio-mem device, which "
                                 "discards memory that a read-only mapping of the image cannot",
                                 memdev)}
            .fix("restore it eagerly (without --lazy)")
            .as(Exit::kUsage);
  }
  return Status();
}

// A lazy restore maps the RAM regions as guest RAM; compressed chunks are
// not pages. Checked before anything is started or written.
Status check_lazy(const ImageReader& img, const std::string& path) {
  if (!img.compressed()) return Status();
  return Error{"cannot restore a compressed image lazily", path,
               "--lazy maps RAM regions as guest memory, and this image's chunks are compressed"}
      .fix("restore it eagerly (without --lazy), or save the VM without --compress")
      .as(Exit::kUsage);
}

// Truncates the RAM file at `path` to nothing (never through a symlink).
Error cannot_empty(const std::string& path, int err) {
  return sys_error("cannot empty the RAM file for QEMU", path, err)
      .fix("remove it, or give the backend another mem-path");
}

Status empty_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  if (!fd.valid() && errno == EACCES)  // write-only: not_an_image() refuses it
    fd = UniqueFd(::open(path.c_str(), O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  if (!fd.valid()) return cannot_empty(path, errno);
  // Looked at again through this descriptor: an image renamed to the path
  // since the plan's check is not emptied.
  VMSAVE_TRY(not_an_image(fd.get(), path, ""));
  if (ftruncate(fd.get(), 0) < 0) return cannot_empty(path, errno);
  return Status();
}

// A block QEMU saved is loaded by QEMU into whatever its backend maps, and
// only its non-zero pages: mapped-ram leaves zero pages out and expects the
// destination's to be zero. So an existing file at a memory-backend-file's
// mem-path must be emptied first, which overwrites it (another VM's RAM, or
// one left behind) and needs --force as for the files vmsave fills. A
// private mapping (share=off: a template, a lazy clone's image) cannot be
// emptied without destroying that file, and would show its pages where the
// guest had zeros: refused, unless they are all zeros. Returns the files to
// empty before QEMU starts.
// The files QEMU loads RAM into must have room for what it writes there:
// at most the RAM its save wrote, nor more than their blocks. A tmpfs too
// small made QEMU die of SIGBUS part-way, a partial file left behind.
// `files`: each path with its block's size and what it holds now.
Status check_qemu_load_room(const std::vector<std::tuple<std::string, i64, i64>>& files,
                            const nlohmann::json& meta, i64 section_bytes) {
  i64 written = section_bytes;
  if (auto m = meta.find("qemu_migration"); m != meta.end() && m->is_object())
    written = std::min(written, m->value("ram_bytes_written", written));
  std::map<dev_t, i64> need, freed;
  std::map<dev_t, std::string> first;
  std::map<dev_t, struct statvfs> fs;
  for (auto& [path, size, holds] : files) {
    // Not `dir = "."` after: GCC 12 -O3 warns of an overlapping memcpy
    // there (-Wrestrict, a false positive of its own).
    const std::filesystem::path parent = std::filesystem::path(path).parent_path();
    const std::string dir = parent.empty() ? std::string(".") : parent.string();
    struct stat st;
    struct statvfs sv;
    if (stat(dir.c_str(), &st) < 0 || statvfs(dir.c_str(), &sv) < 0 || sv.f_blocks == 0) continue;
    need[st.st_dev] += size;
    freed[st.st_dev] += holds;
    first.emplace(st.st_dev, path);
    fs[st.st_dev] = sv;
  }
  for (auto& [dev, n] : need) {
    const i64 want = std::min(n, written);
    const i64 room = i64(fs[dev].f_bavail) * i64(fs[dev].f_frsize) + freed[dev];
    if (room < want)
      return Error{"not enough space for RAM file", first[dev],
                   fmt::format("QEMU loads up to {} of RAM into it (and the RAM files beside it), "
                               "its filesystem has {} free",
                               human_bytes(double(want)), human_bytes(double(room)))}
          .fix("free space on that filesystem or choose another place for it");
  }
  return Status();
}

// `made`: the files QEMU will make, which a failed restore removes.
Result<std::vector<std::string>> check_qemu_loaded_files(const QemuCommand& cmd,
                                                         const ImageReader& img,
                                                         const nlohmann::json& meta, bool force,
                                                         std::vector<std::string>* made) {
  auto objs = cmd.objects();
  if (!objs.ok()) return objs.error().as(Exit::kUsage);
  std::vector<std::string> to_empty;
  std::vector<std::tuple<std::string, i64, i64>> loaded;  // path, block size, held now
  for (auto& o : *objs) {
    if (o.object.qom_type != "memory-backend-file") continue;
    bool by_qemu = false;
    i64 size = 0;
    for (auto& b : img.layout().blocks)
      if (b.id == o.object.id && b.via_qemu()) by_qemu = true, size = b.size;
    auto mp = o.object.get_string("mem-path");
    struct stat st;
    const bool found = mp && stat(mp->c_str(), &st) == 0;
    const bool missing = mp && !found && errno == ENOENT;
    auto share = o.object.get_bool("share");
    if (by_qemu && missing) {
      // A lazy clone's command, saved with it, maps the image it came from
      // read-only; moved or removed, QEMU fails at start-up.
      auto ro = o.object.get_bool("readonly");
      if (ro.ok() && ro->value_or(false))
        return Error{"backend " + o.object.id + " maps a file that does not exist", *mp,
                     "read-only (readonly=on, as a lazy clone maps its image), so QEMU cannot "
                     "create it"}
            .fix(fmt::format("give backend {} a mem-path without readonly=on (as the VM was "
                             "first started), or use memory-backend-ram",
                             o.object.id));
      if (share.ok() && share->value_or(false)) {  // QEMU makes it and fills it
        loaded.emplace_back(*mp, size, 0);
        made->push_back(*mp);
      }
    }
    if (!by_qemu || !found || !S_ISREG(st.st_mode)) continue;
    if (!share.ok()) return share.error().as(Exit::kUsage);
    if (!share->value_or(false)) {
      // All zeros (the file QEMU made for a share=off backend: its writes
      // never reach the file) shows the guest nothing but zeros.
      UniqueFd fd(::open(mp->c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
      if (!fd.valid()) return sys_error("cannot read the RAM file for QEMU", *mp, errno);
      auto at = first_nonzero(fd.get(), 0, st.st_size, *mp);
      if (!at.ok()) return at.error();
      if (*at < 0) continue;
      return Error{"cannot load block " + o.object.id + " over a private mapping", *mp,
                   "QEMU saved this block and loads only its non-zero pages; with share=off "
                   "the guest would see this file's content where it had zeros"}
          .fix(fmt::format("give backend {} a mem-path that does not exist (or use "
                           "memory-backend-ram); this file is left as it is",
                           o.object.id));
    }
    VMSAVE_TRY(check_not_an_image(*mp, st, img, o.object.id));
    VMSAVE_TRY(check_not_mapped(*mp, st));
    if (!force)
      return Error{
          "RAM file exists", *mp,
          fmt::format("QEMU would load block {} into it; refusing to overwrite it", o.object.id)}
          .fix("pass --force to overwrite it, or remove it");
    to_empty.push_back(*mp);
    loaded.emplace_back(*mp, size, i64(st.st_blocks) * 512);
  }
  VMSAVE_TRY(check_qemu_load_room(loaded, meta, img.layout().qemu.length));
  return to_empty;
}

// A QMP error reply carries QEMU's own reason ("QEMU refused cont
// (SOCKET): GenericError: Failed to get "write" lock"): it is not lost to
// -daemonize, as a closed connection's is (trial V saw both said at once).
bool qemu_gave_reason(const Error& e) {
  const size_t colon = e.detail.find(": ");
  // Not "QEMU refused the device state": its detail may be QEMU's generic
  // "load of migration failed", the cause gone where -daemonize sends it.
  return e.what.starts_with("QEMU refused ") && e.what != "QEMU refused the device state" &&
         colon != std::string::npos && colon + 2 < e.detail.size();
}

// Raw images hold memory files, not a VM: no QEMU can load them. A usage
// error, as --lazy of an image QEMU saved is: the image is fine.
Status check_qemu_image(const nlohmann::json& meta, const std::string& image) {
  if (meta.value("mode", "") == "qemu") return Status();
  return Error{"not a QEMU image", image, "it holds memory files saved with --ram"}
      .fix("restore it with vmsave restore IMAGE --ram-dir DIR")
      .as(Exit::kUsage);
}

// Two restores whose commands name one QMP socket each found the path
// free, and the QEMU started second took it from the first (QEMU unlinks
// and binds anew): one restore reported the other's VM, and its own QEMU
// waited unreachable (trial Q). The path is claimed, by an abstract socket
// named after it, while this restore runs; by then its QEMU listens there,
// which check_socket_path_free() refuses.
Result<UniqueFd> claim_qmp_path(const std::string& path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return sys_error("socket(AF_UNIX)", path, errno);
  const std::string abs = absolute(path);
  const std::string name = fmt::format("vmsave-qmp-{:016x}", XXH3_64bits(abs.data(), abs.size()));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  memcpy(addr.sun_path + 1, name.data(), name.size());  // sun_path[0] == 0: abstract
  const auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), len) < 0) {
    if (errno == EADDRINUSE)
      return Error{"the QEMU command's QMP socket is in use", path,
                   "another vmsave is restoring a VM with this socket"}
          .fix("give each VM its own -qmp socket, or wait for that restore to finish");
    return sys_error("cannot claim the QMP socket's path", path, errno);
  }
  return fd;
}

// A socket the command listens on must not be another process's: QEMU
// unlinks the path and binds anew, taking it from a running VM. A second
// clone started with the same -qmp path would have vmsave talk to the
// first, changing its migration settings; with the same -monitor path the
// first VM's monitor answered for the second, and once that clone quit
// the first VM had no socket left to be saved through (trial Z). Nor may
// the path be a file: QEMU removes it. `what` is the socket as the error
// names it ("QMP socket"), `fix` the way out when it is in use.
Status check_socket_path_free(const std::string& path, const std::string& what,
                              const std::string& fix) {
  struct stat st;
  sockaddr_un addr{};
  // A symbolic link is replaced itself, whatever it points to.
  if (lstat(path.c_str(), &st) < 0 || S_ISLNK(st.st_mode)) return Status();
  if (!S_ISSOCK(st.st_mode))
    return Error{fmt::format("the QEMU command's {} names a file that is not a socket", what), path,
                 S_ISDIR(st.st_mode) ? "it is a directory" : "QEMU would remove it to listen there"}
        .fix("give the socket a path where no file is");
  if (path.size() >= sizeof(addr.sun_path)) return Status();
  addr.sun_family = AF_UNIX;
  memcpy(addr.sun_path, path.data(), path.size());
  // A QEMU that was just killed can still hold its listener for moments
  // after its process is gone (SO_PEERCRED says pid 0, or a zombie's), its
  // backlog full of the connections nobody accepts (EAGAIN): a retry
  // straight after a killed restore was refused (2 runs in 6, then 1 in 12
  // when only EAGAIN ended the wait at once). Only a live process ends the
  // wait early; one that stays 2 s without one belongs to a process this
  // pid namespace does not see, or to a QEMU too busy to accept.
  pid_t pid = -1;
  for (int attempt = 0; attempt < 100; attempt++) {  // 2 s
    if (attempt > 0) {
      if (cancelled()) return interrupted_error();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd) return sys_error("socket(AF_UNIX)", path, errno);
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0) {
      if (errno == EAGAIN) continue;  // its backlog full: busy, or going
      return Status();                // left behind by a QEMU that is gone: QEMU replaces it
    }
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (::getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) break;
    // A QEMU that was just killed accepts connections until its last
    // thread has exited, while its leader is already a zombie, or still
    // freeing its memory (trial Z2: 4 refusals in 67 kill -9s): it is going.
    if (cred.pid > 0 && process_going(cred.pid)) return Status();
    if (cred.pid > 0) {
      pid = cred.pid;
      break;
    }
  }
  std::string who =
      pid > 0 ? fmt::format("process {} listens on it", pid) : "another process listens on it";
  return Error{fmt::format("the QEMU command's {} is in use", what), path, who}.fix(fix);
}

// Files QEMU would write (serial logs, -D, its log) that another process
// writes already: a clone given a running VM's serial log emptied it
// (without append=on) or mixed both guests' output in it (trial Z). One
// walk of /proc for all of them: it costs about 4 ms per 1000 open files.
Status check_outputs_free(const QemuCommand& cmd, const std::string& log) {
  auto outs = cmd.output_files();
  if (!outs.ok()) return outs.error().as(Exit::kUsage);
  // vmsave empties QEMU's log before QEMU starts: never one of its files.
  struct stat log_st;
  if (!log.empty() && stat(log.c_str(), &log_st) == 0 && S_ISREG(log_st.st_mode))
    for (const auto& f : *outs) {
      struct stat st;
      if (stat(f.path.c_str(), &st) == 0 && st.st_dev == log_st.st_dev &&
          st.st_ino == log_st.st_ino)
        return Error{"QEMU's log is the QEMU command's file for " + f.option, log,
                     "a restore empties its log before QEMU starts"}
            .fix("give --qemu-log a file of its own");
    }
  if (!log.empty()) outs->push_back(OutputFile{log, ""});
  std::vector<struct stat> files;
  std::vector<const OutputFile*> named;
  for (const auto& f : *outs) {
    // Names QEMU resolves in its own process, whose output vmsave sets up.
    if (f.path == "/dev/stdout" || f.path == "/dev/stderr" || f.path.starts_with("/dev/fd/") ||
        f.path.starts_with("/proc/self/") || f.path.starts_with("/proc/thread-self/"))
      continue;
    struct stat st;
    if (stat(f.path.c_str(), &st) < 0 || !S_ISREG(st.st_mode)) continue;
    files.push_back(st);
    named.push_back(&f);
  }
  if (files.empty()) return Status();
  // The QEMU a save just made quit (its leader a zombie, its last threads
  // going) still has its files open for a moment: looked at again for up
  // to 2 s.
  Mapper w;
  size_t which = 0;
  for (int attempt = 0; attempt < 100; attempt++) {
    w = find_writer(files, &which);
    if (!w.pid || !process_going(w.pid)) break;
    if (cancelled()) return interrupted_error();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (!w.pid) return Status();
  const OutputFile& f = *named[which];
  const std::string who = fmt::format("process {} ({}) writes it", w.pid, w.name);
  if (f.option.empty())
    return Error{"QEMU's log is open in another process", f.path, who}.fix(
        "give each restore its own --qemu-log");
  return Error{"the QEMU command's file for " + f.option + " is open in another process", f.path,
               who}
      .fix("give each VM its own file for " + f.option);
}

// The guest keeps the MAC address it was saved with: a network card's
// address is part of its device state (virtio-net's config space, e1000's
// registers), and only QEMU's idea of it (its announcements after the
// restore, `info network`) follows a new mac=. A clone given its own ran on
// with the saved one, unsaid (trial Z).
void warn_of_changed_macs(const QemuCommand& cmd, const nlohmann::json& meta, Reporter& rep) {
  auto saved = saved_command(meta);
  if (!saved) return;
  auto before = saved->nic_macs();
  auto now = cmd.nic_macs();
  if (!before.ok() || !now.ok()) return;
  // The same cards in the same order are the same devices, however renamed
  // or respelled (-nic for -device); else matched by name.
  const bool by_order = before->size() == now->size();
  for (size_t i = 0; i < now->size(); i++) {
    const NicMac& n = (*now)[i];
    auto was = by_order ? before->begin() + i
                        : std::find_if(before->begin(), before->end(),
                                       [&](const NicMac& b) { return b.card == n.card; });
    if (was == before->end() || was->mac == n.mac) continue;
    rep.warn(fmt::format(
        "network card {}: the guest keeps its saved MAC address {}; the command's {}{} changes "
        "only the address QEMU announces: set it inside the guest",
        n.card, was->mac, n.by_default ? "(QEMU's default) " : "", n.mac));
  }
}

// Every socket but the QMP one (checked with its claim): see
// check_socket_path_free().
Status check_sockets_free(const QemuCommand& cmd, const std::string& qmp_path) {
  auto sockets = cmd.server_sockets();
  if (!sockets.ok()) return sockets.error().as(Exit::kUsage);
  // Two of its own on one path: the second would take it from the first
  // (trial Z2: -monitor on the -qmp path failed once QEMU had started).
  std::map<std::string, std::string> seen;
  for (const auto& s : *sockets) {
    auto [at, fresh] = seen.emplace(absolute(s.path), s.option);
    if (!fresh)
      return Error{"the QEMU command names one socket twice", s.path,
                   fmt::format("{} and {} both listen there", at->second, s.option)}
          .fix("give each its own path")
          .as(Exit::kUsage);
  }
  for (const auto& s : *sockets) {
    if (!qmp_path.empty() && absolute(s.path) == absolute(qmp_path)) continue;
    VMSAVE_TRY(check_socket_path_free(s.path, "socket (" + s.option + ")",
                                      "give each VM its own path for " + s.option));
  }
  return Status();
}

// Whether another open file holds QEMU's lock byte `at` of `fd` (QEMU takes
// byte 100 + n for each permission n it has, 200 + n for each it denies
// others: raw_apply_lock_bytes in block/file-posix.c).
bool lock_byte_held(int fd, off_t at) {
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = at;
  fl.l_len = 1;
  return ::fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
}

// The signal that killed the QEMU vmsave started, or 0 if it did not die
// of one; left unreaped for kill_qemu. Its QMP connection closes a moment
// before the process is gone, so this waits up to a second for it.
int killing_signal(pid_t pid) {
  for (int i = 0; i < 100; i++) {
    if (auto info = peek_exit(pid)) return info->si_code == CLD_EXITED ? 0 : info->si_status;
    if (errno == ECHILD) return 0;  // not our child (a daemon), or already reaped
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return 0;
}

// What the file `fd` is at its start: not a vmsave image, another image, or
// the one with `uuid` (under another name, or overlayfs's file below).
enum class ImageMatch { kNotAnImage, kOther, kSame };
ImageMatch image_match(int fd, const std::array<u8, 16>& uuid) {
  DiskHeader h{};
  if (::pread(fd, &h, sizeof(h), 0) != ssize_t(sizeof(h)) ||
      std::memcmp(h.magic, kMagic.data(), 8) != 0)
    return ImageMatch::kNotAnImage;
  return std::memcmp(h.uuid, uuid.data(), 16) == 0 ? ImageMatch::kSame : ImageMatch::kOther;
}

// A lazy restore's QEMU opens the image by its path: a save --force or mv
// that put another file there after vmsave opened it had QEMU map that
// file's RAM under this image's device state, and the restore reported
// success with a dead guest. The path may have been swapped back since (a
// trial swapped two images every 3 ms), so what counts is the file QEMU
// maps at each block's region, found by its offset and length once QEMU
// answers QMP: the same inode, or else (overlayfs shows the file below it)
// a header with this image's UUID.
Status check_lazy_mapped(pid_t pid, const ImageReader& img, const std::vector<BackendPlan>& plans,
                         const std::string& image) {
  struct stat mine;
  if (fstat(img.fd(), &mine) < 0) return sys_error("fstat", image, errno);
  struct statfs fs;
  const bool overlay = fstatfs(img.fd(), &fs) == 0 && fs.f_type == OVERLAYFS_SUPER_MAGIC;
  auto same_image = [&](const FileMapping& m) {
    if (m.dev == mine.st_dev && m.inode == mine.st_ino) return true;
    UniqueFd f(::open(fmt::format("/proc/{}/map_files/{:x}-{:x}", pid, m.start, m.end).c_str(),
                      O_RDONLY | O_CLOEXEC));
    if (!f) return overlay;  // no way to look (not root): only overlayfs explains it
    return image_match(f.get(), img.layout().uuid) == ImageMatch::kSame;
  };
  const std::vector<FileMapping> maps = file_mappings(pid);
  for (const BackendPlan& p : plans) {
    const BlockLayout& b = img.layout().blocks[p.block];
    const u64 length = static_cast<u64>(align_up(b.size, b.page_size));
    for (const FileMapping& m : maps)
      if (m.offset == b.region.offset && m.end - m.start == length && !same_image(m))
        return Error{"the image was replaced while the restore started QEMU", image,
                     fmt::format("QEMU maps another file's RAM for block {}", b.id)}
            .fix("run the restore again once the image is no longer being replaced");
  }
  return Status();
}

// Hot-plugged memory gets its guest address from the order of its -device
// options (or their addr=): listed in another order, two DIMMs swap
// places, and a lazy restore (or QEMU loading its own section) ran the
// guest with each one's memory at the other's address. QEMU has placed
// them by the time it answers QMP.
Status check_memory_devices(QmpClient& qmp, const nlohmann::json& meta) {
  auto saved = meta.find("memory_devices");
  if (saved == meta.end() || !saved->is_array()) return Status();
  auto now = memory_devices(qmp);
  if (!now) return Status();
  for (const auto& was : *saved) {
    const std::string memdev = was.value("memdev", "");
    for (const auto& is : *now) {
      if (is.value("memdev", "") != memdev) continue;
      const std::string id = was.value("id", "");
      const std::string name = fmt::format("memory device {} (backend {})",
                                           id.empty() ? was.value("type", "") : id, memdev);
      std::string differs;
      if (is["addr"] != was["addr"])
        differs = fmt::format("is at guest address {:#x}, the saved VM had it at {:#x}",
                              is.value("addr", u64(0)), was.value("addr", u64(0)));
      else if (was.contains("node") && is.value("node", u64(0)) != was.value("node", u64(0)))
        differs = fmt::format("is on NUMA node {}, the saved VM had it on node {}",
                              is.value("node", u64(0)), was.value("node", u64(0)));
      else if (was.contains("size") && is.value("size", u64(0)) != was.value("size", u64(0)))
        differs = fmt::format("gives the guest {} bytes, the saved VM's gave {} (label-size?)",
                              is.value("size", u64(0)), was.value("size", u64(0)));
      if (differs.empty()) continue;
      const bool placed = is["addr"] != was["addr"];  // by the order of the -device options
      return mismatch(name + " " + differs,
                      fmt::format("{}give {} as vmsave info lists it: -device {}",
                                  placed ? "list the -device options of hot-plugged memory in the "
                                           "order it was plugged, or "
                                         : "",
                                  placed ? "each" : "it", was.value("device", "")));
    }
  }
  return Status();
}

// Room for another number of CPUs (-smp maxcpus, or a topology that makes
// it) fails deep in QEMU's load ("Missing section footer for
// 0000:00:1f.0/ICH9LPC"). The command line may spell it many ways: QEMU's
// count, once it has started, is the one to compare.
Status check_max_cpus(QmpClient& qmp, const nlohmann::json& meta) {
  auto saved = meta.find("max_cpus");
  if (saved == meta.end() || !saved->is_number_integer()) return Status();
  auto cpus = qmp.execute("query-hotpluggable-cpus");
  if (!cpus.ok() || !cpus->is_array()) return Status();
  const i64 was = saved->get<i64>(), now = static_cast<i64>(cpus->size());
  if (now == was) return Status();
  return mismatch(fmt::format("-smp makes room for {} CPU{} (maxcpus), the VM was saved with {}",
                              now, now == 1 ? "" : "s", was),
                  "give -smp the maxcpus and topology the VM was saved with (vmsave info shows "
                  "its command line)");
}

// What only the started QEMU can tell: where it placed memory devices, and
// how many CPUs it has room for.
Status check_started_machine(QmpClient& qmp, const nlohmann::json& meta) {
  VMSAVE_TRY(check_max_cpus(qmp, meta));
  return check_memory_devices(qmp, meta);
}

void kill_qemu(pid_t pid) {
  if (pid <= 0) return;
  // A daemon is not our child: waited for through its pidfd.
  UniqueFd pidfd = open_pidfd(pid);
  if (!pidfd || !kill_and_wait(pidfd.get())) kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);  // a child is reaped; a daemon is not (ECHILD)
}

// The memory backends as the VM was started, so that the ones prepare
// prints keep their other properties (dump=off, merge, policy, host-nodes,
// prealloc), as a restore that rewrites the command line does. None for
// images without the command line.
std::vector<ObjectArg> saved_backends(const nlohmann::json& meta) {
  auto cmd = saved_command(meta);
  if (!cmd) return {};
  auto objs = cmd->objects();
  if (!objs.ok()) return {};
  std::vector<ObjectArg> out;
  for (auto& o : *objs)
    if (o.object.qom_type.starts_with("memory-backend-")) out.push_back(std::move(o));
  return out;
}

}  // namespace

void warn_of_changed_disks(const nlohmann::json& saved, const nlohmann::json& now, Reporter& rep) {
  if (!saved.is_array() || !now.is_array()) return;
  auto canonical = [](const std::string& p) {
    std::error_code ec;
    auto c = std::filesystem::weakly_canonical(p, ec);
    return ec ? p : c.string();
  };
  // Image formats only: a filter on top (throttle, copy-on-read) reads as
  // its driver, and is no other format of the file.
  auto image_format = [](const std::string& f) {
    static const std::set<std::string> kFormats = {"raw", "qcow2", "qcow", "qed",       "vmdk",
                                                   "vdi", "vhdx",  "vpc",  "parallels", "luks"};
    return kFormats.contains(f);
  };
  auto text = [](const nlohmann::json& d, const char* key) {
    return d.is_object() && d.contains(key) && d[key].is_string() ? d[key].get<std::string>()
                                                                  : std::string();
  };
  for (auto& n : now) {
    const std::string device = text(n, "device"), path = text(n, "path");
    auto was = std::find_if(saved.begin(), saved.end(),
                            [&](auto& s) { return text(s, "device") == device; });
    if (path.empty() || was == saved.end() || text(*was, "path").empty()) continue;
    const std::string mine = canonical(path), theirs = canonical(text(*was, "path"));
    const std::string format = text(n, "format"), saved_format = text(*was, "format");
    // Another file altogether is a clone's overlay or a copy: its own story.
    if (mine == theirs && format != saved_format && image_format(format) &&
        image_format(saved_format)) {
      rep.warn(fmt::format(
          "disk {} opens {} as {}, but the VM wrote it as {} at the save: the guest would read "
          "{}'s bytes as its disk and its writes damage the file; give the command format={}",
          device, path, format, saved_format, saved_format, saved_format));
      continue;
    }
    const auto chain = was->find("backing_chain");
    if (chain == was->end() || !chain->is_array()) continue;
    for (auto& below : *chain)
      if (below.is_string() && canonical(below.get<std::string>()) == mine) {
        rep.warn(fmt::format(
            "disk {} opens {}, which lies below {} that the VM wrote at the save: the guest "
            "finds its disk as it was before that snapshot, older than its RAM (its file "
            "systems may break); open {} (vmsave info lists the disks)",
            device, path, text(*was, "path"), text(*was, "path")));
        break;
      }
  }
}

// The local disk image files of the command whose locks QEMU checks: -drive
// file= (not json: or a protocol) or file.filename=, a -blockdev file node's
// filename (key=value or JSON), -hda and the like, -pflash and -cdrom. As in
// QEMU, force-share=on and a -device's share-rw=on opt out; locking=off
// is kept, marked unlocked.
std::vector<DiskFile> locked_disk_files(const QemuCommand& cmd) {
  std::vector<DiskFile> out;
  const bool snapshot_all = cmd.has_option("snapshot");
  auto is_on = [](const std::optional<std::string>& v) {
    auto b = v ? parse_bool(*v, "") : Result<bool>(false);
    return b.ok() && *b;
  };
  auto local = [](const std::string& f) { return !absolute_disk_path(f, "/").empty(); };
  // Drives a -device shares for writing (share-rw=on: a cluster file
  // system): QEMU lets another writer be, so must vmsave.
  std::vector<std::string> shared;
  bool any_shared = false;
  for (const std::string& dev : cmd.option_values("device")) {
    auto kv = KeyvalList::parse(dev, "driver", KeyvalSyntax::kQemuOpts);
    if (!kv.ok() || !is_on(kv->get("share-rw"))) continue;
    any_shared = true;
    shared.push_back(kv->get("drive").value_or(""));
  }
  for (const std::string& d : cmd.option_values("drive")) {
    auto kv = KeyvalList::parse(d, "", KeyvalSyntax::kQemuOpts);
    if (!kv.ok()) continue;
    const std::string driver = kv->get("file.driver").value_or("file");
    const std::string file = kv->get("file").value_or(
        driver == "file" || driver == "host_device" ? kv->get("file.filename").value_or("") : "");
    const std::string id = kv->get("id").value_or("");
    if (!local(file) || is_on(kv->get("force-share")) ||
        (!id.empty() && std::find(shared.begin(), shared.end(), id) != shared.end()))
      continue;
    const bool ro = is_on(kv->get("readonly")) || is_on(kv->get("read-only")) ||
                    kv->get("media") == "cdrom" || is_on(kv->get("snapshot")) ||
                    (snapshot_all && !kv->get("snapshot"));
    out.push_back({file, !ro, kv->get("file.locking") != "off" && kv->get("locking") != "off"});
  }
  for (const std::string& b : cmd.option_values("blockdev")) {
    // A file node's own options: its parent's read-only=on reaches it only
    // as QEMU opens it, so only "someone else writes it" is looked at.
    std::string driver, file, locking;
    bool share = false;
    if (b.starts_with('{')) {
      // QEMU says what is wrong with a value of the wrong type.
      auto j = nlohmann::json::parse(b, nullptr, false);
      driver = json_string(j, "driver").value_or("");
      file = json_string(j, "filename").value_or("");
      locking = json_string(j, "locking").value_or("");
      share = j.is_object() && j.contains("force-share") && j["force-share"] == true;
    } else {
      auto kv = KeyvalList::parse(b, "", KeyvalSyntax::kKeyval);
      if (!kv.ok()) continue;
      driver = kv->get("driver").value_or("");
      file = kv->get("filename").value_or("");
      locking = kv->get("locking").value_or("");
      share = is_on(kv->get("force-share"));
    }
    if ((driver == "file" || driver == "host_device") && local(file) && !share && !any_shared)
      out.push_back({file, false, locking != "off"});
  }
  // -pflash too: clones sharing one writable OVMF_VARS file are common.
  for (const char* opt : {"hda", "hdb", "hdc", "hdd", "fda", "fdb", "sd", "mtdblock", "pflash"})
    for (const std::string& f : cmd.option_values(opt))
      if (local(f)) out.push_back({f, !snapshot_all});
  for (const std::string& f : cmd.option_values("cdrom"))
    if (local(f)) out.push_back({f, false});
  return out;
}

namespace {

// The file QEMU `pid` has open whose path ends in `relative`, or "".
std::string opened_as(pid_t pid, const std::string& relative) {
  const std::string tail = "/" + std::filesystem::path(relative).lexically_normal().string();
  const std::string fds = fmt::format("/proc/{}/fd", pid);
  std::string found;
  DIR* dir = opendir(fds.c_str());
  if (!dir) return found;
  while (dirent* f = readdir(dir)) {
    std::error_code ec;
    std::string target = std::filesystem::read_symlink(fds + "/" + f->d_name, ec).string();
    if (!ec && target.ends_with(tail)) {
      found = target;
      break;
    }
  }
  closedir(dir);
  return found;
}

}  // namespace

// A disk another QEMU holds makes QEMU refuse to run the guest, but only
// at cont: a restore found out after filling all of its RAM and loading the
// device state (trial X). QEMU's own lock bytes tell before anything starts.
Status check_disks_free(const QemuCommand& cmd, Reporter& rep, pid_t qemu) {
  constexpr off_t kPermWrite = 100 + 1, kSharedWrite = 200 + 1;  // BLK_PERM_WRITE is bit 1
  for (DiskFile d : locked_disk_files(cmd)) {
    if (qemu > 0 && !d.path.empty() && d.path[0] != '/') {
      d.path = opened_as(qemu, d.path);
      if (d.path.empty()) continue;  // not open: QEMU says what is wrong with it
    }
    UniqueFd fd(::open(d.path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
    struct stat st;
    if (!fd || fstat(fd.get(), &st) < 0 || !(S_ISREG(st.st_mode) || S_ISBLK(st.st_mode)))
      continue;  // QEMU says what is wrong with it
    // The user's choice, said once more: two writers break the disk (trial Y).
    if (!d.locked) {
      if (lock_byte_held(fd.get(), kPermWrite) ||
          (d.write && lock_byte_held(fd.get(), kSharedWrite)))
        rep.warn(fmt::format(
            "another process (a QEMU) uses disk image {}, and locking=off lets this VM {} it "
            "too: the file systems on it will break; give this VM its own copy of the disk",
            d.path, d.write ? "write" : "read it while that one writes"));
      continue;
    }
    // A QEMU killed just now holds its locks until its last thread has
    // exited: looked at again for up to 2 s before it counts.
    const char* why = nullptr;
    for (int attempt = 0; attempt < 100; attempt++) {
      why = lock_byte_held(fd.get(), kPermWrite)
                ? "another process (a QEMU: the VM it was saved from, still running?) is "
                  "writing it"
            : d.write && lock_byte_held(fd.get(), kSharedWrite)
                ? "another process (a QEMU) uses it and lets no one else write it"
                : nullptr;
      if (!why) break;
      if (cancelled()) return interrupted_error();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (why)
      return Error{"a disk image of the QEMU command is in use", d.path, why}.fix(
          "stop that VM, or give this one its own copy of the disk (an overlay: qemu-img create "
          "-f qcow2 -b DISK -F FORMAT NEW.qcow2)");
  }
  return Status();
}

Result<nlohmann::json> restore_qemu(const RestoreOptions& opts, Reporter& rep) {
  StepTimer timer;
  auto opened = open_image(opts.image, rep);
  if (!opened.ok()) return opened.error();
  const ImageReader& img = *opened->reader;
  const nlohmann::json* meta = &opened->meta;
  if (opts.lazy) VMSAVE_TRY(check_lazy(img, opts.image));
  VMSAVE_TRY(check_qemu_image(*meta, opts.image));

  if (opts.lazy) VMSAVE_TRY(refuse_lazy_qemu_section(img));

  auto cmd_r = QemuCommand::parse(opts.qemu_argv);
  if (!cmd_r.ok()) return cmd_r.error().as(Exit::kUsage);
  QemuCommand& cmd = *cmd_r;
  auto plans_r = plan_backends(cmd, img, *meta, opts.lazy);
  if (!plans_r.ok()) return plans_r.error();
  std::vector<BackendPlan>& plans = *plans_r;
  // Those QEMU loads itself too: the VM had them in use.
  VMSAVE_TRY(check_backends_used(cmd, backends_in_image(cmd, img), *meta));
  if (opts.lazy) VMSAVE_TRY(check_lazy_devices(cmd, plans));
  VMSAVE_TRY(check_machine(cmd, *meta));
  warn_of_changed_macs(cmd, *meta, rep);
  std::vector<std::string> qemu_makes;
  auto to_empty = check_qemu_loaded_files(cmd, img, *meta, opts.force, &qemu_makes);
  if (!to_empty.ok()) return to_empty.error();
  for (auto& v : cmd.option_values("incoming"))
    if (v != "defer")
      return Error{"the QEMU command already has -incoming " + v, "", ""}
          .fix("drop it; vmsave adds -incoming defer")
          .as(Exit::kUsage);

  // Where QEMU's QMP socket and log live: the command's own QMP server
  // socket if it has one, else a private directory that outlives vmsave.
  auto mon = cmd.qmp_socket();
  if (!mon.ok()) return mon.error().as(Exit::kUsage);
  std::string qmp_path;
  UniqueFd qmp_claim;  // held while this restore runs: see claim_qmp_path()
  std::string log = opts.qemu_log;
  std::string run_dir;
  if (*mon && (*mon)->server) {
    qmp_path = (*mon)->path;
    if ((*mon)->wait)
      return Error{"the QEMU command's QMP socket waits for a client at start-up", qmp_path, ""}
          .fix("add wait=off to it")
          .as(Exit::kUsage);
    auto claim = claim_qmp_path(qmp_path);
    if (!claim.ok()) return claim.error();
    qmp_claim = std::move(*claim);
    VMSAVE_TRY(check_socket_path_free(
        qmp_path, "QMP socket",
        "give each VM its own -qmp path, or leave -qmp out (vmsave then adds one)"));
    // QEMU would fail to bind it; said before any RAM file is filled.
    std::string dir = std::filesystem::path(absolute(qmp_path)).parent_path().string();
    struct stat st;
    if (stat(dir.c_str(), &st) < 0 || !S_ISDIR(st.st_mode))
      return Error{"no directory for the QEMU command's QMP socket", dir, "it does not exist"}.fix(
          "create it, or give -qmp a socket in a directory that exists");
  }
  VMSAVE_TRY(check_sockets_free(cmd, qmp_path));
  VMSAVE_TRY(check_disks_free(cmd, rep));
  // Said before any RAM file is created (or, with --force, truncated).
  if (!log.empty()) {
    std::string dir = std::filesystem::path(absolute(log)).parent_path().string();
    if (access(dir.c_str(), W_OK | X_OK) < 0)
      return Error{"cannot write --qemu-log", log,
                   fmt::format("its directory: {}", std::strerror(errno))}
          .fix("give --qemu-log a file in a directory that exists and vmsave can write");
  }
  // The log goes beside the command's own socket (the directory the user
  // chose for this VM); only a VM without one gets a private directory.
  if (log.empty() && !qmp_path.empty()) log = qmp_path + ".qemu.log";
  VMSAVE_TRY(check_outputs_free(cmd, log));
  if (qmp_path.empty()) {
    const char* base = getenv("XDG_RUNTIME_DIR");
    // Only a directory of this user's alone, as the XDG spec has it: the
    // owner of another (root after `su` keeps the user's) could rename the
    // run directory and put a socket of its own where QEMU's goes (trial S).
    struct stat bst;
    if (base && *base && stat(base, &bst) == 0 &&
        (bst.st_uid != geteuid() || (bst.st_mode & (S_IWGRP | S_IWOTH)))) {
      rep.warn(
          fmt::format("XDG_RUNTIME_DIR ({}) is not this user's alone ({}): QEMU's QMP socket "
                      "goes under /tmp instead",
                      base,
                      bst.st_uid != geteuid() ? fmt::format("its owner is uid {}", bst.st_uid)
                                              : std::string("others may write to it")));
      base = nullptr;
    }
    std::string parent = base && *base ? base : "/tmp";
    remove_stale_run_dirs(parent);
    std::string tmpl = parent + "/vmsave-XXXXXX";
    if (!mkdtemp(tmpl.data())) {
      Error e = sys_error("cannot make a directory for QEMU's QMP socket", tmpl, errno);
      // Whatever the cause (read-only, no such directory, no permission).
      e.hint = base && *base ? "check XDG_RUNTIME_DIR, or give the QEMU command its own -qmp"
                             : "set XDG_RUNTIME_DIR to a directory you can write, or give the "
                               "QEMU command its own -qmp";
      return e;
    }
    run_dir = tmpl;
    qmp_path = run_dir + "/qmp.sock";
    if (qmp_path.size() >= sizeof(sockaddr_un{}.sun_path)) {
      std::filesystem::remove_all(run_dir);
      return Error{"the QMP socket vmsave would give QEMU has too long a path", qmp_path,
                   fmt::format("{} bytes, a Unix socket path takes at most {}", qmp_path.size(),
                               sizeof(sockaddr_un{}.sun_path) - 1)}
          .fix("set XDG_RUNTIME_DIR to a shorter directory, or give the QEMU command its own -qmp");
    }
    cmd.append({"-qmp", fmt::format("unix:{},server=on,wait=off", escape_commas(qmp_path))});
    if (log.empty()) log = run_dir + "/qemu.log";
  }
  // -S: QEMU starts a guest by itself once loaded when the stream says it
  // ran to the end (a live save of RAM QEMU saved); with --paused it ran for
  // ~10 ms before vmsave could stop it. vmsave resumes it when it should run.
  if (!cmd.has_option("incoming")) {
    cmd.append(cmd.has_option("S") ? std::vector<std::string>{"-incoming", "defer"}
                                   : std::vector<std::string>{"-incoming", "defer", "-S"});
    // A daemon's stderr goes to /dev/null, and with it QEMU's reason for
    // refusing the device state ("Unknown savevm section ..."; trial O,
    // X). Given -D, QEMU sends its errors to that log instead. Right after
    // the -incoming group, which as_started_by_user() takes off again.
    struct stat st;
    const bool regular = stat(log.c_str(), &st) == 0 ? S_ISREG(st.st_mode) : errno == ENOENT;
    if (cmd.daemonize() && !cmd.has_option("D") && regular) cmd.append({"-D", absolute(log)});
  } else if (!cmd.has_option("S")) {
    cmd.append({"-S"});
  }
  // From here on, if vmsave dies (SIGKILL, a crash), its watchdog kills the
  // QEMU this restore started and removes the RAM files and directory it
  // made; else that QEMU would wait for its device state forever.
  auto watchdog = Watchdog::start("restore");
  if (!watchdog.ok()) {
    if (!run_dir.empty()) std::filesystem::remove_all(run_dir);
    return watchdog.error();
  }
  if (!run_dir.empty()) watchdog->note_remove(run_dir);
  // RAM: an eager restore creates the RAM files, starts QEMU and fills them
  // while QEMU starts up (QEMU maps guest RAM at start-up but does not read
  // it before the device state comes); a lazy one points QEMU at the image.
  Progress progress;
  RamStats ram;
  std::vector<RamFile> files;
  std::string image_abs = absolute(opts.image);
  if (opts.lazy) {
    for (auto& p : plans) make_lazy(p.object, image_abs, img.layout().blocks[p.block].region.offset);
  } else {
    auto f = create_ram_files(plans, img, opts.force, &*watchdog);
    if (!f.ok()) {
      if (!run_dir.empty()) std::filesystem::remove_all(run_dir);
      return f.error();
    }
    files = std::move(*f);
    for (auto& file : files)
      if (!file.short_room.empty()) rep.warn(file.short_room);
  }
  for (auto& path : *to_empty) {
    Status st = empty_file(path);
    if (!st.ok()) {
      if (!run_dir.empty()) std::filesystem::remove_all(run_dir);
      return st;
    }
  }
  // What QEMU loads RAM into goes with a failed restore, as the files vmsave
  // fills do: a partial one was left, and refused by the retry.
  std::vector<std::string> qemu_files = *to_empty;
  qemu_files.insert(qemu_files.end(), qemu_makes.begin(), qemu_makes.end());
  for (auto& path : qemu_files) watchdog->note_remove(path);
  // What a QEMU killed part-way leaves outside the private directory: the
  // command's socket, the log vmsave put beside it, QEMU's pidfile.
  std::vector<std::string> left = cmd.option_values("pidfile");
  if (run_dir.empty()) left.push_back(qmp_path);
  if (run_dir.empty() && opts.qemu_log.empty()) left.push_back(log);
  // And the consoles' files QEMU creates, and its other sockets (trial Z:
  // an empty serial log was left).
  if (auto outs = cmd.output_files(); outs.ok())
    for (auto& f : *outs)
      if (absolute(f.path) != absolute(log) && access(f.path.c_str(), F_OK) < 0)
        left.push_back(f.path);
  if (auto sockets = cmd.server_sockets(); sockets.ok())
    for (auto& s : *sockets) left.push_back(s.path);
  for (auto& path : left) watchdog->note_left(path);
  for (auto& p : plans) cmd.replace_arg(p.arg_index, format_object(p.object));
  timer.lap("plan");

  // From here on a failure kills the QEMU we started and removes what we made.
  bool ok = false;
  StartedQemu q;
  // (The RAM files remove themselves: `files`, destroyed after this.)
  struct Cleanup {
    bool* ok;
    StartedQemu* q;
    std::string run_dir;
    std::vector<std::string> qemu_files, left;
    ~Cleanup() {
      if (*ok) return;
      kill_qemu(q->pid);
      kill_marked(q->mark);  // a daemon that has not answered yet
      for (auto& f : qemu_files) ::unlink(f.c_str());
      // A log QEMU wrote stays (the error names it); the socket it left
      // bound to nothing (none listened there before it started) goes.
      if (q->pid > 0)
        for (auto& f : left) remove_left_behind(f);
      // A private directory goes, but for a log QEMU wrote, which the error
      // names: it stays for the user to read, until the next restore finds
      // its QEMU gone.
      if (run_dir.empty()) return;
      struct stat st;
      if (q->pid > 0 && stat((run_dir + "/qemu.log").c_str(), &st) == 0 && st.st_size > 0)
        note_run_dir_owner(run_dir, q->pid);
      else
        std::filesystem::remove_all(run_dir);
    }
  } cleanup{&ok, &q, run_dir, qemu_files, left};

  auto fill = [&]() -> Status {
    if (files.empty()) return Status();
    for (auto& p : plans) {
      const BlockLayout& b = img.layout().blocks[p.block];
      progress.total += b.size;
      progress.data_total += b.data_bytes();
    }
    rep.begin_phase("reading RAM", &progress);
    Status st;
    for (auto& f : files)
      if (st.ok()) st = f.fill(img, opts.engine, &progress, &ram);
    if (st.ok()) progress.data_done = progress.data_total.load();
    rep.end_phase(!st.ok());
    timer.lap("ram");
    return st;
  };
  // A backend with prealloc=on has QEMU touch every page at start-up; where
  // the kernel lacks MADV_POPULATE_WRITE QEMU does that by reading and
  // writing back a byte of each page, which could undo a concurrent fill.
  bool fill_first = false;
  for (auto& p : plans) {
    auto pre = p.object.get_bool("prealloc");
    fill_first |= !pre.ok() || pre->value_or(false);
  }
  if (fill_first) VMSAVE_TRY(fill());
  // A signal may land between the loops that look for one: each phase
  // boundary looks again, so an interrupted restore never reports success.
  if (cancelled()) return interrupted_error();
  // A daemonizing QEMU's first process exits; the daemon is noted below.
  // A daemon is known by its mark until it answers (a restore killed before
  // then left it waiting for ever; trial Q).
  const std::string mark = new_qemu_mark();
  if (cmd.daemonize()) watchdog->note_kill_marked(mark);
  auto started = start_qemu(cmd.argv(), log, !opts.qemu_log.empty(), mark, [&](pid_t pid) {
    if (!cmd.daemonize()) watchdog->note_kill(pid);
  });
  if (!started.ok()) return started.error();
  q = *started;
  // A daemon is known by its QMP connection: found before the fill, so that
  // a fill that fails or is interrupted stops it too (it was left waiting,
  // holding its RAM file and socket).
  if (!fill_first && !cmd.daemonize()) {
    // A QEMU that dies meanwhile (its start-up failed, it was killed)
    // stops the fill: reading the rest of the image would be for nothing.
    ExitWatch watch(q.pid, [&] { return started_qemu_gone(q, "while vmsave filled its RAM"); });
    VMSAVE_TRY(fill());
  }
  (void)use_qmp_timeout(opts.qmp_timeout);
  auto qmp_r = connect_started(q, qmp_path, qmp_timeout(), cmd.daemonize());
  if (!qmp_r.ok()) return qmp_r.error();
  QmpClient& qmp = *qmp_r;
  if (cmd.daemonize()) {
    q.pid = qmp.peer_pid();
    watchdog->note_kill(q.pid);
    if (!fill_first) VMSAVE_TRY(fill());
  }
  if (opts.lazy) VMSAVE_TRY(check_lazy_mapped(qmp.peer_pid(), img, plans, image_abs));
  VMSAVE_TRY(check_started_machine(qmp, *meta));
  if (meta->contains("disks")) {
    // QEMU opened relative disk paths from vmsave's directory, a daemon too
    // (before it moved to /).
    std::error_code ec;
    const auto cwd = std::filesystem::current_path(ec);
    warn_of_changed_disks((*meta)["disks"], disks_now(qmp, cmd.argv(), ec ? "" : cwd.string()),
                          rep);
  }
  timer.lap("start_qemu");

  bool run = opts.running.value_or(meta->value("guest_running", true));
  double vmstate_s = 0;
  Status st = load_and_resume(qmp, img, run, rep, &vmstate_s);
  if (!st.ok() && st.error().status == Exit::kInterrupted) return st;  // nothing to explain
  if (!st.ok()) {
    Error e = st.error();
    // Killed from outside (the OOM killer, a kill -9) or crashed: the
    // command line is not to blame, and QEMU's log says nothing.
    if (int sig = cmd.daemonize() ? 0 : killing_signal(q.pid))
      return killed_error(sig, "while loading the image", log);
    // QEMU's cause often comes a line or two before its last words
    // ("Unknown ramblock ...", then "error while loading state ...").
    // A daemon's errors are in its -D log (vmsave's, or the command's own).
    const auto d = cmd.option_values("D");
    std::string tail = log_tail(cmd.daemonize() && !d.empty() ? d.back() : log, 4);
    if (!tail.empty())
      e.detail = e.detail.empty() ? "QEMU: " + tail : e.detail + " (QEMU: " + tail + ")";
    else if (cmd.daemonize() && !qemu_gave_reason(e)) {  // its stderr went to /dev/null (trial O)
      const std::string lost =
          "QEMU's reason is lost: -daemonize sends its errors nowhere; run the command without "
          "-daemonize to see it";
      e.detail = e.detail.empty() ? lost : e.detail + " (" + lost + ")";
    }
    // QEMU refusing intact device state: a command that differs from the
    // saved one in what vmsave does not compare (topology, devices, options).
    const bool generic = e.hint.empty() || e.hint.find("has QEMU exited?") != std::string::npos;
    if (generic && e.status != Exit::kDamaged)
      e.hint = img.layout().has_qemu_section()
                   ? "start QEMU with the command line the VM was saved with (vmsave info shows "
                     "it); QEMU reads its section of the image unchecked, so run vmsave verify "
                     "IMAGE too"
                   : "start QEMU with the command line the VM was saved with: same -smp, devices "
                     "and options (vmsave info shows it)";
    return e;
  }
  timer.lap("device_state");
  if (cancelled()) return interrupted_error();
  // A last look before the VM is the user's: a QEMU killed once it had
  // loaded (a trial killed it 6-15 ms into the load) was reported running,
  // and its RAM file kept.
  if (auto alive = qmp.execute("query-status"); !alive.ok()) {
    if (int sig = cmd.daemonize() ? 0 : killing_signal(q.pid))
      return killed_error(sig, "as the restore finished", log);
    return alive.error();
  }
  for (auto& p : plans)
    if (p.unlink_after) ::unlink(p.ram_file.c_str());
  ok = true;
  for (auto& f : files) f.keep();
  if (!run_dir.empty()) note_run_dir_owner(run_dir, qmp.peer_pid());
  watchdog->disarm();  // QEMU and its RAM files are the user's now

  nlohmann::json j = {{"command", "restore"},
                      {"mode", opts.lazy ? "lazy" : "eager"},
                      {"image", opts.image},
                      {"pid", qmp.peer_pid()},
                      {"qmp", absolute(qmp_path)},
                      {"qemu_log", absolute(log)},
                      {"running", run},
                      {"vmstate_s", vmstate_s},
                      {"qemu_section_bytes", img.layout().qemu.length}};
  if (opts.lazy) {
    i64 mapped = 0;
    for (auto& b : img.layout().blocks) mapped += b.size;
    j["ram_bytes"] = mapped;
  } else if (!files.empty()) {  // else QEMU loaded all of it
    add_ram_report(j, ram, "ram_read");
  }
  add_qemu_ram(j, img);
  add_vmstate_report(j, img.layout(), *meta);
  j["steps_s"] = timer.steps();
  j["total_s"] = timer.total();
  return j;
}

Result<nlohmann::json> prepare(const RestoreOptions& opts, Reporter& rep) {
  StepTimer timer;
  auto opened = open_image(opts.image, rep);
  if (!opened.ok()) return opened.error();
  const ImageReader& img = *opened->reader;
  const nlohmann::json* meta = &opened->meta;
  if (opts.lazy) VMSAVE_TRY(check_lazy(img, opts.image));
  VMSAVE_TRY(check_qemu_image(*meta, opts.image));
  if (opts.lazy) VMSAVE_TRY(refuse_lazy_qemu_section(img));
  // Its arguments reach QEMU through a wrapper, one per line: a control
  // character (a newline) in a saved backend's properties would split its
  // argument into several, QEMU options of the image's choosing (trial S).
  const std::vector<ObjectArg> saved = saved_backends(*meta);
  for (auto& s : saved) {
    const std::string o = format_object(s.object);
    if (std::any_of(o.begin(), o.end(), [](unsigned char c) { return c < 0x20 || c == 0x7f; }))
      return Error{"the image's saved QEMU command line holds a control character", opts.image,
                   fmt::format("in the -object of backend {}: {}", s.object.id, o)}
          .fix(
              "restore it with `vmsave restore IMAGE -- QEMU-COMMAND`, giving the command yourself")
          .as(Exit::kDamaged);
  }
  std::string image_abs = absolute(opts.image);
  nlohmann::json args = nlohmann::json::array();
  RamStats ram;
  i64 mapped = 0;  // lazy: the RAM the arguments map from the image
  std::vector<std::string> files;
  timer.lap("open");
  if (!opts.lazy) {
    auto filled = fill_ram_dir(img, opts, "prepare", rep, &ram);
    if (!filled.ok()) return filled.error();
    files = std::move(*filled);
    timer.lap("ram");
  }
  for (auto& b : img.layout().blocks) {
    // QEMU loads these from the image; the VM's own command line (its -m,
    // its memory-backend-ram/memfd objects) provides them.
    if (b.via_qemu()) continue;
    QemuObject o;
    o.qom_type = "memory-backend-file";
    o.id = b.id;
    for (auto& s : saved)
      if (s.object.id == b.id) o = s.object;
    // The block's size, whatever the metadata says (its own spelling if equal).
    if (auto size = o.get_size("size"); !size.ok() || *size != b.size)
      o.set("size",
            o.json_syntax ? nlohmann::json(b.size) : nlohmann::json(std::to_string(b.size)));
    if (opts.lazy) {
      make_lazy(o, image_abs, b.region.offset);
      mapped += b.size;
    } else {
      for (const char* p : {"offset", "readonly", "rom"}) o.erase(p);
      o.set("share", o.json_syntax ? nlohmann::json(true) : nlohmann::json("on"));
      o.set("mem-path", absolute(opts.ram_dir + "/" + b.id));
    }
    args.push_back("-object");
    args.push_back(format_object(o));
  }
  args.push_back("-incoming");
  args.push_back("defer");
  nlohmann::json j = {{"command", "prepare"}, {"mode", opts.lazy ? "lazy" : "eager"},
                      {"image", opts.image},  {"qemu_args", args}};
  if (meta->contains("qemu_cmdline")) j["saved_qemu_cmdline"] = (*meta)["qemu_cmdline"];
  if (opts.lazy) {
    j["ram_bytes"] = mapped;
  } else {
    j["ram_files"] = files;
    if (!files.empty()) add_ram_report(j, ram, "ram_read");
  }
  j["total_s"] = timer.total();
  j["steps_s"] = timer.steps();
  return j;
}

// The RAM a QEMU started with `prepare`'s arguments maps must be this
// image's: the device state of one save on the RAM of another runs the
// guest into the weeds, with QEMU none the wiser. A lazy backend maps the
// image itself at its block's region; an eager one a RAM file whose sampled
// chunks must match the image's checksums.
Status check_prepared_ram(const ImageReader& img, const std::string& image,
                          std::vector<RamBackend> backends, pid_t pid) {
  constexpr int kSamples = 64;  // chunks compared per block, at most
  std::vector<RamBackend> mine, loaded;
  std::vector<size_t> blocks;
  for (size_t i = 0; i < img.layout().blocks.size(); i++) {
    const BlockLayout& b = img.layout().blocks[i];
    if (b.via_qemu()) {
      for (auto& qb : backends)
        if (qb.id == b.id && qb.qom_type == "memory-backend-file") loaded.push_back(std::move(qb));
      continue;
    }
    for (auto& qb : backends)
      if (qb.id == b.id) {
        if (qb.qom_type != "memory-backend-file")
          return mismatch(fmt::format("QEMU's backend {} is a {}, not the file `prepare` filled",
                                      b.id, qb.qom_type),
                          "start QEMU with the arguments `vmsave prepare` prints");
        mine.push_back(std::move(qb));
        blocks.push_back(i);
      }
  }
  // QEMU loads only the non-zero pages of a block it saved: a file that
  // holds data (one left behind, another VM's) would show it where the
  // guest had zeros, and the guest crashed so. A restore that starts QEMU
  // empties it first; this QEMU has mapped it already.
  VMSAVE_TRY(open_backend_files(loaded, pid));
  for (auto& qb : loaded) {
    auto at = first_nonzero(qb.fd.get(), qb.offset, qb.size, qb.file);
    if (!at.ok()) return at.error();
    if (*at >= 0)
      return Error{"QEMU's RAM file holds data", qb.path.empty() ? qb.file : qb.path,
                   fmt::format("QEMU loads only block {}'s non-zero pages from the image, so the "
                               "guest would see this file's data (at offset {}) where it had "
                               "zeros",
                               qb.id, qb.offset + *at)}
          .fix(
              "start QEMU with a mem-path that does not exist (or an empty file) and the "
              "arguments `vmsave prepare` prints; this one still waits");
  }
  VMSAVE_TRY(open_backend_files(mine, pid));
  struct stat own;
  if (stat(image.c_str(), &own) < 0) return sys_error("stat", image, errno);
  auto not_this_image = [&](const RamBackend& qb, const std::string& why) {
    return Error{"QEMU's RAM is not this image's", image,
                 fmt::format("backend {} ({}) {}", qb.id, qb.mem_path, why)}
        .fix(fmt::format("run `vmsave prepare {} --lazy` (or `--ram-dir DIR`) and start QEMU "
                         "with the arguments it prints, or restore the image `prepare` was run "
                         "on",
                         image));
  };
  for (size_t k = 0; k < mine.size(); k++) {
    const RamBackend& qb = mine[k];
    const BlockLayout& b = img.layout().blocks[blocks[k]];
    struct stat st;
    if (fstat(qb.fd.get(), &st) < 0) return sys_error("fstat", qb.file, errno);
    // A vmsave image QEMU maps: this one (by its UUID, another name or
    // overlayfs's file below), or another one, say the file the image's
    // path named when QEMU opened it (a mv since). Content samples told
    // two saves of one VM apart only by luck, and the guest ran on one
    // save's RAM under the other's device state.
    const ImageMatch match = image_match(qb.fd.get(), img.layout().uuid);
    if (match == ImageMatch::kOther)
      return not_this_image(qb, "maps another vmsave image (replaced since QEMU opened it?)");
    if (same_file(st, own) || match == ImageMatch::kSame) {  // lazy
      if (qb.offset != b.region.offset)
        return not_this_image(qb, fmt::format("maps it from offset {}, block {}'s region starts "
                                              "at {}",
                                              qb.offset, b.id, b.region.offset));
      continue;
    }
    auto c = img.first_differing_chunk(blocks[k], qb.fd.get(), qb.offset, kSamples, qb.file);
    if (!c.ok()) return c.error();
    if (*c >= 0)
      return not_this_image(qb, fmt::format("differs from the image's block {} in chunk {}",
                                            b.id, *c));
  }
  return Status();
}

Result<nlohmann::json> restore_into_running(const RestoreOptions& opts, Reporter& rep) {
  StepTimer timer;
  auto opened = open_image(opts.image, rep);
  if (!opened.ok()) return opened.error();
  const ImageReader& img = *opened->reader;
  const nlohmann::json* meta = &opened->meta;
  VMSAVE_TRY(check_qemu_image(*meta, opts.image));
  auto qmp_r = QmpClient::connect(opts.qmp, use_qmp_timeout(opts.qmp_timeout));
  if (!qmp_r.ok()) return qmp_r.error();
  QmpClient& qmp = *qmp_r;
  auto status = qmp.execute("query-status");
  if (!status.ok()) return status.error();
  if (status->value("status", "") != "inmigrate") {
    Error e{"QEMU is not waiting for a migration", opts.qmp,
            "its state is " + status->value("status", "?")};
    // Loaded, but the restore that loaded it was killed before `cont`.
    auto mig = qmp.execute("query-migrate");
    if (status->value("status", "") == "paused" && mig.ok() &&
        mig->value("status", "") == "completed") {
      // The capabilities that restore set are still on: the VM's next
      // ordinary migration would skip its shared RAM (x-ignore-shared).
      std::string left;
      if (auto caps = qmp.execute("query-migrate-capabilities"); caps.ok() && caps->is_array())
        for (auto& c : *caps) {
          const std::string name = c.value("capability", "");
          if ((name == "x-ignore-shared" || name == "mapped-ram" || name == "multifd") &&
              c.value("state", false))
            left += (left.empty() ? "" : ", ") + name;
        }
      return e.fix(fmt::format(
          "it loaded a migration and its guest is paused: if a restore was interrupted before it "
          "resumed the guest, resume it with the QMP command cont{}",
          left.empty() ? ""
                       : fmt::format("; the restore left the migration capabilities {} on: switch "
                                     "them off (migrate-set-capabilities) before migrating this "
                                     "VM elsewhere",
                                     left)));
    }
    return e.fix(
        "if it was restored already, there is nothing to do; else start it with the arguments "
        "`vmsave prepare` prints (they include -incoming defer)");
  }
  // An incoming migration begun and never fed (a restore stopped at once by
  // a second signal): QEMU takes no other.
  if (auto mig = qmp.execute("query-migrate"); mig.ok() && !mig->value("status", "").empty())
    return Error{"QEMU has begun an incoming migration already", opts.qmp,
                 "its status is " + mig->value("status", "")}
        .fix(
            "it cannot take another (was an earlier restore stopped part-way?): quit it and "
            "start QEMU again with the arguments `vmsave prepare` prints");
  // What a restore that starts QEMU checks of its command: device state from
  // another machine type, -cpu or CPU count fails deep in QEMU's load, and
  // QEMU exits ("Missing section footer for 0000:00:1f.0/ICH9LPC").
  if (auto argv = process_cmdline(qmp.peer_pid()); !argv.empty()) {
    if (auto cmd = QemuCommand::parse(argv); cmd.ok()) {
      if (Status st = check_machine(*cmd, *meta); !st.ok())
        return st.error().fix(
            "start QEMU with the command line the VM was saved with (vmsave info shows it) and "
            "the arguments `vmsave prepare` prints; this one still waits");
      if (Status st = check_backends_used(*cmd, backends_in_image(*cmd, img), *meta); !st.ok())
        return st.error().fix(st.error().hint + "; this QEMU still waits");
      // It opened its disks without locks, which it takes only at cont:
      // a disk another VM writes failed there, the device state loaded.
      if (Status st = check_disks_free(*cmd, rep, qmp.peer_pid()); !st.ok())
        return st.error().fix(st.error().hint + "; this QEMU still waits");
      warn_of_changed_macs(*cmd, *meta, rep);
    }
  }
  // The backends QEMU has must be the image's blocks, same sizes.
  auto backends = list_ram_backends(qmp);
  if (!backends.ok()) return backends.error();
  for (auto& b : img.layout().blocks) {
    bool found = false;
    for (auto& qb : *backends)
      if (qb.id == b.id) {
        found = true;
        if (qb.size != b.size)
          return mismatch(fmt::format("QEMU's backend {} has size {}, the image's block has {}",
                                      b.id, format_size(qb.size), format_size(b.size)));
      }
    if (!found)
      return mismatch(fmt::format("QEMU has no memory backend {} for the image's block", b.id),
                      "start QEMU with the arguments `vmsave prepare` prints");
  }
  VMSAVE_TRY(check_prepared_ram(img, opts.image, std::move(*backends), qmp.peer_pid()));
  if (Status st = check_started_machine(qmp, *meta); !st.ok())
    return st.error().fix(st.error().hint + "; this QEMU still waits");
  timer.lap("connect");
  bool run = opts.running.value_or(meta->value("guest_running", true));
  double vmstate_s = 0;
  VMSAVE_TRY(load_and_resume(qmp, img, run, rep, &vmstate_s));
  timer.lap("device_state");
  nlohmann::json j = {{"command", "restore"},
                      {"mode", "two-step"},
                      {"image", opts.image},
                      {"pid", qmp.peer_pid()},
                      {"qmp", absolute(opts.qmp)},
                      {"running", run},
                      {"qemu_section_bytes", img.layout().qemu.length},
                      {"vmstate_s", vmstate_s},
                      {"total_s", timer.total()},
                      {"steps_s", timer.steps()}};
  add_qemu_ram(j, img);
  add_vmstate_report(j, img.layout(), *meta);
  return j;
}

}  // namespace vmsave
