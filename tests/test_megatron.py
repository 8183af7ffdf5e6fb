"""step_kernels.megatron: STEP behind Megatron-Core's optimizer interface, tensor parallelism.

In-process tests cover the layout checks, the param groups and the MegatronSTEP wrapper against a
plain STEP; one 2-process gloo job (tests/multiproc/megatron_worker.py) trains Megatron's
ColumnParallelLinear/RowParallelLinear with TP=2 and compares with TP=1. Megatron's grad scalers,
its DistributedDataParallel and its grad-norm code allocate on CUDA: they are exercised by
test_megatron_ddp_clip_and_loss_scale_on_gpu only, which needs a GPU.

The distributed optimizer: a second 2-process job (DP=2) and a 4-process one (TP=2 x DP=2) train
under Megatron's real DistributedDataParallel (its buffers moved to the CPU by patching
``torch.cuda.current_device`` while it is built) with and without ``use_distributed_optimizer``;
the shard layouts of large DP sizes are built by Megatron's own buffer code on stand-in groups.
test_distributed_optimizer_on_gpu runs the comparison on CUDA without the patch.
"""

import copy
import os
import sys

import pytest
import torch
from torch import nn

import step_kernels as sk
from step_kernels import reference as ref
from step_kernels.megatron import check_shard_alignment, check_tensor_parallel, megatron_param_groups

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "multiproc"))
import common  # noqa: E402
from test_distributed import launch  # noqa: E402


class RowParallelLinear(nn.Module):
    """Stand-in with the layout and attributes of Megatron's RowParallelLinear (input dim split)."""

    def __init__(self, out_features, local_in, tp=1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, local_in) * 0.2)
        self.weight.tensor_model_parallel, self.weight.partition_dim = tp > 1, 1
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return x @ self.weight.t() + self.bias, None


class ColumnParallelLinear(RowParallelLinear):
    """Stand-in with the layout and attributes of Megatron's ColumnParallelLinear (output dim split)."""

    def __init__(self, local_out, in_features, tp=1):
        super().__init__(local_out, in_features, tp)
        self.weight.partition_dim = 0


