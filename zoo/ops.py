"""The ops the layers are built on (`layers.ops`), for benchmarks (eval/bench_ops.py) and
notebooks, which import zoo rather than the kernels directly."""
from layers.ops import attention, gated_delta

__all__ = ["attention", "gated_delta"]
