"""A small GPT-style byte-level language model, and the corpus the demo trains it on.

Both need no download: the corpus is a fixed list of the Python standard library's own source
files, read as bytes, so its text and size depend on the Python version (results record it).
Used by ``make demo``, the tests and the accuracy study.
"""

from __future__ import annotations

import os
import sysconfig
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TinyGPT", "STDLIB_FILES", "stdlib_corpus", "batches"]

# A fixed list, so every machine with the same Python version trains on the same text.
STDLIB_FILES = (
    "argparse.py", "ast.py", "calendar.py", "collections/__init__.py", "configparser.py",
    "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "enum.py", "fractions.py",
    "functools.py", "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py",
    "logging/__init__.py", "pathlib.py", "pprint.py", "random.py", "shutil.py", "statistics.py",
    "string.py", "tarfile.py", "textwrap.py", "threading.py", "tokenize.py", "typing.py",
    "unittest/case.py", "uuid.py", "zipfile.py",
)


def stdlib_corpus(max_bytes: int | None = None) -> Tensor:
    """The bytes of :data:`STDLIB_FILES` that exist in this Python, concatenated, as uint8.

    The files differ between Python versions: with CPython 3.11.7 this is 1,726,409 bytes
    (1.73 MB). Report ``platform.python_version()`` with any result trained on it.
    """
    root = sysconfig.get_paths()["stdlib"]
    chunks: List[bytes] = []
    for rel in STDLIB_FILES:
        path = os.path.join(root, rel)
        if os.path.exists(path):
            with open(path, "rb") as f:
                chunks.append(f.read())
    if not chunks:
        raise FileNotFoundError(f"none of the corpus files were found under {root}")
    data = b"\n".join(chunks)
    if max_bytes is not None:
        data = data[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def batches(data: Tensor, batch_size: int, ctx: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """A random batch of ``(inputs, targets)`` windows of length ``ctx`` from ``data``."""
    starts = torch.randint(0, data.numel() - ctx - 1, (batch_size,), generator=generator)
    offsets = torch.arange(ctx + 1)
    windows = data[starts[:, None] + offsets].long()
    return windows[:, :-1], windows[:, 1:]


class _Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, mlp_ratio: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        shape = (b, t, self.n_head, d // self.n_head)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A pre-norm GPT: byte embedding, learned positions, ``n_layer`` blocks, a tied output head.

    Its N:M targets (see :func:`step_kernels.sparse_param_groups`) are each block's ``qkv``,
    ``proj``, ``fc1`` and ``fc2`` weights; the embedding and the tied head stay dense.
    """

    def __init__(self, vocab: int = 256, ctx: int = 64, d_model: int = 64, n_layer: int = 2,
                 n_head: int = 4, mlp_ratio: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(ctx, d_model))
        self.blocks = nn.ModuleList(_Block(d_model, n_head, mlp_ratio) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-byte cross-entropy (computed in fp32)."""
        logits = self(idx)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
