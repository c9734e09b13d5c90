"""The partition engine: parameter names -> Adam-mini blocks.

Adam-mini keeps one second-moment value per block. Which block a parameter element belongs to is
decided from the parameter's (lowercased) name, by substring match against name sets that users
may edit on the optimizer after construction. Rules are tried in ``RULE_ORDER``; the first match
wins; a name matching nothing gets one block for the whole tensor.

Where the official implementation (``adam-mini`` 1.1.1) crashes or silently mis-partitions, we do
better: row rules on 1-D tensors fall back to the whole-tensor block, tensors of more than two
dims use dim-0 slices, and a query/key tensor whose size is not a multiple of the head block is a
``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

# Rule names, in the order they are tried. "whole" is the fallback.
ADAM = "adam"
WQK = "wqk"
ROW_RULES = ("embd", "output", "wv", "attn_proj", "mlp")
WHOLE = "whole"
RULE_ORDER = (ADAM, WQK) + ROW_RULES
# Rules only ``AdamMini.for_model`` assigns: a fused query/key/value weight (sections of "wqk"
# and "wv" blocks) and one block per output neuron of any other linear layer.
QKV = "qkv"
NEURON = "neuron"

# The optimizer attribute holding each rule's name set, and its default (official 1.1.1).
NAME_SET_ATTRS = {
    ADAM: "adam_block_names",
    WQK: "wqk_names",
    "embd": "embd_names",
    "output": "output_names",
    "wv": "wv_names",
    "attn_proj": "attn_proj_names",
    "mlp": "mlp_names",
}
DEFAULT_NAMES = {
    ADAM: ("bias",),
    WQK: ("k_proj", "q_proj", "wq", "wk", "query", "key"),
    "embd": ("embed", "embd", "wte"),
    "output": ("lm_head", "output", "final_layer"),
    "wv": ("v_proj", "wv", "value"),
    "attn_proj": ("o_proj", "wo", "attn.proj"),
    "mlp": ("feed_forward", "linear", "mlp"),
}

# Substrings that force weight decay to 0 (official 1.1.1).
NO_DECAY_KEYS = ("norm", "ln", "bias")

NameRules = Tuple[Tuple[str, frozenset], ...]


def run_block_sizes(runs: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """The size of every block of ``(block_numel, num_blocks)`` runs, in order (int64, CPU)."""
    sizes = torch.tensor([n for n, _ in runs], dtype=torch.int64)
    return sizes.repeat_interleave(torch.tensor([c for _, c in runs], dtype=torch.int64))


@dataclass(frozen=True)
class Section:
    """``num_blocks`` consecutive blocks of ``block_numel`` elements each, under one rule."""

    rule: str
    block_numel: int
    num_blocks: int


def storage_shape(shape: Sequence[int], columns: bool) -> Tuple[int, ...]:
    """``shape`` as stored in the flat buffers: the last two dims swapped for column blocks."""
    shape = tuple(shape)
    return shape[:-2] + (shape[-1], shape[-2]) if columns else shape


def swap_columns(t: torch.Tensor, columns: bool) -> torch.Tensor:
    """A view of ``t`` with its last two dims swapped for column blocks (else ``t``): takes a
    parameter-shaped tensor to its storage shape, and back."""
    return t.transpose(-2, -1) if columns else t


@dataclass(frozen=True)
class BlockLayout:
    """How one parameter is cut into blocks, one ``v`` value each.

    [Note: block layouts]
    The blocks tile the parameter in its storage order, consecutively: ``sections`` in order, each
    ``num_blocks`` chunks of ``block_numel`` elements. The name rules always give one section
    (equal chunks of the row-major tensor, as official 1.1.1). ``AdamMini.for_model`` may give
    several (a fused QKV weight: query and key heads, then value neurons) and may set ``columns``:
    the parameter is stored with its last two dims swapped in the flat buffers (its storage order
    is that of ``param.transpose(-2, -1)``, ``param.t()`` for a matrix), so that blocks of columns
    (HF ``Conv1D`` weights are (in, out), fused MoE experts stored (experts, in, out): an output
    neuron is a column) are contiguous spans like any other block. Every consumer (flat buffers,
    backends, launch tables, checkpoints) sees only spans of the storage order."""

    name: str
    rule: str
    shape: Tuple[int, ...]
    sections: Tuple[Section, ...]
    columns: bool = False

    def __post_init__(self):
        covered = sum(s.block_numel * s.num_blocks for s in self.sections)
        if covered != self.numel:
            raise ValueError(f"layout of '{self.name}': sections cover {covered} elements, the parameter has {self.numel}")
        if self.columns and len(self.shape) < 2:
            raise ValueError(
                f"layout of '{self.name}': column blocks need a parameter of 2 or more dims, got shape {list(self.shape)}"
            )

    @classmethod
    def uniform(cls, name: str, rule: str, shape: Sequence[int], block_numel: int, num_blocks: int) -> "BlockLayout":
        """``num_blocks`` equal chunks of the row-major tensor (the name rules' layouts)."""
        return cls(name, rule, tuple(int(s) for s in shape), (Section(rule, block_numel, num_blocks),))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return sum(s.num_blocks for s in self.sections)

    @property
    def block_numel(self) -> Optional[int]:
        """The size shared by every block, or None when block sizes differ."""
        sizes = {s.block_numel for s in self.sections}
        return sizes.pop() if len(sizes) == 1 else None

    @property
    def storage_shape(self) -> Tuple[int, ...]:
        """The shape of the parameter as laid out in the flat buffers."""
        return storage_shape(self.shape, self.columns)

    @property
    def runs(self) -> Tuple[Tuple[int, int], ...]:
        """``(block_numel, num_blocks)`` of each section."""
        return tuple((s.block_numel, s.num_blocks) for s in self.sections)

    def block_sizes(self) -> torch.Tensor:
        """The size of every block, in storage order (int64, on the CPU)."""
        return run_block_sizes(self.runs)

    @property
    def state_kind(self) -> str:
        """Which state layout the parameter uses: official's adam, heads, rows or whole, or
        ``blocks`` (several sections or column blocks, which official cannot represent)."""
        if len(self.sections) != 1 or self.columns:
            return "blocks"
        if self.rule == ADAM:
            return "adam"
        if self.rule == WQK:
            return "heads"
        if self.rule in ROW_RULES + (NEURON,):
            return "rows"
        return "whole"


def default_weight_decay(name: str, weight_decay: float) -> float:
    """Official rule: no decay for names containing "norm", "ln" or "bias"."""
    return 0.0 if any(key in name for key in NO_DECAY_KEYS) else weight_decay


def snapshot_rules(owner) -> NameRules:
    """Read the (mutable) name sets off the optimizer, as an immutable, comparable value."""
    return tuple((rule, frozenset(getattr(owner, NAME_SET_ATTRS[rule]))) for rule in RULE_ORDER)


def classify(name: str, rules: NameRules) -> str:
    """The first rule whose name set has a key contained in ``name``; ``WHOLE`` if none."""
    for rule, keys in rules:
        if any(key in name for key in keys):
            return rule
    return WHOLE


def head_block_numel(dim: int, n_heads: int, head_dim: Optional[int]) -> int:
    """Elements per query/key head block: ``head_dim * dim``, by default ``dim * dim // n_heads``
    as official 1.1.1 does. Raises ``ValueError`` when that is not a whole number."""
    if head_dim is not None:
        return head_dim * dim
    if (dim * dim) % n_heads:
        raise ValueError(
            f"dim*dim ({dim}*{dim}) is not divisible by n_heads={n_heads}, so the query/key head "
            "block size is not a whole number; pass dim and n_heads of your model, or head_dim"
        )
    return dim * dim // n_heads


def layout_for(name: str, shape: Sequence[int], rule: str, head_numel: Optional[int]) -> BlockLayout:
    """The block layout of one parameter under ``rule``."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if rule == ADAM:
        return BlockLayout.uniform(name, rule, shape, 1, numel)
    if rule == WQK:
        if numel % head_numel:
            raise ValueError(
                f"parameter '{name}' (shape {list(shape)}, {numel} elements) is matched by the "
                f"query/key rule but its size is not a multiple of the head block of {head_numel} "
                "elements (head_dim * dim, head_dim defaulting to dim // n_heads); pass the right "
                "dim, n_heads and head_dim, or remove its key from optimizer.wqk_names"
            )
        return BlockLayout.uniform(name, rule, shape, head_numel, numel // head_numel)
    if rule in ROW_RULES and len(shape) >= 2:
        rows = shape[0]
        return BlockLayout.uniform(name, rule, shape, numel // rows if rows else 0, rows)
    # Whole tensor: names matching no rule, and row rules on 0-D/1-D tensors (official crashes).
    return BlockLayout.uniform(name, WHOLE, shape, numel, 1)


def build_partition(
    named_shapes: Iterable[Tuple[str, Sequence[int]]],
    rules: NameRules,
    dim: int,
    n_heads: int,
    head_dim: Optional[int],
) -> List[BlockLayout]:
    """Layouts for every (name, shape), in order. The head block size is only computed (and
    validated) when some parameter is matched by the query/key rule."""
    named_rules = [(name, shape, classify(name, rules)) for name, shape in named_shapes]
    head_numel = None
    if any(rule == WQK for _, _, rule in named_rules):
        head_numel = head_block_numel(dim, n_heads, head_dim)
    return [layout_for(name, shape, rule, head_numel) for name, shape, rule in named_rules]


def rule_counts(layouts: Iterable[BlockLayout]) -> Dict[str, int]:
    """Number of parameters per rule (for the partition log)."""
    counts = {rule: 0 for rule in RULE_ORDER + (QKV, NEURON, WHOLE)}
    for layout in layouts:
        counts[layout.rule] += 1
    return counts
