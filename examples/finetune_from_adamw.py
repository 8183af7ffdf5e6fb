"""Dense pretraining with AdamW, then sparse 2:4 fine-tuning with ``STEP.from_adamw``: the STEP
paper's main setting.

What it shows:

1. Pretraining: a plain ``torch.optim.AdamW`` over ``model.parameters()``.
2. ``STEP.from_adamw(model, adamw.state_dict(), sparsity="2:4", ...)`` continues that run: AdamW's
   first and second moments and step count become STEP's, so the first STEP steps are the AdamW
   steps the run would have taken next. With v already settled by pretraining, AutoSwitch switches
   to mask learning (v frozen as the preconditioner) early; its bounds count the global step, so
   they are given explicitly (10% and 50% of the fine-tuning steps after the AdamW steps).
3. The result: every target (the blocks' Linear weights; embeddings and the tied head stay dense)
   is 2:4, and its validation loss, printed next to the dense model's, must be below that of
   one-shot magnitude pruning of the dense model without fine-tuning.

The model is ``step_kernels.models.TinyGPT`` (random init) trained on the Python standard library's
own source files, so nothing is downloaded.

Run (full size: d=128, 4 layers, ctx 64, 2000 AdamW steps then 1000 STEP steps; about 12 minutes
on 2 CPU cores, estimated from the time per step)::

    python examples/finetune_from_adamw.py

Smoke run (d=64, 2 layers, 40 + 20 steps; what ``make test`` runs)::

    python examples/finetune_from_adamw.py --smoke
"""

import argparse
import copy

import torch

import step_kernels as sk
from step_kernels.demo import warmup_cosine
from step_kernels.models import TinyGPT, batches, stdlib_corpus
from step_kernels.targets import find_targets


def evaluate(model, data, ctx, n_batches=16):
    """Mean next-byte loss over fixed validation batches."""
    gen = torch.Generator(data.device).manual_seed(1234)
    model.eval()
    with torch.no_grad():
        loss = sum(model.loss(*batches(data, 32, ctx, gen)).item() for _ in range(n_batches)) / n_batches
    model.train()
    return loss


def train(model, opt, schedule, data, steps, batch, ctx, gen, label):
    """``steps`` optimizer steps on random windows of ``data``."""
    for step in range(1, steps + 1):
        loss = model.loss(*batches(data, batch, ctx, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % max(1, steps // 5) == 0:
            phase = f"  phase {opt.phase}" if isinstance(opt, sk.STEP) else ""
            print(f"[{label}] step {step}/{steps}  loss {loss.item():.3f}{phase}", flush=True)


def is_nm(model, n, m):
    """True when every target of ``model`` has at most n nonzeros per group of m (pruning it changes nothing)."""
    return all(torch.equal(sk.nm_prune(t.param.detach(), n, m, t.group_dim)[0], t.param.detach())
               for t in find_targets(model))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps of a tiny model (what make test runs)")
    parser.add_argument("--sparsity", default="2:4")
    args = parser.parse_args(argv)
    if args.smoke:
        size, pretrain_steps, finetune_steps, batch = dict(d_model=64, n_layer=2, ctx=64), 40, 20, 16
    else:
        size, pretrain_steps, finetune_steps, batch = dict(d_model=128, n_layer=4, ctx=64), 2000, 1000, 32
    n, m = map(int, args.sparsity.split(":"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = stdlib_corpus().to(device)
    split = int(0.9 * data.numel())
    train_data, val_data = data[:split], data[split:]
    gen = torch.Generator(device).manual_seed(0)

    # 1. Dense pretraining with AdamW.
    torch.manual_seed(0)
    model = TinyGPT(n_head=4, **size).to(device)
    adamw = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.01)
    train(model, adamw, warmup_cosine(adamw, pretrain_steps), train_data, pretrain_steps, batch, size["ctx"], gen,
          "AdamW")
    dense_loss = evaluate(model, val_data, size["ctx"])

    pruned = copy.deepcopy(model)  # the baseline: one-shot magnitude pruning, no fine-tuning
    with torch.no_grad():
        for t in find_targets(pruned):
            t.param.copy_(sk.nm_prune(t.param, n, m, t.group_dim)[0])
    pruned_loss = evaluate(pruned, val_data, size["ctx"])

    # 2. Sparse fine-tuning that continues the AdamW run.
    adamw_state = adamw.state_dict()
    switch = sk.AutoSwitch(min_step=pretrain_steps + finetune_steps // 10,
                           max_step=pretrain_steps + finetune_steps // 2)
    opt = sk.STEP.from_adamw(model, adamw_state, sparsity=args.sparsity, lr=1e-3, weight_decay=0.01, switch=switch)
    assert opt.step_count == pretrain_steps, "STEP must continue AdamW's step count"
    for i, p in enumerate(model.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], adamw_state["state"][i]["exp_avg"]), "m was not carried over"
    train(model, opt, warmup_cosine(opt, finetune_steps), train_data, finetune_steps, batch, size["ctx"], gen, "STEP")
    assert opt.phase == "sparse", "STEP did not switch to mask learning"
    assert is_nm(model, n, m), f"a target is not {args.sparsity}"
    sparse_loss = evaluate(model, val_data, size["ctx"])
    assert sparse_loss < pruned_loss, "sparse fine-tuning did not improve on one-shot pruning"

    targets = find_targets(model)
    print(f"\nswitch at global step {opt.switch_step} (fine-tuning step {opt.switch_step - pretrain_steps}); "
          f"{len(targets)} targets, every one {args.sparsity} (sparsity {opt.stats()['sparsity']:.3f})")
    print("| model | validation loss (nats/byte) |\n|---|---|")
    print(f"| dense (AdamW, {pretrain_steps} steps) | {dense_loss:.4f} |")
    print(f"| one-shot {args.sparsity} magnitude pruning | {pruned_loss:.4f} |")
    print(f"| {args.sparsity} STEP fine-tuned ({finetune_steps} steps) | {sparse_loss:.4f} |")
    print("finetune_from_adamw: all checks passed")


if __name__ == "__main__":
    main()
