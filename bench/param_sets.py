"""Parameter sets of real models, as (name, shape) lists: no model is instantiated.

Names follow the Hugging Face module trees (``LlamaForCausalLM``, ``GPT2LMHeadModel``) because
the Adam-mini partition is chosen from names, so a set with the right shapes but other names
would benchmark another partition. Each set also carries the ``dim`` / ``n_heads`` /
``n_kv_heads`` that a user would pass to the optimizer.

Sets (``SETS``), the three of SPEC section 5, each with a tiny variant for ``--smoke``:

* ``llama-1.1b-fp32``, ``llama-1.1b-bf16``: TinyLlama-1.1B shapes (dim 2048, 22 layers, 32
  heads, 4 kv heads, ffn 5632, vocab 32000, untied ``lm_head``), 1,100,048,384 parameters.
* ``gpt2-124m-fp32``: HF GPT-2 small (``transformer.h.N.attn.c_attn.weight`` ..., Conv1D layout
  [in, out], ``lm_head`` tied to ``wte`` so not a separate parameter), 124,439,808 parameters.

``sweep_configs`` gives Llama-style shapes from ~1M to ~1B parameters for the size plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    vocab: int


@dataclass(frozen=True)
class GPT2Config:
    dim: int
    n_layers: int
    n_heads: int
    vocab: int
    n_positions: int


@dataclass
class ParamSet:
    """One benchmark set: named shapes, storage dtype name and the optimizer's model arguments."""

    key: str  # canonical name, used by --sets and in the results
    title: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    shapes: List[Tuple[str, Shape]]
    model_args: Dict[str, int]  # dim, n_heads, n_kv_heads for AdamMini / official Adam_mini
    description: str = ""
    smoke: bool = False
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)


def llama_shapes(c: LlamaConfig) -> List[Tuple[str, Shape]]:
    """HF ``LlamaForCausalLM.named_parameters()`` shapes, in module order, ``lm_head`` untied."""
    head_dim = c.dim // c.n_heads
    kv = c.n_kv_heads * head_dim
    out: List[Tuple[str, Shape]] = [("model.embed_tokens.weight", (c.vocab, c.dim))]
    for i in range(c.n_layers):
        pre = f"model.layers.{i}."
        out += [
            (pre + "self_attn.q_proj.weight", (c.dim, c.dim)),
            (pre + "self_attn.k_proj.weight", (kv, c.dim)),
            (pre + "self_attn.v_proj.weight", (kv, c.dim)),
            (pre + "self_attn.o_proj.weight", (c.dim, c.dim)),
            (pre + "mlp.gate_proj.weight", (c.ffn, c.dim)),
            (pre + "mlp.up_proj.weight", (c.ffn, c.dim)),
            (pre + "mlp.down_proj.weight", (c.dim, c.ffn)),
            (pre + "input_layernorm.weight", (c.dim,)),
            (pre + "post_attention_layernorm.weight", (c.dim,)),
        ]
    out += [("model.norm.weight", (c.dim,)), ("lm_head.weight", (c.vocab, c.dim))]
    return out


def gpt2_shapes(c: GPT2Config) -> List[Tuple[str, Shape]]:
    """HF ``GPT2LMHeadModel.named_parameters()`` shapes (Conv1D weights are [in, out]); the tied
    ``lm_head.weight`` is the same tensor as ``wte`` and is not listed again."""
    d = c.dim
    out: List[Tuple[str, Shape]] = [("transformer.wte.weight", (c.vocab, d)), ("transformer.wpe.weight", (c.n_positions, d))]
    for i in range(c.n_layers):
        pre = f"transformer.h.{i}."
        out += [
            (pre + "ln_1.weight", (d,)),
            (pre + "ln_1.bias", (d,)),
            (pre + "attn.c_attn.weight", (d, 3 * d)),
            (pre + "attn.c_attn.bias", (3 * d,)),
            (pre + "attn.c_proj.weight", (d, d)),
            (pre + "attn.c_proj.bias", (d,)),
            (pre + "ln_2.weight", (d,)),
            (pre + "ln_2.bias", (d,)),
            (pre + "mlp.c_fc.weight", (d, 4 * d)),
            (pre + "mlp.c_fc.bias", (4 * d,)),
            (pre + "mlp.c_proj.weight", (4 * d, d)),
            (pre + "mlp.c_proj.bias", (d,)),
        ]
    out += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    return out


