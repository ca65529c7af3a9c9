#include "schedule.h"

#include <cstddef>
#include <utility>

namespace shardio {
namespace {

uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t state) : state_(state) {}
  uint64_t next() {
    state_ += 0x9E3779B97F4A7C15ULL;
    return splitmix64_mix(state_);
  }
  // Uniform in [0, bound), bound >= 1, without modulo bias (Lemire 2019).
  uint64_t below(uint64_t bound) {
    __uint128_t m = static_cast<__uint128_t>(next()) * bound;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < bound) {
      const uint64_t threshold = (0 - bound) % bound;
      while (low < threshold) {
        m = static_cast<__uint128_t>(next()) * bound;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }

 private:
  uint64_t state_;
};

}  // namespace

std::vector<int64_t> permutation(int64_t n, uint64_t seed, uint64_t epoch) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[i] = i;
  // Mixing seed and epoch separately keeps (seed, epoch) and (seed + 1, epoch - 1) apart.
  SplitMix64 rng(splitmix64_mix(seed) ^ splitmix64_mix(epoch ^ 0xD1B54A32D192ED03ULL));
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
    std::swap(p[i], p[j]);
  }
  return p;
}

std::vector<int64_t> pack_batches(const int64_t* lengths, int64_t count, int64_t budget) {
  std::vector<int64_t> bounds{0};
  int64_t tokens = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (tokens > 0 && tokens + lengths[i] > budget) {
      bounds.push_back(i);
      tokens = 0;
    }
    tokens += lengths[i];
  }
  if (count > 0) bounds.push_back(count);
  return bounds;
}

}  // namespace shardio
