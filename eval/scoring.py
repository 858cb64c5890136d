"""Scoring: every metric of every task goes through these functions, for real and test models alike.

Models are reached only through the zoo's pure API (`zoo.lm.forward`, `zoo.lm.generate`) over a
graph definition and parameters. Device work is jitted once per shape; reductions happen on the
host in float64.

  token_nll(model, inputs, targets, segment_ids) -> float64 [B, T] per-token negative log-lik.
  predictions(model, inputs)                      -> int32 [B, T] argmax (teacher forcing)
  labelled_accuracy(preds, labels)               -> (mean per-example accuracy, exact-match rate)
  generate(model, prompt, mask, n_new)           -> greedy continuations through the state
  generate_answers(model, inputs, labels)        -> a labelled answer decoded through the state
  perplexity / bits_per_byte                      -> from nll sums
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import zoo

IGNORE = -100


@dataclasses.dataclass
class Model:
    """A model under evaluation: graph definition, parameters and what the tasks need to know.

    max_len: the learned-position limit (None: unlimited). mesh: batches are sharded over its
    ('data', 'fsdp') axes when the batch divides them, replicated otherwise.
    """
    graphdef: Any
    params: Any
    vocab_size: int
    max_len: int | None = None
    name: str = ""
    mesh: Mesh | None = None

    def fits(self, length: int) -> bool:
        return self.max_len is None or length <= self.max_len


def place(model: Model, x: np.ndarray) -> jax.Array:
    x = np.asarray(x)
    if model.mesh is None:
        return jnp.asarray(x)
    n = model.mesh.shape["data"] * model.mesh.shape["fsdp"]
    if x.shape[0] % n == 0:
        spec = P(("data", "fsdp"), *([None] * (x.ndim - 1)))
    else:
        spec = P()
    return jax.device_put(x, NamedSharding(model.mesh, spec))


@functools.partial(jax.jit, static_argnums=0)
def _token_nll(graphdef, params, inputs, targets, segment_ids):
    logits, _, _ = zoo.lm.forward(graphdef, params, inputs, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=0)
def _argmax(graphdef, params, inputs):
    logits, _, _ = zoo.lm.forward(graphdef, params, inputs)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def token_nll(model: Model, inputs, targets, segment_ids=None) -> np.ndarray:
    """Per-token negative log-likelihood in nats, float64 [B, T]."""
    seg = None if segment_ids is None else place(model, segment_ids)
    out = _token_nll(model.graphdef, model.params, place(model, inputs), place(model, targets), seg)
    return np.asarray(out, np.float64)


def predictions(model: Model, inputs) -> np.ndarray:
    """Greedy prediction at every position, teacher-forced (one forward pass), int32 [B, T]."""
    return np.asarray(_argmax(model.graphdef, model.params, place(model, inputs)))


def labelled_accuracy(preds: np.ndarray, labels: np.ndarray) -> tuple[float, float, int]:
    """(mean over examples of the fraction of labelled positions predicted right,
        fraction of examples with every labelled position right, number of examples).

    Examples without any labelled position are left out."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    lab = labels != IGNORE
    n_lab = lab.sum(axis=1)
    keep = n_lab > 0
    correct = ((preds == labels) & lab).sum(axis=1)
    frac = correct[keep] / n_lab[keep]
    if frac.size == 0:
        return float("nan"), float("nan"), 0
    return float(frac.mean()), float((frac == 1.0).mean()), int(frac.size)


