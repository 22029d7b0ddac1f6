// pybind11 glue for the C++ CPU twins of the CUDA CGE kernels (csrc/cpu/cge_cpu.cpp); always compiled.
// Same argument lists as the CUDA glue (python/src/cuda_cge_bindings.cpp) minus the stream; tensors cross as
// data_ptr ints, validated by zokernels/kernels/*.py before the call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../../csrc/cpu/cge_cpu.h"
#include "cuda_bindings.h"
#include "binding_helpers.h"

namespace py = pybind11;
using zokernels_bindings::as;
using zokernels_bindings::Ints;
using zokernels_bindings::require_size;

namespace {
zokernels::cge::SgdFlags sgd_flags(const std::vector<bool>& flags) {
  if (flags.size() != 4)
    throw py::value_error("flags must be [weight_decay, momentum, first_step, nesterov], got " +
                          std::to_string(flags.size()) + " entries");
  return {flags[0], flags[1], flags[2], flags[3]};
}
}  // namespace

namespace zokernels_bindings {
void register_cge_cpu(py::module_& m) {
  m.def("cge_first_layer_delta_cpu",
        [](uintptr_t x, uintptr_t y, uintptr_t coords, uintptr_t steps, uintptr_t chan, uintptr_t out,
           int64_t replicas, const Ints& sizes, const Ints& strides, const Ints& geometry, int bn_mode, bool relu,
           int dtype) {
          require_size("sizes", sizes, 7);
          require_size("strides", strides, 8);
          require_size("geometry", geometry, 6);
          const auto shape = zokernels::cge::first_layer_shape(sizes.data(), strides.data(), geometry.data());
          py::gil_scoped_release release;
          zokernels::cge::first_layer_delta_cpu(as<const void*>(x), as<const void*>(y), as<const int64_t*>(coords),
                                                as<const void*>(steps), as<const void*>(chan), as<void*>(out),
                                                replicas, shape, bn_mode, relu, dtype);
        });
  m.def("cge_one_channel_conv2d_cpu", [](uintptr_t delta, uintptr_t channels, uintptr_t weight, uintptr_t out,
                                         const Ints& sizes, const Ints& strides, const Ints& geometry, int dtype) {
    require_size("sizes", sizes, 9);
    require_size("strides", strides, 12);
    require_size("geometry", geometry, 6);
    const auto shape = zokernels::cge::mixing_shape(sizes.data(), strides.data(), geometry.data());
    py::gil_scoped_release release;
    zokernels::cge::one_channel_conv2d_cpu(as<const void*>(delta), as<const int64_t*>(channels),
                                           as<const void*>(weight), as<void*>(out), shape, dtype);
  });
  m.def("cge_one_channel_linear_cpu", [](uintptr_t delta, uintptr_t channels, uintptr_t weight, uintptr_t out,
                                         int64_t replicas, int64_t batch, int64_t n_out, int64_t n_in, int dtype) {
    py::gil_scoped_release release;
    zokernels::cge::one_channel_linear_cpu(as<const void*>(delta), as<const int64_t*>(channels),
                                           as<const void*>(weight), as<void*>(out), replicas, batch, n_out, n_in,
                                           dtype);
  });
  m.def("cge_masked_sgd_cpu",
        [](uintptr_t params, uintptr_t grads, uintptr_t buffers, uintptr_t numels, int64_t n_params,
           uintptr_t param_ids, uintptr_t elements, uintptr_t values, int64_t n, uintptr_t hyper, bool update,
           bool dense, int64_t max_numel, const std::vector<bool>& flags, int dtype) {
          (void)max_numel;  // the CUDA grid needs it; the CPU loops read numels
          const auto sgd = sgd_flags(flags);
          py::gil_scoped_release release;
          zokernels::cge::masked_sgd_cpu(as<const int64_t*>(params), as<const int64_t*>(grads),
                                         as<const int64_t*>(buffers), as<const int64_t*>(numels), n_params,
                                         as<const int32_t*>(param_ids), as<const int64_t*>(elements),
                                         as<const void*>(values), n, as<const void*>(hyper), update, dense, sgd,
                                         dtype);
        });
}
}  // namespace zokernels_bindings
