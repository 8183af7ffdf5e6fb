"""Packed 2:4 export: sparse weights, pack_model and the packed checkpoint round trip."""

import io

import pytest
import torch
from torch import nn

from helpers import Conv1D, tiny_gpt
from step_kernels import _extension, reference, unpack24
from step_kernels.export import (
    FORMAT,
    load_packed_state_dict,
    pack_model,
    packed_state_dict,
    to_sparse_semi_structured,
)
from step_kernels.targets import find_targets

pytestmark = pytest.mark.skipif(
    _extension.missing_reason() is not None, reason=str(_extension.missing_reason())
)


class Conv1DNet(nn.Module):
    def __init__(self):
        super().__init__()
        # weight [64, 128]: groups along dim 0, packed as W.t() [128, 64]
        self.c_fc = Conv1D(128, 64, bias="random", addmm=True)
        self.c_proj = Conv1D(64, 128, bias="random", addmm=True)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_fc(x)))


def prune_targets(model, n=2, m=4):
    """Give every target an N:M mask (groups along its input dim), as STEP training leaves it."""
    with torch.no_grad():
        for t in find_targets(model):
            t.param.copy_(reference.nm_prune(t.param, n, m, dim=t.group_dim)[0])
    return model


def saved_size(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell(), buf


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tinygpt_packed_checkpoint_round_trip(dtype):
    config = dict(d_model=128, n_layer=4, n_head=4, ctx=32)
    model = prune_targets(tiny_gpt(dtype, seed=0, config=config).eval())
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(idx)

    checkpoint = packed_state_dict(model)
    targets = find_targets(model)
    assert sorted(checkpoint["packed"]) == sorted(t.name for t in targets) and len(targets) == 16
    packed_bytes = sum(e["values"].nbytes + e["meta"].nbytes for e in checkpoint["packed"].values())
    dense_bytes = sum(t.param.nbytes for t in targets)
    assert packed_bytes * 16 == dense_bytes * 9  # values 1/2 + meta 1/16 of the dense bytes

    dense_size, _ = saved_size(model.state_dict())
    packed_size, buf = saved_size(checkpoint)
    assert packed_size <= 0.60 * dense_size, (packed_size, dense_size)

    buf.seek(0)
    fresh = tiny_gpt(dtype, seed=1, config=config).eval()
    load_packed_state_dict(fresh, torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(idx), logits)
    for name, p in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], p), name


def test_conv1d_targets_pack_transposed():
    model = prune_targets(Conv1DNet().half())
    x = torch.randn(3, 64).half()
    with torch.no_grad():
        out = model(x)
    checkpoint = packed_state_dict(model)
    entry = checkpoint["packed"]["c_fc.weight"]
    assert entry["transposed"] and entry["shape"] == (64, 128) and entry["values"].shape == (128, 32)
    assert torch.equal(unpack24(entry["values"], entry["meta"]), model.c_fc.weight.t())

    fresh = Conv1DNet().half()
    load_packed_state_dict(fresh, checkpoint)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)

    dense = model.c_fc.weight.detach().clone()
    pack_model(model)
    packed_weight = model.c_fc.weight
    assert not packed_weight.requires_grad and packed_weight.shape == dense.shape
    assert torch.equal(packed_weight.t().to_dense(), dense.t())


def test_pack_model_swaps_targets_only():
    model = prune_targets(tiny_gpt(torch.bfloat16, seed=0, config={}).eval())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = find_targets(model)
    pack_model(model, targets)
    with pytest.raises(ValueError, match=r"blocks\.0\.qkv\.weight: the weight is packed already"):
        pack_model(model)
    for t in targets:
        weight = t.module.weight
        assert isinstance(weight, torch.sparse.SparseSemiStructuredTensorCUTLASS) and not weight.requires_grad
        assert torch.equal(weight.to_dense(), before[t.name])
    target_names = {t.name for t in targets}
    for name, p in model.named_parameters():
        if name not in target_names:
            assert torch.equal(p, before[name]), name


