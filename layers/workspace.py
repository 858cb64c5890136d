"""Hydra's causal functional workspace (specs/hydra.md §2.5 [spec], contract note "The workspace
is model-level state"): S slots M_c [S, D] per sequence, M_0 a learned parameter, written once per
completed chunk of C_w tokens from ū_c, the mean over the chunk of the final RMSNorm output (the
tensor the LM head reads):

    ω_c     = softmax( (W_kw ū_c) · (W_km M_c)ᵀ / √r )           slot addressing, rank r
    η_c     = σ(w_η · ū_c + b_η)                                 write strength
    M_{c+1} = (1 − η_c ω_c) ⊙ M_c + η_c ω_c ⊗ (W_u ū_c)          row-wise convex update

W_kw, W_km: D -> r; W_u = W_u2 W_u1 the rank-r map D -> r -> D. Tokens of chunk c + 1 read
M_{c+1} as extra keys and values in every SGA layer (layers.sga, `context`). The chunk grid is
anchored at position 0. This module holds the parameters and the state update; the model-level
scan over chunks with the block stack inside is zoo.hydra.HydraLM. Parameters:
S D + 4 D r + D + 1 (`workspace_params`). M_0 ~ N(0, slot_std²) (the prototype's slots: 0.01),
projections N(0, init_std²), w_η = 0, b_η = 0 (η = 1/2 at the start).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.common import normal, param
from layers.linear import Dense

Array = jax.Array


@struct.dataclass
class WorkspaceState:
    slots: Array   # [B, S, D] float32: M_c, what the tokens of the current chunk read
    total: Array   # [B, D] float32: sum of the current chunk's final-norm outputs so far
    count: Array   # [B] int32: real tokens of the current chunk so far


def workspace_params(dim: int, n_slots: int, rank: int) -> int:
    return n_slots * dim + 4 * dim * rank + dim + 1


def workspace_write_flops(dim: int, n_slots: int, rank: int) -> float:
    """Forward FLOPs of one write: W_kw ū, W_km M, the S scores and W_u ū (D -> r -> D)."""
    return 2.0 * dim * rank + 2.0 * n_slots * dim * rank + 2.0 * n_slots * rank + 4.0 * dim * rank


class Workspace(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs, n_slots: int = 64, rank: int = 128,
                 chunk: int = 64, slot_std: float = 0.01, init_std: float = 0.02):
        self.n_slots, self.rank, self.chunk = n_slots, rank, chunk
        self.slots0 = param(normal(rngs.params(), (n_slots, dim), slot_std), (None, "embed"))
        mk = lambda i, o, ax: Dense(i, o, rngs=rngs, axes=ax, std=init_std)  # noqa: E731
        self.w_kw, self.w_km = mk(dim, rank, ("embed", None)), mk(dim, rank, ("embed", None))
        self.w_u1, self.w_u2 = mk(dim, rank, ("embed", None)), mk(rank, dim, (None, "embed"))
        self.w_eta = param(jnp.zeros((dim,), jnp.float32), ("norm",))
        self.b_eta = param(jnp.zeros((), jnp.float32), ())

    def init_state(self, batch_size: int) -> WorkspaceState:
        S, D = self.slots0.shape
        return WorkspaceState(
            slots=jnp.broadcast_to(self.slots0[...].astype(jnp.float32), (batch_size, S, D)),
            total=jnp.zeros((batch_size, D), jnp.float32),
            count=jnp.zeros((batch_size,), jnp.int32))

    def addressing(self, slots: Array, u: Array) -> tuple[Array, Array]:
        """(ω [B, S], η [B]) of a write of ū `u` [B, D] into `slots` [B, S, D]."""
        qk = self.w_kw(u)                                          # [B, r]
        km = self.w_km(slots)                                      # [B, S, r]
        omega = jax.nn.softmax(jnp.einsum("br,bsr->bs", qk, km) * self.rank ** -0.5, axis=-1)
        eta = jax.nn.sigmoid(u @ self.w_eta[...] + self.b_eta[...])
        return omega, eta

    def write(self, slots: Array, u: Array) -> Array:
        """M_{c+1} from M_c `slots` [B, S, D] and ū_c `u` [B, D]."""
        omega, eta = self.addressing(slots, u)
        a = (eta[:, None] * omega)[..., None]                      # [B, S, 1]
        return (1.0 - a) * slots + a * self.w_u2(self.w_u1(u))[:, None, :]

    def absorb(self, state: WorkspaceState, z: Array, valid: Array,
               completes: Array) -> WorkspaceState:
        """Add the real tokens of `z` [B, L, D] (final-norm outputs, `valid` [B, L]) to the current
        chunk; where `completes` [B] (their last token closes the chunk) write ū and start the
        next chunk."""
        total = state.total + jnp.sum(jnp.where(valid[..., None], z.astype(jnp.float32), 0.0), 1)
        count = state.count + jnp.sum(valid, axis=1).astype(jnp.int32)
        u = total / jnp.maximum(count, 1)[:, None].astype(jnp.float32)
        slots = jnp.where(completes[:, None, None], self.write(state.slots, u), state.slots)
        return WorkspaceState(slots=slots, total=jnp.where(completes[:, None], 0.0, total),
                              count=jnp.where(completes, 0, count))
