"""The ATLAS memory (specs/atlas.md): Atlas and OmegaNet are the shared neural-memory layer
(`layers.memory.NeuralMemory`) with ATLAS's parts plugged in.

* Gates in ATLAS letters (§2.4–2.6): α retention = sigmoid(·), η learning rate = lr_max·sigmoid(·),
  θ momentum = sigmoid(·), per-head scalars from linear maps of x_t (the shared layer's w_alpha,
  w_theta and w_eta carry the α, η and θ logits); the learning rate acts outside the momentum
  (Eqs. 32–33: S_t = θ_t S_{t−1} + U_t, W_t = α_t W_{t−1} − η_t·T(S_t)).
* Omega rule (§2.4, §4.1): U_t sums the gradients of the last c tokens, source t − j weighted by
  γ^{(t)}[j] = sigmoid(x_t W_γ + b_γ) (paper-literal: c gates per step; c = 1 uses γ ≡ 1), or
  the per-token keep gate of §8.1 (γ_i^{(t)} = g_i), carried for past tokens as the per-token
  extra "keep" that scales the source's output signal (its gradient is linear in the signal).
* Newton–Schulz / Muon (§2.6, §6.3): Atlas's update transform T = NS_k on every weight matrix of
  the momentum (k = 0: identity, the "w/o Muon" ablation).
* Polynomial features (§2.3): the exact symmetric map of degree ≤ p on the ℓ2-normalised per-head
  q, k (no down-projection), learnable coefficients a_i = softplus(ρ_i) ≥ 0 initialised to 1/i!,
  with the degree-1 block first so that the MLP memory's residual (the first d_v inputs) is the
  degree-1 block √a₁·x (§8.4).
The chunk b and window c are part of the model (§7 contract notes).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.common import param
from layers.linear import Dense
from layers.memory import NeuralMemory, NeuralMemoryConfig, memory_shapes, signal_of
from layers.memory_counts import neural_memory_flops, neural_memory_param_count

Array = jax.Array

# ----------------------------------------------------------------------------- Newton–Schulz

MUON_COEFFS = (3.4445, -4.7750, 2.0315)


@functools.partial(jax.jit, static_argnames=("steps", "eps", "coeffs"))
def newton_schulz(X: Array, steps: int = 5, eps: float = 1e-7,
                  coeffs: tuple[float, float, float] = MUON_COEFFS) -> Array:
    """Quintic Newton–Schulz orthogonalisation of every matrix (last two axes) of X (§2.6).

    X ← X·rsqrt(ΣX² + ε²) (Frobenius normalisation whose gradient is finite at X = 0; NS(0) = 0),
    transpose tall matrices, then `steps` times A = X Xᵀ, X ← a X + (b A + c A²) X. Computed in
    float32 at least. Odd (NS(−X) = −NS(X)) and scale-invariant up to ε."""
    a, b, c = coeffs
    dt = jnp.promote_types(X.dtype, jnp.float32)
    x = X.astype(dt)
    m, n = x.shape[-2:]
    tall = m > n
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    x = x * jax.lax.rsqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True) + eps * eps)
    for _ in range(steps):
        A = x @ jnp.swapaxes(x, -1, -2)
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    return x.astype(X.dtype)


def newton_schulz_flops(m: int, n: int, steps: int = 5) -> float:
    """Forward FLOPs of `newton_schulz` on one [m, n] matrix (2 per multiply-add): with
    a = min(m, n), b = max(m, n), each step's three products A = X Xᵀ (2a²b), A·A (2a³) and
    B·X (2a²b). The Frobenius normalisation and the steps' linear combinations are elementwise:
    not counted."""
    a, b = min(m, n), max(m, n)
    return steps * (4.0 * a * a * b + 2.0 * a ** 3)


@dataclass(frozen=True)
class NewtonSchulz:
    """Update transform of Atlas: NS_k on every weight matrix of the momentum (one head)."""
    steps: int = 5

    def __call__(self, S):
        return jax.tree.map(lambda s: newton_schulz(s, steps=self.steps), S)


# ----------------------------------------------------------------------------- polynomial features


def _sym_index(d: int, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Index tuples of the degree-i monomials of d variables (squares first for i = 2, as in
    §2.3) and their weights sqrt(i!/Π m_j!) so that sym_i(x)·sym_i(y) = (x·y)^i."""
    combos = sorted(itertools.combinations_with_replacement(range(d), i),
                    key=lambda c: (len(set(c)), c))
    w = []
    for cmb in combos:
        mult = np.bincount(np.asarray(cmb, int), minlength=d) if i else np.zeros(d, int)
        w.append(math.sqrt(math.factorial(i) / np.prod([math.factorial(m) for m in mult])))
    return np.asarray(combos, np.int32).reshape(len(combos), i), np.asarray(w)


