// The plan of one CPU fused_step call (private tier of fused_step_cpu.cpp), without torch: the
// tensors' pointers and dtypes, their chunks of whole N:M groups, the per-chunk partial sums and
// the flags and scalars every chunk shares. The launcher fills it from tensors; the kernel
// (fused_step_cpu_kernel.h) steps it; csrc/tests/test_fused_step_cpu_kernel.cpp fills it from
// plain arrays and checks the kernel against the per-element reference.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fused_step.h"

namespace step_kernels {
namespace cpu_step {

enum class DType : int { F32, BF16, F16 };

constexpr int64_t kChunk = 2048;  // elements per unit of work and of partial sums; a multiple of every M
constexpr int32_t kTile = 256;    // elements per tile: whole groups of every M, all buffers in L1

struct TensorPlan {
  float* w;
  const void* g;
  float* m;
  void* second;  // v (fp32, updated) or the frozen p (fp32 or bf16, read only)
  void* out;     // the model parameter, or nullptr when w is the model parameter
  DType g_type, second_type, out_type;
};

// seg_len elements at base + s * seg_stride for s in [0, nseg): 1 segment of whole groups
// (contiguous groups), or the m rows of a block of groups (groups along a strided dim).
struct Chunk {
  int64_t base;
  int64_t seg_stride;
  int32_t seg_len;
  int32_t nseg;
  int32_t tensor;
};

struct ChunkStats {
  double abs_dv = 0.0;
  double v_sum = 0.0;
  int64_t flips = 0;
};

struct Plan {
  const TensorPlan* tensors;
  const Chunk* chunks;
  StepScalarsF scalars;
  float scale;
  bool has_scale, masked, frozen_v, compute_stats;
  int n, m;
};

// Chunks of tensor `ti` (numel elements; its groups are m entries `inner` apart, inner == 1 when
// they are contiguous or the call is unmasked): whole N:M groups, kChunk elements or m rows x
// (kChunk / m) columns.
inline void add_chunks(std::vector<Chunk>& chunks, int32_t ti, int64_t numel, int64_t inner, int64_t m) {
  if (inner == 1) {
    for (int64_t base = 0; base < numel; base += kChunk)
      chunks.push_back({base, 0, static_cast<int32_t>(std::min(kChunk, numel - base)), 1, ti});
    return;
  }
  const int64_t rows = numel / inner;  // outer * size(dim): groups are m consecutive rows
  const int64_t cols = std::min(inner, kChunk / m);
  for (int64_t r = 0; r < rows; r += m)
    for (int64_t c = 0; c < inner; c += cols)
      chunks.push_back(
          {r * inner + c, inner, static_cast<int32_t>(std::min(cols, inner - c)), static_cast<int32_t>(m), ti});
}

}  // namespace cpu_step
}  // namespace step_kernels
