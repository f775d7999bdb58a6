#pragma once

#include "segment_pairs.h"

namespace fastnig {
// out[p, h, s, r] += the rule's sum over the (query segment s, key segment r)
// block of every (pair, head); see segment_pairs.h.  Work is split over the
// pairs x heads items (n_threads workers, each writing its own out blocks), so
// the result does not depend on the thread count.  dtype: Float32, BFloat16
// or Float16.
void accumulate_segment_pairs_cpu(DType dtype, Rule rule, const SegmentPairGeometry& geo,
                                  const SegmentPairBuffers& buf, int n_threads);
}  // namespace fastnig
