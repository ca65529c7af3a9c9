// Finiteness check on raw float bytes (bf16 / f16 / f32), so the writer can reject NaN and inf
// without a torch kernel (which stalls under CPU contention) and name the first bad element.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace shardio {

// Index of the first NaN or inf among `count` elements of `dtype` ("BF16", "F16", "F32"),
// or -1 if all are finite. Throws std::invalid_argument for another dtype.
int64_t first_nonfinite(const void* data, size_t count, const std::string& dtype);

}  // namespace shardio
