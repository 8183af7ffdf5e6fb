// The fused STEP step on CPU, per chunk (private tier of fused_step_cpu.cpp).
//
// Fuses, per element, the SR-STE gradient, decoupled decay, Adam moments, the live-v or frozen-p
// update, both N:M selections (the mask the last forward used, and the new one), the flip count,
// the AutoSwitch sums and the masked write of the model parameter in its dtype (round to nearest
// even). Bytes per element: phase 2 fp32 model reads 16 and writes 12 (28 B, AdamW's bytes); bf16
// model with bf16 p reads 12 and writes 10 (22 B). Each chunk is cut into tiles of kTile elements (1 KB per fp32 stream); each tile is read from memory once
// and its few passes (selection, update, selection, write) run out of L1, so memory traffic is one
// pass, every stream advances together (the hardware prefetchers keep up) and every pass vectorizes.
//
// This file has no include guard on purpose: fused_step_cpu.cpp includes it once per instruction
// set, inside `namespace STEP_CPU_ISA` and a `#pragma GCC target` region, so the compiler
// vectorizes it for AVX-512, AVX2 and the baseline, and the launcher picks one at run time. It
// includes nothing (the includer provides <cstdint>, <cstring>, <utility>, fused_step.h and the
// plan types of fused_step_cpu.cpp), so no library code is compiled for a wider ISA than the CPU.

using step_kernels::StepScalarsF;

typedef int32_t v16i __attribute__((vector_size(64)));

// rank += [entry (i + S) mod M of the group beats entry i], for 16 lanes holding 16 / M groups.
template <int M, int S>
inline void rank_add(const v16i& key, v16i& rank) {
  const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const v16i other = __builtin_shuffle(key, (lane & ~(M - 1)) | ((lane + S) & (M - 1)));
  const v16i other_is_lower = (lane & (M - 1)) >= (M - S);  // (i + S) mod M < i
  rank -= (other > key) | ((other == key) & other_is_lower);  // comparisons give -1 or 0
}

template <int M, int... S>
inline v16i rank16(const v16i& key, std::integer_sequence<int, S...>) {
  v16i rank = {};
  (rank_add<M, S + 1>(key, rank), ...);
  return rank;
}

// keep[e] = 1 when entry e is among the n winners of its group; groups are M consecutive keys.
template <int M>
inline void select_contiguous_m(const int32_t* __restrict key, int32_t* __restrict keep, int64_t len,
                                int n) {
  int64_t e = 0;
  if constexpr (M <= 16) {
    for (; e + 16 <= len; e += 16) {
      v16i k;
      std::memcpy(&k, key + e, sizeof k);
      const v16i rank = rank16<M>(k, std::make_integer_sequence<int, (M <= 16 ? M - 1 : 0)>());
      const v16i kept = (rank < n) & 1;
      std::memcpy(keep + e, &kept, sizeof kept);
    }
  }
  for (; e < len; e += M) {
    const uint32_t bits = step_kernels::nm_select_keys(key + e, n, M);
    for (int i = 0; i < M; ++i) keep[e + i] = (bits >> i) & 1u;
  }
}

inline void select_contiguous(const int32_t* key, int32_t* keep, int64_t len, int n, int m) {
  switch (m) {
    case 2: return select_contiguous_m<2>(key, keep, len, n);
    case 4: return select_contiguous_m<4>(key, keep, len, n);
    case 8: return select_contiguous_m<8>(key, keep, len, n);
    case 16: return select_contiguous_m<16>(key, keep, len, n);
    default: return select_contiguous_m<32>(key, keep, len, n);
  }
}

// Groups run across m rows of `cols` keys (key[i * cols + c] is entry i of group c): the strided
// orientation (Conv1D). Lanes run over columns.
inline void select_rows(const int32_t* __restrict key, int32_t* __restrict keep, int64_t cols, int n,
                        int m) {
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
    for (int64_t c = 0; c < cols; ++c) rank[c] = rank[c] < n ? 1 : 0;
  }
}

// keys of one chunk (its segments laid out one after another), then its N:M mask.
inline void chunk_mask(const Plan& plan, const TensorPlan& t, const Chunk& c, int32_t* key,
                       int32_t* keep) {
  for (int s = 0; s < c.nseg; ++s) {
    const float* __restrict w = t.w + c.base + s * c.seg_stride;
    int32_t* __restrict k = key + s * c.seg_len;
    for (int64_t e = 0; e < c.seg_len; ++e) k[e] = step_kernels::nm_key_bits(w[e]);
  }
  if (c.nseg == 1) {
    select_contiguous(key, keep, c.seg_len, plan.n, plan.m);
  } else {
    select_rows(key, keep, c.seg_len, plan.n, plan.m);
  }
}

inline void to_float(const void* src, DType type, int64_t len, float* __restrict dst) {
  if (type == DType::BF16) {
    const uint16_t* __restrict h = static_cast<const uint16_t*>(src);
    for (int64_t e = 0; e < len; ++e) dst[e] = step_kernels::f32_from_bf16(h[e]);
  } else {
    const uint16_t* __restrict h = static_cast<const uint16_t*>(src);
    for (int64_t e = 0; e < len; ++e) dst[e] = step_kernels::f32_from_f16(h[e]);
  }
}

