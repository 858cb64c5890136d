"""Sequential float32 reference of the LSSL recurrence (specs/lssl.md §2.3, §4).

One SSM per feature h, already discretised (Abar [H, N, N], Bbar [H, N]), read out by
C [H, M, N] and the skip D [H, M]:

    x_k = Abar x_{k-1} + Bbar u_k,   y_k = C x_k + D u_k

(the read-out sees the state after u_k, so the kernel's first tap is C Bbar). `mask` marks real
tokens (pads leave the state unchanged), `reset` document starts (the carried state is zeroed
before the step). This `lax.scan` *is* the specification the chunked convolution is tested
against. All maths runs in float32 (float64 when given float64 arrays, for tests).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import upcast

Array = jax.Array


@jax.jit
def lssl(u: Array, Abar: Array, Bbar: Array, C: Array, D: Array, h0: Array | None = None,
         mask: Array | None = None, reset: Array | None = None) -> tuple[Array, Array]:
    """u [B, L, H]; h0 [B, H, N]; mask, reset [B, L] bool.
    Returns y [B, L, H, M] and the state after the last real token x [B, H, N]."""
    u, Abar, Bbar, C, D, h0 = upcast(u, Abar, Bbar, C, D, h0)
    Bsz, L, H = u.shape
    N = Abar.shape[-1]
    s = jnp.zeros((Bsz, H, N), u.dtype) if h0 is None else h0
    mask = jnp.ones((Bsz, L), bool) if mask is None else mask
    reset = jnp.zeros((Bsz, L), bool) if reset is None else reset

    def step(x, inp):
        u_t, m_t, r_t = inp
        x_prev = jnp.where(r_t[:, None, None], 0.0, x)
        x_new = jnp.einsum("hnm,bhm->bhn", Abar, x_prev) + Bbar * u_t[..., None]
        x = jnp.where(m_t[:, None, None], x_new, x)
        y = jnp.einsum("hkn,bhn->bhk", C, x_new) + D * u_t[..., None]
        return x, y

    mv = lambda a: jnp.moveaxis(a, 1, 0)
    x, y = jax.lax.scan(step, s, (mv(u), mv(mask), mv(reset)))
    return jnp.moveaxis(y, 0, 1), x
