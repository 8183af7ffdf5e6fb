"""Shared test set-up: every test runs on CPU, and on CUDA too when a GPU is present.

Triton kernels run on CPU tensors through Triton's interpreter, which must be switched on before
triton is first imported: this file is imported by pytest before any test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a test runs on: "cpu", and "cuda" when available."""
    return torch.device(request.param)
