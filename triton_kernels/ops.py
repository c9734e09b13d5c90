"""The Triton backend's launchers (``launch.py``) as ``torch.library`` operators
(``adam_mini_kernels::triton_*``), with fake implementations, so that ``torch.compile`` traces a
step that calls them as opaque, in-place nodes (see [Note: eager launches] in ``launch.py``).
Same schemas as the CUDA extension's operators, coefficient kernel included."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from .. import op_checks
from . import launch

LAUNCHERS = SimpleNamespace(
    step_coefficients=launch.step_coefficients,
    rows_step=launch.rows_step,
    large_blocks_sumsq=launch.large_blocks_sumsq,
    large_blocks_update=launch.large_blocks_update,
    adam_step=launch.adam_step,
)


def _on_first_tensors_device(launcher):
    """``launcher`` run with its first tensor's device current ([Note: launch device])."""

    @functools.wraps(launcher)
    def run(*args):
        with launch.on_device(args[0].device):
            return launcher(*args)

    return run


def _operator(name: str, mutates: tuple, fake):
    launcher = getattr(LAUNCHERS, name)
    op = torch.library.custom_op(
        f"adam_mini_kernels::triton_{name}",
        _on_first_tensors_device(launcher),
        mutates_args=mutates,
        schema=torch.library.infer_schema(launcher, mutates_args=mutates),
    )
    op.register_fake(lambda *args: fake(f"triton_{name}", *args))
    return op


OPERATORS = SimpleNamespace(
    step_coefficients=_operator("step_coefficients", ("steps", "coef"), op_checks.check_coefficients),
    rows_step=_operator("rows_step", ("p", "m", "m_scales", "v"), op_checks.check_rows),
    large_blocks_sumsq=_operator("large_blocks_sumsq", ("partial", "block_sums"), op_checks.check_large_blocks_sumsq),
    large_blocks_update=_operator(
        "large_blocks_update", ("p", "m", "m_scales", "v"), op_checks.check_large_blocks_update
    ),
    adam_step=_operator("adam_step", ("p", "m", "v"), op_checks.check_adam),
)
