#!/usr/bin/env python
"""Time ``opt.step()`` of Adam-mini implementations and AdamW side by side, on real shapes.

    python bench/bench_step.py                      # GPU: the three SPEC sets + the size sweep
    python bench/bench_step.py --smoke --out /tmp/b # CPU: tiny shapes, seconds (the CI test)

For each parameter set (``param_sets.py``: Llama-1.1B shapes fp32 and bf16, HF GPT-2 124M fp32,
and a Llama-shape sweep from ~1M to ~1.1B parameters) it builds plain tensors with the real names
and shapes, fills their gradients with random data once, and times one optimizer at a time:

* ``AdamMini`` with each requested backend (``--backends``, default torch,triton,cuda), asked for
  by name: a backend that cannot run is a row saying why;
* ``torch.compile`` of ``opt.step()`` of ``AdamMini(backend="torch")``, what a user could do;
* ``torch.optim.AdamW`` with ``foreach=True`` and with ``fused=True``;
* official ``adam-mini`` 1.1.1 (``from adam_mini import Adam_mini``), a row saying so if absent.

Each optimizer is built on fresh tensors (the same values for all), stepped a few times, then
timed with ``triton.testing.do_bench`` (CUDA events, median and 20th/80th percentiles; on the
CPU a host-timer fallback), then freed before the next. Failures (OOM included) are rows with the
error. The same run measures the device copy bandwidth, and per row derives the minimum bytes
the step must move, the achieved GB/s and the fraction of the bandwidth floor, the optimizer
state bytes per parameter and the extra peak memory of one step (see bench/NOTES.md for the
byte counts). Results go to ``<out>/<device>_<date>[_<tag>].json`` with a .md table and a .png
plot beside it; the table is printed at the end.
"""

from __future__ import annotations

import os
import sys

# Timing Triton's interpreter would be meaningless: switch it off before triton is imported.
_DROPPED_INTERPRET = os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import param_sets as PS  # noqa: E402
from arguments import nonnegative_float, nonnegative_int, positive_float, positive_int  # noqa: E402
import provenance  # noqa: E402
from provenance import git_info  # noqa: E402
import report  # noqa: E402

SCHEMA_VERSION = 1
LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.1
SEED = 1234

# SPEC section 5: measured on an NVIDIA H100 80GB HBM3 with torch 2.11+cu130 and triton 3.6. They
# are references from another run, kept apart from this run's measurements.
SPEC_REFERENCE = {
    "source": "shared/SPEC.md section 5",
    "device": "NVIDIA H100 80GB HBM3",
    "software": "torch 2.11+cu130, triton 3.6",
    "copy_gbps": 2984.0,
    "sets": {
        "llama-1.1b-fp32": {"adamw-foreach": 34.8, "adamw-fused": 13.2, "official": 42.8, "floor": 7.37, "target": 7.6},
        "gpt2-124m-fp32": {"adamw-foreach": 4.81, "adamw-fused": 1.92, "official": 17.9, "floor": 0.83, "target": 0.90},
        "llama-1.1b-bf16": {"adamw-foreach": 20.2, "adamw-fused": 8.20, "official": 45.8, "floor": 3.69, "target": 3.85},
    },
}
FUSED_BACKENDS = ("triton", "cuda")  # the targets of SPEC section 5 are for these
# Issue 10's targets for the fused backends with int8 m (state_dtype=torch.int8), H100 ms.
INT8_TARGETS = {"llama-1.1b-fp32": 5.4, "llama-1.1b-bf16": 3.1}
# Issue 6's target for bf16 params with float32 state (state_dtype=torch.float32; 14 B/param,
# floor 5.16 ms), H100 ms.
FP32_STATE_TARGETS = {"llama-1.1b-bf16": 5.4}


# The names of SPEC_REFERENCE's device (the SXM H100): a PCIe H100 (HBM2e) or an H100 NVL has
# another HBM bandwidth, so, like any other GPU, it gets the targets scaled by the copy bandwidths.
TARGET_DEVICE_NAMES = ("H100 80GB HBM3", "H100 SXM")


def is_target_device(name: str) -> bool:
    """Whether the targets apply as measured on the device of this name (SPEC_REFERENCE's)."""
    return any(n in name for n in TARGET_DEVICE_NAMES)


def h100_target_ms(spec: "OptSpec", set_key: str) -> Optional[float]:
    """The H100 target of a row (SPEC section 5 for the plain fused step, issue 10 for int8 m,
    issue 6 for float32 state), or None: other rows (anchors, compiled, graphs, the other
    variants) have none."""
    if spec.backend not in FUSED_BACKENDS or spec.compiled or spec.graph:
        return None
    if spec.variant is None:
        return SPEC_REFERENCE["sets"].get(set_key, {}).get("target")
    targets = {"int8-state": INT8_TARGETS, "fp32-state": FP32_STATE_TARGETS}.get(spec.variant, {})
    return targets.get(set_key)


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptSpec:
    id: str  # stable id in the results: ours-<backend>, ours-torch-compile, adamw-*, official
    label: str
    family: str  # "adam-mini" or "adamw": which minimum byte count applies
    backend: Optional[str] = None  # AdamMini backend
    compiled: bool = False
    variant: Optional[str] = None  # one of VARIANTS (AdamMini options of issue 6), or None
    graph: bool = False  # capturable=True, step() captured once in a CUDA graph, replays timed


