"""optax pieces: warmup + cosine schedule, AdamW with decoupled weight decay by parameter group
(matrices only by default; each registry entry's `groups` give its family's reference choices:
no-decay sets, per-group learning rates), global-norm clipping; and the shardings of an
optimizer state that mirror the parameters'; and annealed parameters (`train.anneal`), set from the
step by a linear schedule instead of by gradients."""
from __future__ import annotations

import fnmatch

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


def _path(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def param_groups(params, groups=(), lr: float = 1.0) -> dict:
    """{dotted path: (weight decay?, peak learning rate, group name)} of every parameter.

    The default rule: weight decay on parameters with at least 2 dimensions (not norms, biases,
    gains), the base rate `lr`. A registry entry's `groups` (zoo.ParamGroup, the family's
    reference choices) override it for the paths they match, the first match winning."""
    out = {}
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _path(path)
        decay, rate, group = jnp.ndim(p) >= 2, lr, ""
        for g in groups:
            if any(fnmatch.fnmatchcase(name, pat) for pat in g.patterns):
                decay = decay if g.weight_decay is None else g.weight_decay
                rate = lr if g.lr is None else g.lr
                group = g.name
                break
        out[name] = (bool(decay), float(rate), group)
    return out


def parse_anneal(spec: str) -> list[tuple[str, float, float]]:
    """`train.anneal` "glob=start:end,..." -> [(glob, start, end)]; ValueError naming the item."""
    out = []
    for item in filter(None, (x.strip() for x in (spec or "").split(","))):
        pat, eq, rng = item.partition("=")
        start, colon, end = rng.partition(":")
        try:
            if not (eq and colon and pat):
                raise ValueError
            out.append((pat, float(start), float(end)))
        except ValueError:
            raise ValueError(f"train.anneal: {item!r} is not glob=start:end "
                             "(e.g. *.moe.temperature=2.0:1.0)") from None
    return out


def check_anneal(params, table) -> None:
    """Every `train.anneal` glob matches a parameter (ValueError naming the first that does not)."""
    names = [_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for pat, _, _ in table:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ValueError(f"train.anneal: {pat!r} matches no parameter of the model")


def anneal(params, table, step, steps: int):
    """params with every leaf that a glob of `table` matches set to start + (end - start) · s /
    (steps - 1) at step s (clipped to [start, end]), under stop_gradient: the loss sees the
    scheduled value, the gradient and so the optimiser's update of that leaf are 0."""
    if not table:
        return params
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps - 1, 1), 0.0, 1.0)

    def set_leaf(path, leaf):
        name = _path(path)
        for pat, start, end in table:
            if fnmatch.fnmatchcase(name, pat):
                value = start + (end - start) * frac
                return jax.lax.stop_gradient(jnp.full(leaf.shape, value, leaf.dtype))
        return leaf
    return jax.tree_util.tree_map_with_path(set_leaf, params)


def _scale_updates(scales) -> optax.GradientTransformation:
    """Multiply each parameter's update by its constant (a tree of floats like the params)."""
    def update(updates, state, params=None):
        return jax.tree.map(lambda u, c: u if c == 1.0 else u * c, updates, scales), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(t, groups=(), params=None) -> optax.GradientTransformation:
    """Clip, then AdamW on the schedule with decoupled weight decay by `param_groups`. A group
    with its own rate scales its updates (decay term included) by rate / t.lr, which is
    PyTorch's per-group lr under one schedule; only then does the chain grow a stage (older
    checkpoints of models without such groups keep their optimiser-state layout)."""
    parts = []
    if t.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(t.clip_norm))
    if params is None or not groups:
        mask = lambda ps: jax.tree.map(lambda p: jnp.ndim(p) >= 2, ps)  # noqa: E731
        scales = None
    else:
        table = param_groups(params, groups, t.lr)
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        names = [_path(path) for path, _ in flat]
        decay_tree = jax.tree_util.tree_unflatten(treedef, [table[n][0] for n in names])
        mask = lambda ps: decay_tree  # noqa: E731
        ratios = [table[n][1] / t.lr for n in names]
        scales = (jax.tree_util.tree_unflatten(treedef, ratios)
                  if any(r != 1.0 for r in ratios) else None)
    parts.append(optax.adamw(schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                             weight_decay=t.weight_decay, mask=mask))
    if scales is not None:
        parts.append(_scale_updates(scales))
    return optax.chain(*parts)


def opt_state_shardings(opt: optax.GradientTransformation, abstract_opt_state, param_shardings,
                        mesh) -> object:
    """Shardings for the optimizer state: moments like their parameters, the rest replicated."""
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(opt, lambda _, s: s, abstract_opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
