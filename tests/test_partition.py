"""The partition: parameter names -> Adam-mini blocks (SPEC section 2).

Checked three ways: against the SPEC's rules table written out independently here, against the
blocks official ``adam-mini`` 1.1.1 actually keeps for real module trees, and through the state
the optimizer keeps after a step (one second-moment value per block, with the right value).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from adam_mini_kernels import AdamMini
from adam_mini_kernels.partition import BlockLayout, Section
from models import OFFICIAL_SAFE, build, train

# The SPEC's table, in its order of precedence, written out for the tests.
SPEC_RULES = [
    ("adam", {"bias"}),
    ("wqk", {"k_proj", "q_proj", "wq", "wk", "query", "key"}),
    ("embd", {"embed", "embd", "wte"}),
    ("output", {"lm_head", "output", "final_layer"}),
    ("wv", {"v_proj", "wv", "value"}),
    ("attn_proj", {"o_proj", "wo", "attn.proj"}),
    ("mlp", {"feed_forward", "linear", "mlp"}),
]
ROW_RULES = {"embd", "output", "wv", "attn_proj", "mlp"}


def spec_blocks(name, shape, dim, n_heads, head_dim=None, rules=SPEC_RULES):
    """(rule, num_blocks, block_numel) as the SPEC describes them."""
    name = name.lower()
    numel = math.prod(shape)
    rule = next((r for r, keys in rules if any(k in name for k in keys)), "whole")
    if rule == "adam":
        return rule, numel, 1
    if rule == "wqk":
        head = (head_dim or dim // n_heads) * dim
        return rule, numel // head, head
    if rule in ROW_RULES and len(shape) >= 2:
        return rule, shape[0], (numel // shape[0] if shape[0] else None)
    return "whole", 1, numel


def _summary(opt):
    return {row["name"]: row for row in opt.partition_summary()}


def _step_with_grads(named, opt, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = {}
    opt.zero_grad()
    for n, p in named:
        grads[n] = torch.randn(p.shape, generator=gen)
        p.grad = grads[n].clone()
    opt.step()
    return grads


def _v(state):
    return (state["v"] if "v" in state else state["vmean"]).reshape(-1)


# -- real module trees ------------------------------------------------------------------------------


TREE_SPOT_CHECKS = {
    "llama_gqa": {
        "lm.model.embed_tokens.weight": ("embd", 64, 32),
        "lm.model.layers.0.self_attn.q_proj.weight": ("wqk", 4, 256),
        "lm.model.layers.1.self_attn.k_proj.weight": ("wqk", 2, 256),  # GQA K: n_kv_heads blocks
        "lm.model.layers.0.self_attn.v_proj.weight": ("wv", 16, 32),
        "lm.model.layers.0.self_attn.o_proj.weight": ("attn_proj", 32, 32),
        "lm.model.layers.1.mlp.down_proj.weight": ("mlp", 32, 48),
        "lm.model.layers.0.input_layernorm.weight": ("whole", 1, 32),
        "lm.model.norm.weight": ("whole", 1, 32),
        "lm.lm_head.weight": ("output", 64, 32),
    },
    "gpt2_tied": {
        "lm.transformer.wte.weight": ("embd", 64, 32),
        "lm.transformer.wpe.weight": ("whole", 1, 16 * 32),
        "lm.transformer.h.0.attn.c_attn.weight": ("whole", 1, 32 * 96),
        "lm.transformer.h.0.attn.c_attn.bias": ("adam", 96, 1),
        "lm.transformer.h.1.mlp.c_fc.weight": ("mlp", 32, 128),  # HF Conv1D: (in, out), rows = dim 0
        "lm.transformer.h.1.mlp.c_proj.weight": ("mlp", 128, 32),
        "lm.transformer.ln_f.weight": ("whole", 1, 32),
        "lm.transformer.ln_f.bias": ("adam", 32, 1),
    },
    "nanogpt": {
        "wte.weight": ("embd", 64, 32),
        "blocks.0.wq.weight": ("wqk", 4, 256),
        "blocks.0.wk.weight": ("wqk", 2, 256),
        "blocks.0.wv.weight": ("wv", 16, 32),
        "blocks.0.wv.bias": ("adam", 16, 1),
        "blocks.1.wo.weight": ("attn_proj", 32, 32),
        "blocks.1.mlp.0.weight": ("mlp", 96, 32),
        "blocks.1.ln_2.weight": ("whole", 1, 32),
        "gate": ("whole", 1, 32),
        "empty_mlp": ("mlp", 0, None),
        "lm_head.weight": ("output", 64, 32),
    },
    "nanogpt_beyond_official": {
        "mlp_scale_1d": ("whole", 1, 32),  # row rule on a 1-D tensor: one block
        "mlp_mix_3d": ("mlp", 3, 4 * 32),  # row rule on a 3-D tensor: dim-0 slices
    },
    "cnn": {
        "conv1.weight": ("whole", 1, 8 * 3 * 3 * 3),
        "conv1.bias": ("adam", 8, 1),
        "bn.weight": ("whole", 1, 8),
        "conv2.weight": ("whole", 1, 16 * 8 * 3 * 3),
        "fc.weight": ("whole", 1, 160),
        "fc.bias": ("adam", 10, 1),
    },
}


@pytest.mark.parametrize("tree", sorted(TREE_SPOT_CHECKS))
def test_partition_summary_of_module_trees(tree):
    model, _, dims = build(tree)
    opt = AdamMini(model.named_parameters(), verbose=False, **dims)
    summary = opt.partition_summary()
    trainable = [(n.lower(), p) for n, p in model.named_parameters() if p.requires_grad]
    assert [row["name"] for row in summary] == [n for n, _ in trainable]
    assert "frozen_scale" not in {row["name"] for row in summary}
    dim, n_heads = dims.get("dim", 2048), dims.get("n_heads", 32)
    for row, (_, p) in zip(summary, trainable):
        assert set(row) >= {"name", "rule", "shape", "block_numel", "num_blocks"}
        assert tuple(row["shape"]) == tuple(p.shape)
        rule, num_blocks, block_numel = spec_blocks(row["name"], tuple(p.shape), dim, n_heads)
        assert (row["rule"], row["num_blocks"]) == (rule, num_blocks), row
        if num_blocks:
            assert row["block_numel"] == block_numel, row
            assert row["block_numel"] * row["num_blocks"] == p.numel(), row
    by_name = {row["name"]: row for row in summary}
    for name, (rule, num_blocks, block_numel) in TREE_SPOT_CHECKS[tree].items():
        row = by_name[name]
        assert (row["rule"], row["num_blocks"]) == (rule, num_blocks), row
        if block_numel is not None:
            assert row["block_numel"] == block_numel, row


@pytest.mark.parametrize("tree", OFFICIAL_SAFE)
def test_blocks_match_what_official_keeps(tree):
    """After one step, official's state has one ``vmean`` value per block (``v`` per element for
    Adam blocks): the counts must be ours, and so must our own state."""
    adam_mini = pytest.importorskip("adam_mini")
    model, batch_fn, dims = build(tree, seed=1)
    official = adam_mini.Adam_mini(model.named_parameters(), verbose=False, **dims)
    train(model, official, batch_fn, steps=1)
    model2, batch_fn2, _ = build(tree, seed=1)
    ours = AdamMini(model2.named_parameters(), verbose=False, **dims)
    train(model2, ours, batch_fn2, steps=1)
    summary = _summary(ours)
    checked = 0
    for (name, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        if not p.requires_grad or p not in official.state or not official.state[p]:
            continue
        blocks = _v(official.state[p]).numel()
        assert summary[name.lower()]["num_blocks"] == blocks, name
        assert _v(ours.state[q]).numel() == blocks, name
        checked += 1
    assert checked >= 8


# -- the rules table ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape, rule, num_blocks",
    [
        ("layers.0.attention.wq.bias", (8,), "adam", 8),
        ("layers.0.self_attn.q_proj.bias", (8,), "adam", 8),  # "bias" wins over q_proj
        ("layers.0.self_attn.q_proj.weight", (8, 8), "wqk", 2),
        ("layers.0.self_attn.k_proj.weight", (4, 8), "wqk", 1),  # GQA K: 4 * 8 = one 32-element block
        ("layers.0.attention.wk.weight", (8, 8), "wqk", 2),
        ("encoder.attention.self.query.weight", (8, 8), "wqk", 2),
        ("encoder.attention.self.key.weight", (8, 8), "wqk", 2),
        ("Model.Layers.0.Q_PROJ.Weight", (8, 8), "wqk", 2),  # names are lowercased
        ("tok.embed_tokens.weight", (11, 8), "embd", 11),
        ("transformer.wte.weight", (11, 8), "embd", 11),
        ("pos_embd", (5, 8), "embd", 5),
        ("lm_head.weight", (11, 8), "output", 11),
        ("output.weight", (11, 8), "output", 11),
        ("final_layer.weight", (3, 8), "output", 3),
        ("layers.0.self_attn.v_proj.weight", (4, 8), "wv", 4),
        ("layers.0.attention.wv.weight", (4, 8), "wv", 4),
        ("encoder.attention.self.value.weight", (8, 8), "wv", 8),
        ("layers.0.self_attn.o_proj.weight", (8, 8), "attn_proj", 8),
        ("layers.0.attention.wo.weight", (8, 8), "attn_proj", 8),
        ("h.0.attn.proj.weight", (8, 8), "attn_proj", 8),
        ("layers.0.feed_forward.w1.weight", (16, 8), "mlp", 16),
        ("blocks.0.linear1.weight", (16, 8), "mlp", 16),
        ("h.0.mlp.c_fc.weight", (8, 32), "mlp", 8),
        ("layers.0.ln_1.weight", (8,), "whole", 1),
        ("layers.0.input_layernorm.weight", (8,), "whole", 1),
        ("conv.weight", (4, 3, 2, 2), "whole", 1),
        ("h.0.attn.c_attn.weight", (8, 24), "whole", 1),  # "attn.c_attn" is not "attn.proj"
        ("mlp.key.weight", (8, 8), "wqk", 2),  # query/key is tried before the row rules
        ("embed.mlp.weight", (6, 8), "embd", 6),  # first matching rule names it
        ("lm_head.mlp.weight", (6, 8), "output", 6),
        ("value.linear.weight", (6, 8), "wv", 6),
        ("mlp.scale", (8,), "whole", 1),  # row rule on a 1-D tensor: one block
        ("embed.scalar", (), "whole", 1),  # and on a 0-D one
        ("mlp.experts", (3, 4, 8), "mlp", 3),  # 3-D under a row rule: dim-0 slices
    ],
)
def test_rules_table(name, shape, rule, num_blocks):
    p = nn.Parameter(torch.randn(shape))
    opt = AdamMini([(name, p)], dim=8, n_heads=2, verbose=False)
    (row,) = opt.partition_summary()
    assert row["name"] == name.lower()
    assert (row["rule"], row["num_blocks"]) == (rule, num_blocks)
    assert row["block_numel"] * row["num_blocks"] == p.numel()
    assert (rule, num_blocks) == spec_blocks(name, shape, 8, 2)[:2]
    # The state after a step has exactly one second-moment value per block, with the block's
    # mean of g^2 in it.
    grads = _step_with_grads([(name, p)], opt, seed=len(name))
    v = _v(opt.state[p])
    assert v.numel() == num_blocks
    beta2 = opt.param_groups[0]["beta2"]
    expected = (1 - beta2) * grads[name].reshape(num_blocks, -1).pow(2).mean(dim=1)
    torch.testing.assert_close(v.float(), expected, rtol=1e-5, atol=0)


# -- name sets are read at the first step --------------------------------------------------------------


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(10, 8)
        self.wq = nn.Linear(8, 8, bias=False)
        self.wv = nn.Linear(8, 8, bias=False)
        self.mlp = nn.Linear(8, 12, bias=False)
        self.norm = nn.LayerNorm(8)


def test_name_sets_edited_after_construction_count():
    torch.manual_seed(0)
    model = _Attn()
    opt = AdamMini(model.named_parameters(), dim=8, n_heads=2, verbose=False)
    assert _summary(opt)["tok_emb.weight"]["rule"] == "whole"
    assert _summary(opt)["wv.weight"]["rule"] == "wv"
    opt.wv_names = {}  # as the official README writes it (an empty dict)
    opt.embd_names.add("tok_emb")
    summary = _summary(opt)
    assert (summary["wv.weight"]["rule"], summary["wv.weight"]["num_blocks"]) == ("whole", 1)
    assert (summary["tok_emb.weight"]["rule"], summary["tok_emb.weight"]["num_blocks"]) == ("embd", 10)
    named = list(model.named_parameters())
    _step_with_grads(named, opt, seed=1)
    assert _v(opt.state[model.wv.weight]).numel() == 1
    assert _v(opt.state[model.tok_emb.weight]).numel() == 10
    assert _v(opt.state[model.wq.weight]).numel() == 2


def test_name_sets_changed_after_steps_rebuild_and_keep_state():
    torch.manual_seed(1)
    model = _Attn()
    named = list(model.named_parameters())
    opt = AdamMini(named, dim=8, n_heads=2, verbose=False)
    for seed in range(3):
        _step_with_grads(named, opt, seed)
    old = {n: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()} for n, p in named}
    assert _v(opt.state[model.wv.weight]).numel() == 8

    opt.wv_names = set()  # value: one block for the whole matrix
    opt.mlp_names.discard("mlp")  # mlp: whole too
    opt.embd_names.add("tok_emb")  # embedding: rows
    grads = _step_with_grads(named, opt, seed=10)

    beta1 = opt.param_groups[0]["beta1"]
    beta2 = opt.param_groups[0]["beta2"]
    for n, p in named:
        state = opt.state[p]
        assert int(state["step"]) == int(old[n]["step"]) + 1 == 4, n
        # m is per element and was kept: exactly one more lerp step away from the saved one.
        expected_m = old[n]["m"].reshape(-1) + (1 - beta1) * (grads[n].reshape(-1) - old[n]["m"].reshape(-1))
        torch.testing.assert_close(state["m"].reshape(-1), expected_m, rtol=1e-5, atol=1e-7, msg=n)
    assert _v(opt.state[model.wv.weight]).numel() == 1
    assert _v(opt.state[model.mlp.weight]).numel() == 1
    assert _v(opt.state[model.tok_emb.weight]).numel() == 10
    # Unchanged blocks keep their second moments: one more EMA step from the saved values.
    for n, p in named:
        if n in ("wq.weight", "norm.weight", "norm.bias"):
            blocks = _v(old[n]).numel()
            expected_v = beta2 * _v(old[n]).float() + (1 - beta2) * grads[n].reshape(blocks, -1).pow(2).mean(dim=1)
            torch.testing.assert_close(_v(opt.state[p]).float(), expected_v, rtol=1e-5, atol=0, msg=n)
    # A merged block starts from a value built from the old ones (finite, positive).
    assert torch.isfinite(_v(opt.state[model.wv.weight])).all()
    assert (_v(opt.state[model.wv.weight]) > 0).all()


# -- head_dim ---------------------------------------------------------------------------------------


class _Qwen3Attention(nn.Module):
    """head_dim (20) is not dim // n_heads (48 // 4 = 12), as in Qwen3 and Gemma."""

    def __init__(self, dim=48, n_heads=4, n_kv_heads=2, head_dim=20):
        super().__init__()
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)


