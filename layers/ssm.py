"""Selective state-space mixers: Mamba-1 (specs/mamba.md §2-5) and Mamba-2 / SSD (§9).

Level 1 (maths) is `mamba_mixer` / `mamba2_mixer`: pure functions of explicit parameter arrays,
the input, and the recurrent state, calling the `selective_scan` / `ssd` ops of
`pallas_kernels`. Level 3 is `MambaMixer` / `Mamba2Mixer`: thin nnx modules owning the
parameters (with logical axis names) and following the mixer contract
`(x, state, *, mask, segment_ids, ...) -> (y, new_state, aux)`.

State (`SSMState`): the last K-1 real pre-conv inputs of the causal conv, the SSM state in
float32, and the position of the next token. Right padding (`mask`): pads get dt = 0 (decay 1,
no input), so the returned state is the one after the last real token; the conv state is taken
from the last real inputs. Document starts (`segment_ids`): the SSM decay is 0 at a document's
first token and the conv window restarts (the shared conv's `starts`).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.common import call_flags, param, uniform
from layers.conv import CausalConv1d, causal_conv1d
from layers.linear import Dense
from layers.norms import GatedRMSNorm, gated_rms_norm
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.ssd import ssd

Array = jax.Array


@struct.dataclass
class SSMState:
    conv: Array   # [B, K-1, C] last K-1 real pre-conv inputs (oldest first)
    ssm: Array    # float32: Mamba-1 [B, Di, N]; Mamba-2 [B, H, P, N]
    pos: Array    # [B] int32 position of the next token (in its document)


# ----------------------------------------------------------------------------- initialisation

def inv_softplus(y: Array) -> Array:
    """softplus^{-1}(y) = y + log(-expm1(-y)) (the numerically stable form of the reference)."""
    return y + jnp.log(-jnp.expm1(-y))


def dt_bias_init(key: Array, n: int, dt_min: float, dt_max: float, floor: float) -> Array:
    """b such that softplus(b) = dt0, dt0 log-uniform in [dt_min, dt_max], clamped >= floor."""
    u = jax.random.uniform(key, (n,), jnp.float32)
    dt0 = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return inv_softplus(jnp.maximum(dt0, floor))


def _torch_linear(dim_in: int, dim_out: int, rngs: nnx.Rngs, axes, scale: float = 1.0,
                  use_bias: bool = False) -> Dense:
    """PyTorch's Linear default U(+-1/sqrt(fan_in)), optionally rescaled (out_proj)."""
    lin = Dense(dim_in, dim_out, rngs=rngs, axes=axes, init="zeros", use_bias=use_bias)
    lin.weight[...] = uniform(rngs.params(), (dim_in, dim_out), scale / dim_in ** 0.5)
    if use_bias:
        lin.bias[...] = uniform(rngs.params(), (dim_out,), 1.0 / dim_in ** 0.5)
    return lin


# ----------------------------------------------------------------------------- the mixer contract

class SelectiveSSMMixer(nnx.Module):
    """The mixer contract shared by `MambaMixer` and `Mamba2Mixer`: the state is the causal conv
    history, a float32 SSM state of `ssm_shape` and the next position; a call derives the real
    and document-start flags (`call_flags`) and runs the subclass's `mix` (its level-1 maths)."""

    def mix(self, x: Array, state: SSMState, mask: Array, starts: Array) -> tuple[Array, SSMState]:
        raise NotImplementedError

    def init_state(self, batch_size: int, max_len: int | None = None) -> SSMState:
        return SSMState(conv=self.conv.init_state(batch_size),
                        ssm=jnp.zeros((batch_size, *self.ssm_shape), jnp.float32),
                        pos=jnp.zeros((batch_size,), jnp.int32))

    def __call__(self, x: Array, state: SSMState | None = None, *, mask=None, segment_ids=None,
                 context=None, deterministic: bool = True, key=None):
        B, T, _ = x.shape
        state = self.init_state(B) if state is None else state
        m, starts, next_pos = call_flags(state.pos, mask, segment_ids, B, T)
        y, new = self.mix(x, state, m, starts)
        return y, new.replace(pos=next_pos), {}


# ----------------------------------------------------------------------------- Mamba-1 maths

