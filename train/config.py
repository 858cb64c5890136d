"""Trainer configs: the sections, their defaults, and resolution/validation before compiling.

A config (ml_collections.ConfigDict) has six sections:

  model       `name` (a zoo registry name) plus the fields of that model's typed config; a field
              left as None (placeholder) takes the model's default; `vocab_size` left as None is
              taken from the data.
  data        `train.data.data_defaults()` (source, seq_len, vocab_size, task parameters, ...).
  train       optimisation and loop (see `train_defaults`).
  mesh        device mesh and multi-process setup (see `mesh_defaults`).
  checkpoint  run directory, save interval, how many to keep (see `checkpoint_defaults`).
  eval        periodic held-out evaluation (see `eval_defaults`).

`default_config()` is the built-in default run (`python -m train` with no --config): MQAR with
8 key-value pairs in 64 tokens, vocabulary 128 (keys 1..63, values 64..127), a 2-layer
attention-only Transformer (dim 128, 2 heads, RoPE), AdamW lr 2e-3 without weight decay, batch 64,
at most 800 steps, stopping early once held-out accuracy reaches 99%. `tiny_budget(cfg)` is the
few-step budget of the tiny config variants and the tests.

`resolve(cfg)` checks every section and returns (resolved config, typed model config); any
unknown key or impossible value raises `ConfigError` with one line naming the key.
`fit_devices(cfg, n)` is its device-dependent part (the mesh against the devices).
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

import zoo
from train import sharding
from train.errors import one_line


class ConfigError(ValueError):
    """A bad config: one line naming the key."""


# ----------------------------------------------------------------------------- sections

def train_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.steps = 600                  # optimizer steps
    c.batch_size = 64              # global batch (sequences per optimizer step)
    c.grad_accum = 1               # micro-batches per step (batch_size % grad_accum == 0)
    c.lr = 3e-3                    # peak learning rate
    c.warmup_steps = 30
    c.min_lr_ratio = 0.0           # cosine decays to lr * min_lr_ratio at `steps`
    c.weight_decay = 0.1
    c.b1 = 0.9
    c.b2 = 0.98
    c.eps = 1e-8
    c.clip_norm = 1.0              # global-norm clipping (0: off)
    c.seed = 0                     # parameter init and dropout keys
    c.aux_weights = ml_collections.ConfigDict()   # name -> weight of model.aux_terms(aux)[name]
    c.dropout = True               # pass dropout keys (per step) to the model; its rates are model fields
    # parameters set by a schedule instead of by gradients: "glob=start:end,..." (train.optim.
    # parse_anneal), linear from start at step 0 to end at the last step (hydra stage 3's
    # router temperature, "*.moe.temperature=2.0:1.0")
    c.anneal = ""
    c.log_every = 20
    c.compilation_cache_dir = "~/.cache/seqzoo/jax"   # "" turns the persistent cache off
    c.stop_at_step = 0             # stop (after saving) at this step; 0: run to `steps`
    c.mfu_probe = True             # on CPU, measure the peak with a short matmul probe
    # numerical faults (train/guard.py): a non-finite loss or gradient norm "stop"s the run
    # (nothing saved after it; the last complete checkpoint is the last good state) or "skip"s
    # that update (counted in the metrics as "skipped"); "off" applies every update
    c.nonfinite = "stop"
    c.spike_factor = 0.0           # >1: skip an update whose loss > factor * median of the last
    c.spike_window = 100           #     spike_window applied losses
    return c


def mesh_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.shape = (-1, 1, 1)           # (data, fsdp, tensor); one -1 takes the remaining devices
    c.distributed = "auto"         # auto | on | off: jax.distributed.initialize
    c.coordinator_address = ""     # host:port (on: required unless the cluster is detected)
    c.num_processes = 0
    c.process_id = -1
    c.num_cpu_devices = 0          # >0: jax_num_cpu_devices (CPU tests and recipes)
    c.init_timeout_s = 300
    return c


def checkpoint_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dir = ""                     # run directory; "": runs/<model.name>_<data.source>
    c.every = 200                  # save every N steps (and at the end, and on SIGTERM)
    c.keep = 3                     # keep the last N checkpoints
    c.async_save = True
    # SIGTERM (a preemption notice): finish the step, save synchronously, skip the final eval
    # and exit 0; a warning when that took longer than this many seconds (0: no deadline)
    c.preempt_deadline_s = 30.0
    c.ocdbt = True                 # orbax's OCDBT array store (False: one zarr per array)
    # a fresh run starts from another run's parameters ("<run dir>" or "<run dir>@<step>",
    # default its latest step): every parameter whose path and shape the source has is taken
    # from it, the others are freshly initialised; optimiser state and step start anew (a
    # staged curriculum: each stage from the previous one's checkpoint). Ignored on resume.
    c.init_from = ""
    return c


def eval_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.every = 100                  # held-out eval every N steps (0: only at the end)
    c.early_stop_accuracy = 0.0    # stop (after saving) once val_accuracy >= this (0: off)
    c.batch_size = 256
    c.max_batches = 4              # 0: the whole validation split
    return c


def _data_module():
    from train import data  # the data package (train/data/)
    return data


def model_section(name: str, base: Any = None, **overrides) -> ml_collections.ConfigDict:
    """A `model` section: `name` plus every field of the model's typed config.

    `base` is a typed config (e.g. a preset) or None for the model's defaults. Fields whose value
    is None become typed placeholders so that `--config.model.<field>=...` works on them.
    """
    entry = zoo.get(name)
    cls = entry.config_cls
    if base is None:
        base = cls()
    base = dataclasses.replace(base, **overrides)
    hints = typing.get_type_hints(cls)
    c = ml_collections.ConfigDict()
    c.name = name
    for f in dataclasses.fields(cls):
        v = getattr(base, f.name)
        if v is None:
            c[f.name] = config_dict.placeholder(_base_type(hints.get(f.name)))
        else:
            c[f.name] = v
    return c


def _base_type(hint):
    for t in typing.get_args(hint) or (hint,):
        if t in (int, float, str, bool):
            return t
    return object


def base_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A full config around a model section, with every other section at its defaults."""
    c = ml_collections.ConfigDict()
    c.model = model
    c.data = _data_module().data_defaults()
    c.train = train_defaults()
    c.mesh = mesh_defaults()
    c.checkpoint = checkpoint_defaults()
    c.eval = eval_defaults()
    return c


