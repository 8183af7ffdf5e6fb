"""Bad input to the export, packing and pruning entry points (issue 12, items 5 and 6).

Every case asserts the error's type, that its message names the argument, entry or shape at fault,
and that the inputs (tensors, model, checkpoint) are bit-identical afterwards: a failing call
changes nothing. pack24/unpack24 are also called on meta-device and fake tensors, whose fake
kernels must raise the same error as the real ones; nm_prune must raise the same error on every
backend.
"""

import copy

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import tiny_gpt
from step_kernels import _extension, ops, pack24, reference, unpack24
from step_kernels.export import load_packed_state_dict, pack_model, packed_state_dict
from step_kernels.targets import Target, find_targets
from test_export import Conv1DNet, prune_targets

pytestmark = pytest.mark.skipif(
    _extension.missing_reason() is not None, reason=str(_extension.missing_reason())
)


# --- snapshots: the object and the bits of everything a call could change ----------------------


def bits(t):
    """The raw bytes of ``t`` (so -0.0, NaN payloads and dtype all count); of a packed weight, the
    bytes of its values and metadata."""
    if isinstance(t, torch.sparse.SparseSemiStructuredTensor):
        return (t.dtype, tuple(t.shape), torch.cat([bits(t.packed)[2], bits(t.meta)[2]]))
    return (t.dtype, tuple(t.shape), t.detach().reshape(-1).view(torch.uint8).clone())


def same(a, b):
    return a[:2] == b[:2] and torch.equal(a[2], b[2])


