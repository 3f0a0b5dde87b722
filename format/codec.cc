// lz4 and zstd behind the three calls the image code needs: compress a
// chunk into a bounded buffer, decompress a chunk to an exact length, and
// stream the device state through one zstd frame.
//
// Damaged input is the normal case to defend against here: every call on
// data read from disk uses the bounded entry points (LZ4_decompress_safe,
// ZSTD_decompressDCtx with the exact capacity) and checks the length that
// comes back.

#include "format/codec.h"

#include <lz4.h>
#include <zstd.h>

#include <charconv>
#include <utility>

#include <fmt/core.h>

namespace vmsave {

const char* codec_name(Codec c) {
  switch (c) {
    case Codec::kRaw:
      return "none";
    case Codec::kLz4:
      return "lz4";
    case Codec::kZstd:
      return "zstd";
  }
  return "?";
}

std::string CodecSpec::name() const {
  if (codec == Codec::kZstd) return fmt::format("zstd:{}", level);
  return codec_name(codec);
}

Result<CodecSpec> parse_codec_spec(const std::string& s) {
  auto bad = [&](const std::string& why) {
    return Error{"bad --compress value", "", fmt::format("\"{}\": {}", s, why)}
        .fix("use lz4, zstd or zstd:LEVEL with LEVEL from 1 to 19")
        .as(Exit::kUsage);
  };
  if (s == "lz4") return CodecSpec{Codec::kLz4, 0};
  if (s == "zstd") return CodecSpec{Codec::kZstd, kZstdDefaultLevel};
  if (s.rfind("zstd:", 0) == 0) {
    std::string l = s.substr(5);
    int level = 0;
    auto [p, ec] = std::from_chars(l.data(), l.data() + l.size(), level);
    if (l.empty() || ec != std::errc() || p != l.data() + l.size())
      return bad("the level is not a number");
    if (level < 1 || level > kZstdMaxLevel) return bad("the level is out of range");
    return CodecSpec{Codec::kZstd, level};
  }
  if (s.rfind("lz4:", 0) == 0) return bad("lz4 takes no level");
  return bad("unknown codec");
}

// ------------------------------------------------------------ chunks

Compressor::Compressor(CodecSpec spec) : spec_(spec) {
  if (spec_.codec == Codec::kZstd) zc_ = ZSTD_createCCtx();
}

Compressor::~Compressor() {
  ZSTD_freeCCtx(zc_);
}

Compressor::Compressor(Compressor&& o) noexcept
    : spec_(o.spec_), acceleration_(o.acceleration_), zc_(std::exchange(o.zc_, nullptr)) {}

size_t Compressor::compress(std::span<const u8> src, u8* dst, size_t cap) {
  if (cap == 0 || src.size() > size_t(LZ4_MAX_INPUT_SIZE)) return 0;
  switch (spec_.codec) {
    case Codec::kLz4: {
      int n = LZ4_compress_fast(reinterpret_cast<const char*>(src.data()),
                                reinterpret_cast<char*>(dst), static_cast<int>(src.size()),
                                static_cast<int>(std::min<size_t>(cap, INT32_MAX)), acceleration_);
      return n > 0 ? static_cast<size_t>(n) : 0;
    }
    case Codec::kZstd: {
      if (!zc_) return 0;  // out of memory at creation: store raw
      size_t n = ZSTD_compressCCtx(zc_, dst, cap, src.data(), src.size(), spec_.level);
      return ZSTD_isError(n) ? 0 : n;  // dstSize_tooSmall: does not shrink enough
    }
    case Codec::kRaw:
      break;
  }
  return 0;
}

void Lz4Effort::add(u32 in_flight, double waited_s, double worked_s) {
  deep_ += in_flight > 1;
  waited_ += waited_s;
  worked_ += worked_s;
  if (++n_ < kWindow) return;
  if (waited_ > (waited_ + worked_) / 20) {
    if (shift_ > 0) shift_--;
  } else if (deep_ == 0 && acceleration() < kMaxLz4Acceleration) {
    shift_++;
  }
  n_ = deep_ = 0;
  waited_ = worked_ = 0;
}

Decompressor::Decompressor() : zd_(ZSTD_createDCtx()) {}
Decompressor::~Decompressor() {
  ZSTD_freeDCtx(zd_);
}
Decompressor::Decompressor(Decompressor&& o) noexcept : zd_(std::exchange(o.zd_, nullptr)) {}

bool Decompressor::decompress(Codec c, std::span<const u8> src, std::span<u8> dst) {
  if (src.size() > size_t(INT32_MAX) || dst.size() > size_t(INT32_MAX)) return false;
  switch (c) {
    case Codec::kLz4: {
      int n = LZ4_decompress_safe(reinterpret_cast<const char*>(src.data()),
                                  reinterpret_cast<char*>(dst.data()), static_cast<int>(src.size()),
                                  static_cast<int>(dst.size()));
      return n >= 0 && static_cast<size_t>(n) == dst.size();
    }
    case Codec::kZstd: {
      if (!zd_) return false;
      size_t n = ZSTD_decompressDCtx(zd_, dst.data(), dst.size(), src.data(), src.size());
      return !ZSTD_isError(n) && n == dst.size();
    }
    case Codec::kRaw:
      break;
  }
  return false;
}

// ------------------------------------------------------------ streams

StreamCompressor::StreamCompressor(int level)
    : zc_(ZSTD_createCCtx()), out_size_(ZSTD_CStreamOutSize()) {
  out_.reset(new u8[out_size_]);
  if (zc_) {
    ZSTD_CCtx_setParameter(zc_, ZSTD_c_compressionLevel, level);
    ZSTD_CCtx_setParameter(zc_, ZSTD_c_checksumFlag, 1);
  }
}

StreamCompressor::~StreamCompressor() {
  ZSTD_freeCCtx(zc_);
}

Status StreamCompressor::run(const u8* data, size_t len, bool end, const Sink& sink) {
  if (!zc_) return Error{"zstd", "", "cannot allocate a compression context"};
  ZSTD_inBuffer in{data, len, 0};
  for (;;) {
    ZSTD_outBuffer out{out_.get(), out_size_, 0};
    size_t left = ZSTD_compressStream2(zc_, &out, &in, end ? ZSTD_e_end : ZSTD_e_continue);
    if (ZSTD_isError(left)) return Error{"zstd", "", ZSTD_getErrorName(left)};
    if (out.pos) VMSAVE_TRY(sink(out_.get(), out.pos));
    if (end ? left == 0 : in.pos == in.size) return Status();
  }
}

Status StreamCompressor::write(const u8* data, size_t len, const Sink& sink) {
  return run(data, len, false, sink);
}

Status StreamCompressor::finish(const Sink& sink) {
  return run(nullptr, 0, true, sink);
}

StreamDecompressor::StreamDecompressor()
    : zd_(ZSTD_createDCtx()), out_size_(ZSTD_DStreamOutSize()) {
  out_.reset(new u8[out_size_]);
}

StreamDecompressor::~StreamDecompressor() {
  ZSTD_freeDCtx(zd_);
}

Status StreamDecompressor::write(const u8* data, size_t len, const Sink& sink, std::string* err) {
  if (!zd_) return Error{"zstd", "", "cannot allocate a decompression context"};
  ZSTD_inBuffer in{data, len, 0};
  while (in.pos < in.size || !done_) {
    if (done_) {
      *err = "bytes after the end of the compressed device state";
      return Status();
    }
    ZSTD_outBuffer out{out_.get(), out_size_, 0};
    size_t r = ZSTD_decompressStream(zd_, &out, &in);
    if (ZSTD_isError(r)) {
      *err = fmt::format("compressed device state is damaged ({})", ZSTD_getErrorName(r));
      return Status();
    }
    if (out.pos && sink) VMSAVE_TRY(sink(out_.get(), out.pos));
    if (r == 0) done_ = true;
    // Input used up and no output pending: wait for more.
    if (in.pos == in.size && out.pos < out.size) break;
  }
  return Status();
}

}  // namespace vmsave
