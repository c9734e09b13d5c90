"""Small model trees the tests train: real ``transformers`` models from tiny random configs (no
download) and hand-made trees covering the partition's corner cases.

Each builder returns ``(model, batch_fn, opt_kwargs)``: ``batch_fn(step, generator)`` returns a
fresh random input for which ``model(x)`` is a scalar loss, and ``opt_kwargs`` the model
dimensions for the optimizer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 64
# GPT-OSS's default rope (YaRN, scaled for long contexts) warns on tiny configs: plain rope.
GPT_OSS_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def skip_without_fused_experts():
    """transformers 4 keeps experts as lists of nn.Linear (for_model's Linear rule) or, for
    GPT-OSS, as 3-D weights that do not say how they are stored: for_model's expert rule reads
    the ``is_transposed`` of transformers 5's fused experts."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("fused MoE experts need transformers >= 5")


def _tokens(batch: int, seq: int):
    def batch_fn(step, gen):
        return torch.randint(0, VOCAB, (batch, seq), generator=gen)

    return batch_fn


class _LMLoss(nn.Module):
    """Wraps a causal LM so that ``forward(tokens)`` is the next-token loss."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, x):
        return self.lm(input_ids=x, labels=x).loss


def llama_gqa():
    transformers = pytest.importorskip("transformers")
    LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None,
    )
    return _LMLoss(LlamaForCausalLM(cfg)), _tokens(3, 8), dict(dim=32, n_heads=4, n_kv_heads=2)


def gpt2_tied():
    transformers = pytest.importorskip("transformers")
    GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=1,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # deterministic: two copies must see the same grads
    )
    return _LMLoss(GPT2LMHeadModel(cfg)), _tokens(3, 8), dict(dim=32, n_heads=4)


class NanoBlock(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.ln_1 = nn.LayerNorm(dim)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=True)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 3 * dim), nn.GELU(), nn.Linear(3 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln_1(x)
        q = self.wq(h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(h).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(h).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.wo(a)
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT-style names (wq, wk, wv, wo, mlp, ln_1, lm_head) plus the corner cases: a frozen
    parameter, a zero-size parameter, and a parameter (``gate``) used only on even steps. With
    ``beyond_official``, also a 1-D and a 3-D parameter under a row rule, where official 1.1.1
    crashes or mis-partitions (so these are checked against the reference only)."""

    def __init__(self, dim=32, n_heads=4, n_kv_heads=2, n_layer=2, beyond_official=False):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(NanoBlock(dim, n_heads, n_kv_heads) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)
        self.frozen_scale = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.empty_mlp = nn.Parameter(torch.zeros(0, dim))
        if beyond_official:
            self.mlp_scale_1d = nn.Parameter(torch.ones(dim))  # row rule, 1-D: one whole block
            self.mlp_mix_3d = nn.Parameter(torch.randn(3, 4, dim) * 0.02)  # row rule, 3-D: dim-0 slices
        self.beyond_official = beyond_official
        self.gate = nn.Parameter(torch.randn(dim) * 0.1)
        self.use_gate = True

    def forward(self, x):
        h = self.wte(x) * self.frozen_scale + self.empty_mlp.sum()
        if self.beyond_official:
            h = h * self.mlp_scale_1d + self.mlp_mix_3d.sum(dim=(0, 1))
        if self.use_gate:
            h = h * (1 + self.gate)
        for block in self.blocks:
            h = block(h)
        logits = self.lm_head(self.ln_f(h))
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))


def nanogpt(beyond_official=False):
    model = NanoGPT(beyond_official=beyond_official)
    base = _tokens(3, 8)

    def batch_fn(step, gen):
        model.use_gate = step % 2 == 0  # the gate's grad is None on odd steps
        return base(step, gen)

    return model, batch_fn, dict(dim=32, n_heads=4, n_kv_heads=2)


class SmallCNN(nn.Module):
    """No transformer names: every weight is one whole-tensor block, biases are Adam blocks."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.conv1(x)))
        h = F.relu(self.conv2(h)).mean(dim=(2, 3))
        return self.fc(h).logsumexp(dim=1).mean()


def cnn():
    def batch_fn(step, gen):
        return torch.randn(4, 3, 8, 8, generator=gen)

    return SmallCNN(), batch_fn, {}


MODELS = {
    "llama_gqa": llama_gqa,
    "gpt2_tied": gpt2_tied,
    "nanogpt": nanogpt,
    "nanogpt_beyond_official": lambda: nanogpt(beyond_official=True),
    "cnn": cnn,
}
OFFICIAL_SAFE = ("llama_gqa", "gpt2_tied", "nanogpt", "cnn")


def build(name: str, seed: int = 0):
    """A fresh model (seeded) with its batch function and optimizer dims."""
    torch.manual_seed(seed)
    return MODELS[name]()


def train(model, opt, batch_fn, steps: int, seed: int = 1, start: int = 0):
    """Steps ``start`` .. ``start + steps - 1`` of zero_grad / backward / step; the batch of each
    step depends only on ``seed`` and the step number, so a resumed run sees the same data."""
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        opt.zero_grad()
        model(batch_fn(step, gen)).backward()
        opt.step()
