// `info` and `verify`: what an image holds, and whether every byte of it is
// still what was written.

#include <sys/stat.h>

#include <map>

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
  i64 stored = 0, uncompressed = 0, compressed_chunks = 0, chunks = 0;
  std::map<std::string, i64> codec_chunks;
  for (size_t i = 0; i < img.blocks.size(); i++) {
    const BlockLayout& b = img.blocks[i];
    if (b.via_qemu()) {
      // Its pages are somewhere in QEMU's section; QEMU's own format says
      // where, vmsave's does not.
      blocks.push_back(
          {{"id", b.id}, {"size", b.size}, {"page_size", b.page_size}, {"saved_by", "qemu"}});
      continue;
    }
    i64 data = b.data_pages * b.page_size;
    uncompressed += data;
    nlohmann::json jb = {{"id", b.id},
                         {"saved_by", "vmsave"},
                         {"size", b.size},
                         {"page_size", b.page_size},
                         {"chunk_size", b.chunk_size},
                         {"region_offset", b.region.offset},
                         {"zero_ratio", 1.0 - double(b.data_pages) / double(b.pages())}};
    chunks += b.chunks();
    if ((*r)->compressed()) {
      // What the region holds: compressed chunks padded to 4096 in place of
      // their data pages.
      auto table = (*r)->chunk_table(i);
      if (!table.ok()) return table.error();
      auto bits = (*r)->bitmap(i);
      if (!bits.ok()) return bits.error();
      i64 on_disk = data, n = 0;
      i64 per_chunk = b.chunk_size / b.page_size;
      for (i64 c = 0; c < b.chunks(); c++) {
        const ChunkInfo& ci = (*table)[c];
        if (ci.codec == Codec::kRaw) continue;
        n++;
        codec_chunks[codec_name(ci.codec)]++;
        on_disk += align_up(ci.stored_length, kSectionAlign);
        for (i64 p = c * per_chunk; p < std::min(b.pages(), (c + 1) * per_chunk); p++)
          if (bitmap_test(bits->data(), p)) on_disk -= b.page_size;
      }
      compressed_chunks += n;
      jb["uncompressed_bytes"] = data;
      jb["compressed_chunks"] = n;
      jb["compression_ratio"] = data ? double(on_disk) / double(data) : 1.0;
      data = on_disk;
    }
    jb["stored_bytes"] = data;
    stored += data;
    blocks.push_back(jb);
  }
  // What the file occupies: the data, and the short zero runs a save on a
  // disk writes with it (--min-hole).
  struct stat st = {};
  i64 allocated = fstat((*r)->fd(), &st) == 0 ? static_cast<i64>(st.st_blocks) * 512 : 0;
  // RAM QEMU saved is in its section, where vmsave's format does not say
  // which pages are whose: what the section stores, less its device state
  // and headers as the save counted them (the RAM pages QEMU wrote).
  nlohmann::json qemu = nullptr;
  if (img.has_qemu_section()) {
    i64 in_section = stored_from((*r)->fd(), img.qemu.offset);
    i64 ram_in_section = in_section;
    if (auto m = meta->find("qemu_migration"); m != meta->end() && m->is_object())
      ram_in_section = std::min(in_section, m->value("ram_bytes_written", in_section));
    qemu = {{"offset", img.qemu.offset}, {"length", img.qemu.length},
            {"stored_bytes", in_section}, {"ram_stored_bytes", ram_in_section}};
    stored += ram_in_section;
  }
  nlohmann::json j{{"command", "info"},
                   {"image", image},
                   {"qemu_migration_section", qemu},
                   {"format_version", fmt::format("{}.{}", img.major, img.minor)},
                   {"uuid", uuid_string(img.uuid)},
                   {"created_ns", img.created_ns},
                   {"file_size", img.file_size},
                   {"allocated_bytes", allocated},
                   {"complete", true},
                   {"blocks", blocks},
                   {"stored_bytes", stored},
                   {"vmstate_offset", img.vmstate.offset},
                   {"metadata", *meta}};
  // Bytes past the end the header gives (a concatenation, a copy over a
  // longer file): restores never read them, verify calls them damage.
  if (st.st_size > img.file_size)
    j["bytes_past_end"] = static_cast<i64>(st.st_size) - img.file_size;
  add_vmstate_report(j, img, *meta);
  if ((*r)->compressed()) {
    // The codec as asked ("zstd:3", from the metadata) and as found in the
    // chunk records; the ratio is stored RAM over the same pages raw.
    std::string codec = meta->value("compress", "");
    if (codec.empty()) {
      for (auto& [name, n] : codec_chunks) codec += (codec.empty() ? "" : "+") + name;
      if (codec.empty()) codec = "none";
    }
    j["compression"] = {{"codec", codec},
                        {"chunks", codec_chunks},
                        {"compressed_chunks", compressed_chunks},
                        {"total_chunks", chunks},
                        {"uncompressed_bytes", uncompressed},
                        {"stored_bytes", stored},
                        {"ratio", uncompressed ? double(stored) / double(uncompressed) : 1.0},
                        {"vmstate_codec", codec_name(img.vmstate_codec)}};
  }
  return j;
}

Result<nlohmann::json> verify(const std::string& image, const EngineConfig& engine,
                              Reporter& rep) {
  StepTimer timer;
  auto r = ImageReader::open(image, [&](const std::string& m) { rep.warn(m); });
  if (!r.ok()) return r.error();
  // What info and restore read of the metadata, checked as they check it:
  // an image verify passes is one they take.
  if (auto meta = (*r)->metadata(); !meta.ok()) return meta.error();
  timer.lap("open");
  Progress progress;
  VerifyReport report;
  rep.begin_phase("verifying", &progress);
  Status st = (*r)->verify(engine, &progress, &report);
  rep.end_phase(!st.ok());
  if (!st.ok()) return st.error();
  timer.lap("verify");
  return nlohmann::json{
      {"command", "verify"},
      {"total_s", timer.total()},
      {"steps_s", timer.steps()},
      {"image", image},
      {"ok", true},
      {"chunks_checked", report.chunks_checked},
      // RAM QEMU saved is in its section, checked whole rather than by chunk.
      {"qemu_section_bytes", (*r)->layout().qemu.length},
      // Sections of a newer minor version: their bounds checked, not their bytes.
      {"unchecked_sections", (*r)->layout().unknown.size()},
      {"format_version", fmt::format("{}.{}", (*r)->layout().major, (*r)->layout().minor)},
      {"bytes_read", report.bytes_read},
      {"verify_s", report.seconds},
      {"throughput_bps", report.seconds > 0 ? report.bytes_read / report.seconds : 0},
      {"io_latency_us", latency_json(report.engine.latency)}};
}

}  // namespace vmsave
