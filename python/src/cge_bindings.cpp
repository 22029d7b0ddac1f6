// pybind11 glue for the CUDA cge launchers; tensors cross as device data_ptr ints, launches go on the
// CUDA stream passed by the caller (torch.cuda.current_stream().cuda_stream). Argument lists match the CPU
// twins (python/src/cge_cpu_bindings.cpp) plus the stream; zokernels/kernels/*.py validates tensors first.
#include "cuda_bindings.h"

#ifdef ZOKERNELS_WITH_CUDA
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../../csrc/cuda/cge_launch.h"
#include "binding_helpers.h"

namespace py = pybind11;
using zokernels_bindings::as;
using zokernels_bindings::Ints;
using zokernels_bindings::require_size;

namespace {
void check(const char* launcher, int error) {
  if (error != 0) throw std::runtime_error(std::string(launcher) + " failed: " + zk_cge_error_string(error));
}

void first_layer_delta(uintptr_t x, uintptr_t y, uintptr_t coords, uintptr_t steps, uintptr_t chan, uintptr_t out,
                       int64_t replicas, const Ints& sizes, const Ints& strides, const Ints& geometry, int bn_mode,
                       bool relu, int dtype, uintptr_t stream) {
  require_size("sizes", sizes, 7);
  require_size("strides", strides, 8);
  require_size("geometry", geometry, 6);
  const auto shape = zokernels::cge::first_layer_shape(sizes.data(), strides.data(), geometry.data());
  check("zk_cge_first_layer_delta",
        zk_cge_first_layer_delta(as<const void*>(x), as<const void*>(y), as<const int64_t*>(coords),
                                 as<const void*>(steps), as<const void*>(chan), as<void*>(out), replicas, &shape,
                                 bn_mode, relu ? 1 : 0, dtype, stream));
}

void one_channel_conv2d(uintptr_t delta, uintptr_t channels, uintptr_t weight, uintptr_t out, const Ints& sizes,
                        const Ints& strides, const Ints& geometry, int dtype, uintptr_t stream) {
  require_size("sizes", sizes, 9);
  require_size("strides", strides, 12);
  require_size("geometry", geometry, 6);
  const auto shape = zokernels::cge::mixing_shape(sizes.data(), strides.data(), geometry.data());
  check("zk_cge_one_channel_conv2d",
        zk_cge_one_channel_conv2d(as<const void*>(delta), as<const int64_t*>(channels), as<const void*>(weight),
                                  as<void*>(out), &shape, dtype, stream));
}

void masked_sgd(uintptr_t params, uintptr_t grads, uintptr_t buffers, uintptr_t numels, int64_t n_params,
                uintptr_t param_ids, uintptr_t elements, uintptr_t values, int64_t n, uintptr_t hyper, bool update,
                bool dense, int64_t max_numel, const std::vector<bool>& flags, int dtype, uintptr_t stream) {
  if (flags.size() != 4) throw py::value_error("flags must be [weight_decay, momentum, first_step, nesterov]");
  if (dense && n_params > 65535) throw py::value_error("at most 65535 parameters per dense launch (grid.y)");
  const zokernels::cge::SgdFlags sgd{flags[0], flags[1], flags[2], flags[3]};
  check("zk_cge_masked_sgd",
        zk_cge_masked_sgd(as<const int64_t*>(params), as<const int64_t*>(grads), as<const int64_t*>(buffers),
                          as<const int64_t*>(numels), n_params, as<const int32_t*>(param_ids),
                          as<const int64_t*>(elements), as<const void*>(values), n, as<const void*>(hyper),
                          update ? 1 : 0, dense ? 1 : 0, max_numel, sgd, dtype, stream));
}
}  // namespace
#endif

namespace zokernels_bindings {
void register_cuda_cge(pybind11::module_& m) {
#ifdef ZOKERNELS_WITH_CUDA
  m.def("cge_first_layer_delta_cuda", &first_layer_delta);
  m.def("cge_one_channel_conv2d_cuda", &one_channel_conv2d);
  m.def("cge_one_channel_linear_cuda",
        [](uintptr_t delta, uintptr_t channels, uintptr_t weight, uintptr_t out, int64_t replicas, int64_t batch,
           int64_t n_out, int64_t n_in, int dtype, uintptr_t stream) {
          check("zk_cge_one_channel_linear",
                zk_cge_one_channel_linear(as<const void*>(delta), as<const int64_t*>(channels),
                                          as<const void*>(weight), as<void*>(out), replicas, batch, n_out, n_in,
                                          dtype, stream));
        });
  m.def("cge_masked_sgd_cuda", &masked_sgd);
#else
  (void)m;
#endif
}
}  // namespace zokernels_bindings
