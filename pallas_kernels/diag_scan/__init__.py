"""The diagonal (one state per channel) scan of Hydra's SSM path (specs/hydra.md §2.2):
`diag_scan(alpha, inp, s0, reset, impl=...)`. reference: the token loop (reference.py, the
specification); chunked: associative scans within chunks of `block` tokens and a carry over
chunks (an implementation parameter). auto: reference on CPU and for one-token steps, chunked
otherwise. pallas (the kernels of `pallas.py` for this TPU or GPU, channel blocks of 128),
pallas_interpret (the same kernels in interpret mode: the CPU tests); auto never picks the
kernels until they are measured on an accelerator."""
from __future__ import annotations

from pallas_kernels.diag_scan import chunked, pallas, reference
from pallas_kernels.harness import backend_of
from pallas_kernels.impl import Impl, on_cpu, register_op, resolve

AVAILABLE = register_op("diag_scan", (Impl.REFERENCE, Impl.CHUNKED, Impl.PALLAS,
                                      Impl.PALLAS_INTERPRET))


def diag_scan(alpha, inp, s0, reset, *, impl: str | Impl = "auto", block: int = 64):
    """(s_read [B, T, D], final state [B, D]) float32; see `reference.diag_scan`."""
    impl = resolve("diag_scan", impl,
                   auto=lambda: Impl.REFERENCE if alpha.shape[1] == 1 or on_cpu() else Impl.CHUNKED)
    if impl is Impl.REFERENCE:
        return reference.diag_scan(alpha, inp, s0, reset)
    if impl in (Impl.PALLAS, Impl.PALLAS_INTERPRET):
        return pallas.diag_scan(alpha, inp, s0, reset, backend=backend_of(impl, "diag_scan"))
    return chunked.diag_scan(alpha, inp, s0, reset, block=block)
