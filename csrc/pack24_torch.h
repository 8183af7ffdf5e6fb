// Torch-side glue shared by the CPU (pack24_cpu.cpp) and CUDA (pack24_cuda.cpp) bindings of
// pack24/unpack24: input checks with errors naming the argument and the required multiples,
// output allocation, the dtype switch and the messages of the data-dependent errors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "pack24.h"

namespace step_kernels {
namespace pack24 {

// The dtype as Python prints it ("torch.float16"), so these messages equal the fake kernels' (packing.py).
inline std::string dtype_name(at::ScalarType dtype) { return "torch." + std::string(c10::getDtypeNames(dtype).first); }

// Calls f(T{}) with the pack24 traits of `dtype`; a TypeError for any other dtype.
template <class F>
auto dispatch_dtype(at::ScalarType dtype, const char* op, const char* arg, F&& f) {
  switch (dtype) {
    case at::kHalf: return f(Half{});
    case at::kBFloat16: return f(BFloat16{});
    case at::kChar: return f(Int8{});
    default: TORCH_CHECK_TYPE(false, op, ": ", arg, " must be float16, bfloat16 or int8, got ", dtype_name(dtype));
  }
  __builtin_unreachable();
}

inline at::ScalarType meta_dtype(at::ScalarType dtype) { return dtype == at::kChar ? at::kInt : at::kShort; }

// Rows and dense columns `cols` must be positive multiples of the sparse GEMM's tile; `what` ends the
// message with the shape at fault.
template <class T>
void check_shape(const char* op, const std::string& what, int64_t rows, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(rows > 0 && rows % Limits<T>::kRowMultiple == 0 && cols > 0 && cols % Limits<T>::kColMultiple == 0,
                    op, ": a ", dtype_name(dtype), " matrix needs rows a positive multiple of ",
                    Limits<T>::kRowMultiple, " and columns a positive multiple of ", Limits<T>::kColMultiple,
                    " (the minimum tile of the 2:4 sparse GEMM); ", what, "; nothing is padded");
}

// Checks `dense` and returns its contiguous form.
inline at::Tensor check_pack_input(const at::Tensor& dense) {
  dispatch_dtype(dense.scalar_type(), "pack24", "dense", [&](auto t) {
    using T = decltype(t);
    TORCH_CHECK_VALUE(dense.dim() == 2, "pack24: dense must be a 2-D matrix [rows, cols], got a ", dense.dim(),
                      "-D tensor of shape ", dense.sizes());
    check_shape<T>("pack24", c10::str("got dense of shape ", dense.sizes()), dense.size(0), dense.size(1),
                   dense.scalar_type());
    return 0;
  });
  return dense.contiguous();
}

// (values [rows, cols/2], meta [rows, cols/16] int16 or [rows, cols/32] int32), uninitialised.
inline std::tuple<at::Tensor, at::Tensor> empty_packed(const at::Tensor& dense) {
  const int64_t rows = dense.size(0), cols = dense.size(1);
  const int64_t groups_per_word = dense.scalar_type() == at::kChar ? 8 : 4;
  return {at::empty({rows, cols / 2}, dense.options()),
          at::empty({rows, cols / (4 * groups_per_word)}, dense.options().dtype(meta_dtype(dense.scalar_type())))};
}

// Checks values/meta and returns the contiguous meta.
inline at::Tensor check_unpack_input(const at::Tensor& values, const at::Tensor& meta) {
  dispatch_dtype(values.scalar_type(), "unpack24", "values", [&](auto t) {
    using T = decltype(t);
    TORCH_CHECK_VALUE(values.dim() == 2, "unpack24: values must be a 2-D matrix [rows, cols/2], got a ", values.dim(),
                      "-D tensor of shape ", values.sizes());
    TORCH_CHECK_TYPE(meta.scalar_type() == meta_dtype(values.scalar_type()), "unpack24: meta must be ",
                     dtype_name(meta_dtype(values.scalar_type())), " for ", dtype_name(values.scalar_type()),
                     " values, got ", dtype_name(meta.scalar_type()));
    TORCH_CHECK_VALUE(meta.device() == values.device(), "unpack24: meta is on ", meta.device(), " but values are on ",
                      values.device());
    const int64_t rows = values.size(0), cols = 2 * values.size(1);
    check_shape<T>("unpack24",
                   c10::str("values of shape ", values.sizes(), " give a dense shape [", rows, ", ", cols, "]"), rows,
                   cols, values.scalar_type());
    const int64_t meta_cols = cols / (4 * Meta<T>::kGroups);
    TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(0) == rows && meta.size(1) == meta_cols,
                      "unpack24: values of shape ", values.sizes(), " need meta of shape [", rows, ", ", meta_cols,
                      "], got meta of shape ", meta.sizes());
    return 0;
  });
  return meta.contiguous();
}

[[noreturn]] inline void throw_overfull(const at::Tensor& dense, int64_t linear_group) {
  const int64_t groups_per_row = dense.size(1) / 4;
  const int64_t row = linear_group / groups_per_row, col = 4 * (linear_group % groups_per_row);
  TORCH_CHECK_VALUE(false, "pack24: dense[", row, ", ", col, ":", col + 4,
                    "] has more than 2 nonzeros; a 2:4 matrix has at most 2 in every group of 4 columns "
                    "(pass prune=True to keep the 2 largest |w| of each group)");
  __builtin_unreachable();
}

[[noreturn]] inline void throw_bad_nibble(int64_t cols, int64_t linear_group) {
  const int64_t groups_per_row = cols / 4;
  const int64_t row = linear_group / groups_per_row, col = 4 * (linear_group % groups_per_row);
  TORCH_CHECK_VALUE(false, "unpack24: the meta nibble of dense[", row, ", ", col, ":", col + 4,
                    "] is not one of the six 2:4 patterns (meta is corrupt or was not made by pack24)");
  __builtin_unreachable();
}

}  // namespace pack24
}  // namespace step_kernels
