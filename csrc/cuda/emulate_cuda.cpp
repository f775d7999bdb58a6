// Host emulation of the CUDA launch (see cuda/conductance_kernel.h).
//
// Compiled into every build, with or without nvcc: it runs the very thread
// bodies the GPU runs, over the grid the launcher would use, one thread after
// another, visiting the blocks of each pass in a seeded random order.  The
// kernels use no shared memory and no intra-block synchronisation, so this
// sequential schedule is one of the schedules a GPU may pick; a result that
// depended on the order (a race, an order-dependent sum) would show up as a
// difference between seeds.
#include "cuda/emulate_cuda.h"

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "cuda/conductance_kernel.h"

namespace fastnig {
namespace {

using namespace cuda_kernel;

// Runs body(block, grid, thread_x) for every thread of the launch,
// blocks in a shuffled order.
template <typename Body>
void run_grid(const Launch& launch, std::mt19937_64& rng, Body&& body) {
  const Dim grid = launch.grid;
  std::vector<int64_t> order(static_cast<size_t>(grid.x * grid.y * grid.z));
  std::iota(order.begin(), order.end(), int64_t(0));
  std::shuffle(order.begin(), order.end(), rng);
  for (int64_t id : order) {
    const Dim block{id % grid.x, (id / grid.x) % grid.y, id / (grid.x * grid.y)};
    for (int64_t tx = 0; tx < launch.threads; ++tx) body(block, grid, tx);
  }
}

}  // namespace

void accumulate_conductance_emulated(DType dtype, DType out_dtype, Rule rule, const Geometry& geo,
                                     const Buffers& buf, void* scratch, uint64_t block_order_seed,
                                     int64_t max_grid) {
  if (geo.pairs == 0 || geo.tokens == 0 || geo.features == 0 || geo.steps == 0) return;
  const Dim max{std::min(max_grid, kMaxGridX), std::min(max_grid, kMaxGridYZ), std::min(max_grid, kMaxGridYZ)};
  std::mt19937_64 rng(block_order_seed);
  dispatch(dtype, out_dtype, rule, buf.coarse_out != nullptr, [&](auto t, auto acc, auto r, auto c) {
    using T = typename decltype(t)::type;
    using Acc = typename decltype(acc)::type;
    constexpr Rule R = decltype(r)::value;
    constexpr bool Coarse = decltype(c)::value;
    const Args<T, Acc> args = make_args<T, Acc>(geo, buf, scratch);
    run_grid(plan_accumulate(geo, max), rng, [&](Dim block, Dim grid, int64_t tx) {
      accumulate_thread<T, Acc, R, Coarse>(args, geo, block, grid, tx);
    });
    run_grid(plan_reduce(geo, max), rng, [&](Dim block, Dim grid, int64_t tx) {
      reduce_thread<T, Acc, Coarse>(args, geo, block, grid, tx);
    });
  });
}

int64_t cuda_scratch_elements(const Geometry& geo, bool coarse) { return cuda_kernel::scratch_elements(geo, coarse); }

}  // namespace fastnig