def sym_features(x: Array, i: int) -> Array:
    """sym_i(x) [..., C(d+i−1, i)] with sym_i(x)·sym_i(y) = (x·y)^i."""
    d = x.shape[-1]
    if i == 0:
        return jnp.ones(x.shape[:-1] + (1,), x.dtype)
    if i == 1:
        return x
    idx, w = _sym_index(d, i)
    mon = jnp.prod(x[..., idx], axis=-1)           # [..., n_i]
    return mon * jnp.asarray(w, x.dtype)


def poly_feature_dim(d: int, p: int) -> int:
    """D_φ = Σ_{i=0}^{p} C(d + i − 1, i) (1 + d + d(d+1)/2 for p = 2)."""
    return sum(math.comb(d + i - 1, i) for i in range(p + 1))


def poly_features_flops(d: int, p: int) -> float:
    """Forward FLOPs of `poly_features_heads` on one head's vector: each degree-i block
    (C(d+i−1, i) features) is scaled by √a_i (1 per feature) and, for i ≥ 2, each monomial is
    a product of i coordinates (i − 1) times its weight (1)."""
    return sum(math.comb(d + i - 1, i) * (1 + (i if i >= 2 else 0)) for i in range(p + 1))


def poly_coeffs_init(p: int) -> np.ndarray:
    """ρ with softplus(ρ_i) = 1/i! (a_i at init: the order-p Taylor expansion of exp)."""
    a = np.asarray([1.0 / math.factorial(i) for i in range(p + 1)])
    return np.log(np.expm1(a))


def poly_coeffs(rho: Array) -> Array:
    """a_i = softplus(ρ_i) ≥ 0 (so that φ is real)."""
    return jax.nn.softplus(rho)


def poly_features_heads(x: Array, a: Array) -> Array:
    """Per-head polynomial map, degree-1 block first: [√a₁ x, √a₀, √a₂ sym₂(x), …].
    x [..., H, d]; a [H, p+1]. φ(q)·φ(k) = Σ_i a_i (q·k)^i per head (order is immaterial)."""
    p = a.shape[-1] - 1
    sa = jnp.sqrt(a)
    order = [1, 0] + list(range(2, p + 1)) if p >= 1 else [0]
    return jnp.concatenate([sym_features(x, i) * sa[:, i:i + 1] for i in order], axis=-1)


# ----------------------------------------------------------------------------- keep gates


@dataclass(frozen=True)
class KeepGated:
    """Per-token keep gate γ_i^{(t)} = g_i (§8.1): scales the output signal of source i
    (its gradient is linear in the signal), g travelling as the per-token extra "keep"."""
    base: Callable

    def __call__(self, pred, v, extra):
        return self.base(pred, v, extra) * extra["keep"]


# ----------------------------------------------------------------------------- the layer


def atlas_memory_config(cfg: NeuralMemoryConfig, *, ns_steps: int, poly_degree: int | None,
                        window_gates: str) -> NeuralMemoryConfig:
    """`cfg` with ATLAS's parts plugged in: gates in ATLAS letters (retention α), the learning
    rate outside the momentum, Newton–Schulz on the momentum (with momentum and ns_steps > 0), the
    polynomial features' dimension (poly_degree None: identity features) and, for keep gates, the
    keep-gated output signal."""
    if window_gates not in ("window", "keep"):
        raise ValueError(f"window_gates={window_gates!r} is not one of ('window', 'keep')")
    if poly_degree is not None and poly_degree < 1:
        raise ValueError(f"poly_degree={poly_degree} must be >= 1 (None: identity features)")
    return dataclasses.replace(
        cfg, alpha_gate="retain", lr_inside=False,
        feature_dim=cfg.hd if poly_degree is None else poly_feature_dim(cfg.hd, poly_degree),
        transform=NewtonSchulz(ns_steps) if cfg.momentum and ns_steps > 0 else cfg.transform,
        objective=KeepGated(signal_of(cfg)) if window_gates == "keep" else cfg.objective)


