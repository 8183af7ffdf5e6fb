// The CPU fused step kernel (fused_step_cpu_kernel.h), every variant this binary holds and this CPU
// runs (AVX-512, AVX2, baseline on x86-64; baseline elsewhere, aarch64 under qemu included),
// bit for bit against the scalar per-element reference: step_element of fused_step.h for the
// update and nm_select_keys of nm_select.h over nm_key (float keys) for the masks. Covers every
// N:M (M = 2..32, 1 <= N < M), both group orientations, the three phases (AdamW with the
// AutoSwitch sums, SR-STE with live v, phase 2 with a frozen fp32 or bf16 p), fp32/bf16/fp16
// grads with and without a grad scale, fp32/bf16/fp16 model parameters or none, lengths that
// leave vector tails, cross tiles and chunks, and weights with NaN, +-inf, -0, subnormals and
// ties. Inputs come from a fixed-seed generator. Each plan also runs split in two ranges of chunks
// (two threads' shares) and must give the same bits.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "../fused_step_cpu_isas.h"

using namespace step_kernels;
using namespace step_kernels::cpu_step;

static int failures = 0;
static int reported = 0;

static void fail(const std::string& what) {
  ++failures;
  if (++reported <= 20) std::printf("FAIL %s\n", what.c_str());
}

// xorshift64*: the same stream on every compiler and CPU (std:: distributions are not).
struct Rng {
  uint64_t s;
  uint32_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return static_cast<uint32_t>((s * 0x2545f4914f6cdd1dull) >> 32);
  }
  float uniform() { return static_cast<float>(next() >> 8) * (1.0f / 16777216.0f); }  // [0, 1)
  int below(int k) { return static_cast<int>(next() % static_cast<uint32_t>(k)); }
};

// A weight: mostly varied magnitudes, with ties (repeats of the previous value, small constants),
// zeros of both signs, subnormals, infinities and NaN.
static float weight(Rng& r, float previous) {
  const int kind = r.below(100);
  const float sign = r.below(2) ? -1.0f : 1.0f;
  if (kind < 12) return sign * std::fabs(previous);
  if (kind < 20) return sign * static_cast<float>(r.below(3)) * 0.5f;
  if (kind < 22) return sign * f32_from_bits(1u + r.next() % 0x7fffffu);  // subnormal
  if (kind == 22) return sign * INFINITY;
  if (kind == 23) return f32_from_bits(0x7fc00000u | (r.next() & 0x803fffffu));  // NaN of either sign
  return sign * std::ldexp(0.5f + r.uniform(), r.below(14) - 10);
}

static float grad(Rng& r) {
  const int kind = r.below(200);
  if (kind == 0) return NAN;
  if (kind == 1) return -INFINITY;
  return (r.uniform() - 0.5f) * std::ldexp(1.0f, r.below(8) - 4);
}

struct Case {
  const char* phase;  // "adamw", "srste", "phase2"
  bool masked, frozen, stats;
  DType g_type, second_type, out_type;
  bool has_out, has_scale;
  int n, m;
  int64_t rows, cols;  // a [rows, cols] tensor; the groups run along `dim`
  int dim;
};

static std::string describe(const Case& c, const char* isa) {
  static const char* dtypes[] = {"f32", "bf16", "f16"};
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s %s %d:%d [%lld, %lld] dim %d g %s second %s out %s scale %d", isa, c.phase, c.n,
                c.m, static_cast<long long>(c.rows), static_cast<long long>(c.cols), c.dim,
                dtypes[static_cast<int>(c.g_type)], dtypes[static_cast<int>(c.second_type)],
                c.has_out ? dtypes[static_cast<int>(c.out_type)] : "none", c.has_scale ? 1 : 0);
  return buf;
}

// One tensor's streams. The 16-bit streams hold bf16 or fp16 bits as their dtype says.
struct Tensors {
  std::vector<float> w, m, second, out32;
  std::vector<uint16_t> g16, second16, out16;
  std::vector<float> g32;
  std::vector<int32_t> keep;  // the reference's new mask, for the flips
};

