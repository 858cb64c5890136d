"""Mamba-1 selective scan: one entry, `selective_scan(..., impl=...)`.

impl: "reference" (sequential float32 `lax.scan`), "chunked" (chunk-parallel closed form inside
chunks, XLA), "pallas" / "pallas_interpret" (kernel slot: not written yet, falls back to
"chunked" with one logged warning), "auto" (the sequential scan on CPU, where it measured
fastest on 2 cores, the chunked form on accelerators). The chunked Mamba-1 form materialises a
[chunk, chunk, Di, N] decay tensor per chunk, i.e. O(chunk) more work than the scan: keep the
chunk small (16). Measured on the 2-core CPU (B4 T1024 Di256 N16, forward / forward+grad):
reference 33 / 128 ms, chunked-16 2.2 / 1.9 s, chunked-64 20 / 13 s.
"""
from __future__ import annotations

import jax

from pallas_kernels import _dispatch
from pallas_kernels.selective_scan import chunked, reference

IMPLS = ("auto", "reference", "chunked", "pallas", "pallas_interpret")


def selective_scan(x, dt, A, Bm, C, *, h0=None, reset=None, exact_zoh: bool = False,
                   impl: str = "auto", chunk: int = 16):
    """x, dt [B, T, Di]; A [Di, N]; Bm, C [B, T, N]; h0 [B, Di, N]; reset [B, T] bool.
    Returns (y [B, T, Di] float32, h_T [B, Di, N] float32); see reference.py for the maths."""
    impl = _dispatch.resolve("selective_scan", impl, IMPLS, available=("reference", "chunked"))
    if impl == "auto":
        impl = "reference" if jax.default_backend() == "cpu" else "chunked"
    if impl == "reference":
        return reference.selective_scan(x, dt, A, Bm, C, h0=h0, reset=reset, exact_zoh=exact_zoh)
    return chunked.selective_scan(x, dt, A, Bm, C, h0=h0, reset=reset, exact_zoh=exact_zoh,
                                  chunk=chunk)
