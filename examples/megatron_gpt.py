"""Megatron-Core's own ``GPTModel`` trained with STEP at 2:4: tensor parallelism 2 and Megatron's
distributed optimizer, through ``step_kernels.megatron.get_step_optimizer``.

What it shows:

1. The model: ``GPTModel`` with ``get_gpt_layer_local_spec()`` (Megatron-Core modules only, no
   Transformer Engine) in bf16, TP=2, wrapped in Megatron's ``DistributedDataParallel`` with
   ``use_distributed_optimizer=True``; data parallelism over the remaining ranks (DP = ranks / 2).
2. The optimizer: ``get_step_optimizer(OptimizerConfig(..., use_distributed_optimizer=True),
   [ddp], "2:4", total_steps=...)`` instead of ``get_megatron_optimizer``. The targets are every
   layer's ``linear_qkv``, ``linear_proj``, ``linear_fc1`` and ``linear_fc2`` (their TP shards);
   embeddings and ``output_layer`` stay dense. Each DP rank updates its shard of DDP's buffers
   (fp32 masters, ``mask * w`` written into the bf16 parameters, then DDP's all-gather).
3. Checks: every rank switches at the same step; every target shard is 2:4 on every rank; a run
   resumed from the per-rank checkpoint (``opt.state_dict()`` + the model's state, written at 75%
   of the steps, mid phase 2) ends bit-identical to the uninterrupted run.

On CPU (gloo) four Megatron pieces that assume CUDA are worked around, and nothing else is
replaced: Megatron allocates its attention buffer and DDP's grad/param buffers on
``torch.cuda.current_device()``, which is patched to return ``"cpu"``; its dropout RNG tracker
stores CUDA generator states, so Megatron's no-op (inference) tracker is installed and dropout is 0;
its default causal mask is built on ``"cuda"``, so the mask is passed explicitly; and its grad-norm
code needs CUDA, so grad clipping is off on CPU. On GPUs (NCCL, one GPU per rank) the script uses
none of these and clips grads at 1.0.

The data are the Python standard library's own source files (byte-level, vocabulary 256); the
model is randomly initialised, so nothing is downloaded. Needs ``megatron-core`` (0.16.1;
``make setup`` installs it with ``--no-deps``).

Run (full size: 8 layers, d=512, ctx 256, 2000 steps; on GPUs)::

    torchrun --nproc-per-node 4 examples/megatron_gpt.py --ckpt-dir megatron_ckpt

Smoke run (2 layers, d=64, ctx 64, 16 steps, TP=2 x DP=2; what ``make test`` runs, on CPU)::

    torchrun --nproc-per-node 4 examples/megatron_gpt.py --smoke --ckpt-dir /tmp/megatron_smoke
"""

import argparse
import contextlib
import datetime
import os
import sys
from unittest import mock

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

import step_kernels as sk
from step_kernels.demo import warmup_cosine
from step_kernels.megatron import MEGATRON_EXCLUDE, get_step_optimizer
from step_kernels.models import batches, stdlib_corpus
from step_kernels.targets import find_targets

TP = 2
VOCAB = 256  # bytes


def build(args, config, device, seed):
    """GPTModel (local spec) in Megatron's DDP with the distributed optimizer, STEP, and the lr schedule."""
    torch.manual_seed(seed)
    gpt = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=args.ctx,
                   position_embedding_type="learned_absolute")
    model = Float16Module(config, gpt).to(device)  # bf16 parameters and activations, as Megatron's get_model does
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                                        overlap_grad_reduce=True), model)
    opt_config = OptimizerConfig(optimizer="adam", lr=args.lr, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.1,
                                 bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=True,
                                 clip_grad=1.0 if device.type == "cuda" else 0.0)
    opt = get_step_optimizer(opt_config, [ddp], "2:4", total_steps=args.steps)
    # The lr schedule drives the torch optimizer inside (opt.optimizer). Megatron's OptimizerParamScheduler
    # is not used: it sets weight_decay * wd_mult on every group, and STEP's groups carry no wd_mult,
    # so biases and norms (weight decay 0) would get the decay too.
    return ddp, opt, warmup_cosine(opt.optimizer, args.steps)


