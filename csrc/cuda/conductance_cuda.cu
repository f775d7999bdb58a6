// Launcher of the CUDA kernels of the fused conductance accumulation.
//
// The thread bodies live in cuda/conductance_kernel.h (shared with the host
// emulation in cuda/emulate_cuda.cpp); this file only binds them to
// blockIdx/gridDim, launches the two passes on the caller's stream and checks
// for errors.  Pass 1 reads every activation and gradient element once with
// coalesced loads along the feature axis; pass 2 sums the token blocks in a
// fixed order, so results are bit-identical from run to run (no atomics).
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/conductance_cuda.h"
#include "cuda/conductance_kernel.h"
#include "cuda/cuda_launch_util.h"

namespace fastnig {
namespace {

using cuda_launch::DeviceGuard;
using cuda_launch::failed;

using namespace cuda_kernel;

__device__ __forceinline__ Dim block_index() { return {blockIdx.x, blockIdx.y, blockIdx.z}; }
__device__ __forceinline__ Dim grid_size() { return {gridDim.x, gridDim.y, gridDim.z}; }

template <typename T, typename Acc, Rule R, bool Coarse>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(Args<T, Acc> args, Geometry geo) {
  accumulate_thread<T, Acc, R, Coarse>(args, geo, block_index(), grid_size(), threadIdx.x);
}

template <typename T, typename Acc, bool Coarse>
__global__ void __launch_bounds__(kThreads) reduce_kernel(Args<T, Acc> args, Geometry geo) {
  reduce_thread<T, Acc, Coarse>(args, geo, block_index(), grid_size(), threadIdx.x);
}

dim3 to_dim3(const Dim& d) {
  return dim3(static_cast<unsigned>(d.x), static_cast<unsigned>(d.y), static_cast<unsigned>(d.z));
}

}  // namespace

std::string accumulate_conductance_cuda(DType dtype, DType out_dtype, Rule rule, const Geometry& geo,
                                        const Buffers& buf, void* scratch, int device,
                                        std::uintptr_t stream_handle) {
  if (geo.pairs == 0 || geo.tokens == 0 || geo.features == 0 || geo.steps == 0) return "";
  DeviceGuard guard;
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return failed("cudaSetDevice", err);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const Dim max{kMaxGridX, kMaxGridYZ, kMaxGridYZ};
  std::string error;
  dispatch(dtype, out_dtype, rule, buf.coarse_out != nullptr, [&](auto t, auto acc, auto r, auto c) {
    using T = typename decltype(t)::type;
    using Acc = typename decltype(acc)::type;
    constexpr Rule R = decltype(r)::value;
    constexpr bool Coarse = decltype(c)::value;
    const Args<T, Acc> args = make_args<T, Acc>(geo, buf, scratch);
    const Launch first = plan_accumulate(geo, max);
    accumulate_kernel<T, Acc, R, Coarse><<<to_dim3(first.grid), dim3(first.threads), 0, stream>>>(args, geo);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) { error = failed("launch of the accumulate kernel", e); return; }
    const Launch second = plan_reduce(geo, max);
    reduce_kernel<T, Acc, Coarse><<<to_dim3(second.grid), dim3(second.threads), 0, stream>>>(args, geo);
    e = cudaGetLastError();
    if (e != cudaSuccess) { error = failed("launch of the reduce kernel", e); return; }
  });
  if (!error.empty()) return error;
  return cuda_launch::sync_if_requested(stream);
}

}  // namespace fastnig
