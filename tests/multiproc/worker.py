"""Multi-process worker of tests/test_distributed.py, launched with
``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/multiproc/worker.py MODE OUT``.

Each rank writes ``OUT/<mode>-rank<r>.pt``: what the test compares with a single-process run.
Modes: ``ddp``, ``fsdp`` (also saves a DCP checkpoint mid phase 2), ``fsdp_resume`` (loads it
into a fresh job and continues), ``bad`` (configurations that must fail on every rank).
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import _init_optim_state, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import step_kernels as sk  # noqa: E402
from step_kernels.distributed import DistributedSTEP, prepare_optimizer_for_load  # noqa: E402

CHECKPOINT_STEP = 20  # mid phase 2 for both the fixed (10) and the automatic (12) switch


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, opt, rank, world, start, stop, on_step=None):
    for step in range(start, stop):
        opt.zero_grad(set_to_none=True)
        common.loss_fn(model, *common.micro_batch(step, rank, world)).backward()
        opt.step()
        if on_step is not None:
            on_step(step + 1)


def run_ddp(rank, world, out):
    results = {}
    for kind, cls, extra in (("fixed", sk.STEP, {}), ("auto", DistributedSTEP, {"replica_group": dist.group.WORLD})):
        model = common.build_model()
        opt = common.make_optimizer(model, kind, cls=cls, **extra)
        ddp = DDP(model)
        train(ddp, opt, rank, world, 0, common.STEPS)
        results[kind] = common.summary(model, opt)
    return results


def run_hsdp(rank, world, results):
    """HSDP layout: a 2-D mesh (replicate 1, shard world). Statistics are summed over the shard
    dim only; the replicate dim is checked for agreement."""
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    model = fsdp_model(mesh, "auto")
    opt = common.make_optimizer(model, "auto", cls=DistributedSTEP)
    results["hsdp_groups"] = (len(opt._reduce_groups), len(opt._check_groups))
    train(model, opt, rank, world, 0, common.STEPS)
    results["auto_hsdp"] = common.summary(model, opt, full)


def fsdp_model(mesh, kind="fixed"):
    model = common.build_model(kind)
    for module in (model.fc1, model.proj, model.fc2, model.head):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run_fsdp(rank, world, out):
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for kind in common.KINDS:
        model = fsdp_model(mesh, kind)
        opt = common.make_optimizer(model, kind, cls=DistributedSTEP)
        state = opt.state[model.proj.weight]
        results[kind + "_state_placements"] = {k: str(getattr(v, "placements", "plain")) for k, v in state.items()}

        def checkpoint(step, kind=kind, model=model, opt=opt):
            if step == CHECKPOINT_STEP:
                model_sd, optim_sd = get_state_dict(model, opt)
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out, f"ckpt-{kind}"))
                results[kind + "_at_checkpoint"] = common.summary(model, opt, full)

        train(model, opt, rank, world, 0, common.STEPS, checkpoint)
        results[kind] = common.summary(model, opt, full)
        state = opt.state[model.proj.weight]
        results[kind + "_final_placements"] = {k: str(getattr(v, "placements", "plain")) for k, v in state.items()}
    run_hsdp(rank, world, results)
    return results


def run_fsdp_resume(rank, world, out):
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for kind in common.KINDS:
        model = fsdp_model(mesh, kind)
        opt = common.make_optimizer(model, kind, cls=DistributedSTEP)
        before = (opt.step_count, opt.phase, list(opt.stats()["z_history"]))
        _init_optim_state(opt)  # what DCP runs first: must not take a step
        results[kind + "_after_init"] = (before, (opt.step_count, opt.phase, list(opt.stats()["z_history"])))
        prepare_optimizer_for_load(opt, os.path.join(out, f"ckpt-{kind}"))
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(out, f"ckpt-{kind}"))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        results[kind + "_loaded"] = common.summary(model, opt, full)
        train(model, opt, rank, world, CHECKPOINT_STEP, common.STEPS)
        results[kind] = common.summary(model, opt, full)
    return results


def expect_error(results, name, build):
    """Run ``build``; record the ValueError it raises on this rank (or that none was raised)."""
    try:
        build()
        results[name] = None
    except ValueError as exc:
        results[name] = str(exc)
    dist.barrier()  # every rank got here: nobody hangs in a collective


def run_bad(rank, world, out):
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    results = {}

    def conv1d_split_rows():
        model = torch.nn.Sequential()
        model.add_module("proj", common.Conv1D(8, 20))  # 20 input rows: 10 per rank, not whole groups of 4
        fully_shard(model, mesh=mesh)
        DistributedSTEP(sk.sparse_param_groups(model, "2:4", exclude=[]), backend="reference")

    def linear_shard1_split():
        model = torch.nn.Sequential()
        model.add_module("fc", torch.nn.Linear(12, 8))  # Shard(1): local width 6, not divisible by 4
        parallelize_module(model, mesh, {"fc": RowwiseParallel()})
        DistributedSTEP(sk.sparse_param_groups(model, "2:4", exclude=[]), backend="reference")

    def mismatched_nm():
        model = fsdp_model(mesh)
        DistributedSTEP(sk.sparse_param_groups(model, "2:4" if rank == 0 else "2:8"), backend="reference")

    def mismatched_nm_ddp():
        model = common.build_model()
        DistributedSTEP(sk.sparse_param_groups(model, "2:4" if rank == 0 else "1:4"), backend="reference",
                        replica_group=dist.group.WORLD)

    def one_rank_bad_lr():
        model = fsdp_model(mesh)
        DistributedSTEP(sk.sparse_param_groups(model), lr=1e-3 if rank == 0 else -1.0, backend="reference")

    def good_shard1():
        model = torch.nn.Sequential()
        model.add_module("fc", torch.nn.Linear(16, 8))  # Shard(1): local width 8, whole groups
        parallelize_module(model, mesh, {"fc": RowwiseParallel()})
        DistributedSTEP(sk.sparse_param_groups(model, "2:4", exclude=[]), backend="reference")

    for name, build in (("conv1d_split_rows", conv1d_split_rows), ("linear_shard1_split", linear_shard1_split),
                        ("mismatched_nm", mismatched_nm), ("mismatched_nm_ddp", mismatched_nm_ddp),
                        ("one_rank_bad_lr", one_rank_bad_lr), ("good_shard1", good_shard1)):
        expect_error(results, name, build)
    return results


def main():
    mode, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"ddp": run_ddp, "fsdp": run_fsdp, "fsdp_resume": run_fsdp_resume, "bad": run_bad}[mode](rank, world, out)
    torch.save(results, os.path.join(out, f"{mode}-rank{rank}.pt"))
    dist.barrier()
    common.exit_now()


if __name__ == "__main__":
    main()
