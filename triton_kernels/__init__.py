"""Triton kernels of step-kernels, installed as ``step_kernels.triton_kernels``.

This subpackage imports nothing from ``step_kernels``; each op is one file holding its private
``@triton.jit`` kernel and its launcher (checks, grid, strides).
"""
