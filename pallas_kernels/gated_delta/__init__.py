"""The shared gated-delta-rule op (specs/mom.md contract notes): `gated_delta(..., impl=...)`.

Used by MoM, DeltaNet and the Titans/ATLAS reduction tests. impl (`pallas_kernels.impl.Impl`):
reference (token scan), chunked (UT-transform chunks of `block` tokens, an implementation
parameter), auto (reference for single-token steps and on CPU, chunked otherwise). On CPU the chunked form
is faster (one core, Gated DeltaNet's training step with AdamW at block 64: chunked / scan
tokens/s 1.37x at width 128, 2 layers, T 64; 1.55x at T 128; 2.5x at width 256, 4 layers,
T 256; 2.9x at T 1024; an earlier note of it 12-89x slower was measured at the conformance
configs' tiny blocks), but its `solve_triangular` is a LAPACK call, and XLA:CPU's thunk runtime
(jaxlib 0.10.2) deadlocked on it: `python -m eval.bench --suite --models=gated_deltanet
--lengths=4096` (4 layers, batch 1) stopped at 0 % CPU, as layers/lssl.py saw with LAPACK
solves; auto picks it on CPU once the solve is plain XLA, pallas (the kernels of `pallas.py` for this TPU or
GPU, chunks of `block` tokens), pallas_interpret (the same kernels in interpret mode: the CPU
tests); auto never picks the kernels until they are measured on an accelerator.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import float_type
from pallas_kernels.gated_delta import chunked, pallas, reference
from pallas_kernels.harness import backend_of
from pallas_kernels.impl import Impl, on_cpu, register_op, resolve

AVAILABLE = register_op("gated_delta", (Impl.REFERENCE, Impl.CHUNKED, Impl.PALLAS,
                                        Impl.PALLAS_INTERPRET))


def gated_delta(q, k, v, g, beta, *, scale: float, initial_state=None, impl: str | Impl = "auto",
                block: int = 64):
    """o [B, T, H, dv], final state [B, H, dk, dv]; see `reference.gated_delta`."""
    impl = resolve("gated_delta", impl,
                   auto=lambda: Impl.REFERENCE if q.shape[1] == 1 or on_cpu() else Impl.CHUNKED)
    if impl is Impl.REFERENCE:
        return reference.gated_delta(q, k, v, g, beta, scale=scale, initial_state=initial_state)
    if impl is Impl.CHUNKED:
        return chunked.gated_delta(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                   block=block)
    o, S = pallas.gated_delta(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                              block=block, backend=backend_of(impl, "gated_delta"))
    return o, S.astype(float_type(jnp.result_type(q, k, v, g, beta)))
