"""STEP inside Megatron-Core (tested with ``megatron-core==0.16.1``).

:func:`get_step_optimizer` is the STEP counterpart of Megatron's ``get_megatron_optimizer``: it
takes the same :class:`megatron.core.optimizer.OptimizerConfig` and model chunks and returns a
:class:`MegatronSTEP`, a ``MegatronOptimizer`` that training loops, ``OptimizerParamScheduler``
and checkpoint code drive as usual (``step()`` returns ``(success, grad_norm, num_zeros)``).

How it maps onto Megatron's mixed precision: STEP's fp32 masters *are* the main parameters
(one fp32 copy per bf16/fp16 parameter, as in ``Float16OptimizerWithFloat16Params``), and the
step writes ``mask(w) * w`` straight into the bf16/fp16 model parameters in place of Megatron's
plain main-to-model copy. Loss-scale unscaling and gradient clipping are folded into the
kernel's ``grad_scale`` (grads are divided once, inside the fused step).

Tensor parallelism: targets are the weights of ``ColumnParallelLinear`` / ``RowParallelLinear``
(and TE's variants), stored ``[out, in]`` with groups along the input dim. A
``ColumnParallelLinear`` splits the output dim, so its groups stay whole; a ``RowParallelLinear``
splits the input dim, so its *local* input size must be divisible by M (checked, with the layer
and the TP size named). The AutoSwitch sums and flip counts are summed over the TP group; data
parallel replicas hold identical grads and are only checked for agreement when the optimizer is
built.

Megatron's distributed optimizer (``use_distributed_optimizer=True`` in both the
``DistributedDataParallelConfig`` and the ``OptimizerConfig``): each data-parallel rank owns one
contiguous 1-D shard of every bucket of DDP's flattened grad buffer. The shards are computed by
Megatron's own range-map code (``DistributedOptimizer._build_gbuf_range_map``) for every DP rank
and checked with :func:`check_shard_alignment`: a shard must hold whole N:M groups. Megatron pads
every parameter's start to 64 elements and every bucket to ``lcm(dp, 128)`` (``lcm(dp, 128, 2**16)``
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
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .distributed import DistributedSTEP
from .reference import parse_sparsity
from .targets import DEFAULT_EXCLUDE_NAMES, PARALLEL_LINEAR_TYPES, find_targets, sparse_param_groups

# MegatronSTEP (built on first access, as it subclasses Megatron's MegatronOptimizer) is left out
# of __all__ so that a star import never needs megatron-core.
__all__ = ["get_step_optimizer", "megatron_param_groups", "check_tensor_parallel", "check_shard_alignment",
           "distributed_optimizer_shards", "PARALLEL_LINEAR_TYPES", "MEGATRON_EXCLUDE"]

# Megatron's output layer is a ColumnParallelLinear named "output_layer": excluded like lm_head.
MEGATRON_EXCLUDE = [DEFAULT_EXCLUDE_NAMES, r"(^|\.)output_layer$"]
def _tp_size(tp_group) -> int:
    return 1 if tp_group is None else torch.distributed.get_world_size(tp_group)


def check_tensor_parallel(named_targets: Iterable[Tuple[str, nn.Module, str]], tp_size: int) -> None:
    """Raise ``ValueError`` for a target whose tensor-parallel partition breaks N:M groups.

    ``named_targets`` yields ``(module name, module, "N:M")``. A partition along the input dim
    (``partition_dim == 1``: ``RowParallelLinear``) must leave a local input size divisible by M;
    under TP > 1 a target that is not split (a plain ``nn.Linear`` copied on every TP rank) is
    refused, since the AutoSwitch sums would count it once per rank.
    """
    for name, module, sparsity in named_targets:
        _, m = parse_sparsity(sparsity, f"{name}.weight")
        weight = module.weight
        local_in = weight.shape[1]
        if getattr(weight, "tensor_model_parallel", False) and getattr(weight, "partition_dim", 0) == 1:
            if local_in % m:
                raise ValueError(
                    f"{name}.weight: {type(module).__name__} splits the input dim over {tp_size} tensor-parallel "
                    f"ranks: input size {local_in * tp_size} gives {local_in} per rank, not divisible by M={m} "
                    f"of sparsity {sparsity!r}; choose an input size divisible by {m * tp_size}")
        elif local_in % m:
            raise ValueError(f"{name}.weight: input size {local_in} (dim 1 of shape {tuple(weight.shape)}) is not "
                             f"divisible by M={m} of sparsity {sparsity!r}")
        if tp_size > 1 and not getattr(weight, "tensor_model_parallel", False):
            raise ValueError(
                f"{name}.weight: a {type(module).__name__} copied on all {tp_size} tensor-parallel ranks cannot be "
                "an N:M target (AutoSwitch would count it once per rank); exclude it or use a parallel layer")


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


def megatron_param_groups(model_chunks: Sequence[nn.Module], sparsity: str = "2:4", *, include=None,
                          exclude=None, overrides: Optional[Dict[str, str]] = None,
                          weight_decay: float = 0.0, tp_group=None) -> List[Dict[str, Any]]:
    """Param groups of Megatron model chunks for :class:`MegatronSTEP`.

    Targets: weights of Megatron's parallel linear layers and of ``nn.Linear``, except (with
    ``exclude=None``) ``output_layer``, heads and embeddings; ``include``/``exclude``/``overrides``
    as :func:`step_kernels.sparse_param_groups`. Like Megatron's defaults, ``weight_decay`` applies
    to 2-D parameters only (not to biases and norms). Tensor-parallel partitions are checked with
    :func:`check_tensor_parallel`.
    """
    exclude = MEGATRON_EXCLUDE if exclude is None else exclude
    groups: List[Dict[str, Any]] = []
    for ci, chunk in enumerate(model_chunks):
        prefix = f"chunk{ci}." if len(model_chunks) > 1 else ""
        targets = [(t.module_name, t.module, next((v for pat, v in (overrides or {}).items()
                                                   if re.search(pat, t.module_name)), sparsity))
                   for t in find_targets(chunk, include, exclude)]
        check_tensor_parallel(targets, _tp_size(tp_group))
        chunk_groups = sparse_param_groups(chunk, sparsity, include=include, exclude=exclude, overrides=overrides)
        for g in chunk_groups:
            g["param_names"] = [prefix + n for n in g["param_names"]]
            if g["sparsity"] is not None:
                groups.append(dict(g, weight_decay=weight_decay))
                continue
            for decay in (True, False):
                keep = [i for i, p in enumerate(g["params"]) if (p.dim() >= 2) == decay]
                if keep:
                    groups.append(dict(g, params=[g["params"][i] for i in keep],
                                       param_names=[g["param_names"][i] for i in keep],
                                       weight_decay=weight_decay if decay else 0.0))
    return groups


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


def _megatron_base():
    try:
        from megatron.core.optimizer.optimizer import MegatronOptimizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("step_kernels.megatron needs megatron-core: "
                          "`pip install --no-deps megatron-core==0.16.1 'packaging>=24.2'`") from exc
    return MegatronOptimizer


def _make_megatron_step_class():
    MegatronOptimizer = _megatron_base()

    class _MegatronSTEP(MegatronOptimizer):
        """A ``MegatronOptimizer`` whose inner optimizer is :class:`~step_kernels.distributed.DistributedSTEP`."""

        def __init__(self, optimizer: DistributedSTEP, config, grad_scaler=None, tp_group=None,
                     grad_stats_group=None, model_chunks: Optional[Sequence[nn.Module]] = None):
            super().__init__(optimizer, config, lambda opt, config=None: None)
            self.model_chunks = list(model_chunks or [])
            # Distributed optimizer: (shard, model param, start, end) of the shards this rank owns.
            self.shards = list(getattr(optimizer, "shards", None) or [])
            self.grad_scaler = grad_scaler
            self.tp_group = tp_group
            self.grad_stats_parallel_group = grad_stats_group  # None: one process, nothing to reduce
            self.is_stub_optimizer = False
            params = self.get_parameters()
            self._device = params[0].device if params else torch.device("cpu")
            self._one = torch.ones((), dtype=torch.float32, device=self._device)

        # the MegatronOptimizer interface ----------------------------------------------------------

        def zero_grad(self, set_to_none: bool = True):
            """Zero the model grads (Megatron's DDP zeroes its own ``main_grad`` buffers)."""
            self.optimizer.zero_grad(set_to_none=set_to_none)
            for _, param, _, _ in self.shards:
                param.grad = None

        def _grads(self) -> List[Tuple[Tensor, Optional[Tensor]]]:
            """``(optimizer param, its grad source)``: DDP's ``main_grad`` where present, else
            ``.grad``; under the distributed optimizer, this rank's shard of the model param's."""
            if not self.shards:
                return [(p, getattr(p, "main_grad", None)) for p in self.get_parameters()]
            pairs = []
            for shard, param, start, end in self.shards:
                grad = getattr(param, "main_grad", None)
                grad = param.grad if grad is None else grad
                pairs.append((shard, None if grad is None else grad.view(-1)[start:end].view(shard.shape)))
            return pairs

        def get_loss_scale(self) -> Tensor:
            """The loss scale (1 without a grad scaler)."""
            return self._one if self.grad_scaler is None else self.grad_scaler.scale

        def reload_model_params(self, state_dict=None):
            """Reset the fp32 masters from the model parameters (after loading model weights only)."""
            opt = self.optimizer
            with torch.no_grad():
                for group in opt.param_groups:
                    for p in group["params"]:
                        master = opt.state[p].get("master")
                        if master is not None:
                            master.copy_(p)
                            if opt._masked_now(group):
                                opt._write_masked(p, master, group)

        def state_dict(self):
            """``{"optimizer": STEP state dict, "grad_scaler": ...}``."""
            out = {"optimizer": self.optimizer.state_dict()}
            if self.grad_scaler is not None:
                out["grad_scaler"] = self.grad_scaler.state_dict()
            return out

        def load_state_dict(self, state_dict):
            """Load what :meth:`state_dict` saved (model parameters are rewritten from the masters)."""
            self.optimizer.load_state_dict(state_dict["optimizer"])
            if self.grad_scaler is not None and "grad_scaler" in state_dict:
                self.grad_scaler.load_state_dict(state_dict["grad_scaler"])

        def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
            raise NotImplementedError("MegatronSTEP does not support Megatron's dist-checkpointing yet: save "
                                      "state_dict() per rank, or use FSDP2 with DistributedSTEP and "
                                      "torch.distributed.checkpoint")

        @torch.no_grad()
        def prepare_grads(self) -> bool:
            """Take grads from Megatron DDP's ``main_grad`` when present; with a grad scaler, find
            non-finite grads across the model-parallel group and update the scaler. Returns
            whether a non-finite grad was found (the step is then skipped)."""
            grads = []
            for p, source in self._grads():
                if source is not None:
                    p.grad = source if source.dtype == p.dtype else source.to(p.dtype)
                if p.grad is not None:
                    grads.append(p.grad)
            if self.grad_scaler is None:
                return False
            found_inf = torch.zeros(1, dtype=torch.float32, device=self._device)
            for g in grads:
                found_inf += (~torch.isfinite(g)).any()
            if self.grad_stats_parallel_group is not None:
                torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX,
                                             group=self.grad_stats_parallel_group)
            found = bool(found_inf.item() > 0)
            self.grad_scaler.update(found)
            return found

        def step_with_ready_grads(self) -> bool:
            """One STEP step: masters updated, masked weights written into the model params.
            Under the distributed optimizer, DDP then all-gathers the param buffer (unless it
            overlaps that with the next forward), as Megatron's ``DistributedOptimizer`` does."""
            self.optimizer.step()
            if self.shards:
                for chunk in self.model_chunks:
                    if not chunk.ddp_config.overlap_param_gather:
                        chunk.start_param_sync()
            return True

        @torch.no_grad()
        def step(self):
            """``prepare_grads``, clip (folded into the kernel's grad scale), step.
            Returns ``(success, grad_norm, num_zeros_in_grad)`` like Megatron's optimizers."""
            if self.prepare_grads():
                return False, None, None
            scale = self.get_loss_scale().to(device=self._device, dtype=torch.float32).reshape(())
            grad_norm = 0.0
            if self.config.clip_grad > 0.0:
                # Megatron's norm is of the scaled grads: unscale it, then fold the clip in.
                grad_norm = float(self.get_grad_norm()) / float(scale)
                clip_coeff = self.config.clip_grad / (grad_norm + 1.0e-6)
                if clip_coeff < 1.0:
                    scale = scale / clip_coeff
            num_zeros = self.count_zeros() if self.config.log_num_zeros_in_grad else 0
            self.optimizer.grad_scale = None if float(scale) == 1.0 else scale
            try:
                success = self.step_with_ready_grads()
            finally:
                self.optimizer.grad_scale = None
            return success, grad_norm, num_zeros

        # STEP's own surface ------------------------------------------------------------------------

        @property
        def phase(self) -> str:
            """STEP's phase: ``"dense"`` or ``"sparse"``."""
            return self.optimizer.phase

        @property
        def switch_step(self) -> Optional[int]:
            """The step at whose end STEP switched, or None."""
            return self.optimizer.switch_step

        def stats(self) -> Dict[str, Any]:
            """STEP's :meth:`~step_kernels.STEP.stats`."""
            return self.optimizer.stats()

    _MegatronSTEP.__name__ = _MegatronSTEP.__qualname__ = "MegatronSTEP"
    return _MegatronSTEP


