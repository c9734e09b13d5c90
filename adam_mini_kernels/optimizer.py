"""``AdamMini``: the drop-in ``torch.optim.Optimizer`` front-end.

It keeps official ``adam-mini`` 1.1.1's constructor, name sets, param groups (one per named
parameter) and per-parameter state layout, and steps through flat buffers (``buffers``) with the
backend chosen by ``dispatch``. The partition and the buffers are built at the first ``step()``
(so name sets edited after construction count) and rebuilt only when the name sets or the
parameters change.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import operator
from collections import OrderedDict, defaultdict
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from . import dispatch
from .buffers import HP_LR, NUM_HPARAMS, FlatGroup, GradCheck, check_grad
from .checkpoint import absorb_state, check_state, state_in_format, state_views
from .model_layouts import AttentionDims, config_dims, model_layouts
from .quantization import QBLOCK, int8_first_moment
from .partition import (
    DEFAULT_NAMES,
    NAME_SET_ATTRS,
    BlockLayout,
    build_partition,
    default_weight_decay,
    rule_counts,
    snapshot_rules,
)
from .rounding import SEED_BOUND, group_seed, replica_seed
from .sharding import (
    LocalBlocks,
    ShardedGroup,
    all_reduce_split_sums,
    fsdp_params,
    global_state,
    is_sharded,
    local_blocks,
    local_state,
    local_state_views,
    shard_info,
)

logger = logging.getLogger("adam_mini_kernels")

# The stochastic rounding seed is saved in every param group of state_dict() under this key (absent
# when stochastic rounding is off): param groups' keys survive torch.distributed.checkpoint's
# get/set_optimizer_state_dict, which keep only "state" and "param_groups".
ROUNDING_SEED_KEY = "rounding_seed"
# Where state dicts written before 2026-12-06 hold it: {"seed": int} at the top level.
LEGACY_ROUNDING_KEY = "stochastic_rounding"
# What ``state_dtype`` (the constructor's, or a param group's) may be.
STATE_DTYPES = (None, torch.float32, torch.int8)
# Whether dynamo traces a step over FSDP2 shards shared with the flat buffer ([Note: compiled steps]).
TRACES_SHARED_SHARDS = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)


def _saved_rounding_seed(state_dict: Dict[str, Any]) -> Optional[int]:
    """The stochastic rounding seed a state dict holds (None: none), checked: the same int in
    [0, 2**31) in every param group that has one (and in the legacy top-level entry)."""
    seeds = [group[ROUNDING_SEED_KEY] for group in state_dict["param_groups"] if ROUNDING_SEED_KEY in group]
    legacy = state_dict.get(LEGACY_ROUNDING_KEY)
    if legacy is not None:
        if not isinstance(legacy, dict) or "seed" not in legacy:
            raise ValueError(f"state dict entry '{LEGACY_ROUNDING_KEY}' must be {{'seed': int in [0, 2**31)}}, got {legacy!r}")
        seeds.append(legacy["seed"])
    for seed in seeds:
        if type(seed) is not int or not 0 <= seed < SEED_BOUND:
            raise ValueError(f"state dict's stochastic rounding seed must be an int in [0, 2**31), got {seed!r}")
    if len(set(seeds)) > 1:
        raise ValueError(f"state dict's param groups hold different stochastic rounding seeds: {sorted(set(seeds))}")
    return seeds[0] if seeds else None


def _check_hparams(where: str, lr, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"{where}: a tensor lr must hold one floating-point value, got {lr.dtype} of shape {list(lr.shape)}")
        # A device tensor's value is not checked: reading it would be a host sync. Nor is a CPU
        # tensor's inside a trace (torch.compile of a step): its value is data there, not a
        # constant, and a check of it could not be traced (the eager steps check it).
        lr = lr.item() if lr.device.type == "cpu" and not torch.compiler.is_compiling() else None
    elif isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"{where}: lr must be a number or a one-element tensor, got {lr!r}")
    for arg, value in (("eps", eps), ("beta1", beta1), ("beta2", beta2), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{where}: {arg} must be a number, got {value!r}")
    # inf passes >= 0, and an inf lr, eps or weight decay makes every parameter inf, NaN or still.
    if lr is not None and not 0.0 <= lr < math.inf:
        raise ValueError(f"{where}: invalid learning rate {lr} (must be finite and >= 0)")
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"{where}: invalid eps {eps} (must be finite and >= 0)")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"{where}: invalid beta1 {beta1} (must be in [0, 1))")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"{where}: invalid beta2 {beta2} (must be in [0, 1))")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"{where}: invalid weight_decay {weight_decay} (must be finite and >= 0)")


def _m_dtypes(asked: List[Any], layouts: List[BlockLayout], params: List[torch.Tensor]) -> List[Optional[torch.dtype]]:
    """m's storage dtype per parameter (None: the parameter's) for the state dtypes ``asked``
    of its param group. Whether m is int8 comes from the global layouts: every rank of a mesh
    decides alike."""
    return [
        torch.int8 if dtype == torch.int8 and int8_first_moment(layout, p.dtype)
        else torch.float32 if dtype == torch.float32 and p.dtype in (torch.bfloat16, torch.float16)
        else None
        for dtype, layout, p in zip(asked, layouts, params)
    ]


def _check_betas_pair(where: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")


def _split_betas(param_group: Dict[str, Any]) -> Dict[str, Any]:
    """A param group given torch-style ``betas=(beta1, beta2)``, as the ``beta1`` and ``beta2``
    entries the groups hold (as official Adam_mini's do)."""
    where = f"param group '{param_group['name']}'"
    betas = param_group["betas"]
    _check_betas_pair(where, betas)
    for key, value in zip(("beta1", "beta2"), betas):
        if key in param_group and param_group[key] != value:
            raise ValueError(f"{where}: betas={tuple(betas)!r} and {key}={param_group[key]!r} disagree; give one of them")
    out = {k: v for k, v in param_group.items() if k != "betas"}
    out["beta1"], out["beta2"] = betas
    return out


def _betas_error(group: Dict[str, Any]) -> ValueError:
    """The error for a ``betas`` entry set in a param group after construction (ignored, it
    would leave the group's betas silently unchanged)."""
    return ValueError(
        f"param group '{group['name']}' has a 'betas' entry: AdamMini's param groups hold 'beta1' and "
        "'beta2' (as official Adam_mini's), which the step reads; set those and delete 'betas' "
        "(a torch-style 'betas' would be ignored)"
    )


def _check_state_dtype(where: str, state_dtype: Any) -> None:
    if state_dtype not in STATE_DTYPES:
        raise ValueError(
            f"{where}: state_dtype must be None (the parameters' dtype), torch.float32 or torch.int8, got {state_dtype!r}"
        )


def _check_param(name: str, p: Any) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"parameter '{name}' is a {type(p).__name__}, not a tensor")
    if p.layout != torch.strided:
        raise ValueError(f"parameter '{name}' is a {p.layout} tensor; AdamMini supports dense tensors only")
    if p.is_complex():
        raise ValueError(f"parameter '{name}' is complex ({p.dtype}); AdamMini supports real floating-point parameters only")
    if not p.is_floating_point():
        raise ValueError(f"parameter '{name}' has dtype {p.dtype}; AdamMini needs floating-point parameters")
    if is_sharded(p):
        shard_info(name, p)  # raises for placements that are not supported
    elif type(p.data) is not torch.Tensor:
        raise NotImplementedError(
            f"parameter '{name}' is a {type(p.data).__name__}; tensor subclasses other than DTensor are not supported"
        )


