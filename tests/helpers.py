"""What several test files share: a Conv1D stand-in, the small TinyGPT, the N:M lists, the step
scalars and the tolerance checks of the fused-step backends against the reference.

Tests import it as ``from helpers import ...`` (pytest puts tests/ on sys.path, as for nm_cases and
helpers_state); tests/multiproc/common.py adds tests/ to sys.path itself.
"""

import math

import torch
from torch import nn

from step_kernels import reference as ref
from step_kernels.models import TinyGPT

# N:M patterns. NM_SMALL: the Triton kernels' list (and test_nm_prune_triton's); NM_REFERENCE adds
# 31:32; NM_WIDE: every M up to 32 with several N each (the C++ backend's list).
NM_SMALL = [(1, 2), (2, 4), (1, 4), (2, 8), (4, 8), (1, 8), (1, 16), (16, 32)]
NM_REFERENCE = NM_SMALL + [(31, 32)]
NM_WIDE = [(1, 2), (1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (4, 8), (7, 8), (1, 16), (5, 16), (1, 32), (2, 32),
           (16, 32), (31, 32)]


class Conv1D(nn.Module):
    """transformers' Conv1D layout: weight [in, out], y = x @ W + b (N:M groups run along dim 0).

    The stand-ins this replaces differed in their initialization; each test keeps its numbers by
    asking for the one it used: ``scale`` multiplies ``randn(nx, nf)``; ``bias`` is "zeros", "random"
    (``randn(nf) * 0.1``, drawn after the weight) or None (no bias); ``addmm`` computes the forward as
    transformers does (``addmm`` over the flattened rows) instead of ``x @ W + b``.
    """

    def __init__(self, nf, nx, *, scale=0.1, bias="zeros", addmm=False):
        super().__init__()
        self.nf = nf
        self.addmm = addmm
        self.weight = nn.Parameter(torch.randn(nx, nf) * scale)
        if bias == "zeros":
            self.bias = nn.Parameter(torch.zeros(nf))
        elif bias == "random":
            self.bias = nn.Parameter(torch.randn(nf) * 0.1)
        elif bias is None:
            self.bias = None
        else:
            raise ValueError(f"bias must be 'zeros', 'random' or None, not {bias!r}")

    def forward(self, x):
        if self.bias is None:
            return x @ self.weight
        if self.addmm:
            out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
            return out.view(*x.shape[:-1], self.nf)
        return x @ self.weight + self.bias


# the small TinyGPT of the optimizer tests; tiny_gpt(config={}) gives TinyGPT's own defaults
TINY_GPT = dict(vocab=64, ctx=16, d_model=32, n_layer=1, n_head=2)


def tiny_gpt(dtype=torch.float32, device="cpu", seed=0, config=TINY_GPT):
    """A TinyGPT(**config) initialized from ``torch.manual_seed(seed)``, on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    return TinyGPT(**config).to(device=device, dtype=dtype)


def scalars(*, step, lr, weight_decay=0.1, srste_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8):
    """The precomputed scalars of one fused step (``reference.step_scalars``)."""
    return ref.step_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                            srste_decay=srste_decay)


def assert_exact(actual, expected, what):
    """Equal values, NaN for NaN (rtol = atol = 0)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_live_w(actual, expected, w_before, decay_factor, what):
    """|actual - expected| <= 1 ulp(expected) + 2^-22 |update| (the reference's sqrt rounding)."""
    update = (expected - w_before * torch.tensor(decay_factor, dtype=torch.float32)).abs()
    spacing = (torch.nextafter(expected.abs(), torch.tensor(math.inf)) - expected.abs())
    allowed = spacing + update * 2.0**-22
    finite = ~torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{what}: NaN positions differ"
    excess = (actual - expected).abs()[finite] > allowed[finite]
    assert not excess.any(), f"{what}: {int(excess.sum())} elements beyond the reference's rounding"


def assert_ulps(actual, expected, name, ulps, change=None):
    """|actual - expected| <= ulps * ulp(max(|expected|, |change|)), NaNs matching NaNs.

    ``change`` is the size of this step's update: its rounding error (torch's CPU sqrt is off by an
    ulp at times) lands on the result, so for small weights the ulp of the update sets the scale.
    """
    actual, expected = actual.float(), expected.float()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{name}: NaN positions differ"
    a, e = actual[~nan], expected[~nan]
    mag = e.abs() if change is None else torch.maximum(e.abs(), change.float()[~nan].abs())
    mag = mag.clamp_min(1e-30)
    ulp = torch.nextafter(mag, torch.tensor(float("inf"))) - mag
    bad = (a - e).abs() > ulps * ulp
    assert not bad.any(), (f"{name}: {int(bad.sum())} values beyond {ulps} ulp, e.g. "
                           f"{a[bad][:3].tolist()} vs {e[bad][:3].tolist()}")
