"""Linear State-Space Layer (LSSL, specs/lssl.md): HiPPO matrices (§2.6), the trainable
structured A (§2.7), discretisations (§2.2: GBT / bilinear and ZOH), and the nnx mixer (§3.1).
The discretised SSM itself (the recurrence and the chunked convolution with state passing) is
the `lssl` op of `pallas_kernels/lssl/`.

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
from pallas_kernels.common import upcast
from pallas_kernels.lssl import lssl

Array = jax.Array


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
    p, q, dg, t_diag, t_sub, t_sup = upcast(p, q, dg, t_diag, t_sub, t_sup)
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


def solve_flops(n: int, n_rhs: int, backward: bool = True) -> float:
    """Training FLOPs (forward and backward) of one `solve` of an [n, n] lhs against n_rhs
    right-hand sides, 2 per multiply-add. Not 3 x a forward count: the elimination runs once,
    outside the backward pass. Gauss-Jordan on [lhs | I] is n rank-1 updates of an [n, 2n]
    matrix (4 n^3); the forward does three [n, n] x [n, n_rhs] products (the solution
    lhs^{-1} rhs and the derivative term's lhs^{-1} ((lhs - lhs) x)), the backward one transpose
    product for each (`backward`: whether the solve's inputs receive gradients)."""
    products = (6 if backward else 3) * 2.0 * n * n * n_rhs
    return 4.0 * n ** 3 + products


def lu_solve_flops(n: int, n_rhs: int) -> float:
    """Forward FLOPs of `jnp.linalg.solve`: the LU factorisation (2 n^3 / 3) and the two
    triangular solves per right-hand side (2 n^2)."""
    return 2.0 * n ** 3 / 3 + 2.0 * n * n * n_rhs


def discretize_flops(n: int, n_steps: int, method: str = "bilinear",
                     backward: bool = True) -> float:
    """Training FLOPs of `discretize` (§2.2) for `n_steps` step sizes of an [n, n] A (`backward`:
    whether A or dt receive gradients). bilinear (`gbt`): one `solve_flops` of (I - a dt A)
    against [I + (1-a) dt A | dt B] per step size, n + 1 right-hand sides; dt A and the
    identities are elementwise. zoh, 3 x (1 without `backward`) its forward products: `expm` as
    jax runs it batched over the step sizes (a batched switch / cond evaluates every branch):
    the Pade 3, 5 and 7 numerators (2 + 3 + 4 [n, n] products), their LU solve and all 16
    squarings, then the (expm - I) B product and the LU solve of A against it (not checked
    against XLA: jax's expm squares inside its own loop, which tests/test_flops.py cannot
    unroll, and the cost analysis does not see LAPACK's LU)."""
    if method == "bilinear":
        return n_steps * solve_flops(n, n + 1, backward)
    if method == "zoh":
        forward = ((9 + 16) * 2.0 * n ** 3 + lu_solve_flops(n, n) + 2.0 * n * n
                   + lu_solve_flops(n, 1))
        return (3.0 if backward else 1.0) * n_steps * forward
    raise ValueError(f"discretization must be 'bilinear' or 'zoh', got {method!r}")


@functools.partial(jax.jit, static_argnames=("alpha",))
def gbt(A: Array, Bv: Array, dt: Array, alpha: float = 0.5) -> tuple[Array, Array]:
    """Generalised bilinear transform (§2.2) for every step size dt [H]:
    Abar = (I - α dt A)^{-1} (I + (1-α) dt A), Bbar = dt (I - α dt A)^{-1} B.
    A [N, N], B [N] -> Abar [H, N, N], Bbar [H, N]. α = 0 Euler, 1/2 bilinear, 1 backward Euler."""
    A, Bv, dt = upcast(A, Bv, dt)
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
    A, Bv, dt = upcast(A, Bv, dt)
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


# ----------------------------------------------------------------------------- the layer

@struct.dataclass
class LSSLState:
    x: Array      # [B, H, N] float32
    pos: Array    # [B] int32


@functools.partial(jax.jit, static_argnames=("discretization", "rate", "learn_A", "learn_dt",
                                             "impl", "block"))
def lssl_ssm(p: dict[str, Array], u: Array, s: Array, mask: Array, reset: Array, *,
             discretization: str = "bilinear", rate: float = 1.0, learn_A: bool = True,
             learn_dt: bool = True, impl: str = "auto", block: int = 64) -> tuple[Array, Array]:
    """The SSM part of one LSSL layer (§3.1): (u [B, L, H], state) -> (y [B, L, H, M], state):
    the structured A, its discretisation at dt = exp(log_dt) * rate, and the `lssl` op.
    Jitted as a unit (inlined under an outer jit; one compile instead of many small eager ops)."""
    tp = {k: p[k] for k in ("p", "q", "dg", "t_diag", "t_sub", "t_sup", "b")}
    if not learn_A:
        tp = jax.tree.map(jax.lax.stop_gradient, tp)
    log_dt = p["log_dt"] if learn_dt else jax.lax.stop_gradient(p["log_dt"])
    A = structured_A(tp["p"], tp["q"], tp["dg"], tp["t_diag"], tp["t_sub"], tp["t_sup"])
    dt = jnp.exp(upcast(log_dt)) * rate
    Abar, Bbar = discretize(A, tp["b"], dt, discretization)
    return lssl(u, Abar, Bbar, p["C"], p["D"], h0=s, mask=mask, reset=reset, impl=impl,
                block=block)


def lssl_state_flops(dim: int, d_state: int) -> float:
    """Forward FLOPs per token of the reference recurrence's state update
    x_k = Abar x_{k-1} + Bbar u_k: N + 1 multiply-adds for each of the H N state elements."""
    return 2.0 * dim * d_state * (d_state + 1)


def lssl_mixer_flops(dim: int, d_state: int, channels: int) -> float:
    """Forward FLOPs per token of `LSSLMixer` (§3.1) running the reference recurrence (§4), 2 per
    multiply-add: the state update (`lssl_state_flops`), the read-out C x_k ([N] -> [M] per
    feature) and the output linear [H M, H]. The D skip (a per-channel scale), GELU, dropout and
    the bias are elementwise: not counted. What a call does once is `lssl_call_flops`."""
    H, N, M = dim, d_state, channels
    return lssl_state_flops(H, N) + 2.0 * H * M * N + 2.0 * H * M * H


def lssl_call_flops(dim: int, d_state: int, discretization: str = "bilinear",
                    learn_A: bool = True, learn_dt: bool = True) -> float:
    """Training FLOPs of what one `LSSLMixer` call does once, whatever its batch and length:
    the structured A's (§2.7) T^{-1} = solve(T, I) (`solve_flops`; differentiated when
    `learn_A`) and the discretisation at the H step sizes (`discretize_flops`; differentiated
    when A or dt is learned). The diagonal scalings of `structured_A` are elementwise."""
    N = d_state
    return (solve_flops(N, N, backward=learn_A)
            + discretize_flops(N, dim, discretization, backward=learn_A or learn_dt))


class LSSLMixer(nnx.Module):
    """One LSSL layer (§3.1): SSM per feature -> GELU -> dropout -> Linear(H*M -> H).

    Parameters: the structured transition (p, q, dg, t_diag, t_sub, t_sup) and b, shared by all
    features (trainable when `learn_A`), log_dt [H] (trainable when `learn_dt`), C [H, M, N]
    ~ N(0, 1), D [H, M] ~ N(0, 1), and the output linear (PyTorch default init, with bias).
    Frozen parameters (LSSL-f) stay `nnx.Param`s that receive zero gradient; exclude them from
    weight decay in the optimiser. `impl` and `block` choose the form of the `lssl` op and its
    block size (neither changes the function).
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs, d_state: int = 64, channels: int = 1,
                 measure: str = "legs", legt_scale: float = 0.5, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, discretization: str = "bilinear", rate: float = 1.0,
                 learn_A: bool = True, learn_dt: bool = True, dropout: float = 0.0,
                 impl: str = "auto", block: int = 64):
        H, N, M = dim, d_state, channels
        self.dim, self.d_state, self.channels = H, N, M
        self.discretization, self.rate = discretization, float(rate)
        self.learn_A, self.learn_dt, self.dropout = learn_A, learn_dt, dropout
        self.impl, self.block = impl, block
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
                         block=self.block)
        y = jax.nn.gelu(y, approximate=False)
        y = dropout(y, self.dropout, None if deterministic else key)
        out = self.out(y.reshape(B, T, -1).astype(x.dtype))
        return out, LSSLState(x=xs, pos=next_pos), {}
