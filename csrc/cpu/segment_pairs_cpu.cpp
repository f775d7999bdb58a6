// CPU kernel of the segment-pair accumulation (see segment_pairs.h).
//
// One (pair, head) item at a time: the key positions of the pair are cut once
// into runs of one segment, so each query row adds one contiguous, vectorisable
// sum per run into its segment's row of a double S x S block; the block is added
// into out at the end.  Nothing of size [pairs, heads, Tq, Tk] is made: the four
// inputs are read once each, element by element, converted to float.  Items are
// split into contiguous ranges over std::thread workers (no OpenMP, as in
// conductance_cpu.cpp); each item's block is written by one worker only, so the
// result is the same for every thread count.
#include "cpu/segment_pairs_cpu.h"

#include <algorithm>
#include <stdexcept>
#include <thread>
#include <vector>

namespace fastnig {
namespace {

struct Run {
  int64_t begin, end, segment;  // key positions [begin, end) of one segment
};

// Runs of equal (valid) key segment ids over the first n positions; invalid ids start no run.
std::vector<Run> key_runs(const int64_t* ids, int64_t n, int64_t segments) {
  std::vector<Run> runs;
  for (int64_t j = 0; j < n;) {
    const int64_t s = ids[j];
    int64_t end = j + 1;
    while (end < n && ids[end] == s) ++end;
    if (s >= 0 && s < segments) runs.push_back({j, end, s});
    j = end;
  }
  return runs;
}

// The rule's sum over key positions [begin, end) of query row i: eight independent
// partial sums, so that the compiler vectorises the loop without reassociating.
template <Rule R, typename T>
float run_sum(const PairHeadRows<T>& rows, int64_t i, int64_t begin, int64_t end) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = begin;
  for (; j + 8 <= end; j += 8) {
    for (int u = 0; u < 8; ++u) part[u] += pair_term<R, T>(rows, i, j + u);
  }
  float tail = 0;
  for (; j < end; ++j) tail += pair_term<R, T>(rows, i, j);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) + tail;
}

template <Rule R, typename T>
void pair_head(const SegmentPairGeometry& geo, const SegmentPairBuffers& buf, const std::vector<Run>& runs,
               int64_t p, int64_t h) {
  const int64_t S = geo.segments;
  double block[kMaxSegmentPairSegments * kMaxSegmentPairSegments] = {};
  const PairHeadRows<T> rows = pair_head_rows<T>(geo, buf, p, h);
  const int64_t q_len = valid_positions(buf.q_lengths, p, geo.q_tokens);
  const int64_t* q_ids = buf.q_segments + p * geo.q_tokens;
  for (int64_t i = 0; i < q_len; ++i) {
    const int64_t s = q_ids[i];
    if (s < 0 || s >= S) continue;
    for (const Run& run : runs) block[s * S + run.segment] += run_sum<R, T>(rows, i, run.begin, run.end);
  }
  float* out = buf.out + (p * geo.heads + h) * S * S;
  for (int64_t c = 0; c < S * S; ++c) out[c] += static_cast<float>(block[c]);
}

template <Rule R, typename T>
void run_items(const SegmentPairGeometry& geo, const SegmentPairBuffers& buf, const std::vector<std::vector<Run>>& runs,
               int64_t first, int64_t last) {
  for (int64_t item = first; item < last; ++item) {
    const int64_t p = item / geo.heads;
    pair_head<R, T>(geo, buf, runs[p], p, item - p * geo.heads);
  }
}

}  // namespace

void accumulate_segment_pairs_cpu(DType dtype, Rule rule, const SegmentPairGeometry& geo,
                                  const SegmentPairBuffers& buf, int n_threads) {
  const int64_t items = geo.pairs * geo.heads;
  if (items == 0 || geo.q_tokens == 0 || geo.k_tokens == 0) return;
  std::vector<std::vector<Run>> runs(static_cast<size_t>(geo.pairs));
  for (int64_t p = 0; p < geo.pairs; ++p)
    runs[p] = key_runs(buf.k_segments + p * geo.k_tokens, valid_positions(buf.k_lengths, p, geo.k_tokens),
                       geo.segments);
  // below ~64 k elements per worker a second thread costs more than it saves
  const int64_t per_item = geo.q_tokens * geo.k_tokens;
  const int64_t by_work = std::max<int64_t>(1, items * per_item / 65536);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(n_threads), items, by_work}));
  const bool known = dispatch_segment_pairs(dtype, rule, [&](auto type, auto rule_tag) {
    using T = typename decltype(type)::type;
    constexpr Rule R = decltype(rule_tag)::value;
    if (workers == 1) {
      run_items<R, T>(geo, buf, runs, 0, items);
      return;
    }
    std::vector<std::thread> pool;
    for (int64_t w = 0; w < workers; ++w) {
      const int64_t first = items * w / workers, last = items * (w + 1) / workers;
      pool.emplace_back([&, first, last] { run_items<R, T>(geo, buf, runs, first, last); });
    }
    for (std::thread& t : pool) t.join();
  });
  if (!known) throw std::invalid_argument("segment pairs: the inputs must be float32, bfloat16 or float16");
}

}  // namespace fastnig
