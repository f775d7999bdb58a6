#pragma once
#include <cstdint>
#include <string>

#include "conductance.h"

namespace fastnig {
// Launches the two passes of the accumulation on `stream` of `device` and
// restores the caller's current device; returns "" or the CUDA error.
// scratch: cuda_scratch_elements(geo, coarse) elements of the accumulator type
// on that device (see cuda/emulate_cuda.h).  FASTNIG_CUDA_SYNC=1 synchronises
// the stream before returning.
std::string accumulate_conductance_cuda(DType dtype, DType out_dtype, Rule rule, const Geometry& geo,
                                        const Buffers& buf, void* scratch, int device,
                                        std::uintptr_t stream_handle);
}  // namespace fastnig
