"""Export of 2:4 sparse models for inference (docs/design.md section 9).

- :func:`to_sparse_semi_structured` wraps :func:`~step_kernels.pack24`'s output in torch's
  ``SparseSemiStructuredTensorCUTLASS`` (no repacking by torch). torch's CUTLASS sparse GEMM runs
  only on compute capability 8.x; on Hopper and newer the weight goes through cuSPARSELt
  (``torch._cslt_compress``) instead, with a warning saying so.
- :func:`pack_model` swaps every 2:4 target's weight for its packed form, in place, for inference.
- :func:`packed_state_dict` / :func:`load_packed_state_dict`: a checkpoint that stores every target
  as ``values`` + ``meta`` + its shape (9/16 of the dense bytes for fp16/bf16), and loads back to
  dense weights or straight to packed ones.

Targets come from :func:`step_kernels.targets.find_targets` (the optimizer's defaults); a ``Conv1D``
weight (stored ``[in, out]``) is packed as ``W.t()``. Masks with at most 2 kept per 4 (1:4, 2:8,
1:8, ...) are 2:4 masks too and pack as such; anything denser is a ``ValueError`` naming the target.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .packing import SUPPORTED_DTYPES, pack24, unpack24
from .targets import Target, find_targets

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "to_sparse_semi_structured",
    "pack_model",
    "packed_state_dict",
    "load_packed_state_dict",
]

FORMAT = "step_kernels.packed24"
FORMAT_VERSION = 1
_ENTRY_KEYS = {"values", "meta", "shape", "transposed"}


def _from_packed(values: Tensor, meta: Tensor, shape: Tuple[int, int]) -> Tensor:
    """The inference tensor of ``(values, meta)`` packed from a ``shape`` matrix."""
    if values.is_cuda:
        major, minor = torch.cuda.get_device_capability(values.device)
        if major < 8:
            raise RuntimeError(
                f"2:4 sparse tensor cores need compute capability 8.0 or newer; {values.device} is {major}.{minor}"
            )
        if major > 8:
            warnings.warn(
                f"torch's CUTLASS 2:4 GEMM runs only on compute capability 8.x and {values.device} is "
                f"{major}.{minor}: the weight is compressed with cuSPARSELt (torch._cslt_compress) instead "
                "of wrapping pack24's CUTLASS layout",
                stacklevel=3,
            )
            return torch.sparse.SparseSemiStructuredTensorCUSPARSELT.from_dense(unpack24(values, meta))
    return torch.sparse.SparseSemiStructuredTensorCUTLASS(
        torch.Size(shape), packed=values, meta=meta, packed_t=None, meta_t=None,
        compressed_swizzled_bitmask=None, requires_grad=False,
    )


def to_sparse_semi_structured(weight: Tensor, prune: bool = False) -> Tensor:
    """``weight`` (2:4, ``[out, in]``, fp16/bf16/int8) as a torch semi-structured sparse tensor.

    On CPU and on compute capability 8.x the result is a ``SparseSemiStructuredTensorCUTLASS`` built
    from :func:`~step_kernels.pack24` unchanged (on CPU only ``to_dense()`` and friends run: torch
    has no CPU sparse GEMM). On 9.x and newer it is a ``SparseSemiStructuredTensorCUSPARSELT`` and a
    warning says so. ``prune=True`` first keeps the 2 largest ``|w|`` of every group of 4.
    """
    values, meta = pack24(weight.detach(), prune)
    return _from_packed(values, meta, tuple(weight.shape))


def _targets(model: nn.Module, targets: Optional[Sequence[Target]]) -> List[Target]:
    """``targets`` (default: ``find_targets(model)``) as a list; a target listed twice is a ``ValueError``."""
    targets = find_targets(model) if targets is None else list(targets)
    seen = set()
    for t in targets:
        if t.name in seen:
            raise ValueError(f"{t.name}: listed twice in targets")
        seen.add(t.name)
    return targets


def _pack_target(t: Target, prune: bool) -> Tuple[Tensor, Tensor]:
    """pack24 of a target's ``[out, in]`` matrix; errors name the target."""
    w = t.param.detach()
    if isinstance(w, torch.sparse.SparseSemiStructuredTensor):
        raise ValueError(f"{t.name}: the weight is packed already; export from the dense model")
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{t.name}: 2:4 packing needs float16, bfloat16 or int8 weights, got {w.dtype}; convert the "
            "model first (model.half() or model.bfloat16())"
        )
    try:
        return pack24(w.t() if t.group_dim == 0 else w, prune)
    except ValueError as exc:
        raise ValueError(f"{t.name}{' (Conv1D, packed as W.t())' if t.group_dim == 0 else ''}: {exc}") from exc


