"""Flat buffers: the storage of one (device, dtype) group of parameters.

[Note: flat storage]
Every backend steps a group through a handful of flat tensors instead of one small tensor per
parameter: the parameters, their gradients and the first moment ``m`` (storage dtype) laid out
one after the other, and every second-moment value of the group in one float32 buffer ``v`` (one
value per block; one per element for Adam blocks). The optimizer owns the parameter and gradient
storage: ``p.data`` and ``p.grad`` are re-pointed as views into the flat buffers, so autograd
accumulates straight into them. When that aliasing is broken (``zero_grad(set_to_none=True)``,
a user assigning ``p.grad`` or ``p.data``, ``module.to()``), ``inspect``/``repair`` notice it at
the next step, copy the values in and re-point, so the step is still correct.

Each parameter starts at a multiple of ``ALIGN_ELEMENTS`` elements (128 bytes for fp32), so that
kernels can use aligned vector loads on rows whose length is a multiple of the vector width. The
gap after a parameter ("padding") belongs to no block and stays zero in every buffer.

The per-parameter table (``table``) and the size of every block (``block_sizes``) are what
backends consume, built once; backends derive their launch metadata from them once and keep it
in ``cache``. A parameter with column blocks (see [Note: block layouts] in partition.py) is
stored with its last two dims swapped: ``p.data`` and ``p.grad`` are then transposed
(non-contiguous) views of their spans, so every block is still a contiguous span of the flat
buffers.

A group built with ``state_dtype=torch.int8`` stores ``m`` as 8-bit codes with one float32 scale
per quantization chunk (``m_scales``; see [Note: int8 first moment] in quantization.py): the
chunks of every block in storage order, each block cut into ``QBLOCK``-element chunks, its last
one possibly shorter. ``quantization_chunk_lengths()`` gives every chunk's length in the flat
buffer (the padding after a parameter is counted in its last chunk; its codes stay zero) for the
torch backend, which keeps it; the fused backends address chunks through their launch tables.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .partition import BlockLayout, swap_columns
from .quantization import QBLOCK

# The attribute marking the gradient views of the flat buffers (see [Note: gradient view marks]).
GRAD_MARK = "_adam_mini_grad_view"


def new_mark() -> int:
    """A mark value of its own (see [Note: gradient view marks])."""
    return secrets.randbits(62)


ALIGN_ELEMENTS = 32

# Columns of the per-parameter hyperparameter table (float64, one row per parameter).
HP_LR, HP_WEIGHT_DECAY, HP_BETA1, HP_BETA2, HP_EPS = range(5)
NUM_HPARAMS = 5


def check_grad(name: str, param: torch.Tensor, grad: torch.Tensor) -> None:
    """Raise for a gradient AdamMini cannot step: sparse, or not of its parameter's shape and
    dtype (``p.grad.data = ...`` skips autograd's checks; it would be cast silently)."""
    if grad.layout != torch.strided:
        raise RuntimeError(f"AdamMini does not support sparse gradients (parameter '{name}' has a {grad.layout} gradient)")
    if grad.shape != param.shape or grad.dtype != param.dtype:
        raise RuntimeError(
            f"gradient of '{name}' is {grad.dtype} of shape {list(grad.shape)}, "
            f"the parameter {param.dtype} of shape {list(param.shape)}"
        )


def chunk_lengths(block_sizes: torch.Tensor) -> torch.Tensor:
    """Lengths of the quantization chunks of blocks of ``block_sizes`` (int64), block after
    block: ``QBLOCK`` each, the last of a block the remainder (an empty block has one empty chunk,
    as ``quantization.quantize`` counts them)."""
    sizes = block_sizes.tolist()
    out: List[int] = []
    for n in sizes:
        full, rest = divmod(n, QBLOCK)
        out += [QBLOCK] * full + ([rest] if rest or not full else [])
    return torch.tensor(out, dtype=torch.int64)


def _align(n: int) -> int:
    return -(-n // ALIGN_ELEMENTS) * ALIGN_ELEMENTS


@dataclass
class GradCheck:
    """What ``FlatGroup.inspect`` found at the start of a step (nothing is changed yet)."""

    active: Optional[List[bool]]  # None when every parameter has a gradient
    stale_params: List[int]  # params whose storage no longer aliases the flat buffer
    stale_grads: List[int]  # grads that do not alias the flat buffer


class FlatGroup:
    """Flat storage, block table and step counters for the parameters of one (device, dtype)."""

    def __init__(
        self, params: Sequence[torch.Tensor], layouts: Sequence[BlockLayout], state_dtype: Optional[torch.dtype] = None
    ):
        self.params = list(params)
        self.layouts = list(layouts)
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.offsets: List[int] = []
        self.v_offsets: List[int] = []
        numel = num_v = 0
        for p, layout in zip(self.params, self.layouts):
            numel = _align(numel)
            self.offsets.append(numel)
            self.v_offsets.append(num_v)
            numel += p.numel()
            num_v += layout.num_blocks
        self.numel = numel
        self.num_v = num_v

        # [Note: first-build memory] Each buffer is allocated once the tensors it replaces are
        # released: the parameters are copied in and re-pointed before the gradient buffer
        # exists, the gradients before m does. Allocating all three first held the parameters
        # and gradients twice at once: the first step peaked at 2 P + 2 G + M (P, G, M: the
        # bytes of the parameters, gradients and m), above AdamW's P + G + 2 M; now 2 P + G.
        make = dict(device=self.device)
        self._grad_marks = [new_mark() for _ in self.params]
        self._shapes = [torch.Size(layout.shape) for layout in self.layouts]
        self.param_buffer = torch.zeros(numel, dtype=self.dtype, **make)
        self._param_ptrs = [self._ptr(self.param_buffer, i) for i in range(len(self.params))]
        self._copy_params_in(range(len(self.params)))
        self.grad_buffer = torch.zeros(numel, dtype=self.dtype, **make)
        self._grad_ptrs = [self._ptr(self.grad_buffer, i) for i in range(len(self.params))]
        # The gradient views the parameters' .grad point at (each marked: see [Note: gradient
        # view marks]) and that max_grad_norm takes norms of.
        self.grad_views = [self.marked_grad(i, self.grad_view(i)) for i in range(len(self.params))]
        self._copy_grads_in([i for i, p in enumerate(self.params) if p.grad is not None])
        self.m = torch.zeros(numel, dtype=state_dtype or self.dtype, **make)
        self.v = torch.zeros(num_v, dtype=torch.float32, **make)
        self.steps = torch.zeros(len(self.params), dtype=torch.int64, **make)
        self.table = self._make_table()
        self.quantized = state_dtype == torch.int8
        self.m_scales: Optional[torch.Tensor] = None
        self.scale_offsets: List[int] = []
        if self.quantized:
            self._make_chunks()
        # The size of every block of the group, in v order (built here, outside any traced step).
        self.block_sizes = torch.cat([layout.block_sizes() for layout in self.layouts]).to(self.device)
        self.hparams: Optional[torch.Tensor] = None
        self._captured_uploads: List[torch.Tensor] = []
        self._active_flags: Dict[tuple, torch.Tensor] = {}
        self.cache: Dict[str, object] = {}
        # Seed of stochastic rounding (rounding.py) for a bfloat16 group that uses it; None:
        # every backend writes p and m rounded to nearest.
        self.round_seed: Optional[int] = None
        # Each parameter's shard coordinate (int64, on the device), salting its rounding key
        # (rounding.shard_keys), or None where all are 0 (unsharded, replicated, first shards).
        self.shard_coords: Optional[torch.Tensor] = None
        # The DTensor side of a group of sharded parameters (sharding.ShardedGroup), or None.
        self.sharded = None

    # -- layout ------------------------------------------------------------------------------
    def _make_table(self) -> Dict[str, torch.Tensor]:
        """Per-parameter int64 columns on the device: where its elements and v values live, its
        number of blocks, and the padded length up to the next parameter."""
        ends = self.offsets[1:] + [self.numel]
        cols = {
            "offset": self.offsets,
            "numel": [p.numel() for p in self.params],
            "padded_numel": [end - off for off, end in zip(self.offsets, ends)],
            "num_blocks": [layout.num_blocks for layout in self.layouts],
            "v_offset": self.v_offsets,
        }
        return {k: torch.tensor(v, dtype=torch.int64, device=self.device) for k, v in cols.items()}

    def _make_chunks(self) -> None:
        """The quantization scales of an int8 group (zeros) and where each parameter's scales start."""
        num = 0
        for layout in self.layouts:
            self.scale_offsets.append(num)
            num += len(chunk_lengths(layout.block_sizes()))
        self.m_scales = torch.zeros(num, dtype=torch.float32, device=self.device)

    def quantization_chunk_lengths(self) -> torch.Tensor:
        """Every quantization chunk's length in the flat buffer (int64, on the device), the
        padding after a parameter counted in its last chunk."""
        lengths: List[torch.Tensor] = []
        ends = self.offsets[1:] + [self.numel]
        for p, layout, off, end in zip(self.params, self.layouts, self.offsets, ends):
            per_param = chunk_lengths(layout.block_sizes())
            if len(per_param):  # an empty shard has no chunk, and no padding
                per_param[-1] += end - off - p.numel()
            lengths.append(per_param)
        return torch.cat(lengths).to(self.device)

    def _ptr(self, buffer: torch.Tensor, i: int) -> int:
        return buffer.data_ptr() + self.offsets[i] * buffer.element_size()

    def _span(self, buffer: torch.Tensor, i: int) -> torch.Tensor:
        start = self.offsets[i]
        return buffer[start : start + self.params[i].numel()]

    def shaped(self, i: int, span: torch.Tensor) -> torch.Tensor:
        """A flat span of parameter ``i`` (in storage order) as a view of the parameter's shape:
        transposed for a parameter stored by columns."""
        layout = self.layouts[i]
        return swap_columns(span.view(layout.storage_shape), layout.columns)

    def param_view(self, i: int) -> torch.Tensor:
        return self.shaped(i, self._span(self.param_buffer, i))

    def grad_view(self, i: int) -> torch.Tensor:
        return self.shaped(i, self._span(self.grad_buffer, i))

    # [Note: gradient view marks]
    # A compiled step cannot read data pointers, so it tells a gradient that aliases the flat
    # buffer from a new one by a mark: the view the buffers hand out as parameter i's .grad holds
    # _grad_marks[i] as an attribute, which a new tensor (from autograd, clone(), .to()) lacks.
    # Dynamo guards on the attribute of the live p.grad, by value, so a compiled step whose
    # gradient was replaced is retraced (it copies the new one in). Not an identity check
    # `p.grad is view`: dynamo gives a tensor that is some parameter's .grad that .grad as its
    # only source, so the view held here got no guard of its own and the check was baked into the
    # graph (measured: a compiled step went on stepping the old flat gradient after
    # zero_grad(set_to_none=True)). Marks are random ints, not objects: dynamo guards an object
    # by its type only, and an int pickles as one (torch.load(weights_only=True) of a saved
    # gradient works); a mark saved in another process cannot match. What a mark cannot tell,
    # as no identity could: `p.grad.data = other`, and a copy.deepcopy (or a torch.load in the
    # same process) of a marked gradient assigned back as p.grad: eager steps notice both.
    def marked_grad(self, i: int, view: torch.Tensor) -> torch.Tensor:
        """``view`` (parameter ``i``'s gradient span) marked as aliasing the flat gradient buffer."""
        setattr(view, GRAD_MARK, self._grad_marks[i])
        return view

    def holds_grad(self, i: int, g: torch.Tensor) -> bool:
        """Whether ``g`` is a gradient view this group marked for parameter ``i`` (traced steps)."""
        return getattr(g, GRAD_MARK, None) == self._grad_marks[i]

    def m_view(self, i: int) -> torch.Tensor:
        """The first moment of parameter ``i``, flat."""
        return self._span(self.m, i)

    def m_scale_view(self, i: int) -> torch.Tensor:
        """The quantization scales of parameter ``i`` of an int8 group, flat, in storage order."""
        ends = self.scale_offsets[1:] + [len(self.m_scales)]
        return self.m_scales[self.scale_offsets[i] : ends[i]]

    def v_view(self, i: int) -> torch.Tensor:
        """The second-moment values of parameter ``i``, one per block, flat."""
        start = self.v_offsets[i]
        return self.v[start : start + self.layouts[i].num_blocks]

    def step_view(self, i: int) -> torch.Tensor:
        """The step counter of parameter ``i`` (0-dim view of ``steps``)."""
        return self.steps[i]

    # -- per step ----------------------------------------------------------------------------
    def inspect(self) -> Optional[GradCheck]:
        """Check every parameter and gradient without changing anything; None when a parameter's
        dtype or device is no longer the group's (``module.to()`` after the buffers were built:
        the optimizer then rebuilds them). Raises on sparse gradients and changed shapes."""
        params = self.params
        # Fast path, the usual step: every parameter and gradient still in its flat-buffer view,
        # in three comprehensions. A missing or sparse gradient raises in them and takes the full
        # pass below, which says what is wrong.
        try:
            if (
                [p.data_ptr() for p in params] == self._param_ptrs
                and [p.grad.data_ptr() for p in params] == self._grad_ptrs
                and [p.shape for p in params] == self._shapes
            ):
                return GradCheck(None, [], [])
        except (AttributeError, RuntimeError):
            pass
        active: List[bool] = []
        stale_params: List[int] = []
        stale_grads: List[int] = []
        strided, dtype, device = torch.strided, self.dtype, self.device
        # A parameter still in its flat-buffer view has not moved: only the others are looked at.
        for i, (p, shape, param_ptr, grad_ptr) in enumerate(zip(params, self._shapes, self._param_ptrs, self._grad_ptrs)):
            if p.data_ptr() != param_ptr:
                if p.dtype != dtype or p.device != device:
                    return None
                stale_params.append(i)
            if p.shape != shape:
                raise RuntimeError(
                    f"parameter '{self.layouts[i].name}' changed shape from "
                    f"{list(self.layouts[i].shape)} to {list(p.shape)} after the optimizer was "
                    "built; create a new optimizer for the new model"
                )
            g = p.grad
            if g is None:
                active.append(False)
                continue
            active.append(True)
            if g.layout != strided or g.data_ptr() != grad_ptr:
                check_grad(self.layouts[i].name, p, g)
                stale_grads.append(i)
        return GradCheck(None if all(active) else active, stale_params, stale_grads)

    def inspect_traced(self) -> GradCheck:
        """``inspect`` for a step traced by ``torch.compile``, which cannot read data pointers:
        gradients alias the flat buffer when they carry the mark of its views (see [Note:
        gradient view marks]); parameters are taken to alias it still (their dtype, device and
        shape are checked). Replacing ``p.data`` or ``p.grad.data`` by a same-shaped tensor after
        the buffers are built is noticed by eager steps only."""
        active: List[bool] = []
        stale_grads: List[int] = []
        for i, p in enumerate(self.params):
            if p.shape != self.layouts[i].shape or p.dtype != self.dtype or p.device != self.device:
                raise RuntimeError(
                    f"parameter '{self.layouts[i].name}' changed shape, dtype or device since the optimizer "
                    "built its buffers; run one optimizer step outside torch.compile to rebuild them"
                )
            g = p.grad
            active.append(g is not None)
            if g is not None and not self.holds_grad(i, g):
                stale_grads.append(i)
        return GradCheck(None if all(active) else active, [], stale_grads)

    def repair(self, check: GradCheck) -> None:
        """Copy parameters and gradients that stopped aliasing the flat buffers back in, and
        re-point them as views (one foreach copy each)."""
        self._copy_params_in(check.stale_params)
        self._copy_grads_in(check.stale_grads)
        if check.active is not None:
            # A parameter without a gradient this step is not updated; its stale flat gradient is
            # zeroed so that it adds nothing to max_grad_norm's global norm.
            idle = [self.grad_view(i) for i, on in enumerate(check.active) if not on]
            torch._foreach_zero_(idle)

    def _copy_params_in(self, indices: Iterable[int]) -> None:
        """Copy parameters ``indices`` into the flat buffer and re-point them as its views."""
        indices = list(indices)
        if indices:
            views = [self.param_view(i) for i in indices]
            torch._foreach_copy_(views, [self.params[i].data for i in indices])
            for i, view in zip(indices, views):
                self.params[i].data = view

    def _copy_grads_in(self, indices: List[int]) -> None:
        """Copy the gradients of parameters ``indices`` into the flat buffer and re-point them as
        fresh marked views (an old view may have been pointed elsewhere: ``p.grad.data = ...``)."""
        if indices:
            views = [self.grad_view(i) for i in indices]
            torch._foreach_copy_(views, [self.params[i].grad for i in indices])
            for i, view in zip(indices, views):
                self.grad_views[i] = self.params[i].grad = self.marked_grad(i, view)

    def zero_grad(self) -> None:
        """Zero every gradient: the flat buffer in one fill, plus any that stopped aliasing it.
        Gradients that are None stay None (such a parameter is not stepped)."""
        self.grad_buffer.zero_()
        detached = [
            p.grad for i, p in enumerate(self.params) if p.grad is not None and p.grad.data_ptr() != self._grad_ptrs[i]
        ]
        if detached:
            torch._foreach_zero_(detached)

    def set_hparams(self, table: torch.Tensor) -> None:
        """Upload the per-parameter hyperparameter table (a float64 CPU tensor, columns HP_LR to
        HP_EPS); no host-device sync. The optimizer calls it only when the values changed."""
        if torch.compiler.is_compiling():  # values are constants of the graph, guarded on
            self.hparams.copy_(table)
            return
        if self.hparams is None:
            self.hparams = self.upload(table)
        else:  # in place: a captured graph keeps reading this table
            self.hparams.copy_(self._pinned(table), non_blocking=True)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """A device copy of a small host tensor, with no host-device sync."""
        return self._pinned(host).to(self.device, non_blocking=True)

    def _pinned(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` in pinned memory on a CUDA group (what a non-blocking copy needs), kept alive
        when the copy is captured in a CUDA graph: each replay copies from it again. Not inside
        a compiled step, whose graph holds ``host`` as a constant (no pinning traced into it)."""
        if self.device.type != "cuda" or torch.compiler.is_compiling():
            return host
        host = host.pin_memory()
        if torch.cuda.is_current_stream_capturing():
            self._captured_uploads.append(host)
        return host

    def active_flags(self, active: List[bool], keep: bool) -> torch.Tensor:
        """``active`` as a bool tensor on the device, without a sync. ``keep``: cache one tensor
        per pattern for good (a captured CUDA graph keeps reading the one it captured)."""
        key = tuple(active)
        flags = self._active_flags.get(key)
        if flags is None:
            if torch.compiler.is_compiling():
                return torch.tensor(active, device=self.device)
            flags = self.upload(torch.tensor(active))
            if keep:
                self._active_flags[key] = flags
        return flags
