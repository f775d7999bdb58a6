// Launcher of the CUDA segment-pair kernel (attention-pattern NIG by segment).
//
// The phases live in cuda/segment_pairs_kernel.h (shared with the host emulation
// in cuda/emulate_segment_pairs.cpp); this file binds them to threadIdx / blockIdx,
// puts the barriers between them and launches one block per (pair, head) item
// (grid-strided) with S * S * kThreads floats of dynamic shared memory.
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/segment_pairs_cuda.h"
#include "cuda/segment_pairs_kernel.h"
#include "cuda/cuda_launch_util.h"

namespace fastnig {
namespace {

using cuda_launch::DeviceGuard;
using cuda_launch::failed;

using namespace segment_kernel;

template <typename T, Rule R>
__global__ void __launch_bounds__(kThreads) segment_pairs_kernel(SegmentPairGeometry geo, SegmentPairBuffers buf) {
  extern __shared__ float shared[];
  const int64_t items = geo.pairs * geo.heads;
  const int64_t tid = threadIdx.x;
  for (int64_t ph = blockIdx.x; ph < items; ph += gridDim.x) {
    accumulate_phase<T, R>(geo, buf, ph, tid, shared);
    __syncthreads();
#pragma unroll 1
    for (int64_t stride = kThreads / 2; stride > 0; stride /= 2) {
      reduce_phase(geo.segments, stride, tid, shared);
      __syncthreads();
    }
    write_phase(geo, buf, ph, tid, shared);
    __syncthreads();  // the next item overwrites the shared sums
  }
}

}  // namespace

std::string accumulate_segment_pairs_cuda(DType dtype, Rule rule, const SegmentPairGeometry& geo,
                                          const SegmentPairBuffers& buf, int device, std::uintptr_t stream_handle) {
  if (geo.pairs * geo.heads == 0 || geo.q_tokens == 0 || geo.k_tokens == 0) return "";
  if (geo.segments < 1 || geo.segments > kMaxSegmentPairSegments) return "segments out of range";
  DeviceGuard guard;
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return failed("cudaSetDevice", err);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const dim3 grid(static_cast<unsigned>(grid_size(geo, kMaxGrid)));
  const size_t shared_bytes = static_cast<size_t>(shared_floats(geo.segments)) * sizeof(float);
  std::string error;
  const bool known = dispatch_segment_pairs(dtype, rule, [&](auto type, auto rule_tag) {
    using T = typename decltype(type)::type;
    constexpr Rule R = decltype(rule_tag)::value;
    segment_pairs_kernel<T, R><<<grid, dim3(kThreads), shared_bytes, stream>>>(geo, buf);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) error = failed("launch of the segment-pair kernel", e);
  });
  if (!known) return "the inputs must be float32, bfloat16 or float16";
  if (!error.empty()) return error;
  return cuda_launch::sync_if_requested(stream);
}

}  // namespace fastnig
