"""Multi-process worker of tests/test_megatron.py: a small model of Megatron-Core's parallel layers
trained with STEP through Megatron's optimizer interface, on CPU with gloo. Launched as
``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/multiproc/megatron_worker.py OUT``.

Rank r writes ``OUT/megatron-rank<r>.pt``: per run ``tp<TP>-<dtype>`` the full (TP-gathered)
masters and parameters, so the TP=2 runs can be compared with the TP=1 runs, and under
``tp2-bad`` the errors of configurations that must fail on every rank. With the extra argument
``gpu`` (one process, CUDA) it runs Megatron's CUDA-only pieces instead (:func:`run_gpu`).

With the extra argument ``distopt`` (2 ranks, DP=2) it trains with Megatron's
DistributedDataParallel and the distributed optimizer against DDP without it
(``megatron-distopt-rank<r>.pt``, :func:`run_distopt`), on CPU: DDP allocates its buffers on
``torch.cuda.current_device()``, which is patched to return "cpu" while DDP is built (the only
stand-in; the grad reduce-scatter, the range maps and the param all-gather are Megatron's own).
``gpu-distopt`` (one process, CUDA) runs the same comparison without the patch.
"""

import copy
import datetime
import os
import sys
from types import SimpleNamespace
from unittest import mock

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.optimizer import OptimizerConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

import step_kernels as sk
from step_kernels.megatron import distributed_optimizer_shards, get_step_optimizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Read off a TP=1 fp32 run: the 10-step window mean of Z is 1.93e-5 at step 13 and 1.74e-5 at
# step 14, so AutoSwitch switches at 14 with margins of 3-7%.
AUTO_THRESHOLD = 1.8e-5


def init_method(weight):
    return torch.nn.init.normal_(weight, std=0.2)


class MegatronNet(torch.nn.Module):
    """ColumnParallelLinear -> RowParallelLinear -> head (nn.Linear, dense)."""

    def __init__(self, config, width=16, hidden=32, row_in=None):
        super().__init__()
        self.fc1 = ColumnParallelLinear(width, hidden, config=config, init_method=init_method, bias=True,
                                        gather_output=False)
        self.fc2 = RowParallelLinear(row_in or hidden, width, config=config, init_method=init_method, bias=True,
                                     input_is_parallel=True, skip_bias_add=False)
        # A dense head copied on every TP rank (excluded from N:M by its name), since a gathered
        # ColumnParallelLinear output allocates on CUDA.
        self.head = torch.nn.Linear(width, 4).to(config.params_dtype)

    def forward(self, x):
        h = torch.tanh(self.fc1(x)[0])
        h = torch.tanh(self.fc2(h)[0])
        return self.head(h)


def gather(t, dim, group):
    """The full tensor of a tensor-parallel parameter split along ``dim``."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def full_summary(model, opt, group):
    """Masters and parameters gathered over the TP group, plus STEP's globals."""
    masters, params = {}, {}
    inner = opt.optimizer
    for name, p in model.named_parameters():
        master = inner.state[p].get("master", p)
        split = getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else -1
        masters[name] = gather(master, split, group).float() if split >= 0 else master.detach().float().clone()
        params[name] = gather(p.detach(), split, group) if split >= 0 else p.detach().clone()
    stats = opt.stats()
    # The model parameters are exactly mask(master) (targets) or the master (others), rounded to
    # the model dtype: STEP's write replaces Megatron's main-to-model copy.
    written = []
    for group in inner.param_groups:
        for p in group["params"]:
            master = inner.state[p].get("master", p).detach()
            if group["sparsity"] is not None and opt.phase == "sparse":
                master = sk.reference.nm_prune(master, 2, 4, 1)[0]
            written.append(torch.equal(p.detach(), master.to(p.dtype)))
    return {"written_from_masters": all(written), "masters": masters, "params": params,
            "switch_step": opt.switch_step, "step": stats["step"],
            "phase": opt.phase, "z_history": stats["z_history"], "flip_rate": stats["flip_rate"],
            "precond_floor_count": stats["precond_floor_count"]}


