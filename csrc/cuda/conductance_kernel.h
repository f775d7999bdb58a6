// The CUDA kernels' per-thread bodies, written once for the device and the host.
//
// cuda/conductance_cuda.cu launches them on a GPU; cuda/emulate_cuda.cpp runs
// them on the CPU over the same grid (blocks in a shuffled order), so that the
// indexing, the grid-stride loops and the reduction are tested on machines
// without a GPU.  Nothing here may depend on the CUDA runtime: the block and
// grid coordinates arrive as arguments.
//
// Two passes, no atomics, so that every result is bit-identical from run to run:
//   1. accumulate: one thread per (feature, pair, token block) walks the path
//      steps of its tokens (one segment at a time) and writes its partial sums
//      to scratch[acc][pair][token block][segment][feature];
//   2. reduce: one thread per (feature, pair, segment) adds the token blocks of
//      its pair in ascending order and adds the total into out (and coarse_out).
#pragma once

#include <cstdint>

#include "conductance.h"

// The grid-stride and token loops run about once per thread: unrolling them
// only costs compile time (and registers).
#if defined(__CUDACC__)
#define FASTNIG_NO_UNROLL _Pragma("unroll 1")
#else
#define FASTNIG_NO_UNROLL
#endif

namespace fastnig {
namespace cuda_kernel {

constexpr int64_t kThreads = 128;        // threads per block, along the features
constexpr int64_t kTokensPerBlock = 8;   // tokens walked by one thread
constexpr int64_t kMaxGridX = 2147483647;  // hardware limits of gridDim
constexpr int64_t kMaxGridYZ = 65535;

struct Dim {
  int64_t x, y, z;
};

struct Launch {
  Dim grid;
  int64_t threads;  // blockDim.x (blockDim.y = blockDim.z = 1)
};

FASTNIG_HD int64_t ceil_div(int64_t n, int64_t d) { return (n + d - 1) / d; }
FASTNIG_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline int64_t token_blocks(const Geometry& geo) { return ceil_div(geo.tokens, kTokensPerBlock); }

// Elements of the scratch buffer (element type = the accumulator's): one
// partial sum per (accumulator, pair, token block, segment, feature).
inline int64_t scratch_elements(const Geometry& geo, bool coarse) {
  return (coarse ? 2 : 1) * geo.pairs * token_blocks(geo) * geo.segments * geo.features;
}

// Grid of pass 1: x = feature blocks, y = pairs, z = token blocks, each capped
// at max (the hardware limits, or smaller in the emulation to exercise the
// grid-stride loops); the threads stride over what the grid does not cover.
inline Launch plan_accumulate(const Geometry& geo, Dim max) {
  const int64_t x = ceil_div(geo.features, kThreads);
  return {{min64(x, max.x), min64(geo.pairs, max.y), min64(token_blocks(geo), max.z)}, kThreads};
}

// Grid of pass 2: x = feature blocks, y = pairs, z = segments.
inline Launch plan_reduce(const Geometry& geo, Dim max) {
  const int64_t x = ceil_div(geo.features, kThreads);
  return {{min64(x, max.x), min64(geo.pairs, max.y), min64(geo.segments, max.z)}, kThreads};
}

template <typename T, typename Acc>
struct Args {
  const T* a;
  const T* g;
  const int64_t* lengths;
  const int64_t* segments;  // nullptr: one segment
  T* a_carry;
  T* g_carry;
  T* a_even;
  T* g_even;
  Acc* scratch;         // pass 1 writes, pass 2 reads
  Acc* coarse_scratch;  // scratch + one plane, coarse only
  Acc* out;
  Acc* coarse_out;
};

FASTNIG_HD int64_t real_tokens(const Geometry& geo, const int64_t* lengths, int64_t p) {
  int64_t n = lengths[p];
  if (n < 0) n = 0;
  return n > geo.tokens ? geo.tokens : n;
}

// Walks the path steps of token t of pair p at feature h: adds the fine terms
// to sum (and the even-point trapezoid terms to coarse_sum) and updates the carry.
// Coarse: the steps are walked in (even, odd) pairs so that the parity is
// known at compile time, and the carries are re-read from cache at the end
// rather than kept in their storage type through the loop; the plain loop
// with a parity test made nvcc 13 take ~15 s per coarse instance for sm_100
// and sm_120 (1.5 s like this).
template <typename T, typename Acc, Rule R, bool Coarse>
FASTNIG_HD void walk_token(const Args<T, Acc>& k, const Geometry& geo, int64_t p, int64_t t, int64_t h, Acc& sum,
                           Acc& coarse_sum) {
  const int64_t a_base = p * geo.a_stride[0] + t * geo.a_stride[2] + h;
  const int64_t g_base = p * geo.g_stride[0] + t * geo.g_stride[2] + h;
  const int64_t carry = (p * geo.tokens + t) * geo.features + h;
  bool have_prev = geo.has_prev;
  Acc a_prev = have_prev ? to_acc<Acc>(k.a_carry[carry]) : Acc(0);
  Acc g_prev = have_prev ? to_acc<Acc>(k.g_carry[carry]) : Acc(0);
  bool have_even = Coarse && geo.has_prev_even;
  Acc a_even = have_even ? to_acc<Acc>(k.a_even[carry]) : Acc(0);
  Acc g_even = have_even ? to_acc<Acc>(k.g_even[carry]) : Acc(0);
  auto point = [&](int64_t s, bool even) {
    const Acc a_cur = to_acc<Acc>(k.a[a_base + s * geo.a_stride[1]]);
    const Acc g_cur = to_acc<Acc>(k.g[g_base + s * geo.g_stride[1]]);
    if (have_prev) sum += step_term<R, Acc>(a_prev, g_prev, a_cur, g_cur);
    a_prev = a_cur;
    g_prev = g_cur;
    have_prev = true;
    if (Coarse && even) {
      if (have_even) coarse_sum += step_term<Rule::Trapezoid, Acc>(a_even, g_even, a_cur, g_cur);
      a_even = a_cur;
      g_even = g_cur;
      have_even = true;
    }
  };
  if constexpr (!Coarse) {
    for (int64_t s = 0; s < geo.steps; ++s) point(s, false);
  } else {
    int64_t s = 0;
    if ((geo.first_point & 1) != 0 && s < geo.steps) point(s++, false);
    for (; s + 1 < geo.steps; s += 2) {
      point(s, true);
      point(s + 1, false);
    }
    if (s < geo.steps) point(s, true);
  }
  // The carries are read again (from cache) rather than carried through the
  // loop in their storage type.
  if (geo.write_carry && geo.steps > 0) {
    k.a_carry[carry] = k.a[a_base + (geo.steps - 1) * geo.a_stride[1]];
    k.g_carry[carry] = k.g[g_base + (geo.steps - 1) * geo.g_stride[1]];
  }
  const int64_t last_even = geo.steps - 1 - ((geo.first_point + geo.steps - 1) & 1);
  if (Coarse && geo.write_carry && last_even >= 0) {
    k.a_even[carry] = k.a[a_base + last_even * geo.a_stride[1]];
    k.g_even[carry] = k.g[g_base + last_even * geo.g_stride[1]];
  }
}

// Pass 1, thread thread_x (of kThreads) of block `block` in a grid of size `grid`.
template <typename T, typename Acc, Rule R, bool Coarse>
FASTNIG_HD void accumulate_thread(const Args<T, Acc>& k, const Geometry& geo, Dim block, Dim grid,
                                  int64_t thread_x) {
  const int64_t H = geo.features, NS = geo.segments;
  const int64_t TB = ceil_div(geo.tokens, kTokensPerBlock);
  const int64_t feature_blocks = ceil_div(H, kThreads);
  FASTNIG_NO_UNROLL
  for (int64_t fb = block.x; fb < feature_blocks; fb += grid.x) {
    const int64_t h = fb * kThreads + thread_x;
    if (h >= H) continue;
    FASTNIG_NO_UNROLL
    for (int64_t p = block.y; p < geo.pairs; p += grid.y) {
      const int64_t length = real_tokens(geo, k.lengths, p);
      const int64_t used_blocks = ceil_div(length, kTokensPerBlock);  // pass 2 reads these only
      FASTNIG_NO_UNROLL
      for (int64_t tb = block.z; tb < used_blocks; tb += grid.z) {
        const int64_t t_begin = tb * kTokensPerBlock;
        const int64_t t_end = min64(t_begin + kTokensPerBlock, length);
        // One segment at a time, so that each partial sum stays in a register;
        // every token is still read once (it belongs to one segment).
        FASTNIG_NO_UNROLL
        for (int64_t seg = 0; seg < NS; ++seg) {
          Acc sum = Acc(0), coarse_sum = Acc(0);
          FASTNIG_NO_UNROLL
          for (int64_t t = t_begin; t < t_end; ++t) {
            if (k.segments != nullptr && k.segments[p * geo.tokens + t] != seg) continue;
            walk_token<T, Acc, R, Coarse>(k, geo, p, t, h, sum, coarse_sum);
          }
          const int64_t slot = ((p * TB + tb) * NS + seg) * H + h;
          k.scratch[slot] = sum;
          if (Coarse) k.coarse_scratch[slot] = coarse_sum;
        }
      }
    }
  }
}

// Pass 2: out[p, seg, h] += the token blocks' partial sums, in ascending order.
template <typename T, typename Acc, bool Coarse>
FASTNIG_HD void reduce_thread(const Args<T, Acc>& k, const Geometry& geo, Dim block, Dim grid,
                              int64_t thread_x) {
  const int64_t H = geo.features, NS = geo.segments;
  const int64_t TB = ceil_div(geo.tokens, kTokensPerBlock);
  const int64_t feature_blocks = ceil_div(H, kThreads);
  FASTNIG_NO_UNROLL
  for (int64_t fb = block.x; fb < feature_blocks; fb += grid.x) {
    const int64_t h = fb * kThreads + thread_x;
    if (h >= H) continue;
    FASTNIG_NO_UNROLL
    for (int64_t p = block.y; p < geo.pairs; p += grid.y) {
      const int64_t used_blocks = ceil_div(real_tokens(geo, k.lengths, p), kTokensPerBlock);
      if (used_blocks == 0) continue;
      FASTNIG_NO_UNROLL
      for (int64_t seg = block.z; seg < NS; seg += grid.z) {
        Acc sum = Acc(0), coarse_sum = Acc(0);
        for (int64_t tb = 0; tb < used_blocks; ++tb) {
          const int64_t slot = ((p * TB + tb) * NS + seg) * H + h;
          sum += k.scratch[slot];
          if (Coarse) coarse_sum += k.coarse_scratch[slot];
        }
        k.out[(p * NS + seg) * H + h] += sum;
        if (Coarse) k.coarse_out[(p * NS + seg) * H + h] += coarse_sum;
      }
    }
  }
}

// Host side: binds the buffers of a call and picks the template instance.
template <typename T, typename Acc>
Args<T, Acc> make_args(const Geometry& geo, const Buffers& buf, void* scratch) {
  Acc* plane = static_cast<Acc*>(scratch);
  const bool coarse = buf.coarse_out != nullptr;
  return {static_cast<const T*>(buf.a),   static_cast<const T*>(buf.g),
          buf.lengths,                     buf.segments,
          static_cast<T*>(buf.a_carry),    static_cast<T*>(buf.g_carry),
          static_cast<T*>(buf.a_even),     static_cast<T*>(buf.g_even),
          plane,                           coarse ? plane + scratch_elements(geo, false) : nullptr,
          static_cast<Acc*>(buf.out),      static_cast<Acc*>(buf.coarse_out)};
}

template <typename V> struct Type { using type = V; };
template <Rule R> struct RuleTag { static constexpr Rule value = R; };
template <bool B> struct BoolTag { static constexpr bool value = B; };

// Calls f(Type<T>, Type<Acc>, RuleTag<R>, BoolTag<Coarse>) for the call's
// element type, accumulator type, rule and coarse flag (coarse implies the
// trapezoid rule, which kernels.py enforces).
template <typename T, typename Acc, typename F>
void dispatch_rule(Rule rule, bool coarse, F&& f) {
  if (coarse) f(Type<T>{}, Type<Acc>{}, RuleTag<Rule::Trapezoid>{}, BoolTag<true>{});
  else if (rule == Rule::Left) f(Type<T>{}, Type<Acc>{}, RuleTag<Rule::Left>{}, BoolTag<false>{});
  else f(Type<T>{}, Type<Acc>{}, RuleTag<Rule::Trapezoid>{}, BoolTag<false>{});
}

template <typename T, typename F>
void dispatch_acc(DType out_dtype, Rule rule, bool coarse, F&& f) {
  if (out_dtype == DType::Float64) dispatch_rule<T, double>(rule, coarse, f);
  else dispatch_rule<T, float>(rule, coarse, f);
}

template <typename F>
void dispatch(DType dtype, DType out_dtype, Rule rule, bool coarse, F&& f) {
  switch (dtype) {
    case DType::Float32: dispatch_acc<float>(out_dtype, rule, coarse, f); break;
    case DType::Float64: dispatch_acc<double>(out_dtype, rule, coarse, f); break;
    case DType::BFloat16: dispatch_acc<bf16_t>(out_dtype, rule, coarse, f); break;
    case DType::Float16: dispatch_acc<fp16_t>(out_dtype, rule, coarse, f); break;
  }
}

}  // namespace cuda_kernel
}  // namespace fastnig
