// nm_mask(w, n, m) on CPU: the boolean N:M mask of a tensor whose groups run along its last
// (contiguous) dim. Reads 4 B and writes 1 B per element; parallel over groups.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include "nm_select.h"

namespace {

at::Tensor nm_mask_cpu(const at::Tensor& w, int64_t n, int64_t m) {
  TORCH_CHECK(w.device().is_cpu(), "nm_mask: w must be a CPU tensor, got ", w.device());
  TORCH_CHECK(m >= 2 && m <= 32 && (m & (m - 1)) == 0, "nm_mask: M must be a power of two in [2, 32], got ", m);
  TORCH_CHECK(n >= 1 && n < m, "nm_mask: N must satisfy 1 <= N < M, got N=", n, " M=", m);
  TORCH_CHECK(w.dim() >= 1 && w.size(-1) % m == 0, "nm_mask: last dim of w (shape ", w.sizes(),
              ") must be divisible by M=", m);
  const at::Tensor x = w.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kBool));
  const float* src = x.data_ptr<float>();
  bool* dst = out.data_ptr<bool>();
  const int64_t groups = x.numel() / m;
  at::parallel_for(0, groups, 1024, [&](int64_t begin, int64_t end) {
    float keys[32];
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t i = 0; i < m; ++i) keys[i] = step_kernels::nm_key(src[g * m + i]);
      const uint32_t kept = step_kernels::nm_select_keys(keys, static_cast<int>(n), static_cast<int>(m));
      for (int64_t i = 0; i < m; ++i) dst[g * m + i] = (kept >> i) & 1u;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(step_kernels, m) { m.def("nm_mask(Tensor w, int n, int m) -> Tensor"); }
TORCH_LIBRARY_IMPL(step_kernels, CPU, m) { m.impl("nm_mask", &nm_mask_cpu); }
