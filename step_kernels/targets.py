"""Which weights get N:M masks, and the param groups the optimizer takes (docs/design.md section 3).

Targets are the 2-D weights of ``nn.Linear`` and of Megatron-Core's parallel linears (stored
``[out, in]``: groups along dim 1) and of
``transformers``' ``Conv1D`` (stored ``[in, out]``: groups along dim 0). By default these are
excluded: input and output embeddings, any weight tied to an embedding, modules whose name matches
``(^|\\.)(lm_head|head|classifier|score)$``, and everything that is not such a weight (norms,
biases, 1-D parameters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

from torch import nn

from .reference import parse_sparsity

__all__ = ["Target", "find_targets", "sparse_param_groups", "DEFAULT_EXCLUDE_NAMES"]

DEFAULT_EXCLUDE_NAMES = r"(^|\.)(lm_head|head|classifier|score)$"

# A selector: FQN regexes (matched with re.search against the module's name), module types, or a
# callable (module_name, module) -> bool. A single selector or a list of them.
Selector = Union[str, type, Callable[[str, nn.Module], bool]]
Selectors = Union[Selector, Sequence[Selector]]


@dataclass(frozen=True)
class Target:
    """One N:M target: the weight ``param`` of module ``module_name``."""

    module_name: str
    module: nn.Module
    param: nn.Parameter
    group_dim: int  # 1 for nn.Linear ([out, in]); 0 for Conv1D ([in, out])

    @property
    def name(self) -> str:
        """The parameter's fully qualified name, e.g. ``"blocks.0.mlp.fc1.weight"``."""
        return f"{self.module_name}.weight" if self.module_name else "weight"


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D without importing transformers: matched by class name and layout. The
    # whole MRO is searched: FSDP2's fully_shard swaps the class for a subclass "FSDPConv1D".
    return (any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)
            and hasattr(module, "nf") and hasattr(module, "weight"))


# Megatron-Core's tensor-parallel linears (and Transformer Engine's): weight [out, in] like
# nn.Linear, matched by class name so neither package is imported.
PARALLEL_LINEAR_TYPES = ("ColumnParallelLinear", "RowParallelLinear", "TEColumnParallelLinear",
                         "TERowParallelLinear", "TELayerNormColumnParallelLinear")


def _group_dim(module: nn.Module) -> Optional[int]:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
        return None
    if isinstance(module, nn.Linear) or any(cls.__name__ in PARALLEL_LINEAR_TYPES for cls in type(module).__mro__):
        return 1
    if _is_conv1d(module):
        return 0
    return None


def _as_list(selectors: Optional[Selectors]) -> List[Selector]:
    if selectors is None:
        return []
    if isinstance(selectors, (str, type)) or callable(selectors) and not isinstance(selectors, (list, tuple)):
        return [selectors]
    return list(selectors)


def _matches(selectors: List[Selector], name: str, module: nn.Module, arg: str) -> bool:
    for sel in selectors:
        if isinstance(sel, str):
            if re.search(sel, name):
                return True
        elif isinstance(sel, type):
            if isinstance(module, sel):
                return True
        elif callable(sel):
            if sel(name, module):
                return True
        else:
            raise ValueError(f"{arg}: each selector must be a regex string, a module type or a "
                             f"callable(name, module), got {sel!r}")
    return False


def _embedding_weights(model: nn.Module) -> set:
    ids = {id(mod.weight) for mod in model.modules() if isinstance(mod, (nn.Embedding, nn.EmbeddingBag))}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        out = get_out()
        if out is not None and getattr(out, "weight", None) is not None:
            ids.add(id(out.weight))
    return ids


def find_targets(
    model: nn.Module, include: Optional[Selectors] = None, exclude: Optional[Selectors] = None
) -> List[Target]:
    """The N:M targets of ``model``, in module order.

    ``include`` keeps only matching modules (None: every Linear/Conv1D). ``exclude=None`` applies
    the defaults of the module docstring; ``exclude=[]`` excludes nothing beyond what is not a
    2-D Linear/Conv1D weight; any other value excludes what it matches (and nothing else).
    A weight shared by several modules is one target, named after its first module, and stays
    dense when any of its modules is excluded before it is selected.
    """
    include_list = _as_list(include)
    exclude_list = _as_list(exclude)
    defaults = exclude is None
    embedding_ids = _embedding_weights(model) if defaults else set()
    targets: List[Target] = []
    seen = set()
    for name, module in model.named_modules():
        dim = _group_dim(module)
        if dim is None:
            continue
        weight = module.weight
        if id(weight) in seen:  # a weight shared by two modules is decided once
            continue
        if include_list and not _matches(include_list, name, module, "include"):
            continue
        excluded = defaults and (re.search(DEFAULT_EXCLUDE_NAMES, name) or id(weight) in embedding_ids)
        if excluded or exclude_list and _matches(exclude_list, name, module, "exclude"):
            seen.add(id(weight))  # excluded under one of its names: stays dense under all of them
            continue
        seen.add(id(weight))
        targets.append(Target(name, module, weight, dim))
    return targets


def sparse_param_groups(
    model: nn.Module,
    sparsity: str = "2:4",
    include: Optional[Selectors] = None,
    exclude: Optional[Selectors] = None,
    weight_decay: Optional[float] = None,
    overrides: Optional[Dict[str, str]] = None,
) -> List[dict]:
    """Param groups for :class:`step_kernels.STEP`: N:M targets and every other parameter.

    Targets are grouped by ``(sparsity, nm_dim)``; every group gets ``sparsity`` (``"N:M"`` or
    None), ``nm_dim`` and ``param_names``. ``overrides`` maps FQN regexes of target modules to
    their own ``"N:M"`` (the first match wins). Groups carry a ``weight_decay`` key only when
    ``weight_decay`` is given. Raises ``ValueError`` naming the parameter whose input size is not
    divisible by M, or the bad sparsity string.
    """
    parse_sparsity(sparsity, "sparsity")
    overrides = dict(overrides or {})
    for pattern, value in overrides.items():
        parse_sparsity(value, f"overrides[{pattern!r}]")
    targets = find_targets(model, include, exclude)
    target_ids = {id(t.param) for t in targets}
    grouped: Dict[tuple, dict] = {}
    for t in targets:
        nm = next((v for pat, v in overrides.items() if re.search(pat, t.module_name)), sparsity)
        n, m = parse_sparsity(nm, t.name)
        if t.param.shape[t.group_dim] % m != 0:
            raise ValueError(
                f"{t.name}: input size {t.param.shape[t.group_dim]} (dim {t.group_dim} of shape "
                f"{tuple(t.param.shape)}) is not divisible by M={m} of sparsity {nm!r}"
            )
        group = grouped.setdefault((f"{n}:{m}", t.group_dim), {
            "params": [], "param_names": [], "sparsity": f"{n}:{m}", "nm_dim": t.group_dim,
        })
        group["params"].append(t.param)
        group["param_names"].append(t.name)
    dense = {"params": [], "param_names": [], "sparsity": None, "nm_dim": None}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in target_ids or id(p) in seen:
            continue
        seen.add(id(p))
        dense["params"].append(p)
        dense["param_names"].append(name)
    groups = list(grouped.values()) + ([dense] if dense["params"] else [])
    if weight_decay is not None:
        for g in groups:
            g["weight_decay"] = weight_decay
    return groups

