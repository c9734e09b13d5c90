"""Block layouts read from a model's modules and config, for ``AdamMini.for_model``.

The name rules (``partition.py``, official 1.1.1's) see only parameter names, so they miss what a
name does not say: HF ``Conv1D`` weights are stored (in, out), so GPT-2's output neurons are
columns; fused query/key/value weights (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``,
``nn.MultiheadAttention.in_proj_weight``) hold heads and neurons side by side; Qwen3 and Gemma
heads are ``config.head_dim`` wide, not hidden / heads; fused MoE experts (transformers 5) hold
one matrix per expert in a 3-D weight, so dim-0 slices are whole experts. Here the layout of
each parameter comes from its module's type, its attribute name inside its parent and the
model's dimensions, after the paper's principle: one block per head for queries and keys, one
per output neuron for values, attention outputs and MLPs (also of each expert in a MoE layer, and
of its router), one per token for embeddings and an untied output layer, one per element (Adam)
for biases, one for each norm.

Parameters of modules not recognised here (custom ``nn.Parameter``s, unknown layer types) get no
layout from this module; the optimizer partitions them by name as usual.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .partition import ADAM, NEURON, QKV, WHOLE, WQK, BlockLayout, Section

# Attribute names of projections inside an attention module (lowercased, matched exactly).
QUERY_NAMES = frozenset({"q_proj", "query", "wq", "q", "q_attn"})
KEY_NAMES = frozenset({"k_proj", "key", "wk", "k"})
VALUE_NAMES = frozenset({"v_proj", "value", "wv", "v"})
# Fused projections whose outputs are [Q | K | V] (rows of a Linear, columns of a Conv1D).
FUSED_BLOCKED_NAMES = frozenset({"c_attn", "qkv_proj", "wqkv", "qkv"})
# Fused projections whose outputs are interleaved per head, (heads, 3, head_dim) (GPT-NeoX, BLOOM).
FUSED_PER_HEAD_NAMES = frozenset({"query_key_value"})
# transformers' fused MoE expert modules that store (experts, in, out) without saying so (no
# ``is_transposed``: Llama 4's, and GPT-OSS's before transformers 5).
TRANSPOSED_EXPERTS = frozenset({"Llama4TextExperts", "GptOssExperts"})


@dataclass(frozen=True)
class AttentionDims:
    """Head geometry of a model's attention layers (any field may be unknown: None)."""

    hidden: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None


