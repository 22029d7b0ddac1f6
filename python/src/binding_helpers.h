// Small helpers shared by the pybind11 glue files: pointers cross Python as uintptr ints, and shape/stride
// lists are checked for length before a launcher reads them.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

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

}  // namespace zokernels_bindings
