"""Hydra's SSM path (specs/hydra.md §2.2): a content-gated diagonal recurrence, one state per
channel, read before the update.

    [Δ_t, B_t, C_t, U_t] = x_t W_param          W_param [d, 4d], no bias, chunk order (Δ, B, C, U)
    α_t     = exp(−softplus(Δ_t) ⊙ λ),  λ = softplus(λ_base) > 0
    s_{t+1} = α_t ⊙ s_t + B_t ⊙ U_t
    y_t     = C_t ⊙ s_t + x_t W_skip           (s_t holds inputs up to t − 1 only)

Mamba's selective scan with N = 1, A = −λ, Δ = softplus(Δ_t), the input B_t U_t not Δ-scaled
and the read-out before the update (§7.2; tests/test_hydra_ssm.py checks it against the
selective_scan op). The scan is the `diag_scan` op (pallas_kernels/diag_scan: a token loop
as reference, associative scans within chunks of `block` as the chunked form); the state is
s [B, d] float32.
λ_d is drawn log-uniformly in [1e-3, 1] (half-lives ≈ 1–1000 tokens) and stored through its
inverse softplus (§5 [spec]). Pads: α = 1, no input (the state after the last real token is
returned); a document start zeroes the state the token reads.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.common import call_flags, param
from layers.linear import Dense
from layers.ssm import inv_softplus
from pallas_kernels.diag_scan import diag_scan

Array = jax.Array


@struct.dataclass
class HydraSSMState:
    s: Array     # [B, d] float32: the state the next token reads
    pos: Array   # [B] int32


class HydraSSM(nnx.Module):
    """The SSM path of a Hydra block (module doc); the mixer contract with state HydraSSMState."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, lam_min: float = 1e-3, lam_max: float = 1.0,
                 init_std: float = 0.02, impl: str = "auto", block: int = 64):
        self.dim, self.impl, self.block = dim, impl, block
        self.w_param = Dense(dim, 4 * dim, rngs=rngs, axes=("embed", "inner"), std=init_std)
        self.w_skip = Dense(dim, dim, rngs=rngs, axes=("embed", None), std=init_std)
        u = jax.random.uniform(rngs.params(), (dim,), jnp.float32)
        lam = jnp.exp(u * (math.log(lam_max) - math.log(lam_min)) + math.log(lam_min))
        self.lam_base = param(inv_softplus(lam), ("norm",))

    def init_state(self, batch_size: int, max_len: int | None = None) -> HydraSSMState:
        return HydraSSMState(s=jnp.zeros((batch_size, self.dim), jnp.float32),
                             pos=jnp.zeros((batch_size,), jnp.int32))

    def gates(self, x: Array):
        """(α_t, B_t U_t, C_t) [B, T, d] in float32."""
        d = self.dim
        p = self.w_param(x).astype(jnp.float32)
        delta, b, c, u = p[..., :d], p[..., d:2 * d], p[..., 2 * d:3 * d], p[..., 3 * d:]
        lam = jax.nn.softplus(self.lam_base[...].astype(jnp.float32))
        return jnp.exp(-jax.nn.softplus(delta) * lam), b * u, c

    def __call__(self, x: Array, state: HydraSSMState | None = None, *, mask=None,
                 segment_ids=None, context=None, deterministic: bool = True, key=None):
        B, T, _ = x.shape
        state = self.init_state(B) if state is None else state
        real, starts, next_pos = call_flags(state.pos, mask, segment_ids, B, T)
        alpha, inp, c = self.gates(x)
        alpha = jnp.where(real[..., None], alpha, 1.0)
        inp = jnp.where(real[..., None], inp, 0.0)
        s, final = diag_scan(alpha, inp, state.s, starts & real, impl=self.impl,
                             block=self.block)
        y = c * s + self.w_skip(x).astype(jnp.float32)
        return y.astype(x.dtype), HydraSSMState(s=final, pos=next_pos), {}


def hydra_ssm_params(dim: int) -> int:
    """W_param 4d², W_skip d², λ d (hydra.md §3.2's SSM term without its path norm)."""
    return 5 * dim * dim + dim
