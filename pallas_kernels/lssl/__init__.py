"""LSSL (specs/lssl.md §2.3-2.4, §4): the discretised linear SSM per feature, one entry
`lssl(..., impl=...)`.

impl (`pallas_kernels.impl.Impl`): reference (the recurrence, a sequential float32 `lax.scan`),
chunked (convolution inside chunks of `block` steps with state passing, XLA), auto (the
recurrence on CPU, the LSSL's default there before `auto` existed; the chunked convolution on
accelerators, where its matmuls replace L sequential steps -- not measured here). No Pallas
kernel yet: requesting one is an error. The discretisation (Abar, Bbar from A, B, dt) is the
layer's (`layers/lssl.py`).
"""
from __future__ import annotations

from pallas_kernels.impl import Impl, on_cpu, register_op, resolve
from pallas_kernels.lssl import chunked, reference

AVAILABLE = register_op("lssl", (Impl.REFERENCE, Impl.CHUNKED))


def lssl(u, Abar, Bbar, C, D, *, h0=None, mask=None, reset=None, impl: str | Impl = "auto",
         block: int = 64):
    """u [B, L, H]; Abar [H, N, N]; Bbar [H, N]; C [H, M, N]; D [H, M]; h0 [B, H, N];
    mask, reset [B, L] bool. Returns (y [B, L, H, M], state after the last real token
    [B, H, N]), float32; see reference.py for the maths."""
    impl = resolve("lssl", impl, auto=lambda: Impl.REFERENCE if on_cpu() else Impl.CHUNKED)
    if impl is Impl.REFERENCE:
        return reference.lssl(u, Abar, Bbar, C, D, h0, mask, reset)
    return chunked.lssl(u, Abar, Bbar, C, D, h0, mask, reset, block=block)
