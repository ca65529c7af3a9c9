// XXH64, the 64-bit xxHash checksum, written from the public algorithm description so the
// extension needs no new dependency. Streaming: update() any number of times, then digest().
#pragma once

#include <cstddef>
#include <cstdint>

namespace shardio {

class Xxh64 {
 public:
  explicit Xxh64(uint64_t seed = 0);
  void update(const void* data, size_t len);
  uint64_t digest() const;

 private:
  void consume_stripe(const uint8_t* p);

  uint64_t seed_;
  uint64_t acc_[4];
  uint64_t total_len_ = 0;
  uint8_t buf_[32];  // bytes not yet forming a full 32-byte stripe
  size_t buf_len_ = 0;
};

// One-shot convenience.
uint64_t xxh64(const void* data, size_t len, uint64_t seed = 0);

}  // namespace shardio
