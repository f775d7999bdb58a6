// CPU kernel of the fused conductance accumulation (see conductance.h).
//
// Work is split over the real (pair, token) rows; each worker walks the path
// steps of its rows with the feature loop innermost (contiguous, vectorisable)
// and sums into a private [pairs, features] buffer that is reduced at the end,
// so every activation and gradient element is read once and no temporary of
// the activation's size is made.  With segment ids a row adds into its
// segment's slot of out; with a coarse accumulator the even-indexed points of
// the row are also summed (trapezoid) while they are still in cache.  std::thread rather than OpenMP: a second
// OpenMP runtime next to torch's would spin-wait against it on small machines.
#include "cpu/conductance_cpu.h"

#include <algorithm>
#include <thread>
#include <vector>

// This file is compiled twice: for the baseline ISA (namespace fastnig::baseline)
// and, where the compiler can, with AVX2 + FMA (namespace fastnig::avx2);
// dispatch_cpu.cpp picks one at run time from the CPU's flags.
#ifndef FASTNIG_CPU_VARIANT
#define FASTNIG_CPU_VARIANT baseline
#endif

namespace fastnig {
namespace FASTNIG_CPU_VARIANT {
namespace {

// One path step of one (pair, token) row: out[h] += rule(prev, cur) over the features.
template <typename T, typename Acc, Rule R>
inline void add_step(Acc* __restrict out, const T* __restrict a_prev, const T* __restrict g_prev,
                     const T* __restrict a_cur, const T* __restrict g_cur, int64_t H) {
  for (int64_t h = 0; h < H; ++h) {
    out[h] += step_term<R, Acc>(to_acc<Acc>(a_prev[h]), to_acc<Acc>(g_prev[h]), to_acc<Acc>(a_cur[h]),
                                to_acc<Acc>(g_cur[h]));
  }
}

// The row's segment slot of out: 0 without segment ids, -1 to skip the row.
inline int64_t row_slot(const Geometry& geo, const int64_t* segments, int64_t p, int64_t t) {
  if (segments == nullptr) return 0;
  const int64_t s = segments[p * geo.tokens + t];
  return (s >= 0 && s < geo.segments) ? s : -1;
}

// Coarse: also the trapezoid sum over the even-indexed global path points into
// coarse_acc; a_even/g_even carry the most recent even point between chunks.
template <typename T, typename Acc, Rule R, bool Coarse>
void accumulate_rows(const T* a, const T* g, const Geometry& geo, const int64_t* lengths,
                     const int64_t* row_start, int64_t first, int64_t last, Acc* acc,
                     T* a_carry, T* g_carry, const int64_t* segments, Acc* coarse_acc, T* a_even, T* g_even) {
  const int64_t H = geo.features, S = geo.steps, Tk = geo.tokens;
  // Locate the first real row: row_start[p] = real rows before pair p.
  int64_t p = std::upper_bound(row_start, row_start + geo.pairs + 1, first) - row_start - 1;
  int64_t t = first - row_start[p];
  for (int64_t r = first; r < last; ++r) {
    while (t >= lengths[p]) { ++p; t = 0; }
    const int64_t slot = row_slot(geo, segments, p, t);
    if (slot < 0) { ++t; continue; }
    Acc* out = acc + (p * geo.segments + slot) * H;
    const T* a_row = a + p * geo.a_stride[0] + t * geo.a_stride[2];
    const T* g_row = g + p * geo.g_stride[0] + t * geo.g_stride[2];
    const T* a_prev = nullptr;
    const T* g_prev = nullptr;
    if (geo.has_prev) {
      a_prev = a_carry + (p * Tk + t) * H;
      g_prev = g_carry + (p * Tk + t) * H;
    }
    // Coarse state: the last even point seen (carry or this chunk's).
    Acc* coarse = nullptr;
    const T* a_ev = nullptr;
    const T* g_ev = nullptr;
    bool even_in_chunk = false;
    if (Coarse) {
      coarse = coarse_acc + (p * geo.segments + slot) * H;
      if (geo.has_prev_even) {
        a_ev = a_even + (p * Tk + t) * H;
        g_ev = g_even + (p * Tk + t) * H;
      }
    }
    for (int64_t s = 0; s < S; ++s) {
      const T* a_cur = a_row + s * geo.a_stride[1];
      const T* g_cur = g_row + s * geo.g_stride[1];
      if (a_prev != nullptr) add_step<T, Acc, R>(out, a_prev, g_prev, a_cur, g_cur, H);
      a_prev = a_cur;
      g_prev = g_cur;
      // The point was just read for the fine sum: the coarse step re-reads it from cache.
      if (Coarse && ((geo.first_point + s) & 1) == 0) {
        if (a_ev != nullptr) add_step<T, Acc, Rule::Trapezoid>(coarse, a_ev, g_ev, a_cur, g_cur, H);
        a_ev = a_cur;
        g_ev = g_cur;
        even_in_chunk = true;
      }
    }
    if (geo.write_carry && S > 0) {
      std::memcpy(a_carry + (p * Tk + t) * H, a_prev, H * sizeof(T));
      std::memcpy(g_carry + (p * Tk + t) * H, g_prev, H * sizeof(T));
    }
    if (Coarse && geo.write_carry && even_in_chunk) {
      std::memcpy(a_even + (p * Tk + t) * H, a_ev, H * sizeof(T));
      std::memcpy(g_even + (p * Tk + t) * H, g_ev, H * sizeof(T));
    }
    ++t;
  }
}

template <typename T, typename Acc, Rule R, bool Coarse>
void accumulate_typed(const Geometry& geo, const Buffers& buf, int n_threads) {
  const int64_t P = geo.pairs, H = geo.features, NS = geo.segments;
  const int64_t* lengths = buf.lengths;
  std::vector<int64_t> row_start(P + 1, 0);
  for (int64_t p = 0; p < P; ++p)
    row_start[p + 1] = row_start[p] + std::min<int64_t>(std::max<int64_t>(lengths[p], 0), geo.tokens);
  std::vector<int64_t> clamped(P);
  for (int64_t p = 0; p < P; ++p) clamped[p] = row_start[p + 1] - row_start[p];
  const int64_t rows = row_start[P];
  if (rows == 0 || H == 0) return;

  // Below ~64k element-steps a second thread costs more than it saves.
  const int64_t work = rows * H * std::max<int64_t>(geo.steps, 1);
  int workers = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(std::max(n_threads, 1)), rows,
                                                    std::max<int64_t>(work / 65536, 1)}));
  const int64_t out_size = P * NS * H;
  std::vector<std::vector<Acc>> partial(workers, std::vector<Acc>(out_size, Acc(0)));
  std::vector<std::vector<Acc>> coarse_partial(Coarse ? workers : 0, std::vector<Acc>(out_size, Acc(0)));
  auto run = [&](int w) {
    const int64_t first = rows * w / workers, last = rows * (w + 1) / workers;
    accumulate_rows<T, Acc, R, Coarse>(
        static_cast<const T*>(buf.a), static_cast<const T*>(buf.g), geo, clamped.data(), row_start.data(), first,
        last, partial[w].data(), static_cast<T*>(buf.a_carry), static_cast<T*>(buf.g_carry), buf.segments,
        Coarse ? coarse_partial[w].data() : nullptr, static_cast<T*>(buf.a_even), static_cast<T*>(buf.g_even));
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(run, w);
  run(0);
  for (auto& th : pool) th.join();

  Acc* dst = static_cast<Acc*>(buf.out);
  for (int w = 0; w < workers; ++w) {
    const Acc* src = partial[w].data();
    for (int64_t i = 0; i < out_size; ++i) dst[i] += src[i];
  }
  if (Coarse) {
    Acc* coarse_dst = static_cast<Acc*>(buf.coarse_out);
    for (int w = 0; w < workers; ++w) {
      const Acc* src = coarse_partial[w].data();
      for (int64_t i = 0; i < out_size; ++i) coarse_dst[i] += src[i];
    }
  }
}

template <typename T, typename Acc>
void dispatch_rule(Rule rule, const Geometry& geo, const Buffers& buf, int n_threads) {
  // The coarse (Richardson) sum is a trapezoid sum; kernels.py allows it with that rule only.
  if (buf.coarse_out != nullptr)
    accumulate_typed<T, Acc, Rule::Trapezoid, true>(geo, buf, n_threads);
  else if (rule == Rule::Left)
    accumulate_typed<T, Acc, Rule::Left, false>(geo, buf, n_threads);
  else
    accumulate_typed<T, Acc, Rule::Trapezoid, false>(geo, buf, n_threads);
}

template <typename T>
void dispatch_acc(DType out_dtype, Rule rule, const Geometry& geo, const Buffers& buf, int n_threads) {
  if (out_dtype == DType::Float64)
    dispatch_rule<T, double>(rule, geo, buf, n_threads);
  else
    dispatch_rule<T, float>(rule, geo, buf, n_threads);
}

}  // namespace

void accumulate(DType dtype, DType out_dtype, Rule rule, const Geometry& geo, const Buffers& buf, int n_threads) {
  switch (dtype) {
    case DType::Float32: dispatch_acc<float>(out_dtype, rule, geo, buf, n_threads); break;
    case DType::Float64: dispatch_acc<double>(out_dtype, rule, geo, buf, n_threads); break;
    case DType::BFloat16: dispatch_acc<bf16_t>(out_dtype, rule, geo, buf, n_threads); break;
    case DType::Float16: dispatch_acc<fp16_t>(out_dtype, rule, geo, buf, n_threads); break;
  }
}

}  // namespace FASTNIG_CPU_VARIANT
}  // namespace fastnig