static Tensors make_inputs(const Case& c, Rng& r) {
  const int64_t numel = c.rows * c.cols;
  Tensors t;
  t.w.resize(numel);
  t.m.resize(numel);
  t.second.resize(numel);
  t.g32.resize(numel);
  t.g16.resize(numel);
  t.second16.resize(numel);
  float previous = 1.0f;
  for (int64_t e = 0; e < numel; ++e) previous = t.w[e] = weight(r, previous);
  for (int64_t e = 0; e < numel; ++e) {
    t.m[e] = (r.uniform() - 0.5f) * 0.01f;
    t.second[e] = c.frozen ? std::ldexp(0.5f + r.uniform(), r.below(10) - 2) : r.uniform() * 1e-4f;
    t.second16[e] = bf16_from_f32(t.second[e]);
    const float g = grad(r);
    t.g32[e] = g;
    t.g16[e] = c.g_type == DType::F16 ? f16_from_f32(g) : bf16_from_f32(g);
  }
  t.out32.assign(numel, -1.0f);
  t.out16.assign(numel, 0xffffu);
  return t;
}

// The mask of a [rows, cols] tensor whose groups run along `dim`, by the scalar selection.
static std::vector<int32_t> reference_mask(const std::vector<float>& w, const Case& c) {
  std::vector<int32_t> keep(w.size());
  const int64_t groups_per_line = (c.dim == 1 ? c.cols : c.rows) / c.m;
  const int64_t lines = c.dim == 1 ? c.rows : c.cols;
  const int64_t step = c.dim == 1 ? 1 : c.cols;
  for (int64_t line = 0; line < lines; ++line)
    for (int64_t gi = 0; gi < groups_per_line; ++gi) {
      const int64_t first = c.dim == 1 ? line * c.cols + gi * c.m : gi * c.m * c.cols + line;
      float key[32];
      for (int i = 0; i < c.m; ++i) key[i] = nm_key(w[first + i * step]);
      const uint32_t kept = nm_select_keys(key, c.n, c.m);
      for (int i = 0; i < c.m; ++i) keep[first + i * step] = (kept >> i) & 1u;
    }
  return keep;
}

static float grad_at(const Case& c, const Tensors& t, int64_t e) {
  if (c.g_type == DType::F32) return t.g32[e];
  return c.g_type == DType::BF16 ? f32_from_bf16(t.g16[e]) : f32_from_f16(t.g16[e]);
}

// The scalar reference, in place on `t`; returns {sum |dv|, sum v, flips}.
static ChunkStats reference_step(const Case& c, Tensors& t, const StepScalarsF& s, float scale) {
  const int64_t numel = c.rows * c.cols;
  ChunkStats st;
  std::vector<int32_t> keep_old;
  if (c.masked) keep_old = reference_mask(t.w, c);
  for (int64_t e = 0; e < numel; ++e) {
    float g = grad_at(c, t, e);
    if (c.has_scale) g = g / scale;
    float second = c.second_type == DType::BF16 ? f32_from_bf16(t.second16[e]) : t.second[e];
    float dv;
    if (!c.masked) {
      dv = step_element<false, false>(t.w[e], g, t.m[e], second, false, s);
    } else if (c.frozen) {
      dv = step_element<true, true>(t.w[e], g, t.m[e], second, keep_old[e] != 0, s);
    } else {
      dv = step_element<true, false>(t.w[e], g, t.m[e], second, keep_old[e] != 0, s);
    }
    if (!c.frozen) t.second[e] = second;
    if (c.stats) {
      st.abs_dv += dv;
      st.v_sum += second;
    }
  }
  if (c.masked) {
    t.keep = reference_mask(t.w, c);
    for (int64_t e = 0; e < numel; ++e) st.flips += t.keep[e] != keep_old[e] ? 1 : 0;
  }
  if (c.has_out)
    for (int64_t e = 0; e < numel; ++e) {
      const float value = c.masked && !t.keep[e] ? 0.0f : t.w[e];
      if (c.out_type == DType::F32) t.out32[e] = value;
      if (c.out_type == DType::BF16) t.out16[e] = bf16_from_f32(value);
      if (c.out_type == DType::F16) t.out16[e] = f16_from_f32(value);
    }
  return st;
}

