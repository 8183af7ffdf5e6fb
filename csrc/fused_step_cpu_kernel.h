// The fused STEP step on CPU, tile by tile (private tier of fused_step_cpu.cpp).
//
// Fuses, per element, the SR-STE gradient, decoupled decay, Adam moments, the live-v or frozen-p
// update, both N:M selections (the mask the last forward used, and the new one), the flip count,
// the AutoSwitch sums and the masked write of the model parameter in its dtype (round to nearest
// even). Bytes per element: phase 2 fp32 model reads 16 and writes 12 (28 B, AdamW's bytes); bf16
// model with bf16 p reads 12 and writes 10 (22 B); phase 1 on an fp32 model 16 + 12 = 28 B.
// Block size: each chunk is cut into tiles of kTile = 256 elements (1 KB per fp32 stream). A tile
// is read from memory once and its passes (old selection, update, new selection + write) run out
// of L1; tiles this short keep every stream advancing together, so the hardware prefetchers keep
// up (2048-element tiles ran 1.5-2x slower), and longer than 128 to amortize the calls. At 1 thread
// phase 2 is bound by the selection's vector operations more than by its bytes. A one-pass loop
// per register of weights (old mask, update, new mask and model parameter in registers) measured
// faster on fresh tensors but 1.4x slower inside the STEP optimizer, so the tile keeps its passes.
//
// Selection of contiguous groups runs on vectors of one register (kLanes int32: 16 on AVX-512, 8
// on AVX2, 4 in the portable build). Chosen because GCC vectors wider than the ISA's registers
// are split by the compiler and their shuffles lowered to lane-crossing or scalar sequences. A
// group of M <= kLanes is ranked within its register: M / 2 rotations and compares, the other
// M / 2 - 1 relations by symmetry (rank_pair; N:8 on AVX2: 7 shuffles and 15 integer operations per
// 8 weights instead of 7 and 21). Phase 2 on AVX2, one 4M-weight tensor, thread CPU time, 3 runs on
// a loaded machine, x torch's fused AdamW at ATEN_CPU_CAPABILITY=avx2: 2:4 1.11-1.19x, 1:8
// 1.51-1.70x (the old and the new selection: 14 shuffles per 8 weights per step). So 1:M on AVX2
// (M = 8, 16, 32) does not rank: the winner is the first entry equal to the group's maximum key
// (max, movemask, the lowest bit, a one-hot load; keep_first_max8x2, keep_first_max_regs), and
// 1:8 takes two groups at a time regrouped by 128-bit lane, so 4 shuffles per 16 weights instead
// of 14 vpermd. The selection alone (old + new mask of 8M weights, tiles in L1, 3 runs on a loaded
// machine): 1:8 6.4-8.8 ms -> 3.3-3.9 ms (2:4: 2.9-3.5 ms), 1:16 10.9-19.3 -> 3.2-3.7 ms, 1:32
// 17-33 -> 3.0-3.2 ms. Phase 2 at 1 thread, 9.4M params, x fused AdamW at avx2 (median of 3
// runs, loaded machine): fp32 1:8 1.63x -> 1.24x (2:4 1.26x), bf16 1:8 1.81x -> 1.40x. 1:M on
// AVX-512 (M = 8, 16, 32) does the same with mask registers (keep_first_max512): max and in-register
// shuffles within blocks of M lanes (1:8: two groups per register, 3 shuffles per 16 weights; 1:16
// one group per register, 1:32 two registers), vpcmpeqd into a 16-bit mask, x & -x per group, and
// the kept register is a masked set (no table). Phase 2 at 1 thread, 9.4M params, x fused AdamW at
// avx512 (median of 3 runs, 2 cores with another process on one): fp32 1:8 1.67x -> 1.26x
// (10.1 -> 7.6 ms; 2:4 1.24-1.35x), bf16 1:8 1.86x -> 1.36x (11.3 -> 8.2 ms). N:4 on AVX-512
// counts the rank on bit masks (keep_groups). M > kLanes (16 and 32 on AVX2 for N > 1, 8-32 in the
// portable build) ranks across the M / kLanes registers of a group: every rotation of every
// register against every register (M - 1 compares per weight). Strided groups (Conv1D) rank across
// rows with lanes over columns. What made AVX2 phase 2 13x slower than fused AdamW before was not
// the arithmetic: memcpy of 32 bytes (two 16-byte moves under GCC's generic tuning, then a stalled
// 32-byte reload; load_vint), and the SR-STE decay under a condition (not if-converted without
// AVX-512 masks, so the update did not vectorize; srste_grad in fused_step.h).
//
// The portable build (x86-64 baseline = SSE2, aarch64 = NEON, any GCC or clang target) is the same
// code: GCC vector extensions with constant-index __builtin_shufflevector, which GCC >= 12 and
// clang both accept, and no intrinsics (those stay under STEP_CPU_AVX512 and STEP_CPU_AVX2). Not
// at::vec::Vectorized: the selection needs in-register shuffles by constant indices, which it
// does not offer, and the element-wise update already vectorizes from plain loops. Its phase 1
// was 6.5x slower than fused AdamW at ATEN_CPU_CAPABILITY=default because x86-64 without FMA
// calls the library's fmaf per element; it uses FmaSoft (fused_step.h), exact fmaf in double
// arithmetic that vectorizes with SSE2 (phase 2 2:4 0.49-0.50x torch's fused AdamW at
// ATEN_CPU_CAPABILITY=default, same runs).
//
// Masks inside the kernel (a tile's keep_old and keep_new) are int32 -1 for kept and 0 for pruned,
// what a vector compare yields: no "& 1" after a rank compare, and the masked write of the model
// parameter is one AND (fp32) or an AND before the narrowing (bf16). The bf16 write on AVX2 packs
// two registers at once (store_out_bf16x2). With the old 0 / 1 masks and one register per pack,
// phase 2 at 1 thread, 9.4M params, AVX2, interleaved runs of both builds (3 each): bf16 1:8
// 8.30 -> 7.55 ms, bf16 2:4 8.01 -> 7.38 ms, fp32 1:8 7.41 -> 7.17 ms; AVX-512 bf16 1:8 7.77 ->
// 7.47 ms.
//
// This file has no include guard on purpose: fused_step_cpu_isas.h includes it once per
// instruction set, inside a namespace and a target region (GCC's pragma or clang's attribute), so
// the compiler vectorizes it for AVX-512, AVX2 and the baseline, and the launcher picks one at run
// time. It includes nothing (the includer provides <algorithm>, <cstdint>, <cstring>, <type_traits>, <utility>,
// fused_step.h and fused_step_cpu_plan.h), so no library code is compiled for a wider ISA than the
// CPU's. Vector shuffles use __builtin_shufflevector (constant indices; GCC >= 12 and clang), not
// GCC's __builtin_shuffle, which clang lacks (older GCC keeps it: rotate).

