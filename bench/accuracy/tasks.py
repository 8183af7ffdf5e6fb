"""The study's three tasks, all on data that ships with Python or scikit-learn (no download).

- ``lm``: TinyGPT (our own model, ``nn.Linear`` targets), byte-level LM on standard-library source.
- ``gpt2``: ``transformers``' GPT-2 from a config (random init), same corpus: ``Conv1D`` targets
  on a real third-party model.
- ``digits``: an MLP-Mixer classifier on scikit-learn's bundled 8x8 digits (accuracy).
- ``ft``: the paper's main setting. TinyGPT pretrained dense with AdamW on the ``lm`` corpus, then
  fine-tuned sparse on other standard-library packages; every recipe starts from the pretrained
  model and its AdamW state (STEP through ``STEP.from_adamw``, inheriting m, v and t).

Each task builds its model from a seed, draws training batches from a generator and evaluates
on a fixed validation set, so every recipe sees the same data in the same order.
"""

from __future__ import annotations

import math
import os
import sysconfig
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from step_kernels.models import TinyGPT, batches, stdlib_corpus


class Task:
    """A model family, its data and its metric."""

    name: str
    metric: str  # the headline number
    higher_is_better: bool
    sparsities: List[str]  # the N:M ratios the study runs
    steps: int
    batch_size: int
    exclude: Optional[List[str]] = None  # target exclusions (None: the library's defaults)
    seeds: Tuple[int, ...] = (0, 1, 2)  # the seeds of every recipe x ratio (seed 0 also tunes the lr)
    asp_dense_fraction: float = 0.6  # ASP from scratch trains dense this long before its prune

    def adamw_state(self, seed: int) -> Optional[Dict[str, Any]]:
        """The AdamW state dict every recipe continues from (fine-tuning), or None."""
        return None

    def start_step(self, seed: int) -> int:
        """The optimizer's step count at the start of the run (the pretraining's, when fine-tuning)."""
        return 0

    def build(self, seed: int) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, generator: torch.Generator) -> Tensor:
        """The training loss of one batch drawn from ``generator``."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        """Validation metrics on the fixed validation set (the model is left in train mode)."""
        raise NotImplementedError


class _ByteLM(Task):
    metric = "val_loss"
    higher_is_better = False
    steps = 3000
    batch_size = 32
    ctx = 64
    eval_batches = 16

    def __init__(self):
        data = self.corpus()
        self.corpus_bytes = data.numel()
        split = int(0.9 * data.numel())
        self.train_data, self.val_data = data[:split], data[split:]

    def corpus(self) -> Tensor:
        """The task's text as uint8 bytes (the last 10% is the validation set)."""
        return stdlib_corpus()

    def _forward_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, model, generator):
        return self._forward_loss(model, *batches(self.train_data, self.batch_size, self.ctx, generator))

    def evaluate(self, model):
        gen = torch.Generator().manual_seed(12345)
        model.eval()
        with torch.no_grad():
            losses = [self._forward_loss(model, *batches(self.val_data, 32, self.ctx, gen)).item()
                      for _ in range(self.eval_batches)]
        model.train()
        loss = sum(losses) / len(losses)
        return {"val_loss": loss, "val_ppl": math.exp(loss)}


class TinyGPTLM(_ByteLM):
    """TinyGPT, d_model 128, 2 layers, 4 heads, context 64 (0.43M parameters)."""

    name = "lm"
    sparsities = ["2:4", "1:8", "1:16"]

    def build(self, seed):
        torch.manual_seed(seed)
        return TinyGPT(vocab=256, ctx=self.ctx, d_model=128, n_layer=2, n_head=4)

    def _forward_loss(self, model, x, y):
        return model.loss(x, y)


class GPT2LM(_ByteLM):
    """``transformers.GPT2LMHeadModel``: n_embd 128, 2 layers, 4 heads, byte vocabulary, no dropout."""

    name = "gpt2"
    sparsities = ["2:4", "1:8"]

    def build(self, seed):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=256, n_positions=self.ctx, n_embd=128, n_layer=2, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is outside 256 bytes
        return GPT2LMHeadModel(config)

    def _forward_loss(self, model, x, y):
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