// The kernel on `t` through a plan the way the launcher builds it, chunks [0, split) then
// [split, end) (split == 0: one range); returns the totals added in chunk order.
static ChunkStats kernel_step(const Isa& isa, const Case& c, Tensors& t, const StepScalarsF& s, float scale,
                              int64_t split) {
  TensorPlan tp;
  tp.w = t.w.data();
  tp.g = c.g_type == DType::F32 ? static_cast<const void*>(t.g32.data()) : t.g16.data();
  tp.m = t.m.data();
  tp.second = c.second_type == DType::BF16 ? static_cast<void*>(t.second16.data()) : t.second.data();
  tp.out = !c.has_out ? nullptr : c.out_type == DType::F32 ? static_cast<void*>(t.out32.data()) : t.out16.data();
  tp.g_type = c.g_type;
  tp.second_type = c.second_type;
  tp.out_type = c.out_type;
  std::vector<Chunk> chunks;
  add_chunks(chunks, 0, c.rows * c.cols, c.masked && c.dim == 0 ? c.cols : 1, c.m);
  Plan plan;
  plan.tensors = &tp;
  plan.chunks = chunks.data();
  plan.scalars = s;
  plan.scale = scale;
  plan.has_scale = c.has_scale;
  plan.masked = c.masked;
  plan.frozen_v = c.frozen;
  plan.compute_stats = c.stats;
  plan.n = c.n;
  plan.m = c.m;
  const int64_t count = static_cast<int64_t>(chunks.size());
  split = std::min(split, count);
  std::vector<ChunkStats> stats(chunks.size());
  if (split > 0) isa.run(plan, 0, split, stats.data());
  isa.run(plan, split, count, stats.data());
  ChunkStats total;
  for (const ChunkStats& st : stats) {
    total.abs_dv += st.abs_dv;
    total.v_sum += st.v_sum;
    total.flips += st.flips;
  }
  return total;
}

// Same bits, or NaN for NaN: as the Python tests (equal_nan), a NaN's sign and payload are not part
// of the contract (a vectorized loop may order a commutative operation's operands either way).
static bool same(float a, float b) { return f32_bits(a) == f32_bits(b) || (a != a && b != b); }

static bool same16(uint16_t a, uint16_t b, DType type) {
  const uint16_t exponent = type == DType::F16 ? 0x7c00u : 0x7f80u;
  const auto is_nan = [&](uint16_t x) { return (x & exponent) == exponent && (x & ~exponent & 0x7fffu) != 0; };
  return a == b || (is_nan(a) && is_nan(b));
}

template <class T, class Same>
static void expect_same(const std::vector<T>& got, const std::vector<T>& want, Same same_value, const char* what,
                        const std::string& where) {
  for (size_t e = 0; e < got.size(); ++e)
    if (!same_value(got[e], want[e])) {
      uint32_t got_bits = 0, want_bits = 0;
      std::memcpy(&got_bits, &got[e], sizeof(T));
      std::memcpy(&want_bits, &want[e], sizeof(T));
      char buf[128];
      std::snprintf(buf, sizeof buf, ": %s[%zu] has bits 0x%x, expected 0x%x", what, e, got_bits, want_bits);
      fail(where + buf);
      return;
    }
}

// Sums in a different order differ by rounding only. The terms are >= 0 (or NaN), so their sum of
// magnitudes is the sum itself: |a - b| <= 1e-12 * |b|, and NaN == NaN.
static void expect_close(double got, double want, const char* what, const std::string& where) {
  if (std::isnan(got) && std::isnan(want)) return;
  if (got == want || std::fabs(got - want) <= 1e-12 * std::fabs(want)) return;
  char buf[128];
  std::snprintf(buf, sizeof buf, ": %s = %.17g, expected %.17g", what, got, want);
  fail(where + buf);
}

