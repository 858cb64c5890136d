"""Test-only reference maths of the memory layers (specs/miras.md, specs/atlas.md): the forms the
library does not run, written to check the library's against them.

* attentional biases (miras.md §2.3): the per-token losses `loss(y, v)` (summed over the last
  axis) beside their closed-form output signals `signal(y, v) = d loss / d y`: `OBJECTIVES`, the
  one table of objectives (its signals are the library's where the library has them);
* retention (miras.md §2.1, §2.4–2.5): ℓ2 decay coefficients of the learning–retaining view,
  Moneta's element-wise link option, Memora's literal softmax step and exact logit step, KL
  simplex coefficients, elastic net (soft threshold), Bregman (logit) mirror step;
* feature maps (atlas.md §2.3): the polynomial map in degree order, the kernel it realises and
  its degree-1 block;
* the Omega rule's window of c tokens with gates γ (atlas.md §2.4, §4.1): banded gate matrices
  and the window sum over a whole sequence;
* ATLAS's exponential feature map φ* through its kernel form (atlas.md §2.7): the DeepTransformer
  / SWDT read (unnormalised or normalised, with optional decay and rates) and Dot (kernelised
  Omega/delta rule: triangular solve for c = 1, token loop for any window);
* `memory_io`: the q, k, v, gates and memory read of one fresh call of a memory layer.

Conventions: ½-loss (titans.md §2.4); ATLAS letters (α retention multiplier, η learning rate,
θ momentum); row layout `z = x W`, `W ∈ R^{d_in×d_out}`; matrices are the last two axes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.atlas import sym_features
from layers.memory import dot_signal, l2_signal
from layers.miras import (
    huber_norm_signal,
    huber_signal,
    lp_signal,
    lp_signal_smooth,
    safe_abs_pow,
    safe_norm,
    safe_normalize,
)

Array = jax.Array

# ----------------------------------------------------------------------------- attentional biases
#
# y: memory output M(k) [..., d]; v: target [..., d]; e = y - v. Each `*_loss` returns the
# per-token loss [...]; its signal is the exact gradient w.r.t. y (checked against jax.grad in
# tests/test_miras.py), except where a docstring says "surrogate".


def l2_loss(y: Array, v: Array) -> Array:
    """½‖y − v‖² (½ convention: the signal is the plain error)."""
    e = y - v
    return 0.5 * jnp.sum(e * e, axis=-1)


def dot_loss(y: Array, v: Array) -> Array:
    """Hebbian bias −⟨y, v⟩ (sign chosen so that a descent step adds v φ(k)ᵀ, atlas.md §2.7)."""
    return -jnp.sum(y * v, axis=-1)


def lp_loss(y: Array, v: Array, p: float) -> Array:
    """‖e‖_p^p = Σ_j |e_j|^p."""
    return jnp.sum(safe_abs_pow(y - v, p), axis=-1)


def huber(a: Array, delta) -> Array:
    """H_δ(a) = a²/2 if |a| ≤ δ else δ|a| − δ²/2 (elementwise)."""
    aa = jnp.abs(a)
    return jnp.where(aa <= delta, 0.5 * a * a, delta * aa - 0.5 * delta * delta)


def huber_loss(y: Array, v: Array, delta) -> Array:
    """Coordinate-wise Huber Σ_j H_δ(e_j); δ a scalar or per channel (Yaad, miras.md §2.5)."""
    return jnp.sum(huber(y - v, delta), axis=-1)


def huber_norm_loss(y: Array, v: Array, delta) -> Array:
    """Huber on the norm, H_δ(‖e‖₂) (flavour 2; δ a scalar per token/head)."""
    return huber(safe_norm(y - v), delta)


def huber_mixture_loss(y: Array, v: Array, delta) -> Array:
    """"Smooth mixture" (flavour 3): ½‖e‖² if ‖e‖ ≤ δ else δ‖e‖₁ (discontinuous at the threshold;
    its gradient away from the threshold is `huber_mixture_signal`)."""
    e = y - v
    n = safe_norm(e)
    return jnp.where(n <= delta, 0.5 * n * n, delta * jnp.sum(jnp.abs(e), axis=-1))


def huber_mixture_signal(y: Array, v: Array, delta) -> Array:
    """e (ℓ2 gradient) if ‖e‖ ≤ δ else δ·sign(e) (δ × ℓ1 gradient)."""
    e = y - v
    n = safe_norm(e, keepdims=True)
    delta = jnp.asarray(delta, dtype=jnp.result_type(y))[..., None] if jnp.ndim(delta) else delta
    return jnp.where(n <= delta, e, delta * jnp.sign(e))


def value_shift_loss(y: Array, v: Array, shift) -> Array:
    """Robust to value shifts ‖δv‖ ≤ Δ: ½‖e‖² + Δ‖e‖ + ½Δ²."""
    n = safe_norm(y - v)
    return 0.5 * n * n + shift * n + 0.5 * shift * shift


def value_shift_signal(y: Array, v: Array, shift) -> Array:
    """e + Δ e/‖e‖ (the subgradient 0 at e = 0)."""
    e = y - v
    shift = jnp.asarray(shift, dtype=jnp.result_type(y))[..., None] if jnp.ndim(shift) else shift
    return e + shift * safe_normalize(e)


@dataclass(frozen=True)
class Objective:
    """An attentional bias: `loss(y, v, **kw)` per token and `signal(y, v, **kw) = dloss/dy`.

    `exact_signal` is False for surrogates (the smooth ℓp signal) whose `loss` is the exact
    objective they approximate."""
    name: str
    loss: Callable[..., Array]
    signal: Callable[..., Array]
    exact_signal: bool = True


OBJECTIVES: dict[str, Objective] = {
    "l2": Objective("l2", l2_loss, l2_signal),
    "dot": Objective("dot", dot_loss, dot_signal),
    "lp": Objective("lp", lp_loss, lp_signal),
    "lp_smooth": Objective("lp_smooth", lp_loss, lp_signal_smooth, exact_signal=False),
    "huber": Objective("huber", huber_loss, huber_signal),
    "huber_norm": Objective("huber_norm", huber_norm_loss, huber_norm_signal),
    "huber_mixture": Objective("huber_mixture", huber_mixture_loss, huber_mixture_signal),
    "value_shift": Objective("value_shift", value_shift_loss, value_shift_signal),
}


# ----------------------------------------------------------------------------- retention


def l2_retention_coefficients(eta, beta):
    """Learning–retaining view with ℓ2 local and global terms (miras.md §2.1 worked instance):
    argmin_W ⟨W − W₀, g⟩ + (1/η)·½‖W − W₀‖² + (1/β)·½‖W‖²  =  λ W₀ − ζ g,
    λ = β/(β + η), ζ = η λ. Returns (λ, ζ)."""
    lam = beta / (beta + eta)
    return lam, eta * lam


def decay_step(W: Array, g: Array, alpha, eta) -> Array:
    """W_t = α W_{t−1} − η g (Yaad / OmegaNet / Titans-without-momentum retention)."""
    return alpha * W - eta * g


def moneta_link_elementwise(A: Array, q: float, eps: float = 1e-12) -> Array:
    """The textbook p-norm link A ⊙ |A|^{q−2} / ‖A‖_q^{q−2} (miras.md §8.1; the layer uses the
    printed form `layers.miras.moneta_link`)."""
    s = jnp.sum(safe_abs_pow(A, q), axis=(-2, -1), keepdims=True) + eps
    return A * safe_abs_pow(A, q - 2.0) * s ** (-(q - 2.0) / q)


def memora_literal_step(W: Array, g: Array, alpha, eta, scale, axis: int = -2) -> Array:
    """Memora's Eq. 27 as printed: W_t = c · Softmax(α log W_{t−1} − η ∇ℓ)."""
    return scale * jax.nn.softmax(alpha * jnp.log(W) - eta * g, axis=axis)