# AdamMini rows beyond the plain step (``--optimizers variants``): mixed precision and clipping.
CLIP = 1.0
VARIANTS = {
    "fp32-state": "state_dtype=float32",  # 16-bit sets only
    "stochastic-rounding": "stochastic_rounding=True",  # bf16 sets only
    "clip": f"max_grad_norm={CLIP:g}",
    "clip-then-step": f"clip_grad_norm_({CLIP:g}, foreach) + step",  # what clipping costs without us
    "int8-state": "state_dtype=int8",  # issue 10: m as 8-bit codes + a scale per 256 elements
}
# 8-bit AdamW anchors of issue 10 (``--optimizers adamw8bit``): id -> (label, module to import).
ADAMW_8BIT = {
    "adamw8bit-torchao": ("torchao AdamW8bit", "torchao.optim"),
    "adamw8bit-bnb": ("bitsandbytes AdamW8bit", "bitsandbytes.optim"),
}
QBLOCK = 256  # elements per 8-bit quantization block (ours, torchao's and bitsandbytes' default)


def optimizer_specs(backends: List[str], which: List[str]) -> List[OptSpec]:
    """The rows of one set, in the order they run: the anchors first, then our backends (an
    unverified fused kernel that breaks the CUDA context then costs the fewest rows)."""
    specs = []
    if "adamw-foreach" in which:
        specs.append(OptSpec("adamw-foreach", "torch AdamW (foreach)", "adamw"))
    if "adamw-fused" in which:
        specs.append(OptSpec("adamw-fused", "torch AdamW (fused)", "adamw"))
    if "official" in which:
        specs.append(OptSpec("official", "adam-mini 1.1.1 (official)", "adam-mini"))
    if "ours" in which:
        if "torch" in backends:
            specs.append(OptSpec("ours-torch", "AdamMini [torch]", "adam-mini", backend="torch"))
    if "compile" in which:
        specs.append(OptSpec("ours-torch-compile", "torch.compile(AdamMini [torch].step)", "adam-mini", "torch", True))
    if "ours" in which:
        for b in backends:
            if b != "torch":
                specs.append(OptSpec(f"ours-{b}", f"AdamMini [{b}]", "adam-mini", backend=b))
    if "variants" in which:
        for b in backends:
            for variant, text in VARIANTS.items():
                specs.append(OptSpec(f"ours-{b}-{variant}", f"AdamMini [{b}] {text}", "adam-mini", backend=b, variant=variant))
    if "adamw8bit" in which:
        specs += [OptSpec(key, label, "adamw8bit") for key, (label, _) in ADAMW_8BIT.items()]
    if "graphs" in which:
        specs.append(OptSpec("adamw-fused-graph", "torch AdamW (fused, capturable), CUDA graph replay", "adamw", graph=True))
        for b in backends:
            specs.append(OptSpec(f"ours-{b}-graph", f"AdamMini [{b}] capturable, CUDA graph replay", "adam-mini", backend=b, graph=True))
    return specs


OPTIMIZER_CHOICES = ("ours", "compile", "adamw-foreach", "adamw-fused", "official", "variants", "adamw8bit", "graphs")
DEFAULT_OPTIMIZERS = OPTIMIZER_CHOICES[:-3]  # variants, 8-bit AdamW and graphs run when asked for (another call)
# Graph replay rows (issue 7): launch-bound sizes, about 1M, 10M and 124M parameters. Target:
# within 1.2x the bandwidth floor plus 10 us.
GRAPH_SETS = ("sweep-llama-1.05m", "sweep-llama-9.99m", "gpt2-124m-fp32")


def official_status() -> (Optional[str], Optional[str]):
    """(version, reason it cannot run) of the official package."""
    try:
        version = importlib.metadata.version("adam-mini")
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        from adam_mini import Adam_mini  # noqa: F401
    except Exception as err:  # ImportError, or anything its import raises
        return version, (
            f"official adam-mini is not importable ({type(err).__name__}: {err}); "
            "install it with `pip install adam-mini==1.1.1` (bench/README.md: as a wheel on the GPU machine)"
        )
    return version, None


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> Optional[int]:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Timer:
    """Median and 20th/80th percentiles of ``fn`` in ms: ``triton.testing.do_bench`` (CUDA
    events, L2 flushed between runs) on a GPU, a host timer with the same statistics on the CPU."""

    def __init__(self, device: torch.device, smoke: bool):
        self.device = device
        self.smoke = smoke
        if device.type == "cuda":
            import triton.testing

            self._do_bench = triton.testing.do_bench
            self.method = "triton.testing.do_bench (CUDA events, L2 flushed between runs), quantiles 0.5/0.2/0.8"
        else:
            self._do_bench = None
            self.method = "host timer (time.perf_counter per call; CPU fallback, do_bench needs a GPU), quantiles 0.5/0.2/0.8"

    def __call__(self, fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> Dict[str, float]:
        if self._do_bench is not None:
            med, p20, p80 = self._do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
            return dict(median_ms=float(med), p20_ms=float(p20), p80_ms=float(p80))
        fn()
        t0 = time.perf_counter()
        fn()
        estimate_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        for _ in range(min(1000, max(1, int(warmup_ms / estimate_ms)))):
            fn()
        reps = min(200 if self.smoke else 10000, max(3 if self.smoke else 10, int(rep_ms / estimate_ms)))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        q = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
        return dict(median_ms=float(q[0]), p20_ms=float(q[1]), p80_ms=float(q[2]))


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int, warmup_ms: float, rep_ms: float) -> Dict[str, float]:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    n = nbytes // 4
    src = torch.randn(n, device=device, generator=torch.Generator(device=device).manual_seed(SEED))
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), warmup_ms, rep_ms)
    del src, dst
    release(device)
    return dict(buffer_bytes=n * 4, gbps=2 * n * 4 / (t["median_ms"] * 1e-3) / 1e9, **t)


