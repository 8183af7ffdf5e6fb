"""Tensor parallelism under STEP with Megatron-Core: which layers are targets, and the checks
that their partitions keep N:M groups whole (docs/design.md section 10).

Targets are the weights of ``ColumnParallelLinear`` / ``RowParallelLinear`` (and TE's variants),
stored ``[out, in]`` with groups along the input dim. A ``ColumnParallelLinear`` splits the output
dim, so its groups stay whole; a ``RowParallelLinear`` splits the input dim, so its *local* input
size must be divisible by M (checked, with the layer and the TP size named). The AutoSwitch sums
and flip counts are summed over the TP group; data parallel replicas hold identical grads and are
only checked for agreement when the optimizer is built. Needs no megatron-core: layers are
recognised by their attributes and class names.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .reference import parse_sparsity
from .targets import DEFAULT_EXCLUDE_NAMES, find_targets, sparse_param_groups

__all__ = ["check_tensor_parallel", "megatron_param_groups", "MEGATRON_EXCLUDE"]

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

