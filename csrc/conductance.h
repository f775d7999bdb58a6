// Framework-free core of the fused conductance accumulation.
//
// Shared by the CPU kernel (cpu/conductance_cpu.cpp) and the CUDA kernel
// (cuda/conductance_cuda.cu): the element types, their conversion to the
// accumulation type, and the per-element path-step term of each rule.
// Nothing here knows about torch or pybind11, so the header can be read,
// compiled and tested on its own.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTNIG_HD __host__ __device__ __forceinline__
#else
#define FASTNIG_HD inline
#endif

namespace fastnig {

// Integer codes shared with fastnig/kernels.py (_DTYPE_CODES, _RULE_CODES).
enum class DType : int { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };
enum class Rule : int { Left = 0, Trapezoid = 1 };

struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

FASTNIG_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

template <typename Acc> FASTNIG_HD Acc to_acc(float v) { return static_cast<Acc>(v); }
template <typename Acc> FASTNIG_HD Acc to_acc(double v) { return static_cast<Acc>(v); }
template <typename Acc> FASTNIG_HD Acc to_acc(bf16_t v) {
  return static_cast<Acc>(bits_to_float(static_cast<uint32_t>(v.bits) << 16));
}
template <typename Acc> FASTNIG_HD Acc to_acc(fp16_t v) {
  // IEEE binary16 -> binary32, exact for every input (normals, subnormals,
  // infinities and NaNs), written without intrinsics so that host and device
  // share it.
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    return static_cast<Acc>(sign ? -magnitude : magnitude);
  }
  if (exponent == 31) return static_cast<Acc>(bits_to_float(sign | 0x7f800000u | (mantissa << 13)));
  return static_cast<Acc>(bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13)));
}

// One path step k -> k+1 of the chain-rule conductance for one element:
//   left:      g_k (a_{k+1} - a_k)
//   trapezoid: (g_k + g_{k+1}) / 2 (a_{k+1} - a_k)
template <Rule R, typename Acc>
FASTNIG_HD Acc step_term(Acc a_prev, Acc g_prev, Acc a_next, Acc g_next) {
  if (R == Rule::Left) return g_prev * (a_next - a_prev);
  return static_cast<Acc>(0.5) * (g_prev + g_next) * (a_next - a_prev);
}

// Geometry of one accumulation call; every stride is in elements.
//   a, g:          [pairs, steps, tokens, features], features contiguous
//   lengths:       [pairs] real tokens of each pair (batch padding is on the right)
//   segments:      optional [pairs, tokens] contiguous segment id of each token;
//                  a real token whose id is outside [0, segments) is skipped
//   out:           [pairs, segments, features] accumulator (segments = 1 without
//                  segment ids, i.e. [pairs, features]), contiguous, += the chunk's sum
//   coarse_out:    optional, shape of out: += the trapezoid sum over the chunk's
//                  even-indexed global path points (first_point + s even)
//   a_carry/g_carry: [pairs, tokens, features] contiguous, element type of a:
//                  the previous chunk's last path point (read if has_prev) and
//                  this chunk's last point (written if write_carry)
//   a_even/g_even: same layout, coarse only: the most recent even-indexed point
//                  before this chunk (read if has_prev_even), replaced by the
//                  chunk's last even-indexed point (written if write_carry)
struct Geometry {
  int64_t pairs, steps, tokens, features;
  int64_t a_stride[3];
  int64_t g_stride[3];
  bool has_prev;
  bool write_carry;
  int64_t segments = 1;     // number of segments of out (1: no segment ids)
  int64_t first_point = 0;  // global path index of this chunk's first point (coarse only)
  bool has_prev_even = false;
};

// The buffers of one call (see Geometry); optional ones are nullptr when unused.
struct Buffers {
  const void* a = nullptr;
  const void* g = nullptr;
  const int64_t* lengths = nullptr;
  const int64_t* segments = nullptr;
  void* out = nullptr;
  void* coarse_out = nullptr;
  void* a_carry = nullptr;
  void* g_carry = nullptr;
  void* a_even = nullptr;
  void* g_even = nullptr;
};

}  // namespace fastnig
