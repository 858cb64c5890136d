"""One implementation vocabulary and one dispatcher for every op of `pallas_kernels/`.

Every op folder declares the implementations it has with `register_op` and resolves a request
through `resolve`:

    AVAILABLE = register_op("ssd", (Impl.REFERENCE, Impl.CHUNKED))
    impl = resolve("ssd", impl, auto=lambda: Impl.REFERENCE if on_cpu() else Impl.CHUNKED)

`Impl.AUTO` picks, per op, what measured fastest on this platform (the op's `auto` rule). An
explicit request that the op lacks is an error, never a silent fallback. Model configs check
their `impl` field with `check(impl, ops)` in `validate()`, so a bad value fails with one line
naming the key before anything compiles.
"""
from __future__ import annotations

import enum
import importlib
from typing import Callable, Iterable

import jax


class Impl(str, enum.Enum):
    """How an op is computed. Every member computes the same function."""
    AUTO = "auto"                          # per op: the fastest this platform has
    REFERENCE = "reference"                # sequential float32 specification
    CHUNKED = "chunked"                    # chunk-parallel / blockwise pure XLA
    PALLAS = "pallas"                      # Pallas kernel for this backend (TPU Mosaic / GPU)
    PALLAS_INTERPRET = "pallas_interpret"  # the same kernel in Pallas interpret mode (CPU tests)

    def __str__(self) -> str:
        return self.value


NAMES = tuple(m.value for m in Impl)

_OPS: dict[str, tuple[Impl, ...]] = {}


def parse(value: str | Impl, *, key: str = "impl") -> Impl:
    """`value` as an `Impl`; an unknown value raises one line naming `key`."""
    if isinstance(value, Impl):
        return value
    try:
        return Impl(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not one of {NAMES}") from None


def register_op(op: str, available: Iterable[Impl]) -> tuple[Impl, ...]:
    """Declare the implementations op `op` (its folder name) has; returns them."""
    impls = tuple(parse(a) for a in available)
    _OPS[op] = impls
    return impls


def available(op: str) -> tuple[Impl, ...]:
    """The implementations op `op` has (imports `pallas_kernels.<op>` to register it)."""
    if op not in _OPS:
        importlib.import_module(f"pallas_kernels.{op}")
    if op not in _OPS:
        raise KeyError(f"pallas_kernels.{op} registers no implementations")
    return _OPS[op]


def resolve(op: str, impl: str | Impl, *, auto: Impl | Callable[[], Impl]) -> Impl:
    """The implementation to run for op `op`: `auto` (an `Impl` or a rule returning one) when
    `impl` is AUTO, else `impl` itself if the op has it; otherwise a ValueError."""
    impl = parse(impl, key=f"{op}: impl")
    if impl is Impl.AUTO:
        impl = auto() if callable(auto) else auto
    if impl not in available(op):
        raise ValueError(f"{op}: impl={impl.value!r} is not available (this op has: "
                         f"{', '.join(i.value for i in available(op))})")
    return impl


def check(value: str | Impl, ops: Iterable[str], *, key: str = "model.impl") -> Impl:
    """Config validation: `value` is a known implementation and, unless AUTO, every op in `ops`
    has it. Raises one line naming `key` and the op that lacks it."""
    impl = parse(value, key=key)
    if impl is not Impl.AUTO:
        for op in ops:
            if impl not in available(op):
                raise ValueError(f"{key}={impl.value!r}: op {op!r} has no such implementation "
                                 f"(it has: {', '.join(i.value for i in available(op))})")
    return impl


def check_block(value: int, *, key: str = "model.block") -> int:
    """A kernel block size: a positive int (it never changes the function)."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} must be an integer >= 1")
    return value


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"
