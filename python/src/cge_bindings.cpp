// pybind11 glue for the CGE kernels: each op is registered once, as <op>_cpu (the C++ twin, csrc/cpu/cge_cpu.cpp;
// always compiled) and <op>_cuda (the launcher of csrc/cuda/cge_*.cu, with the CUDA stream as its last argument;
// only with ZOKERNELS_WITH_CUDA), from one argument list (def_cpu_cuda). Tensors cross as addresses, checked
// against each op's declaration by zokernels/kernels/native.py before the call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../csrc/cge_ops.h"
#include "binding_helpers.h"
#include "cuda_bindings.h"

namespace py = pybind11;
using zokernels_bindings::as;
using zokernels_bindings::Backend;
using zokernels_bindings::def_cpu_cuda;
using zokernels_bindings::Ints;
using zokernels_bindings::require_size;
namespace cge = zokernels::cge;

namespace {
#ifdef ZOKERNELS_WITH_CUDA
void check(const char* launcher, int error) {
  if (error != 0) throw std::runtime_error(std::string(launcher) + " failed: " + zk_cge_error_string(error));
}
#endif

cge::SgdFlags sgd_flags(const std::vector<bool>& flags) {
  if (flags.size() != 4)
    throw py::value_error("flags must be [weight_decay, momentum, first_step, nesterov], got " +
                          std::to_string(flags.size()) + " entries");
  return {flags[0], flags[1], flags[2], flags[3]};
}

void first_layer_delta(Backend backend, uintptr_t stream, uintptr_t x, uintptr_t y, uintptr_t coords,
                       uintptr_t steps, uintptr_t chan, uintptr_t out, int64_t replicas, const Ints& sizes,
                       const Ints& strides, const Ints& geometry, int bn_mode, bool relu, int dtype) {
  require_size("sizes", sizes, 7);
  require_size("strides", strides, 8);
  require_size("geometry", geometry, 6);
  const auto shape = cge::first_layer_shape(sizes.data(), strides.data(), geometry.data());
  if (backend == Backend::kCpu) {
    py::gil_scoped_release release;
    cge::first_layer_delta_cpu(as<const void*>(x), as<const void*>(y), as<const int64_t*>(coords),
                               as<const void*>(steps), as<const void*>(chan), as<void*>(out), replicas, shape,
                               bn_mode, relu, dtype);
    return;
  }
  ZK_CUDA_ONLY(check("zk_cge_first_layer_delta",
                     zk_cge_first_layer_delta(as<const void*>(x), as<const void*>(y), as<const int64_t*>(coords),
                                              as<const void*>(steps), as<const void*>(chan), as<void*>(out),
                                              replicas, &shape, bn_mode, relu ? 1 : 0, dtype, stream)));
}

void one_channel_conv2d(Backend backend, uintptr_t stream, uintptr_t delta, uintptr_t channels, uintptr_t weight,
                        uintptr_t out, const Ints& sizes, const Ints& strides, const Ints& geometry, int dtype) {
  require_size("sizes", sizes, 9);
  require_size("strides", strides, 12);
  require_size("geometry", geometry, 6);
  const auto shape = cge::mixing_shape(sizes.data(), strides.data(), geometry.data());
  if (backend == Backend::kCpu) {
    py::gil_scoped_release release;
    cge::one_channel_conv2d_cpu(as<const void*>(delta), as<const int64_t*>(channels), as<const void*>(weight),
                                as<void*>(out), shape, dtype);
    return;
  }
  ZK_CUDA_ONLY(check("zk_cge_one_channel_conv2d",
                     zk_cge_one_channel_conv2d(as<const void*>(delta), as<const int64_t*>(channels),
                                               as<const void*>(weight), as<void*>(out), &shape, dtype, stream)));
}

void one_channel_linear(Backend backend, uintptr_t stream, uintptr_t delta, uintptr_t channels, uintptr_t weight,
                        uintptr_t out, int64_t replicas, int64_t batch, int64_t n_out, int64_t n_in, int dtype) {
  if (backend == Backend::kCpu) {
    py::gil_scoped_release release;
    cge::one_channel_linear_cpu(as<const void*>(delta), as<const int64_t*>(channels), as<const void*>(weight),
                                as<void*>(out), replicas, batch, n_out, n_in, dtype);
    return;
  }
  ZK_CUDA_ONLY(check("zk_cge_one_channel_linear",
                     zk_cge_one_channel_linear(as<const void*>(delta), as<const int64_t*>(channels),
                                               as<const void*>(weight), as<void*>(out), replicas, batch, n_out,
                                               n_in, dtype, stream)));
}

void masked_sgd(Backend backend, uintptr_t stream, uintptr_t params, uintptr_t grads, uintptr_t buffers,
                uintptr_t numels, int64_t n_params, uintptr_t param_ids, uintptr_t elements, uintptr_t values,
                int64_t n, uintptr_t hyper, bool update, bool dense, int64_t max_numel,
                const std::vector<bool>& flags, int dtype) {
  const auto sgd = sgd_flags(flags);
  if (backend == Backend::kCpu) {  // the CPU loops read numels; max_numel sizes the CUDA grid only
    py::gil_scoped_release release;
    cge::masked_sgd_cpu(as<const int64_t*>(params), as<const int64_t*>(grads), as<const int64_t*>(buffers),
                        as<const int64_t*>(numels), n_params, as<const int32_t*>(param_ids),
                        as<const int64_t*>(elements), as<const void*>(values), n, as<const void*>(hyper), update,
                        dense, sgd, dtype);
    return;
  }
  if (dense && n_params > 65535) throw py::value_error("at most 65535 parameters per dense launch (grid.y)");
  ZK_CUDA_ONLY(check("zk_cge_masked_sgd",
                     zk_cge_masked_sgd(as<const int64_t*>(params), as<const int64_t*>(grads),
                                       as<const int64_t*>(buffers), as<const int64_t*>(numels), n_params,
                                       as<const int32_t*>(param_ids), as<const int64_t*>(elements),
                                       as<const void*>(values), n, as<const void*>(hyper), update ? 1 : 0,
                                       dense ? 1 : 0, max_numel, sgd, dtype, stream)));
}
}  // namespace

namespace zokernels_bindings {
void register_cge(py::module_& m) {
  def_cpu_cuda(m, "cge_first_layer_delta", &first_layer_delta);
  def_cpu_cuda(m, "cge_one_channel_conv2d", &one_channel_conv2d);
  def_cpu_cuda(m, "cge_one_channel_linear", &one_channel_linear);
  def_cpu_cuda(m, "cge_masked_sgd", &masked_sgd);
}
}  // namespace zokernels_bindings
