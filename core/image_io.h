// Writing and reading whole images: where format/ (bytes on disk) meets io/
// (rings and O_DIRECT). Both save paths (QEMU and raw memory files) and all
// restore paths use these two classes.

#pragma once

#include <atomic>
#include <functional>
#include <mutex>
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
  // Data pages and all pages, in bytes: blocks differ in page size (a
  // 2 MiB page counted as one of 4 KiB made a half-data save 99.8% zero).
  i64 data_bytes = 0;
  i64 total_bytes = 0;
  i64 zero_filled_bytes = 0;  // zero pages moved along with data (short holes)
  // Compressed images: stored_bytes is what the RAM regions hold on disk,
  // uncompressed_bytes what they would hold raw (data pages).
  bool compressed = false;
  i64 uncompressed_bytes = 0;
  i64 compressed_chunks = 0;
  double lz4_acceleration = 0;  // mean over the chunks lz4 was tried on
  double seconds = 0;
  EngineStats engine;
};

// The shortest run of zero pages between data pages worth leaving as a hole
// in an image on the filesystem of `fd`. A hole splits a write in two, and
// on a block device every write costs a request and an extent: a guest
// whose zero pages are scattered one by one (25% of them) saved 3.5x slower
// with every one a hole than with runs under 64 KiB written as zeros (1 GiB,
// ext4: 2.7 s against 0.8 s). On tmpfs, ramfs and hugetlbfs a hole costs
// nothing and saves memory: 0 there (every zero page a hole).
constexpr i64 kDefaultMinHole = 64 * kKiB;
i64 default_min_hole(int fd);

// Whether `fd` is on a filesystem kept in memory (tmpfs, ramfs, hugetlbfs).
bool in_memory_fs(int fd);

// The bytes of `fd` from `offset` to its end that are not holes: what QEMU's
// migration section stores (its RAM pages, at fixed offsets, and the device
// state), since vmsave's format does not say where those pages are.
i64 stored_from(int fd, i64 offset);

// Where the first non-zero byte of `size` bytes of `fd` from `offset` is,
// relative to `offset` (to the 4 KiB page), or -1 when they are all zero.
// Reads only what is not a hole.
Result<i64> first_nonzero(int fd, i64 offset, i64 size, const std::string& path);

// Refuses a save whose target is one of the files it saves, by any name (a
// hard link, say): the image would take that file's name, and a VM that
// maps it would run on unnamed.
Status check_target_not_source(const std::string& target, const std::vector<RamSource>& sources);

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

  // Zero pages between data pages in one chunk are kept as holes only in
  // runs of at least `bytes` (`save --min-hole`); shorter runs are written
  // as zeros with their neighbours. The bitmap marks zero pages either way.
  // Negative: default_min_hole() of the image's filesystem. Before write_ram.
  void set_min_hole(i64 bytes);
  i64 min_hole() const { return min_hole_; }

  // Compress chunks (and the device state) with `spec`; before write_ram.
  // Refuses blocks whose chunks exceed kMaxCompressedChunkSize (kUsage).
  Status set_compression(const CodecSpec& spec);

  // Writes every block's non-zero pages at their fixed offsets; computes
  // bitmaps and chunk checksums in the same pass. `sources` in block order.
  Status write_ram(const std::vector<RamSource>& sources, const EngineConfig& cfg,
                   Progress* progress, RamStats* stats);

  // Live save (`save --live`): the guest may write its RAM while a pass
  // runs. Each pass copies a 64 KiB piece (or a page, if larger) into a
  // buffer, hashes the copy (XXH3) and writes the copy's non-zero pages, so
  // the hash describes exactly what is on disk; a later pass hashes memory
  // again and rewrites only the pieces whose hash changed. The first pass
  // writes everything; the last one runs with the guest stopped and leaves
  // the image equal to memory. No kernel dirty tracking is needed.
  struct PassStats {
    i64 pieces_rewritten = 0;
    i64 bytes_written = 0;
    double seconds = 0;
  };
  Status live_pass(const std::vector<RamSource>& sources, const EngineConfig& cfg,
                   Progress* progress, PassStats* stats);
  // After the stopped pass: chunk checksums of the pieces rewritten after
  // the first pass, page counts, and the totals in `stats`.
  Status finish_live(RamStats* stats);
  // Flushes what is written so far (data and the extents that hold it) to
  // stable storage: a live save calls it after its first pass, while the
  // guest still runs, so the flush at commit has only the later passes'
  // rewrites to push.
  Status sync_data();

  // The QEMU migration section (when a block has kBlockViaQemu): QEMU's
  // mapped-ram migration writes from qemu_offset() on, through descriptors
  // for the same nameless file opened with `flags` (O_WRONLY, with or
  // without O_DIRECT: QEMU picks by flags). It truncates the file there, so
  // vmsave's RAM regions all lie below it and the tail goes after it.
  i64 qemu_offset() const { return img_.qemu.offset; }
  // Bytes QEMU's section holds on disk so far (its holes not counted): a
  // live migration rewrites pages in place, so its own counter overstates.
  i64 qemu_section_stored() const;
  Result<UniqueFd> reopen(int flags) const;
  // Once QEMU is done: its section ends at the file's end; hashes it (holes
  // as zeros) for verify, and places the tail after it.
  Status finish_qemu_section(Progress* progress);

  // The device-state stream, appended as it arrives; never held whole.
  Status append_vmstate(const u8* data, size_t len);
  i64 vmstate_bytes() const { return vmstate_len_; }  // as QEMU sent them
  i64 vmstate_stored_bytes() const { return vm_stored_; }  // as the image holds them

  // Writes bitmaps, chunk tables, metadata and section table, flushes, then
  // the header, flushes, and links the file at the target (replacing an
  // existing one only when `force`), then flushes the directory.
  Status commit(const nlohmann::json& metadata);
  // Makes a commit running on another thread stop before it links the
  // file (a --flush-timeout expired): no image will appear. False when the
  // file is already linked (the commit got there first).
  bool abandon();

  const ImageLayout& layout() const { return img_; }
  const std::string& target() const { return target_; }
  bool direct() const { return file_.direct; }
  // The image's file, linked at the target by commit().
  int fd() const { return file_.fd.get(); }

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
  i64 min_hole_ = 0;
  bool block_fs_ = false;  // on a block device's filesystem, with O_DIRECT
  CodecSpec compress_;
  std::vector<std::vector<ChunkInfo>> chunk_info_;  // per block, when compressing
  std::unique_ptr<StreamCompressor> vm_codec_;
  i64 vm_stored_ = 0;  // vmstate bytes as stored (compressed or not)
  // Live passes.
  std::vector<Mapping> live_maps_;
  std::vector<std::vector<u64>> piece_sums_;   // XXH3 of each piece as written
  std::vector<std::vector<u8>> chunk_dirty_;   // rewritten after the first pass
  // Blocks whose pages are larger than a piece: whether each piece held
  // data as written (a page's bit is whether any of its pieces does).
  std::vector<std::vector<u8>> piece_data_;
  int live_passes_ = 0;
  i64 live_bytes_ = 0;
  double live_seconds_ = 0;
  EngineStats live_engine_;  // every pass's requests, for the report
  AlignedBuffer vm_buf_;
  size_t vm_fill_ = 0;
  i64 vm_written_ = 0;  // bytes of vmstate already on disk (multiple of 4096)
  i64 vmstate_len_ = 0;
  Hasher vm_hash_;
  bool committed_ = false;
  std::mutex link_mu_;  // abandon() and linking exclude each other
  bool abandoned_ = false;
  bool linked_ = false;
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

