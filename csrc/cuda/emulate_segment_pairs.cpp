// Host emulation of the CUDA segment-pair kernel (see cuda/segment_pairs_kernel.h).
//
// Compiled into every build, with or without nvcc.  The kernel's phases run for
// every thread of a block, one thread after another in a shuffled order, with the
// block's barrier (__syncthreads) between phases: one of the schedules a GPU may
// pick.  A thread that read another's shared partial sum within a phase, or a
// reduction step that depended on the order of threads, would show up as a
// difference between seeds; a read of a shared slot that no thread wrote reads NaN.
#include "cuda/emulate_segment_pairs.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "cuda/segment_pairs_kernel.h"

namespace fastnig {

using namespace segment_kernel;

void accumulate_segment_pairs_emulated(DType dtype, Rule rule, const SegmentPairGeometry& geo,
                                       const SegmentPairBuffers& buf, uint64_t block_order_seed, int64_t max_grid) {
  const int64_t items = geo.pairs * geo.heads;
  if (items == 0 || geo.q_tokens == 0 || geo.k_tokens == 0) return;
  const int64_t grid = grid_size(geo, max_grid);
  std::mt19937_64 rng(block_order_seed);
  std::vector<int64_t> blocks(static_cast<size_t>(grid));
  std::iota(blocks.begin(), blocks.end(), int64_t(0));
  std::shuffle(blocks.begin(), blocks.end(), rng);
  std::vector<int64_t> threads(static_cast<size_t>(kThreads));
  std::iota(threads.begin(), threads.end(), int64_t(0));
  std::vector<float> shared(static_cast<size_t>(shared_floats(geo.segments)));
  const bool known = dispatch_segment_pairs(dtype, rule, [&](auto type, auto rule_tag) {
    using T = typename decltype(type)::type;
    constexpr Rule R = decltype(rule_tag)::value;
    for (int64_t block : blocks) {
      std::fill(shared.begin(), shared.end(), std::numeric_limits<float>::quiet_NaN());
      for (int64_t ph = block; ph < items; ph += grid) {
        std::shuffle(threads.begin(), threads.end(), rng);
        for (int64_t tid : threads) accumulate_phase<T, R>(geo, buf, ph, tid, shared.data());
        for (int64_t stride = kThreads / 2; stride > 0; stride /= 2) {  // a barrier after each step
          std::shuffle(threads.begin(), threads.end(), rng);
          for (int64_t tid : threads) reduce_phase(geo.segments, stride, tid, shared.data());
        }
        for (int64_t tid : threads) write_phase(geo, buf, ph, tid, shared.data());
      }
    }
  });
  if (!known) throw std::invalid_argument("segment pairs: the inputs must be float32, bfloat16 or float16");
}

}  // namespace fastnig
