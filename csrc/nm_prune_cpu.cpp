// nm_prune(w, n, m, dim) on CPU: (masked w, bool mask), keeping the n largest |w| of every m
// consecutive entries along `dim` (docs/design.md section 3), bit-identical to
// step_kernels/reference.py::nm_prune. Pruned entries are written as +0; kept entries keep their
// bits. Reads s bytes and writes s + 1 per element (s = the element size); parallel over groups.
// The Python entry point (step_kernels.ops.nm_prune) validates the arguments first; the checks
// here repeat them for direct callers of torch.ops.step_kernels.nm_prune.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "nm_select.h"

namespace {

// The magnitude key of one element: float for fp32/fp16/bf16 (exact: the conversion is exact),
// double for fp64, int32 for int8 (|-128| does not fit in int8).
template <typename T>
auto key_of(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return step_kernels::nm_key(x);
  } else if constexpr (std::is_same_v<T, int8_t>) {
    return step_kernels::nm_key(static_cast<int32_t>(x));
  } else {
    return step_kernels::nm_key(static_cast<float>(x));
  }
}

// Groups of m entries `inner` apart: group (o, k, i) of w viewed as [outer, size / m, m, inner]
// starts at (o * size + k * m) * inner + i.
template <typename T>
void prune_groups(const T* w, T* out, bool* mask, int64_t outer, int64_t size, int64_t inner, int n, int m) {
  using Key = decltype(key_of(T{}));
  const int64_t slabs = outer * (size / m);  // (o, k) pairs, each holding `inner` groups
  const int64_t grain = std::max<int64_t>(1, 32768 / (m * inner));
  at::parallel_for(0, slabs, grain, [&](int64_t begin, int64_t end) {
    Key keys[32];
    for (int64_t s = begin; s < end; ++s) {
      const int64_t base = s * m * inner;  // = (o * size + k * m) * inner
      for (int64_t i = 0; i < inner; ++i) {
        for (int j = 0; j < m; ++j) keys[j] = key_of(w[base + j * inner + i]);
        const uint32_t kept = step_kernels::nm_select_keys(keys, n, m);
        for (int j = 0; j < m; ++j) {
          const int64_t e = base + j * inner + i;
          const bool keep = (kept >> j) & 1u;
          out[e] = keep ? w[e] : T(0);
          mask[e] = keep;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> nm_prune_cpu(const at::Tensor& w_in, int64_t n, int64_t m, int64_t dim) {
  TORCH_CHECK_VALUE(m >= 2 && m <= 32 && (m & (m - 1)) == 0, "m: M must be a power of two from 2 to 32, got ", m);
  TORCH_CHECK_VALUE(n >= 1 && n < m, "n: N must satisfy 1 <= N < M=", m, ", got ", n);
  TORCH_CHECK_VALUE(w_in.dim() >= 1, "w: N:M groups need at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(dim >= -w_in.dim() && dim < w_in.dim(), "dim: ", dim, " is out of range for w of shape ",
                    w_in.sizes());
  const int64_t d = dim < 0 ? dim + w_in.dim() : dim;
  TORCH_CHECK_VALUE(w_in.size(d) % m == 0, "w: size ", w_in.size(d), " of dim ", d, " (shape ", w_in.sizes(),
                    ") is not divisible by M=", m);
  const at::ScalarType dtype = w_in.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble || dtype == at::kChar,
      "w: the cpu nm_prune takes float32, float16, bfloat16, float64 or int8, got torch.",
      c10::getDtypeNames(dtype).first);
  TORCH_CHECK_VALUE(w_in.device().is_cpu(), "w: the cpu nm_prune takes CPU tensors, got ", w_in.device());
  const at::Tensor w = w_in.contiguous();
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  at::Tensor mask = at::empty(w.sizes(), w.options().dtype(at::kBool));
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < d; ++i) outer *= w.size(i);
  for (int64_t i = d + 1; i < w.dim(); ++i) inner *= w.size(i);
  if (w.numel() == 0) return {out, mask};
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    prune_groups(static_cast<const T*>(w.data_ptr()), static_cast<T*>(out.data_ptr()), mask.data_ptr<bool>(), outer,
                 w.size(d), inner, static_cast<int>(n), static_cast<int>(m));
  };
  switch (w.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(at::Half{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kDouble: run(double{}); break;
    case at::kChar: run(int8_t{}); break;
    default: break;  // rejected above
  }
  return {out, mask};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(step_kernels, m) { m.def("nm_prune(Tensor w, int n, int m, int dim=-1) -> (Tensor, Tensor)"); }
TORCH_LIBRARY_IMPL(step_kernels, CPU, m) { m.impl("nm_prune", &nm_prune_cpu); }
