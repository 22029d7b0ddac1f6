// The only C++ that touches Python: the pybind11 module zokernels._C.
// Tensors cross as (data_ptr, numel, dtype code); zokernels/backends.py validates them before any call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "../../csrc/cpu/philox_cpu.h"
#include "cuda_bindings.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using zokernels::DType;
using zokernels::StreamTerm;
using zokernels::TensorView;

namespace {

void* as_pointer(uintptr_t address) { return reinterpret_cast<void*>(address); }

int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_openmp_threads(int n) {
#ifdef _OPENMP
  if (n < 1) throw py::value_error("n_threads must be >= 1, got " + std::to_string(n));
  omp_set_num_threads(n);
#else
  (void)n;
#endif
}

// tensors: list of (data_ptr, numel, global_offset, dtype_code); terms: list of (stream, coeff); sources: empty
// (in place) or one data_ptr per tensor to read from (out of place, same numel and dtype); minus: empty or one
// data_ptr per tensor that receives source - combination.
void philox_axpy_multi(const std::vector<std::tuple<uintptr_t, int64_t, uint64_t, int>>& tensors, uint64_t seed,
                       const std::vector<std::tuple<uint64_t, float>>& terms,
                       const std::vector<uintptr_t>& sources, const std::vector<uintptr_t>& minus) {
  std::vector<TensorView> views;
  for (const auto& [ptr, numel, offset, dtype] : tensors) {
    if (dtype < 0 || dtype > 3) throw py::value_error("dtype code must be 0..3, got " + std::to_string(dtype));
    views.push_back({as_pointer(ptr), numel, offset, static_cast<DType>(dtype)});
  }
  std::vector<StreamTerm> stream_terms;
  for (const auto& [stream, coeff] : terms) stream_terms.push_back({stream, coeff});
  if (!sources.empty()) {
    if (sources.size() != views.size())
      throw py::value_error("sources must have one entry per tensor (" + std::to_string(views.size()) + "), got " +
                            std::to_string(sources.size()));
    for (size_t i = 0; i < views.size(); ++i) views[i].src = as_pointer(sources[i]);
  }
  if (!minus.empty()) {
    if (minus.size() != views.size())
      throw py::value_error("minus must have one entry per tensor (" + std::to_string(views.size()) + "), got " +
                            std::to_string(minus.size()));
    for (size_t i = 0; i < views.size(); ++i) views[i].minus = as_pointer(minus[i]);
  }
  py::gil_scoped_release release;
  zokernels::philox_axpy_multi_cpu(views, seed, stream_terms);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "zokernels compiled CPU kernels (OpenMP); see zokernels/backends.py";
  m.attr("has_openmp") =
#ifdef _OPENMP
      true;
#else
      false;
#endif
#ifdef ZOKERNELS_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  zokernels_bindings::register_cuda_philox(m);
  zokernels_bindings::register_cuda_cge(m);
  zokernels_bindings::register_cge_cpu(m);
  zokernels_bindings::register_engine_cpu(m);
  m.def("openmp_max_threads", &openmp_max_threads);
  m.def("set_openmp_threads", &set_openmp_threads, py::arg("n"));
  m.def(
      "philox_uint32",
      [](uintptr_t out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
        py::gil_scoped_release release;
        zokernels::philox_uint32_cpu(static_cast<uint32_t*>(as_pointer(out)), n, seed, stream, offset);
      },
      py::arg("out_ptr"), py::arg("n"), py::arg("seed"), py::arg("stream"), py::arg("offset"));
  m.def(
      "philox_normal",
      [](uintptr_t out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
        py::gil_scoped_release release;
        zokernels::philox_normal_cpu(static_cast<float*>(as_pointer(out)), n, seed, stream, offset);
      },
      py::arg("out_ptr"), py::arg("n"), py::arg("seed"), py::arg("stream"), py::arg("offset"));
  m.def(
      "philox_normal_sumsq",
      [](int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
        py::gil_scoped_release release;
        return zokernels::philox_normal_sumsq_cpu(n, seed, stream, offset);
      },
      py::arg("n"), py::arg("seed"), py::arg("stream"), py::arg("offset"));
  m.def(
      "philox_normal_scalar",
      [](uintptr_t out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
        py::gil_scoped_release release;
        zokernels::philox_normal_scalar_cpu(static_cast<float*>(as_pointer(out)), n, seed, stream, offset);
      },
      py::arg("out_ptr"), py::arg("n"), py::arg("seed"), py::arg("stream"), py::arg("offset"));
  m.def("philox_axpy_multi", &philox_axpy_multi, py::arg("tensors"), py::arg("seed"), py::arg("terms"),
        py::arg("sources") = std::vector<uintptr_t>{}, py::arg("minus") = std::vector<uintptr_t>{});
}
