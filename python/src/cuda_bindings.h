// Registration hooks of the glue files (python/src/*.cpp), called by bindings.cpp. Every hook is compiled in every
// build; without ZOKERNELS_WITH_CUDA the CUDA variants are not registered and `_C.has_cuda` is False.
#pragma once
#include <pybind11/pybind11.h>

namespace zokernels_bindings {
void register_cuda_philox(pybind11::module_& m);  // python/src/cuda_philox_bindings.cpp (philox_sweep_cuda)
void register_cge(pybind11::module_& m);          // python/src/cge_bindings.cpp (cge_*_cpu, cge_*_cuda)
void register_engine_cpu(pybind11::module_& m);   // python/src/engine_cpu_bindings.cpp (batchnorm/residual _cpu)
void register_rule_sweep(pybind11::module_& m);   // python/src/rule_sweep_bindings.cpp (rule_sweep _cpu, _cuda)
}  // namespace zokernels_bindings
