"""FSDP2 + ``DistributedSTEP`` + a DCP checkpoint and resume, launched with torchrun.

What it shows:

1. Sharding first, then the optimizer: ``fully_shard`` every block and the root, then
   ``DistributedSTEP(sparse_param_groups(model, "2:4"), ...)`` (collective: every rank builds it).
   The kernels run on each rank's shard; AutoSwitch's statistics are summed over the ranks, so all
   of them switch at the same step.
2. A DCP checkpoint mid phase 2 (``get_state_dict`` + ``dcp.save``, the lr schedule included), and
   a resume into a fresh model and optimizer: ``prepare_optimizer_for_load`` gives the fresh
   optimizer (still in phase 1) the checkpoint's state layout, then ``dcp.load`` +
   ``set_state_dict``. The resumed run must end bit-identical to the uninterrupted one.
3. At the end every target (the blocks' Linear weights, gathered with ``full_tensor()``) is 2:4.

The same script runs on CPU (gloo) and on GPUs (NCCL, one GPU per rank). The model is
``step_kernels.models.TinyGPT`` (random init) on the Python standard library's own source files;
each rank trains on its own batches.

Run (full size: d=256, 6 layers, ctx 128, 2000 steps; on GPUs)::

    torchrun --nproc-per-node 2 examples/fsdp2_torchrun.py --ckpt-dir fsdp2_ckpt

Smoke run (d=64, 2 layers, 16 steps, checkpoint at step 12; what ``make test`` runs, on CPU)::

    torchrun --nproc-per-node 2 examples/fsdp2_torchrun.py --smoke --ckpt-dir /tmp/fsdp2_smoke
"""

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import step_kernels as sk
from step_kernels.demo import warmup_cosine
from step_kernels.distributed import DistributedSTEP, prepare_optimizer_for_load
from step_kernels.models import TinyGPT, batches, stdlib_corpus
from step_kernels.targets import find_targets


def build(args, mesh, device, seed):
    """A TinyGPT sharded with FSDP2 (every block, then the root), its DistributedSTEP and lr schedule."""
    torch.manual_seed(seed)
    model = TinyGPT(n_head=4, **args.size).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = DistributedSTEP(sk.sparse_param_groups(model, "2:4", weight_decay=0.01), lr=3e-3,
                          betas=(0.9, 0.95), total_steps=args.steps)
    return model, opt, warmup_cosine(opt, args.steps)


def train(args, model, opt, schedule, data, start, stop, on_step=lambda step: None):
    """Steps ``start + 1 .. stop``; the batch of each (step, rank) is fixed, so a resume sees the same data."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(start + 1, stop + 1):
        gen = torch.Generator(data.device).manual_seed(step * world + rank)
        loss = model.loss(*batches(data, args.batch, args.size["ctx"], gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if rank == 0 and step % max(1, args.steps // 8) == 0:
            print(f"step {step}/{args.steps}  loss (rank 0) {loss.item():.3f}  phase {opt.phase}", flush=True)
        on_step(step)


def checkpoint_state(model, opt, schedule):
    """What goes into (and comes back from) the DCP checkpoint."""
    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd, "schedule": schedule.state_dict()}


def full_params(model):
    return {name: p.full_tensor() for name, p in model.named_parameters()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps of a tiny model (what make test runs)")
    parser.add_argument("--ckpt-dir", default="fsdp2_ckpt", help="the DCP checkpoint directory")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.batch = dict(d_model=64, n_layer=2, ctx=64), 16, 8
    else:
        args.size, args.steps, args.batch = dict(d_model=256, n_layer=6, ctx=128), 2000, 16
    # AutoSwitch switches by 50% of total_steps at the latest: the checkpoint at 75% is in phase 2.
    save_at = args.steps * 3 // 4

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend, device = "nccl", torch.device("cuda", torch.cuda.current_device())
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    data = stdlib_corpus().to(device)

    # The uninterrupted run, which saves a DCP checkpoint at step save_at.
    model, opt, schedule = build(args, mesh, device, seed=0)

    def save(step):
        if step == save_at:
            dcp.save(checkpoint_state(model, opt, schedule), checkpoint_id=args.ckpt_dir)
            if rank == 0:
                print(f"saved a DCP checkpoint at step {step} (phase {opt.phase}) to {args.ckpt_dir}", flush=True)

    train(args, model, opt, schedule, data, 0, args.steps, save)
    assert opt.switch_step is not None and opt.switch_step < save_at, \
        f"switch at {opt.switch_step}, not before the checkpoint at {save_at}"
    want = full_params(model)

    # A fresh model and optimizer (another init seed), resumed from the checkpoint.
    fresh, fresh_opt, fresh_schedule = build(args, mesh, device, seed=1)
    prepare_optimizer_for_load(fresh_opt, args.ckpt_dir)  # the fresh optimizer is still in phase 1
    state = checkpoint_state(fresh, fresh_opt, fresh_schedule)
    dcp.load(state, checkpoint_id=args.ckpt_dir)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    fresh_schedule.load_state_dict(state["schedule"])
    assert fresh_opt.phase == "sparse" and fresh_opt.switch_step == opt.switch_step
    train(args, fresh, fresh_opt, fresh_schedule, data, save_at, args.steps)
    got = full_params(fresh)
    for name, p in want.items():
        assert torch.equal(got[name], p), f"rank {rank}: the resumed run differs in {name}"

    for t in find_targets(model):
        w = t.param.full_tensor()
        assert torch.equal(sk.nm_prune(w, 2, 4, t.group_dim)[0], w), f"{t.name} is not 2:4"
    switch_steps = [None] * world
    dist.all_gather_object(switch_steps, opt.switch_step)
    assert len(set(switch_steps)) == 1, f"ranks switched at different steps: {switch_steps}"
    if rank == 0:
        print(f"{world} ranks ({backend}): switch at step {opt.switch_step} on every rank; resumed from step "
              f"{save_at}, the final weights are bit-identical to the uninterrupted run's; every target 2:4")
        print("fsdp2_torchrun: all checks passed", flush=True)
    dist.barrier()
    if dist.get_backend() == "gloo":
        # Every rank has passed the final barrier, so all work is done. Tearing gloo down here can
        # abort a rank whose peer already closed its sockets ("terminate called without an active
        # exception", seen on a loaded 2-core machine), so a gloo run leaves without it.
        sys.stdout.flush()
        os._exit(0)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
