// Latency histogram for I/O requests: log-scaled buckets in microseconds,
// four per power of two (about 19% wide), so percentiles are within a
// bucket's width of the truth while a histogram stays 1 KiB and merging the
// workers' histograms is a loop of additions.

#pragma once

#include <array>
#include <cmath>

#include "lib/common.h"

namespace vmsave {

class LatencyHistogram {
 public:
  static constexpr int kSubBuckets = 4;
  static constexpr int kBuckets = 40 * kSubBuckets;  // up to 2^40 us

  void add(i64 us) {
    if (us < 1) us = 1;
    int b = static_cast<int>(std::log2(static_cast<double>(us)) * kSubBuckets);
    if (b >= kBuckets) b = kBuckets - 1;
    counts_[b]++;
    count_++;
    if (us > max_) max_ = us;
  }

  void merge(const LatencyHistogram& o) {
    for (int i = 0; i < kBuckets; i++) counts_[i] += o.counts_[i];
    count_ += o.count_;
    if (o.max_ > max_) max_ = o.max_;
  }

  // The upper bound of the bucket holding the p-th percentile (0 < p <= 100).
  i64 percentile(double p) const {
    if (count_ == 0) return 0;
    i64 want = static_cast<i64>(std::ceil(count_ * p / 100.0));
    i64 seen = 0;
    for (int i = 0; i < kBuckets; i++) {
      seen += counts_[i];
      if (seen >= want) {
        i64 upper = static_cast<i64>(std::exp2(static_cast<double>(i + 1) / kSubBuckets));
        return upper < max_ ? upper : max_;
      }
    }
    return max_;
  }

  i64 count() const { return count_; }
  i64 max() const { return max_; }

 private:
  std::array<i64, kBuckets> counts_{};
  i64 count_ = 0;
  i64 max_ = 0;
};

}  // namespace vmsave
