"""step_kernels.distributed: DDP, FSDP2 and DCP checkpoints, in real 2-process gloo jobs on CPU.

The multi-process runs (tests/multiproc/worker.py) are compared with a single-process run of the same
global batch (tests/multiproc/common.py). The global batch is split into the same two micro-batches in
both, and for two ranks the gradient reduction (sum of two, halved) is exact in fp32, so grads are
bit-identical and every weight, state tensor and mask must match exactly; the AutoSwitch sums
(float64, summed per shard then over ranks) may differ in the last bits only.
"""

import os
import re
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import step_kernels as sk
from helpers import run_to_completion
from step_kernels.distributed import DistributedSTEP, check_group_layout, prepare_optimizer_for_load, shard_ranges

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "multiproc"))
import common  # noqa: E402

LAUNCH_TIMEOUT_S = 240  # a hang fails the test instead of blocking CI


def launch(script, *args, nproc=2):
    """Run ``script`` under ``torch.distributed.run --standalone`` with ``nproc`` gloo ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           script, *map(str, args)]
    return run_to_completion(cmd, f"{os.path.basename(script)} {args}", LAUNCH_TIMEOUT_S)


def results(out_dir, mode, nproc=2):
    return [torch.load(os.path.join(out_dir, f"{mode}-rank{r}.pt"), weights_only=False) for r in range(nproc)]


@pytest.fixture(scope="module")
def single():
    return {kind: common.single_process_run(kind) for kind in common.KINDS}


@pytest.fixture(scope="module")
def fsdp_dir(tmp_path_factory):
    """One FSDP2 job (fixed switch and AutoSwitch), which also saves DCP checkpoints at step 20."""
    out = tmp_path_factory.mktemp("fsdp")
    launch(os.path.join(HERE, "multiproc", "worker.py"), "fsdp", out)
    return out


def assert_same_run(got, want, where, flips=True):
    assert got["switch_step"] == want["switch_step"], where
    assert got["step"] == want["step"] and got["phase"] == want["phase"], where
    assert len(got["z_history"]) == len(want["z_history"]), where
    for z, w in zip(got["z_history"], want["z_history"]):
        assert z == pytest.approx(w, rel=1e-12), where
    for name, master in want["masters"].items():
        torch.testing.assert_close(got["masters"][name], master, rtol=0, atol=0, msg=f"{where}: master {name}")
    for name, param in want["params"].items():
        assert torch.equal(got["params"][name] == 0, param == 0), f"{where}: mask of {name}"
        torch.testing.assert_close(got["params"][name], param, rtol=0, atol=0, msg=f"{where}: param {name}")
    if flips:  # the last step's flip rate is not checkpoint state
        assert got["flip_rate"] == pytest.approx(want["flip_rate"], rel=1e-12), where
    assert got["precond_floor_count"] == want["precond_floor_count"], where


# ---------------------------------------------------------------------------------------------
# single process: layouts, errors, DCP plumbing
# ---------------------------------------------------------------------------------------------


class Placement:
    """Stand-ins for DTensor placements (matched by class name, as the module does)."""


class Shard(Placement):
    def __init__(self, dim):
        self.dim = dim


class Replicate(Placement):
    pass


class Partial(Placement):
    pass


@pytest.mark.parametrize("size,world", [(1, 2), (15, 2), (16, 2), (257, 4), (4097, 3), (6, 8)])
def test_shard_ranges_follow_torch_chunk(size, world):
    chunks = torch.arange(size).chunk(world)
    want = [(int(c[0]), len(c)) for c in chunks] + [(size, 0)] * (world - len(chunks))
    got = shard_ranges(size, 0, [world], [Shard(0)])
    assert [length for _, length in got] == [length for _, length in want]
    assert all(o == w for (o, n), (w, _) in zip(got, want) if n)


def test_shard_ranges_nested_and_replicated_mesh_dims():
    # (Shard(1), Shard(1)) on a 2x2 mesh: chunk 24 in 2, then each half in 2 again.
    assert shard_ranges(24, 1, [2, 2], [Shard(1), Shard(1)]) == [(0, 6), (6, 6), (12, 6), (18, 6)]
    # Replicate and shards of the other dim leave the group dim whole.
    assert shard_ranges(24, 1, [2, 3], [Replicate(), Shard(0)]) == [(0, 24)] * 6
    with pytest.raises(ValueError, match="Partial"):
        shard_ranges(24, 1, [2], [Partial()])


def test_check_group_layout_names_the_rank_and_parameter():
    check_group_layout("w", 32, 1, 4, [(0, 16), (16, 16)], "layout")
    check_group_layout("w", 4, 1, 4, [(0, 4), (4, 0)], "layout")  # an empty shard holds no group
    with pytest.raises(ValueError, match=r"blocks\.0\.proj\.weight: layout splits .* rank 1 holds 12 of the 20 "
                                         r"entries of dim 0 .* starting at 8"):
        check_group_layout("blocks.0.proj.weight", 20, 0, 8, [(0, 8), (8, 12)], "layout")
    with pytest.raises(ValueError, match="rank 0 holds 6 of the 12 entries of dim 1"):
        check_group_layout("fc.weight", 12, 1, 4, [(0, 6), (6, 6)], "layout")


def test_without_groups_it_is_step_bit_for_bit():
    """No DTensor and no group: DistributedSTEP takes exactly STEP's steps (DDP, one process)."""
    runs = []
    for cls in (sk.STEP, DistributedSTEP):
        model = common.build_model()
        opt = common.make_optimizer(model, "auto", cls=cls)
        for step in range(common.STEPS):
            opt.zero_grad()
            common.loss_fn(model, *common.global_batch(step)).backward()
            opt.step()
        runs.append(common.summary(model, opt))
    assert runs[0]["switch_step"] == 12
    assert_same_run(runs[1], runs[0], "DistributedSTEP vs STEP")