static void run_case(const Isa& isa, const Case& c, uint64_t seed) {
  Rng rng{seed};
  const Tensors inputs = make_inputs(c, rng);
  const StepScalarsF s{1.0f - 1e-3f * 0.01f,     0.1f,  0.999f,       1.0f - 0.999f, 1e-3f / 0.1f, -(1e-3f / 0.1f),
                       std::sqrt(1.0f - 0.999f), 1e-8f, 1e-3f * 2e-4f};
  const float scale = c.has_scale ? (seed % 2 ? 1024.0f : 3.0f) : 1.0f;
  Tensors want = inputs;
  const ChunkStats want_st = reference_step(c, want, s, scale);
  const std::string where = describe(c, isa.name);
  for (int64_t split : {int64_t{0}, int64_t{1}, int64_t{3}}) {
    Tensors got = inputs;
    const ChunkStats got_st = kernel_step(isa, c, got, s, scale, split);
    const std::string at = where + " split " + std::to_string(split);
    expect_same(got.w, want.w, same, "w", at);
    expect_same(got.m, want.m, same, "m", at);
    expect_same(got.second, want.second, same, "v", at);
    const auto same_bf16 = [](uint16_t a, uint16_t b) { return same16(a, b, DType::BF16); };
    const auto same_out16 = [&](uint16_t a, uint16_t b) { return same16(a, b, c.out_type); };
    expect_same(got.second16, want.second16, same_bf16, "p16", at);
    expect_same(got.out32, want.out32, same, "out32", at);
    expect_same(got.out16, want.out16, same_out16, "out16", at);
    if (got_st.flips != want_st.flips)
      fail(at + ": flips " + std::to_string(got_st.flips) + ", expected " + std::to_string(want_st.flips));
    expect_close(got_st.abs_dv, want_st.abs_dv, "sum |dv|", at);
    expect_close(got_st.v_sum, want_st.v_sum, "sum v", at);
  }
}

int main() {
  int cases = 0;
  std::string ran;
  for (const Isa& isa : isas()) {
    if (!isa.supported) {
      std::printf("test_fused_step_cpu_kernel: %s is built but this CPU does not run it: not tested\n", isa.name);
      continue;
    }
    ran += std::string(ran.empty() ? "" : ", ") + isa.name;
    uint64_t seed = 0x5eed0001ull;
    int k = 0;  // rotates the dtype combinations over the cases
    for (int m = 2; m <= 32; m *= 2)
      for (int n = 1; n < m; ++n)
        for (int dim = 1; dim >= 0; --dim)
          for (int shape = 0; shape < 3; ++shape) {
            // contiguous: rows x cols with cols = m * {1, 15, 257}; strided: rows = m * {1, 3}, cols {1, 15, 257}
            static const int64_t groups[] = {1, 15, 257};
            Case c{};
            c.n = n;
            c.m = m;
            c.dim = dim;
            c.rows = dim == 1 ? 1 + 2 * (shape % 2) : m * (1 + 2 * (shape % 2));
            c.cols = dim == 1 ? m * groups[shape] : groups[shape];
            for (int phase = 0; phase < 4; ++phase, ++k) {
              if (phase == 0 && (n != 1 || dim != 1)) continue;  // AdamW ignores N:M and dims: once per M
              c.phase = phase == 0 ? "adamw" : phase == 1 ? "srste" : "phase2";
              c.masked = phase != 0;
              c.frozen = phase >= 2;
              c.stats = phase == 0;
              c.second_type = phase == 3 ? DType::BF16 : DType::F32;
              c.g_type = static_cast<DType>(k % 3);
              c.has_out = k % 4 != 3;
              c.out_type = static_cast<DType>((k / 3) % 3);
              c.has_scale = (k / 2) % 2 == 1;
              run_case(isa, c, seed++);
              ++cases;
            }
          }
  }
  std::printf("test_fused_step_cpu_kernel: %d cases on %s, %d failure(s)\n", cases, ran.c_str(), failures);
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
