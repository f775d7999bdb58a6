#pragma once
#include <cstdint>

#include "segment_pairs.h"

namespace fastnig {
// Runs the CUDA segment-pair kernel's phases (cuda/segment_pairs_kernel.h) on the CPU
// over the launcher's grid (capped at max_grid blocks, to exercise the grid-stride
// loop): blocks, and the threads of every phase, in an order shuffled by
// block_order_seed; each block's shared memory starts as NaN.
void accumulate_segment_pairs_emulated(DType dtype, Rule rule, const SegmentPairGeometry& geo,
                                       const SegmentPairBuffers& buf, uint64_t block_order_seed, int64_t max_grid);
}  // namespace fastnig