using step_kernels::StepScalarsF;

// Lanes of the selection's vectors: one register of the instruction set (AVX-512: 16, AVX2: 8,
// the portable build: 4, the 128 bits of SSE2 and NEON). GCC vectors wider than the registers
// are split by the compiler, and their shuffles become lane-crossing or scalar sequences.
#if defined(STEP_CPU_AVX512)
constexpr int kLanes = 16;
#elif defined(STEP_CPU_AVX2)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

typedef int32_t vint __attribute__((vector_size(4 * kLanes)));
typedef uint32_t vuint __attribute__((vector_size(4 * kLanes)));
typedef uint16_t vhalf __attribute__((vector_size(2 * kLanes)));
using LaneSeq = std::make_integer_sequence<int, kLanes>;

// One unaligned load or store of a whole register. Not memcpy: GCC's generic tuning copies 32 bytes
// as two 16-byte moves, and a 32-byte load of what two 16-byte stores just wrote stalls on store
// forwarding (measured: AVX2 N:M selection 3x slower).
typedef int32_t vint_mem __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));
typedef uint16_t vhalf_mem __attribute__((vector_size(2 * kLanes), aligned(2), may_alias));
STEP_HOST_DEVICE vint load_vint(const void* p) { return *static_cast<const vint_mem*>(p); }
STEP_HOST_DEVICE void store_vint(void* p, const vint& x) { *static_cast<vint_mem*>(p) = x; }

// Lane i gets lane (i + S) mod G of its aligned block of G lanes (constant indices: one in-register
// shuffle where the blocks fit in 128 bits).
template <int G, int S, int... I>
STEP_HOST_DEVICE vint rotate(const vint& x, std::integer_sequence<int, I...>) {
#if defined(__clang__) || __GNUC__ >= 12
  return __builtin_shufflevector(x, x, ((I & ~(G - 1)) | ((I + S) & (G - 1)))...);
#else  // GCC before 12 has only its own shuffle
  return __builtin_shuffle(x, vint{((I & ~(G - 1)) | ((I + S) & (G - 1)))...});
#endif
}

// -1 in lane i where lane (i + S) mod G of its block has the lower index, else 0.
template <int G, int S, int... I>
STEP_HOST_DEVICE vint wraps(std::integer_sequence<int, I...>) {
  return vint{((I & (G - 1)) >= G - S ? -1 : 0)...};
}

// Selection keys of the weights' fp32 bits: |w| as an integer, NaN counted as +inf.
STEP_HOST_DEVICE vint key_of(const vint& bits) {
  const vint magnitude = bits & 0x7fffffff;
  return magnitude > 0x7f800000 ? 0x7f800000 : magnitude;
}

// Group layout on vectors: a group of M consecutive weights spans kRegs registers (M > kLanes,
// the cross-register case) or a block of kBlock lanes of one register.
template <int M>
struct Groups {
  static constexpr int kBlock = M < kLanes ? M : kLanes;
  static constexpr int kRegs = M < kLanes ? 1 : M / kLanes;
};

