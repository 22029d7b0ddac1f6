// pybind11 glue for the CUDA cge launchers; tensors cross as device data_ptr ints, launches go on the
// CUDA stream passed by the caller (torch.cuda.current_stream().cuda_stream).
#include "cuda_bindings.h"

namespace zokernels_bindings {
void register_cuda_cge(pybind11::module_& m) {
#ifdef ZOKERNELS_WITH_CUDA
  (void)m;
#else
  (void)m;
#endif
}
}  // namespace zokernels_bindings
