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
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
    "expert": "fsdp",      # a mixture's experts (layers/moe.py) split over the fsdp axis
}

BATCH_AXES = ("data", "fsdp")


def mesh_shape(shape: Sequence[int], n_devices: int | None = None) -> tuple[int, ...]:
    """The one mesh validator (config resolution and `make_mesh`): `shape` has 3 entries
    (data, fsdp, tensor), each positive or a single -1. With `n_devices`, it must fit them; the
    -1 then takes the remaining devices and the full shape is returned. ValueError with one line
    naming the config key mesh.shape."""
    shape = tuple(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh.shape={shape} must have 3 entries (data, fsdp, tensor)")
    if not all(isinstance(s, (int, np.integer)) and (s >= 1 or s == -1) for s in shape):
        raise ValueError(f"mesh.shape={shape}: entries must be positive or a single -1")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape={shape}: at most one -1")
    if n_devices is None:
        return shape
    fixed = int(np.prod([s for s in shape if s != -1]))
    if n_devices % fixed or (-1 not in shape and fixed != n_devices):
        raise ValueError(f"mesh.shape={shape} does not fit the {n_devices} available devices")
    return tuple(int(s) if s != -1 else n_devices // fixed for s in shape)


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor); `-1` in one place takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    arr = np.asarray(devices).reshape(mesh_shape(shape, len(devices)))
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


def placer(mesh: Mesh, rules: Mapping[str, str | None] = RULES):
    """`variable -> NamedSharding` by the logical-axis rules (replicated without axis names):
    the sharding of one parameter, e.g. for `zoo.hf.load(path, place=placer(mesh))`."""
    def one(v):
        names = getattr(v, "out_sharding", None) or getattr(v, "sharding_names", None)
        value = v.get_value() if isinstance(v, nnx.Variable) else v  # arrays or ShapeDtypeStructs
        if names is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, logical_to_spec(names, value.shape, mesh, rules))
    return one


def param_shardings(state, mesh: Mesh, rules: Mapping[str, str | None] = RULES):
    """NamedSharding for every leaf of an nnx State (or pytree of Variables)."""
    return jax.tree.map(placer(mesh, rules), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


# The batch dimension's entry of a PartitionSpec: sharded over data x fsdp.
BATCH_AXES_SPEC = (BATCH_AXES,)
