"""Blockwise (flash-style) attention in plain XLA: a scan over key blocks with an online softmax.

Memory is O(T * block) per head instead of O(T * S); the scan body is rematerialised in the
backward pass, so the gradient does not store the score matrix either. Same masks and same
function as `reference.attention` (the block size never changes the result beyond rounding).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention.reference import NEG

Array = jax.Array


def attention(q: Array, k: Array, v: Array, *, q_pos: Array, k_pos: Array, q_group: Array,
              k_group: Array, k_valid: Array, k_always: Array | None = None,
              k_bias: Array | None = None, causal: bool = True, window: int | None = None,
              scale: float | None = None, block: int = 128) -> Array:
    B, T, H, d = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    rep = H // Hkv
    scale = d ** -0.5 if scale is None else scale
    bk = min(block, S)
    n = -(-S // bk)
    pad = n * bk - S
    if k_always is None:
        k_always = jnp.zeros((B, S), bool)
    if k_bias is None:
        k_bias = jnp.zeros((B, 1, S), jnp.float32)
    kb_full = jnp.broadcast_to(k_bias.astype(jnp.float32), (B, H, S))

    def padk(x, value=0):
        if pad == 0:
            return x
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, pad)
        return jnp.pad(x, widths, constant_values=value)

    def blocks(x):  # [B, n*bk, ...] -> [n, B, bk, ...]
        x = x.reshape(B, n, bk, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    ks, vs = blocks(padk(k.astype(jnp.float32))), blocks(padk(v.astype(jnp.float32)))
    kpos, kgrp = blocks(padk(k_pos)), blocks(padk(k_group))
    kval, kalw = blocks(padk(k_valid, False)), blocks(padk(k_always, False))
    kbias = jnp.moveaxis(padk(jnp.moveaxis(kb_full, 1, 2)).reshape(B, n, bk, H), 1, 0)
    qg = q.reshape(B, T, Hkv, rep, d).astype(jnp.float32) * scale

    @jax.checkpoint
    def body(carry, blk):
        m, den, acc = carry  # [B,Hkv,rep,T], same, [B,Hkv,rep,T,d]
        kb_, vb_, kp, kgr, kv_, ka, kbi = blk
        s = jnp.einsum("btgrd,bsgd->bgrts", qg, kb_)
        s = s + jnp.moveaxis(kbi, 1, 2).reshape(B, Hkv, rep, 1, bk)
        vis = kgr[:, None, :] == q_group[:, :, None]
        if causal:
            vis &= kp[:, None, :] <= q_pos[:, :, None]
        if window is not None:
            vis &= (q_pos[:, :, None] - kp[:, None, :]) <= window
        vis = (vis | ka[:, None, :]) & kv_[:, None, :]
        vis = vis[:, None, None]
        s = jnp.where(vis, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        den = den * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bgrts,bsgd->bgrtd", p, vb_)
        return (m_new, den, acc), None

    init = (jnp.full((B, Hkv, rep, T), NEG, jnp.float32), jnp.zeros((B, Hkv, rep, T), jnp.float32),
            jnp.zeros((B, Hkv, rep, T, v.shape[-1]), jnp.float32))
    (m, den, acc), _ = jax.lax.scan(body, init, (ks, vs, kpos, kgrp, kval, kalw, kbias))
    o = acc / jnp.where(den > 0, den, 1.0)[..., None]
    o = jnp.moveaxis(o, 3, 1)  # [B, T, Hkv, rep, d]
    return o.reshape(B, T, H, v.shape[-1]).astype(q.dtype)
