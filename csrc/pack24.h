// 2:4 packing into the CUTLASS layout of torch.sparse.SparseSemiStructuredTensorCUTLASS: the
// per-group logic (top-2 selection, metadata nibble, kept values) and the reordered metadata offsets.
// Everything here is __host__ __device__ and shared by the CPU loop (pack24_cpu.cpp), the CUDA
// kernels (pack24.cu) and the C++ unit tests, so CPU tests exercise the CUDA index math.
//
// Layout (docs/design.md section 9), for a dense [m, k] matrix:
//   values [m, k/2]: per group of 4 columns, the two kept entries in ascending column order.
//   meta   [m, k/16] int16 (fp16/bf16) or [m, k/32] int32 (int8): the logical word E[r][c] holds
//          the nibbles of groups 4c..4c+3 (int16) or 8c..8c+7 (int32), lowest group in the lowest
//          nibble; nibble = i0 | i1 << 2 with i0 < i1 the kept positions. The words are stored in
//          CUTLASS's reorder_meta + ColumnMajorInterleaved<2> order (meta_offset below).
#pragma once

#include <cstdint>
#include <type_traits>

#include "host_device.h"
#include "nm_select.h"

namespace step_kernels {
namespace pack24 {

// Raw storage and magnitude key of each packed dtype. Keys are integers that order like |x|:
// for IEEE 16-bit floats, the bits without the sign (NaN clamped to the +inf pattern, so NaN
// counts as +inf and ties with it by index, as docs/design.md section 3 says); for int8, |x|
// widened to int32 (|-128| overflows int8).
struct Half {
  using raw = uint16_t;
  static constexpr uint16_t kInfBits = 0x7c00;
  STEP_HOST_DEVICE static int32_t key(raw x) {
    return static_cast<int32_t>(((x & 0x7fff) < kInfBits) ? (x & 0x7fff) : kInfBits);
  }
  STEP_HOST_DEVICE static bool nonzero(raw x) { return (x & 0x7fff) != 0; }
};
struct BFloat16 {
  using raw = uint16_t;
  static constexpr uint16_t kInfBits = 0x7f80;
  STEP_HOST_DEVICE static int32_t key(raw x) {
    return static_cast<int32_t>(((x & 0x7fff) < kInfBits) ? (x & 0x7fff) : kInfBits);
  }
  STEP_HOST_DEVICE static bool nonzero(raw x) { return (x & 0x7fff) != 0; }
};
struct Int8 {
  using raw = int8_t;
  STEP_HOST_DEVICE static int32_t key(raw x) { return nm_key(static_cast<int32_t>(x)); }
  STEP_HOST_DEVICE static bool nonzero(raw x) { return x != 0; }
};

// The nibble torch's reference (sparse_semi_structured_from_dense_cutlass) gives a group whose
// nonzero pattern is `nz` (bit i set: entry i != 0). For exactly two nonzeros it names them; for
// fewer it names filler positions; for more it drops some (callers reject that case).
STEP_HOST_DEVICE uint32_t ref_nibble(uint32_t nz) {
  const uint32_t m0 = nz & 1u, m1 = (nz >> 1) & 1u, m3 = (nz >> 3) & 1u;
  const uint32_t n0 = m0 ^ 1u, n1 = m1 ^ 1u;
  const uint32_t bit0 = n0 & m1;
  const uint32_t bit1 = n0 & n1;
  const uint32_t bit2 = (m0 & m1) | (n0 & n1) | m3;
  const uint32_t bit3 = (n0 & m1) | n1;
  return bit0 | (bit1 << 1) | (bit2 << 2) | (bit3 << 3);
}

STEP_HOST_DEVICE int popcount4(uint32_t x) { return (x & 1u) + ((x >> 1) & 1u) + ((x >> 2) & 1u) + ((x >> 3) & 1u); }

// x[i] with constant indices only, so a CUDA thread keeps its group in registers.
template <class R>
STEP_HOST_DEVICE R pick4(const R* x, uint32_t i) {
  return i == 0 ? x[0] : i == 1 ? x[1] : i == 2 ? x[2] : x[3];
}

// Packs one group of 4: writes the two stored values to out[0..1] and returns the nibble, with
// bit 4 set when the group has more than two nonzeros (an error without prune).
// prune=false: stored values are x[i0], x[i1] exactly as the reference gathers them.
// prune=true: the result equals packing nm_prune(x, 2, 4): keep = top-2 |x|, pruned entries
// read as +0, and the nibble comes from the nonzero pattern of the kept entries.
template <class T>
STEP_HOST_DEVICE uint32_t pack_group(const typename T::raw* x, bool prune, typename T::raw* out) {
  uint32_t keep = 0xFu;
  if (prune) {
    const int32_t keys[4] = {T::key(x[0]), T::key(x[1]), T::key(x[2]), T::key(x[3])};
    keep = nm_select_keys(keys, 2, 4);
  }
  uint32_t nz = 0;
  for (int i = 0; i < 4; ++i) nz |= static_cast<uint32_t>(((keep >> i) & 1u) && T::nonzero(x[i])) << i;
  const uint32_t nibble = ref_nibble(nz);
  const uint32_t i0 = nibble & 3u, i1 = nibble >> 2;
  out[0] = ((keep >> i0) & 1u) ? pick4(x, i0) : typename T::raw(0);
  out[1] = ((keep >> i1) & 1u) ? pick4(x, i1) : typename T::raw(0);
  return nibble | (popcount4(nz) > 2 ? 0x10u : 0u);
}

// Whether a stored nibble is one of the six valid ordered patterns (i0 < i1).
STEP_HOST_DEVICE bool valid_nibble(uint32_t nibble) { return (nibble & 3u) < (nibble >> 2); }

// Unpacks one group: out[0..3] = v0 at i0, v1 at i1, zeros elsewhere.
template <class T>
STEP_HOST_DEVICE void unpack_group(uint32_t nibble, typename T::raw v0, typename T::raw v1, typename T::raw* out) {
  const uint32_t i0 = nibble & 3u, i1 = (nibble >> 2) & 3u;
  for (uint32_t i = 0; i < 4; ++i) out[i] = (i == i0) ? v0 : (i == i1) ? v1 : typename T::raw(0);
}

// The work of one CUDA thread: 16 bytes of one row, kGroups = 2 groups (fp16/bf16) or 4 (int8).
// Two adjacent threads of a row fill one meta word: the even one's nibbles low, the odd one's high.
template <class T>
struct Chunk {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(typename T::raw));
  static constexpr int kGroups = kElems / 4;
};

// Packs one chunk (x[0..kElems) -> out[0..2*kGroups)); returns its nibbles (4 bits per group) and
// sets *bad_group to the first group with more than two nonzeros (else leaves it at -1).
template <class T>
STEP_HOST_DEVICE uint32_t pack_chunk(const typename T::raw* x, bool prune, typename T::raw* out, int* bad_group) {
  uint32_t nibbles = 0;
  *bad_group = -1;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int g = 0; g < Chunk<T>::kGroups; ++g) {
    const uint32_t r = pack_group<T>(x + 4 * g, prune, out + 2 * g);
    nibbles |= (r & 0xFu) << (4 * g);
    if ((r & 0x10u) && *bad_group < 0) *bad_group = g;
  }
  return nibbles;
}

