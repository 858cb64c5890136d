"""Gated linear attention, chunked form: the same function as `reference.py`.

Inside a chunk of C tokens with start state S0 and per-key cumulative log decay
G_t = sum_{j<=t} g_j [dk]:
    S_t = exp(G_t)[:, None] * S0 + sum_{i<=t} (exp(G_t - G_i) * k_i)^T v_i
    o_t = scale * ((q_t * exp(G_t)) S0 + sum_{i<=t} A[t, i] v_i),
    A[t, i] = sum_c q_tc k_ic exp(G_tc - G_ic)
The decay factors exp(G_t - G_i) come from masked per-key segment sums (`common.segsum`),
never from ratios exp(G_t) / exp(G_i) (which overflow for strong decay): exact and stable, at
the price of a [C, C, dk] factor per chunk and head. Without decay (`g=None`) A is the causal
q k^T. A scan runs over ceil(T / block) chunks; ragged lengths are padded with inert tokens
(k = v = 0, g = 0). `block` is an implementation parameter: every value gives the same function.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import float_type, pad_chunks, segsum, unpad_chunks

Array = jax.Array


def gla(q: Array, k: Array, v: Array, g: Array | None = None, *, scale: float,
        initial_state: Array | None = None, block: int = 64) -> tuple[Array, Array]:
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    dt = float_type(jnp.result_type(q, k, v) if g is None else jnp.result_type(q, k, v, g))
    C = max(1, min(block, T))
    arrs = [a.astype(dt) for a in ((q, k, v) if g is None else (q, k, v, g))]
    # [n, B, C, H, ...] -> [n, B, H, C, ...]
    chunks = [jnp.swapaxes(a, 2, 3) for a in pad_chunks(arrs, T, C)]
    S0 = (jnp.zeros((B, H, dk, dv), dt) if initial_state is None
          else initial_state.astype(dt))
    tril = jnp.tril(jnp.ones((C, C), bool))

    def body(S, inp):
        qq, kk, vv = inp[:3]  # [B, H, C, ...]
        if g is None:
            A = jnp.where(tril, jnp.einsum("bhtk,bhik->bhti", qq, kk), 0.0)
            o = jnp.einsum("bhtk,bhkv->bhtv", qq, S) + jnp.einsum("bhti,bhiv->bhtv", A, vv)
            return S + jnp.einsum("bhik,bhiv->bhkv", kk, vv), scale * o
        gg = inp[3]
        G = jnp.cumsum(gg, axis=2)                           # [B, H, C, dk]
        D = jnp.exp(segsum(gg, axis=2, fill=-jnp.inf))       # [B, H, C(t), C(i), dk]
        A = jnp.einsum("bhtk,bhik,bhtik->bhti", qq, kk, D)
        o = (jnp.einsum("bhtk,bhkv->bhtv", qq * jnp.exp(G), S)
             + jnp.einsum("bhti,bhiv->bhtv", A, vv))
        last = D[:, :, -1]                                   # exp(G_C - G_i) [B, H, C, dk]
        S = (jnp.exp(G[:, :, -1])[..., None] * S
             + jnp.einsum("bhik,bhiv->bhkv", last * kk, vv))
        return S, scale * o

    S, o = jax.lax.scan(body, S0, tuple(chunks))            # o [n, B, H, C, dv]
    return unpad_chunks(jnp.swapaxes(o, 2, 3), T), S
