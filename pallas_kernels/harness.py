"""What every Pallas kernel of `pallas_kernels/` shares (DESIGN.md, three levels of every mixer):

* `backend_of(impl)`: "interpret" for Impl.PALLAS_INTERPRET (the kernel's body run as XLA on
  any platform: the CPU tests), else the platform the kernel lowers for, "tpu" (Mosaic) or
  "gpu" (Triton); Impl.PALLAS on a CPU is one ValueError line, never a fallback.
* `call(...)`: `pl.pallas_call` with that backend's compiler parameters (TPU: every grid
  dimension "parallel" unless given; Triton: warps and stages) and `interpret` set.
* `over_mesh(...)`: a kernel call under `jax.shard_map` when a mesh is set (`jax.set_mesh`, as
  the trainer does): the batch dimension split over every mesh axis but `HEAD_AXIS`, the heads
  over `HEAD_AXIS` ("tensor") when it divides them, everything else whole; each device runs the
  kernel on its shard (a custom call cannot be partitioned by XLA). Without a mesh, or on one
  device, the call is made as is.
* inside kernels: `token_row` / `token_col` / `token_scalar` (token t of a block as a float32
  [1, d] row, [d, 1] column or [1] scalar, whatever the block's leading unit dims) and `mm`,
  `outer`, `mm_t` (float32-accumulating products of rows and matrices).
* `round_up`, `block_size`: block sizes are arguments that never change the function; inputs are
  padded to whole blocks by the caller (padded keys are invalid, padded queries discarded).

Every kernel keeps its state and accumulators in float32 whatever the input dtype, and is
wrapped in a `jax.custom_vjp` whose backward is itself Pallas (`jax.grad` through a bare
`pallas_call` fails); the residuals are what the backward kernels need (flash attention: the
row log-sum-exp).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from pallas_kernels.impl import Impl, parse

BACKENDS = ("interpret", "tpu", "gpu")
HEAD_AXIS = "tensor"          # the mesh axis heads are split over (train.sharding's names)


def backend_of(impl: str | Impl, op: str) -> str:
    impl = parse(impl)
    if impl is Impl.PALLAS_INTERPRET:
        return "interpret"
    if impl is not Impl.PALLAS:
        raise ValueError(f"{op}: impl={impl.value!r} is not a Pallas implementation")
    platform = jax.default_backend()
    if platform not in ("tpu", "gpu"):
        raise ValueError(f"{op}: impl='pallas' needs a TPU or a GPU (this platform is "
                         f"{platform}); impl='pallas_interpret' runs the same kernel here")
    return platform


def compiler_params(backend: str, grid_rank: int, semantics: Sequence[str] | None = None):
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=tuple(semantics or
                                                              ("parallel",) * grid_rank))
    if backend == "gpu":
        from jax.experimental.pallas import triton as plt
        return plt.CompilerParams(num_warps=4, num_stages=2)
    return None


def call(kernel, *, backend: str, grid: tuple[int, ...], in_specs: Sequence[Any],
         out_specs: Any, out_shape: Any, name: str, semantics: Sequence[str] | None = None):
    """`pl.pallas_call(kernel, ...)` for `backend` (one of BACKENDS)."""
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend {backend!r} is not one of {BACKENDS}")
    params = compiler_params(backend, len(grid), semantics)
    return pl.pallas_call(kernel, grid=grid, in_specs=list(in_specs), out_specs=out_specs,
                          out_shape=out_shape, interpret=backend == "interpret", name=name,
                          **({} if params is None else {"compiler_params": params}))


def token_row(ref, t):
    """Row t of a block [1, ..., T, d] as float32 [1, d]."""
    return ref[(0,) * (ref.ndim - 2) + (pl.ds(t, 1), slice(None))].astype(jnp.float32)


def token_col(ref, t):
    """Column t of a block [1, ..., d, T] as float32 [d, 1]."""
    return ref[(0,) * (ref.ndim - 2) + (slice(None), pl.ds(t, 1))].astype(jnp.float32)


def token_scalar(ref, i, t):
    """Entry (i, t) of a block [1, ..., n, T] of per-token scalars as float32 [1]."""
    return ref[(0,) * (ref.ndim - 2) + (i, pl.ds(t, 1))].astype(jnp.float32)


def mm(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def outer(a, b):
    """a [1, m], b [1, n] -> aᵀ b [m, n]."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def mm_t(a, b):
    """a [1, n], b [m, n] -> a bᵀ [1, m]."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def block_size(requested: int, length: int, multiple: int = 8) -> int:
    """The block used for `length` positions: `requested`, or the whole (rounded) length when it
    is shorter. Never changes the function, only the padding and the grid."""
    if requested < 1:
        raise ValueError(f"block size {requested} must be >= 1")
    return min(requested, round_up(max(length, 1), multiple))


def over_mesh(fn: Callable, args: Sequence[Any], kinds: Sequence[str], out_kinds: Sequence[str],
              *, batch: int, heads: Sequence[int]):
    """`fn(*args)`, under `jax.shard_map` over the current mesh when there is one. `kinds` (one
    per arg, and `out_kinds` per output) says how an array's leading dims split: "bh" (batch,
    heads, ...), "b" (batch, ...) or "r" (replicated). `batch` and `heads` (every head count
    that is split) decide which axes can split them; an axis that does not divide them is not
    used."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return fn(*args)
    sizes = dict(mesh.shape)
    b_axes = tuple(a for a in mesh.axis_names if a != HEAD_AXIS and sizes[a] > 1)
    if batch % math.prod(sizes[a] for a in b_axes):
        b_axes = ()
    h = sizes.get(HEAD_AXIS, 1)
    h_axis = HEAD_AXIS if h > 1 and all(n % h == 0 for n in heads) else None
    if not b_axes and h_axis is None:
        return fn(*args)
    bspec = b_axes or None

    def spec(kind):
        return {"bh": P(bspec, h_axis), "b": P(bspec), "r": P()}[kind]
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(k) for k in kinds),
                         out_specs=tuple(spec(k) for k in out_kinds), check_vma=False)(*args)
