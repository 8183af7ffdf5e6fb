// Unit tests of the per-element math of the fused step (no torch): round-to-nearest-even
// conversions, selection keys, and one element of each flag combination against hand-written
// double-rounded arithmetic.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "../fused_step.h"

static int failures = 0;
#define CHECK_EQ(a, b)                                                                       \
  do {                                                                                       \
    const double _a = static_cast<double>(a), _b = static_cast<double>(b);                   \
    if (!(_a == _b)) {                                                                       \
      std::printf("FAIL %s:%d: %s = %.9g, expected %.9g\n", __FILE__, __LINE__, #a, _a, _b); \
      ++failures;                                                                            \
    }                                                                                        \
  } while (0)

using namespace step_kernels;

static float from_bits(uint32_t u) { return f32_from_bits(u); }

int main() {
  // bf16: ties to even, carries into the exponent, NaN and inf
  CHECK_EQ(bf16_from_f32(1.0f), 0x3f80u);
  CHECK_EQ(bf16_from_f32(from_bits(0x3f808000u)), 0x3f80u);  // tie, even stays
  CHECK_EQ(bf16_from_f32(from_bits(0x3f818000u)), 0x3f82u);  // tie, odd rounds up
  CHECK_EQ(bf16_from_f32(from_bits(0x3f808001u)), 0x3f81u);  // above the tie
  CHECK_EQ(bf16_from_f32(from_bits(0x3fffffffu)), 0x4000u);  // carry into the exponent
  CHECK_EQ(bf16_from_f32(-0.0f), 0x8000u);
  CHECK_EQ(bf16_from_f32(INFINITY), 0x7f80u);
  CHECK_EQ(bf16_from_f32(from_bits(0x7f7fffffu)), 0x7f80u);  // FLT_MAX rounds to inf
  CHECK_EQ(bf16_from_f32(NAN), 0x7fc0u);
  CHECK_EQ(bf16_from_f32(from_bits(0xff800001u)), 0x7fc0u);  // a signalling NaN stays a NaN
  CHECK_EQ(f32_from_bf16(0x3f81u), from_bits(0x3f810000u));

  // fp16: normal, ties to even, overflow, subnormals, NaN keeps its sign
  CHECK_EQ(f16_from_f32(1.0f), 0x3c00u);
  CHECK_EQ(f16_from_f32(1.0f + 1.0f / 2048), 0x3c00u);  // tie, even stays
  CHECK_EQ(f16_from_f32(1.0f + 3.0f / 2048), 0x3c02u);  // tie, odd rounds up
  CHECK_EQ(f16_from_f32(65504.0f), 0x7bffu);
  CHECK_EQ(f16_from_f32(65520.0f), 0x7c00u);               // rounds to inf
  CHECK_EQ(f16_from_f32(std::ldexp(1.0f, -24)), 0x0001u);  // smallest subnormal
  CHECK_EQ(f16_from_f32(std::ldexp(1.0f, -25)), 0x0000u);  // tie to even: zero
  CHECK_EQ(f16_from_f32(std::ldexp(3.0f, -26)), 0x0001u);  // above the tie
  CHECK_EQ(f16_from_f32(-2.0f), 0xc000u);
  CHECK_EQ(f16_from_f32(-NAN), 0xfe00u);
  for (uint32_t h = 0; h < 0x7c00u; ++h) {  // every finite half, both signs: its value, and back exactly
    const uint32_t e = h >> 10, f = h & 0x3ffu;
    const float value =
        e == 0 ? std::ldexp(static_cast<float>(f), -24) : std::ldexp(static_cast<float>(1024 + f), e - 25);
    CHECK_EQ(f32_from_f16(static_cast<uint16_t>(h)), value);
    CHECK_EQ(f32_from_f16(static_cast<uint16_t>(h | 0x8000u)), -value);
    CHECK_EQ(f16_from_f32(f32_from_f16(static_cast<uint16_t>(h))), h);
    CHECK_EQ(f16_from_f32(f32_from_f16(static_cast<uint16_t>(h | 0x8000u))), h | 0x8000u);
  }

  // selection keys order like |x|, NaN ties with +inf
  CHECK_EQ(nm_key_bits(-0.0f), nm_key_bits(0.0f));
  CHECK_EQ(nm_key_bits(NAN), nm_key_bits(INFINITY));
  CHECK_EQ(nm_key_bits(-3.0f) > nm_key_bits(2.0f), 1);
  CHECK_EQ(nm_key_bits(std::ldexp(1.0f, -149)) > nm_key_bits(0.0f), 1);

  // one element, each flag combination, against the formulas written out with one rounding each
  const StepScalarsF s{0.99f, 0.1f, 0.999f, 0.001f, 0.02f, -0.02f, 0.5f, 1e-8f, 0.25f};
  const float w0 = 0.75f, g0 = -0.5f, m0 = 0.125f, v0 = 0.0625f, p0 = 3.0f;
  {  // AdamW (phase 1)
    float w = w0, m = m0, v = v0;
    const float dv = step_element<false, false>(w, g0, m, v, false, s);
    const float m_ref = std::fma(0.1f, g0 - m0, m0);
    const float v_ref = std::fma(0.001f * g0, g0, v0 * 0.999f);
    const float w_ref = w0 * 0.99f + (-0.02f * m_ref) / (std::sqrt(v_ref) / 0.5f + 1e-8f);
    CHECK_EQ(m, m_ref);
    CHECK_EQ(v, v_ref);
    CHECK_EQ(w, w_ref);
    CHECK_EQ(dv, std::fabs(v_ref - v0));
  }
  {  // SR-STE, pruned entry: the decay joins the grad before the moments
    float w = w0, m = m0, v = v0;
    step_element<true, false>(w, g0, m, v, false, s);
    const float g = g0 + 0.25f * w0;
    CHECK_EQ(m, std::fma(0.1f, g - m0, m0));
    CHECK_EQ(v, std::fma(0.001f * g, g, v0 * 0.999f));
  }
  {  // phase 2, kept entry: frozen p, read only
    float w = w0, m = m0, p = p0;
    const float dv = step_element<true, true>(w, g0, m, p, true, s);
    const float m_ref = std::fma(0.1f, g0 - m0, m0);
    CHECK_EQ(m, m_ref);
    CHECK_EQ(w, w0 * 0.99f - 0.02f * (m_ref * p0));
    CHECK_EQ(p, p0);
    CHECK_EQ(dv, 0.0f);
  }
  {  // a NaN weight stays NaN and keeps the largest key
    float w = NAN, m = m0, p = p0;
    step_element<true, true>(w, g0, m, p, true, s);
    CHECK_EQ(std::isnan(w), 1);
    CHECK_EQ(nm_key_bits(w), nm_key_bits(INFINITY));
  }
  // FmaSoft (the x86-64 baseline kernel's fmaf) against the library's correctly rounded fmaf, bit
  // for bit: random operands of every magnitude and sign, and double-rounding traps: c + p where p
  // is half an ulp of c give or take 2^-46 of itself, so p + c in double lands exactly on the tie
  // between two floats while the exact value lies on one side of it (k = 0: an exact tie, to even).
  {
    uint64_t state = 0x9e3779b97f4a7c15ull;
    const auto next = [&state] {
      state ^= state << 13;
      state ^= state >> 7;
      state ^= state << 17;
      return static_cast<uint32_t>(state >> 32);
    };
    int mismatches = 0;
    const auto check_fma = [&mismatches](float a, float b, float c) {
      const float got = FmaSoft::fma(a, b, c), want = std::fma(a, b, c);
      if (f32_bits(got) != f32_bits(want) && !(got != got && want != want)) {
        if (mismatches++ < 5) std::printf("FAIL FmaSoft::fma(%a, %a, %a) = %a, fmaf gives %a\n", a, b, c, got, want);
      }
    };
    for (int i = 0; i < 2000000; ++i) {
      // random bits, and values of moderate exponent (bits 23-30 drawn from 0x30..0x4f)
      const uint32_t ra = next(), rb = next(), rc = next();
      check_fma(from_bits(ra), from_bits(rb), from_bits(rc));
      const auto moderate = [](uint32_t r) { return from_bits((r & 0x807fffffu) | ((0x70u + (r >> 27)) << 23)); };
      check_fma(moderate(ra), moderate(rb), moderate(rc));
    }
    for (int i = 0; i < 200000; ++i) {
      const float c = from_bits((next() & 0x807fffffu) | ((0x60u + (next() & 0x3fu)) << 23));
      const int k = static_cast<int>(next() % 64);
      const float half = std::ldexp(1.0f, std::ilogb(c) - 24);  // half an ulp of c
      const float up = 1.0f + std::ldexp(static_cast<float>(k), -23),
                  down = 1.0f - std::ldexp(static_cast<float>(k), -23);
      check_fma(up, half * down, c);   // |p| = half (1 - k^2 2^-46): the exact value short of the tie
      check_fma(-up, half * down, c);  // toward zero
      check_fma(up, half * down, -c);
      check_fma(up, -half * down, -c);
    }
    CHECK_EQ(mismatches, 0);
    const float one_ulp = std::ldexp(1.0f, -23);
    CHECK_EQ(FmaSoft::fma(1.0f + one_ulp, std::ldexp(1.0f - one_ulp, -24), 1.0f + one_ulp), 1.0f + one_ulp);
    CHECK_EQ(FmaSoft::fma(INFINITY, 0.0f, 1.0f) != FmaSoft::fma(INFINITY, 0.0f, 1.0f), 1);  // NaN
    CHECK_EQ(FmaSoft::fma(2.0f, 3.0f, -INFINITY), -INFINITY);
    CHECK_EQ(FmaSoft::fma(std::ldexp(1.0f, 127), 4.0f, 0.0f), INFINITY);
  }

  if (failures) std::printf("%d failure(s)\n", failures);
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
