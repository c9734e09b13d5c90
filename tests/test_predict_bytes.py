"""bench/predict_bytes.py counts the launches a fused step makes (launch_tables.fused_sums, fused_update)."""

import torch

from adam_mini_kernels import AdamMini
from adam_mini_kernels import launch_tables
from adam_mini_kernels.dispatch import BackendStep
from bench import param_sets as PS
from bench import predict_bytes

# Launches per call of each fused operator (triton_kernels/launch.py).
LAUNCHES = dict(step_coefficients=1, rows_step=1, large_blocks_sumsq=2, large_blocks_update=2, adam_step=1)


class _Recorder:
    def __init__(self):
        self.launches = 0

    def __getattr__(self, name):
        if name not in LAUNCHES:
            raise AttributeError(name)

        def op(*args, **kwargs):
            self.launches += LAUNCHES[name]

        return op


def _launches_of_one_step(pset):
    named = [(n, torch.nn.Parameter(torch.zeros(shape))) for n, shape in pset.shapes]
    for _, p in named:
        p.grad = torch.zeros_like(p)
    opt = AdamMini(named, verbose=False, backend="torch", **pset.model_args)
    rec = _Recorder()
    opt._step_fn = BackendStep(
        lambda group, inv_scale: launch_tables.fused_sums(group, rec, inv_scale),
        lambda group, sums, *factors: launch_tables.fused_update(group, rec, sums, *factors),
    )
    opt.step()
    return rec.launches


def test_predicted_launches_match_the_fused_step():
    for key in PS.SET_KEYS:
        pset = PS.make_set(key, smoke=True)
        assert predict_bytes.traffic(pset)["launches"] == _launches_of_one_step(pset), key
