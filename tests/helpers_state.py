"""Snapshots of a model and an optimizer, to show that a failed call changed nothing.

``snapshot(model, opt)`` copies everything a call could change: every parameter (values, dtype,
shape, strides, device), its grad, every buffer, the optimizer's per-parameter state (tensors
and Python values), its param groups (hyper-parameters, global keys, which parameters) and its
public attributes; ``snapshot_state_dict(sd)`` copies a state dict. ``assert_same(a, b)``
compares two snapshots bit for bit (NaNs equal to NaNs, -0.0 different from +0.0) and names the
first entry that differs.
"""

import copy
import math

import torch

PUBLIC_ATTRS = ("recipe", "switch_step", "phase", "step_count", "backend", "precond_eps", "precond_dtype",
                "total_steps")


def _copy(value):
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.layout != torch.strided:  # a sparse grad: its layout and dense values
            return ("tensor", t.dtype, tuple(t.shape), str(t.layout), str(t.device), t.to_dense())
        return ("tensor", t.dtype, tuple(t.shape), t.stride(), str(t.device), t.clone())
    return copy.deepcopy(value)


def snapshot(model=None, opt=None):
    """A nested dict of copies of ``model``'s parameters, grads and buffers and ``opt``'s state."""
    out = {}
    if model is not None:
        out["params"] = {name: _copy(p) for name, p in model.named_parameters()}
        out["grads"] = {name: _copy(p.grad) for name, p in model.named_parameters()}
        out["buffers"] = {name: _copy(b) for name, b in model.named_buffers()}
    if opt is not None:
        params = [p for group in opt.param_groups for p in group["params"]]
        out["opt_params"] = [_copy(p) for p in params]
        out["opt_grads"] = [_copy(p.grad) for p in params]
        out["state"] = [{key: _copy(value) for key, value in opt.state[p].items()} if p in opt.state else None
                        for p in params]
        # which tensors each group holds: the model's names for them (comparable across twin runs),
        # else their identity
        names = {id(p): name for name, p in model.named_parameters()} if model is not None else {}
        out["param_groups"] = [{key: ([names.get(id(p), id(p)) for p in value] if key == "params" else _copy(value))
                                for key, value in group.items()} for group in opt.param_groups]
        out["attrs"] = {name: _copy(getattr(opt, name)) for name in PUBLIC_ATTRS if hasattr(opt, name)}
    return out


def snapshot_state_dict(state_dict):
    """A copy of an optimizer ``state_dict()`` that :func:`assert_same` compares bit for bit."""
    return {"state": {pid: {key: _copy(value) for key, value in entry.items()}
                      for pid, entry in state_dict["state"].items()},
            "param_groups": [{key: _copy(value) for key, value in group.items()}
                             for group in state_dict["param_groups"]]}


def _bits(t):
    flat = t.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.bool else flat


def _assert_value(a, b, where):
    if isinstance(a, tuple) and a and a[0] == "tensor":
        assert isinstance(b, tuple) and b and b[0] == "tensor", f"{where}: a tensor became {b!r}"
        for label, x, y in zip(("dtype", "shape", "strides (or layout)", "device"), a[1:5], b[1:5]):
            assert x == y, f"{where}: {label} changed from {x} to {y}"
        if a[4] != "meta":  # meta tensors have no values
            assert torch.equal(_bits(a[5]), _bits(b[5])), f"{where}: values changed"
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys changed from {sorted(map(str, a))} " \
                                                         f"to {sorted(map(str, b)) if isinstance(b, dict) else b!r}"
        for key in a:  # the order of keys is not state (torch's load_state_dict moves "params" last)
            _assert_value(a[key], b[key], f"{where}[{key!r}]")
        return
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: changed from {a!r} to {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_value(x, y, f"{where}[{i}]")
        return
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    assert type(a) is type(b) and a == b, f"{where}: changed from {a!r} to {b!r}"


def _normalized(value):
    """Tensors anywhere in ``value`` (dicts, lists, tuples) in the snapshot form ``_copy`` gives."""
    if isinstance(value, torch.Tensor):
        return _copy(value)
    if isinstance(value, dict):
        return {key: _normalized(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and not (isinstance(value, tuple) and value and value[0] == "tensor"):
        return type(value)(_normalized(item) for item in value)
    return value


def assert_same(a, b, label="snapshot"):
    """Assert that two snapshots (or tensors, or nests of them) are bit-identical; the message
    names ``label`` and the first difference."""
    _assert_value(_normalized(a), _normalized(b), label)