// rank[A] += [lane of `other` beats lane of key[A]] for every register A of the group, where
// `other` is register B rotated by S within blocks. The tie goes to the lower index: every lane of
// B comes before A's when B < A, after when B > A, and within one register the rotation decides.
// Keys are >= 0, so "other >= key" is "other > key - 1": one compare.
template <int M, int B, int S, int... A>
STEP_HOST_DEVICE void rank_add(const vint* key, vint* rank, const vint& other, std::integer_sequence<int, A...>) {
  constexpr int G = Groups<M>::kBlock;
  const vint minus_one = vint{} - 1;
  ((A == B && S == 0 ? void()
                     : void(rank[A] -= other > key[A] + (A > B   ? minus_one
                                                         : A < B ? vint{}
                                                                 : wraps<G, S>(LaneSeq{})))),
   ...);
}

template <int M, int B, int... S>
STEP_HOST_DEVICE void rank_from(const vint* key, vint* rank, std::integer_sequence<int, S...>) {
  using Regs = std::make_integer_sequence<int, Groups<M>::kRegs>;
  (rank_add<M, B, S>(key, rank, rotate<Groups<M>::kBlock, S>(key[B], LaneSeq{}), Regs{}), ...);
}

template <int M, int... B>
STEP_HOST_DEVICE void rank_all(const vint* key, vint* rank, std::integer_sequence<int, B...>) {
  (rank_from<M, B>(key, rank, std::make_integer_sequence<int, Groups<M>::kBlock>()), ...);
}

// -1 in lane i where entry (i + S) mod M of its group beats entry i (groups in blocks of M lanes).
template <int M, int S>
STEP_HOST_DEVICE vint beats(const vint& key) {
  return rotate<M, S>(key, LaneSeq{}) > key + wraps<M, S>(LaneSeq{});
}

// Of two entries exactly one beats the other, so "entry i - S beats i" is "entry i beats i - S"
// negated: beats<M, M - S> = ~rotate<M, M - S>(beats<M, S>). Returns, for S < M / 2, both terms
// of the rank: -beats<S> + (1 + rotate(beats<S>)) less the 1, which rank_in_register adds back.
template <int M, int S>
STEP_HOST_DEVICE vint rank_pair(const vint& key) {
  const vint c = beats<M, S>(key);
  return rotate<M, M - S>(c, LaneSeq{}) - c;
}

// rank - (M / 2 - 1) of each entry of groups within a register (M <= kLanes): the compares of the
// rotations 1 .. M / 2 only, the others by rank_pair's symmetry (M = 8: 4 compares instead of 7).
template <int M, int... S>
STEP_HOST_DEVICE vint rank_in_register(const vint& key, std::integer_sequence<int, S...>) {
  vint r = -beats<M, M / 2>(key);
  ((r += rank_pair<M, S + 1>(key)), ...);
  return r;
}

// kept[r] = -1 where an entry of the kRegs registers `bits` (fp32 bits of whole groups of M) is
// among the n winners of its group: rank = how many entries of the group beat it, over every
// rotation of every register of the group (M - 1 rotations and compares per entry).
template <int M>
STEP_HOST_DEVICE void keep_groups(const vint* bits, vint* kept, int n) {
  constexpr int R = Groups<M>::kRegs;
  vint key[R], rank[R];
  for (int r = 0; r < R; ++r) {
    key[r] = key_of(bits[r]);
    rank[r] = vint{};
  }
#if defined(STEP_CPU_AVX512)
  if constexpr (M == 4) {
    // Two rotations and compares give the masks "entry i+1 beats i" (b1) and "entry i+2 beats i"
    // (b2). Of two entries exactly one beats the other, so "entry i-1 beats i" is b1 rotated and
    // complemented; the rank (0..3) is the bit count of the three masks, done in scalar registers,
    // which leaves the vector units about 8 operations per 16 weights instead of 18.
    const vint other1 = rotate<4, 1>(key[0], LaneSeq{});
    const vint other2 = rotate<4, 2>(key[0], LaneSeq{});
    const vint lower1 = wraps<4, 1>(LaneSeq{}), lower2 = wraps<4, 2>(LaneSeq{});  // see rank_add
    const uint32_t b1 = _mm512_cmpgt_epi32_mask((__m512i)other1, (__m512i)(key[0] + lower1));
    const uint32_t b2 = _mm512_cmpgt_epi32_mask((__m512i)other2, (__m512i)(key[0] + lower2));
    const uint32_t b3 = ~(((b1 << 1) & 0xeeeeu) | ((b1 >> 3) & 0x1111u));
    const uint32_t beaten = n == 1 ? (b1 | b2 | b3) : n == 2 ? ((b1 & b2) | (b3 & (b1 | b2))) : (b1 & b2 & b3);
    kept[0] = (vint)_mm512_maskz_set1_epi32(static_cast<__mmask16>(~beaten), -1);
    return;
  }
#endif
  if constexpr (R == 1) {
    const vint r = rank_in_register<M>(key[0], std::make_integer_sequence<int, M / 2 - 1>());
    kept[0] = r < n - (M / 2 - 1);
    return;
  }
  rank_all<M>(key, rank, std::make_integer_sequence<int, R>());
  for (int r = 0; r < R; ++r) kept[r] = rank[r] < n;
}