def answer_spans(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first labelled position, number of labelled positions) per row. The labelled positions
    of a generation example must form one contiguous block (the answer); this is checked."""
    labels = np.asarray(labels)
    lab = labels != IGNORE
    n = lab.sum(axis=1)
    if np.any(n == 0):
        raise ValueError("a generation example has no labelled position")
    start = lab.argmax(axis=1)
    end = labels.shape[1] - lab[:, ::-1].argmax(axis=1)
    if np.any(end - start != n):
        raise ValueError("labelled positions of a generation example are not contiguous")
    return start, n


def pad_prompts(prompts: Sequence[np.ndarray], length: int | None = None):
    """Right-pad 1-D prompts to `length` (default: the longest): (tokens [B, P], mask [B, P])."""
    lens = np.array([len(p) for p in prompts])
    P_ = int(lens.max()) if length is None else int(length)
    if lens.max() > P_:
        raise ValueError(f"prompt of {lens.max()} tokens is longer than the padded length {P_}")
    out = np.zeros((len(prompts), P_), np.int32)
    mask = np.arange(P_)[None, :] < lens[:, None]
    for i, p in enumerate(prompts):
        out[i, :len(p)] = p
    return out, mask


def generate(model: Model, prompt: np.ndarray, mask: np.ndarray | None, n_new: int) -> np.ndarray:
    """Greedy decoding of n_new tokens after right-padded prompts, through the recurrent state /
    KV cache (zoo.lm.generate). int32 [B, n_new]."""
    pm = None if mask is None or np.all(mask) else place(model, mask)
    out = zoo.lm.generate(model.graphdef, model.params, place(model, prompt), n_new, prompt_mask=pm)
    return np.asarray(out)


def generate_answers(model: Model, inputs, labels, prompt_len: int | None = None):
    """Greedy decoding of each example's labelled answer (teacher-forced data turned into a
    generation task): the prompt of a row is inputs[:start+1], up to and including the token whose
    label is the first answer token; then as many tokens as the row has labels are decoded.

    Returns (generated int32 [B, n_max], reference int32 [B, n_max] with IGNORE past a row's
    answer). `prompt_len` pads every prompt to one length (one compilation per setting)."""
    inputs, labels = np.asarray(inputs), np.asarray(labels)
    start, n = answer_spans(labels)
    prompts = [inputs[i, :start[i] + 1] for i in range(inputs.shape[0])]
    prompt, mask = pad_prompts(prompts, prompt_len)
    n_new = int(n.max())
    ref = np.full((inputs.shape[0], n_new), IGNORE, np.int32)
    for i in range(inputs.shape[0]):
        ref[i, :n[i]] = labels[i, start[i]:start[i] + n[i]]
    return generate(model, prompt, mask, n_new), ref


def decode_throughput(model: Model, prompt: np.ndarray, n_new: int) -> dict[str, float]:
    """Tokens/s of greedy decoding through the state after a prefill of `prompt` [B, P].

    tokens_per_s: B*n_new / (time of generate(prompt, n_new)), prefill included.
    decode_tokens_per_s: B*(n_new-1) / (time(n_new) - time(1)): the per-token state updates alone;
    left out when that difference is under 10% of time(n_new) (too few new tokens to tell it
    from timing noise).
    Times are the best of 5 runs after compilation.
    """
    B = prompt.shape[0]
    x = place(model, prompt)

    def best(k):
        f = lambda: jax.block_until_ready(zoo.lm.generate(model.graphdef, model.params, x, k))
        f()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    t_all = best(n_new)
    out = {"tokens_per_s": B * n_new / t_all}
    if n_new > 1:
        t_one = best(1)
        if t_all - t_one >= 0.1 * t_all:
            out["decode_tokens_per_s"] = B * (n_new - 1) / (t_all - t_one)
    return out


def perplexity(nll_sum: float, n_tokens: float) -> float:
    return math.exp(nll_sum / n_tokens)


def bits_per_byte(nll_sum: float, n_bytes: float) -> float:
    """Total information in bits over the number of bytes it encodes."""
    return nll_sum / math.log(2.0) / n_bytes


def batched(n: int, batch_size: int) -> Iterable[np.ndarray]:
    """Index arrays covering range(n) in chunks of at most batch_size (pad each chunk with
    `pad_rows` to keep one shape per setting; keep only the first len(idx) results)."""
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(s + batch_size, n))
        yield idx


def pad_rows(x: np.ndarray, batch_size: int) -> np.ndarray:
    """Pad the first dimension to batch_size by repeating the first row (fixed shapes, one
    compilation per setting)."""
    if x.shape[0] == batch_size:
        return x
    reps = np.repeat(x[:1], batch_size - x.shape[0], axis=0)
    return np.concatenate([x, reps], axis=0)
