"""The neural-memory layer (Titans LMM; the base of ATLAS, OmegaNet and the Miras models).

Design note
-----------
One memory per (batch row, head) is trained at test time by gradient steps on an inner objective
while the sequence is read (specs/titans.md §2, atlas.md §2, miras.md §2). The maths lives in the
op `pallas_kernels.neural_memory` (reference token loop + chunk-parallel form, same function for
every chunk size `b`); this module supplies the pluggable pieces and the projections around it.

Pluggable parts (all plain functions of ONE head and ONE token; the op vmaps them):

* memory architecture  `memory_fn(outer_h, W_h, x[dk]) -> y[dv]`; `W_h` is any pytree of weights
  (the recurrent state), `outer_h` the per-head outer-loop parameters (e.g. the memory LayerNorm).
  Built in (layers/memory_nets.py): `linear_memory` (`y = x W["w"]`), `mlp_memory` (`x +
  LN(act(x W1) ... WL)`, residual and LayerNorm optional, depth/expansion from the config), and
  Atlas++'s `gated_mlp_memory`.
* attentional bias / inner objective  `signal_fn(pred[dv], v[dv], extra_t) -> dloss/dpred`
  (the output signal that is back-propagated through the memory; one VJP per token).
  Built in: `l2_signal` (½‖pred − v‖²), `dot_signal` (−⟨pred, v⟩). `signal_from_loss(loss)` turns
  any scalar loss into a signal. Per-token data a signal needs (Yaad's δ_t, channel-wise rates)
  travels as `extra` (pytree of [B, T, H, ...]); the Omega window carries it for past tokens.
* retention  the forget gate enters as a per-token LOG multiplier `log_ret` (Titans: log(1−α);
  ATLAS/Miras: log α); regulariser-type retention (Moneta's ℓq normalisation, Memora's softmax
  of logits, elastic-net soft threshold) plugs in as `link_fn(outer_h, A_h) -> W_h`: the state
  carried is the accumulator `A` (linear recurrence), the memory uses `W = link(A)` and the
  gradient is taken w.r.t. `W`.
* optimizer  gradient descent (no momentum: `log_mom = None`), momentum ("surprise") with a
  per-token log momentum coefficient, `lr_inside` (Titans: `S = ηS − θu`, `W = (1−α)W + S`)
  or outside (ATLAS: `S = θS + U`, `W = αW − η·T(S)`), and an update transform
  `transform_fn(S_h) -> S_h` (Newton–Schulz per weight matrix for ATLAS; identity by default).
* context  online per token (`window = 1`) or the Omega rule over a sliding window of `c` tokens
  with per-token gates `gamma[B, T, H, c]` (`gamma[t, j]` weights source token `t − j`).
* feature map  `feature_fn(x[..., d]) -> φ(x)` applied to the ℓ2-normalised keys and queries
  (learnable maps: subclass `NeuralMemory` and override `features`).
* data-dependent learning rate and gates  `NeuralMemory.gates(x)` returns the dict
  `{log_ret, lr, log_mom, gamma, extra}` (per head scalars [B, T, H]); override it for
  channel-wise or low-rank gates. The retention gate reads in Titans' letters (`alpha_gate =
  "forget"`: retention 1 − α) or ATLAS/Miras letters (`"retain"`: retention α).

Members built on this layer: `layers.atlas` (Atlas, OmegaNet) and `layers.miras` (Moneta, Yaad,
Memora) plug their parts into this config and add the parameters those parts own.

Chunk semantics (part of the model, titans.md §2.7, DESIGN.md "chunk-aligned models"): gradients
inside a chunk of `b` tokens are all taken at the chunk-start state (the anchor); chunks start at
absolute positions 0, b, 2b, ... of the memory's input stream and restart at document starts;
the state carries W, S, the anchor, the window buffer, the conv cache and the position, so a call
may stop anywhere and decoding updates at the same boundaries as training.

Layer (titans.md §3.2): q, k, v = SiLU(causal depthwise conv(x W_{Q,K,V})) (one shared conv over
the three streams, kernel 4, no bias), q, k ℓ2-normalised per head (then `feature_fn`), gates
from linear maps of x, memory scan, per-head gated RMSNorm (norm before the SiLU gate of
x W_g), output projection W_O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.common import doc_starts, normal, param, real_mask, token_positions
from layers.conv import CausalConv1d, causal_conv1d
from layers.linear import Dense
from layers.memory_nets import _GatedMLPMemory, _MLPMemory, linear_memory
from layers.norms import gated_rms_norm, l2_norm
from pallas_kernels import neural_memory as nm_op
from pallas_kernels.impl import Impl
from pallas_kernels.impl import check as check_impl
from pallas_kernels.neural_memory import MemoryRule, MemoryState, l2_signal  # noqa: F401  (re-exported)

Array = jax.Array
PyTree = Any

# ----------------------------------------------------------------------------- inner objectives


def dot_signal(pred, v, extra=None):
    """−⟨pred, v⟩ → −v (a descent step adds v kᵀ: linear attention)."""
    return -v * jnp.ones_like(pred)


def signal_from_loss(loss: Callable) -> Callable:
    """Any scalar loss(pred, v, extra) as an output signal dloss/dpred."""
    def signal(pred, v, extra=None):
        return jax.grad(lambda p: loss(p, v, extra))(pred)
    return signal


SIGNALS = {"l2": l2_signal, "dot": dot_signal}
MEMORIES = ("mlp", "linear", "gated_mlp")


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class NeuralMemoryConfig:
    """Static configuration of one neural-memory mixer.

    memory: "mlp" | "linear" | "gated_mlp" (Atlas++, Eq. 43); depth (MLP only) / expansion of
    the MLP memories; residual and LayerNorm flags.
    objective: "l2" | "dot" | a signal function (pred, v, extra) -> dloss/dpred.
    chunk: b (anchor chunk, part of the model); window: c (Omega rule; 1 = online).
    momentum: use the momentum ("surprise") term; lr_inside: Titans (True) or ATLAS (False).
    transform / link / feature_fn: optional plain functions (see the module docstring).
    lr_max: inner learning rate bound (θ = lr_max·sigmoid); None: 1.0 linear, 0.1 MLP.
    *_bias: gate bias initialisations (retention ≈ 0.993 for alpha_bias = −5).
    alpha_gate: "forget" (Titans: retention 1 − α, α = sigmoid(x w_α + b_α)) | "retain" (ATLAS,
    Miras: retention α itself).
    impl: the op's implementation (`pallas_kernels.impl`: auto | reference | chunked, the same
    function); max_resets: static bound on packed document starts per row per call for the
    chunk-parallel layout (more falls back exactly).
    """
    dim: int
    n_heads: int
    head_dim: int | None = None
    memory: str = "mlp"
    depth: int = 2
    expansion: int = 4
    residual: bool = True
    memory_ln: bool = True
    ln_eps: float = 1e-5
    objective: Any = "l2"
    chunk: int = 16
    window: int = 1
    momentum: bool = True
    lr_inside: bool = True
    transform: Callable | None = None
    link: Callable | None = None
    feature_fn: Callable | None = None
    feature_dim: int | None = None     # dk after feature_fn (None: head_dim)
    lr_max: float | None = None
    alpha_bias: float = -5.0
    eta_bias: float = 1.0
    theta_bias: float = -2.0
    alpha_gate: str = "forget"
    conv_size: int = 4
    norm_eps: float = 1e-6
    init_std: float = 0.02
    memory_init_std: float | None = None   # None: 1/sqrt(fan_in) for MLP layers, 0 for linear
    impl: str = "auto"
    block: int = 64                        # the kernels' token block (never changes the function)
    max_resets: int = 4

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def dk(self) -> int:
        return self.feature_dim or self.hd

    @property
    def theta_max(self) -> float:
        if self.lr_max is not None:
            return self.lr_max
        return 1.0 if self.memory == "linear" else 0.1

    def validate(self):
        if self.memory not in MEMORIES:
            raise ValueError(f"memory={self.memory!r} is not one of {MEMORIES}")
        if isinstance(self.objective, str) and self.objective not in SIGNALS:
            raise ValueError(f"objective={self.objective!r} is not one of {tuple(SIGNALS)}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.chunk < 1 or self.window < 1:
            raise ValueError(f"chunk={self.chunk} and window={self.window} must be >= 1")
        if self.alpha_gate not in ("forget", "retain"):
            raise ValueError(f"alpha_gate={self.alpha_gate!r} is not one of ('forget', 'retain')")
        check_impl(self.impl, ("neural_memory",), key="impl")
        check_memory_kernel(self.impl, make_rule(self), key="impl")


def check_memory_kernel(impl: str, rule: MemoryRule | None, *, key: str = "model.impl") -> None:
    """A kernel `impl` (pallas, pallas_interpret) for a memory its kernels cannot run is one line
    naming `key` (`rule` None: a family whose rules the kernels do not cover)."""
    if Impl(impl) not in (Impl.PALLAS, Impl.PALLAS_INTERPRET):
        return
    err = ("the kernels cover Titans' matrix memory only" if rule is None
           else nm_op.kernel_error(rule))
    if err:
        raise ValueError(f"{key}={impl!r}: the neural_memory kernel cannot run this memory: "
                         f"{err}")


def memory_fn_of(cfg: NeuralMemoryConfig) -> Callable:
    if cfg.memory == "linear":
        return linear_memory
    ln_eps = cfg.ln_eps if cfg.memory_ln else None
    if cfg.memory == "gated_mlp":
        return _GatedMLPMemory(cfg.residual, ln_eps)
    return _MLPMemory(cfg.residual, ln_eps)


def has_memory_ln(cfg: NeuralMemoryConfig) -> bool:
    """Whether the memory network ends in a LayerNorm (its affine parameters outer-loop)."""
    return cfg.memory != "linear" and cfg.memory_ln


def signal_of(cfg: NeuralMemoryConfig) -> Callable:
    """The output signal of `cfg.objective` (a name of `SIGNALS` or a signal function)."""
    return SIGNALS[cfg.objective] if isinstance(cfg.objective, str) else cfg.objective


def make_rule(cfg: NeuralMemoryConfig) -> MemoryRule:
    return MemoryRule(memory_fn=memory_fn_of(cfg), signal_fn=signal_of(cfg), chunk=cfg.chunk,
                      window=cfg.window, lr_inside=cfg.lr_inside, transform_fn=cfg.transform,
                      link_fn=cfg.link)


def memory_shapes(cfg: NeuralMemoryConfig) -> dict[str, tuple[int, ...]]:
    """Per-head weight shapes of the memory state W."""
    dk, dv = cfg.dk, cfg.hd
    if cfg.memory == "linear":
        return {"w": (dk, dv)}
    h = cfg.expansion * dv
    if cfg.memory == "gated_mlp":
        return {"w2": (dk, h), "w3": (dk, h), "w1": (h, dv)}
    dims = [dk] + [h] * (cfg.depth - 1) + [dv]
    return {f"w{i + 1}": (dims[i], dims[i + 1]) for i in range(cfg.depth)}


# ----------------------------------------------------------------------------- state


@struct.dataclass
class NeuralMemoryLayerState:
    mem: MemoryState   # W, S, anchor, window buffer
    conv: Array        # [B, K-1, 3*H*d] last inputs of the q/k/v convolution
    pos: Array         # [B] int32 position of the next token in its document


# ----------------------------------------------------------------------------- module


class NeuralMemory(nnx.Module):
    """Titans LMM mixer (mixer contract of DESIGN.md). Override `gates`, `features` or
    `rule` in a subclass to build the other members of the family."""

    def __init__(self, cfg: NeuralMemoryConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        D, H, d = cfg.dim, cfg.n_heads, cfg.hd
        std = cfg.init_std
        self.wq = Dense(D, H * d, rngs=rngs, axes=("embed", "heads"), std=std)
        self.wk = Dense(D, H * d, rngs=rngs, axes=("embed", "heads"), std=std)
        self.wv = Dense(D, H * d, rngs=rngs, axes=("embed", "heads"), std=std)
        self.conv = CausalConv1d(3 * H * d, cfg.conv_size, rngs=rngs, use_bias=False)
        def gate(bias):
            g = Dense(D, H, rngs=rngs, use_bias=True, axes=("embed", "heads"), std=std)
            g.bias[...] = jnp.full((H,), bias, jnp.float32)
            return g

        self.w_alpha, self.w_theta = gate(cfg.alpha_bias), gate(cfg.theta_bias)
        self.w_eta = gate(cfg.eta_bias) if cfg.momentum else None
        self.wg = Dense(D, H * d, rngs=rngs, axes=("embed", "heads"), std=std)
        self.wo = Dense(H * d, D, rngs=rngs, axes=("heads", "embed"), std=std)
        self.out_norm = param(jnp.ones((d,), jnp.float32), ("norm",))
        # memory initial state W0 (per head) and the memory's outer parameters
        W0 = {}
        for name, shape in memory_shapes(cfg).items():
            s = cfg.memory_init_std
            if s is None:
                s = 0.0 if cfg.memory == "linear" else shape[0] ** -0.5
            W0[name] = param(normal(rngs.params(), (H,) + shape, s) if s else
                             jnp.zeros((H,) + shape, jnp.float32), ("heads", None, None))
        self.W0 = nnx.Dict(W0)
        ln = has_memory_ln(cfg)
        self.mem_ln_w = param(jnp.ones((H, d), jnp.float32), ("heads", None)) if ln else None
        self.mem_ln_b = param(jnp.zeros((H, d), jnp.float32), ("heads", None)) if ln else None

    # -- pluggable pieces -------------------------------------------------------------------

    def rule(self) -> MemoryRule:
        return make_rule(self.cfg)

    def outer(self) -> PyTree:
        if self.mem_ln_w is None:
            return {}
        return {"ln_w": self.mem_ln_w[...], "ln_b": self.mem_ln_b[...]}

    def memory_init(self) -> PyTree:
        return {k: v[...] for k, v in self.W0.items()}

    def features(self, q: Array, k: Array) -> tuple[Array, Array]:
        if self.cfg.feature_fn is None:
            return q, k
        return self.cfg.feature_fn(q), self.cfg.feature_fn(k)

    def gates(self, x: Array) -> dict[str, Any]:
        """Per-head gates [B, T, H] by role: log retention, learning rate, log momentum."""
        za = self.w_alpha(x).astype(jnp.float32)
        if self.cfg.alpha_gate == "forget":
            za = -za                                # Titans: retention 1 - alpha = sigmoid(-z)
        out = {"log_ret": jax.nn.log_sigmoid(za),
               "lr": self.cfg.theta_max * jax.nn.sigmoid(self.w_theta(x).astype(jnp.float32)),
               "log_mom": None, "gamma": None, "extra": None}
        if self.w_eta is not None:
            out["log_mom"] = jax.nn.log_sigmoid(self.w_eta(x).astype(jnp.float32))
        return out

    def extra_proto(self, batch_size: int) -> PyTree:
        """Per-token extras' prototype [B, 1, H, ...] (None: the objective needs none)."""
        return None

    # -- contract -----------------------------------------------------------------------------

    def init_state(self, batch_size: int, max_len: int | None = None) -> NeuralMemoryLayerState:
        cfg = self.cfg
        mem = nm_op.init_state(self.memory_init(), batch_size, cfg.dk, cfg.hd, cfg.window,
                               self.extra_proto(batch_size))
        return NeuralMemoryLayerState(mem=mem, conv=self.conv.init_state(batch_size),
                                      pos=jnp.zeros((batch_size,), jnp.int32))

    def qkv(self, x, conv_state, real, starts, hist=None):
        """q, k (ℓ2-normalised, then features), v: [B, T, H, *]; new conv state. `hist`
        [B, K-1, C]: the conv inputs a document start sees before it (None: zeros)."""
        B, T, _ = x.shape
        H, d = self.cfg.n_heads, self.cfg.hd
        u = jnp.concatenate([self.wq(x), self.wk(x), self.wv(x)], axis=-1)
        u, conv_state = conv_with_history(self.conv.weight[...], u, conv_state, real, starts, hist)
        u = jax.nn.silu(u.astype(jnp.float32))
        q, k, v = (a.reshape(B, T, H, d) for a in jnp.split(u, 3, axis=-1))
        q, k = l2_norm(q, self.cfg.norm_eps), l2_norm(k, self.cfg.norm_eps)
        q, k = self.features(q, k)
        return q, k, v, conv_state

    def output(self, x, y):
        B, T = x.shape[:2]
        H, d = self.cfg.n_heads, self.cfg.hd
        z = self.wg(x).reshape(B, T, H, d)
        o = gated_rms_norm(y, z, self.out_norm[...], self.cfg.norm_eps, norm_before_gate=True)
        return self.wo(o.reshape(B, T, H * d).astype(x.dtype))

    def memory(self, q, k, v, g, mem, pos, starts, real, *, has_resets: bool, reset_to=None):
        return nm_op.neural_memory(
            self.rule(), self.outer(), self.memory_init(), mem, q, k, v, log_ret=g["log_ret"],
            lr=g["lr"], log_mom=g["log_mom"], gamma=g["gamma"], extra=g["extra"], pos=pos,
            reset=starts, real=real, max_resets=self.cfg.max_resets if has_resets else None,
            reset_to=reset_to, impl=self.cfg.impl, block=self.cfg.block)

    def __call__(self, x, state=None, *, mask=None, segment_ids=None, context=None,
                 deterministic: bool = True, key=None,
                 reset_state: NeuralMemoryLayerState | None = None):
        """`reset_state`: the state a document start returns to (None: the fresh state); its
        position offsets the memory stream's positions (persistent tokens, MAG/MAL). Its
        window buffer is not restored: a document start empties the Omega window, so a reset
        state must have an empty one (`layers.titans.PrefixedMemory` empties it after P)."""
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B)
        real = real_mask(mask, B, T)
        starts = doc_starts(segment_ids, B, T) & real
        pos, dcount, next_pos = token_positions(state.pos, starts, real)
        hist, reset_to = None, None
        if reset_state is not None and segment_ids is not None:
            pos = pos + jnp.where(dcount > 0, reset_state.pos[:, None], 0)
            n_real = real.sum(axis=1).astype(jnp.int32)
            last = jnp.take_along_axis(pos, jnp.maximum(n_real - 1, 0)[:, None], axis=1)[:, 0]
            next_pos = jnp.where(n_real > 0, last + 1, state.pos).astype(jnp.int32)
            hist = reset_state.conv
            reset_to = (reset_state.mem.W, reset_state.mem.S, reset_state.mem.anchor)
        q, k, v, conv_state = self.qkv(x, state.conv, real, starts, hist)
        g = self.gates(x)
        y, mem = self.memory(q, k, v, g, state.mem, pos, starts, real,
                             has_resets=segment_ids is not None, reset_to=reset_to)
        out = self.output(x, y)
        return out, NeuralMemoryLayerState(mem=mem, conv=conv_state, pos=next_pos), {}


