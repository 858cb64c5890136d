"""The Miras memories (specs/miras.md §2.5): Moneta, Yaad and Memora are the shared neural-memory
layer (`layers.memory.NeuralMemory`) with an attentional bias (output signal, miras.md §2.3) and a
retention (a link of the carried accumulator, §2.4–2.5) plugged in, gates in ATLAS/Miras letters
(retention α_t = sigmoid(·), η_t = lr_max·sigmoid(·), per head).

* MonetaMemory: ℓp attentional bias (p = 3, the smooth surrogate p·tanh(a e)⊙(e² + ε)^{(p−1)/2}
  by default, the exact signal as an option) + ℓq retention: the carried state is the
  accumulator A (A_t = α_t A_{t−1} − η_t ∇_W ℓ(W)), the memory uses W = A/‖A‖_q^{q−2} (q = 4,
  entry-wise q-norm per weight matrix and head, Eq. 24); A₀ = W̃₀/‖W̃₀‖_q.
* YaadMemory: Huber bias, coordinate-wise ψ = clip(e, −δ_t, δ_t) with channel-wise δ_t from a
  low-rank gate softplus(b + tanh(x A) B) + floor (B zero-initialised), or the norm-test flavour
  (a per-head δ_t); retention W_t = α_t W_{t−1} − η_t ∇ℓ.
* MemoraMemory: ℓ2 bias + KL retention in the exact logit form: the carried state is the logits
  Z (Z_t = α_t Z_{t−1} − η_t ∇_W ℓ(W_{t−1})), the memory uses W = c·Softmax over the input axis
  of each matrix (every output unit's incoming weights sum to c), c learnable per matrix and
  head, initialised to sqrt(d_in).

Conventions: row layout `z = x W`, `W ∈ R^{d_in×d_out}`, matrices are the last two axes; y is the
memory output, v the target, e = y − v. Safe norms give finite gradients at exact zeros (a pair
the memory already fits, inert padding): never `jnp.linalg.norm` on a possibly-zero input (its
gradient at 0 is NaN).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import param
from layers.memory import NeuralMemory, NeuralMemoryConfig, memory_shapes
from layers.memory_counts import memory_weight_count, neural_memory_flops, neural_memory_param_count

Array = jax.Array

# ----------------------------------------------------------------------------- safe norms


def safe_norm(x: Array, axis=-1, keepdims: bool = False) -> Array:
    """Euclidean norm with a double `where`: exact value, gradient 0 (not NaN) at x = 0."""
    n2 = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    pos = n2 > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, n2, 1.0)), 0.0)


def safe_normalize(x: Array, axis=-1) -> Array:
    """x / ‖x‖ with 0 at x = 0 (finite gradient everywhere)."""
    n2 = jnp.sum(x * x, axis=axis, keepdims=True)
    pos = n2 > 0
    return jnp.where(pos, x * jax.lax.rsqrt(jnp.where(pos, n2, 1.0)), 0.0)


def safe_abs_pow(x: Array, r: float) -> Array:
    """|x|^r with value and gradient 0 at x = 0 for r > 0 (r = 0 gives 1 everywhere)."""
    if r == 0:
        return jnp.ones_like(x)
    nz = x != 0
    return jnp.where(nz, jnp.abs(jnp.where(nz, x, 1.0)) ** r, 0.0)


# ----------------------------------------------------------------------------- attentional biases
#
# Each signal is d loss / d y of its per-token loss (the loss forms are test-only:
# tests/memory_reference.py, where each signal is checked against jax.grad of its loss), except
# where a docstring says "surrogate".


def lp_signal(y: Array, v: Array, p: float) -> Array:
    """Exact ℓp signal p·sign(e)⊙|e|^{p−1} of ‖e‖_p^p (p = 1: sign(e), the value-less memory;
    p = 2: 2e)."""
    e = y - v
    return p * jnp.sign(e) * safe_abs_pow(e, p - 1.0)


def lp_signal_smooth(y: Array, v: Array, p: float, a: float = 10.0, eps: float = 1e-6) -> Array:
    """Moneta's smooth surrogate (miras.md §2.5): p·tanh(a e)⊙(e² + ε)^{(p−1)/2}.

    A surrogate, not the gradient of a closed-form loss: it tends to `lp_signal` as a → ∞ and
    ε → 0 (error O(ε^{1/2}) and O(e^{−a|e|}))."""
    e = y - v
    return p * jnp.tanh(a * e) * (e * e + eps) ** ((p - 1.0) / 2.0)


def huber_signal(y: Array, v: Array, delta) -> Array:
    """clip(e, −δ, δ): coordinate-wise Huber Σ_j H_δ(e_j), δ a scalar or per channel (Yaad)."""
    delta = jnp.asarray(delta, dtype=jnp.result_type(y))
    return jnp.clip(y - v, -delta, delta)


def huber_norm_signal(y: Array, v: Array, delta) -> Array:
    """Huber on the norm, H_δ(‖e‖₂) (flavour 2; δ a scalar per token/head):
    e if ‖e‖ ≤ δ else δ e/‖e‖ (safe at e = 0)."""
    e = y - v
    n = safe_norm(e, keepdims=True)
    delta = jnp.asarray(delta, dtype=jnp.result_type(y))[..., None] if jnp.ndim(delta) else delta
    return jnp.where(n <= delta, e, delta * safe_normalize(e))


def huber_mixture_signal(y: Array, v: Array, delta) -> Array:
    """Yaad's Eq. 26 as printed (flavour 3, the "smooth mixture"; δ a scalar per token/head):
    the ℓ2 gradient e if ‖e‖ ≤ δ, else δ × the ℓ1 gradient, δ·sign(e) (safe at e = 0)."""
    e = y - v
    n = safe_norm(e, keepdims=True)
    delta = jnp.asarray(delta, dtype=jnp.result_type(y))[..., None] if jnp.ndim(delta) else delta
    return jnp.where(n <= delta, e, delta * jnp.sign(e))


@dataclass(frozen=True)
class LpSignal:
    """Moneta's ℓp output signal: smooth surrogate (default) or the exact p·sign(e)|e|^{p−1}."""
    p: float = 3.0
    a: float = 10.0
    eps: float = 1e-6
    exact: bool = False

    def __call__(self, pred, v, extra=None):
        if self.exact:
            return lp_signal(pred, v, self.p)
        return lp_signal_smooth(pred, v, self.p, self.a, self.eps)


