"""state_dtype=torch.int8 (issue 10, torch backend): the first moment of large non-Adam parameters
as int8 codes with a float32 scale per 256-element chunk of a block (quantization.py).

The torch backend must compute exactly what a float32-state optimizer computes when its ``m`` is
replaced by dequantize(quantize(m)) after every step; checkpoints keep codes and scales and resume
bitwise; float and int8 checkpoints convert into each other."""

import copy
import io
from types import SimpleNamespace

import pytest
import torch

from adam_mini_kernels import AdamMini
from adam_mini_kernels.quantization import INT8_MIN_NUMEL, dequantize_runs, quantize_runs
from grad_stream import clone_named, max_rel_err, run_stream
from models import GPT_OSS_ROPE, skip_without_fused_experts

# Rows of 300 (a full chunk and a short one), heads of 4096 (16 chunks), a whole-tensor block of
# 6000 elements, column-free; small parameters and biases keep a float m.
SHAPES = {
    "embed.weight": (20, 300),
    "layers.0.q_proj.weight": (64, 128),
    "conv.weight": (60, 100),
    "mlp.weight": (40, 300),
    "mlp.bias": (40,),
    "ln.weight": (300,),
    "small.mlp.weight": (8, 16),
}
QUANTIZED = {"embed.weight", "layers.0.q_proj.weight", "conv.weight", "mlp.weight"}
KW = dict(lr=1e-2, weight_decay=0.1, verbose=False, dim=128, n_heads=4, backend="torch")


def _named(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))) for n, s in SHAPES.items()]


def _runs(opt):
    """Parameter name -> (runs, columns) of its blocks."""
    return {s["name"]: (tuple((n, c) for _, n, c in s["sections"]), s["columns"]) for s in opt.partition_summary()}


def _float_m(state, runs):
    codes = state["m_codes"].reshape(-1)
    return dequantize_runs(codes, state["m_scales"], runs).view(state["m_codes"].shape)


def _round_trip_m(opt, named, quantized=QUANTIZED):
    """Replace m of the would-be quantized parameters of a float32-state optimizer by
    dequantize(quantize(m)), chunks taken along the storage order (the last two dims swapped for
    columns)."""
    runs = _runs(opt)
    for name, p in named:
        if name in quantized:
            (blocks, columns), m = runs[name], opt.state[p]["m"]
            stored = m.transpose(-2, -1) if columns else m
            codes, scales = quantize_runs(stored.reshape(-1), blocks)
            stored.copy_(dequantize_runs(codes, scales, blocks).view(stored.shape))


def test_which_parameters_are_quantized():
    named = _named()
    opt = AdamMini(named, state_dtype=torch.int8, **KW)
    run_stream([[p for _, p in named]], [opt], steps=1, none_every=0)
    for name, p in named:
        state = opt.state[p]
        if name in QUANTIZED:
            assert p.numel() >= INT8_MIN_NUMEL and "m" not in state
            assert state["m_codes"].dtype == torch.int8 and state["m_codes"].shape == p.shape
            assert state["m_scales"].dtype == torch.float32
            assert state["m_codes"].abs().max() == 127  # absmax of each chunk maps to +-127
        else:
            assert "m_codes" not in state and state["m"].dtype == p.dtype
    groups = opt._flat
    assert sorted(g.quantized for g in groups) == [False, True]  # each group all-int8 or all-float


