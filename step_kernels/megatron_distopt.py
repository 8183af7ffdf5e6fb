"""Megatron-Core's distributed optimizer under STEP: this rank's shards of DDP's grad buffers
(docs/design.md section 10).

With ``use_distributed_optimizer=True`` (in both the ``DistributedDataParallelConfig`` and the
``OptimizerConfig``) each data-parallel rank owns one contiguous 1-D shard of every bucket of
DDP's flattened grad buffer. The shards are computed by Megatron's own range-map code
(``DistributedOptimizer._build_gbuf_range_map``) for every DP rank and checked with
:func:`check_shard_alignment`: a shard must hold whole N:M groups. Megatron pads every
parameter's start to 64 elements and every bucket to ``lcm(dp, 128)`` (``lcm(dp, 128, 2**16)``
with ``pad_buckets_for_high_nccl_busbw=True``), so shards are multiples of ``128 / gcd(dp, 128)``
elements: whole groups for any M <= 32 when the largest power of two dividing the DP size is at
most 4 (for 2:4, at most 32). Otherwise the ``ValueError``, raised on every rank from the layout
alone, says whether ``pad_buckets_for_high_nccl_busbw=True`` would align them. STEP then runs on
this rank's shards (a target's shard is viewed as ``[rows, M]``: groups are M consecutive
elements of the flattened ``[out, in]`` weight), takes the reduce-scattered grads from
``main_grad``, writes ``mask(w) * w`` into its shard of the bf16/fp32 model parameters (which are
views of DDP's param buffer) and lets DDP's ``start_param_sync`` all-gather them, as Megatron's
``DistributedOptimizer.step_with_ready_grads`` does. The AutoSwitch sums and flip counts are
summed over the TP group and the DP group. Megatron's ``DistributedOptimizer`` class itself is not
instantiated: its ``__init__`` accepts only an Adam/AdamW/HybridDeviceOptimizer inner optimizer and
makes its own 1-D fp32 copies, and its dist-checkpointing formats assume Adam's state. Expert-parallel
buffers and several distributed-optimizer instances are not supported. ``state_dict()`` holds this
rank's shards: save and load it per rank with the same DP layout.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Sequence, Tuple

from torch import Tensor, nn

from .distributed import DistributedSTEP
from .reference import parse_sparsity

__all__ = ["check_shard_alignment", "distributed_optimizer_shards"]


def check_shard_alignment(ranges: Iterable[Tuple[str, int, int, int]], m: int) -> None:
    """Raise ``ValueError`` when a 1-D shard of a flattened ``[out, in]`` weight splits a group.

    ``ranges`` yields ``(name, in_features, start, end)``: the shard holds elements
    ``[start, end)`` of the flattened weight. Groups are M consecutive elements of a row, so both
    ends must be multiples of M (and ``in_features`` too).
    """
    for name, in_features, start, end in ranges:
        if in_features % m:
            raise ValueError(f"{name}: input size {in_features} is not divisible by M={m}")
        if start % m or end % m:
            raise ValueError(f"{name}: the optimizer shard [{start}, {end}) of the flattened weight splits an "
                             f"N:M group of M={m} (its ends must be multiples of {m})")


class _GroupAsRank:
    """A process group as seen from another of its ranks (only ``rank()`` and ``size()``)."""

    def __init__(self, group, rank: int):
        self._size, self._rank = group.size(), rank

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


class _BufferAsRank:
    """A Megatron grad buffer as DP rank ``rank`` sees it, for Megatron's range-map code, so every
    rank can compute every other rank's shards without communicating."""

    def __init__(self, buffer, rank: int):
        self._buffer = buffer
        self.data_parallel_group = _GroupAsRank(buffer.data_parallel_group, rank)

    def __getattr__(self, name):
        return getattr(self._buffer, name)


