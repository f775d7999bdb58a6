// Host-side helpers shared by the CUDA launchers (conductance_cuda.cu, segment_pairs_cuda.cu):
// restoring the caller's device, error text, and the FASTNIG_CUDA_SYNC switch.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace fastnig {
namespace cuda_launch {

// Restores the caller's current device on every way out.
class DeviceGuard {
 public:
  DeviceGuard() { ok_ = cudaGetDevice(&previous_) == cudaSuccess; }
  ~DeviceGuard() {
    if (ok_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool ok_ = false;
};

inline std::string failed(const char* where, cudaError_t err) {
  return std::string(where) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

// FASTNIG_CUDA_SYNC=1 (read at every call): synchronise the stream after the
// op so that an asynchronous fault is reported by the call that caused it.
inline bool sync_requested() {
  const char* v = std::getenv("FASTNIG_CUDA_SYNC");
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

// After a launch: with FASTNIG_CUDA_SYNC=1, synchronise the stream and return
// the error text of a fault (empty when none, or when not requested).
inline std::string sync_if_requested(cudaStream_t stream) {
  if (!sync_requested()) return "";
  cudaError_t err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return failed("cudaStreamSynchronize (FASTNIG_CUDA_SYNC=1)", err);
  err = cudaGetLastError();
  if (err != cudaSuccess) return failed("after cudaStreamSynchronize (FASTNIG_CUDA_SYNC=1)", err);
  return "";
}

}  // namespace cuda_launch
}  // namespace fastnig
