// pybind11 entry points.  Tensors cross as raw addresses + geometry so that the
// extension needs no torch headers; fastnig/kernels.py checks device, dtype,
// shapes and strides before calling in, and keeps the tensors alive.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>

#include "cpu/conductance_cpu.h"
#ifdef FASTNIG_WITH_CUDA
#include "cuda/conductance_cuda.h"
#endif

namespace py = pybind11;
using fastnig::DType;
using fastnig::Geometry;
using fastnig::Rule;

namespace {

Geometry make_geometry(const std::array<int64_t, 4>& shape, const std::array<int64_t, 3>& a_strides,
                       const std::array<int64_t, 3>& g_strides, bool has_prev, bool write_carry) {
  Geometry geo{};
  geo.pairs = shape[0];
  geo.steps = shape[1];
  geo.tokens = shape[2];
  geo.features = shape[3];
  for (int i = 0; i < 3; ++i) {
    geo.a_stride[i] = a_strides[i];
    geo.g_stride[i] = g_strides[i];
  }
  geo.has_prev = has_prev;
  geo.write_carry = write_carry;
  return geo;
}

template <typename T> T* as_ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastnig fused kernels (raw-pointer interface; call them through fastnig.kernels)";
  m.def(
      "accumulate_cpu",
      [](std::uintptr_t a, std::uintptr_t g, std::array<int64_t, 4> shape, std::array<int64_t, 3> a_strides,
         std::array<int64_t, 3> g_strides, int dtype, std::uintptr_t lengths, std::uintptr_t out, int out_dtype,
         std::uintptr_t a_carry, std::uintptr_t g_carry, bool has_prev, bool write_carry, int rule,
         int n_threads) {
        Geometry geo = make_geometry(shape, a_strides, g_strides, has_prev, write_carry);
        py::gil_scoped_release release;
        fastnig::accumulate_conductance_cpu(static_cast<DType>(dtype), static_cast<DType>(out_dtype),
                                            static_cast<Rule>(rule), as_ptr<const void>(a), as_ptr<const void>(g),
                                            geo, as_ptr<const int64_t>(lengths), as_ptr<void>(out),
                                            as_ptr<void>(a_carry), as_ptr<void>(g_carry), n_threads);
      },
      py::arg("a"), py::arg("g"), py::arg("shape"), py::arg("a_strides"), py::arg("g_strides"), py::arg("dtype"),
      py::arg("lengths"), py::arg("out"), py::arg("out_dtype"), py::arg("a_carry"), py::arg("g_carry"),
      py::arg("has_prev"), py::arg("write_carry"), py::arg("rule"), py::arg("n_threads"));
  m.def("cpu_kernel_isa", &fastnig::cpu_kernel_isa,
        "the instruction set the CPU kernel runs with here: 'avx2' (AVX2 + FMA build) or 'baseline'");
#ifdef FASTNIG_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def(
      "accumulate_cuda",
      [](std::uintptr_t a, std::uintptr_t g, std::array<int64_t, 4> shape, std::array<int64_t, 3> a_strides,
         std::array<int64_t, 3> g_strides, int dtype, std::uintptr_t lengths, std::uintptr_t out, int out_dtype,
         std::uintptr_t a_carry, std::uintptr_t g_carry, bool has_prev, bool write_carry, int rule, int device,
         std::uintptr_t stream) {
        Geometry geo = make_geometry(shape, a_strides, g_strides, has_prev, write_carry);
        std::string err = fastnig::accumulate_conductance_cuda(
            static_cast<DType>(dtype), static_cast<DType>(out_dtype), static_cast<Rule>(rule), as_ptr<const void>(a),
            as_ptr<const void>(g), geo, as_ptr<const int64_t>(lengths), as_ptr<void>(out), as_ptr<void>(a_carry),
            as_ptr<void>(g_carry), device, stream);
        if (!err.empty()) throw std::runtime_error("fastnig CUDA kernel failed: " + err);
      },
      py::arg("a"), py::arg("g"), py::arg("shape"), py::arg("a_strides"), py::arg("g_strides"), py::arg("dtype"),
      py::arg("lengths"), py::arg("out"), py::arg("out_dtype"), py::arg("a_carry"), py::arg("g_carry"),
      py::arg("has_prev"), py::arg("write_carry"), py::arg("rule"), py::arg("device"), py::arg("stream"));
#else
  m.attr("with_cuda") = false;
#endif
}
