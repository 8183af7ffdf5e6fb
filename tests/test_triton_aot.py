"""Every shipped Triton kernel configuration compiled ahead of time for sm_80 and sm_90 (no GPU
needed): no register spills, and 128-bit global loads/stores on the main streams (docs/design.md section 12).
"""

import os
import re

import pytest

triton = pytest.importorskip("triton")

TRITON_VERSION = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
# ASTSource(fn, signature by name, constexprs by name, attrs by index) as used by _aot was checked on
# Triton 3.6.0 and 3.9.0; older releases take other forms.
pytestmark = pytest.mark.skipif(
    TRITON_VERSION < (3, 6),
    reason=f"compile-only inspection needs Triton >= 3.6's ASTSource API (found {triton.__version__})",
)

from step_kernels.triton_kernels import _aot  # noqa: E402

CONFIGS = {cfg.name: cfg for cfg in _aot.kernel_configs()}


@pytest.fixture(scope="module")
def rows():
    """All configurations compiled once, in a subprocess without TRITON_INTERPRET and with
    TRITON_DEFAULT_FP_FUSION=0 (the launchers also pass enable_fp_fusion=False)."""
    by_name = {}
    for row in _aot.report_in_subprocess((80, 90)):
        by_name.setdefault(row["name"], []).append(row)
    return by_name


def test_cuobjdump_ships_with_triton():
    assert os.access(_aot._cuobjdump(), os.X_OK)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_spills_and_vector_loads(name, rows):
    assert sorted(row["sm"] for row in rows[name]) == [80, 90]
    for row in rows[name]:
        where = f"{name} on sm_{row['sm']}: {row}"
        assert row["registers"] > 0, where
        assert row["stack"] == 0 and row["local"] == 0 and row["spill_ops"] == 0, f"spills: {where}"
        assert row["loads_128"] >= row["min_vector_loads"], f"main streams not 16-byte loads: {where}"
        assert row["stores_128"] >= row["min_vector_stores"], f"main streams not 16-byte stores: {where}"


def test_config_count_stays_small():
    assert 15 <= len(CONFIGS) <= 30  # about 50 compiles over the two targets
