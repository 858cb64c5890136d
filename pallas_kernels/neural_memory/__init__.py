"""Neural-memory op (Titans / ATLAS / Miras): one entry, `neural_memory(rule, ..., impl=...)`.

impl (`pallas_kernels.impl.Impl`): reference (anchored token loop, the specification), chunked
(chunk-parallel XLA: a scan over chunks), auto (reference for single-token decode steps, chunked
otherwise), pallas / pallas_interpret (the kernels of `pallas.py` for the matrix memory with the
l2 objective, window 1, no transform or link: Titans' linear LMM; any other rule is one
ValueError line, `kernel_error`; auto never picks them until they are measured on an
accelerator).
Both forms compute the same function for every chunk size `rule.chunk` (part of the model).
See `reference.py` for the rule and the shapes.
"""
from __future__ import annotations

from pallas_kernels.harness import backend_of
from pallas_kernels.impl import Impl, register_op, resolve
from pallas_kernels.neural_memory import chunked, pallas, reference
from pallas_kernels.neural_memory.pallas import kernel_error
from pallas_kernels.neural_memory.reference import (
    Layered,
    MemoryRule,
    MemoryState,
    init_state,
    l2_signal,
    read,
    source_grad,
)

AVAILABLE = register_op("neural_memory", (Impl.REFERENCE, Impl.CHUNKED, Impl.PALLAS,
                                          Impl.PALLAS_INTERPRET))

__all__ = ["Layered", "MemoryRule", "MemoryState", "init_state", "neural_memory", "read", "source_grad",
           "l2_signal", "kernel_error", "AVAILABLE"]


def neural_memory(rule: MemoryRule, outer, W0, state: MemoryState, q, k, v, *, log_ret, lr,
                  log_mom=None, gamma=None, extra=None, pos, reset, real,
                  max_resets: int | None = None, reset_to=None, impl: str | Impl = "auto",
                  block: int = 64):
    """Returns (y [B, T, H, dv] (float32 or wider), new MemoryState). `max_resets`: static
    bound on document starts per row (None: no resets in this call), see
    `chunked.neural_memory`; `reset_to`: optional (W, S, anchor) restored at document starts
    instead of the fresh state; `block`: the kernels' token block (never changes the function)."""
    impl = resolve("neural_memory", impl,
                   auto=lambda: Impl.REFERENCE if q.shape[1] == 1 else Impl.CHUNKED)
    kw = dict(log_ret=log_ret, lr=lr, log_mom=log_mom, gamma=gamma, extra=extra, pos=pos,
              reset=reset, real=real, reset_to=reset_to)
    if impl is Impl.REFERENCE:
        return reference.neural_memory(rule, outer, W0, state, q, k, v, **kw)
    if impl in (Impl.PALLAS, Impl.PALLAS_INTERPRET):
        return pallas.neural_memory(rule, outer, W0, state, q, k, v, block=block,
                                    backend=backend_of(impl, "neural_memory"), **kw)
    return chunked.neural_memory(rule, outer, W0, state, q, k, v, max_resets=max_resets, **kw)