def test_size_threshold_of_quantization():
    """A parameter of exactly INT8_MIN_NUMEL elements is quantized, one element fewer is not."""
    named = [("at.mlp.weight", torch.nn.Parameter(torch.randn(INT8_MIN_NUMEL // 64, 64))),
             ("below.mlp.weight", torch.nn.Parameter(torch.randn(INT8_MIN_NUMEL - 1)))]
    opt = AdamMini(named, state_dtype=torch.int8, **KW)
    run_stream([[p for _, p in named]], [opt], steps=1, none_every=0)
    assert "m_codes" in opt.state[named[0][1]] and "m" not in opt.state[named[0][1]]
    assert "m_codes" not in opt.state[named[1][1]] and opt.state[named[1][1]]["m"].dtype == torch.float32


def test_quantized_only_where_codes_are_smaller():
    """Codes and scales (1 byte per element, 4 per 256-element chunk of a block) replace m only
    where they take strictly fewer bytes than m in the parameter's dtype: rows of 1 element keep a
    float32 m (5 bytes against 4) and rows of 4 a bfloat16 m (2 against 2); rows of 2 and of 5 are
    quantized."""
    rows = {"r1.mlp.weight": (1, torch.float32, False), "r2.mlp.weight": (2, torch.float32, True),
            "r4.mlp.weight": (4, torch.bfloat16, False), "r5.mlp.weight": (5, torch.bfloat16, True)}
    named = [(n, torch.nn.Parameter(torch.randn(2 * INT8_MIN_NUMEL, r).to(dtype))) for n, (r, dtype, _) in rows.items()]
    opt = AdamMini(named, state_dtype=torch.int8, **KW)
    run_stream([[p for _, p in named]], [opt], steps=1, none_every=0)
    for name, p in named:
        state, quantized = opt.state[p], rows[name][2]
        m_bytes = sum(state[k].nbytes for k in ("m", "m_codes", "m_scales") if k in state)
        float_bytes = p.numel() * p.element_size()
        if quantized:
            assert "m" not in state and state["m_codes"].dtype == torch.int8, name
            assert m_bytes < float_bytes, name
        else:
            assert "m_codes" not in state and state["m"].dtype == p.dtype, name
            assert m_bytes == float_bytes, name


def test_matches_float_state_with_round_trip():
    """Bitwise: parameters, v, and m (codes and scales) against float m quantized after each step,
    with some parameters idle (grad None) on some steps."""
    named, ref_named = _named(), _named()
    opt = AdamMini(named, state_dtype=torch.int8, **KW)
    ref = AdamMini(ref_named, **KW)
    for step in range(6):
        run_stream([[p for _, p in named], [p for _, p in ref_named]], [opt, ref], steps=1, seed=step, none_every=3)
        _round_trip_m(ref, ref_named)
    runs = _runs(opt)
    for (name, p), (_, q) in zip(named, ref_named):
        assert torch.equal(p, q), name
        s, r = opt.state[p], ref.state[q]
        if name in QUANTIZED:
            codes, scales = quantize_runs(r["m"].reshape(-1), runs[name][0])
            assert torch.equal(s["m_codes"].reshape(-1), codes), name
            assert torch.equal(s["m_scales"], scales), name
            assert torch.equal(_float_m(s, runs[name][0]).reshape(-1), r["m"].reshape(-1)), name
            assert torch.equal(s["vmean"].reshape(-1), r["vmean"].reshape(-1)), name
        else:
            assert torch.equal(s["m"], r["m"]), name
        assert int(s["step"]) == int(r["step"]), name


def _gpt2(transformers):
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=1, n_head=4, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _gpt_oss(transformers):
    cfg = transformers.GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=16, tie_word_embeddings=False,
                                    rope_parameters=GPT_OSS_ROPE)
    return transformers.GptOssForCausalLM(cfg)


@pytest.mark.parametrize("build, columns_quantized", [
    (_gpt2, {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.wte.weight"}),
    (_gpt_oss, {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}),
], ids=["gpt2", "gpt_oss"])
def test_for_model_column_and_section_layouts(build, columns_quantized):
    """GPT-2 through for_model: Conv1D weights stored by columns, c_attn in sections (heads, then
    neurons); GPT-OSS: 3-D expert weights (experts, in, out) stored by columns. Same bitwise
    check as above, and a bitwise resume."""
    transformers = pytest.importorskip("transformers")
    if build is _gpt_oss:
        skip_without_fused_experts()
    models = [build(transformers) for _ in range(3)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    kw = dict(lr=1e-2, weight_decay=0.1, verbose=False, backend="torch")
    opt, ref = AdamMini.for_model(models[0], state_dtype=torch.int8, **kw), AdamMini.for_model(models[1], **kw)
    params = [[p for p in model.parameters()] for model in models]
    run_stream(params[:2], [opt, ref], steps=1, none_every=0)
    quantized = {n for n, p in models[0].named_parameters() if "m_codes" in opt.state[p]}
    assert columns_quantized <= quantized
    assert any(s["columns"] for s in opt.partition_summary() if s["name"] in quantized)
    ref_named = list(models[1].named_parameters())
    _round_trip_m(ref, ref_named, quantized)
    for step in range(3):
        run_stream(params[:2], [opt, ref], steps=1, seed=step + 1, none_every=4)
        _round_trip_m(ref, ref_named, quantized)
    for (name, p), q in zip(models[0].named_parameters(), params[1]):
        assert torch.equal(p, q), name

    resumed = AdamMini.for_model(models[2], state_dtype=torch.int8, **kw)
    models[2].load_state_dict(models[0].state_dict())
    resumed.load_state_dict(_save_load(opt.state_dict()))
    run_stream([params[0], params[2]], [opt, resumed], steps=2, seed=9)
    for (name, p), q in zip(models[0].named_parameters(), params[2]):
        assert torch.equal(p, q), name
        assert torch.equal(opt.state[p].get("m_codes", p), resumed.state[q].get("m_codes", q)), name


def _bytes(t):
    return t.numel() * t.element_size()


def test_state_bytes_per_parameter():
    """Big tensors with rows of 2048: 1 B codes + 4/256 B scales + 4/2048 B v per parameter."""
    shapes = {"embed.weight": (512, 2048), "layers.0.mlp.weight": (1024, 2048), "layers.0.v_proj.weight": (512, 2048)}
    named = [(n, torch.nn.Parameter(torch.randn(s))) for n, s in shapes.items()]
    opt = AdamMini(named, state_dtype=torch.int8, **KW)
    run_stream([[p for _, p in named]], [opt], steps=1, none_every=0)
    state_bytes = sum(_bytes(t) for p in opt.state.values() for t in p.values() if torch.is_tensor(t) and t.dim() > 0)
    per_param = state_bytes / sum(p.numel() for _, p in named)
    assert per_param == pytest.approx(1 + 4 / 256 + 4 / 2048)
    float_named = clone_named(named)
    float_opt = AdamMini(float_named, **KW)
    run_stream([[p for _, p in float_named]], [float_opt], steps=1, none_every=0)
    float_bytes = sum(_bytes(t) for p in float_opt.state.values() for t in p.values() if torch.is_tensor(t) and t.dim() > 0)
    assert state_bytes < 0.26 * float_bytes  # against float32 m: about a quarter


def _save_load(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype, stochastic", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_checkpoint_resume_is_bitwise(dtype, stochastic):
    named = _named(dtype)
    kw = dict(KW, state_dtype=torch.int8, stochastic_rounding=stochastic)
    opt = AdamMini(named, **kw)
    run_stream([[p for _, p in named]], [opt], steps=3, seed=1)
    saved = _save_load(opt.state_dict())
    resumed_named = clone_named(named)
    resumed = AdamMini(resumed_named, **kw)
    resumed.load_state_dict(saved)
    run_stream([[p for _, p in named], [p for _, p in resumed_named]], [opt, resumed], steps=3, seed=2)
    for (name, p), (_, q) in zip(named, resumed_named):
        assert torch.equal(p, q), name
        a, b = opt.state[p], resumed.state[q]
        for key in ("m_codes", "m_scales", "m", "vmean", "v"):
            if key in a:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (name, key)
    assert resumed.state[resumed_named[0][1]]["m_scales"].dtype == torch.float32


def test_float_checkpoint_into_int8_quantizes_and_back_dequantizes():
    named = _named()
    float_opt = AdamMini(named, **KW)
    run_stream([[p for _, p in named]], [float_opt], steps=2, none_every=0)
    runs = _runs(float_opt)

    int8_named = clone_named(named)
    int8_opt = AdamMini(int8_named, state_dtype=torch.int8, **KW)
    int8_opt.load_state_dict(copy.deepcopy(float_opt.state_dict()))
    int8_opt._prepare()  # buffers are filled at the next step; build them without stepping
    for (name, p), (_, q) in zip(named, int8_named):
        if name in QUANTIZED:
            codes, scales = quantize_runs(float_opt.state[p]["m"].reshape(-1), runs[name][0])
            assert torch.equal(int8_opt.state[q]["m_codes"].reshape(-1), codes), name
            assert torch.equal(int8_opt.state[q]["m_scales"], scales), name
            err = (_float_m(int8_opt.state[q], runs[name][0]).reshape(-1) - float_opt.state[p]["m"].reshape(-1)).abs().max()
            assert 0 < err <= float_opt.state[p]["m"].abs().max() / 254 * 1.001, name  # lossy: half a code
        else:
            assert torch.equal(int8_opt.state[q]["m"], float_opt.state[p]["m"]), name

    back_named = clone_named(named)
    back = AdamMini(back_named, **KW)
    back.load_state_dict(copy.deepcopy(int8_opt.state_dict()))
    back._prepare()
    for (name, q), (_, r) in zip(int8_named, back_named):
        expected = _float_m(int8_opt.state[q], runs[name][0]) if name in QUANTIZED else int8_opt.state[q]["m"]
        assert torch.equal(back.state[r]["m"].reshape(-1), expected.reshape(-1)), name
        assert "m_codes" not in back.state[r]


@pytest.mark.parametrize("damage", ["one scale short", "one scale extra, no block_runs", "codes not int8", "negative scale"])
def test_bad_codes_in_checkpoint_are_refused(damage):
    named = _named()
    opt = AdamMini(named, state_dtype=torch.int8, **KW)
    run_stream([[p for _, p in named]], [opt], steps=1, none_every=0)
    saved = copy.deepcopy(opt.state_dict())
    state = saved["state"][0]
    if damage == "one scale short":
        state["m_scales"] = state["m_scales"][:-1]
    elif damage == "codes not int8":  # the same values widened: still not codes of this format
        state["m_codes"] = state["m_codes"].to(torch.int16)
    elif damage == "negative scale":  # an absmax is never negative: it would flip its chunk of m
        state["m_scales"][0] = -state["m_scales"][0].abs() - 1e-3
    else:  # the blocks are then taken from the number of vmean values, as for official's layouts
        del state["block_runs"], state["columns"]
        state["m_scales"] = torch.cat([state["m_scales"], state["m_scales"][:1]])
    fresh = AdamMini(clone_named(named), state_dtype=torch.int8, **KW)
    with pytest.raises(ValueError, match="m_codes" if damage == "codes not int8" else "m_scales"):
        fresh.load_state_dict(saved)


def test_compiled_step_matches_eager():
    """opt.step() under torch.compile(fullgraph=True): the same as eager up to float32 rounding
    (inductor reorders the arithmetic): codes within one, parameters and scales to 1e-6."""
    named, compiled_named = _named(), _named()
    eager = AdamMini(named, state_dtype=torch.int8, **KW)
    compiled = AdamMini(compiled_named, state_dtype=torch.int8, **KW)
    run_stream([[p for _, p in named], [p for _, p in compiled_named]], [eager, compiled], steps=1, none_every=0)
    step = torch.compile(compiled.step, fullgraph=True)
    for s in range(3):
        run_stream([[p for _, p in named]], [eager], steps=1, seed=s + 1, none_every=0)
        run_stream([[p for _, p in compiled_named]], [SimpleNamespace(step=step)], steps=1, seed=s + 1, none_every=0)
    for (name, p), (_, q) in zip(named, compiled_named):
        assert max_rel_err(p, q) <= 1e-6, name
        if name in QUANTIZED:
            a, b = eager.state[p], compiled.state[q]
            assert (a["m_codes"].int() - b["m_codes"].int()).abs().max() <= 1, name
            assert max_rel_err(a["m_scales"], b["m_scales"]) <= 1e-6, name
