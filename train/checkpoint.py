"""Checkpoints and the run-directory contract shared by the trainer and `python -m eval`.

A run directory holds:

  run_dir/config.json      the resolved config (all sections) as JSON, written at start.
  run_dir/checkpoints/     an orbax CheckpointManager directory: one sub-directory per saved
                           step, each with three items saved together (one step = one unit):
                             "state"   StandardSave of {"params": <pure dict of the model's
                                       nnx state>, "opt_state": <optax state over the same
                                       pure dict>, "step": int32}
                             "config"  JsonSave of the resolved config
                             "data"    the grain iterator state (grain.checkpoint.CheckpointSave)
                           Incomplete (still writing, or killed) steps are ignored by orbax.
  run_dir/metrics.jsonl    one JSON object per logged step ({"step", "loss", "tokens_per_s",
                           "mfu", ...}) and per evaluation ({"step", "split": "val",
                           "val_loss", "val_accuracy", ...}).
  run_dir/tb/              tensorboardX event files.

Parameters are stored as the *pure dict* of the model's nnx state (`nnx.to_pure_dict(state)`;
`nnx.merge(graphdef, pure_dict)` rebuilds the model), float32.

Public helpers for eval: `list_steps(run_dir)`, `load_config(run_dir)`,
`restore_params(run_dir, step=None, mesh=None) -> (model_name, model_cfg, graphdef, params)`.
"""
from __future__ import annotations

import glob
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import zoo
from train import config as config_lib
from train import sharding as sharding_lib

CHECKPOINTS = "checkpoints"
CONFIG_JSON = "config.json"


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), CHECKPOINTS)


def make_manager(run_dir: str, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: dict, cfg_json: dict, data_iter) -> None:
    """Save state + resolved config + grain iterator state as one step (async)."""
    items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(cfg_json))
    if data_iter is not None:
        import grain
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore_state(mngr: ocp.CheckpointManager, step: int, target: dict, data_iter) -> dict:
    """Restore "state" onto `target` (ShapeDtypeStructs with shardings) and the iterator in place.

    The iterator state is read from this process's file `data/process_<i>-of-<n>.json`; when the
    checkpoint was written by a different number of processes, from process 0's file (the data
    package's iterator state is the number of global batches consumed, the same on every process,
    so it restores onto any process count)."""
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    if data_iter is not None:
        data_dir = os.path.join(str(mngr.directory), str(step), "data")
        own = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
        if not os.path.isfile(own):
            own = sorted(glob.glob(os.path.join(data_dir, "process_0-of-*.json")))[0]
        with open(own) as f:
            data_iter.set_state(json.loads(f.read()))
    return restored.state


# ----------------------------------------------------------------------------- eval helpers

def _check_run_dir(run_dir: str) -> None:
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")


def list_steps(run_dir: str) -> list[int]:
    """Steps with a complete checkpoint, ascending ([] when none)."""
    _check_run_dir(run_dir)
    d = checkpoint_dir(run_dir)
    if not os.path.isdir(d):
        return []
    # orbax writes a step under a temporary name and renames it when complete
    return sorted(int(n) for n in os.listdir(d)
                  if n.isdigit() and os.path.isdir(os.path.join(d, n, "state")))


def load_config(run_dir: str) -> ml_collections.ConfigDict:
    """The resolved config of a run (run_dir/config.json)."""
    _check_run_dir(run_dir)
    path = os.path.join(run_dir, CONFIG_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a seqzoo run directory")
    with open(path) as f:
        return config_lib.from_jsonable(json.load(f))


def _saved_param_shapes(step_dir: str) -> dict:
    """{path tuple: shape} of the saved params (from the checkpoint's metadata)."""
    meta = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state"))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    params = tree["params"]
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        out[tuple(_key_str(k) for k in path)] = tuple(leaf.shape)
    return out


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def abstract_model(name: str, model_cfg, seed: int = 0):
    """(graphdef, abstract params pure dict, nnx State of abstract params) without allocating."""
    model = nnx.eval_shape(lambda: zoo.build(name, model_cfg, nnx.Rngs(params=seed)))
    graphdef, state = nnx.split(model)
    return graphdef, state


def restore_params(run_dir: str, step: int | None = None, mesh=None):
    """Restore only the parameters of a run onto the current devices.

    Returns (model_name, model_cfg, graphdef, params) with params a pure dict (use
    `nnx.merge(graphdef, params)` or the pure forms of zoo.lm). With `mesh`, parameters are
    sharded by the logical-axis rules (train.sharding.RULES); otherwise replicated on all devices.
    Raises FileNotFoundError for a missing run dir / checkpoint and ValueError for a checkpoint
    whose parameters do not fit the model the config builds (naming the first bad parameter).
    """
    cfg = load_config(run_dir)
    steps = list_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"run directory {run_dir!r} has no complete checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"run directory {run_dir!r} has no checkpoint at step {step} "
                                f"(steps: {steps})")
    name, model_cfg = config_lib.model_config_from(cfg)
    graphdef, state = abstract_model(name, model_cfg)
    if mesh is None:
        mesh = sharding_lib.make_mesh((1, 1, -1))
        shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), nnx.to_pure_dict(state))
    else:
        shardings = nnx.to_pure_dict(sharding_lib.param_shardings(state, mesh))
    abstract = nnx.to_pure_dict(state)
    step_dir = os.path.join(checkpoint_dir(run_dir), str(step))
    saved = _saved_param_shapes(step_dir)
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        key = tuple(_key_str(k) for k in path)
        dotted = ".".join(key)
        if key not in saved:
            raise ValueError(f"checkpoint {step_dir} has no parameter {dotted} that model "
                             f"{name!r} needs")
        if saved[key] != tuple(leaf.shape):
            raise ValueError(f"checkpoint parameter {dotted} has shape {saved[key]}, model "
                             f"{name!r} expects {tuple(leaf.shape)}")
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(step_dir, "state"),
        args=ocp.args.PyTreeRestore(
            item={"params": target},
            restore_args={"params": jax.tree.map(
                lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape,
                                               dtype=t.dtype), target)},
            partial_restore=True))
    return name, model_cfg, graphdef, restored["params"]


def saved_step_count(run_dir: str) -> int:
    steps = list_steps(run_dir)
    return steps[-1] if steps else 0


def host_params(params) -> dict:
    """A numpy copy of (possibly sharded) parameters (for comparisons in tests)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
