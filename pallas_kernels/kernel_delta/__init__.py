"""The kernelised delta rule (Dot, specs/atlas.md §2.7, Eqs. 30–31): `kernel_delta(..., impl=...)`.

    u_i = η_i (v_i − Σ_{j<i} κ(k_i, k_j) u_j),    y_t = Σ_{j≤t} κ(q_t, k_j) u_j,
    κ(a, b) = exp(s a·b)

per row and head, the sums over the keys of the same document: the cached ones (a previous
call's keys and their u) and this call's earlier ones. It is the delta rule of a linear memory on
φ* (M_t = Σ_j u_j φ*(k_j)ᵀ, M_0 = 0, α ≡ 1, window c = 1) written through the kernel.
impl: reference (a token scan), chunked (one unit-lower-triangular solve per call,
U = (I + diag(η) strict_tril(K_κ))^{−1} diag(η) (V − K_cache U_cache)), auto (chunked). No
Pallas kernel: requesting one is an error.
"""
from __future__ import annotations

from pallas_kernels.impl import Impl, register_op, resolve
from pallas_kernels.kernel_delta import chunked, reference

AVAILABLE = register_op("kernel_delta", (Impl.REFERENCE, Impl.CHUNKED))


def kernel_delta(q, k, v, eta, *, scale: float, doc, valid, cache=None,
                 impl: str | Impl = "auto"):
    """(y [B, T, H, dv], u [B, T, H, dv]); see `reference.kernel_delta`."""
    impl = resolve("kernel_delta", impl, auto=Impl.CHUNKED)
    fn = reference.kernel_delta if impl is Impl.REFERENCE else chunked.kernel_delta
    return fn(q, k, v, eta, scale=scale, doc=doc, valid=valid, cache=cache)
