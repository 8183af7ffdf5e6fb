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

Not supported: Megatron's ``DistributedOptimizer`` (``use_distributed_optimizer=True``), whose
1-D shards of the flattened grad buffer can end inside an N:M group; it raises
``NotImplementedError``. :func:`check_shard_alignment` is the check such shards must pass.
"""

from __future__ import annotations

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
           "PARALLEL_LINEAR_TYPES", "MEGATRON_EXCLUDE"]

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
                     grad_stats_group=None):
            super().__init__(optimizer, config, lambda opt, config=None: None)
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
            for p in self.get_parameters():
                main_grad = getattr(p, "main_grad", None)
                if main_grad is not None:
                    p.grad = main_grad if main_grad.dtype == p.dtype else main_grad.to(p.dtype)
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
            """One STEP step: masters updated, masked weights written into the model params."""
            self.optimizer.step()
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
    """
    MegatronSTEP = __getattr__("MegatronSTEP")
    from megatron.core import parallel_state
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler

    if config.use_distributed_optimizer:
        raise NotImplementedError(
            "get_step_optimizer: Megatron's DistributedOptimizer (use_distributed_optimizer=True) is not supported: "
            "its 1-D shards of the grad buffer may end inside an N:M group. Use use_distributed_optimizer=False "
            "(optimizer state replicated over data-parallel ranks), or FSDP2 with step_kernels.distributed.DistributedSTEP")
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
    inner = DistributedSTEP(groups, lr=config.lr if config.lr is not None else 1e-3,
                            betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                            weight_decay=config.weight_decay, recipe=recipe, srste_decay=srste_decay, switch=switch,
                            total_steps=total_steps, backend=backend, process_group=reduce_groups,
                            replica_group=replica_groups, **step_kwargs)
    grad_scaler = None
    if config.loss_scale:
        grad_scaler = ConstantGradScaler(config.loss_scale)
    elif config.fp16:
        grad_scaler = DynamicGradScaler(initial_scale=config.initial_loss_scale, min_scale=config.min_loss_scale,
                                        growth_factor=2.0, backoff_factor=0.5,
                                        growth_interval=config.loss_scale_window, hysteresis=config.hysteresis)
    stats_group = parallel_state.get_model_parallel_group() if parallel_state.model_parallel_is_initialized() else None
    return MegatronSTEP(inner, config, grad_scaler=grad_scaler, tp_group=tp_group, grad_stats_group=stats_group)
