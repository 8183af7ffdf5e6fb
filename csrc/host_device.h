// STEP_HOST_DEVICE: marks the functions shared by the CPU loops, the CUDA kernels and the C++ unit
// tests (nm_select.h, fused_step.h, pack24.h). Under nvcc they are __host__ __device__ and inlined.
// On the host they are always inlined too: the CPU fused step is compiled once per instruction set
// (fused_step_cpu.cpp), and a call left out of line would run the baseline x86-64 copy (where fmaf
// becomes a libm call).
#pragma once

#if defined(__CUDACC__)
#define STEP_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define STEP_HOST_DEVICE inline __attribute__((always_inline))
#else
#define STEP_HOST_DEVICE inline
#endif
