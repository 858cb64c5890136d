"""`checkpoint.init_from`: a fresh run whose parameters start from another run's checkpoint.

A staged curriculum (configs/hydra.py's stage1..stage4) grows the model between stages; each
stage starts from the previous stage's run directory, "<run dir>[@<step>]". Every parameter whose
path and shape the source has is loaded (cast to its dtype, placed in its sharding); the others
keep their fresh initialisation. Only a run without checkpoints of its own starts so: a resumed
run restores its own state (train.trainer.Trainer.run).
"""
from __future__ import annotations

import jax

from train import config as config_lib
from train.rundir import RunDir


def parse(spec: str) -> tuple[str, int | None]:
    """checkpoint.init_from "<run dir>[@<step>]" -> (run dir, step or None)."""
    path, _, step = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if step and not step.isdigit():
        raise config_lib.ConfigError(f"checkpoint.init_from={spec!r}: the step after '@' must be an integer")
    return path, int(step) if step else None


def check(spec: str) -> None:
    """checkpoint.init_from names a run directory with a complete checkpoint (at its step)."""
    path, step = parse(spec)
    steps = RunDir(path).steps() if RunDir(path).exists() else []
    if not steps:
        raise config_lib.ConfigError(f"checkpoint.init_from={spec!r}: {path!r} has no complete checkpoint")
    if step is not None and step not in steps:
        raise config_lib.ConfigError(f"checkpoint.init_from={spec!r}: no checkpoint at step {step} "
                          f"(steps: {steps})")


def partial_init(params: dict, source: dict) -> tuple[dict, list[str], list[str], list[str]]:
    """params with every leaf whose path and shape `source` has replaced by the source's
    (cast to the leaf's dtype and placed in its sharding). Returns (params, loaded paths, fresh
    paths, source paths left unused)."""
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    src = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(source)[0]}
    loaded, fresh, out = [], [], {}
    for k, v in flat.items():
        key = jax.tree_util.keystr(k)
        w = src.get(key)
        if w is not None and tuple(w.shape) == tuple(v.shape):
            out[k] = jax.device_put(w.astype(v.dtype), v.sharding)
            loaded.append(key)
        else:
            out[k] = v
            fresh.append(key)
    unused = sorted(set(src) - set(loaded))
    treedef = jax.tree_util.tree_structure(params)
    return jax.tree_util.tree_unflatten(treedef, [out[k] for k in flat]), loaded, fresh, unused


def initialise(params: dict, spec: str, mesh) -> tuple[dict, str]:
    """params partially restored from the checkpoint `spec` names, and the log line saying how
    many arrays were loaded, kept fresh (the first four named) and left unused."""
    path, at = parse(spec)
    _, _, _, source = RunDir(path).restore_params(at, mesh=mesh)
    params, loaded, fresh, unused = partial_init(params, source)
    line = (f"initialised from {path}: {len(loaded)} parameter arrays loaded, {len(fresh)} fresh"
            + (f" ({', '.join(fresh[:4])}{', ...' if len(fresh) > 4 else ''})" if fresh else "")
            + (f", {len(unused)} of the source unused" if unused else ""))
    return params, line