def test_head_dim_gives_one_block_per_head():
    torch.manual_seed(2)
    model = _Qwen3Attention()
    opt = AdamMini(model.named_parameters(), dim=48, n_heads=4, n_kv_heads=2, head_dim=20, verbose=False)
    summary = _summary(opt)
    assert (summary["q_proj.weight"]["num_blocks"], summary["q_proj.weight"]["block_numel"]) == (4, 20 * 48)
    assert (summary["k_proj.weight"]["num_blocks"], summary["k_proj.weight"]["block_numel"]) == (2, 20 * 48)
    named = list(model.named_parameters())
    grads = _step_with_grads(named, opt, seed=3)
    beta2 = opt.param_groups[0]["beta2"]
    for name, param, heads in (("q_proj.weight", model.q_proj.weight, 4), ("k_proj.weight", model.k_proj.weight, 2)):
        v = _v(opt.state[param])
        # One head = head_dim consecutive rows of the (heads * head_dim, dim) weight.
        expected = (1 - beta2) * grads[name].reshape(heads, 20, 48).pow(2).mean(dim=(1, 2))
        torch.testing.assert_close(v.float(), expected, rtol=1e-5, atol=0)


def test_without_head_dim_a_misfitting_head_is_a_clear_error():
    torch.manual_seed(3)
    model = _Qwen3Attention()
    opt = AdamMini(model.named_parameters(), dim=48, n_heads=4, n_kv_heads=2, verbose=False)
    with pytest.raises(ValueError) as err:
        opt.partition_summary()
    message = str(err.value)
    assert "q_proj.weight" in message and "head_dim" in message
    before = model.q_proj.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="head_dim"):
        opt.step()
    assert torch.equal(model.q_proj.weight.detach(), before)