class _MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_fc1 = nn.Linear(tokens, token_hidden)
        self.token_fc2 = nn.Linear(token_hidden, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_fc1 = nn.Linear(dim, channel_hidden)
        self.channel_fc2 = nn.Linear(channel_hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x).transpose(1, 2)
        x = x + self.token_fc2(F.gelu(self.token_fc1(y))).transpose(1, 2)
        return x + self.channel_fc2(F.gelu(self.channel_fc1(self.norm2(x))))


class MLPMixer(nn.Module):
    """MLP-Mixer for 8x8 images: 2x2 patches (16 tokens of 4 pixels), ``depth`` mixer blocks."""

    def __init__(self, dim: int = 64, depth: int = 2, classes: int = 10):
        super().__init__()
        self.stem = nn.Linear(4, dim)
        self.blocks = nn.ModuleList([_MixerBlock(16, dim, 64, 4 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, images: Tensor) -> Tensor:
        b = images.shape[0]
        patches = images.view(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)
        x = self.stem(patches)
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.norm(x).mean(dim=1))


class Digits(Task):
    """MLP-Mixer (dim 64, 2 blocks) on scikit-learn's digits: 1297 train / 500 validation images."""

    name = "digits"
    metric = "val_acc"
    higher_is_better = True
    sparsities = ["2:4", "1:8"]
    steps = 3000
    batch_size = 64
    # The 4-pixel stem (input 4, not divisible by 8) and the classifier stay dense.
    exclude = [r"^stem$", r"(^|\.)classifier$"]
    # A run takes ~20 s and one validation image is 0.2% accuracy, so this task runs 10 seeds.
    seeds = tuple(range(10))

    def __init__(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        train, val = order[:1297], order[1297:]
        self.train_x, self.train_y = images[train], labels[train]
        self.val_x, self.val_y = images[val], labels[val]

    def build(self, seed):
        torch.manual_seed(seed)
        return MLPMixer()

    def loss(self, model, generator):
        idx = torch.randint(0, len(self.train_y), (self.batch_size,), generator=generator)
        return F.cross_entropy(model(self.train_x[idx]), self.train_y[idx])

    def evaluate(self, model):
        model.eval()
        with torch.no_grad():
            logits = model(self.val_x)
        model.train()
        return {"val_acc": (logits.argmax(-1) == self.val_y).float().mean().item(),
                "val_loss": F.cross_entropy(logits, self.val_y).item()}


# Fine-tuning text: standard-library packages none of whose files are in the pretraining corpus.
FINETUNE_PACKAGES = ("asyncio", "concurrent/futures", "email", "http", "multiprocessing", "urllib", "xml/etree")
PRETRAIN_STEPS = 3000
PRETRAIN_LR = 3e-3  # fixed before any fine-tuning result; the same pretrained model for every recipe
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")


def package_corpus(packages=FINETUNE_PACKAGES) -> Tensor:
    """The bytes of every ``.py`` file of ``packages`` (standard-library folders), sorted by path."""
    root = sysconfig.get_paths()["stdlib"]
    chunks = []
    for package in packages:
        folder = os.path.join(root, package)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    chunks.append(f.read())
    if not chunks:
        raise FileNotFoundError(f"none of {packages} found under {root}")
    return torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8).clone()


class FineTuneLM(TinyGPTLM):
    """TinyGPT pretrained dense (AdamW, 3000 steps, lm corpus), fine-tuned on other stdlib packages."""

    name = "ft"
    sparsities = ["2:4", "1:8"]
    asp_dense_fraction = 0.0  # apex ASP's own use: prune the trained model once, then fine-tune

    def corpus(self) -> Tensor:
        return package_corpus()

    def _pretrained(self, seed: int) -> Dict[str, Any]:
        """Pretrain once per seed (cached under ``.cache/``; deterministic, so a fresh clone
        rebuilds the same model): the model's and the AdamW optimizer's state dicts."""
        path = os.path.join(CACHE_DIR, f"pretrained-s{seed}-{PRETRAIN_STEPS}.pt")
        if os.path.exists(path):
            return torch.load(path, weights_only=True)
        from .run import BETAS, EPS, WEIGHT_DECAY, lr_factor, train_step

        pretrain = TinyGPTLM()
        model = pretrain.build(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, betas=BETAS, eps=EPS,
                                weight_decay=WEIGHT_DECAY)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, PRETRAIN_STEPS))
        gen = torch.Generator().manual_seed(7919 * seed + 1)
        for _ in range(PRETRAIN_STEPS):
            train_step(pretrain, model, opt, schedule, gen)
        state = {"model": model.state_dict(), "adamw": opt.state_dict(),
                 "val_loss": pretrain.evaluate(model)["val_loss"]}
        os.makedirs(CACHE_DIR, exist_ok=True)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
        return state

    def build(self, seed):
        model = super().build(seed)
        model.load_state_dict(self._pretrained(seed)["model"])
        return model

    def adamw_state(self, seed):
        return self._pretrained(seed)["adamw"]

    def start_step(self, seed):
        return PRETRAIN_STEPS


TASKS = {"lm": TinyGPTLM, "gpt2": GPT2LM, "digits": Digits, "ft": FineTuneLM}