def test_local_config_errors_still_raise_without_groups():
    model = common.build_model()
    with pytest.raises(ValueError, match="lr must be"):
        DistributedSTEP(sk.sparse_param_groups(model), lr=-1.0)
    with pytest.raises(ValueError, match=r"fc1\.weight: input size 16 .* M=32"):
        groups = sk.sparse_param_groups(model, "2:8")
        groups[0]["sparsity"] = "2:32"
        DistributedSTEP(groups)


def test_add_param_group_after_construction():
    model = common.build_model()
    groups = sk.sparse_param_groups(model)
    opt = DistributedSTEP(groups[:1], lr=1e-2, backend="reference")
    opt.add_param_group(groups[1])
    assert len(opt.param_groups) == 2 and "exp_avg" in opt.state[groups[1]["params"][0]]
    with pytest.raises(ValueError, match="lr must be"):
        opt.add_param_group(dict(groups[2], lr=-1.0))
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("kind", ["fixed", "auto"])
def test_dcp_round_trip_in_one_process_resumes_identically(kind, tmp_path):
    """DCP save mid phase 2, load into a fresh optimizer (phase-1 layout), continue: identical."""
    def build():
        model = common.build_model()
        return model, common.make_optimizer(model, kind, cls=DistributedSTEP)

    def train(model, opt, start, stop):
        for step in range(start, stop):
            opt.zero_grad()
            common.loss_fn(model, *common.global_batch(step)).backward()
            opt.step()

    model, opt = build()
    train(model, opt, 0, 20)
    assert opt.phase == "sparse"
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    train(model, opt, 20, common.STEPS)
    want = common.summary(model, opt)

    model, opt = build()
    assert prepare_optimizer_for_load(opt, str(tmp_path)) is True
    model_sd, optim_sd = get_state_dict(model, opt)
    assert opt.step_count == 0 and opt.phase == "dense" and opt.stats()["z_history"] == []
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert opt.step_count == 20 and opt.phase == "sparse"
    assert opt.switch_step == {"fixed": common.SWITCH, "auto": 12}[kind]
    train(model, opt, 20, common.STEPS)
    assert_same_run(common.summary(model, opt), want, "resumed")


def test_dcp_round_trip_with_a_target_still_on_live_v(tmp_path):
    """fc2.weight is frozen (no grad) through phase 1, so after the switch it steps with live v
    until it has had switch_step steps of its own; a DCP checkpoint taken then holds its
    exp_avg_sq, prepare_optimizer_for_load keeps that layout for it, and the run resumes exactly."""
    def build():
        model = common.build_model()
        opt = DistributedSTEP(sk.sparse_param_groups(model, "2:4", weight_decay=0.01), lr=1e-2, betas=common.BETAS,
                              switch=3, backend="reference")
        return model, opt

    def train(model, opt, start, stop):
        for step in range(start, stop):
            model.fc2.weight.requires_grad_(step >= 4)
            opt.zero_grad()
            common.loss_fn(model, *common.global_batch(step)).backward()
            opt.step()

    model, opt = build()
    train(model, opt, 0, 6)
    assert "exp_avg_sq" in opt.state[model.fc2.weight] and "precond" in opt.state[model.fc1.weight]
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    train(model, opt, 6, 12)
    assert "precond" in opt.state[model.fc2.weight]
    want = common.summary(model, opt)

    model, opt = build()
    assert prepare_optimizer_for_load(opt, str(tmp_path)) is True
    assert "exp_avg_sq" in opt.state[model.fc2.weight] and "precond" in opt.state[model.fc1.weight]
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert opt.state[model.fc2.weight]["step"] == 2
    train(model, opt, 6, 12)
    assert_same_run(common.summary(model, opt), want, "resumed")


