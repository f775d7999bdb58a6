#pragma once
#include "conductance.h"

namespace fastnig {
// out[p, h] += sum over path steps of this chunk and real tokens of rule(g, a);
// see Geometry in conductance.h for the layout of every buffer.  Runs the
// AVX2 + FMA build of the kernel when it was compiled and the CPU has both.
void accumulate_conductance_cpu(DType dtype, DType out_dtype, Rule rule, const void* a, const void* g,
                                const Geometry& geo, const int64_t* lengths, void* out, void* a_carry,
                                void* g_carry, int n_threads);
// The ISA the call above uses on this CPU: "avx2" or "baseline".
const char* cpu_kernel_isa();

// The two builds of conductance_cpu.cpp.
#define FASTNIG_CPU_KERNEL_DECL                                                                         \
  void accumulate(DType dtype, DType out_dtype, Rule rule, const void* a, const void* g,              \
                  const Geometry& geo, const int64_t* lengths, void* out, void* a_carry, void* g_carry, \
                  int n_threads);
namespace baseline { FASTNIG_CPU_KERNEL_DECL }
namespace avx2 { FASTNIG_CPU_KERNEL_DECL }
#undef FASTNIG_CPU_KERNEL_DECL
}  // namespace fastnig
