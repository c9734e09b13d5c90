"""``AdamMini.for_model``: blocks read from real model classes (tiny random configs, no download).

* Per architecture, the number of blocks per rule equals the count written down here from the
  config (layers, heads, kv heads, head_dim, hidden, intermediate, vocab), and a training step
  runs.
* Sectioned (fused QKV) and transposed (Conv1D column) parameters step exactly as
  ``reference.adam_mini_step`` on their storage order, through real backward passes (gradients
  accumulated into strided views of the flat buffer, and fresh ones after set_to_none).
* The Triton backend (interpreter on the CPU) and the CUDA kernels (host emulator) match the
  torch backend on those layouts; a model whose partition equals official's matches official.
* Checkpoints of sectioned/transposed parameters round-trip bitwise and move to and from the
  name-rule partition; bad input is a clear error; one HF ``Trainer`` step runs.
"""

from __future__ import annotations

import inspect
import io
import types
from collections import Counter

import pytest
import torch
from torch import nn

from adam_mini_kernels import AdamMini
from adam_mini_kernels.model_layouts import AttentionDims, config_dims, model_layouts
from adam_mini_kernels.reference import adam_mini_step
from grad_stream import assert_backends_close, clone_named, max_rel_err, run_stream
from models import GPT_OSS_ROPE, skip_without_fused_experts
from test_cuda_backend import _emulated_step, emulator  # noqa: F401  (emulator: the fixture)

transformers = pytest.importorskip("transformers")  # required in CI (conftest.py)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

V, H, I, L, NH = 64, 32, 48, 2, 4  # vocab, hidden, intermediate, layers, heads
KW = dict(lr=1e-2, weight_decay=0.1, verbose=False)


def _decoder(config_cls, model_cls, **extra):
    cfg = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
               max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return model_cls(getattr(transformers, config_cls)(**dict(cfg, **extra)))


def _expected_decoder(nkv, hd, tied, q_norm=False, qkv_bias=False):
    """Llama-family blocks: Q/K heads, V neurons, o/gate/up/down neurons, tokens, one per norm."""
    return {
        "wqk": (L * (NH + nkv), hd * H),
        "wv": (L * nkv * hd, H),
        "neuron": (L * (H + 2 * I + H), None),
        "embd": (V, H),
        "output": (0 if tied else V, H),
        "whole": (2 * L + 1 + (2 * L if q_norm else 0), None),
        "adam": (L * (NH + 2 * nkv) * hd if qkv_bias else 0, 1),
    }


def _gpt2(add_cross_attention=False):
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=H, n_layer=L, n_head=NH, n_positions=16, bos_token_id=0,
                                  eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  add_cross_attention=add_cross_attention)
    return transformers.GPT2LMHeadModel(cfg)


def _neox():
    cfg = transformers.GPTNeoXConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                                     num_attention_heads=NH, max_position_embeddings=32, bos_token_id=0,
                                     eos_token_id=1, tie_word_embeddings=False)
    return transformers.GPTNeoXForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                                  num_attention_heads=NH, max_position_embeddings=16, type_vocab_size=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg)


