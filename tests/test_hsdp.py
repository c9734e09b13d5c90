"""Sharded parameters on a 2-D device mesh: HSDP (FSDP2 ``fully_shard`` over a (replicate, shard)
mesh) and hand-placed DTensors, 4 CPU processes with gloo spawned by each test. Each parameter
is sharded over one mesh dim (the others Replicate): the split blocks' sums are all-reduced over
that dim's ranks only, the replicas step alike, and a distributed checkpoint saved on the 2x2
mesh resumes on it and on a 2-rank FSDP2 job (resharded)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from adam_mini_kernels import AdamMini
from grad_stream import max_rel_err
from spawned import COLLECTIVE_TIMEOUT, spawn
from test_cuda_backend import emulator  # noqa: F401  (the fixture)
from test_fsdp import (  # noqa: F401  (backend_arg: the fixture)
    BACKENDS,
    INT8_DIMS,
    KW,
    Recorded,
    _batch,
    _fused_split_blocks,
    _gathered,
    _int8_batch,
    _int8_model,
    _model,
    _optimizer,
    _single_process,
    _teardown,
    backend_arg,
)

pytest.importorskip("torch.distributed.fsdp")
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh  # noqa: E402
from torch.distributed.tensor.placement_types import _StridedShard  # noqa: E402

WORLD = 4
MESH = (2, 2)  # (replicate, shard)
STEPS, SAVE_AT = 8, 4


def _init(rank: int, port: int, world: int = WORLD) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    torch.set_num_threads(1)


def _hsdp_mesh():
    return init_device_mesh("cpu", MESH, mesh_dim_names=("replicate", "shard"))


def _all_reduce_sizes() -> Recorded:
    """The number of ranks of each ``torch.distributed.all_reduce`` call."""
    return Recorded(dist, "all_reduce", lambda tensor, *args, group=None, **kwargs: dist.get_world_size(group))


def _train(model, opt, rank, world, steps, batch=_batch, sizes=None) -> None:
    """Data parallel over every rank: rank ``rank`` of ``world`` takes its chunk of the batch."""
    for step in steps:
        opt.zero_grad()
        model(batch(step).chunk(world)[rank]).backward()
        with _all_reduce_sizes() as recorded:
            opt.step()
        if sizes is not None:
            sizes.append(recorded.records)


def _hsdp_worker(rank, port, out, backend_arg, max_grad_norm, share):
    _init(rank, port)
    try:
        model = _model()
        fully_shard(model, mesh=_hsdp_mesh())
        placements = {tuple(p.placements) for p in model.parameters()}
        opt = _optimizer(model.named_parameters(), backend_arg, max_grad_norm=max_grad_norm, model=model if share else None)
        sizes = []
        _train(model, opt, rank, WORLD, range(STEPS), sizes=sizes)
        shared = sum(len(g.sharded.shared) for g in opt._flat)
        result = {"params": _gathered(model), "sizes": sizes, "placements": placements, "fused_split": _fused_split_blocks(opt),
                  "shared": shared}
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        _teardown()


@pytest.mark.parametrize("backend, max_grad_norm, share", [("torch", 0.05, False), ("triton", None, True), ("cuda-emulated", 0.05, True)])
def test_hsdp_matches_single_process_reducing_over_the_shard_dim_only(tmp_path, backend_arg, max_grad_norm, share):
    """FSDP2 on a (replicate, shard) mesh: every rank equals one process; the split blocks' sums
    (with the clipping norm's squares in the same vector) are all-reduced over the 2 ranks of
    the shard dim, once per step, never over all 4 (which would double them). With the model given, the shards
    FSDP2 does not pad live in the flat buffer (see test_fsdp)."""
    spawn(_hsdp_worker, WORLD, str(tmp_path), backend_arg, max_grad_norm, share)
    expected = _single_process(STEPS, max_grad_norm)  # the same mean over 2 halves as over 4 quarters
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["placements"] == {(Replicate(), Shard(0))}
        for name, p in expected.items():
            assert max_rel_err(p, saved["params"][name]) <= 1e-6, (rank, name)
        assert saved["sizes"] == [[MESH[1]]] * STEPS, saved["sizes"]
        assert (saved["fused_split"] >= 4) == (backend_arg[0] != "torch"), saved["fused_split"]
        # Shard-dim coordinate 0 (ranks 0, 2) has no padding: all 9 shared; coordinate 1 the 4
        # parameters of an even number of rows.
        assert saved["shared"] == ((9 if rank % 2 == 0 else 4) if share else 0), (rank, saved["shared"])


# Hand placements on the 2x2 mesh: sharded over mesh dim 1 (the default), over mesh dim 0, over
# both (as FSDP2 with tensor parallelism places them), or replicated over both.
PLACEMENTS_2D = {
    "q_proj.weight": (Replicate(), Shard(1)),  # every head split over mesh dim 1
    "mlp.weight": (Shard(1), Replicate()),  # every row split over mesh dim 0
    "out_norm.weight": (Shard(0), Replicate()),
    "output.weight": (Replicate(), Replicate()),
    "k_proj.weight": (Shard(0), Shard(1)),  # heads split over all 4 ranks, rows and columns
    "mlp.bias": (Shard(0), Shard(0)),  # one dim split twice (left to right)
    "norm.weight": (_StridedShard(0, split_factor=2), Shard(0)),  # FSDP2 over TP: right to left
}
# The ranks of each group's all-reduce per step: mesh dim 1, mesh dim 0, both.
GROUP_SIZES_2D = [MESH[1], MESH[0], WORLD]
# Shard(0) on a 1-D mesh of 4: rank 3 holds no element of either. Rows of 8 quantization chunks
# (int8 m); a whole-tensor block split over ranks 0-2 (float m: too small for int8; its group is
# empty on rank 3, which still joins the all-reduce of the block's sums).
EMPTY_SHARDS = {"mlp.weight": (3, 2048), "norm.weight": (3,)}
# HSDP with tensor parallelism: a (replicate, shard, tp) mesh of 2 x 1 x 2, the parameters
# replicated over dim 0 and sharded over dims 1 and 2: their split blocks' sums go over the 2
# ranks of one replica (a process group made for them), not over all 4.
MESH_3D = (2, 1, 2)
HSDP_TP_SHARDS = {"mlp.weight": (6, 4), "norm.weight": (6,)}
HSDP_TP_PLACEMENTS = {"mlp.weight": (Replicate(), Shard(0), Shard(1)), "norm.weight": (Replicate(), Shard(0), Shard(0))}
# int8 m on two Shard placements of the 2x2 mesh: rows of 2048 split 1024 / 1024 (whole chunks).
INT8_2D = {"mlp.weight": (4, 2048)}


def _synthetic_grads(shapes: dict, step: int) -> dict:
    gen = torch.Generator().manual_seed(700 + step)
    return {n: torch.randn(shape, generator=gen) for n, shape in shapes.items()}


def _placed_steps(mesh, shapes: dict, placements: dict, seed: int, make_optimizer, recorder):
    """DTensor parameters of ``shapes`` placed on ``mesh`` as ``placements`` says (values of
    ``seed``, as ``_synthetic_run``'s) and 3 steps of their synthetic gradients: (the parameters,
    per step what ``recorder`` recorded of its all-reduces, the optimizer)."""
    torch.manual_seed(seed)
    params = {n: nn.Parameter(distribute_tensor(torch.randn(shape), mesh, placements[n])) for n, shape in shapes.items()}
    opt = make_optimizer(list(params.items()))
    sizes = []
    for step in range(3):
        for n, g in _synthetic_grads(shapes, step).items():
            params[n].grad = distribute_tensor(g, mesh, params[n].placements)
        with recorder() as recorded:
            opt.step()
        sizes.append(recorded.records)
    return params, sizes, opt


def _placed_worker(rank, port, out, backend_arg):
    """DTensors on the 2x2 mesh (full gradients from a plain copy of the model, then placed) and
    an int8 parameter on a 1-D mesh of 4 whose last rank's shard is empty."""
    _init(rank, port)
    try:
        mesh = _hsdp_mesh()
        plain = _model()
        sharded = {
            n: nn.Parameter(distribute_tensor(p.detach(), mesh, list(PLACEMENTS_2D.get(n, (Replicate(), Shard(0))))))
            for n, p in plain.named_parameters()
        }
        opt = _optimizer(list(sharded.items()), backend_arg)
        sizes = []
        for step in range(STEPS):
            plain.zero_grad()
            (sum(plain(part) for part in _batch(step).chunk(WORLD)) / WORLD).backward()
            for n, p in plain.named_parameters():
                sharded[n].grad = distribute_tensor(p.grad, mesh, sharded[n].placements)
            with _all_reduce_sizes() as recorded:
                opt.step()
            sizes.append(recorded.records)
            with torch.no_grad():
                for n, p in plain.named_parameters():
                    p.copy_(sharded[n].full_tensor())

        line = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(5)
        empty = {n: nn.Parameter(distribute_tensor(torch.randn(shape), line, [Shard(0)])) for n, shape in EMPTY_SHARDS.items()}
        int8 = _optimizer(list(empty.items()), backend_arg, state_dtype=torch.int8)
        for step in range(3):
            for n, g in _synthetic_grads(EMPTY_SHARDS, step).items():
                empty[n].grad = distribute_tensor(g, line, [Shard(0)])
            int8.step()

        torch.manual_seed(7)
        int8_2d = {n: nn.Parameter(distribute_tensor(torch.randn(shape), mesh, [Shard(0), Shard(1)])) for n, shape in INT8_2D.items()}
        opt_int8_2d = _optimizer(list(int8_2d.items()), backend_arg, state_dtype=torch.int8)
        for step in range(3):
            for n, g in _synthetic_grads(INT8_2D, step).items():
                int8_2d[n].grad = distribute_tensor(g, mesh, int8_2d[n].placements)
            opt_int8_2d.step()

        cube = init_device_mesh("cpu", MESH_3D, mesh_dim_names=("replicate", "shard", "tp"))
        hsdp_tp, sizes_3d, _ = _placed_steps(cube, HSDP_TP_SHARDS, HSDP_TP_PLACEMENTS, 6, lambda named: _optimizer(named, backend_arg),
                                          _all_reduce_sizes)

        result = {
            "params": {n: p.full_tensor() for n, p in sharded.items()}, "sizes": sizes,
            "empty": {n: p.full_tensor() for n, p in empty.items()},
            "empty_local": {n: tuple(p._local_tensor.shape) for n, p in empty.items()},
            "int8_groups": [g.quantized for g in int8._flat],
            "local": {n: tuple(p._local_tensor.shape) for n, p in sharded.items()},
            "hsdp_tp": {n: p.full_tensor() for n, p in hsdp_tp.items()}, "sizes_3d": sizes_3d,
            "int8_2d": {n: p.full_tensor() for n, p in int8_2d.items()}, "int8_2d_quantized": [g.quantized for g in opt_int8_2d._flat],
        }
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        _teardown()


def _synthetic_run(shapes: dict, seed: int, **kw):
    """One process, 3 steps of the synthetic gradients: (params, their initial values)."""
    torch.manual_seed(seed)
    start = {n: torch.randn(shape) for n, shape in shapes.items()}
    single = {n: nn.Parameter(t.clone()) for n, t in start.items()}
    opt = AdamMini(list(single.items()), **{**KW, **kw})
    for step in range(3):
        for n, g in _synthetic_grads(shapes, step).items():
            single[n].grad = g
        opt.step()
    return single, start


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtensors_on_a_2d_mesh_match_single_process(tmp_path, backend_arg):
    """Parameters sharded over mesh dim 1, over mesh dim 0 and over both (two Shard placements,
    one dim split twice, FSDP2's _StridedShard over a Shard) form three flat groups, each with
    its own all-reduce per step (over the 2, 2 and 4 ranks of its dims); replicated ones need
    none. An int8 m on a mesh of 4 where one rank's shard is empty equals one process, and so do
    parameters sharded over two dims of a 3-D mesh and replicated over the third (HSDP with
    tensor parallelism: one all-reduce over the 2 ranks of a replica), and an int8 m on two
    Shard placements."""
    spawn(_placed_worker, WORLD, str(tmp_path), backend_arg)
    expected = _single_process(STEPS)
    single, start = _synthetic_run(EMPTY_SHARDS, 5, state_dtype=torch.int8)
    single_3d, start_3d = _synthetic_run(HSDP_TP_SHARDS, 6)
    single_int8_2d, _ = _synthetic_run(INT8_2D, 7, state_dtype=torch.int8)
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        for name, p in expected.items():
            assert max_rel_err(p, saved["params"][name]) <= 1e-6, (rank, name)
        assert [sorted(sizes) for sizes in saved["sizes"]] == [sorted(GROUP_SIZES_2D)] * STEPS, saved["sizes"]
        assert saved["local"]["k_proj.weight"] == (3, 4) and saved["local"]["mlp.bias"] == ((2, 1, 1, 1)[rank],)  # 5 -> 3, 2 -> 2, 1, 1, 1
        assert saved["empty_local"] == {"mlp.weight": (1, 2048) if rank < 3 else (0, 2048), "norm.weight": (int(rank < 3),)}
        assert sorted(saved["int8_groups"]) == [False, True]
        for name, p in single.items():
            assert max_rel_err(p.detach(), saved["empty"][name]) <= 1e-6, (rank, name)
            assert not torch.equal(p.detach(), start[name])
        for name, p in single_3d.items():
            assert max_rel_err(p.detach(), saved["hsdp_tp"][name]) <= 1e-6, (rank, name)
            assert not torch.equal(p.detach(), start_3d[name])
        assert saved["sizes_3d"] == [[MESH_3D[1] * MESH_3D[2]]] * 3, saved["sizes_3d"]
        assert saved["int8_2d_quantized"] == [True]
        for name, p in single_int8_2d.items():
            assert max_rel_err(p.detach(), saved["int8_2d"][name]) <= 1e-6, (rank, name)


def _all_reduce_members() -> Recorded:
    """The number of ranks of each ``torch.distributed.all_reduce`` call's group, as the current
    process group set knows it (a KeyError for a group of a destroyed set, on which a collective
    is undefined: gloo's may still reach the same peers)."""
    return Recorded(dist, "all_reduce", lambda tensor, *args, group=None, **kwargs: len(dist.get_process_group_ranks(group or dist.group.WORLD)))


def _reinit_worker(rank, port, out):
    """Two jobs in one process, the process group destroyed and made again between them (as a
    test suite or a notebook does): each steps the HSDP-with-TP parameters, whose split blocks'
    sums go over a process group made for the ranks of a replica. The second job must make its
    own: the first's went with the first process group set."""
    runs = []
    for job in range(2):
        if job == 0:
            _init(rank, port)
        else:
            dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                                    timeout=COLLECTIVE_TIMEOUT)
        try:
            cube = init_device_mesh("cpu", MESH_3D, mesh_dim_names=("replicate", "shard", "tp"))
            params, sizes, _ = _placed_steps(cube, HSDP_TP_SHARDS, HSDP_TP_PLACEMENTS, 6, lambda named: AdamMini(named, backend="torch", **KW),
                                          _all_reduce_members)
            runs.append({"params": {n: p.full_tensor() for n, p in params.items()}, "sizes": sizes})
        finally:
            _teardown()
    torch.save(runs, f"{out}/rank{rank}.pt")


