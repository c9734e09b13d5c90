"""Triton kernels of adam-mini-kernels, installed as ``adam_mini_kernels.triton_kernels``."""
