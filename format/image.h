// The vmsave image format, version 1. This comment is the specification's
// summary; docs/format.md has the prose. All integers are little-endian.
//
//   offset 0       Header (4096 bytes)
//     0   u8[8]    magic "VMSAVE\0\x01"
//     8   ul32     format major version (1); a reader refuses a newer major
//     12  ul32     format minor version (1); newer minors only add sections
//     16  ul64     feature flags: bit 0 (kFlagCompressed) = the image has
//                  compressed chunks and a ChunkRecord table per block; bit 1
//                  (kFlagQemuMigration) = the image holds a QEMU migration
//                  section. A reader refuses any bit it does not know ("needs
//                  a newer vmsave", status 3).
//     24  u8[16]   image UUID (random, version 4)
//     40  ul64     creation time, nanoseconds since the Unix epoch
//     48  ul64     file size: the exact size of the complete file
//     56  ul64     section table offset (4096-aligned)
//     64  ul64     section table size in bytes (entries, each kBlock entry
//                  followed by its 512-byte BlockRecord)
//     72  ul64     section table checksum (XXH3-64 of the entries)
//     80  u8[4008] reserved, zero
//     4088 ul64    header checksum (XXH3-64 of bytes 0..4087)
//
//   RAM regions, one per guest RAM block, each at an offset aligned to
//   max(2 MiB, the block's page size). Page i of a block is at
//   region_offset + i * page_size, so a region can be mapped as guest RAM.
//   Zero pages are holes (never written); the block's bitmap says which
//   pages hold data.
//
//   vmstate: QEMU's device-state stream, 4096-aligned, its exact length in
//   the section table (the file pads it to 4096 with zeros).
//
//   QEMU migration (minor 1, header flag bit 1): RAM that is not a shared
//   file is saved by QEMU's own mapped-ram migration into the image, from a
//   2 MiB-aligned offset after the RAM regions; its device state is then in
//   that stream and the vmstate section is empty. Blocks saved this way have
//   BlockRecord flag kBlockViaQemu and no region, bitmap or chunk table.
//
//   Tail, each piece 4096-aligned: per block a bitmap (bit i of byte i/8 set
//   when page i holds data) and a chunk table (ul64 XXH3-64 of each chunk's
//   logical content, zeros included), the JSON metadata, and the section
//   table: 64-byte SectionEntry records listing everything above.
//
//   Compressed images (flag bit 0, minor >= 1): each block also has a
//   kChunkTable section, one 16-byte ChunkRecord per chunk (codec, stored
//   length, XXH3-64 of the stored bytes). A compressed chunk's bytes sit at
//   the chunk's own offset in its region, zero-padded to 4096; the rest of
//   the chunk's slot is a hole. A raw chunk is stored exactly as in an
//   uncompressed image (record all zero). The bitmap still says which pages
//   of the logical content are non-zero. The vmstate entry's flags hold its
//   codec: 0 as QEMU wrote it, 2 one zstd frame with content checksum (its
//   length and checksum are then those of the compressed bytes).
//
// The header is written last, after everything else is on disk, so a file
// whose header checks out is complete.

#pragma once

#include <array>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "format/codec.h"
#include "format/le.h"
#include "lib/common.h"

