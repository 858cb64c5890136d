"""The pure training and evaluation steps (no devices, no files): `make_train_step` (loss,
gradient accumulation over micro-batches, the named aux terms, `train.anneal`'s scheduled
parameters, the optimiser update) and `make_eval_step` (the held-out sums). train.trainer jits
them onto the mesh."""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from train import config as config_lib
from train import optim
from zoo import lm

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids")


# ----------------------------------------------------------------------------- pure steps

def make_train_step(graphdef, opt: optax.GradientTransformation, *,
                    aux_weights: Mapping[str, float] | None = None, grad_accum: int = 1,
                    dropout_seed: int | None = None, batch_spec: P | None = None,
                    anneal: tuple = (), steps: int = 1):
    """step(params, opt_state, step, batch) -> (params, opt_state, step + 1, metrics).
    `anneal` (train.optim.parse_anneal's table) sets its parameters from the step first.

    metrics: loss (objective), ce (mean cross-entropy over loss_mask), ce_sum, n_tokens,
    aux/<name> (mean over micro-batches), grad_norm.
    """
    aux_weights = dict(aux_weights or {})

    def micro_loss(params, mb, n_total, key):
        _, m = lm.loss(graphdef, params, mb, key=key)
        names = {k[4:] for k in m if k.startswith("aux/")}
        for name in aux_weights:
            if name not in names:
                raise config_lib.ConfigError(
                    f"train.aux_weights.{name}: the model has no auxiliary term {name!r} "
                    f"(it has: {', '.join(sorted(names)) or 'none'})")
        obj = m["ce_sum"] / n_total
        for name, w in aux_weights.items():
            obj = obj + w * m[f"aux/{name}"] / grad_accum
        out = {"ce_sum": m["ce_sum"], "n_tokens": m["n_tokens"]}
        out.update({k: v / grad_accum for k, v in m.items() if k.startswith("aux/")})
        return obj, out

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step_fn(params, opt_state, step, batch):
        params = optim.anneal(params, anneal, step, steps)
        batch = {k: v for k, v in batch.items() if k in BATCH_KEYS}
        if "loss_mask" not in batch:
            batch["loss_mask"] = jnp.ones(batch["inputs"].shape, jnp.float32)
        n_total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        base = None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), step)
        if grad_accum == 1:
            (obj, m), grads = grad_fn(params, batch, n_total, base)
        else:
            def split(x):
                # micro-batch j takes rows j, j+A, j+2A, ...: every data shard contributes to
                # every micro-batch, so the split needs no communication
                B = x.shape[0]
                y = x.reshape(B // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
                if batch_spec is not None:
                    y = jax.lax.with_sharding_constraint(
                        y, P(None, *batch_spec, *([None] * (y.ndim - 1 - len(batch_spec)))))
                return y
            micro = {k: split(v) for k, v in batch.items()}

            def body(carry, xs):
                i, mb = xs
                key = None if base is None else jax.random.fold_in(base, i)
                (obj, m), g = grad_fn(params, mb, n_total, key)
                acc_g, acc_obj, acc_m = carry
                acc_g = jax.tree.map(jnp.add, acc_g, g)
                acc_m = jax.tree.map(jnp.add, acc_m, m)
                return (acc_g, acc_obj + obj, acc_m), None

            zeros_g = jax.tree.map(jnp.zeros_like, params)
            m_shape = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda v: v[0], micro),
                                                     n_total, base)[0][1])
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
            (grads, obj, m), _ = jax.lax.scan(
                body, (zeros_g, jnp.zeros((), jnp.float32), zeros_m),
                (jnp.arange(grad_accum), micro))
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(m)
        metrics["loss"] = obj
        metrics["ce"] = m["ce_sum"] / n_total
        metrics["grad_norm"] = optax.tree.norm(grads)
        return params, opt_state, step + 1, metrics

    return step_fn


def make_eval_step(graphdef):
    """eval(params, batch) -> {ce_sum, n_tokens, correct}: sums over loss_mask positions."""
    def eval_fn(params, batch):
        logits, _, _ = lm.forward(graphdef, params, batch["inputs"],
                                  segment_ids=batch.get("segment_ids"))
        w = batch.get("loss_mask")
        if w is None:
            w = jnp.ones(batch["inputs"].shape, jnp.float32)
        ce_sum, n = lm.cross_entropy(logits, batch["targets"], w)
        pred = jnp.argmax(logits, axis=-1)
        correct = jnp.sum((pred == batch["targets"]).astype(jnp.float32) * w)
        return {"ce_sum": ce_sum, "n_tokens": n, "correct": correct}
    return eval_fn


# ----------------------------------------------------------------------------- setup helpers
