// Encoding and decoding of the image's header and section table.
//
// Every number read from disk is checked here against the file size and a
// named limit before anything else uses it, as ninja checks its deps log:
// after decode_header and decode_section_table succeed, every extent lies
// inside the file, is aligned, overlaps no other, and every block is
// complete. "Image too new" and "image damaged" are different errors.

#include "format/image.h"

#include "format/hash.h"

#include <algorithm>
#include <cstring>
#include <map>

#include <fmt/core.h>

namespace vmsave {

const std::array<u8, 8> kMagic = {'V', 'M', 'S', 'A', 'V', 'E', 0, 1};

static bool all_zero(const u8* p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (p[i]) return false;
  return true;
}

std::vector<u8> encode_chunk_records(const std::vector<ChunkInfo>& chunks) {
  std::vector<u8> out(chunks.size() * sizeof(ChunkRecord));
  for (size_t c = 0; c < chunks.size(); c++) {
    ChunkRecord r{};
    r.codec = static_cast<u8>(chunks[c].codec);
    r.stored_length = static_cast<u32>(chunks[c].stored_length);
    r.checksum = chunks[c].checksum;
    std::memcpy(out.data() + c * sizeof(r), &r, sizeof(r));
  }
  return out;
}

Result<std::vector<ChunkInfo>> decode_chunk_records(std::span<const u8> bytes,
                                                    const BlockLayout& b,
                                                    const std::string& path) {
  if (bytes.size() != size_t(b.chunks()) * sizeof(ChunkRecord))
    return damaged(path, fmt::format("chunk codec table of {} has the wrong length", b.id),
                   b.chunk_table.offset);
  std::vector<ChunkInfo> out(b.chunks());
  for (i64 c = 0; c < b.chunks(); c++) {
    ChunkRecord r;
    std::memcpy(&r, bytes.data() + c * sizeof(r), sizeof(r));
    i64 at = b.chunk_table.offset + c * i64(sizeof(r));
    auto bad = [&](const char* why) {
      return damaged(path, fmt::format("RAM block {} chunk {}: {}", b.id, c, why), at);
    };
    if (!all_zero(r.reserved, sizeof(r.reserved))) return bad("reserved record bytes are not zero");
    if (r.codec > kMaxCodec) return bad("unknown codec");
    ChunkInfo& ci = out[c];
    ci.codec = static_cast<Codec>(r.codec);
    ci.stored_length = u32(r.stored_length);
    ci.checksum = r.checksum;
    if (ci.codec == Codec::kRaw) {
      if (ci.stored_length != 0 || ci.checksum != 0) return bad("raw chunk with a stored length");
      continue;
    }
    // A compressed chunk saves at least one 4 KiB block, so its padded
    // bytes lie inside its own slot.
    i64 slot = align_up(b.chunk_length(c), kSectionAlign);
    if (ci.stored_length <= 0 || align_up(ci.stored_length, kSectionAlign) + kSectionAlign > slot)
      return bad("stored length out of bounds");
  }
  return out;
}

u64 checksum(std::span<const u8> bytes) { return xxh3(bytes.data(), bytes.size()); }

u64 zero_checksum(i64 len) {
  Hasher st;
  st.update_zeros(len);
  return st.digest();
}

std::string uuid_string(const std::array<u8, 16>& u) {
  std::string s;
  for (int i = 0; i < 16; i++) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s += '-';
    s += fmt::format("{:02x}", u[i]);
  }
  return s;
}

i64 plan_regions(std::vector<BlockLayout>& blocks, i64 chunk_size) {
  i64 off = kHeaderSize;
  for (BlockLayout& b : blocks) {
    i64 align = std::max(kRegionAlign, b.page_size);
    b.chunk_size = std::max(chunk_size, b.page_size);
    if (b.via_qemu()) continue;
    b.region.offset = align_up(off, align);
    b.region.length = align_up(b.size, b.page_size);
    off = b.region.offset + b.region.length;
  }
  return align_up(off, kSectionAlign);
}