def model_snapshot(model):
    """Every module, parameter and buffer of ``model``: the object itself and its bits."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {
        "modules": [(name, module) for name, module in model.named_modules()],
        "tensors": {name: (t, t.requires_grad, bits(t)) for name, t in tensors},
    }


def assert_model_unchanged(model, snapshot):
    assert [(n, id(m)) for n, m in model.named_modules()] == [(n, id(m)) for n, m in snapshot["modules"]]
    tensors = dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)])
    assert tensors.keys() == snapshot["tensors"].keys()
    for name, (obj, requires_grad, before) in snapshot["tensors"].items():
        assert tensors[name] is obj, f"{name} was replaced"
        assert obj.requires_grad == requires_grad and same(bits(obj), before), f"{name} changed"


def tree_bits(tree):
    """The bits of every tensor in a nested dict/list (a checkpoint), and every other leaf as is."""
    if isinstance(tree, dict):
        return {key: tree_bits(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_bits(value) for value in tree)
    return bits(tree) if isinstance(tree, torch.Tensor) else tree


def assert_tree_unchanged(tree, before):
    now = tree_bits(tree)
    assert type(now) is type(before)
    if isinstance(now, dict):
        assert now.keys() == before.keys()
        for key in now:
            assert_tree_unchanged(tree[key], before[key])
    elif isinstance(now, tuple) and len(now) == 3 and isinstance(now[2], torch.Tensor):
        assert same(now, before)
    else:
        assert now == before


# --- pack24 / unpack24: eager, meta-device and fake tensors raise the same error ---------------


def random_24(rows, cols, dtype, seed):
    """A 2:4 matrix (the reference pruner's output) of nonzero random values."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        dense = torch.randint(1, 100, (rows, cols), generator=gen, dtype=torch.int8)
    else:
        dense = (torch.randn(rows, cols, generator=gen) + 4).to(dtype)
    return reference.nm_prune(dense, 2, 4)[0]


def packed(rows=64, cols=128, dtype=torch.float16):
    return pack24(random_24(rows, cols, dtype, seed=rows + cols))


# (id, function, args, error type, message): the messages are exact, so each names its argument and
# shape; the fake kernels must produce the very same text.
def pack_cases():
    values, meta = packed()
    values8, meta8 = packed(16, 128, torch.int8)
    return [
        ("pack24-float32", pack24, (torch.zeros(32, 64),), TypeError,
         "pack24: dense must be float16, bfloat16 or int8, got torch.float32"),
        ("pack24-1d", pack24, (torch.zeros(64, dtype=torch.float16),), ValueError,
         "pack24: dense must be a 2-D matrix [rows, cols], got a 1-D tensor of shape [64]"),
        ("pack24-rows", pack24, (torch.zeros(31, 64, dtype=torch.float16),), ValueError,
         "pack24: a torch.float16 matrix needs rows a positive multiple of 32 and columns a positive multiple of "
         "64 (the minimum tile of the 2:4 sparse GEMM); got dense of shape [31, 64]; nothing is padded"),
        ("pack24-int8-cols", pack24, (torch.zeros(16, 64, dtype=torch.int8),), ValueError,
         "pack24: a torch.int8 matrix needs rows a positive multiple of 16 and columns a positive multiple of "
         "128 (the minimum tile of the 2:4 sparse GEMM); got dense of shape [16, 64]; nothing is padded"),
        ("pack24-empty", pack24, (torch.zeros(0, 64, dtype=torch.bfloat16),), ValueError,
         "pack24: a torch.bfloat16 matrix needs rows a positive multiple of 32 and columns a positive multiple of "
         "64 (the minimum tile of the 2:4 sparse GEMM); got dense of shape [0, 64]; nothing is padded"),
        ("unpack24-values-float32", unpack24, (values.float(), meta), TypeError,
         "unpack24: values must be float16, bfloat16 or int8, got torch.float32"),
        ("unpack24-values-3d", unpack24, (values[None], meta), ValueError,
         "unpack24: values must be a 2-D matrix [rows, cols/2], got a 3-D tensor of shape [1, 64, 64]"),
        ("unpack24-meta-dtype", unpack24, (values, meta.int()), TypeError,
         "unpack24: meta must be torch.int16 for torch.float16 values, got torch.int32"),
        ("unpack24-int8-meta-dtype", unpack24, (values8, meta8.short()), TypeError,
         "unpack24: meta must be torch.int32 for torch.int8 values, got torch.int16"),
        ("unpack24-values-shape", unpack24, (values[:, :16], meta[:, :2]), ValueError,
         "unpack24: a torch.float16 matrix needs rows a positive multiple of 32 and columns a positive multiple "
         "of 64 (the minimum tile of the 2:4 sparse GEMM); values of shape [64, 16] give a dense shape [64, 32]; "
         "nothing is padded"),
        ("unpack24-meta-shape", unpack24, (values, meta[:, :4]), ValueError,
         "unpack24: values of shape [64, 64] need meta of shape [64, 8], got meta of shape [64, 4]"),
        ("unpack24-meta-1d", unpack24, (values, meta.reshape(-1)), ValueError,
         "unpack24: values of shape [64, 64] need meta of shape [64, 8], got meta of shape [512]"),
    ]


PACK_CASES = pack_cases()


@pytest.mark.parametrize("case", PACK_CASES, ids=[c[0] for c in PACK_CASES])
@pytest.mark.parametrize("mode", ["eager", "meta", "fake"])
def test_pack24_unpack24_bad_input(case, mode):
    _, fn, args, error, message = case
    before = [bits(a) for a in args]
    if mode == "eager":
        with pytest.raises(error) as info:
            fn(*args)
    elif mode == "meta":
        with pytest.raises(error) as info:
            fn(*[a.to("meta") for a in args])
    else:
        with FakeTensorMode() as fake_mode:
            fakes = [fake_mode.from_tensor(a) for a in args]
            with pytest.raises(error) as info:
                fn(*fakes)
    assert str(info.value) == message
    assert all(same(bits(a), b) for a, b in zip(args, before))


def test_fake_kernels_give_the_real_shapes():
    for dtype, (rows, cols) in ((torch.float16, (96, 192)), (torch.int8, (48, 256))):
        dense = random_24(rows, cols, dtype, seed=1)
        values, meta = pack24(dense)
        with FakeTensorMode() as fake_mode:
            fake_values, fake_meta = pack24(fake_mode.from_tensor(dense))
            fake_dense = unpack24(fake_values, fake_meta)
        assert (fake_values.shape, fake_values.dtype) == (values.shape, values.dtype)
        assert (fake_meta.shape, fake_meta.dtype) == (meta.shape, meta.dtype)
        assert (fake_dense.shape, fake_dense.dtype) == (dense.shape, dense.dtype)


@pytest.mark.parametrize("moved", ["values", "meta"])
def test_unpack24_values_and_meta_on_different_devices(moved):
    """Never a tensor of uninitialised memory: one of them on the meta device is an error."""
    values, meta = packed()
    before = bits(values), bits(meta)
    args = (values.to("meta"), meta) if moved == "values" else (values, meta.to("meta"))
    where = ("cpu", "meta") if moved == "values" else ("meta", "cpu")
    with pytest.raises(ValueError, match=rf"^unpack24: meta is on {where[0]} but values are on {where[1]}$"):
        unpack24(*args)
    assert same(bits(values), before[0]) and same(bits(meta), before[1])


def test_data_dependent_errors_leave_the_inputs_unchanged():
    dense = random_24(64, 64, torch.bfloat16, seed=2)
    dense[33, 4:8] = 1  # 4 nonzeros in one group
    before = bits(dense)
    with pytest.raises(ValueError, match=r"^pack24: dense\[33, 4:8\] has more than 2 nonzeros"):
        pack24(dense)
    assert same(bits(dense), before)
    values, meta = packed()
    meta.view(-1)[3] = 0  # a nibble that is no 2:4 pattern
    before = bits(values), bits(meta)
    with pytest.raises(ValueError, match=r"^unpack24: the meta nibble of dense\[\d+, \d+:\d+\] is not one"):
        unpack24(values, meta)
    assert same(bits(values), before[0]) and same(bits(meta), before[1])


# --- pack_model / packed_state_dict: every target is checked before any module changes ----------


def two_layer(dtype=torch.float16, second=None):
    """Two Linear targets; the first is 2:4, the second ``second(weight)`` or 2:4 too."""
    torch.manual_seed(0)
    model = prune_targets(nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 128)).to(dtype))
    if second is not None:
        with torch.no_grad():
            model[2].weight.data = second(model[2].weight.data)
    return model


