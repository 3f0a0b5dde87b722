// The operations vmsave offers, one function each; cli/ fills the options
// and calls exactly one of them. Every operation returns a JSON report (the
// figures it measured) or an Error.

#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/reporter.h"
#include "format/image.h"
#include "io/file.h"
#include "lib/common.h"

namespace vmsave {

enum class AfterSave { kQuit, kLeaveRunning, kPaused };

struct SaveOptions {
  std::string image;
  bool force = false;
  EngineConfig engine;
  i64 chunk_size = kDefaultChunkSize;
  i64 min_hole = -1;   // --min-hole; negative: by the image's filesystem
  CodecSpec compress;  // --compress; Codec::kRaw when not given
  std::string description;
  // Raw mode: memory files, each ID=FILE.
  std::vector<std::pair<std::string, std::string>> rams;
  // QEMU mode.
  std::string qmp;
  AfterSave after = AfterSave::kQuit;
  // --qmp-timeout: the wait to connect and for each reply. 0: 10 s to
  // connect, 30 s for a reply.
  double qmp_timeout = 0;
  // --live: save RAM while the guest runs, stop it only for the rest.
  bool live = false;
  i64 max_downtime_ms = 0;    // QEMU path: downtime-limit (0: QEMU's default)
  double live_timeout = 60;   // QEMU path: stop the guest after this long
  bool live_timeout_given = false;  // --live-timeout was on the command line
  double flush_timeout = 0;   // 0: wait for the flush as long as it takes
};

struct RestoreOptions {
  std::string image;
  bool force = false;
  EngineConfig engine;
  // Raw mode and `prepare` eager: where RAM files go.
  std::string ram_dir;
  // QEMU modes.
  bool lazy = false;
  std::optional<bool> running;  // unset: as the guest was when saved
  std::vector<std::string> qemu_argv;
  std::string qmp;          // two-step form: QEMU is already started
  std::string qemu_log;     // where the started QEMU's output goes
  double qmp_timeout = 0;   // as SaveOptions', and for the started QEMU's socket
};

Result<nlohmann::json> save_raw(const SaveOptions& opts, Reporter& rep);
Result<nlohmann::json> save_qemu(const SaveOptions& opts, Reporter& rep);

Result<nlohmann::json> restore_raw(const RestoreOptions& opts, Reporter& rep);
Result<nlohmann::json> restore_qemu(const RestoreOptions& opts, Reporter& rep);
Result<nlohmann::json> prepare(const RestoreOptions& opts, Reporter& rep);
Result<nlohmann::json> restore_into_running(const RestoreOptions& opts, Reporter& rep);

Result<nlohmann::json> info(const std::string& image);
// Exit status 3 (via the returned report's "ok": false and an Error with
// kDamaged) when the image is damaged.
Result<nlohmann::json> verify(const std::string& image, const EngineConfig& engine,
                              Reporter& rep);

}  // namespace vmsave
