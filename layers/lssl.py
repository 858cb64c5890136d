"""Linear State-Space Layer (LSSL, specs/lssl.md): HiPPO matrices, the trainable structured A,
discretisations (GBT / bilinear and ZOH), and the three views of the same linear map
(recurrence, Krylov convolution, associative scan), plus the chunked convolution with state
passing that the layer uses as its fast form, and the nnx mixer.

Convention: x' = A x + B u with A already negative (stable); one SSM per feature h with its own
step dt_h = exp(log_dt_h) * rate, a shared A and B (the reference's `learn=1`), C [H, M, N],
D [H, M]. Recurrence: x_k = Abar x_{k-1} + Bbar u_k, y_k = C x_k + D u_k (the read-out sees the
state after u_k). `rate` is a fixed configuration factor: dt never depends on the call length.
All maths runs in float32 (float64 when given float64 arrays, for tests).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from layers.common import call_flags, dropout, param
from layers.linear import Dense

Array = jax.Array


def _ft(*arrs):
    """Cast to float32 (keeping float64)."""
    out = tuple(a.astype(jnp.promote_types(a.dtype, jnp.float32)) for a in arrs)
    return out if len(out) > 1 else out[0]


# ----------------------------------------------------------------------------- HiPPO

def hippo_legs(N: int) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO-LegS (§2.6): A_nk = -r_n r_k (n > k), -(n+1) (n = k), 0 (n < k); B_n = r_n."""
    r = np.sqrt(2 * np.arange(N) + 1.0)
    n = np.arange(N)
    A = np.where(n[:, None] > n[None, :], -np.outer(r, r), 0.0)
    A = A + np.diag(-(n + 1.0))
    return A, r.copy()


