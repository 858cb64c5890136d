"""Kernelised delta rule in closed form: one unit-lower-triangular solve per call (atlas.md
Eqs. 30–31), U = (I + diag(η) strict_tril(K_κ))^{−1} diag(η) (V − K_cache U_cache),
Y = tril(Q_κ) U + Q_cache U_cache, the triangles restricted to each token's document. Same
inputs and outputs as `reference.kernel_delta`."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.kernel_delta.reference import cache_terms, kappa


def kernel_delta(q, k, v, eta, *, scale: float, doc, valid, cache=None):
    f32 = lambda a: a.astype(jnp.float32)
    q, k, v, eta = f32(q), f32(k), f32(v), f32(eta) * valid[:, :, None]
    T = v.shape[1]
    kc, qc = cache_terms(q, k, doc, cache, scale)
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    same = (doc[:, :, None] == doc[:, None, :]) & valid[:, None, :]                # [B, T, S]
    eta_h = jnp.moveaxis(eta, 2, 1)[..., None]                                     # [B, H, T, 1]
    strict = jnp.where((same & (j < i))[:, None], kappa(k, k, scale), 0.0)
    L = jnp.eye(T, dtype=jnp.float32) + eta_h * strict
    rhs = eta_h * jnp.moveaxis(v - kc, 2, 1)                                       # [B, H, T, dv]
    u = jax.scipy.linalg.solve_triangular(L, rhs, lower=True, unit_diagonal=True)
    tril = jnp.where((same & (j <= i))[:, None], kappa(q, k, scale), 0.0)
    y = jnp.moveaxis(tril @ u, 1, 2) + qc
    return y, jnp.moveaxis(u, 1, 2)
