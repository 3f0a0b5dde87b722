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
// target.

#include <fcntl.h>

#include <fmt/core.h>

#include "core/internal.h"
#include "core/qemu.h"
#include "core/qemu_args.h"
#include "core/vmsave.h"
#include "lib/cancel.h"

namespace vmsave {

namespace {

// Puts the guest back the way it was when a save fails part-way.
struct GuestGuard {
  QmpClient* qmp = nullptr;
  Capabilities* caps = nullptr;
  bool was_running = false;
  bool stopped = false;
  bool armed = true;
  ~GuestGuard() {
    if (!armed || !qmp) return;
    (void)qmp->execute("migrate_cancel", nullptr, 5);
    caps->restore(*qmp);
    if (stopped && was_running) (void)qmp->execute("cont", nullptr, 5);
  }
};

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
  auto qmp_r = QmpClient::connect(opts.qmp, opts.qmp_timeout);
  if (!qmp_r.ok()) return qmp_r.error();
  QmpClient& qmp = *qmp_r;
  pid_t pid = qmp.peer_pid();

  auto status = qmp.execute("query-status");
  if (!status.ok()) return status.error();
  bool was_running = status->value("running", false);
  std::string run_state = status->value("status", "");
  auto mig = qmp.execute("query-migrate");
  if (mig.ok() && (mig->value("status", "") == "active" || mig->value("status", "") == "setup"))
    return Error{"a migration is already running in QEMU", opts.qmp, ""}.fix(
        "wait for it to finish or cancel it with migrate_cancel");
  if (run_state == "inmigrate")
    return Error{"QEMU is waiting for an incoming migration", opts.qmp, "there is no VM to save yet"};

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
  if (through_qemu) {
    auto caps_now = qmp.execute("query-migrate-capabilities");
    if (!caps_now.ok()) return caps_now.error();
    bool mapped_ram = false;
    for (auto& c : *caps_now) mapped_ram |= c.value("capability", "") == "mapped-ram";
    if (!mapped_ram) return unsaveable_ram_error(*unshared);
  } else {
    VMSAVE_TRY(open_backend_files(backends, pid));
  }

  std::vector<std::string> cmdline = process_cmdline(pid);
  nlohmann::json meta = base_metadata("qemu", opts.description);
  meta.update(qemu_metadata(qmp, cmdline));
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
    meta["blocks"].push_back({{"id", b.id}, {"size", b.size}, {"page_size", b.page_size},
                              {"qom_type", b.qom_type}, {"mem_path", b.mem_path},
                              {"share", b.share}, {"offset", b.offset},
                              {"saved_by", through_qemu ? "qemu" : "vmsave"}});
  }

  // Create the image before stopping the guest: a target that exists or a
  // directory we cannot write fails while the guest still runs.
  auto w_r = ImageWriter::create(opts.image, opts.force, blocks, opts.chunk_size,
                                 [&](const std::string& m) { rep.warn(m); });
  if (!w_r.ok()) return w_r.error();
  ImageWriter& w = **w_r;

  Capabilities caps;
  if (through_qemu)
    VMSAVE_TRY(caps.set(qmp, mapped_ram_capabilities(), {"mapped-ram", "multifd"}));
  else
    VMSAVE_TRY(caps.set(qmp, {{"x-ignore-shared", true}, {"mapped-ram", false}, {"multifd", false},
                              {"postcopy-ram", false}, {"background-snapshot", false}},
                        {"x-ignore-shared"}));
  GuestGuard guard{&qmp, &caps, was_running};
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
  timer.lap("prepare");

  if (was_running) {
    auto r = qmp.execute("stop");
    if (!r.ok()) return r.error();
    guard.stopped = true;
  }
  auto paused_at = timer.now();
  timer.lap("stop");