def _packed_parameter(values: Tensor, meta: Tensor, transposed: bool) -> nn.Parameter:
    """The inference weight of ``(values, meta)``: a frozen parameter holding the packed tensor."""
    rows = values.shape[0]
    sparse = _from_packed(values, meta, (rows, 2 * values.shape[1]))
    return nn.Parameter(sparse.t() if transposed else sparse, requires_grad=False)


def pack_model(model: nn.Module, targets: Optional[Sequence[Target]] = None, *, prune: bool = False) -> nn.Module:
    """Swap the weight of every 2:4 target of ``model`` for its packed form, in place; returns ``model``.

    ``targets`` defaults to :func:`~step_kernels.targets.find_targets` ``(model)``. The packed
    weights do not require grad (inference only). A ``Conv1D`` weight becomes the transpose of the
    packed ``W.t()``, which torch's sparse ``addmm`` consumes as is.

    All or nothing: every target is packed first, so an error (naming the target) leaves every
    module as it was; only then are the weights swapped.
    """
    targets = _targets(model, targets)
    weights = []
    for t in targets:
        values, meta = _pack_target(t, prune)
        weights.append(_packed_parameter(values, meta, transposed=t.group_dim == 0))
    for t, weight in zip(targets, weights):
        t.module.weight = weight
    return model


def packed_state_dict(model: nn.Module, targets: Optional[Sequence[Target]] = None, *, prune: bool = False) -> dict:
    """``model.state_dict()`` with every 2:4 target stored packed; save it with ``torch.save``.

    Layout: ``{"format": FORMAT, "version": FORMAT_VERSION, "dense": {name: tensor},
    "packed": {name: {"values", "meta", "shape", "transposed"}}}``, where ``shape`` is the
    parameter's own shape and ``transposed`` marks a ``Conv1D`` weight packed as ``W.t()``.
    """
    state = model.state_dict()
    packed = {}
    for t in _targets(model, targets):
        if t.name not in state:
            raise ValueError(f"{t.name}: target is not in model.state_dict() (keys like {next(iter(state), None)!r})")
        values, meta = _pack_target(t, prune)
        packed[t.name] = {
            "values": values, "meta": meta, "shape": tuple(t.param.shape), "transposed": t.group_dim == 0,
        }
        del state[t.name]
    return {"format": FORMAT, "version": FORMAT_VERSION, "dense": state, "packed": packed}


