"""Bad input to the constructor, ``step`` and ``add_param_group``: every failure raises an error
of the documented type that names the group or parameter at fault, and leaves the model and the
optimizer bit-identical (parameters, grads, state, param groups, public attributes).

Also: non-contiguous parameters (a transposed view, a channels_last conv) train on every backend
exactly as their contiguous twins do (docs/design.md section 4; issue 12 items 2 and 8)."""

import os

import pytest
import torch
from torch import nn

import step_kernels as sk
from helpers import assert_same, snapshot

BACKENDS = ["reference", "cpu", "triton"]

# torch warns about a duplicate parameter before STEP rejects it
pytestmark = pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend that can run here: Triton on CPU tensors needs TRITON_INTERPRET=1."""
    if request.param == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    if sk.ops.backend_status(request.param, torch.device("cpu")) is not None:
        pytest.skip(sk.ops.backend_status(request.param, torch.device("cpu")))
    return request.param


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(dtype)


def set_grads(model, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def fails_and_changes_nothing(call, model, opt, error, match):
    """``call()`` raises ``error`` matching ``match``; model and optimizer are bit-identical after."""
    before = snapshot(model, opt)
    with pytest.raises(error, match=match):
        call()
    assert_same(before, snapshot(model, opt))


# ---------------------------------------------------------------------------------------------
# the constructor: every group is validated before any state is created or any target masked
# ---------------------------------------------------------------------------------------------


def _groups(model, **second):
    """Param groups of ``mlp``: targets first (masked at once by "srste"), then ``second``."""
    return [{"params": [model[0].weight, model[2].weight], "sparsity": "2:4", "param_names": ["0.weight", "2.weight"]},
            dict({"params": [model[0].bias, model[2].bias], "param_names": ["0.bias", "2.bias"]}, **second)]


CONSTRUCTOR_CASES = {
    "negative_lr_in_group_1": (lambda m: _groups(m, lr=-1.0), {}, ValueError, r"param_groups\[1\]: lr must be"),
    "tensor_lr": (lambda m: _groups(m), dict(lr=torch.tensor([1e-3, 1e-3])), ValueError,
                  r"Tensor lr must be 1-element"),
    "tensor_lr_in_group_1": (lambda m: _groups(m, lr=torch.tensor([1e-3, 2e-3])), {}, ValueError,
                             r"param_groups\[1\]: Tensor lr must be 1-element"),
    "betas_one": (lambda m: _groups(m, betas=(1.0, 0.999)), {}, ValueError, r"param_groups\[1\]: betas"),
    "bad_sparsity_in_group_1": (lambda m: _groups(m, sparsity="2:3"), {}, ValueError, r"param_groups\[1\]: sparsity"),
    "1d_target": (lambda m: _groups(m, sparsity="2:4"), {}, ValueError, r"0\.bias: N:M targets must be 2-D"),
    "indivisible_target": (lambda m: [{"params": [m[0].weight], "sparsity": "2:4"},
                                      {"params": [nn.Linear(6, 4).weight], "sparsity": "2:4"}], {}, ValueError,
                           r"param_groups\[1\]\['params'\]\[0\]: input size 6"),
    "bad_nm_dim": (lambda m: [{"params": [m[0].weight], "sparsity": "2:4"},
                              {"params": [m[2].weight], "sparsity": "2:4", "nm_dim": 3}], {}, ValueError, r"nm_dim"),
    "duplicate_in_group": (lambda m: [{"params": [m[0].weight], "sparsity": "2:4"},
                                      {"params": [m[0].bias, m[0].bias]}], {}, ValueError,
                           r"param_groups\[1\]\['params'\]\[1\]: appears twice"),
    "in_two_groups": (lambda m: [{"params": [m[0].weight], "sparsity": "2:4"}, {"params": [m[0].weight]}], {},
                      ValueError, r"more than one parameter group"),
    "float64_param": (lambda m: [{"params": [m[0].weight], "sparsity": "2:4"},
                                 {"params": [nn.Parameter(torch.zeros(3, dtype=torch.float64))]}], {}, ValueError,
                      r"param_groups\[1\]\['params'\]\[0\]: dtype torch.float64"),
    "two_devices": (lambda m: [{"params": [m[0].weight], "sparsity": "2:4"},
                               {"params": [nn.Parameter(torch.zeros(3, device="meta"))]}], {}, ValueError,
                    r"param_groups\[1\]: all parameters must be on one device"),
    "param_names_length": (lambda m: [{"params": [m[0].weight], "sparsity": "2:4", "param_names": ["0.weight"]},
                                      {"params": [m[0].bias], "param_names": ["a", "b"]}], {}, ValueError,
                           r"param_groups\[1\]: param_names has 2 entries for 1 params"),
    "non_leaf": (lambda m: [{"params": [m[0].weight], "sparsity": "2:4"}, {"params": [m[0].bias * 2]}], {},
                 ValueError, r"non-leaf"),
    "empty": (lambda m: [], {}, ValueError, r"empty parameter list"),
}


@pytest.mark.parametrize("recipe", ["srste", "step"])
@pytest.mark.parametrize("case", sorted(CONSTRUCTOR_CASES))
def test_constructor_fails_before_touching_the_model(case, recipe):
    """"srste" masks its targets at creation: a bad later group must not leave them masked."""
    make_groups, kwargs, error, match = CONSTRUCTOR_CASES[case]
    model = mlp()
    groups = make_groups(model)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        sk.STEP(groups, recipe=recipe, backend="reference", **kwargs)
    assert_same(before, snapshot(model))


def test_constructor_masks_srste_targets_once_every_group_is_valid():
    model = mlp()
    dense = model[0].weight.detach().clone()
    sk.STEP(_groups(model), recipe="srste", backend="reference")
    keep = sk.reference.nm_mask(dense, 2, 4, 1)
    assert torch.equal(model[0].weight.detach(), torch.where(keep, dense, torch.zeros(())))


# ---------------------------------------------------------------------------------------------
# step: everything is validated before the first kernel runs
# ---------------------------------------------------------------------------------------------


def _set(index, key, value):
    def apply(model, opt):
        opt.param_groups[index][key] = value
    return apply


def _last_state(key, make):
    def apply(model, opt):
        state = opt.state[model[2].bias]
        state[key] = make(state[key])
    return apply


def _target_state(key, make):
    def apply(model, opt):
        state = opt.state[model[2].weight]
        state[key] = make(state[key])
    return apply


def _pop(key, param="bias"):
    def apply(model, opt):
        opt.state[getattr(model[2], param)].pop(key)
    return apply


def _grad_data(make):
    def apply(model, opt):
        model[2].bias.grad.data = make(model[2].bias.grad)
    return apply


def _param_and_grad(make):
    def apply(model, opt):
        p = model[2].bias
        p.data = make(p.data)
        p.grad = make(p.grad)
    return apply


def _to_meta(model, opt):
    """The parameter and its state moved to another device (as ``model.to`` with tensor swapping
    and a state load would), where the optimizer's backend cannot run."""
    p = model[2].bias
    torch.utils.swap_tensors(p, nn.Parameter(torch.zeros(p.shape, device="meta")))
    p.grad = torch.zeros(p.shape, device="meta")
    state = opt.state[p]
    for key, value in list(state.items()):
        if key != "step":
            state[key] = value.to("meta")


