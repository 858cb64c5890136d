"""RAT's chunked recurrence with inter-chunk softmax attention (specs/rat.md §3.5-3.9, §5, §6):
one entry, `rat(..., impl=...)`.

impl (`pallas_kernels.impl.Impl`): reference (the token-by-token decode step of §6.2 as a
`lax.scan`, the specification), chunked (§5: an associative scan for the recurrence, then one
softmax over the chunk summaries and the running state, XLA), auto (reference for single-token
steps, chunked otherwise). No Pallas kernel yet: requesting one is an error.

The carry (both forms): (k_sum [B, S, H, d] rotated chunk keys, v_sum [B, S, H, d] chunk values,
k_run, v_run [B, H, d] the running in-chunk states before RoPE). Slot c of k_sum / v_sum holds the
summary of chunk c of the current document; the slot of the chunk of the last processed token
holds its running (possibly partial) state (§6.1). S slots hold chunk indices 0 .. S-1.
"""
from __future__ import annotations

from pallas_kernels.impl import Impl, register_op, resolve
from pallas_kernels.rat import chunked, reference

AVAILABLE = register_op("rat", (Impl.REFERENCE, Impl.CHUNKED))


def rat(q, k, v, f, carry, *, chunk: int, pos, doc, mask, rotate=None, fresh: bool = False,
        impl: str | Impl = "auto"):
    """y [B, T, H, d] (float32) and the new carry; see `reference.rat` for the arguments."""
    impl = resolve("rat", impl, auto=lambda: Impl.REFERENCE if q.shape[1] == 1 else Impl.CHUNKED)
    if impl is Impl.REFERENCE:
        return reference.rat(q, k, v, f, carry, chunk=chunk, pos=pos, mask=mask, rotate=rotate)
    return chunked.rat(q, k, v, f, carry, chunk=chunk, pos=pos, doc=doc, mask=mask,
                       rotate=rotate, fresh=fresh)