static void put_entry(std::vector<u8>& out, SectionKind kind, u32 block, const Extent& e,
                      u64 flags = 0) {
  SectionEntry s{};
  s.flags = flags;
  s.kind = static_cast<u32>(kind);
  s.block = block;
  s.offset = e.offset;
  s.length = e.length;
  s.checksum = e.checksum;
  const u8* p = reinterpret_cast<const u8*>(&s);
  out.insert(out.end(), p, p + sizeof(s));
}

std::vector<u8> encode_section_table(const ImageLayout& img) {
  std::vector<u8> out;
  for (u32 i = 0; i < img.blocks.size(); i++) {
    const BlockLayout& b = img.blocks[i];
    BlockRecord r{};
    std::memcpy(r.id, b.id.data(), std::min(b.id.size(), kMaxBlockIdLength));
    r.size = b.size;
    r.page_size = b.page_size;
    r.chunk_size = b.chunk_size;
    r.data_pages = b.data_pages;
    r.flags = b.flags;
    // The record is small enough to live in the table itself: its "extent"
    // is the record, so the entry's offset/length/checksum describe it.
    const u8* p = reinterpret_cast<const u8*>(&r);
    SectionEntry s{};
    s.kind = static_cast<u32>(SectionKind::kBlock);
    s.block = i;
    s.length = sizeof(r);
    s.checksum = checksum({p, sizeof(r)});
    const u8* q = reinterpret_cast<const u8*>(&s);
    out.insert(out.end(), q, q + sizeof(s));
    out.insert(out.end(), p, p + sizeof(r));
    if (b.via_qemu()) continue;  // its pages are in the QEMU section
    put_entry(out, SectionKind::kRamRegion, i, b.region);
    put_entry(out, SectionKind::kRamBitmap, i, b.bitmap);
    put_entry(out, SectionKind::kChunkSums, i, b.sums);
    if (img.flags & kFlagCompressed) put_entry(out, SectionKind::kChunkTable, i, b.chunk_table);
  }
  put_entry(out, SectionKind::kVmstate, kNoBlock, img.vmstate,
            static_cast<u64>(img.vmstate_codec));
  put_entry(out, SectionKind::kMetadata, kNoBlock, img.metadata);
  if (img.has_qemu_section()) put_entry(out, SectionKind::kQemuMigration, kNoBlock, img.qemu);
  return out;
}

std::vector<u8> encode_header(const ImageLayout& img) {
  DiskHeader h{};
  std::memcpy(h.magic, kMagic.data(), 8);
  h.major = img.major;
  h.minor = img.minor;
  h.flags = img.flags;
  std::memcpy(h.uuid, img.uuid.data(), 16);
  h.created_ns = img.created_ns;
  h.file_size = img.file_size;
  h.table_offset = img.table.offset;
  h.table_size = img.table.length;
  h.table_checksum = img.table.checksum;
  const u8* p = reinterpret_cast<const u8*>(&h);
  h.checksum = checksum({p, offsetof(DiskHeader, checksum)});
  return std::vector<u8>(p, p + sizeof(h));
}

