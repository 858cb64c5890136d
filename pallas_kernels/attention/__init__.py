"""Softmax attention with generalised masks: one entry, `attention(..., impl=...)`.

impl: "reference" (every score materialised), "chunked" (blockwise online softmax, XLA),
"pallas" / "pallas_interpret" (kernel slot: not written yet, falls back to "chunked" with one
logged warning), "auto" (reference for small score matrices, chunked otherwise).
"""
from __future__ import annotations

from pallas_kernels import _dispatch
from pallas_kernels.attention import chunked, reference

IMPLS = ("auto", "reference", "chunked", "pallas", "pallas_interpret")


def attention(q, k, v, *, impl: str = "auto", block_k: int = 128, dropout_rate: float = 0.0,
              dropout_key=None, **masks):
    impl = _dispatch.resolve("attention", impl, IMPLS, available=("reference", "chunked"))
    if dropout_rate > 0.0 and dropout_key is not None:
        impl = "reference"  # probability dropout lives in the reference form only
    if impl == "auto":
        impl = "reference" if q.shape[1] * k.shape[1] <= 512 * 512 else "chunked"
    if impl == "reference":
        return reference.attention(q, k, v, dropout_rate=dropout_rate, dropout_key=dropout_key,
                                   **masks)
    return chunked.attention(q, k, v, block_k=block_k, **masks)