class AtlasMemory(NeuralMemory):
    """Atlas / OmegaNet mixer: the shared NeuralMemory with ATLAS gates, the Omega window, the
    polynomial feature map and (Atlas: cfg.momentum) Newton–Schulz on the momentum.

    cfg: the shared layer's config (window c, chunk b, momentum; its alpha/theta/eta biases are
    the α, η, θ logits' biases); ns_steps: k of NS_k (0: identity); poly_degree: p (None: identity
    features); window_gates: "window" (c gates per step) or "keep" (per-token keep gate);
    gamma_bias: the γ logits' bias."""

    def __init__(self, cfg: NeuralMemoryConfig, *, ns_steps: int = 5,
                 poly_degree: int | None = 2, window_gates: str = "window",
                 gamma_bias: float = 2.2, rngs: nnx.Rngs):
        super().__init__(atlas_memory_config(cfg, ns_steps=ns_steps, poly_degree=poly_degree,
                                             window_gates=window_gates), rngs=rngs)
        self.keep_gates = window_gates == "keep"
        H, c = self.cfg.n_heads, self.cfg.window
        w_gamma = poly_rho = None
        if c > 1 or self.keep_gates:
            n = H if self.keep_gates else H * c
            w_gamma = Dense(self.cfg.dim, n, rngs=rngs, use_bias=True, axes=("embed", "heads"),
                            std=self.cfg.init_std)
            w_gamma.bias[...] = jnp.full((n,), gamma_bias)
        if poly_degree is not None:
            rho0 = jnp.asarray(poly_coeffs_init(poly_degree), jnp.float32)
            poly_rho = param(jnp.broadcast_to(rho0, (H, poly_degree + 1)), ("heads", None))
        self.w_gamma = nnx.data(w_gamma)
        self.poly_rho = nnx.data(poly_rho)

    def features(self, q, k):
        if self.poly_rho is None:
            return q, k
        a = poly_coeffs(self.poly_rho[...])
        return poly_features_heads(q, a), poly_features_heads(k, a)

    def gates(self, x):
        out = super().gates(x)                  # log α_t, η_t, log θ_t
        if self.w_gamma is not None:
            B, T, _ = x.shape
            H, c = self.cfg.n_heads, self.cfg.window
            g = jax.nn.sigmoid(self.w_gamma(x).astype(jnp.float32))
            if self.keep_gates:
                out["extra"] = {"keep": g.reshape(B, T, H, 1)}
                out["gamma"] = jnp.ones((B, T, H, c), jnp.float32)
            else:
                out["gamma"] = g.reshape(B, T, H, c)                      # γ^{(t)}[j]
        return out

    def extra_proto(self, batch_size):
        if self.keep_gates:
            return {"keep": jnp.zeros((batch_size, 1, self.cfg.n_heads, 1), jnp.float32)}
        return None

    @staticmethod
    def param_count(cfg: NeuralMemoryConfig, *, ns_steps: int = 5, poly_degree: int | None = 2,
                    window_gates: str = "window", gamma_bias: float = 2.2) -> int:
        """Parameters of `AtlasMemory(cfg, ...)` with the same arguments."""
        del gamma_bias
        mc = atlas_memory_config(cfg, ns_steps=ns_steps, poly_degree=poly_degree,
                                 window_gates=window_gates)
        n = neural_memory_param_count(mc)
        if mc.window > 1 or window_gates == "keep":
            g = mc.n_heads * (1 if window_gates == "keep" else mc.window)
            n += mc.dim * g + g
        if poly_degree is not None:
            n += mc.n_heads * (poly_degree + 1)
        return n

    @staticmethod
    def flops(cfg: NeuralMemoryConfig, *, ns_steps: int = 5, poly_degree: int | None = 2,
              window_gates: str = "window", gamma_bias: float = 2.2) -> float:
        """Forward FLOPs per token of `AtlasMemory(cfg, ...)` (`neural_memory_flops` with
        ATLAS's parts): the Omega window's c sources per token (through `cfg.window`; with the
        polynomial features every memory layer reading the keys is D_φ wide), Newton–Schulz on
        every weight matrix of the momentum (Atlas: momentum and ns_steps > 0;
        `newton_schulz_flops` per head), the polynomial map on q and k (`poly_features_flops`
        per head and vector) and the γ gate projection [D, H c] ([D, H] for keep gates)."""
        del gamma_bias
        mc = atlas_memory_config(cfg, ns_steps=ns_steps, poly_degree=poly_degree,
                                 window_gates=window_gates)
        transform = 0.0
        if mc.momentum and ns_steps > 0:
            transform = sum(newton_schulz_flops(m, n, ns_steps)
                            for m, n in memory_shapes(mc).values())
        features = 0.0 if poly_degree is None else (
            2 * mc.n_heads * poly_features_flops(mc.hd, poly_degree))
        gates = 0.0
        if mc.window > 1 or window_gates == "keep":
            gates = 2.0 * mc.dim * mc.n_heads * (1 if window_gates == "keep" else mc.window)
        return neural_memory_flops(mc, transform=transform, features=features, gates=gates)
