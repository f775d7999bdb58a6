#pragma once
#include <cstdint>
#include <string>

#include "segment_pairs.h"

namespace fastnig {
// Launches the segment-pair kernel (cuda/segment_pairs_kernel.h) on `stream` of
// `device`, restoring the caller's current device; returns "" or the CUDA error.
// FASTNIG_CUDA_SYNC=1 synchronises the stream before returning.
std::string accumulate_segment_pairs_cuda(DType dtype, Rule rule, const SegmentPairGeometry& geo,
                                          const SegmentPairBuffers& buf, int device, std::uintptr_t stream_handle);
}  // namespace fastnig
