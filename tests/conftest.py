"""Test set-up shared by every test file.

Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter, which must be switched
on before any kernel is defined, so it is set here, before test modules import anything. With a
GPU the same tests run the compiled kernels on CUDA tensors.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests import their helpers (models, grad_stream)