def _alignment_hint(dp: int, m: int) -> str:
    """How to make Megatron's padding give shards of whole groups of ``m`` at DP size ``dp``."""
    # Buckets are padded to lcm(dp, 128) (lcm(dp, 128, 2**16) with pad_buckets_for_high_nccl_busbw),
    # parameters start at multiples of 64: shards are multiples of that lcm / dp.
    if (math.lcm(dp, 128) // dp) % m == 0:
        return "Megatron's padding should have aligned them: was the buffer built by another Megatron version?"
    if (math.lcm(dp, 128, 2**16) // dp) % m == 0:
        return ("set DistributedDataParallelConfig(pad_buckets_for_high_nccl_busbw=True): buckets padded to "
                f"lcm(dp, 128, 2**16) give shards of multiples of {math.lcm(dp, 128, 2**16) // dp} elements")
    return (f"no Megatron padding setting aligns them at DP size {dp}: use a smaller M, a DP size with fewer "
            "factors of 2, or use_distributed_optimizer=False")


def distributed_optimizer_shards(buffers: Sequence[Any], targets: Dict[Tensor, Tuple[str, int]]
                                 ) -> Dict[Tensor, Tuple[int, int]]:
    """This rank's shard ``[start, end)`` of every parameter (flattened) under Megatron's
    distributed optimizer, from Megatron's own range map of each grad buffer.

    ``targets`` maps each N:M target parameter (a ``[out, in]`` weight) to ``(name, M)``. The
    shards of *every* data-parallel rank are computed (Megatron's
    ``DistributedOptimizer._build_gbuf_range_map`` on the buffer as that rank sees it) and checked
    with :func:`check_shard_alignment`, so a shard that would split an N:M group raises the same
    ``ValueError`` on every rank, naming the parameter, the rank, the bucket and the padding
    setting that would align it. Parameters this rank owns no part of are left out.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    owned: Dict[Tensor, Tuple[int, int]] = {}
    for buffer in buffers:
        group = buffer.data_parallel_group
        dp, me = group.size(), group.rank()
        for rank in range(dp):
            view = buffer if rank == me else _BufferAsRank(buffer, rank)
            (bucket_maps,) = DistributedOptimizer._build_gbuf_range_map(view).values()
            for bucket_index, bucket_map in enumerate(bucket_maps):
                for param, ranges in bucket_map["param_map"].items():
                    start, end = ranges["param"].start, ranges["param"].end
                    if param in targets:
                        name, m = targets[param]
                        try:
                            check_shard_alignment([(name, param.shape[-1], start, end)], m)
                        except ValueError as exc:
                            raise ValueError(f"{exc}; this is DP rank {rank}'s shard of bucket {bucket_index} under "
                                             f"Megatron's distributed optimizer with DP size {dp}: "
                                             f"{_alignment_hint(dp, m)}") from None
                    if rank == me:
                        owned[param] = (start, end)
    return owned



class _ShardedSTEP(DistributedSTEP):
    """:class:`DistributedSTEP` on the shards this rank owns under Megatron's distributed optimizer.

    Built with the model's param groups; it updates, in their place, 1-D views of this rank's
    shard of each parameter (a target's shard viewed as ``[rows, M]``, whose rows are its N:M
    groups), so the masked weights land in the model parameters, i.e. in DDP's param buffer.
    ``shards`` lists ``(shard, model parameter, start, end)``. Groups this rank owns nothing of
    stay, empty, so every rank has the same groups. The ranks agree on the configuration of
    the whole parameters; a shard that splits a group fails on every rank.
    """

    def __init__(self, params, *args, buffers: Sequence[Any], **kwargs):
        self._buffers = list(buffers)
        self.shards: List[Tuple[Tensor, Tensor, int, int]] = []
        super().__init__(params, *args, **kwargs)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Only while the optimizer is built: the shards come from DDP's buffers, built once."""
        if not getattr(self, "_agreeing", True):
            raise NotImplementedError("add_param_group: under Megatron's distributed optimizer the param groups are "
                                      "fixed when the optimizer is built (its shards come from DDP's grad buffers)")
        super().add_param_group(param_group)

    def _reduce_per_tensor(self, rows: Tensor) -> Tensor:
        """Per-tensor statistics stay local: each rank holds other tensors (its shards), so each
        shard decides alone whether its v has settled (docs/design.md section 7); its state is saved
        per rank."""
        return rows

    def _local_groups(self, groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        from megatron.core.tensor_parallel import copy_tensor_model_parallel_attributes

        targets = {}
        for gi, group in enumerate(groups):
            if group.get("sparsity") is None:
                continue
            _, m = parse_sparsity(group["sparsity"], f"param_groups[{gi}]: sparsity")
            for i, p in enumerate(group["params"]):
                if group.get("nm_dim") is not None and group["nm_dim"] % 2 == 0:
                    raise ValueError(f"{self._param_name(group, gi, i)}: groups along dim 0 (a Conv1D layout) are "
                                     "strided in the flattened weight and cannot be sharded by Megatron's distributed "
                                     "optimizer")
                targets[p] = (self._param_name(group, gi, i), m)
        buffered = {p for buffer in self._buffers for p in buffer.param_index_map}
        for gi, group in enumerate(groups):
            for i, p in enumerate(group["params"]):
                if p.requires_grad and p not in buffered:
                    raise ValueError(f"{self._param_name(group, gi, i)}: not in the grad buffers of Megatron's "
                                     "DistributedDataParallel (added after DDP was built?): the distributed "
                                     "optimizer cannot update it")
        owned = distributed_optimizer_shards(self._buffers, targets)
        local = []
        for gi, group in enumerate(groups):
            params, names = [], []
            for i, p in enumerate(group["params"]):
                if p not in owned:
                    continue
                start, end = owned[p]
                shard = p.detach().view(-1)[start:end]
                if p in targets:
                    shard = shard.view(-1, targets[p][1])
                copy_tensor_model_parallel_attributes(shard, p)
                if hasattr(p, "shared"):
                    shard.shared = p.shared
                self.shards.append((shard, p, start, end))
                params.append(shard)
                names.append(f"{self._param_name(group, gi, i)}[{start}:{end}]")
            local.append(dict(group, params=params, param_names=names))
        return local



def _distributed_optimizer_buffers(model_chunks: Sequence[nn.Module]) -> List[Any]:
    """The grad buffers of model chunks wrapped in Megatron's ``DistributedDataParallel`` with
    ``use_distributed_optimizer=True`` (``ValueError`` / ``NotImplementedError`` otherwise)."""
    buffers = []
    for ci, chunk in enumerate(model_chunks):
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is None or not ddp_config.use_distributed_optimizer:
            raise ValueError(f"get_step_optimizer: use_distributed_optimizer=True needs every model chunk wrapped in "
                             f"megatron.core.distributed.DistributedDataParallel with DistributedDataParallelConfig("
                             f"use_distributed_optimizer=True); model chunk {ci} ({type(chunk).__name__}) is not")
        if chunk.expert_parallel_buffers or getattr(ddp_config, "num_distributed_optimizer_instances", 1) != 1:
            raise NotImplementedError(f"get_step_optimizer: model chunk {ci}: expert-parallel buffers and several "
                                      "distributed-optimizer instances are not supported with STEP")
        buffers += list(chunk.buffers)
    groups = {id(b.data_parallel_group) for b in buffers}
    if len(groups) > 1:
        raise NotImplementedError("get_step_optimizer: the grad buffers use different data-parallel groups")
    return buffers