def _codegen():
    """qkv_proj: four model-parallel groups of [Q | V | K] (one head each here)."""
    cfg = transformers.CodeGenConfig(vocab_size=V, n_embd=H, n_layer=L, n_head=NH, n_positions=16, n_inner=I,
                                     rotary_dim=4, bos_token_id=0, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    return transformers.CodeGenForCausalLM(cfg)


def _gpt_bigcode(multi_query):
    """c_attn (a Linear): [Q | K | V] with one kv head under multi-query, else (heads, 3, head_dim)."""
    cfg = transformers.GPTBigCodeConfig(vocab_size=V, n_embd=H, n_layer=L, n_head=NH, n_positions=16, n_inner=I,
                                        multi_query=multi_query, bos_token_id=0, eos_token_id=1, resid_pdrop=0.0,
                                        embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPTBigCodeForCausalLM(cfg)


def _falcon(**order):
    """query_key_value: [Q | K | V] with one kv head (multi_query, the default), (heads, 3, head_dim)
    (multi_query=False) or per kv head its queries, key and value (new_decoder_architecture)."""
    cfg = transformers.FalconConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                                    bos_token_id=0, eos_token_id=1, hidden_dropout=0.0, attention_dropout=0.0,
                                    **order)
    return transformers.FalconForCausalLM(cfg)


# Multi-head latent attention (DeepSeek-V2/V3): heads of qk_nope + qk_rope = 10 query dims (not
# hidden / heads = 8, nor the config's head_dim = qk_rope), 8 value dims; a dense MLP in every layer.
MLA = dict(kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=8)
QA = 16  # q_lora_rank


def _deepseek(q_lora_rank):
    return _decoder("DeepseekV3Config", transformers.DeepseekV3ForCausalLM, num_key_value_heads=NH,
                    q_lora_rank=q_lora_rank, first_k_dense_replace=L, n_routed_experts=E, moe_intermediate_size=24,
                    n_group=1, topk_group=1, tie_word_embeddings=False, **MLA)


def _expected_mla(q_lora):
    """Q heads of q_b_proj (or q_proj, of qk_nope + qk_rope rows), per head kv_b_proj's key block
    and value neurons, kv_a_proj_with_mqa's rope key (one head shared by all) and latent neurons."""
    nope, rope, dv, rank = MLA["qk_nope_head_dim"], MLA["qk_rope_head_dim"], MLA["v_head_dim"], MLA["kv_lora_rank"]
    return {
        "wqk": (L * (NH + 1 + NH), None), "wv": (L * NH * dv, rank),
        "neuron": (L * ((QA if q_lora else 0) + rank + H + 2 * I + H), None),
        "embd": (V, H), "output": (V, H), "whole": (L * (2 + (2 if q_lora else 1)) + 1, None), "adam": (0, 1),
    }


E = 4  # experts of the MoE models
MOE_ARCHS = {"mixtral", "gpt_oss"}


def _mixtral():
    return _decoder("MixtralConfig", transformers.MixtralForCausalLM, num_key_value_heads=2, num_local_experts=E,
                    num_experts_per_tok=2, tie_word_embeddings=False)


def _gpt_oss():
    """Experts stored (experts, in, out) with biases, a router with a bias, attention sinks."""
    return _decoder("GptOssConfig", transformers.GptOssForCausalLM, num_key_value_heads=2, head_dim=H // NH,
                    num_local_experts=E, num_experts_per_tok=2, tie_word_embeddings=False,
                    rope_parameters=GPT_OSS_ROPE)


def _llama4():
    """Experts stored (experts, in, out) without an is_transposed flag, a shared expert."""
    return _decoder("Llama4TextConfig", transformers.Llama4ForCausalLM, num_key_value_heads=2, head_dim=H // NH,
                    num_local_experts=E, num_experts_per_tok=1, intermediate_size_mlp=40, tie_word_embeddings=False)


def _expected_moe(nkv, hd, biases=False, sinks=False, shared_expert=False):
    """MoE decoders: the Llama-family blocks with the MLP replaced by a router (one block per
    expert) and E experts (one block per output neuron of each: 2I gate/up, H down), and a
    shared expert's 2I + H neurons."""
    expected = _expected_decoder(nkv, hd, tied=False, qkv_bias=biases)
    expected["neuron"] = (L * (H + E + E * 2 * I + E * H + (2 * I + H if shared_expert else 0)), None)
    if biases:  # o_proj, the router and the experts' biases too
        expected["adam"] = (expected["adam"][0] + L * (H + E + E * 2 * I + E * H), 1)
    if sinks:  # one sink logit per head: no module rule, the name rules' one block
        expected["whole"] = (expected["whole"][0] + L, None)
    return expected


class _Encoder(nn.Module):
    """A plain ``nn.TransformerEncoder`` (``nn.MultiheadAttention``'s fused in_proj_weight) with
    an embedding; no transformers config."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        layer = nn.TransformerEncoderLayer(H, NH, dim_feedforward=I, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, L, enable_nested_tensor=False)

    def forward(self, input_ids):
        return self.encoder(self.embed(input_ids)).square().mean()


HD = H // NH
# name -> (builder, expected {rule: (blocks, block size of every such block or None)}, loss fn)
ARCHS = {
    "llama": (lambda: _decoder("LlamaConfig", transformers.LlamaForCausalLM, num_key_value_heads=2,
                               tie_word_embeddings=False), _expected_decoder(2, HD, tied=False)),
    "mistral": (lambda: _decoder("MistralConfig", transformers.MistralForCausalLM, num_key_value_heads=1,
                                 tie_word_embeddings=False, sliding_window=None), _expected_decoder(1, HD, tied=False)),
    # qkv_proj = [Q | K | V] with 2 kv heads of 4 query heads: the K and V sections are half Q's.
    "phi3": (lambda: _decoder("Phi3Config", transformers.Phi3ForCausalLM, num_key_value_heads=2,
                              tie_word_embeddings=False), _expected_decoder(2, HD, tied=False)),
    "qwen2": (lambda: _decoder("Qwen2Config", transformers.Qwen2ForCausalLM, num_key_value_heads=2,
                               tie_word_embeddings=True), _expected_decoder(2, HD, tied=True, qkv_bias=True)),
    # head_dim 16 != hidden / heads = 8: official's head blocks would be half as big.
    "qwen3": (lambda: _decoder("Qwen3Config", transformers.Qwen3ForCausalLM, num_key_value_heads=2, head_dim=16,
                               tie_word_embeddings=False), _expected_decoder(2, 16, tied=False, q_norm=True)),
    "gemma": (lambda: _decoder("GemmaConfig", transformers.GemmaForCausalLM, num_key_value_heads=1, head_dim=16,
                               tie_word_embeddings=True), _expected_decoder(1, 16, tied=True)),
    "gpt2": (_gpt2, {  # Conv1D: every weight by columns; c_attn = [Q | K | V]; tied lm_head
        "wqk": (L * 2 * NH, HD * H), "wv": (L * H, H), "neuron": (L * (H + 4 * H + H), None),
        "embd": (V + 16, H), "output": (0, H), "whole": (2 * L + 1, None),
        "adam": (L * (3 * H + H + 4 * H + H + 2 * H) + H, 1),
    }),
    "gpt2_cross_attention": (lambda: _gpt2(add_cross_attention=True), {  # + q_attn, c_attn = [K | V]
        "wqk": (L * 4 * NH, HD * H), "wv": (L * 2 * H, H), "neuron": (L * (H + 4 * H + H + H), None),
        "embd": (V + 16, H), "output": (0, H), "whole": (3 * L + 1, None),
        "adam": (L * (3 * H + H + 4 * H + H + 2 * H) + H + L * (2 * H + H + H + H), 1),
    }),
    "gpt_neox": (_neox, {  # query_key_value rows interleaved per head
        "wqk": (L * 2 * NH, HD * H), "wv": (L * H, H), "neuron": (L * (H + I + H), None),
        "embd": (V, H), "output": (V, H), "whole": (2 * L + 1, None),
        "adam": (L * (2 * H + 3 * H + H + I + H) + H, 1),
    }),
    "bert": (_bert, {  # word, position and token-type embeddings; pooler
        "wqk": (L * 2 * NH, HD * H), "wv": (L * H, H), "neuron": (L * (H + I + H) + H, None),
        "embd": (V + 16 + 2, H), "output": (0, H), "whole": (1 + 2 * L, None),
        "adam": (H + L * (3 * H + H + H + I + H + H) + H, 1),
    }),
    "codegen": (_codegen, {  # qkv_proj = 4 x [Q | V | K]; fc_in, fc_out and lm_head with biases
        "wqk": (L * 2 * NH, HD * H), "wv": (L * H, H), "neuron": (L * (H + I + H), None),
        "embd": (V, H), "output": (V, H), "whole": (L + 1, None), "adam": (L * (H + I + H) + H + V, 1),
    }),
    "gpt_bigcode": (lambda: _gpt_bigcode(True), {  # c_attn = [Q | K | V], one kv head; tied lm_head
        "wqk": (L * (NH + 1), HD * H), "wv": (L * HD, H), "neuron": (L * (H + I + H), None),
        "embd": (V + 16, H), "output": (0, H), "whole": (2 * L + 1, None),
        "adam": (L * (H + 2 * HD + H + 2 * H + I + H) + H, 1),
    }),
    "gpt_bigcode_mha": (lambda: _gpt_bigcode(False), {  # c_attn rows interleaved per head
        "wqk": (L * 2 * NH, HD * H), "wv": (L * H, H), "neuron": (L * (H + I + H), None),
        "embd": (V + 16, H), "output": (0, H), "whole": (2 * L + 1, None),
        "adam": (L * (3 * H + H + 2 * H + I + H) + H, 1),
    }),
    "falcon": (_falcon, {  # one kv head; parallel attention and MLP after one layer norm; tied
        "wqk": (L * (NH + 1), HD * H), "wv": (L * HD, H), "neuron": (L * (H + 4 * H + H), None),
        "embd": (V, H), "output": (0, H), "whole": (L + 1, None), "adam": (L * H + H, 1),
    }),
    "falcon_mha": (lambda: _falcon(multi_query=False), {
        "wqk": (L * 2 * NH, HD * H), "wv": (L * H, H), "neuron": (L * (H + 4 * H + H), None),
        "embd": (V, H), "output": (0, H), "whole": (L + 1, None), "adam": (L * H + H, 1),
    }),
    "falcon_grouped": (lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2), {  # two layer norms
        "wqk": (L * (NH + 2), HD * H), "wv": (L * 2 * HD, H), "neuron": (L * (H + 4 * H + H), None),
        "embd": (V, H), "output": (0, H), "whole": (2 * L + 1, None), "adam": (2 * L * H + H, 1),
    }),
    "deepseek_mla": (lambda: _deepseek(QA), _expected_mla(q_lora=True)),
    "deepseek_mla_no_q_lora": (lambda: _deepseek(None), _expected_mla(q_lora=False)),
    # fused experts (transformers 5): (experts, out, in) rows; GPT-OSS's (experts, in, out) columns
    "mixtral": (_mixtral, _expected_moe(2, HD)),
    "gpt_oss": (_gpt_oss, _expected_moe(2, HD, biases=True, sinks=True)),
    "llama4": (_llama4, _expected_moe(2, HD, shared_expert=True)),
    "transformer_encoder": (_Encoder, {  # in_proj_weight = [Q; K; V]
        "wqk": (L * 2 * NH, HD * H), "wv": (L * H, H), "neuron": (L * (H + I + H), None),
        "embd": (V, H), "output": (0, H), "whole": (2 * L, None),
        "adam": (L * (3 * H + H + I + H + 2 * H), 1),
    }),
}
# Conv1D weights and GPT-OSS's and Llama 4's experts stored transposed; none elsewhere
COLUMN_PARAMS = {"gpt2": 4 * L, "gpt2_cross_attention": 7 * L, "gpt_oss": 2 * L, "llama4": 2 * L}
NAME_RULE_PARAMS = {"gpt_oss": ".self_attn.sinks"}  # parameters of no module rule (name suffix)


def _build(arch, seed=0):
    if arch in MOE_ARCHS:
        skip_without_fused_experts()
    torch.manual_seed(seed)
    return ARCHS[arch][0]()


def _loss(model, tokens):
    """The next-token loss of a causal LM, else a function of the last hidden state."""
    if isinstance(model, _Encoder):
        return model(tokens)
    if model.get_output_embeddings() is not None:
        return model(input_ids=tokens, labels=tokens).loss
    return model(input_ids=tokens).last_hidden_state.square().mean()


def _tokens(seed, batch=2, seq=8):
    return torch.randint(2, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _blocks_per_rule(opt):
    counts, sizes = {}, {}
    for row in opt.partition_summary():
        for rule, block_numel, num_blocks in row["sections"]:
            counts[rule] = counts.get(rule, 0) + num_blocks
            sizes.setdefault(rule, set()).add(block_numel)
    return counts, sizes


def _step_and_forward(model, opt):
    """One training step, then a forward on the re-pointed storage: finite."""
    _loss(model, _tokens(1)).backward()
    opt.step()
    assert torch.isfinite(_loss(model, _tokens(2)))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_blocks_per_rule_follow_the_config(arch):
    model = _build(arch)
    opt = AdamMini.for_model(model, backend="torch", **KW)
    counts, sizes = _blocks_per_rule(opt)
    for rule, (blocks, size) in ARCHS[arch][1].items():
        assert counts.get(rule, 0) == blocks, (rule, counts)
        if blocks and size is not None:
            assert sizes[rule] == {size}, (rule, sizes[rule])
    assert set(counts) <= set(ARCHS[arch][1]), counts
    summary = opt.partition_summary()
    assert sum(row["columns"] for row in summary) == COLUMN_PARAMS.get(arch, 0)
    # Every parameter is covered by the model's modules (the name sets decide nothing here).
    by_names = {row["name"] for row in summary} - set(opt.layout_overrides)
    assert all(name.endswith(NAME_RULE_PARAMS.get(arch, "\0")) for name in by_names), by_names

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = _loss(model, _tokens(1))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.grad is not None)
    assert torch.isfinite(_loss(model, _tokens(2)))  # the forward still works on re-pointed storage


# Other MoE decoders with transformers 5's fused experts ((experts, out, in), F.linear's layout):
# config class stem -> extra config (every layer a MoE layer).
MOE_DECODERS = {
    "Qwen2Moe": dict(num_experts=E, moe_intermediate_size=24, shared_expert_intermediate_size=40),
    "Qwen3Moe": dict(num_experts=E, moe_intermediate_size=24),
    "DeepseekV3": dict(n_routed_experts=E, moe_intermediate_size=24, n_shared_experts=1, first_k_dense_replace=0,
                       n_group=1, topk_group=1, kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4,
                       qk_nope_head_dim=4, v_head_dim=8),
    "Olmoe": dict(num_experts=E),
    "GraniteMoe": dict(num_local_experts=E),
}


@pytest.mark.parametrize("stem", list(MOE_DECODERS))
def test_moe_experts_and_routers_follow_the_config(stem):
    """Every layer's experts: ``gate_up_proj`` one block of ``hidden`` elements per output neuron
    of each expert (E * 2 * the experts' intermediate size), ``down_proj`` E * hidden blocks of the
    intermediate size; the router one block per expert. Sizes from the config, not the weights."""
    skip_without_fused_experts()
    model = _decoder(f"{stem}Config", getattr(transformers, f"{stem}ForCausalLM"), num_key_value_heads=2,
                     num_experts_per_tok=2, tie_word_embeddings=False, **MOE_DECODERS[stem])
    experts_i = getattr(model.config, "moe_intermediate_size", None) or I
    opt = AdamMini.for_model(model, backend="torch", **KW)
    rows = opt.partition_summary()
    assert {r["name"] for r in rows} <= set(opt.layout_overrides)
    expected = {"gate_up_proj": [("neuron", H, E * 2 * experts_i)], "down_proj": [("neuron", experts_i, E * H)],
                "router": [("neuron", H, E)]}
    seen = {k: 0 for k in expected}
    for r in rows:
        kind = r["name"].rsplit(".", 1)[-1]
        if r["name"].endswith((".mlp.gate.weight", ".router.weight")):
            kind = "router"
        if kind in expected:
            assert [tuple(s) for s in r["sections"]] == expected[kind] and not r["columns"], r
            seen[kind] += 1
    assert seen == {k: L for k in expected}, seen
    _step_and_forward(model, opt)


def test_lightning_attention_qkv_is_interleaved_per_head():
    """MiniMax's lightning (linear) attention reads its ``qkv_proj`` as (heads, 3 * head_dim) and
    splits each head's outputs into q, k, v; its full-attention layers have separate q/k/v_proj.
    With as many kv heads as heads, the [Q | K | V] reading of the name ``qkv_proj`` fits the
    weight too: the attention's class decides, not the name."""
    if not hasattr(transformers, "MiniMaxForCausalLM"):
        pytest.skip("this transformers has no MiniMax")
    model = _decoder("MiniMaxConfig", transformers.MiniMaxForCausalLM, num_key_value_heads=NH, num_local_experts=E,
                     num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"], block_size=4,
                     tie_word_embeddings=False)
    opt = AdamMini.for_model(model, backend="torch", **KW)
    rows = {r["name"]: r for r in opt.partition_summary()}
    assert [tuple(s) for s in rows["model.layers.0.self_attn.qkv_proj.weight"]["sections"]] == [
        ("wqk", HD * H, 2), ("wv", H, HD)] * NH
    assert [tuple(s) for s in rows["model.layers.1.self_attn.k_proj.weight"]["sections"]] == [("wqk", HD * H, NH)]
    _step_and_forward(model, opt)


def test_heads_of_a_heterogeneous_config_are_each_layer_s_own():
    """transformers 5's heterogeneous configs (``per_layer_config``) set some dimensions per layer,
    and reading such an attribute from the global config raises: Gemma 4's full-attention layers
    have heads of ``global_head_dim`` (512 by default), its sliding-window layers of ``head_dim``
    (16 here). Each attention's query and key heads come from its own layer's config."""
    if not hasattr(transformers, "Gemma4TextConfig"):
        pytest.skip("this transformers has no Gemma 4")
    config = transformers.Gemma4TextConfig(
        vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
        num_key_value_heads=2, head_dim=16, vocab_size_per_layer_input=V, hidden_size_per_layer_input=8,
        layer_types=["sliding_attention", "full_attention"])
    layers = [(c.head_dim, c.num_key_value_heads) for c in config.per_layer_config]
    assert layers[0][0] != layers[1][0]  # what the test is about
    model = transformers.Gemma4ForCausalLM(config)
    assert config_dims(model).head_dim is None  # per layer: not a global value
    opt = AdamMini.for_model(model, backend="torch", **KW)
    rows = {r["name"]: r for r in opt.partition_summary()}
    for i, (head_dim, kv_heads) in enumerate(layers):
        attention = f"model.layers.{i}.self_attn"
        assert rows[f"{attention}.q_proj.weight"]["sections"] == [("wqk", head_dim * H, NH)]
        assert rows[f"{attention}.k_proj.weight"]["sections"] == [("wqk", head_dim * H, kv_heads)]
    # A module past the config's layers (a multi-token-prediction layer's) reads the global config:
    # no IndexError; the attention's own head_dim still sizes its heads.
    model.model.layers[1].self_attn.layer_idx = L
    again = {r["name"]: r for r in AdamMini.for_model(model, backend="torch", **KW).partition_summary()}
    model.model.layers[1].self_attn.layer_idx = 1
    assert again == rows
    _step_and_forward(model, opt)


def test_head_size_the_attention_declares_wins_over_the_config_s():
    """Where a config names no head size, or the wrong one, the attention module's own attribute
    (what its forward reads) decides: SwitchTransformers' T5 attention has heads of ``d_kv`` = 16
    rows, not d_model / heads = 8 (its config maps no head_dim); DeepSeek-V3.2's indexer has
    ``index_n_heads`` query heads of ``index_head_dim`` in ``wq_b`` and one key head in ``wk``,
    not the config's head_dim (its qk_rope_head_dim)."""
    t5 = transformers.SwitchTransformersModel(transformers.SwitchTransformersConfig(
        vocab_size=V, d_model=H, d_kv=16, d_ff=I, num_layers=L, num_decoder_layers=L, num_heads=NH, num_experts=2,
        encoder_sparse_step=2, decoder_sparse_step=2))
    rows = AdamMini.for_model(t5, backend="torch", **KW).partition_summary()
    qk = [r for r in rows if r["name"].endswith((".q.weight", ".k.weight"))]
    assert len(qk) == 2 * 3 * L  # encoder self-, decoder self- and cross-attention, q and k
    assert all(r["sections"] == [("wqk", 16 * H, NH)] for r in qk), qk
    if not hasattr(transformers, "DeepseekV32ForCausalLM"):
        return
    ds = _decoder("DeepseekV32Config", transformers.DeepseekV32ForCausalLM, num_key_value_heads=NH, q_lora_rank=QA,
                  first_k_dense_replace=L, n_routed_experts=E, moe_intermediate_size=24, n_group=1, topk_group=1,
                  index_n_heads=2, index_head_dim=12, index_topk=4, tie_word_embeddings=False, **MLA)
    rows = {r["name"]: r for r in AdamMini.for_model(ds, backend="torch", **KW).partition_summary()}
    for i in range(L):
        indexer = f"model.layers.{i}.self_attn.indexer"
        assert rows[f"{indexer}.wq_b.weight"]["sections"] == [("wqk", 12 * QA, 2)]
        assert rows[f"{indexer}.wk.weight"]["sections"] == [("wqk", 12 * H, 1)]


def test_a_declared_head_size_needs_no_head_count():
    """A query/key weight under an attention module that declares its head size needs no number
    of heads; a config whose head count is a list (a hierarchical vision model's, per stage) or
    whose head_dim is 0 is read as naming none (before: a TypeError, a ZeroDivisionError)."""
    model = nn.Module()
    model.config = types.SimpleNamespace(hidden_size=16, num_attention_heads=[2, 4], head_dim=0)
    model.attn = nn.Module()
    model.attn.head_dim = 4
    model.attn.q_proj = nn.Linear(16, 16)
    assert config_dims(model) == AttentionDims(16, None, None, None)
    rows = AdamMini.for_model(model, backend="torch", **KW).partition_summary()
    assert rows[0]["name"] == "attn.q_proj.weight" and rows[0]["sections"] == [("wqk", 4 * 16, 4)]


def test_official_head_blocks_are_wrong_where_head_dim_is_not_hidden_over_heads():
    """The reason for head_dim: with official's dim*dim/n_heads, Qwen3's q_proj (n_heads * 16 rows)
    would get twice as many head blocks as it has heads."""
    model = _build("qwen3")
    by_name = AdamMini(model.named_parameters(), dim=H, n_heads=NH, n_kv_heads=2, verbose=False).partition_summary()
    q_rows = {r["name"]: r for r in by_name}["model.layers.0.self_attn.q_proj.weight"]
    assert q_rows["num_blocks"] == 2 * NH
    ours = {r["name"]: r for r in AdamMini.for_model(model, verbose=False).partition_summary()}
    assert ours["model.layers.0.self_attn.q_proj.weight"]["num_blocks"] == NH


class _Reference:
    """``reference.adam_mini_step`` per parameter on its storage order (the last two dims swapped
    for column layouts), with the layout the optimizer reports."""

    def __init__(self, model, opt):
        self.rows = {r["name"]: r for r in opt.partition_summary()}
        self.groups = {g["name"]: g for g in opt.param_groups}
        self.p = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.m = {n: torch.zeros_like(p) for n, p in self.p.items()}
        self.v = {n: torch.zeros(self.rows[n]["num_blocks"]) for n in self.p}
        self.t = dict.fromkeys(self.p, 0)

    def step(self, grads):
        for n, g in grads.items():
            row, group = self.rows[n], self.groups[n]
            stored = (lambda x: x.transpose(-2, -1)) if row["columns"] else (lambda x: x)
            sizes = [size for _, size, count in row["sections"] for _ in range(count)]
            self.t[n] += 1
            adam_mini_step(stored(self.p[n]), stored(g), stored(self.m[n]), self.v[n], step=self.t[n], lr=group["lr"],
                           beta1=group["beta1"], beta2=group["beta2"], eps=group["eps"],
                           weight_decay=group["weight_decay"], block_sizes=sizes)

    def check(self, model, opt):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), self.p[n], rtol=1e-5, atol=1e-6, msg=f"param {n}")
            state = opt.state[p]
            assert state["m"].shape == p.shape or "head_per_gpu" in state
            torch.testing.assert_close(state["m"].reshape(p.shape), self.m[n], rtol=1e-5, atol=1e-6, msg=f"m {n}")
            v = state["v"] if "v" in state else state["vmean"]
            torch.testing.assert_close(v.reshape(-1), self.v[n], rtol=1e-5, atol=1e-9, msg=f"v {n}")


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "transformer_encoder", "deepseek_mla", "mixtral", "gpt_oss",
                                  "llama4"])
