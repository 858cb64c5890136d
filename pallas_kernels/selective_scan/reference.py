"""Sequential float32 reference of the Mamba-1 selective scan (specs/mamba.md §2.3-2.4).

Per batch b, channel d, state n (A already negative, A = -exp(A_log)):

    h_t[d, n] = r_t * exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + Bbar_t[d, n] x_t[d]
    y_t[d]    = sum_n C_t[n] h_t[d, n]

with Bbar_t = dt_t[d] B_t[n] (the reference code's Euler input, default) or the exact ZOH
(exp(dt A) - 1) / A * B_t[n] (`exact_zoh=True`), and r_t = 0 where `reset[b, t]` (a document
starts at t: the carried state is dropped), else 1. The D skip and the gate are the layer's.
This sequential `lax.scan` *is* the specification every faster form is tested against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def input_coeff(dt: Array, A: Array, exact_zoh: bool) -> Array:
    """The factor multiplying B_t[n] x_t[d]: dt (Euler, broadcast over n) or expm1(dt A) / A."""
    if exact_zoh:
        return jnp.expm1(dt[..., None] * A) / A
    return dt[..., None]


def selective_scan(x: Array, dt: Array, A: Array, Bm: Array, C: Array, *, h0: Array | None = None,
                   reset: Array | None = None, exact_zoh: bool = False) -> tuple[Array, Array]:
    """x, dt: [B, T, Di]; A: [Di, N]; Bm, C: [B, T, N]; h0: [B, Di, N]; reset: [B, T] bool.

    Returns y [B, T, Di] float32 and the final state h_T [B, Di, N] float32.
    """
    Bsz, T, Di = x.shape
    N = A.shape[1]
    f32 = lambda a: a.astype(jnp.promote_types(a.dtype, jnp.float32))  # float32, or float64 in x64 tests
    x, dt, A, Bm, C = f32(x), f32(dt), f32(A), f32(Bm), f32(C)
    h0 = jnp.zeros((Bsz, Di, N), x.dtype) if h0 is None else f32(h0)
    reset = jnp.zeros((Bsz, T), bool) if reset is None else reset.astype(bool)

    def step(h, inp):
        x_t, dt_t, b_t, c_t, r_t = inp
        decay = jnp.exp(dt_t[..., None] * A)                       # [B, Di, N]
        decay = jnp.where(r_t[:, None, None], 0.0, decay)
        u = input_coeff(dt_t, A, exact_zoh) * x_t[..., None] * b_t[:, None, :]
        h = decay * h + u
        return h, jnp.einsum("bdn,bn->bd", h, c_t)

    mv = lambda a: jnp.moveaxis(a, 1, 0)
    hT, y = jax.lax.scan(step, h0, (mv(x), mv(dt), mv(Bm), mv(C), mv(reset)))
    return jnp.moveaxis(y, 0, 1), hT