def run_train(tp, dtype_name, out):
    dtype = DTYPES[dtype_name]
    config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                 gradient_accumulation_fusion=False, params_dtype=dtype,
                                 bf16=dtype == torch.bfloat16)
    results = {}
    for kind in ("fixed", "auto"):
        torch.manual_seed(0)
        model = MegatronNet(config)
        opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, adam_beta1=common.BETAS[0], adam_beta2=common.BETAS[1],
                                     weight_decay=0.01, clip_grad=0.0, bf16=dtype == torch.bfloat16,
                                     params_dtype=dtype)
        switch = common.SWITCH if kind == "fixed" else sk.AutoSwitch(threshold=AUTO_THRESHOLD, rule="absolute")
        opt = get_step_optimizer(opt_config, [model], "2:4", switch=switch, backend="reference")
        for step in range(common.STEPS):
            opt.zero_grad()
            x, y = common.global_batch(step)
            torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
            success, grad_norm, _ = opt.step()
            assert success
        results[kind] = full_summary(model, opt, parallel_state.get_tensor_model_parallel_group())
        results[kind + "_targets"] = [n for g in opt.param_groups if g["sparsity"] for n in g["param_names"]]
        state = opt.state_dict()
        results[kind + "_state_keys"] = sorted(state["optimizer"]["state"][0].keys())
    return results


def run_bad(tp, out):
    config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                 gradient_accumulation_fusion=False)
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0)
    rank = dist.get_rank()

    def row_parallel_split():  # 24 inputs over 2 ranks: 12 per rank, not divisible by M=8
        torch.manual_seed(0)
        get_step_optimizer(opt_config, [MegatronNet(config, hidden=24)], "2:8", backend="reference")

    def mismatched_nm():
        torch.manual_seed(0)
        get_step_optimizer(opt_config, [MegatronNet(config)], "2:4" if rank == 0 else "2:8", backend="reference")

    def replicated_target():
        torch.manual_seed(0)
        model = MegatronNet(config)
        model.extra = torch.nn.Linear(16, 16)  # copied on both TP ranks
        get_step_optimizer(opt_config, [model], "2:4", backend="reference")

    def distributed_optimizer():  # the model is not wrapped in Megatron's DDP
        torch.manual_seed(0)
        get_step_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True),
                           [MegatronNet(config)], "2:4", backend="reference")

    return record_errors((("row_parallel_split", row_parallel_split), ("mismatched_nm", mismatched_nm),
                          ("replicated_target", replicated_target), ("distributed_optimizer", distributed_optimizer)))


def record_errors(builds):
    """{name: "Type: message" of the error ``build()`` raised, or None}, for each ``(name, build)``."""
    results = {}
    for name, build in builds:
        try:
            build()
            results[name] = None
        except (ValueError, NotImplementedError) as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
        dist.barrier()  # every rank got here: nobody hangs in a collective
    return results


# Distributed optimizer runs: fc2's rows hold 48 inputs, so shards (multiples of 64 elements at DP=2)
# end inside rows; a 500-element bucket size gives two buckets (TP=1 and TP=2).
DISTOPT_HIDDEN = 48
DISTOPT_BUCKET = 500
# Read off a DP=2 run without the distributed optimizer: the 10-step window mean of Z is 9.86e-6
# at step 13 and 8.88e-6 at step 14 (fp32 and bf16 alike to 0.2%), so AutoSwitch switches at 14
# with margins of about 5%.
DISTOPT_THRESHOLD = 9.4e-6