def memora_logit_step(Z: Array, g: Array, alpha, eta) -> Array:
    """The exact logit form of Eq. 27: Z_t = α Z_{t−1} − η ∇_W ℓ(W_{t−1}), W_t = c·Softmax(Z_t)
    (exact for an α constant along the softmax axis)."""
    return alpha * Z - eta * g


def kl_simplex_coefficients(alpha_global, eta_local):
    """KL local + negative-entropy global retention (miras.md §2.4):
    W_t = c · Softmax((1 − λ) log W_{t−1} − η′ ∇ℓ) with λ = (1/α)/(1/α + 1/η), η′ = 1/(1/α + 1/η).
    Returns (1 − λ, η′): the retention multiplier on log W and the effective step."""
    ia, ie = 1.0 / alpha_global, 1.0 / eta_local
    lam = ia / (ia + ie)
    return 1.0 - lam, 1.0 / (ia + ie)


def soft_threshold(z: Array, gamma) -> Array:
    """S_γ(z) = sign(z)·max(0, |z| − γ) (elastic-net retention, miras.md §2.4)."""
    return jnp.sign(z) * jnp.maximum(jnp.abs(z) - gamma, 0.0)


def soft_threshold_smooth(z: Array, gamma) -> Array:
    """Smooth surrogate |z|·arctan(z/γ)/(π/2)."""
    return jnp.abs(z) * jnp.arctan(z / gamma) / (jnp.pi / 2)


