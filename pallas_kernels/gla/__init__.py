"""Gated linear attention op (specs/mom.md §2.8): `gla(q, k, v, g=None, *, scale, ...)`.

Per token S <- exp(g)[:, None] * S + k^T v, o = scale * q S (read after the update); g [B, T, H,
dk] is a per-key log-decay (<= 0), or None for plain linear attention. Shared by the linear
attention and GLA mixers (layers/linear_memory.py) and by MoM's linear bases. impl
(`pallas_kernels.impl.Impl`): reference (token scan), chunked (chunk-parallel in blocks of
`block` tokens, an implementation parameter), auto (measured, `python -m eval.bench` at T 256:
reference for single-token steps and, on CPU, with a decay, whose chunked form's [C, C, dk]
factor made a training step ~13x slower than the scan; chunked otherwise, e.g. plain linear
attention, ~0.6x the scan's time), pallas (the kernels of `pallas.py` for this TPU or GPU, token
blocks of `block`), pallas_interpret (the same kernels in interpret mode: the CPU tests); auto
never picks the kernels until they are measured on an accelerator.
"""
from __future__ import annotations

from pallas_kernels.gla import chunked, pallas, reference
from pallas_kernels.harness import backend_of
from pallas_kernels.impl import Impl, on_cpu, register_op, resolve

AVAILABLE = register_op("gla", (Impl.REFERENCE, Impl.CHUNKED, Impl.PALLAS, Impl.PALLAS_INTERPRET))


def gla(q, k, v, g=None, *, scale: float, initial_state=None, impl: str | Impl = "auto",
        block: int = 64):
    """o [B, T, H, dv], final state [B, H, dk, dv]; see `reference.gla`."""
    scan = q.shape[1] == 1 or (g is not None and on_cpu())
    impl = resolve("gla", impl, auto=Impl.REFERENCE if scan else Impl.CHUNKED)
    if impl is Impl.REFERENCE:
        return reference.gla(q, k, v, g, scale=scale, initial_state=initial_state)
    if impl in (Impl.PALLAS, Impl.PALLAS_INTERPRET):
        o, S = pallas.gla(q, k, v, g, scale=scale, initial_state=initial_state, block=block,
                          backend=backend_of(impl, "gla"))
        return o, S
    return chunked.gla(q, k, v, g, scale=scale, initial_state=initial_state, block=block)
