// Run-time choice between the two builds of the CPU kernel (conductance_cpu.cpp).
#include "cpu/conductance_cpu.h"

#include <cstdlib>
#include <cstring>

namespace fastnig {
namespace {

// FASTNIG_CPU_ISA=baseline (read once) forces the baseline build, e.g. to test it.
bool use_avx2() {
#if defined(FASTNIG_CPU_AVX2) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = [] {
    const char* forced = std::getenv("FASTNIG_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "baseline") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace

void accumulate_conductance_cpu(DType dtype, DType out_dtype, Rule rule, const Geometry& geo, const Buffers& buf,
                                int n_threads) {
#if defined(FASTNIG_CPU_AVX2)
  if (use_avx2()) {
    avx2::accumulate(dtype, out_dtype, rule, geo, buf, n_threads);
    return;
  }
#endif
  baseline::accumulate(dtype, out_dtype, rule, geo, buf, n_threads);
}

const char* cpu_kernel_isa() { return use_avx2() ? "avx2" : "baseline"; }

}  // namespace fastnig
