"""Sequential float32 reference of Mamba-2's SSD recurrence (specs/mamba.md §9).

Per batch b, head h (A_h < 0 a scalar per head, head h reads B/C group h // (H / G)):

    S_t[h] = r_t * exp(dt_t[h] A_h) S_{t-1}[h] + dt_t[h] x_t[h] ⊗ B_t[g(h)]     (S in R^{P x N})
    y_t[h] = S_t[h] C_t[g(h)]

with r_t = 0 where `reset[b, t]` (a document starts at t). The D skip, gate and norm are the
layer's. This sequential `lax.scan` is the specification the chunked SSD is tested against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def heads_of_groups(v: Array, n_heads: int) -> Array:
    """[B, T, G, N] -> [B, T, H, N]: head h uses group h // (H / G) (repeat, not tile)."""
    return jnp.repeat(v, n_heads // v.shape[2], axis=2)


def ssd(x: Array, dt: Array, A: Array, Bm: Array, C: Array, *, h0: Array | None = None,
        reset: Array | None = None) -> tuple[Array, Array]:
    """x: [B, T, H, P]; dt: [B, T, H]; A: [H]; Bm, C: [B, T, G, N]; h0: [B, H, P, N];
    reset: [B, T] bool. Returns y [B, T, H, P] float32 and the final state [B, H, P, N] float32."""
    Bsz, T, H, P = x.shape
    N = Bm.shape[-1]
    f32 = lambda a: a.astype(jnp.promote_types(a.dtype, jnp.float32))  # float32, or float64 in x64 tests
    x, dt, A = f32(x), f32(dt), f32(A)
    Bh, Ch = heads_of_groups(f32(Bm), H), heads_of_groups(f32(C), H)
    h0 = jnp.zeros((Bsz, H, P, N), x.dtype) if h0 is None else f32(h0)
    reset = jnp.zeros((Bsz, T), bool) if reset is None else reset.astype(bool)

    def step(s, inp):
        x_t, dt_t, b_t, c_t, r_t = inp
        decay = jnp.where(r_t[:, None], 0.0, jnp.exp(dt_t * A))         # [B, H]
        s = decay[..., None, None] * s + jnp.einsum("bhp,bhn->bhpn", dt_t[..., None] * x_t, b_t)
        return s, jnp.einsum("bhpn,bhn->bhp", s, c_t)

    mv = lambda a: jnp.moveaxis(a, 1, 0)
    hT, y = jax.lax.scan(step, h0, (mv(x), mv(dt), mv(Bh), mv(Ch), mv(reset)))
    return jnp.moveaxis(y, 0, 1), hT