namespace vmsave {

constexpr u32 kFormatMajor = 1;
constexpr u32 kFormatMinor = 1;
// Header feature flags. A reader refuses bits it does not know.
constexpr u64 kFlagCompressed = 1;     // ChunkRecord tables; compressed chunks
constexpr u64 kFlagQemuMigration = 2;  // a QEMU migration section
constexpr u64 kKnownFlags = kFlagCompressed | kFlagQemuMigration;
constexpr i64 kHeaderSize = 4096;
constexpr i64 kSectionAlign = 4096;
constexpr i64 kRegionAlign = 2 * kMiB;  // lets a region back 2 MiB THP/hugetlb guest RAM
constexpr i64 kDefaultChunkSize = 1 * kMiB;
extern const std::array<u8, 8> kMagic;

// Limits every value read from disk is checked against before use.
constexpr u32 kMaxBlocks = 1024;
constexpr u32 kMaxSections = 8 + 5 * kMaxBlocks;
constexpr i64 kMaxTableSize = kMaxSections * 64 + kMaxBlocks * 512;
constexpr i64 kMaxMetadataSize = 16 * kMiB;
constexpr i64 kMinPageSize = 4096;
constexpr i64 kMaxPageSize = 1 * kGiB;
constexpr i64 kMaxChunkSize = 1 * kGiB;
constexpr i64 kMaxBlockSize = i64(1) << 46;  // 64 TiB
constexpr size_t kMaxBlockIdLength = 255;
// Checksum chunks of all blocks together: their sums (8 bytes each) are
// held in memory by save, verify and restore, so this bounds that memory
// at 128 MiB (16 TiB of RAM in 1 MiB chunks). A sparse file can claim any
// size on disk; without the bound a 12 KiB crafted image made verify
// allocate 1.6 GB.
constexpr i64 kMaxChunks = i64(1) << 24;
// Compressed chunks are staged in per-worker buffers of a chunk each; this
// cap keeps those buffers small whatever --chunk-size says.
constexpr i64 kMaxCompressedChunkSize = 4 * kMiB;

enum class SectionKind : u32 {
  kBlock = 1,      // a BlockRecord
  kRamRegion = 2,  // a block's pages at fixed offsets
  kRamBitmap = 3,  // which pages of a block hold data
  kChunkSums = 4,  // XXH3-64 per chunk of a block
  kVmstate = 5,    // QEMU device state
  kMetadata = 6,   // JSON
  kChunkTable = 7,      // a ChunkRecord per chunk of a block (compressed images)
  kQemuMigration = 8,   // QEMU's mapped-ram migration stream (RAM + device state)
};

// BlockRecord flags: the block's pages are in the QEMU migration section,
// not in a region of its own.
constexpr u64 kBlockViaQemu = 2;
constexpr u32 kNoBlock = 0xffffffff;

struct DiskHeader {
  u8 magic[8];
  ul32 major;
  ul32 minor;
  ul64 flags;
  u8 uuid[16];
  ul64 created_ns;
  ul64 file_size;
  ul64 table_offset;
  ul64 table_size;
  ul64 table_checksum;
  u8 reserved[4008];
  ul64 checksum;
};
static_assert(sizeof(DiskHeader) == kHeaderSize);

struct SectionEntry {
  ul32 kind;
  ul32 block;
  ul64 offset;
  ul64 length;
  ul64 checksum;
  ul64 flags;
  u8 reserved[24];
};
static_assert(sizeof(SectionEntry) == 64);

struct BlockRecord {
  char id[256];
  ul64 size;
  ul64 page_size;
  ul64 chunk_size;
  ul64 data_pages;
  ul64 flags;
  u8 reserved[216];
};
static_assert(sizeof(BlockRecord) == 512);

// One per chunk in a kChunkTable section. Raw chunks: all zero.
// Compressed: codec 1 (lz4) or 2 (zstd), the exact compressed length (the
// file holds it padded to 4096; padded length + 4096 <= chunk length, so a
// compressed chunk always saves at least one 4 KiB block), and the XXH3-64
// of those `stored_length` bytes.
struct ChunkRecord {
  u8 codec;
  u8 reserved[3];
  ul32 stored_length;
  ul64 checksum;
};
static_assert(sizeof(ChunkRecord) == 16);

// A chunk record, decoded and checked.
struct ChunkInfo {
  Codec codec = Codec::kRaw;
  i64 stored_length = 0;
  u64 checksum = 0;
};

// A section's place in the file, decoded.
struct Extent {
  i64 offset = 0;
  i64 length = 0;
  u64 checksum = 0;
};

// A RAM block as the image describes it.
struct BlockLayout {
  std::string id;
  i64 size = 0;
  i64 page_size = 0;
  i64 chunk_size = 0;
  i64 data_pages = 0;
  u64 flags = 0;  // kBlockViaQemu
  Extent region;
  Extent bitmap;
  Extent sums;
  Extent chunk_table;  // kChunkTable; length 0 in uncompressed images

