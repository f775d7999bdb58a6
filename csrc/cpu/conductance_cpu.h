#pragma once
#include "conductance.h"

namespace fastnig {
// out[p, h] += sum over path steps of this chunk and real tokens of rule(g, a);
// see Geometry in conductance.h for the layout of every buffer.
void accumulate_conductance_cpu(DType dtype, DType out_dtype, Rule rule, const void* a, const void* g,
                                const Geometry& geo, const int64_t* lengths, void* out, void* a_carry,
                                void* g_carry, int n_threads);
}  // namespace fastnig
