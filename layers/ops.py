"""The sequence ops of `pallas_kernels/` that layers build on, re-exported one level up (the import
direction is pallas_kernels <- layers <- zoo): `zoo.ops` hands them to benchmarks and notebooks."""
from pallas_kernels.attention import attention
from pallas_kernels.gated_delta import gated_delta

__all__ = ["attention", "gated_delta"]
