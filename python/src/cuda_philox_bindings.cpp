// pybind11 glue for the CUDA philox launchers (csrc/cuda/philox_sweep.cu); tensors and tables cross as device
// data_ptr ints, launches go on the CUDA stream passed by the caller (torch.cuda.current_stream().cuda_stream).
#include "cuda_bindings.h"

#ifdef ZOKERNELS_WITH_CUDA
#include <cstdint>
#include <stdexcept>
#include <string>

extern "C" {
const char* zk_philox_error_string(int error);
int zk_philox_sweep(const int64_t* table, const int64_t* tiles, int64_t n_tiles, const int64_t* words,
                    const float* floats, int n_terms, int dtype, int has_minus, uintptr_t stream);
}
#endif

namespace zokernels_bindings {
void register_cuda_philox(pybind11::module_& m) {
#ifdef ZOKERNELS_WITH_CUDA
  namespace py = pybind11;
  m.def(
      "philox_sweep_cuda",
      [](uintptr_t table, uintptr_t tiles, int64_t n_tiles, uintptr_t words, uintptr_t floats, int n_terms,
         int dtype, bool has_minus, uintptr_t stream) {
        if (dtype < 0 || dtype > 3) throw py::value_error("dtype code must be 0..3, got " + std::to_string(dtype));
        const int error = zk_philox_sweep(reinterpret_cast<const int64_t*>(table),
                                          reinterpret_cast<const int64_t*>(tiles), n_tiles,
                                          reinterpret_cast<const int64_t*>(words),
                                          reinterpret_cast<const float*>(floats), n_terms, dtype, has_minus ? 1 : 0,
                                          stream);
        if (error != 0) throw std::runtime_error(std::string("philox_sweep_cuda: ") + zk_philox_error_string(error));
      },
      py::arg("table_ptr"), py::arg("tiles_ptr"), py::arg("n_tiles"), py::arg("words_ptr"), py::arg("floats_ptr"),
      py::arg("n_terms"), py::arg("dtype"), py::arg("has_minus"), py::arg("stream"));
#else
  (void)m;
#endif
}
}  // namespace zokernels_bindings
