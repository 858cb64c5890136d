"""Deep LSSL (specs/lssl.md §3.2): registered as the causal LM "lssl" and the pooled
sequence classifier "lssl_classifier" (non-causal: mean over time, then a linear read-out).

Blocks: pre-norm `x + Dropout(LSSL(LayerNorm(x)))` (post-norm `LayerNorm(x + Dropout(LSSL(x)))`
with `prenorm=False`), LayerNorm with affine and eps 1e-5, no MLP between layers. The LM embeds
tokens, runs the blocks, a final LayerNorm and a head tied to the embedding by default. The
classifier encodes integer tokens with an embedding (sequential-image pixels as tokens) or float
features [B, T, d_input] with a Linear encoder, and averages the real (mask) positions.

`impl` chooses the form of the `lssl` op (pallas_kernels/lssl/): "reference" (the
recurrence), "chunked" (convolution inside chunks of `block` steps with state passing) or
"auto" (the recurrence on CPU); `block` never changes the function. `rate` is the fixed dt
multiplier (test-time resampling), never derived from the call length.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import check_block, check_impl, dropout, fold, real_mask
from layers.embed import Embed
from layers.linear import Dense
from layers.lssl import LSSLMixer, lssl_call_flops, lssl_mixer_flops, lssl_state_flops
from layers.norms import LayerNorm
from zoo.lm import TRAIN_FACTOR, CausalLM, build_lm, dense_flops, lm_flops, lm_param_count
from zoo.registry import ConformanceSpec, ParamGroup, register

Array = jax.Array


@dataclass(frozen=True)
class LSSLConfig:
    vocab_size: int = 256            # token inputs (LM; classifier with d_input == 0)
    d_input: int = 0                 # classifier only: > 0 takes float features [B, T, d_input]
    n_classes: int = 10              # classifier only
    dim: int = 128                   # H
    n_layers: int = 6
    d_state: int = 128               # N
    channels: int = 1                # M
    measure: str = "legs"            # legs | legt | lagt (initialisation of A, B)
    legt_scale: float = 0.5
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    discretization: str = "bilinear"  # bilinear | zoh
    rate: float = 1.0
    learn_A: bool = True             # False with learn_dt False: LSSL-f
    learn_dt: bool = True
    dropout: float = 0.0
    prenorm: bool = True
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    impl: str = "auto"               # auto (reference on CPU) | reference | chunked
    block: int = 64                  # chunked convolution block (never changes the function)
    compute_dtype: str = "float32"
    remat: str = "none"

    def validate(self):
        for key, val, ok in (("measure", self.measure, ("legs", "legt", "lagt")),
                             ("discretization", self.discretization, ("bilinear", "zoh"))):
            if val not in ok:
                raise ValueError(f"model.{key}={val!r} is not one of {ok}")
        check_impl(self.impl, ("lssl",))
        check_block(self.block)
        if self.rate <= 0:
            raise ValueError(f"model.rate={self.rate} must be > 0")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"model.dt_min={self.dt_min} must be in (0, model.dt_max={self.dt_max}]")


def _mixer(cfg: LSSLConfig, rngs: nnx.Rngs) -> LSSLMixer:
    return LSSLMixer(cfg.dim, rngs=rngs, d_state=cfg.d_state, channels=cfg.channels,
                     measure=cfg.measure, legt_scale=cfg.legt_scale, dt_min=cfg.dt_min,
                     dt_max=cfg.dt_max, discretization=cfg.discretization, rate=cfg.rate,
                     learn_A=cfg.learn_A, learn_dt=cfg.learn_dt, dropout=cfg.dropout,
                     impl=cfg.impl, block=cfg.block)


class LSSLBlock(nnx.Module):
    """Pre-norm `x + drop(mixer(norm(x)))` or post-norm `norm(x + drop(mixer(x)))`."""

    def __init__(self, mixer: LSSLMixer, norm: LayerNorm, *, prenorm: bool, resid_dropout: float):
        self.mixer, self.norm, self.prenorm, self.resid_dropout = mixer, norm, prenorm, resid_dropout

    def init_state(self, batch_size: int, max_len: int | None = None):
        return self.mixer.init_state(batch_size, max_len)

    def __call__(self, x, state=None, *, mask=None, segment_ids=None, context=None, key=None):
        det = key is None
        h = self.norm(x) if self.prenorm else x
        y, state, aux = self.mixer(h, state, mask=mask, segment_ids=segment_ids, context=context,
                                   deterministic=det, key=fold(key, 0))
        x = x + dropout(y, self.resid_dropout, fold(key, 1))
        if not self.prenorm:
            x = self.norm(x)
        return x, state, aux


def _blocks(cfg: LSSLConfig, rngs: nnx.Rngs) -> list[LSSLBlock]:
    return [LSSLBlock(_mixer(cfg, rngs), LayerNorm(cfg.dim, eps=cfg.norm_eps), prenorm=cfg.prenorm,
                      resid_dropout=cfg.dropout) for _ in range(cfg.n_layers)]


def _mixer_params(cfg: LSSLConfig) -> int:
    H, N, M = cfg.dim, cfg.d_state, cfg.channels
    transition = 4 * N + 2 * (N - 1) + N          # p, q, dg, t_diag, t_sub, t_sup, b
    return transition + H + H * M * N + H * M + H * M * H + H


def lssl_param_count(cfg: LSSLConfig) -> int:
    """Per layer: shared transition 7N-2, log_dt H, C HMN, D HM, output linear HMH + H, LayerNorm
    2H (≈ M H (H + N), §3.2). LM: + embedding VH (+ untied head VH) + final LayerNorm 2H."""
    H = cfg.dim
    return lm_param_count(cfg.n_layers * (_mixer_params(cfg) + 2 * H), vocab_size=cfg.vocab_size,
                          dim=H, tie_embeddings=cfg.tie_embeddings, final_norm=2 * H)


def lssl_classifier_param_count(cfg: LSSLConfig) -> int:
    H = cfg.dim
    enc = cfg.d_input * H + H if cfg.d_input > 0 else cfg.vocab_size * H
    final = 2 * H if cfg.prenorm else 0
    return enc + cfg.n_layers * (_mixer_params(cfg) + 2 * H) + final + H * cfg.n_classes + cfg.n_classes


def _blocks_flops(cfg: LSSLConfig, seq_len: int) -> tuple[float, float]:
    """(forward FLOPs per token of the blocks, the training FLOPs per token outside the 3 x
    forward convention: the per-call work amortised over one sequence of `seq_len`, less, for
    a frozen transition (LSSL-f), the state update's weight-gradient product the backward
    does not do)."""
    mixer = lssl_mixer_flops(cfg.dim, cfg.d_state, cfg.channels)
    call = lssl_call_flops(cfg.dim, cfg.d_state, cfg.discretization, cfg.learn_A, cfg.learn_dt)
    frozen = 0.0 if cfg.learn_A or cfg.learn_dt else lssl_state_flops(cfg.dim, cfg.d_state)
    return cfg.n_layers * mixer, cfg.n_layers * (call / seq_len - frozen)


def lssl_flops(cfg: LSSLConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x (L [2HN(N+1) + 2HMN + 2HMH] + 2HV) + L x the per-call
    discretisation / seq_len (`lssl_call_flops`; bilinear, learned: 4N^3 + 12N^3 + H (4N^3
    + 12N^2(N+1)), its elimination not differentiated). The per-call part is counted once per
    sequence: exact at batch 1, an overcount of (B - 1) / B of it at batch B."""
    blocks, other = _blocks_flops(cfg, seq_len)
    return lm_flops(blocks, vocab_size=cfg.vocab_size, dim=cfg.dim) + other