LLAMA_1B = LlamaConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn=5632, vocab=32000)
GPT2_SMALL = GPT2Config(dim=768, n_layers=12, n_heads=12, vocab=50257, n_positions=1024)
# Tiny variants for --smoke: same module trees and partition rules, a few thousand times smaller.
LLAMA_TINY = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=172, vocab=512)
GPT2_TINY = GPT2Config(dim=64, n_layers=2, n_heads=4, vocab=512, n_positions=128)


def _llama_set(key: str, title: str, c: LlamaConfig, dtype: str, smoke: bool) -> ParamSet:
    return ParamSet(
        key=key,
        title=title,
        dtype=dtype,
        shapes=llama_shapes(c),
        model_args=dict(dim=c.dim, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads),
        description=(
            f"Llama shapes: dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads, {c.n_kv_heads} kv heads, "
            f"ffn {c.ffn}, vocab {c.vocab}, untied lm_head"
        ),
        smoke=smoke,
    )


def _gpt2_set(key: str, title: str, c: GPT2Config, dtype: str, smoke: bool) -> ParamSet:
    return ParamSet(
        key=key,
        title=title,
        dtype=dtype,
        shapes=gpt2_shapes(c),
        model_args=dict(dim=c.dim, n_heads=c.n_heads, n_kv_heads=c.n_heads),
        description=(
            f"HF GPT-2 names: dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads, vocab {c.vocab}, "
            f"{c.n_positions} positions, lm_head tied to wte"
        ),
        smoke=smoke,
    )


SET_KEYS = ("llama-1.1b-fp32", "gpt2-124m-fp32", "llama-1.1b-bf16")


def make_set(key: str, smoke: bool = False) -> ParamSet:
    """The set ``key`` (one of ``SET_KEYS``); with ``smoke`` its tiny variant."""
    llama, gpt2 = (LLAMA_TINY, GPT2_TINY) if smoke else (LLAMA_1B, GPT2_SMALL)
    tag = " [smoke: tiny shapes]" if smoke else ""
    if key == "llama-1.1b-fp32":
        return _llama_set(key, "Llama-1.1B shapes, fp32" + tag, llama, "float32", smoke)
    if key == "llama-1.1b-bf16":
        return _llama_set(key, "Llama-1.1B shapes, bf16" + tag, llama, "bfloat16", smoke)
    if key == "gpt2-124m-fp32":
        return _gpt2_set(key, "GPT-2 124M (HF names), fp32" + tag, gpt2, "float32", smoke)
    raise KeyError(f"unknown set {key!r}; choose from {', '.join(SET_KEYS)}")


# Llama-style sweep, ~1M to ~1.1B parameters (fp32). Head and kv-head counts keep head_dim 32..64
# and GQA groups as in the real models; the last point is the Llama-1.1B set itself.
SWEEP = (
    LlamaConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn=344, vocab=1024),  # ~1.05M
    LlamaConfig(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, ffn=688, vocab=11008),  # ~9.99M
    LlamaConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn=1376, vocab=32000),  # ~56M
    LlamaConfig(dim=1024, n_layers=12, n_heads=16, n_kv_heads=4, ffn=2816, vocab=32000),  # ~200M
    LlamaConfig(dim=1536, n_layers=20, n_heads=24, n_kv_heads=4, ffn=4096, vocab=32000),  # ~590M
    LLAMA_1B,  # 1.1B: shared with the llama-1.1b-fp32 set when that set runs too
)
SWEEP_SMOKE = (
    LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn=86, vocab=128),
    LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=172, vocab=512),  # = the tiny set
    LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn=344, vocab=1024),
)


def _human(n: int) -> str:
    for unit, scale in (("b", 1e9), ("m", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def sweep_sets(smoke: bool = False) -> List[ParamSet]:
    """The sweep as fp32 sets named ``sweep-<size>``; ``extra['same_as']`` names the set whose
    shapes it repeats (its rows are reused instead of timed twice)."""
    out = []
    for c in SWEEP_SMOKE if smoke else SWEEP:
        s = _llama_set("", "", c, "float32", smoke)
        s.key = f"sweep-llama-{_human(s.n_params)}"
        s.title = f"sweep: Llama shapes, {_human(s.n_params)} params, fp32"
        if c == (LLAMA_TINY if smoke else LLAMA_1B):
            s.extra["same_as"] = "llama-1.1b-fp32"
        out.append(s)
    return out


def describe_sizes() -> str:
    lines = [f"{k}: {make_set(k).n_params:,} params" for k in SET_KEYS]
    lines += [f"{s.key}: {s.n_params:,} params" for s in sweep_sets()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe_sizes())
