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

This module is the optimizer adapter. Tensor parallelism (targets, partition checks, param
groups) is :mod:`step_kernels.megatron_tp`; Megatron's distributed optimizer (this rank's shards
of DDP's grad buffers) is :mod:`step_kernels.megatron_distopt`. Their public names are
importable from here too.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .distributed import DistributedSTEP
from .megatron_distopt import (
    _distributed_optimizer_buffers,
    _ShardedSTEP,
    check_shard_alignment,
    distributed_optimizer_shards,
)
from .megatron_tp import MEGATRON_EXCLUDE, _tp_size, check_tensor_parallel, megatron_param_groups
from .targets import PARALLEL_LINEAR_TYPES

# MegatronSTEP (built on first access, as it subclasses Megatron's MegatronOptimizer) is left out
# of __all__ so that a star import never needs megatron-core.
__all__ = ["get_step_optimizer", "megatron_param_groups", "check_tensor_parallel", "check_shard_alignment",
           "distributed_optimizer_shards", "PARALLEL_LINEAR_TYPES", "MEGATRON_EXCLUDE"]


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