@pytest.mark.parametrize(
    "make,error,message",
    [
        (lambda: two_layer(second=lambda w: torch.randn_like(w) + 4), ValueError,
         r"^2\.weight: pack24: dense\[0, 0:4\] has more than 2 nonzeros"),
        (lambda: two_layer(second=lambda w: w.float()), TypeError,
         r"^2\.weight: 2:4 packing needs float16, bfloat16 or int8 weights, got torch\.float32"),
        (lambda: prune_targets(nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 48)).half()), ValueError,
         r"^1\.weight: pack24: .*; got dense of shape \[48, 64\]; nothing is padded"),
        (lambda: two_layer(torch.bfloat16, second=lambda w: reference.nm_prune(torch.randn_like(w) + 4, 4, 8)[0]),
         ValueError, r"^2\.weight: pack24: dense\[\d+, \d+:\d+\] has more than 2 nonzeros"),
    ],
    ids=["later-target-not-24", "later-target-fp32", "later-target-bad-shape", "later-target-4:8"],
)
@pytest.mark.parametrize("entry", ["pack_model", "packed_state_dict"])
def test_a_bad_later_target_changes_no_module(make, error, message, entry):
    model = make()
    snapshot = model_snapshot(model)
    with pytest.raises(error, match=message):
        (pack_model if entry == "pack_model" else packed_state_dict)(model)
    assert_model_unchanged(model, snapshot)
    assert not any(isinstance(p, torch.sparse.SparseSemiStructuredTensor) for p in model.parameters())


