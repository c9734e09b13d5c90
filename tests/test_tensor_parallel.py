"""FSDP2 with tensor parallelism (2-D parallelism), 4 CPU processes with gloo spawned by each test.

``parallelize_module`` shards the attention and MLP weights over the "tp" dim of a (dp, tp) mesh
(``ColwiseParallel``: rows, ``RowwiseParallel``: columns), then ``fully_shard`` shards every
parameter over "dp": the TP weights become DTensors on the 2-D mesh with two shard placements,
``(_StridedShard(0), Shard(0))`` for column-wise ones (rows split by tp first, then by dp) and
``(Shard(0), Shard(1))`` for row-wise ones; the rest sit on the 1-D dp mesh. Heads and rows are
split over both dims: their sums of g^2 are all-reduced over all 4 ranks, once per step for the
flat group of the 2-D parameters, and a distributed checkpoint resumes bitwise."""

import pytest
import torch
import torch.nn as nn

import models
from adam_mini_kernels import AdamMini
from adam_mini_kernels.optimizer import TRACES_SHARED_SHARDS
from grad_stream import max_rel_err
from spawned import spawn
from test_cuda_backend import emulator  # noqa: F401  (the fixture)
from test_fsdp import _fused_split_blocks, _gathered, _optimizer, _teardown, backend_arg  # noqa: F401  (backend_arg: the fixture)
from test_hsdp import _all_reduce_sizes, _init

pytest.importorskip("torch.distributed.fsdp")
pytest.importorskip("torch.distributed.tensor.parallel")
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import init_device_mesh  # noqa: E402
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module  # noqa: E402

WORLD, MESH = 4, (2, 2)  # (dp, tp)
STEPS, SAVE_AT = 8, 4
# Two heads of 4 rows of 8 (32 elements): each tp rank holds one head, split 2/2 over dp. mlp: 10
# rows, 5 per tp rank, split 3/2 over dp (FSDP2 pads the shorter); down_proj's rows of 10 are
# split 5/5 over tp, its 8 rows 4/4 over dp.
KW = dict(lr=1e-2, weight_decay=0.1, verbose=False, dim=8, n_heads=2)
TP_PLAN = {
    "q_proj": ColwiseParallel(),
    "k_proj": ColwiseParallel(),
    "o_proj": RowwiseParallel(),
    "up_proj": ColwiseParallel(),
    "down_proj": RowwiseParallel(),
}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.q_proj = nn.Linear(8, 8, bias=False)
        self.k_proj = nn.Linear(8, 8, bias=False)
        self.o_proj = nn.Linear(8, 8, bias=False)
        self.up_proj = nn.Linear(8, 10)
        self.down_proj = nn.Linear(10, 8)
        self.output = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        h = self.norm(x)
        a = self.o_proj(torch.tanh(self.q_proj(h) * self.k_proj(h)))
        return self.output(h + a + self.down_proj(torch.relu(self.up_proj(h)))).square().mean()


def _model() -> Block:
    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _batch(step: int) -> torch.Tensor:
    return torch.randn(8, 8, generator=torch.Generator().manual_seed(100 + step))


def _single_run(steps: int, max_grad_norm=None):
    """The reference: the dp ranks' halves of each batch in one process (FSDP2 averages them).
    Returns the model and its optimizer."""
    model = _model()
    opt = _optimizer(model.named_parameters(), ("torch", None), **{**KW, "max_grad_norm": max_grad_norm})
    for step in range(steps):
        opt.zero_grad()
        (sum(model(half) for half in _batch(step).chunk(MESH[0])) / MESH[0]).backward()
        opt.step()
    return model, opt


def _single_process(steps: int, max_grad_norm=None) -> dict:
    model, _ = _single_run(steps, max_grad_norm)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _parallel_model():
    mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("dp", "tp"))
    model = _model()
    parallelize_module(model, mesh["tp"], TP_PLAN)
    fully_shard(model, mesh=mesh["dp"])
    return model, mesh


def _train(model, opt, mesh, steps, sizes=None, step_fn=None) -> None:
    """Data parallel over dp: the tp ranks of a dp coordinate take the same half of the batch.
    ``step_fn``: what steps after the first step (``opt.step`` if None)."""
    dp = mesh.get_coordinate()[0]
    for step in steps:
        opt.zero_grad()
        model(_batch(step).chunk(MESH[0])[dp]).backward()
        with _all_reduce_sizes() as recorded:
            (opt.step if step == 0 or step_fn is None else step_fn)()
        if sizes is not None:
            sizes.append(recorded.records)