def test_head_dim_default_is_official_dim_over_n_heads():
    """dim 32, 4 heads of head_dim 16: official (no head_dim) cuts q_proj into 64*32/256 = 8
    blocks; with head_dim=16 it is the 4 real heads."""
    q = nn.Parameter(torch.randn(64, 32))
    default = AdamMini([("q_proj.weight", q)], dim=32, n_heads=4, verbose=False)
    explicit = AdamMini([("q_proj.weight", q)], dim=32, n_heads=4, head_dim=16, verbose=False)
    assert default.partition_summary()[0]["num_blocks"] == 8
    assert explicit.partition_summary()[0]["num_blocks"] == 4


# -- shapes beyond official ------------------------------------------------------------------------------


def test_row_rule_on_1d_and_3d_tensors_after_steps():
    model, batch_fn, dims = build("nanogpt_beyond_official", seed=4)
    opt = AdamMini(model.named_parameters(), verbose=False, **dims)
    train(model, opt, batch_fn, steps=2)
    v1 = _v(opt.state[model.mlp_scale_1d])
    v3 = _v(opt.state[model.mlp_mix_3d])
    assert v1.numel() == 1 and v3.numel() == 3
    # One more step with known grads: each dim-0 slice gets the mean of its g^2.
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    v3_old, v1_old = v3.clone(), v1.clone()
    grads = _step_with_grads(named, opt, seed=5)
    beta2 = opt.param_groups[0]["beta2"]
    torch.testing.assert_close(
        _v(opt.state[model.mlp_mix_3d]).float(),
        beta2 * v3_old + (1 - beta2) * grads["mlp_mix_3d"].reshape(3, -1).pow(2).mean(dim=1),
        rtol=1e-5, atol=0,
    )
    torch.testing.assert_close(
        _v(opt.state[model.mlp_scale_1d]).float(),
        beta2 * v1_old + (1 - beta2) * grads["mlp_scale_1d"].pow(2).mean().reshape(1),
        rtol=1e-5, atol=0,
    )