def build_ddp(config, model, distributed, bucket_size=DISTOPT_BUCKET, overlap_param_gather=False):
    """``model`` in Megatron's DistributedDataParallel. Without CUDA, DDP's buffers (allocated on
    ``torch.cuda.current_device()``) go to the CPU: the one call is patched while DDP is built."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed, overlap_grad_reduce=True,
                                               overlap_param_gather=overlap_param_gather, bucket_size=bucket_size)
    if torch.cuda.is_available():
        return DistributedDataParallel(config, ddp_config, model)
    with mock.patch("torch.cuda.current_device", return_value="cpu"):
        return DistributedDataParallel(config, ddp_config, model)


def distopt_summary(ddp, opt):
    """Full model parameters, and the masters of what this rank updates as ``(start, end, flat
    master)`` of each parameter (the whole parameter without the distributed optimizer)."""
    names = {p: n for n, p in ddp.module.named_parameters()}
    inner = opt.optimizer
    pieces = opt.shards or [(p, p, 0, p.numel()) for p in opt.get_parameters()]
    masters, written = {}, []
    for shard, param, start, end in pieces:
        group = next(g for g in inner.param_groups if any(q is shard for q in g["params"]))
        master = inner.state[shard].get("master", shard).detach()
        masters[names[param]] = (start, end, master.float().reshape(-1).clone().cpu())
        if group["sparsity"] is not None and opt.phase == "sparse":
            master = sk.reference.nm_prune(master.reshape(-1, 4), 2, 4, 1)[0]
        # the model parameter (after DDP's all-gather) holds mask(master) in the model dtype
        written.append(torch.equal(param.detach().reshape(-1)[start:end].cpu(),
                                   master.reshape(-1).to(param.dtype).cpu()))
    stats = opt.stats()
    return {"params": {n: p.detach().float().cpu().clone() for n, p in ddp.module.named_parameters()},
            "masters": masters, "written_from_masters": all(written), "switch_step": opt.switch_step,
            "phase": opt.phase, "step": stats["step"], "z_history": stats["z_history"],
            "flip_rate": stats["flip_rate"], "shards": [(names[p], s, e) for _, p, s, e in opt.shards],
            "buckets": sum(len(b.buckets) for b in ddp.buffers),
            "overlap_param_gather": ddp.ddp_config.overlap_param_gather}


def run_distopt(dtype_name, device="cpu"):
    """DDP with and without the distributed optimizer, each data-parallel rank on its micro-batch
    of the global batch, under the tensor parallelism of ``parallel_state``; fixed switch and
    AutoSwitch. The fixed-switch
    sharded run also saves its state at step 20, and a fresh DDP and optimizer resume from it.
    The AutoSwitch sharded run overlaps DDP's param all-gather with the next forward (its
    forward pre-hook gathers what the optimizer wrote), the others all-gather in the step."""
    from megatron.core.transformer import TransformerConfig

    dtype = DTYPES[dtype_name]
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=1, use_cpu_initialization=True,
                               gradient_accumulation_fusion=False, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()

    def build(kind, distributed, seed=0):
        torch.manual_seed(seed)
        overlap = distributed and kind == "auto"
        ddp = build_ddp(config, MegatronNet(config, hidden=DISTOPT_HIDDEN).to(device), distributed,
                        overlap_param_gather=overlap)
        opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, adam_beta1=common.BETAS[0],
                                     adam_beta2=common.BETAS[1], weight_decay=0.01, clip_grad=0.0,
                                     bf16=dtype == torch.bfloat16, params_dtype=dtype,
                                     use_distributed_optimizer=distributed)
        switch = common.SWITCH if kind == "fixed" else sk.AutoSwitch(threshold=DISTOPT_THRESHOLD, rule="absolute")
        # On a GPU the shards run through the Triton kernels (the same backend in both runs).
        backend = "auto" if device == "cuda" else "reference"
        return ddp, get_step_optimizer(opt_config, [ddp], "2:4", switch=switch, backend=backend)

    def train(ddp, opt, start, stop):
        for step in range(start, stop):
            ddp.zero_grad_buffer()
            opt.zero_grad()
            x, y = common.micro_batch(step, dp_rank, dp_size)
            loss = torch.nn.functional.mse_loss(ddp(x.to(device, dtype)).float(), y.to(device))
            loss.backward()
            ddp.finish_grad_sync()
            success, _, _ = opt.step()
            assert success
        if ddp.ddp_config.overlap_param_gather:
            ddp.start_param_sync(force_sync=True)  # the gather the next forward would do

    results = {}
    for kind in ("fixed", "auto"):
        for distributed in (False, True):
            ddp, opt = build(kind, distributed)
            if kind == "fixed" and distributed:
                train(ddp, opt, 0, 20)
                saved_params = [p.detach().clone() for p in ddp.module.parameters()]
                saved_state = copy.deepcopy(opt.state_dict())
                train(ddp, opt, 20, common.STEPS)
                fresh, fresh_opt = build(kind, distributed, seed=1)
                with torch.no_grad():
                    for p, saved in zip(fresh.module.parameters(), saved_params):
                        p.copy_(saved)
                fresh_opt.load_state_dict(saved_state)
                train(fresh, fresh_opt, 20, common.STEPS)
                results["fixed-resumed"] = distopt_summary(fresh, fresh_opt)
            else:
                train(ddp, opt, 0, common.STEPS)
            results[f"{kind}-{'sharded' if distributed else 'replicated'}"] = distopt_summary(ddp, opt)
    return results


class StandInGroup:
    """A data-parallel group of ``size`` ranks seen from ``rank`` (only what Megatron's buffer and
    range-map code ask of it), so layouts of large DP sizes can be built on 2 processes."""

    def __init__(self, size, rank=0):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def standin_buffer(dp, pad_high_busbw, shapes=((48, 16), (48,), (16, 48), (16,), (4, 16), (4,)), m=4):
    """Megatron's real _ParamAndGradBuffer for a DP size of ``dp`` (padding and buckets are its
    own code), on CPU; returns [buffer] and {param: (name, m)} for the 2-D weights."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=torch.bfloat16)) for shape in shapes]
    names = {p: f"layer{i}.{'weight' if p.dim() == 2 else 'bias'}" for i, p in enumerate(params)}
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True,
                                               pad_buckets_for_high_nccl_busbw=pad_high_busbw)
    group = StandInGroup(dp)
    with mock.patch("torch.cuda.current_device", return_value="cpu"):
        buffer = _ParamAndGradBuffer(ddp_config, torch.bfloat16, torch.float32, params, group, 700, names, 1.0,
                                     list(range(len(params))), False, SimpleNamespace(tp=group, dp_cp=group))
    return [buffer], {p: (names[p], m) for p in params if p.dim() == 2}


