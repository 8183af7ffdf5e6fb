// N:M top-N selection of one group, shared by every C++/CUDA path (CPU step, 2:4 packing, CUDA).
//
// Rule (docs/design.md section 3): keep the N largest |w| of the group; NaN magnitudes count as +inf;
// ties go to the lower index; exactly N entries are kept. Entry i is kept when fewer than N entries
// beat it, where j beats i if key[j] > key[i], or key[j] == key[i] and j < i. This O(M^2) rank is
// order-independent and branch-free, so the CPU loop, the CUDA kernel and the PyTorch reference
// (step_kernels/reference.py::nm_mask) agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace step_kernels {

// Magnitude key with NaN mapped to +inf. Works for float, double and for integer types widened to
// int32 (|-128| does not fit in int8, so int8 callers pass int32).
STEP_HOST_DEVICE float nm_key(float x) {
  float a = std::fabs(x);
  return (a != a) ? INFINITY : a;
}
STEP_HOST_DEVICE double nm_key(double x) {
  double a = std::fabs(x);
  return (a != a) ? INFINITY : a;
}
STEP_HOST_DEVICE int32_t nm_key(int32_t x) { return x < 0 ? -x : x; }

// Bit i of the result is set when entry i of `keys[0..m)` is kept. m <= 32.
template <typename Key>
STEP_HOST_DEVICE uint32_t nm_select_keys(const Key* keys, int n, int m) {
  uint32_t kept = 0;
  for (int i = 0; i < m; ++i) {
    int rank = 0;
    for (int j = 0; j < m; ++j) {
      const bool beats = (keys[j] > keys[i]) || (keys[j] == keys[i] && j < i);
      rank += beats ? 1 : 0;
    }
    kept |= (rank < n ? 1u : 0u) << i;
  }
  return kept;
}

}  // namespace step_kernels