# Each case breaks the last group or the last parameter (the earlier ones would have been stepped
# first) or a target's phase-2 state; (break, error, match, backends it applies to or None).
STEP_CASES = {
    "betas_one": (_set(1, "betas", (1.0, 0.999)), ValueError, r"param_groups\[1\]: betas", None),
    "tensor_lr": (_set(1, "lr", torch.tensor([1e-3, 1e-3])), ValueError,
                  r"param_groups\[1\]: Tensor lr must be 1-element", None),
    "nan_lr": (_set(1, "lr", float("nan")), ValueError, r"param_groups\[1\]: lr must be", None),
    "negative_eps": (_set(1, "eps", -1e-8), ValueError, r"param_groups\[1\]: eps", None),
    "inf_weight_decay": (_set(1, "weight_decay", float("inf")), ValueError, r"param_groups\[1\]: weight_decay", None),
    "negative_srste_decay": (_set(0, "srste_decay", -1.0), ValueError, r"param_groups\[0\]: srste_decay", None),
    "bad_sparsity": (_set(0, "sparsity", "2:3"), ValueError, r"param_groups\[0\]: sparsity", None),
    "grad_shape": (_grad_data(lambda g: torch.zeros(3)), ValueError, r"2\.bias: grad shape \(3,\) != param", None),
    "grad_dtype": (_grad_data(lambda g: g.double()), ValueError, r"2\.bias: grad dtype torch.float64", None),
    "sparse_grad": (lambda model, opt: setattr(model[2].bias, "grad", model[2].bias.grad.to_sparse()), ValueError,
                    r"2\.bias: sparse gradients", None),
    "param_dtype_changed": (_param_and_grad(lambda t: t.double()), ValueError, r"2\.bias: dtype torch.float64", None),
    "param_shape_changed": (_param_and_grad(lambda t: torch.zeros(5)), ValueError,
                            r"2\.bias: state 'exp_avg' has shape \(4,\), param has \(5,\)", None),
    "state_missing": (_pop("exp_avg"), ValueError, r"2\.bias: state has no 'exp_avg'", None),
    "state_dtype": (_last_state("exp_avg_sq", lambda t: t.double()), ValueError,
                    r"2\.bias: state 'exp_avg_sq' has dtype torch.float64", None),
    "state_device": (_last_state("exp_avg", lambda t: t.to("meta")), ValueError,
                     r"2\.bias: state 'exp_avg' is on meta", None),
    "state_step_negative": (_last_state("step", lambda count: -1), ValueError, r"2\.bias: state 'step' must be",
                            None),
    "state_step_tensor": (_last_state("step", torch.tensor), ValueError, r"2\.bias: state 'step' must be an int",
                          None),
    "precond_fp16": (_target_state("precond", lambda t: t.half()), ValueError,
                     r"2\.weight: state 'precond' has dtype torch.float16", None),
    "master_missing": (_pop("master", "weight"), ValueError, r"2\.weight: state has no 'master'", None),
    "master_shape": (_target_state("master", lambda t: t[:, :4].clone()), ValueError,
                     r"2\.weight: state 'master' has shape \(4, 4\)", None),
    "backend_cannot_run_device": (_to_meta, ValueError, r"2\.bias: the optimizer's backend '(cpu|triton)' cannot",
                                  ("cpu", "triton")),
}


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_failing_step_changes_nothing(case, backend):
    apply, error, match, backends = STEP_CASES[case]
    if backends is not None and backend not in backends:
        pytest.skip(f"{case} is not an error on the {backend} backend")
    model = mlp()
    opt = sk.STEP(_groups(model), switch=1, backend=backend)
    for step in range(2):  # through the switch: frozen targets, masters, masked parameters
        set_grads(model, step)
        opt.step()
    assert opt.phase == "sparse"
    set_grads(model, 2)
    apply(model, opt)
    fails_and_changes_nothing(opt.step, model, opt, error, match)