def test_a_bad_later_conv1d_target_names_the_transpose():
    model = prune_targets(Conv1DNet().half())
    with torch.no_grad():
        model.c_proj.weight.add_(1)  # dense again
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError, match=r"^c_proj\.weight \(Conv1D, packed as W\.t\(\)\): pack24: dense\[0, 0:4\]"):
        pack_model(model)
    assert_model_unchanged(model, snapshot)


def test_a_target_listed_twice():
    model = two_layer()
    targets = find_targets(model)
    snapshot = model_snapshot(model)
    for entry in (pack_model, packed_state_dict):
        with pytest.raises(ValueError, match=r"^2\.weight: listed twice in targets$"):
            entry(model, targets + targets[1:])
        assert_model_unchanged(model, snapshot)


def test_a_target_outside_the_state_dict():
    model = two_layer()
    stranger = nn.Linear(128, 64).half()
    targets = find_targets(model) + [Target("elsewhere", stranger, stranger.weight, 1)]
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError, match=r"^elsewhere\.weight: target is not in model\.state_dict\(\)"):
        packed_state_dict(model, targets)
    assert_model_unchanged(model, snapshot)


def test_pack_model_twice_changes_nothing_the_second_time():
    model = two_layer()
    pack_model(model)
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError, match=r"^0\.weight: the weight is packed already"):
        pack_model(model)
    assert_model_unchanged(model, snapshot)


def test_pack_model_packs_every_target_after_checking():
    """The success path of the two-phase pack: every target swapped, values unchanged."""
    model = two_layer()
    dense = {t.name: t.param.detach().clone() for t in find_targets(model)}
    pack_model(model)
    for name, weight in dense.items():
        packed_weight = model.get_parameter(name)
        assert isinstance(packed_weight, torch.sparse.SparseSemiStructuredTensorCUTLASS)
        assert torch.equal(packed_weight.to_dense(), weight)


# --- load_packed_state_dict: checkpoint, keys, shapes and modules are checked first -------------


@pytest.fixture
def source():
    return prune_targets(tiny_gpt(torch.float16, seed=0, config={}).eval())


def fresh():
    return tiny_gpt(torch.float16, seed=1, config={}).eval()


def broken(source, edit):
    checkpoint = packed_state_dict(source)
    checkpoint["dense"] = {k: v.clone() for k, v in checkpoint["dense"].items()}
    edit(checkpoint)
    return checkpoint


def drop(mapping, key):
    del mapping[key]


def corrupt_meta(checkpoint):
    checkpoint["packed"]["blocks.1.fc2.weight"]["meta"].view(-1)[5] = 0


