"""Linear-memory mixers (specs/mom.md §2.6 and §2.8 "Other bases"): linear attention, gated
linear attention (GLA), DeltaNet and Gated DeltaNet, on the two shared ops `pallas_kernels.gla`
(linear attention = GLA without decay) and `pallas_kernels.gated_delta` (DeltaNet = the gated
delta rule with g = 0).

Level 1 is `linear_memory_mixer`, a pure function of explicit parameter arrays; level 3 is
`LinearMemoryMixer`, owning the parameters. One flow for the
four kinds (the §2.6 layer with the base's own update and gates):

    q, k, v = x W_Q, x W_K, x W_V                          (heads: H x dk, H x dk, H x dv)
    [short conv]   q, k, v = SiLU(conv_q(q)), SiLU(conv_k(k)), SiLU(conv_v(v))   (kernel K)
    linear_attention: q, k = phi(q), phi(k)    phi in FEATURE_MAPS
    gla:              g = logsigmoid(x W_1 W_2 + b) / 16        per key (low rank, §2.8)
    deltanet:         q, k = l2norm(q), l2norm(k); beta = sigmoid(x W_b)
    gated_deltanet:   the same and g = -exp(A_log) softplus(x W_a + dt_bias)   (§2.6)
    o = op(q, k, v, ...) with scale 1/sqrt(dk)          (read after the update)
    linear_attention with normalize: o = num / (scale q.z + 1e-10), z = sum of keys
        (fla's normaliser; computed by the same op on an extra all-ones value column, so the
        carried state has dv + 1 columns)
    out = [per-head RMSNorm(o) w  (x SiLU(x W_G) if output_gate)] W_O       (§2.6 output stage)

State (`LinearMemoryState`): the last K-1 real pre-conv inputs of each stream (q, k, v), the
float32 memory S [B, H, dk, dv (+1)] and the next position. Right padding (`mask`): pad tokens
are inert (k = v = 0, beta = 0, log-decay 0). Document starts (`segment_ids`): the conv windows
restart and the memory is cleared by a log-decay of `RESET_LOG_DECAY` (exp underflows to an
exact 0) at the document's first token; linear attention and DeltaNet then pass a decay too.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.common import call_flags, param, uniform
from layers.conv import CausalConv1d, causal_conv1d
from layers.linear import Dense
from layers.norms import gated_rms_norm, l2_norm, rms_norm
from layers.ssm import dt_bias_init
from pallas_kernels.gated_delta import gated_delta
from pallas_kernels.gla import gla

Array = jax.Array

KINDS = ("linear_attention", "gla", "deltanet", "gated_deltanet")
FEATURE_MAPS = ("identity", "elu1", "relu")   # elu1: elu(x) + 1 (Katharopoulos et al.)
GLA_GATE_RANK = 16                           # fla's gate_low_rank_dim
GLA_GATE_NORMALIZER = 16.0                   # logsigmoid(.) / 16 (mom_naive/layers/mom_gla.py)
RESET_LOG_DECAY = -1e30                      # exp(.) == 0 exactly, finite in every sum
NORMALIZER_EPS = 1e-10                       # fla's naive_recurrent_linear_attn


@struct.dataclass
class LinearMemoryState:
    conv_q: Array   # [B, K-1, H dk] last K-1 real pre-conv inputs (oldest first); K-1 = 0 if no conv
    conv_k: Array   # [B, K-1, H dk]
    conv_v: Array   # [B, K-1, H dv]
    memory: Array   # float32 [B, H, dk, dv] (dv + 1 with the linear-attention normaliser)
    pos: Array      # [B] int32 position of the next token (in its document)


def uses_delta(kind: str) -> bool:
    return kind in ("deltanet", "gated_deltanet")


def op_name(kind: str) -> str:
    """The `pallas_kernels` op a kind runs on (for `check_impl`)."""
    return "gated_delta" if uses_delta(kind) else "gla"


def feature_map(x: Array, name: str) -> Array:
    """The linear-attention feature map phi (parameter-free ones)."""
    if name == "identity":
        return x
    if name == "elu1":
        return jax.nn.elu(x) + 1.0
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"feature_map {name!r} is not one of {FEATURE_MAPS}")


def normalized_linear_attention(q: Array, k: Array, v: Array, g: Array | None, *, scale: float,
                                initial_state: Array | None, impl: str = "auto",
                                block: int = 64) -> tuple[Array, Array]:
    """fla's normalised linear attention o_t = (scale q_t S_t) / (scale q_t . z_t + 1e-10),
    z_t = sum_{i<=t} k_i (decayed like S when g is given), by one `gla` call on the value
    columns (v | 1): the state [B, H, dk, dv + 1] carries z in its last column."""
    ones = jnp.ones(v.shape[:-1] + (1,), v.dtype)
    o, S = gla(q, k, jnp.concatenate([v, ones], -1), g, scale=scale, initial_state=initial_state,
               impl=impl, block=block)
    return o[..., :-1] / (o[..., -1:] + NORMALIZER_EPS), S


def _conv(x: Array, w: Array | None, cache: Array, mask: Array, starts: Array):
    if w is None:
        return x, cache
    y, cache = causal_conv1d(x, w, None, cache, mask, starts)
    return jax.nn.silu(y), cache


def read_out(p: dict[str, Array | None], o: Array, x: Array, norm_eps: float) -> Array:
    """The memory read o [B, T, H, dv] -> [B, T, D] (mom.md §2.6): per-head RMSNorm, gated by
    SiLU(x W_G) when the layer has an output gate (`g_proj`), then the output projection."""
    B, T, H, dv = o.shape
    if p["g_proj"] is None:
        y = rms_norm(o, p["norm"], norm_eps)
    else:
        z = jnp.einsum("btd,de->bte", x, p["g_proj"].astype(x.dtype)).reshape(B, T, H, dv)
        y = gated_rms_norm(o, z, p["norm"], norm_eps, norm_before_gate=True)
    y = y.reshape(B, T, H * dv).astype(x.dtype)
    return jnp.einsum("bte,ed->btd", y, p["o_proj"].astype(y.dtype))


@functools.partial(jax.jit, static_argnames=("kind", "n_heads", "feature_map_name", "normalize",
                                             "norm_eps", "resets", "impl", "block"))
def linear_memory_mixer(p: dict[str, Array | None], x: Array, state: LinearMemoryState,
                        mask: Array, starts: Array, *, kind: str, n_heads: int,
                        feature_map_name: str = "identity", normalize: bool = False,
                        norm_eps: float = 1e-6, resets: bool = False, impl: str = "auto",
                        block: int = 64) -> tuple[Array, LinearMemoryState]:
    """One linear-memory mixer (module docstring). p: q_proj [D, H dk], k_proj [D, H dk],
    v_proj [D, H dv], conv_q/conv_k/conv_v [C, K] or None, gk_down [D, r] / gk_up [r, H dk] /
    gk_bias [H dk] (gla), b_proj [D, H] (delta kinds), a_proj [D, H], A_log [H], dt_bias [H]
    (gated_deltanet), g_proj [D, H dv] or None (output gate), norm [dv], o_proj [H dv, D].
    x: [B, T, D]; mask (real tokens), starts (document starts inside the call): [B, T] bool;
    `resets` (static): whether `starts` may hold a start (else linear attention runs without a
    decay)."""
    B, T, _ = x.shape
    H = n_heads
    dk = p["q_proj"].shape[1] // H
    proj = lambda name: jnp.einsum("btd,de->bte", x, p[name].astype(x.dtype))  # noqa: E731
    q, cq = _conv(proj("q_proj"), p["conv_q"], state.conv_q, mask, starts)
    k, ck = _conv(proj("k_proj"), p["conv_k"], state.conv_k, mask, starts)
    v, cv = _conv(proj("v_proj"), p["conv_v"], state.conv_v, mask, starts)
    q, k, v = (a.astype(jnp.float32).reshape(B, T, H, -1) for a in (q, k, v))
    real = mask[..., None, None]
    k, v = jnp.where(real, k, 0.0), jnp.where(real, v, 0.0)           # inert pads
    reset = (starts & mask)[..., None]                                  # [B, T, 1]
    scale = dk ** -0.5
    S0 = state.memory
    if uses_delta(kind):
        q, k = l2_norm(q), l2_norm(k)
        beta = jax.nn.sigmoid(jnp.einsum("btd,dh->bth", x.astype(jnp.float32),
                                         p["b_proj"].astype(jnp.float32)))
        beta = jnp.where(mask[..., None], beta, 0.0)
        if kind == "gated_deltanet":
            a = jnp.einsum("btd,dh->bth", x.astype(jnp.float32), p["a_proj"].astype(jnp.float32))
            g = -jnp.exp(p["A_log"].astype(jnp.float32)) * jax.nn.softplus(
                a + p["dt_bias"].astype(jnp.float32))
            g = jnp.where(mask[..., None], g, 0.0)
        else:
            g = jnp.zeros((B, T, H), jnp.float32)
        if resets:
            g = jnp.where(reset, RESET_LOG_DECAY, g)
        o, S = gated_delta(q, k, v, g, beta, scale=scale, initial_state=S0, impl=impl,
                           block=block)
    else:
        g = None
        if kind == "gla":
            low = jnp.einsum("btd,dr->btr", x.astype(jnp.float32),
                             p["gk_down"].astype(jnp.float32))
            g = jnp.einsum("btr,re->bte", low, p["gk_up"].astype(jnp.float32))
            g = jax.nn.log_sigmoid(g + p["gk_bias"].astype(jnp.float32)) / GLA_GATE_NORMALIZER
            g = jnp.where(mask[..., None], g, 0.0).reshape(B, T, H, dk)
        else:
            q, k = feature_map(q, feature_map_name), feature_map(k, feature_map_name)
            k = jnp.where(real, k, 0.0)
        if resets:
            g = jnp.where(reset[..., None], RESET_LOG_DECAY,
                          jnp.zeros((B, T, H, dk), jnp.float32) if g is None else g)
        if kind == "linear_attention" and normalize:
            o, S = normalized_linear_attention(q, k, v, g, scale=scale, initial_state=S0,
                                               impl=impl, block=block)
        else:
            o, S = gla(q, k, v, g, scale=scale, initial_state=S0, impl=impl, block=block)
    out = read_out(p, o, x, norm_eps)
    return out, LinearMemoryState(conv_q=cq, conv_k=ck, conv_v=cv, memory=S, pos=state.pos)


# ----------------------------------------------------------------------------- counts

def memory_state_flops(kind: str, n_heads: int, dk: int, dv: int) -> float:
    """Forward FLOPs per token of the reference recurrence over the H x dk x dv state (the
    products of the update and the read, 2 per multiply-add, like `selective_state_flops`):
    linear attention k^T v added (2) and the read q S (2); GLA also the per-key decay of every
    element (1); DeltaNet the prediction k S (2), the outer product and add (2) and the read (2);
    Gated DeltaNet also the decay (1). Gates, norms, feature maps and beta (dv per head) are
    elementwise: not counted."""
    per = {"linear_attention": 4, "gla": 5, "deltanet": 6, "gated_deltanet": 7}[kind]
    return float(per * n_heads * dk * dv)


def linear_memory_mixer_flops(kind: str, dim: int, n_heads: int, dk: int, dv: int, *,
                              conv_size: int | None, output_gate: bool,
                              normalize: bool = False) -> float:
    """Forward FLOPs per token of `linear_memory_mixer`: the q/k/v projections, the depthwise
    convs (conv_size multiply-adds per channel), the gate projections (GLA's low-rank pair,
    beta's [D, H], Gated DeltaNet's [D, H] decay), the recurrence (`memory_state_flops`, with
    the normaliser's extra value column), the output gate [D, H dv] and W_O."""
    H = n_heads
    proj = 2.0 * dim * H * (2 * dk + dv)
    conv = 2.0 * conv_size * H * (2 * dk + dv) if conv_size else 0.0
    gates = {"linear_attention": 0.0,
             "gla": 2.0 * dim * GLA_GATE_RANK + 2.0 * GLA_GATE_RANK * H * dk,
             "deltanet": 2.0 * dim * H, "gated_deltanet": 4.0 * dim * H}[kind]
    state = memory_state_flops(kind, H, dk, dv + (1 if normalize else 0))
    gate = 2.0 * dim * H * dv if output_gate else 0.0
    return proj + conv + gates + state + gate + 2.0 * H * dv * dim


def linear_memory_param_count(kind: str, dim: int, n_heads: int, dk: int, dv: int, *,
                              conv_size: int | None, output_gate: bool) -> int:
    """Parameters of one `LinearMemoryMixer`: W_Q, W_K, W_V, the three bias-free depthwise convs,
    the gates (GLA: W_1 [D, 16], W_2 [16, H dk] and its bias; DeltaNet: W_b [D, H]; Gated
    DeltaNet: W_b, W_a [D, H], A_log and dt_bias [H]), W_G [D, H dv] (if gated), the per-head
    norm weight [dv] and W_O [H dv, D]."""
    H = n_heads
    n = dim * H * (2 * dk + dv)
    n += conv_size * H * (2 * dk + dv) if conv_size else 0
    n += {"linear_attention": 0, "gla": dim * GLA_GATE_RANK + GLA_GATE_RANK * H * dk + H * dk,
          "deltanet": dim * H, "gated_deltanet": 2 * dim * H + 2 * H}[kind]
    n += dim * H * dv if output_gate else 0
    return n + dv + H * dv * dim


# ----------------------------------------------------------------------------- module

def xavier_dense(dim_in: int, dim_out: int, rngs: nnx.Rngs, axes, gain: float,
                 use_bias: bool = False) -> Dense:
    """fla's layer init (specs/mom.md §6.9): xavier-uniform weight with `gain`, zero bias."""
    lin = Dense(dim_in, dim_out, rngs=rngs, axes=axes, init="zeros", use_bias=use_bias)
    lin.weight[...] = uniform(rngs.params(), (dim_in, dim_out),
                              gain * (6.0 / (dim_in + dim_out)) ** 0.5)
    return lin


class LinearMemoryMixer(nnx.Module):
    """One of the four linear-memory mixers (`kind` in KINDS), following the mixer contract.

    dim: model width; n_heads x head_dim_k (queries, keys) and n_heads x head_dim_v (values);
    conv_size: the short-conv kernel (None: no convs); output_gate: SiLU(x W_G) gate on the
    per-head RMSNorm (eps `norm_eps`); feature_map / normalize: linear attention only.
    Initialisation as specs/mom.md §6.9 (xavier-uniform gain 2^-2.5, A = U(0, 16),
    dt_bias = softplus^{-1}(dt), dt log-uniform in [dt_min, dt_max] floored at dt_floor; convs
    U(+-1/sqrt(K)), norm weight 1). `impl`, `block`: the op's form and block size (neither
    changes the function)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, kind: str, n_heads: int, head_dim_k: int,
                 head_dim_v: int, conv_size: int | None = 4, output_gate: bool = True,
                 feature_map: str = "identity", normalize: bool = False, norm_eps: float = 1e-6,
                 gain: float = 2 ** -2.5, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_floor: float = 1e-4, impl: str = "auto", block: int = 64):
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {KINDS}")
        H, dk, dv = n_heads, head_dim_k, head_dim_v
        self.kind, self.n_heads, self.dk, self.dv = kind, H, dk, dv
        self.feature_map, self.normalize = feature_map, normalize and kind == "linear_attention"
        self.norm_eps, self.impl, self.block = norm_eps, impl, block
        self.conv_size = conv_size
        lin = functools.partial(xavier_dense, rngs=rngs, gain=gain)
        self.q_proj = lin(dim, H * dk, axes=("embed", "heads"))
        self.k_proj = lin(dim, H * dk, axes=("embed", "heads"))
        self.v_proj = lin(dim, H * dv, axes=("embed", "heads"))
        convs = [CausalConv1d(c, conv_size, rngs=rngs, use_bias=False) if conv_size else None
                 for c in (H * dk, H * dk, H * dv)]
        self.conv_q, self.conv_k, self.conv_v = convs
        if kind == "gla":
            self.gk_down = lin(dim, GLA_GATE_RANK, axes=("embed", None))
            self.gk_up = lin(GLA_GATE_RANK, H * dk, axes=(None, "heads"), use_bias=True)
        if uses_delta(kind):
            self.b_proj = lin(dim, H, axes=("embed", "heads"))
        if kind == "gated_deltanet":
            self.a_proj = lin(dim, H, axes=("embed", "heads"))
            A = jax.random.uniform(rngs.params(), (H,), jnp.float32, 0.0, 16.0)
            self.A_log = param(jnp.log(A), ("heads",))
            self.dt_bias = param(dt_bias_init(rngs.params(), H, dt_min, dt_max, dt_floor),
                                 ("heads",))
        self.g_proj = lin(dim, H * dv, axes=("embed", "heads")) if output_gate else None
        self.norm = param(jnp.ones((dv,), jnp.float32), ("norm",))
        self.o_proj = lin(H * dv, dim, axes=("heads", "embed"))

    def arrays(self) -> dict[str, Array | None]:
        w = lambda m: None if m is None else m.weight[...]  # noqa: E731
        p = {"q_proj": w(self.q_proj), "k_proj": w(self.k_proj), "v_proj": w(self.v_proj),
             "conv_q": w(self.conv_q), "conv_k": w(self.conv_k), "conv_v": w(self.conv_v),
             "g_proj": w(self.g_proj), "norm": self.norm[...], "o_proj": w(self.o_proj)}
        if self.kind == "gla":
            p.update(gk_down=w(self.gk_down), gk_up=w(self.gk_up), gk_bias=self.gk_up.bias[...])
        if uses_delta(self.kind):
            p["b_proj"] = w(self.b_proj)
        if self.kind == "gated_deltanet":
            p.update(a_proj=w(self.a_proj), A_log=self.A_log[...], dt_bias=self.dt_bias[...])
        return p

    def init_state(self, batch_size: int, max_len: int | None = None) -> LinearMemoryState:
        K1 = (self.conv_size or 1) - 1
        H, dk, dv = self.n_heads, self.dk, self.dv
        z = lambda c: jnp.zeros((batch_size, K1, c), jnp.float32)  # noqa: E731
        return LinearMemoryState(
            conv_q=z(H * dk), conv_k=z(H * dk), conv_v=z(H * dv),
            memory=jnp.zeros((batch_size, H, dk, dv + (1 if self.normalize else 0)), jnp.float32),
            pos=jnp.zeros((batch_size,), jnp.int32))

    def __call__(self, x: Array, state: LinearMemoryState | None = None, *, mask=None,
                 segment_ids=None, context=None, deterministic: bool = True, key=None):
        B, T, _ = x.shape
        state = self.init_state(B) if state is None else state
        real, starts, next_pos = call_flags(state.pos, mask, segment_ids, B, T)
        y, new = linear_memory_mixer(self.arrays(), x, state, real, starts, kind=self.kind,
                                     n_heads=self.n_heads, feature_map_name=self.feature_map,
                                     normalize=self.normalize, norm_eps=self.norm_eps,
                                     resets=segment_ids is not None, impl=self.impl,
                                     block=self.block)
        return y, new.replace(pos=next_pos), {}