// Where a restore puts a block's pages: written into `fd` from `offset` on,
// or, where the file takes no write() (hugetlbfs), stored into `map`, a
// MAP_SHARED mapping of its whole logical size.
struct RamDest {
  int fd = -1;
  i64 offset = 0;
  u8* map = nullptr;
};

// The most of a chunk a reader buffers: larger chunks (--chunk-size up to
// 1G, 1 GiB pages) go straight into a mapping, or verify reads them in
// windows of this size. Chunk buffers of 1 GiB had verify take 1 GiB.
constexpr i64 kMaxChunkBuffer = 4 * kMiB;

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

  // Reads block `block`'s data pages into `dest`, never touching pages that
  // are holes in the image, and checks every chunk's checksum.
  Status read_ram(size_t block, const RamDest& dest, const EngineConfig& cfg, Progress* progress,
                  RamStats* stats) const;

  // Whether `fd` holds block `block`'s RAM from `offset` as this image has
  // it, judged on up to `samples` chunks with data spread over the block
  // (the image's zero pages are not read). The first chunk that differs, or
  // -1 when all agree.
  Result<i64> first_differing_chunk(size_t block, int fd, i64 offset, int samples,
                                    const std::string& file) const;

  // A second descriptor for the image (e.g. O_RDONLY | O_DIRECT for QEMU).
  Result<UniqueFd> reopen(int flags) const;

  // Hands the device state to `sink` in pieces, then checks its checksum.
  Status stream_vmstate(const std::function<Status(const u8*, size_t)>& sink) const;

  // Checks every checksum: header and table (done at open), bitmaps, chunk
  // tables, every chunk of every block, vmstate, metadata and the QEMU
  // migration section.
  Status verify(const EngineConfig& cfg, Progress* progress, VerifyReport* report) const;

 private:
  ImageReader() = default;
  // `e`, or damage naming the cut when it is a read past the end of a file
  // that has become shorter than its header says.
  Error named_cut(const Error& e) const;
  Result<std::vector<u8>> read_section(const Extent& e, const char* what) const;
  Status read_chunks(size_t block, const std::vector<u8>& bitmap, const std::vector<u64>& sums,
                     const std::vector<ChunkInfo>& codecs, const RamDest& dest,
                     const EngineConfig& cfg, Progress* progress, RamStats* stats,
                     VerifyReport* report) const;
  // verify's read_chunks for chunks too large to buffer whole.
  Status verify_large_chunks(size_t block, const std::vector<u8>& bitmap,
                             const std::vector<u64>& sums, const EngineConfig& cfg,
                             Progress* progress, VerifyReport* report) const;
  // Damage in chunk `c` of block `b` (at page `bad_page` of it, if >= 0),
  // noted in `report` too.
  Error chunk_damaged(const BlockLayout& b, i64 c, const std::string& why, i64 bad_page,
                      VerifyReport* report) const;

  DirectFile file_;
  ImageLayout img_;
  i64 min_hole_ = 0;  // gaps under this between runs are read in one request
};

}  // namespace vmsave