def test_step_error_then_fix_then_step_equals_a_clean_run(backend):
    """After a rejected step, fixing the input and stepping gives what a run without the error gives."""
    runs = []
    for broken in (False, True):
        model = mlp()
        opt = sk.STEP(_groups(model), switch=1, backend=backend)
        for step in range(3):
            set_grads(model, step)
            if broken and step == 2:
                opt.param_groups[1]["betas"] = (1.0, 0.999)
                with pytest.raises(ValueError, match="betas"):
                    opt.step()
                opt.param_groups[1]["betas"] = (0.9, 0.999)
            opt.step()
        runs.append(snapshot(model, opt))
    assert_same(runs[0], runs[1])


# ---------------------------------------------------------------------------------------------
# add_param_group: validated before it is added or any state created
# ---------------------------------------------------------------------------------------------


ADD_GROUP_CASES = {
    "indivisible_target": (lambda extra: {"params": [extra[2]], "sparsity": "2:4"}, ValueError,
                           r"param_groups\[2\]\['params'\]\[0\]: input size 6 .* by M=4"),
    "negative_lr": (lambda extra: {"params": [extra[0]], "lr": -1.0}, ValueError, r"param_groups\[2\]: lr must be"),
    "tensor_lr": (lambda extra: {"params": [extra[0]], "lr": torch.tensor([1.0, 2.0])}, ValueError,
                  r"param_groups\[2\]: Tensor lr must be 1-element"),
    "betas_one": (lambda extra: {"params": [extra[0]], "betas": (0.9, 1.0)}, ValueError, r"param_groups\[2\]: betas"),
    "bad_sparsity": (lambda extra: {"params": [extra[0]], "sparsity": "4:4"}, ValueError,
                     r"param_groups\[2\]: sparsity"),
    "1d_target": (lambda extra: {"params": [extra[1]], "sparsity": "2:4"}, ValueError, r"N:M targets must be 2-D"),
    "duplicate_in_group": (lambda extra: {"params": [extra[0], extra[0]]}, ValueError, r"\[1\]: appears twice"),
    "already_in_a_group": (lambda extra: {"params": [extra[3]]}, ValueError, r"more than one parameter group"),
    "float64_param": (lambda extra: {"params": [nn.Parameter(torch.zeros(4, 8, dtype=torch.float64))]}, ValueError,
                      r"param_groups\[2\]\['params'\]\[0\]: dtype torch.float64"),
    "other_device": (lambda extra: {"params": [nn.Parameter(torch.zeros(4, 8, device="meta"))]}, ValueError,
                     r"param_groups\[2\]: all parameters must be on one device"),
    "names_in_an_unnamed_optimizer": (lambda extra: {"params": [("new.weight", extra[0])]}, ValueError,
                                      r"with/without names"),
    "not_a_dict": (lambda extra: [extra[0]], TypeError, r"param_group must be a dict"),
}