@functools.partial(jax.jit, static_argnames=("d_state", "dt_rank", "exact_zoh", "impl", "block"))
def mamba_mixer(p: dict[str, Array], u: Array, state: SSMState, mask: Array, starts: Array, *,
                d_state: int, dt_rank: int, exact_zoh: bool = False, impl: str = "auto",
                block: int = 16) -> tuple[Array, SSMState]:
    """One Mamba-1 mixer (specs/mamba.md §3.1). p: in_proj [D, 2Di], conv_w [Di, K],
    conv_b [Di] | None, x_proj [Di, R+2N], dt_w [R, Di], dt_b [Di], A_log [Di, N], D [Di],
    out_proj [Di, D]. u: [B, T, D]; mask, starts: [B, T] bool."""
    Di = p["A_log"].shape[0]
    xz = jnp.einsum("btd,de->bte", u, p["in_proj"].astype(u.dtype))
    x, z = xz[..., :Di], xz[..., Di:]
    x, conv_state = causal_conv1d(x, p["conv_w"], p["conv_b"], state.conv, mask, starts)
    x = jax.nn.silu(x)
    xdbl = jnp.einsum("btd,de->bte", x, p["x_proj"].astype(x.dtype))
    dt_r = xdbl[..., :dt_rank]
    Bm = xdbl[..., dt_rank:dt_rank + d_state]
    C = xdbl[..., dt_rank + d_state:]
    dt = jnp.einsum("btr,rd->btd", dt_r.astype(jnp.float32), p["dt_w"].astype(jnp.float32))
    dt = jax.nn.softplus(dt + p["dt_b"].astype(jnp.float32))
    dt = jnp.where(mask[..., None], dt, 0.0)            # pads: decay 1, no input
    A = -jnp.exp(p["A_log"].astype(jnp.float32))
    y, h = selective_scan(x, dt, A, Bm, C, h0=state.ssm, reset=starts & mask,
                          exact_zoh=exact_zoh, impl=impl, block=block)
    y = y + p["D"].astype(jnp.float32) * x.astype(jnp.float32)
    y = (y * jax.nn.silu(z.astype(jnp.float32))).astype(u.dtype)
    out = jnp.einsum("bte,ed->btd", y, p["out_proj"].astype(y.dtype))
    return out, SSMState(conv=conv_state, ssm=h, pos=state.pos)


def selective_state_flops(d_inner: int, d_state: int) -> float:
    """Forward FLOPs per token of the reference selective scan / SSD recurrence (specs/mamba.md
    §2.4, §9) over d_inner x d_state state elements (Mamba-1 [Di, N]; Mamba-2 [H, P, N] with
    H P = Di): the state update h = exp(dt A) h + (dt x) B, a product and a multiply-add per
    element (3), and the read C.h, a multiply-add per element (2). The decay exp(dt A) and dt x
    are elementwise."""
    return 5.0 * d_inner * d_state


def mamba_mixer_flops(dim: int, d_inner: int, d_state: int, dt_rank: int, d_conv: int) -> float:
    """Forward FLOPs per token of `mamba_mixer` (specs/mamba.md §3.1; 2 per multiply-add):
    in_proj [D, 2Di], the depthwise conv (d_conv multiply-adds per channel), x_proj
    [Di, R + 2N], dt_proj [R, Di], the selective scan (`selective_state_flops`) and out_proj
    [Di, D]. Biases, softplus, SiLU, the D skip (a per-channel scale) and the gate are
    elementwise: not counted."""
    D, Di, N, R, K = dim, d_inner, d_state, dt_rank, d_conv
    return (2.0 * D * 2 * Di + 2.0 * Di * K + 2.0 * Di * (R + 2 * N) + 2.0 * R * Di
            + selective_state_flops(Di, N) + 2.0 * Di * D)