# -- weight decay ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tree", ["llama_gqa", "gpt2_tied", "nanogpt", "cnn"])
def test_weight_decay_forced_to_zero_for_norm_ln_bias(tree):
    model, _, dims = build(tree)
    opt = AdamMini(model.named_parameters(), lr=3e-4, betas=(0.85, 0.97), eps=1e-7, weight_decay=0.25, verbose=False, **dims)
    trainable = [(n.lower(), p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(opt.param_groups) == len(trainable)
    no_decay = 0
    for group, (name, p) in zip(opt.param_groups, trainable):
        assert group["name"] == name
        assert len(group["params"]) == 1 and group["params"][0] is p
        assert (group["lr"], group["beta1"], group["beta2"], group["eps"]) == (3e-4, 0.85, 0.97, 1e-7)
        if any(key in name for key in ("norm", "ln", "bias")):
            assert group["weight_decay"] == 0.0, name
            no_decay += 1
        else:
            assert group["weight_decay"] == 0.25, name
    assert 0 < no_decay < len(trainable)


def test_no_decay_names_are_not_decayed_numerically():
    """lr 0.1, weight decay 0.5, and a zero gradient: decayed params shrink by exactly
    1 - lr * wd; norm / ln / bias params do not move."""
    params = {
        "blocks.0.mlp.weight": nn.Parameter(torch.randn(4, 6)),
        "blocks.0.ln_1.weight": nn.Parameter(torch.randn(6)),
        "blocks.0.layernorm.weight": nn.Parameter(torch.randn(6)),
        "blocks.0.mlp.bias": nn.Parameter(torch.randn(4)),
        "conv.weight": nn.Parameter(torch.randn(2, 3, 2)),
    }
    opt = AdamMini(list(params.items()), lr=0.1, weight_decay=0.5, eps=1e-8, verbose=False)
    before = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in params.items():
        if any(key in n for key in ("norm", "ln", "bias")):
            assert torch.equal(p.detach(), before[n]), n
        else:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5), rtol=1e-6, atol=0, msg=n)


