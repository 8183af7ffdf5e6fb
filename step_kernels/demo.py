"""``make demo``: train a small byte-level GPT with the dense, SR-STE and STEP recipes at 2:4.

The data is a fixed list of Python standard-library source files (no download). Each recipe
trains the same model from the same seed on the same batches; the script prints progress and a
table (final validation loss, 2:4 pattern verified in every target, switch step, wall time) and
writes a loss-curve PNG. About two minutes on 2 CPU cores.

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
from .reference import nm_mask, parse_sparsity
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


def run_recipe(recipe: str, args, train: torch.Tensor, val: torch.Tensor) -> Dict:
    torch.manual_seed(args.seed)
    model = TinyGPT(ctx=args.ctx, d_model=args.d_model, n_layer=args.n_layer, n_head=4)
    opt = STEP(sparse_param_groups(model, sparsity=args.sparsity), lr=args.lr, betas=(0.9, args.beta2),
               weight_decay=0.01, recipe=recipe, total_steps=args.steps, backend=args.backend)
    gen = torch.Generator().manual_seed(args.seed)
    curve: List[tuple] = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batches(train, args.batch, args.ctx, gen)
        opt.zero_grad(set_to_none=True)
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = evaluate(model, val, args.ctx)
            curve.append((step, val_loss))
            flip = opt.stats()["flip_rate"]
            print(f"  [{recipe:>5}] step {step:4d}/{args.steps}  train {loss.item():.3f}  val {val_loss:.3f}"
                  f"  phase {opt.phase:<6}" + (f"  flip rate {flip:.4f}" if flip is not None else ""),
                  flush=True)
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
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    # AutoSwitch averages Z over round(1 / (1 - beta2)) steps: 100 here. With 0.999 the window
    # (1000) could not fill before T_max (half the run) and the switch would always be T_max.
    parser.add_argument("--beta2", type=float, default=0.99)
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--out", default="demo_out")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))

    data = stdlib_corpus()
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    print(f"step-kernels demo: TinyGPT (d={args.d_model}, layers={args.n_layer}, ctx={args.ctx}) on "
          f"{data.numel() / 1e6:.2f} MB of Python stdlib source; {args.steps} steps per recipe, "
          f"sparsity {args.sparsity}; {platform.machine()}, {torch.get_num_threads()} threads", flush=True)
    results = []
    for recipe in args.recipes.split(","):
        print(f"recipe {recipe}:", flush=True)
        results.append(run_recipe(recipe, args, train, val))

    header = f"| recipe | val loss | perplexity/byte | {args.sparsity} in every target | sparsity | switch step | wall s | backend |"
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
