"""Neural-memory op, reference form: the anchored sequential token loop (the specification).

One op for every test-time-memory model (Titans, ATLAS/OmegaNet, Moneta/Yaad/Memora). Per head a
memory `M_W` (any pytree of weights `W`) is trained while the sequence is read. The pieces are
plain functions collected in a static `MemoryRule` (see its docstring); per token `t` of a head:

    anchor chunk:  gradients are taken at `link(W_anchor)`, the state at the start of the token's
                   chunk; chunks of `rule.chunk` tokens start at absolute positions 0, b, 2b, ...
                   of the memory's input stream (restarted at document starts)
    sources:       the window of the last `rule.window` = c tokens (c = 1: online rule), i.e.
                   tokens t-j, j = 0..c-1, of the same document
    u_i   = grad_W  loss(M_W(k_i), v_i; extra_i)  at W = link(W_anchor)    (signal_fn = dloss/dpred)
    U_t   = sum_j gamma[t, j] * u_{t-j}                                     (gamma = 1 when c = 1)
    S_t   = exp(log_mom_t) * S_{t-1} + c_in_t * U_t
    W_t   = exp(log_ret_t) * W_{t-1} + c_out_t * transform(S_t)
            lr_inside (Titans):  c_in = -lr, c_out = 1
            lr outside (ATLAS):  c_in = +1,  c_out = -lr
    y_t   = M_{link(W_t)}(q_t)                                             (read after the write)
    after the last token of a chunk: W_anchor <- W_t

With chunk 1 this is the plain per-token rule. The state (`MemoryState`) carries `W`, `S`,
`W_anchor` and the window buffer of the last c-1 tokens (keys, values, extras, validity), so a
call may stop anywhere, mid-chunk included, and the next call continues exactly. Positions are
passed per token (`pos`, the position inside the document), `reset` marks document starts
(state := fresh), `real` marks real tokens (right padding: pads leave the state untouched and
output zeros).

Shapes: q, k [B, T, H, dk]; v [B, T, H, dv]; log_ret, lr, log_mom [B, T, H]; gamma
[B, T, H, c]; extra: pytree of [B, T, H, ...]; pos, reset, real [B, T]. `outer` (per-head outer
parameters, leaves [H, ...]) and `W0` (initial memory, leaves [H, ...]) are ordinary
differentiable inputs. All inner maths runs in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels.common import upcast

Array = jax.Array
PyTree = Any


@dataclass(frozen=True)
class MemoryRule:
    """Static description of one neural memory (hashable; a static argument under jit).

    memory_fn(outer_h, W_h, x[dk]) -> y[dv]      the memory network of one head, one token.
    signal_fn(pred[dv], v[dv], extra_t) -> [dv]  d loss / d pred (the attentional bias / inner
                                                 objective as its output signal; l2: pred - v).
    chunk:      b, the anchor chunk size (part of the model).
    window:     c, the Omega window (1: online rule). Part of the model.
    lr_inside:  True: S = mom*S - lr*U, W = ret*W + S (Titans).
                False: S = mom*S + U, W = ret*W - lr*transform(S) (ATLAS).
    transform_fn(S_h) -> S_h'  update transform applied to the momentum before it enters W
                (e.g. Newton-Schulz per weight matrix); None = identity.
    link_fn(outer_h, W_h) -> W_h'  the effective weights used by the memory for a carried state
                (retention regularisers that act as a map of an accumulator: Moneta's q-norm
                normalisation, Memora's softmax of logits, elastic-net soft threshold); None =
                identity. Gradients are taken w.r.t. the effective weights.
    """
    memory_fn: Callable
    signal_fn: Callable
    chunk: int = 1
    window: int = 1
    lr_inside: bool = True
    transform_fn: Callable | None = None
    link_fn: Callable | None = None

    def __post_init__(self):
        if self.chunk < 1 or self.window < 1:
            raise ValueError(f"chunk and window must be >= 1, got {self.chunk}, {self.window}")

    def link(self, outer, W):
        return W if self.link_fn is None else self.link_fn(outer, W)

    def transform(self, S):
        return S if self.transform_fn is None else self.transform_fn(S)

    def coefficients(self, lr: Array) -> tuple[Array, Array]:
        """(c_in, c_out) of the per-token update from the learning rate."""
        if self.lr_inside:
            return -lr, jnp.ones_like(lr)
        return jnp.ones_like(lr), -lr


@dataclass(frozen=True)
class Layered:
    """Declares a memory network as a chain of bias-free linear layers, so that the chunked form
    can read by the dual form (titans.md §2.8) instead of materialising per-token weights:

        x_1 = x,  z_l = x_l W[name_l],  x_{l+1} = act(z_l),  y = head(outer, z_L, x)

    `names`: the weight keys in order (None: "w1", ..., "wL" for the L leaves of W); `act`:
    elementwise (None: identity); `head(outer, z_L, x) -> y` (None: y = z_L). The memory_fn that
    carries it (as its `layered` attribute) must compute exactly this function."""
    names: tuple[str, ...] | None = None
    act: Callable | None = None
    head: Callable | None = None

    def keys(self, W) -> tuple[str, ...]:
        return self.names or tuple(f"w{i}" for i in range(1, len(W) + 1))


def layered_of(rule: "MemoryRule") -> Layered | None:
    """The dual-form description of the rule's memory, when the chunked form may use it: a
    layered memory network, no update transform and no link (both act on whole weights)."""
    lay = getattr(rule.memory_fn, "layered", None)
    if lay is None or rule.transform_fn is not None or rule.link_fn is not None:
        return None
    return lay


@struct.dataclass
class MemoryState:
    """W, S, anchor: pytrees with leaves [B, H, ...]. Window buffer of the last c-1 tokens (oldest
    first): win_k [B, H, c-1, dk], win_v [B, H, c-1, dv], win_extra (leaves [B, H, c-1, ...]),
    win_valid [B, c-1] (False: absent, e.g. before the document start)."""
    W: PyTree
    S: PyTree
    anchor: PyTree
    win_k: Array
    win_v: Array
    win_extra: PyTree
    win_valid: Array


def init_state(W0: PyTree, batch_size: int, dk: int, dv: int, window: int = 1,
               extra_proto: PyTree = None) -> MemoryState:
    """Fresh state: W = anchor = W0 (broadcast over the batch), S = 0, empty window.

    `extra_proto`: pytree of per-token extra arrays [..., H, ...] (only their trailing shape after
    the head axis and dtype matter), or None.
    """
    H = jax.tree.leaves(W0)[0].shape[0]
    W = jax.tree.map(lambda w: jnp.broadcast_to(upcast(w), (batch_size,) + w.shape), W0)
    S = jax.tree.map(jnp.zeros_like, W)
    c1 = window - 1
    dt = jax.tree.leaves(W)[0].dtype
    wx = jax.tree.map(lambda e: jnp.zeros((batch_size, H, c1) + e.shape[3:], upcast(e).dtype),
                      extra_proto) if extra_proto is not None else None
    return MemoryState(W=W, S=S, anchor=W, win_k=jnp.zeros((batch_size, H, c1, dk), dt),
                       win_v=jnp.zeros((batch_size, H, c1, dv), dt), win_extra=wx,
                       win_valid=jnp.zeros((batch_size, c1), bool))


def l2_signal(pred, v, extra=None):
    """The l2 objective ½‖pred − v‖² as its output signal pred − v (the one the kernels know)."""
    return pred - v


def source_grad(rule: MemoryRule, outer, W_eff, k, v, extra):
    """grad_W loss(M_W(k), v; extra) at W = W_eff for one token of one head."""
    pred, vjp = jax.vjp(lambda W: rule.memory_fn(outer, W, k), W_eff)
    return vjp(rule.signal_fn(pred, v, extra).astype(pred.dtype))[0]


def read(rule: MemoryRule, outer, W, q):
    """y = M_{link(W)}(q) for one head and one token (no write)."""
    return rule.memory_fn(outer, rule.link(outer, W), q)


def _tree_where(c, a, b):
    return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)


def _head_scan(rule: MemoryRule, outer, rW, rS, rA, W, S, anc, wk, wv, wx, wval, q, k, v,
               log_ret, lr, log_mom, gamma, extra, pos, reset, real):
    """One (batch row, head): sequences of length T. (rW, rS, rA): the state a document start
    returns to. Returns y [T, dv] and the new state parts."""
    b = rule.chunk

    def step(carry, inp):
        W, S, anc, wk, wv, wx, wval = carry
        qt, kt, vt, lrt, lmt, lmomt, gt, xt, pt, rt, realt = inp
        # document start: fresh state and empty window
        W = _tree_where(rt, rW, W)
        S = _tree_where(rt, rS, S)
        anc = _tree_where(rt, rA, anc)
        wval = wval & ~rt
        # sources: window buffer (oldest first) then the current token
        sk = jnp.concatenate([wk, kt[None]], 0)
        sv = jnp.concatenate([wv, vt[None]], 0)
        sx = jax.tree.map(lambda a, e: jnp.concatenate([a, e[None]], 0), wx, xt)
        sval = jnp.concatenate([wval, jnp.ones((1,), bool)], 0)
        W_eff = rule.link(outer, anc)
        u = jax.vmap(lambda kk, vv, xx: source_grad(rule, outer, W_eff, kk, vv, xx))(sk, sv, sx)
        wts = jnp.where(sval, gt[::-1], 0.0)  # gamma[t, j] weights source t - j
        U = jax.tree.map(lambda g: jnp.tensordot(wts, g, 1), u)
        c_in, c_out = rule.coefficients(lrt)
        S_new = jax.tree.map(lambda s, uu: jnp.exp(lmomt) * s + c_in * uu, S, U)
        TS = rule.transform(S_new)
        W_new = jax.tree.map(lambda w, ts: jnp.exp(lmt) * w + c_out * ts, W, TS)
        y = read(rule, outer, W_new, qt)
        anc_new = _tree_where((pt + 1) % b == 0, W_new, anc)
        # window shift
        nk, nv = sk[1:], sv[1:]
        nx = jax.tree.map(lambda a: a[1:], sx)
        nval = sval[1:]
        new = (W_new, S_new, anc_new, nk, nv, nx, nval)
        old = (W, S, anc, wk, wv, wx, wval)
        carry = jax.tree.map(lambda a, o: jnp.where(realt, a, o), new, old)
        return carry, jnp.where(realt, y, jnp.zeros_like(y))

    f32 = upcast
    xs = (f32(q), f32(k), f32(v), f32(lr), f32(log_ret), f32(log_mom), f32(gamma),
          jax.tree.map(f32, extra), pos, reset, real)
    carry, y = jax.lax.scan(step, (W, S, anc, wk, wv, wx, wval), xs)
    return (y,) + carry


def reset_target(W0, state: MemoryState, reset_to=None):
    """(W, S, anchor) with leaves [B, H, ...] that a document start returns to: the fresh state
    (W0, 0, W0) unless `reset_to` gives one (e.g. the state after persistent tokens)."""
    if reset_to is not None:
        return tuple(jax.tree.map(upcast, t) for t in reset_to)
    W = jax.tree.map(lambda w, s: jnp.broadcast_to(upcast(w), s.shape).astype(s.dtype), W0, state.W)
    return W, jax.tree.map(jnp.zeros_like, W), W


def neural_memory(rule: MemoryRule, outer, W0, state: MemoryState, q, k, v, *, log_ret, lr,
                  log_mom=None, gamma=None, extra=None, pos, reset, real, reset_to=None,
                  **unused):
    """Reference form. Returns (y [B, T, H, dv] (float32 or wider), new MemoryState).

    reset_to: optional (W, S, anchor) (leaves [B, H, ...]) restored at document starts instead
    of the fresh state; the window buffer is emptied at a document start either way."""
    del unused
    log_mom, gamma = fill_defaults(rule, lr, log_mom, gamma)
    rW, rS, rA = reset_target(W0, state, reset_to)
    # per head: outer/state parts on axis 0, per-token inputs on axis 1 ([T, H, ...])
    per_head = jax.vmap(lambda *a: _head_scan(rule, *a),
                        in_axes=(0,) * 11 + (1,) * 8 + (None,) * 3,
                        out_axes=(1,) + (0,) * 7)
    per_row = jax.vmap(per_head, in_axes=(None,) + (0,) * 21)
    y, W, S, anc, wk, wv, wx, wval = per_row(
        outer, rW, rS, rA, state.W, state.S, state.anchor, state.win_k, state.win_v, state.win_extra,
        _wval_heads(state, q.shape[2]), q, k, v, log_ret, lr, log_mom, gamma, extra, pos, reset,
        real)
    return y, MemoryState(W=W, S=S, anchor=anc, win_k=wk, win_v=wv, win_extra=wx,
                          win_valid=wval[:, 0])


def _wval_heads(state: MemoryState, H: int):
    return jnp.broadcast_to(state.win_valid[:, None], (state.win_valid.shape[0], H,
                                                       state.win_valid.shape[1]))


def fill_defaults(rule: MemoryRule, lr, log_mom, gamma):
    """No momentum: log_mom = -inf (S_t = c_in U_t). Window 1 without gates: gamma = 1."""
    if log_mom is None:
        log_mom = jnp.full(lr.shape, -jnp.inf, jnp.float32)
    if gamma is None:
        gamma = jnp.ones(lr.shape + (rule.window,), jnp.float32)
    if gamma.shape[-1] != rule.window:
        raise ValueError(f"gamma has {gamma.shape[-1]} gates per token, window is {rule.window}")
    return log_mom, gamma
