"""Gated linear attention, reference form (specs/mom.md §2.8 "Other bases"; the GLA / linear
attention recurrence beside the contract notes' gated delta rule, same row layout).

Per head a state S [dk, dv]; row vectors q, k [dk], v [dv]; a per-key log-decay g [dk] (<= 0):
    S <- exp(g)[:, None] * S + k^T v
    o  = scale * q S                       (read after the update)
`g=None` is plain linear attention (no decay: S <- S + k^T v). Feature maps, normalisers and
output stages are the caller's. Maths in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import float_type

Array = jax.Array


def gla(q: Array, k: Array, v: Array, g: Array | None = None, *, scale: float,
        initial_state: Array | None = None) -> tuple[Array, Array]:
    """q, k [B, T, H, dk]; v [B, T, H, dv]; g [B, T, H, dk] or None; initial_state
    [B, H, dk, dv]. Returns o [B, T, H, dv] and the final state [B, H, dk, dv]."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    dt = float_type(jnp.result_type(q, k, v) if g is None else jnp.result_type(q, k, v, g))
    S0 = (jnp.zeros((B, H, dk, dv), dt) if initial_state is None
          else initial_state.astype(dt))

    def step(S, inp):
        qt, kt, vt, gt = inp
        if gt is not None:
            S = jnp.exp(gt)[..., None] * S
        S = S + jnp.einsum("bhk,bhv->bhkv", kt, vt)
        return S, scale * jnp.einsum("bhk,bhkv->bhv", qt, S)

    xs = tuple(None if a is None else jnp.moveaxis(a.astype(dt), 1, 0) for a in (q, k, v, g))
    S, o = jax.lax.scan(step, S0, xs)
    return jnp.moveaxis(o, 0, 1), S
