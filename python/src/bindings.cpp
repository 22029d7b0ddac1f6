// The only C++ that touches Python: the pybind11 module zokernels._C.
// Kernel ops are registered as <op>_<backend> (cpu, cuda); tensors cross as addresses, checked against each op's
// declaration by zokernels/kernels/native.py before any call. philox_normal_scalar is a test oracle, not an op.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
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

// The philox_sweep op's cpu variant. tensors: data addresses, with their numels, global offsets and dtype codes;
// terms: (stream, coeff); sources: empty (in place) or one address per tensor to read from (out of place, same
// numel and dtype); minus: empty or one address per tensor that receives source - combination.
void philox_sweep(const std::vector<uintptr_t>& tensors, const std::vector<int64_t>& numels,
                  const std::vector<uint64_t>& offsets, const std::vector<int>& dtypes, uint64_t seed,
                  const std::vector<std::tuple<uint64_t, float>>& terms, const std::vector<uintptr_t>& sources,
                  const std::vector<uintptr_t>& minus) {
  const size_t n = tensors.size();
  for (const auto& [name, size] : {std::pair{"numels", numels.size()}, std::pair{"offsets", offsets.size()},
                                   std::pair{"dtypes", dtypes.size()}}) {
    if (size != n)
      throw py::value_error(std::string(name) + " must have one entry per tensor (" + std::to_string(n) + "), got " +
                            std::to_string(size));
  }
  for (const auto& [name, list] : {std::pair{"sources", &sources}, std::pair{"minus", &minus}}) {
    if (!list->empty() && list->size() != n)
      throw py::value_error(std::string(name) + " must be empty or have one entry per tensor (" + std::to_string(n) +
                            "), got " + std::to_string(list->size()));
  }
  std::vector<TensorView> views;
  for (size_t i = 0; i < n; ++i) {
    if (dtypes[i] < 0 || dtypes[i] > 3)
      throw py::value_error("dtype code must be 0..3, got " + std::to_string(dtypes[i]));
    views.push_back({as_pointer(tensors[i]), numels[i], offsets[i], static_cast<DType>(dtypes[i])});
    if (!sources.empty()) views[i].src = as_pointer(sources[i]);
    if (!minus.empty()) views[i].minus = as_pointer(minus[i]);
  }
  std::vector<StreamTerm> stream_terms;
  for (const auto& [stream, coeff] : terms) stream_terms.push_back({stream, coeff});
  py::gil_scoped_release release;
  zokernels::philox_axpy_multi_cpu(views, seed, stream_terms);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "zokernels compiled kernels; called through zokernels/kernels/native.py (one declaration per op)";
  // The dtype codes the kernels read (DType); zokernels/kernels/native.py DTYPE_CODES must agree (tested).
  m.attr("dtype_codes") = py::dict(py::arg("float32") = static_cast<int>(DType::kFloat32),
                                   py::arg("float64") = static_cast<int>(DType::kFloat64),
                                   py::arg("float16") = static_cast<int>(DType::kFloat16),
                                   py::arg("bfloat16") = static_cast<int>(DType::kBFloat16));
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
  zokernels_bindings::register_cge(m);
  zokernels_bindings::register_engine_cpu(m);
  zokernels_bindings::register_rule_sweep(m);
  m.def("openmp_max_threads", &openmp_max_threads);
  m.def("set_openmp_threads", &set_openmp_threads, py::arg("n"));
  m.def(
      "philox_uint32_cpu",
      [](uintptr_t out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
        py::gil_scoped_release release;
        zokernels::philox_uint32_cpu(static_cast<uint32_t*>(as_pointer(out)), n, seed, stream, offset);
      },
      py::arg("out_ptr"), py::arg("n"), py::arg("seed"), py::arg("stream"), py::arg("offset"));
  m.def(
      "philox_normal_cpu",
      [](uintptr_t out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
        py::gil_scoped_release release;
        zokernels::philox_normal_cpu(static_cast<float*>(as_pointer(out)), n, seed, stream, offset);
      },
      py::arg("out_ptr"), py::arg("n"), py::arg("seed"), py::arg("stream"), py::arg("offset"));
  m.def(
      "philox_normal_sumsq_cpu",
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
  m.def("philox_sweep_cpu", &philox_sweep, py::arg("tensors"), py::arg("numels"), py::arg("offsets"),
        py::arg("dtypes"), py::arg("seed"), py::arg("terms"), py::arg("sources"), py::arg("minus"));
}
