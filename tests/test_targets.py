"""Target selection and sparse_param_groups (docs/design.md section 3)."""

import pytest
from torch import nn

from helpers import Conv1D
from step_kernels.models import TinyGPT
from step_kernels.targets import find_targets, sparse_param_groups


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 16)
        self.c_attn = Conv1D(24, 8, scale=1.0)
        self.norm = nn.LayerNorm(16)
        self.classifier = nn.Linear(16, 3)
        self.score = nn.Linear(16, 2)
        self.twin = nn.Linear(8, 16, bias=False)
        self.twin.weight = self.proj.weight  # shared: one target, counted once


def names(targets):
    return [t.name for t in targets]


def test_default_targets_of_tinygpt_exclude_embeddings_and_tied_head():
    model = TinyGPT(vocab=64, ctx=8, d_model=16, n_layer=2, n_head=2)
    targets = find_targets(model)
    expected = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)
                and mod.weight is not model.get_output_embeddings().weight]
    assert names(targets) == [f"{n}.weight" for n in expected]
    assert len(targets) == 8  # qkv, proj, fc1, fc2 per block
    assert all(t.group_dim == 1 for t in targets)
    assert all(t.param is dict(model.named_parameters())[t.name] for t in targets)


def test_conv1d_groups_along_dim0_and_default_name_exclusions():
    targets = find_targets(Mixed())
    assert names(targets) == ["proj.weight", "c_attn.weight"]
    assert [t.group_dim for t in targets] == [1, 0]


def test_include_and_exclude_selectors():
    model = Mixed()
    assert names(find_targets(model, include=r"attn")) == ["c_attn.weight"]
    assert names(find_targets(model, include=nn.Linear)) == ["proj.weight"]
    assert names(find_targets(model, exclude=[])) == ["proj.weight", "c_attn.weight",
                                                      "classifier.weight", "score.weight"]
    assert names(find_targets(model, exclude=lambda name, mod: name == "proj")) == [
        "c_attn.weight", "classifier.weight", "score.weight"]
    with pytest.raises(ValueError, match="exclude: each selector"):
        find_targets(model, exclude=[3])


def test_param_groups_cover_every_parameter_once():
    model = Mixed()
    groups = sparse_param_groups(model, "2:4", weight_decay=0.1)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    by_key = {(g["sparsity"], g["nm_dim"]): g for g in groups}
    assert by_key[("2:4", 1)]["param_names"] == ["proj.weight"]
    assert by_key[("2:4", 0)]["param_names"] == ["c_attn.weight"]
    dense = by_key[(None, None)]
    assert "emb.weight" in dense["param_names"] and "classifier.weight" in dense["param_names"]
    assert all(g["weight_decay"] == 0.1 for g in groups)
    assert all("weight_decay" not in g for g in sparse_param_groups(model))


def test_overrides_give_targets_their_own_sparsity():
    model = TinyGPT(vocab=64, ctx=8, d_model=16, n_layer=2, n_head=2)
    groups = sparse_param_groups(model, "2:4", overrides={r"blocks\.1\.fc": "1:8"})
    by_sparsity = {g["sparsity"]: g["param_names"] for g in groups if g["sparsity"]}
    assert by_sparsity["1:8"] == ["blocks.1.fc1.weight", "blocks.1.fc2.weight"]
    assert len(by_sparsity["2:4"]) == 6


def test_errors_name_the_parameter_or_the_bad_string():
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"0\.weight: input size 6 .* not divisible by M=4"):
        sparse_param_groups(model, "2:4")
    with pytest.raises(ValueError, match="sparsity"):
        sparse_param_groups(model, "3:3")
    with pytest.raises(ValueError, match="overrides"):
        sparse_param_groups(model, "1:2", overrides={"0": "2:5"})
