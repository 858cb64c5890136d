"""optax pieces: warmup + cosine schedule, AdamW with decoupled weight decay on matrices only,
global-norm clipping; and the shardings of an optimizer state that mirror the parameters'."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def schedule(t) -> optax.Schedule:
    """Linear warmup from 0 to `t.lr` over `t.warmup_steps`, then cosine to lr * min_lr_ratio."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.lr, warmup_steps=int(t.warmup_steps),
        decay_steps=max(int(t.steps), int(t.warmup_steps) + 1), end_value=t.lr * t.min_lr_ratio)


def _decay_mask(params):
    """Weight decay on parameters with at least 2 dimensions (not norms, biases, gains)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(t) -> optax.GradientTransformation:
    parts = []
    if t.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(t.clip_norm))
    parts.append(optax.adamw(schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                             weight_decay=t.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)


def opt_state_shardings(opt: optax.GradientTransformation, abstract_opt_state, param_shardings,
                        mesh) -> object:
    """Shardings for the optimizer state: moments like their parameters, the rest replicated."""
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(opt, lambda _, s: s, abstract_opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