def test_a_second_process_group_set_gets_its_own_replica_groups(tmp_path):
    spawn(_reinit_worker, WORLD, str(tmp_path))
    single, _ = _synthetic_run(HSDP_TP_SHARDS, 6)
    for rank in range(WORLD):
        for run in torch.load(tmp_path / f"rank{rank}.pt"):
            assert run["sizes"] == [[MESH_3D[1] * MESH_3D[2]]] * 3, run["sizes"]
            for name, p in single.items():
                assert max_rel_err(p.detach(), run["params"][name]) <= 1e-6, (rank, name)


# Clipping with a group of replicated DTensors first: (Replicate, Replicate) output weight, then
# HSDP shards of whole rows (no block split across ranks).
CLIP_SHAPES = {"output.weight": (3, 8), "mlp.weight": (4, 8), "mlp.bias": (4,)}
CLIP_PLACEMENTS = {"output.weight": (Replicate(), Replicate()), "mlp.weight": (Replicate(), Shard(0)), "mlp.bias": (Replicate(), Shard(0))}


def _replicated_first_worker(rank, port, out):
    _init(rank, port)
    try:
        params, sizes, opt = _placed_steps(_hsdp_mesh(), CLIP_SHAPES, CLIP_PLACEMENTS, 9,
                                           lambda named: AdamMini(named, backend="torch", max_grad_norm=0.05, **KW), _all_reduce_sizes)
        torch.save({"params": {n: p.full_tensor() for n, p in params.items()}, "sizes": sizes,
                    "first": [layout.name for layout in opt._flat[0].layouts]}, f"{out}/rank{rank}.pt")
    finally:
        _teardown()


