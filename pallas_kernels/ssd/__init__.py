"""Mamba-2 SSD (scalar-decay selective scan with grouped B/C): one entry, `ssd(..., impl=...)`.

impl: "reference" (sequential float32 `lax.scan`), "chunked" (the chunked dual form, XLA),
"pallas" / "pallas_interpret" (kernel slot: not written yet, falls back to "chunked" with one
logged warning), "auto" (the sequential scan on CPU, the chunked form on accelerators).
"""
from __future__ import annotations

import jax

from pallas_kernels import _dispatch
from pallas_kernels.ssd import chunked, reference

IMPLS = ("auto", "reference", "chunked", "pallas", "pallas_interpret")


def ssd(x, dt, A, Bm, C, *, h0=None, reset=None, impl: str = "auto", chunk: int = 64):
    """x [B, T, H, P]; dt [B, T, H]; A [H]; Bm, C [B, T, G, N]; h0 [B, H, P, N]; reset [B, T].
    Returns (y [B, T, H, P] float32, final state [B, H, P, N] float32)."""
    impl = _dispatch.resolve("ssd", impl, IMPLS, available=("reference", "chunked"))
    if impl == "auto":
        impl = "reference" if jax.default_backend() == "cpu" else "chunked"
    if impl == "reference":
        return reference.ssd(x, dt, A, Bm, C, h0=h0, reset=reset)
    return chunked.ssd(x, dt, A, Bm, C, h0=h0, reset=reset, chunk=chunk)
