"""Hydra's sparse global attention (specs/hydra.md §2.3 [spec], contract notes "SGA"):

    W_t  = { j : 0 <= t − j <= W }                          the local window (W + 1 = w keys)
    r_j  = a_j · w_r + b_r                                  the controller's score of token j
    G_t  = the most recent `n_global` tokens j with t − j > W and r_j > 0     (FIFO, causal)
    logits_tj = q_t·k_j / sqrt(d_h) + [j ∈ G_t] log σ(r_j)  (the soft bias trains the scorer)
    o_t  = softmax over W_t ∪ G_t ∪ slots, out = o W_O

RoPE (half-split) on the tokens' q, k at their positions; `slots` (the workspace, [B, S, D])
enter as extra keys and values through the same projections, unrotated and always visible.
Positions restart and the window and globals empty at document starts.

The state keeps the last W + 1 tokens' post-RoPE keys, values, scores and positions and the
FIFO of at most `n_global` globals, both ordered oldest first (right-aligned), so that a call's
keys — [globals; window; this call's tokens] — are in time order: a key's rank among a query's
global candidates is a difference of per-document running counts. This form is dense over
those keys (O(T (G + W + T)) scores: the reference; the blockwise form of hydra.md §4 is the
long-sequence fast path, not built). A token leaves the window at t = j + W + 1 and, if
r_j > 0, enters the FIFO (oldest evicted).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.attention import call_positions
from layers.common import normal, param
from layers.linear import Dense
from layers.rope import apply_rope

Array = jax.Array


@struct.dataclass
class SGAState:
    k: Array      # [B, G + W + 1, H, d]: the globals (first G slots) then the window, post-RoPE
    v: Array      # [B, G + W + 1, H, d]
    r: Array      # [B, G + W + 1] float32 controller scores
    kpos: Array   # [B, G + W + 1] int32 positions (-1: empty)
    kdoc: Array   # [B, G + W + 1] int32 document counters
    pos: Array    # [B] position of the next token in its document
    doc: Array    # [B] document counter of the next token


def _per_doc_cumsum(x: Array, doc: Array) -> Array:
    """Inclusive running sum of x [B, N] restarting where `doc` changes along N."""
    c = jnp.cumsum(x, axis=1)
    change = jnp.concatenate([jnp.ones_like(doc[:, :1], bool), doc[:, 1:] != doc[:, :-1]], 1)
    idx = jnp.arange(x.shape[1])[None]
    first = jax.lax.cummax(jnp.where(change, idx, 0), axis=1)
    before = jnp.take_along_axis(jnp.concatenate([jnp.zeros_like(c[:, :1]), c], 1), first, 1)
    return c - before


def _keep_last(valid: Array, n: int) -> Array:
    """Slot in a right-aligned buffer of n for the last n True entries of valid [B, N] (n: not
    kept)."""
    cc = jnp.cumsum(valid.astype(jnp.int32), axis=1)
    from_end = cc[:, -1:] - cc                       # valid entries after this one
    return jnp.where(valid & (from_end < n), n - 1 - from_end, n)


class SparseGlobalAttention(nnx.Module):
    """The SGA mixer (module doc): `n_heads` heads of dim // n_heads, window W (W + 1 keys),
    at most `n_global` globals. Output projection N(0, init_std * out_scale)."""

    def __init__(self, dim: int, n_heads: int, *, rngs: nnx.Rngs, window: int = 255,
                 n_global: int = 512, rope_base: float = 10000.0, init_std: float = 0.02,
                 out_scale: float = 1.0):
        H, d = n_heads, dim // n_heads
        self.n_heads, self.head_dim, self.window, self.n_global = H, d, window, n_global
        self.rope_base = rope_base
        mk = lambda o, ax, std: Dense(dim, o, rngs=rngs, axes=ax, std=std)  # noqa: E731
        self.wq, self.wk, self.wv = (mk(H * d, ("embed", "heads"), init_std) for _ in range(3))
        self.wo = Dense(H * d, dim, rngs=rngs, axes=("heads", "embed"), std=init_std * out_scale)
        # the scorer starts N(0, init_std): about half the tokens pass r > 0, so the soft bias
        # log σ(r_j) has globals to train on from the first step
        self.w_r = param(normal(rngs.params(), (dim,), init_std), ("norm",))
        self.b_r = param(jnp.zeros((), jnp.float32), ())

    def init_state(self, batch_size: int, max_len: int | None = None) -> SGAState:
        N = self.n_global + self.window + 1
        H, d = self.n_heads, self.head_dim
        z = jnp.zeros((batch_size,), jnp.int32)
        return SGAState(k=jnp.zeros((batch_size, N, H, d)), v=jnp.zeros((batch_size, N, H, d)),
                        r=jnp.zeros((batch_size, N)), kpos=jnp.full((batch_size, N), -1, jnp.int32),
                        kdoc=jnp.zeros((batch_size, N), jnp.int32), pos=z, doc=z)

    def scores(self, a: Array) -> Array:
        """r [B, T] float32: the controller's global-token scores."""
        return a.astype(jnp.float32) @ self.w_r[...] + self.b_r[...]

    def __call__(self, a: Array, state: SGAState | None = None, *, mask=None, segment_ids=None,
                 context=None, deterministic: bool = True, key=None):
        """`context`: the workspace slots [B, S, D] (or None)."""
        B, T, _ = a.shape
        H, d, W, G = self.n_heads, self.head_dim, self.window, self.n_global
        state = self.init_state(B) if state is None else state
        mask, pos, doc, next_pos = call_positions(state, mask, segment_ids, B, T)
        q = apply_rope(self.wq(a).reshape(B, T, H, d), pos, base=self.rope_base)
        k = apply_rope(self.wk(a).reshape(B, T, H, d), pos, base=self.rope_base)
        v = self.wv(a).reshape(B, T, H, d)
        r = self.scores(a)
        K = jnp.concatenate([state.k.astype(k.dtype), k], axis=1)
        V = jnp.concatenate([state.v.astype(v.dtype), v], axis=1)
        R = jnp.concatenate([state.r, r], axis=1)
        P = jnp.concatenate([state.kpos, jnp.where(mask, pos, -1)], axis=1)
        Dc = jnp.concatenate([state.kdoc, doc], axis=1)
        valid = P >= 0
        cand = valid & (R > 0)
        cc = _per_doc_cumsum(cand.astype(jnp.int32), Dc)                       # [B, N]
        gap = pos[:, :, None] - P[:, None, :]                                   # [B, T, N]
        same = valid[:, None, :] & (Dc[:, None, :] == doc[:, :, None])
        local = same & (gap >= 0) & (gap <= W)
        gcand = same & cand[:, None, :] & (gap > W)
        n_thr = jnp.sum(gcand, axis=-1, keepdims=True)
        glob = gcand & (n_thr - cc[:, None, :] < G)
        s = jnp.einsum("bthd,bnhd->bhtn", q.astype(jnp.float32), K.astype(jnp.float32)) * d ** -0.5
        s = s + jnp.where(glob, jax.nn.log_sigmoid(R)[:, None, :], 0.0)[:, None]
        s = jnp.where((local | glob)[:, None], s, -1e30)
        vals = V.astype(jnp.float32)
        if context is not None:                                                 # workspace
            ks = self.wk(context).reshape(B, -1, H, d).astype(jnp.float32)
            vs = self.wv(context).reshape(B, -1, H, d).astype(jnp.float32)
            s = jnp.concatenate([s, jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), ks)
                                 * d ** -0.5], axis=-1)
            vals = jnp.concatenate([vals, vs], axis=1)
        p = jax.nn.softmax(s, axis=-1)                  # never empty: the token sees itself
        o = jnp.einsum("bhtn,bnhd->bthd", p, vals).reshape(B, T, H * d)
        y = self.wo(o.astype(a.dtype))
        # the state for the next token: the last W + 1 real tokens, then the globals it sees
        n_real = jnp.sum(mask, axis=1).astype(jnp.int32)
        doc_next = jnp.where(n_real > 0, jnp.take_along_axis(doc, jnp.maximum(n_real - 1, 0)[:, None],
                                                             1)[:, 0], state.doc)
        in_win = valid & (Dc == doc_next[:, None]) & (next_pos[:, None] - P <= W)
        in_glob = cand & (Dc == doc_next[:, None]) & (next_pos[:, None] - P > W)
        N = G + W + 1
        g_slot, w_slot = _keep_last(in_glob, G), _keep_last(in_win, W + 1)
        slot = jnp.where(in_glob & (g_slot < G), g_slot, N)                     # N: dropped
        slot = jnp.where(in_win & (w_slot < W + 1), G + w_slot, slot)
        b = jnp.arange(B)[:, None]
        put = lambda full, x: full.at[b, slot].set(x, mode="drop")  # noqa: E731
        new = SGAState(
            k=put(jnp.zeros((B, N, H, d), state.k.dtype), K.astype(state.k.dtype)),
            v=put(jnp.zeros((B, N, H, d), state.v.dtype), V.astype(state.v.dtype)),
            r=put(jnp.zeros((B, N)), R), kpos=put(jnp.full((B, N), -1, jnp.int32), P),
            kdoc=put(jnp.zeros((B, N), jnp.int32), Dc), pos=next_pos, doc=doc_next)
        return y, new, {}
