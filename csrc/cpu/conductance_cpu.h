#pragma once

#include <string>
#include "conductance.h"

namespace fastnig {
// out[p, segment, h] += sum over path steps of this chunk and real tokens of
// rule(g, a) (and coarse_out the same over the even points, when given); see
// Geometry and Buffers in conductance.h for the layout of every buffer.  Runs
// the AVX2 + FMA build of the kernel when it was compiled and the CPU has both.
void accumulate_conductance_cpu(DType dtype, DType out_dtype, Rule rule, const Geometry& geo, const Buffers& buf,
                                int n_threads);
// The ISA the call above uses on this CPU: "avx2" or "baseline".
const char* cpu_kernel_isa();
// Whether the AVX2 + FMA build exists and the CPU runs it.
bool avx2_supported();
// Force the build the CPU kernel runs with: "auto" (the default choice), "avx2" or "baseline"
// (std::invalid_argument otherwise, or for "avx2" where it cannot run).  For tests and benchmarks.
void set_cpu_isa(const std::string& name);

// The two builds of conductance_cpu.cpp.
#define FASTNIG_CPU_KERNEL_DECL                                                                         \
  void accumulate(DType dtype, DType out_dtype, Rule rule, const Geometry& geo, const Buffers& buf, int n_threads);
namespace baseline { FASTNIG_CPU_KERNEL_DECL }
namespace avx2 { FASTNIG_CPU_KERNEL_DECL }
#undef FASTNIG_CPU_KERNEL_DECL
}  // namespace fastnig