def test_prepare_for_load_leaves_a_phase1_checkpoint_alone(tmp_path):
    model = common.build_model()
    opt = common.make_optimizer(model, "fixed", cls=DistributedSTEP)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    assert prepare_optimizer_for_load(opt, str(tmp_path)) is False
    assert all("exp_avg_sq" in opt.state[p] for _, p, _ in opt._targets())


# ---------------------------------------------------------------------------------------------
# two processes
# ---------------------------------------------------------------------------------------------


def test_ddp_matches_single_process(single, tmp_path):
    launch(os.path.join(HERE, "multiproc", "worker.py"), "ddp", tmp_path)
    for rank, res in enumerate(results(tmp_path, "ddp")):
        for kind in ("fixed", "auto"):
            assert_same_run(res[kind], single[kind], f"DDP rank {rank} {kind}")
    assert single["fixed"]["switch_step"] == common.SWITCH and single["auto"]["switch_step"] == 12


def test_fsdp2_matches_single_process(single, fsdp_dir):
    shard = "(Shard(dim=0),)"
    for rank, res in enumerate(results(fsdp_dir, "fsdp")):
        for kind in common.KINDS:
            assert_same_run(res[kind], single[kind], f"FSDP2 rank {rank} {kind}")
            # state tensors are DTensors with the parameter's placement
            if kind == "srste_bf16":  # fp32 masters from the start, live v throughout
                assert res[kind + "_state_placements"] == res[kind + "_final_placements"] == {
                    "step": "plain", "exp_avg": shard, "exp_avg_sq": shard, "master": shard}
            else:  # the per-parameter step count is a plain int on every rank
                assert res[kind + "_state_placements"] == {"step": "plain", "exp_avg": shard, "exp_avg_sq": shard}
                assert res[kind + "_final_placements"] == {"step": "plain", "exp_avg": shard, "precond": shard,
                                                           "master": shard}
    assert single["srste_bf16"]["params"]["fc1.weight"].dtype == torch.bfloat16
    # fc1.weight's 4 dead columns (v == 0) are at the floor and get the whole tensor's RMS p on
    # every rank, not their shard's: the FSDP2 runs above match the single process exactly
    assert single["unfed"]["precond_floor_count"] == 4 * 32


def test_hsdp_2d_mesh_reduces_over_the_shard_dim_only(single, fsdp_dir):
    for rank, res in enumerate(results(fsdp_dir, "fsdp")):
        assert res["hsdp_groups"] == (1, 2)  # sums over the shard dim; agreement over both dims
        assert_same_run(res["auto_hsdp"], single["auto"], f"HSDP rank {rank}")


def test_fsdp2_dcp_checkpoint_mid_phase2_resumes_identically(single, fsdp_dir):
    launch(os.path.join(HERE, "multiproc", "worker.py"), "fsdp_resume", fsdp_dir)
    saved = results(fsdp_dir, "fsdp")
    for rank, res in enumerate(results(fsdp_dir, "fsdp_resume")):
        for kind in common.KINDS:
            # DCP's zero-grad initialisation step did not run: no step, phase or Z change
            phase = "sparse" if kind == "srste_bf16" else "dense"
            assert res[kind + "_after_init"] == ((0, phase, []), (0, phase, [])), kind
            assert_same_run(res[kind + "_loaded"], saved[rank][kind + "_at_checkpoint"], f"loaded rank {rank} {kind}",
                            flips=False)
            assert res[kind + "_loaded"]["phase"] == "sparse"
            assert_same_run(res[kind], single[kind], f"resumed FSDP2 rank {rank} {kind}")


def test_bad_configurations_fail_on_every_rank(tmp_path):
    launch(os.path.join(HERE, "multiproc", "worker.py"), "bad", tmp_path)
    ranks = results(tmp_path, "bad")
    expected = {
        "conv1d_split_rows": r"proj\.weight: its layout \(Shard\(dim=0\),\) .* splits its N:M groups: rank 0 holds 10 "
                             r"of the 20 entries of dim 0",
        "linear_shard1_split": r"fc\.weight: its layout \(Shard\(dim=1\),\) .* "
                               r"rank 0 holds 6 of the 12 entries of dim 1",
        "mismatched_nm": r"ranks disagree on param_groups\[0\] sparsity: rank 0 has '2:4', rank 1 has '2:8'",
        "mismatched_nm_ddp": r"ranks disagree on param_groups\[0\] sparsity: rank 0 has '2:4', rank 1 has '1:4'",
        "one_rank_bad_lr": r"failed on 1 of 2 ranks: rank 1: ValueError: lr must be a finite number >= 0, got -1.0",
    }
    for rank, res in enumerate(ranks):
        for name, pattern in expected.items():
            assert res[name] is not None, f"{name}: rank {rank} raised nothing"
            assert re.search(pattern, res[name]), f"{name} rank {rank}: {res[name]}"
        assert res["good_shard1"] is None, res["good_shard1"]
