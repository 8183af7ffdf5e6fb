// AVX2 row packers for the CPU path: the same result as pack24::pack_row (the scalar oracle, which
// the C++ unit tests compare them with), 16 columns per iteration.
//
// Selection: 16 magnitude keys sit in 16-bit lanes (4 groups); for each rotation d = 1..3 inside a
// group, one compare says whether entry (i+d)%4 beats entry i (greater key, or equal key and lower
// index: K_j > K_i - [j < i]). The sum of the three compares is -rank; keep when rank < 2.
// Compaction: the 4-bit nonzero pattern of the kept entries of each group indexes tables giving the
// reference's nibble and the pshufb control that gathers the two stored values.
// Compiled with a target attribute (no -mavx2 for the whole build); callers check cpu_has_avx2().
#pragma once

#if defined(__x86_64__) && !defined(__CUDACC__)
#define STEP_KERNELS_HAVE_AVX2_PATH 1

#include <immintrin.h>

#include <cstdint>

#include "pack24.h"

namespace step_kernels {
namespace pack24 {

inline bool cpu_has_avx2() { return __builtin_cpu_supports("avx2"); }

// Lookup tables indexed by the nonzero patterns of two consecutive groups (low nibble: first).
struct Avx2Tables {
  uint16_t nib2[256];   // both reference nibbles (bits 0-7); bit 8: a group has > 2 nonzeros
  uint64_t ctl16[256];  // pshufb control: the 4 stored 16-bit values of 2 groups (8 bytes in)
  uint32_t ctl8[256];   // pshufb control: the 4 stored 8-bit values of 2 groups (8 bytes in)
  // Indexed by two stored nibbles (low: first group), for unpacking:
  uint64_t ictl16_lo[256], ictl16_hi[256];  // pshufb control: 8 dense 16-bit lanes from 4 values
  uint64_t ictl8[256];                      // pshufb control: 8 dense bytes from 4 int8 values
  uint8_t invalid[256];                     // 1 when either nibble is not a 2:4 pattern
};

inline const Avx2Tables& avx2_tables() {
  static const Avx2Tables tables = [] {
    Avx2Tables t{};
    for (uint32_t b = 0; b < 256; ++b) {
      const uint32_t lo = ref_nibble(b & 0xF), hi = ref_nibble(b >> 4);
      const bool bad = popcount4(b & 0xF) > 2 || popcount4(b >> 4) > 2;
      t.nib2[b] = static_cast<uint16_t>(lo | (hi << 4) | (bad ? 0x100u : 0u));
      const uint32_t idx[4] = {lo & 3, lo >> 2, 4 + (hi & 3), 4 + (hi >> 2)};
      uint64_t c16 = 0;
      uint32_t c8 = 0;
      for (int v = 0; v < 4; ++v) {
        c16 |= static_cast<uint64_t>(2 * idx[v]) << (16 * v);
        c16 |= static_cast<uint64_t>(2 * idx[v] + 1) << (16 * v + 8);
        c8 |= idx[v] << (8 * v);
      }
      t.ctl16[b] = c16;
      t.ctl8[b] = c8;
      // Unpack: dense position p of group gi takes stored value 2*gi (p == i0), 2*gi+1 (p == i1),
      // or zero (control byte 0x80).
      uint8_t c16u[16], c8u[8];
      for (int gi = 0; gi < 2; ++gi) {
        const uint32_t nibble = gi == 0 ? (b & 0xF) : (b >> 4);
        for (uint32_t p = 0; p < 4; ++p) {
          const int lane = 4 * gi + static_cast<int>(p);
          const int src = p == (nibble & 3) ? 2 * gi : p == (nibble >> 2) ? 2 * gi + 1 : -1;
          c16u[2 * lane] = src < 0 ? 0x80 : static_cast<uint8_t>(2 * src);
          c16u[2 * lane + 1] = src < 0 ? 0x80 : static_cast<uint8_t>(2 * src + 1);
          c8u[lane] = src < 0 ? 0x80 : static_cast<uint8_t>(src);
        }
      }
      t.ictl16_lo[b] = t.ictl16_hi[b] = t.ictl8[b] = 0;
      for (int i = 0; i < 8; ++i) {
        t.ictl16_lo[b] |= static_cast<uint64_t>(c16u[i]) << (8 * i);
        t.ictl16_hi[b] |= static_cast<uint64_t>(c16u[8 + i]) << (8 * i);
        t.ictl8[b] |= static_cast<uint64_t>(c8u[i]) << (8 * i);
      }
      t.invalid[b] = !valid_nibble(b & 0xF) || !valid_nibble(b >> 4);
    }
    return t;
  }();
  return tables;
}

// -rank of each 16-bit key among the 4 keys of its group (keys are non-negative int16).
__attribute__((target("avx2"))) inline __m256i neg_rank16(__m256i keys) {
  // clang-format off: one 128-bit lane per line
  const __m256i rot1 = _mm256_setr_epi8(2, 3, 4, 5, 6, 7, 0, 1, 10, 11, 12, 13, 14, 15, 8, 9,
                                        2, 3, 4, 5, 6, 7, 0, 1, 10, 11, 12, 13, 14, 15, 8, 9);
  const __m256i rot2 = _mm256_setr_epi8(4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11,
                                        4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  const __m256i rot3 = _mm256_setr_epi8(6, 7, 0, 1, 2, 3, 4, 5, 14, 15, 8, 9, 10, 11, 12, 13,
                                        6, 7, 0, 1, 2, 3, 4, 5, 14, 15, 8, 9, 10, 11, 12, 13);
  // clang-format on
  const __m256i low1 = _mm256_setr_epi16(0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1);
  const __m256i low2 = _mm256_setr_epi16(0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1);
  const __m256i low3 = _mm256_setr_epi16(0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1);
  const __m256i b1 = _mm256_cmpgt_epi16(_mm256_shuffle_epi8(keys, rot1), _mm256_sub_epi16(keys, low1));
  const __m256i b2 = _mm256_cmpgt_epi16(_mm256_shuffle_epi8(keys, rot2), _mm256_sub_epi16(keys, low2));
  const __m256i b3 = _mm256_cmpgt_epi16(_mm256_shuffle_epi8(keys, rot3), _mm256_sub_epi16(keys, low3));
  return _mm256_add_epi16(_mm256_add_epi16(b1, b2), b3);
}

// fp16/bf16 row (inf_bits: the +inf pattern, NaN keys are clamped to it). Same contract as pack_row.
template <class T>
__attribute__((target("avx2"))) int64_t pack_row_avx2(const uint16_t* x, int64_t k, bool prune, uint16_t* vals,
                                                      int16_t* words) {
  const Avx2Tables& t = avx2_tables();
  const __m256i abs_mask = _mm256_set1_epi16(0x7fff);
  const __m256i inf = _mm256_set1_epi16(static_cast<int16_t>(T::kInfBits));
  const __m256i minus2 = _mm256_set1_epi16(-2);
  const __m256i zero = _mm256_setzero_si256();
  uint32_t bad = 0;
  for (int64_t c = 0; c < k / 16; ++c) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * c));
    __m256i a = _mm256_and_si256(v, abs_mask);
    if (prune) {
      const __m256i keep = _mm256_cmpgt_epi16(neg_rank16(_mm256_min_epu16(a, inf)), minus2);
      v = _mm256_and_si256(v, keep);
      a = _mm256_and_si256(a, keep);
    }
    const __m256i is_zero = _mm256_cmpeq_epi16(a, zero);
    const uint32_t nz = ~static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_packs_epi16(is_zero, is_zero)));
    const uint32_t b0 = nz & 0xFF, b1 = (nz >> 16) & 0xFF;
    const uint32_t n0 = t.nib2[b0], n1 = t.nib2[b1];
    bad |= n0 | n1;
    words[c] = static_cast<int16_t>((n0 & 0xFF) | ((n1 & 0xFF) << 8));
    const __m128i lo =
        _mm_shuffle_epi8(_mm256_castsi256_si128(v), _mm_cvtsi64_si128(static_cast<int64_t>(t.ctl16[b0])));
    const __m128i hi =
        _mm_shuffle_epi8(_mm256_extracti128_si256(v, 1), _mm_cvtsi64_si128(static_cast<int64_t>(t.ctl16[b1])));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(vals + 8 * c), _mm_unpacklo_epi64(lo, hi));
  }
  return (bad & 0x100u) ? first_overfull_group<T>(x, k) : -1;
}