// The update of one segment, in place. Returns the AutoSwitch sums in `stats` when STATS.
template <bool MASKED, bool FROZEN, bool SCALE, bool STATS>
inline void update_segment(float* __restrict w, const float* __restrict g, float* __restrict m,
                           float* __restrict second, const int32_t* __restrict keep_old, int64_t len,
                           const StepScalarsF& s, float scale, ChunkStats& stats) {
  double abs_dv = 0.0, v_sum = 0.0;
#pragma omp simd reduction(+ : abs_dv, v_sum)
  for (int64_t e = 0; e < len; ++e) {
    float we = w[e], me = m[e], se = second[e];
    const float ge = SCALE ? g[e] / scale : g[e];
    const float dv = step_kernels::step_element<MASKED, FROZEN>(we, ge, me, se, MASKED && keep_old[e] != 0, s);
    w[e] = we;
    m[e] = me;
    if (!FROZEN) second[e] = se;
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

template <bool MASKED, bool FROZEN, bool SCALE, bool STATS>
inline void update_chunk(const Plan& plan, const TensorPlan& t, const Chunk& c, const int32_t* keep_old,
                         float* gbuf, float* pbuf, ChunkStats& stats) {
  for (int s = 0; s < c.nseg; ++s) {
    const int64_t off = c.base + s * c.seg_stride;
    const float* g = static_cast<const float*>(t.g) + off;
    if (t.g_type != DType::F32) {
      to_float(static_cast<const uint16_t*>(t.g) + off, t.g_type, c.seg_len, gbuf);
      g = gbuf;
    }
    float* second = static_cast<float*>(t.second) + off;
    if (t.second_type != DType::F32) {  // a bf16 preconditioner (frozen, read only)
      to_float(static_cast<const uint16_t*>(t.second) + off, t.second_type, c.seg_len, pbuf);
      second = pbuf;
    }
    update_segment<MASKED, FROZEN, SCALE, STATS>(t.w + off, g, t.m + off, second,
                                                 keep_old + s * c.seg_len, c.seg_len, plan.scalars,
                                                 plan.scale, stats);
  }
}

template <bool MASKED, bool FROZEN>
inline void update_chunk_dispatch(const Plan& plan, const TensorPlan& t, const Chunk& c,
                                  const int32_t* keep_old, float* gbuf, float* pbuf, ChunkStats& stats) {
  if (plan.has_scale) {
    if (plan.compute_stats) return update_chunk<MASKED, FROZEN, true, true>(plan, t, c, keep_old, gbuf, pbuf, stats);
    return update_chunk<MASKED, FROZEN, true, false>(plan, t, c, keep_old, gbuf, pbuf, stats);
  }
  if (plan.compute_stats) return update_chunk<MASKED, FROZEN, false, true>(plan, t, c, keep_old, gbuf, pbuf, stats);
  update_chunk<MASKED, FROZEN, false, false>(plan, t, c, keep_old, gbuf, pbuf, stats);
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

inline int64_t count_flips(const int32_t* __restrict a, const int32_t* __restrict b, int64_t len) {
  int64_t flips = 0;
  for (int64_t e = 0; e < len; ++e) flips += a[e] != b[e] ? 1 : 0;
  return flips;
}

// One tile: at most kTile elements of whole groups (a sub-range of a chunk's segments). Its
// passes run out of L1 while every stream of the tile is read from memory once.
inline void step_tile(const Plan& plan, const TensorPlan& t, const Chunk& c, ChunkStats& st, int32_t* key,
                      int32_t* keep_old, int32_t* keep_new, float* gbuf, float* pbuf) {
  if (plan.masked) {
    chunk_mask(plan, t, c, key, keep_old);
    if (plan.frozen_v) {
      update_chunk_dispatch<true, true>(plan, t, c, keep_old, gbuf, pbuf, st);
    } else {
      update_chunk_dispatch<true, false>(plan, t, c, keep_old, gbuf, pbuf, st);
    }
    chunk_mask(plan, t, c, key, keep_new);
    st.flips += count_flips(keep_old, keep_new, static_cast<int64_t>(c.seg_len) * c.nseg);
  } else {
    update_chunk_dispatch<false, false>(plan, t, c, keep_old, gbuf, pbuf, st);
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
  alignas(64) float gbuf[kTile];
  alignas(64) float pbuf[kTile];
  for (int64_t i = begin; i < end; ++i) {
    const Chunk& c = plan.chunks[i];
    const TensorPlan& t = plan.tensors[c.tensor];
    const int32_t cols = c.nseg == 1 ? static_cast<int32_t>(kTile) : std::max<int32_t>(1, kTile / c.nseg);
    for (int32_t p0 = 0; p0 < c.seg_len; p0 += cols) {
      Chunk tile = c;
      tile.base += p0;
      tile.seg_len = std::min(cols, c.seg_len - p0);
      step_tile(plan, t, tile, stats[i], key, keep_old, keep_new, gbuf, pbuf);
    }
  }
}
