// CUDA kernel of the fused conductance accumulation (see conductance.h).
//
// One thread per (pair, token block, feature): it walks the path steps of its
// tokens in registers, reading each activation and gradient element once with
// coalesced loads along the feature axis, writes the carry of its tokens, and
// adds its partial sum to out[pair, feature] with one atomic.
#include <cuda_runtime.h>

#include <string>

#include "cuda/conductance_cuda.h"

namespace fastnig {
namespace {

constexpr int kThreads = 128;
constexpr int kTokensPerBlock = 8;

template <typename T, typename Acc, Rule R>
__global__ void accumulate_kernel(const T* __restrict__ a, const T* __restrict__ g, Geometry geo,
                                  const int64_t* __restrict__ lengths, Acc* __restrict__ out,
                                  T* __restrict__ a_carry, T* __restrict__ g_carry) {
  const int64_t h = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t p = blockIdx.y;
  if (h >= geo.features) return;
  int64_t length = lengths[p];
  if (length > geo.tokens) length = geo.tokens;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.z) * kTokensPerBlock;
  int64_t t_end = t_begin + kTokensPerBlock;
  if (t_end > length) t_end = length;
  const int64_t H = geo.features;
  Acc sum = Acc(0);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t a_base = p * geo.a_stride[0] + t * geo.a_stride[2] + h;
    const int64_t g_base = p * geo.g_stride[0] + t * geo.g_stride[2] + h;
    const int64_t carry = (p * geo.tokens + t) * H + h;
    bool have_prev = geo.has_prev;
    T a_prev_raw{}, g_prev_raw{};
    if (have_prev) { a_prev_raw = a_carry[carry]; g_prev_raw = g_carry[carry]; }
    Acc a_prev = have_prev ? to_acc<Acc>(a_prev_raw) : Acc(0);
    Acc g_prev = have_prev ? to_acc<Acc>(g_prev_raw) : Acc(0);
    for (int64_t s = 0; s < geo.steps; ++s) {
      const T a_raw = a[a_base + s * geo.a_stride[1]];
      const T g_raw = g[g_base + s * geo.g_stride[1]];
      const Acc a_cur = to_acc<Acc>(a_raw), g_cur = to_acc<Acc>(g_raw);
      if (have_prev) sum += step_term<R, Acc>(a_prev, g_prev, a_cur, g_cur);
      a_prev = a_cur; g_prev = g_cur; a_prev_raw = a_raw; g_prev_raw = g_raw;
      have_prev = true;
    }
    if (geo.write_carry && geo.steps > 0) { a_carry[carry] = a_prev_raw; g_carry[carry] = g_prev_raw; }
  }
  if (t_begin < t_end) atomicAdd(out + p * H + h, sum);
}

template <typename T, typename Acc>
void launch(Rule rule, const void* a, const void* g, const Geometry& geo, const int64_t* lengths, void* out,
            void* a_carry, void* g_carry, cudaStream_t stream) {
  const dim3 block(kThreads);
  const dim3 grid(static_cast<unsigned>((geo.features + kThreads - 1) / kThreads), static_cast<unsigned>(geo.pairs),
                  static_cast<unsigned>((geo.tokens + kTokensPerBlock - 1) / kTokensPerBlock));
  if (rule == Rule::Left)
    accumulate_kernel<T, Acc, Rule::Left><<<grid, block, 0, stream>>>(
        static_cast<const T*>(a), static_cast<const T*>(g), geo, lengths, static_cast<Acc*>(out),
        static_cast<T*>(a_carry), static_cast<T*>(g_carry));
  else
    accumulate_kernel<T, Acc, Rule::Trapezoid><<<grid, block, 0, stream>>>(
        static_cast<const T*>(a), static_cast<const T*>(g), geo, lengths, static_cast<Acc*>(out),
        static_cast<T*>(a_carry), static_cast<T*>(g_carry));
}

template <typename T>
void launch_acc(DType out_dtype, Rule rule, const void* a, const void* g, const Geometry& geo,
                const int64_t* lengths, void* out, void* a_carry, void* g_carry, cudaStream_t stream) {
  if (out_dtype == DType::Float64)
    launch<T, double>(rule, a, g, geo, lengths, out, a_carry, g_carry, stream);
  else
    launch<T, float>(rule, a, g, geo, lengths, out, a_carry, g_carry, stream);
}

}  // namespace

std::string accumulate_conductance_cuda(DType dtype, DType out_dtype, Rule rule, const void* a, const void* g,
                                        const Geometry& geo, const int64_t* lengths, void* out, void* a_carry,
                                        void* g_carry, int device, std::uintptr_t stream_handle) {
  if (geo.pairs == 0 || geo.tokens == 0 || geo.features == 0) return "";
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (dtype) {
    case DType::Float32: launch_acc<float>(out_dtype, rule, a, g, geo, lengths, out, a_carry, g_carry, stream); break;
    case DType::Float64: launch_acc<double>(out_dtype, rule, a, g, geo, lengths, out, a_carry, g_carry, stream); break;
    case DType::BFloat16: launch_acc<bf16_t>(out_dtype, rule, a, g, geo, lengths, out, a_carry, g_carry, stream); break;
    case DType::Float16: launch_acc<fp16_t>(out_dtype, rule, a, g, geo, lengths, out, a_carry, g_carry, stream); break;
  }
  err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

}  // namespace fastnig