// Unpacks one chunk from its nibbles (v[0..2*kGroups) -> out[0..kElems)); sets *bad_group to the
// first group whose nibble is not a 2:4 pattern (else -1).
template <class T>
STEP_HOST_DEVICE void unpack_chunk(uint32_t nibbles, const typename T::raw* v, typename T::raw* out, int* bad_group) {
  *bad_group = -1;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int g = 0; g < Chunk<T>::kGroups; ++g) {
    const uint32_t nibble = (nibbles >> (4 * g)) & 0xFu;
    if (!valid_nibble(nibble) && *bad_group < 0) *bad_group = g;
    unpack_group<T>(nibble, v[2 * g], v[2 * g + 1], out + 4 * g);
  }
}

// Offset, in meta elements, of logical meta word E[r][c] of an m-row matrix in the reordered
// buffer. int16 meta: rows permuted in blocks of G=32 with interweave W=4; int32 meta: G=16, W=2;
// then each 2x2 block is transposed and the result stored ColumnMajorInterleaved<2>. Closed form
// of torch's _calculate_meta_reordering_scatter_offsets: each 32-bit (int16 meta) or 64-bit
// (int32 meta) chunk pairs rows r and r+8 of the same meta column.
STEP_HOST_DEVICE int64_t meta_offset(int64_t r, int64_t c, int64_t m, bool int32_meta) {
  const int64_t group = int32_meta ? 16 : 32;
  const int64_t interweave = int32_meta ? 2 : 4;
  const int64_t in_group = r % group;
  const int64_t row = (r - in_group) + interweave * (r & 7) + 2 * (in_group >> 4) + (c & 1);
  return (c >> 1) * 2 * m + 2 * row + ((r >> 3) & 1);
}

