"""Reference form of the kernelised delta rule: a scan over the call's tokens (float32).

Inputs: q, k [B, T, H, d] (the kernel's arguments), v [B, T, H, dv], eta [B, T, H] (write rates;
0 on padding), doc [B, T] (document ids), valid [B, T]; cache: None or (k [B, S, H, d],
u [B, S, H, dv], doc [B, S], valid [B, S]) of the keys already written. Returns
(y [B, T, H, dv], u [B, T, H, dv]), u = 0 at padding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def kappa(a, b, scale):
    """κ(a_t, b_j) = exp(s a_t·b_j): [B, T, H, d] x [B, S, H, d] -> [B, H, T, S]."""
    return jnp.exp(scale * jnp.einsum("bthd,bshd->bhts", a, b))


def cache_terms(q, k, doc, cache, scale):
    """The cached keys' parts: (Σ_j κ(k_t, k_j) u_j, Σ_j κ(q_t, k_j) u_j) over the cached keys of
    each token's document, [B, T, H, dv] each (zeros without a cache)."""
    if cache is None:
        return 0.0, 0.0
    ck, cu, cdoc, cval = cache
    vis = (cval[:, None, :] & (cdoc[:, None, :] == doc[:, :, None]))[:, None]   # [B, 1, T, S]
    cu = cu.astype(jnp.float32)
    read = lambda a: jnp.einsum("bhts,bshd->bthd",
                                jnp.where(vis, kappa(a, ck.astype(jnp.float32), scale), 0.0), cu)
    return read(k), read(q)


def kernel_delta(q, k, v, eta, *, scale: float, doc, valid, cache=None):
    f32 = lambda a: a.astype(jnp.float32)
    q, k, v, eta = f32(q), f32(k), f32(v), f32(eta) * valid[:, :, None]
    B, T, H, dv = v.shape
    kc, qc = cache_terms(q, k, doc, cache, scale)
    v_eff = v - kc

    def step(u, t):
        same = (doc == jax.lax.dynamic_index_in_dim(doc, t, axis=1)) & valid  # t's doc
        kt = jax.lax.dynamic_index_in_dim(k, t, axis=1)                   # [B, 1, H, d]
        earlier = same & (jnp.arange(T)[None, :] < t)
        w = jnp.where(earlier[:, None, None, :], kappa(kt, k, scale), 0.0)  # [B, H, 1, T]
        err = jax.lax.dynamic_index_in_dim(v_eff, t, axis=1) - jnp.einsum("bhts,bshd->bthd", w, u)
        u_t = jax.lax.dynamic_index_in_dim(eta, t, axis=1)[..., None] * err
        return jax.lax.dynamic_update_index_in_dim(u, u_t, t, axis=1), None

    u, _ = jax.lax.scan(step, jnp.zeros((B, T, H, dv), jnp.float32), jnp.arange(T))
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]                 # [T, S]
    vis = (causal[None] & (doc[:, :, None] == doc[:, None, :]) & valid[:, None, :])[:, None]
    y = jnp.einsum("bhts,bshd->bthd", jnp.where(vis, kappa(q, k, scale), 0.0), u) + qc
    return y, u