def run_distopt_bad():
    """Configurations of the distributed optimizer that must fail (every rank records its error)."""
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=1, use_cpu_initialization=True,
                               gradient_accumulation_fusion=False)
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0, use_distributed_optimizer=True)
    rank = dist.get_rank()

    def mismatched_nm():
        torch.manual_seed(0)
        ddp = build_ddp(config, MegatronNet(config, hidden=DISTOPT_HIDDEN), True)
        get_step_optimizer(opt_config, [ddp], "2:4" if rank == 0 else "1:4", backend="reference")

    def conv1d_target():  # groups along dim 0 are strided in the flattened weight
        torch.manual_seed(0)
        model = MegatronNet(config, hidden=DISTOPT_HIDDEN)
        model.proj = common.Conv1D(16, 16)
        get_step_optimizer(opt_config, [build_ddp(config, model, True)], "2:4", backend="reference")

    def unbuffered_param():  # added after DDP built its buffers
        torch.manual_seed(0)
        ddp = build_ddp(config, MegatronNet(config, hidden=DISTOPT_HIDDEN), True)
        ddp.module.extra = torch.nn.Linear(16, 16)
        get_step_optimizer(opt_config, [ddp], "2:4", backend="reference")

    def add_group_later():
        torch.manual_seed(0)
        ddp = build_ddp(config, MegatronNet(config, hidden=DISTOPT_HIDDEN), True)
        opt = get_step_optimizer(opt_config, [ddp], "2:4", backend="reference")
        opt.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4))]})

    def split_default_padding():  # DP=64: shards are multiples of 2 elements
        distributed_optimizer_shards(*standin_buffer(64, False))

    def split_any_padding():  # DP=4096, M=32: shards of multiples of 16 elements even with the busbw padding
        distributed_optimizer_shards(*standin_buffer(4096, True, shapes=((16, 64), (16,), (8, 32)), m=32))

    results = record_errors((("mismatched_nm", mismatched_nm), ("conv1d_target", conv1d_target),
                             ("unbuffered_param", unbuffered_param), ("add_group_later", add_group_later),
                             ("split_default_padding", split_default_padding),
                             ("split_any_padding", split_any_padding)))
    # The busbw padding aligns DP=64: every rank's shards, together, cover every parameter once.
    buffers, targets = standin_buffer(64, True)
    covered = {p: torch.zeros(p.numel(), dtype=torch.int32) for p in buffers[0].params}
    for r in range(64):
        buffers[0].data_parallel_group._rank = r
        for p, (start, end) in distributed_optimizer_shards(buffers, targets).items():
            covered[p][start:end] += 1
    results["aligned_cover_once"] = all(bool((c == 1).all()) for c in covered.values())
    return results


