"""Parameter and FLOP counts of the neural-memory layer (`layers.memory.NeuralMemory`): the
registry's `param_count=` / `flops=` declarations of Titans, ATLAS/OmegaNet and the Miras models
build on these (forward FLOPs per token; `zoo.lm` documents the convention, tests/test_flops.py
checks them against XLA)."""
from __future__ import annotations

from layers.memory import NeuralMemoryConfig, has_memory_ln, memory_shapes


def neural_memory_param_count(cfg: NeuralMemoryConfig) -> int:
    """Parameters of one NeuralMemory mixer."""
    D, H, d = cfg.dim, cfg.n_heads, cfg.hd
    n = 3 * D * H * d + 3 * H * d * cfg.conv_size          # q/k/v projections + conv
    n += (3 if cfg.momentum else 2) * (D * H + H)            # gates
    n += D * H * d + H * d * D + d                           # W_g, W_O, output norm
    n += H * sum(a * b for a, b in memory_shapes(cfg).values())
    if has_memory_ln(cfg):
        n += 2 * H * d
    return n


# ----------------------------------------------------------------------------- FLOPs
# Forward FLOPs per token in the convention of `zoo.lm` (2 per multiply-add of every product,
# the products inside the memory's state updates included; elementwise work per unit, i.e.
# activations, LayerNorms, gates' nonlinearities, the output signal, is not counted). What is
# counted is what the reference op (pallas_kernels/neural_memory/reference.py) does per token.


def memory_weight_count(cfg: NeuralMemoryConfig) -> int:
    """P: the memory weights of one head (Σ d_in·d_out over `memory_shapes`)."""
    return sum(a * b for a, b in memory_shapes(cfg).values())


def memory_net_flops(cfg: NeuralMemoryConfig) -> float:
    """Forward FLOPs of the memory network M_W on one input, one head: 2P (its linear layers;
    the activation, LayerNorm and residual of the MLP memory are elementwise)."""
    return 2.0 * memory_weight_count(cfg)


def memory_vjp_flops(cfg: NeuralMemoryConfig) -> float:
    """FLOPs of the VJP of M_W w.r.t. W at one input, one head: each layer's weight gradient
    (an outer product, 2 d_in d_out) and the input gradient of every layer but those reading
    the memory's input (the keys need none): 2 (2P − P_in), P_in the first layer's weights (both
    of the gated MLP's input layers W2, W3)."""
    shapes = memory_shapes(cfg)
    inputs = ("w2", "w3") if cfg.memory == "gated_mlp" else (next(iter(shapes)),)
    p_in = sum(shapes[k][0] * shapes[k][1] for k in inputs)
    return 2.0 * (2 * memory_weight_count(cfg) - p_in)


def memory_step_flops(cfg: NeuralMemoryConfig, *, transform: float = 0.0,
                      link: float = 0.0) -> float:
    """Forward FLOPs per token and head of the reference memory step (reference.py, titans.md
    §2, atlas.md §2.4): the c = `cfg.window` sources, each the memory at the anchor
    (`memory_net_flops`) and its VJP (`memory_vjp_flops`); the window sum U = Σ_j γ_j u_j
    (2cP, none for c = 1: U = u); the momentum update S = θ S ± U (3 per weight: two scalings
    and a sum; without momentum S = U needs none beyond the scaling by the learning rate, 1)
    and the retention update W = α W ± η T(S) (2 per weight; the learning rate sits in one
    of the two updates); `transform`: the update transform T on S (Newton–Schulz); `link`: one
    application of the link to one head's weights, applied twice (the anchor, for the
    sources, and W_t, for the read); the read of q through W_t (`memory_net_flops`).
    The reference re-evaluates every window source at every token (c per token); the chunked
    form evaluates each source once per chunk of b (1 + (c − 1)/b per token), so for c > 1
    this count exceeds that form's work. The reference's bookkeeping selects (document
    starts, padding, the anchor) and its products by the constants 1 (U = 1·u at c = 1,
    W + 1·S in Titans' letters) and 0 (0·S without momentum) are not counted."""
    c, P = cfg.window, memory_weight_count(cfg)
    sources = c * (memory_net_flops(cfg) + memory_vjp_flops(cfg))
    window_sum = 2.0 * c * P if c > 1 else 0.0
    updates = (3 if cfg.momentum else 1) * P + 2 * P
    return sources + window_sum + updates + transform + 2 * link + memory_net_flops(cfg)


def memory_qkv_flops(cfg: NeuralMemoryConfig) -> float:
    """Forward FLOPs per token of `NeuralMemory.qkv`: the q, k, v projections [D, H d] and the
    shared depthwise conv over the 3 H d channels (a multiply-add per tap); SiLU and the ℓ2
    norms are elementwise (a feature map is its subclass's, `features` in `neural_memory_flops`)."""
    D, Hd = cfg.dim, cfg.n_heads * cfg.hd
    return 3 * 2.0 * D * Hd + 2.0 * cfg.conv_size * 3 * Hd


def memory_read_flops(cfg: NeuralMemoryConfig, *, link: float = 0.0) -> float:
    """Forward FLOPs per token of a read without a write, y = M_{link(W)}(q), over all heads
    (MAC's retrieval; `link` as in `memory_step_flops`)."""
    return cfg.n_heads * (memory_net_flops(cfg) + link)


def neural_memory_flops(cfg: NeuralMemoryConfig, *, transform: float = 0.0, link: float = 0.0,
                        features: float = 0.0, gates: float = 0.0) -> float:
    """Forward FLOPs per token of one `NeuralMemory` mixer (titans.md §3.2): `memory_qkv_flops`,
    the gate projections [D, H] (retention, learning rate and, with momentum, the momentum
    gate; their bias and sigmoid are elementwise), H × `memory_step_flops` (`transform` and
    `link` per head), W_g and W_O ([D, H d], [H d, D]; the gated RMSNorm is elementwise), plus
    what a subclass adds per token: `features` (its feature map on q and k, all heads) and
    `gates` (its extra gate projections)."""
    D, H, d = cfg.dim, cfg.n_heads, cfg.hd
    gate_proj = (3 if cfg.momentum else 2) * 2.0 * D * H
    out = 2.0 * D * H * d + 2.0 * H * d * D
    return (memory_qkv_flops(cfg) + gate_proj + H * memory_step_flops(cfg, transform=transform,
                                                                       link=link)
            + out + features + gates)


# XLA's count of a training step whose FLOPs are mostly this layer's exceeds the products
# counted above by up to ~80 %: the reference op's reset / padding / anchor selects touch every
# memory weight at every token, forward and backward (about 20 elementwise ops per weight per
# token; measured op by op for titans_lmm at dim 64, where the products equal the count to the
# FLOP). tests/test_flops.py checks such models against this range instead of its default.
XLA_FLOPS_RANGE = (0.95, 1.85)
# Online plain gradient descent (window c = 1, no momentum: DLA, OmegaNet at c = 1) does the fewest
# products per memory weight and token (the source's forward and VJP, two updates, the read: about
# 8 per weight against Titans' 11 with momentum) beside the same selects, so XLA's count exceeds
# the products by more (measured: OmegaNet at c = 1 2.11x, DLA 2.11x at dim 16 and 2.23x at dim
# 64 with its 561 polynomial features per head; OmegaNet at c = 4 1.45x).
XLA_FLOPS_RANGE_ONLINE_GD = (0.95, 2.4)
