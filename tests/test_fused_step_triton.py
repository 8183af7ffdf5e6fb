"""What is specific to the Triton fused step (triton_kernels/fused_step.py): launch counts, runtime
scalars, the input limits of one launch (one dtype combination, contiguous tensors on one device,
model parameters for all tensors or none), and CPU tensors only under TRITON_INTERPRET=1. Its results
against the reference (on CPU under the interpreter and on CUDA when present) are
tests/test_backend_conformance.py's.
"""

import os

import pytest
import torch
from torch import nn

import step_kernels as sk
from helpers import NM_SMALL, RECIPES, make_case
from helpers import scalars as _scalars
from step_kernels import ops

pytest.importorskip("triton")


def interpreter_on():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture
def tdevice(device):
    """The test device, skipping CPU when Triton's interpreter is off (a CUDA machine)."""
    if device.type == "cpu" and not interpreter_on():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    return device


def scalars():
    return _scalars(step=3, lr=1e-2, weight_decay=0.1, srste_decay=0.05)


# ---------------------------------------------------------------------------------------------
# launches
# ---------------------------------------------------------------------------------------------


# One step launch per group orientation for all tensors of a call, plus one that adds the partial
# sums when flips or statistics are asked for; nothing for empty lists. The inputs of each
# reference comparison of tests/test_backend_conformance.py that checked launches, on small tensors.
ADAMW_DTYPES = [(torch.float32, None), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                (torch.float32, torch.bfloat16)]
LAUNCHES = ([pytest.param("step2-bf16", n, m, [(1, m), (3, 5 * m)], [1, 1], False, 2, id=f"contiguous-{n}:{m}")
             for n, m in NM_SMALL]
            + [pytest.param(r, 2, 4, [(1, 4), (3, 20), (4, 1), (4, 15)], [1, 1, 0, 0], False, 3, id=f"mixed-{r}")
               for r in RECIPES]
            + [pytest.param((False, False, g, o, torch.float32), 0, 0, [(1,), (1041,), (3, 5, 7)], None, stats,
                            1 + stats, id=f"adamw-{g}-{o}-stats{stats}")
               for g, o in ADAMW_DTYPES for stats in (False, True)]
            + [pytest.param("srste-fp32", 2, 4, [], [], False, 0, id="empty")])


@pytest.mark.parametrize("recipe,n,m,shapes,dims,stats,expected", LAUNCHES)
def test_launches_per_call(recipe, n, m, shapes, dims, stats, expected, tdevice):
    masked, frozen, gd, od, pd = RECIPES[recipe] if isinstance(recipe, str) else recipe
    tensors = make_case(shapes, frozen=frozen, grad_dtype=gd, out_dtype=od, precond_dtype=pd, device=tdevice, seed=3)
    w, g, m1, second, out = ([row[k] for row in tensors] for k in range(5))
    totals, launches = ops.fused_step("triton", w, g, m1, second, out, masked=masked, frozen_v=frozen, n=n, m=m,
                                      group_dims=dims if masked else None, scalars=scalars(), compute_stats=stats)
    assert launches == expected
    assert totals.shape == (3,) and totals.dtype == torch.float64


def test_scalars_are_runtime_arguments():
    """lr, step and the other hyper-parameters must not be constexpr: changing them never recompiles."""
    import inspect

    from step_kernels.triton_kernels.fused_step import _fused_step_kernel

    params = inspect.signature(_fused_step_kernel.fn).parameters
    for name in ("decay_factor", "one_minus_beta1", "beta2", "one_minus_beta2", "step_size", "bc2_sqrt", "eps",
                 "srste_decay"):
        assert params[name].annotation is inspect.Parameter.empty, name


# ---------------------------------------------------------------------------------------------
# the limits of one launch: clear errors naming the tensor, nothing written (the errors both
# backends raise are tests/test_backend_conformance.py's)
# ---------------------------------------------------------------------------------------------


def _lists(device, n=2, shape=(4, 8)):
    w = [torch.randn(shape, device=device) for _ in range(n)]
    return w, [torch.randn(shape, device=device) for _ in range(n)], \
        [torch.zeros(shape, device=device) for _ in range(n)], \
        [torch.zeros(shape, device=device) for _ in range(n)], [None] * n


@pytest.mark.parametrize("break_it,match", [
    (lambda L: L[1].__setitem__(1, torch.randn(8, 4).t()), r"grads\[1\] is not contiguous"),
    (lambda L: L[1].__setitem__(1, torch.randn(4, 8, dtype=torch.bfloat16)), r"grads\[1\] has dtype .* grads\[0\]"),
    (lambda L: L[4].__setitem__(1, torch.zeros(4, 8)), r"model_params\[1\] is a tensor but model_params\[0\] is None"),
])
def test_one_launch_limits_name_the_tensor_and_write_nothing(break_it, match):
    """What the C++ backend accepts and one Triton launch cannot take."""
    lists = list(_lists("cpu"))
    break_it(lists)
    before = [[x.clone() if x is not None else x for x in col] for col in lists]
    s = scalars()
    with pytest.raises(ValueError, match=match):
        ops.fused_step("triton", *lists, masked=False, frozen_v=False, scalars=s)
    for col, old in zip(lists, before):
        for x, y in zip(col, old):
            if x is not None:
                assert torch.equal(x, y)


def test_cpu_tensors_without_interpreter_fail_clearly(monkeypatch):
    from step_kernels.triton_kernels.fused_step import fused_step

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    w, g, m1, v, out = _lists("cpu")
    with pytest.raises(ValueError, match=r"weights\[0\] is on cpu: the Triton kernels need CUDA tensors"):
        fused_step(w, g, m1, v, out, masked=False, frozen_v=False, scalars=scalars())
    with pytest.raises(sk.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        sk.STEP([torch.nn.Parameter(torch.randn(4, 4))], backend="triton")


# ---------------------------------------------------------------------------------------------
# through the optimizer
# ---------------------------------------------------------------------------------------------


def test_launches_do_not_grow_with_parameters(tdevice):
    def launches(layers):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(layers)]).to(tdevice)
        opt = sk.STEP(sk.sparse_param_groups(model, "2:4", exclude=[]), switch=1, backend="triton")
        counts = []
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
            counts.append(opt.stats()["kernel_launches"])
        return counts, len(list(model.parameters()))

    small, n_small = launches(6)
    large, n_large = launches(60)
    assert (n_small, n_large) == (12, 120)
    # step 1 (switch=1, no statistics): one launch for all; then masked (step + partial sums) + biases
    assert small == large == [1, 3]
