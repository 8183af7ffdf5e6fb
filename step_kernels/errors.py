"""The errors step-kernels raises itself; the lowest module of the package (it imports nothing).

:class:`BackendUnavailableError` is public as ``step_kernels.BackendUnavailableError`` and
``step_kernels.ops.BackendUnavailableError``.
"""

__all__ = ["BackendUnavailableError"]


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run here; the message says why and how to get it."""
