// `info` and `verify`: what an image holds, and whether every byte of it is
// still what was written.

#include <fmt/core.h>

#include "core/internal.h"
#include "core/vmsave.h"

namespace vmsave {

Result<nlohmann::json> info(const std::string& image) {
  auto r = ImageReader::open(image, nullptr);
  if (!r.ok()) return r.error();
  const ImageLayout& img = (*r)->layout();
  auto meta = (*r)->metadata();
  if (!meta.ok()) return meta.error();
  nlohmann::json blocks = nlohmann::json::array();
  i64 stored = 0;
  for (auto& b : img.blocks) {
    if (b.via_qemu()) {
      // Its pages are somewhere in QEMU's section; QEMU's own format says
      // where, vmsave's does not.
      blocks.push_back({{"id", b.id}, {"size", b.size}, {"saved_by", "qemu"}});
      continue;
    }
    i64 data = b.data_pages * b.page_size;
    stored += data;
    blocks.push_back({{"id", b.id},
                      {"saved_by", "vmsave"},
                      {"size", b.size},
                      {"page_size", b.page_size},
                      {"chunk_size", b.chunk_size},
                      {"region_offset", b.region.offset},
                      {"stored_bytes", data},
                      {"zero_ratio", 1.0 - double(b.data_pages) / double(b.pages())}});
  }
  nlohmann::json qemu = nullptr;
  if (img.has_qemu_section())
    qemu = {{"offset", img.qemu.offset}, {"length", img.qemu.length}};
  return nlohmann::json{{"image", image},
                        {"qemu_migration_section", qemu},
                        {"format_version", fmt::format("{}.{}", img.major, img.minor)},
                        {"uuid", uuid_string(img.uuid)},
                        {"created_ns", img.created_ns},
                        {"file_size", img.file_size},
                        {"complete", true},
                        {"blocks", blocks},
                        {"stored_bytes", stored},
                        {"vmstate_bytes", img.vmstate.length},
                        {"vmstate_offset", img.vmstate.offset},
                        {"metadata", *meta}};
}

Result<nlohmann::json> verify(const std::string& image, const EngineConfig& engine,
                              Reporter& rep) {
  auto r = ImageReader::open(image, [&](const std::string& m) { rep.warn(m); });
  if (!r.ok()) return r.error();
  Progress progress;
  VerifyReport report;
  rep.begin_phase("verifying", &progress);
  Status st = (*r)->verify(engine, &progress, &report);
  rep.end_phase();
  if (!st.ok()) return st.error();
  return nlohmann::json{{"command", "verify"},
                        {"image", image},
                        {"ok", true},
                        {"chunks_checked", report.chunks_checked},
                        {"bytes_read", report.bytes_read},
                        {"verify_s", report.seconds},
                        {"throughput_bps", report.seconds > 0 ? report.bytes_read / report.seconds : 0},
                        {"io_latency_us", latency_json(report.engine.latency)}};
}

}  // namespace vmsave
