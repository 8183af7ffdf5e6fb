// pack24 / unpack24 on CPU, and the schemas of both ops (the CUDA kernels live in pack24_cuda.cpp).
//
// pack24 reads each dense element once (2 B; int8: 1 B) and writes half of them plus 4 bits of
// metadata per group of 4 (1/16 of the dense bytes; int8: 1/8); unpack24 is the inverse. Work is split over blocks of
// 32 rows (int8: 16), the row block of the CUTLASS metadata reorder, so every thread writes whole runs of the reordered
// metadata. Rows are packed and unpacked by the AVX2 path when the CPU has it (STEP_KERNELS_PACK24_SIMD=0 forces the
// portable group loops of pack24.h, which tests compare).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "pack24_avx2.h"
#include "pack24_torch.h"

namespace {

using namespace step_kernels::pack24;

void record_min(std::atomic<int64_t>& slot, int64_t value) {
  int64_t current = slot.load();
  while (value < current && !slot.compare_exchange_weak(current, value)) {
  }
}

bool use_simd() {
#ifdef STEP_KERNELS_HAVE_AVX2_PATH
  const char* env = std::getenv("STEP_KERNELS_PACK24_SIMD");
  return cpu_has_avx2() && !(env != nullptr && std::strcmp(env, "0") == 0);
#else
  return false;
#endif
}

template <class T>
int64_t pack_row_cpu(const typename T::raw* x, int64_t k, bool prune, typename T::raw* vals,
                     typename Meta<T>::word* words, bool simd) {
#ifdef STEP_KERNELS_HAVE_AVX2_PATH
  if (simd) {
    if constexpr (std::is_same_v<T, Int8>) {
      return pack_row_avx2_int8(x, k, prune, vals, words);
    } else {
      return pack_row_avx2<T>(x, k, prune, vals, words);
    }
  }
#endif
  return pack_row<T>(x, k, prune, vals, words);
}

template <class T>
int64_t unpack_row_cpu(const typename T::raw* vals, const typename Meta<T>::word* words, int64_t k,
                       typename T::raw* out, bool simd) {
#ifdef STEP_KERNELS_HAVE_AVX2_PATH
  if (simd) {
    if constexpr (std::is_same_v<T, Int8>) {
      return unpack_row_avx2_int8(vals, words, k, out);
    } else {
      return unpack_row_avx2_16(vals, words, k, out);
    }
  }
#endif
  return unpack_row<T>(vals, words, k, out);
}

// Row blocks per parallel task: about 64K dense elements each.
int64_t grain_blocks(int64_t rows_per_block, int64_t cols) {
  return std::max<int64_t>(1, 65536 / (rows_per_block * cols));
}

std::tuple<at::Tensor, at::Tensor> pack24_cpu(const at::Tensor& dense_in, bool prune) {
  const at::Tensor dense = check_pack_input(dense_in);
  at::Tensor values, meta;  // not a structured binding: the lambdas below capture them (C++20 for clang)
  std::tie(values, meta) = empty_packed(dense);
  const int64_t rows = dense.size(0), cols = dense.size(1);
  std::atomic<int64_t> first_bad{INT64_MAX};
  const bool simd = use_simd();
  dispatch_dtype(dense.scalar_type(), "pack24", "dense", [&](auto t) {
    using T = decltype(t);
    using raw = typename T::raw;
    using word = typename Meta<T>::word;
    const raw* x = static_cast<const raw*>(dense.data_ptr());
    raw* vals = static_cast<raw*>(values.data_ptr());
    word* out = meta.data_ptr<word>();
    const int64_t block = Limits<T>::kRowMultiple;  // = the reorder's row block (32; int8: 16)
    const int64_t meta_cols = cols / (4 * Meta<T>::kGroups);
    const bool int32_meta = std::is_same_v<T, Int8>;
    at::parallel_for(0, rows / block, grain_blocks(block, cols), [&](int64_t b0, int64_t b1) {
      std::vector<word> words(meta_cols);
      for (int64_t r = b0 * block; r < b1 * block; ++r) {
        const int64_t bad = pack_row_cpu<T>(x + r * cols, cols, prune, vals + r * (cols / 2), words.data(), simd);
        if (bad >= 0) record_min(first_bad, r * (cols / 4) + bad);
        for (int64_t c = 0; c < meta_cols; ++c) out[meta_offset(r, c, rows, int32_meta)] = words[c];
      }
    });
    return 0;
  });
  if (first_bad.load() != INT64_MAX) throw_overfull(dense, first_bad.load());
  return {values, meta};
}

at::Tensor unpack24_cpu(const at::Tensor& values_in, const at::Tensor& meta_in) {
  const at::Tensor meta = check_unpack_input(values_in, meta_in);
  const at::Tensor values = values_in.contiguous();
  const int64_t rows = values.size(0), cols = 2 * values.size(1);
  at::Tensor dense = at::empty({rows, cols}, values.options());
  std::atomic<int64_t> first_bad{INT64_MAX};
  const bool simd = use_simd();
  dispatch_dtype(values.scalar_type(), "unpack24", "values", [&](auto t) {
    using T = decltype(t);
    using raw = typename T::raw;
    using word = typename Meta<T>::word;
    const raw* vals = static_cast<const raw*>(values.data_ptr());
    const word* in = meta.data_ptr<word>();
    raw* out = static_cast<raw*>(dense.data_ptr());
    const int64_t block = Limits<T>::kRowMultiple;
    const int64_t meta_cols = cols / (4 * Meta<T>::kGroups);
    const bool int32_meta = std::is_same_v<T, Int8>;
    at::parallel_for(0, rows / block, grain_blocks(block, cols), [&](int64_t b0, int64_t b1) {
      std::vector<word> words(meta_cols);
      for (int64_t r = b0 * block; r < b1 * block; ++r) {
        for (int64_t c = 0; c < meta_cols; ++c) words[c] = in[meta_offset(r, c, rows, int32_meta)];
        const int64_t bad = unpack_row_cpu<T>(vals + r * (cols / 2), words.data(), cols, out + r * cols, simd);
        if (bad >= 0) record_min(first_bad, r * (cols / 4) + bad);
      }
    });
    return 0;
  });
  if (first_bad.load() != INT64_MAX) throw_bad_nibble(cols, first_bad.load());
  return dense;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(step_kernels, m) {
  m.def("pack24(Tensor dense, bool prune=False) -> (Tensor, Tensor)");
  m.def("unpack24(Tensor values, Tensor meta) -> Tensor");
}

TORCH_LIBRARY_IMPL(step_kernels, CPU, m) {
  m.impl("pack24", &pack24_cpu);
  m.impl("unpack24", &unpack24_cpu);
}
