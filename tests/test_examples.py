"""examples/: every example's smoke configuration, run the way a user runs it (``python
examples/X.py --smoke``, or under ``torchrun`` for the distributed ones: 2 gloo ranks for FSDP2,
4 for Megatron's TP=2 x DP=2), so the examples never rot.

Each example asserts its own checks (bit-identical resumes, 2:4 targets, packed logits) and ends
by printing ``<name>: all checks passed``; a test passes when the process exits 0 and printed that
line. An example whose optional package (transformers, accelerate, megatron-core) or the compiled
extension (for 2:4 packing) is missing is skipped with the reason.
"""

import ast
import importlib.util
import os
import sys

import pytest

from helpers import run_to_completion
from step_kernels import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TIMEOUT_S = 600  # a hang fails the test instead of blocking CI

# name: (ranks under torchrun, or 0 for plain python; modules it needs; needs the extension;
# extra arguments, with {tmp} a fresh directory)
SMOKE = {
    "export_and_infer.py": (0, (), True, ["--out", "{tmp}"]),
    "finetune_from_adamw.py": (0, (), False, []),
    "hf_trainer.py": (0, ("transformers", "accelerate"), True, ["--out", "{tmp}"]),
    "fsdp2_torchrun.py": (2, (), False, ["--ckpt-dir", "{tmp}/ckpt"]),
    "megatron_gpt.py": (4, ("megatron.core",), False, ["--ckpt-dir", "{tmp}/ckpt"]),
}


def run_example(name, nproc, args):
    """Run one example's smoke configuration; its combined output."""
    script = os.path.join(EXAMPLES, name)
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return run_to_completion(launcher + [script, "--smoke", *args], f"{name} --smoke", TIMEOUT_S, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_example_smoke_run(name, tmp_path):
    nproc, modules, needs_extension, args = SMOKE[name]
    for module in modules:
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            pytest.skip(f"{name} needs {module} (optional; `make setup` installs it)")
    if needs_extension and _extension.missing_reason() is not None:
        pytest.skip(f"{name} packs 2:4 weights, which needs the compiled extension: {_extension.missing_reason()}")
    out = run_example(name, nproc, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert f"{name[:-3]}: all checks passed" in out, out[-4000:]


def test_every_example_has_a_header_and_a_smoke_run():
    """A new example must be added to SMOKE, and every header says what it shows and how to run it."""
    assert sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py")) == sorted(SMOKE)
    for name in SMOKE:
        with open(os.path.join(EXAMPLES, name)) as f:
            doc = ast.get_docstring(ast.parse(f.read()))
        assert doc and "What it shows" in doc and "Run (full size" in doc, name
        assert f"examples/{name} --smoke" in doc, f"{name}: the header must give the smoke command"