Result<ImageLayout> decode_header(std::span<const u8> bytes, i64 file_size,
                                  const std::string& path) {
  if (bytes.size() < sizeof(DiskHeader) || file_size < kHeaderSize)
    return damaged(path, fmt::format("file is {} bytes, smaller than an image header", file_size))
        .fix("this is not a vmsave image, or its save did not finish");
  DiskHeader h;
  std::memcpy(&h, bytes.data(), sizeof(h));
  if (std::memcmp(h.magic, kMagic.data(), 8) != 0) {
    if (all_zero(h.magic, 8))
      return damaged(path, "no image header (all zero): the save that wrote it did not finish")
          .fix("save the VM again");
    return damaged(path, "not a vmsave image (bad magic)")
        .fix("give the path of an image vmsave saved");
  }
  const u8* p = reinterpret_cast<const u8*>(&h);
  const bool sum_ok = checksum({p, offsetof(DiskHeader, checksum)}) == h.checksum;
  // A newer major version is "too new" even if the checksum does not match
  // as this vmsave computes it: a future format may checksum its header
  // differently. Only then, though, may it also be damage (a flipped bit in
  // the version field), and the message says both.
  // A version far past this one is damage, not a vmsave of the future
  // (a damaged header named "format v1482162177").
  if (h.major > kFormatMajor + 15 && !sum_ok) return damaged(path, "header checksum mismatch", 0);
  if (h.major > kFormatMajor) {
    std::string seen =
        fmt::format("format v{}, this vmsave reads up to v{}", u32(h.major), kFormatMajor);
    if (!sum_ok)
      return damaged(path, "header checksum mismatch, or an image from a newer vmsave (" + seen + ")",
                     0)
          .fix("if a newer vmsave wrote it, use that one; else the header is damaged");
    return Error{"image too new", path, seen}.fix("use a newer vmsave").as(Exit::kDamaged);
  }
  if (h.major == 0) return damaged(path, "format version 0", 8);
  if (!sum_ok) return damaged(path, "header checksum mismatch", 0);
  if (!all_zero(h.reserved, sizeof(h.reserved)))
    return damaged(path, "reserved header fields are not zero", 80);
  // Feature flags this vmsave does not know: the image is fine, this
  // vmsave is too old for it (as "image too new", a different error).
  if (u64(h.flags) & ~kKnownFlags)
    return Error{"image needs a newer vmsave", path,
                 fmt::format("format v{}.{} with feature flags 0x{:x}, of which this vmsave "
                             "(v{}.{}) knows 0x{:x}",
                             u32(h.major), u32(h.minor), u64(h.flags), kFormatMajor, kFormatMinor,
                             kKnownFlags)}
        .fix("use a newer vmsave")
        .as(Exit::kDamaged);
  if ((u64(h.flags) & kFlagCompressed) && h.minor < 1)
    return damaged(path, "compressed-image flag in a v1.0 image", 16);

  ImageLayout img;
  img.major = h.major;
  img.minor = h.minor;
  img.flags = h.flags;
  std::memcpy(img.uuid.data(), h.uuid, 16);
  img.created_ns = static_cast<i64>(u64(h.created_ns));
  u64 fsize = h.file_size;
  if (fsize > u64(file_size))
    return damaged(path, fmt::format("truncated: {} bytes of {}", file_size, fsize))
        .fix("the file was cut short (an incomplete copy?): use a complete one");
  if (fsize < u64(kHeaderSize) || fsize % kSectionAlign)
    return damaged(path, fmt::format("implausible file size {} in header", fsize), 48);
  img.file_size = static_cast<i64>(fsize);
  u64 toff = h.table_offset, tsize = h.table_size;
  if (tsize == 0 || tsize > u64(kMaxTableSize) || toff % kSectionAlign ||
      toff < u64(kHeaderSize) || toff > fsize || tsize > fsize - toff)
    return damaged(path, "section table location out of bounds", 56);
  img.table = {static_cast<i64>(toff), static_cast<i64>(tsize), h.table_checksum};
  return img;
}

// Checks one extent: inside the file, aligned as required.
static Status check_extent(const Extent& e, i64 align, const ImageLayout& img,
                           const std::string& path, const std::string& what) {
  if (e.offset < kHeaderSize || e.offset % align || e.length < 0 || e.offset > img.file_size ||
      e.length > img.file_size - e.offset)
    return damaged(path, fmt::format("{} out of bounds (offset {}, length {})", what, e.offset,
                                     e.length));
  return Status();
}

