"""STEP under data and model parallelism (docs/design.md section 10).

- **DDP**: :class:`step_kernels.STEP` works as is. DDP all-reduces the grads, so every rank holds
  the same parameters, grads and state and takes the same steps; AutoSwitch sees the same
  statistics everywhere and needs no reduction. :class:`DistributedSTEP` with
  ``replica_group=ddp.process_group`` adds a check, when it is built, that every rank was given
  the same N:M configuration.
- **FSDP2** (``torch.distributed.fsdp.fully_shard``) and other DTensor layouts: use
  :class:`DistributedSTEP`. Kernels run on the local shards; state tensors are DTensors with their
  parameter's placements; the AutoSwitch sums, the flip count and the preconditioner-floor count
  are summed over the mesh dimensions the parameters are sharded on (or over an explicit
  ``process_group``), never over the default group blindly, so every rank switches at the same
  step. A layout that splits an N:M group is a ``ValueError`` raised on every rank.
- **Tensor parallelism with plain tensors** (Megatron-Core): pass the tensor-parallel group as
  ``process_group``; :mod:`step_kernels.megatron` does it for you.

Checkpoints with ``torch.distributed.checkpoint`` (DCP): the optimizer's global state (phase,
``t``, switch step, Z history) lives in ``param_groups``, and its state is created eagerly, so DCP
never needs its zero-grad initialisation step. DCP loads into a template of the same structure,
and a fresh optimizer is in phase 1 (``exp_avg_sq``) while a checkpoint from phase 2 holds
``precond`` and ``master``: call :func:`prepare_optimizer_for_load` before building the template.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .optimizer import STEP
from .reference import parse_sparsity

__all__ = ["DistributedSTEP", "shard_ranges", "check_group_layout", "prepare_optimizer_for_load"]

GroupArg = Union[None, "dist.ProcessGroup", Sequence["dist.ProcessGroup"]]


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and callable(getattr(t, "to_local", None))


def _as_group_list(groups: GroupArg) -> List[Any]:
    if groups is None:
        return []
    if isinstance(groups, (list, tuple)):
        return list(groups)
    return [groups]


def shard_ranges(size: int, dim: int, mesh_shape: Sequence[int], placements: Sequence[Any]) -> List[Tuple[int, int]]:
    """``(offset, length)`` along ``dim`` of every rank's local shard, one entry per mesh coordinate.

    Follows DTensor's ``Shard`` rule (``torch.chunk``: ceil-sized chunks, the last ones shorter or
    empty), applied mesh dimension by mesh dimension, so every rank can see every other rank's
    layout without communicating. ``Replicate`` leaves the size alone; any other placement
    (``Partial``, strided shards) raises ``ValueError``.
    """
    ranges = []
    for coord in itertools.product(*(range(k) for k in mesh_shape)):
        offset, length = 0, size
        for mesh_dim, placement in enumerate(placements):
            kind = type(placement).__name__
            if kind == "Replicate":
                continue
            if kind != "Shard":
                raise ValueError(f"placement {placement!r} is not supported for N:M targets (use Shard or Replicate)")
            if placement.dim % 2 != dim % 2:
                continue
            chunk = math.ceil(length / mesh_shape[mesh_dim]) if length else 0
            start = min(coord[mesh_dim] * chunk, length)
            offset, length = offset + start, min(chunk, length - start)
        ranges.append((offset, length))
    return ranges


def check_group_layout(name: str, global_size: int, dim: int, m: int, ranges: Iterable[Tuple[int, int]],
                       what: str) -> None:
    """Raise ``ValueError`` when a rank's slice ``(offset, length)`` of the group dimension would
    split a group of ``m`` (its offset or length not a multiple of ``m``)."""
    for rank, (offset, length) in enumerate(ranges):
        if length and (offset % m or length % m):
            raise ValueError(
                f"{name}: {what} splits its N:M groups: rank {rank} holds {length} of the {global_size} "
                f"entries of dim {dim} (the dim groups of M={m} run along) starting at {offset}, not a "
                f"multiple of {m}; shard another dim, or pick sizes so every local slice holds whole groups"
            )


def _same_type(error: Optional[BaseException], message: str) -> Exception:
    """An exception carrying ``message``: of ``error``'s type where it takes a message (so a
    ``BackendUnavailableError`` stays one), else a ``ValueError``."""
    if error is not None:
        try:
            return type(error)(message)
        except Exception:  # an exception type with another constructor
            pass
    return ValueError(message)


def _group_dim(group: Dict[str, Any]) -> int:
    dim = group.get("nm_dim")
    return 1 if dim is None else dim % 2


class DistributedSTEP(STEP):
    """:class:`step_kernels.STEP` for sharded parameters (FSDP2, DTensor, tensor parallelism).

    Takes every argument of :class:`~step_kernels.STEP`, plus:

    Args:
        process_group: the group (or list of groups) over which the parameters are *sharded*:
            the AutoSwitch sums, flip counts and the preconditioner-floor count are summed over
            it. Default: the mesh dimensions the DTensor parameters are sharded on (all DTensor
            parameters must share one mesh); none when no parameter is a DTensor (DDP).
        replica_group: a group (or list) whose ranks hold *copies* (DDP's process group, the
            replicate dimension of HSDP). Only used to check, when the optimizer is built, that
            every rank has the same configuration. Default: the DTensor mesh's replicate dims.

    Construction is collective over ``process_group`` and ``replica_group``: all ranks must
    build the optimizer together. Any configuration error (a layout that splits N:M groups,
    mismatched sparsity across ranks, a bad hyper-parameter on one rank) is raised on every
    rank, naming the rank and the parameter, instead of leaving the other ranks waiting in a
    collective: as a ``ValueError``, or with the failing rank's own exception type there.
    Every later ``step()`` must also be called on every rank, with grads for the same parameters
    (as DDP, FSDP2 and tensor parallelism give: grads follow the model graph), since a step
    without any grad is skipped without a collective. ``add_param_group`` after
    construction is collective too.
    """

    def __init__(self, params, *args, process_group: GroupArg = None, replica_group: GroupArg = None, **kwargs):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [dict(g, params=list(g["params"])) for g in groups]
        all_params = [p for g in groups for p in g["params"]]
        mesh_reduce, mesh_replica = self._mesh_groups(all_params)
        self._reduce_groups = _as_group_list(process_group) if process_group is not None else mesh_reduce
        self._check_groups = self._reduce_groups + (
            _as_group_list(replica_group) if replica_group is not None else mesh_replica)
        self._agreeing = True
        error: Optional[BaseException] = None
        try:
            self._check_layouts(groups, kwargs.get("recipe", "step"))
            super().__init__(self._local_groups(groups), *args, **kwargs)
        except Exception as exc:  # any error: the other ranks must hear of it, not wait for us
            error = exc
        self._agree(error, self._fingerprint(groups, args, kwargs))
        self._agreeing = False

    def _local_groups(self, groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """The param groups this rank updates, given the groups it was built with (the same here;
        a subclass may map parameters to the shards the rank owns). Its errors reach every rank;
        the ranks agree on the configuration of the groups given, not of the local ones."""
        return groups

    # -----------------------------------------------------------------------------------------
    # groups, layouts and agreement
    # -----------------------------------------------------------------------------------------

    @staticmethod
    def _mesh_groups(params: List[Tensor]) -> Tuple[List[Any], List[Any]]:
        """(groups of the sharded mesh dims, groups of the replicated mesh dims) of the DTensors."""
        layouts = {(p.device_mesh, tuple(type(pl).__name__ == "Shard" for pl in p.placements))
                   for p in params if _is_dtensor(p)}
        if not layouts:
            return [], []
        meshes = {mesh for mesh, _ in layouts}
        if len(meshes) > 1:
            raise ValueError(f"DistributedSTEP: the DTensor parameters live on {len(meshes)} different device "
                             "meshes; pass process_group= (the group the statistics are summed over)")
        mesh = meshes.pop()
        sharded = [any(flags[d] for _, flags in layouts) for d in range(mesh.ndim)]
        groups = [mesh.get_group(d) for d in range(mesh.ndim)]
        return ([g for g, s in zip(groups, sharded) if s], [g for g, s in zip(groups, sharded) if not s])

    @staticmethod
    def _check_layouts(groups: List[Dict[str, Any]], recipe: str) -> None:
        """Every rank's shard of every DTensor target must hold whole N:M groups (checked from the
        global shape and placements, so every rank raises the same error)."""
        if recipe == "dense":
            return
        for gi, group in enumerate(groups):
            if group.get("sparsity") is None:
                continue
            _, m = parse_sparsity(group["sparsity"], f"param_groups[{gi}]: sparsity")
            dim = _group_dim(group)
            names = group.get("param_names") or []
            for i, p in enumerate(group["params"]):
                if not _is_dtensor(p) or p.dim() != 2:
                    continue
                name = names[i] if i < len(names) else f"param_groups[{gi}]['params'][{i}]"
                ranges = shard_ranges(p.shape[dim], dim, p.device_mesh.shape, p.placements)
                layout = f"its layout {tuple(p.placements)} on a mesh of shape {tuple(p.device_mesh.shape)}"
                check_group_layout(name, p.shape[dim], dim, m, ranges, layout)

    def _fingerprint(self, groups: List[Dict[str, Any]], args: tuple, kwargs: Dict[str, Any]) -> List[Any]:
        """What every rank must agree on: recipe, switch and per group N:M, dim, names, sizes."""
        per_group = []
        for gi, g in enumerate(groups):
            sparsity = g.get("sparsity")
            per_group.append((f"param_groups[{gi}]", {
                "sparsity": sparsity, "nm_dim": _group_dim(g) if sparsity is not None else None,
                "params": len(g["params"]), "param_names": list(g.get("param_names") or []),
                "shapes": [tuple(p.shape) for p in g["params"]],
            }))
        config = {k: repr(v) for k, v in sorted(kwargs.items())}
        config["args"] = repr(args)
        return [("optimizer", config)] + per_group

    def _agree(self, error: Optional[BaseException], fingerprint: List[Any]) -> None:
        """Gather every rank's error and configuration; raise the same ValueError on every rank
        when any rank failed or the configurations differ."""
        if not self._check_groups:
            if error is not None:
                raise error
            return
        message = None if error is None else f"{type(error).__name__}: {error}"
        for group in self._check_groups:
            size = dist.get_world_size(group)
            gathered: List[Any] = [None] * size
            dist.all_gather_object(gathered, (dist.get_rank(), message, fingerprint), group=group)
            failures: Dict[str, List[int]] = {}
            for rank, msg, _ in gathered:
                if msg is not None:
                    failures.setdefault(msg, []).append(rank)
            if failures:
                count = sum(len(ranks) for ranks in failures.values())
                detail = "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {msg}"
                                   for msg, ranks in failures.items())
                raise _same_type(error, f"DistributedSTEP: configuration failed on {count} of {size} ranks: "
                                        f"{detail}") from error
            first_rank, _, first = gathered[0]
            for rank, _, other in gathered[1:]:
                for (where, mine), (_, theirs) in zip(first, other):
                    diff = sorted(k for k in mine if mine[k] != theirs.get(k))
                    if diff:
                        key = diff[0]
                        raise ValueError(f"DistributedSTEP: ranks disagree on {where} {key}: rank {first_rank} has "
                                         f"{mine[key]!r}, rank {rank} has {theirs[key]!r}")
                if len(first) != len(other):
                    raise ValueError(f"DistributedSTEP: rank {first_rank} has {len(first) - 1} param groups, "
                                     f"rank {rank} has {len(other) - 1}")

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group (collective after construction: every rank adds the same group)."""
        if getattr(self, "_agreeing", True):
            super().add_param_group(param_group)
            return
        group = dict(param_group, params=list(param_group["params"]) if not isinstance(
            param_group["params"], Tensor) else [param_group["params"]])
        error: Optional[BaseException] = None
        try:
            self._check_layouts([group], self.recipe)
            super().add_param_group(group)
        except Exception as exc:  # any error: the other ranks must hear of it, not wait for us
            error = exc
        self._agree(error, self._fingerprint([group], (), {}))

    # -----------------------------------------------------------------------------------------
    # the per-step reduction
    # -----------------------------------------------------------------------------------------

    def _reduce_stats(self, totals: Tensor) -> Tensor:
        """Sum ``totals`` over the shard groups, in rank order (deterministic, and bit-identical on
        every rank, so every rank takes the same AutoSwitch decision)."""
        for group in self._reduce_groups:
            gathered = [torch.empty_like(totals) for _ in range(dist.get_world_size(group))]
            dist.all_gather(gathered, totals, group=group)
            totals = torch.stack(gathered).sum(dim=0)
        return totals