@pytest.mark.parametrize("recipe", ["step", "srste"])
@pytest.mark.parametrize("case", sorted(ADD_GROUP_CASES))
def test_failing_add_param_group_changes_nothing(case, recipe):
    make_group, error, match = ADD_GROUP_CASES[case]
    model = mlp()
    groups = [{key: value for key, value in group.items() if key != "param_names"} for group in _groups(model)]
    opt = sk.STEP(groups, recipe=recipe, switch=1, backend="reference")
    for step in range(2):
        set_grads(model, step)
        opt.step()
    torch.manual_seed(5)
    new = nn.Linear(8, 4)
    extra = [new.weight, new.bias, nn.Linear(6, 4).weight, model[0].weight]
    extra_before = [p.detach().clone() for p in extra]
    fails_and_changes_nothing(lambda: opt.add_param_group(make_group(extra)), model, opt, error, match)
    for p, before in zip(extra, extra_before):
        assert torch.equal(p.detach(), before)
    assert not any(p in opt.state for p in extra[:3])


# ---------------------------------------------------------------------------------------------
# non-contiguous parameters work on every backend (issue 12 item 2)
# ---------------------------------------------------------------------------------------------


class StridedNet(nn.Module):
    """A Linear target whose weight is a transposed view, a channels_last conv and a bias, or the
    same with contiguous parameters (``strided=False``)."""

    def __init__(self, strided, dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 12, generator=gen).to(dtype)  # stored [in, out]; used as [out, in]
        conv = torch.randn(4, 3, 3, 3, generator=gen).to(dtype)
        self.weight = nn.Parameter(weight.t() if strided else weight.t().contiguous())
        self.conv = nn.Parameter(conv.contiguous(memory_format=torch.channels_last) if strided else conv)
        self.bias = nn.Parameter(torch.randn(12, generator=gen).to(dtype))


@pytest.mark.parametrize("recipe,dtype", [("step", torch.float32), ("step", torch.bfloat16),
                                          ("srste", torch.float32), ("dense", torch.float32)])
def test_non_contiguous_params_step_like_their_contiguous_twins(recipe, dtype, backend):
    nets = [StridedNet(strided, dtype) for strided in (True, False)]
    assert not nets[0].weight.is_contiguous() and not nets[0].conv.is_contiguous()
    strides = (nets[0].weight.stride(), nets[0].conv.stride())
    opts = [sk.STEP([{"params": [net.weight], "sparsity": "2:4"},
                     {"params": [net.conv, net.bias]}], recipe=recipe, switch=3, lr=1e-2, weight_decay=0.01,
                    backend=backend) for net in nets]
    for step in range(6):  # through the switch at 3
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in nets[1].parameters()]
        for net in nets:
            for p, g in zip(net.parameters(), grads):
                p.grad = torch.empty_like(p).copy_(g)  # the strided net's grads are strided too
        for opt in opts:
            opt.step()
    assert (nets[0].weight.stride(), nets[0].conv.stride()) == strides
    for (name, p), q in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert torch.equal(p, q), name
        state, twin = opts[0].state[p], opts[1].state[q]
        assert state.keys() == twin.keys() and state["step"] == twin["step"], name
        for key in set(twin) - {"step"}:
            assert torch.equal(state[key], twin[key]) and state[key].is_contiguous(), f"{name} {key}"
    if recipe != "dense":
        assert opts[0].phase == "sparse"
        keep = sk.reference.nm_mask(opts[0].state[nets[0].weight]["master"], 2, 4, 1)
        assert torch.equal(nets[0].weight != 0, keep)


def test_non_contiguous_dense_recipe_equals_adamw_on_the_same_params():
    """The reference backend against torch.optim.AdamW (its for-loop path, the reference's peer)
    on the very same non-contiguous tensors."""
    nets = [StridedNet(True, torch.float32) for _ in range(2)]
    opt = sk.STEP(nets[0].parameters(), recipe="dense", lr=1e-2, weight_decay=0.01, backend="reference")
    peer = torch.optim.AdamW(nets[1].parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    for step in range(5):
        gen = torch.Generator().manual_seed(step)
        for p, q in zip(nets[0].parameters(), nets[1].parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        peer.step()
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q) and p.stride() == q.stride()
        assert torch.equal(opt.state[p]["exp_avg_sq"], peer.state[q]["exp_avg_sq"])