#if defined(STEP_CPU_AVX2)
// 1:8 on AVX2, two groups (two registers a, b) at a time: the winner is the first entry equal to
// the group's maximum key. lo = [a.lo, b.lo] and hi = [a.hi, b.hi] (two lane-crossing shuffles)
// put each group in one 128-bit lane of both, so max(lo, hi) and two in-lane rotations (vpshufd)
// give each group's maximum; the entries equal to it come out as bits (movemask), the lowest bit
// of each group is the winner (ties to the lower index), and its one-hot register is a load.
// 4 shuffles per 16 weights instead of 14 (rank_in_register: 7 vpermd per group).
alignas(64) constexpr int32_t kOneHot8[15] = {0, 0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0};

STEP_HOST_DEVICE void keep_first_max8x2(const vint* bits, vint* kept) {
  const __m256i a = (__m256i)key_of(bits[0]), b = (__m256i)key_of(bits[1]);
  const __m256i lo = _mm256_permute2x128_si256(a, b, 0x20);
  const __m256i hi = _mm256_permute2x128_si256(a, b, 0x31);
  __m256i top = _mm256_max_epi32(lo, hi);
  top = _mm256_max_epi32(top, _mm256_shuffle_epi32(top, 0x4e));
  top = _mm256_max_epi32(top, _mm256_shuffle_epi32(top, 0xb1));
  const uint32_t eq_lo = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(lo, top))));
  const uint32_t eq_hi = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(hi, top))));
  const uint32_t group_a = (eq_lo & 0xfu) | ((eq_hi & 0xfu) << 4), group_b = (eq_lo >> 4) | (eq_hi & 0xf0u);
  kept[0] = load_vint(kOneHot8 + 7 - __builtin_ctz(group_a));
  kept[1] = load_vint(kOneHot8 + 7 - __builtin_ctz(group_b));
}

// 1:16 and 1:32 on AVX2 (R = 2 or 4 registers per group): the same first maximum, the max of the
// R registers reduced in-register (one lane-crossing shuffle, two vpshufd), instead of ranking
// every rotation of every register (M - 1 compares per weight).
alignas(64) constexpr int32_t kOneHot32[63] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                               0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                               0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0, 0, 0};

template <int R>
STEP_HOST_DEVICE void keep_first_max_regs(const vint* bits, vint* kept) {
  __m256i key[R];
  for (int r = 0; r < R; ++r) key[r] = (__m256i)key_of(bits[r]);
  __m256i top = key[0];
  for (int r = 1; r < R; ++r) top = _mm256_max_epi32(top, key[r]);
  top = _mm256_max_epi32(top, _mm256_permute2x128_si256(top, top, 0x01));
  top = _mm256_max_epi32(top, _mm256_shuffle_epi32(top, 0x4e));
  top = _mm256_max_epi32(top, _mm256_shuffle_epi32(top, 0xb1));
  uint32_t eq = 0;
  for (int r = 0; r < R; ++r)
    eq |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(key[r], top)))) << (8 * r);
  const int first = __builtin_ctz(eq);
  for (int r = 0; r < R; ++r) kept[r] = load_vint(kOneHot32 + 31 - first + 8 * r);
}
#endif

