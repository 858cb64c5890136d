"""Hugging Face checkpoint import: `zoo.hf.load(path)`.

A checkpoint directory holds `config.json` and either `model.safetensors` or the shards named by
`model.safetensors.index.json` (its "weight_map": tensor name -> shard file), read through the
`safetensors` library without torch: memory-mapped, one tensor at a time (`CheckpointTensors`),
cast to float32 as each parameter takes it, so host memory stays near the model's own size plus
one tensor; bfloat16 and float16 checkpoints load the same way. `load` dispatches on `config.json`'s `architectures[0]` to a converter that the family registers
beside its model:

    @hf_converter("LlamaForCausalLM")
    def from_hf_llama(hf_config: dict, tensors: dict[str, np.ndarray]) -> nnx.Module: ...

A converter builds the seqzoo model from the HF config and copies every tensor in; a tensor that
is missing, left over or misshapen is an error naming it.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np
from flax import nnx

_CONVERTERS: dict[str, Callable[[dict, dict], nnx.Module]] = {}

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def hf_converter(architecture: str):
    def deco(fn):
        _CONVERTERS[architecture] = fn
        return fn
    return deco


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointTensors(Mapping):
    """The tensors of a checkpoint directory by name, read lazily through `safetensors.safe_open`
    (memory-mapped; a tensor is materialised only when it is asked for). `files`: tensor name ->
    .safetensors path (one file, or a sharded checkpoint's weight map). `place`: None, or
    `variable -> jax.sharding.Sharding`, where the converters put each parameter (`load`)."""

    def __init__(self, files: dict[str, str], place: Callable | None = None):
        self.files = dict(files)
        self.place = place
        self._open: dict[str, Any] = {}

    @classmethod
    def from_dir(cls, path: str) -> "CheckpointTensors":
        single, index = os.path.join(path, SINGLE), os.path.join(path, INDEX)
        if os.path.isfile(single):
            return cls({name: single for name in _safe_keys(single)})
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            files = {}
            for name, shard in weight_map.items():
                shard_path = os.path.join(path, shard)
                if not os.path.isfile(shard_path):
                    raise FileNotFoundError(f"{path}: shard {shard} named by {INDEX} is missing")
                files[name] = shard_path
            for shard_path in sorted(set(files.values())):     # every shard holds what it says
                have = set(_safe_keys(shard_path))
                missing = [n for n, f in files.items() if f == shard_path and n not in have]
                if missing:
                    raise ValueError(f"{shard_path}: no tensor {missing[0]} ({INDEX} names it)")
            return cls(files)
        raise FileNotFoundError(f"{path}: no {SINGLE} and no {INDEX}")

    def _handle(self, path: str):
        if path not in self._open:
            from safetensors import safe_open
            self._open[path] = safe_open(path, framework="np")
        return self._open[path]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise KeyError(name)
        return self._handle(self.files[name]).get_tensor(name)

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _safe_keys(path: str) -> list[str]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="np") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a safetensors file ({str(e).splitlines()[0]})") from None


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy arrays (this module's own reader: the tests'
    byte-level check of what `write_safetensors` wrote; loading goes through the library)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        lo, hi = info["data_offsets"]
        arr = np.frombuffer(raw[base + lo: base + hi], dtype=_DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        data = arr.tobytes()
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


_EXPORTERS: dict[str, Callable] = {}
MAX_SHARD_BYTES = 5 * 2**30      # transformers' default max_shard_size ("5GB")


def hf_exporter(name: str):
    """Register `fn(model, cfg) -> (hf config dict, {tensor name: array})` for registry entry
    `name` (the inverse of its converter)."""
    def deco(fn):
        _EXPORTERS[name] = fn
        return fn
    return deco


def exporters() -> list[str]:
    return sorted(_EXPORTERS)


def write_checkpoint(path: str, config: dict, tensors: dict[str, np.ndarray],
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """`config.json` plus `model.safetensors`, or, above `max_shard_bytes`, shards named as
    transformers names them (model-00001-of-0000N.safetensors, filled in name order) with
    `model.safetensors.index.json`. Returns the files written."""
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    total = sum(a.nbytes for a in arrays.values())
    if total <= max_shard_bytes:
        save_file(arrays, os.path.join(path, SINGLE), metadata={"format": "pt"})
        return ["config.json", SINGLE]
    shards, cur, size = [], [], 0
    for name in sorted(arrays):
        if cur and size + arrays[name].nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += arrays[name].nbytes
    shards.append(cur)
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: arrays[k] for k in names}, os.path.join(path, fname),
                  metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
        files.append(fname)
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return ["config.json", *files, INDEX]


def export(name: str, model: nnx.Module, cfg) -> tuple[dict, dict]:
    """Registry entry `name`'s model as (Hugging Face config.json dict, {tensor name: array});
    ValueError naming the family when it has no public format (or this configuration has none)."""
    if name not in _EXPORTERS:
        raise ValueError(f"model {name!r} has no Hugging Face format (exportable: "
                         f"{', '.join(exporters())})")
    return _EXPORTERS[name](model, cfg)


def save(name: str, model: nnx.Module, cfg, path: str,
         max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write registry entry `name`'s model (its typed config `cfg`) as a Hugging Face checkpoint
    that transformers and `load` read (`export`'s errors)."""
    config, tensors = export(name, model, cfg)
    return write_checkpoint(path, config,
                            {k: np.asarray(v, np.float32) for k, v in tensors.items()},
                            max_shard_bytes)


def load_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    with open(cfg_path) as f:
        return json.loads(f.read(), parse_constant=lambda c: {"Infinity": math.inf,
                                                                "-Infinity": -math.inf}[c])


def hf_float(value) -> float:
    """A float from config.json; transformers 5 writes infinity as {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"].replace("Infinity", "inf"))
    return float(value)


def resolve(name: str) -> str:
    """A checkpoint directory: `name` itself when it is one, else a hub id ("org/model") looked up
    in the local Hugging Face cache (`huggingface_hub`, offline: nothing is downloaded here).
    One clear error when neither works."""
    if os.path.isdir(name):
        return name
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"{name}: no such checkpoint directory")
    try:
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise ImportError(f"{name}: not a directory; loading by hub id needs huggingface_hub "
                          "(pip install 'seqzoo[hub]')") from None
    try:
        return huggingface_hub.snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        raise FileNotFoundError(f"{name}: not in the local Hugging Face cache "
                                f"({huggingface_hub.constants.HF_HUB_CACHE}); fetch it first with "
                                f"`hf download {name}`") from None


def load(path: str, *, place: Callable | None = None) -> nnx.Module:
    """Build the seqzoo model for a Hugging Face checkpoint (a local directory, or a hub id in
    the local cache: `resolve`) and load its weights.

    `place`: `variable -> jax.sharding.Sharding` (e.g. `train.sharding.placer(mesh)`, the
    trainer's logical-axis rules): each tensor goes from the memory-mapped file straight into
    its parameter's sharding (`jax.device_put` of one host tensor at a time); None: the
    default device."""
    path = resolve(path)
    config = load_config(path)
    archs = config.get("architectures") or []
    if not archs:
        raise ValueError(f"{path}/config.json has no 'architectures' entry")
    arch = archs[0]
    if arch not in _CONVERTERS:
        raise ValueError(f"{path}: no converter for architecture {arch!r}; "
                         f"known: {', '.join(sorted(_CONVERTERS))}")
    tensors = CheckpointTensors.from_dir(path)
    tensors.place = place
    return _CONVERTERS[arch](config, tensors)


def build_abstract(build: Callable, cfg) -> nnx.Module:
    """The model with abstract parameters (`nnx.eval_shape`: nothing allocated, no random init):
    a converter assigns every parameter from the checkpoint, so loading holds the model once plus
    the tensor in flight; `check_filled` then proves none was left abstract."""
    return nnx.eval_shape(lambda: build(cfg, nnx.Rngs(params=0)))


def check_filled(model: nnx.Module) -> nnx.Module:
    import jax
    for path, var in jax.tree_util.tree_flatten_with_path(
            nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        if isinstance(var.get_value(), jax.ShapeDtypeStruct):
            raise ValueError(f"the checkpoint provides no tensor for parameter "
                             f"{jax.tree_util.keystr(path)}")
    return model


class TensorSource:
    """Hands out checkpoint tensors by name, checking shapes and that every one is used."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors = tensors          # not copied: a CheckpointTensors reads on demand
        self.place = getattr(tensors, "place", None)
        self.used: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...], transpose: bool = False) -> np.ndarray:
        if name not in self.tensors:
            raise ValueError(f"checkpoint is missing tensor {name}")
        arr = np.asarray(self.tensors[name], np.float32)
        if transpose:
            arr = arr.T
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"tensor {name} has shape {arr.shape}{' (transposed)' if transpose else ''}, "
                             f"expected {tuple(shape)}")
        self.used.add(name)
        return arr

    def assign(self, var: nnx.Variable, name: str, transpose: bool = False) -> None:
        cur = var.get_value()           # an array, or a ShapeDtypeStruct (build_abstract)
        self.put(var, self.take(name, tuple(cur.shape), transpose))

    def put(self, var: nnx.Variable, arr: np.ndarray) -> None:
        """Set `var` to `arr` in the variable's dtype, on its sharding when placing."""
        import jax
        import jax.numpy as jnp
        cur = var.get_value()
        if self.place is None:
            var.set_value(jnp.asarray(arr, cur.dtype))
        else:
            var.set_value(jax.device_put(np.asarray(arr, cur.dtype), self.place(var)))

    def check_all_used(self, ignore: tuple[str, ...] = ()) -> None:
        left = sorted(k for k in self.tensors if k not in self.used
                      and not any(k.endswith(s) for s in ignore))
        if left:
            raise ValueError(f"checkpoint tensors not used by the model: {', '.join(left[:5])}"
                             f"{' ...' if len(left) > 5 else ''}")
