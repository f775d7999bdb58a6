// pybind11 entry points.  Tensors cross as raw addresses + geometry so that the
// extension needs no torch headers; fastnig/kernels.py checks device, dtype,
// shapes and strides before calling in, and keeps the tensors alive.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>

#include "cpu/conductance_cpu.h"
#include "cpu/segment_pairs_cpu.h"
#include "cuda/emulate_cuda.h"
#include "cuda/emulate_segment_pairs.h"
#ifdef FASTNIG_WITH_CUDA
#include "cuda/conductance_cuda.h"
#include "cuda/segment_pairs_cuda.h"
#endif

namespace py = pybind11;
using fastnig::Buffers;
using fastnig::DType;
using fastnig::Geometry;
using fastnig::Rule;

namespace {

template <typename T> T* as_ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

// Everything but the device-specific arguments; see Geometry and Buffers in conductance.h.
struct Call {
  DType dtype, out_dtype;
  Rule rule;
  Geometry geo;
  Buffers buf;
};

Call make_call(std::uintptr_t a, std::uintptr_t g, const std::array<int64_t, 4>& shape,
               const std::array<int64_t, 3>& a_strides, const std::array<int64_t, 3>& g_strides, int dtype,
               std::uintptr_t lengths, std::uintptr_t out, int out_dtype, std::uintptr_t a_carry,
               std::uintptr_t g_carry, bool has_prev, bool write_carry, int rule, std::uintptr_t segments,
               int64_t num_segments, std::uintptr_t coarse_out, std::uintptr_t a_even, std::uintptr_t g_even,
               bool has_prev_even, int64_t first_point) {
  Call c{};
  c.dtype = static_cast<DType>(dtype);
  c.out_dtype = static_cast<DType>(out_dtype);
  c.rule = static_cast<Rule>(rule);
  Geometry& geo = c.geo;
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
  geo.segments = num_segments;
  geo.first_point = first_point;
  geo.has_prev_even = has_prev_even;
  if (num_segments < 1) throw std::invalid_argument("num_segments must be >= 1");
  if (segments == 0 && num_segments != 1) throw std::invalid_argument("num_segments > 1 needs segment ids");
  if (coarse_out != 0 && write_carry && (a_even == 0 || g_even == 0))
    throw std::invalid_argument("a coarse accumulator with a carry needs the even-point carry buffers");
  Buffers& buf = c.buf;
  buf.a = as_ptr<const void>(a);
  buf.g = as_ptr<const void>(g);
  buf.lengths = as_ptr<const int64_t>(lengths);
  buf.segments = as_ptr<const int64_t>(segments);
  buf.out = as_ptr<void>(out);
  buf.coarse_out = as_ptr<void>(coarse_out);
  buf.a_carry = as_ptr<void>(a_carry);
  buf.g_carry = as_ptr<void>(g_carry);
  buf.a_even = as_ptr<void>(a_even);
  buf.g_even = as_ptr<void>(g_even);
  return c;
}

// The arguments every entry point shares, in make_call's order.
#define FASTNIG_CALL_PARAMS                                                                                 \
  std::uintptr_t a, std::uintptr_t g, std::array<int64_t, 4> shape, std::array<int64_t, 3> a_strides,      \
      std::array<int64_t, 3> g_strides, int dtype, std::uintptr_t lengths, std::uintptr_t out, int out_dtype, \
      std::uintptr_t a_carry, std::uintptr_t g_carry, bool has_prev, bool write_carry, int rule,            \
      std::uintptr_t segments, int64_t num_segments, std::uintptr_t coarse_out, std::uintptr_t a_even,      \
      std::uintptr_t g_even, bool has_prev_even, int64_t first_point
#define FASTNIG_CALL_ARGS                                                                                      \
  a, g, shape, a_strides, g_strides, dtype, lengths, out, out_dtype, a_carry, g_carry, has_prev, write_carry, \
      rule, segments, num_segments, coarse_out, a_even, g_even, has_prev_even, first_point
#define FASTNIG_CALL_PYARGS                                                                                    \
  py::arg("a"), py::arg("g"), py::arg("shape"), py::arg("a_strides"), py::arg("g_strides"), py::arg("dtype"), \
      py::arg("lengths"), py::arg("out"), py::arg("out_dtype"), py::arg("a_carry"), py::arg("g_carry"),       \
      py::arg("has_prev"), py::arg("write_carry"), py::arg("rule"), py::arg("segments"),                       \
      py::arg("num_segments"), py::arg("coarse_out"), py::arg("a_even"), py::arg("g_even"),                    \
      py::arg("has_prev_even"), py::arg("first_point")

// The segment-pair accumulation (segment_pairs.h): a0, g0, a1, g1 addresses (g1 0 for the left rule),
// shape [pairs, heads, Tq, Tk], strides[4][3] (dims 0..2 of each, elements), dtype code, rule code, the
// int64 segment ids and lengths (lengths 0 = none), the number of segments and the float32 out.
struct SegmentCall {
  DType dtype;
  Rule rule;
  fastnig::SegmentPairGeometry geo;
  fastnig::SegmentPairBuffers buf;
};

SegmentCall make_segment_call(std::uintptr_t a0, std::uintptr_t g0, std::uintptr_t a1, std::uintptr_t g1,
                              const std::array<int64_t, 4>& shape,
                              const std::array<std::array<int64_t, 3>, 4>& strides, int dtype, int rule,
                              std::uintptr_t q_segments, std::uintptr_t k_segments, std::uintptr_t q_lengths,
                              std::uintptr_t k_lengths, int64_t num_segments, std::uintptr_t out) {
  SegmentCall c{};
  c.dtype = static_cast<DType>(dtype);
  c.rule = static_cast<Rule>(rule);
  if (num_segments < 1 || num_segments > fastnig::kMaxSegmentPairSegments)
    throw std::invalid_argument("num_segments must lie in [1, " + std::to_string(fastnig::kMaxSegmentPairSegments) +
                                "]");
  if (c.rule == Rule::Trapezoid && g1 == 0) throw std::invalid_argument("the trapezoid rule needs g1");
  if (q_segments == 0 || k_segments == 0 || out == 0) throw std::invalid_argument("segment ids and out are required");
  c.geo.pairs = shape[0];
  c.geo.heads = shape[1];
  c.geo.q_tokens = shape[2];
  c.geo.k_tokens = shape[3];
  c.geo.segments = num_segments;
  for (int k = 0; k < 4; ++k)
    for (int d = 0; d < 3; ++d) c.geo.stride[k][d] = strides[k][d];
  c.buf.a0 = as_ptr<const void>(a0);
  c.buf.g0 = as_ptr<const void>(g0);
  c.buf.a1 = as_ptr<const void>(a1);
  c.buf.g1 = as_ptr<const void>(g1);
  c.buf.q_segments = as_ptr<const int64_t>(q_segments);
  c.buf.k_segments = as_ptr<const int64_t>(k_segments);
  c.buf.q_lengths = as_ptr<const int64_t>(q_lengths);
  c.buf.k_lengths = as_ptr<const int64_t>(k_lengths);
  c.buf.out = as_ptr<float>(out);
  return c;
}

#define FASTNIG_SEGMENT_PARAMS                                                                                  \
  std::uintptr_t a0, std::uintptr_t g0, std::uintptr_t a1, std::uintptr_t g1, std::array<int64_t, 4> shape,   \
      std::array<std::array<int64_t, 3>, 4> strides, int dtype, int rule, std::uintptr_t q_segments,          \
      std::uintptr_t k_segments, std::uintptr_t q_lengths, std::uintptr_t k_lengths, int64_t num_segments,     \
      std::uintptr_t out
#define FASTNIG_SEGMENT_ARGS \
  a0, g0, a1, g1, shape, strides, dtype, rule, q_segments, k_segments, q_lengths, k_lengths, num_segments, out
#define FASTNIG_SEGMENT_PYARGS                                                                                  \
  py::arg("a0"), py::arg("g0"), py::arg("a1"), py::arg("g1"), py::arg("shape"), py::arg("strides"),           \
      py::arg("dtype"), py::arg("rule"), py::arg("q_segments"), py::arg("k_segments"), py::arg("q_lengths"),  \
      py::arg("k_lengths"), py::arg("num_segments"), py::arg("out")

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastnig fused kernels (raw-pointer interface; call them through fastnig.kernels)";
  m.def(
      "accumulate_cpu",
      [](FASTNIG_CALL_PARAMS, int n_threads) {
        const Call c = make_call(FASTNIG_CALL_ARGS);
        py::gil_scoped_release release;
        fastnig::accumulate_conductance_cpu(c.dtype, c.out_dtype, c.rule, c.geo, c.buf, n_threads);
      },
      FASTNIG_CALL_PYARGS, py::arg("n_threads"));
  m.def(
      "accumulate_cuda_emulated",
      [](FASTNIG_CALL_PARAMS, std::uintptr_t scratch, uint64_t block_order_seed, int64_t max_grid) {
        const Call c = make_call(FASTNIG_CALL_ARGS);
        if (max_grid < 1) throw std::invalid_argument("max_grid must be >= 1");
        py::gil_scoped_release release;
        fastnig::accumulate_conductance_emulated(c.dtype, c.out_dtype, c.rule, c.geo, c.buf, as_ptr<void>(scratch),
                                                 block_order_seed, max_grid);
      },
      FASTNIG_CALL_PYARGS, py::arg("scratch"), py::arg("block_order_seed"), py::arg("max_grid"));
  m.def(
      "cuda_scratch_elements",
      [](std::array<int64_t, 4> shape, int64_t num_segments, bool coarse) {
        Geometry geo{};
        geo.pairs = shape[0];
        geo.steps = shape[1];
        geo.tokens = shape[2];
        geo.features = shape[3];
        geo.segments = num_segments;
        return fastnig::cuda_scratch_elements(geo, coarse);
      },
      py::arg("shape"), py::arg("num_segments"), py::arg("coarse"),
      "elements (accumulator dtype) of the scratch buffer the CUDA op and its emulation need");
  m.def(
      "segment_pairs_cpu",
      [](FASTNIG_SEGMENT_PARAMS, int n_threads) {
        const SegmentCall c = make_segment_call(FASTNIG_SEGMENT_ARGS);
        py::gil_scoped_release release;
        fastnig::accumulate_segment_pairs_cpu(c.dtype, c.rule, c.geo, c.buf, n_threads);
      },
      FASTNIG_SEGMENT_PYARGS, py::arg("n_threads"));
  m.def(
      "segment_pairs_cuda_emulated",
      [](FASTNIG_SEGMENT_PARAMS, uint64_t block_order_seed, int64_t max_grid) {
        const SegmentCall c = make_segment_call(FASTNIG_SEGMENT_ARGS);
        if (max_grid < 1) throw std::invalid_argument("max_grid must be >= 1");
        py::gil_scoped_release release;
        fastnig::accumulate_segment_pairs_emulated(c.dtype, c.rule, c.geo, c.buf, block_order_seed, max_grid);
      },
      FASTNIG_SEGMENT_PYARGS, py::arg("block_order_seed"), py::arg("max_grid"));
  m.def("cpu_kernel_isa", &fastnig::cpu_kernel_isa,
        "the instruction set the CPU kernel runs with here: 'avx2' (AVX2 + FMA build) or 'baseline'");
  m.def("avx2_supported", &fastnig::avx2_supported, "whether the AVX2 + FMA build exists and runs on this CPU");
  m.def("set_cpu_isa", &fastnig::set_cpu_isa, py::arg("name"),
        "force the CPU kernel's build: 'auto' (default choice), 'avx2' or 'baseline' (ValueError otherwise)");
#ifdef FASTNIG_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def(
      "accumulate_cuda",
      [](FASTNIG_CALL_PARAMS, std::uintptr_t scratch, int device, std::uintptr_t stream) {
        const Call c = make_call(FASTNIG_CALL_ARGS);
        std::string err = fastnig::accumulate_conductance_cuda(c.dtype, c.out_dtype, c.rule, c.geo, c.buf,
                                                               as_ptr<void>(scratch), device, stream);
        if (!err.empty()) throw std::runtime_error("fastnig CUDA kernel failed: " + err);
      },
      FASTNIG_CALL_PYARGS, py::arg("scratch"), py::arg("device"), py::arg("stream"));
  m.def(
      "segment_pairs_cuda",
      [](FASTNIG_SEGMENT_PARAMS, int device, std::uintptr_t stream) {
        const SegmentCall c = make_segment_call(FASTNIG_SEGMENT_ARGS);
        std::string err = fastnig::accumulate_segment_pairs_cuda(c.dtype, c.rule, c.geo, c.buf, device, stream);
        if (!err.empty()) throw std::runtime_error("fastnig CUDA kernel failed: " + err);
      },
      FASTNIG_SEGMENT_PYARGS, py::arg("device"), py::arg("stream"));
#else
  m.attr("with_cuda") = false;
#endif
}
