#pragma once
#include <cstdint>
#include <string>

#include "conductance.h"

namespace fastnig {
// Launches the accumulation on `stream` of `device`; returns "" or the CUDA error.
std::string accumulate_conductance_cuda(DType dtype, DType out_dtype, Rule rule, const void* a, const void* g,
                                        const Geometry& geo, const int64_t* lengths, void* out, void* a_carry,
                                        void* g_carry, int device, std::uintptr_t stream_handle);
}  // namespace fastnig