def prepare_optimizer_for_load(optimizer: STEP, checkpoint_id=None, *, storage_reader=None,
                               key: str = "optim") -> bool:
    """Give a freshly built optimizer the state layout of a DCP checkpoint, before ``dcp.load``.

    DCP fills a template state dict whose keys must exist in the checkpoint. When the checkpoint
    was saved after the switch (its optimizer state, stored under ``key``, holds ``precond``),
    every target of ``optimizer`` gets placeholder ``precond`` and ``master`` tensors in place of
    ``exp_avg_sq`` (same shapes, dtypes and placements as the saved ones); ``dcp.load`` and
    ``set_state_dict`` then overwrite them and the phase. A target the checkpoint saved with
    ``exp_avg_sq`` (one still on live v after the switch, docs/design.md section 7) gets only the
    ``master``. Returns True when the layout changed. Call it on every rank.
    ``storage_reader`` defaults to a ``FileSystemReader(checkpoint_id)``.
    """
    if storage_reader is None:
        from torch.distributed.checkpoint import FileSystemReader

        storage_reader = FileSystemReader(checkpoint_id)
    keys = storage_reader.read_metadata().state_dict_metadata.keys()
    saved_sparse = any(k.startswith(f"{key}.state.") and k.endswith(".precond") for k in keys)
    if not saved_sparse or optimizer.recipe != "step" or optimizer.phase == "sparse":
        return False
    with torch.no_grad():
        for name, p, _ in optimizer._targets():
            state = optimizer.state[p]
            if f"{key}.state.{name}.exp_avg_sq" not in keys:
                state.pop("exp_avg_sq", None)
                state["precond"] = torch.zeros_like(p, dtype=optimizer.precond_dtype)
            state.setdefault("master", p.detach().to(torch.float32, memory_format=torch.contiguous_format,
                                                     copy=True))
    return True
