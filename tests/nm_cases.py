"""Inputs and bit comparisons shared by the N:M prune tests of every backend."""

import torch


def with_specials(w, seed):
    """Ties (a coarse grid), NaN, -0.0 and +-inf scattered through ``w`` (float dtypes); for int8,
    many ties and the extremes -128 and 127 (|-128| must be widened, not wrapped)."""
    gen = torch.Generator().manual_seed(seed)
    if not w.dtype.is_floating_point:
        flat = (torch.randint(-4, 5, (w.numel(),), generator=gen) * 32).clamp(-128, 127)
        return flat.reshape(w.shape).to(w.dtype)
    flat = torch.round(torch.randn(w.numel(), generator=gen) * 2) / 2
    picks = torch.randint(0, w.numel(), (max(1, w.numel() // 20),), generator=gen)
    specials = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), float("-nan")])
    flat[picks] = specials[torch.arange(picks.numel()) % specials.numel()]
    return flat.reshape(w.shape).to(w.dtype)


def same_bits(a, b):
    """Same dtype and the same bits (so +0.0 differs from -0.0 and NaN payloads count)."""
    if a.dtype != b.dtype:
        return False
    if not a.dtype.is_floating_point:
        return torch.equal(a, b)
    view = {torch.float64: torch.int64, torch.float32: torch.int32}.get(a.dtype, torch.int16)
    return torch.equal(a.view(view), b.view(view))


def shapes_for(m):
    """(shape, dim): last-dim groups of 1, 15 and 257 groups; first-dim (Conv1D) and middle-dim groups."""
    return [((1, m), 1), ((15, m), -1), ((257 * m,), 0), ((2, 3 * m), 1), ((m, 15), 0), ((2 * m, 257), 0),
            ((2, m, 3), 1)]