  Progress progress;
  RamStats ram;
  double vmstate_s = 0;
  if (through_qemu) {
    // RAM and device state in one QEMU migration into the image.
    for (auto& b : backends) progress.total += b.size;
    nlohmann::json last;
    rep.begin_phase("QEMU writing RAM and device state", &progress);
    auto t0 = timer.now();
    Status st = mapped_ram_migrate(qmp, false, fds, w.qemu_offset(), [&](const nlohmann::json& r) {
      last = r;
      if (!r.contains("ram")) return;
      i64 total = r["ram"].value("total", i64(0)), remaining = r["ram"].value("remaining", i64(0));
      if (total > 0) progress.done = std::max<i64>(0, progress.total.load() * (total - remaining) / total);
    });
    rep.end_phase();
    if (!st.ok()) return st.error();
    ram.seconds = std::chrono::duration<double>(timer.now() - t0).count();
    ram.ram_bytes = progress.total;
    if (last.contains("ram")) {
      ram.stored_bytes = last["ram"].value("normal-bytes", i64(0));
      ram.data_pages = last["ram"].value("normal", i64(0));
      ram.total_pages = last["ram"].value("total", i64(0)) / std::max<i64>(1, last["ram"].value("page-size", i64(4096)));
    }
    timer.lap("ram");
    fds = MappedRamFds{};
    Progress hash_progress;
    rep.begin_phase("checksumming QEMU's section", &hash_progress);
    st = w.finish_qemu_section(&hash_progress);
    rep.end_phase();
    if (!st.ok()) return st.error();
    timer.lap("checksum");
    meta["qemu_migration"] = {{"offset", w.qemu_offset()},
                              {"capabilities", nlohmann::json(mapped_ram_capabilities())},
                              {"direct_io", w.direct()},
                              {"ram_bytes_written", ram.stored_bytes}};
  } else {
    rep.begin_phase("writing RAM", &progress);
    Status st = w.write_ram(sources, opts.engine, &progress, &ram);
    rep.end_phase();
    if (!st.ok()) return st.error();
    timer.lap("ram");

    Progress vm_progress;
    rep.begin_phase("saving device state", &vm_progress);
    st = save_device_state(
        qmp, [&](const u8* d, size_t n) { return w.append_vmstate(d, n); },
        [&](i64 total) { vm_progress.done = total; });
    rep.end_phase();
    if (!st.ok()) return st.error();
    vmstate_s = timer.lap("device_state");
  }
  caps.restore(qmp);

  if (cancelled()) return interrupted_error();
  meta["vmstate_bytes"] = w.vmstate_bytes();
  Status st = w.commit(meta);
  if (!st.ok()) return st.error();
  timer.lap("commit");

  // The image is safe on disk: from here, failures no longer undo the save.
  guard.armed = false;
  std::string after = "quit";
  if (opts.after == AfterSave::kQuit) {
    (void)qmp.execute("quit", nullptr, 5);
  } else if (opts.after == AfterSave::kLeaveRunning) {
    after = was_running ? "running" : "paused";
    if (was_running) {
      auto r = qmp.execute("cont");
      if (!r.ok()) rep.warn("the image is saved, but resuming the guest failed: " + r.error().message());
    }
  } else {
    after = "paused";
  }
  double downtime = std::chrono::duration<double>(timer.now() - paused_at).count();
  timer.lap("finish");

  nlohmann::json j = {{"command", "save"},         {"mode", "qemu"},
                      {"image", opts.image},       {"qemu_pid", pid},
                      {"guest_was_running", was_running},
                      {"after", after},            {"vmstate_bytes", w.vmstate_bytes()},
                      {"ram_saved_by", through_qemu ? "qemu" : "vmsave"},
                      {"vmstate_s", vmstate_s},    {"direct_io", w.direct()},
                      {"downtime_s", was_running ? downtime : 0.0}};
  add_ram_report(j, ram, "ram_write");
  j["steps_s"] = timer.steps();
  j["total_s"] = timer.total();
  return j;
}

}  // namespace vmsave