def lssl_classifier_flops(cfg: LSSLConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x (the LM's blocks + the pooled read-out 2 H n_classes /
    seq_len) + 2 x the Linear encoder's 2 d_input H (its input needs no gradient; an embedding
    is free) + the LM's per-call part; the mean pooling and the LayerNorms are elementwise."""
    blocks, other = _blocks_flops(cfg, seq_len)
    enc = dense_flops(cfg.d_input, cfg.dim) if cfg.d_input > 0 else 0.0
    head = dense_flops(cfg.dim, cfg.n_classes) / seq_len
    return TRAIN_FACTOR * (blocks + head) + (TRAIN_FACTOR - 1) * enc + other


_TINY = LSSLConfig(vocab_size=37, dim=8, n_layers=2, d_state=6, channels=2, dt_min=0.05,
                   dt_max=0.5, init_std=0.5, n_classes=5)
# The FLOP check's config (tests/test_flops.py): one wider layer. With every loop unrolled, XLA's
# cost analysis charges the exact GELU's fused backward again in each step's slice of the
# recurrence (elementwise work growing as T^2 H M), several times the products at dim 8; at
# dim 512 the products dominate, and the per-call discretisation (counted once per sequence,
# so twice at the check's batch 2) stays a few percent.
_FLOPS = dataclasses.replace(_TINY, dim=512, n_layers=1, impl="reference")


