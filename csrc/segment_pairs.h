// Framework-free core of the segment-pair accumulation: the attention-pattern
// view of NIG (docs/method.md §12) summed into (query segment x key segment)
// blocks without a [pairs, heads, Tq, Tk] product in memory.
//
// For every pair p and head h, with a0/g0 the attention probabilities and their
// gradient at path point k and a1/g1 at point k+1 ([pairs, heads, Tq, Tk]),
//
//   out[p, h, s, r] += sum over query positions i < q_len[p] with q_seg[p, i] = s
//                      and key positions j < k_len[p] with k_seg[p, j] = r of
//                      rule(a0, g0, a1, g1)[p, h, i, j]
//
// with rule = g0 (a1 - a0) (left) or (g0 + g1) / 2 (a1 - a0) (trapezoid); ids
// outside [0, segments) count nowhere (padding).  Every element is read once and
// converted to float; out is float32.  Shared by the CPU kernel
// (cpu/segment_pairs_cpu.cpp), the CUDA kernel (cuda/segment_pairs_cuda.cu) and
// its host emulation (cuda/emulate_segment_pairs.cpp).
#pragma once

#include <cstdint>

#include "conductance.h"  // DType, Rule, bf16_t, fp16_t, to_acc, FASTNIG_HD

namespace fastnig {

// The most segments one call may have: the CUDA kernel keeps segments^2 partial
// sums per thread in shared memory (8 x 8 x 128 threads x 4 bytes = 32 KB).
constexpr int64_t kMaxSegmentPairSegments = 8;

// Every stride is in elements; the key axis (dim 3) is contiguous.
struct SegmentPairGeometry {
  int64_t pairs, heads, q_tokens, k_tokens;
  int64_t segments;      // S: out is [pairs, heads, S, S]
  int64_t stride[4][3];  // strides of dims 0..2 of a0, g0, a1, g1
};

struct SegmentPairBuffers {
  const void* a0 = nullptr;  // [pairs, heads, Tq, Tk], element type of the call
  const void* g0 = nullptr;
  const void* a1 = nullptr;
  const void* g1 = nullptr;  // read by the trapezoid rule only (may be nullptr for left)
  const int64_t* q_segments = nullptr;  // [pairs, Tq] contiguous
  const int64_t* k_segments = nullptr;  // [pairs, Tk] contiguous
  const int64_t* q_lengths = nullptr;   // [pairs]; nullptr: every query position counts
  const int64_t* k_lengths = nullptr;   // [pairs]; nullptr: every key position counts
  float* out = nullptr;                 // [pairs, heads, S, S] contiguous, +=
};

// The element types of a call as typed pointers, offset to one (pair, head).
template <typename T>
struct PairHeadRows {
  const T* a0;
  const T* g0;
  const T* a1;
  const T* g1;
  int64_t row[4];  // query-row stride of each
};

template <typename T>
FASTNIG_HD PairHeadRows<T> pair_head_rows(const SegmentPairGeometry& geo, const SegmentPairBuffers& buf,
                                          int64_t p, int64_t h) {
  PairHeadRows<T> r;
  r.a0 = static_cast<const T*>(buf.a0) + p * geo.stride[0][0] + h * geo.stride[0][1];
  r.g0 = static_cast<const T*>(buf.g0) + p * geo.stride[1][0] + h * geo.stride[1][1];
  r.a1 = static_cast<const T*>(buf.a1) + p * geo.stride[2][0] + h * geo.stride[2][1];
  r.g1 = buf.g1 == nullptr ? nullptr : static_cast<const T*>(buf.g1) + p * geo.stride[3][0] + h * geo.stride[3][1];
  for (int k = 0; k < 4; ++k) r.row[k] = geo.stride[k][2];
  return r;
}

// The rule's term of element (i, j) of one (pair, head).
template <Rule R, typename T>
FASTNIG_HD float pair_term(const PairHeadRows<T>& r, int64_t i, int64_t j) {
  const float da = to_acc<float>(r.a1[i * r.row[2] + j]) - to_acc<float>(r.a0[i * r.row[0] + j]);
  const float g0 = to_acc<float>(r.g0[i * r.row[1] + j]);
  if (R == Rule::Left) return g0 * da;
  return 0.5f * (g0 + to_acc<float>(r.g1[i * r.row[3] + j])) * da;
}

// Valid positions of pair p along one axis: min(lengths[p], tokens), or tokens without lengths.
FASTNIG_HD int64_t valid_positions(const int64_t* lengths, int64_t p, int64_t tokens) {
  if (lengths == nullptr) return tokens;
  const int64_t n = lengths[p];
  return n < 0 ? 0 : (n < tokens ? n : tokens);
}

// Host side: calls f(ElementType<T>{}, RuleConstant<R>{}) for the call's element
// type and rule; false (f not called) for an element type the op does not take.
template <typename V> struct ElementType { using type = V; };
template <Rule R> struct RuleConstant { static constexpr Rule value = R; };

template <typename T, typename F>
void dispatch_segment_rule(Rule rule, F&& f) {
  if (rule == Rule::Left) f(ElementType<T>{}, RuleConstant<Rule::Left>{});
  else f(ElementType<T>{}, RuleConstant<Rule::Trapezoid>{});
}

template <typename F>
bool dispatch_segment_pairs(DType dtype, Rule rule, F&& f) {
  switch (dtype) {
    case DType::Float32: dispatch_segment_rule<float>(rule, f); return true;
    case DType::BFloat16: dispatch_segment_rule<bf16_t>(rule, f); return true;
    case DType::Float16: dispatch_segment_rule<fp16_t>(rule, f); return true;
    default: return false;
  }
}

}  // namespace fastnig