def test_sectioned_and_transposed_params_step_as_the_reference(arch):
    model = _build(arch)
    opt = AdamMini.for_model(model, backend="torch", **KW)
    ref = _Reference(model, opt)
    for step in range(4):
        opt.zero_grad(set_to_none=step == 2)  # step 2: fresh contiguous grads, copied and re-pointed
        _loss(model, _tokens(10 + step)).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        ref.step(grads)
        ref.check(model, opt)
    group = opt._flat[0]
    for i, layout in enumerate(group.layouts):
        p = group.params[i]
        assert p.data_ptr() == group._param_ptrs[i] and p.grad.data_ptr() == group._grad_ptrs[i], layout.name
        assert p.is_contiguous() != layout.columns or p.numel() <= 1 or min(p.shape) == 1, layout.name


def test_fused_clipping_with_column_layouts_equals_clip_grad_norm():
    a, b = _build("gpt2"), _build("gpt2")
    opt_a = AdamMini.for_model(a, backend="torch", max_grad_norm=0.05, **KW)
    opt_b = AdamMini.for_model(b, backend="torch", **KW)
    for step in range(3):  # both see a's gradients (see grad_stream.py for why not b's own)
        opt_a.zero_grad(set_to_none=False)
        _loss(a, _tokens(20 + step)).backward()
        for p, q in zip(a.parameters(), b.parameters()):
            q.grad = p.grad.clone()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
        opt_a.step()
        opt_b.step()
    assert opt_a.last_grad_norm > 0.05
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert max_rel_err(q, p) <= 1e-5, n


