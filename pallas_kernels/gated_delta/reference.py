"""Gated delta rule, reference form (specs/mom.md contract notes: the one shared op).

Row layout: per head a state S [dk, dv]; row vectors q, k [dk], v [dv]. Per token:
    S <- exp(g) * S
    S <- S + k^T * beta * (v - k S)
    o  = scale * q S                       (read after the update)
Inputs are taken as given: q, k already normalised by the caller, log-decay g <= 0, beta >= 0 and
NOT clamped (the Titans mapping beta = theta / (1 - alpha) may exceed 1), an explicit `scale`.
Maths in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import float_type

Array = jax.Array


def gated_delta(q: Array, k: Array, v: Array, g: Array, beta: Array, *, scale: float,
                initial_state: Array | None = None) -> tuple[Array, Array]:
    """q, k [B, T, H, dk]; v [B, T, H, dv]; g, beta [B, T, H]; initial_state [B, H, dk, dv].

    Returns o [B, T, H, dv] and the final state [B, H, dk, dv] (both in the compute dtype)."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    dt = float_type(jnp.result_type(q, k, v, g, beta))
    S0 = (jnp.zeros((B, H, dk, dv), dt) if initial_state is None
          else initial_state.astype(dt))

    def step(S, inp):
        qt, kt, vt, gt, bt = inp
        S = jnp.exp(gt)[..., None, None] * S
        err = vt - jnp.einsum("bhk,bhkv->bhv", kt, S)
        S = S + jnp.einsum("bhk,bhv->bhkv", kt, bt[..., None] * err)
        o = scale * jnp.einsum("bhk,bhkv->bhv", qt, S)
        return S, o

    xs = tuple(jnp.moveaxis(a.astype(dt), 1, 0) for a in (q, k, v, g, beta))
    S, o = jax.lax.scan(step, S0, xs)
    return jnp.moveaxis(o, 0, 1), S