HUBER_FLAVOURS = ("coord", "norm", "mixture")


@dataclass(frozen=True)
class HuberSignal:
    """Yaad's Huber signal with the per-token threshold δ_t carried as the extra "delta":
    coord (channel-wise δ, clip), norm (H_δ(‖e‖), per-head δ) or mixture (Eq. 26 as printed:
    e inside ‖e‖ ≤ δ, δ·sign(e) outside, per-head δ)."""
    flavour: str = "coord"      # coord | norm | mixture

    def __call__(self, pred, v, extra):
        if self.flavour == "coord":
            return huber_signal(pred, v, extra["delta"])
        if self.flavour == "norm":
            return huber_norm_signal(pred, v, extra["delta"][0])
        return huber_mixture_signal(pred, v, extra["delta"][0])


# ----------------------------------------------------------------------------- retention links


def matrix_q_norm(A: Array, q: float, eps: float = 1e-12) -> Array:
    """Entry-wise q-norm of each matrix (last two axes), (Σ|A|^q + eps)^{1/q}: the eps makes the
    norm ≥ eps^{1/q} > 0 and its gradient finite at A = 0 (miras.md §2.5 guard)."""
    s = jnp.sum(safe_abs_pow(A, q), axis=(-2, -1), keepdims=True)
    return (s + eps) ** (1.0 / q)


def moneta_link(A: Array, q: float, eps: float = 1e-12) -> Array:
    """Moneta's q-norm retention link (Eq. 24, printed form): W = A / ‖A‖_q^{q−2}; q = 2 gives
    W = A."""
    if q == 2:
        return A
    s = jnp.sum(safe_abs_pow(A, q), axis=(-2, -1), keepdims=True) + eps
    return A * s ** (-(q - 2.0) / q)      # 1 / ‖A‖_q^{q−2}


def moneta_init(W_tilde: Array, q: float, eps: float = 1e-12) -> Array:
    """A₀ = W̃₀ / ‖W̃₀‖_q, so ‖A₀‖_q = 1 and W₀ = A₀ (miras.md §2.5 [choice])."""
    return W_tilde / matrix_q_norm(W_tilde, q, eps)