def test_checkpoint_loads_straight_to_packed():
    model = prune_targets(tiny_gpt(torch.float16, seed=0, config={}).eval())
    fresh = load_packed_state_dict(tiny_gpt(torch.float16, seed=1, config={}).eval(), packed_state_dict(model),
                                   packed=True)
    for t in find_targets(model):
        weight = fresh.get_submodule(t.module_name).weight
        assert isinstance(weight, torch.sparse.SparseSemiStructuredTensorCUTLASS)
        assert torch.equal(weight.to_dense(), t.param)


@pytest.mark.parametrize("sparsity", ["1:4", "2:8", "1:8"])
def test_sparser_nm_masks_export_as_24(sparsity):
    n, m = reference.parse_sparsity(sparsity)
    model = prune_targets(tiny_gpt(torch.bfloat16, seed=0, config={}).eval(), n, m)
    fresh = load_packed_state_dict(tiny_gpt(torch.bfloat16, seed=1, config={}).eval(), packed_state_dict(model))
    for t in find_targets(model):
        assert torch.equal(fresh.get_submodule(t.module_name).weight, t.param)


def test_denser_mask_is_an_error_naming_the_target():
    model = prune_targets(tiny_gpt(torch.bfloat16, seed=0, config={}).eval(), 4, 8)
    with pytest.raises(ValueError, match=r"blocks\.0\.qkv\.weight: pack24: dense\[\d+, \d+:\d+\] has more than 2"):
        packed_state_dict(model)
    packed_state_dict(model, prune=True)  # pruning to 2:4 on export is explicit


def test_fp32_model_is_an_error_naming_the_target():
    model = prune_targets(tiny_gpt(torch.float32, seed=0, config={}).eval())
    with pytest.raises(TypeError, match=r"blocks\.0\.qkv\.weight: .*float32.*model\.half\(\)"):
        pack_model(model)
    assert isinstance(model.blocks[0].qkv.weight, nn.Parameter)
    assert not isinstance(model.blocks[0].qkv.weight, torch.sparse.SparseSemiStructuredTensor)


def test_bad_checkpoint():
    model = tiny_gpt(torch.float16, seed=0, config={}).eval()
    with pytest.raises(ValueError, match="not a 'step_kernels.packed24' checkpoint"):
        load_packed_state_dict(model, model.state_dict())
    checkpoint = packed_state_dict(prune_targets(model))
    assert checkpoint["format"] == FORMAT
    entry = checkpoint["packed"]["blocks.0.fc1.weight"]
    entry["shape"] = (64, 256)
    with pytest.raises(ValueError, match=r"blocks\.0\.fc1\.weight: packed values unpack to \(256, 64\)"):
        load_packed_state_dict(model, checkpoint)


def test_to_sparse_semi_structured_prunes_on_request():
    w = torch.randn(64, 128).half()
    with pytest.raises(ValueError, match="prune=True"):
        to_sparse_semi_structured(w)
    sparse = to_sparse_semi_structured(w, prune=True)
    assert torch.equal(sparse.to_dense(), reference.nm_prune(w, 2, 4)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_linear_matches_dense_on_gpu():
    w = reference.nm_prune(torch.randn(256, 512, device="cuda").half(), 2, 4)[0]
    x = torch.randn(64, 512, device="cuda").half()
    sparse = to_sparse_semi_structured(w)
    torch.testing.assert_close(nn.functional.linear(x, sparse), nn.functional.linear(x, w), rtol=1e-2, atol=1e-2)


def test_gpt2_conv1d_round_trip():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=128)
    torch.manual_seed(0)
    model = prune_targets(transformers.GPT2LMHeadModel(config).half().eval())
    assert any(t.group_dim == 0 for t in find_targets(model))
    idx = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        logits = model(idx).logits
    torch.manual_seed(1)
    fresh = transformers.GPT2LMHeadModel(config).half().eval()
    load_packed_state_dict(fresh, packed_state_dict(model))
    with torch.no_grad():
        assert torch.equal(fresh(idx).logits, logits)