def default_config() -> ml_collections.ConfigDict:
    """The built-in default: MQAR (8 key-value pairs in 64 tokens, vocabulary 128) with a
    2-layer attention-only Transformer (dim 128, 2 heads, RoPE, no MLP)."""
    model = model_section("transformer", dim=128, n_layers=2, n_heads=2, ffn="none", vocab_size=None,
                          max_len=64)
    c = base_config(model)
    c.data.source = "mqar"
    c.data.seq_len = 64
    c.data.vocab_size = 128
    c.data.num_kv_pairs = 8
    c.train.steps = 800
    c.train.lr = 2e-3
    c.train.weight_decay = 0.0
    c.eval.early_stop_accuracy = 0.99
    return c


def tiny_budget(cfg: ml_collections.ConfigDict, *, steps: int = 20, warmup_steps: int = 2,
                eval_every: int = 10, eval_batch_size: int = 16, eval_max_batches: int = 2,
                checkpoint_every: int = 10) -> ml_collections.ConfigDict:
    """The tiny training budget (the `*_tiny` variants of configs/ and the trainer tests, which
    pass shorter runs): MQAR with 4 key-value pairs in 32 tokens, vocabulary 64 (the model's
    `max_len`, where it has one, follows), batches of 16, a few steps. In place; returns `cfg`."""
    cfg.data.num_kv_pairs = 4
    cfg.data.seq_len = 32
    cfg.data.vocab_size = 64
    if "max_len" in cfg.model:
        cfg.model.max_len = 32
    cfg.train.steps = steps
    cfg.train.batch_size = 16
    cfg.train.warmup_steps = warmup_steps
    cfg.eval.every = eval_every
    cfg.eval.batch_size = eval_batch_size
    cfg.eval.max_batches = eval_max_batches
    cfg.checkpoint.every = checkpoint_every
    return cfg


# ----------------------------------------------------------------------------- resolution

_SECTIONS = ("model", "data", "train", "mesh", "checkpoint", "eval")


def _show(v) -> str:
    """A value for a one-line message (mappings as JSON, at most 60 characters)."""
    if isinstance(v, ml_collections.ConfigDict):
        v = v.to_dict()
    try:
        text = json.dumps(v) if isinstance(v, (dict, list)) else repr(v)
    except (TypeError, ValueError):
        text = repr(v)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(v) -> str:
    return {bool: "a bool", int: "an integer", float: "a number", str: "a string",
            tuple: "a list", list: "a list"}.get(type(v), type(v).__name__)