LOAD_CASES = [
    ("not-a-checkpoint", lambda c: c.pop("format"), {}, ValueError,
     r"^checkpoint: not a 'step_kernels\.packed24' checkpoint"),
    ("newer-version", lambda c: c.update(version=2), {}, ValueError,
     r"^checkpoint: version 2 is newer than this reader"),
    ("no-dense", lambda c: c.pop("dense"), {}, ValueError, r"^checkpoint\['dense'\]: must be a dict, got NoneType"),
    ("entry-without-meta", lambda c: drop(c["packed"]["blocks.1.fc2.weight"], "meta"), {}, ValueError,
     r"^blocks\.1\.fc2\.weight: a packed entry has the keys \['meta', 'shape', 'transposed', 'values'\], "
     r"got \['shape', 'transposed', 'values'\]"),
    ("values-not-a-tensor", lambda c: c["packed"]["blocks.1.fc2.weight"].update(values=[1, 2]), {}, ValueError,
     r"^blocks\.1\.fc2\.weight: values must be a tensor, got list"),
    ("corrupt-meta-in-the-last-entry", corrupt_meta, {}, ValueError,
     r"^blocks\.1\.fc2\.weight: unpack24: the meta nibble of dense\[\d+, \d+:\d+\] is not one of the six"),
    ("meta-dtype", lambda c: c["packed"]["blocks.1.fc2.weight"].update(
        meta=c["packed"]["blocks.1.fc2.weight"]["meta"].int()), {}, TypeError,
     r"^blocks\.1\.fc2\.weight: unpack24: meta must be torch\.int16 for torch\.float16 values, got torch\.int32"),
    ("stated-shape", lambda c: c["packed"]["blocks.1.fc1.weight"].update(shape=(64, 256)), {}, ValueError,
     r"^blocks\.1\.fc1\.weight: packed values unpack to \(256, 64\), the checkpoint says \(64, 256\)"),
    ("dense-shape", lambda c: c["dense"].update({"ln_f.weight": torch.ones(32, dtype=torch.float16)}), {}, ValueError,
     r"^ln_f\.weight: the checkpoint's shape \(32,\) differs from the model's \(64,\)"),
    ("dense-not-a-tensor", lambda c: c["dense"].update({"ln_f.bias": 0.5}), {}, ValueError,
     r"^ln_f\.bias: the checkpoint holds a float, the model a tensor"),
    ("strict-missing", lambda c: drop(c["dense"], "ln_f.bias"), {}, ValueError,
     r"^checkpoint: strict=True and the keys differ from the model's: missing \['ln_f\.bias'\], unexpected \[\]"),
    ("strict-unexpected", lambda c: c["dense"].update(extra=torch.ones(1)), {}, ValueError,
     r"missing \[\], unexpected \['extra'\]"),
    ("packed-missing-module-strict", lambda c: c["packed"].update(
        {"blocks.7.fc2.weight": c["packed"]["blocks.1.fc2.weight"]}), {"packed": True}, ValueError,
     r"unexpected \['blocks\.7\.fc2\.weight'\]"),
    ("packed-missing-module", lambda c: c["packed"].update(
        {"blocks.7.fc2.weight": c["packed"]["blocks.1.fc2.weight"]}), {"packed": True, "strict": False}, ValueError,
     r"^blocks\.7\.fc2\.weight: the model has no module 'blocks\.7\.fc2' to swap the packed weight into"),
    ("packed-missing-parameter", lambda c: c["packed"].update(
        {"blocks.1.fc2.scale": c["packed"]["blocks.1.fc2.weight"]}), {"packed": True, "strict": False}, ValueError,
     r"^blocks\.1\.fc2\.scale: module 'blocks\.1\.fc2' has no parameter 'scale'"),
]


@pytest.mark.parametrize("case", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_packed_state_dict_bad_checkpoint(source, case):
    _, edit, kwargs, error, message = case
    checkpoint = broken(source, edit)
    model = fresh()
    snapshot, checkpoint_before = model_snapshot(model), tree_bits(checkpoint)
    with pytest.raises(error, match=message):
        load_packed_state_dict(model, checkpoint, **kwargs)
    assert_model_unchanged(model, snapshot)
    assert_tree_unchanged(checkpoint, checkpoint_before)


def test_load_into_another_architecture_changes_nothing(source):
    checkpoint = packed_state_dict(source)
    model = tiny_gpt(torch.float16, seed=1, config=dict(d_model=128)).eval()
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError,
                       match=r"^pos: the checkpoint's shape \(64, 64\) differs from the model's \(64, 128\)"):
        load_packed_state_dict(model, checkpoint, strict=False)
    assert_model_unchanged(model, snapshot)


def test_load_into_a_packed_model_changes_nothing(source):
    checkpoint = packed_state_dict(source)
    model = pack_model(prune_targets(fresh()))
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError, match=r"^blocks\.0\.qkv\.weight: the model's weight is packed already"):
        load_packed_state_dict(model, checkpoint, packed=True)
    assert_model_unchanged(model, snapshot)


