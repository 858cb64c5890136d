"""MemMamba (specs/memmamba.md), registered as "memmamba": Mamba-1 blocks whose layers keep a
causal FIFO pool of score-selected notes read by cross-token attention, and every p-th layer also
reads the same token's summaries from the previous g layers (cross-layer attention); the layer is
`layers.memmamba.MemMambaMixer`.

The stack is Mamba's (zoo/mamba.py: embedding N(0, 0.02), pre-RMSNorm mixer-only blocks, final
RMSNorm, tied head, float32 residual), with one difference in the block loop: `MemMambaLM`
passes layer l the summaries s^{l-g} .. s^{l-1} of the same token as the mixer contract's
`context` ([B, T, g', d_s], g' = the previous layers that exist) and takes each layer's
summaries out of its aux. Cross-layer layers are l = p, 2p, ... (1-based), l >= 2 (§3.2: p = g = 4).

Insertion is discrete (`iota > tau1`); the equality tests assert on their runs that every score
lies at least `MARGIN` from tau1 (`check_margins`, the contract notes).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx

from layers.memmamba import SUMMARIES, MemMambaMixer, memmamba_extra_flops, memmamba_extra_params
from layers.norms import RMSNorm
from zoo.lm import TRAIN_FACTOR, Block, CausalLM, build_lm, sum_aux
from zoo.mamba import MAMBA_GROUPS, MambaConfig, mamba_flops, mamba_param_count
from zoo.registry import ConformanceSpec, register

MARGIN = 1e-4


@dataclass(frozen=True)
class MemMambaConfig(MambaConfig):
    """MambaConfig's backbone fields plus the note pool and the two attentions (§3.2 [spec])."""
    n_layers: int = 4
    d_summary: int = 64          # d_s
    pool_size: int = 50          # K
    note_heads: int = 4          # heads of both attentions (head dim d_s / note_heads)
    tau1: float = 0.5            # insertion threshold on iota
    hard_gate: bool = False      # gamma -> [gamma > tau2] gamma (the paper's tau2, optional)
    tau2: float = 0.5
    cross_every: int = 4         # p: cross-layer attention at layers p, 2p, ...
    cross_layers: int = 4        # g: the previous layers it reads
    alpha_init: float = 0.1      # alpha_tok, alpha_lay ("weighted" fusion, LayerScale-style)
    note_init_std: float = 0.02  # W_q, W_k, W_v of both attentions; W_o: / sqrt(2 n_layers)

    def validate(self):
        super().validate()
        for key in ("d_summary", "pool_size", "note_heads", "cross_every", "cross_layers"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key}={value!r} must be a positive integer")
        if self.d_summary % self.note_heads:
            raise ValueError(f"model.note_heads={self.note_heads} does not divide "
                             f"model.d_summary={self.d_summary}")
        for key in ("tau1", "tau2"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"model.{key}={getattr(self, key)} must be in [0, 1] "
                                 "(it thresholds a sigmoid)")

    def cross(self, i: int) -> bool:
        """Whether layer i (0-based) has the cross-layer attention."""
        return (i + 1) % self.cross_every == 0 and i >= 1

    def n_context(self, i: int) -> int:
        return min(self.cross_layers, i) if self.cross(i) else 0


class MemMambaLM(CausalLM):
    """CausalLM whose block loop hands each cross-layer layer the previous `cross_layers`
    layers' summaries of the same token (`context`) and drops them from the summed aux."""

    def __init__(self, *, cross_layers: int, **kw):
        super().__init__(**kw)
        self.cross_layers = cross_layers

    def run_blocks(self, h, states, *, mask, segment_ids, key, hiddens: list | None = None):
        summaries, auxes, new_states = [], [], []
        for i, blk in enumerate(self.blocks):
            ctx = None
            if blk.mixer.cross_layer:
                ctx = jnp.stack(summaries[max(0, i - self.cross_layers):i], axis=2)
            h, s, a = self.call_block(i, h, states[i], mask=mask, segment_ids=segment_ids,
                                      key=key, context=ctx)
            a = dict(a)
            summaries.append(a.pop(SUMMARIES))
            new_states.append(s)
            auxes.append(a)
            if hiddens is not None:
                hiddens.append(h)
        return h, tuple(new_states), sum_aux(auxes)


def _mixer(cfg: MemMambaConfig, i: int, rngs: nnx.Rngs) -> MemMambaMixer:
    return MemMambaMixer(
        cfg.dim, rngs=rngs, n_layers=cfg.n_layers, d_summary=cfg.d_summary,
        pool_size=cfg.pool_size, n_heads=cfg.note_heads, tau1=cfg.tau1, hard_gate=cfg.hard_gate,
        tau2=cfg.tau2, cross_layer=cfg.cross(i), alpha_init=cfg.alpha_init,
        attn_std=cfg.note_init_std, norm_eps=cfg.norm_eps,
        d_inner=cfg.di, d_state=cfg.d_state, d_conv=cfg.d_conv, dt_rank=cfg.rank,
        dt_min=cfg.dt_min, dt_max=cfg.dt_max, dt_init_floor=cfg.dt_init_floor,
        dt_scale=cfg.dt_scale, dt_init=cfg.dt_init, conv_bias=cfg.conv_bias,
        exact_zoh=cfg.exact_zoh, out_scale=(cfg.n_layers ** -0.5 if cfg.rescale_out_proj else 1.0),
        impl=cfg.impl, block=cfg.block)


