// fused_step on CPU: one call steps many tensors that share flags, N:M and hyper-parameters
// (contract: step_kernels/reference.py::fused_step, docs/design.md section 8.1).
//
// The launcher checks every tensor before anything is written (a failed call leaves its inputs
// untouched), cuts each tensor into chunks of whole N:M groups (kChunk elements along the
// contiguous dim; m rows by kChunk / m columns when the groups run along a strided dim, the Conv1D
// orientation), and steps the chunks with at::parallel_for. The kernel (fused_step_cpu_kernel.h)
// is compiled for AVX-512, AVX2 and the baseline x86-64 and picked at run time
// (STEP_KERNELS_CPU_ISA=avx512|avx2|baseline overrides). Each chunk writes its own partial sums,
// which are added in chunk order, so the AutoSwitch sums and the flip count do not depend on the
// thread count.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define STEP_CPU_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define STEP_CPU_AVX512 1  // the pragma does not define __AVX512F__: the kernel's AVX-512 paths
namespace isa_avx512 {
#include "fused_step_cpu_kernel.h"
}  // namespace isa_avx512
#undef STEP_CPU_AVX512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define STEP_CPU_AVX2 1  // nor __AVX2__ and __FMA__: the kernel's 8-lane selection and fmaf
namespace isa_avx2 {
#include "fused_step_cpu_kernel.h"
}  // namespace isa_avx2
#undef STEP_CPU_AVX2
#pragma GCC pop_options
#endif
namespace isa_baseline {
#include "fused_step_cpu_kernel.h"
}  // namespace isa_baseline

using RunChunks = void (*)(const Plan&, int64_t, int64_t, ChunkStats*);

struct Isa {
  const char* name;
  RunChunks run;
  bool supported;
};

std::vector<Isa> isas() {
  std::vector<Isa> all;
#if defined(STEP_CPU_MULTI_ISA)
  all.push_back({"avx512", &isa_avx512::run_chunks, __builtin_cpu_supports("x86-64-v4") != 0});
  all.push_back({"avx2", &isa_avx2::run_chunks, __builtin_cpu_supports("x86-64-v3") != 0});
#endif
  all.push_back({"baseline", &isa_baseline::run_chunks, true});
  return all;
}

}  // namespace cpu_step
}  // namespace step_kernels

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

using namespace step_kernels::cpu_step;

// The widest supported instruction set, or the one STEP_KERNELS_CPU_ISA names.
Isa pick_isa() {
  const char* want = std::getenv("STEP_KERNELS_CPU_ISA");
  const std::vector<Isa> all = isas();
  if (want == nullptr || *want == '\0') {
    for (const Isa& isa : all)
      if (isa.supported) return isa;
  }
  std::string names;
  for (const Isa& isa : all) {
    if (isa.name == std::string(want)) {
      TORCH_CHECK(isa.supported, "fused_step: STEP_KERNELS_CPU_ISA=", want, " is not supported by this CPU");
      return isa;
    }
    names += std::string(names.empty() ? "" : ", ") + isa.name;
  }
  TORCH_CHECK_VALUE(false, "fused_step: STEP_KERNELS_CPU_ISA must be one of ", names, ", got '", want, "'");
}

std::string cpu_isa() { return pick_isa().name; }

DType dtype_code(const at::Tensor& t, const char* what, int64_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default:
      TORCH_CHECK_TYPE(false, "fused_step: ", what, "[", i, "] has dtype ", t.scalar_type(),
                       "; expected float32, bfloat16 or float16");
  }
}

void check_like(const at::Tensor& t, const at::Tensor& w, const char* what, int64_t i) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fused_step: ", what, "[", i, "] is on ", t.device(),
                    "; the 'cpu' backend takes CPU tensors");
  TORCH_CHECK_VALUE(t.sizes() == w.sizes(), "fused_step: ", what, "[", i, "] has shape ", t.sizes(), " but weights[", i,
                    "] has shape ", w.sizes());
}

void check_in_place(const at::Tensor& t, const char* what, int64_t i) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "fused_step: ", what, "[", i, "] (shape ", t.sizes(), ", strides ", t.strides(),
                    ") must be contiguous: it is updated in place");
}

