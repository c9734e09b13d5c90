"""Stochastic rounding of float32 results to bfloat16, the same bits on every backend.

[Note: stochastic rounding]
With ``stochastic_rounding=True`` a bfloat16 parameter (and a bfloat16 ``m``) is written from its
float32 result ``x`` by adding 16 random bits to the low half of ``x``'s bit pattern and
truncating to the high half: ``x`` is rounded away from zero with probability equal to its
distance from the bfloat16 below it (in units of one bfloat16 ulp), so ``E[round(x)] = x``. Small
updates that round-to-nearest would lose (``|update| < ulp / 2``) survive on average, which is
what pure-bf16 training needs. inf and NaN are written as round-to-nearest writes them.

The random bits come from a counter-based generator: a hash of (key, element index, stream),
where the per-parameter key is a hash of the group's seed and the parameter's step counter, and
the element index is the element's position in the group's flat buffer. The flat buffer of a
sharded parameter (DTensor, FSDP2) holds the local shard, so every shard would draw the bits of
the first one, and their rounding errors would be one error repeated: the key of a shard is
salted with its coordinate along the parameter's sharded mesh dims (``ShardInfo.rank``;
``shard_keys``, applied to the coefficient table's key column, which every backend's kernels
read). The first shard, a replicated parameter, and every replica of a shard under HSDP (the
same coordinate) keep the unsalted key, so one process draws what it always did and replicas
draw alike. Nothing but the seed is
state (the same on every rank of a distributed job: ``replica_seed``): runs with the same seed
are bitwise reproducible, a resumed run (seed and step counters restored from the state dict)
continues exactly, and every backend (this module for the torch backend, the Triton kernels, the
CUDA kernels) computes the same bits. The key of a parameter
with no gradient this step is unchanged, and rounding its unchanged (already bfloat16) values is
exact, so idle parameters stay still.

The hash is a 32-bit integer finaliser (xorshift-multiply, two rounds) applied to
``lo32(index) ^ (key ^ stream + hi32(index) * GOLDEN)``; the key is ``mix32(mix32(t) + seed)``.
The torch implementation below works on int64 tensors holding unsigned 32-bit values and
multiplies in 16-bit halves so that no product overflows 64 bits.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.distributed as dist

MASK32 = 0xFFFFFFFF
MIX_MUL1 = 0x21F0AAAD
MIX_MUL2 = 0x735A2D97
GOLDEN = 0x9E3779B9  # spreads the high word of 64-bit element indices
MOMENT_STREAM = 0x68E31DA4  # xored into the key for m, so m and p draw different bits
SEED_BOUND = 1 << 31  # seeds are in [0, 2^31): a plain int32 kernel argument

IntLike = Union[int, torch.Tensor]


def _mul32(x: IntLike, c: int) -> IntLike:
    """``x * c mod 2^32`` for unsigned 32-bit ``x`` (int or int64 tensor) and constant ``c``."""
    if isinstance(x, int):
        return (x * c) & MASK32
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x: IntLike) -> IntLike:
    """A bijective 32-bit hash with good avalanche (xorshift-multiply finaliser)."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_MUL2)
    return x ^ (x >> 15)


def group_seed(seed: int, group_index: int) -> int:
    """The seed of flat group ``group_index`` (groups number their elements from 0 each, so each
    gets its own stream), in [0, SEED_BOUND)."""
    return mix32((seed + _mul32(group_index, GOLDEN)) & MASK32) % SEED_BOUND


def replica_seed(seed: int, device: torch.device) -> int:
    """``seed``, or rank 0's where torch.distributed is initialized with more than one rank (one
    broadcast over the default process group, of a tensor on ``device``): replicas of a
    parameter (DDP, replicated DTensors) must draw the same bits, or they drift apart."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return seed
    shared = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(shared, src=0)
    return int(shared.item())


def round_keys(seed: int, steps: torch.Tensor) -> torch.Tensor:
    """Per-parameter keys (int64 holding uint32) from the group seed and the step counters."""
    return mix32((mix32(steps & MASK32) + seed) & MASK32)


def shard_keys(keys: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """The keys (int64 holding uint32) of parameters' shards at coordinates ``coords`` along
    their sharded mesh dims: ``mix32(key ^ mix32(coord))``, the key itself at coordinate 0."""
    return torch.where(coords == 0, keys, mix32(keys ^ mix32(coords)))


def keys_as_float(keys: torch.Tensor) -> torch.Tensor:
    """uint32 keys (int64 tensor) as the float32 bit patterns stored in the coefficient table."""
    return torch.where(keys >= 1 << 31, keys - (1 << 32), keys).to(torch.int32).view(torch.float32)


def keys_from_float(column: torch.Tensor) -> torch.Tensor:
    """Inverse of ``keys_as_float``."""
    return column.contiguous().view(torch.int32).to(torch.int64) & MASK32


def random_bits(keys: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
    """16 random bits (int64 in [0, 2^16)) per element, from its key and its flat index."""
    salted = (keys ^ stream) + _mul32(index >> 32, GOLDEN)
    return mix32((index & MASK32) ^ (salted & MASK32)) >> 16


def stochastic_round_to_bf16(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Round float32 ``x`` to bfloat16 with the given 16 random bits per element."""
    raw = x.view(torch.int32)
    # Adding to the int32 pattern adds to the magnitude for either sign; finite values cannot
    # overflow (the largest finite magnitude plus 0xFFFF is below 2^31).
    rounded = ((raw + bits.to(torch.int32)) & -(1 << 16)).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)
