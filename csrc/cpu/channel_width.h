// Compile-time channel widths for the engine's row kernels ([N, C] rows, C contiguous).
#pragma once
#include <cstdint>
#include <type_traits>

namespace zokernels {

// Calls f(std::integral_constant<int, W>{}) with W = channels for the common widths (16, 32, 64: ResNet's) and
// W = 0 otherwise. Kernels templated on W use it as a fixed inner-loop length when W > 0, so the loop vectorizes;
// W = 0 means "read the width at run time".
template <typename F>
void with_channel_width(int64_t channels, F&& f) {
  switch (channels) {
    case 16: f(std::integral_constant<int, 16>{}); return;
    case 32: f(std::integral_constant<int, 32>{}); return;
    case 64: f(std::integral_constant<int, 64>{}); return;
    default: f(std::integral_constant<int, 0>{});
  }
}

}  // namespace zokernels
