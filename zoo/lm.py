"""The shared causal-LM scaffold and the pure API shared by train, eval and notebooks.

Model-level call (mirrors the mixer contract):
    logits, state, aux = model(tokens[B, T], state=None, *, mask=None, segment_ids=None, key=None)
State is {"pos": int32[B] (position of the next token), "layers": tuple of mixer states}.
`aux` is the sum over layers of each layer's auxiliary statistics; `model.aux_terms(aux)` turns
them into named loss terms that the trainer weights from its config.

Pure forms over (graphdef, params) from `nnx.split(model)`:
    forward(graphdef, params, tokens, state=None, mask=None, segment_ids=None, key=None)
    loss(graphdef, params, batch, aux_weights=None, key=None) -> (scalar, metrics)
    generate(graphdef, params, prompt, n_new, ...) -> tokens
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import count_params as count_params  # re-exported for train and eval
from layers.common import doc_starts, dropout, fold, real_mask, token_positions
from layers.embed import Embed, LearnedPositions
from layers.linear import Dense
from layers.mlp import SwiGLU
from layers.norms import RMSNorm

Array = jax.Array


def sum_aux(auxes: Sequence[Mapping[str, Array]]) -> dict[str, Array]:
    out: dict[str, Array] = {}
    for a in auxes:
        for k, v in a.items():
            out[k] = out[k] + v if k in out else v
    return out


class Block(nnx.Module):
    """Pre-norm residual block: h + drop(mixer(norm1(h))), then h + drop(ffn(norm2(h))).

    `ffn=None` gives a mixer-only block (Mamba, Zoology's attention-only preset).
    """

    def __init__(self, mixer: nnx.Module, norm1: nnx.Module, ffn: nnx.Module | None = None,
                 norm2: nnx.Module | None = None, resid_dropout: float = 0.0):
        self.mixer, self.norm1, self.ffn, self.norm2 = mixer, norm1, ffn, norm2
        self.resid_dropout = resid_dropout

    def init_state(self, batch_size: int, max_len: int | None = None):
        return self.mixer.init_state(batch_size, max_len)

    def __call__(self, x, state=None, *, mask=None, segment_ids=None, context=None, key=None):
        det = key is None
        y, state, aux = self.mixer(self.norm1(x), state, mask=mask, segment_ids=segment_ids,
                                   context=context, deterministic=det, key=fold(key, 0))
        x = x + dropout(y, self.resid_dropout, fold(key, 1))
        if self.ffn is not None:
            y = self.ffn(self.norm2(x), key=fold(key, 2))
            x = x + dropout(y, self.resid_dropout, fold(key, 3))
        return x, state, aux


class CausalLM(nnx.Module):
    """Embedding (+ optional learned positions), a stack of blocks, final norm, LM head."""

    def __init__(self, *, embed: Embed, blocks: Sequence[nnx.Module], final_norm: nnx.Module,
                 head: Dense | None = None, positions: LearnedPositions | None = None,
                 embed_dropout: float = 0.0, max_len: int | None = None,
                 compute_dtype: str = "float32", remat: str = "none",
                 aux_terms: Callable[[Mapping[str, Array]], dict[str, Array]] | None = None):
        self.embed, self.positions, self.final_norm, self.head = embed, positions, final_norm, head
        self.blocks = nnx.List(list(blocks))
        self.embed_dropout = embed_dropout
        self.max_len = max_len          # learned-position limit (None: unlimited)
        self.compute_dtype = compute_dtype
        self.remat = remat
        self._aux_terms = aux_terms

    @property
    def vocab_size(self) -> int:
        return self.embed.vocab_size

    def aux_terms(self, aux: Mapping[str, Array]) -> dict[str, Array]:
        """Named auxiliary loss terms formed from the summed statistics (empty by default)."""
        return {} if self._aux_terms is None else self._aux_terms(aux)

    def init_state(self, batch_size: int, max_len: int | None = None) -> dict[str, Any]:
        return {"pos": jnp.zeros((batch_size,), jnp.int32),
                "layers": tuple(b.init_state(batch_size, max_len) for b in self.blocks)}

    def check_length(self, start: int, length: int) -> None:
        """Reject (before tracing) inputs past a learned-position limit."""
        if self.max_len is not None and start + length > self.max_len:
            raise ValueError(f"sequence of {start + length} tokens exceeds this model's max_len "
                             f"{self.max_len} (learned positions)")

    def embed_tokens(self, tokens, pos, key=None):
        h = self.embed(tokens)
        if self.positions is not None:
            h = h + self.positions(pos)
        h = dropout(h, self.embed_dropout, key)
        return h.astype(jnp.dtype(self.compute_dtype))

    def logits(self, h):
        h = self.final_norm(h)
        out = self.embed.attend(h) if self.head is None else self.head(h)
        return out.astype(jnp.float32)

    def call_block(self, i: int, h, state, *, mask, segment_ids, key, context=None):
        """Block i on h (under the model's remat policy): (h, new state, aux)."""
        blk = self.blocks[i]
        if self.remat == "none":
            return blk(h, state, mask=mask, segment_ids=segment_ids, context=context,
                       key=fold(key, 100 + i))
        # nnx.remat takes positional arguments only
        call = nnx.remat(lambda b, x, st, m, sid, ctx, k: b(x, st, mask=m, segment_ids=sid,
                                                             context=ctx, key=k),
                         policy=remat_policy(self.remat))
        return call(blk, h, state, mask, segment_ids, context, fold(key, 100 + i))

    def run_blocks(self, h, states, *, mask, segment_ids, key, hiddens: list | None = None):
        """The block stack; `hiddens`, when given, receives the residual stream after each block
        (analysis: eval.fidelity)."""
        auxes, new_states = [], []
        for i in range(len(self.blocks)):
            h, s, a = self.call_block(i, h, states[i], mask=mask, segment_ids=segment_ids, key=key)
            new_states.append(s)
            auxes.append(a)
            if hiddens is not None:
                hiddens.append(h)
        return h, tuple(new_states), sum_aux(auxes)

    def __call__(self, tokens: Array, state=None, *, mask=None, segment_ids=None, key=None):
        B, T = tokens.shape
        if state is None:
            if self.max_len is not None and not isinstance(T, jax.core.Tracer):
                self.check_length(0, T)
            state = self.init_state(B)
            states = (None,) * len(self.blocks)
        else:
            states = state["layers"]
        m = real_mask(mask, B, T)
        pos, _, next_pos = token_positions(state["pos"], doc_starts(segment_ids, B, T), m)
        h = self.embed_tokens(tokens, pos, fold(key, 0))
        h, new_states, aux = self.run_blocks(h, states, mask=mask, segment_ids=segment_ids, key=key)
        return self.logits(h), {"pos": next_pos, "layers": new_states}, aux


def build_lm(blocks: Sequence[nnx.Module] | Callable[[], Sequence[nnx.Module]], *, vocab_size: int,
             dim: int, final_norm: nnx.Module, rngs: nnx.Rngs, tie_embeddings: bool = True,
             init: str = "normal", init_std: float = 0.02, learned_positions: int | None = None,
             positions_std: float | None = None, embed_dropout: float = 0.0,
             compute_dtype: str = "float32", remat: str = "none",
             aux_terms: Callable[[Mapping[str, Array]], dict[str, Array]] | None = None,
             lm_cls: type | None = None, **lm_kw) -> CausalLM:
    """The one causal-LM assembly: token embedding N(0, init_std) (init "torch": the
    U(+-1/sqrt(D)) of PyTorch's Linear), optional learned positions (`learned_positions` = their
    table length, the hard length limit), `blocks`, `final_norm`, and the head: tied to the
    embedding, or an untied Dense [D, V]. `blocks` may be a callable, called after the
    embedding and positions are drawn (the Transformer's parameter order). `lm_cls` (a subclass
    of CausalLM, with its own keyword arguments `lm_kw`) is for stacks whose layers interact
    across depth (MemMamba's cross-layer reads)."""
    embed = Embed(vocab_size, dim, rngs=rngs, init="normal" if init == "normal" else "torch_linear",
                  std=init_std)
    positions = None
    if learned_positions is not None:
        positions = LearnedPositions(learned_positions, dim, rngs=rngs,
                                     std=init_std if positions_std is None else positions_std)
    head = None if tie_embeddings else Dense(dim, vocab_size, rngs=rngs, axes=("embed", "vocab"),
                                             init=init, std=init_std)
    blocks = list(blocks() if callable(blocks) else blocks)
    return (lm_cls or CausalLM)(embed=embed, blocks=blocks, final_norm=final_norm, head=head,
                                positions=positions, embed_dropout=embed_dropout,
                                max_len=learned_positions, compute_dtype=compute_dtype,
                                remat=remat, aux_terms=aux_terms, **lm_kw)


def swiglu_block(mixer: nnx.Module, *, dim: int, ffn_dim: int, norm_eps: float, init_std: float,
                 rngs: nnx.Rngs) -> Block:
    """The Llama block around any mixer: [mixer, SwiGLU] with pre-RMSNorms (Titans, ATLAS, the
    Miras models and the DeepTransformer use it; titans.md §3.1)."""
    return Block(mixer, RMSNorm(dim, eps=norm_eps), SwiGLU(dim, ffn_dim, rngs=rngs, std=init_std),
                 RMSNorm(dim, eps=norm_eps))


def swiglu_block_count(mixer: int, *, dim: int, ffn_dim: int) -> int:
    """Parameters of a `swiglu_block`: the mixer's, the SwiGLU's and the two RMSNorms'."""
    return mixer + 3 * dim * ffn_dim + 2 * dim


def swiglu_block_flops(mixer: float, *, dim: int, ffn_dim: int) -> float:
    """Forward FLOPs per token of a `swiglu_block`: the mixer's and the SwiGLU's three products."""
    return mixer + 3 * dense_flops(dim, ffn_dim)


def lm_param_count(blocks: int | Sequence[int], *, vocab_size: int, dim: int,
                   tie_embeddings: bool = True, final_norm: int | None = None,
                   learned_positions: int | None = None) -> int:
    """Parameters of a `build_lm` model: embedding (and untied head), learned positions, the
    blocks' counts (one int each, or their sum) and the final norm (default: RMSNorm, `dim`)."""
    total = blocks if isinstance(blocks, int) else sum(blocks)
    total += vocab_size * dim * (1 if tie_embeddings else 2)
    total += (learned_positions or 0) * dim
    return total + (dim if final_norm is None else final_norm)


def remat_policy(name: str):
    policies = {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    if name not in policies:
        raise ValueError(f"unknown remat policy {name!r}; known: none, {', '.join(policies)}")
    return policies[name]


# ----------------------------------------------------------------------------- FLOPs
# Training FLOPs per token, as every registry entry declares them (`register(..., flops=...)`):
# 3 x the forward FLOPs (the backward of a product is two products of the same size), where the
# forward counts 2 per multiply-add of every product: projections, the LM head, attention scores
# and values (keys per query: the whole causal prefix, no causal halving, as PaLM counts; the
# window + 1 for sliding-window layers), and the products inside scans and state updates
# (recurrent states, test-time memories). Elementwise work (norms, activations, gates, softmax)
# is not counted. tests/test_flops.py checks every entry against XLA's cost analysis of its
# training step with every loop unrolled.

TRAIN_FACTOR = 3.0


def dense_flops(n_in: int, n_out: int) -> float:
    """Forward FLOPs per token of an [n_in, n_out] product."""
    return 2.0 * n_in * n_out


def attention_flops(n_heads: int, head_dim: int, keys: int, value_dim: int | None = None) -> float:
    """Forward FLOPs per query of softmax attention over `keys` keys: scores q.k and the
    weighted sum of values (`value_dim` per head, default `head_dim`)."""
    return 2.0 * n_heads * keys * (head_dim + (head_dim if value_dim is None else value_dim))


def causal_keys(seq_len: int, window: int | None = None, extra: int = 0) -> int:
    """Keys per query in the FLOP convention above: the prefix (seq_len), or window + 1 keys
    for a sliding window, plus `extra` always-visible keys (persistent tokens)."""
    keys = seq_len if window is None else min(seq_len, window + 1)
    return keys + extra


def lm_flops(blocks_forward: float | Sequence[float], *, vocab_size: int, dim: int) -> float:
    """Training FLOPs per token of a `build_lm` model: 3 x (the blocks' forward FLOPs per token,
    one number each or their sum, + the LM head's [dim, vocab] product); the embedding lookup
    is free."""
    blocks = blocks_forward if isinstance(blocks_forward, (int, float)) else sum(blocks_forward)
    return TRAIN_FACTOR * (blocks + dense_flops(dim, vocab_size))


# ----------------------------------------------------------------------------- pure forms

def forward(graphdef, params, tokens, state=None, *, mask=None, segment_ids=None, key=None):
    model = nnx.merge(graphdef, params)
    return model(tokens, state, mask=mask, segment_ids=segment_ids, key=key)


def cross_entropy(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
    """Sum of token cross-entropies (float32) and the number of weighted tokens."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = weights.astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


def loss(graphdef, params, batch: Mapping[str, Array], *, aux_weights: Mapping[str, float] | None = None,
         key=None) -> tuple[Array, dict[str, Array]]:
    """Mean next-token cross-entropy over `batch["loss_mask"]` plus weighted auxiliary terms.

    batch: "inputs" [B, T], "targets" [B, T], optional "loss_mask" [B, T] (default all ones),
    "mask" (real tokens, right padded) and "segment_ids" (packed documents).
    metrics carry the sums ("ce_sum", "n_tokens") so accumulation can recombine exactly.
    """
    model = nnx.merge(graphdef, params)
    inputs = batch["inputs"]
    logits, _, aux = model(inputs, None, mask=batch.get("mask"),
                           segment_ids=batch.get("segment_ids"), key=key)
    w = batch.get("loss_mask")
    if w is None:
        w = jnp.ones(inputs.shape, jnp.float32)
    ce_sum, n = cross_entropy(logits, batch["targets"], w)
    ce = ce_sum / jnp.maximum(n, 1.0)
    total = ce
    metrics = {"ce_sum": ce_sum, "n_tokens": n, "ce": ce}
    for name, value in model.aux_terms(aux).items():
        metrics[f"aux/{name}"] = value
        weight = (aux_weights or {}).get(name, 0.0)
        if weight:
            total = total + weight * value
    metrics["loss"] = total
    return total, metrics


def check_generation_length(model: CausalLM, prompt_len: int, n_new: int,
                            max_len: int | None) -> None:
    """Reject a decode that would pass a cache or learned-position limit, before tracing. The
    positions fed are the prompt and every new token but the last (sampled, never fed)."""
    model.check_length(0, prompt_len + n_new - 1)
    if max_len is not None and prompt_len + n_new - 1 > max_len:
        raise ValueError(f"prompt length {prompt_len} + {n_new} new tokens exceeds the cache "
                         f"max_len {max_len}")


def sample(logits: Array, key: Array | None, temperature: float, top_k: int | None = None) -> Array:
    if temperature == 0.0 or key is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(graphdef, params, prompt: Array, n_new: int, *, prompt_mask: Array | None = None,
             key: Array | None = None, temperature: float = 0.0, top_k: int | None = None,
             max_len: int | None = None, return_state: bool = False):
    """Prefill `prompt` (right padded by `prompt_mask`), then decode `n_new` tokens through the
    recurrent state / KV cache. Greedy when temperature == 0. Returns int32 [B, n_new]."""
    model = nnx.merge(graphdef, params)
    B, P = prompt.shape
    max_len = max_len or (P + n_new)
    check_generation_length(model, P, n_new, max_len)
    return _generate(graphdef, params, prompt, prompt_mask, key, n_new=n_new,
                     temperature=temperature, top_k=top_k, max_len=max_len,
                     return_state=return_state)


def _generate_impl(graphdef, params, prompt, prompt_mask, key, *, n_new, temperature, top_k,
                   max_len, return_state):
    model = nnx.merge(graphdef, params)
    B, P = prompt.shape
    state = model.init_state(B, max_len)
    logits, state, _ = model(prompt, state, mask=prompt_mask)
    m = real_mask(prompt_mask, B, P)
    last = jnp.maximum(m.sum(axis=1).astype(jnp.int32) - 1, 0)
    last_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    keys = (jax.random.split(key, n_new) if key is not None else [None] * n_new)
    tok = sample(last_logits, None if key is None else keys[0], temperature, top_k)

    def step(carry, k):
        tok, state = carry
        logits, state, _ = model(tok[:, None], state)
        nxt = sample(logits[:, 0], k, temperature, top_k)
        return (nxt, state), tok

    if n_new == 1:
        out, final = tok[:, None], state
    else:
        step_keys = None if key is None else keys[1:]
        if step_keys is None:
            (last_tok, final), toks = jax.lax.scan(lambda c, _: step(c, None), (tok, state), None,
                                                   length=n_new - 1)
        else:
            (last_tok, final), toks = jax.lax.scan(step, (tok, state), step_keys)
        out = jnp.concatenate([jnp.moveaxis(toks, 0, 1), last_tok[:, None]], axis=1)
    return (out, final) if return_state else out


_generate = jax.jit(_generate_impl, static_argnums=(0,),
                    static_argnames=("n_new", "temperature", "top_k", "max_len", "return_state"))