def device_info(device: torch.device) -> Dict[str, object]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info = dict(
            name=props.name,
            type="cuda",
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            total_memory_bytes=props.total_memory,
            l2_cache_bytes=getattr(props, "L2_cache_size", None),
            driver=None,
        )
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
        return info
    cpu = platform.processor() or platform.machine()
    return dict(name=f"CPU {cpu}".strip(), type="cpu", cores=os.cpu_count(), sm_count=None, total_memory_bytes=None)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def versions(official_version: Optional[str]) -> Dict[str, Optional[str]]:
    import adam_mini_kernels

    return dict(
        python=platform.python_version(),
        **provenance.versions(),
        adam_mini_kernels=getattr(adam_mini_kernels, "__version__", None),
        adam_mini_official=official_version,
    )


# --------------------------------------------------------------------------------------------
# Parameter sets
# --------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_params(pset: PS.ParamSet, device: torch.device) -> List[tuple]:
    """Fresh leaf parameters with the set's names and shapes, random values, and random
    gradients filled once (the same values every time for a given set)."""
    dtype = DTYPES[pset.dtype]
    gen = torch.Generator(device=device).manual_seed(SEED)
    named = []
    for name, shape in pset.shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype, generator=gen).mul_(0.02))
        p.grad = torch.randn(shape, device=device, dtype=dtype, generator=gen).mul_(1e-3)
        named.append((name, p))
    return named


def partition_counts(pset: PS.ParamSet) -> Dict[str, int]:
    """Number of second-moment values of the set under the default (official) partition, from
    ``AdamMini.partition_summary()`` on meta tensors (nothing allocated)."""
    from adam_mini_kernels import AdamMini

    named = [(n, torch.nn.Parameter(torch.empty(s, device="meta"))) for n, s in pset.shapes]
    opt = AdamMini(named, lr=LR, verbose=False, backend="torch", **pset.model_args)
    summary = opt.partition_summary()
    return dict(num_v=sum(int(r["num_blocks"]) for r in summary), num_tensors=len(summary))


def set_record(pset: PS.ParamSet, copy_gbps: float) -> Dict[str, object]:
    s = torch.tensor([], dtype=DTYPES[pset.dtype]).element_size()
    n = pset.n_params
    counts = partition_counts(pset)
    mini = 5 * n * s + 2 * 4 * counts["num_v"]
    adamw = 7 * n * s
    return dict(
        key=pset.key,
        title=pset.title,
        description=pset.description,
        dtype=pset.dtype,
        n_params=n,
        n_tensors=pset.n_tensors,
        model_args=pset.model_args,
        smoke=pset.smoke,
        num_v=counts["num_v"],
        storage_bytes=s,
        adam_mini_min_bytes=mini,
        adam_mini_min_bytes_per_param=mini / n,
        adam_mini_floor_ms=mini / (copy_gbps * 1e9) * 1e3,
        adamw_min_bytes=adamw,
        adamw_min_bytes_per_param=adamw / n,
        adamw_floor_ms=adamw / (copy_gbps * 1e9) * 1e3,
        same_as=pset.extra.get("same_as"),
    )