def test_clipping_norm_is_summed_over_the_shard_dim_with_a_replicated_group_first(tmp_path):
    """The shards' squared norms go over the ranks of their shard dim (2), not over those of the
    replicated group's process group, though that group steps first and has no split block
    either: one all-reduce per step, and the run equals one process."""
    spawn(_replicated_first_worker, WORLD, str(tmp_path))
    single, _ = _synthetic_run(CLIP_SHAPES, 9, max_grad_norm=0.05)
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["first"] == ["output.weight"] and saved["sizes"] == [[MESH[1]]] * 3, saved
        for name, p in single.items():
            assert max_rel_err(p.detach(), saved["params"][name]) <= 1e-6, (rank, name)


# What the checkpoint test trains: (model, optimizer, batch).
RUNS = {
    "name_rules": (_model, lambda model: AdamMini(model.named_parameters(), **KW), _batch),
    "int8": (_int8_model, lambda model: AdamMini(model.named_parameters(), state_dtype=torch.int8, **{**KW, **INT8_DIMS}), _int8_batch),
}


def _dcp_worker(rank, port, out, run, phase):
    """phase "straight": train on the 2x2 mesh, saving at SAVE_AT; "hsdp": a fresh 2x2 job
    resumes from the checkpoint; "fsdp2": a fresh 2-rank job on a 1-D mesh resumes from it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    make_model, make_optimizer, batch = RUNS[run]
    world = 2 if phase == "fsdp2" else WORLD
    _init(rank, port, world)
    try:
        model = make_model()
        if phase != "straight":  # other initial values, overwritten by the checkpoint
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_()
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)) if phase == "fsdp2" else _hsdp_mesh())
        opt = make_optimizer(model)
        if phase == "straight":
            _train(model, opt, rank, world, range(SAVE_AT), batch)
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.save(state, checkpoint_id=f"{out}/ckpt")
        else:
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=f"{out}/ckpt")
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
        _train(model, opt, rank, world, range(SAVE_AT, STEPS), batch)
        int8 = sum(len(g.params) for g in opt._flat if g.quantized)
        torch.save({"params": _gathered(model), "int8_params": int8}, f"{out}/{phase}{rank}.pt")
    finally:
        _teardown()


@pytest.mark.parametrize("run", list(RUNS))
def test_checkpoint_saved_on_hsdp_resumes_on_hsdp_and_on_fsdp2(tmp_path, run):
    """The saved state does not depend on the mesh (m sharded like the parameter, vmean and
    the int8 scales replicated in global block order): resuming on the same 2x2 mesh is bitwise,
    on 2 ranks of a 1-D mesh (other shards, resharded by the checkpoint) within 1e-6 of the
    uninterrupted run."""
    for phase in ("straight", "hsdp", "fsdp2"):
        spawn(_dcp_worker, 2 if phase == "fsdp2" else WORLD, str(tmp_path), run, phase)
    straight = torch.load(tmp_path / "straight0.pt")
    assert straight["int8_params"] == (3 if run == "int8" else 0)  # q_proj, mlp, norm weights
    for phase, ranks in (("straight", WORLD), ("hsdp", WORLD), ("fsdp2", 2)):
        for rank in range(ranks):
            saved = torch.load(tmp_path / f"{phase}{rank}.pt")
            assert saved["int8_params"] == straight["int8_params"]
            for name, p in straight["params"].items():
                if phase == "hsdp":
                    assert torch.equal(p, saved["params"][name]), (phase, rank, name)
                else:
                    assert max_rel_err(p, saved["params"][name]) <= 1e-6, (phase, rank, name)