def train(args, ddp, opt, schedule, data, start, stop, on_step=lambda step: None):
    """Steps ``start + 1 .. stop``: each data-parallel rank on its own batch (the same on both TP ranks)."""
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    positions = torch.arange(args.ctx, device=data.device)[None].expand(args.batch, -1)
    causal = torch.triu(torch.ones(1, 1, args.ctx, args.ctx, dtype=torch.bool, device=data.device), diagonal=1)
    losses = []
    for step in range(start + 1, stop + 1):
        x, y = batches(data, args.batch, args.ctx, torch.Generator(data.device).manual_seed(step * dp_size + dp_rank))
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(x, positions, causal, labels=y).float().mean()  # per-token losses [batch, ctx]
        loss.backward()
        ddp.finish_grad_sync()
        success, _, _ = opt.step()
        assert success, f"step {step} was skipped"
        schedule.step()
        losses.append(loss.item())
        if dist.get_rank() == 0 and step % max(1, args.steps // 8) == 0:
            print(f"step {step}/{args.steps}  loss (rank 0) {loss.item():.3f}  phase {opt.phase}", flush=True)
        on_step(step)
    return losses


def checkpoint_path(args):
    return os.path.join(args.ckpt_dir, f"rank{dist.get_rank()}.pt")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps of a tiny model (what make test runs)")
    parser.add_argument("--ckpt-dir", default="megatron_ckpt", help="directory of the per-rank checkpoints")
    args = parser.parse_args(argv)
    if args.smoke:
        size = dict(num_layers=2, hidden_size=64, num_attention_heads=4)
        args.ctx, args.steps, args.batch, args.lr = 64, 16, 8, 3e-3
    else:
        size = dict(num_layers=8, hidden_size=512, num_attention_heads=8)
        args.ctx, args.steps, args.batch, args.lr = 256, 2000, 16, 6e-4
    save_at = args.steps * 3 // 4  # AutoSwitch switches by 50% of total_steps at the latest

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    assert dist.get_world_size() % TP == 0, f"run with a multiple of {TP} ranks"
    with contextlib.ExitStack() as cpu_workarounds:
        if not cuda:  # see the module docstring
            cpu_workarounds.enter_context(mock.patch("torch.cuda.current_device", return_value="cpu"))
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
        if cuda:
            tensor_parallel.model_parallel_cuda_manual_seed(0)
        else:
            tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True)
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        config = TransformerConfig(**size, use_cpu_initialization=True, params_dtype=torch.bfloat16, bf16=True,
                                   attention_dropout=0.0, hidden_dropout=0.0, gradient_accumulation_fusion=False)
        run(args, config, device, save_at)
        parallel_state.destroy_model_parallel()
    dist.barrier()
    if dist.get_backend() == "gloo":
        # Every rank has passed the final barrier, so all work is done. Tearing gloo down here can
        # abort a rank whose peer already closed its sockets ("terminate called without an active
        # exception", seen on a loaded 2-core machine), so a gloo run leaves without it.
        sys.stdout.flush()
        os._exit(0)
    dist.destroy_process_group()


def run(args, config, device, save_at):
    """The uninterrupted run (which writes the per-rank checkpoint), the resumed run, and the checks."""
    rank = dist.get_rank()
    data = stdlib_corpus().to(device)
    ddp, opt, schedule = build(args, config, device, seed=0)

    def save(step):
        if step == save_at:
            os.makedirs(args.ckpt_dir, exist_ok=True)
            torch.save({"model": ddp.module.state_dict(), "optimizer": opt.state_dict(),
                        "schedule": schedule.state_dict()}, checkpoint_path(args))

    losses = train(args, ddp, opt, schedule, data, 0, args.steps, save)
    assert opt.switch_step is not None and opt.switch_step < save_at, \
        f"switch at {opt.switch_step}, not before the checkpoint at {save_at}"
    assert sum(losses[-3:]) < sum(losses[:3]), f"the loss did not fall: {losses}"

    # The targets as get_step_optimizer chose them; after DDP's all-gather, each rank's full TP shard
    # of every target (not only the piece this DP rank updated) must be 2:4.
    targets = find_targets(ddp, exclude=MEGATRON_EXCLUDE)
    assert len(targets) == 4 * config.num_layers, [t.name for t in targets]
    for t in targets:
        w = t.param.detach()
        assert torch.equal(sk.nm_prune(w, 2, 4, t.group_dim)[0], w), f"rank {rank}: {t.name} is not 2:4"
    switch_steps = [None] * dist.get_world_size()
    dist.all_gather_object(switch_steps, opt.switch_step)
    assert len(set(switch_steps)) == 1, f"ranks switched at different steps: {switch_steps}"

    # A fresh model and optimizer (another init seed) resumed from this rank's checkpoint.
    fresh, fresh_opt, fresh_schedule = build(args, config, device, seed=1)
    saved = torch.load(checkpoint_path(args), weights_only=False)
    fresh.module.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["optimizer"])
    fresh_schedule.load_state_dict(saved["schedule"])
    train(args, fresh, fresh_opt, fresh_schedule, data, save_at, args.steps)
    for (name, p), q in zip(ddp.module.named_parameters(), fresh.module.parameters()):
        assert torch.equal(p, q), f"rank {rank}: the resumed run differs in {name}"

    if rank == 0:
        names = sorted({t.module_name.split(".")[-1] for t in targets})
        print(f"GPTModel (local spec, bf16), TP={parallel_state.get_tensor_model_parallel_world_size()} x "
              f"DP={parallel_state.get_data_parallel_world_size()}, distributed optimizer: switch at step "
              f"{opt.switch_step} on every rank; {len(targets)} targets ({', '.join(names)}) 2:4 on every rank; "
              f"resumed from step {save_at}, bit-identical to the uninterrupted run")
        print("megatron_gpt: all checks passed", flush=True)


if __name__ == "__main__":
    main()
