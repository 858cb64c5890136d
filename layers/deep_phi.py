"""A two-layer memory on the exponential feature map φ*: the DeepTransformer / SWDT option
`memory_depth=2` (specs/atlas.md §2.7 "Deep versions", a realisation the spec flags as its own
**[choice]**: the paper gives no construction for a deep memory on φ*).

    M(φ*(x)) = GELU(z(x)) W_1,    z(x) = W_2ᵀ φ*(x) = Σ_i κ(x, k_i) c_i / Σ_i κ(x, k_i)

W_2 = Σ_i φ*(k_i) c_iᵀ is implicit (an attention read over the stored (k_i, c_i) pairs, κ(q, k)
= exp(s q·k), s = 1/sqrt(d), RoPE'd q, k, normalised as the linear DeepTransformer's read is,
§8.10); W_1 [h, d] per head is explicit, starting from a learned non-zero W_1^0. The attentional
bias is the DeepTransformer's Hebbian one, ℓ_t = −⟨M(φ*(k_t)), v_t⟩, and each token takes one
gradient step at the state before it (the exact online model, chunk b = 1; a chunk anchor b > 1
is not built), with α ≡ 1 and the write rate η_t:

    zA_t = z_{t-1}(k_t)                               (the state before t; 0 when empty)
    c_t  = −η_t ∂ℓ_t/∂z = η_t (v_t W_1ᵀ) ⊙ GELU'(zA_t)
    W_1 ← W_1 − η_t ∂ℓ_t/∂W_1 = W_1 + η_t GELU(zA_t)ᵀ v_t
    append (k_t, c_t);    y_t = GELU(z_t(q_t)) W_1    (read after the write)

The window (SWDT) keeps the last c pairs (the implicit W_2 is windowed; the explicit W_1 keeps
every update); a document start restarts W_1 at W_1^0 and empties the pairs. The call is a scan over its tokens (quadratic like attention, sequential like a
recurrence: a research option, not a fast path).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.attention import KVCache, cache_write, call_positions
from layers.common import normal, param
from layers.deep_transformer import DeepTransformerMixer

Array = jax.Array


@struct.dataclass
class DeepPhiState:
    cache: KVCache   # the stored pairs: k [B, S, H, d] (RoPE'd), c in `v` [B, S, H, h]
    w1: Array        # [B, H, h, d] float32: W_1 now


def gelu(z: Array) -> Array:
    return jax.nn.gelu(z, approximate=False)


def gelu_grad(z: Array) -> Array:
    """d GELU(z) / dz of the exact (erf) GELU: Φ(z) + z φ(z)."""
    return 0.5 * (1.0 + jax.lax.erf(z * 2 ** -0.5)) + z * jnp.exp(-0.5 * z * z) * (2 * jnp.pi) ** -0.5


def kernel_read(q: Array, keys: Array, vals: Array, valid: Array, scale: float) -> Array:
    """Σ_i κ(q, k_i) c_i / Σ_i κ(q, k_i) over the valid slots (0 where none).
    q [B, H, d]; keys [B, S, H, d]; vals [B, S, H, h]; valid [B, S]."""
    s = jnp.einsum("bhd,bshd->bhs", q, keys) * scale
    s = jnp.where(valid[:, None, :], s, -1e30)
    p = jax.nn.softmax(s, axis=-1) * jnp.any(valid, axis=-1)[:, None, None]
    return jnp.einsum("bhs,bshc->bhc", p, vals)


class DeepPhiMixer(DeepTransformerMixer):
    """DeepTransformerMixer's projections, RoPE and rate gate with the two-layer memory of the
    module docstring; `hidden` is h (the implicit first layer's width)."""

    def __init__(self, dim: int, n_heads: int, *, rngs: nnx.Rngs, hidden: int | None = None,
                 **kw):
        super().__init__(dim, n_heads, rngs=rngs, **kw)
        self.hidden = hidden or self.head_dim
        self.w1_init = param(normal(rngs.params(), (n_heads, self.hidden, self.head_dim),
                                    self.hidden ** -0.5), ("heads", None, None))

    def init_state(self, batch_size: int, max_len: int | None = None) -> DeepPhiState:
        slots = max_len or self.max_len
        if self.attn_window is not None:
            slots = min(slots, self.attn_window + 1)
        H, d, h = self.n_heads, self.head_dim, self.hidden
        z = jnp.zeros((batch_size,), jnp.int32)
        cache = KVCache(k=jnp.zeros((batch_size, slots, H, d)),
                        v=jnp.zeros((batch_size, slots, H, h)),
                        slot_pos=jnp.full((batch_size, slots), -1, jnp.int32),
                        slot_doc=jnp.zeros((batch_size, slots), jnp.int32), pos=z, doc=z, idx=z)
        w1 = jnp.broadcast_to(self.w1_init[...], (batch_size, H, h, d)).astype(jnp.float32)
        return DeepPhiState(cache=cache, w1=w1)

    def __call__(self, x, state=None, *, mask=None, segment_ids=None, context=None,
                 deterministic: bool = True, key=None):
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        state = self.init_state(B) if state is None else state
        mask, pos, doc, next_pos = call_positions(state.cache, mask, segment_ids, B, T)
        q, k, v, log_eta = self.qkv(x, pos)
        eta = jnp.exp(log_eta)
        s, W = d ** -0.5, self.attn_window
        w1_0 = self.w1_init[...].astype(jnp.float32)

        def step(st: DeepPhiState, inp):
            qt, kt, vt, et, pt, dt, mt = inp
            c = st.cache
            new_doc = (c.idx > 0) & (dt != c.doc)                 # a document starts at t
            w1 = jnp.where(new_doc[:, None, None, None], w1_0[None], st.w1)

            def valid_at(cache, reach):
                ok = (cache.slot_pos >= 0) & (cache.slot_doc == dt[:, None])
                return ok if W is None else ok & (pt[:, None] - cache.slot_pos <= reach)

            # the state before t holds the pairs of its window at t - 1 (W + 1 back from t)
            za = kernel_read(kt, c.k, c.v, valid_at(c, None if W is None else W + 1), s)
            ct = et[..., None] * jnp.einsum("bhd,bhcd->bhc", vt, w1) * gelu_grad(za)
            w1_new = w1 + et[..., None, None] * jnp.einsum("bhc,bhd->bhcd", gelu(za), vt)
            cache = cache_write(c, kt[:, None], ct[:, None], pt[:, None], dt[:, None],
                                mt[:, None], pt + 1, W)
            z = kernel_read(qt, cache.k, cache.v, valid_at(cache, W), s)
            y = jnp.einsum("bhc,bhcd->bhd", gelu(z), w1_new)
            # pads leave the state as it was
            keep = mt[:, None, None, None]
            new = DeepPhiState(cache=jax.tree.map(lambda a, b: jnp.where(
                mt.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), cache, c),
                w1=jnp.where(keep, w1_new, st.w1))
            return new, y

        xs = (q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), eta, pos, doc,
              mask)
        st, ys = jax.lax.scan(step, state, jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs))
        st = st.replace(cache=st.cache.replace(pos=next_pos))
        y = jnp.moveaxis(ys, 0, 1).reshape(B, T, H * d)
        return self.wo(y.astype(x.dtype)), st, {}


def deep_phi_extra_params(n_heads: int, hidden: int, head_dim: int) -> int:
    """W_1^0 [H, h, d] (the rest is DeepTransformerMixer's)."""
    return n_heads * hidden * head_dim


def deep_phi_mixer_flops(dim: int, n_heads: int, hidden: int, slots: int,
                         rate_gate: bool = True) -> float:
    """Forward FLOPs per token of `DeepPhiMixer` (2 per multiply-add): the projections and rate
    gate of DeepTransformerMixer; per head two kernel reads over the cache's `slots` (scores
    over d, values over h), c_t's product v_t W_1ᵀ, W_1's rank-1 update and the read GELU(z)W_1
    (h d each). The scan reads every slot of its cache and masks the empty ones."""
    H, d, h = n_heads, dim // n_heads, hidden
    projections = 4 * 2.0 * dim * H * d + (2.0 * dim * H if rate_gate else 0.0)
    return projections + H * (2 * 2.0 * slots * (d + h) + 3 * 2.0 * h * d)