# -- block layouts given directly (what for_model and layout_overrides hand the optimizer) ---------

def test_layout_that_does_not_fit_its_parameter_is_refused():
    with pytest.raises(ValueError, match="cover 12 elements, the parameter has 16"):
        BlockLayout("w", "mlp", (4, 4), (Section("mlp", 4, 3),))
    with pytest.raises(ValueError, match="column blocks need a parameter of 2 or more dims"):
        BlockLayout("w", "mlp", (16,), (Section("mlp", 4, 4),), columns=True)
    # 3-D: the last two dims swapped in storage (fused MoE experts stored (experts, in, out))
    assert BlockLayout("w", "mlp", (2, 3, 4), (Section("mlp", 3, 8),), columns=True).storage_shape == (2, 4, 3)


def test_summary_of_a_sectioned_layout_has_no_single_block_size():
    """A fused weight of head blocks and row blocks: ``block_numel`` is None (the blocks differ),
    ``sections`` lists each; one section of equal blocks gives its size."""
    named = [("attn.qkv.weight", nn.Parameter(torch.randn(12, 4))), ("mlp.weight", nn.Parameter(torch.randn(3, 4)))]
    opt = AdamMini(named, dim=4, n_heads=2, verbose=False)
    opt.layout_overrides["attn.qkv.weight"] = BlockLayout(
        "attn.qkv.weight", "qkv", (12, 4), (Section("wqk", 8, 4), Section("wv", 4, 4))
    )
    rows = {row["name"]: row for row in opt.partition_summary()}
    assert rows["attn.qkv.weight"]["block_numel"] is None
    assert rows["attn.qkv.weight"]["sections"] == [("wqk", 8, 4), ("wv", 4, 4)]
    assert rows["attn.qkv.weight"]["num_blocks"] == 8
    assert rows["mlp.weight"]["block_numel"] == 4 and rows["mlp.weight"]["sections"] == [("mlp", 4, 3)]