class StandIn(nn.Module):
    def __init__(self, hidden=32, tp=1):
        super().__init__()
        self.fc1 = ColumnParallelLinear(hidden // tp, 16, tp)
        self.fc2 = RowParallelLinear(16, hidden // tp, tp)
        self.norm = nn.LayerNorm(16)
        self.output_layer = ColumnParallelLinear(4, 16)

    def forward(self, x):
        h = torch.tanh(self.fc1(x)[0])
        return self.output_layer(self.norm(torch.tanh(self.fc2(h)[0])))[0]


# ---------------------------------------------------------------------------------------------
# layouts and param groups (no megatron-core needed)
# ---------------------------------------------------------------------------------------------


def test_check_shard_alignment():
    check_shard_alignment([("w", 16, 0, 64), ("w", 16, 64, 128), ("v", 32, 8, 8)], 8)
    with pytest.raises(ValueError, match=r"w: the optimizer shard \[0, 66\) .* splits an N:M group of M=4"):
        check_shard_alignment([("w", 16, 0, 66)], 4)
    with pytest.raises(ValueError, match=r"v: the optimizer shard \[2, 64\)"):
        check_shard_alignment([("w", 16, 0, 64), ("v", 16, 2, 64)], 4)
    with pytest.raises(ValueError, match="w: input size 12 is not divisible by M=8"):
        check_shard_alignment([("w", 12, 0, 96)], 8)


def test_check_tensor_parallel_names_layer_and_tp_size():
    model = StandIn(hidden=24, tp=2)  # RowParallelLinear: 24 inputs over 2 ranks = 12 per rank
    check_tensor_parallel([("fc1", model.fc1, "2:4"), ("fc2", model.fc2, "2:4")], 2)
    with pytest.raises(ValueError, match=r"fc2\.weight: RowParallelLinear splits the input dim over 2 tensor-parallel "
                                         r"ranks: input size 24 gives 12 per rank, not divisible by M=8 .* divisible "
                                         r"by 16"):
        check_tensor_parallel([("fc2", model.fc2, "2:8")], 2)
    with pytest.raises(ValueError, match=r"extra\.weight: a Linear copied on all 2 tensor-parallel ranks"):
        check_tensor_parallel([("extra", nn.Linear(16, 8), "2:4")], 2)
    check_tensor_parallel([("extra", nn.Linear(16, 8), "2:4")], 1)
    with pytest.raises(ValueError, match=r"extra\.weight: input size 12 .* not divisible by M=8"):
        check_tensor_parallel([("extra", nn.Linear(12, 8), "2:8")], 1)


def test_megatron_param_groups_targets_and_weight_decay():
    groups = megatron_param_groups([StandIn()], "2:4", weight_decay=0.1)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert [n for g in groups if g["sparsity"] for n in g["param_names"]] == ["fc1.weight", "fc2.weight"]
    assert by_name["fc1.weight"]["nm_dim"] == 1 and by_name["fc1.weight"]["weight_decay"] == 0.1
    assert by_name["output_layer.weight"]["sparsity"] is None  # Megatron's head stays dense
    assert by_name["output_layer.weight"]["weight_decay"] == 0.1
    for name in ("fc1.bias", "norm.weight", "norm.bias", "output_layer.bias"):
        assert by_name[name]["weight_decay"] == 0.0, name
    two = megatron_param_groups([StandIn(), StandIn()], overrides={r"fc2": "1:4"})
    names = {n: g["sparsity"] for g in two for n in g["param_names"]}
    assert names["chunk0.fc1.weight"] == "2:4" and names["chunk1.fc2.weight"] == "1:4"


# ---------------------------------------------------------------------------------------------
# MegatronSTEP in one process
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mcore():
    pytest.importorskip("megatron.core")
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler

    from step_kernels.megatron import MegatronSTEP, get_step_optimizer

    return OptimizerConfig, ConstantGradScaler, MegatronSTEP, get_step_optimizer


def opt_config(mcore, **kwargs):
    OptimizerConfig = mcore[0]
    kwargs.setdefault("clip_grad", 0.0)
    return OptimizerConfig(optimizer="adam", lr=1e-2, adam_beta1=common.BETAS[0], adam_beta2=common.BETAS[1],
                           weight_decay=0.01, **kwargs)


def run(model, opt, steps, dtype, start=0):
    for step in range(start, steps):
        opt.zero_grad()
        x, y = common.global_batch(step)
        loss = nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        scale = opt.get_loss_scale() if hasattr(opt, "get_loss_scale") else torch.ones(())
        (loss * scale.reshape(())).backward()
        result = opt.step()
        if isinstance(result, tuple):
            assert result[0] is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_megatron_step_is_step_bit_for_bit(mcore, dtype):
    """Through Megatron's interface the step is STEP's, and the model parameters are exactly
    mask(master) in the model dtype (STEP's write in place of Megatron's main-to-model copy)."""
    get_step_optimizer = mcore[3]
    torch.manual_seed(0)
    model = StandIn().to(dtype)
    peer_model = copy.deepcopy(model)
    opt = get_step_optimizer(opt_config(mcore), [model], "2:4", switch=common.SWITCH, backend="reference")
    peer = sk.STEP(megatron_param_groups([peer_model], "2:4", weight_decay=0.01), lr=1e-2, betas=common.BETAS,
                   weight_decay=0.01, switch=common.SWITCH, backend="reference")
    run(model, opt, 20, dtype)
    run(peer_model, peer, 20, dtype)
    assert opt.phase == "sparse" and opt.switch_step == common.SWITCH
    for (name, p), q in zip(model.named_parameters(), peer_model.parameters()):
        assert torch.equal(p, q), name
        master = opt.state[p].get("master", p)
        torch.testing.assert_close(master, peer.state[q].get("master", q), rtol=0, atol=0)
        if name in ("fc1.weight", "fc2.weight"):
            master = ref.nm_prune(master, 2, 4, 1)[0]
        assert torch.equal(p, master.to(dtype)), name


def test_loss_scale_and_clipping_fold_into_grad_scale(mcore):
    """A loss scale S and a clip coefficient c divide the grads once, inside the step: the result
    matches STEP on grads unscaled and clipped by hand (to fp32 rounding of the two orders)."""
    _, ConstantGradScaler, MegatronSTEP, get_step_optimizer = mcore

    class CPUScaler(ConstantGradScaler):
        def __init__(self, scale):  # Megatron's scaler, its tensor on CPU
            self._scale = torch.tensor([scale])

    class TorchNorm(MegatronSTEP):
        def get_grad_norm(self):  # Megatron's grad norm needs CUDA and parallel_state
            return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.get_parameters()]))

    torch.manual_seed(0)
    model = StandIn()
    peer_model = copy.deepcopy(model)
    clip = 2.5  # the grad norm runs from 4.3 down to 1.4: some steps are clipped, some not
    inner = get_step_optimizer(opt_config(mcore, clip_grad=clip), [model], switch=3, backend="reference").optimizer
    opt = TorchNorm(inner, opt_config(mcore, clip_grad=clip), grad_scaler=CPUScaler(1024.0))
    peer = sk.STEP(megatron_param_groups([peer_model], weight_decay=0.01), lr=1e-2, betas=common.BETAS,
                   weight_decay=0.01, switch=3, backend="reference")
    clipped = 0
    for step in range(8):
        run(model, opt, step + 1, torch.float32, start=step)
        peer.zero_grad()
        x, y = common.global_batch(step)
        nn.functional.mse_loss(peer_model(x), y).backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in peer_model.parameters()]))
        coeff = clip / (float(norm) + 1e-6)
        clipped += coeff < 1
        for p in peer_model.parameters():
            p.grad.mul_(min(coeff, 1.0))
        peer.step()
    assert 0 < clipped < 8  # clipped and unclipped steps
    for (name, p), q in zip(model.named_parameters(), peer_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        # m is linear in the grads: a missed unscale or clip shows here even where Adam's step hides it
        torch.testing.assert_close(opt.state[p]["exp_avg"], peer.state[q]["exp_avg"], rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(p == 0, q == 0), name
    assert opt.get_loss_scale().item() == 1024.0


def test_skipped_step_on_non_finite_grads(mcore):
    _, ConstantGradScaler, MegatronSTEP, get_step_optimizer = mcore

    class CPUScaler(ConstantGradScaler):
        def __init__(self, scale):
            self._scale = torch.tensor([scale])

    model = StandIn()
    inner = get_step_optimizer(opt_config(mcore), [model], backend="reference").optimizer
    opt = MegatronSTEP(inner, opt_config(mcore), grad_scaler=CPUScaler(8.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    model(torch.randn(2, 16)).sum().backward()
    model.fc1.weight.grad[0, 0] = float("inf")
    assert opt.step() == (False, None, None)
    assert opt.optimizer.step_count == 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_state_dict_round_trip_resumes(mcore):
    get_step_optimizer = mcore[3]
    torch.manual_seed(0)
    model = StandIn()
    opt = get_step_optimizer(opt_config(mcore), [model], switch=5, backend="reference")
    run(model, opt, 8, torch.float32)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(model, opt, 12, torch.float32, start=8)
    torch.manual_seed(1)
    fresh = StandIn()
    fresh.load_state_dict(saved_model)
    fresh_opt = get_step_optimizer(opt_config(mcore), [fresh], switch=5, backend="reference")
    fresh_opt.load_state_dict(saved_opt)
    assert fresh_opt.phase == "sparse" and fresh_opt.optimizer.step_count == 8
    run(fresh, fresh_opt, 12, torch.float32, start=8)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


def test_unsupported_configurations(mcore):
    get_step_optimizer = mcore[3]
    with pytest.raises(ValueError, match=r"use_distributed_optimizer=True needs every model chunk wrapped in "
                                         r"megatron\.core\.distributed\.DistributedDataParallel .* model chunk 0 "
                                         r"\(StandIn\) is not"):
        get_step_optimizer(opt_config(mcore, use_distributed_optimizer=True), [StandIn()])
    with pytest.raises(ValueError, match="config.optimizer must be 'adam'"):
        OptimizerConfig = mcore[0]
        get_step_optimizer(OptimizerConfig(optimizer="sgd", lr=1e-2), [StandIn()])
    opt = get_step_optimizer(opt_config(mcore), [StandIn()])
    with pytest.raises(NotImplementedError, match="dist-checkpointing"):
        opt.sharded_state_dict({})


# ---------------------------------------------------------------------------------------------
# tensor parallelism: 2 gloo ranks
# ---------------------------------------------------------------------------------------------


def test_tensor_parallel_2_matches_single_rank(mcore, tmp_path):
    launch(os.path.join(HERE, "multiproc", "megatron_worker.py"), tmp_path)
    ranks = [torch.load(os.path.join(tmp_path, f"megatron-rank{r}.pt"), weights_only=False) for r in range(2)]
    for rank, res in enumerate(ranks):
        for dtype in ("fp32", "bf16"):
            for kind, switch in (("fixed", common.SWITCH), ("auto", 14)):
                got, want = res[f"tp2-{dtype}"][kind], res[f"tp1-{dtype}"][kind]
                where = f"rank {rank} {dtype} {kind}"
                assert res[f"tp2-{dtype}"][kind + "_targets"] == ["fc1.weight", "fc2.weight"]
                assert got["switch_step"] == want["switch_step"] == switch, where
                assert got["written_from_masters"] and want["written_from_masters"], where
                for z, w in zip(got["z_history"], want["z_history"]):
                    # fp32: the row-parallel all-reduce changes the summation order (~1e-7)
                    assert z == pytest.approx(w, rel=1e-5 if dtype == "fp32" else 0.05), where
                for name, master in want["masters"].items():
                    if dtype == "fp32":
                        torch.testing.assert_close(got["masters"][name], master, rtol=1e-5, atol=1e-6)
                        assert torch.equal(got["params"][name] == 0, want["params"][name] == 0), where + name
                    else:
                        # bf16 activations round differently when the sum is split over ranks; Adam
                        # moves a weight by <= ~lr per step, so 30 steps may drift by a few lr.
                        torch.testing.assert_close(got["masters"][name], master, rtol=0, atol=5e-2)
                        agree = (got["params"][name] == 0) == (want["params"][name] == 0)
                        assert agree.float().mean() >= 0.97, where + name
        bad = res["tp2-bad"]
        assert bad["row_parallel_split"].startswith("ValueError: fc2.weight: RowParallelLinear splits the input dim "
                                                    "over 2 tensor-parallel ranks: input size 24 gives 12 per rank")
        assert "ranks disagree on param_groups[0] sparsity: rank 0 has '2:4', rank 1 has '2:8'" in bad["mismatched_nm"]
        assert bad["replicated_target"].startswith("ValueError: extra.weight: a Linear copied on all 2")
        assert bad["distributed_optimizer"].startswith("ValueError: get_step_optimizer: use_distributed_optimizer=True "
                                                       "needs every model chunk wrapped")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Megatron's DDP, grad scaler and clipping need CUDA")
def test_megatron_ddp_clip_and_loss_scale_on_gpu(mcore, tmp_path):
    """Megatron's DistributedDataParallel (grads in main_grad), a constant loss scale and grad
    clipping on CUDA, against the same run without DDP (grads in .grad)."""
    launch(os.path.join(HERE, "multiproc", "megatron_worker.py"), tmp_path, "gpu", nproc=1)
    res = torch.load(os.path.join(tmp_path, "megatron-gpu-rank0.pt"), weights_only=False)
    got, want = res["ddp"], res["plain"]
    assert got["switch_step"] == want["switch_step"] == common.SWITCH
    assert got["written_from_masters"] and want["written_from_masters"]
    for name, master in want["masters"].items():
        torch.testing.assert_close(got["masters"][name], master, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# Megatron's distributed optimizer: gloo ranks (DP=2; TP=2 x DP=2), and the same comparison on a GPU
# ---------------------------------------------------------------------------------------------


def check_sharded_matches_replicated(res, where, dtypes=("fp32", "bf16")):
    """The distributed optimizer's run equals DDP without it: every rank's grads are the same
    (a reduce-scatter and an all-reduce add the same two values), and STEP's update is elementwise
    with groups whole in every shard, so masters and parameters are bit-identical; only the
    AutoSwitch sums are added in another order (per shard, then over TP and DP)."""
    for dtype in dtypes:
        for kind, switch in (("fixed", common.SWITCH), ("auto", 14)):
            here = f"{where} {dtype} {kind}"
            want, got = res[dtype][f"{kind}-replicated"], res[dtype][f"{kind}-sharded"]
            assert got["switch_step"] == want["switch_step"] == switch, here
            assert got["written_from_masters"] and want["written_from_masters"], here
            assert got["buckets"] >= 2, here
            assert got["overlap_param_gather"] == (kind == "auto"), here  # both ways of gathering params
            assert got["z_history"] == pytest.approx(want["z_history"], rel=1e-5), here
            assert got["flip_rate"] == pytest.approx(want["flip_rate"], rel=1e-6), here
            for name, param in want["params"].items():
                assert torch.equal(got["params"][name], param), here + name
            assert got["masters"], here
            for name, (start, end, master) in got["masters"].items():
                assert torch.equal(master, want["masters"][name][2][start:end]), here + name
        # state_dict() at step 20 (phase 2), loaded into a fresh DDP and optimizer, resumes exactly
        resumed, full = res[dtype]["fixed-resumed"], res[dtype]["fixed-sharded"]
        assert resumed["switch_step"] == common.SWITCH and resumed["step"] == common.STEPS
        for name, param in full["params"].items():
            assert torch.equal(resumed["params"][name], param), f"{where} {dtype} resumed {name}"
        for name, (_, _, master) in full["masters"].items():
            assert torch.equal(resumed["masters"][name][2], master), f"{where} {dtype} resumed {name}"


def test_distributed_optimizer_matches_replicated(mcore, tmp_path):
    launch(os.path.join(HERE, "multiproc", "megatron_worker.py"), tmp_path, "distopt")
    ranks = [torch.load(os.path.join(tmp_path, f"megatron-distopt-rank{r}.pt"), weights_only=False) for r in range(2)]
    for rank, res in enumerate(ranks):
        check_sharded_matches_replicated(res, f"rank {rank}")
    # The two ranks' shards cover every parameter once, and a target's shard ends inside a row
    # (fc2's rows hold 48 inputs): groups, not rows, are what must stay whole.
    shards = [s for res in ranks for s in res["fp32"]["fixed-sharded"]["shards"]]
    params = ranks[0]["fp32"]["fixed-replicated"]["params"]
    for name, param in params.items():
        covered = torch.zeros(param.numel(), dtype=torch.int32)
        for _, start, end in (s for s in shards if s[0] == name):
            covered[start:end] += 1
        assert bool((covered == 1).all()), name
    assert any(name == "fc2.weight" and start % 48 for name, start, _ in shards)
    bad = [res["bad"] for res in ranks]
    assert bad[0] == bad[1]  # the same error on every rank
    bad = bad[0]
    assert "ranks disagree on param_groups[0] sparsity: rank 0 has '2:4', rank 1 has '1:4'" in bad["mismatched_nm"]
    assert "proj.weight: groups along dim 0 (a Conv1D layout) are strided" in bad["conv1d_target"]
    assert "extra.weight: not in the grad buffers of Megatron's DistributedDataParallel" in bad["unbuffered_param"]
    assert bad["add_group_later"].startswith("NotImplementedError: add_param_group: under Megatron's distributed")
    assert bad["split_default_padding"].startswith(
        "ValueError: layer0.weight: the optimizer shard [0, 6) of the flattened weight splits an N:M group of M=4")
    assert ("DP rank 4's shard of bucket 1 under Megatron's distributed optimizer with DP size 64: set "
            "DistributedDataParallelConfig(pad_buckets_for_high_nccl_busbw=True)") in bad["split_default_padding"]
    assert "splits an N:M group of M=32" in bad["split_any_padding"]
    assert "no Megatron padding setting aligns them at DP size 4096" in bad["split_any_padding"]
    assert bad["aligned_cover_once"] is True


def test_distributed_optimizer_with_tensor_parallel(mcore, tmp_path):
    """4 gloo ranks, TP=2 x DP=2: the statistics are summed over both groups (fp32 only)."""
    launch(os.path.join(HERE, "multiproc", "megatron_worker.py"), tmp_path, "distopt", nproc=4)
    for rank in range(4):
        res = torch.load(os.path.join(tmp_path, f"megatron-distopt-rank{rank}.pt"), weights_only=False)
        check_sharded_matches_replicated(res, f"rank {rank}", dtypes=("fp32",))
        # fc2 (RowParallelLinear) holds 24 of the 48 inputs on each TP rank: [16, 24] locally
        assert res["fp32"]["fixed-replicated"]["params"]["fc2.weight"].shape == (16, 24)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Megatron's DistributedDataParallel allocates on CUDA")
def test_distributed_optimizer_on_gpu(mcore, tmp_path):
    """Megatron's DDP with the distributed optimizer on CUDA (no patch; NCCL; STEP's Triton
    kernels on the shards) against DDP without it."""
    launch(os.path.join(HERE, "multiproc", "megatron_worker.py"), tmp_path, "gpu-distopt", nproc=1)
    res = torch.load(os.path.join(tmp_path, "megatron-gpu-distopt-rank0.pt"), weights_only=False)
    check_sharded_matches_replicated(res, "gpu")
