// pybind11 glue for the fused rule sweep: rule_sweep_cpu (the C++ twin, csrc/cpu/rule_sweep_cpu.cpp; lists of host
// addresses) and, in a CUDA build, rule_sweep_cuda (csrc/cuda/rule_sweep.cu; device tables, the stream last).
// zokernels/kernels/rule_sweep.py declares both (kernels/native.py checks the tensors before the call).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "../../csrc/cpu/rule_sweep_cpu.h"
#include "../../csrc/rule_sweep.h"
#include "binding_helpers.h"
#include "cuda_bindings.h"

#ifdef ZOKERNELS_WITH_CUDA
extern "C" {
const char* zk_philox_error_string(int error);
int zk_rule_sweep(const int64_t* table, const int64_t* tiles, int64_t n_tiles, const int64_t* words,
                  const float* floats, int n_terms, int rule, int dtype, uintptr_t stream);
}
#endif

namespace py = pybind11;
using zokernels_bindings::as;

namespace {

void check_codes(int rule, int dtype) {
  if (rule < zokernels::kRuleLinear || rule > zokernels::kRuleLast)
    throw py::value_error("rule code must be 0.." + std::to_string(zokernels::kRuleLast) + ", got " +
                          std::to_string(rule));
  if (dtype < 0 || dtype > 3) throw py::value_error("dtype code must be 0..3, got " + std::to_string(dtype));
}

// One list entry per tensor; m (and v) empty unless the rule keeps state (rule_states); rows: kRuleRow fp32
// scalars per tensor.
void rule_sweep_cpu(const std::vector<uintptr_t>& out, const std::vector<uintptr_t>& sources,
                    const std::vector<uintptr_t>& m, const std::vector<uintptr_t>& v,
                    const std::vector<int64_t>& numels, const std::vector<uint64_t>& offsets,
                    const std::vector<int>& dtypes, uint64_t seed,
                    const std::vector<std::tuple<uint64_t, float>>& terms, int rule, const std::vector<float>& rows) {
  const size_t n = out.size();
  const int states = zokernels::rule_states(rule);
  for (const auto& [name, size, want] :
       {std::tuple{"sources", sources.size(), n}, std::tuple{"numels", numels.size(), n},
        std::tuple{"offsets", offsets.size(), n}, std::tuple{"dtypes", dtypes.size(), n},
        std::tuple{"m", m.size(), states >= 1 ? n : 0}, std::tuple{"v", v.size(), states == 2 ? n : 0},
        std::tuple{"rows", rows.size(), zokernels::kRuleRow * n}}) {
    if (size != want)
      throw py::value_error(std::string("rule_sweep: ") + name + " must have " + std::to_string(want) +
                            " entries, got " + std::to_string(size));
  }
  std::vector<zokernels::RuleTensor> tensors;
  for (size_t i = 0; i < n; ++i) {
    check_codes(rule, dtypes[i]);
    tensors.push_back({as<void*>(out[i]), as<const void*>(sources[i]), states >= 1 ? as<float*>(m[i]) : nullptr,
                       states == 2 ? as<float*>(v[i]) : nullptr, numels[i], offsets[i],
                       static_cast<zokernels::DType>(dtypes[i]), rows.data() + zokernels::kRuleRow * i});
  }
  std::vector<zokernels::StreamTerm> stream_terms;
  for (const auto& [stream, coeff] : terms) stream_terms.push_back({stream, coeff});
  py::gil_scoped_release release;
  zokernels::rule_sweep_cpu(tensors, seed, stream_terms, rule);
}

}  // namespace

namespace zokernels_bindings {
void register_rule_sweep(py::module_& m) {
  m.def("rule_sweep_cpu", &rule_sweep_cpu, py::arg("out"), py::arg("sources"), py::arg("m"), py::arg("v"),
        py::arg("numels"), py::arg("offsets"), py::arg("dtypes"), py::arg("seed"), py::arg("terms"), py::arg("rule"),
        py::arg("rows"));
#ifdef ZOKERNELS_WITH_CUDA
  m.def(
      "rule_sweep_cuda",
      [](uintptr_t table, uintptr_t tiles, int64_t n_tiles, uintptr_t words, uintptr_t floats, int n_terms, int rule,
         int dtype, uintptr_t stream) {
        check_codes(rule, dtype);
        const int error = zk_rule_sweep(as<const int64_t*>(table), as<const int64_t*>(tiles), n_tiles,
                                        as<const int64_t*>(words), as<const float*>(floats), n_terms, rule, dtype,
                                        stream);
        if (error != 0) throw std::runtime_error(std::string("rule_sweep_cuda: ") + zk_philox_error_string(error));
      },
      py::arg("table_ptr"), py::arg("tiles_ptr"), py::arg("n_tiles"), py::arg("words_ptr"), py::arg("floats_ptr"),
      py::arg("n_terms"), py::arg("rule"), py::arg("dtype"), py::arg("stream"));
#endif
}
}  // namespace zokernels_bindings