#if defined(STEP_CPU_AVX512)
// 1:M on AVX-512 (M = 8, 16, 32; R = 1, 1, 2 registers per group): the winner is the first entry
// equal to the group's maximum key. The maximum within blocks of M lanes is max with in-register
// shuffles (1:8: one 128-bit lane swap and two vpshufd per register of two groups; 1:16 and 1:32:
// two 128-bit lane shuffles and two vpshufd), the entries equal to it come out as a bit mask
// (vpcmpeqd into a mask register), x & -x per group keeps the lowest bit (ties to the lower index),
// and the kept register is a masked set (no table), as N:4's rank on masks.
template <int M>
STEP_HOST_DEVICE void keep_first_max512(const vint* bits, vint* kept) {
  constexpr int R = Groups<M>::kRegs;
  __m512i key[R];
  for (int r = 0; r < R; ++r) key[r] = (__m512i)key_of(bits[r]);
  __m512i top = key[0];
  for (int r = 1; r < R; ++r) top = _mm512_max_epi32(top, key[r]);
  if constexpr (M >= 16) top = _mm512_max_epi32(top, _mm512_shuffle_i32x4(top, top, 0x4e));
  top = _mm512_max_epi32(top, _mm512_shuffle_i32x4(top, top, 0xb1));
  top = _mm512_max_epi32(top, _mm512_shuffle_epi32(top, (_MM_PERM_ENUM)0x4e));
  top = _mm512_max_epi32(top, _mm512_shuffle_epi32(top, (_MM_PERM_ENUM)0xb1));
  if constexpr (M == 8) {
    const uint32_t eq = _mm512_cmpeq_epi32_mask(key[0], top);
    const uint32_t lo = eq & 0xffu, hi = eq & 0xff00u;
    kept[0] = (vint)_mm512_maskz_set1_epi32(static_cast<__mmask16>((lo & (0u - lo)) | (hi & (0u - hi))), -1);
  } else {
    uint32_t eq = 0;
    for (int r = 0; r < R; ++r) eq |= static_cast<uint32_t>(_mm512_cmpeq_epi32_mask(key[r], top)) << (16 * r);
    const uint32_t first = eq & (0u - eq);
    for (int r = 0; r < R; ++r) kept[r] = (vint)_mm512_maskz_set1_epi32(static_cast<__mmask16>(first >> (16 * r)), -1);
  }
}
#endif

// Where the selection pass also writes the model parameter (contiguous groups only).
enum OutKind { kNoOut = 0, kOutF32 = 1, kOutBF16 = 2 };

// Writes the model parameter of one register: kept ? w : +0.0 (bf16: round to nearest even, NaN -> 0x7fc0).
template <int OUT>
STEP_HOST_DEVICE void store_out(const vint& bits, const vint& kept, void* __restrict out) {
  if constexpr (OUT == kOutF32) {
    store_vint(out, bits & kept);  // pruned: +0.0
  } else if constexpr (OUT == kOutBF16) {
    const vuint u = reinterpret_cast<const vuint&>(bits);
    const vuint r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const vint nan = (bits & 0x7fffffff) > 0x7f800000;  // signed compare: one instruction
    *static_cast<vhalf_mem*>(out) = __builtin_convertvector((vuint)(nan ? 0x7fc0 : (vint)r) & (vuint)kept, vhalf);
  }
}

#if defined(STEP_CPU_AVX2)
// store_out's bf16 for two registers (16 weights) at once. AVX2 has no 32 -> 16-bit narrowing
// (AVX-512's vpmovdw): GCC lowers one register's to a mask, a pack and a lane permute; two share
// one vpackusdw and one vpermq, and the rounded values (<= 0xffff) need no mask for the
// saturating pack.
STEP_HOST_DEVICE __m256i bf16_kept(const vint& bits, const vint& kept) {
  const vuint u = (vuint)bits;
  const vint rounded = (vint)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  const vint nan = (bits & 0x7fffffff) > 0x7f800000;
  return (__m256i)((nan ? 0x7fc0 : rounded) & kept);
}

