// Launchers of the pack24/unpack24 CUDA kernels (pack24.cu): raw pointers and a cudaStream_t, no
// torch types, so the .cu file needs no torch header. The torch binding is pack24_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace step_kernels {
namespace pack24 {

enum class DType { kHalf, kBFloat16, kInt8 };

// Threads per block of both kernels; rows * cols / (16 / element size) is always a multiple of it
// for the shapes pack24 accepts (rows % 32 and cols % 64; int8: rows % 16 and cols % 128).
constexpr int kThreadsPerBlock = 128;

// dense [rows, cols] (16-byte aligned) -> values [rows, cols/2], meta (reordered); *first_bad is
// lowered (atomicMin) to the linear index row * cols/4 + group of each group with more than two
// nonzeros; the caller initialises it to INT64_MAX.
cudaError_t launch_pack24(DType dtype, const void* dense, int64_t rows, int64_t cols, bool prune, void* values,
                          void* meta, unsigned long long* first_bad, cudaStream_t stream);

// values [rows, cols/2] (8-byte aligned), meta -> dense [rows, cols]; *first_bad as above, for
// groups whose meta nibble is not one of the six 2:4 patterns.
cudaError_t launch_unpack24(DType dtype, const void* values, const void* meta, int64_t rows, int64_t cols, void* dense,
                            unsigned long long* first_bad, cudaStream_t stream);

}  // namespace pack24
}  // namespace step_kernels
