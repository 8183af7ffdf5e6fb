"""step-kernels: fused kernels and a PyTorch optimizer for STEP (Lu et al., ICML 2023).

Importing this package needs neither a GPU, Triton nor the compiled extension; a backend that is
missing raises a clear error when it is called.
"""

__version__ = "0.1.0"

from . import reference  # noqa: E402
from .errors import BackendUnavailableError  # noqa: E402
from .ops import nm_prune, resolve_backend  # noqa: E402
from .optimizer import STEP, AutoSwitch  # noqa: E402
from .packing import pack24, unpack24  # noqa: E402
from .targets import sparse_param_groups  # noqa: E402

__all__ = [
    "__version__",
    "STEP",
    "AutoSwitch",
    "sparse_param_groups",
    "nm_prune",
    "pack24",
    "unpack24",
    "resolve_backend",
    "BackendUnavailableError",
    "reference",
]
