// The CPU fused step compiled once per instruction set, and the table the launcher and the C++
// test pick from (private tier of fused_step_cpu.cpp; no torch). Include it in one translation
// unit per binary.
//
// x86-64 with GCC or clang: fused_step_cpu_kernel.h is included three times, each time inside a
// namespace and a region that compiles every function of it for one ISA, so the compiler
// vectorizes the same source for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and the baseline
// (x86-64, SSE2), and `isas()` lists them widest first with whether this CPU runs them. GCC's
// region is `#pragma GCC target`, clang's `#pragma clang attribute` of `target(...)` on every
// function (clang has no target pragma). Any other compiler or CPU (aarch64 included) gets one
// variant, "baseline", compiled for the build's own target flags; on x86-64 with another compiler
// the build prints a warning that the AVX-512 and AVX2 variants are missing.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "fused_step.h"
#include "fused_step_cpu_plan.h"

namespace step_kernels {
namespace cpu_step {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define STEP_CPU_MULTI_ISA 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("arch=x86-64-v4"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#endif
#define STEP_CPU_AVX512 1  // the region does not define __AVX512F__: the kernel's AVX-512 paths
namespace isa_avx512 {
#include "fused_step_cpu_kernel.h"
}  // namespace isa_avx512
#undef STEP_CPU_AVX512
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("arch=x86-64-v3"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#endif
#define STEP_CPU_AVX2 1  // nor __AVX2__ and __FMA__: the kernel's 8-lane selection and fmaf
namespace isa_avx2 {
#include "fused_step_cpu_kernel.h"
}  // namespace isa_avx2
#undef STEP_CPU_AVX2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#elif defined(__x86_64__)
// Neither GCC's target pragma nor clang's target attribute: one variant, and the build says so.
#pragma message("step-kernels warning: CPU fused step built for baseline x86-64 only (no AVX-512, no AVX2)")
#endif
namespace isa_baseline {
#include "fused_step_cpu_kernel.h"
}  // namespace isa_baseline

using RunChunks = void (*)(const Plan&, int64_t, int64_t, ChunkStats*);

struct Isa {
  const char* name;
  RunChunks run;
  bool supported;  // this CPU runs it
};

#if defined(STEP_CPU_MULTI_ISA)
// Whether this CPU runs x86-64-v3 (v4: the AVX-512 level). GCC asks for the level; clang 14 knows
// only single features, and not F16C, MOVBE or LZCNT, which every CPU with AVX2 and BMI2 has.
inline bool cpu_runs_x86_64_v3() {
#if defined(__clang__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
#else
  return __builtin_cpu_supports("x86-64-v3");
#endif
}

inline bool cpu_runs_x86_64_v4() {
#if defined(__clang__)
  return cpu_runs_x86_64_v3() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return __builtin_cpu_supports("x86-64-v4");
#endif
}
#endif

// The variants this binary holds, widest first; the last ("baseline") runs on every CPU.
inline std::vector<Isa> isas() {
  std::vector<Isa> all;
#if defined(STEP_CPU_MULTI_ISA)
  all.push_back({"avx512", &isa_avx512::run_chunks, cpu_runs_x86_64_v4()});
  all.push_back({"avx2", &isa_avx2::run_chunks, cpu_runs_x86_64_v3()});
#endif
  all.push_back({"baseline", &isa_baseline::run_chunks, true});
  return all;
}

}  // namespace cpu_step
}  // namespace step_kernels