def _check_keys(section: str, cfg: ml_collections.ConfigDict, ref: ml_collections.ConfigDict):
    """Unknown keys, and values of another type than the default's (a JSON config or a Python
    config file can hold anything; the overrides parser already checks types)."""
    for key in cfg.keys():
        if key not in ref:
            raise ConfigError(f"unknown config key {section}.{key} (known: {', '.join(sorted(ref.keys()))})")
        want, got = ref[key], cfg[key]
        if want is None or isinstance(want, ml_collections.ConfigDict):
            if isinstance(want, ml_collections.ConfigDict) and not isinstance(
                    got, (ml_collections.ConfigDict, dict)):
                raise ConfigError(f"{section}.{key}={_show(got)} must be a mapping")
            continue
        if isinstance(want, bool):
            ok = isinstance(got, bool)
        elif isinstance(want, int):
            ok = isinstance(got, int) and not isinstance(got, bool)
        elif isinstance(want, float):
            ok = isinstance(got, (int, float)) and not isinstance(got, bool)
        elif isinstance(want, (tuple, list)):
            ok = isinstance(got, (tuple, list)) and all(
                isinstance(x, int) and not isinstance(x, bool) for x in got)
        else:
            ok = isinstance(got, type(want))
        if not ok:
            raise ConfigError(f"{section}.{key}={_show(got)} must be {_type_name(want)}")


