"""Adam-mini with every block of one element is AdamW: an oracle independent of official.

With ``adam_block_names = {""}`` (the empty string is a substring of every name) every parameter
is an Adam block, so each element has its own ``v`` and the step is torch's AdamW update
(``denom = sqrt(v) / sqrt(1 - beta2^t) + eps``, step size ``lr / (1 - beta1^t)``, decoupled
decay ``p *= 1 - lr * wd``). Checked on every backend that runs here against
``torch.optim.AdamW`` given the same gradients, with weight decay, official's decay exemptions
(``norm``, ``ln``, ``bias``) as AdamW param groups, a per-group lr, and a parameter that skips a
step (no gradient: AdamW leaves it and its step count alone, and so must we).
"""

from __future__ import annotations

import pytest
import torch

from adam_mini_kernels import AdamMini, available_backends
from adam_mini_kernels.partition import NO_DECAY_KEYS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HPARAMS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
STEPS = 12
RTOL = 1e-6  # float32: both sides round each operation; only FMA contraction and order differ


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # odd sizes: rows and tensors not multiples of any vector width
    return torch.nn.Sequential(torch.nn.Linear(13, 33), torch.nn.LayerNorm(33), torch.nn.Linear(33, 7)).to(DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_all_adam_blocks_equal_torch_adamw(backend):
    if backend not in available_backends([DEVICE]):
        pytest.skip(f"backend {backend} does not run on {DEVICE} here")
    ours_model, ref_model = _model(), _model()
    ours = AdamMini(ours_model.named_parameters(), backend=backend, verbose=False, **HPARAMS)
    ours.adam_block_names = {""}
    # The first layer's weight gets an lr of its own (its own param group in ours, as official).
    assert ours.param_groups[0]["name"] == "0.weight"
    ours.param_groups[0]["lr"] = 3e-3
    named = list(ref_model.named_parameters())
    decayed = [p for n, p in named[1:] if not any(k in n for k in NO_DECAY_KEYS)]
    exempt = [p for n, p in named[1:] if any(k in n for k in NO_DECAY_KEYS)]
    ref = torch.optim.AdamW(
        [{"params": [named[0][1]], "lr": 3e-3}, {"params": decayed}, {"params": exempt, "weight_decay": 0.0}], **HPARAMS
    )

    gen = torch.Generator(device=DEVICE).manual_seed(1)
    ours_params, ref_params = list(ours_model.parameters()), list(ref_model.parameters())
    for step in range(STEPS):
        for i, (p, q) in enumerate(zip(ours_params, ref_params)):
            idle = i == 2 and step % 3 == 1  # the LayerNorm weight skips every third step
            g = None if idle else torch.randn(p.shape, generator=gen, device=DEVICE)
            p.grad, q.grad = (None, None) if g is None else (g.clone(), g.clone())
        ours.step()
        ref.step()

    assert [r["rule"] for r in ours.partition_summary()] == ["adam"] * len(ours_params)
    for (name, p), q in zip(ours_model.named_parameters(), ref_params):
        err = ((p - q).abs().max() / q.abs().max()).item()
        assert err <= RTOL, f"{name}: relative error {err:.2e} against AdamW"
    # The idle parameter's step count is AdamW's.
    assert ours.state_dict()["state"][2]["step"] == int(ref.state[ref_params[2]]["step"]) == STEPS - 4
