"""Block layouts read from a model's modules and config, for ``AdamMini.for_model``.

The name rules (``partition.py``, official 1.1.1's) see only parameter names, so they miss what a
name does not say: HF ``Conv1D`` weights are stored (in, out), so GPT-2's output neurons are
columns; fused query/key/value weights (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``,
``nn.MultiheadAttention.in_proj_weight``, and in an order of their own CodeGen's, GPTBigCode's,
Falcon's) hold heads and neurons side by side; Qwen3 and Gemma heads are ``config.head_dim``
wide, not hidden / heads; DeepSeek's latent attention holds heads in low-rank projections; fused
MoE experts (transformers 5) hold one matrix per expert in a 3-D weight, so dim-0 slices are
whole experts. Here the layout of each parameter comes from its module's type, its attribute
name inside its parent, the parent attention's class and the model's dimensions, after the
paper's principle: one block per head for queries and keys, one per output neuron for values,
attention outputs and MLPs (also of each expert in a MoE layer, and of its router), one per token
for embeddings and an untied output layer, one per element (Adam) for biases, one for each norm.

Parameters of modules not recognised here (custom ``nn.Parameter``s, unknown layer types) get no
layout from this module; the optimizer partitions them by name as usual.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .partition import ADAM, NEURON, QKV, WHOLE, WQK, BlockLayout, Section

# Attribute names of projections inside an attention module (lowercased, matched exactly).
QUERY_NAMES = frozenset({"q_proj", "query", "wq", "q", "q_attn", "wq_b"})  # wq_b: DeepSeek-V3.2's indexer
KEY_NAMES = frozenset({"k_proj", "key", "wk", "k"})
VALUE_NAMES = frozenset({"v_proj", "value", "wv", "v"})
# Fused projections whose outputs are [Q | K | V] (rows of a Linear, columns of a Conv1D), unless
# their attention module's class says otherwise (``ATTENTION_ORDERS``).
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
    # The head size the attention module holding a weight declares (``HEAD_SIZE_ATTRS``), where
    # no head_dim was given to for_model: what its forward reads (see ``_head_size``).
    attention_head_dim: Optional[int] = None


# Attributes in which attention modules keep their head size (HF: Llama-style and GPT-2
# ``head_dim``, BERT ``attention_head_size``, GPT-NeoX ``head_size``, T5 ``key_value_proj_dim``).
HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")


def _positive_int(value) -> Optional[int]:
    """``value`` where it is a positive int (a config's 0, list or float means: not this)."""
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _declared_head_size(attention: Optional[nn.Module]) -> Optional[int]:
    """The head size ``attention`` keeps in one of ``HEAD_SIZE_ATTRS``, or None."""
    for attr in HEAD_SIZE_ATTRS:
        size = _positive_int(getattr(attention, attr, None))
        if size is not None:
            return size
    return None


def _config_of(module: nn.Module) -> Tuple[Optional[object], Tuple[int, Optional[int]]]:
    """``module``'s transformers config to read dimensions from, and a key naming it: a composite
    config's text config; of a heterogeneous config (transformers 5's ``per_layer_config``:
    Gemma 4's full-attention layers have heads of their own size), the view of the module's own
    layer where it has a ``layer_idx``."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layer = getattr(module, "layer_idx", None)
    if getattr(config, "is_heterogeneous", False) is True and isinstance(layer, int):
        layers = config.per_layer_config
        if 0 <= layer < len(layers):  # (a module past the config's layers reads the global config)
            return layers[layer], (id(config), layer)
    return config, (id(config), None)


def config_dims(model: nn.Module, dim=None, n_heads=None, n_kv_heads=None, head_dim=None) -> AttentionDims:
    """The attention geometry of ``model``: the arguments where given, else its ``transformers``
    config's (``_config_of``: ``hidden_size``, ``num_attention_heads`` (or ``num_heads``: vision
    configs of transformers 4), ``num_key_value_heads``, ``head_dim``), else unknown: also an
    attribute that a heterogeneous config sets per layer, read outside a layer. ``n_kv_heads``
    defaults to ``n_heads``; an unknown ``head_dim`` is found per query/key weight
    (``_head_size``)."""
    config, _ = _config_of(model)
    heterogeneous = getattr(config, "is_heterogeneous", False) is True
    per_layer = getattr(config, "per_layer_attributes", None) if heterogeneous else None

    def from_config(*keys):
        for key in keys:
            found = _positive_int(getattr(config, key, None)) if key not in (per_layer or ()) else None
            if found is not None:
                return found
        return None

    dim = dim if dim is not None else from_config("hidden_size")
    n_heads = n_heads if n_heads is not None else from_config("num_attention_heads", "num_heads")
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
    """The head size of a query/key weight: the one its attention module declares where the
    weight's outputs fit it (``fits(head_size)``: its forward's number, e.g. T5's ``d_kv``, which
    its config may call otherwise), else the model's ``head_dim`` where given or in the config,
    else the first of hidden / n_heads (the config's width) and in_features / n_heads (the
    weight's own input width: a sub-model whose config's hidden size is not its width, Qwen2-VL's
    vision tower) that is whole and that the outputs fit."""
    if dims.attention_head_dim is not None and fits(dims.attention_head_dim):
        return dims.attention_head_dim
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
    """Query or key outputs: one block per head (the number of heads is not needed where the
    attention module declares a head size that the outputs fit)."""
    what = "query/key weight"
    declared = dims.attention_head_dim
    if declared is None or out_features % declared:
        _need_heads(name, dims, what)
    head_dim = _head_size(name, what, in_features, dims, lambda size: out_features % size == 0)
    if out_features % head_dim:
        raise ValueError(
            f"AdamMini.for_model: query/key weight '{name}' has {out_features} output neurons, not a "
            f"multiple of head_dim={head_dim}; pass the model's head_dim"
        )
    return (Section(WQK, head_dim * in_features, out_features // head_dim),)


# A run of a fused projection's outputs: (kind, heads, head size). Kinds "q" and "k" are one block
# per head; "v" and "latent" (multi-head latent attention's compressed keys and values) one block
# per output neuron.
Run = Tuple[str, int, int]


def _blocked(n_q: int, n_kv: int, head_dim: int) -> List[Run]:
    return [("q", n_q, head_dim), ("k", n_kv, head_dim), ("v", n_kv, head_dim)]


def _grouped(n_heads: int, n_kv: int, head_dim: int) -> List[Run]:
    """Per kv head: its group of query heads, its key, its value."""
    return [("q", n_heads // n_kv, head_dim), ("k", 1, head_dim), ("v", 1, head_dim)] * n_kv


def _per_head(n_heads: int, head_dim: int) -> List[Run]:
    """(heads, 3, head_dim): grouped with a kv head per query head."""
    return _grouped(n_heads, n_heads, head_dim)


def _run_sections(runs: Sequence[Run], in_features: int) -> Tuple[Section, ...]:
    sections = []
    for kind, heads, size in runs:
        if not heads:
            continue
        if kind in ("q", "k"):
            sections.append(Section(WQK, size * in_features, heads))
        else:
            sections.append(Section("wv" if kind == "v" else NEURON, in_features, heads * size))
    return _merged(sections)


def _fused_blocked(name: str, out_features: int, in_features: int, dims: AttentionDims, cross: bool) -> List[Run]:
    """Outputs [Q | K | V] ([K | V] in a cross-attention)."""
    what = "fused query/key/value weight"
    _need_heads(name, dims, what)
    n_q = 0 if cross else dims.n_heads
    heads = n_q + 2 * dims.n_kv_heads
    head_dim = _head_size(name, what, in_features, dims, lambda size: out_features == heads * size)
    if out_features != heads * head_dim:
        raise ValueError(
            f"AdamMini.for_model: {what} '{name}' has {out_features} outputs; "
            f"expected {heads * head_dim} (n_heads={dims.n_heads}, n_kv_heads={dims.n_kv_heads}, "
            f"head_dim={head_dim}); pass the model's dimensions"
        )
    return _blocked(n_q, dims.n_kv_heads, head_dim)


def _fused_per_head(name: str, out_features: int, in_features: int, dims: AttentionDims) -> List[Run]:
    """Outputs interleaved per head, (heads, 3, head_dim)."""
    what = "fused query/key/value weight"
    _need_heads(name, dims, what)
    head_dim = _head_size(name, what, in_features, dims, lambda size: out_features == 3 * dims.n_heads * size)
    if out_features != 3 * dims.n_heads * head_dim:
        raise ValueError(
            f"AdamMini.for_model: {what} '{name}' has {out_features} outputs; "
            f"expected 3 * n_heads * head_dim = {3 * dims.n_heads * head_dim}"
        )
    return _per_head(dims.n_heads, head_dim)


# [Note: attention layouts by class]
# How a fused projection orders its outputs is decided by its attention module's forward, which a
# name does not tell: ``c_attn`` is [Q | K | V] in GPT-2 but (heads, 3, head_dim) in GPTBigCode
# without multi-query; CodeGen's ``qkv_proj`` is four model-parallel groups of [Q | V | K];
# Falcon's ``query_key_value`` is one of three orders, by its config; InternLM2's ``wqkv`` is
# grouped per kv head like Falcon's new architecture; MiniMax's lightning attention interleaves
# ``qkv_proj`` per head. For the attention classes in ``ATTENTION_ORDERS`` (matched along the
# class's MRO, so subclasses count) the order of that projection is built from the module's own
# attributes, the numbers its forward reads. Two kinds are told by their attributes instead of a
# class name. Multi-head latent attention (DeepSeek-V2/V3 and the models built on it:
# ``MLA_ATTRS``) has no fused Q/K/V weight but heads inside its low-rank projections: the query
# (``q_proj``, or ``q_b_proj`` after the low-rank ``q_a_proj``) is (heads, qk_head_dim), its
# ``qk_head_dim`` qk_nope + qk_rope; ``kv_b_proj`` is (heads, qk_nope + v): per head a key block
# and v_head_dim value neurons; ``kv_a_proj_with_mqa`` is [kv_lora_rank latent neurons | one rope
# key head shared by all heads]. ChatGLM's multi-query ``query_key_value`` (``CHATGLM_ATTRS``) is
# [Q | K | V] with its kv groups. Other fused weights follow ``FUSED_BLOCKED_NAMES`` /
# ``FUSED_PER_HEAD_NAMES``.

def _attrs(attention: nn.Module, *names: str) -> list:
    """The attributes ``names`` of ``attention``; a clear error where one is missing."""
    missing = [n for n in names if getattr(attention, n, None) is None]
    if missing:
        raise ValueError(
            f"AdamMini.for_model: {type(attention).__name__} has no {missing}, which its fused projection's "
            "layout is read from (see [Note: attention layouts by class]); this transformers version is not supported"
        )
    return [getattr(attention, n) for n in names]


def _codegen_order(attention: nn.Module) -> List[Run]:
    heads, head_dim = _attrs(attention, "num_attention_heads", "head_dim")
    mp = int(getattr(attention, "mp_num", 4))  # a constant of CodeGen's forward before transformers 5
    return [("q", heads // mp, head_dim), ("v", heads // mp, head_dim), ("k", heads // mp, head_dim)] * mp


def _gpt_bigcode_order(attention: nn.Module) -> Optional[List[Run]]:
    if getattr(attention, "is_cross_attention", False):  # [K | V]: the name rule's cross-attention order
        return None
    heads, head_dim, multi_query = _attrs(attention, "num_heads", "head_dim", "multi_query")
    return _blocked(heads, 1, head_dim) if multi_query else _per_head(heads, head_dim)


def _falcon_order(attention: nn.Module) -> List[Run]:
    heads, kv_heads, head_dim, grouped, multi_query = _attrs(
        attention, "num_heads", "num_kv_heads", "head_dim", "new_decoder_architecture", "multi_query")
    if grouped:
        return _grouped(heads, kv_heads, head_dim)
    if multi_query:
        return _blocked(heads, 1, head_dim)
    return _per_head(heads, head_dim)


def _lightning_order(attention: nn.Module) -> List[Run]:
    heads, head_dim = _attrs(attention, "num_attention_heads", "head_dim")
    return _per_head(heads, head_dim)


def _internlm2_order(attention: nn.Module) -> List[Run]:
    return _grouped(*_attrs(attention, "num_heads", "num_key_value_heads", "head_dim"))


# attention class name -> (attribute name of its fused projection, its output order)
ATTENTION_ORDERS = {
    "CodeGenAttention": ("qkv_proj", _codegen_order),
    "GPTBigCodeAttention": ("c_attn", _gpt_bigcode_order),
    "FalconAttention": ("query_key_value", _falcon_order),
    "MiniMaxLightningAttention": ("qkv_proj", _lightning_order),
    # remote code (trust_remote_code): InternLM2/2.5 and models built on them (InternVL)
    "InternLM2Attention": ("wqkv", _internlm2_order),
}
MLA_ATTRS = ("num_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")
# ChatGLM2/3's attention (remote code; its class is plainly ``SelfAttention``): with
# ``multi_query_attention`` its ``query_key_value`` is [Q | K | V] with these kv groups (without,
# (heads, 3, head_dim): the name rule's).
CHATGLM_ATTRS = ("num_attention_heads_per_partition", "num_multi_query_groups_per_partition",
                 "hidden_size_per_attention_head")


def _mla_order(attention: nn.Module, attr: str) -> Optional[List[Run]]:
    heads, nope, rope, v, rank = [int(getattr(attention, a)) for a in MLA_ATTRS]
    if attr in ("q_proj", "q_b_proj"):  # LongCat-Flash's qk_head_dim is a config value of its own
        return [("q", heads, _positive_int(getattr(attention, "qk_head_dim", None)) or nope + rope)]
    if attr == "kv_b_proj":
        return [("k", 1, nope), ("v", 1, v)] * heads
    if attr == "kv_a_proj_with_mqa":
        return [("latent", rank, 1), ("k", 1, rope)]
    return None


def _attention_order(attention: Optional[nn.Module], attr: str) -> Optional[List[Run]]:
    """The output runs of projection ``attr`` of ``attention`` where the attention's class fixes
    them (see [Note: attention layouts by class]), else None."""
    if attention is None:
        return None
    for cls in type(attention).__mro__:
        fused, order = ATTENTION_ORDERS.get(cls.__name__, (None, None))
        if fused == attr:
            return order(attention)
    if all(isinstance(getattr(attention, a, None), int) for a in MLA_ATTRS):
        return _mla_order(attention, attr)
    if attr == "query_key_value" and getattr(attention, "multi_query_attention", None) is True:
        return _blocked(*_attrs(attention, *CHATGLM_ATTRS))
    return None


def _projection(name: str, attr: str, out_features: int, in_features: int, dims: AttentionDims, is_output: bool,
                cross: bool = False, attention: Optional[nn.Module] = None):
    """(rule, sections) of a linear map with ``out_features`` outputs, by its attention module's
    class (``attention``: the module holding it) or else its attribute name; ``cross``: it sits
    in a cross-attention (a fused weight holds K and V only)."""
    if is_output:
        return "output", (Section("output", in_features, out_features),)
    runs = _attention_order(attention, attr)
    if runs is not None:
        expected = sum(heads * size for _, heads, size in runs)
        if out_features != expected:
            raise ValueError(
                f"AdamMini.for_model: '{name}' has {out_features} outputs, but its {type(attention).__name__}'s "
                f"attributes make {expected}: {runs}"
            )
        sections = _run_sections(runs, in_features)
        return (WQK if {s.rule for s in sections} == {WQK} else QKV), sections
    if attr in QUERY_NAMES or attr in KEY_NAMES:
        return WQK, _heads(name, out_features, in_features, dims)
    if attr in VALUE_NAMES:
        return "wv", (Section("wv", in_features, out_features),)
    if attr in FUSED_BLOCKED_NAMES:
        return QKV, _run_sections(_fused_blocked(name, out_features, in_features, dims, cross), in_features)
    if attr in FUSED_PER_HEAD_NAMES:
        return QKV, _run_sections(_fused_per_head(name, out_features, in_features, dims), in_features)
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
            is_output: bool, cross: bool, parent: Optional[nn.Module]) -> Optional[BlockLayout]:
    """The layout of parameter ``pname`` of ``module`` (whose attribute name in ``parent`` is
    ``attr``), or None when the module type is not one this file knows."""
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
        rule, sections = _projection(name, attr, shape[0], shape[1], dims, is_output, cross, parent)
        return BlockLayout(name, rule, shape, sections)
    # Conv1D, weight (in, out): an output neuron is a column; stored transposed (see partition.py).
    rule, sections = _projection(name, attr, shape[1], shape[0], dims, is_output, cross, parent)
    return BlockLayout(name, rule, shape, sections, columns=True)


def _own_dims(module: nn.Module, given: AttentionDims,
              cache: Dict[Tuple[int, Optional[int]], Optional[AttentionDims]]) -> Optional[AttentionDims]:
    """The dimensions of ``module``'s own config (``given``'s fields where set), or None when it
    has no config or its config names neither a hidden size nor heads. Cached per config (and
    layer, see ``_config_of``)."""
    config, key = _config_of(module)
    if config is None:
        return None
    if key not in cache:
        own = config_dims(module)
        named = own.hidden is not None or own.n_heads is not None
        cache[key] = config_dims(module, given.hidden, given.n_heads, given.n_kv_heads, given.head_dim) if named else None
    return cache[key]


def model_layouts(model: nn.Module, given: AttentionDims = AttentionDims()) -> Dict[str, BlockLayout]:
    """Layouts of the parameters of ``model`` that belong to modules of known types, keyed by
    their (lowercased) names in ``model.named_parameters()``. A tied weight takes the layout of
    the first module that holds it.

    Each module's dimensions are ``given``'s fields where set, the others those of the config of
    the nearest module at or above it whose config names any (``config_dims``): the sub-models of
    a multimodal model (a vision tower, a language model) each have their own heads. Unless
    ``given`` has a head_dim, a weight's head size may also come from its attention module
    (``AttentionDims.attention_head_dim``)."""
    names = {id(p): n.lower() for n, p in model.named_parameters()}
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    modules = dict(model.named_modules())
    by_config: Dict[Tuple[int, Optional[int]], Optional[AttentionDims]] = {}  # see _own_dims
    dims_at = {"": config_dims(model, given.hidden, given.n_heads, given.n_kv_heads, given.head_dim)}
    layouts: Dict[str, BlockLayout] = {}
    for module_name, module in modules.items():  # parents before children
        parent_name, _, attr = module_name.rpartition(".")
        if module_name:
            dims_at[module_name] = _own_dims(module, given, by_config) or dims_at[parent_name]
        dims = dims_at[module_name]
        # GPT-2 cross-attention marks itself; its c_attn holds [K | V] (Q is q_attn).
        parent = modules.get(parent_name) if module_name else None
        cross = bool(getattr(parent, "is_cross_attention", False))
        if given.head_dim is None:
            dims = replace(dims, attention_head_dim=_declared_head_size(parent))
        for pname, p in module.named_parameters(recurse=False):
            name = names.get(id(p))
            if name is None or name in layouts:
                continue
            layout = _layout(module, attr.lower(), pname, name, p, dims, module is output, cross, parent)
            if layout is not None:
                layouts[name] = layout
    return layouts