def min_bytes(spec: OptSpec, rec: Dict[str, object]) -> int:
    """Fewest bytes the step must move (SPEC 4/5, bench/NOTES.md). Adam-mini: read p, g, m and
    write p, m (5 x storage bytes per param) plus reading and writing each v; AdamW: read p, g,
    m, v and write p, m, v (7 x). Official keeps v in the param dtype, ours in float32. 8-bit
    states (ours: m; AdamW8bit: m and v) move 1 B per element each way plus a float32 scale per
    QBLOCK elements, counted as if every parameter were quantized (ours keeps m of parameters
    under 4096 elements and of biases in their dtype: a few thousandths of a byte per param)."""
    n, s = rec["n_params"], rec["storage_bytes"]
    scales = -(-n // QBLOCK)
    if spec.family == "adamw":
        return int(rec["adamw_min_bytes"])
    if spec.family == "adamw8bit":
        return n * (3 * s + 4) + 2 * 2 * 4 * scales
    v_bytes = rec["storage_bytes"] if spec.id == "official" else 4
    per_param = {"fp32-state": 3 * s + 8, "int8-state": 3 * s + 2}.get(spec.variant, 5 * s)
    if spec.variant in ("clip", "clip-then-step"):
        per_param += s  # the norm needs the gradients before the update: one more read of g
    scale_bytes = 2 * 4 * scales if spec.variant == "int8-state" else 0
    return n * per_param + 2 * v_bytes * rec["num_v"] + scale_bytes


def _plain_tensors(t: torch.Tensor):
    """``t``, or the plain tensors inside it when it is a tensor subclass (torchao's 8-bit
    states hold their codes, scales and code map as inner tensors)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(t):
        yield t
        return
    for name in t.__tensor_flatten__()[0]:
        yield from _plain_tensors(getattr(t, name))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages reachable from ``opt.state`` (views into one flat buffer
    count once, with the whole buffer; a tensor subclass counts its inner tensors)."""
    seen: Dict[tuple, int] = {}
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                for t in _plain_tensors(v):
                    storage = t.untyped_storage()
                    seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------------
@dataclass
class Context:
    device: torch.device
    timer: Timer
    smoke: bool
    warmup_steps: int
    warmup_ms: float
    rep_ms: float
    copy_gbps: float
    official_reason: Optional[str]
    official_version: Optional[str]
    on_target_device: bool  # is_target_device: the targets as they are, else scaled
    sweep_compile: bool
    smoke_compile: bool  # --smoke with compile named in --optimizers: the compiled rows run too
    lost_context: Optional[str] = None  # set when a CUDA error left the context unusable


def unavailable_reason(spec: OptSpec, ctx: Context, in_sweep: bool) -> (Optional[str], Optional[str]):
    """(status, reason) when the row cannot or should not run, else (None, None)."""
    if ctx.lost_context:
        return "skipped", f"not run: the CUDA context was lost earlier in this run ({ctx.lost_context})"
    if spec.id == "official":
        return ("unavailable", ctx.official_reason) if ctx.official_reason else (None, None)
    if spec.family == "adamw8bit":
        try:
            importlib.import_module(ADAMW_8BIT[spec.id][1])
        except Exception as err:  # noqa: BLE001 - not installed, or no build for this machine
            return "unavailable", f"does not import here: {_error_text(err)[:300]}"
    if spec.backend is not None:
        from adam_mini_kernels import dispatch

        backend = dispatch.BACKENDS.get(spec.backend)
        if backend is None:
            return "unavailable", f"no AdamMini backend named {spec.backend!r} (known: {', '.join(dispatch.BACKENDS)})"
        try:
            reason = backend.why_not([ctx.device])
        except Exception as err:  # noqa: BLE001 - a broken backend is a row, not a crash
            reason = f"its availability check raised {_error_text(err)}"
        if reason:
            return "unavailable", f"backend {spec.backend!r} cannot run here: {reason}"
    if spec.graph and ctx.device.type != "cuda":
        return "unavailable", "CUDA graph replay needs a CUDA device"
    if spec.compiled:
        if ctx.smoke and not ctx.smoke_compile:
            return "skipped", "skipped-in-smoke: torch.compile takes seconds to a minute per set (--optimizers compile runs it)"
        if in_sweep and not ctx.sweep_compile:
            return "skipped", "not run in the sweep (about a minute of compile time per size); pass --sweep-compile"
    return None, None


def build_optimizer(spec: OptSpec, named: List[tuple], pset: PS.ParamSet):
    params = [p for _, p in named]
    kw = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    if spec.graph:  # a device lr, as a scheduler would drive it between replays
        kw["lr"] = torch.tensor(LR, device=params[0].device)
    if spec.id == "adamw-foreach":
        return torch.optim.AdamW(params, foreach=True, **kw)
    if spec.id == "adamw-fused":
        return torch.optim.AdamW(params, fused=True, **kw)
    if spec.id == "adamw-fused-graph":
        return torch.optim.AdamW(params, fused=True, capturable=True, **kw)
    if spec.family == "adamw8bit":
        return importlib.import_module(ADAMW_8BIT[spec.id][1]).AdamW8bit(params, **kw)
    if spec.id == "official":
        from adam_mini import Adam_mini

        return Adam_mini(named, verbose=False, **kw, **pset.model_args)
    from adam_mini_kernels import AdamMini

    options = {
        "fp32-state": dict(state_dtype=torch.float32),
        "stochastic-rounding": dict(stochastic_rounding=True),
        "clip": dict(max_grad_norm=CLIP),
        "int8-state": dict(state_dtype=torch.int8),
    }.get(spec.variant, {})
    if spec.graph:
        options["capturable"] = True
    return AdamMini(named, verbose=False, backend=spec.backend, **kw, **pset.model_args, **options)


def capture_step(opt: torch.optim.Optimizer, device: torch.device):
    """Capture ``opt.step()`` in a CUDA graph (warm-up on a side stream, as CUDA graphs want) and
    return the replay: the step with no launch from Python."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    opt._bench_graph = graph  # lives as long as the optimizer
    return graph.replay


HOST_CALLS = 10


def host_ms(step: Callable[[], object], device: torch.device) -> Optional[float]:
    """GPU rows: the median host time of one ``step()`` call, each started on an idle GPU and
    not waited for (what the Python front-end and the launches cost the CPU). A step whose host
    time reaches its GPU time is host-bound: its timed median is then the host's, not the
    kernels'. Calls back to back would fill CUDA's launch queue (about a thousand launches) and
    then time the GPU; a step of more launches than that (official adam-mini: a dozen per tensor)
    still waits within the call, so its host time is an upper bound. None on the CPU, where the
    two are the same time."""
    if device.type != "cuda":
        return None
    times = []
    for _ in range(HOST_CALLS):
        sync(device)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    sync(device)
    return sorted(times)[len(times) // 2] * 1e3


def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    text = " ".join(text.split())
    return text if len(text) <= 600 else text[:599] + "…"


def _is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def run_row(spec: OptSpec, pset: PS.ParamSet, rec: Dict[str, object], ctx: Context, in_sweep: bool) -> Dict[str, object]:
    row: Dict[str, object] = dict(
        set=pset.key, optimizer=spec.id, label=spec.label, backend=spec.backend, compiled=spec.compiled,
        family=spec.family, status=None, reason=None,
    )
    ref = None if pset.smoke else SPEC_REFERENCE["sets"].get(pset.key)
    if ref:
        if spec.id in ref:
            row["spec_reference_ms"] = ref[spec.id]
        elif h100_target_ms(spec, pset.key) is not None:
            row["spec_reference_ms"] = h100_target_ms(spec, pset.key)
    status, reason = unavailable_reason(spec, ctx, in_sweep)
    if not status and spec.variant and in_sweep:
        status, reason = "skipped", "variants are timed on the named sets only"
    if not status and spec.graph and pset.key not in GRAPH_SETS:
        status, reason = "skipped", f"graph replay is timed on {', '.join(GRAPH_SETS)} only"
    if not status and spec.variant == "fp32-state" and rec["storage_bytes"] == 4:
        status, reason = "skipped", "float32 state is the default for float32 parameters"
    if not status and spec.variant == "stochastic-rounding" and rec["dtype"] != "bfloat16":
        status, reason = "skipped", "stochastic rounding is for bfloat16 parameters"
    if status:
        row.update(status=status, reason=reason)
        return row
    if spec.id == "official" and ctx.official_version != "1.1.1":
        row["note"] = f"official adam-mini version {ctx.official_version}, the anchors are for 1.1.1"

    device = ctx.device
    try:
        release(device)
        mem_start = allocated(device)
    except Exception as err:  # noqa: BLE001 - a context broken since the last check: this row and the rest are skipped
        ctx.lost_context = f"before {spec.id} on {pset.key}, freeing memory raised {_error_text(err)[:200]}"
        row.update(status="skipped", reason=f"not run: the CUDA context was lost ({ctx.lost_context})")
        return row
    named = opt = step = target = params = None
    try:
        named = make_params(pset, device)
        sync(device)
        mem_params = allocated(device)
        opt = build_optimizer(spec, named, pset)
        t0 = time.perf_counter()
        opt.step()  # the first step builds the optimizer's buffers (and compiles Triton kernels)
        step = opt.step
        if spec.variant == "clip-then-step":
            params = [p for _, p in named]
            target = opt

            def step():
                torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
                target.step()

        if spec.compiled:
            # What a user can do: compile a function that calls opt.step() (the PyTorch recipe for
            # compiling optimizers). Compiled after one eager step, so the one-off buffer set-up is
            # not traced; the timed steps are compiled ones.
            # The counters from here on are this row's (the last compiled row's code is reset).
            target = opt
            torch._dynamo.utils.counters.clear()
            step = torch.compile(lambda: target.step())
        for _ in range(ctx.warmup_steps):
            step()
        sync(device)
        if spec.graph:
            step = capture_step(opt, device)
        row["warmup_steps_s"] = time.perf_counter() - t0
        if spec.compiled:
            row["compile_s"] = row["warmup_steps_s"]
        if spec.backend is not None and getattr(opt, "backend", spec.backend) != spec.backend:
            raise RuntimeError(f"asked for backend {spec.backend!r}, the optimizer resolved {opt.backend!r}")

        n = rec["n_params"]
        param_bytes = n * rec["storage_bytes"]
        row["state_bytes"] = state_bytes(opt)
        row["state_bytes_per_param"] = row["state_bytes"] / n
        if device.type == "cuda":
            sync(device)
            before = torch.cuda.memory_allocated(device)
            row["resident_optimizer_bytes"] = before - mem_params  # state, tables, buffer padding
            torch.cuda.reset_peak_memory_stats(device)
            step()
            sync(device)
            if spec.graph:  # a replay allocates nothing: the capture's private pool is in the resident bytes
                row["extra_peak_bytes"] = row["extra_peak_fraction_of_params"] = None
            else:
                row["extra_peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
                row["extra_peak_fraction_of_params"] = row["extra_peak_bytes"] / param_bytes
        else:
            row["resident_optimizer_bytes"] = None
            row["extra_peak_bytes"] = None
            row["extra_peak_fraction_of_params"] = None

        row.update(ctx.timer(step, ctx.warmup_ms, ctx.rep_ms))
        row["host_ms"] = host_ms(step, device)
        if spec.compiled:  # of the compile, warm-up and timing: a break or a recompile is not one compiled step timed
            counters = torch._dynamo.utils.counters
            row["unique_graphs"] = int(counters["stats"]["unique_graphs"])
            row["graph_breaks"] = int(sum(counters["graph_break"].values()))
            row["graph_break_reasons"] = [" ".join(str(r).split())[:300] for r in list(counters["graph_break"])[:5]]
        norms = torch._foreach_norm([p.detach() for _, p in named])
        row["finite"] = bool(torch.isfinite(torch.stack([x.float() for x in norms])).all())

        mb = min_bytes(spec, rec)
        row["min_bytes"] = mb
        row["min_bytes_per_param"] = mb / n
        row["achieved_gbps"] = mb / (row["median_ms"] * 1e-3) / 1e9
        row["floor_ms"] = mb / (ctx.copy_gbps * 1e9) * 1e3
        row["fraction_of_floor"] = row["floor_ms"] / row["median_ms"]
        target = None if pset.smoke else h100_target_ms(spec, pset.key)
        if target is not None:
            if ctx.on_target_device:
                row["target_ms"], row["target_basis"] = target, "H100 target"
            else:  # another GPU (an H200, a PCIe or NVL H100): the target scaled by the copy bandwidths (a bandwidth-bound step)
                row["target_ms"] = target * SPEC_REFERENCE["copy_gbps"] / ctx.copy_gbps
                row["target_basis"] = "H100 target x H100 copy bandwidth / this run's"
            row["meets_target"] = row["median_ms"] <= row["target_ms"]
        if spec.graph:
            row["graph_target_ms"] = 1.2 * row["floor_ms"] + 0.010
            row["meets_graph_target"] = row["median_ms"] <= row["graph_target_ms"]
        row["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - every failure is a row, never a crash of the run
        row["status"] = "oom" if _is_oom(err) else "error"
        row["reason"] = _error_text(err)
        row["traceback"] = traceback.format_exc(limit=12)[-4000:]
    finally:
        step = target = opt = named = params = None  # the closures hold the optimizer and parameters too
        # After a sticky CUDA error (an illegal address, say) the clean-up raises too: that must
        # not end the run (the rows after it are then reported as skipped, and the JSON, table and
        # plot are still written). The row keeps what it measured before (every timing ends in a
        # sync, so a fault of its own steps is its error already) and says what its clean-up hit.
        cleanups = ([("torch._dynamo.reset", torch._dynamo.reset)] if spec.compiled else []) + [("release", lambda: release(device))]
        for what, cleanup in cleanups:  # reset: drop compiled code and the references its guards keep
            try:
                cleanup()
            except Exception as err:  # noqa: BLE001
                row["cleanup_error"] = f"{what}: {_error_text(err)}"
                if ctx.lost_context is None:
                    ctx.lost_context = f"after {spec.id} on {pset.key}, its clean-up ({what}) raised {_error_text(err)[:200]}"
    if device.type == "cuda" and row["status"] != "ok" and ctx.lost_context is None:
        try:
            torch.cuda.synchronize(device)
            torch.cuda.memory_allocated(device)
        except Exception as err:  # noqa: BLE001
            ctx.lost_context = f"after {spec.id} on {pset.key}: {_error_text(err)[:200]}"
    if device.type == "cuda" and ctx.lost_context is None:
        left = torch.cuda.memory_allocated(device) - mem_start
        if left > 64 * 2**20:
            row["leaked_bytes"] = left  # memory that outlived the row: later rows have less
    return row


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, few repetitions (seconds); the CI test runs this")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="output folder (default bench/results)")
    ap.add_argument("--sets", default=",".join(PS.SET_KEYS),
                    help=f"comma list of sets, from {', '.join(PS.SET_KEYS)} and the sweep's keys "
                         f"({', '.join(s.key for s in PS.sweep_sets())}; --smoke: "
                         f"{', '.join(s.key for s in PS.sweep_sets(smoke=True))}), a sweep key run as a sweep row "
                         "(with --no-sweep: that size alone); empty for none")
    ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True, help="run the Llama-shape size sweep (default on)")
    ap.add_argument("--backends", default="torch,triton,cuda", help="AdamMini backends to time, each asked for by name")
    ap.add_argument("--optimizers", default=None,
                    help=f"comma list of rows to run, from {', '.join(OPTIMIZER_CHOICES)} (ours = the --backends; "
                    "variants = each backend with state_dtype=float32, stochastic_rounding, max_grad_norm, clip_grad_norm_ + step "
                    "and state_dtype=int8; adamw8bit = torchao's and bitsandbytes' AdamW8bit, where they import; "
                    "graphs = CUDA graph replay of a capturable step, ours and torch AdamW fused, on the 1M, 10M and 124M sets; "
                    f"default {','.join(DEFAULT_OPTIMIZERS)}, with --smoke compile skipped unless named here)")
    ap.add_argument("--sweep-compile", action="store_true", help="also run the torch.compile row at every sweep size")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available; --smoke: cpu)")
    ap.add_argument("--warmup-steps", type=nonnegative_int, default=None, help="steps after the first one, before timing (default 3)")
    ap.add_argument("--warmup-ms", type=positive_float, default=None, help="do_bench warm-up, ms (default 100; smoke 5)")
    ap.add_argument("--rep-ms", type=positive_float, default=None, help="do_bench repetition time per row, ms (default 1000; smoke 20)")
    ap.add_argument("--sweep-rep-ms", type=positive_float, default=None, help="repetition time per sweep row, ms (default 300; smoke 10)")
    ap.add_argument("--copy-bytes", type=positive_int, default=None, help="bytes per copy buffer (default 1 GiB; smoke 16 MiB)")
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    ap.add_argument("--commit", default=None, help="commit benchmarked, when this is no git checkout (env BENCH_COMMIT)")
    ap.add_argument("--time-budget-s", type=nonnegative_float, default=None,
                    help="start no new row after this many seconds; the rest are reported as skipped (the device "
                         "tool stops a command at 10 minutes)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    args.sets = [s for s in args.sets.split(",") if s]
    known = PS.SET_KEYS + tuple(s.key for s in PS.sweep_sets(smoke=args.smoke))
    for s in args.sets:
        if s not in known:
            ap.error(f"unknown set {s!r}; choose from {', '.join(known)}")
    args.backends = [b for b in args.backends.split(",") if b]
    # --smoke skips the compiled rows unless they are asked for by name (seconds per tiny set).
    named = args.optimizers is not None
    args.optimizers = [o for o in (args.optimizers if named else ",".join(DEFAULT_OPTIMIZERS)).split(",") if o]
    args.smoke_compile = args.smoke and named and "compile" in args.optimizers
    for o in args.optimizers:
        if o not in OPTIMIZER_CHOICES:
            ap.error(f"unknown optimizer {o!r}; choose from {', '.join(OPTIMIZER_CHOICES)}")
    smoke = args.smoke
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else 3
    args.warmup_ms = args.warmup_ms if args.warmup_ms is not None else (5.0 if smoke else 100.0)
    args.rep_ms = args.rep_ms if args.rep_ms is not None else (20.0 if smoke else 1000.0)
    args.sweep_rep_ms = args.sweep_rep_ms if args.sweep_rep_ms is not None else (10.0 if smoke else 300.0)
    args.copy_bytes = args.copy_bytes if args.copy_bytes is not None else (16 if smoke else 1024) * 2**20
    if args.device is None:
        args.device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    return args


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("bench_step: --device cuda, but torch sees no CUDA device", file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if args.smoke:
        # Tiny CPU tensors gain nothing from threads, and on a busy machine (CI) idle-spinning
        # OpenMP workers turn a 0.1 ms step into 100 ms: one thread keeps the smoke run short.
        torch.set_num_threads(1)
    if _DROPPED_INTERPRET:
        print("bench_step: TRITON_INTERPRET was set; it is switched off here (the interpreter is not timed)", file=sys.stderr)
    if device.type != "cuda" and not args.smoke:
        print("bench_step: no CUDA device: timing on the CPU with a host timer (use --smoke for a quick check)", file=sys.stderr)

    from tqdm import tqdm

    timer = Timer(device, args.smoke)
    official_version, official_reason = official_status()
    dev = device_info(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    copy = copy_bandwidth(device, timer, args.copy_bytes, args.warmup_ms, max(args.rep_ms, 20.0))

    # A sweep key named in --sets runs as a sweep row (the sweep's repetition time and rules), once.
    sweep_keys = {s.key for s in PS.sweep_sets(smoke=args.smoke)}
    sets = [PS.make_set(k, smoke=args.smoke) for k in args.sets if k not in sweep_keys]
    sweep = [s for s in PS.sweep_sets(smoke=args.smoke) if args.sweep or s.key in args.sets]
    specs = optimizer_specs(args.backends, args.optimizers)
    ctx = Context(
        device=device, timer=timer, smoke=args.smoke, warmup_steps=args.warmup_steps, warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms, copy_gbps=copy["gbps"], official_reason=official_reason,
        official_version=official_version, on_target_device=is_target_device(str(dev["name"])), sweep_compile=args.sweep_compile,
        smoke_compile=args.smoke_compile,
    )

    records = {s.key: set_record(s, copy["gbps"]) for s in sets + sweep}
    tasks = [(s, False) for s in sets] + [(s, True) for s in sweep]
    total = sum(len(specs) for s, in_sweep in tasks if not (in_sweep and s.extra.get("same_as") in args.sets))
    rows: List[Dict[str, object]] = []
    started = time.perf_counter()

    args.out.mkdir(parents=True, exist_ok=True)
    tag = "_".join(t for t in ("smoke" if args.smoke else "", slug(args.tag) if args.tag else "") if t)
    stem = f"{slug(str(dev['name']))}_{now.strftime('%Y-%m-%d')}" + (f"_{tag}" if tag else "")
    json_path = args.out / f"{stem}.json"

    def result(complete: bool) -> Dict[str, object]:
        return _json_safe(dict(
            schema_version=SCHEMA_VERSION,
            complete=complete,
            date=now.strftime("%Y-%m-%d"),
            timestamp=now.isoformat(timespec="seconds"),
            smoke=args.smoke,
            device=dev,
            versions=versions(official_version),
            git=git_info(args.commit),
            command=" ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
            hyperparameters=dict(lr=LR, betas=list(BETAS), eps=EPS, weight_decay=WEIGHT_DECAY),
            timing=dict(
                method=timer.method, warmup_steps=args.warmup_steps + 1, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                sweep_rep_ms=args.sweep_rep_ms, quantiles=[0.5, 0.2, 0.8], time_budget_s=args.time_budget_s,
            ),
            copy_bandwidth=copy,
            spec_reference=SPEC_REFERENCE,
            requested=dict(sets=args.sets, sweep=args.sweep, backends=args.backends, optimizers=args.optimizers),
            sets=list(records.values()),
            rows=rows,
            wall_s=time.perf_counter() - started,
        ))

    def save(res: Dict[str, object]) -> None:
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        tmp.replace(json_path)

    bar = tqdm(total=total, desc="bench", unit="row", file=sys.stderr, dynamic_ncols=True, disable=args.no_progress)
    # SIGINT (the device script's `timeout -s INT` at its deadline): stop, report the rows not run as
    # skipped, and still write the table and the plot (the JSON is rewritten after every row anyway).
    interrupted = None
    running = None  # the (set, optimizer) row being timed: where a SIGINT's time went
    try:
        for pset, in_sweep in tasks:
            same_as = pset.extra.get("same_as")
            if in_sweep and same_as in args.sets:
                # The same shapes and dtype as a set timed above: reuse its rows rather than time twice.
                for r in [r for r in rows if r["set"] == same_as]:
                    rows.append(dict(r, set=pset.key, reused_from=same_as, spec_reference_ms=None, meets_target=None))
                continue
            ctx.rep_ms = args.sweep_rep_ms if in_sweep else args.rep_ms
            for spec in specs:
                bar.set_postfix_str(f"{pset.key}: {spec.id}")
                elapsed = time.perf_counter() - started
                if args.time_budget_s is not None and elapsed > args.time_budget_s:
                    row = dict(set=pset.key, optimizer=spec.id, label=spec.label, backend=spec.backend, compiled=spec.compiled,
                               family=spec.family, status="skipped",
                               reason=f"not run: the time budget (--time-budget-s {args.time_budget_s:g}) was used up")
                else:
                    running = (pset.key, spec.id)
                    try:
                        row = run_row(spec, pset, records[pset.key], ctx, in_sweep)
                    except Exception as err:  # noqa: BLE001 - the harness itself failed: a row, and the files still written
                        row = dict(set=pset.key, optimizer=spec.id, label=spec.label, backend=spec.backend,
                                   compiled=spec.compiled, family=spec.family, status="error",
                                   reason=f"the benchmark harness raised {_error_text(err)}",
                                   traceback=traceback.format_exc(limit=12)[-4000:])
                        if device.type == "cuda" and ctx.lost_context is None:
                            ctx.lost_context = f"the harness raised on {spec.id}, {pset.key}: {_error_text(err)[:200]}"
                rows.append(row)
                running = None
                save(result(complete=False))  # a run killed half-way still leaves its rows
                bar.update(1)
                msg = f"{row['median_ms']:.3f} ms" if row["status"] == "ok" else f"{row['status']}: {str(row['reason'])[:120]}"
                bar.write(f"  {pset.key:>22}  {spec.label:<40} {msg}", file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = f"not run: interrupted (SIGINT) after {time.perf_counter() - started:.0f} s"
        done = {(r["set"], r["optimizer"]) for r in rows}
        rows.extend(dict(set=p.key, optimizer=o.id, label=o.label, backend=o.backend, compiled=o.compiled, family=o.family,
                         status="skipped", reason=interrupted + (" while this row ran" if (p.key, o.id) == running else ""))
                    for p, _ in tasks for o in specs if (p.key, o.id) not in done)
        print(f"bench_step: {interrupted}; writing what was measured", file=sys.stderr, flush=True)
    bar.close()
    if interrupted:
        copy["gbps_end_error"] = interrupted
    elif ctx.lost_context is None:
        try:
            copy["gbps_end"] = copy_bandwidth(device, timer, args.copy_bytes, args.warmup_ms, max(args.rep_ms, 20.0))["gbps"]
        except Exception as err:  # noqa: BLE001 - the rows are what matters: write them anyway
            copy["gbps_end_error"] = _error_text(err)
    else:
        copy["gbps_end_error"] = f"not measured: the CUDA context was lost ({ctx.lost_context})"

    res = result(complete=interrupted is None)
    save(res)
    md = report.write(res, json_path)
    print(md)
    print(f"wrote {json_path}, {json_path.with_suffix('.md')}, {json_path.with_suffix('.png')}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
