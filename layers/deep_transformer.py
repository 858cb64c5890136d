"""DeepTransformer / SWDT mixer (specs/atlas.md §2.7, §8.10): a linear memory on φ* in its
normalised form, M_t = Σ_{i≤t} η_i v_i φ*(k_i)ᵀ, α ≡ 1, read at φ*(q_t):

    y_t = Σ_i η_i exp(s q_t·k_i) v_i / Σ_i η_i exp(s q_t·k_i)

over all past tokens (DeepTransformer, window None) or the last c tokens (SWDT, window c: the
shared sliding-window op with W = c − 1); s = 1/sqrt(d) on the RoPE'd q, k; η_i =
sigmoid(x_i w_η + b_η) per head (rate_gate False: η ≡ 1, exactly softmax attention with RoPE).
It is computed by the shared attention op and decoded through its KV cache. The explicit kernel
form it equals is the test reference `deep_transformer_read` (tests/memory_reference.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import cache_write, cached_keys, call_positions, init_kv_cache
from layers.linear import Dense
from layers.rope import apply_rope
from pallas_kernels.attention import attention as attention_op

Array = jax.Array


def deep_transformer_mixer_flops(dim: int, n_heads: int, keys: int, rate_gate: bool = True) -> float:
    """Forward FLOPs per token of `DeepTransformerMixer` (2 per multiply-add; the convention of
    `zoo.lm`): the q, k, v projections [D, H d], W_o [H d, D], the rate gate [D, H] (when on;
    its bias and log-sigmoid are elementwise) and, for each of the H heads over `keys` keys per
    query, the scores on the augmented d + 1 channels (q·k and the rate channel) and the
    weighted sum of the values as the op gets them, padded to d + 1 channels. RoPE, the softmax
    and the masks are elementwise."""
    H, d = n_heads, dim // n_heads
    projections = 4 * 2.0 * dim * H * d + (2.0 * dim * H if rate_gate else 0.0)
    return projections + 2.0 * H * keys * (2 * (d + 1))


class DeepTransformerMixer(nnx.Module):
    """Normalised read of M_t = Σ_{i≤t} η_i v_i φ*(k_i)ᵀ at φ*(q_t) (atlas.md §2.7, §8.10):
    y_t = Σ_i η_i exp(s q_t·k_i) v_i / Σ_i η_i exp(s q_t·k_i) over the window, computed by the
    shared attention op and decoded through its KV cache: keys carry one extra channel log η_i,
    queries a constant 1/s, so s·q'·k' = s q·k + log η_i (values padded by one zero channel so
    that keys and values share the cache's head dim).

    n_heads heads of dim // n_heads; window: c tokens kept (None: all); rate_gate / rate_bias:
    the write-rate gate and its bias; max_len: KV-cache length where not windowed; impl / block:
    the attention op's implementation and key block (never change the function).
    """

    def __init__(self, dim: int, n_heads: int, *, rngs: nnx.Rngs, window: int | None = None,
                 rate_gate: bool = True, rate_bias: float = 2.0, rope_base: float = 10000.0,
                 max_len: int = 2048, init_std: float = 0.02, impl: str = "auto",
                 block: int = 128):
        H, d = n_heads, dim // n_heads
        self.n_heads, self.head_dim, self.window = H, d, window
        self.rope_base, self.max_len, self.impl, self.block = rope_base, max_len, impl, block
        mk = lambda i, o, ax: Dense(i, o, rngs=rngs, axes=ax, std=init_std)
        self.wq, self.wk, self.wv = (mk(dim, H * d, ("embed", "heads")) for _ in range(3))
        self.wo = mk(H * d, dim, ("heads", "embed"))
        w_eta = None
        if rate_gate:
            w_eta = Dense(dim, H, rngs=rngs, use_bias=True, axes=("embed", "heads"), std=init_std)
            w_eta.bias[...] = jnp.full((H,), rate_bias)
        self.w_eta = nnx.data(w_eta)

    @property
    def attn_window(self) -> int | None:
        return None if self.window is None else self.window - 1

    def init_state(self, batch_size: int, max_len: int | None = None):
        slots = max_len or self.max_len
        if self.attn_window is not None:
            slots = min(slots, self.attn_window + 1)
        return init_kv_cache(batch_size, slots, self.n_heads, self.head_dim + 1)

    def qkv(self, x, pos):
        """RoPE'd q, k, v [B, T, H, d] and log η [B, T, H] (zeros without the gate)."""
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        q = apply_rope(self.wq(x).reshape(B, T, H, d), pos, base=self.rope_base)
        k = apply_rope(self.wk(x).reshape(B, T, H, d), pos, base=self.rope_base)
        v = self.wv(x).reshape(B, T, H, d)
        log_eta = (jnp.zeros((B, T, H), jnp.float32) if self.w_eta is None
                   else jax.nn.log_sigmoid(self.w_eta(x).astype(jnp.float32)))
        return q, k, v, log_eta

    def __call__(self, x, state=None, *, mask=None, segment_ids=None, context=None,
                 deterministic: bool = True, key=None):
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        fresh = state is None
        if fresh:
            state = self.init_state(B)
        mask, pos, doc, next_pos = call_positions(state, mask, segment_ids, B, T)
        q, k, v, log_eta = self.qkv(x, pos)
        s = d ** -0.5
        qa = jnp.concatenate([q.astype(jnp.float32), jnp.full((B, T, H, 1), 1.0 / s)], -1)
        ka = jnp.concatenate([k.astype(jnp.float32), log_eta[..., None]], -1)
        va = jnp.concatenate([v.astype(jnp.float32), jnp.zeros((B, T, H, 1))], -1)
        new_state = cache_write(state, ka, va, pos, doc, mask, next_pos, self.attn_window)
        ks, vs, kpos, kdoc, kval = cached_keys(state, ka, va, pos, doc, mask, fresh)
        o = attention_op(qa, ks, vs, q_pos=pos, k_pos=kpos, q_group=doc, k_group=kdoc,
                         k_valid=kval, causal=True, window=self.attn_window, scale=s,
                         impl=self.impl, block=self.block)
        y = self.wo(o[..., :d].reshape(B, T, H * d).astype(x.dtype))
        return y, new_state, {}