def _check_params(named: List[Tuple[str, torch.Tensor]]) -> None:
    """Every parameter valid (``_check_param``), passed once, and none over another's memory:
    parameters tied by ``b.data = a.data`` (two Parameters over one storage) would be untied by
    the flat buffers, each stepped in a copy of its own. Checked at construction and at each
    build (parameters put into ``param_groups`` later pass here too)."""
    seen: Dict[int, str] = {}
    spans = []
    for name, p in named:
        _check_param(name, p)
        if id(p) in seen:
            raise ValueError(f"parameter '{name}' is the same tensor as '{seen[id(p)]}'; pass each parameter once")
        seen[id(p)] = name
        if p.numel() and not is_sharded(p) and p.device.type != "meta":
            start = p.storage_offset() * p.element_size()
            extent = (1 + sum((n - 1) * s for n, s in zip(p.shape, p.stride()))) * p.element_size()
            spans.append((p.device, p.untyped_storage().data_ptr(), start, start + extent, name))
    spans.sort(key=lambda span: (str(span[0]), span[1], span[2]))
    for k in range(1, len(spans)):
        (device, ptr, _, end, other), (device_b, ptr_b, start_b, _, name) = spans[k - 1], spans[k]
        if (device, ptr) == (device_b, ptr_b) and start_b < end:
            raise ValueError(
                f"parameters '{other}' and '{name}' share memory (tied by assigning one's .data to the other?): "
                f"AdamMini keeps each parameter in a buffer of its own and would untie them; tie them as one "
                f"Parameter (e.g. model.lm_head.weight = model.embed.weight) or pass only one of them"
            )


def _on(value, device: torch.device) -> torch.Tensor:
    """A 0-dim float32 tensor on ``device`` (AMP's scale and found_inf), without a host sync."""
    return torch.as_tensor(value, dtype=torch.float32).to(device, non_blocking=True).reshape(())


