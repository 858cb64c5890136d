"""Dot, the Deep Omega Transformer (specs/atlas.md §2.7, Eq. 27) in the form the paper solves in
closed form (Eqs. 30–31): the Omega rule's ℓ2 bias with window c = 1 on a linear memory over the
infinite feature map φ* (κ(a, b) = φ*(a)·φ*(b) = exp(s a·b)), M_0 = 0, α ≡ 1 — the kernelised
delta rule

    u_i = η_i (v_i − Σ_{j<i} κ(k_i, k_j) u_j),    y_t = Σ_{j≤t} κ(q_t, k_j) u_j

(`pallas_kernels.kernel_delta`; quadratic in the length, like attention). [choices] q, k: RoPE on
the projections (as the baseline Transformer, atlas.md §3), then ℓ2-normalised per head (the
paper normalises queries and keys); with unit keys κ(k, k) = e^s, and a write is contractive
along φ*(k) while η e^s ≤ 2: s = 0.5 (default) and η = sigmoid(x w_η + b_η) ≤ 1 per head keep
it so. Its unnormalised read is what Eq. 27 defines (no normalised form is given). Windows c > 1
and the deep (multi-layer φ*) variant are not built (no construction in the paper; the c > 1 token
loop is a test reference, tests/memory_reference.py). Decoding keeps every past key and its u in
a KV cache (`layers.attention.KVCache`, values = u).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import cache_write, call_positions, init_kv_cache
from layers.linear import Dense
from layers.norms import l2_norm
from layers.rope import apply_rope
from pallas_kernels.kernel_delta import kernel_delta


def dot_mixer_flops(dim: int, n_heads: int, keys: int) -> float:
    """Forward FLOPs per token of `DotMixer` (2 per multiply-add, `zoo.lm`'s convention): the q,
    k, v projections and W_o ([D, H d], [H d, D]), the rate gate [D, H], and per head over
    `keys` keys per query the kernels κ(q_t, k_j) and κ(k_t, k_j) (2 d each), the solve's row
    (2 d per key) and the read (2 d per key)."""
    H, d = n_heads, dim // n_heads
    return 4 * 2.0 * dim * H * d + 2.0 * dim * H + 2.0 * H * keys * 4 * d


class DotMixer(nnx.Module):
    """The kernelised delta rule mixer (module docstring): n_heads heads of dim // n_heads;
    rate_bias: the write-rate gate's bias; scale: s of κ; max_len: KV-cache length; impl: the
    kernel_delta op's implementation (the same function)."""

    def __init__(self, dim: int, n_heads: int, *, rngs: nnx.Rngs, rate_bias: float = 0.0,
                 scale: float = 0.5, rope_base: float = 10000.0, max_len: int = 2048,
                 norm_eps: float = 1e-6, init_std: float = 0.02, impl: str = "auto"):
        H, d = n_heads, dim // n_heads
        self.n_heads, self.head_dim, self.scale, self.eps = H, d, scale, norm_eps
        self.rope_base, self.max_len, self.impl = rope_base, max_len, impl
        mk = lambda i, o, ax: Dense(i, o, rngs=rngs, axes=ax, std=init_std)  # noqa: E731
        self.wq, self.wk, self.wv = (mk(dim, H * d, ("embed", "heads")) for _ in range(3))
        self.wo = mk(H * d, dim, ("heads", "embed"))
        self.w_eta = Dense(dim, H, rngs=rngs, use_bias=True, axes=("embed", "heads"),
                           std=init_std)
        self.w_eta.bias[...] = jnp.full((H,), rate_bias)

    def init_state(self, batch_size: int, max_len: int | None = None):
        return init_kv_cache(batch_size, max_len or self.max_len, self.n_heads, self.head_dim)

    def __call__(self, x, state=None, *, mask=None, segment_ids=None, context=None,
                 deterministic: bool = True, key=None):
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        fresh = state is None
        if fresh:
            state = self.init_state(B)
        mask, pos, doc, next_pos = call_positions(state, mask, segment_ids, B, T)
        unit = lambda a: l2_norm(apply_rope(a.reshape(B, T, H, d), pos, base=self.rope_base),  # noqa: E731
                                 self.eps)
        q, k = unit(self.wq(x)), unit(self.wk(x))
        v = self.wv(x).reshape(B, T, H, d)
        eta = jax.nn.sigmoid(self.w_eta(x).astype(jnp.float32))
        cache = None if fresh else (state.k, state.v, state.slot_doc, state.slot_pos >= 0)
        y, u = kernel_delta(q, k, v, eta, scale=self.scale, doc=doc, valid=mask, cache=cache,
                            impl=self.impl)
        new_state = cache_write(state, k, u, pos, doc, mask, next_pos, None)
        return self.wo(y.reshape(B, T, H * d).astype(x.dtype)), new_state, {}
