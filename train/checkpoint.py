"""The parameter trees of checkpoints, independent of where they are stored (the run-directory
layout is `train.rundir.RunDir`'s):

  abstract_model(name, model_cfg, seed)   (graphdef, nnx State of abstract params), nothing
                                          allocated: the trees a checkpoint restores into
  restore_params_item(item_dir, abstract, shardings, ...)
                                          the "params" of a saved state item, checked against the
                                          model's abstract parameters first (ParamMismatch)
"""
from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

import zoo


def abstract_model(name: str, model_cfg, seed: int = 0):
    """(graphdef, nnx State of abstract params) of a model, without allocating."""
    model = nnx.eval_shape(lambda: zoo.build(name, model_cfg, nnx.Rngs(params=seed)))
    graphdef, state = nnx.split(model)
    return graphdef, state


class ParamMismatch(ValueError):
    """A checkpoint whose parameters do not fit the model its config builds."""


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _saved_tree(item_dir: str):
    """The metadata tree of a saved state item.

    Read by the item's handler: a Checkpointer's `metadata` looks for the step-level
    `_CHECKPOINT_METADATA` inside the item directory and logs an absl warning on every load."""
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir))
    tree = getattr(meta, "item_metadata", meta)
    return getattr(tree, "tree", tree)


def saved_tree_keys(item_dir: str) -> set:
    """The top-level keys of a saved state item ("params", "opt_state", "step", ...)."""
    return set(_saved_tree(item_dir).keys())


def saved_param_shapes(item_dir: str) -> dict:
    """{path tuple: shape} of the params of a saved state item (from its metadata)."""
    params = _saved_tree(item_dir)["params"]
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        out[tuple(_key_str(k) for k in path)] = tuple(leaf.shape)
    return out


def restore_params_item(item_dir: str, abstract: dict, shardings: dict, *, model_name: str,
                        where: str) -> dict:
    """The "params" of the state item at `item_dir`, restored onto `shardings` (a pure dict like
    `abstract`, the model's abstract parameters). ValueError naming the first parameter that the
    checkpoint (`where`, for the message) lacks or has in another shape."""
    saved = saved_param_shapes(item_dir)
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        key = tuple(_key_str(k) for k in path)
        dotted = ".".join(key)
        if key not in saved:
            raise ParamMismatch(f"checkpoint {where} has no parameter {dotted} that model "
                             f"{model_name!r} needs")
        if saved[key] != tuple(leaf.shape):
            raise ParamMismatch(f"checkpoint parameter {dotted} has shape {saved[key]}, model "
                             f"{model_name!r} expects {tuple(leaf.shape)}")
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    restored = ocp.PyTreeCheckpointer().restore(
        item_dir,
        args=ocp.args.PyTreeRestore(
            item={"params": target},
            restore_args={"params": jax.tree.map(
                lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape,
                                               dtype=t.dtype), target)},
            partial_restore=True))
    return restored["params"]
