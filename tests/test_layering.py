"""The imports of step_kernels point down: each module imports only modules of lower layers.

Every ``import`` statement of a module counts, those inside functions included, so a cycle cannot
be hidden in a function body. ``step_kernels.triton_kernels`` (the directory triton_kernels/)
imports nothing from step_kernels. A new module must be placed in ``LAYERS``.
"""

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "step_kernels"
TRITON = ROOT / "triton_kernels"

# Lowest first. "_C" is the compiled extension, "triton_kernels" the Triton subpackage (a leaf),
# "__init__" the package itself (what ``from . import STEP`` reads).
LAYERS: List[Set[str]] = [
    {"errors", "reference", "models", "triton_kernels", "_C"},
    {"_fakes", "targets"},
    {"_extension"},
    {"ops"},
    {"optimizer", "packing"},
    {"export", "distributed"},
    {"megatron_tp", "megatron_distopt"},
    {"megatron"},
    {"__init__"},
    {"demo"},
]
LAYER: Dict[str, int] = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> List[str]:
    return sorted(path.stem for path in PACKAGE.glob("*.py"))


def _imports(tree: ast.AST) -> Iterator[Tuple[int, str, List[str]]]:
    """``(level, module, names)`` of every import statement anywhere in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", [alias.name for alias in node.names]


def package_imports(source: str, modules: Set[str]) -> Set[str]:
    """The step_kernels modules that ``source`` (a module of step_kernels) imports; names that
    ``from . import`` reads from the package itself count as ``"__init__"``."""
    found = set()
    for level, module, names in _imports(ast.parse(source)):
        if level == 0:
            parts = module.split(".")
            if parts[0] != "step_kernels":
                continue
            if len(parts) > 1:
                found.add(parts[1])
                continue
            module, level = "", 1  # `from step_kernels import x` reads the package, as `from . import x`
        if level != 1:
            raise AssertionError(f"an import of level {level} leaves the package: from {'.' * level}{module}")
        if module:
            found.add(module.split(".")[0])
        else:
            found.update(name if name in modules else "__init__" for name in names)
    return found


def violations(edges: Dict[str, Set[str]]) -> List[str]:
    """Each import of ``edges`` (module -> the modules it imports) that does not point down."""
    bad = []
    for module, imported in sorted(edges.items()):
        for target in sorted(imported):
            if target not in LAYER:
                bad.append(f"step_kernels.{module} imports step_kernels.{target}, which has no layer")
            elif LAYER[target] >= LAYER[module]:
                bad.append(f"step_kernels.{module} (layer {LAYER[module]}) imports step_kernels.{target} "
                           f"(layer {LAYER[target]}): imports must point to a lower layer")
    return bad


def test_every_module_has_a_layer():
    unplaced = [name for name in _modules() if name not in LAYER]
    assert not unplaced, f"place these modules of step_kernels in LAYERS of {__file__}: {unplaced}"
    stale = sorted(set(LAYER) - set(_modules()) - {"_C", "triton_kernels"})
    assert not stale, f"LAYERS names modules that step_kernels does not have: {stale}"


def test_imports_point_down():
    modules = set(_modules()) | {"triton_kernels", "_C"}
    edges = {name: package_imports((PACKAGE / f"{name}.py").read_text(), modules) for name in _modules()}
    assert edges["_extension"] >= {"_C", "_fakes", "errors"}  # the graph is read (a sample of known edges)
    assert "triton_kernels" in edges["ops"]
    assert violations(edges) == []


def test_an_upward_import_is_reported():
    modules = set(_modules()) | {"triton_kernels", "_C"}
    source = "def f():\n    from .ops import nm_prune\n    from step_kernels import STEP\n"
    edges = {"reference": package_imports(source, modules)}
    assert edges == {"reference": {"ops", "__init__"}}
    assert len(violations(edges)) == 2
    assert violations({"ops": {"ops"}}) != [], "a module of a layer may not import one of the same layer"


@pytest.mark.parametrize("path", sorted(TRITON.glob("*.py")), ids=lambda p: p.name)
def test_triton_kernels_import_nothing_from_step_kernels(path):
    for level, module, _ in _imports(ast.parse(path.read_text())):
        assert level <= 1, f"{path.name}: from {'.' * level}{module} reaches out of triton_kernels"
        assert level == 1 or module.split(".")[0] != "step_kernels", f"{path.name} imports {module}"
