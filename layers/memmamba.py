"""MemMamba's layer (specs/memmamba.md §2.3, §3.1, §4): a Mamba-1 mixer with a note pool.

    a        the layer's normalised input (the block's RMSNorm)
    y        = MambaMixer(a)                                    (specs/mamba.md §3.1)
    iota_t   = sigmoid(w2 . ReLU(W1 a_t + b1) + b2)             note score I_token, W1: D -> D/4
    m_t      = [iota_t > tau1] on real tokens                   insertion (discrete, no gradient)
    s_t      = W_N a_t                                          summary (d_s)
    ŝ_t      = iota_t s_t                                       the stored note (score-scaled)
    P_t      = the last K notes ŝ_j with m_j = 1, j < t, of t's document (FIFO, read before insert)
    gamma_t  = sigmoid(w_s . RMSNorm(y_{t-1}) + b_s)           I_state; y_{-1} = 0
    c_tok_t  = gamma_t MHA(W_q a_t; W_k P_t, W_v P_t) W_o      0 where P_t is empty
    c_lay_t  = MHA'(W_q' a_t; W_k' S_t, W_v' S_t) W_o'         S_t: the summaries s_t of the same
                                                               token at the previous g layers
                                                               (`context`, cross-layer layers only)
    out      = y + alpha_tok * c_tok + alpha_lay * c_lay       "weighted" fusion (Table 4's best)

No positional encoding on pool entries (the pool is a set). The parallel form (§4.1) gathers
each query's K pool slots from the carried notes followed by this call's notes compacted in time
order: O(B T K d_s), no per-token pool is materialised beyond that gather, and a call of one token
is the decode step of §4.2 (the same code, so it is also checked against a token loop in
tests/test_memmamba.py). The state keeps the last min(count, K) notes right-aligned, oldest first
(an ordered buffer instead of §4.2's ring: one layout for both forms; the pool it holds is the
same set in the same order); `count` is the number of notes of the current document.

Document starts (`segment_ids`) empty the pool and zero y_{t-1}; pads insert nothing and leave
y_prev at the last real token's y. `aux["summaries"]` carries s [B, T, d_s] to the MemMamba LM
(zoo/memmamba.py), which passes the previous g layers' summaries in as `context` and removes
them from the model's aux; it is not a statistic.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.common import call_flags, param
from layers.linear import Dense
from layers.norms import rms_norm
from layers.ssm import MambaMixer, SSMState

Array = jax.Array

SUMMARIES = "summaries"          # the aux key carrying a layer's summaries to the LM


@struct.dataclass
class MemMambaState:
    ssm: SSMState    # the Mamba mixer's conv history, SSM state and next position
    notes: Array     # [B, K, d_s] float32: the last min(count, K) stored notes, right-aligned
    count: Array     # [B] int32: notes inserted in the current document
    y_prev: Array    # [B, D] float32: the mixer output of the last real token (gamma's input)


def _heads(x: Array, n_heads: int) -> Array:
    return x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)


def pool_windows(notes: Array, count: Array, new: Array, insert: Array, starts: Array):
    """The FIFO pool every query reads (§4.1 with the contract notes' carried pool).

    notes [B, K, F], count [B]: the carried pool (right-aligned); new [B, T, F]: this call's
    candidate notes (any per-note features, e.g. their keys and values side by side); insert,
    starts [B, T] bool: insertion decisions and document starts. Returns (window [B, T, K, F]:
    query t's K slots, oldest first; valid [B, T, K]; new_notes [B, K, F] and new_count [B]: the
    pool after the call, invalid slots zero)."""
    B, K, _ = notes.shape
    T = new.shape[1]
    ins = insert.astype(jnp.int32)
    incl = jnp.cumsum(ins, axis=1)                       # notes at j <= t
    before = incl - ins                                  # notes at j < t
    total = incl[:, -1]
    # this call's notes compacted to the front in time order (rank = before at its token)
    rank = jnp.where(insert, before, T)                  # T: dropped
    compact = jnp.zeros_like(new).at[jnp.arange(B)[:, None], rank].set(new, mode="drop")
    comb = jnp.concatenate([notes, compact], axis=1)     # [B, K + T, F]; carried slot i at i
    # the oldest valid position of a query's pool: after its document's start, or the carried
    # notes when its document began before the call
    t = jnp.arange(T)[None, :]
    last_start = jax.lax.cummax(jnp.where(starts, t, -1), axis=1)
    floor = jnp.where(last_start >= 0,
                      K + jnp.take_along_axis(before, jnp.maximum(last_start, 0), axis=1),
                      K - jnp.minimum(count, K)[:, None])
    pos = before[..., None] + jnp.arange(K)              # [B, T, K] window positions in comb
    window = jnp.take_along_axis(comb[:, None], pos[..., None], axis=2)
    valid = pos >= floor[..., None]
    end_pos = total[:, None] + jnp.arange(K)             # [B, K]: the last K positions
    new_notes = jnp.take_along_axis(comb, end_pos[..., None], axis=1)
    end_floor = floor[:, -1]
    end_valid = end_pos >= end_floor[:, None]
    new_notes = jnp.where(end_valid[..., None], new_notes, 0.0)
    new_count = jnp.where(last_start[:, -1] >= 0, total - end_floor + K, count + total)
    return window, valid, new_notes, new_count.astype(jnp.int32)


def pool_attention(q: Array, keys: Array, values: Array, valid: Array, n_heads: int) -> Array:
    """Multi-head softmax attention of each query over its own K slots (no positions).
    q [B, T, F]; keys, values [B, T, K, F]; valid [B, T, K]. A query with no valid slot reads 0
    (a finite mask value, then the output multiplied by any(valid): no NaN path)."""
    qh, kh, vh = _heads(q, n_heads), _heads(keys, n_heads), _heads(values, n_heads)
    s = jnp.einsum("bthd,btkhd->bthk", qh.astype(jnp.float32), kh.astype(jnp.float32))
    s = s / math.sqrt(qh.shape[-1])
    s = jnp.where(valid[:, :, None, :], s, -1e30)
    p = jax.nn.softmax(s, axis=-1) * jnp.any(valid, axis=-1)[:, :, None, None]
    o = jnp.einsum("bthk,btkhd->bthd", p, vh.astype(jnp.float32))
    return o.reshape(*q.shape[:-1], -1)


class PoolAttention(nnx.Module):
    """q = W_q a (D -> d_s), keys W_k s, values W_v s (d_s -> d_s), h heads, out W_o (d_s -> D);
    normal(0, 0.02) and W_o normal(0, 0.02 / sqrt(2 n_layers)) (§5). The keys and values are
    projected per entry (`keys_values`) before they are gathered into windows."""

    def __init__(self, dim: int, d_summary: int, n_heads: int, n_layers: int, *, rngs: nnx.Rngs,
                 std: float = 0.02):
        self.n_heads = n_heads
        self.wq = Dense(dim, d_summary, rngs=rngs, axes=("embed", None), std=std)
        self.wk = Dense(d_summary, d_summary, rngs=rngs, axes=(None, None), std=std)
        self.wv = Dense(d_summary, d_summary, rngs=rngs, axes=(None, None), std=std)
        self.wo = Dense(d_summary, dim, rngs=rngs, axes=(None, "embed"),
                        std=std / math.sqrt(2 * n_layers))

    def keys_values(self, entries: Array) -> Array:
        """[..., d_s] -> [..., 2 d_s]: W_k s | W_v s."""
        return jnp.concatenate([self.wk(entries), self.wv(entries)], axis=-1)

    def __call__(self, a: Array, kv: Array, valid: Array) -> Array:
        """a [B, T, D]; kv [B, T, K, 2 d_s] (`keys_values` of each query's entries); valid
        [B, T, K]."""
        S = kv.shape[-1] // 2
        o = pool_attention(self.wq(a), kv[..., :S], kv[..., S:], valid, self.n_heads)
        return self.wo(o.astype(a.dtype))


class MemMambaMixer(nnx.Module):
    """One MemMamba layer's mixer (module docstring); `cross_layer` gives it the cross-layer
    attention (layers l with l mod p = 0). The Mamba mixer's arguments are MambaMixer's."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, n_layers: int, d_summary: int = 64,
                 pool_size: int = 50, n_heads: int = 4, tau1: float = 0.5,
                 hard_gate: bool = False, tau2: float = 0.5, cross_layer: bool = False,
                 alpha_init: float = 0.1, attn_std: float = 0.02, norm_eps: float = 1e-5,
                 **mamba):
        self.dim, self.d_summary, self.pool_size, self.n_heads = dim, d_summary, pool_size, n_heads
        self.tau1, self.hard_gate, self.tau2, self.norm_eps = tau1, hard_gate, tau2, norm_eps
        self.mamba = MambaMixer(dim, rngs=rngs, **mamba)
        hidden = max(1, dim // 4)
        self.score1 = Dense(dim, hidden, rngs=rngs, axes=("embed", "mlp"), init="torch",
                            use_bias=True)
        self.score2 = Dense(hidden, 1, rngs=rngs, axes=("mlp", None), init="torch",
                            use_bias=True)
        self.score2.bias[...] = jnp.zeros((1,))           # b2 = 0: about half the tokens pass
        self.summary = Dense(dim, d_summary, rngs=rngs, axes=("embed", None), init="torch")
        self.tok = PoolAttention(dim, d_summary, n_heads, n_layers, rngs=rngs, std=attn_std)
        self.gate_norm = param(jnp.ones((dim,), jnp.float32), ("norm",))
        self.gate_w = param(jnp.zeros((dim,), jnp.float32), ("norm",))
        self.gate_b = param(jnp.zeros((), jnp.float32), ())
        self.alpha_tok = param(jnp.full((dim,), alpha_init, jnp.float32), ("norm",))
        self.lay = (PoolAttention(dim, d_summary, n_heads, n_layers, rngs=rngs, std=attn_std)
                    if cross_layer else None)
        self.alpha_lay = (param(jnp.full((dim,), alpha_init, jnp.float32), ("norm",))
                          if cross_layer else None)

    @property
    def cross_layer(self) -> bool:
        return self.lay is not None

    def init_state(self, batch_size: int, max_len: int | None = None) -> MemMambaState:
        return MemMambaState(
            ssm=self.mamba.init_state(batch_size),
            notes=jnp.zeros((batch_size, self.pool_size, self.d_summary), jnp.float32),
            count=jnp.zeros((batch_size,), jnp.int32),
            y_prev=jnp.zeros((batch_size, self.dim), jnp.float32))

    def scores(self, a: Array) -> Array:
        """iota [B, T] in float32 (§2.3's I_token)."""
        h = jax.nn.relu(self.score1(a.astype(jnp.float32)))
        return jax.nn.sigmoid(self.score2(h)[..., 0])

    def __call__(self, a: Array, state: MemMambaState | None = None, *, mask=None,
                 segment_ids=None, context=None, deterministic: bool = True, key=None):
        B, T, _ = a.shape
        state = self.init_state(B) if state is None else state
        real, starts, _ = call_flags(state.ssm.pos, mask, segment_ids, B, T)
        starts = starts & real
        y, ssm, _ = self.mamba(a, state.ssm, mask=mask, segment_ids=segment_ids)
        iota = self.scores(a)
        insert = (iota > self.tau1) & real
        s = self.summary(a).astype(jnp.float32)
        note = iota[..., None] * s
        S = self.d_summary
        # each note travels with its key and value: projected once per note, then gathered
        carried = jnp.concatenate([state.notes, self.tok.keys_values(state.notes)], axis=-1)
        fresh = jnp.concatenate([note, self.tok.keys_values(note)], axis=-1)
        window, valid, pool, count = pool_windows(carried, state.count, fresh, insert, starts)
        notes = pool[..., :S]
        yf = y.astype(jnp.float32)
        prev = jnp.concatenate([state.y_prev[:, None], yf[:, :-1]], axis=1)
        prev = jnp.where(starts[..., None], 0.0, prev)
        gamma = jax.nn.sigmoid(rms_norm(prev, self.gate_norm[...], self.norm_eps) @ self.gate_w[...]
                               + self.gate_b[...])
        if self.hard_gate:
            gamma = jnp.where(gamma > self.tau2, gamma, 0.0)
        out = yf + self.alpha_tok[...] * gamma[..., None] * self.tok(a, window[..., S:], valid)
        if self.lay is not None and context is not None:
            out = out + self.alpha_lay[...] * self.lay(
                a, self.lay.keys_values(context), jnp.ones(context.shape[:3], bool))
        last = jnp.maximum(jnp.sum(real, axis=1) - 1, 0)
        y_last = jnp.take_along_axis(yf, last[:, None, None], axis=1)[:, 0]
        y_prev = jnp.where(jnp.any(real, axis=1)[:, None], y_last, state.y_prev)
        new = MemMambaState(ssm=ssm, notes=notes, count=count, y_prev=y_prev)
        return out.astype(a.dtype), new, {SUMMARIES: s}


def memmamba_extra_params(dim: int, d_summary: int, cross_layer: bool) -> int:
    """Parameters a MemMamba layer adds to its Mamba mixer: the scorer (D -> D/4 -> 1 with
    biases), W_N, the cross-token attention (W_q D x d_s, W_k, W_v d_s x d_s, W_o d_s x D),
    gamma's RMSNorm weight, w_s and b_s, alpha_tok; with `cross_layer` a second attention and
    alpha_lay."""
    D, S, H = dim, d_summary, max(1, dim // 4)
    attn = D * S + 2 * S * S + S * D
    total = (D * H + H + H + 1) + D * S + attn + 2 * D + 1 + D
    return total + (attn + D if cross_layer else 0)


def memmamba_extra_flops(dim: int, d_summary: int, pool_size: int, cross_layer: bool,
                         n_context: int) -> float:
    """Forward FLOPs per token a MemMamba layer adds to its Mamba mixer (2 per multiply-add):
    the scorer's two products, W_N, the cross-token attention (W_q; W_k and W_v once per note,
    i.e. per token; scores and values over the K pool slots, 2 K d_s each) and W_o;
    gamma's w_s (D); with `cross_layer` the cross-layer attention over `n_context` summaries
    (W_k, W_v on each of them). Softmax, sigmoids, norms and the fusion are elementwise."""
    D, S, H, K = dim, d_summary, max(1, dim // 4), pool_size
    f = 2.0 * (D * H + H) + 2.0 * D * S
    f += 2.0 * D * S + 2.0 * 2 * S * S + 2.0 * 2 * K * S + 2.0 * S * D + 2.0 * D
    if cross_layer:
        f += 2.0 * D * S + 2.0 * 2 * S * S * n_context + 2.0 * 2 * n_context * S + 2.0 * S * D
    return f