STEP_HOST_DEVICE void store_out_bf16x2(const vint* bits, const vint* kept, uint16_t* __restrict out) {
  const __m256i packed = _mm256_packus_epi32(bf16_kept(bits[0], kept[0]), bf16_kept(bits[1], kept[1]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(packed, 0xd8));
}
#endif

// keep[e] = -1 when w[e] is among the n winners of its group (M consecutive weights), keys made
// in registers. With `before`, returns how many entries differ from it (the flips). With OUT,
// also writes the model parameter keep ? w : +0.0 (bf16: round to nearest even, NaN -> 0x7fc0).
template <int M, int OUT>
inline int64_t select_contiguous_m(const float* __restrict w, int32_t* __restrict keep, int64_t len, int n,
                                   const int32_t* __restrict before, void* __restrict out) {
  constexpr int R = Groups<M>::kRegs;
  int64_t e = 0;
  vint flips = {};
  auto emit = [&](const vint* bits, const vint* kept, int regs) {
    for (int r = 0; r < regs; ++r) {
      store_vint(keep + e + r * kLanes, kept[r]);
      if (before) flips -= kept[r] != load_vint(before + e + r * kLanes);
    }
    int r = 0;
#if defined(STEP_CPU_AVX2)
    if constexpr (OUT == kOutBF16) {
      for (; r + 2 <= regs; r += 2) store_out_bf16x2(bits + r, kept + r, static_cast<uint16_t*>(out) + e + r * kLanes);
    }
#endif
    for (; r < regs; ++r) {
      if constexpr (OUT == kOutF32) store_out<OUT>(bits[r], kept[r], static_cast<float*>(out) + e + r * kLanes);
      if constexpr (OUT == kOutBF16) store_out<OUT>(bits[r], kept[r], static_cast<uint16_t*>(out) + e + r * kLanes);
    }
  };
  // Whole blocks of REGS registers (whole groups) from e on: load, `select` the kept entries, emit.
  auto sweep = [&](auto regs, auto select) {
    constexpr int REGS = decltype(regs)::value;
    for (; e + REGS * kLanes <= len; e += REGS * kLanes) {
      vint bits[REGS], kept[REGS];
      for (int r = 0; r < REGS; ++r) bits[r] = load_vint(w + e + r * kLanes);
      select(bits, kept);
      emit(bits, kept, REGS);
    }
  };
  using Regs = std::integral_constant<int, R>;
#if defined(STEP_CPU_AVX512)
  if constexpr (M >= 8) {
    if (n == 1) sweep(Regs{}, [](const vint* bits, vint* kept) { keep_first_max512<M>(bits, kept); });
  }
#endif
#if defined(STEP_CPU_AVX2)
  if constexpr (M == 8) {
    if (n == 1) sweep(std::integral_constant<int, 2>{}, keep_first_max8x2);
  } else if constexpr (M > 8) {
    if (n == 1) sweep(Regs{}, [](const vint* bits, vint* kept) { keep_first_max_regs<R>(bits, kept); });
  }
  if constexpr (OUT == kOutBF16 && R == 1) {  // two registers per block, for store_out_bf16x2
    sweep(std::integral_constant<int, 2>{}, [n](const vint* bits, vint* kept) {
      keep_groups<M>(bits, kept, n);
      keep_groups<M>(bits + 1, kept + 1, n);
    });
  }
#endif
  sweep(Regs{}, [n](const vint* bits, vint* kept) { keep_groups<M>(bits, kept, n); });
  int64_t count = 0;
  for (int i = 0; i < kLanes; ++i) count += flips[i];
  for (; e < len; e += M) {
    int32_t key[M];
    for (int i = 0; i < M; ++i) key[i] = step_kernels::nm_key_bits(w[e + i]);
    const uint32_t kept = step_kernels::nm_select_keys(key, n, M);
    for (int i = 0; i < M; ++i) {
      keep[e + i] = -static_cast<int32_t>((kept >> i) & 1u);
      if (before) count += keep[e + i] != before[e + i] ? 1 : 0;
      const float value = keep[e + i] ? w[e + i] : 0.0f;
      if constexpr (OUT == kOutF32) static_cast<float*>(out)[e + i] = value;
      if constexpr (OUT == kOutBF16) static_cast<uint16_t*>(out)[e + i] = step_kernels::bf16_from_f32(value);
    }
  }
  return count;
}

template <int OUT>
inline int64_t select_contiguous_out(const float* w, int32_t* keep, int64_t len, int n, int m, const int32_t* before,
                                     void* out) {
  switch (m) {
    case 2: return select_contiguous_m<2, OUT>(w, keep, len, n, before, out);
    case 4: return select_contiguous_m<4, OUT>(w, keep, len, n, before, out);
    case 8: return select_contiguous_m<8, OUT>(w, keep, len, n, before, out);
    case 16: return select_contiguous_m<16, OUT>(w, keep, len, n, before, out);
    default: return select_contiguous_m<32, OUT>(w, keep, len, n, before, out);
  }
}

inline int64_t select_contiguous(const float* w, int32_t* keep, int64_t len, int n, int m, const int32_t* before,
                                 void* out, OutKind kind) {
  if (kind == kOutF32) return select_contiguous_out<kOutF32>(w, keep, len, n, m, before, out);
  if (kind == kOutBF16) return select_contiguous_out<kOutBF16>(w, keep, len, n, m, before, out);
  return select_contiguous_out<kNoOut>(w, keep, len, n, m, before, nullptr);
}

// Groups run across m rows of `cols` keys (key[i * cols + c] is entry i of group c): the strided
// orientation (Conv1D). Lanes run over columns.
inline void select_rows(const int32_t* __restrict key, int32_t* __restrict keep, int64_t cols, int n, int m) {
  for (int i = 0; i < m; ++i) {
    int32_t* __restrict rank = keep + i * cols;
    const int32_t* __restrict ki = key + i * cols;
    for (int64_t c = 0; c < cols; ++c) rank[c] = 0;
    for (int j = 0; j < i; ++j) {
      const int32_t* __restrict kj = key + j * cols;
      for (int64_t c = 0; c < cols; ++c) rank[c] += kj[c] >= ki[c] ? 1 : 0;
    }
    for (int j = i + 1; j < m; ++j) {
      const int32_t* __restrict kj = key + j * cols;
      for (int64_t c = 0; c < cols; ++c) rank[c] += kj[c] > ki[c] ? 1 : 0;
    }
    for (int64_t c = 0; c < cols; ++c) rank[c] = rank[c] < n ? -1 : 0;
  }
}

inline int64_t count_flips(const int32_t* __restrict a, const int32_t* __restrict b, int64_t len) {
  int32_t flips = 0;  // len <= kTile
  for (int64_t e = 0; e < len; ++e) flips += a[e] != b[e] ? 1 : 0;
  return flips;
}

// The N:M mask of one tile (its segments laid out one after another); with `before`, returns the
// number of entries whose mask differs from it. Contiguous tiles may write the model parameter in
// the same pass (`out`, of kind `kind`, at the tile's first element).
inline int64_t tile_mask(const Plan& plan, const TensorPlan& t, const Chunk& c, int32_t* key, int32_t* keep,
                         const int32_t* before, void* out = nullptr, OutKind kind = kNoOut) {
  if (c.nseg == 1) return select_contiguous(t.w + c.base, keep, c.seg_len, plan.n, plan.m, before, out, kind);
  for (int s = 0; s < c.nseg; ++s) {
    const float* __restrict w = t.w + c.base + s * c.seg_stride;
    int32_t* __restrict k = key + s * c.seg_len;
    for (int64_t e = 0; e < c.seg_len; ++e) k[e] = step_kernels::nm_key_bits(w[e]);
  }
  select_rows(key, keep, c.seg_len, plan.n, plan.m);
  return before ? count_flips(before, keep, static_cast<int64_t>(c.seg_len) * c.nseg) : 0;
}

// Element types of the streams: fp32 as is, bf16 and fp16 as their bits.
struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};
inline float load_f32(float x) { return x; }
inline float load_f32(BF16 x) { return step_kernels::f32_from_bf16(x.bits); }
inline float load_f32(F16 x) { return step_kernels::f32_from_f16(x.bits); }

