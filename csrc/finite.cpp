#include "finite.h"

#include <cstring>
#include <stdexcept>

namespace shardio {
namespace {

// A float is NaN or inf exactly when all its exponent bits are set.
template <typename Bits>
int64_t scan(const void* data, size_t count, Bits exponent_mask) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < count; ++i) {
    Bits v;
    std::memcpy(&v, p + i * sizeof(Bits), sizeof(Bits));
    if ((v & exponent_mask) == exponent_mask) return static_cast<int64_t>(i);
  }
  return -1;
}

}  // namespace

int64_t first_nonfinite(const void* data, size_t count, const std::string& dtype) {
  if (dtype == "BF16") return scan<uint16_t>(data, count, 0x7F80u);
  if (dtype == "F16") return scan<uint16_t>(data, count, 0x7C00u);
  if (dtype == "F32") return scan<uint32_t>(data, count, 0x7F800000u);
  throw std::invalid_argument("first_nonfinite: dtype must be BF16, F16 or F32, got " + dtype);
}

}  // namespace shardio