@pytest.mark.parametrize("set_to_none", [False, True])
def test_compiled_opt_step_with_for_model_layouts_matches_eager(set_to_none):
    """opt.step() under torch.compile(fullgraph=True) (after the eager step that builds the
    buffers) on transposed and sectioned parameters: no graph break, the eager result."""
    torch._dynamo.reset()
    models = [_build("gpt2"), _build("gpt2")]
    opts = [AdamMini.for_model(model, backend="torch", **KW) for model in models]
    steps = [opts[0].step, opts[1].step]
    for i in range(4):  # both step a's gradients (see grad_stream.py for why not b's own)
        _loss(models[0], _tokens(40 + i)).backward()
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            if q.grad is None:
                q.grad = p.grad.clone()
            else:
                q.grad.copy_(p.grad)
        for step, opt in zip(steps, opts):
            step()
            opt.zero_grad(set_to_none=set_to_none)
        if i == 0:
            steps[1] = torch.compile(lambda: opts[1].step(), fullgraph=True)
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert max_rel_err(a, b) <= 1e-6, n


# -- fused query/key/value weights: the blocks sit where the forward reads Q, K and V ---------------

def _eager(model):
    """Attention probabilities come out of HF models only with the eager attention."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"
    return model.eval()


def _qkv_probe(arch, attr):
    """(model, name of layer 0's attention weight ``attr``, probe): ``probe()`` runs the forward
    and returns layer 0's attention probabilities (batch, heads, query, key) and the per-head
    context that enters its output projection (batch, query, heads * value head size)."""
    tokens = _tokens(3)
    model = _build(arch)
    if arch == "transformer_encoder":  # nn.MultiheadAttention, called as the encoder layer calls it
        attn = model.encoder.layers[0].self_attn
        with torch.no_grad():  # out_proj applied inside F.multi_head_attention_forward: make it the identity
            attn.out_proj.weight.copy_(torch.eye(H))
            attn.out_proj.bias.zero_()
        x = torch.randn(2, 8, H, generator=torch.Generator().manual_seed(4))

        def probe():
            out, probs = attn(x, x, x, need_weights=True, average_attn_weights=False)
            return probs, out

        return model.eval(), f"encoder.layers.0.self_attn.{attr}", probe
    _eager(model)
    attention_name, out_proj = QKV_PROBES[arch][:2]
    out_proj = model.get_submodule(f"{attention_name}.{out_proj}")

    def probe():
        seen = []
        hook = out_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
        try:
            probs = model(input_ids=tokens, output_attentions=True).attentions[0]
        finally:
            hook.remove()
        return probs, seen[0]

    return model, f"{attention_name}.{attr}.weight", probe


def _reads(n_kv, head_v=HD, q=True, k=True, v=True):
    """What the blocks of an attention weight must change in the forward, as two Counters: for
    its query/key blocks, the sets of heads whose attention pattern changes (one query head, or a
    key head's group of NH // n_kv query heads, once each); for its value blocks, the sets of
    context channels that change (one value channel, as each query head of its group reads it)."""
    group = NH // n_kv
    groups = [range(g * group, (g + 1) * group) for g in range(n_kv)]
    heads = Counter(frozenset({h}) for h in range(NH)) if q else Counter()
    if k:
        heads.update(frozenset(g) for g in groups)
    channels = Counter(frozenset(h * head_v + d for h in g) for g in groups for d in range(head_v)) if v else Counter()
    return heads, channels


DV = MLA["v_head_dim"]
# arch -> (layer 0's attention module, its output projection, {weight: what its blocks change})
QKV_PROBES = {
    "transformer_encoder": (None, None, {"in_proj_weight": _reads(NH)}),
    "gpt2": ("transformer.h.0.attn", "c_proj", {"c_attn": _reads(NH)}),
    "gpt_neox": ("gpt_neox.layers.0.attention", "dense", {"query_key_value": _reads(NH)}),
    "codegen": ("transformer.h.0.attn", "out_proj", {"qkv_proj": _reads(NH)}),
    "gpt_bigcode": ("transformer.h.0.attn", "c_proj", {"c_attn": _reads(1)}),
    "gpt_bigcode_mha": ("transformer.h.0.attn", "c_proj", {"c_attn": _reads(NH)}),
    "falcon": ("transformer.h.0.self_attention", "dense", {"query_key_value": _reads(1)}),
    "falcon_mha": ("transformer.h.0.self_attention", "dense", {"query_key_value": _reads(NH)}),
    "falcon_grouped": ("transformer.h.0.self_attention", "dense", {"query_key_value": _reads(2)}),
    "deepseek_mla": ("model.layers.0.self_attn", "o_proj", {
        "q_b_proj": _reads(NH, DV, k=False, v=False),
        "kv_b_proj": _reads(NH, DV, q=False),  # per head: its key block, its value neurons
        "kv_a_proj_with_mqa": _reads(1, DV, q=False, v=False),  # the rope key all heads share; latent neurons
    }),
    "deepseek_mla_no_q_lora": ("model.layers.0.self_attn", "o_proj", {"q_proj": _reads(NH, DV, k=False, v=False)}),
}


def _element_blocks(row):
    """(block index of every element, in the parameter's own shape; rule of every block) from a
    partition_summary row: sections in storage order, the last two dims swapped for column layouts."""
    rules = [rule for rule, _, count in row["sections"] for _ in range(count)]
    sizes = torch.tensor([size for _, size, count in row["sections"] for _ in range(count)])
    shape = tuple(row["shape"])
    ids = torch.repeat_interleave(torch.arange(len(rules)), sizes)
    if row["columns"]:
        return ids.reshape(shape[:-2] + shape[:-3:-1]).transpose(-2, -1), rules
    return ids.reshape(shape), rules


@pytest.mark.parametrize("arch, attr", [(a, w) for a, (_, _, weights) in QKV_PROBES.items() for w in weights])
def test_fused_qkv_blocks_sit_where_the_forward_reads_q_k_v(arch, attr):
    """Block by block, change only the elements the partition puts in that block and watch the
    model's own forward: a query/key block must change the attention pattern of exactly one query
    head or of one key head's group of query heads (and only their context), each as often as
    ``QKV_PROBES`` says; a value block must change no attention pattern and exactly one value
    channel of the context. A layout that puts a block on the wrong rows or columns (GPT-NeoX's
    per-head interleaving or CodeGen's [Q | V | K] groups read as [Q | K | V], GPT-2's Conv1D
    columns read as rows, a DeepSeek query head cut at the config's head_dim) fails."""
    model, name, probe = _qkv_probe(arch, attr)
    assert _what_blocks_move(model, name, probe) == QKV_PROBES[arch][2][attr]


def _what_blocks_move(model, name, probe):
    """Perturb each query/key and value block of weight ``name`` in turn; (the Counter of head
    sets whose attention pattern a query/key block moves, the Counter of context channel sets a
    value block moves), checking that a query/key block moves only its heads' context and a
    value block no pattern. MLA's latent neurons (keys and values of every head) are passed over."""
    opt = AdamMini.for_model(model, backend="torch", **KW)
    row = {r["name"]: r for r in opt.partition_summary()}[name]
    weight = dict(model.named_parameters())[name]
    ids, rules = _element_blocks(row)
    assert ids.shape == weight.shape
    with torch.no_grad():
        probs0, context0 = probe()
    head_v = context0.shape[-1] // NH
    assert probs0.shape == (2, NH, 8, 8) and context0.shape == (2, 8, NH * head_v)
    gen = torch.Generator().manual_seed(5)
    seen_heads, seen_channels = Counter(), Counter()
    for block, rule in enumerate(rules):
        if rule == "neuron":
            continue
        where = ids == block
        saved = weight.detach().clone()
        with torch.no_grad():
            weight[where] += torch.randn(int(where.sum()), generator=gen)
            probs, context = probe()
            weight.copy_(saved)
        heads = [h for h in range(NH) if (probs[:, h] - probs0[:, h]).abs().max() > 1e-5]
        channels = [c for c in range(NH * head_v) if (context[..., c] - context0[..., c]).abs().max() > 1e-5]
        assert rule in ("wqk", "wv"), rule
        if rule == "wqk":
            assert heads and channels and all(c // head_v in heads for c in channels), (block, heads, channels)
            seen_heads[frozenset(heads)] += 1
        else:
            assert heads == [] and channels, (block, heads, channels)
            seen_channels[frozenset(channels)] += 1
    return seen_heads, seen_channels


def _attend(q, k, v):
    """Attention of (batch, seq, heads, d) queries over (batch, seq, kv heads, d) keys and values
    (each kv head read by its group of query heads): (probabilities, per-head context)."""
    groups = q.shape[2] // k.shape[2]
    q = q.transpose(1, 2)
    k, v = (t.transpose(1, 2).repeat_interleave(groups, 1) for t in (k, v))
    probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    return probs, (probs @ v).transpose(1, 2).flatten(2)


class InternLM2Attention(nn.Module):
    """A stand-in for InternLM2's attention (remote code, not in transformers): its attributes, and
    the split its forward makes of ``wqkv``'s outputs, (kv heads, queries per kv head + 2,
    head_dim): each kv head's query heads, then its key, then its value. Its [Q | K | V] reading
    (the name rule's) fits the weight's shape too."""

    def __init__(self, hidden, heads, kv_heads):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.num_key_value_groups = heads // kv_heads
        self.wqkv = nn.Linear(hidden, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        groups = self.num_key_value_groups
        qkv = self.wqkv(x).view(b, s, self.num_key_value_heads, groups + 2, self.head_dim)
        q = qkv[..., :groups, :].flatten(2, 3)  # (b, s, heads, head_dim)
        probs, context = _attend(q, qkv[..., -2, :], qkv[..., -1, :])
        return self.wo(context), probs, context


def test_internlm2_wqkv_blocks_sit_where_its_forward_reads_q_k_v():
    model = nn.Module()
    model.config = types.SimpleNamespace(hidden_size=H, num_attention_heads=NH, num_key_value_heads=2)
    model.attention = InternLM2Attention(H, NH, 2)
    x = torch.randn(2, 8, H, generator=torch.Generator().manual_seed(4))
    assert _what_blocks_move(model, "attention.wqkv.weight", lambda: model.attention(x)[1:]) == _reads(2)


class SelfAttention(nn.Module):
    """A stand-in for ChatGLM2/3's attention (remote code, class ``SelfAttention``) with
    ``multi_query_attention``: its attributes and its forward's split of ``query_key_value``,
    [Q (heads) | K (groups) | V (groups)] of ``hidden_size_per_attention_head`` each."""

    def __init__(self, hidden, heads, groups):
        super().__init__()
        self.num_attention_heads_per_partition, self.num_multi_query_groups_per_partition = heads, groups
        self.hidden_size_per_attention_head = hidden // heads
        self.multi_query_attention = True
        self.query_key_value = nn.Linear(hidden, (heads + 2 * groups) * self.hidden_size_per_attention_head)
        self.dense = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        heads, groups, d = (self.num_attention_heads_per_partition, self.num_multi_query_groups_per_partition,
                            self.hidden_size_per_attention_head)
        q, k, v = self.query_key_value(x).split([heads * d, groups * d, groups * d], dim=-1)
        probs, context = _attend(q.view(b, s, heads, d), k.view(b, s, groups, d), v.view(b, s, groups, d))
        return self.dense(context), probs, context


def test_chatglm_multi_query_blocks_sit_where_its_forward_reads_q_k_v():
    """ChatGLM2/3's multi-query ``query_key_value`` is [Q | K | V] with kv groups, told by its
    attributes; before, for_model read it by the per-head name rule, which it does not fit (an
    error)."""
    model = nn.Module()
    model.config = types.SimpleNamespace(hidden_size=H, num_attention_heads=NH, multi_query_group_num=2)
    model.self_attention = SelfAttention(H, NH, 2)
    x = torch.randn(2, 8, H, generator=torch.Generator().manual_seed(4))
    name = "self_attention.query_key_value.weight"
    assert _what_blocks_move(model, name, lambda: model.self_attention(x)[1:]) == _reads(2)


# -- fused MoE experts: a block is one output neuron of one expert ---------------------------------

def _experts_probe(model, tokens):
    """(name of layer 0's experts module, the module, run, expert of each token): ``run(x)``
    calls the module itself on ``tokens`` hidden states, each token routed to one expert alone
    (weight 1): token t to expert t % E, or in E contiguous groups where the module takes tokens
    sorted by expert (Llama 4's)."""
    name = next(n for n, _ in model.named_modules() if n.startswith("model.layers.0.") and n.endswith(".experts"))
    experts = model.get_submodule(name)
    if len(inspect.signature(experts.forward).parameters) == 1:
        return name, experts, experts, torch.arange(tokens) // (tokens // E)
    expert_of = torch.arange(tokens) % E
    return name, experts, lambda x: experts(x, expert_of[:, None], torch.ones(tokens, 1)), expert_of


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "llama4"])
def test_expert_blocks_are_one_output_neuron_of_one_expert(arch):
    """Block by block, change only the elements the partition puts in that block of layer 0's
    experts and run the experts module: a ``down_proj`` block must change exactly one output
    channel, for the tokens of exactly one expert, each (expert, channel) by exactly one block; a
    ``gate_up_proj`` block tokens of one expert only (the activation may hide a change for some),
    each expert by 2I blocks. Whole experts as blocks (the name rules' dim-0 slices) or
    (experts, in, out) weights (GPT-OSS, Llama 4) read as rows fail."""
    model = _build(arch)
    opt = AdamMini.for_model(model, backend="torch", **KW)
    rows = {r["name"]: r for r in opt.partition_summary()}
    name, experts, run, expert_of = _experts_probe(model, 3 * E)
    x = torch.randn(3 * E, H, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out0 = run(x)
    gen = torch.Generator().manual_seed(7)
    for attr, outputs in (("down_proj", H), ("gate_up_proj", 2 * I)):
        weight = getattr(experts, attr)
        ids, rules = _element_blocks(rows[f"{name}.{attr}"])
        assert ids.shape == weight.shape and set(rules) == {"neuron"}
        hits = torch.zeros(E, H, dtype=torch.int64)
        per_expert = [0] * E
        for block in range(len(rules)):
            where = ids == block
            saved = weight.detach().clone()
            with torch.no_grad():
                weight[where] += torch.randn(int(where.sum()), generator=gen)
                changed = (run(x) - out0).abs() > 1e-5
                weight.copy_(saved)
            hit = expert_of[changed.any(dim=1)].unique().tolist()
            assert len(hit) == 1, (attr, block, hit)
            per_expert[hit[0]] += 1
            if attr == "down_proj":  # linear in the weight: every token of that expert moves
                assert changed.any(dim=1).tolist() == (expert_of == hit[0]).tolist(), (block, hit)
                channels = changed.any(dim=0).nonzero().flatten().tolist()
                assert len(channels) == 1, (block, channels)
                hits[hit[0], channels[0]] += 1
        assert per_expert == [outputs] * E, (attr, per_expert)
        if attr == "down_proj":
            assert (hits == 1).all(), hits


# -- fused backends on for_model layouts -----------------------------------------------------------

def _for_model_runs(arch, backends, dtype=torch.float32, device=None):
    """Clones of ``arch``'s parameters, one AdamMini per backend with for_model's layouts."""
    model = _build(arch)
    layouts = model_layouts(model)
    sets, opts = [], []
    for backend in backends:
        params = clone_named(list(model.named_parameters()), device=device, dtype=dtype)
        opt = AdamMini(params, backend=backend, dim=H, n_heads=NH, **KW)
        opt.layout_overrides.update(layouts)
        sets.append([p for _, p in params])
        opts.append(opt)
    return sets, opts


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "transformer_encoder", "deepseek_mla", "gpt_oss"])
def test_triton_backend_matches_torch_backend(arch):
    pytest.importorskip("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sets, opts = _for_model_runs(arch, ("torch", "triton"), device=device)
    run_stream(sets, opts, steps=3, seed=7, none_every=4)
    assert any(layout.columns or len(layout.sections) > 1 for layout in opts[1]._flat[0].layouts)
    assert_backends_close(sets, opts, 2e-6)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "deepseek_mla", "gpt_oss"])
def test_emulated_cuda_kernels_match_torch_backend(emulator, arch):
    sets, opts = _for_model_runs(arch, ("torch", "torch"))
    opts[1]._step_fn = _emulated_step(emulator)
    run_stream(sets, opts, steps=3, seed=8, none_every=4)
    assert_backends_close(sets, opts, 2e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "transformer_encoder", "deepseek_mla", "gpt_oss"])
def test_cuda_backend_matches_torch_backend(arch):
    sets, opts = _for_model_runs(arch, ("torch", "cuda"), device=torch.device("cuda"))
    run_stream(sets, opts, steps=3, seed=9, none_every=4)
    assert_backends_close(sets, opts, 2e-6)


def test_same_partition_as_official_gives_official_results():
    """Llama: for_model's blocks are official's (heads of dim/n_heads, rows elsewhere)."""
    Adam_mini = pytest.importorskip("adam_mini").Adam_mini
    model = _build("llama")
    ours, theirs = clone_named(list(model.named_parameters())), clone_named(list(model.named_parameters()))
    opt = AdamMini.for_model(model, backend="torch", **KW)
    mine = AdamMini(ours, backend="torch", dim=H, n_heads=NH, n_kv_heads=2, **KW)
    mine.layout_overrides.update(opt.layout_overrides)
    official = Adam_mini(theirs, dim=H, n_heads=NH, n_kv_heads=2, **KW)
    sets = [[p for _, p in theirs], [p for _, p in ours]]
    run_stream(sets, [official, mine], steps=10, seed=5, none_every=0)
    for a, b in zip(*sets):
        assert max_rel_err(a, b) <= 1e-5


# -- checkpoints -----------------------------------------------------------------------------------

def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _train(model, opt, steps, start):
    for step in range(start, start + steps):
        opt.zero_grad(set_to_none=False)
        _loss(model, _tokens(100 + step)).backward()
        opt.step()


def test_checkpoint_round_trip_with_sectioned_and_transposed_params():
    straight = _build("gpt2")
    opt = AdamMini.for_model(straight, backend="torch", **KW)
    _train(straight, opt, 3, 0)
    state = opt.state[straight.transformer.h[0].attn.c_attn.weight]
    assert state["m"].shape == (H, 3 * H) and state["vmean"].shape == (2 * NH + H,)
    assert state["block_runs"] == ((HD * H, 2 * NH), (H, H)) and state["columns"]
    saved = _roundtrip({"model": straight.state_dict(), "opt": opt.state_dict()})
    _train(straight, opt, 3, 3)

    resumed = _build("gpt2", seed=1)
    resumed.load_state_dict(saved["model"])
    opt2 = AdamMini.for_model(resumed, backend="torch", **KW)
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, 3, 3)
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("arch, name, slices", [
    ("gpt2", "transformer.h.0.mlp.c_fc.weight", H),  # (in, out): for_model v per column
    ("gpt_oss", "model.layers.0.mlp.experts.down_proj", E),  # (experts, in, out): per column of each
])
def test_checkpoint_moves_between_name_rules_and_for_model(arch, name, slices):
    """A for_model checkpoint of column blocks loads into a name-rule optimizer (one block per
    dim-0 slice, as official) and back: each element keeps its old block's v, each new block
    takes the mean over its elements."""
    model = _build(arch)
    opt = AdamMini.for_model(model, backend="torch", **KW)
    _train(model, opt, 2, 0)
    w = model.get_parameter(name)
    row = {r["name"]: r for r in opt.partition_summary()}[name]
    assert row["columns"]
    column_v = opt.state[w]["vmean"].clone()
    saved = _roundtrip(opt.state_dict())

    by_name = AdamMini(model.named_parameters(), backend="torch", dim=H, n_heads=NH, **KW)
    by_name.load_state_dict(saved)
    _train(model, by_name, 1, 2)  # builds the buffers from the loaded state
    slices_v = by_name.state[w]["vmean"].reshape(-1)
    assert slices_v.shape == (slices,)
    beta2 = 0.999
    g = w.grad.float()
    ids, _ = _element_blocks(row)
    loaded = column_v[ids].reshape(slices, -1).mean(dim=1)  # each slice: the mean of its elements' old v
    expected = beta2 * loaded + (1 - beta2) * (g * g).reshape(slices, -1).mean(dim=1)
    torch.testing.assert_close(slices_v, expected, rtol=1e-5, atol=0)

    back = AdamMini.for_model(model, backend="torch", **KW)
    back.load_state_dict(_roundtrip(by_name.state_dict()))
    _train(model, back, 1, 3)
    assert back.state[w]["vmean"].shape == (row["num_blocks"],)


