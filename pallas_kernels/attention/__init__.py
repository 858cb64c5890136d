"""Softmax attention with generalised masks: one entry, `attention(..., impl=...)`.

impl (`pallas_kernels.impl.Impl`): reference (every score materialised), chunked (blockwise
online softmax, XLA; `block` keys per block), pallas (the flash kernels of `pallas.py` for this
TPU or GPU, `block` queries and keys per block), pallas_interpret (the same kernels in interpret
mode: any platform, the CPU tests), auto (reference for small score matrices, chunked
otherwise; the kernels are chosen explicitly until measured on an accelerator).
"""
from __future__ import annotations

from pallas_kernels.attention import chunked, pallas, reference
from pallas_kernels.harness import backend_of
from pallas_kernels.impl import Impl, register_op, resolve

AVAILABLE = register_op("attention", (Impl.REFERENCE, Impl.CHUNKED, Impl.PALLAS,
                                      Impl.PALLAS_INTERPRET))


def attention(q, k, v, *, impl: str | Impl = "auto", block: int = 128, dropout_rate: float = 0.0,
              dropout_key=None, **masks):
    if dropout_rate > 0.0 and dropout_key is not None:
        impl = Impl.REFERENCE  # probability dropout lives in the reference form only
    impl = resolve("attention", impl, auto=lambda: Impl.REFERENCE
                   if q.shape[1] * k.shape[1] <= 512 * 512 else Impl.CHUNKED)
    if impl is Impl.REFERENCE:
        return reference.attention(q, k, v, dropout_rate=dropout_rate, dropout_key=dropout_key,
                                   **masks)
    if impl is Impl.CHUNKED:
        return chunked.attention(q, k, v, block=block, **masks)
    return pallas.attention(q, k, v, block=block, backend=backend_of(impl, "attention"), **masks)