def bregman_logit_step(W: Array, g: Array, eta) -> Array:
    """Mirror descent with f′ = logit: W_t = σ(logit(W_{t−1}) − η ∇ℓ), entries in (0, 1)."""
    return jax.nn.sigmoid(jnp.log(W) - jnp.log1p(-W) - eta * g)


# ----------------------------------------------------------------------------- feature maps


@jax.jit
def poly_features(x: Array, a: Array) -> Array:
    """φ(x) = concat_{i=0..p} sqrt(a_i)·sym_i(x), p = len(a) − 1, so that
    φ(q)·φ(k) = Σ_i a_i (q·k)^i (atlas.md Eqs. 4–5; the layer's per-head map puts the degree-1
    block first, `layers.atlas.poly_features_heads`)."""
    p = a.shape[-1] - 1
    sa = jnp.sqrt(a.astype(x.dtype))
    return jnp.concatenate([sa[i] * sym_features(x, i) for i in range(p + 1)], axis=-1)


def poly_kernel(q: Array, k: Array, a: Array) -> Array:
    """Σ_i a_i (q·k)^i (the kernel that `poly_features` realises)."""
    s = jnp.sum(q * k, axis=-1)
    return sum(a[i] * s ** i for i in range(a.shape[-1]))


def poly_residual(phi: Array, d: int, p: int) -> Array:
    """The degree-1 block sqrt(a_1)·x of φ(x): the residual input of an MLP memory whose input is
    φ(x) (atlas.md §2.3 / §8.4 [choice]). Requires p ≥ 1."""
    if p < 1:
        raise ValueError("the residual block needs a degree-1 term (p >= 1)")
    return phi[..., 1:1 + d]


# ----------------------------------------------------------------------------- Omega window


def omega_band(gamma: Array) -> Array:
    """Banded gate matrix of one chunk from the paper-literal gates (atlas.md §4.1).

    gamma: [..., n, c], gamma[t, j] = γ_{t−j}^{(t)} (the c gates that target token t emits, one
    per window offset). Returns Γ [..., n, n + c − 1] with Γ[t, i + c − 1] = γ_i^{(t)} for
    0 ≤ t − i < c (source i counted from the chunk start; i < 0 are the c − 1 pre-chunk tokens)
    and 0 elsewhere."""
    n, c = gamma.shape[-2:]
    t = np.arange(n)[:, None]
    j = np.arange(c)[None, :]
    col = t - j + c - 1                                   # [n, c]
    onehot = jnp.asarray(col[..., None] == np.arange(n + c - 1), gamma.dtype)  # [n, c, n+c-1]
    return jnp.einsum("...tj,tjs->...ts", gamma, onehot)


def keep_gate_band(g: Array, n: int, c: int) -> Array:
    """Banded Γ from per-source keep gates (atlas.md §8.1 alternative, γ_i^{(t)} = g_i).

    g: [..., n + c − 1] gates of the sources (pre-chunk tokens first). Returns [..., n, n+c−1]."""
    t = np.arange(n)[:, None]
    src = np.arange(n + c - 1)[None, :] - (c - 1)
    band = jnp.asarray((t - src >= 0) & (t - src < c), g.dtype)
    return band * g[..., None, :]