Status decode_section_table(std::span<const u8> bytes, ImageLayout& img,
                            const std::string& path) {
  if (checksum(bytes) != img.table.checksum)
    return damaged(path, "section table checksum mismatch", img.table.offset);
  // Entries: each kBlock entry is followed by its 512-byte record.
  size_t pos = 0;
  std::map<u32, BlockLayout> blocks;
  std::map<u32, int> seen;  // bit per kind, to catch duplicates and gaps
  bool have_vmstate = false, have_metadata = false, have_qemu = false;
  auto at = [&](size_t p) { return img.table.offset + static_cast<i64>(p); };

  while (pos < bytes.size()) {
    if (bytes.size() - pos < sizeof(SectionEntry))
      return damaged(path, "section table ends inside an entry", at(pos));
    SectionEntry s;
    std::memcpy(&s, bytes.data() + pos, sizeof(s));
    size_t entry_pos = pos;
    pos += sizeof(s);
    u32 kind = s.kind, block = s.block;
    if (kind < u32(SectionKind::kBlock) || kind > u32(SectionKind::kQemuMigration)) {
      // Minor versions may add kinds an older reader skips, checking only
      // their bounds (and, below, that they overlap nothing): their block
      // index, flags and reserved bytes mean what that minor says. Within
      // our own minor version an unknown kind is damage.
      if (img.minor <= kFormatMinor)
        return damaged(path, fmt::format("unknown section kind {}", kind), at(entry_pos));
      if (u64(s.offset) > u64(img.file_size) || u64(s.length) > u64(img.file_size))
        return damaged(path, "section out of bounds", at(entry_pos));
      img.unknown.push_back(
          {static_cast<i64>(u64(s.offset)), static_cast<i64>(u64(s.length)), s.checksum});
      continue;
    }
    // Only the vmstate entry of a compressed image has flags: its codec.
    bool codec_flags = kind == u32(SectionKind::kVmstate) && (img.flags & kFlagCompressed);
    if (!all_zero(s.reserved, sizeof(s.reserved)) || (s.flags != 0 && !codec_flags))
      return damaged(path, "reserved section fields are not zero", at(entry_pos));
    Extent e{static_cast<i64>(u64(s.offset)), static_cast<i64>(u64(s.length)), s.checksum};
    if (u64(s.offset) > u64(img.file_size) || u64(s.length) > u64(img.file_size))
      return damaged(path, "section out of bounds", at(entry_pos));
    bool compressed = img.flags & kFlagCompressed;
    bool per_block = (kind >= 1 && kind <= 4) || (compressed && kind == 7);
    if (per_block && block >= kMaxBlocks)
      return damaged(path, fmt::format("block index {} out of range", block), at(entry_pos));
    if (!per_block && block != kNoBlock)
      return damaged(path, "section names a block it cannot have", at(entry_pos));
    if (per_block) {
      int bit = 1 << kind;
      if (seen[block] & bit) return damaged(path, "duplicate section", at(entry_pos));
      seen[block] |= bit;
    }
    switch (static_cast<SectionKind>(kind)) {
      case SectionKind::kBlock: {
        if (e.length != sizeof(BlockRecord) || bytes.size() - pos < sizeof(BlockRecord))
          return damaged(path, "block record has a wrong size", at(entry_pos));
        if (checksum(bytes.subspan(pos, sizeof(BlockRecord))) != e.checksum)
          return damaged(path, "block record checksum mismatch", at(pos));
        BlockRecord r;
        std::memcpy(&r, bytes.data() + pos, sizeof(r));
        pos += sizeof(r);
        BlockLayout& b = blocks[block];
        size_t idlen = strnlen(r.id, sizeof(r.id));
        if (idlen == 0 || idlen > kMaxBlockIdLength)
          return damaged(path, "block id is empty or not terminated", at(entry_pos));
        b.id.assign(r.id, idlen);
        // Ids become file names and QEMU arguments (prepare prints one per
        // line): a crafted "ram0\n-monitor\n..." must not get that far.
        auto control = [](unsigned char c) { return c < 0x20 || c == 0x7f; };
        if (std::any_of(b.id.begin(), b.id.end(), control))
          return damaged(path, "a block id holds control characters", at(entry_pos));
        if (!is_file_name_id(b.id))
          return damaged(path, fmt::format("block id \"{}\" cannot be a file name", b.id),
                         at(entry_pos));
        b.size = static_cast<i64>(std::min<u64>(r.size, kMaxBlockSize + 1));
        b.page_size = static_cast<i64>(std::min<u64>(r.page_size, kMaxPageSize + 1));
        b.chunk_size = static_cast<i64>(std::min<u64>(r.chunk_size, kMaxChunkSize + 1));
        b.data_pages = static_cast<i64>(std::min<u64>(r.data_pages, kMaxBlockSize));
        if (b.size <= 0 || b.size > kMaxBlockSize)
          return damaged(path, fmt::format("block {} has an implausible size", b.id));
        if (b.page_size < kMinPageSize || b.page_size > kMaxPageSize || !is_pow2(b.page_size))
          return damaged(path, fmt::format("block {} has an implausible page size", b.id));
        if (b.chunk_size < b.page_size || b.chunk_size > kMaxChunkSize || !is_pow2(b.chunk_size))
          return damaged(path, fmt::format("block {} has an implausible chunk size", b.id));
        if ((r.flags & ~kBlockViaQemu) || !all_zero(r.reserved, sizeof(r.reserved)))
          return damaged(path, "reserved block fields are not zero", at(entry_pos));
        b.flags = r.flags;
        if (b.via_qemu() && (!img.has_qemu_section() || b.data_pages != 0))
          return damaged(path, fmt::format("block {} claims a QEMU migration section the "
                                           "image does not have", b.id),
                         at(entry_pos));
        if (b.data_pages > b.pages())
          return damaged(path, fmt::format("block {} claims more data pages than it has", b.id));
        break;
      }
      case SectionKind::kRamRegion:
        // A region has no checksum of its own: its chunks have theirs.
        if (e.checksum != 0)
          return damaged(path, "a RAM region's entry has a checksum, which must be 0",
                         at(entry_pos));
        blocks[block].region = e;
        break;
      case SectionKind::kRamBitmap:
        blocks[block].bitmap = e;
        break;
      case SectionKind::kChunkSums:
        blocks[block].sums = e;
        break;
      case SectionKind::kChunkTable:
        if (!compressed)
          return damaged(path, "chunk codec table in an image not flagged compressed",
                         at(entry_pos));
        blocks[block].chunk_table = e;
        break;
      case SectionKind::kVmstate:
        if (have_vmstate) return damaged(path, "duplicate vmstate section", at(entry_pos));
        have_vmstate = true;
        img.vmstate = e;
        if (s.flags != 0 && s.flags != u64(Codec::kZstd))
          return damaged(path, fmt::format("unknown vmstate codec {}", u64(s.flags)),
                         at(entry_pos));
        img.vmstate_codec = static_cast<Codec>(u64(s.flags));
        break;
      case SectionKind::kMetadata:
        if (have_metadata) return damaged(path, "duplicate metadata section", at(entry_pos));
        have_metadata = true;
        img.metadata = e;
        break;
      case SectionKind::kQemuMigration:
        if (have_qemu) return damaged(path, "duplicate QEMU migration section", at(entry_pos));
        if (!img.has_qemu_section())
          return damaged(path, "QEMU migration section without its header flag", at(entry_pos));
        have_qemu = true;
        img.qemu = e;
        break;
    }
  }
  if (!have_vmstate || !have_metadata)
    return damaged(path, "section table lacks the vmstate or metadata section", img.table.offset);
  if (img.has_qemu_section() && !have_qemu)
    return damaged(path, "section table lacks the QEMU migration section", img.table.offset);
  if (blocks.empty() || blocks.size() > kMaxBlocks)
    return damaged(path, "image lists no RAM block", img.table.offset);

  // Blocks must be numbered 0..n-1 with all four sections each, and a
  // chunk codec table each in a compressed image.
  const int want = (img.flags & kFlagCompressed) ? 0x9e : 0x1e;
  img.blocks.clear();
  for (u32 i = 0; i < blocks.size(); i++) {
    auto it = blocks.find(i);
    // A block saved through QEMU has only its record.
    int want_block = it != blocks.end() && it->second.via_qemu() ? 0x2 : want;
    if (it == blocks.end() || seen[i] != want_block)
      return damaged(path, fmt::format("RAM block {} is incomplete in the section table", i));
    for (auto& other : img.blocks)
      if (other.id == it->second.id)
        return damaged(path, fmt::format("two RAM blocks are named {}", other.id));
    img.blocks.push_back(it->second);
  }

  // Every extent inside the file, aligned; no two overlapping.
  std::vector<std::pair<Extent, std::string>> all;
  i64 chunks = 0;
  for (BlockLayout& b : img.blocks) {
    if (b.via_qemu()) continue;
    chunks += b.chunks();
    if (chunks > kMaxChunks)
      return damaged(path, fmt::format("the image has more than {} checksum chunks, the most "
                                       "vmsave reads (their table alone would take {})",
                                       kMaxChunks, human_bytes(double(chunks) * 8)));
    i64 align = std::max(kRegionAlign, b.page_size);
    VMSAVE_TRY(check_extent(b.region, align, img, path, "RAM region of " + b.id));
    if (b.region.length != align_up(b.size, b.page_size))
      return damaged(path, fmt::format("RAM region of {} has the wrong length", b.id));
    VMSAVE_TRY(check_extent(b.bitmap, kSectionAlign, img, path, "bitmap of " + b.id));
    if (b.bitmap.length != (b.pages() + 7) / 8)
      return damaged(path, fmt::format("bitmap of {} has the wrong length", b.id));
    VMSAVE_TRY(check_extent(b.sums, kSectionAlign, img, path, "chunk table of " + b.id));
    if (b.sums.length != b.chunks() * 8)
      return damaged(path, fmt::format("chunk table of {} has the wrong length", b.id));
    if (img.flags & kFlagCompressed) {
      VMSAVE_TRY(check_extent(b.chunk_table, kSectionAlign, img, path,
                              "chunk codec table of " + b.id));
      if (b.chunk_table.length != b.chunks() * i64(sizeof(ChunkRecord)))
        return damaged(path, fmt::format("chunk codec table of {} has the wrong length", b.id));
      if (b.chunk_size > kMaxCompressedChunkSize)
        return damaged(path, fmt::format("block {} has compressed chunks larger than {}", b.id,
                                         human_bytes(kMaxCompressedChunkSize)));
      all.emplace_back(b.chunk_table, "chunk codec table");
    }
    all.emplace_back(b.region, "RAM region");
    all.emplace_back(b.bitmap, "bitmap");
    all.emplace_back(b.sums, "chunk table");
  }
  VMSAVE_TRY(check_extent(img.vmstate, kSectionAlign, img, path, "vmstate section"));
  VMSAVE_TRY(check_extent(img.metadata, kSectionAlign, img, path, "metadata section"));
  if (img.metadata.length > kMaxMetadataSize)
    return damaged(path, "metadata section larger than the limit");
  all.emplace_back(img.vmstate, "vmstate");
  if (img.has_qemu_section()) {
    VMSAVE_TRY(check_extent(img.qemu, kSectionAlign, img, path, "QEMU migration section"));
    if (img.qemu.length == 0) return damaged(path, "QEMU migration section is empty");
    all.emplace_back(img.qemu, "QEMU migration section");
  }
  all.emplace_back(img.metadata, "metadata");
  for (const Extent& e : img.unknown) all.emplace_back(e, "a section of a newer minor version");
  all.emplace_back(Extent{img.table.offset, static_cast<i64>(bytes.size())}, "section table");
  // Empty sections (no device state in raw mode) occupy nothing.
  std::erase_if(all, [](auto& a) { return a.first.length == 0; });
  std::sort(all.begin(), all.end(),
            [](auto& a, auto& b) { return a.first.offset < b.first.offset; });
  for (size_t i = 1; i < all.size(); i++) {
    const Extent& prev = all[i - 1].first;
    if (prev.offset + prev.length > all[i].first.offset)
      return damaged(path, fmt::format("{} overlaps {}", all[i - 1].second, all[i].second),
                     all[i].first.offset);
  }
  return Status();
}

}  // namespace vmsave