def conv_with_history(w, x, state, real, starts, hist=None):
    """The shared causal depthwise conv (no bias), except that a document start sees `hist`
    ([B, K-1, C], oldest first) as its previous inputs instead of zeros (MAG/MAL: the last
    inputs of the persistent tokens); the returned state is filled the same way."""
    y, new_state = causal_conv1d(x, w, None, state, real, starts)
    if hist is None or starts is None:
        return y, new_state
    B, T, C = x.shape
    K = w.shape[1]
    t = jnp.arange(T)[None, :]
    last_start = jax.lax.cummax(jnp.where(starts, t, -(K + 1)), axis=1)  # [B, T]
    bi = jnp.arange(B)[:, None]
    corr = jnp.zeros((B, T, C), jnp.float32)
    for k in range(K):
        j = t - (K - 1 - k) - last_start  # input index relative to the document start
        use = (last_start >= 0) & (j < 0)
        h = hist[bi, jnp.clip(K - 1 + j, 0, K - 2)].astype(jnp.float32)
        corr = corr + jnp.where(use[..., None], h * w[:, k].astype(jnp.float32), 0.0)
    y = (y.astype(jnp.float32) + corr).astype(y.dtype)
    n_real = real.sum(axis=1).astype(jnp.int32)
    ls = jnp.take_along_axis(last_start, jnp.maximum(n_real - 1, 0)[:, None], axis=1)  # [B, 1]
    call_idx = n_real[:, None] + jnp.arange(K - 1)[None, :] - (K - 1)
    j = call_idx - ls
    use = (ls >= 0) & (j < 0) & (n_real[:, None] > 0)
    h = hist[bi, jnp.clip(K - 1 + j, 0, K - 2)]
    return y, jnp.where(use[..., None], h.astype(new_state.dtype), new_state)
