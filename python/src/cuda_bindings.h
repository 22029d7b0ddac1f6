// Registration hooks for the CUDA launchers (csrc/cuda). Each file defines its hook whether or not CUDA is
// compiled in; without ZOKERNELS_WITH_CUDA the hooks register nothing and `_C.has_cuda` is False.
#pragma once
#include <pybind11/pybind11.h>

namespace zokernels_bindings {
void register_cuda_philox(pybind11::module_& m);  // python/src/cuda_philox_bindings.cpp
void register_cuda_cge(pybind11::module_& m);     // python/src/cuda_cge_bindings.cpp
void register_cge_cpu(pybind11::module_& m);      // python/src/cge_cpu_bindings.cpp (always compiled)
void register_engine_cpu(pybind11::module_& m);   // python/src/engine_cpu_bindings.cpp (always compiled)
}  // namespace zokernels_bindings