// Shape limits of SparseSemiStructuredTensorCUTLASS (the GEMM's minimum tile): rows must be a
// positive multiple of kRowMultiple, columns of kColMultiple.
template <class T>
struct Limits {
  static constexpr int64_t kRowMultiple = 32, kColMultiple = 64;
};
template <>
struct Limits<Int8> {
  static constexpr int64_t kRowMultiple = 16, kColMultiple = 128;
};

// Groups per logical meta word: 4 for int16 meta, 8 for int32 meta.
template <class T>
struct Meta {
  using word = int16_t;
  static constexpr int kGroups = 4;
};
template <>
struct Meta<Int8> {
  using word = int32_t;
  static constexpr int kGroups = 8;
};

// Index of the first group of a row with more than two nonzeros, or -1 (the error path).
template <class T>
inline int64_t first_overfull_group(const typename T::raw* x, int64_t k) {
  for (int64_t g = 0; g < k / 4; ++g) {
    uint32_t nz = 0;
    for (int i = 0; i < 4; ++i) nz |= static_cast<uint32_t>(T::nonzero(x[4 * g + i])) << i;
    if (popcount4(nz) > 2) return g;
  }
  return -1;
}

// Packs one row of k columns group by group (the portable CPU path, and the oracle of the SIMD
// one): values into vals[0..k/2), logical meta words into words[0..k/(4*kGroups)). Returns the
// index of the first group with more than two nonzeros, or -1.
template <class T>
inline int64_t pack_row(const typename T::raw* x, int64_t k, bool prune, typename T::raw* vals,
                        typename Meta<T>::word* words) {
  using word_t = typename Meta<T>::word;
  int64_t first_bad = -1;
  const int64_t ncols = k / (4 * Meta<T>::kGroups);
  for (int64_t c = 0; c < ncols; ++c) {
    uint32_t w = 0;
    for (int j = 0; j < Meta<T>::kGroups; ++j) {
      const int64_t g = c * Meta<T>::kGroups + j;
      const uint32_t r = pack_group<T>(x + 4 * g, prune, vals + 2 * g);
      if ((r & 0x10u) && first_bad < 0) first_bad = g;
      w |= (r & 0xFu) << (4 * j);
    }
    words[c] = static_cast<word_t>(w);
  }
  return first_bad;
}

// Index of the first group of a row whose meta nibble is not a 2:4 pattern, or -1 (error path).
template <class T>
inline int64_t first_invalid_group(const typename Meta<T>::word* words, int64_t k) {
  using uword = std::make_unsigned_t<typename Meta<T>::word>;
  for (int64_t g = 0; g < k / 4; ++g) {
    const uint32_t w = static_cast<uword>(words[g / Meta<T>::kGroups]);
    if (!valid_nibble((w >> (4 * (g % Meta<T>::kGroups))) & 0xFu)) return g;
  }
  return -1;
}

// Unpacks one row from its values (vals[0..k/2)) and logical meta words into out[0..k) (the
// portable CPU path, and the oracle of the SIMD one). Returns the index of the first group whose
// nibble is not a 2:4 pattern, or -1.
template <class T>
inline int64_t unpack_row(const typename T::raw* vals, const typename Meta<T>::word* words, int64_t k,
                          typename T::raw* out) {
  using uword = std::make_unsigned_t<typename Meta<T>::word>;
  int64_t first_bad = -1;
  const int64_t ncols = k / (4 * Meta<T>::kGroups);
  for (int64_t c = 0; c < ncols; ++c) {
    const uint32_t w = static_cast<uword>(words[c]);
    for (int j = 0; j < Meta<T>::kGroups; ++j) {
      const int64_t g = c * Meta<T>::kGroups + j;
      const uint32_t nibble = (w >> (4 * j)) & 0xFu;
      if (!valid_nibble(nibble) && first_bad < 0) first_bad = g;
      unpack_group<T>(nibble, vals[2 * g], vals[2 * g + 1], out + 4 * g);
    }
  }
  return first_bad;
}

}  // namespace pack24
}  // namespace step_kernels