def _moved(value: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    return None if value is None else value.to(device, non_blocking=True)


_PLAIN_LR = frozenset({float, int})


class _StateEntry(dict):
    """A parameter's ``opt.state[p]``: the views into the flat buffers, and whether anything
    replaced or removed one of them since (see [Note: edited state])."""

    edited = False

    def _edit(method):
        def edit(self, *args, **kwargs):
            self.edited = True
            return method(self, *args, **kwargs)
        return edit

    __setitem__ = _edit(dict.__setitem__)
    __delitem__ = _edit(dict.__delitem__)
    __ior__ = _edit(dict.__ior__)
    update = _edit(dict.update)
    pop = _edit(dict.pop)
    popitem = _edit(dict.popitem)
    clear = _edit(dict.clear)
    del _edit

    def setdefault(self, key, default=None):
        if key not in self:
            self.edited = True
        return dict.setdefault(self, key, default)



class _StepMemo:
    """What a step leaves for the next one and for the user: the hyperparameters last read (per
    param group: the lr, None for one read on the device, and (weight_decay, beta1, beta2, eps,
    whether it holds a "betas" entry)), those four as a float64 table, whether some lr is read
    on the device, the last gradient norm (see [Note: compiled steps])."""

    def __init__(self) -> None:
        self.lrs: Optional[list] = None
        self.rest: Optional[List[tuple]] = None
        self.rest_table: Optional[torch.Tensor] = None
        self.device_lr = False
        self.grad_norm: Optional[torch.Tensor] = None


class AdamMini(torch.optim.Optimizer):
    """Adam-mini (Zhang et al., 2024): Adam's first moment per element, one second moment per
    block of parameters, blocks chosen from parameter names.

    Args:
        named_parameters: ``(name, parameter)`` pairs, usually ``model.named_parameters()``.
            Names drive the partition; parameters with ``requires_grad=False`` are skipped.
        lr: learning rate (>= 0).
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to ``sqrt(v) / sqrt(1 - beta2^t)`` (>= 0).
        weight_decay: decoupled weight decay; forced to 0 for names containing "norm", "ln" or
            "bias".
        model_sharding: accepted for compatibility with official 1.1.1 and ignored.
        dim: hidden size of the transformer (sets the query/key head block size).
        n_heads: number of attention heads; must divide ``dim * dim`` when query/key parameters
            exist and ``head_dim`` is not given.
        n_kv_heads: number of key/value heads (GQA); must divide ``n_heads``. Key blocks have the
            same size as query blocks, so it only needs to be consistent.
        verbose: log the partition at the first step (again when a rebuild changes it) and
            warnings about missing layers, through ``logging.getLogger("adam_mini_kernels")``.
        head_dim: size of one attention head when it is not ``dim // n_heads`` (Qwen3, Gemma);
            the head block is then ``head_dim * dim`` elements.
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``. ``auto`` (overridden by the
            environment variable ``ADAM_MINI_BACKEND``) picks the first of ``dispatch.AUTO_ORDER``
            that can run (torch today, until the fused backends pass their GPU suites); an
            explicit backend that cannot run raises ``BackendUnavailableError``. The fused
            backends store float32, bfloat16 and float16 parameters.
        state_dtype: dtype of the first moment ``m``: None (the parameter's dtype, as official)
            or ``torch.float32`` (exact state for bf16/fp16 parameters; kept through
            ``state_dict``/``load_state_dict``), or ``torch.int8``: ``m`` of every parameter with
            at least ``INT8_MIN_NUMEL`` elements that is not an Adam block (biases) as 8-bit codes
            with a float32 scale per 256-element chunk of a block, where those are strictly
            smaller than an ``m`` in the parameter's dtype (not for blocks of 1 element in
            float32, of up to 4 in 16 bits), dequantized, updated and requantized inside the
            step on every backend (see [Note: int8 first moment] in quantization.py; sharded
            parameters too, where the shards do not cut quantization chunks: [Note: int8 on
            shards] in sharding.py); other parameters keep ``m`` in their dtype. ``v`` is always
            float32. A param group may hold a ``state_dtype`` of its own
            (one of the same three values), which its parameters take instead: e.g. float32 ``m``
            for the embeddings of an int8 optimizer, as 8-bit AdamW users keep them, or for a
            sharded parameter whose shards cut chunks. Set between steps, it converts the state
            at the next step (int8 to a float32 ``m`` exactly, to a 16-bit ``m`` rounded, float
            to int8 lossily); it is saved with the
            param groups, and a loaded group without it keeps this optimizer's.
        max_grad_norm: clip the global L2 norm of the gradients to this value inside the step,
            exactly as ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` before
            ``step()``; the norm (of unscaled gradients under AMP) is left in
            ``opt.last_grad_norm`` as a device tensor. A non-finite norm skips the update, and so
            does a norm past 1.8e19 (its square overflows float32, as the blocks' sums of squares
            would). Norms are taken in float64 (clip_grad_norm_ takes them in the gradients'
            dtype), so the norm is more exact and parameters may differ from clip_grad_norm_'s by
            a rounding of the clip factor; sharded parameters' squares are summed over their
            ranks in float32, in the step's all-reduce.
        stochastic_rounding: write bfloat16 parameters (and bfloat16 ``m``) from the float32
            result with unbiased stochastic rounding instead of round-to-nearest, for pure-bf16
            training. The random bits are a hash of a seed (``rounding_seed``, saved in
            ``state_dict``'s param groups), the step counters and the element position (a shard's, salted
            with its shard coordinate: [Note: stochastic rounding]): runs are reproducible
            and resumes exact. Needs bfloat16 parameters; float16 parameters are refused.
        rounding_seed: the seed of stochastic rounding, an int in [0, 2**31). None (default):
            drawn from torch's default generator at construction, and where torch.distributed is
            initialized with more than one rank, rank 0's is taken (one broadcast over the
            default process group at construction, so every rank must construct the optimizer):
            data-parallel replicas must round alike, or they drift apart. Give it to skip the
            broadcast (the same value on every rank that holds a replica).

        capturable: allow ``step()`` to be captured in a CUDA graph (as torch's optimizers):
            every value the step needs lives on the device and the step makes no host sync (as
            it always does); with it, capturing is allowed and the per-pattern device tensors
            the step uses are kept for the graph's lifetime. Needs CUDA parameters. Between
            replays, a tensor ``lr`` (updated in place, e.g. by an LR scheduler) takes effect;
            float hyperparameters changed after capture do not.
        model: the module these parameters belong to (optional; ``for_model`` passes it). Under
            FSDP2 it lets the flat buffer be FSDP2's storage of each rank's parameter shards
            (see [Note: shared FSDP2 storage] in sharding.py): no copies of the shards in and out
            of the flat buffer each step (16 bytes per fp32 parameter), and the shards held once
            in memory instead of twice. Without it, sharded parameters are copied.

    ``lr`` may be a one-element tensor (in the constructor or in a param group), as in torch: a
    tensor on the parameters' device is read by the step on the device, each step (no host sync,
    no recompile under ``torch.compile``); a CPU tensor for CUDA parameters is read on the host.

    The name sets ``adam_block_names``, ``wqk_names``, ``embd_names``, ``output_names``,
    ``wv_names``, ``attn_proj_names`` and ``mlp_names`` are plain attributes and may be edited
    after construction, before or between steps. ``layout_overrides`` (parameter name ->
    ``BlockLayout``, filled by ``for_model``) takes precedence over them for the parameters it
    names; it may be edited too.
    """

    # AMP: torch.amp.GradScaler sets ``grad_scale`` and ``found_inf`` (device tensors) on the
    # optimizer before calling step(); the step unscales inside the kernels and skips the whole
    # update when an inf/NaN was found, with no host sync (as torch's fused AdamW does).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        named_parameters: Iterable[Tuple[str, torch.nn.Parameter]],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        model_sharding: Optional[bool] = None,
        dim: int = 2048,
        n_heads: int = 32,
        n_kv_heads: Optional[int] = None,
        verbose: bool = True,
        head_dim: Optional[int] = None,
        backend: str = "auto",
        state_dtype: Optional[torch.dtype] = None,
        max_grad_norm: Optional[float] = None,
        stochastic_rounding: bool = False,
        rounding_seed: Optional[int] = None,
        capturable: bool = False,
        model: Optional[torch.nn.Module] = None,
    ):
        _check_betas_pair("AdamMini", betas)
        _check_hparams("AdamMini", lr, betas[0], betas[1], eps, weight_decay)
        for arg, value in (("dim", dim), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                or int(value) != value or value <= 0
            ):
                raise ValueError(f"{arg} must be a positive integer, got {value!r}")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        self.dim, self.n_heads, self.n_kv_heads, self.head_dim = int(dim), int(n_heads), int(n_kv_heads), head_dim
        _check_state_dtype("AdamMini", state_dtype)
        self.state_dtype = state_dtype
        self.max_grad_norm = max_grad_norm
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be True or False, got {capturable!r}")
        self.capturable = capturable
        if not isinstance(stochastic_rounding, bool):
            raise TypeError(f"stochastic_rounding must be True or False, got {stochastic_rounding!r}")
        self.stochastic_rounding = stochastic_rounding
        if rounding_seed is not None:
            if not stochastic_rounding:
                raise ValueError("rounding_seed is the seed of stochastic rounding: it needs stochastic_rounding=True")
            if type(rounding_seed) is not int or not 0 <= rounding_seed < SEED_BOUND:
                raise ValueError(f"rounding_seed must be an int in [0, 2**31), got {rounding_seed!r}")
        # The one piece of rounding state (see [Note: stochastic rounding] in rounding.py), drawn
        # from torch's default generator so that torch.manual_seed makes runs reproducible.
        self._round_seed = rounding_seed
        if stochastic_rounding and rounding_seed is None:
            self._round_seed = int(torch.randint(SEED_BOUND, ()).item())
        self.verbose = verbose
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self._model = model
        for rule, attr in NAME_SET_ATTRS.items():
            setattr(self, attr, set(DEFAULT_NAMES[rule]))
        self.layout_overrides: Dict[str, BlockLayout] = {}
        self._weight_decay = weight_decay
        self._flat: Optional[List[FlatGroup]] = None
        self._memo = _StepMemo()

        groups = []
        for item in named_parameters:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(
                    "AdamMini takes (name, parameter) pairs, e.g. model.named_parameters(); "
                    f"got an item of type {type(item).__name__}"
                )
            name, p = item[0].lower(), item[1]
            if isinstance(p, torch.Tensor) and p.requires_grad:
                groups.append({"name": name, "params": p})  # checked with the others by _check_params
            else:
                _check_param(name, p)
        if not groups:
            raise ValueError("AdamMini got no parameters that require a gradient")
        _check_params([(group["name"], group["params"]) for group in groups])
        super().__init__(groups, dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps))

        devices = {p.device for group in self.param_groups for p in group["params"]}
        if capturable and any(d.type != "cuda" for d in devices):
            raise ValueError("capturable=True (CUDA graph capture of step()) needs every parameter on a CUDA device")
        if capturable and any(is_sharded(p) for _, p in self._named_params()):
            raise NotImplementedError("capturable=True is not supported with sharded (DTensor, FSDP2) parameters yet")
        dtypes = {p.dtype for group in self.param_groups for p in group["params"]}
        self.backend = dispatch.resolve_backend(backend, devices, dtypes)
        self._step_fn = dispatch.load_backend(self.backend)
        if stochastic_rounding and rounding_seed is None:
            cuda = sorted((d for d in devices if d.type == "cuda"), key=str)  # NCCL broadcasts CUDA tensors
            self._round_seed = replica_seed(self._round_seed, cuda[0] if cuda else torch.device("cpu"))
        if model_sharding is not None and verbose:
            logger.warning("AdamMini: model_sharding is accepted for compatibility and ignored")

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        *,
        dim: Optional[int] = None,
        n_heads: Optional[int] = None,
        n_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        **kwargs,
    ) -> "AdamMini":
        """An ``AdamMini`` over ``model.named_parameters()`` whose blocks come from the model's
        module types and dimensions instead of parameter names (recommended for ``transformers``
        models): query and key weights one block per head (``head_dim`` from the config, GQA key
        heads), values, attention outputs and MLPs one per output neuron (columns of HF
        ``Conv1D`` weights, which are stored transposed in the flat buffers), fused QKV weights
        (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``, ``nn.MultiheadAttention``; CodeGen's,
        GPTBigCode's, Falcon's, InternLM2's, ChatGLM's and MiniMax's lightning attention's in
        the order their attention reads them) split into those, DeepSeek's latent attention (``q_b_proj``,
        ``kv_b_proj``, ``kv_a_proj_with_mqa``) by its heads, fused MoE experts (transformers' 3-D
        weights, stored (experts, out, in), or (experts, in, out) by columns) one per output
        neuron of each expert and a router one per expert, embeddings and an untied output layer
        one per token, biases Adam, norms one block.

        ``dim``, ``n_heads``, ``n_kv_heads`` and ``head_dim`` default to the model's config
        (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``), for
        each module that of the (sub-)model it belongs to (a multimodal model's vision tower has
        its own heads; of a heterogeneous config, Gemma 4's, the attention's own layer's); give
        them for models without one (given, they hold for every module). Unless ``head_dim`` is
        given, the head size an attention module declares (``head_dim``, ``attention_head_size``,
        ...: what its forward reads) comes first where its weights fit it; without any, it is
        hidden / n_heads, or a weight's own input width / n_heads where its outputs do not fit
        that. Other keywords go to the constructor, and so does the model
        (``model=``: under FSDP2 the flat buffer becomes FSDP2's storage of the shards). The
        layouts land in ``opt.layout_overrides``; parameters of modules of other types follow
        the name sets.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"AdamMini.for_model takes a torch.nn.Module, got {type(model).__name__}")
        dims = config_dims(model, dim, n_heads, n_kv_heads, head_dim)
        layouts = model_layouts(model, AttentionDims(dim, n_heads, n_kv_heads, head_dim))
        given = dict(dim=dims.hidden, n_heads=dims.n_heads, n_kv_heads=dims.n_kv_heads)
        if None not in (dims.head_dim, dims.hidden, dims.n_heads) and dims.head_dim * dims.n_heads != dims.hidden:
            given["head_dim"] = dims.head_dim
        opt = cls(model.named_parameters(), **{k: v for k, v in given.items() if v is not None}, model=model, **kwargs)
        opt.layout_overrides.update(layouts)
        return opt

    # -- param groups --------------------------------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group (``{"name": ..., "params": ...}``, other keys default as in the
        constructor). The buffers are rebuilt at the next step; existing state is kept."""
        if "name" not in param_group:
            raise ValueError("an AdamMini param group needs a 'name' (the partition is chosen from it)")
        param_group = dict(param_group, name=param_group["name"].lower())
        params = param_group["params"]
        for p in [params] if isinstance(params, torch.Tensor) else list(params):
            _check_param(param_group["name"], p)
        if "state_dtype" in param_group:
            _check_state_dtype(f"param group '{param_group['name']}'", param_group["state_dtype"])
        if "betas" in param_group:  # torch's spelling of the pair: the groups hold beta1 and beta2
            param_group = _split_betas(param_group)
        param_group.setdefault("weight_decay", default_weight_decay(param_group["name"], self._weight_decay))
        super().add_param_group(param_group)
        self._flat = None

    def _named_params(self) -> List[Tuple[str, torch.Tensor]]:
        return [(group["name"], p) for group in self.param_groups for p in group["params"]]

    # -- partition and buffers -----------------------------------------------------------------
    def _partition_key(self):
        """What the partition depends on, as a comparable value: the name sets and (a copy of)
        the overrides; comparing it with the last one is cheap (layouts compare by identity first)."""
        return snapshot_rules(self), dict(self.layout_overrides)

    def _buffer_key(self):
        """What the flat buffers depend on: the partition key and each param group's m dtype
        (its ``state_dtype`` where it has one, else the constructor's; validated by ``_build``)."""
        default = self.state_dtype
        return self._partition_key(), tuple([group.get("state_dtype", default) for group in self.param_groups])

    def _partition(self, key) -> List[BlockLayout]:
        """Every parameter's layout: its override where there is one, else by the name rules."""
        rules, overrides = key
        named = self._named_params()
        by_name = [(n, p.shape) for n, p in named if n not in overrides]
        by_rules = iter(build_partition(by_name, rules, self.dim, self.n_heads, self.head_dim))
        layouts = []
        for name, p in named:
            layout = overrides.get(name)
            if layout is None:
                layouts.append(next(by_rules))
                continue
            if layout.shape != tuple(p.shape):
                raise ValueError(
                    f"layout_overrides['{name}'] is for shape {list(layout.shape)}, the parameter has "
                    f"shape {list(p.shape)}"
                )
            layouts.append(layout)
        return layouts

    def partition_summary(self) -> List[Dict[str, Any]]:
        """The partition under the current name sets and overrides: one dict per parameter with
        ``name``, ``rule``, ``shape``, ``block_numel`` (None when block sizes differ),
        ``num_blocks``, ``sections`` (``(rule, block_numel, num_blocks)`` in storage order) and
        ``columns`` (stored transposed: blocks are columns)."""
        return [
            {"name": l.name, "rule": l.rule, "shape": l.shape, "block_numel": l.block_numel, "num_blocks": l.num_blocks,
             "sections": [(s.rule, s.block_numel, s.num_blocks) for s in l.sections], "columns": l.columns}
            for l in self._partition(self._partition_key())
        ]

    def _local_blocks(self, layouts: List[BlockLayout]) -> Dict[int, Any]:
        """Index -> ``LocalBlocks`` of every sharded parameter (see [Note: sharded parameters])."""
        return {
            k: local_blocks(layout, shard_info(name, p))
            for k, ((name, p), layout) in enumerate(zip(self._named_params(), layouts))
            if is_sharded(p)
        }

    def _build(self, key) -> None:
        """(Re)build the partition and the flat buffers, keeping every parameter's state.
        Everything is validated before anything is changed. Sharded parameters are held by their
        local shards, grouped apart per process group."""
        named = self._named_params()
        _check_params(named)
        partition_key, group_dtypes = key
        for group, dtype in zip(self.param_groups, group_dtypes):
            _check_state_dtype(f"param group '{group['name']}'", dtype)
        layouts = self._partition(partition_key)
        asked = [dtype for group, dtype in zip(self.param_groups, group_dtypes) for _ in group["params"]]
        group_of = [gi for gi, group in enumerate(self.param_groups) for _ in group["params"]]
        m_dtypes = _m_dtypes(asked, layouts, [p for _, p in named])
        local = self._local_blocks(layouts)
        for k, lb in local.items():
            if m_dtypes[k] == torch.int8 and lb.cuts_chunks():
                raise NotImplementedError(
                    f"parameter '{named[k][0]}': its shards cut the {QBLOCK}-element quantization chunks of its "
                    f"blocks, which state_dtype=torch.int8 keeps whole on one rank (see [Note: int8 on shards]). "
                    f"Shard it along a dim that keeps its blocks whole (FSDP2: fully_shard(..., shard_placement_fn=...) "
                    f"returning Shard(1) for HF Conv1D weights, whose blocks are columns), or into shards of whole "
                    f"{QBLOCK}-element chunks of a block, or keep this parameter's m in float: "
                    f"opt.param_groups[{group_of[k]}]['state_dtype'] = None"
                )
        states = {p: self.state[p] for _, p in named if p in self.state}
        states.update(self._regrouped_sharded_states(local))
        layouts = [local[k].layout if k in local else layout for k, layout in enumerate(layouts)]
        for (_, p), layout in zip(named, layouts):
            if p in states:
                check_state(states[p], layout)

        by_key: Dict[tuple, List[int]] = defaultdict(list)
        for k, (_, p) in enumerate(named):
            by_key[(p.device, p.dtype, local[k].info.process_group if k in local else None, m_dtypes[k])].append(k)
        dtypes = {key[1] for key in by_key}
        reason = dispatch.BACKENDS[self.backend].dtype_reason(dtypes)
        if reason is not None:  # parameters cast after construction (e.g. model.double())
            raise ValueError(f"AdamMini backend {self.backend!r} cannot step these parameters: {reason}")
        if self.stochastic_rounding and (torch.float16 in dtypes or torch.bfloat16 not in dtypes):
            raise ValueError(
                "stochastic_rounding=True rounds bfloat16 parameters and state; this optimizer has "
                f"parameters of dtypes {sorted(str(d) for d in dtypes)}: float16 is not supported "
                "(use bfloat16, or float32 master weights with torch.amp.GradScaler)"
            )
        fsdp = fsdp_params(self._model) if local else {}
        flat, self._owners, self._row_index, self._row_select = [], [], [], []
        for (*_, m_dtype), members in by_key.items():
            params = [named[k][1] for k in members]
            # A sharded parameter enters the flat group as a plain proxy of its local shard.
            proxies = [p._local_tensor.detach() if k in local else p for k, p in zip(members, params)]
            group = FlatGroup(proxies, [layouts[k] for k in members], m_dtype)
            sharded = [(i, named[k][1], local[k]) for i, k in enumerate(members) if k in local]
            if sharded:
                group.sharded = ShardedGroup(group, sharded, fsdp)
            if self.stochastic_rounding and group.dtype == torch.bfloat16:
                group.round_seed = group_seed(self._round_seed, len(flat))
                coords = [local[k].info.rank if k in local else 0 for k in members]
                if any(coords):  # see [Note: stochastic rounding] in rounding.py
                    group.shard_coords = group.upload(torch.tensor(coords, dtype=torch.int64))
            absorb_state(group, {i: states[named[k][1]] for i, k in enumerate(members) if named[k][1] in states})
            for i, k in enumerate(members):
                p = named[k][1]
                self.state[p] = _StateEntry(local_state_views(group, i) if k in local else state_views(group, i))
            flat.append(group)
            self._owners.append(params)
            # Each member's param group: a list (read on the host, also inside a traced step) and
            # the same as a tensor (selects the members' rows of the hyperparameter table).
            self._row_index.append([group_of[k] for k in members])
            self._row_select.append(torch.tensor(self._row_index[-1], dtype=torch.long))
        self._flat, self._built_key = flat, key
        self._built_params = [p for _, p in named]
        self._built_state, self._built_entries = self.state, [self.state[p] for p in self._built_params]
        if self.verbose:
            self._log_partition(layouts)

    def _regrouped_sharded_states(self, local: Dict[int, LocalBlocks]) -> Dict[torch.Tensor, Dict[str, Any]]:
        """For a rebuild for a new partition (name sets changed): the state of each sharded
        parameter whose global blocks changed, moved to its new local blocks as
        ``load_state_dict`` moves it, through its global state (``v`` regrouped over every
        rank's elements; regrouped from one rank's local blocks, a block that becomes split
        would get a different mean on each rank). A collective where any changed: the
        partition, so the decision, is alike on every rank."""
        if self._flat is None or not local:
            return {}
        params = self._index_to_param()
        built = self._saved_blocks(params)
        moved = [
            k for k in sorted(local)
            if k in built and params[k] in self.state
            and (built[k].global_layout.runs, built[k].global_layout.columns)
            != (local[k].global_layout.runs, local[k].global_layout.columns)
        ]
        if not moved:
            return {}
        saved = global_state([(dict(self.state[params[k]]), built[k]) for k in moved])
        return {params[k]: local_state(state, local[k]) for k, state in zip(moved, saved)}

    def _log_partition(self, layouts: List[BlockLayout]) -> None:
        """Log the partition and warn of name sets that matched nothing: at the first build, and
        at a rebuild only when the partition changed (a rebuild after load_state_dict, or for new
        dtypes, keeps it)."""
        logged = tuple((l.name, l.runs, l.columns, l.rule) for l in layouts)
        if logged == getattr(self, "_logged_partition", None):
            return
        self._logged_partition = logged
        counts = rule_counts(layouts)
        blocks = sum(l.num_blocks for l in layouts)
        logger.info(
            "AdamMini: %d parameters, %d second-moment values, backend %s; parameters per rule: %s",
            len(layouts), blocks, self.backend, ", ".join(f"{r}={c}" for r, c in counts.items()),
        )
        if self.layout_overrides:  # for_model chose the blocks: the name sets hardly matter
            return
        for rule, example in (("embd", ".add('tok_emb')"), ("output", ".add('head')"), ("wqk", ".update({'q_lin', 'k_lin'})")):
            if counts[rule] == 0:
                attr = NAME_SET_ATTRS[rule]
                logger.warning(
                    "AdamMini: no parameter matched optimizer.%s %s; if you train a transformer, add the keys of "
                    "yours (e.g. optimizer.%s%s) or build the optimizer with AdamMini.for_model(model)",
                    attr, sorted(getattr(self, attr)), attr, example,
                )

    @property
    def max_grad_norm(self) -> Optional[float]:
        """The clipping limit (None: no clipping); may be set between steps, checked as in the
        constructor."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"max_grad_norm must be None or a number, got {value!r}")
            if not 0 < value < math.inf:
                raise ValueError(f"max_grad_norm must be None or a finite number > 0, got {value!r}")
            value = float(value)
        self._max_grad_norm = value

    # -- step ----------------------------------------------------------------------------------
    @property
    def last_grad_norm(self) -> Optional[torch.Tensor]:
        """The global L2 gradient norm of the last step with ``max_grad_norm`` (of unscaled
        gradients under AMP), a 0-dim float32 device tensor, a new one each step; None before."""
        return self._memo.grad_norm

    def _lr_on_device(self, lr, device: torch.device) -> bool:
        """True when ``lr`` is a tensor the step reads on ``device`` (the parameters')."""
        if not isinstance(lr, torch.Tensor):
            return False
        if lr.device == device:
            return True
        if lr.device.type == "cpu":
            return False  # read on the host, as a float
        raise ValueError(f"lr is a tensor on {lr.device}; it must be on the parameters' device ({device}) or the CPU")

    def _check_host_lr(self, group: Dict[str, Any], device: torch.device) -> None:
        """A CPU tensor lr beside parameters on another device is read on the host (``item()``)
        each eager step. A compiled step cannot read it (its value is data in the trace), and a
        captured CUDA graph would keep the value read at capture, ignoring later changes: both
        refuse it rather than step with a stale lr."""
        why = "capturable=True" if self.capturable else "a compiled step (torch.compile)" if torch.compiler.is_compiling() else None
        if why is not None:
            raise ValueError(
                f"param group '{group['name']}': lr is a CPU tensor beside parameters on {device}; {why} cannot "
                f"read it on the host: put the lr tensor on the parameters' device ({device})"
            )

    def _read_hparams(self) -> bool:
        """Read each param group's lr and (weight_decay, beta1, beta2, eps) from ``param_groups``
        (which users and LR schedulers edit); validate what changed and return True when anything
        did since the last step. A tensor lr read on the device stands as None."""
        groups, memo = self.param_groups, self._memo
        lrs = [group["lr"] for group in groups]
        # With the four, whether the group holds torch's "betas", which the step would ignore:
        # a group given one differs from the last step's and is refused below.
        rest = [(group["weight_decay"], group["beta1"], group["beta2"], group["eps"], "betas" in group) for group in groups]
        device_lr = False
        if not _PLAIN_LR.issuperset(map(type, lrs)):  # a tensor lr (or another number type)
            for k, lr in enumerate(lrs):
                if isinstance(lr, torch.Tensor):
                    device = groups[k]["params"][0].device
                    if self._lr_on_device(lr, device):
                        lrs[k] = None
                    else:
                        self._check_host_lr(groups[k], device)
                        lrs[k] = lr.item()
                    device_lr = device_lr or lrs[k] is None
        same_rest = rest == memo.rest
        if same_rest and lrs == memo.lrs:
            return False
        # What an LR scheduler does every step, new float lrs >= 0 and nothing else, is checked
        # at once; otherwise every row that changed.
        if not (same_rest and lrs and {float}.issuperset(map(type, lrs)) and all(0.0 <= lr < math.inf for lr in lrs)):
            checked = list(zip(memo.lrs or [], memo.rest or []))
            for k, (group, lr, row) in enumerate(zip(groups, lrs, rest)):
                if k < len(checked) and (lr, row) == checked[k]:
                    continue
                wd, b1, b2, eps, torch_betas = row
                if torch_betas:
                    raise _betas_error(group)
                _check_hparams(f"param group '{group['name']}'", group["lr"] if lr is None else lr, b1, b2, eps, wd)
        if not same_rest:
            memo.rest_table = None
        memo.lrs, memo.rest, memo.device_lr = lrs, rest, device_lr  # device_lr: read every step
        return True

    def _upload_hparams(self) -> None:
        """Each flat group's per-parameter hyperparameter table, from the values last read (the
        lr of a device tensor is written into it on the device: ``_device_lrs``)."""
        memo = self._memo
        if memo.rest_table is None:
            memo.rest_table = torch.tensor([row[:4] for row in memo.rest], dtype=torch.float64).reshape(len(memo.rest), NUM_HPARAMS - 1)
        lrs = [0.0 if lr is None else lr for lr in memo.lrs] if memo.device_lr else memo.lrs
        # Columns HP_LR, then HP_WEIGHT_DECAY, HP_BETA1, HP_BETA2, HP_EPS: the order of ``rest``.
        table = torch.cat([torch.tensor(lrs, dtype=torch.float64).reshape(-1, 1), memo.rest_table], dim=1)
        for group, select, index in zip(self._flat, self._row_select, self._row_index):
            group.set_hparams(table.index_select(0, select))
            # The rows whose lr ``_device_lrs`` writes on the device, and their param groups (kept
            # while they stay the same: a float lr changed by a scheduler leaves them).
            rows = [i for i, k in enumerate(index) if memo.lrs[k] is None] if memo.device_lr else []
            plan = group.cache.get("device_lr_rows")
            if not rows:
                group.cache["device_lr_rows"] = None
            elif plan is None or plan[2] != rows:  # ``index`` is the group's own, fixed with its buffers
                group.cache["device_lr_rows"] = (group.upload(torch.tensor(rows)), [index[i] for i in rows], rows)

    def _device_lrs(self) -> None:
        """Write the lr of parameters whose lr is a device tensor into the hyperparameter tables,
        on the device, no host sync: one cast and one index_copy_ per group when the param groups
        share one lr tensor (the constructor's), a stack of the tensors otherwise; never an op per
        parameter (a CUDA graph of the step would hold them all). The tensors are read from
        ``param_groups`` each step: a group given another device tensor is followed."""
        for flat in self._flat:
            plan = flat.cache.get("device_lr_rows")
            if plan is None:  # every lr of this group is a float, uploaded with the table
                continue
            rows, ks, _ = plan
            lrs = [self.param_groups[k]["lr"] for k in ks]
            if all(lr is lrs[0] for lr in lrs):
                values = lrs[0].reshape(1).to(torch.float64).expand(len(ks))
            else:
                values = torch.stack([lr.reshape(()) for lr in lrs]).to(torch.float64)
            flat.hparams[:, HP_LR].index_copy_(0, rows, values)

    @torch.no_grad()
    def step(self, closure=None):
        """One Adam-mini step for every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = self._prepare_traced() if torch.compiler.is_compiling() else self._prepare()
        if self._memo.device_lr:
            self._device_lrs()
        if not live:
            if self.max_grad_norm is not None:  # no gradient: norm 0, as clip_grad_norm_ of none
                self._memo.grad_norm = torch.zeros((), device=self._index_to_param()[0].device)
            return loss
        device = live[0][0].device
        inv_scale, skip = self._amp_factors(device)
        local_square, shard_squares = self._grad_norm_squares([group for group, _ in live], device, inv_scale)
        # [Note: one all-reduce per step] With sharded groups: every flat group's sums first, then
        # the step's collectives (one all-reduce per process group: the split blocks' sums of all
        # its flat groups and the clipping norm's squares of its shards), then every group's
        # update. Without: nothing to all-reduce, each group's two halves back to back.
        sums = None
        if any(group.sharded is not None for group, _ in live):
            sums = [self._step_fn.sums(group, _moved(inv_scale, group.device)) for group, _ in live]
            shard_sums = all_reduce_split_sums([(s[0], s[1]) for s in sums if s[1] is not None], shard_squares)
            for summed in shard_sums.values():
                local_square = local_square + summed[0].to(device).double()
        clip = None
        if self.max_grad_norm is not None:
            clip, skip = self._clip_factors(local_square, skip)
        for k, (group, active) in enumerate(live):
            d = group.device
            factors = (_moved(inv_scale, d), _moved(skip, d), _moved(clip, d))
            if sums is None:
                self._step_fn(group, active, *factors)
            else:
                self._step_fn.update(group, sums[k], active, *factors)
            if group.sharded is not None:
                group.sharded.push(group)
        return loss

    def _prepare(self) -> List[Tuple[FlatGroup, Optional[torch.Tensor]]]:
        """Everything before the update, eagerly: (re)build the buffers when the name sets or the
        parameters' dtypes/devices changed, re-point parameters and gradients that stopped
        aliasing them, upload changed hyperparameters. Everything that can be wrong is checked
        before anything changes. Returns the groups to step, with their active flags."""
        key = self._buffer_key()
        hparams_changed = self._read_hparams()
        built = self._flat is not None and key == self._built_key and self._as_built()
        checks = self._inspect() if built else None
        if checks is None:  # no buffers yet, new name sets, m dtypes, parameters or state, or a parameter moved
            for name, p in self._named_params():
                if p.grad is not None:
                    check_grad(name, p, p.grad)
            self._build(key)
            hparams_changed = True
            checks = self._inspect()
            if checks is None:
                raise RuntimeError("internal error: a parameter is outside the flat buffers just built for it")
        if hparams_changed:
            self._upload_hparams()
        live = []
        for group, check in zip(self._flat, checks):
            if check.active is None or any(check.active):
                group.repair(check)
                if group.sharded is not None:
                    group.sharded.adopt(group)
                active = None if check.active is None else group.active_flags(check.active, keep=self.capturable)
                live.append((group, active))
        return live

    # [Note: edited state]
    # The flat buffers hold every built parameter's state; opt.state[p] holds views into them.
    # torch's optimizers read param_groups and opt.state afresh each step, and code that resets
    # or replaces state (opt.state.clear(), del opt.state[p], opt.state[p]["m"] = ..., a new
    # parameter put into a param group) expects the next step to use what it left there. So each
    # step first checks, in C-level passes over identities, that the param groups hold the
    # parameters the buffers were built for and opt.state the entries made for them, unedited
    # (_StateEntry flags its own edits); otherwise the buffers are rebuilt from opt.state as it
    # is: a parameter without state starts afresh, as in torch. Changing a state tensor in place
    # (opt.state[p]["m"].zero_()) writes the buffers themselves and needs no rebuild.
    def _as_built(self) -> bool:
        """Whether the param groups and ``opt.state`` are as the flat buffers were built."""
        params = [p for group in self.param_groups for p in group["params"]]
        built, state = self._built_params, self.state
        return (
            state is self._built_state and len(params) == len(built) and all(map(operator.is_, params, built))
            and all(map(operator.is_, map(state.get, built), self._built_entries))
            and not any(entry.edited for entry in self._built_entries)
        )

    def _inspect(self) -> Optional[List[GradCheck]]:
        """Every group's ``inspect``, after pointing sharded groups at their shards' gradients
        and values (``ShardedGroup.pull``); None when a parameter moved (the buffers are rebuilt)."""
        if not self.capturable and any(g.device.type == "cuda" for g in self._flat) and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("AdamMini.step() is being captured in a CUDA graph: construct the optimizer with capturable=True")
        checks = []
        for group in self._flat:
            if group.sharded is not None:
                group.sharded.pull(group)
            check = group.inspect()
            if check is None:
                return None
            checks.append(check)
        return checks

    # [Note: compiled steps]
    # Under torch.compile, opt.step() traces as one graph (no break caused by the optimizer):
    # * The flat buffers are built by an eager step first; building them (allocating, copying the
    #   parameters in, re-pointing them) is refused inside a trace.
    # * The traced inspection cannot read data pointers: FlatGroup.inspect_traced tells the
    #   gradient views it handed out by their mark, which the graph guards on (see [Note:
    #   gradient view marks] in buffers.py).
    # * Dynamo drops attribute writes on a torch.optim.Optimizer made inside a traced step (its
    #   OptimizerVariable does not replay them; a plain object's are replayed). So whatever a step
    #   leaves behind (hyperparameter rows, the gradient norm) lives on a _StepMemo the optimizer
    #   holds, never in an attribute of its own: otherwise last_grad_norm would stay at the last
    #   eager step's value.
    # * Sharded parameters: ShardedGroup.pull points the proxies at the DTensors' local gradients
    #   and copies the shards in (as eager; a shard FSDP2 holds in the flat buffer is recognized
    #   by its mark, and is copied if it was re-pointed), and push copies them out. A traced step
    #   does not adopt: a DTensor made inside the graph over a flat-buffer view comes out of it as
    #   a copy, so new gradients stay where FSDP2 put them (copied in each step, zeroed by
    #   opt.zero_grad(set_to_none=False) as such) and storage is shared by eager steps only.
    #   Dynamo of torch 2.11, 2.12 and 2.13 fails (an internal error) on DTensors whose local
    #   tensors are flat-buffer storage shared with FSDP2, depending on the layout (on the 2-rank
    #   FSDP2 test model whenever a shard at a storage offset other than 0 is shared; the FSDP2 + TP
    #   one traced on 2.11), 2.14 traces them all: below 2.14 a compiled step over shared shards is
    #   refused (TRACES_SHARED_SHARDS).
    def _prepare_traced(self) -> List[Tuple[FlatGroup, Optional[torch.Tensor]]]:
        """``_prepare`` inside ``torch.compile`` (see [Note: compiled steps])."""
        if not TRACES_SHARED_SHARDS and self._flat is not None and any(g.sharded is not None and g.sharded.shared for g in self._flat):
            raise NotImplementedError(
                f"torch.compile of AdamMini.step() over FSDP2 shards held in the optimizer's flat buffer (built with "
                f"model=, or for_model) needs torch >= 2.14 (dynamo of torch {torch.__version__} fails on them); "
                "build the optimizer without model= to compile its step, or step eagerly"
            )
        if self._flat is None or self._buffer_key() != self._built_key or not self._as_built():
            raise RuntimeError(
                "AdamMini builds its flat buffers outside torch.compile: call opt.step() once eagerly first "
                "(and again after changing name sets, a param group's state_dtype, param groups' parameters or "
                "opt.state, adding param groups or loading a state dict)"
            )
        if self._read_hparams():
            self._upload_hparams()
        live = []
        for group in self._flat:
            if group.sharded is not None:
                group.sharded.pull(group, traced=True)
            check = group.inspect_traced()
            if check.active is None or any(check.active):
                group.repair(check)
                active = None if check.active is None else group.active_flags(check.active, keep=False)
                live.append((group, active))
        return live

    # [Note: clipping norm of shards]
    # The global gradient norm needs the squares of the sharded gradients' local norms summed
    # over their ranks: per process group, they ride as one more value in the step's all-reduce
    # on it (see [Note: one all-reduce per step] in ``step``), so clipping adds no collective,
    # also with parameters on several process groups (tensor parallelism: the 2-D ones and the
    # dp-only ones). Every update runs after all of them, so the clip factor is known by then.
    def _amp_factors(self, device: torch.device) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """AMP's 1 / scale and found_inf as 0-dim tensors on ``device`` (or None), no host sync."""
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        inv_scale = None if grad_scale is None else _on(grad_scale, device).reciprocal()
        return inv_scale, None if found_inf is None else _on(found_inf, device)

    def _clip_factors(self, total_square: torch.Tensor, skip: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The clip factor and the skip flag (AMP's found_inf, or a non-finite norm) from the
        float64 square of the global norm of the unscaled gradients; the norm is kept for
        ``last_grad_norm``. See [Note: gradient multiplier] in coefficients.py."""
        total = total_square.sqrt()
        # A norm whose square overflows float32 (past 1.8e19) counts as non-finite: the blocks'
        # float32 sums of squares of these gradients would.
        total = total.float()
        total = torch.where(torch.isnan(total) | torch.isfinite(total.square()), total, float("inf"))
        self._memo.grad_norm = total
        # A skipped step's gradients are selected to 0 before the clip factor multiplies them: a
        # NaN factor (from a NaN norm) would make that 0 * NaN, NaN in m, p and v.
        finite = torch.isfinite(total)
        clip = torch.where(finite, (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0), 1.0)
        nonfinite = (~finite).float()
        return clip, (nonfinite if skip is None else skip + nonfinite)

    def _grad_norm_squares(
        self, groups: List[FlatGroup], device: torch.device, inv_scale: Optional[torch.Tensor]
    ) -> Tuple[Optional[torch.Tensor], Dict[Any, torch.Tensor]]:
        """Without max_grad_norm: (None, {}). With it, as clip_grad_norm_, the squares of the
        per-tensor norms of the unscaled gradients (``inv_scale``: AMP's 1 / scale, or None; idle
        params' zeroed grads add 0), float64: their sum over the unsharded and replicated
        parameters (on ``device``), and per process group the local sum over the shards of
        parameters split across its ranks, as a 1-element float32 vector for the step's
        all-reduce on that group (see [Note: clipping norm of shards])."""
        if self.max_grad_norm is None:
            return None, {}
        squares = [torch.zeros((), dtype=torch.float64, device=device)]
        shard_squares: Dict[Any, List[torch.Tensor]] = defaultdict(list)  # process group -> partial sums
        for group in groups:
            # Norms in float64: the gradients of an AMP step are still scaled, and GradScaler's
            # scale keeps growing while no inf is found, past where their float32 (let alone
            # 16-bit) sum of squares overflows and the step would be skipped.
            norms = torch._foreach_norm(group.grad_views, 2, dtype=torch.float64)
            if inv_scale is not None:
                norms = torch._foreach_mul(norms, inv_scale.to(group.device, torch.float64, non_blocking=True))
            partial = set(group.sharded.partial_members()) if group.sharded is not None else set()
            local = [n for i, n in enumerate(norms) if i not in partial]
            if local:
                squares.append(torch.stack(local).square().sum().to(device, non_blocking=True))
            if partial:
                shard_sum = torch.stack([norms[i] for i in sorted(partial)]).square().sum()
                shard_squares[group.sharded.process_group].append(shard_sum)
        summed = {pg: torch.stack(sums).sum().float().reshape(1) for pg, sums in shard_squares.items()}
        return torch.stack(squares).sum(), summed

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``. With ``set_to_none=False`` the flat gradient
        buffers are zeroed in one fill each and stay aliased (the fastest way to train)."""
        if set_to_none or self._flat is None:
            super().zero_grad(set_to_none)
            return
        for group in self._flat:
            group.zero_grad()
            if group.sharded is not None:
                group.sharded.zero_grad(group)

    # -- pickling (copy.deepcopy) ----------------------------------------------------------------
    _UNPICKLED = (
        "_flat", "_owners", "_row_index", "_row_select", "_built_key", "_built_params", "_built_state", "_built_entries",
        "_step_fn", "_model",
    )

    def __getstate__(self) -> Dict[str, Any]:
        """torch's state plus the name sets and settings; the flat buffers are rebuilt (from the
        per-parameter state) at the next step."""
        state = super().__getstate__()
        state.update({k: v for k, v in self.__dict__.items() if k not in state and k not in self._UNPICKLED})
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._flat = None  # rebuilt at the next step, which uploads the hyperparameters into it
        self.__dict__.setdefault("_model", None)  # not pickled; load_state_dict keeps it
        self._step_fn = dispatch.load_backend(self.backend)

    # -- checkpoints ---------------------------------------------------------------------------
    def _index_to_param(self) -> List[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _saved_blocks(self, params: List[torch.Tensor]) -> Dict[int, Any]:
        """Index -> ``LocalBlocks`` of every sharded parameter, as its state holds it: those of
        the flat groups where built (the name sets may have changed since: until the next step
        the state is the built partition's, as an unsharded parameter's is), else of the
        partition now (as ``load_state_dict`` cut the state)."""
        if self._flat is None:
            return self._local_blocks(self._partition(self._partition_key()))
        built = {id(p): lb for group in self._flat if group.sharded is not None for _, p, lb in group.sharded.members}
        return {k: built[id(p)] for k, p in enumerate(params) if id(p) in built}

    # [Note: state dict hooks]
    # torch's Optimizer.state_dict and load_state_dict run the hooks registered with
    # register_(load_)state_dict_pre/post_hook around their own work. This class adds to that work
    # (int steps, sharded states and the rounding seed after torch's state_dict; parsing, checks
    # and the moments' formats around torch's load), so it runs the hooks itself around the whole
    # and holds torch's back while it calls super(): a post-hook sees the finished state dict, and
    # what a load pre-hook returns is what gets loaded, as with any torch optimizer.
    @contextlib.contextmanager
    def _torch_hooks_held(self, *names: str):
        held = {name: getattr(self, name) for name in names}
        try:
            for name in names:
                setattr(self, name, OrderedDict())
            yield
        finally:
            for name, hooks in held.items():
                setattr(self, name, hooks)

    def state_dict(self) -> Dict[str, Any]:
        """As torch's, in official 1.1.1's per-parameter layout, with ``step`` as a Python int.
        Sharded parameters' states are saved as ``sharding.global_state`` describes (DTensors;
        a collective: every rank of their mesh must call it). See [Note: state dict hooks]."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        with self._torch_hooks_held("_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks"):
            state_dict = self._state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _state_dict(self) -> Dict[str, Any]:
        state_dict = super().state_dict()
        steps: Dict[torch.Tensor, int] = {}
        for group, owners in zip(self._flat or [], getattr(self, "_owners", [])):
            steps.update(zip(owners, group.steps.tolist()))
        params = self._index_to_param()
        state_dict["state"] = {
            idx: {**s, "step": steps[params[idx]] if params[idx] in steps else int(s["step"])}
            for idx, s in state_dict["state"].items()
        }
        local = self._saved_blocks(params)
        sharded = sorted(idx for idx in state_dict["state"] if idx in local)
        if sharded:
            saved = global_state([(state_dict["state"][idx], local[idx]) for idx in sharded])
            state_dict["state"].update(zip(sharded, saved))
        if self._round_seed is not None:
            for group in state_dict["param_groups"]:  # copies made by torch's state_dict
                group[ROUNDING_SEED_KEY] = self._round_seed
        return state_dict

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict written by ``AdamMini`` or by official ``Adam_mini`` 1.1.1. Second
        moments stay float32; each first moment is put in this optimizer's format at once (int8
        codes dequantized, or a float ``m`` quantized, as the build would), so ``state_dict()``
        saves that format even before the next step; the flat buffers are refilled at the next
        step (sharded parameters' states are converted there). The stochastic
        rounding seed is restored when saved (and this optimizer rounds stochastically). The
        load pre-hooks run first, on a shallow copy, as torch's do (see [Note: state dict hooks])."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = self._groups_in_own_order(state_dict)
        with self._torch_hooks_held("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            self._load_state_dict(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _groups_in_own_order(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        """``state_dict`` with its param groups in this optimizer's order where they carry this
        optimizer's parameter names in another order (a model whose parameters were declared in
        another order): torch's loader goes by position and would hand each parameter the state
        of another one of the same shape, silently."""
        own = [group["name"] for group in self.param_groups]
        saved_groups = state_dict["param_groups"]
        saved = [str(group.get("name")).lower() for group in saved_groups]
        if saved == own or len(set(own)) != len(own) or sorted(saved) != sorted(own):
            return state_dict
        where = {name: k for k, name in enumerate(saved)}
        logger.warning(
            "AdamMini.load_state_dict: the state dict holds this optimizer's parameters in another order "
            "(e.g. %r at position %d, here %d); their states are loaded by name",
            *next((name, where[name], k) for k, name in enumerate(own) if where[name] != k),
        )
        return {**state_dict, "param_groups": [saved_groups[where[name]] for name in own]}

    def _load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # torch's checks first (its loader makes them only after the state was parsed here).
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
        params = self._index_to_param()
        layouts = self._partition(self._partition_key())
        # As torch: state keys are the ids listed in the saved param groups, by position (ints
        # from state_dict(); names from torch.distributed.checkpoint.state_dict).
        saved_ids = [key for group in state_dict["param_groups"] for key in group["params"]]
        position = dict(zip(saved_ids, range(len(saved_ids))))
        saved = {}
        for key, s in state_dict["state"].items():
            idx = position.get(key, key)
            if not (isinstance(idx, int) and 0 <= idx < len(params)):
                raise ValueError(f"state dict has state for parameter {key!r}; this optimizer has {len(params)} parameters")
            check_state(s, layouts[idx])
            saved[idx] = s
        # torch's loader casts every state tensor to the parameter's dtype: keep v/vmean float32
        # and m in the dtype it was saved in (absorb_state casts it to this optimizer's m dtype).
        moments = {
            idx: {k: s[k].detach().to(torch.float32, copy=True) for k in ("v", "vmean", "m_scales") if k in s}
            for idx, s in saved.items()
        }
        for idx, s in saved.items():
            for k in ("m", "m_codes"):
                if torch.is_tensor(s.get(k)):
                    moments[idx][k] = s[k].detach()
        for group in state_dict["param_groups"]:
            if "state_dtype" in group:
                _check_state_dtype(f"state dict param group '{group.get('name')}'", group["state_dtype"])
        # A param group's own state_dtype is this optimizer's setting where the saved group has none.
        own_dtypes = {i: g["state_dtype"] for i, g in enumerate(self.param_groups) if "state_dtype" in g}
        seed = _saved_rounding_seed(state_dict)
        own_names = [group["name"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        # torch's loader copies the saved groups' keys, "name" too; the partition (and for_model's
        # layouts) follow this optimizer's parameter names, which stay.
        renamed = [
            (group.get("name"), name) for group, name in zip(self.param_groups, own_names)
            if str(group.get("name")).lower() != name
        ]
        for group, name in zip(self.param_groups, own_names):
            group["name"] = name
        if renamed and self.verbose:
            logger.warning(
                "AdamMini.load_state_dict: %d param groups were saved under other names (e.g. %r, here %r); "
                "their state was loaded by position and they keep this optimizer's names",
                len(renamed), *renamed[0],
            )
        for i, dtype in own_dtypes.items():
            self.param_groups[i].setdefault("state_dtype", dtype)
        for group in self.param_groups:  # the seed lives on the optimizer, not in its groups
            group.pop(ROUNDING_SEED_KEY, None)
        if seed is not None and self.stochastic_rounding:
            self._round_seed = seed
        for idx, kept in moments.items():
            self.state[params[idx]].update({k: t.to(params[idx].device) for k, t in kept.items()})
        local = self._local_blocks(layouts)
        # state_dict() before the next build saves self.state as loaded: put each parameter's m in
        # this optimizer's format now (as the build would), so that it saves what it would step.
        # Sharded parameters' states are cut to their shards below and converted at the build.
        asked = [group.get("state_dtype", self.state_dtype) for group in self.param_groups for _ in group["params"]]
        for idx, m_dtype in enumerate(_m_dtypes(asked, layouts, params)):
            if idx not in local and params[idx] in self.state and idx in saved:
                self.state[params[idx]] = state_in_format(self.state[params[idx]], layouts[idx], m_dtype or params[idx].dtype)
        for idx, lb in local.items():
            if params[idx] in self.state:
                self.state[params[idx]] = local_state(self.state[params[idx]], lb)
        self._flat = None
