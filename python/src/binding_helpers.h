// Small helpers shared by the pybind11 glue files: pointers cross Python as uintptr ints, shape/stride lists are
// checked for length before a launcher reads them, and def_cpu_cuda registers an op's cpu and cuda variants from
// one argument list.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

// ZK_CUDA_ONLY(statement): the statement in a CUDA build, nothing otherwise (where no <op>_cuda is registered).
#ifdef ZOKERNELS_WITH_CUDA
#define ZK_CUDA_ONLY(statement) statement
#else
#define ZK_CUDA_ONLY(statement)
#endif

namespace zokernels_bindings {

using Ints = std::vector<int64_t>;

template <typename P>
P as(uintptr_t address) {
  return reinterpret_cast<P>(address);
}

inline void require_size(const char* name, const Ints& values, size_t size) {
  if (values.size() != size)
    throw pybind11::value_error(std::string(name) + " must have " + std::to_string(size) + " entries, got " +
                                std::to_string(values.size()));
}

enum class Backend { kCpu, kCuda };

// Registers <name>_cpu(args...) and, in a CUDA build, <name>_cuda(args..., stream) (the caller's
// torch.cuda.current_stream().cuda_stream), both running body(backend, stream, args...).
template <typename... Args>
void def_cpu_cuda(pybind11::module_& m, const std::string& name, void (*body)(Backend, uintptr_t, Args...)) {
  m.def((name + "_cpu").c_str(), [body](Args... args) { body(Backend::kCpu, 0, args...); });
#ifdef ZOKERNELS_WITH_CUDA
  m.def((name + "_cuda").c_str(), [body](Args... args, uintptr_t stream) { body(Backend::kCuda, stream, args...); });
#endif
}

}  // namespace zokernels_bindings
