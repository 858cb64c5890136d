"""Gated delta rule, chunked form (UT transform): same function as `reference.py`.

Inside a chunk with start state S0 and cumulative log decay G_t = sum_{j<=t} g_j:
    S_t = e^{G_t} S0 + sum_{i<=t} e^{G_t - G_i} k_i^T u_i
with pseudo-values u solving the unit lower-triangular system
    (I + diag(beta) strict_tril(D * K K^T)) u = diag(beta) (V - diag(e^G) K S0),
    D[t, i] = exp(G_t - G_i)  (masked segment sums, never ratios of cumulative products),
outputs o_t = scale (e^{G_t} q_t S0 + sum_{i<=t} D[t, i] (q_t . k_i) u_i), and the chunk-end state
from the last row. A scan runs over ceil(T / block) chunks; ragged lengths are padded with
inert tokens (g = 0, beta = 0), which leave the state unchanged. `block` (the chunk length) is an
implementation parameter: every value gives the same function.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from pallas_kernels.common import float_type, segsum

Array = jax.Array


def gated_delta(q: Array, k: Array, v: Array, g: Array, beta: Array, *, scale: float,
                initial_state: Array | None = None, block: int = 64) -> tuple[Array, Array]:
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    dt = float_type(jnp.result_type(q, k, v, g, beta))
    C = max(1, min(block, T))
    n = -(-T // C)
    pad = n * C - T
    # [B, H, n, C, ...]
    def prep(a):
        a = a.astype(dt)
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        a = jnp.moveaxis(a, 2, 1)  # [B, H, T', ...]
        return a.reshape((B, H, n, C) + a.shape[3:])

    qc, kc, vc, gc, bc = (prep(a) for a in (q, k, v, g, beta))
    S0 = (jnp.zeros((B, H, dk, dv), dt) if initial_state is None
          else initial_state.astype(dt))
    eye = jnp.eye(C, dtype=dt)
    tril = jnp.tril(jnp.ones((C, C), bool))
    stril = jnp.tril(jnp.ones((C, C), bool), -1)

    def body(S, inp):
        qq, kk, vv, gg, bb = inp  # [B, H, C, ...]
        G = jnp.cumsum(gg, axis=-1)
        D = jnp.exp(segsum(gg, fill=-jnp.inf))  # [B, H, C, C]
        eG = jnp.exp(G)
        KK = jnp.einsum("bhtk,bhik->bhti", kk, kk)
        A = eye + bb[..., None] * jnp.where(stril, D * KK, 0.0)
        rhs = bb[..., None] * (vv - eG[..., None] * jnp.einsum("bhtk,bhkv->bhtv", kk, S))
        u = solve_triangular(A, rhs, lower=True, unit_diagonal=True)
        QK = jnp.where(tril, D * jnp.einsum("bhtk,bhik->bhti", qq, kk), 0.0)
        o = scale * (eG[..., None] * jnp.einsum("bhtk,bhkv->bhtv", qq, S)
                     + jnp.einsum("bhti,bhiv->bhtv", QK, u))
        last = D[..., -1, :]  # exp(G_C - G_i)
        S = eG[..., -1, None, None] * S + jnp.einsum("bhi,bhik,bhiv->bhkv", last, kk, u)
        return S, o

    xs = tuple(jnp.moveaxis(a, 2, 0) for a in (qc, kc, vc, gc, bc))
    S, o = jax.lax.scan(body, S0, xs)  # o [n, B, H, C, dv]
    o = jnp.moveaxis(o, 0, 2).reshape(B, H, n * C, dv)[:, :, :T]
    return jnp.moveaxis(o, 1, 2), S
