"""Half-split rotary position embedding at an explicit integer position array (float32 angles)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def rope_angles(pos: Array, head_dim: int, base: float) -> tuple[Array, Array]:
    """cos, sin of shape pos.shape + (head_dim // 2,), computed in float32."""
    half = head_dim // 2
    inv = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim)
    ang = pos.astype(jnp.float32)[..., None] * inv
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: Array, pos: Array, *, base: float = 10000.0) -> Array:
    """x: [B, T, H, d_h]; pos: [B, T]. x' = [x1 cos - x2 sin | x2 cos + x1 sin]."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head dim, got {d}")
    cos, sin = rope_angles(pos, d, base)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
