// The batch plan's primitives (specfast/data/plan.py is their only caller): a seeded permutation
// of the samples (defined here, not by a library, so it never changes under a user and resumed
// runs see the same order) and greedy packing of samples into batches of at most a token budget.
#pragma once

#include <cstdint>
#include <vector>

namespace shardio {

// Permutation of [0, n) determined by (seed, epoch) alone: Fisher-Yates driven by SplitMix64,
// with Lemire's unbiased bounded integers. Same result on every platform and build.
std::vector<int64_t> permutation(int64_t n, uint64_t seed, uint64_t epoch);

// Batch boundaries for samples of the given lengths, taken in order: a batch closes when the next
// sample would push it past `budget` tokens. Returns b with b[0] = 0, b.back() = lengths.size(),
// batch k = samples [b[k], b[k+1]). Every length must be in [1, budget] (checked by the caller).
std::vector<int64_t> pack_batches(const int64_t* lengths, int64_t count, int64_t budget);

}  // namespace shardio
