"""Neural-memory op (Titans / ATLAS / Miras): one entry, `neural_memory(rule, ..., impl=...)`.

impl (`pallas_kernels.impl.Impl`): reference (anchored token loop, the specification), chunked
(chunk-parallel XLA: a scan over chunks), auto (reference for single-token decode steps, chunked
otherwise). No Pallas kernel yet: requesting one is an error.
Both forms compute the same function for every chunk size `rule.chunk` (part of the model).
See `reference.py` for the rule and the shapes.
"""
from __future__ import annotations

from pallas_kernels.impl import Impl, register_op, resolve
from pallas_kernels.neural_memory import chunked, reference
from pallas_kernels.neural_memory.reference import (
    Layered,
    MemoryRule,
    MemoryState,
    init_state,
    read,
    source_grad,
)

AVAILABLE = register_op("neural_memory", (Impl.REFERENCE, Impl.CHUNKED))

__all__ = ["Layered", "MemoryRule", "MemoryState", "init_state", "neural_memory", "read", "source_grad",
           "AVAILABLE"]


def neural_memory(rule: MemoryRule, outer, W0, state: MemoryState, q, k, v, *, log_ret, lr,
                  log_mom=None, gamma=None, extra=None, pos, reset, real,
                  max_resets: int | None = None, reset_to=None, impl: str | Impl = "auto"):
    """Returns (y [B, T, H, dv] (float32 or wider), new MemoryState). `max_resets`: static
    bound on document starts per row (None: no resets in this call), see
    `chunked.neural_memory`; `reset_to`: optional (W, S, anchor) restored at document starts
    instead of the fresh state."""
    impl = resolve("neural_memory", impl,
                   auto=lambda: Impl.REFERENCE if q.shape[1] == 1 else Impl.CHUNKED)
    kw = dict(log_ret=log_ret, lr=lr, log_mom=log_mom, gamma=gamma, extra=extra, pos=pos,
              reset=reset, real=real, reset_to=reset_to)
    if impl is Impl.REFERENCE:
        return reference.neural_memory(rule, outer, W0, state, q, k, v, **kw)
    return chunked.neural_memory(rule, outer, W0, state, q, k, v, max_resets=max_resets, **kw)