def _worker(rank, port, out, backend_arg, max_grad_norm, compiled=False):
    _init(rank, port)
    try:
        model, mesh = _parallel_model()
        # As (type, dim) pairs: torch 2.11's torch.load refuses to unpickle a _StridedShard.
        placements = {n: tuple((type(pl).__name__, getattr(pl, "dim", None)) for pl in p.placements)
                      for n, p in model.named_parameters()}
        opt = _optimizer(model.named_parameters(), backend_arg, **{**KW, "max_grad_norm": max_grad_norm}, model=model)
        sizes = []
        _train(model, opt, mesh, range(STEPS), sizes, torch.compile(opt.step, fullgraph=True) if compiled else None)
        result = {"params": _gathered(model), "placements": placements, "sizes": sizes,
                  "fused_split": _fused_split_blocks(opt), "local": {n: tuple(p._local_tensor.shape) for n, p in model.named_parameters()}}
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        _teardown()


@pytest.mark.parametrize(
    "backend, max_grad_norm, compiled",
    [("torch", None, False), ("torch", 0.05, False), ("torch", 0.05, True), ("triton", None, False), ("cuda-emulated", 0.05, False)],
)
def test_fsdp2_with_tensor_parallelism_matches_single_process(tmp_path, backend_arg, max_grad_norm, compiled):
    """Every rank equals one process to 1e-6 after 8 steps; the flat group of the 2-D parameters
    all-reduces its split blocks' sums over all 4 ranks and the 1-D (dp) parameters' group over
    the 2 dp ranks, once per step each, also with clipping (the norm's squares ride in them). ``compiled``:
    every step after the first through ``torch.compile(opt.step, fullgraph=True)``, the same."""
    if compiled and not TRACES_SHARED_SHARDS:
        pytest.skip(f"torch {torch.__version__} refuses compiled steps over shared shards (test_fsdp tests the refusal)")
    spawn(_worker, WORLD, str(tmp_path), backend_arg, max_grad_norm, compiled)
    expected = _single_process(STEPS, max_grad_norm)
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        placements = saved["placements"]
        for name in ("q_proj.weight", "k_proj.weight", "up_proj.weight", "up_proj.bias"):
            assert placements[name] == (("_StridedShard", 0), ("Shard", 0)), placements[name]
        assert placements["o_proj.weight"] == placements["down_proj.weight"] == (("Shard", 0), ("Shard", 1))
        assert placements["down_proj.bias"] == (("Shard", 0), ("Replicate", None))
        assert placements["norm.weight"] == (("Shard", 0),)
        assert saved["local"]["up_proj.weight"] == ((3, 8) if rank // 2 == 0 else (2, 8))  # dp coordinate 0: 3 of 5 rows
        for name, p in expected.items():
            assert max_rel_err(p, saved["params"][name]) <= 1e-6, (rank, name)
        # The clipping norm's squares ride in those two: clipping adds no collective.
        assert [sorted(s) for s in saved["sizes"]] == [sorted([MESH[0], WORLD])] * STEPS, saved["sizes"]
        assert (saved["fused_split"] > 0) == (backend_arg[0] != "torch")


def _dcp_worker(rank, port, out, phase):
    """phase "straight": train, saving at SAVE_AT; "resumed": a fresh job loads it and goes on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    _init(rank, port)
    try:
        model, mesh = _parallel_model()
        opt = _optimizer(model.named_parameters(), ("torch", None), **KW, model=model)
        if phase == "straight":
            _train(model, opt, mesh, range(SAVE_AT))
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=f"{out}/ckpt")
        else:
            with torch.no_grad():  # other values, overwritten by the checkpoint
                for p in model.parameters():
                    p.normal_()
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=f"{out}/ckpt")
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
        _train(model, opt, mesh, range(SAVE_AT, STEPS))
        torch.save({"params": _gathered(model)}, f"{out}/{phase}{rank}.pt")
    finally:
        _teardown()


def test_checkpoint_of_fsdp2_with_tensor_parallelism_resumes_bitwise(tmp_path):
    """m saved sharded like the 2-D parameters, vmean replicated: a fresh 2x2 job that loads the
    distributed checkpoint continues exactly as the uninterrupted run."""
    for phase in ("straight", "resumed"):
        spawn(_dcp_worker, WORLD, str(tmp_path), phase)
    for rank in range(WORLD):
        straight, resumed = (torch.load(tmp_path / f"{phase}{rank}.pt")["params"] for phase in ("straight", "resumed"))
        for name, p in straight.items():
            assert torch.equal(p, resumed[name]), (rank, name)


def _single_state_worker(rank, port, out):
    """Train SAVE_AT steps, then a fresh optimizer loads the single-process optimizer's state
    dict at that step (each rank keeps its part of every 2-D parameter's state) and goes on."""
    _init(rank, port)
    try:
        model, mesh = _parallel_model()
        opt = _optimizer(model.named_parameters(), ("torch", None), **KW, model=model)
        _train(model, opt, mesh, range(SAVE_AT))
        _, single = _single_run(SAVE_AT)
        opt = _optimizer(model.named_parameters(), ("torch", None), **KW, model=model)  # a fresh one: no state
        opt.load_state_dict(single.state_dict())
        _train(model, opt, mesh, range(SAVE_AT, STEPS))
        torch.save({"params": _gathered(model)}, f"{out}/rank{rank}.pt")
    finally:
        _teardown()


def test_single_process_state_loads_into_fsdp2_with_tensor_parallelism(tmp_path):
    """A single-process state dict (plain tensors of the global shapes) loaded into the 2-D job
    is cut to each rank's ranges, _StridedShard's included: the run goes on as one process."""
    spawn(_single_state_worker, WORLD, str(tmp_path))
    expected = _single_process(STEPS)
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt")["params"]
        for name, p in expected.items():
            assert max_rel_err(p, saved[name]) <= 1e-6, (rank, name)


LLAMA_TP_PLAN = {
    "self_attn.q_proj": ColwiseParallel(),
    "self_attn.k_proj": ColwiseParallel(),
    "self_attn.v_proj": ColwiseParallel(),
    "self_attn.o_proj": RowwiseParallel(),
    "mlp.gate_proj": ColwiseParallel(),
    "mlp.up_proj": ColwiseParallel(),
    "mlp.down_proj": RowwiseParallel(),
}
LLAMA_KW = dict(lr=1e-2, weight_decay=0.1, verbose=False)
# Tensor parallelism sums row-wise matmuls in another order: the gradients differ from one
# process's by rounding, the parameters by ~3e-7 after 1 to 4 steps; a real LM at lr 1e-2
# amplifies that past 1e-6 by step 8 (5e-6 in k_proj), so 4 steps are compared.
LLAMA_STEPS = 4


def _llama_tokens(step: int) -> torch.Tensor:
    return torch.randint(0, models.VOCAB, (4, 8), generator=torch.Generator().manual_seed(300 + step))


def _llama() -> nn.Module:
    torch.manual_seed(0)
    return models.llama_gqa()[0]


def _llama_single(steps: int) -> dict:
    model = _llama()
    opt = AdamMini.for_model(model.lm, **LLAMA_KW)
    for step in range(steps):
        opt.zero_grad()
        (sum(model(half) for half in _llama_tokens(step).chunk(MESH[0])) / MESH[0]).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _llama_worker(rank, port, out):
    _init(rank, port)
    try:
        mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("dp", "tp"))
        model = _llama()
        for layer in model.lm.model.layers:
            parallelize_module(layer, mesh["tp"], LLAMA_TP_PLAN)
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        opt = AdamMini.for_model(model.lm, **LLAMA_KW)
        dp = mesh.get_coordinate()[0]
        counts = []
        for step in range(LLAMA_STEPS):
            opt.zero_grad()
            model(_llama_tokens(step).chunk(MESH[0])[dp]).backward()
            with _all_reduce_sizes() as recorded:
                opt.step()
            counts.append(len(recorded.records))
        two_d = sum(p.device_mesh.ndim == 2 for p in model.parameters())
        torch.save({"params": _gathered(model), "counts": counts, "two_d": two_d}, f"{out}/rank{rank}.pt")
    finally:
        _teardown()


def test_for_model_on_an_hf_llama_with_fsdp2_and_tensor_parallelism(tmp_path):
    """AdamMini.for_model on a transformers Llama (GQA) whose attention and MLP weights are
    tensor parallel and every parameter FSDP2-sharded: its blocks are those of the global
    shapes (the config's heads, kv heads), and 4 steps equal one process to 1e-6."""
    spawn(_llama_worker, WORLD, str(tmp_path))
    expected = _llama_single(LLAMA_STEPS)
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["two_d"] == 2 * len(LLAMA_TP_PLAN)  # 2 layers
        for name, p in expected.items():
            assert max_rel_err(p, saved["params"][name]) <= 1e-6, (rank, name)
        assert saved["counts"] == [2] * LLAMA_STEPS  # the 2-D group's and the dp group's
