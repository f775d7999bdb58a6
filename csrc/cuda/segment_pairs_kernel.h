// The CUDA segment-pair kernel's per-thread phases, written once for the device and the host.
//
// cuda/segment_pairs_cuda.cu launches them on a GPU; cuda/emulate_segment_pairs.cpp
// runs them on the CPU (blocks and threads in a shuffled order, a barrier between
// phases), so the indexing, the grid-stride loop and the shared-memory reduction are
// tested without a GPU.  Nothing here may depend on the CUDA runtime.
//
// One block per (pair, head) item (grid-strided over pairs x heads), kThreads threads:
//   1. accumulate: thread t zeroes its column of the shared [S * S][kThreads] partial
//      sums, then walks the valid (query, key) positions of the item, row-major, with
//      stride kThreads (coalesced along the key axis) and adds each element's term
//      into its own column, at the (query segment, key segment) cell;
//   2. reduce: a tree over the columns (strides kThreads/2, ..., 1), a barrier after
//      each step;
//   3. write: thread c < S * S adds cell c's total into out[pair, head].
// No atomics: the order of every sum is fixed, so results are bit-identical from run
// to run.  A barrier follows the write, before the next item reuses the shared sums.
#pragma once

#include <cstdint>

#include "segment_pairs.h"

namespace fastnig {
namespace segment_kernel {

constexpr int64_t kThreads = 128;          // threads per block (a power of two: the tree)
constexpr int64_t kMaxGrid = 2147483647;   // gridDim.x limit

// Floats of shared memory per block.
FASTNIG_HD int64_t shared_floats(int64_t segments) { return segments * segments * kThreads; }

inline int64_t grid_size(const SegmentPairGeometry& geo, int64_t max_grid) {
  const int64_t items = geo.pairs * geo.heads;
  const int64_t cap = max_grid < kMaxGrid ? max_grid : kMaxGrid;
  return items < cap ? items : cap;
}

// Phase 1 for thread tid of the block working on item ph (= pair * heads + head).
template <typename T, Rule R>
FASTNIG_HD void accumulate_phase(const SegmentPairGeometry& geo, const SegmentPairBuffers& buf, int64_t ph,
                                 int64_t tid, float* shared) {
  const int64_t S = geo.segments;
  for (int64_t c = 0; c < S * S; ++c) shared[c * kThreads + tid] = 0.0f;
  const int64_t p = ph / geo.heads, h = ph - p * geo.heads;
  const int64_t q_len = valid_positions(buf.q_lengths, p, geo.q_tokens);
  const int64_t k_len = valid_positions(buf.k_lengths, p, geo.k_tokens);
  if (q_len == 0 || k_len == 0) return;
  const PairHeadRows<T> rows = pair_head_rows<T>(geo, buf, p, h);
  const int64_t* q_ids = buf.q_segments + p * geo.q_tokens;
  const int64_t* k_ids = buf.k_segments + p * geo.k_tokens;
  // element e = i * k_len + j, e = tid, tid + kThreads, ...: (i, j) advanced without a division per element
  const int64_t di = kThreads / k_len, dj = kThreads - di * k_len;
  int64_t i = tid / k_len, j = tid - (tid / k_len) * k_len;
  while (i < q_len) {
    const int64_t s = q_ids[i], r = k_ids[j];
    if (s >= 0 && s < S && r >= 0 && r < S) shared[(s * S + r) * kThreads + tid] += pair_term<R, T>(rows, i, j);
    i += di;
    j += dj;
    if (j >= k_len) {
      j -= k_len;
      ++i;
    }
  }
}

// Phase 2, one step of the tree: columns [0, stride) += columns [stride, 2 stride).
FASTNIG_HD void reduce_phase(int64_t segments, int64_t stride, int64_t tid, float* shared) {
  if (tid >= stride) return;
  for (int64_t c = 0; c < segments * segments; ++c) shared[c * kThreads + tid] += shared[c * kThreads + tid + stride];
}

// Phase 3: thread c < S * S adds cell c (column 0 after the tree) into out.
FASTNIG_HD void write_phase(const SegmentPairGeometry& geo, const SegmentPairBuffers& buf, int64_t ph, int64_t tid,
                            const float* shared) {
  const int64_t cells = geo.segments * geo.segments;
  if (tid < cells) buf.out[ph * cells + tid] += shared[tid * kThreads];
}

}  // namespace segment_kernel
}  // namespace fastnig
