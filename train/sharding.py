"""Device mesh and the one logical-axis-rules table.

Parameters carry logical axis names (layers.common.param); `RULES` maps each name to a mesh axis
of ("data", "fsdp", "tensor"). A dimension is sharded only when its size divides the mesh axis
size and the mesh axis is not already used by another dimension of the same array; otherwise it
stays replicated (tiny test models, odd vocabularies).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from flax import nnx

MESH_AXES = ("data", "fsdp", "tensor")

RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "conv": "tensor",
    "inner": "tensor",
    "head_dim": None,
    "state": None,
    "norm": None,
    "layers": None,
}

BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor); `-1` in one place takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // rest
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                         f"have {len(devices)}")
    arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, str | None] = RULES) -> P:
    used: set[str] = set()
    out = []
    for name, size in zip(names, shape):
        axis = rules.get(name) if name is not None else None
        if axis is not None and axis not in used and size % mesh.shape[axis] == 0:
            out.append(axis)
            used.add(axis)
        else:
            out.append(None)
    return P(*out)


def param_shardings(state, mesh: Mesh, rules: Mapping[str, str | None] = RULES):
    """NamedSharding for every leaf of an nnx State (or pytree of Variables)."""
    def one(v):
        names = getattr(v, "out_sharding", None) or getattr(v, "sharding_names", None)
        value = v.get_value() if isinstance(v, nnx.Variable) else v  # arrays or ShapeDtypeStructs
        if names is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, logical_to_spec(names, value.shape, mesh, rules))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


# The batch dimension's entry of a PartitionSpec: sharded over data x fsdp.
BATCH_AXES_SPEC = (BATCH_AXES,)