def config_dims(model: nn.Module, dim=None, n_heads=None, n_kv_heads=None, head_dim=None) -> AttentionDims:
    """The attention geometry of ``model``: the arguments where given, else its ``transformers``
    config (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``), else
    unknown. ``n_kv_heads`` defaults to ``n_heads``; an unknown ``head_dim`` is found per query/key
    weight (``_head_size``)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def from_config(*keys):
        for key in keys:
            value = getattr(config, key, None) if config is not None else None
            if value is not None:
                return int(value)
        return None

    dim = dim if dim is not None else from_config("hidden_size")
    n_heads = n_heads if n_heads is not None else from_config("num_attention_heads")
    n_kv_heads = n_kv_heads if n_kv_heads is not None else from_config("num_key_value_heads") or n_heads
    head_dim = head_dim if head_dim is not None else from_config("head_dim")
    return AttentionDims(dim, n_heads, n_kv_heads, head_dim)


def _merged(sections: Sequence[Section]) -> Tuple[Section, ...]:
    """Adjacent sections with the same rule and block size as one."""
    out: List[Section] = []
    for s in sections:
        if out and (out[-1].rule, out[-1].block_numel) == (s.rule, s.block_numel):
            out[-1] = Section(s.rule, s.block_numel, out[-1].num_blocks + s.num_blocks)
        else:
            out.append(s)
    return tuple(out)


def _need_heads(name: str, dims: AttentionDims, what: str) -> None:
    if dims.n_heads is None:
        raise ValueError(
            f"AdamMini.for_model: '{name}' is a {what} but its number of heads is unknown (the model has no "
            "transformers config with num_attention_heads); pass n_heads= (and n_kv_heads=, head_dim= where "
            "they differ from n_heads and hidden / n_heads)"
        )


def _head_size(name: str, what: str, in_features: int, dims: AttentionDims, fits) -> int:
    """The head size of a query/key weight: the model's ``head_dim`` where it names one, else the
    first of hidden / n_heads (the config's width) and in_features / n_heads (the weight's own
    input width: a sub-model whose config's hidden size is not its width, Qwen2-VL's vision
    tower) that is whole and that the weight's outputs fit (``fits(head_size)``)."""
    if dims.head_dim is not None:
        return dims.head_dim
    for width in (dims.hidden, in_features):
        if width is not None and width % dims.n_heads == 0 and fits(width // dims.n_heads):
            return width // dims.n_heads
    raise ValueError(
        f"AdamMini.for_model: the outputs of {what} '{name}' fit no head size of hidden / n_heads or "
        f"in_features / n_heads (hidden={dims.hidden}, in_features={in_features}, n_heads={dims.n_heads}, "
        f"n_kv_heads={dims.n_kv_heads}); pass the model's head_dim (and n_kv_heads)"
    )


def _heads(name: str, out_features: int, in_features: int, dims: AttentionDims) -> Tuple[Section, ...]:
    """Query or key outputs: one block per head."""
    what = "query/key weight"
    _need_heads(name, dims, what)
    head_dim = _head_size(name, what, in_features, dims, lambda size: out_features % size == 0)
    if out_features % head_dim:
        raise ValueError(
            f"AdamMini.for_model: query/key weight '{name}' has {out_features} output neurons, not a "
            f"multiple of head_dim={head_dim}; pass the model's head_dim"
        )
    return (Section(WQK, head_dim * in_features, out_features // head_dim),)


def _fused_blocked(name: str, out_features: int, in_features: int, dims: AttentionDims,
                   cross: bool) -> Tuple[Section, ...]:
    """Outputs [Q | K | V] ([K | V] in a cross-attention): heads for Q and K, neurons for V."""
    what = "fused query/key/value weight"
    _need_heads(name, dims, what)
    heads = (0 if cross else dims.n_heads) + 2 * dims.n_kv_heads
    head_dim = _head_size(name, what, in_features, dims, lambda size: out_features == heads * size)
    q_out, kv_out = (0 if cross else dims.n_heads) * head_dim, dims.n_kv_heads * head_dim
    if out_features != q_out + 2 * kv_out:
        raise ValueError(
            f"AdamMini.for_model: {what} '{name}' has {out_features} outputs; "
            f"expected {q_out + 2 * kv_out} (n_heads={dims.n_heads}, n_kv_heads={dims.n_kv_heads}, "
            f"head_dim={head_dim}); pass the model's dimensions"
        )
    qk_heads = (q_out + kv_out) // head_dim
    return _merged([Section(WQK, head_dim * in_features, qk_heads), Section("wv", in_features, kv_out)])


def _fused_per_head(name: str, out_features: int, in_features: int, dims: AttentionDims) -> Tuple[Section, ...]:
    """Outputs interleaved per head, (heads, 3, head_dim): per head a Q and a K block, then V neurons."""
    what = "fused query/key/value weight"
    _need_heads(name, dims, what)
    head_dim = _head_size(name, what, in_features, dims, lambda size: out_features == 3 * dims.n_heads * size)
    if out_features != 3 * dims.n_heads * head_dim:
        raise ValueError(
            f"AdamMini.for_model: {what} '{name}' has {out_features} outputs; "
            f"expected 3 * n_heads * head_dim = {3 * dims.n_heads * head_dim}"
        )
    head = [Section(WQK, head_dim * in_features, 2), Section("wv", in_features, head_dim)]
    return tuple(head * dims.n_heads)


def _projection(name: str, attr: str, out_features: int, in_features: int, dims: AttentionDims, is_output: bool,
                cross: bool = False):
    """(rule, sections) of a linear map with ``out_features`` outputs, by its attribute name;
    ``cross``: it sits in a cross-attention (a fused weight holds K and V only)."""
    if is_output:
        return "output", (Section("output", in_features, out_features),)
    if attr in QUERY_NAMES or attr in KEY_NAMES:
        return WQK, _heads(name, out_features, in_features, dims)
    if attr in VALUE_NAMES:
        return "wv", (Section("wv", in_features, out_features),)
    if attr in FUSED_BLOCKED_NAMES:
        return QKV, _fused_blocked(name, out_features, in_features, dims, cross)
    if attr in FUSED_PER_HEAD_NAMES:
        return QKV, _fused_per_head(name, out_features, in_features, dims)
    return NEURON, (Section(NEURON, in_features, out_features),)


def _conv1d_type():
    """transformers' ``Conv1D`` when transformers is loaded (a model using it imported it)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _is_norm(module: nn.Module) -> bool:
    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
    return isinstance(module, norms) or "norm" in type(module).__name__.lower()


def _experts_transposed(module: nn.Module) -> Optional[bool]:
    """For transformers' fused MoE experts (one 3-D weight per projection, a matrix per expert),
    how they store it, as they declare it (``is_transposed``) or as ``TRANSPOSED_EXPERTS`` knows:
    False for (experts, out, in), read as ``F.linear`` reads a weight (Mixtral, Qwen-MoE,
    DeepSeek), True for (experts, in, out) (GPT-OSS, Llama 4). None for other modules."""
    if not any(p.dim() == 3 for p in module.parameters(recurse=False)):
        return None
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    return True if any(c.__name__ in TRANSPOSED_EXPERTS for c in type(module).__mro__) else None


def _is_router(module: nn.Module) -> bool:
    """A MoE router (transformers' ``...TopKRouter`` modules: an (experts, hidden) weight read as
    ``F.linear`` reads one, possibly a bias)."""
    return type(module).__name__.lower().endswith("router")


def _expert_layout(name: str, p: torch.Tensor, transposed: bool) -> BlockLayout:
    """One block per output neuron of each expert: rows of (experts * out, in), or for
    (experts, in, out) storage the columns of each expert's matrix (stored swapped)."""
    experts, a, b = p.shape
    if transposed:
        return BlockLayout(name, NEURON, tuple(p.shape), (Section(NEURON, a, experts * b),), columns=True)
    return BlockLayout.uniform(name, NEURON, p.shape, b, experts * a)


def _layout(module: nn.Module, attr: str, pname: str, name: str, p: torch.Tensor, dims: AttentionDims,
            is_output: bool, cross: bool) -> Optional[BlockLayout]:
    """The layout of parameter ``pname`` of ``module`` (whose attribute name is ``attr``), or
    None when the module type is not one this file knows."""
    shape = tuple(p.shape)
    conv1d = _conv1d_type()
    experts = _experts_transposed(module)
    if experts is not None or _is_router(module):
        if "bias" in pname:
            return BlockLayout.uniform(name, ADAM, shape, 1, p.numel())
        if experts is not None:
            return _expert_layout(name, p, experts) if p.dim() == 3 else None
        if p.dim() == 2 and shape[1] == dims.hidden:  # one block per expert's logit
            return BlockLayout.uniform(name, NEURON, shape, shape[1], shape[0])
        return None
    known = isinstance(module, (nn.Linear, nn.Embedding, nn.MultiheadAttention)) or _is_norm(module)
    known = known or (conv1d is not None and isinstance(module, conv1d))
    if not known:
        return None
    if "bias" in pname:
        return BlockLayout.uniform(name, ADAM, shape, 1, p.numel())
    if _is_norm(module) or p.dim() != 2:
        return BlockLayout.uniform(name, WHOLE, shape, p.numel(), 1)
    if isinstance(module, nn.Embedding):
        rule = "output" if is_output else "embd"
        return BlockLayout.uniform(name, rule, shape, shape[1], shape[0])
    if isinstance(module, nn.MultiheadAttention):
        mha = AttentionDims(module.embed_dim, module.num_heads, module.num_heads, module.head_dim)
        attr = {"in_proj_weight": "qkv", "q_proj_weight": "q", "k_proj_weight": "k", "v_proj_weight": "v"}[pname]
        rule, sections = _projection(name, attr, shape[0], shape[1], mha, False)
        return BlockLayout(name, rule, shape, sections)
    if isinstance(module, nn.Linear):  # weight (out, in): an output neuron is a row
        rule, sections = _projection(name, attr, shape[0], shape[1], dims, is_output, cross)
        return BlockLayout(name, rule, shape, sections)
    # Conv1D, weight (in, out): an output neuron is a column; stored transposed (see partition.py).
    rule, sections = _projection(name, attr, shape[1], shape[0], dims, is_output, cross)
    return BlockLayout(name, rule, shape, sections, columns=True)


def _own_dims(module: nn.Module, given: AttentionDims, cache: Dict[int, Optional[AttentionDims]]) -> Optional[AttentionDims]:
    """The dimensions of ``module``'s own config (``given``'s fields where set), or None when it
    has no config or its config names neither a hidden size nor heads. Cached per config."""
    config = getattr(module, "config", None)
    if config is None:
        return None
    if id(config) not in cache:
        own = config_dims(module)
        named = own.hidden is not None or own.n_heads is not None
        cache[id(config)] = config_dims(module, given.hidden, given.n_heads, given.n_kv_heads, given.head_dim) if named else None
    return cache[id(config)]


def model_layouts(model: nn.Module, given: AttentionDims = AttentionDims()) -> Dict[str, BlockLayout]:
    """Layouts of the parameters of ``model`` that belong to modules of known types, keyed by
    their (lowercased) names in ``model.named_parameters()``. A tied weight takes the layout of
    the first module that holds it.

    Each module's dimensions are ``given``'s fields where set, the others those of the config of
    the nearest module at or above it whose config names any (``config_dims``): the sub-models of
    a multimodal model (a vision tower, a language model) each have their own heads."""
    names = {id(p): n.lower() for n, p in model.named_parameters()}
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    modules = dict(model.named_modules())
    by_config: Dict[int, Optional[AttentionDims]] = {}  # id(config) -> its dimensions, None if it names none
    dims_at = {"": config_dims(model, given.hidden, given.n_heads, given.n_kv_heads, given.head_dim)}
    layouts: Dict[str, BlockLayout] = {}
    for module_name, module in modules.items():  # parents before children
        parent_name, _, attr = module_name.rpartition(".")
        if module_name:
            dims_at[module_name] = _own_dims(module, given, by_config) or dims_at[parent_name]
        dims = dims_at[module_name]
        # GPT-2 cross-attention marks itself; its c_attn holds [K | V] (Q is q_attn).
        cross = bool(getattr(modules.get(parent_name), "is_cross_attention", False))
        for pname, p in module.named_parameters(recurse=False):
            name = names.get(id(p))
            if name is None or name in layouts:
                continue
            layout = _layout(module, attr.lower(), pname, name, p, dims, module is output, cross)
            if layout is not None:
                layouts[name] = layout
    return layouts
