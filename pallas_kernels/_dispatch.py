"""Implementation choice shared by every op's dispatcher."""
from __future__ import annotations

import logging

_warned: set[tuple[str, str]] = set()
log = logging.getLogger("seqzoo.kernels")


def resolve(op: str, impl: str, impls: tuple[str, ...], available: tuple[str, ...]) -> str:
    """Validate `impl`; an unavailable kernel falls back to "chunked" (or "reference") with one
    logged warning, never with different semantics."""
    if impl not in impls:
        raise ValueError(f"{op}: impl must be one of {impls}, got {impl!r}")
    if impl == "auto" or impl in available:
        return impl
    fallback = "chunked" if "chunked" in available else "reference"
    if (op, impl) not in _warned:
        _warned.add((op, impl))
        log.warning("%s: impl=%r is not available here; falling back to %r", op, impl, fallback)
    return fallback
