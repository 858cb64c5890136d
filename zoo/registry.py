"""Name-based model registry. Each family registers its variants next to their code:

    @register("transformer", config=TransformerConfig, conformance=ConformanceSpec(...))
    def build_transformer(cfg: TransformerConfig, rngs: nnx.Rngs) -> CausalLM: ...

`zoo.build(name, cfg, rngs)`; `zoo.names()`; `zoo.make_config(name, overrides)` turns a mapping
(e.g. an ml_collections section) into the typed config, naming any unknown key.

`check_config(name, cfg)` (run by `make_config` and `build`, so by the trainer's resolution before
anything compiles) is every check a config gets: the sizes every family shares (`SIZE_FIELDS`:
positive integers where present), the config's own `validate()`, then the entry's `check`
(what depends on the entry rather than the config class, e.g. that a Titans hybrid's attention
heads can carry RoPE). Each failure is one ValueError line naming the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from flax import nnx


@dataclass(frozen=True)
class ConformanceSpec:
    """What the shared conformance suite needs to check a model (tests/test_conformance.py).

    config: a tiny config instance. length: the test sequence length (choose one that is not a
    multiple of any chunk or block). cuts: prefill cut points (inside and at chunk edges).
    impls: config overrides whose forward must equal `reference` (a dict of overrides, e.g.
    {"impl": "reference"}) against each fast override in `fast`.
    """
    config: Any
    length: int = 13
    cuts: tuple[int, ...] = (1, 5, 12)
    reference: Mapping[str, Any] = field(default_factory=dict)
    fast: tuple[Mapping[str, Any], ...] = ()
    atol: float = 1e-5
    rtol: float = 1e-5
    decode: bool = True          # token-by-token decode equality applies
    check_margins: Callable | None = None  # (model, tokens) -> None; asserts decision margins
    flops_config: Any = None     # the config tests/test_flops.py checks (None: `config`)
    flops_range: tuple[float, float] = (0.95, 1.4)  # its bounds on XLA / declared FLOPs


@dataclass(frozen=True)
class ParamGroup:
    """Parameters (dotted paths of the model's state, fnmatch `patterns`, e.g. "*.mixer.A_log")
    that the family's reference code trains differently: `weight_decay` True / False forces
    decay on / off (None: the default rule, decay on parameters of >= 2 dimensions only); `lr` is
    the group's peak learning rate as the reference code gives it (absolute, None: train.lr), and
    the schedule scales it like the base rate. The first group a path matches applies."""
    name: str
    patterns: tuple[str, ...]
    weight_decay: bool | None = None
    lr: float | None = None
    why: str = ""


@dataclass(frozen=True)
class Entry:
    name: str
    config_cls: type
    build: Callable[[Any, nnx.Rngs], nnx.Module]
    causal: bool = True
    resets: bool = True
    max_len: Callable[[Any], int | None] = lambda cfg: None
    param_count: Callable[[Any], int] | None = None
    flops: Callable[[Any, int], float] | None = None
    conformance: ConformanceSpec | None = None
    family: str = ""
    check: Callable[[Any], None] | None = None
    groups: tuple[ParamGroup, ...] = ()


_REGISTRY: dict[str, Entry] = {}


def register(name: str, *, config: type, causal: bool = True, resets: bool = True,
             max_len: Callable[[Any], int | None] | None = None,
             param_count: Callable[[Any], int] | None = None,
             flops: Callable[[Any, int], float] | None = None,
             conformance: ConformanceSpec | None = None,
             check: Callable[[Any], None] | None = None,
             groups: tuple[ParamGroup, ...] = ()):
    """Decorator registering `build(cfg, rngs) -> model` under `name`.

    param_count(cfg): the documented parameter count. flops(cfg, seq_len): the analytic
    training FLOPs per token (forward + backward of every product, scans and state updates
    included; `zoo.lm` has the shared pieces), checked against XLA by tests/test_flops.py.
    check(cfg): raises ValueError (one line naming the key) for what this entry cannot build
    beyond `cfg.validate()`. groups: the parameter groups (`ParamGroup`: no weight decay, own
    learning rate) of the family's reference code, read by the trainer's optimiser.
    """
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = Entry(name=name, config_cls=config, build=fn, causal=causal,
                                resets=resets, max_len=max_len or (lambda cfg: None),
                                param_count=param_count, flops=flops, conformance=conformance,
                                family=fn.__module__.rsplit(".", 1)[-1], check=check,
                                groups=tuple(groups))
        return fn
    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Entry:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_config(name: str, overrides: Mapping[str, Any] | None = None, *, prefix: str = "model"):
    """The typed config of model `name` with `overrides`; unknown keys fail naming the key."""
    entry = get(name)
    known = {f.name for f in dataclasses.fields(entry.config_cls)}
    overrides = dict(overrides or {})
    for key in overrides:
        if key not in known:
            raise ValueError(f"unknown config key {prefix}.{key} for model {name!r} "
                             f"(known: {', '.join(sorted(known))})")
    cfg = entry.config_cls(**overrides)
    check_config(name, cfg)
    return cfg


# sizes every family reads the same way: a positive integer wherever the config has the field
SIZE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "attn_heads", "head_dim",
               "ffn_dim", "d_state", "n_groups", "n_memories", "top_k", "n_slots", "chunk",
               "segment")


def check_config(name: str, cfg: Any) -> None:
    """Every check of a model config before anything is built (module docstring)."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for key in SIZE_FIELDS:
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"model.{key}={value!r} must be a positive integer")
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    entry = get(name)
    if entry.check is not None:
        entry.check(cfg)


def build(name: str, cfg: Any = None, rngs: nnx.Rngs | int = 0) -> nnx.Module:
    entry = get(name)
    if cfg is None:
        cfg = entry.config_cls()
    elif isinstance(cfg, Mapping):
        cfg = make_config(name, cfg)
    else:
        check_config(name, cfg)
    if isinstance(rngs, int):
        rngs = nnx.Rngs(params=rngs)
    return entry.build(cfg, rngs)