// Chunks of tensor `ti`: whole N:M groups, kChunk elements or m rows x (kChunk / m) columns.
void add_chunks(std::vector<Chunk>& chunks, int32_t ti, const at::Tensor& w, bool masked, int64_t m, int64_t dim) {
  const int64_t numel = w.numel();
  int64_t inner = 1;
  if (masked)
    for (int64_t d = dim + 1; d < w.dim(); ++d) inner *= w.size(d);
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

at::Tensor fused_step_cpu(at::TensorList weights, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList second_moments, const c10::List<std::optional<at::Tensor>>& model_params,
                          bool masked, bool frozen_v, int64_t n, int64_t m, at::IntArrayRef group_dims,
                          double decay_factor, double beta1, double one_minus_beta1, double beta2,
                          double one_minus_beta2, double step_size, double bc2_sqrt, double eps, double srste_decay,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                          bool compute_stats) {
  (void)beta1;  // torch's lerp_ uses 1 - beta1 only
  const int64_t count = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(
      static_cast<int64_t>(grads.size()) == count && static_cast<int64_t>(exp_avgs.size()) == count &&
          static_cast<int64_t>(second_moments.size()) == count && static_cast<int64_t>(model_params.size()) == count,
      "fused_step: weights, grads, exp_avgs, second_moments and model_params must have the same "
      "length, got ",
      count, ", ", grads.size(), ", ", exp_avgs.size(), ", ", second_moments.size(), ", ", model_params.size());
  TORCH_CHECK_VALUE(!frozen_v || masked, "fused_step: frozen_v=True requires masked=True");
  if (masked) {
    TORCH_CHECK_VALUE(m >= 2 && m <= 32 && (m & (m - 1)) == 0,
                      "fused_step: M must be a power of two from 2 to 32, got ", m);
    TORCH_CHECK_VALUE(n >= 1 && n < m, "fused_step: N must satisfy 1 <= N < M, got N=", n, " M=", m);
    TORCH_CHECK_VALUE(static_cast<int64_t>(group_dims.size()) == count, "fused_step: group_dims has ",
                      group_dims.size(), " entries for ", count, " tensors");
  }
  float scale = 1.0f;
  if (grad_scale.has_value()) {
    TORCH_CHECK_VALUE(grad_scale->numel() == 1 && grad_scale->is_floating_point(),
                      "fused_step: grad_scale must be a one-element float tensor, got shape ", grad_scale->sizes(),
                      " dtype ", grad_scale->scalar_type());
    scale = grad_scale->to(at::kFloat).item<float>();
  }
  if (found_inf.has_value())
    TORCH_CHECK_VALUE(found_inf->numel() == 1, "fused_step: found_inf must have one element, got shape ",
                      found_inf->sizes());

  std::vector<TensorPlan> tensors;
  std::vector<at::Tensor> keep_alive;  // contiguous copies of strided grads
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK_VALUE(w.device().is_cpu(), "fused_step: weights[", i, "] is on ", w.device(),
                      "; the 'cpu' backend takes CPU tensors");
    TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, "fused_step: weights[", i, "] must be float32 (the master), got ",
                     w.scalar_type());
    check_in_place(w, "weights", i);
    check_like(grads[i], w, "grads", i);
    check_like(exp_avgs[i], w, "exp_avgs", i);
    check_like(second_moments[i], w, "second_moments", i);
    TORCH_CHECK_TYPE(exp_avgs[i].scalar_type() == at::kFloat, "fused_step: exp_avgs[", i, "] must be float32, got ",
                     exp_avgs[i].scalar_type());
    check_in_place(exp_avgs[i], "exp_avgs", i);
    const DType second_type = dtype_code(second_moments[i], "second_moments", i);
    TORCH_CHECK_TYPE(second_type == DType::F32 || (frozen_v && second_type == DType::BF16),
                     "fused_step: second_moments[", i, "] has dtype ", second_moments[i].scalar_type(),
                     frozen_v ? "; the preconditioner must be float32 or bfloat16" : "; v must be float32");
    if (frozen_v) {
      TORCH_CHECK_VALUE(second_moments[i].is_contiguous(), "fused_step: second_moments[", i, "] must be contiguous");
    } else {
      check_in_place(second_moments[i], "second_moments", i);
    }
    const DType g_type = dtype_code(grads[i], "grads", i);
    const at::Tensor g = grads[i].is_contiguous() ? grads[i] : keep_alive.emplace_back(grads[i].contiguous());
    void* out = nullptr;
    DType out_type = DType::F32;
    const std::optional<at::Tensor> out_t = model_params.get(i);
    if (out_t.has_value() && out_t->defined()) {
      check_like(*out_t, w, "model_params", i);
      out_type = dtype_code(*out_t, "model_params", i);
      check_in_place(*out_t, "model_params", i);
      TORCH_CHECK_VALUE(!out_t->is_same(w) && (w.numel() == 0 || out_t->data_ptr() != w.data_ptr()),
                        "fused_step: model_params[", i, "] is weights[", i,
                        "]; pass None when the master is the model parameter");
      out = out_t->data_ptr();
    }
    int64_t dim = 0;
    if (masked) {
      TORCH_CHECK_VALUE(w.dim() >= 1, "fused_step: weights[", i, "] is a scalar; N:M groups need a dimension");
      dim = c10::maybe_wrap_dim(group_dims[i], w.dim());
      TORCH_CHECK_VALUE(w.size(dim) % m == 0, "fused_step: weights[", i, "]: size ", w.size(dim), " of dim ", dim,
                        " (shape ", w.sizes(), ") is not divisible by M=", m);
    }
    if (w.numel() == 0) continue;
    tensors.push_back({w.data_ptr<float>(), g.data_ptr(), exp_avgs[i].data_ptr<float>(), second_moments[i].data_ptr(),
                       out, g_type, second_type, out_type});
    add_chunks(chunks, static_cast<int32_t>(tensors.size() - 1), w, masked, m, dim);
  }
  at::Tensor totals = at::zeros({3}, at::TensorOptions().dtype(at::kDouble));
  if (found_inf.has_value() && found_inf->to(at::kFloat).item<float>() != 0.0f) return totals;
  if (chunks.empty()) return totals;

  Plan plan;
  plan.tensors = tensors.data();
  plan.chunks = chunks.data();
  step_kernels::StepScalarsF& s = plan.scalars;
  s.decay_factor = static_cast<float>(decay_factor);
  s.one_minus_beta1 = static_cast<float>(one_minus_beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(one_minus_beta2);
  s.step_size = static_cast<float>(step_size);
  s.neg_step_size = -s.step_size;
  s.bc2_sqrt = static_cast<float>(bc2_sqrt);
  s.eps = static_cast<float>(eps);
  s.srste_decay = static_cast<float>(srste_decay);
  plan.scale = scale;
  plan.has_scale = grad_scale.has_value();
  plan.masked = masked;
  plan.frozen_v = frozen_v;
  plan.compute_stats = compute_stats && !masked;
  plan.n = static_cast<int>(n);
  plan.m = static_cast<int>(m);
  const RunChunks run = pick_isa().run;
  std::vector<ChunkStats> stats(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1,
                   [&](int64_t begin, int64_t end) { run(plan, begin, end, stats.data()); });
  double abs_dv = 0.0, v_sum = 0.0;
  int64_t flips = 0;
  for (const ChunkStats& s : stats) {
    abs_dv += s.abs_dv;
    v_sum += s.v_sum;
    flips += s.flips;
  }
  double* out = totals.data_ptr<double>();
  out[0] = abs_dv;
  out[1] = v_sum;
  out[2] = static_cast<double>(flips);
  return totals;
}

}  // namespace

// Everything after `*` is keyword-only. step_kernels/_extension.py passes the fields of
// step_kernels.reference.StepScalars by name, so the float arguments are exactly those fields (a test
// checks it): a scalar added to one side and not the other fails the call instead of being dropped.
TORCH_LIBRARY_FRAGMENT(step_kernels, m) {
  m.def(
      "fused_step(Tensor(a!)[] weights, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] second_moments, "
      "Tensor(d!)?[] model_params, *, bool masked, bool frozen_v, int n, int m, int[] group_dims, float decay_factor, "
      "float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, float step_size, float bc2_sqrt, "
      "float eps, float srste_decay, Tensor? grad_scale, Tensor? found_inf, bool compute_stats) -> Tensor");
  m.def("fused_step_cpu_isa() -> str", &cpu_isa);
}
TORCH_LIBRARY_IMPL(step_kernels, CPU, m) { m.impl("fused_step", &fused_step_cpu); }