def test_dims_of_a_composite_config_are_its_text_model_s():
    """A multimodal config (vision + text, e.g. LLaVA's) holds the language model's dimensions in
    its text config: ``get_text_config()`` is read, not the outer config."""
    text = transformers.LlamaConfig(hidden_size=H, num_attention_heads=NH, num_key_value_heads=2, head_dim=16)
    model = nn.Module()
    model.config = transformers.LlavaConfig(text_config=text)
    assert config_dims(model) == AttentionDims(H, NH, 2, 16)


def _llava():
    """A multimodal model: a CLIP vision tower (8 heads of 4) beside a Llama (NH heads of HD)."""
    text = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=1,
                                    num_attention_heads=NH, num_key_value_heads=2, max_position_embeddings=32)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                           num_attention_heads=8, image_size=16, patch_size=8)
    return transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=V - 1)
    )


def test_each_sub_model_s_heads_come_from_its_own_config():
    """LLaVA: the vision tower's query/key weights get one block per vision head (32 / 8 = 4
    rows), the language model's one per text head (HD rows), each from its own sub-model's
    config; reading the text config for every module would give the vision tower HD-row heads.
    Arguments given to for_model hold for every module; a module whose ``config`` names no
    dimensions (not a transformers config) takes its parent's."""
    model = _llava()
    rows = {r["name"]: r for r in AdamMini.for_model(model, verbose=False).partition_summary()}
    heads = {n: (r["shape"][0] // r["num_blocks"], r["sections"][0][0]) for n, r in rows.items()
             if n.endswith(("q_proj.weight", "k_proj.weight"))}
    assert len(heads) == 4
    for name, (rows_per_head, rule) in heads.items():
        assert rule == "wqk" and rows_per_head == (4 if "vision_tower" in name else HD), (name, rows_per_head)
    given = {r["name"]: r for r in AdamMini.for_model(model, head_dim=2, verbose=False).partition_summary()}
    assert all(given[n]["shape"][0] // given[n]["num_blocks"] == 2 for n in heads)
    # (the tower's encoder is vision_tower.encoder in transformers 5, vision_tower.vision_model.encoder in 4)
    attention = next(m for n, m in model.named_modules() if "vision_tower" in n and n.endswith("layers.0.self_attn"))
    attention.config = types.SimpleNamespace(dropout=0.0)
    inherited = {r["name"]: r for r in AdamMini.for_model(model, verbose=False).partition_summary()}
    assert all(inherited[n] == rows[n] for n in heads)


def test_head_size_is_the_weight_s_own_where_the_config_s_width_does_not_fit():
    """Without a head_dim in the config, the head size is hidden / n_heads, or where the weight's
    outputs do not fit that, its own input width / n_heads. Qwen2-VL's vision tower, whose
    config's hidden_size (32) is its merger's output, not its width (embed_dim 16), and names no
    head_dim: the fused qkv is [Q | K | V] with 2 + 2 heads of 8 rows, then 16 value neurons (an
    error with hidden / n_heads alone)."""
    text = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=NH,
                num_key_value_heads=2)
    vision = dict(depth=1, embed_dim=16, hidden_size=H, num_heads=2, mlp_ratio=2, in_channels=3, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1)
    vl = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(text_config=text, vision_config=vision))
    rows = {r["name"]: r for r in AdamMini.for_model(vl, verbose=False).partition_summary()}
    assert rows["model.visual.blocks.0.attn.qkv.weight"]["sections"] == [("wqk", 8 * 16, 4), ("wv", 16, 16)]
    assert rows["model.language_model.layers.0.self_attn.q_proj.weight"]["sections"] == [("wqk", HD * H, NH)]


