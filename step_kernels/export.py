"""Export of 2:4 sparse models for inference (DESIGN.md section 5).

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
from typing import Optional, Sequence, Tuple

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


def _targets(model: nn.Module, targets: Optional[Sequence[Target]]) -> Sequence[Target]:
    return find_targets(model) if targets is None else targets


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


def _set_packed_weight(module: nn.Module, values: Tensor, meta: Tensor, transposed: bool) -> None:
    rows = values.shape[0]
    sparse = _from_packed(values, meta, (rows, 2 * values.shape[1]))
    module.weight = nn.Parameter(sparse.t() if transposed else sparse, requires_grad=False)


def pack_model(model: nn.Module, targets: Optional[Sequence[Target]] = None, *, prune: bool = False) -> nn.Module:
    """Swap the weight of every 2:4 target of ``model`` for its packed form, in place; returns ``model``.

    ``targets`` defaults to :func:`~step_kernels.targets.find_targets` ``(model)``. The packed
    weights do not require grad (inference only). A ``Conv1D`` weight becomes the transpose of the
    packed ``W.t()``, which torch's sparse ``addmm`` consumes as is.
    """
    for t in list(_targets(model, targets)):
        values, meta = _pack_target(t, prune)
        _set_packed_weight(t.module, values, meta, transposed=t.group_dim == 0)
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


def load_packed_state_dict(model: nn.Module, checkpoint: dict, *, packed: bool = False, strict: bool = True) -> nn.Module:
    """Load a :func:`packed_state_dict` checkpoint into ``model``; returns ``model``.

    ``packed=False`` restores every target as a dense weight (bit-identical to the one packed);
    ``packed=True`` then swaps the targets for their packed form as :func:`pack_model` does, from
    the stored values and meta. ``strict`` is passed to ``load_state_dict``.
    """
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"checkpoint: not a {FORMAT!r} checkpoint (make it with packed_state_dict)")
    if checkpoint.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"checkpoint: version {checkpoint['version']} is newer than this reader ({FORMAT_VERSION})")
    weights = {}
    for name, entry in checkpoint["packed"].items():
        dense = unpack24(entry["values"], entry["meta"])
        if entry["transposed"]:
            dense = dense.t()
        if tuple(dense.shape) != tuple(entry["shape"]):
            raise ValueError(f"{name}: packed values unpack to {tuple(dense.shape)}, the checkpoint says {tuple(entry['shape'])}")
        weights[name] = dense
    model.load_state_dict({**checkpoint["dense"], **weights}, strict=strict)
    if packed:
        for name, entry in checkpoint["packed"].items():
            module = model.get_submodule(name.rpartition(".")[0])
            device = module.weight.device
            _set_packed_weight(module, entry["values"].to(device), entry["meta"].to(device), entry["transposed"])
    return model
