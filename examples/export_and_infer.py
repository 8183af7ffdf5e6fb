"""Train a small GPT with STEP at 2:4, pack it for sparse tensor cores, and check the packed model's
logits against the dense masked model's.

What it shows:

1. Training: ``STEP(sparse_param_groups(model, "2:4"), total_steps=...)`` with a warm-up + cosine
   schedule; at the end every target weight holds ``mask * w`` with 2 zeros in every group of 4.
2. The packed checkpoint: ``packed_state_dict(model.half())`` stores each target as its 2 kept
   values per group + 2-bit metadata (9/16 of the fp16 bytes); its size on disk is printed next to
   the dense fp16 checkpoint's.
3. Inference: the checkpoint is loaded straight into packed weights
   (``load_packed_state_dict(..., packed=True)``) and the trained model itself is packed in place
   with ``pack_model``. On a GPU of compute capability 8.0 or newer the packed weights run torch's
   2:4 sparse GEMM, and the logits must equal the dense masked model's to fp16 tolerance. On CPU
   torch has no 2:4 GEMM: the packed weights are expanded with ``to_dense()`` for the forward and
   the logits must be bit-identical (the check is then of the packing, not of the GEMM).

The model is ``step_kernels.models.TinyGPT`` (random init) trained on the Python standard library's
own source files, so nothing is downloaded.

Run (full size: d=128, 4 layers, ctx 128, 1000 steps; about 8 minutes on 2 CPU cores, estimated
from the time per step)::

    python examples/export_and_infer.py --out export_out

Smoke run (d=64, 2 layers, 30 steps; what ``make test`` runs)::

    python examples/export_and_infer.py --smoke --out /tmp/export_smoke
"""

import argparse
import contextlib
import copy
import os

import torch

import step_kernels as sk
from step_kernels.demo import warmup_cosine
from step_kernels.export import load_packed_state_dict, pack_model, packed_state_dict
from step_kernels.models import TinyGPT, batches, stdlib_corpus
from step_kernels.targets import find_targets


@contextlib.contextmanager
def unpacked_on_cpu(model):
    """Inside the block, every packed weight of a CPU ``model`` is its ``to_dense()`` expansion
    (torch has no CPU 2:4 GEMM); on a GPU the packed weights are left as they are."""
    swapped = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.sparse.SparseSemiStructuredTensor) and not weight.is_cuda:
            swapped.append((module, weight))
            module.weight = torch.nn.Parameter(weight.to_dense(), requires_grad=False)
    try:
        yield model
    finally:
        for module, weight in swapped:
            module.weight = weight


def assert_same_logits(got, want, what):
    """Bit-identical on CPU (to_dense() path); fp16 tolerance on a GPU (sparse vs dense GEMM)."""
    if got.is_cuda:
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(got, want), f"{what}: logits differ from the dense masked model's"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps of a tiny model (what make test runs)")
    parser.add_argument("--out", default="export_out", help="where the dense and packed checkpoints are written")
    args = parser.parse_args(argv)
    if args.smoke:
        size, steps, batch = dict(d_model=64, n_layer=2, ctx=64), 30, 16
    else:
        size, steps, batch = dict(d_model=128, n_layer=4, ctx=128), 1000, 32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)

    # 1. Train with STEP (AutoSwitch switches to phase 2 by half of total_steps at the latest).
    torch.manual_seed(0)
    model = TinyGPT(n_head=4, **size).to(device)
    opt = sk.STEP(sk.sparse_param_groups(model, "2:4", weight_decay=0.01), lr=3e-3, betas=(0.9, 0.95),
                  total_steps=steps)
    schedule = warmup_cosine(opt, steps)
    data, gen = stdlib_corpus().to(device), torch.Generator(device).manual_seed(0)
    for step in range(1, steps + 1):
        loss = model.loss(*batches(data, batch, size["ctx"], gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % max(1, steps // 10) == 0:
            print(f"step {step}/{steps}  loss {loss.item():.3f}  phase {opt.phase}", flush=True)
    assert opt.phase == "sparse", "STEP did not reach phase 2"
    print(f"trained on {opt.backend}: switch at step {opt.switch_step}, sparsity {opt.stats()['sparsity']:.3f}")

    # 2. The packed checkpoint, next to the dense fp16 one.
    model = model.half().eval()
    targets = find_targets(model)
    assert all(torch.equal(sk.nm_prune(t.param.detach(), 2, 4, t.group_dim)[0], t.param.detach()) for t in targets), \
        "a target is not 2:4"
    checkpoint = packed_state_dict(model)
    dense_path, packed_path = os.path.join(args.out, "model.fp16.pt"), os.path.join(args.out, "model.packed.pt")
    torch.save(model.state_dict(), dense_path)
    torch.save(checkpoint, packed_path)
    dense_size, packed_size = os.path.getsize(dense_path), os.path.getsize(packed_path)
    target_bytes = sum(t.param.nbytes for t in targets)
    packed_bytes = sum(e["values"].nbytes + e["meta"].nbytes for e in checkpoint["packed"].values())
    assert packed_bytes * 16 == target_bytes * 9
    print(f"{len(targets)} targets: {target_bytes / 1e6:.3f} MB dense -> {packed_bytes / 1e6:.3f} MB packed; "
          f"checkpoint on disk {dense_size / 1e6:.3f} MB dense fp16 -> {packed_size / 1e6:.3f} MB packed "
          f"({packed_size / dense_size:.0%}; embeddings, norms and biases stay dense)")

    # 3. Inference with packed weights against the dense masked model.
    idx = batches(data, 4, size["ctx"], torch.Generator(device).manual_seed(1))[0]
    with torch.no_grad():
        want = model(idx)
        fresh = TinyGPT(n_head=4, **size).to(device).half().eval()
        load_packed_state_dict(fresh, torch.load(packed_path, weights_only=True), packed=True)
        with unpacked_on_cpu(fresh):
            assert_same_logits(fresh(idx), want, "packed checkpoint")
        packed_in_place = pack_model(copy.deepcopy(model))
        with unpacked_on_cpu(packed_in_place):
            assert_same_logits(packed_in_place(idx), want, "pack_model")
    gemm = "through the 2:4 sparse GEMM" if device == "cuda" else "through to_dense(), torch has no CPU 2:4 GEMM"
    print(f"packed model logits, {gemm}, equal the dense masked model's (from the checkpoint and from pack_model)")
    print("export_and_infer: all checks passed")


if __name__ == "__main__":
    main()
