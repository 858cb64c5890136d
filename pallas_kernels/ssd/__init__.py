"""Mamba-2 SSD (scalar-decay selective scan with grouped B/C): one entry, `ssd(..., impl=...)`.

impl (`pallas_kernels.impl.Impl`): reference (sequential float32 `lax.scan`), chunked (the
chunked dual form over chunks of `block` steps, XLA), auto (the chunked form; the sequential
step for one token), pallas (the kernels of `pallas.py` for this TPU or GPU, token
blocks of `block`), pallas_interpret (the same kernels in interpret mode: the CPU tests); auto
never picks the kernels until they are measured on an accelerator.
"""
from __future__ import annotations

from pallas_kernels.harness import backend_of
from pallas_kernels.impl import Impl, register_op, resolve
from pallas_kernels.ssd import chunked, pallas, reference

AVAILABLE = register_op("ssd", (Impl.REFERENCE, Impl.CHUNKED, Impl.PALLAS, Impl.PALLAS_INTERPRET))


def ssd(x, dt, A, Bm, C, *, h0=None, reset=None, impl: str | Impl = "auto", block: int = 64):
    """x [B, T, H, P]; dt [B, T, H]; A [H]; Bm, C [B, T, G, N]; h0 [B, H, P, N]; reset [B, T].
    Returns (y [B, T, H, P] float32, final state [B, H, P, N] float32)."""
    # auto: the chunked dual form everywhere but the one-token step (measured on this 2-core CPU,
    # one core, Mamba-2 at width 256, 4 layers, batch 4, d_state 128, its training step: chunked
    # block 64 3.2x the sequential scan at T = 256 and 4.7x at T = 1024)
    impl = resolve("ssd", impl, auto=lambda: Impl.REFERENCE if x.shape[1] == 1 else Impl.CHUNKED)
    if impl is Impl.REFERENCE:
        return reference.ssd(x, dt, A, Bm, C, h0=h0, reset=reset)
    if impl in (Impl.PALLAS, Impl.PALLAS_INTERPRET):
        return pallas.ssd(x, dt, A, Bm, C, h0=h0, reset=reset, block=block,
                          backend=backend_of(impl, "ssd"))
    return chunked.ssd(x, dt, A, Bm, C, h0=h0, reset=reset, block=block)
