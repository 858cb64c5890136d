"""The GAM mixer: causal depthwise conv + learned associative memory + gated fusion
(specs/gam.md §3, decode state §5).

Level 1 (maths) is `gam_mixer`, a pure function of explicit parameter arrays, the LayerNorm-ed
input `x` and the conv history; level 3 is `GAMMixer`, the nnx module that owns the parameters
and follows the mixer contract `(x, state, *, mask, segment_ids, ...) -> (y, new_state, aux)`.
The block around it (pre-LayerNorm, residual, GELU FFN) is `zoo.lm.Block`.

The memory read (§3.3) is softmax attention of each token over the S rows of a learned bank `M`
with tied keys and values, no temperature, no causal mask: the shared `attention` op computes
it (non-causal, scale 1, every slot always visible), so `impl` / `block` choose its reference or
slot-blockwise (online softmax) form. The memory is the same for every input and position
(§3.1): only the conv mixes positions, so the receptive field of N blocks is N (k - 1) + 1.

State (`GAMState`, §5): the last k - 1 real LayerNorm-ed inputs of the conv (oldest first; zeros
before the first token and before a document start) and the position of the next token.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.common import call_flags, normal, param, uniform
from layers.conv import CausalConv1d, causal_conv1d
from layers.linear import Dense
from pallas_kernels.attention import attention as attention_op

Array = jax.Array

FUSIONS = ("gated", "global", "sum", "local")   # §3.4 and the Table 3 ablations (§7.1)
INITS = ("torch_default", "normal_0.02")         # §6


@struct.dataclass
class GAMState:
    conv: Array   # [B, k-1, D] last k-1 real LN1 outputs (oldest first); [B, 0, D] without conv
    pos: Array    # [B] int32 position of the next token (in its document)


def uses_local(fusion: str) -> bool:
    return fusion != "global"


def uses_memory(fusion: str) -> bool:
    return fusion != "local"


def memory_read(x: Array, memory: Array, *, scale: float = 1.0, impl: str = "auto",
                block: int = 128) -> Array:
    """g[t] = softmax_S(scale * x[t] . M^T) . M (specs/gam.md §3.3), float32 softmax (§8.1).

    x: [B, T, D]; memory: [S, D]. Per token: no position mixes with another."""
    B, T, D = x.shape
    S = memory.shape[0]
    m = jnp.broadcast_to(memory.astype(x.dtype)[None, :, None, :], (B, S, 1, D))
    zt, zs = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
    every = jnp.ones((B, S), bool)
    g = attention_op(x[:, :, None, :], m, m, q_pos=zt, k_pos=zs, q_group=zt, k_group=zs,
                     k_valid=every, k_always=every, causal=False, scale=scale, impl=impl,
                     block=block)
    return g[:, :, 0]


@functools.partial(jax.jit, static_argnames=("fusion", "scale", "impl", "block"))
def gam_mixer(p: dict[str, Array | None], x: Array, conv_state: Array, mask: Array,
              starts: Array, *, fusion: str = "gated", scale: float = 1.0, impl: str = "auto",
              block: int = 128) -> tuple[Array, Array]:
    """The fused context c of one GAM block (specs/gam.md §3.2-3.4) and the new conv history.

    p: conv_w [D, k], conv_b [D] (local path), memory [S, D] (memory path), gate_w [D, 2D],
    gate_b [2D] (gated fusion); the entries a variant lacks are None. x: [B, T, D] (LN1
    outputs); conv_state: [B, k-1, D]; mask, starts: [B, T] bool (real tokens, document starts).
    fusion: gated  sigma(a_loc) * l + sigma(a_glob) * g  (two independent sigmoids)
            sum    l + g;   local  l;   global  g        (Table 3's gate-free ablations)
    """
    local = glob = None
    if uses_local(fusion):
        local, conv_state = causal_conv1d(x, p["conv_w"], p["conv_b"], conv_state, mask, starts)
    if uses_memory(fusion):
        glob = memory_read(x, p["memory"], scale=scale, impl=impl, block=block)
    if fusion == "gated":
        D = x.shape[-1]
        a = jnp.einsum("btd,de->bte", x, p["gate_w"].astype(x.dtype)) + p["gate_b"].astype(x.dtype)
        c = jax.nn.sigmoid(a[..., :D]) * local + jax.nn.sigmoid(a[..., D:]) * glob
    elif fusion == "sum":
        c = local + glob
    else:
        c = local if fusion == "local" else glob
    return c.astype(x.dtype), conv_state


def gam_mixer_count(dim: int, n_slots: int, kernel_size: int, fusion: str) -> int:
    """Parameters of `GAMMixer` (specs/gam.md §4): conv kD + D, memory SD, gate 2D^2 + 2D."""
    D = dim
    return ((kernel_size * D + D if uses_local(fusion) else 0)
            + (n_slots * D if uses_memory(fusion) else 0)
            + (2 * D * D + 2 * D if fusion == "gated" else 0))


def gam_mixer_flops(dim: int, n_slots: int, kernel_size: int, fusion: str) -> float:
    """Forward FLOPs per token of `gam_mixer` (2 per multiply-add, the convention of `zoo.lm`):
    the depthwise conv (k multiply-adds per channel), the memory scores x.M^T and the read A.M
    (S D multiply-adds each), the gate projection [D, 2D]. Softmax, sigmoids, the fusion
    products and biases are elementwise: not counted."""
    D = dim
    return ((2.0 * kernel_size * D if uses_local(fusion) else 0.0)
            + (4.0 * n_slots * D if uses_memory(fusion) else 0.0)
            + (2.0 * D * 2 * D if fusion == "gated" else 0.0))


class GAMMixer(nnx.Module):
    """One GAM block's sequence mixer (specs/gam.md §3.2-3.4) with the §6 initialisation.

    init "torch_default": memory Xavier-uniform U(+-sqrt(6/(S+D))), conv U(+-1/sqrt(k)) (weight
    and bias), gate U(+-1/sqrt(D)) (weight and bias). init "normal_0.02": every weight
    N(0, 0.02), biases 0. `memory_scale` (§10, default off) divides the memory scores by
    sqrt(D). `impl` / `block` choose the `attention` op's form for the memory read.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs, n_slots: int, kernel_size: int = 3,
                 fusion: str = "gated", memory_scale: bool = False, init: str = "torch_default",
                 impl: str = "auto", block: int = 128):
        if fusion not in FUSIONS:
            raise ValueError(f"fusion={fusion!r} is not one of {FUSIONS}")
        if init not in INITS:
            raise ValueError(f"init={init!r} is not one of {INITS}")
        self.dim, self.n_slots, self.kernel_size, self.fusion = dim, n_slots, kernel_size, fusion
        self.scale = dim ** -0.5 if memory_scale else 1.0
        self.impl, self.block = impl, block
        torch = init == "torch_default"
        conv = None
        if uses_local(fusion):
            conv = CausalConv1d(dim, kernel_size, rngs=rngs)
            if not torch:
                conv.weight[...] = normal(rngs.params(), (dim, kernel_size), 0.02)
                conv.bias[...] = jnp.zeros((dim,))
        self.conv = conv
        memory = None
        if uses_memory(fusion):
            memory = param(uniform(rngs.params(), (n_slots, dim), (6.0 / (n_slots + dim)) ** 0.5)
                           if torch else normal(rngs.params(), (n_slots, dim), 0.02),
                           (None, "embed"))
        self.memory = memory
        self.gate = (Dense(dim, 2 * dim, rngs=rngs, use_bias=True, axes=("embed", "mlp"),
                           init="torch" if torch else "normal", std=0.02)
                     if fusion == "gated" else None)

    def params(self) -> dict[str, Array | None]:
        get = lambda v: None if v is None else v[...]
        return {"conv_w": get(self.conv and self.conv.weight),
                "conv_b": get(self.conv and self.conv.bias), "memory": get(self.memory),
                "gate_w": get(self.gate and self.gate.weight),
                "gate_b": get(self.gate and self.gate.bias)}

    def init_state(self, batch_size: int, max_len: int | None = None) -> GAMState:
        taps = self.kernel_size - 1 if self.conv is not None else 0
        return GAMState(conv=jnp.zeros((batch_size, taps, self.dim), jnp.float32),
                        pos=jnp.zeros((batch_size,), jnp.int32))

    def __call__(self, x: Array, state: GAMState | None = None, *, mask=None, segment_ids=None,
                 context=None, deterministic: bool = True, key=None):
        B, T, _ = x.shape
        state = self.init_state(B) if state is None else state
        m, starts, next_pos = call_flags(state.pos, mask, segment_ids, B, T)
        c, conv = gam_mixer(self.params(), x, state.conv, m, starts, fusion=self.fusion,
                            scale=self.scale, impl=self.impl, block=self.block)
        return c, GAMState(conv=conv, pos=next_pos), {}