# the reference layer's own optimiser settings (lssl.md, configs/model/layer/lssl.yaml): the
# transition (p, q, dg, the tridiagonal T, and b, which the code registers with it) at lr 1e-4,
# the step sizes at lr 1e-3, neither with weight decay
LSSL_GROUPS = (
    ParamGroup("transition", tuple(f"*.mixer.{k}" for k in ("p", "q", "dg", "t_diag", "t_sub",
                                                            "t_sup", "b")),
               weight_decay=False, lr=1e-4, why="lssl.yaml: transition lr 1e-4, no decay"),
    ParamGroup("dt", ("*.mixer.log_dt",), weight_decay=False, lr=1e-3,
               why="lssl.yaml: dt lr 1e-3, no decay"),
)


@register("lssl", config=LSSLConfig, param_count=lssl_param_count, flops=lssl_flops,
          groups=LSSL_GROUPS,
          conformance=ConformanceSpec(
              config=_TINY, length=13, cuts=(1, 4, 5, 12),
              reference={"impl": "reference"},
              fast=({"impl": "chunked", "block": 4},), flops_config=_FLOPS))
def build_lssl(cfg: LSSLConfig, rngs: nnx.Rngs) -> CausalLM:
    cfg.validate()
    return build_lm(lambda: _blocks(cfg, rngs), vocab_size=cfg.vocab_size, dim=cfg.dim,
                    final_norm=LayerNorm(cfg.dim, eps=cfg.norm_eps), rngs=rngs,
                    tie_embeddings=cfg.tie_embeddings, init_std=cfg.init_std,
                    compute_dtype=cfg.compute_dtype, remat=cfg.remat)


class LSSLClassifier(nnx.Module):
    """Encoder -> LSSL blocks -> (final LayerNorm when pre-norm) -> mean over real positions ->
    Linear(H -> n_classes). `model(inputs, state=None, *, mask=None, segment_ids=None, key=None)
    -> (logits [B, n_classes], None, {})`: a pooled head, outside the causal contract."""

    def __init__(self, cfg: LSSLConfig, rngs: nnx.Rngs):
        self.d_input = cfg.d_input
        if cfg.d_input > 0:
            self.encoder = Dense(cfg.d_input, cfg.dim, rngs=rngs, use_bias=True,
                                 axes=(None, "embed"), init="torch")
        else:
            self.encoder = Embed(cfg.vocab_size, cfg.dim, rngs=rngs, std=cfg.init_std)
        self.blocks = nnx.List(_blocks(cfg, rngs))
        self.final_norm = LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.prenorm else None
        self.decoder = Dense(cfg.dim, cfg.n_classes, rngs=rngs, use_bias=True,
                             axes=("embed", None), init="torch")
        self.compute_dtype = cfg.compute_dtype

    def __call__(self, inputs: Array, state=None, *, mask=None, segment_ids=None, key=None):
        if segment_ids is not None:
            raise ValueError("lssl_classifier pools whole sequences: packed inputs (segment_ids) "
                             "are not supported")
        B, T = inputs.shape[:2]
        h = self.encoder(inputs).astype(jnp.dtype(self.compute_dtype))
        for i, blk in enumerate(self.blocks):
            h, _, _ = blk(h, None, mask=mask, key=fold(key, 100 + i))
        if self.final_norm is not None:
            h = self.final_norm(h)
        m = real_mask(mask, B, T).astype(jnp.float32)[..., None]
        pooled = jnp.sum(h.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        return self.decoder(pooled).astype(jnp.float32), None, {}


@register("lssl_classifier", config=LSSLConfig, causal=False, resets=False, groups=LSSL_GROUPS,
          param_count=lssl_classifier_param_count, flops=lssl_classifier_flops,
          conformance=ConformanceSpec(
              config=dataclasses.replace(_TINY, n_layers=1), length=13, decode=False,
              reference={"impl": "reference"},
              fast=({"impl": "chunked", "block": 4},), flops_config=_FLOPS))
def build_lssl_classifier(cfg: LSSLConfig, rngs: nnx.Rngs) -> LSSLClassifier:
    cfg.validate()
    return LSSLClassifier(cfg, rngs)


def classifier_loss(graphdef, params, batch, key=None):
    """Mean cross-entropy of the pooled logits against `batch["labels"]` [B] (pure form)."""
    model = nnx.merge(graphdef, params)
    logits, _, _ = model(batch["inputs"], None, mask=batch.get("mask"), key=key)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["labels"][:, None].astype(jnp.int32), axis=-1)[:, 0]
    return jnp.mean(nll), {"ce": jnp.mean(nll),
                           "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["labels"])}