  bool via_qemu() const { return flags & kBlockViaQemu; }
  i64 pages() const { return (size + page_size - 1) / page_size; }
  i64 chunks() const { return (size + chunk_size - 1) / chunk_size; }
  // The RAM it stores, what a restore or verify reads (a last page past
  // the block's end counts only up to it).
  i64 data_bytes() const { return std::min(data_pages * page_size, size); }
  // Length of chunk c: the last one may be short.
  i64 chunk_length(i64 c) const { return std::min(chunk_size, size - c * chunk_size); }
};

struct ImageLayout {
  u32 major = kFormatMajor;
  u32 minor = kFormatMinor;
  u64 flags = 0;  // kFlag*
  std::array<u8, 16> uuid{};
  i64 created_ns = 0;
  i64 file_size = 0;
  std::vector<BlockLayout> blocks;
  Extent vmstate;
  Codec vmstate_codec = Codec::kRaw;
  Extent qemu;  // the QEMU migration section; length 0 when absent
  // Sections of kinds this reader does not know (a newer minor version):
  // skipped, but they still must not overlap the others.
  std::vector<Extent> unknown;
  Extent metadata;
  Extent table;

  bool has_qemu_section() const { return flags & kFlagQemuMigration; }
};

// Where the RAM regions go for these blocks (id, size, page size set), and
// where the vmstate section starts: the writer's plan before any byte is
// written. Chunk size is max(`chunk_size`, page size). Blocks saved through
// QEMU get no region.
i64 plan_regions(std::vector<BlockLayout>& blocks, i64 chunk_size);

// Encodes the section table for `img` (blocks, vmstate, metadata with their
// extents and checksums filled in).
std::vector<u8> encode_section_table(const ImageLayout& img);

// Encodes the header for `img`, whose table extent and file size are set.
std::vector<u8> encode_header(const ImageLayout& img);

// Decodes and checks a header. `file_size` is the file's real size: a
// smaller one means the image is truncated. Errors have status kDamaged.
Result<ImageLayout> decode_header(std::span<const u8> bytes, i64 file_size,
                                  const std::string& path);

// Decodes and checks the section table into `img` (whose header fields are
// set): every extent inside the file, aligned, not overlapping, each block
// complete and consistent.
Status decode_section_table(std::span<const u8> bytes, ImageLayout& img, const std::string& path);

// Decodes and checks block `b`'s ChunkRecord table: one record per chunk,
// codec known, reserved bytes zero, stored length bounded by the chunk.
// `offset` (the section's) is for messages.
Result<std::vector<ChunkInfo>> decode_chunk_records(std::span<const u8> bytes,
                                                    const BlockLayout& b, const std::string& path);
std::vector<u8> encode_chunk_records(const std::vector<ChunkInfo>& chunks);

u64 checksum(std::span<const u8> bytes);
// XXH3-64 of `len` zero bytes: the checksum of a chunk that is all holes.
u64 zero_checksum(i64 len);

// A block id names a file under --ram-dir: nothing that could leave that
// directory. save --ram refuses others as a usage error; an image holding
// one is damaged.
inline bool is_file_name_id(const std::string& id) {
  return !id.empty() && id.size() <= kMaxBlockIdLength && id != "." && id != ".." &&
         id.find('/') == std::string::npos;
}

inline bool bitmap_test(const u8* bitmap, i64 i) { return bitmap[i / 8] & (1u << (i % 8)); }
inline void bitmap_set(u8* bitmap, i64 i) { bitmap[i / 8] |= static_cast<u8>(1u << (i % 8)); }

std::string uuid_string(const std::array<u8, 16>& uuid);

}  // namespace vmsave
