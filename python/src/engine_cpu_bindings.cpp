// pybind11 glue for the engine's CPU kernels (csrc/cpu/batchnorm_replicas_cpu.*). Tensors cross as data_ptr
// ints; zokernels/kernels/batchnorm.py declares them (kernels/native.py checks the tensors) and engine/fused.py
// checks the layout before calling.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "../../csrc/cpu/batchnorm_delta_cpu.h"
#include "../../csrc/cpu/batchnorm_replicas_cpu.h"
#include "../../csrc/cpu/residual_relu_delta_cpu.h"
#include "binding_helpers.h"

namespace py = pybind11;

namespace zokernels_bindings {

void register_engine_cpu(py::module_& m) {
  m.def(
      "batchnorm_replicas_cpu",
      [](uintptr_t x, uintptr_t out, int64_t replicas, int64_t rows, int64_t channels, uintptr_t center,
         uintptr_t weight, uintptr_t bias, double eps, bool relu) {
        py::gil_scoped_release release;
        zokernels::batchnorm_replicas_cpu(as<const float*>(x), as<float*>(out), replicas, rows, channels,
                                          as<const float*>(center), as<const float*>(weight),
                                          as<const float*>(bias), eps, relu);
      },
      py::arg("x"), py::arg("out"), py::arg("replicas"), py::arg("rows"), py::arg("channels"), py::arg("center"),
      py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("relu"),
      "Per-replica training-mode BN (+ReLU) over channels-last [K, N, C] float32; weight/bias may be 0 (none).");
  m.def(
      "batchnorm_delta_cpu",
      [](uintptr_t delta, uintptr_t centered, uintptr_t root, uintptr_t weight, uintptr_t base_out, uintptr_t out,
         int64_t replicas, int64_t rows, int64_t channels) {
        py::gil_scoped_release release;
        zokernels::batchnorm_delta_cpu(as<const float*>(delta), as<const float*>(centered),
                                       as<const float*>(root), as<const float*>(weight),
                                       as<const float*>(base_out), as<float*>(out), replicas, rows,
                                       channels);
      },
      py::arg("delta"), py::arg("centered"), py::arg("root"), py::arg("weight"), py::arg("base_out"),
      py::arg("out"), py::arg("replicas"), py::arg("rows"), py::arg("channels"),
      "Exact change of training-mode BN (and ReLU when base_out != 0) for K replicas of channels-last δ rows.");
  m.def(
      "residual_relu_delta_cpu",
      [](uintptr_t a, uintptr_t b, uintptr_t y, uintptr_t out, int64_t replicas, int64_t numel) {
        py::gil_scoped_release release;
        zokernels::residual_relu_delta_cpu(as<const float*>(a), as<const float*>(b),
                                           as<const float*>(y), as<float*>(out), replicas, numel);
      },
      py::arg("a"), py::arg("b"), py::arg("y"), py::arg("out"), py::arg("replicas"), py::arg("numel"),
      "out = max(a + b, -y) + min(y, 0) per replica (b may be 0): the exact change of ReLU(y + a + b).");
}
}  // namespace zokernels_bindings
