"""``make demo``: train a small byte-level GPT with the dense, SR-STE and STEP recipes at 2:4.

The data is a fixed list of Python standard-library source files (no download). Each recipe
trains the same model from the same seed on the same batches, the way models are trained: Adam's
default betas (0.9, 0.999), weight decay 0.01, the lr warmed up linearly over the first 5% of the
steps and then decayed along a cosine to 10% of its peak (torch's own schedulers). The script
prints progress and a table (final validation loss, 2:4 pattern verified in every target, switch
step, wall time) and writes a loss-curve PNG. About 2.5 minutes on 2 CPU cores.

Run ``python -m step_kernels.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from typing import Dict, List

import torch

from . import STEP, sparse_param_groups
from .models import TinyGPT, batches, stdlib_corpus
from .reference import parse_sparsity
from .targets import find_targets

RECIPES = ("dense", "srste", "step")


def evaluate(model: TinyGPT, data: torch.Tensor, ctx: int, n_batches: int = 16) -> float:
    """Mean validation loss over fixed batches (the same for every recipe)."""
    gen = torch.Generator().manual_seed(12345)
    model.eval()
    with torch.no_grad():
        losses = [model.loss(*batches(data, 32, ctx, gen)).item() for _ in range(n_batches)]
    model.train()
    return sum(losses) / len(losses)


def verify_pattern(model: TinyGPT, sparsity: str) -> bool:
    """True when every target weight has at most N nonzeros in each group of M along its input."""
    n, m = parse_sparsity(sparsity)
    for target in find_targets(model):
        w = target.param.detach()
        nonzero = (w != 0).movedim(target.group_dim, -1).reshape(-1, m).sum(-1)
        if (nonzero > n).any():
            return False
    return True


def eta(elapsed: float, done: int, total: int) -> str:
    """The time left at the rate so far, as ``m:ss``."""
    left = elapsed / max(done, 1) * (total - done)
    return f"{int(left // 60)}:{int(left % 60):02d}"


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup_fraction: float = 0.05,
                  final_fraction: float = 0.1) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``warmup_fraction`` of ``steps``, then cosine decay to
    ``final_fraction`` of the peak lr, built from torch's own schedulers."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    warmup = max(1, round(warmup_fraction * steps))
    peak = opt.param_groups[0]["lr"]
    return SequentialLR(opt, [LinearLR(opt, start_factor=1 / warmup, total_iters=warmup),
                              CosineAnnealingLR(opt, T_max=steps - warmup, eta_min=final_fraction * peak)],
                        milestones=[warmup])


def run_recipe(recipe: str, args, train: torch.Tensor, val: torch.Tensor) -> Dict:
    """Train one recipe from the demo's seed; its final validation loss, curve and switch step."""
    torch.manual_seed(args.seed)
    model = TinyGPT(ctx=args.ctx, d_model=args.d_model, n_layer=args.n_layer, n_head=4)
    opt = STEP(sparse_param_groups(model, sparsity=args.sparsity), lr=args.lr, weight_decay=0.01,
               recipe=recipe, total_steps=args.steps, backend=args.backend)
    schedule = warmup_cosine(opt, args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    curve: List[tuple] = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batches(train, args.batch, args.ctx, gen)
        opt.zero_grad(set_to_none=True)
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = evaluate(model, val, args.ctx)
            curve.append((step, val_loss))
            flip = opt.stats()["flip_rate"]
            elapsed = time.perf_counter() - start
            print(f"  [{recipe:>5}] step {step:4d}/{args.steps}  train {loss.item():.3f}  val {val_loss:.3f}"
                  f"  phase {opt.phase:<6}" + (f"  flip rate {flip:.4f}" if flip is not None else "")
                  + f"  {step / elapsed:5.1f} steps/s, ETA {eta(elapsed, step, args.steps)}", flush=True)
    wall = time.perf_counter() - start
    masked = recipe != "dense"
    return {
        "recipe": recipe,
        "val_loss": curve[-1][1],
        "pattern_ok": verify_pattern(model, args.sparsity) if masked else None,
        "sparsity": opt.stats()["sparsity"] if masked else 0.0,
        "switch_step": opt.switch_step,
        "wall_s": wall,
        "backend": opt.backend,
        "curve": curve,
    }


def plot(results: List[Dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        steps, losses = zip(*r["curve"])
        ax.plot(steps, losses, label=r["recipe"], marker=".")
        if r["switch_step"]:
            ax.axvline(r["switch_step"], linestyle=":", color="gray")
            ax.annotate("STEP switch", (r["switch_step"], max(losses)), fontsize=8, color="gray")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # With beta2 = 0.999 AutoSwitch's window is 1000 steps; 2400 steps put T_max (50%) past it.
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--out", default="demo_out")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))

    data = stdlib_corpus()
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    print(f"step-kernels demo: TinyGPT (d={args.d_model}, layers={args.n_layer}, ctx={args.ctx}) on "
          f"{data.numel() / 1e6:.2f} MB of Python {platform.python_version()} standard-library source; "
          f"{args.steps} steps per recipe, sparsity {args.sparsity}; {platform.machine()}, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = []
    for recipe in args.recipes.split(","):
        print(f"recipe {recipe}:", flush=True)
        results.append(run_recipe(recipe, args, train, val))

    header = (f"| recipe | val loss | perplexity/byte | {args.sparsity} in every target | sparsity | switch step "
              "| wall s | backend |")
    print()
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in results:
        pattern = "n/a (dense)" if r["pattern_ok"] is None else ("yes" if r["pattern_ok"] else "NO")
        switch = r["switch_step"] if r["switch_step"] is not None else "-"
        print(f"| {r['recipe']} | {r['val_loss']:.4f} | {math.exp(r['val_loss']):.3f} | {pattern} | "
              f"{r['sparsity']:.3f} | {switch} | {r['wall_s']:.1f} | {r['backend']} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "loss_curves.png")
    plot(results, path, f"TinyGPT on stdlib bytes, {args.sparsity}, {args.steps} steps")
    print(f"\nloss curves: {path}")
    failed = [r["recipe"] for r in results if r["pattern_ok"] is False]
    if failed:
        print(f"ERROR: the {args.sparsity} pattern is violated for {failed}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