_CLASS = None


def __getattr__(name):
    # MegatronSTEP subclasses Megatron's MegatronOptimizer, so it is built on first use: importing
    # step_kernels.megatron never needs megatron-core.
    global _CLASS
    if name == "MegatronSTEP":
        if _CLASS is None:
            _CLASS = _make_megatron_step_class()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_step_optimizer(config, model_chunks: Sequence[nn.Module], sparsity: str = "2:4", *, recipe: str = "step",
                       switch=None, total_steps: Optional[int] = None, srste_decay: float = 2e-4,
                       backend: str = "auto", include=None, exclude=None,
                       overrides: Optional[Dict[str, str]] = None, tp_group=None, dp_group=None, **step_kwargs):
    """STEP for a Megatron-Core model: the counterpart of ``get_megatron_optimizer(config, model_chunks)``.

    Reads ``lr``, ``adam_beta1/2``, ``adam_eps``, ``weight_decay``, ``clip_grad``, ``fp16``/``bf16``
    and the loss-scale settings from ``config`` (``config.optimizer`` must be ``"adam"`` with
    ``decoupled_weight_decay=True``). ``tp_group``/``dp_group`` default to Megatron's
    ``parallel_state`` groups. Other keyword arguments go to :class:`~step_kernels.STEP`.
    Construction is collective over both groups; configuration errors are raised on every rank.

    With ``config.use_distributed_optimizer``, ``model_chunks`` must be Megatron
    ``DistributedDataParallel`` modules built with ``use_distributed_optimizer=True``: STEP then
    updates only this rank's shards of their grad buffers (see the module docstring), and the
    data-parallel group is the buffers' own.
    """
    MegatronSTEP = __getattr__("MegatronSTEP")
    from megatron.core import parallel_state
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler

    if config.optimizer != "adam" or not config.decoupled_weight_decay:
        raise ValueError(f"get_step_optimizer: STEP is AdamW: config.optimizer must be 'adam' with "
                         f"decoupled_weight_decay=True, got optimizer={config.optimizer!r}, "
                         f"decoupled_weight_decay={config.decoupled_weight_decay}")
    if tp_group is None and parallel_state.model_parallel_is_initialized():
        tp_group = parallel_state.get_tensor_model_parallel_group()
    if dp_group is None and parallel_state.model_parallel_is_initialized():
        dp_group = parallel_state.get_data_parallel_group()
    groups = megatron_param_groups(model_chunks, sparsity, include=include, exclude=exclude, overrides=overrides,
                                   weight_decay=config.weight_decay, tp_group=tp_group)
    reduce_groups = [tp_group] if _tp_size(tp_group) > 1 else []
    replica_groups = [dp_group] if dp_group is not None and torch.distributed.get_world_size(dp_group) > 1 else []
    cls, sharding = DistributedSTEP, {}
    if config.use_distributed_optimizer:
        buffers = _distributed_optimizer_buffers(model_chunks)
        dp_group = buffers[0].data_parallel_group
        # Each DP rank updates other shards: the statistics are summed over DP too.
        reduce_groups += [dp_group] if dp_group.size() > 1 else []
        replica_groups = []
        cls, sharding = _ShardedSTEP, {"buffers": buffers}
    inner = cls(groups, lr=config.lr if config.lr is not None else 1e-3,
                betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                weight_decay=config.weight_decay, recipe=recipe, srste_decay=srste_decay, switch=switch,
                total_steps=total_steps, backend=backend, process_group=reduce_groups,
                replica_group=replica_groups, **sharding, **step_kwargs)
    grad_scaler = None
    if config.loss_scale:
        grad_scaler = ConstantGradScaler(config.loss_scale)
    elif config.fp16:
        grad_scaler = DynamicGradScaler(initial_scale=config.initial_loss_scale, min_scale=config.min_loss_scale,
                                        growth_factor=2.0, backoff_factor=0.5,
                                        growth_interval=config.loss_scale_window, hysteresis=config.hysteresis)
    stats_group = None
    if parallel_state.model_parallel_is_initialized():
        # Megatron's choice: the distributed optimizer's grad norm and inf check span its instance.
        stats_group = (parallel_state.get_intra_distributed_optimizer_instance_group()
                       if config.use_distributed_optimizer else parallel_state.get_model_parallel_group())
    return MegatronSTEP(inner, config, grad_scaler=grad_scaler, tp_group=tp_group, grad_stats_group=stats_group,
                        model_chunks=model_chunks)


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