def memora_weights(Z: Array, scale, axis: int = -2) -> Array:
    """W = c · Softmax_axis(Z): each output unit's incoming weights (the input axis -2 of a row
    layout matrix) form a distribution scaled by c (miras.md §2.5 [choice])."""
    return scale * jax.nn.softmax(Z, axis=axis)


@dataclass(frozen=True)
class QNormLink:
    """Moneta's link W = A/‖A‖_q^{q−2} on every weight matrix of one head."""
    q: float = 4.0

    def __call__(self, outer, A):
        return {k: moneta_link(a, self.q) for k, a in A.items()}


@dataclass(frozen=True)
class SoftmaxLink:
    """Memora's link W = c·Softmax_{input axis}(Z) with c = outer["memora_scale"][name]."""

    def __call__(self, outer, Z):
        return {k: memora_weights(z, outer["memora_scale"][k]) for k, z in Z.items()}


def q_norm_link_flops(cfg: NeuralMemoryConfig, q: float) -> float:
    """FLOPs of one `QNormLink` application to one head's weights, one per arithmetic op (a
    power counted as one): per weight |A| and its q-th power, their sum and the scaling of A
    by ‖A‖_q^{−(q−2)} (4; the power of each matrix's sum is per matrix); q = 2: the identity
    (0). The zero guards (compare, select) are not arithmetic: not counted."""
    return 0.0 if q == 2 else 4.0 * memory_weight_count(cfg)


def softmax_link_flops(cfg: NeuralMemoryConfig) -> float:
    """FLOPs of one `SoftmaxLink` application to one head's weights, one per arithmetic op (an
    exponential counted as one): per weight the softmax over the input axis (the max, the
    subtraction, exp, the sum and the division) and the scale c (6)."""
    return 6.0 * memory_weight_count(cfg)


# ----------------------------------------------------------------------------- the layers


class MonetaMemory(NeuralMemory):
    """Moneta: ℓp bias (p; smooth surrogate with slope a = smooth_a and ε = smooth_eps, or the
    exact signal) + ℓq retention (q; q = 2: plain decay). cfg: the shared layer's config."""

    def __init__(self, cfg: NeuralMemoryConfig, *, p: float = 3.0, q: float = 4.0,
                 smooth_a: float = 10.0, smooth_eps: float = 1e-6, exact_signal: bool = False,
                 rngs: nnx.Rngs):
        if q < 2 or p < 1:
            raise ValueError(f"p={p} must be >= 1 and q={q} >= 2")
        super().__init__(dataclasses.replace(
            cfg, alpha_gate="retain", objective=LpSignal(p, smooth_a, smooth_eps, exact_signal),
            link=QNormLink(q)), rngs=rngs)

    def memory_init(self):
        W0 = super().memory_init()
        q = self.cfg.link.q
        return W0 if q == 2 else {k: moneta_init(w, q) for k, w in W0.items()}

    @staticmethod
    def param_count(cfg: NeuralMemoryConfig, **args) -> int:
        """Parameters of `MonetaMemory(cfg, **args)`: its parts own none."""
        return neural_memory_param_count(cfg)

    @staticmethod
    def flops(cfg: NeuralMemoryConfig, *, q: float = 4.0, **args) -> float:
        """Forward FLOPs per token of `MonetaMemory(cfg, q=..., **args)`: `neural_memory_flops`
        with the q-norm link (`q_norm_link_flops`) at both links per step; the ℓp signal is
        elementwise."""
        return neural_memory_flops(cfg, link=q_norm_link_flops(cfg, q))


