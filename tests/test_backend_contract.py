"""One contract per op across backends: the fused step's signature, return and scalars, the fake
kernels of the C++ ops, and the optimizer's masked-weight writes through its backend's prune."""

import dataclasses
import inspect

import pytest
import torch
from torch import nn

import helpers
import step_kernels as sk
from step_kernels import _extension, ops
from step_kernels import reference as ref

CPU_REASON = ops.backend_status("cpu", torch.device("cpu"))
needs_cpu = pytest.mark.skipif(CPU_REASON is not None, reason=f"backend 'cpu' unavailable: {CPU_REASON}")
TRITON_REASON = ops.backend_status("triton", torch.device("cpu"))
# The backends that run on CPU tensors here ("triton" under TRITON_INTERPRET=1).
CPU_BACKENDS = [
    "reference",
    pytest.param("cpu", marks=needs_cpu),
    pytest.param("triton", marks=pytest.mark.skipif(TRITON_REASON is not None, reason=f"{TRITON_REASON}")),
]


def scalars():
    return helpers.scalars(lr=0.05, weight_decay=0.1, step=7, srste_decay=0.3)


def phase2_lists(seed=0):
    """Two [8, 16] tensors of a frozen-preconditioner step, N:M along dim 1 and dim 0."""
    gen = torch.Generator().manual_seed(seed)
    lists = [[], [], [], [], []]
    for _ in range(2):
        w = torch.randn(8, 16, generator=gen)
        for column, t in zip(lists, (w, torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen) * 0.1,
                                     torch.rand(8, 16, generator=gen) * 20 + 0.5, torch.empty(8, 16))):
            column.append(t)
    return lists


# ---------------------------------------------------------------------------------------------
# fused_step: one signature, one return, every scalar by name
# ---------------------------------------------------------------------------------------------


def test_the_table_covers_every_backend():
    assert tuple(ops.FUSED_STEP) == ops.BACKENDS
    assert ops.FUSED_STEP["reference"] is ref.fused_step
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.fused_step("cuda", *phase2_lists(), masked=False, frozen_v=False, scalars=scalars())


def _implementations():
    impls = {"reference": ref.fused_step, "cpu": _extension.cpu_fused_step}
    if TRITON_REASON is None:
        from step_kernels.triton_kernels.fused_step import fused_step as triton_fused_step

        impls["triton"] = triton_fused_step
    return impls


def test_every_backend_has_the_signature_of_the_reference():
    expected = inspect.signature(ref.fused_step).parameters
    for name, impl in _implementations().items():
        params = inspect.signature(impl).parameters
        assert list(params) == list(expected), name
        for key, param in params.items():
            assert param.kind == expected[key].kind, f"{name}: {key} is {param.kind}"
            assert param.default == expected[key].default, f"{name}: default of {key}"
    ops_params = list(inspect.signature(ops.fused_step).parameters)
    assert ops_params == ["backend"] + list(expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend_returns_totals_and_launches(backend):
    lists = phase2_lists()
    expected, _ = ref.fused_step(*[[t.clone() for t in c] for c in lists], masked=True, frozen_v=True, n=2, m=4,
                                 group_dims=[1, 0], scalars=scalars())
    result = ops.FUSED_STEP[backend](*lists, masked=True, frozen_v=True, n=2, m=4, group_dims=[1, 0],
                                     scalars=scalars())
    assert type(result) is tuple and len(result) == 2
    totals, launches = result
    assert totals.dtype == torch.float64 and totals.shape == (3,)
    assert type(launches) is int and launches >= 1
    assert totals[2].item() == expected[2].item() > 0  # the mask flips, exact on every backend


@needs_cpu
def test_the_cpu_op_takes_every_scalar_by_name():
    sk.nm_prune(torch.zeros(4), 2, 4, backend="cpu")  # loads the extension
    args = torch.ops.step_kernels.fused_step.default._schema.arguments
    keyword = [a.name for a in args if a.kwarg_only]
    assert [a.name for a in args if not a.kwarg_only] == ["weights", "grads", "exp_avgs", "second_moments",
                                                          "model_params"]
    floats = [a.name for a in args if str(a.type) == "float"]
    assert floats == [f.name for f in dataclasses.fields(ref.StepScalars)]
    assert set(floats) <= set(keyword)


@needs_cpu
def test_a_scalar_the_cpu_op_does_not_name_fails_the_call():
    @dataclasses.dataclass(frozen=True)
    class MoreScalars(ref.StepScalars):
        amsgrad_floor: float = 0.0

    more = MoreScalars(**dataclasses.asdict(scalars()))
    lists = phase2_lists()
    before = [[t.clone() for t in c] for c in lists]
    with pytest.raises(RuntimeError, match=r"expected at most 22 argument\(s\) but received 23"):
        ops.fused_step("cpu", *lists, masked=True, frozen_v=True, n=2, m=4, group_dims=[1, 0], scalars=more)
    for column, saved in zip(lists[:4], before[:4]):
        assert all(torch.equal(a, b) for a, b in zip(column, saved))


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"{TRITON_REASON}")
def test_the_triton_kernel_reads_every_scalar_but_beta1():
    from step_kernels.triton_kernels import fused_step as triton_fused_step

    fields = [f.name for f in dataclasses.fields(ref.StepScalars)]
    assert list(triton_fused_step.KERNEL_SCALARS) == [name for name in fields if name != "beta1"]
    kernel_args = triton_fused_step._fused_step_kernel.arg_names
    first = kernel_args.index("decay_factor")
    assert tuple(kernel_args[first:first + len(fields) - 1]) == triton_fused_step.KERNEL_SCALARS