def test_a_good_load_after_a_failed_one_is_exact(source):
    """A failed load leaves nothing behind that the next (good) load would have to undo."""
    model = fresh()
    bad = broken(source, corrupt_meta)
    with pytest.raises(ValueError):
        load_packed_state_dict(model, bad, packed=True)
    load_packed_state_dict(model, packed_state_dict(source), packed=True, strict=True)
    for t in find_targets(source):
        assert torch.equal(model.get_parameter(t.name).to_dense(), t.param)
    dense = {k: v for k, v in source.state_dict().items() if k not in {t.name for t in find_targets(source)}}
    for key, value in dense.items():
        assert torch.equal(model.state_dict()[key], value), key


# --- nm_prune: one validation, the same error on every backend ----------------------------------


W = torch.arange(48, dtype=torch.float32).reshape(4, 12) - 20

NM_PRUNE_CASES = [
    ("n-zero", (W, 0, 4, -1), ValueError, "n: N must satisfy 1 <= N < M=4, got 0"),
    ("n-negative", (W, -1, 4, -1), ValueError, "n: N must satisfy 1 <= N < M=4, got -1"),
    ("n-equals-m", (W, 4, 4, -1), ValueError, "n: N must satisfy 1 <= N < M=4, got 4"),
    ("n-above-m", (W, 5, 4, -1), ValueError, "n: N must satisfy 1 <= N < M=4, got 5"),
    ("n-float", (W, 2.0, 4, -1), ValueError, "n: N must satisfy 1 <= N < M=4, got 2.0"),
    ("m-three", (W, 1, 3, -1), ValueError, "m: M must be a power of two from 2 to 32, got 3"),
    ("m-one", (W, 1, 1, -1), ValueError, "m: M must be a power of two from 2 to 32, got 1"),
    ("m-64", (torch.zeros(2, 64), 1, 64, -1), ValueError, "m: M must be a power of two from 2 to 32, got 64"),
    ("m-float", (W, 2, 4.0, -1), ValueError, "m: M must be a power of two from 2 to 32, got 4.0"),
    ("m-bool", (W, 1, True, -1), ValueError, "m: M must be a power of two from 2 to 32, got True"),
    ("dim-2", (W, 2, 4, 2), ValueError, "dim: 2 is out of range for w of shape (4, 12)"),
    ("dim-minus-3", (W, 2, 4, -3), ValueError, "dim: -3 is out of range for w of shape (4, 12)"),
    ("dim-float", (W, 2, 4, 1.0), ValueError, "dim: 1.0 is out of range for w of shape (4, 12)"),
    ("indivisible", (W, 2, 8, 1), ValueError, "w: size 12 of dim 1 (shape (4, 12)) is not divisible by M=8"),
    ("indivisible-dim-0", (W, 1, 8, 0), ValueError, "w: size 4 of dim 0 (shape (4, 12)) is not divisible by M=8"),
    ("scalar", (torch.tensor(1.0), 1, 2, -1), ValueError, "w: N:M groups need at least one dimension, got a scalar"),
    ("not-a-tensor", ([1.0, 2.0], 1, 2, -1), TypeError, "w: must be a tensor, got list"),
]


@pytest.mark.parametrize("case", NM_PRUNE_CASES, ids=[c[0] for c in NM_PRUNE_CASES])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "auto"])
def test_nm_prune_bad_input_is_the_same_error_on_every_backend(case, backend):
    _, (w, n, m, dim), error, message = case
    before = copy.deepcopy(w)
    with pytest.raises(error) as info:
        ops.nm_prune(w, n, m, dim, backend=backend)
    assert str(info.value) == message
    if isinstance(w, torch.Tensor):
        assert same(bits(w), bits(before))
    with pytest.raises(error) as direct:  # the reference called directly checks the same way
        reference.nm_prune(w, n, m, dim)
    assert str(direct.value) == message


def test_nm_prune_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'gpu'"):
        ops.nm_prune(W, 2, 4, backend="gpu")
