"""Snapshots of a model and its optimizer, to show that a failed call changed nothing."""

import torch


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(item) for item in value)
    return value


def snapshot(model, opt=None):
    """Everything a call could change, copied: the model's parameters and buffers by name, and the
    optimizer's per-parameter state (by position in its param groups) and param groups (params as
    the ids of the tensors they hold)."""
    taken = {"model": {name: _copy(t) for name, t in model.state_dict(keep_vars=True).items()}}
    if opt is not None:
        params = [p for group in opt.param_groups for p in group["params"]]
        taken["state"] = {i: _copy(dict(opt.state[p])) for i, p in enumerate(params) if p in opt.state}
        taken["param_groups"] = [{key: [id(p) for p in value] if key == "params" else _copy(value)
                                  for key, value in group.items()} for group in opt.param_groups]
    return taken


def assert_same(a, b, path="snapshot"):
    """``a`` and ``b`` are bit-identical: same keys and python values; tensors with the same dtype,
    shape, strides, device and bytes (NaNs included); NaN equals NaN among python floats."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert (a.dtype, a.shape, a.stride(), a.device) == (b.dtype, b.shape, b.stride(), b.device), (
            f"{path}: {a.dtype} {tuple(a.shape)} {a.stride()} {a.device} != "
            f"{b.dtype} {tuple(b.shape)} {b.stride()} {b.device}")
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), f"{path}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"  # a != a: NaN