def omega_window_sum(u: Array, gamma: Array, valid: Array | None = None) -> Array:
    """U_t = Σ_{j=0}^{c−1} γ^{(t)}[j] · u_{t−j} over a whole sequence (terms with t − j < 0 or
    an invalid source are absent).

    u: [T, ...] per-token source gradients (time leading); gamma: [T, c]; valid: [T] or None."""
    T, c = gamma.shape
    if valid is not None:
        u = u * valid.reshape((T,) + (1,) * (u.ndim - 1)).astype(u.dtype)
    up = jnp.concatenate([jnp.zeros((c - 1,) + u.shape[1:], u.dtype), u], axis=0)
    G = omega_band(gamma)                                   # [T, T + c − 1]
    return jnp.tensordot(G, up, axes=(1, 0))


# ----------------------------------------------------------------------------- exponential map φ*
#
# φ*(x) = [1, x, x^{⊗2}/√2!, …] is infinite-dimensional, so it is only ever used through its
# kernel κ(q, k) = φ*(q)·φ*(k) = exp(s·q·k). Single head, time axis -2: q, k [..., T, d],
# v [..., T, d_v]; gates [..., T].


def exp_kernel(q: Array, k: Array, scale: float) -> Array:
    """κ(q_t, k_i) = exp(s·q_t·k_i) for all pairs: [..., Tq, Tk]."""
    return jnp.exp(scale * jnp.einsum("...td,...sd->...ts", q, k))


def _decay_log_weights(T: int, log_alpha: Array | None, eta: Array | None, window: int | None,
                       dtype) -> tuple[Array, Array]:
    """log of the per-pair write weight Π_{j=i+1..t} α_j · η_i and the visibility mask."""
    t = np.arange(T)[:, None]
    i = np.arange(T)[None, :]
    vis = i <= t
    if window is not None:
        vis = vis & (t - i <= window)
    lw = jnp.zeros((T, T), dtype)
    if log_alpha is not None:
        la = jnp.cumsum(log_alpha, axis=-1)
        diff = la[..., :, None] - la[..., None, :]
        lw = lw + jnp.where(vis, diff, 0.0)
    if eta is not None:
        lw = lw + jnp.log(eta)[..., None, :]
    return lw, jnp.asarray(vis)


def deep_transformer_read(q: Array, k: Array, v: Array, *, scale: float,
                          log_alpha: Array | None = None, eta: Array | None = None,
                          window: int | None = None, normalize: bool = False) -> Array:
    """DeepTransformer / SWDT with a linear memory on φ* (atlas.md §2.7, Eqs. 25–26):
    M_t = α_t M_{t−1} + η_t v_t φ*(k_t)ᵀ, M_0 = 0, read y_t = M_t φ*(q_t)
        = Σ_{i≤t} (Π_{j=i+1..t} α_j) η_i exp(s q_t·k_i) v_i.
    `window` W keeps keys with t − i ≤ W (SWDT with a window of c tokens: W = c − 1).
    `normalize` divides by the same sum without v: α ≡ 1, η ≡ 1 is causal softmax attention."""
    T = q.shape[-2]
    lw, vis = _decay_log_weights(T, log_alpha, eta, window, q.dtype)
    s = scale * jnp.einsum("...td,...sd->...ts", q, k) + lw
    if normalize:
        s = jnp.where(vis, s, -jnp.inf)
        m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
        p = jnp.where(vis, jnp.exp(s - m), 0.0)
        return jnp.einsum("...ts,...sd->...td", p, v) / jnp.sum(p, axis=-1, keepdims=True)
    p = jnp.where(vis, jnp.exp(jnp.where(vis, s, 0.0)), 0.0)
    return jnp.einsum("...ts,...sd->...td", p, v)


