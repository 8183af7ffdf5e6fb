// CUDA kernels of pack24 / unpack24 registered with torch (the kernels and their launchers are in
// pack24.cu, which includes no torch header). Compiled only when setup.py builds the CUDA sources
// (it defines STEP_KERNELS_WITH_CUDA), so the CPU build references no CUDA symbol.
// A data-dependent error (a group with more than two nonzeros without prune, a corrupt meta nibble)
// is found by the kernel and read back on the host: pack24(prune=False) and unpack24 synchronise
// with the stream once; pack24(prune=True) cannot fail that way and does not.
#ifdef STEP_KERNELS_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "pack24_launch.h"
#include "pack24_torch.h"

namespace {

using namespace step_kernels::pack24;

DType launch_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf ? DType::kHalf : dtype == at::kBFloat16 ? DType::kBFloat16 : DType::kInt8;
}

// `t` itself when its data is `alignment`-byte aligned (the kernels' vector loads), else a copy.
at::Tensor aligned(const at::Tensor& t, int64_t alignment) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % alignment == 0 ? t : t.clone();
}

at::Tensor no_bad_group(const at::Tensor& like) {
  return at::full({1}, std::numeric_limits<int64_t>::max(), like.options().dtype(at::kLong));
}

unsigned long long* as_counter(at::Tensor& t) { return reinterpret_cast<unsigned long long*>(t.data_ptr<int64_t>()); }

std::tuple<at::Tensor, at::Tensor> pack24_cuda(const at::Tensor& dense_in, bool prune) {
  const c10::cuda::CUDAGuard guard(dense_in.device());
  const at::Tensor dense = aligned(check_pack_input(dense_in), 16);
  auto [values, meta] = empty_packed(dense);
  at::Tensor first_bad = no_bad_group(dense);
  C10_CUDA_CHECK(launch_pack24(launch_dtype(dense.scalar_type()), dense.data_ptr(), dense.size(0), dense.size(1), prune,
                               values.data_ptr(), meta.data_ptr(), as_counter(first_bad),
                               c10::cuda::getCurrentCUDAStream()));
  if (!prune) {
    const int64_t bad = first_bad.item<int64_t>();
    if (bad != std::numeric_limits<int64_t>::max()) throw_overfull(dense, bad);
  }
  return {values, meta};
}

at::Tensor unpack24_cuda(const at::Tensor& values_in, const at::Tensor& meta_in) {
  const at::Tensor meta = check_unpack_input(values_in, meta_in);  // first: it checks both are on one device
  const c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor values = aligned(values_in.contiguous(), 8);
  const int64_t rows = values.size(0), cols = 2 * values.size(1);
  at::Tensor dense = at::empty({rows, cols}, values.options());
  at::Tensor first_bad = no_bad_group(values);
  C10_CUDA_CHECK(launch_unpack24(launch_dtype(values.scalar_type()), values.data_ptr(), meta.data_ptr(), rows, cols,
                                 dense.data_ptr(), as_counter(first_bad), c10::cuda::getCurrentCUDAStream()));
  const int64_t bad = first_bad.item<int64_t>();
  if (bad != std::numeric_limits<int64_t>::max()) throw_bad_nibble(cols, bad);
  return dense;
}

}  // namespace

TORCH_LIBRARY_IMPL(step_kernels, CUDA, m) {
  m.impl("pack24", &pack24_cuda);
  m.impl("unpack24", &unpack24_cuda);
}

#endif  // STEP_KERNELS_WITH_CUDA