def hippo_legt(N: int, scale: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO-LegT with the reference code's scaling (θ = 1/scale = 2):
    A_nk = -scale r_n r_k (1 if k <= n else (-1)^(n-k)), B_n = scale r_n."""
    r = np.sqrt(2 * np.arange(N) + 1.0)
    n = np.arange(N)
    sign = np.where(n[None, :] <= n[:, None], 1.0, (-1.0) ** (n[:, None] - n[None, :]))
    return -scale * np.outer(r, r) * sign, scale * r


def hippo_lagt(N: int) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO-LagT (default tilt): A_nk = -1 (n > k), -1/2 (n = k), 0 (n < k); B_n = 1."""
    n = np.arange(N)
    A = np.where(n[:, None] > n[None, :], -1.0, 0.0) - 0.5 * np.eye(N)
    return A, np.ones(N)


HIPPO = {"legs": hippo_legs, "legt": hippo_legt, "lagt": hippo_lagt}


# ----------------------------------------------------------------------------- structured A

def structured_init(measure: str, N: int, legt_scale: float = 0.5) -> dict[str, np.ndarray]:
    """Parameters of A = -P (Dg + T^{-1}) Q (§2.7) that reproduce a HiPPO matrix exactly:
    p, q, dg (diagonals, N), t_diag (N), t_sub, t_sup (N-1) of the tridiagonal T, and b (B)."""
    n = np.arange(N, dtype=np.float64)
    r = np.sqrt(2 * n + 1)
    if measure == "legs":
        p = q = r
        dg = -n / (2 * n + 1)
        t_diag, t_sub, t_sup = np.ones(N), -np.ones(N - 1), np.zeros(N - 1)
        b = r
    elif measure == "lagt":
        p = q = np.ones(N)
        dg = -0.5 * np.ones(N)
        t_diag, t_sub, t_sup = np.ones(N), -np.ones(N - 1), np.zeros(N - 1)
        b = np.ones(N)
    elif measure == "legt":
        p = q = np.sqrt(legt_scale) * r
        dg = np.zeros(N)
        main = np.zeros(N)
        main[0] = main[-1] = 1.0
        if N == 1:
            main[0] = 2.0  # M' = [1] for N = 1
        t_diag, t_sub, t_sup = 0.5 * main, -0.5 * np.ones(N - 1), 0.5 * np.ones(N - 1)
        b = legt_scale * r
    else:
        raise ValueError(f"measure must be one of legs, legt, lagt; got {measure!r}")
    return {"p": p, "q": q, "dg": dg, "t_diag": t_diag, "t_sub": t_sub, "t_sup": t_sup, "b": b}


@jax.jit
def structured_A(p: Array, q: Array, dg: Array, t_diag: Array, t_sub: Array,
                 t_sup: Array) -> Array:
    """The dense A = -diag(p) (diag(dg) + T^{-1}) diag(q) (T^{-1} by `solve`, below)."""
    p, q, dg, t_diag, t_sub, t_sup = _ft(p, q, dg, t_diag, t_sub, t_sup)
    T = jnp.diag(t_diag) + jnp.diag(t_sub, -1) + jnp.diag(t_sup, 1)
    Tinv = solve(T, jnp.eye(T.shape[0], dtype=T.dtype))
    return -(p[:, None] * (jnp.diag(dg) + Tinv) * q[None, :])


# ----------------------------------------------------------------------------- discretisation

def inverse(M: Array) -> Array:
    """M^{-1} for every matrix (last two axes) by Gauss-Jordan elimination with partial pivoting,
    in plain XLA ops. Used instead of `jnp.linalg.solve` in this module: XLA:CPU's thunk runtime
    of jaxlib 0.10.2 deadlocks when LAPACK solves of two layers may run concurrently (measured:
    a 2-layer bilinear LSSL with d_state >= 32 never finished a step; 1 layer or ZOH did)."""
    N = M.shape[-1]
    rows = jnp.arange(N)
    aug = jnp.concatenate([M, jnp.broadcast_to(jnp.eye(N, dtype=M.dtype), M.shape)], -1)

    def step(k, aug):
        col = jnp.abs(aug[..., :, k])
        piv = jnp.argmax(jnp.where(rows >= k, col, -1.0), axis=-1)[..., None]  # [..., 1]
        idx = jnp.where(rows == k, piv, jnp.where(rows == piv, k, rows))
        aug = jnp.take_along_axis(aug, idx[..., None], axis=-2)
        prow = aug[..., k, :] / aug[..., k, k][..., None]
        aug = aug - aug[..., :, k][..., None] * prow[..., None, :]
        return aug.at[..., k, :].set(prow)

    return jax.lax.fori_loop(0, N, step, aug)[..., N:]


def solve(lhs: Array, rhs: Array) -> Array:
    """lhs^{-1} rhs with exact first derivatives (d lhs^{-1} = -lhs^{-1} d lhs lhs^{-1}) and the
    elimination itself kept out of the backward pass."""
    inv = jax.lax.stop_gradient(inverse(lhs))
    x = inv @ rhs
    return x - inv @ ((lhs - jax.lax.stop_gradient(lhs)) @ jax.lax.stop_gradient(x))


@functools.partial(jax.jit, static_argnames=("alpha",))
def gbt(A: Array, Bv: Array, dt: Array, alpha: float = 0.5) -> tuple[Array, Array]:
    """Generalised bilinear transform (§2.2) for every step size dt [H]:
    Abar = (I - α dt A)^{-1} (I + (1-α) dt A), Bbar = dt (I - α dt A)^{-1} B.
    A [N, N], B [N] -> Abar [H, N, N], Bbar [H, N]. α = 0 Euler, 1/2 bilinear, 1 backward Euler."""
    A, Bv, dt = _ft(A, Bv, dt)
    N = A.shape[0]
    eye = jnp.eye(N, dtype=A.dtype)
    dA = dt[:, None, None] * A
    lhs = eye - alpha * dA
    X = solve(lhs, jnp.concatenate([eye + (1.0 - alpha) * dA, (dt[:, None] * Bv)[..., None]], -1))
    Abar, Bbar = X[..., :N], X[..., N]
    return Abar, Bbar


@jax.jit
def zoh(A: Array, Bv: Array, dt: Array) -> tuple[Array, Array]:
    """Zero-order hold: Abar = exp(dt A), Bbar = A^{-1} (exp(dt A) - I) B (A invertible)."""
    A, Bv, dt = _ft(A, Bv, dt)
    N = A.shape[0]
    Abar = jax.vmap(jax.scipy.linalg.expm)(dt[:, None, None] * A)
    rhs = jnp.einsum("hnm,m->hn", Abar - jnp.eye(N, dtype=A.dtype), Bv)
    Bbar = jnp.linalg.solve(jnp.broadcast_to(A, Abar.shape), rhs[..., None])[..., 0]
    return Abar, Bbar


def discretize(A: Array, Bv: Array, dt: Array, method: str = "bilinear") -> tuple[Array, Array]:
    if method == "bilinear":
        return gbt(A, Bv, dt, 0.5)
    if method == "zoh":
        return zoh(A, Bv, dt)
    raise ValueError(f"discretization must be 'bilinear' or 'zoh', got {method!r}")


# ----------------------------------------------------------------------------- Krylov

@functools.partial(jax.jit, static_argnums=(0,))
def krylov(L: int, Abar: Array, v: Array) -> Array:
    """[v, Abar v, ..., Abar^{L-1} v] by repeated squaring (§2.4): Abar [H, N, N],
    v [..., H, N] -> [..., H, N, L]. Depth O(log L); L need not be a power of two."""
    X = v[..., None]
    P = Abar
    while X.shape[-1] < L:
        X = jnp.concatenate([X, jnp.einsum("hnm,...hml->...hnl", P, X)], axis=-1)[..., :L]
        if X.shape[-1] < L:
            P = P @ P
    return X[..., :L]


@functools.partial(jax.jit, static_argnums=(0,))
def ssm_kernel(L: int, Abar: Array, Bbar: Array, C: Array) -> Array:
    """K_j = C Abar^j Bbar for j < L: [H, M, L]."""
    return jnp.einsum("hmn,hnl->hml", C, krylov(L, Abar, Bbar))


# ----------------------------------------------------------------------------- the three views

@jax.jit
def recurrent_view(u: Array, Abar: Array, Bbar: Array, C: Array, D: Array,
                   s: Array | None = None, mask: Array | None = None,
                   reset: Array | None = None) -> tuple[Array, Array]:
    """View 1, the reference: lax.scan over time. u [B, L, H] -> y [B, L, H, M], x_final [B, H, N].
    `mask` [B, L]: pads leave the state unchanged; `reset` [B, L]: state zeroed before the step."""
    u, Abar, Bbar, C, D = _ft(u, Abar, Bbar, C, D)
    Bsz, L, H = u.shape
    N = Abar.shape[-1]
    s = jnp.zeros((Bsz, H, N), u.dtype) if s is None else _ft(s)
    mask = jnp.ones((Bsz, L), bool) if mask is None else mask
    reset = jnp.zeros((Bsz, L), bool) if reset is None else reset

    def step(x, inp):
        u_t, m_t, r_t = inp
        x_prev = jnp.where(r_t[:, None, None], 0.0, x)
        x_new = jnp.einsum("hnm,bhm->bhn", Abar, x_prev) + Bbar * u_t[..., None]
        x = jnp.where(m_t[:, None, None], x_new, x)
        y = jnp.einsum("hkn,bhn->bhk", C, x_new) + D * u_t[..., None]
        return x, y

    mv = lambda a: jnp.moveaxis(a, 1, 0)
    x, y = jax.lax.scan(step, s, (mv(u), mv(mask), mv(reset)))
    return jnp.moveaxis(y, 0, 1), x


@jax.jit
def conv_view(u: Array, Abar: Array, Bbar: Array, C: Array, D: Array,
              s: Array | None = None) -> tuple[Array, Array]:
    """View 2: y = K * u (FFT of length >= 2L, no wrap-around) + D u + C Abar^{k+1} s, with the
    kernel generated for this call's length; x_final = Abar^L s + sum_j Abar^{L-1-j} Bbar u_j."""
    u, Abar, Bbar, C, D = _ft(u, Abar, Bbar, C, D)
    Bsz, L, H = u.shape
    Kr = krylov(L, Abar, Bbar)                                   # [H, N, L]
    K = jnp.einsum("hmn,hnl->hml", C, Kr)
    n = int(2 ** np.ceil(np.log2(2 * L)))
    yf = jnp.fft.rfft(K, n)[None] * jnp.fft.rfft(jnp.moveaxis(u, 1, 2), n)[:, :, None]
    y = jnp.fft.irfft(yf, n)[..., :L]                            # [B, H, M, L]
    y = jnp.moveaxis(y, -1, 1) + D * u[..., None]
    x = jnp.einsum("hnl,bhl->bhn", Kr[..., ::-1], jnp.moveaxis(u, 1, 2))
    if s is not None:
        Xs = krylov(L + 1, Abar, _ft(s))                         # [B, H, N, L+1]: Abar^k s
        y = y + jnp.moveaxis(jnp.einsum("hmn,bhnl->bhml", C, Xs[..., 1:]), -1, 1)
        x = x + Xs[..., L]
    return y, x


@jax.jit
def scan_view(u: Array, Abar: Array, Bbar: Array, C: Array, D: Array,
              s: Array | None = None) -> tuple[Array, Array]:
    """View 3: an associative scan over (Abar, Bbar u_k) pairs with the operator
    (A_i, b_i) o (A_j, b_j) = (A_j A_i, A_j b_i + b_j) (materialises L copies of Abar)."""
    u, Abar, Bbar, C, D = _ft(u, Abar, Bbar, C, D)
    Bsz, L, H = u.shape
    b = jnp.moveaxis(Bbar * u[..., None], 1, 0)                  # [L, B, H, N]
    if s is not None:
        b = b.at[0].add(jnp.einsum("hnm,bhm->bhn", Abar, _ft(s)))
    As = jnp.broadcast_to(Abar, (L, *Abar.shape))

    def op(a, c):
        Ai, bi = a
        Aj, bj = c
        return Aj @ Ai, jnp.einsum("lhnm,lbhm->lbhn", Aj, bi) + bj

    _, xs = jax.lax.associative_scan(op, (As, b))
    y = jnp.einsum("hkn,lbhn->blhk", C, xs) + D * u[..., None]
    return y, xs[-1]


# ----------------------------------------------------------------------------- chunked conv

@functools.partial(jax.jit, static_argnames=("chunk",))
def chunked_conv(u: Array, Abar: Array, Bbar: Array, C: Array, D: Array, s: Array | None = None,
                 mask: Array | None = None, reset: Array | None = None,
                 chunk: int = 64) -> tuple[Array, Array]:
    """Convolution inside chunks of `chunk` steps plus state passing between them (contract
    note): per chunk, y_k = sum_{j<=k, same document} K_{k-j} u_j + D u_k
    + [no reset in [0, k]] C Abar^{k+1} s, and the state after the chunk's last real token
    x = [no reset] Abar^n s + sum_{j<n, last document} Abar^{n-1-j} Bbar u_j (n real tokens).
    Same result as `recurrent_view` (mask: right padded; reset: document starts)."""
    u, Abar, Bbar, C, D = _ft(u, Abar, Bbar, C, D)
    Bsz, L, H = u.shape
    N = Abar.shape[-1]
    s = jnp.zeros((Bsz, H, N), u.dtype) if s is None else _ft(s)
    mask = jnp.ones((Bsz, L), bool) if mask is None else mask.astype(bool)
    reset = jnp.zeros((Bsz, L), bool) if reset is None else reset.astype(bool) & mask
    Q = max(1, min(chunk, L))
    nc = -(-L // Q)
    pad = nc * Q - L
    padt = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) if pad else a
    chunks = lambda a: jnp.moveaxis(padt(a).reshape(Bsz, nc, Q, *a.shape[2:]), 1, 0)
    Kr = krylov(Q, Abar, Bbar)                                   # [H, N, Q]
    K = jnp.einsum("hmn,hnl->hml", C, Kr)                        # [H, M, Q]
    k_idx = jnp.arange(Q)
    lag = k_idx[:, None] - k_idx[None, :]                        # [Q(k), Q(j)]
    Toe = jnp.where((lag >= 0)[..., None, None],
                    jnp.moveaxis(K[..., jnp.clip(lag, 0, Q - 1)], (-2, -1), (0, 1)), 0.0)  # [Q,Q,H,M]

    @jax.checkpoint
    def body(x, blk):
        uc, mc, rc = blk                                          # [B, Q, H], [B, Q], [B, Q]
        cnt = jnp.cumsum(rc.astype(jnp.int32), axis=1)           # documents started so far
        same = cnt[:, :, None] == cnt[:, None, :]                # [B, Q(k), Q(j)]
        y = jnp.einsum("kjhm,bkj,bjh->bkhm", Toe, same.astype(uc.dtype), uc)
        y = y + D * uc[..., None]
        Xs = krylov(Q + 1, Abar, x)                              # [B, H, N, Q+1]: Abar^k x
        clean = (cnt == 0).astype(uc.dtype)                      # [B, Q]
        y = y + jnp.einsum("hmn,bhnk,bk->bkhm", C, Xs[..., 1:], clean)
        n = mc.sum(axis=1).astype(jnp.int32)                     # real tokens in the chunk
        last = jnp.maximum(n - 1, 0)
        cnt_last = jnp.where(n > 0, jnp.take_along_axis(cnt, last[:, None], 1)[:, 0], 0)
        ok = mc & (cnt == cnt_last[:, None])                     # inputs that reach the end
        col = n[:, None] - 1 - k_idx[None, :]                    # Krylov column per input
        sel = (col[..., None] == k_idx[None, None, :]) & ok[..., None]   # [B, Q(j), Q(l)]
        x_in = jnp.einsum("hnl,bjl,bjh->bhn", Kr, sel.astype(uc.dtype), uc)
        Xn = jnp.take_along_axis(Xs, n[:, None, None, None], axis=-1)[..., 0]
        x_new = jnp.where((cnt_last == 0)[:, None, None], Xn, 0.0) + x_in
        return x_new, y

    x, y = jax.lax.scan(body, s, (chunks(u), chunks(mask), chunks(reset)))
    y = jnp.moveaxis(y, 0, 1).reshape(Bsz, nc * Q, H, -1)[:, :L]
    return y, x


# ----------------------------------------------------------------------------- the layer

@struct.dataclass
class LSSLState:
    x: Array      # [B, H, N] float32
    pos: Array    # [B] int32


@functools.partial(jax.jit, static_argnames=("discretization", "rate", "learn_A", "learn_dt",
                                             "impl", "chunk"))
def lssl_ssm(p: dict[str, Array], u: Array, s: Array, mask: Array, reset: Array, *,
             discretization: str = "bilinear", rate: float = 1.0, learn_A: bool = True,
             learn_dt: bool = True, impl: str = "reference",
             chunk: int = 64) -> tuple[Array, Array]:
    """The SSM part of one LSSL layer: (u [B, L, H], state) -> (y [B, L, H, M], state).
    Jitted as a unit (inlined under an outer jit; one compile instead of many small eager ops)."""
    tp = {k: p[k] for k in ("p", "q", "dg", "t_diag", "t_sub", "t_sup", "b")}
    if not learn_A:
        tp = jax.tree.map(jax.lax.stop_gradient, tp)
    log_dt = p["log_dt"] if learn_dt else jax.lax.stop_gradient(p["log_dt"])
    A = structured_A(tp["p"], tp["q"], tp["dg"], tp["t_diag"], tp["t_sub"], tp["t_sup"])
    dt = jnp.exp(_ft(log_dt)) * rate
    Abar, Bbar = discretize(A, tp["b"], dt, discretization)
    if impl == "reference":
        return recurrent_view(u, Abar, Bbar, p["C"], p["D"], s, mask, reset)
    if impl == "chunked":
        return chunked_conv(u, Abar, Bbar, p["C"], p["D"], s, mask, reset, chunk)
    raise ValueError(f"LSSL impl must be 'reference' or 'chunked', got {impl!r}")


class LSSLMixer(nnx.Module):
    """One LSSL layer (§3.1): SSM per feature -> GELU -> dropout -> Linear(H*M -> H).

    Parameters: the structured transition (p, q, dg, t_diag, t_sub, t_sup) and b, shared by all
    features (trainable when `learn_A`), log_dt [H] (trainable when `learn_dt`), C [H, M, N]
    ~ N(0, 1), D [H, M] ~ N(0, 1), and the output linear (PyTorch default init, with bias).
    Frozen parameters (LSSL-f) stay `nnx.Param`s that receive zero gradient; exclude them from
    weight decay in the optimiser.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs, d_state: int = 64, channels: int = 1,
                 measure: str = "legs", legt_scale: float = 0.5, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, discretization: str = "bilinear", rate: float = 1.0,
                 learn_A: bool = True, learn_dt: bool = True, dropout: float = 0.0,
                 impl: str = "reference", chunk: int = 64):
        H, N, M = dim, d_state, channels
        self.dim, self.d_state, self.channels = H, N, M
        self.discretization, self.rate = discretization, float(rate)
        self.learn_A, self.learn_dt, self.dropout = learn_A, learn_dt, dropout
        self.impl, self.chunk = impl, chunk
        init = structured_init(measure, N, legt_scale)
        for name, value in init.items():
            setattr(self, name, param(jnp.asarray(value, jnp.float32), ("state",)))
        u = jax.random.uniform(rngs.params(), (H,), jnp.float32)
        self.log_dt = param(np.log(dt_min) + u * (np.log(dt_max) - np.log(dt_min)), ("inner",))
        self.C = param(jax.random.normal(rngs.params(), (H, M, N), jnp.float32),
                       ("inner", None, "state"))
        self.D = param(jax.random.normal(rngs.params(), (H, M), jnp.float32), ("inner", None))
        self.out = Dense(H * M, H, rngs=rngs, use_bias=True, axes=("inner", "embed"),
                         init="torch")

    def arrays(self) -> dict[str, Any]:
        names = ("p", "q", "dg", "t_diag", "t_sub", "t_sup", "b", "log_dt", "C", "D")
        return {k: getattr(self, k)[...] for k in names}

    def transition(self) -> tuple[Array, Array]:
        """The current continuous (A, B)."""
        a = self.arrays()
        return structured_A(a["p"], a["q"], a["dg"], a["t_diag"], a["t_sub"], a["t_sup"]), a["b"]

    def init_state(self, batch_size: int, max_len: int | None = None) -> LSSLState:
        return LSSLState(x=jnp.zeros((batch_size, self.dim, self.d_state), jnp.float32),
                         pos=jnp.zeros((batch_size,), jnp.int32))

    def __call__(self, x: Array, state: LSSLState | None = None, *, mask=None, segment_ids=None,
                 context=None, deterministic: bool = True, key=None):
        B, T, _ = x.shape
        state = self.init_state(B) if state is None else state
        m, starts, next_pos = call_flags(state.pos, mask, segment_ids, B, T)
        y, xs = lssl_ssm(self.arrays(), x, state.x, m, starts & m,
                         discretization=self.discretization, rate=self.rate,
                         learn_A=self.learn_A, learn_dt=self.learn_dt, impl=self.impl,
                         chunk=self.chunk)
        y = jax.nn.gelu(y, approximate=False)
        y = dropout(y, self.dropout, None if deterministic else key)
        out = self.out(y.reshape(B, T, -1).astype(x.dtype))
        return out, LSSLState(x=xs, pos=next_pos), {}