def _need(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


def resolve(cfg: ml_collections.ConfigDict, *, device_count: int | None = None):
    """Validate every section and fill derived values. Returns (resolved ConfigDict, model cfg).

    With `device_count`, `fit_devices` runs too (the mesh is then complete); without it, it is
    left to the caller once the devices are known (`python -m train` resolves before JAX starts).
    Raises ConfigError (a ValueError) with one line naming the key; nothing is compiled.
    """
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # a detached copy, placeholders resolved
    for key in cfg.keys():
        if key not in _SECTIONS:
            raise ConfigError(f"unknown config section {key!r} (known: {', '.join(_SECTIONS)})")
    for s in _SECTIONS:
        if s not in cfg:
            raise ConfigError(f"config has no {s!r} section")
    data_lib = _data_module()
    _check_keys("train", cfg.train, train_defaults())
    _check_keys("mesh", cfg.mesh, mesh_defaults())
    _check_keys("checkpoint", cfg.checkpoint, checkpoint_defaults())
    _check_keys("eval", cfg.eval, eval_defaults())
    _check_keys("data", cfg.data, data_lib.data_defaults())
    try:
        data_lib.validate(cfg.data)
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        raise ConfigError(one_line(e)) from None

    # model
    _need("name" in cfg.model, "config key model.name is missing (a zoo registry name)")
    name = cfg.model.name
    if name not in zoo.names():
        raise ConfigError(f"model.name={name!r} is not a registered model (known: {', '.join(zoo.names())})")
    fields = {k: v for k, v in cfg.model.items() if k != "name" and v is not None}
    data_vocab = int(data_lib.vocab_size(cfg.data))
    if "vocab_size" in {f.name for f in dataclasses.fields(zoo.get(name).config_cls)}:
        if fields.get("vocab_size") is None:
            fields["vocab_size"] = data_vocab
            cfg.model.vocab_size = data_vocab
        _need(int(fields["vocab_size"]) >= data_vocab,
              f"model.vocab_size={fields['vocab_size']} is smaller than the data's vocabulary ({data_vocab})")
    for k, v in list(fields.items()):
        if isinstance(v, list):
            fields[k] = tuple(v)
    try:
        model_cfg = zoo.make_config(name, fields)
    except (ValueError, TypeError) as e:
        raise ConfigError(one_line(e)) from None
    entry = zoo.get(name)
    max_len = entry.max_len(model_cfg)
    _need(max_len is None or max_len >= cfg.data.seq_len,
          f"data.seq_len={cfg.data.seq_len} exceeds the model's max_len {max_len} (learned positions)")
    if cfg.data.get("pack", False):
        _need(entry.resets, f"data.pack=True but model {name!r} cannot reset its state at document starts")
    remat = getattr(model_cfg, "remat", "none")
    if remat != "none":
        from zoo.lm import remat_policy
        try:
            remat_policy(remat)
        except ValueError as e:
            raise ConfigError(f"model.remat: {one_line(e)}") from None
    cd = getattr(model_cfg, "compute_dtype", "float32")
    _need(cd in ("float32", "bfloat16", "float16"),
          f"model.compute_dtype={cd!r} is not one of float32, bfloat16, float16")

    # train
    t = cfg.train
    _need(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    _need(t.batch_size >= 1, f"train.batch_size={t.batch_size} must be >= 1")
    _need(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1")
    _need(t.batch_size % t.grad_accum == 0,
          f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    _need(t.lr > 0, f"train.lr={t.lr} must be > 0")
    _need(0 <= t.warmup_steps <= t.steps, f"train.warmup_steps={t.warmup_steps} must be in [0, train.steps]")
    _need(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    _need(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    _need(0 <= t.b1 < 1 and 0 <= t.b2 < 1, "train.b1 and train.b2 must be in [0, 1)")
    _need(t.clip_norm >= 0, f"train.clip_norm={t.clip_norm} must be >= 0")
    _need(t.log_every >= 1, f"train.log_every={t.log_every} must be >= 1")
    _need(t.stop_at_step >= 0, f"train.stop_at_step={t.stop_at_step} must be >= 0")
    _need(t.nonfinite in ("stop", "skip", "off"),
          f"train.nonfinite={t.nonfinite!r} is not one of stop, skip, off")
    _need(t.spike_factor == 0 or t.spike_factor > 1,
          f"train.spike_factor={t.spike_factor} must be 0 (off) or > 1")
    _need(t.spike_window >= 1, f"train.spike_window={t.spike_window} must be >= 1")
    for k, v in t.aux_weights.items():
        _need(isinstance(v, (int, float)), f"train.aux_weights.{k}={v!r} must be a number")
    from train.optim import parse_anneal
    try:
        parse_anneal(t.get("anneal", ""))
    except ValueError as e:
        raise ConfigError(str(e)) from None

    # mesh
    m = cfg.mesh
    _mesh_shape(m.shape)
    _need(m.distributed in ("auto", "on", "off"), f"mesh.distributed={m.distributed!r} is not one of auto, on, off")
    _need(m.num_cpu_devices >= 0, f"mesh.num_cpu_devices={m.num_cpu_devices} must be >= 0")
    if device_count is not None:
        fit_devices(cfg, device_count)

    # checkpoint / eval
    c = cfg.checkpoint
    _need(c.every >= 1, f"checkpoint.every={c.every} must be >= 1")
    _need(c.keep >= 1, f"checkpoint.keep={c.keep} must be >= 1")
    _need(c.preempt_deadline_s >= 0,
          f"checkpoint.preempt_deadline_s={c.preempt_deadline_s} must be >= 0")
    if not c.dir:
        c.dir = os.path.join("runs", f"{name}_{cfg.data.source}")
    e = cfg.eval
    _need(e.every >= 0, f"eval.every={e.every} must be >= 0")
    _need(e.batch_size >= 1, f"eval.batch_size={e.batch_size} must be >= 1")
    _need(e.max_batches >= 0, f"eval.max_batches={e.max_batches} must be >= 0")
    _need(0.0 <= e.early_stop_accuracy <= 1.0,
          f"eval.early_stop_accuracy={e.early_stop_accuracy} must be in [0, 1]")
    return cfg, model_cfg


def _mesh_shape(shape, device_count: int | None = None) -> tuple[int, ...]:
    try:
        return sharding.mesh_shape(shape, device_count)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def fit_devices(cfg: ml_collections.ConfigDict, device_count: int) -> ml_collections.ConfigDict:
    """The device-dependent part of resolution, on a resolved config (in place, and returned):
    the mesh must fit the `device_count` devices (its -1 is filled in) and the batches must split
    over its data-parallel size. ConfigError with one line naming the key."""
    full = _mesh_shape(cfg.mesh.shape, device_count)
    cfg.mesh.shape = full
    t = cfg.train
    dp = full[0] * full[1]
    _need(t.batch_size // t.grad_accum % dp == 0,
          f"train.batch_size={t.batch_size} / grad_accum={t.grad_accum} is not divisible by "
          f"the data-parallel size {dp} (mesh data x fsdp)")
    _need(cfg.eval.batch_size % dp == 0,
          f"eval.batch_size={cfg.eval.batch_size} is not divisible by the data-parallel size {dp}")
    return cfg



def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(to_jsonable(cfg), indent=2, sort_keys=True)


def to_jsonable(cfg) -> dict:
    def conv(x):
        if isinstance(x, (ml_collections.ConfigDict, dict)):
            return {str(k): conv(v) for k, v in (x.items())}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return x
    return conv(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)


def from_jsonable(d: dict) -> ml_collections.ConfigDict:
    d = dict(d)
    if "mesh" in d and "shape" in d["mesh"]:
        d["mesh"] = dict(d["mesh"], shape=tuple(d["mesh"]["shape"]))
    return ml_collections.ConfigDict(d)


def model_config_from(cfg: ml_collections.ConfigDict):
    """(name, typed model config) of a resolved config."""
    name = cfg.model.name
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.model.items()
              if k != "name" and v is not None}
    return name, zoo.make_config(name, fields)
