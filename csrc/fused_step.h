// Per-element math of the fused STEP step (docs/design.md section 5), shared by the CPU loop and any
// CUDA kernel. Every function reproduces the order of float operations of
// step_kernels/reference.py as torch runs it on CPU, so results are bit-identical:
//   m = fma(1 - b1, g - m, m)                  torch's lerp_ (fused multiply-add)
//   v = fma((1 - b2) * g, g, v * b2)           torch's mul_(b2).addcmul_(g, g, 1 - b2)
//   w = w + (-step_size * m) / (sqrt(v) / bc2_sqrt + eps)      torch's addcdiv_
//   w = w - step_size * (m * p)                the frozen preconditioner
// Files that include this header must be compiled with -ffp-contract=off (setup.py, CMake), or
// the compiler may fuse the other products and sums and break bit equality.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "host_device.h"
#include "nm_select.h"

namespace step_kernels {

// The host scalars of one step, rounded to fp32 where they meet a tensor (as torch does).
struct StepScalarsF {
  float decay_factor;     // 1 - lr * weight_decay
  float one_minus_beta1;  // the lerp weight
  float beta2;
  float one_minus_beta2;
  float step_size;      // lr / (1 - beta1^t)
  float neg_step_size;  // -step_size, the addcdiv_ value
  float bc2_sqrt;       // sqrt(1 - beta2^t)
  float eps;
  float srste_decay;
};

STEP_HOST_DEVICE uint32_t f32_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

STEP_HOST_DEVICE float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// N:M selection key as an integer: |x| with NaN mapped to +inf. For non-negative floats the bit
// patterns order as the values do, so comparing these keys equals comparing nm_key(x).
STEP_HOST_DEVICE int32_t nm_key_bits(float x) {
  const uint32_t a = f32_bits(x) & 0x7fffffffu;
  return static_cast<int32_t>(a > 0x7f800000u ? 0x7f800000u : a);
}

// fp32 -> bf16 bits, round to nearest even; NaN -> 0x7fc0 (c10::BFloat16's rule).
STEP_HOST_DEVICE uint16_t bf16_from_f32(float x) {
  const uint32_t u = f32_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(x != x ? 0x7fc0u : rounded);
}

STEP_HOST_DEVICE float f32_from_bf16(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

// fp32 -> fp16 bits, round to nearest even, with subnormals, inf and NaN (0x7e00 | sign): the
// branch-free algorithm of c10's fp16_ieee_from_fp32_value, which vectorizes.
STEP_HOST_DEVICE uint16_t f16_from_f32(float x) {
  const float scale_to_inf = f32_from_bits(0x77800000u);   // 2^112
  const float scale_to_zero = f32_from_bits(0x08800000u);  // 2^-110
  float base = (fabsf(x) * scale_to_inf) * scale_to_zero;
  const uint32_t w = f32_bits(x);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007c00u;
  const uint32_t mantissa_bits = bits & 0x00000fffu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  const uint32_t is_nan = 0u - static_cast<uint32_t>(shl1_w > 0xff000000u);  // a mask: see srste_grad
  return static_cast<uint16_t>((sign >> 16) | (0x7e00u & is_nan) | (nonsign & ~is_nan));
}

// fp16 bits -> fp32, exact (c10's fp16_ieee_to_fp32_value).
STEP_HOST_DEVICE float f32_from_f16(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float exp_scale = f32_from_bits(0x07800000u);  // 2^-112
  const float normalized = f32_from_bits((two_w >> 4) + (0xe0u << 23)) * exp_scale;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t is_denormal = 0u - static_cast<uint32_t>(two_w < (1u << 27));  // a mask: see srste_grad
  return f32_from_bits(sign | (f32_bits(denormalized) & is_denormal) | (f32_bits(normalized) & ~is_denormal));
}

// SR-STE gradient: the decay term is added on pruned entries only; kept entries get g + 0. The
// product is computed for every entry and kept entries clear its bits (+0.0): a float operation
// under a condition may raise an FP exception the unconditional code would not, so GCC (no
// -fno-trapping-math) keeps it behind a branch, and the loop vectorizes only with AVX-512's masks.
STEP_HOST_DEVICE float srste_grad(float g, float w, bool keep_old, float srste_decay) {
  const uint32_t decay = f32_bits(srste_decay * w) & (keep_old ? 0u : 0xffffffffu);
  return g + f32_from_bits(decay);
}

// fmaf, correctly rounded: the hardware's fused multiply-add where the target has one.
struct FmaHw {
  STEP_HOST_DEVICE static float fma(float a, float b, float c) { return fmaf(a, b, c); }
};

// fmaf, correctly rounded, for a target without an FMA unit (x86-64 before AVX2), where fmaf is a
// library call per element that no loop vectorizes. The product of two floats is exact in double
// and TwoSum gives the exact error of the double sum, so the only wrong case of rounding the sum to
// float is a double rounding: the sum lands exactly halfway between two floats while the exact value
// lies beyond that point (err has the sign of sum - near); then the answer is the other float,
// sum + (sum - near), which is exact. Only double compares and selects (no integer view of a
// double, which SSE2 cannot select on), so loops of it vectorize; NaN and inf inputs fail every
// compare and pass through the double sum as through fmaf.
struct FmaSoft {
  STEP_HOST_DEVICE static float fma(float a, float b, float c) {
    const double p = static_cast<double>(a) * static_cast<double>(b);
    const double cd = static_cast<double>(c);
    const double sum = p + cd;
    const double bv = sum - p;
    const double err = (p - (sum - bv)) + (cd - bv);  // sum + err == p + c exactly
    const double near = static_cast<double>(static_cast<float>(sum));
    const double half = sum - near;   // exact; +-half an ulp of near when sum is a tie
    const double other = sum + half;  // the other float next to sum when sum is a tie
    // bitwise &, not &&: the loops that call this stay free of branches
    const bool wrong =
        (err * half > 0.0) & (std::fabs(half) < INFINITY) & (static_cast<double>(static_cast<float>(other)) == other);
    return static_cast<float>(wrong ? other : near);
  }
};

template <class Fma = FmaHw>
STEP_HOST_DEVICE float adam_exp_avg(float m, float g, const StepScalarsF& s) {
  return Fma::fma(s.one_minus_beta1, g - m, m);
}

template <class Fma = FmaHw>
STEP_HOST_DEVICE float adam_exp_avg_sq(float v, float g, const StepScalarsF& s) {
  return Fma::fma(s.one_minus_beta2 * g, g, v * s.beta2);
}

// w (already decayed) after the Adam update with the live second moment v.
STEP_HOST_DEVICE float adam_update_live(float w, float m, float v, const StepScalarsF& s) {
  return w + (s.neg_step_size * m) / (sqrtf(v) / s.bc2_sqrt + s.eps);
}

// w (already decayed) after the update with the frozen preconditioner p.
STEP_HOST_DEVICE float adam_update_frozen(float w, float m, float p, const StepScalarsF& s) {
  return w - s.step_size * (m * p);
}

// The whole update of one element, in place on w, m and (when live) v. Returns |v_new - v_old|
// in fp32 (the AutoSwitch term; 0 when frozen). `second` is v, or p when frozen (read only).
// Fma: FmaHw, or FmaSoft where the target has no FMA unit (the same results).
template <bool MASKED, bool FROZEN, class Fma = FmaHw>
STEP_HOST_DEVICE float step_element(float& w, float g, float& m, float& second, bool keep_old, const StepScalarsF& s) {
  if (MASKED) g = srste_grad(g, w, keep_old, s.srste_decay);
  float wd = w * s.decay_factor;
  m = adam_exp_avg<Fma>(m, g, s);
  if (FROZEN) {
    w = adam_update_frozen(wd, m, second, s);
    return 0.0f;
  }
  const float v_old = second;
  second = adam_exp_avg_sq<Fma>(v_old, g, s);
  w = adam_update_live(wd, m, second, s);
  return fabsf(second - v_old);
}

}  // namespace step_kernels
