// The chunk codecs of a compressed image (format minor 1): lz4 and zstd,
// one independent frame per chunk, plus the zstd stream the device state
// goes through. Bytes in, bytes out; nothing here knows about files.
//
// A Compressor or Decompressor belongs to one worker thread (its zstd
// context is reused chunk after chunk, as zstd's docs advise) and is
// move-only: the context is freed by its destructor.

#pragma once

#include <functional>
#include <memory>
#include <span>
#include <string>

#include "lib/common.h"

struct ZSTD_CCtx_s;
struct ZSTD_DCtx_s;

namespace vmsave {

// On disk in a ChunkRecord (and in the vmstate section entry's flags).
enum class Codec : u8 {
  kRaw = 0,   // stored as pages at their offsets, zero pages as holes
  kLz4 = 1,   // one LZ4 block (any acceleration: the decoder is the same)
  kZstd = 2,  // one zstd frame
};
constexpr u8 kMaxCodec = 2;

// What `save --compress` asked for.
struct CodecSpec {
  Codec codec = Codec::kRaw;
  int level = 0;  // zstd only

  bool enabled() const { return codec != Codec::kRaw; }
  std::string name() const;  // "lz4", "zstd:3"
};

constexpr int kZstdDefaultLevel = 3;  // zstd's own default
constexpr int kZstdMaxLevel = 19;     // 20-22 ("ultra") need far more memory
// 4 GiB of the bench's mixed pages (a quarter zero), 1 MiB chunks, one
// core here: 0.98 GB/s and 0.62 of the input at acceleration 1, 1.3 GB/s
// and 0.66 at 16, 3.2 GB/s and 0.73 at 64. At 128 (0.75) a chunk whose
// zero pages are holes anyway no longer shrinks and is stored raw.
constexpr int kMaxLz4Acceleration = 64;

// Parses "lz4", "zstd" or "zstd:LEVEL" (1-19). Errors have status kUsage.
Result<CodecSpec> parse_codec_spec(const std::string& s);

const char* codec_name(Codec c);

class Compressor {
 public:
  explicit Compressor(CodecSpec spec);
  ~Compressor();
  Compressor(Compressor&&) noexcept;
  Compressor(const Compressor&) = delete;

  // Compresses `src` into at most `cap` bytes of `dst`. Returns the
  // compressed length, or 0 when it does not fit (the caller stores the
  // chunk raw: not shrinking enough is not an error).
  size_t compress(std::span<const u8> src, u8* dst, size_t cap);

  // lz4 only: LZ4_compress_fast's acceleration, 1 (the default, smallest
  // output) to kMaxLz4Acceleration; each step up trades ratio for speed.
  // zstd keeps the level it was given.
  void set_acceleration(int a) { acceleration_ = a; }

 private:
  CodecSpec spec_;
  int acceleration_ = 1;
  ZSTD_CCtx_s* zc_ = nullptr;
};

// How hard lz4 works, following the disk. Each save worker looks back over
// its last kWindow chunks: if it spent more than a twentieth of that time
// waiting for an output buffer to come back from the disk, the disk is
// behind and the spare CPU goes into a smaller output (the acceleration
// halves); if its writes were at most one deep as it started each chunk,
// the disk is short of work and the next chunks are compressed faster (the
// acceleration doubles, up to kMaxLz4Acceleration). A slow disk gets the
// smallest output, a fast one the shortest save. Judged over a window, not
// per chunk: a throttled disk releases writes in bursts, and sampled chunk
// by chunk the bursts read as an idle disk (a save to a disk throttled to
// 300 MB/s then ran at a mean acceleration of 25 instead of 2-4).
// 4 GiB of the bench's mixed pages from /dev/shm, 2 cores, alternating
// runs: to this project's ext4, 2.59-2.63 s and 2.7 GiB stored against
// 2.99-3.21 s uncompressed; to the bench's ext4 on a loop device, median
// 2.91 s against 2.88 s; to a disk throttled to 300 MB/s, 9.2-9.3 s and
// 2551-2577 MiB, where a fixed acceleration of 1 would store 2541 MiB.
class Lz4Effort {
 public:
  static constexpr int kWindow = 8;

  // One chunk: the worker's writes in flight as it started on it, then the
  // seconds it waited for a free output buffer and the seconds it worked.
  void add(u32 in_flight, double waited_s, double worked_s);
  int acceleration() const { return 1 << shift_; }

 private:
  int shift_ = 0, n_ = 0, deep_ = 0;
  double waited_ = 0, worked_ = 0;
};

class Decompressor {
 public:
  Decompressor();
  ~Decompressor();
  Decompressor(Decompressor&&) noexcept;
  Decompressor(const Decompressor&) = delete;

  // Decompresses `src` (codec `c`) into exactly `dst.size()` bytes. False
  // when the data is damaged or decompresses to any other length; never
  // writes outside `dst`, never reads outside `src`.
  bool decompress(Codec c, std::span<const u8> src, std::span<u8> dst);

 private:
  ZSTD_DCtx_s* zd_ = nullptr;
};

// The device-state stream, compressed as it arrives into one zstd frame
// with zstd's content checksum. `sink` receives compressed bytes.
class StreamCompressor {
 public:
  explicit StreamCompressor(int level);
  ~StreamCompressor();
  StreamCompressor(const StreamCompressor&) = delete;

  using Sink = std::function<Status(const u8*, size_t)>;
  Status write(const u8* data, size_t len, const Sink& sink);
  Status finish(const Sink& sink);

 private:
  Status run(const u8* data, size_t len, bool end, const Sink& sink);
  ZSTD_CCtx_s* zc_ = nullptr;
  std::unique_ptr<u8[]> out_;
  size_t out_size_ = 0;
};

// The reverse: feed compressed pieces, receive the device state. Errors
// (damaged data, a frame that ends early or has trailing bytes) are
// returned as strings for the caller to turn into "image damaged".
class StreamDecompressor {
 public:
  StreamDecompressor();
  ~StreamDecompressor();
  StreamDecompressor(const StreamDecompressor&) = delete;

  using Sink = std::function<Status(const u8*, size_t)>;
  // `err` is set (and an ok Status returned) when the data is damaged;
  // a failing sink's Status is returned as is.
  Status write(const u8* data, size_t len, const Sink& sink, std::string* err);
  // True when exactly one whole frame was consumed.
  bool finished() const { return done_; }

 private:
  ZSTD_DCtx_s* zd_ = nullptr;
  std::unique_ptr<u8[]> out_;
  size_t out_size_ = 0;
  bool done_ = false;
};

}  // namespace vmsave