def dot_solve(q: Array, k: Array, v: Array, eta: Array, *, scale: float,
              kernel: str = "exp") -> Array:
    """Dot with a linear memory, c = 1, γ ≡ 1, α ≡ 1, M_0 = 0 (atlas.md Eqs. 30–31): the
    kernelised delta rule in closed form,
        U = (I + diag(η)·strict_tril(K_κ))^{−1} diag(η) V,   Y = tril(Q_κ) U,
    one unit-lower-triangular solve. kernel "exp": κ = exp(s a·b); "linear": κ = a·b (φ = id,
    DeltaNet)."""
    kap = _kernel(kernel, scale)
    T = q.shape[-2]
    strict = np.tril(np.ones((T, T), bool), -1)
    Kk = jnp.where(strict, kap(k, k), 0.0)
    Lmat = jnp.eye(T, dtype=q.dtype) + eta[..., :, None] * Kk
    U = jax.scipy.linalg.solve_triangular(Lmat, eta[..., :, None] * v, lower=True,
                                          unit_diagonal=True)
    Qk = jnp.where(np.tril(np.ones((T, T), bool)), kap(q, k), 0.0)
    return Qk @ U


def _kernel(kind: str, scale: float) -> Callable[[Array, Array], Array]:
    if kind == "exp":
        return lambda a, b: exp_kernel(a, b, scale)
    if kind == "linear":
        return lambda a, b: jnp.einsum("...td,...sd->...ts", a, b)
    raise ValueError(f"kernel must be 'exp' or 'linear', got {kind!r}")


def dot_token_loop(q: Array, k: Array, v: Array, eta: Array, gamma: Array, *, scale: float,
                   alpha: Array | None = None, kernel: str = "exp") -> Array:
    """Reference token loop of Dot (Omega rule, ℓ2 bias, window c, gates γ) on φ* (atlas.md
    §2.7): the memory is M_t = Σ_i ρ_{t,i} φ*(k_i)ᵀ; at step s every source i of the window
    (s − c + 1 ≤ i ≤ s, i ≥ 0) adds η_s γ_i^{(s)} (v_i − M_{s−1} φ*(k_i)), all errors taken at
    M_{s−1}; then y_s = M_s φ*(q_s). With `alpha` the old coefficients are scaled by α_s first
    (M_s = α_s M_{s−1} − η_s U_s, gradient at the undecayed M_{s−1}).

    q, k [T, d]; v [T, d_v]; eta [T]; gamma [T, c] (gamma[s, j] = γ_{s−j}^{(s)}); single head."""
    kap = _kernel(kernel, scale)
    T, c = gamma.shape
    Kkk = kap(k, k)                       # [T, T]  κ(k_a, k_b)
    Kqk = kap(q, k)                       # [T, T]  κ(q_s, k_j)
    idx = jnp.arange(T)

    def step(rho, s):
        err = v - Kkk @ rho               # [T, d_v]: v_i − M_{s−1} φ*(k_i) for every i
        off = s - idx                     # window offset of source i
        inwin = (off >= 0) & (off < c)
        g = jnp.where(inwin, gamma[s, jnp.clip(off, 0, c - 1)], 0.0)
        a = 1.0 if alpha is None else alpha[s]
        rho = a * rho + (eta[s] * g)[:, None] * err
        return rho, Kqk[s] @ rho

    _, ys = jax.lax.scan(step, jnp.zeros_like(v), idx)
    return ys


# ----------------------------------------------------------------------------- layer probe


@nnx.jit
def memory_io(layer, x):
    """q, k (features), v, gates, the memory read y [B, T, H, d] and the memory state after one
    fresh call of a neural-memory layer on x [B, T, D] (no padding, no document starts)."""
    Bx, Tx, _ = x.shape
    st = layer.init_state(Bx)
    real = jnp.ones((Bx, Tx), bool)
    starts = jnp.zeros((Bx, Tx), bool)
    pos = jnp.broadcast_to(jnp.arange(Tx, dtype=jnp.int32), (Bx, Tx))
    q, k, v, _ = layer.qkv(x, st.conv, real, starts)
    g = layer.gates(x)
    y, mem = layer.memory(q, k, v, g, st.mem, pos, starts, real, has_resets=False)
    return q, k, v, g, y, mem
