"""The shared gated-delta-rule op (specs/mom.md contract notes): `gated_delta(..., impl=...)`.

Used by MoM, DeltaNet and the Titans/ATLAS reduction tests. impl: "reference" (token scan),
"chunked" (UT-transform chunks, `chunk` is an implementation parameter), "pallas" /
"pallas_interpret" (kernel slot: not written yet, falls back to "chunked" with one logged
warning), "auto" (reference for single-token steps, chunked otherwise).
"""
from __future__ import annotations

from pallas_kernels import _dispatch
from pallas_kernels.gated_delta import chunked, reference

IMPLS = ("auto", "reference", "chunked", "pallas", "pallas_interpret")


def gated_delta(q, k, v, g, beta, *, scale: float, initial_state=None, impl: str = "auto",
                chunk: int = 64):
    """o [B, T, H, dv], final state [B, H, dk, dv]; see `reference.gated_delta`."""
    impl = _dispatch.resolve("gated_delta", impl, IMPLS, available=("reference", "chunked"))
    if impl == "auto":
        impl = "reference" if q.shape[1] == 1 else "chunked"
    if impl == "reference":
        return reference.gated_delta(q, k, v, g, beta, scale=scale, initial_state=initial_state)
    return chunked.gated_delta(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                               chunk=chunk)
