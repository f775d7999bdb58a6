// Run-time choice between the two builds of the CPU kernel (conductance_cpu.cpp).
#include "cpu/conductance_cpu.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fastnig {
namespace {

// The machine's choice: the AVX2 + FMA build where the CPU has both, unless
// FASTNIG_CPU_ISA=baseline (read once) forces the baseline build.
bool avx2_by_default() {
#if defined(FASTNIG_CPU_AVX2) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = [] {
    const char* forced = std::getenv("FASTNIG_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "baseline") == 0) return false;
    return avx2_supported();
  }();
  return ok;
#else
  return false;
#endif
}

// set_cpu_isa's override: -1 = the default above, 0 = baseline, 1 = AVX2.
std::atomic<int> forced_isa{-1};

bool use_avx2() {
  const int forced = forced_isa.load(std::memory_order_relaxed);
  return forced < 0 ? avx2_by_default() : forced == 1;
}

}  // namespace

bool avx2_supported() {
#if defined(FASTNIG_CPU_AVX2) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

void set_cpu_isa(const std::string& name) {
  if (name == "auto") {
    forced_isa.store(-1);
  } else if (name == "baseline") {
    forced_isa.store(0);
  } else if (name == "avx2") {
    if (!avx2_supported()) {
      throw std::invalid_argument("the AVX2 + FMA build of the CPU kernel cannot run here (not built, or the CPU "
                                  "lacks AVX2/FMA)");
    }
    forced_isa.store(1);
  } else {
    throw std::invalid_argument("cpu isa must be 'auto', 'avx2' or 'baseline', got '" + name + "'");
  }
}

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