// int8 row: 16 columns (4 groups, half an int32 meta word) per iteration. Same contract as pack_row.
__attribute__((target("avx2"))) inline int64_t pack_row_avx2_int8(const int8_t* x, int64_t k, bool prune, int8_t* vals,
                                                                  int32_t* words) {
  const Avx2Tables& t = avx2_tables();
  const __m256i minus2 = _mm256_set1_epi16(-2);
  const __m128i zero = _mm_setzero_si128();
  uint32_t bad = 0;
  for (int64_t c = 0; c < k / 16; ++c) {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 16 * c));
    if (prune) {
      const __m256i keep = _mm256_cmpgt_epi16(neg_rank16(_mm256_abs_epi16(_mm256_cvtepi8_epi16(v))), minus2);
      v = _mm_and_si128(v, _mm_packs_epi16(_mm256_castsi256_si128(keep), _mm256_extracti128_si256(keep, 1)));
    }
    const uint32_t nz = ~static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(v, zero))) & 0xFFFFu;
    const uint32_t b0 = nz & 0xFF, b1 = nz >> 8;
    const uint32_t n0 = t.nib2[b0], n1 = t.nib2[b1];
    bad |= n0 | n1;
    const uint32_t half = (n0 & 0xFF) | ((n1 & 0xFF) << 8);
    if (c & 1) {
      words[c >> 1] = static_cast<int32_t>(static_cast<uint32_t>(words[c >> 1]) | (half << 16));
    } else {
      words[c >> 1] = static_cast<int32_t>(half);
    }
    const uint64_t ctl = t.ctl8[b0] | (static_cast<uint64_t>(t.ctl8[b1] + 0x08080808u) << 32);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(vals + 8 * c),
                     _mm_shuffle_epi8(v, _mm_cvtsi64_si128(static_cast<int64_t>(ctl))));
  }
  return (bad & 0x100u) ? first_overfull_group<Int8>(x, k) : -1;
}