# -- precedence and bad input ----------------------------------------------------------------------

class _NoConfig(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.extra_mlp = nn.Parameter(torch.randn(3, 5))


def test_dimensions_without_heads_are_fine_where_no_weight_needs_heads():
    """dim and head_dim given without n_heads, to a model with no query/key weight: the
    optimizer is built (the constructor's name rules get dim alone), no TypeError."""
    model = nn.Sequential(nn.Linear(4, 4))
    opt = AdamMini.for_model(model, dim=4, head_dim=2, **KW)
    assert [r["rule"] for r in opt.partition_summary()] == ["neuron", "adam"]


def test_name_sets_apply_to_parameters_for_model_does_not_cover():
    model = _NoConfig()
    opt = AdamMini.for_model(model, dim=16, n_heads=4, **KW)
    rows = {r["name"]: r for r in opt.partition_summary()}
    assert rows["q_proj.weight"]["num_blocks"] == 4 and rows["extra_mlp"]["num_blocks"] == 3
    opt.mlp_names = set()
    opt.wqk_names = set()
    rows = {r["name"]: r for r in opt.partition_summary()}
    assert rows["q_proj.weight"]["num_blocks"] == 4 and rows["extra_mlp"]["num_blocks"] == 1


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        AdamMini.for_model(_NoConfig().named_parameters())
    with pytest.raises(ValueError, match="query/key weight but its number of heads is unknown.*pass n_heads="):
        AdamMini.for_model(_NoConfig())
    with pytest.raises(ValueError, match="not a multiple of head_dim=3"):
        AdamMini.for_model(_NoConfig(), dim=16, n_heads=4, head_dim=3)
    with pytest.raises(ValueError, match="fused query/key/value weight.*expected 144"):
        AdamMini.for_model(_gpt2(), n_heads=NH, head_dim=12)
    with pytest.raises(ValueError, match="query/key weight 'q_proj.weight' fit no head size.*in_features=16, n_heads=3"):
        AdamMini.for_model(_NoConfig(), n_heads=3)
    fused = nn.Module()
    fused.c_attn = nn.Linear(16, 48)
    with pytest.raises(ValueError, match="fused query/key/value weight but its number of heads is unknown"):
        AdamMini.for_model(fused, head_dim=4)  # no config: the number of heads unknown
    with pytest.raises(ValueError, match="fused query/key/value weight 'c_attn.weight' fit no head size.*n_heads=5"):
        AdamMini.for_model(fused, n_heads=5)
    with pytest.raises(ValueError, match="'c_attn.weight' fit no head size.*n_heads=4, n_kv_heads=2"):
        AdamMini.for_model(fused, n_heads=4, n_kv_heads=2)  # 48 outputs: 4 + 2 * 2 heads of 4 would be 32
    with pytest.raises(ValueError, match=r"'gpt_neox.layers.0.attention.query_key_value.weight' has 96 outputs; expected 3 \* n_heads \* head_dim = 48"):
        AdamMini.for_model(_neox(), n_heads=NH, head_dim=HD // 2)
    falcon = _falcon(new_decoder_architecture=True, num_kv_heads=2)
    falcon.transformer.h[0].self_attention.num_kv_heads = 1  # attributes that no longer fit the weight
    with pytest.raises(ValueError, match="'transformer.h.0.self_attention.query_key_value.weight' has 64 outputs, "
                                         "but its FalconAttention's attributes make 48"):
        AdamMini.for_model(falcon)
    del falcon.transformer.h[0].self_attention.head_dim  # a transformers version this does not know
    with pytest.raises(ValueError, match=r"FalconAttention has no \['head_dim'\]"):
        AdamMini.for_model(falcon)
    opt = AdamMini.for_model(_NoConfig(), dim=16, n_heads=4, **KW)
    opt.layout_overrides["extra_mlp"] = opt.layout_overrides["q_proj.weight"]
    with pytest.raises(ValueError, match=r"layout_overrides\['extra_mlp'\] is for shape \[16, 16\]"):
        opt.partition_summary()


# -- HF Trainer -------------------------------------------------------------------------------------

def test_one_trainer_step(tmp_path):
    pytest.importorskip("accelerate")
    from torch.utils.data import Dataset

    class Tokens(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            x = _tokens(i, batch=1)[0]
            return {"input_ids": x, "labels": x}

    model = _build("llama")
    opt = AdamMini.for_model(model, lr=1e-3, weight_decay=0.1, verbose=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, scheduler))
    result = trainer.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    assert opt._flat is not None and all(int(s["step"]) == 1 for s in opt.state.values())
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())

