// Unit tests of the 2:4 packing logic shared by the CPU loop and the CUDA kernels (no torch):
// the reordered metadata offsets against a transliteration of torch's scatter formula, the
// reference nibble table, top-2 selection against nm_select_keys on float magnitudes (NaN, inf,
// -0, ties), and the AVX2 row packers against the scalar group loop.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../pack24.h"
#include "../pack24_avx2.h"

using namespace step_kernels;
using namespace step_kernels::pack24;

static int failures = 0;
#define CHECK_EQ(a, b)                                                                                          \
  do {                                                                                                          \
    const long long _a = static_cast<long long>(a), _b = static_cast<long long>(b);                             \
    if (_a != _b) {                                                                                             \
      if (failures < 20) std::printf("FAIL %s:%d: %s = %lld, expected %lld\n", __FILE__, __LINE__, #a, _a, _b); \
      ++failures;                                                                                               \
    }                                                                                                           \
  } while (0)

// torch/sparse/_semi_structured_conversions.py::_calculate_meta_reordering_scatter_offsets, per element.
static int64_t torch_offset(int64_t r, int64_t c, int64_t m, bool int32_meta) {
  const int64_t group = int32_meta ? 16 : 32, interweave = int32_meta ? 2 : 4;
  int64_t dr = r / group * group + (r % 8) * interweave + (r % group) / 8, dc = c;
  const int64_t topright = (dr % 2 == 0 && dc % 2 == 1), bottomleft = (dr % 2 == 1 && dc % 2 == 0);
  dr += topright - bottomleft;
  dc -= topright - bottomleft;
  return dc / 2 * m * 2 + dr * 2 + dc % 2;
}

static void test_meta_offset() {
  for (int wide = 0; wide < 2; ++wide)
    for (int64_t m : {16, 32, 64, 96, 128})
      for (int64_t ncols : {2, 4, 6}) {
        if (!wide && m % 32) continue;
        std::vector<int> hits(m * ncols, 0);
        for (int64_t r = 0; r < m; ++r)
          for (int64_t c = 0; c < ncols; ++c) {
            CHECK_EQ(meta_offset(r, c, m, wide), torch_offset(r, c, m, wide));
            ++hits[meta_offset(r, c, m, wide)];
          }
        for (int h : hits) CHECK_EQ(h, 1);  // a permutation
      }
}

static void test_ref_nibble() {
  // The table in the comment of sparse_semi_structured_from_dense_cutlass; nz bit i: entry i != 0.
  CHECK_EQ(ref_nibble(0b0000), 0xE);
  CHECK_EQ(ref_nibble(0b0001), 0x8);  // [T,F,F,F]
  CHECK_EQ(ref_nibble(0b0010), 0x9);  // [F,T,F,F]
  CHECK_EQ(ref_nibble(0b0100), 0xE);  // [F,F,T,F]
  CHECK_EQ(ref_nibble(0b1000), 0xE);  // [F,F,F,T]
  CHECK_EQ(ref_nibble(0b0011), 0x4);
  CHECK_EQ(ref_nibble(0b0101), 0x8);
  CHECK_EQ(ref_nibble(0b1001), 0xC);
  CHECK_EQ(ref_nibble(0b0110), 0x9);
  CHECK_EQ(ref_nibble(0b1010), 0xD);
  CHECK_EQ(ref_nibble(0b1100), 0xE);
  CHECK_EQ(ref_nibble(0b0111), 0x4);  // [T,T,T,F]
  CHECK_EQ(ref_nibble(0b1011), 0x4);  // [T,T,F,T]
  CHECK_EQ(ref_nibble(0b1101), 0xC);  // [T,F,T,T]
  CHECK_EQ(ref_nibble(0b1110), 0xD);  // [F,T,T,T]
  CHECK_EQ(ref_nibble(0b1111), 0x4);
}

static float half_to_float(uint16_t h) {
  const int exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  float mag = exp == 0    ? std::ldexp(static_cast<float>(man), -24)
              : exp == 31 ? (man ? NAN : INFINITY)
                          : std::ldexp(static_cast<float>(man | 0x400), exp - 25);
  return (h & 0x8000) ? -mag : mag;
}
static float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A random 16-bit pattern biased to zeros, signed zeros, ties, inf and NaN.
static uint16_t random_bits(uint16_t inf_bits) {
  switch (std::rand() % 8) {
    case 0: return 0;
    case 1: return 0x8000;
    case 2: return inf_bits;
    case 3: return static_cast<uint16_t>(inf_bits | 1 | (std::rand() & 0x8000));  // NaN
    case 4: return static_cast<uint16_t>(0x3c00 | (std::rand() & 0x8000));        // +-1-ish tie
    default: return static_cast<uint16_t>(std::rand() & 0xFFFF);
  }
}

template <class T, class ToFloat>
static void test_prune_selection(ToFloat to_float) {
  for (int trial = 0; trial < 20000; ++trial) {
    uint16_t x[4];
    float keys[4];
    for (int i = 0; i < 4; ++i) {
      x[i] = random_bits(T::kInfBits);
      keys[i] = nm_key(to_float(x[i]));
    }
    const uint32_t keep = nm_select_keys(keys, 2, 4);
    uint16_t pruned[4], out[2], ref[2];
    for (int i = 0; i < 4; ++i) pruned[i] = ((keep >> i) & 1) ? x[i] : 0;
    const uint32_t got = pack_group<T>(x, true, out);
    const uint32_t want = pack_group<T>(pruned, false, ref);  // packing nm_prune(x)
    CHECK_EQ(got, want);
    CHECK_EQ(out[0], ref[0]);
    CHECK_EQ(out[1], ref[1]);
  }
}

static void test_prune_int8() {
  for (int trial = 0; trial < 20000; ++trial) {
    int8_t x[4], pruned[4], out[2], ref[2];
    int32_t keys[4];
    for (int i = 0; i < 4; ++i) {
      x[i] = static_cast<int8_t>((std::rand() % 3 == 0) ? 0 : (std::rand() % 2 ? -128 : std::rand() % 256 - 128));
      keys[i] = std::abs(static_cast<int32_t>(x[i]));
    }
    const uint32_t keep = nm_select_keys(keys, 2, 4);
    for (int i = 0; i < 4; ++i) pruned[i] = ((keep >> i) & 1) ? x[i] : 0;
    CHECK_EQ(pack_group<Int8>(x, true, out), pack_group<Int8>(pruned, false, ref));
    CHECK_EQ(out[0], ref[0]);
    CHECK_EQ(out[1], ref[1]);
  }
}

static void test_known_words() {
  // Uniform rows: [0,0,1,1] -> 0xEEEE, [1,1,0,0] -> 0x4444, [1,0,0,1] -> 0xCCCC, [0,1,1,0] -> 0x9999.
  const int patterns[4][4] = {{0, 0, 1, 1}, {1, 1, 0, 0}, {1, 0, 0, 1}, {0, 1, 1, 0}};
  const int words[4] = {0xEEEE, 0x4444, 0xCCCC, 0x9999};
  for (int p = 0; p < 4; ++p) {
    uint16_t x[64], vals[32];
    int16_t w[4];
    for (int i = 0; i < 64; ++i) x[i] = patterns[p][i % 4] ? 0x3c00 : 0;
    CHECK_EQ(pack_row<Half>(x, 64, false, vals, w), -1);
    for (int c = 0; c < 4; ++c) CHECK_EQ(static_cast<uint16_t>(w[c]), words[p]);
  }
}

static void test_unpack_inverts_pack() {
  for (int trial = 0; trial < 5000; ++trial) {
    uint16_t x[4], v[2], back[4];
    for (int i = 0; i < 4; ++i) x[i] = random_bits(0x7f80);
    const uint32_t nibble = pack_group<BFloat16>(x, true, v) & 0xF;
    CHECK_EQ(valid_nibble(nibble), 1);
    unpack_group<BFloat16>(nibble, v[0], v[1], back);
    uint16_t again[2];
    CHECK_EQ(pack_group<BFloat16>(back, false, again), nibble);
    CHECK_EQ(again[0], v[0]);
    CHECK_EQ(again[1], v[1]);
  }
  for (uint32_t nibble = 0; nibble < 16; ++nibble) {
    const int count =
        (nibble == 0x4) + (nibble == 0x8) + (nibble == 0xC) + (nibble == 0x9) + (nibble == 0xD) + (nibble == 0xE);
    CHECK_EQ(valid_nibble(nibble), count);
  }
}

// A random row-major 2:4 matrix (0, 1 or 2 nonzeros per group; zeros are +0).
template <class T>
static std::vector<typename T::raw> random_24(int64_t rows, int64_t cols) {
  std::vector<typename T::raw> x(rows * cols, 0);
  for (int64_t g = 0; g < rows * cols / 4; ++g) {
    const int count = std::rand() % 3, first = std::rand() % 4, second = (first + 1 + std::rand() % 3) % 4;
    for (int i = 0; i < 4; ++i) {
      if ((count >= 1 && i == first) || (count == 2 && i == second)) {
        x[4 * g + i] = static_cast<typename T::raw>(1 + std::rand() % 100);  // nonzero bits / value
      }
    }
  }
  return x;
}

// The CUDA kernels' thread mapping run on the host: thread `chunk` owns 16 bytes of row
// chunk / chunks_per_row; even/odd neighbours of a row fill one meta word. Must give the same
// buffers as the CPU path (pack_row + meta_offset), and unpack back to the input.
template <class T>
static void test_cuda_thread_mapping(int64_t rows, int64_t cols) {
  using raw = typename T::raw;
  using word = typename Meta<T>::word;
  using uword = std::make_unsigned_t<word>;
  constexpr int kElems = Chunk<T>::kElems, kGroups = Chunk<T>::kGroups;
  const bool wide = sizeof(word) == 4;
  const std::vector<raw> x = random_24<T>(rows, cols);
  const int64_t meta_cols = cols / (4 * Meta<T>::kGroups), chunks_per_row = cols / kElems;
  std::vector<raw> v_cpu(rows * cols / 2), v_gpu(rows * cols / 2), back(rows * cols);
  std::vector<word> m_cpu(rows * meta_cols), m_gpu(rows * meta_cols), words(meta_cols);
  for (int64_t r = 0; r < rows; ++r) {
    CHECK_EQ(pack_row<T>(x.data() + r * cols, cols, false, v_cpu.data() + r * cols / 2, words.data()), -1);
    for (int64_t c = 0; c < meta_cols; ++c) m_cpu[meta_offset(r, c, rows, wide)] = words[c];
  }
  std::vector<uint32_t> nibbles(rows * chunks_per_row);
  for (int64_t chunk = 0; chunk < rows * chunks_per_row; ++chunk) {
    int bad;
    nibbles[chunk] = pack_chunk<T>(x.data() + chunk * kElems, false, v_gpu.data() + chunk * 2 * kGroups, &bad);
    CHECK_EQ(bad, -1);
  }
  for (int64_t chunk = 0; chunk < rows * chunks_per_row; ++chunk) {
    const int64_t row = chunk / chunks_per_row, col_chunk = chunk - row * chunks_per_row;
    if ((col_chunk & 1) == 0) {
      const uint32_t w = nibbles[chunk] | (nibbles[chunk ^ 1] << (4 * kGroups));  // __shfl_xor_sync(.., 1)
      m_gpu[meta_offset(row, col_chunk >> 1, rows, wide)] = static_cast<word>(w);
    }
  }
  for (size_t i = 0; i < v_cpu.size(); ++i) CHECK_EQ(v_gpu[i], v_cpu[i]);
  for (size_t i = 0; i < m_cpu.size(); ++i) CHECK_EQ(m_gpu[i], m_cpu[i]);
  for (int64_t chunk = 0; chunk < rows * chunks_per_row; ++chunk) {
    const int64_t row = chunk / chunks_per_row, col_chunk = chunk - row * chunks_per_row;
    const uint32_t w = static_cast<uword>(m_gpu[meta_offset(row, col_chunk >> 1, rows, wide)]);
    int bad;
    unpack_chunk<T>(w >> (4 * kGroups * (col_chunk & 1)), v_gpu.data() + chunk * 2 * kGroups,
                    back.data() + chunk * kElems, &bad);
    CHECK_EQ(bad, -1);
  }
  for (size_t i = 0; i < x.size(); ++i) CHECK_EQ(back[i], x[i]);
}

#ifdef STEP_KERNELS_HAVE_AVX2_PATH
template <class T>
static void test_avx2_rows16() {
  const int64_t k = 256;
  std::vector<uint16_t> x(k), v1(k / 2), v2(k / 2);
  std::vector<int16_t> w1(k / 16), w2(k / 16);
  for (int trial = 0; trial < 400; ++trial) {
    for (auto& e : x) e = random_bits(T::kInfBits);
    if (trial % 3 == 0)  // mostly 2:4 rows, so the no-error path is covered too
      for (int64_t g = 0; g < k / 4; ++g)
        x[4 * g + std::rand() % 4] = 0, x[4 * g + (std::rand() % 2 ? 1 : 3)] = 0, x[4 * g] = 0;
    for (int prune = 0; prune < 2; ++prune) {
      CHECK_EQ(pack_row_avx2<T>(x.data(), k, prune, v2.data(), w2.data()),
               pack_row<T>(x.data(), k, prune, v1.data(), w1.data()));
      if (!prune && first_overfull_group<T>(x.data(), k) >= 0) continue;  // outputs unspecified on error
      for (int64_t i = 0; i < k / 2; ++i) CHECK_EQ(v2[i], v1[i]);
      for (int64_t i = 0; i < k / 16; ++i) CHECK_EQ(w2[i], w1[i]);
    }
  }
}

static void test_avx2_rows_int8() {
  const int64_t k = 256;
  std::vector<int8_t> x(k), v1(k / 2), v2(k / 2);
  std::vector<int32_t> w1(k / 32), w2(k / 32);
  for (int trial = 0; trial < 400; ++trial) {
    for (auto& e : x)
      e = static_cast<int8_t>(std::rand() % 3 == 0 ? 0 : std::rand() % 5 == 0 ? -128 : std::rand() % 7 - 3);
    if (trial % 3 == 0)
      for (int64_t g = 0; g < k / 4; ++g) x[4 * g + 1] = 0, x[4 * g + (std::rand() % 2 ? 2 : 3)] = 0;
    for (int prune = 0; prune < 2; ++prune) {
      CHECK_EQ(pack_row_avx2_int8(x.data(), k, prune, v2.data(), w2.data()),
               pack_row<Int8>(x.data(), k, prune, v1.data(), w1.data()));
      if (!prune && first_overfull_group<Int8>(x.data(), k) >= 0) continue;
      for (int64_t i = 0; i < k / 2; ++i) CHECK_EQ(v2[i], v1[i]);
      for (int64_t i = 0; i < k / 32; ++i) CHECK_EQ(w2[i], w1[i]);
    }
  }
}
template <class T, class Unpack>
static void test_avx2_unpack(Unpack unpack_avx2) {
  using raw = typename T::raw;
  using word = typename Meta<T>::word;
  const int64_t k = 512, ncols = k / (4 * Meta<T>::kGroups);
  const std::vector<raw> x = random_24<T>(1, k);
  std::vector<raw> vals(k / 2), d1(k), d2(k);
  std::vector<word> words(ncols);
  CHECK_EQ(pack_row<T>(x.data(), k, false, vals.data(), words.data()), -1);
  CHECK_EQ(unpack_avx2(vals.data(), words.data(), k, d2.data()), -1);
  CHECK_EQ(unpack_row<T>(vals.data(), words.data(), k, d1.data()), -1);
  for (int64_t i = 0; i < k; ++i) CHECK_EQ(d2[i], x[i]);
  for (int64_t i = 0; i < k; ++i) CHECK_EQ(d1[i], x[i]);
  for (int trial = 0; trial < 50; ++trial) {  // one corrupt nibble: both report the same group
    std::vector<word> bad = words;
    const int64_t g = std::rand() % (k / 4);
    const uint32_t shift = 4 * (g % Meta<T>::kGroups);
    const uint32_t w = static_cast<std::make_unsigned_t<word>>(bad[g / Meta<T>::kGroups]);
    const uint32_t invalid[10] = {0x0, 0x1, 0x2, 0x3, 0x5, 0x6, 0x7, 0xA, 0xB, 0xF};
    bad[g / Meta<T>::kGroups] = static_cast<word>((w & ~(0xFu << shift)) | (invalid[trial % 10] << shift));
    CHECK_EQ(unpack_avx2(vals.data(), bad.data(), k, d2.data()), g);
    CHECK_EQ(unpack_row<T>(vals.data(), bad.data(), k, d1.data()), g);
  }
}
#endif

int main() {
  std::srand(2024);
  test_meta_offset();
  test_ref_nibble();
  test_prune_selection<Half>(half_to_float);
  test_prune_selection<BFloat16>(bf16_to_float);
  test_prune_int8();
  test_known_words();
  test_unpack_inverts_pack();
  test_cuda_thread_mapping<Half>(32, 64);
  test_cuda_thread_mapping<BFloat16>(96, 192);
  test_cuda_thread_mapping<Int8>(16, 128);
  test_cuda_thread_mapping<Int8>(48, 384);
#ifdef STEP_KERNELS_HAVE_AVX2_PATH
  if (cpu_has_avx2()) {
    test_avx2_rows16<Half>();
    test_avx2_rows16<BFloat16>();
    test_avx2_rows_int8();
    test_avx2_unpack<Half>(unpack_row_avx2_16);
    test_avx2_unpack<BFloat16>(unpack_row_avx2_16);
    test_avx2_unpack<Int8>(unpack_row_avx2_int8);
  } else {
    std::printf("test_pack24: no AVX2 on this CPU, SIMD rows not tested\n");
  }
#endif
  if (failures == 0) std::printf("test_pack24: all passed\n");
  return failures == 0 ? 0 : 1;
}