class YaadMemory(NeuralMemory):
    """Yaad: Huber bias (huber: "coord", channel-wise δ_t — the spec's reading of Eq. 26; "norm",
    H_δ(‖e‖) with a per-head δ_t; "mixture", Eq. 26 as printed: the ℓ2 gradient inside
    ‖e‖ ≤ δ_t, δ_t × the ℓ1 gradient outside, per-head δ_t) with the
    low-rank threshold gate δ_t = softplus(b + tanh(x A) B) + delta_floor (A [D, gate_rank]
    ~ N(0, init_std), B zero, b = delta_bias). cfg: the shared layer's config."""

    def __init__(self, cfg: NeuralMemoryConfig, *, huber: str = "coord", gate_rank: int = 32,
                 delta_bias: float = 0.5, delta_floor: float = 0.05, rngs: nnx.Rngs):
        if huber not in HUBER_FLAVOURS:
            raise ValueError(f"huber={huber!r} is not one of {HUBER_FLAVOURS}")
        super().__init__(dataclasses.replace(cfg, alpha_gate="retain",
                                             objective=HuberSignal(huber)), rngs=rngs)
        self.delta_floor = delta_floor
        self.delta_per_channel = huber == "coord"
        nd = self.cfg.n_heads * (self.cfg.hd if self.delta_per_channel else 1)
        self.delta_a = param(jax.random.normal(rngs.params(), (cfg.dim, gate_rank)) * cfg.init_std,
                             ("embed", None))
        self.delta_b = param(jnp.zeros((gate_rank, nd), jnp.float32), (None, "heads"))
        self.delta_bias = param(jnp.full((nd,), delta_bias, jnp.float32), ("heads",))

    def gates(self, x):
        out = super().gates(x)                  # log α_t, η_t
        B, T, _ = x.shape
        z = (jnp.tanh(x.astype(jnp.float32) @ self.delta_a[...]) @ self.delta_b[...]
             + self.delta_bias[...])
        delta = jax.nn.softplus(z) + self.delta_floor
        out["extra"] = {"delta": delta.reshape(B, T, self.cfg.n_heads, -1)}
        return out

    def extra_proto(self, batch_size):
        n = self.cfg.hd if self.delta_per_channel else 1
        return {"delta": jnp.zeros((batch_size, 1, self.cfg.n_heads, n), jnp.float32)}

    @staticmethod
    def param_count(cfg: NeuralMemoryConfig, *, huber: str = "coord", gate_rank: int = 32,
                    **args) -> int:
        """Parameters of `YaadMemory(cfg, huber=..., gate_rank=..., **args)`."""
        nd = cfg.n_heads * (cfg.hd if huber == "coord" else 1)
        return neural_memory_param_count(cfg) + cfg.dim * gate_rank + gate_rank * nd + nd

    @staticmethod
    def flops(cfg: NeuralMemoryConfig, *, huber: str = "coord", gate_rank: int = 32,
              **args) -> float:
        """Forward FLOPs per token of `YaadMemory(cfg, huber=..., gate_rank=..., **args)`:
        `neural_memory_flops` plus the low-rank δ gate's products x A [D, r] and tanh(·) B
        [r, H d] ([r, H] for the norm flavour); the Huber signal is elementwise."""
        nd = cfg.n_heads * (cfg.hd if huber == "coord" else 1)
        return neural_memory_flops(cfg, gates=2.0 * cfg.dim * gate_rank + 2.0 * gate_rank * nd)


class MemoraMemory(NeuralMemory):
    """Memora: ℓ2 bias + KL retention (softmax link of the carried logits, scales c per weight
    matrix and head). cfg: the shared layer's config.

    The MLP memory's logits start at std 2 when cfg.memory_init_std is None: a near-uniform
    softmax makes the memory output nearly constant across channels, where its LayerNorm has a
    gain of ~1/sqrt(ε) and float32 rounding is amplified (measured: reference vs chunked 5.5e-5
    at the layer default, 1.2e-6 at std 2; miras.md §6.4)."""

    def __init__(self, cfg: NeuralMemoryConfig, *, rngs: nnx.Rngs):
        std = cfg.memory_init_std
        if std is None and cfg.memory == "mlp":
            std = 2.0
        super().__init__(dataclasses.replace(cfg, alpha_gate="retain", link=SoftmaxLink(),
                                             memory_init_std=std), rngs=rngs)
        H = self.cfg.n_heads
        self.memora_scale = nnx.Dict({
            k: param(jnp.full((H,), float(s[0]) ** 0.5, jnp.float32), ("heads",))
            for k, s in memory_shapes(self.cfg).items()})

    def outer(self):
        return {**super().outer(),
                "memora_scale": {k: v[...] for k, v in self.memora_scale.items()}}

    @staticmethod
    def param_count(cfg: NeuralMemoryConfig) -> int:
        """Parameters of `MemoraMemory(cfg)`: the shared layer's and one scale per matrix."""
        return neural_memory_param_count(cfg) + cfg.n_heads * len(memory_shapes(cfg))

    @staticmethod
    def flops(cfg: NeuralMemoryConfig) -> float:
        """Forward FLOPs per token of `MemoraMemory(cfg)`: `neural_memory_flops` with the
        softmax link (`softmax_link_flops`) at both links per step."""
        return neural_memory_flops(cfg, link=softmax_link_flops(cfg))