def memmamba_param_count(cfg: MemMambaConfig) -> int:
    """The Mamba stack's count (specs/mamba.md §3.3) plus each layer's memory modules."""
    return mamba_param_count(cfg) + sum(memmamba_extra_params(cfg.dim, cfg.d_summary, cfg.cross(i))
                                        for i in range(cfg.n_layers))


def memmamba_flops(cfg: MemMambaConfig, seq_len: int) -> float:
    """Training FLOPs per token: the Mamba stack's (`mamba_flops`) plus 3 x each layer's
    `memmamba_extra_flops`, plus the keys and values of the K carried notes projected once per
    call (2 x 2 d_s^2 K / seq_len per token and layer)."""
    S, K = cfg.d_summary, cfg.pool_size
    extra = sum(memmamba_extra_flops(cfg.dim, S, K, cfg.cross(i), cfg.n_context(i))
                for i in range(cfg.n_layers))
    extra += cfg.n_layers * 2.0 * 2 * S * S * K / seq_len
    return mamba_flops(cfg, seq_len) + TRAIN_FACTOR * extra


def score_margins(model: CausalLM, tokens, mask=None, segment_ids=None) -> list:
    """Per layer, |iota - tau1| [B, T] on the model's forward of `tokens`."""
    B, T = tokens.shape
    h0 = model.embed_tokens(tokens, jnp.zeros((B, T), jnp.int32))
    outs: list = []
    model.run_blocks(h0, (None,) * len(model.blocks), mask=mask, segment_ids=segment_ids,
                     key=None, hiddens=outs)
    return [jnp.abs(blk.mixer.scores(blk.norm1(x)) - blk.mixer.tau1)
            for blk, x in zip(model.blocks, [h0] + outs[:-1])]


def check_margins(model: CausalLM, tokens, mask=None) -> None:
    """Assert that every real token's insertion score is clear of tau1 by `MARGIN`."""
    for i, m in enumerate(score_margins(model, tokens, mask)):
        if mask is not None:
            m = jnp.where(mask, m, jnp.inf)
        low = float(jnp.min(m))
        assert low > MARGIN, f"layer {i}: an insertion score {low:.3g} from tau1 <= {MARGIN}"


# The conformance config: 3 layers with p = 2, g = 2 (layer 2 reads layer 1's summary, layer 3
# none), a pool of 4 notes so that length 13 wraps it, 2 heads of size 4; alpha 1 and attention
# weights N(0, 0.5) so that both reads move the logits well above the tolerances.
_TINY = dict(vocab_size=37, dim=16, n_layers=3, d_state=4, block=4, init_std=0.5, dt_min=0.05,
             dt_max=0.5, d_summary=8, pool_size=4, note_heads=2, cross_every=2, cross_layers=2,
             alpha_init=1.0, note_init_std=0.5, tau1=0.45, impl="reference")


@register("memmamba", config=MemMambaConfig, param_count=memmamba_param_count,
          flops=memmamba_flops, groups=MAMBA_GROUPS,
          conformance=ConformanceSpec(
              config=MemMambaConfig(**_TINY), length=13, cuts=(1, 3, 4, 8, 12),
              reference={"impl": "reference"}, fast=({"impl": "chunked", "block": 4}, {"impl": "pallas_interpret", "block": 8}),
              check_margins=check_margins,
              flops_config=MemMambaConfig(vocab_size=37, dim=256, n_layers=2, d_state=4,
                                          d_summary=16, pool_size=4, cross_every=2,
                                          cross_layers=1, impl="reference")))
def build_memmamba(cfg: MemMambaConfig, rngs: nnx.Rngs) -> CausalLM:
    cfg.validate()
    mixers = [_mixer(cfg, i, rngs) for i in range(cfg.n_layers)]
    return build_lm([Block(m, RMSNorm(cfg.dim, eps=cfg.norm_eps)) for m in mixers],
                    vocab_size=cfg.vocab_size, dim=cfg.dim,
                    final_norm=RMSNorm(cfg.dim, eps=cfg.norm_eps), rngs=rngs,
                    tie_embeddings=cfg.tie_embeddings, init_std=cfg.init_std,
                    compute_dtype=cfg.compute_dtype, remat=cfg.remat, lm_cls=MemMambaLM,
                    cross_layers=cfg.cross_layers)


def memmamba_preset(size: str = "200m", **kw) -> MemMambaConfig:
    """§3.2: the paper's 24 layers, d_s 64, K 50 at the inferred width 1024 (d_state 16, expand 2,
    d_conv 4, dt_rank 64, GPT-NeoX vocabulary 50280, tied), p = g = 4, 4 heads."""
    shapes = {"200m": (1024, 24)}
    dim, n = shapes[size]
    return MemMambaConfig(**{**dict(vocab_size=50280, dim=dim, n_layers=n, d_state=16,
                                    dt_rank=64), **kw})


PRESETS = {"memmamba_200m": memmamba_preset}
