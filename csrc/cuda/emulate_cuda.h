#pragma once
#include <cstdint>

#include "conductance.h"

namespace fastnig {
// Runs the CUDA kernels' thread bodies on the CPU over the launcher's grid
// (each dimension capped at max_grid, to exercise the grid-stride loops), the
// blocks of each pass visited in an order shuffled by block_order_seed.
// scratch: cuda_scratch_elements(geo, coarse) elements of the accumulator type.
void accumulate_conductance_emulated(DType dtype, DType out_dtype, Rule rule, const Geometry& geo,
                                     const Buffers& buf, void* scratch, uint64_t block_order_seed,
                                     int64_t max_grid);
// Elements of the scratch buffer that the CUDA op (and its emulation) needs.
int64_t cuda_scratch_elements(const Geometry& geo, bool coarse);
}  // namespace fastnig
