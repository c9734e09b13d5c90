"""Test set-up shared by every test file.

Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter, which must be switched
on before any kernel is defined, so it is set here, before test modules import anything. With a
GPU the same tests run the compiled kernels on CUDA tensors.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests import their helpers (models, grad_stream)

# Tests that need the official package (the oracle), transformers, accelerate or triton skip where they are
# missing (the GPU machine, a CPU build of torch); in CI they must be there, so a broken install
# fails loudly instead of skipping.
if os.environ.get("CI") == "true":
    import accelerate  # noqa: F401
    import adam_mini  # noqa: F401
    import transformers  # noqa: F401
    import triton  # noqa: F401


@pytest.fixture
def one_intra_op_thread():
    """For tests of tiny models: one intra-op thread is faster than several (which only spin and
    fight other processes for the cores). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