// fp16/bf16 row unpack, one meta word (4 groups, 8 stored values -> 16 dense) per iteration.
// Same contract as unpack_row (T only selects the 16-bit path).
__attribute__((target("avx2"))) inline int64_t unpack_row_avx2_16(const uint16_t* vals, const int16_t* words, int64_t k,
                                                                  uint16_t* out) {
  const Avx2Tables& t = avx2_tables();
  uint32_t invalid = 0;
  for (int64_t c = 0; c < k / 16; ++c) {
    const uint32_t w = static_cast<uint16_t>(words[c]);
    const uint32_t b0 = w & 0xFF, b1 = w >> 8;
    invalid |= t.invalid[b0] | t.invalid[b1];
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(vals + 8 * c));
    const __m128i lo = _mm_shuffle_epi8(
        v, _mm_set_epi64x(static_cast<int64_t>(t.ictl16_hi[b0]), static_cast<int64_t>(t.ictl16_lo[b0])));
    const __m128i hi = _mm_shuffle_epi8(_mm_srli_si128(v, 8), _mm_set_epi64x(static_cast<int64_t>(t.ictl16_hi[b1]),
                                                                             static_cast<int64_t>(t.ictl16_lo[b1])));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * c), lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * c + 8), hi);
  }
  return invalid ? first_invalid_group<Half>(words, k) : -1;
}

// int8 row unpack, one meta word (8 groups, 16 stored values -> 32 dense) per iteration.
__attribute__((target("avx2"))) inline int64_t unpack_row_avx2_int8(const int8_t* vals, const int32_t* words, int64_t k,
                                                                    int8_t* out) {
  const Avx2Tables& t = avx2_tables();
  const uint64_t next_pair = 0x0404040404040404ull;  // the second pair of groups reads 4 bytes on
  uint32_t invalid = 0;
  for (int64_t c = 0; c < k / 32; ++c) {
    const uint32_t w = static_cast<uint32_t>(words[c]);
    const uint32_t b0 = w & 0xFF, b1 = (w >> 8) & 0xFF, b2 = (w >> 16) & 0xFF, b3 = w >> 24;
    invalid |= t.invalid[b0] | t.invalid[b1] | t.invalid[b2] | t.invalid[b3];
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(vals + 16 * c));
    const __m128i lo = _mm_shuffle_epi8(
        v, _mm_set_epi64x(static_cast<int64_t>(t.ictl8[b1] + next_pair), static_cast<int64_t>(t.ictl8[b0])));
    const __m128i hi = _mm_shuffle_epi8(
        _mm_srli_si128(v, 8),
        _mm_set_epi64x(static_cast<int64_t>(t.ictl8[b3] + next_pair), static_cast<int64_t>(t.ictl8[b2])));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * c), lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * c + 16), hi);
  }
  return invalid ? first_invalid_group<Int8>(words, k) : -1;
}

}  // namespace pack24
}  // namespace step_kernels

#endif  // __x86_64__ && !__CUDACC__