class MambaMixer(SelectiveSSMMixer):
    """Mamba-1 mixer with the reference initialisation (specs/mamba.md §5.1); `impl` and `block`
    choose the `selective_scan` op's form and block size (neither changes the function)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, d_inner: int, d_state: int = 16,
                 d_conv: int = 4, dt_rank: int | None = None, dt_min: float = 1e-3,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, dt_scale: float = 1.0,
                 dt_init: str = "random", conv_bias: bool = True, exact_zoh: bool = False,
                 out_scale: float = 1.0, impl: str = "auto", block: int = 16):
        R = dt_rank or math.ceil(dim / 16)
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, d_state, d_conv, R
        self.exact_zoh, self.impl, self.block = exact_zoh, impl, block
        self.in_proj = _torch_linear(dim, 2 * d_inner, rngs, ("embed", "inner"))
        self.conv = CausalConv1d(d_inner, d_conv, rngs=rngs, use_bias=conv_bias)
        self.x_proj = _torch_linear(d_inner, R + 2 * d_state, rngs, ("inner", None))
        std = R ** -0.5 * dt_scale
        if dt_init == "random":
            w = uniform(rngs.params(), (R, d_inner), std)
        elif dt_init == "constant":
            w = jnp.full((R, d_inner), std, jnp.float32)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.dt_w = param(w, (None, "inner"))
        self.dt_b = param(dt_bias_init(rngs.params(), d_inner, dt_min, dt_max, dt_init_floor),
                          ("inner",))
        a_log = jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32),
                                         (d_inner, d_state)))
        self.A_log = param(a_log, ("inner", "state"))
        self.D = param(jnp.ones((d_inner,), jnp.float32), ("inner",))
        self.out_proj = _torch_linear(d_inner, dim, rngs, ("inner", "embed"), scale=out_scale)

    def arrays(self) -> dict[str, Any]:
        return {"in_proj": self.in_proj.weight[...], "conv_w": self.conv.weight[...],
                "conv_b": None if self.conv.bias is None else self.conv.bias[...],
                "x_proj": self.x_proj.weight[...], "dt_w": self.dt_w[...], "dt_b": self.dt_b[...],
                "A_log": self.A_log[...], "D": self.D[...], "out_proj": self.out_proj.weight[...]}

    @property
    def ssm_shape(self) -> tuple[int, ...]:
        return (self.d_inner, self.d_state)

    def mix(self, x: Array, state: SSMState, mask: Array, starts: Array):
        return mamba_mixer(self.arrays(), x, state, mask, starts, d_state=self.d_state,
                           dt_rank=self.dt_rank, exact_zoh=self.exact_zoh, impl=self.impl,
                           block=self.block)


# ----------------------------------------------------------------------------- Mamba-2 maths

@functools.partial(jax.jit, static_argnames=("n_heads", "n_groups", "d_state", "eps", "dt_limit",
                                             "impl", "block"))
def mamba2_mixer(p: dict[str, Array], u: Array, state: SSMState, mask: Array, starts: Array, *,
                 n_heads: int, n_groups: int, d_state: int, eps: float,
                 dt_limit: tuple[float, float] = (0.0, math.inf), impl: str = "auto",
                 block: int = 64) -> tuple[Array, SSMState]:
    """One Mamba-2 mixer (specs/mamba.md §9; details as Hugging Face's Mamba2Mixer).
    p: in_proj [D, 2Di + 2GN + H] (columns z | xBC | dt), conv_w [Di+2GN, K], conv_b,
    dt_bias [H], A_log [H], D [H], norm [Di], out_proj [Di, D]."""
    Bsz, T, _ = u.shape
    Di = p["norm"].shape[0]
    H, G, N = n_heads, n_groups, d_state
    P = Di // H
    zxbcdt = jnp.einsum("btd,de->bte", u, p["in_proj"].astype(u.dtype))
    z = zxbcdt[..., :Di]
    xBC = zxbcdt[..., Di:2 * Di + 2 * G * N]
    dt = zxbcdt[..., 2 * Di + 2 * G * N:]
    xBC, conv_state = causal_conv1d(xBC, p["conv_w"], p["conv_b"], state.conv, mask, starts)
    xBC = jax.nn.silu(xBC)
    x = xBC[..., :Di].reshape(Bsz, T, H, P)
    Bm = xBC[..., Di:Di + G * N].reshape(Bsz, T, G, N)
    C = xBC[..., Di + G * N:].reshape(Bsz, T, G, N)
    dt = jax.nn.softplus(dt.astype(jnp.float32) + p["dt_bias"].astype(jnp.float32))
    if dt_limit != (0.0, math.inf):
        dt = jnp.clip(dt, dt_limit[0], dt_limit[1])
    dt = jnp.where(mask[..., None], dt, 0.0)            # pads: decay 1, no input
    A = -jnp.exp(p["A_log"].astype(jnp.float32))
    y, h = ssd(x, dt, A, Bm, C, h0=state.ssm, reset=starts & mask, impl=impl, block=block)
    y = y + p["D"].astype(jnp.float32)[:, None] * x.astype(jnp.float32)
    y = gated_rms_norm(y.reshape(Bsz, T, Di), z, p["norm"], eps, norm_before_gate=False,
                       group_size=Di // G).astype(u.dtype)
    out = jnp.einsum("bte,ed->btd", y, p["out_proj"].astype(y.dtype))
    return out, SSMState(conv=conv_state, ssm=h, pos=state.pos)


def mamba2_mixer_flops(dim: int, d_inner: int, n_heads: int, n_groups: int, d_state: int,
                       d_conv: int) -> float:
    """Forward FLOPs per token of `mamba2_mixer` (specs/mamba.md §9; 2 per multiply-add): in_proj
    [D, 2Di + 2GN + H], the depthwise conv over the Di + 2GN xBC channels (d_conv multiply-adds
    each), the SSD recurrence (`selective_state_flops` over the H x P x N = Di x N state; the
    groups' B, C are shared, not recomputed) and out_proj [Di, D]. Biases, softplus, SiLU, the
    D skip and the gated RMSNorm are elementwise: not counted."""
    D, Di, H, G, N, K = dim, d_inner, n_heads, n_groups, d_state, d_conv
    return (2.0 * D * (2 * Di + 2 * G * N + H) + 2.0 * (Di + 2 * G * N) * K
            + selective_state_flops(Di, N) + 2.0 * Di * D)


class Mamba2Mixer(SelectiveSSMMixer):
    """Mamba-2 mixer with the reference initialisation (A_log = log U(A_init_range) per head,
    dt_bias as Mamba-1's, D = 1 per head, gated RMSNorm weight 1); `impl` and `block` choose the
    `ssd` op's form and block size (neither changes the function)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, d_inner: int, head_dim: int = 64,
                 d_state: int = 128, n_groups: int = 1, d_conv: int = 4, dt_min: float = 1e-3,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 A_init_range: tuple[float, float] = (1.0, 16.0),
                 dt_limit: tuple[float, float] = (0.0, math.inf), conv_bias: bool = True,
                 norm_eps: float = 1e-5, out_scale: float = 1.0, impl: str = "auto",
                 block: int = 64):
        if d_inner % head_dim or (d_inner // head_dim) % n_groups:
            raise ValueError(f"d_inner={d_inner} must split into heads of {head_dim} channels, "
                             f"a multiple of n_groups={n_groups} of them")
        H = d_inner // head_dim
        self.d_inner, self.head_dim, self.n_heads, self.n_groups = d_inner, head_dim, H, n_groups
        self.d_state, self.d_conv, self.norm_eps = d_state, d_conv, norm_eps
        self.dt_limit, self.impl, self.block = tuple(dt_limit), impl, block
        conv_dim = d_inner + 2 * n_groups * d_state
        self.in_proj = _torch_linear(dim, 2 * d_inner + 2 * n_groups * d_state + H, rngs,
                                     ("embed", "inner"))
        self.conv = CausalConv1d(conv_dim, d_conv, rngs=rngs, use_bias=conv_bias)
        self.dt_bias = param(dt_bias_init(rngs.params(), H, dt_min, dt_max, dt_init_floor),
                             ("heads",))
        lo, hi = A_init_range
        self.A_log = param(jnp.log(jax.random.uniform(rngs.params(), (H,), jnp.float32, lo, hi)),
                           ("heads",))
        self.D = param(jnp.ones((H,), jnp.float32), ("heads",))
        self.norm = GatedRMSNorm(d_inner, eps=norm_eps, norm_before_gate=False,
                                 group_size=d_inner // n_groups)
        self.out_proj = _torch_linear(d_inner, dim, rngs, ("inner", "embed"), scale=out_scale)

    def arrays(self) -> dict[str, Any]:
        return {"in_proj": self.in_proj.weight[...], "conv_w": self.conv.weight[...],
                "conv_b": None if self.conv.bias is None else self.conv.bias[...],
                "dt_bias": self.dt_bias[...], "A_log": self.A_log[...], "D": self.D[...],
                "norm": self.norm.weight[...], "out_proj": self.out_proj.weight[...]}

    @property
    def ssm_shape(self) -> tuple[int, ...]:
        return (self.n_heads, self.head_dim, self.d_state)

    def mix(self, x: Array, state: SSMState, mask: Array, starts: Array):
        return mamba2_mixer(self.arrays(), x, state, mask, starts, n_heads=self.n_heads,
                            n_groups=self.n_groups, d_state=self.d_state, eps=self.norm_eps,
                            dt_limit=self.dt_limit, impl=self.impl, block=self.block)