// The fused multiply-add of the update: the AVX-512 and AVX2 variants (x86-64-v3 and up) and any
// target the compiler knows to have one (aarch64, -mfma) use the instruction; the x86-64 baseline
// has none, and emulates it exactly in vectorizable double arithmetic (fused_step.h, FmaSoft).
#if defined(STEP_CPU_AVX512) || defined(STEP_CPU_AVX2) || defined(__FP_FAST_FMAF) || !defined(__x86_64__)
using Fma = step_kernels::FmaHw;
#else
using Fma = step_kernels::FmaSoft;
#endif

// The update of one segment, in place; grads and a frozen p are widened as they are read.
// Returns the AutoSwitch sums in `stats` when STATS.
template <class G, class S, bool MASKED, bool FROZEN, bool SCALE, bool STATS>
inline void update_segment(float* __restrict w, const G* __restrict g, float* __restrict m, S* __restrict second,
                           const int32_t* __restrict keep_old, int64_t len, const StepScalarsF& s, float scale,
                           ChunkStats& stats) {
  double abs_dv = 0.0, v_sum = 0.0;
#pragma omp simd reduction(+ : abs_dv, v_sum)
  for (int64_t e = 0; e < len; ++e) {
    float we = w[e], me = m[e], se = load_f32(second[e]);
    const float ge = SCALE ? load_f32(g[e]) / scale : load_f32(g[e]);
    const float dv = step_kernels::step_element<MASKED, FROZEN, Fma>(we, ge, me, se, MASKED && keep_old[e] != 0, s);
    w[e] = we;
    m[e] = me;
    if constexpr (!FROZEN) second[e] = se;
    if (STATS) {
      abs_dv += static_cast<double>(dv);
      v_sum += static_cast<double>(se);
    }
  }
  if (STATS) {
    stats.abs_dv += abs_dv;
    stats.v_sum += v_sum;
  }
}

template <class G, class S, bool MASKED, bool FROZEN, bool SCALE, bool STATS>
inline void update_tile(const Plan& plan, const TensorPlan& t, const Chunk& c, const int32_t* keep_old,
                        ChunkStats& stats) {
  for (int i = 0; i < c.nseg; ++i) {
    const int64_t off = c.base + i * c.seg_stride;
    update_segment<G, S, MASKED, FROZEN, SCALE, STATS>(t.w + off, static_cast<const G*>(t.g) + off, t.m + off,
                                                       static_cast<S*>(t.second) + off, keep_old + i * c.seg_len,
                                                       c.seg_len, plan.scalars, plan.scale, stats);
  }
}

// Picks the instantiation: grad dtype x preconditioner dtype (frozen only) x scale x stats
// (unmasked only).
template <class G, bool MASKED, bool FROZEN, bool SCALE>
inline void update_tile_s(const Plan& plan, const TensorPlan& t, const Chunk& c, const int32_t* keep_old,
                          ChunkStats& stats) {
  if constexpr (FROZEN) {
    if (t.second_type == DType::BF16)
      return update_tile<G, const BF16, MASKED, FROZEN, SCALE, false>(plan, t, c, keep_old, stats);
    return update_tile<G, const float, MASKED, FROZEN, SCALE, false>(plan, t, c, keep_old, stats);
  } else if constexpr (MASKED) {
    return update_tile<G, float, MASKED, FROZEN, SCALE, false>(plan, t, c, keep_old, stats);
  } else {
    if (plan.compute_stats) return update_tile<G, float, MASKED, FROZEN, SCALE, true>(plan, t, c, keep_old, stats);
    return update_tile<G, float, MASKED, FROZEN, SCALE, false>(plan, t, c, keep_old, stats);
  }
}

