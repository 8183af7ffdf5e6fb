// CUDA kernels of pack24 / unpack24 (no torch header: raw pointers and a cudaStream_t).
//
// pack24_kernel fuses the top-2 selection (prune=true), the metadata nibble, the value gather and
// the CUTLASS metadata reorder in one pass. Per dense element it reads 2 B (int8: 1 B) and writes
// 1 B (int8: 0.5 B) of values plus 1/8 B of metadata (4 bits per group of 4). Each thread owns 16 bytes of
// one row (one 16-byte load): 2 groups for fp16/bf16, 4 for int8, and stores its 8 bytes of values
// with one 8-byte store. The nibbles of a meta word come from two adjacent threads (same row),
// combined with one warp shuffle; the even thread stores the word. 128 threads per block: the
// per-thread state is a few registers, so occupancy is bounded by the block count, not registers,
// and every shape pack24 accepts is a whole number of blocks (no tail, all lanes live for the
// shuffle). unpack24_kernel is the inverse with the same mapping (8-byte load, 16-byte store).
#include <cuda_runtime.h>

#include "pack24.h"
#include "pack24_launch.h"

namespace step_kernels {
namespace pack24 {
namespace {

// 16-byte / 8-byte views of a thread's dense chunk and packed values (registers, no local memory).
template <class T>
union DenseChunk {
  uint4 vec;
  typename T::raw e[Chunk<T>::kElems];
};
template <class T>
union PackedChunk {
  uint2 vec;
  typename T::raw e[2 * Chunk<T>::kGroups];
};

template <class T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    pack24_kernel(const uint4* __restrict__ dense, int64_t rows, int64_t cols, bool prune, uint2* __restrict__ values,
                  typename Meta<T>::word* __restrict__ meta, unsigned long long* __restrict__ first_bad) {
  using C = Chunk<T>;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kThreadsPerBlock + threadIdx.x;
  const int64_t chunks_per_row = cols / C::kElems;
  const int64_t row = chunk / chunks_per_row, col_chunk = chunk - row * chunks_per_row;
  DenseChunk<T> in;
  in.vec = dense[chunk];
  PackedChunk<T> out;
  int bad_group;
  const uint32_t nibbles = pack_chunk<T>(in.e, prune, out.e, &bad_group);
  values[chunk] = out.vec;
  if (bad_group >= 0) {
    atomicMin(first_bad, static_cast<unsigned long long>(row * (cols / 4) + col_chunk * C::kGroups + bad_group));
  }
  const uint32_t partner = __shfl_xor_sync(0xffffffffu, nibbles, 1);
  if ((col_chunk & 1) == 0) {
    const uint32_t word = nibbles | (partner << (4 * C::kGroups));
    meta[meta_offset(row, col_chunk >> 1, rows, sizeof(typename Meta<T>::word) == 4)] =
        static_cast<typename Meta<T>::word>(word);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    unpack24_kernel(const uint2* __restrict__ values, const typename Meta<T>::word* __restrict__ meta, int64_t rows,
                    int64_t cols, uint4* __restrict__ dense, unsigned long long* __restrict__ first_bad) {
  using C = Chunk<T>;
  using uword = typename std::make_unsigned<typename Meta<T>::word>::type;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kThreadsPerBlock + threadIdx.x;
  const int64_t chunks_per_row = cols / C::kElems;
  const int64_t row = chunk / chunks_per_row, col_chunk = chunk - row * chunks_per_row;
  const uint32_t word = static_cast<uword>(meta[meta_offset(row, col_chunk >> 1, rows, sizeof(uword) == 4)]);
  const uint32_t nibbles = word >> (4 * C::kGroups * (col_chunk & 1));
  PackedChunk<T> in;
  in.vec = values[chunk];
  DenseChunk<T> out;
  int bad_group;
  unpack_chunk<T>(nibbles, in.e, out.e, &bad_group);
  dense[chunk] = out.vec;
  if (bad_group >= 0) {
    atomicMin(first_bad, static_cast<unsigned long long>(row * (cols / 4) + col_chunk * C::kGroups + bad_group));
  }
}

template <class T>
unsigned blocks(int64_t rows, int64_t cols) {
  return static_cast<unsigned>(rows * cols / Chunk<T>::kElems / kThreadsPerBlock);
}

template <class T>
cudaError_t pack24_typed(const void* dense, int64_t rows, int64_t cols, bool prune, void* values, void* meta,
                         unsigned long long* first_bad, cudaStream_t stream) {
  pack24_kernel<T><<<blocks<T>(rows, cols), kThreadsPerBlock, 0, stream>>>(
      static_cast<const uint4*>(dense), rows, cols, prune, static_cast<uint2*>(values),
      static_cast<typename Meta<T>::word*>(meta), first_bad);
  return cudaGetLastError();
}

template <class T>
cudaError_t unpack24_typed(const void* values, const void* meta, int64_t rows, int64_t cols, void* dense,
                           unsigned long long* first_bad, cudaStream_t stream) {
  unpack24_kernel<T><<<blocks<T>(rows, cols), kThreadsPerBlock, 0, stream>>>(
      static_cast<const uint2*>(values), static_cast<const typename Meta<T>::word*>(meta), rows, cols,
      static_cast<uint4*>(dense), first_bad);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_pack24(DType dtype, const void* dense, int64_t rows, int64_t cols, bool prune, void* values,
                          void* meta, unsigned long long* first_bad, cudaStream_t stream) {
  switch (dtype) {
    case DType::kHalf: return pack24_typed<Half>(dense, rows, cols, prune, values, meta, first_bad, stream);
    case DType::kBFloat16: return pack24_typed<BFloat16>(dense, rows, cols, prune, values, meta, first_bad, stream);
    case DType::kInt8: return pack24_typed<Int8>(dense, rows, cols, prune, values, meta, first_bad, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_unpack24(DType dtype, const void* values, const void* meta, int64_t rows, int64_t cols, void* dense,
                            unsigned long long* first_bad, cudaStream_t stream) {
  switch (dtype) {
    case DType::kHalf: return unpack24_typed<Half>(values, meta, rows, cols, dense, first_bad, stream);
    case DType::kBFloat16: return unpack24_typed<BFloat16>(values, meta, rows, cols, dense, first_bad, stream);
    case DType::kInt8: return unpack24_typed<Int8>(values, meta, rows, cols, dense, first_bad, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pack24
}  // namespace step_kernels