def run_gpu():
    """One GPU: Megatron's DistributedDataParallel (grads in main_grad), a constant loss scale and
    grad clipping, against the same run without DDP (grads in .grad). Needs CUDA."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=1, use_cpu_initialization=True,
                               gradient_accumulation_fusion=False, params_dtype=torch.bfloat16, bf16=True)
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, adam_beta1=common.BETAS[0], adam_beta2=common.BETAS[1],
                                 weight_decay=0.01, clip_grad=0.05, bf16=True, loss_scale=1024.0,
                                 params_dtype=torch.bfloat16)
    results = {}
    for mode in ("plain", "ddp"):
        torch.manual_seed(0)
        model = MegatronNet(config).cuda()
        module = model
        if mode == "ddp":
            module = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        opt = get_step_optimizer(opt_config, [model], "2:4", switch=common.SWITCH)
        for step in range(common.STEPS):
            if mode == "ddp":
                module.zero_grad_buffer()
            opt.zero_grad()
            x, y = common.global_batch(step)
            loss = torch.nn.functional.mse_loss(module(x.cuda().bfloat16()).float(), y.cuda())
            (loss * opt.get_loss_scale().reshape(())).backward()
            if mode == "ddp":
                module.finish_grad_sync()
            assert opt.step()[0]
        results[mode] = full_summary(model, opt, parallel_state.get_tensor_model_parallel_group())
    return results


def main():
    out = sys.argv[1]
    if sys.argv[2:] == ["gpu-distopt"]:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        results = {dtype: run_distopt(dtype, device="cuda") for dtype in DTYPES}
        torch.save(results, os.path.join(out, f"megatron-gpu-distopt-rank{dist.get_rank()}.pt"))
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        return
    if sys.argv[2:] == ["distopt"]:
        # 2 ranks: DP=2, both dtypes and the bad configurations; 4 ranks: TP=2 x DP=2, fp32.
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        tp = 2 if dist.get_world_size() == 4 else 1
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        results = {dtype: run_distopt(dtype) for dtype in (DTYPES if tp == 1 else ["fp32"])}
        if tp == 1:
            results["bad"] = run_distopt_bad()
        parallel_state.destroy_model_parallel()
        torch.save(results, os.path.join(out, f"megatron-distopt-rank{dist.get_rank()}.pt"))
        dist.barrier()
        common.exit_now()
    if sys.argv[2:] == ["gpu"]:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        torch.save(run_gpu(), os.path.join(out, f"megatron-gpu-rank{dist.get_rank()}.pt"))
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        return
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    world = dist.get_world_size()
    results = {}
    # TP=world, then the single-rank reference (TP=1: every rank trains the whole model on the same
    # batch, the ranks being data-parallel replicas), then the configurations that must fail.
    for tp, mode in ((world, "fp32"), (world, "bf16"), (1, "fp32"), (1, "bf16"), (world, "bad")):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        results[f"tp{tp}-{mode}"] = run_bad(tp, out) if mode == "bad" else run_train(tp, mode, out)
        parallel_state.destroy_model_parallel()
    torch.save(results, os.path.join(out, f"megatron-rank{dist.get_rank()}.pt"))
    dist.barrier()
    common.exit_now()


if __name__ == "__main__":
    main()