template <bool MASKED, bool FROZEN>
inline void update_tile_dispatch(const Plan& plan, const TensorPlan& t, const Chunk& c, const int32_t* keep_old,
                                 ChunkStats& stats) {
  if (plan.has_scale) {
    if (t.g_type == DType::BF16) return update_tile_s<BF16, MASKED, FROZEN, true>(plan, t, c, keep_old, stats);
    if (t.g_type == DType::F16) return update_tile_s<F16, MASKED, FROZEN, true>(plan, t, c, keep_old, stats);
    return update_tile_s<float, MASKED, FROZEN, true>(plan, t, c, keep_old, stats);
  }
  if (t.g_type == DType::BF16) return update_tile_s<BF16, MASKED, FROZEN, false>(plan, t, c, keep_old, stats);
  if (t.g_type == DType::F16) return update_tile_s<F16, MASKED, FROZEN, false>(plan, t, c, keep_old, stats);
  update_tile_s<float, MASKED, FROZEN, false>(plan, t, c, keep_old, stats);
}

// model_param = keep ? w : +0.0 (or w when keep is null), rounded to the model dtype.
inline void write_segment(void* out, DType type, const float* __restrict w, const int32_t* __restrict keep,
                          int64_t len) {
  if (type == DType::F32) {
    float* __restrict o = static_cast<float*>(out);
    if (keep) {
      for (int64_t e = 0; e < len; ++e) o[e] = keep[e] ? w[e] : 0.0f;
    } else {
      for (int64_t e = 0; e < len; ++e) o[e] = w[e];
    }
    return;
  }
  uint16_t* __restrict o = static_cast<uint16_t*>(out);
  if (type == DType::BF16) {
    for (int64_t e = 0; e < len; ++e) o[e] = step_kernels::bf16_from_f32(keep && !keep[e] ? 0.0f : w[e]);
  } else {
    for (int64_t e = 0; e < len; ++e) o[e] = step_kernels::f16_from_f32(keep && !keep[e] ? 0.0f : w[e]);
  }
}

// One tile: at most kTile elements of whole groups (a sub-range of a chunk's segments). Its
// passes run out of L1 while every stream of the tile is read from memory once.
inline void step_tile(const Plan& plan, const TensorPlan& t, const Chunk& c, ChunkStats& st, int32_t* key,
                      int32_t* keep_old, int32_t* keep_new) {
  if (plan.masked) {
    tile_mask(plan, t, c, key, keep_old, nullptr);
    if (plan.frozen_v) {
      update_tile_dispatch<true, true>(plan, t, c, keep_old, st);
    } else {
      update_tile_dispatch<true, false>(plan, t, c, keep_old, st);
    }
    if (c.nseg == 1 && t.out != nullptr && t.out_type != DType::F16) {  // write while selecting
      const bool f32 = t.out_type == DType::F32;
      void* out = static_cast<char*>(t.out) + c.base * (f32 ? 4 : 2);
      st.flips += tile_mask(plan, t, c, key, keep_new, keep_old, out, f32 ? kOutF32 : kOutBF16);
      return;
    }
    st.flips += tile_mask(plan, t, c, key, keep_new, keep_old);
  } else {
    update_tile_dispatch<false, false>(plan, t, c, keep_old, st);
  }
  if (t.out == nullptr) return;
  const int64_t elem = t.out_type == DType::F32 ? 4 : 2;
  for (int s = 0; s < c.nseg; ++s) {
    const int64_t off = c.base + s * c.seg_stride;
    write_segment(static_cast<char*>(t.out) + off * elem, t.out_type, t.w + off,
                  plan.masked ? keep_new + s * c.seg_len : nullptr, c.seg_len);
  }
}

// Steps chunks [begin, end) of the plan, tile by tile; stats[i] receives chunk i's partial sums.
inline void run_chunks(const Plan& plan, int64_t begin, int64_t end, ChunkStats* stats) {
  alignas(64) int32_t key[kTile];
  alignas(64) int32_t keep_old[kTile];
  alignas(64) int32_t keep_new[kTile];
  for (int64_t i = begin; i < end; ++i) {
    const Chunk& c = plan.chunks[i];
    const TensorPlan& t = plan.tensors[c.tensor];
    const int32_t cols = c.nseg == 1 ? static_cast<int32_t>(kTile) : std::max<int32_t>(1, kTile / c.nseg);
    for (int32_t p0 = 0; p0 < c.seg_len; p0 += cols) {
      Chunk tile = c;
      tile.base += p0;
      tile.seg_len = std::min(cols, c.seg_len - p0);
      step_tile(plan, t, tile, stats[i], key, keep_old, keep_new);
    }
  }
}