# ---------------------------------------------------------------------------------------------
# the fake kernels (step_kernels._fakes), registered when the extension loads
# ---------------------------------------------------------------------------------------------


@needs_cpu
def test_fused_step_and_nm_prune_pass_opcheck():
    lists = phase2_lists()
    torch.library.opcheck(
        torch.ops.step_kernels.fused_step.default, tuple(lists),
        dict(masked=True, frozen_v=True, n=2, m=4, group_dims=[1, 0], grad_scale=None, found_inf=None,
             compute_stats=False, **dataclasses.asdict(scalars())),
    )
    w = torch.randn(8, 16)
    for dim in (0, 1):
        torch.library.opcheck(torch.ops.step_kernels.nm_prune.default, (w, 2, 4, dim))


@needs_cpu
def test_fake_kernels_check_as_the_cpu_kernels_do():
    sk.nm_prune(torch.zeros(4), 2, 4, backend="cpu")  # loads the extension
    w = torch.empty(8, 16, device="meta")
    out, mask = torch.ops.step_kernels.nm_prune(w, 2, 4, 0)
    assert (out.shape, out.dtype, mask.shape, mask.dtype) == ((8, 16), torch.float32, (8, 16), torch.bool)
    for args, match in (((w, 2, 6, 1), "m: M must be a power of two"), ((w, 2, 32, 1), "not divisible by M=32")):
        for device in ("cpu", "meta"):
            with pytest.raises(ValueError, match=match):
                torch.ops.step_kernels.nm_prune(torch.empty(8, 16, device=device), *args[1:])
    meta = [[torch.empty(8, 16, device="meta") for _ in range(2)] for _ in range(5)]
    kwargs = dict(masked=True, frozen_v=True, n=2, m=4, grad_scale=None, found_inf=None, compute_stats=False,
                  **dataclasses.asdict(scalars()))
    totals = torch.ops.step_kernels.fused_step(*meta, group_dims=[1, 0], **kwargs)
    assert (totals.device.type, totals.shape, totals.dtype) == ("meta", (3,), torch.float64)
    for device in ("cpu", "meta"):
        lists = [[torch.zeros(8, 16, device=device) for _ in range(2)] for _ in range(5)]
        with pytest.raises(ValueError, match="group_dims has 1 entries for 2 tensors"):
            torch.ops.step_kernels.fused_step(*lists, group_dims=[1], **kwargs)
        with pytest.raises(ValueError, match="must have the same length"):
            torch.ops.step_kernels.fused_step(*lists[:4], lists[4][:1], group_dims=[1, 0], **kwargs)


# ---------------------------------------------------------------------------------------------
# the optimizer writes masked weights through its backend's prune
# ---------------------------------------------------------------------------------------------


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(torch.bfloat16)


def _groups(model):
    return sk.sparse_param_groups(model, "2:8", exclude=[])


def _train(model, opt, steps):
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        model(x).float().square().mean().backward()
        opt.step()


class _PruneCalls:
    """Counts the calls of ``ops.nm_prune`` (by backend) and of ``reference.nm_mask``."""

    def __init__(self, monkeypatch):
        self.prune, self.mask = [], 0
        prune, nm_mask = ops.nm_prune, ref.nm_mask

        def counted_prune(w, n, m, dim=-1, backend="auto"):
            self.prune.append(backend)
            return prune(w, n, m, dim, backend)

        def counted_mask(*args, **kwargs):
            self.mask += 1
            return nm_mask(*args, **kwargs)

        monkeypatch.setattr(ops, "nm_prune", counted_prune)
        monkeypatch.setattr(ref, "nm_mask", counted_mask)


def _assert_masked_from_masters(opt, model):
    for p in (model[0].weight, model[2].weight):
        master = opt.state[p]["master"]
        assert torch.equal(p, ref.nm_prune(master, 2, 8, 1)[0].to(p.dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("when", ["switch", "srste_start", "load_state_dict"])
def test_masked_weights_are_written_by_the_backend_prune(backend, when, monkeypatch):
    model = _model()
    recipe = "srste" if when == "srste_start" else "step"
    if when == "load_state_dict":
        opt = sk.STEP(_groups(model), lr=1e-2, recipe=recipe, switch=1, backend=backend)
        _train(model, opt, 2)
        saved = opt.state_dict()
        model[0].weight.data.fill_(1.0)  # load_state_dict rewrites the model from the masters
    calls = _PruneCalls(monkeypatch)
    if when == "switch":
        opt = sk.STEP(_groups(model), lr=1e-2, recipe=recipe, switch=1, backend=backend)
        _train(model, opt, 1)
        assert opt.phase == "sparse"
    elif when == "srste_start":
        opt = sk.STEP(_groups(model), lr=1e-2, recipe=recipe, backend=backend)
    else:
        opt.load_state_dict(saved)
    assert calls.prune == [backend, backend]  # one call per target, on the optimizer's backend
    if backend != "reference":
        assert calls.mask == 0, "the reference's O(M^2) selection ran"
    _assert_masked_from_masters(opt, model)