def _check_checkpoint(checkpoint: dict) -> None:
    """The layout of a :func:`packed_state_dict` checkpoint; errors name the entry at fault."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"checkpoint: not a {FORMAT!r} checkpoint (make it with packed_state_dict)")
    version = checkpoint.get("version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"checkpoint: version {version!r} is newer than this reader ({FORMAT_VERSION})")
    for key in ("dense", "packed"):
        if not isinstance(checkpoint.get(key), dict):
            raise ValueError(f"checkpoint[{key!r}]: must be a dict, got {type(checkpoint.get(key)).__name__}")
    for name, entry in checkpoint["packed"].items():
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"{name}: a packed entry has the keys {sorted(_ENTRY_KEYS)}, got {keys}")
        for key in ("values", "meta"):
            if not isinstance(entry[key], Tensor):
                raise ValueError(f"{name}: {key} must be a tensor, got {type(entry[key]).__name__}")


def _unpack_entry(name: str, entry: dict) -> Tensor:
    """The dense weight of one packed entry, checked against its stored shape; errors name the entry."""
    try:
        dense = unpack24(entry["values"], entry["meta"])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name}: {exc}") from exc
    if entry["transposed"]:
        dense = dense.t()
    if tuple(dense.shape) != tuple(entry["shape"]):
        raise ValueError(f"{name}: packed values unpack to {tuple(dense.shape)}, "
                         f"the checkpoint says {tuple(entry['shape'])}")
    return dense


def _check_loadable(model: nn.Module, state: dict, strict: bool) -> None:
    """What ``model.load_state_dict(state, strict)`` checks (keys, shapes), before anything is copied:
    torch's load copies every entry it can and raises only at the end."""
    own = model.state_dict(keep_vars=True)
    if strict:
        missing = [key for key in own if key not in state]
        unexpected = [key for key in state if key not in own]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint: strict=True and the keys differ from the model's: missing {missing}, "
                f"unexpected {unexpected}"
            )
    for key, value in state.items():
        target = own.get(key)
        if not isinstance(target, Tensor) or torch.nn.parameter.is_lazy(target):
            continue
        if isinstance(target, torch.sparse.SparseSemiStructuredTensor):
            raise ValueError(f"{key}: the model's weight is packed already; load into a dense model")
        if not isinstance(value, Tensor):
            raise ValueError(f"{key}: the checkpoint holds a {type(value).__name__}, the model a tensor")
        if value.shape != target.shape:
            raise ValueError(f"{key}: the checkpoint's shape {tuple(value.shape)} differs from the model's "
                             f"{tuple(target.shape)}")


def _packed_swaps(model: nn.Module, packed: dict) -> List[Tuple[nn.Module, str, nn.Parameter]]:
    """``(module, attribute, packed weight)`` for every packed entry; errors name the entry."""
    swaps = []
    for name, entry in packed.items():
        module_name, _, attribute = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError as exc:
            raise ValueError(f"{name}: the model has no module {module_name!r} to swap the packed weight into") from exc
        weight = dict(module.named_parameters(recurse=False)).get(attribute)
        if weight is None:
            raise ValueError(f"{name}: module {module_name!r} has no parameter {attribute!r}")
        values, meta = entry["values"].to(weight.device), entry["meta"].to(weight.device)
        swaps.append((module, attribute, _packed_parameter(values, meta, entry["transposed"])))
    return swaps


def load_packed_state_dict(model: nn.Module, checkpoint: dict, *, packed: bool = False,
                           strict: bool = True) -> nn.Module:
    """Load a :func:`packed_state_dict` checkpoint into ``model``; returns ``model``.

    ``packed=False`` restores every target as a dense weight (bit-identical to the one packed);
    ``packed=True`` then swaps the targets for their packed form as :func:`pack_model` does, from
    the stored values and meta. ``strict`` is passed to ``load_state_dict``.

    All or nothing: the checkpoint's layout, every packed entry, the keys (``strict``) and shapes
    against the model, and with ``packed=True`` every module to swap are checked before the model
    changes; an error names the entry at fault and leaves the model as it was.
    """
    _check_checkpoint(checkpoint)
    weights = {name: _unpack_entry(name, entry) for name, entry in checkpoint["packed"].items()}
    state = {**checkpoint["dense"], **weights}
    _check_loadable(model, state, strict)
    swaps = _packed_swaps(model, checkpoint["packed"]) if packed else []
    model.load_state_dict(state, strict=strict)
    for module, attribute, weight in swaps:
        setattr(module, attribute, weight)
    return model
