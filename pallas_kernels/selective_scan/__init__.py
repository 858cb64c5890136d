"""Mamba-1 selective scan: one entry, `selective_scan(..., impl=...)`.

impl (`pallas_kernels.impl.Impl`): reference (sequential float32 `lax.scan`), chunked
(chunk-parallel closed form inside chunks of `block` steps, XLA), auto (the sequential scan on
CPU, where it measured fastest on 2 cores, the chunked form on accelerators), pallas (the
kernels of `pallas.py` for this TPU or GPU: token blocks of `block`, channel blocks of 128),
pallas_interpret (the same kernels in interpret mode: the CPU tests); auto never picks the
kernels until they are measured on an accelerator. The chunked Mamba-1 form materialises a [block, block, Di, N]
decay tensor per chunk, i.e. O(block) more work than the scan: keep the block small (16).
Measured on the 2-core CPU (B4 T1024 Di256 N16, forward / forward+grad): reference 33 / 128 ms,
chunked-16 2.2 / 1.9 s, chunked-64 20 / 13 s.
"""
from __future__ import annotations

from pallas_kernels.harness import backend_of
from pallas_kernels.impl import Impl, on_cpu, register_op, resolve
from pallas_kernels.selective_scan import chunked, pallas, reference

AVAILABLE = register_op("selective_scan", (Impl.REFERENCE, Impl.CHUNKED, Impl.PALLAS,
                                           Impl.PALLAS_INTERPRET))


def selective_scan(x, dt, A, Bm, C, *, h0=None, reset=None, exact_zoh: bool = False,
                   impl: str | Impl = "auto", block: int = 16):
    """x, dt [B, T, Di]; A [Di, N]; Bm, C [B, T, N]; h0 [B, Di, N]; reset [B, T] bool.
    Returns (y [B, T, Di] float32, h_T [B, Di, N] float32); see reference.py for the maths."""
    impl = resolve("selective_scan", impl,
                   auto=lambda: Impl.REFERENCE if on_cpu() else Impl.CHUNKED)
    if impl is Impl.REFERENCE:
        return reference.selective_scan(x, dt, A, Bm, C, h0=h0, reset=reset, exact_zoh=exact_zoh)
    if impl in (Impl.PALLAS, Impl.PALLAS_INTERPRET):
        return pallas.selective_scan(x, dt, A, Bm, C, h0=h0, reset=reset, exact_zoh=exact_zoh,
                                     block=block, backend=backend_of(impl, "selective_scan"))
    return chunked.selective_scan(x, dt, A, Bm, C, h0=h0, reset=reset, exact_zoh=exact_zoh,
                                  block=block)
