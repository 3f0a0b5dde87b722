// Writing and reading whole images: where format/ (bytes on disk) meets io/
// (rings and O_DIRECT). Both save paths (QEMU and raw memory files) and all
// restore paths use these two classes.

#pragma once

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "format/hash.h"
#include "format/image.h"
#include "io/fd.h"
#include "io/file.h"
#include "lib/common.h"

namespace vmsave {

// One guest RAM block to save: `size` bytes of `fd` starting at `offset`.
struct RamSource {
  std::string id;
  std::string path;  // for messages
  int fd = -1;       // borrowed
  i64 offset = 0;
  i64 size = 0;
  i64 page_size = 4096;
};

struct RamStats {
  i64 ram_bytes = 0;     // logical guest RAM
  i64 stored_bytes = 0;  // bytes written or read (data pages)
  i64 data_pages = 0;
  i64 total_pages = 0;
  // Compressed images: stored_bytes is what the RAM regions hold on disk,
  // uncompressed_bytes what they would hold raw (data pages).
  bool compressed = false;
  i64 uncompressed_bytes = 0;
  i64 compressed_chunks = 0;
  double seconds = 0;
  EngineStats engine;
};

// Notes for the user that are not errors (e.g. the O_DIRECT fallback).
using WarnFn = std::function<void(const std::string&)>;

class ImageWriter {
 public:
  // Prepares a new, nameless image in the directory of `target` (O_TMPFILE,
  // mode 0600; a named ".NAME.vmsave-PID.tmp" where O_TMPFILE is missing).
  // Fails if `target` exists and `force` is false: checked now so a save does
  // not stop a guest for nothing, and again at commit.
  static Result<std::unique_ptr<ImageWriter>> create(const std::string& target, bool force,
                                                     std::vector<BlockLayout> blocks,
                                                     i64 chunk_size, const WarnFn& warn);
  ~ImageWriter();  // an uncommitted image is removed

  // Compress chunks (and the device state) with `spec`; before write_ram.
  // Refuses blocks whose chunks exceed kMaxCompressedChunkSize (kUsage).
  Status set_compression(const CodecSpec& spec);

  // Writes every block's non-zero pages at their fixed offsets; computes
  // bitmaps and chunk checksums in the same pass. `sources` in block order.
  Status write_ram(const std::vector<RamSource>& sources, const EngineConfig& cfg,
                   Progress* progress, RamStats* stats);

  // The device-state stream, appended as it arrives; never held whole.
  Status append_vmstate(const u8* data, size_t len);
  i64 vmstate_bytes() const { return vmstate_len_; }  // as QEMU sent them

  // Writes bitmaps, chunk tables, metadata and section table, flushes, then
  // the header, flushes, and links the file at the target (replacing an
  // existing one only when `force`), then flushes the directory.
  Status commit(const nlohmann::json& metadata);

  const ImageLayout& layout() const { return img_; }
  const std::string& target() const { return target_; }
  bool direct() const { return file_.direct; }

 private:
  ImageWriter() = default;
  Status flush_vmstate_buffer(bool final);
  Status put_vmstate(const u8* data, size_t len);
  Status link_into_place();

  std::string target_;
  bool force_ = false;
  std::string dir_;
  std::string temp_name_;  // set when O_TMPFILE was not available
  DirectFile file_;
  ImageLayout img_;
  std::vector<std::vector<u8>> bitmaps_;
  std::vector<std::vector<u64>> sums_;
  CodecSpec compress_;
  std::vector<std::vector<ChunkInfo>> chunk_info_;  // per block, when compressing
  std::unique_ptr<StreamCompressor> vm_codec_;
  i64 vm_stored_ = 0;  // vmstate bytes as stored (compressed or not)
  AlignedBuffer vm_buf_;
  size_t vm_fill_ = 0;
  i64 vm_written_ = 0;  // bytes of vmstate already on disk (multiple of 4096)
  i64 vmstate_len_ = 0;
  Hasher vm_hash_;
  bool committed_ = false;
  WarnFn warn_;
};

struct VerifyReport {
  bool ok = true;
  std::string first_damage;  // "block ram0 chunk 12 (image offset N)"
  i64 chunks_checked = 0;
  i64 bytes_read = 0;
  double seconds = 0;
  EngineStats engine;
};

class ImageReader {
 public:
  // Opens and checks header and section table (status kDamaged on damage).
  static Result<std::unique_ptr<ImageReader>> open(const std::string& path, const WarnFn& warn);

  const ImageLayout& layout() const { return img_; }
  const std::string& path() const { return file_.path; }
  int fd() const { return file_.fd.get(); }

  Result<nlohmann::json> metadata() const;
  Result<std::vector<u8>> bitmap(size_t block) const;
  Result<std::vector<u64>> sums(size_t block) const;
  // The block's ChunkRecords, checked; empty for an uncompressed image.
  Result<std::vector<ChunkInfo>> chunk_table(size_t block) const;
  bool compressed() const { return img_.flags & kFlagCompressed; }

  // Reads block `block`'s data pages into `dest` (its whole logical size,
  // e.g. a MAP_SHARED mapping of the RAM file), never touching pages that are
  // holes in the image, and checks every chunk's checksum.
  Status read_ram(size_t block, u8* dest, const EngineConfig& cfg, Progress* progress,
                  RamStats* stats) const;

  // Hands the device state to `sink` in pieces, then checks its checksum.
  Status stream_vmstate(const std::function<Status(const u8*, size_t)>& sink) const;

  // Checks every checksum: header and table (done at open), bitmaps, chunk
  // tables, every chunk of every block, vmstate and metadata.
  Status verify(const EngineConfig& cfg, Progress* progress, VerifyReport* report) const;

 private:
  ImageReader() = default;
  Result<std::vector<u8>> read_section(const Extent& e, const char* what) const;
  Status read_chunks(size_t block, const std::vector<u8>& bitmap, const std::vector<u64>& sums,
                     const std::vector<ChunkInfo>& codecs, u8* dest, const EngineConfig& cfg,
                     Progress* progress, RamStats* stats, VerifyReport* report) const;

  DirectFile file_;
  ImageLayout img_;
};

}  // namespace vmsave
