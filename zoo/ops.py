"""The ops the layers are built on (`layers.ops`), for benchmarks (eval/bench_ops.py) and
notebooks, which import zoo rather than the kernels directly."""
from layers.ops import (
    MemoryRule,
    attention,
    gated_delta,
    gla,
    init_state,
    l2_signal,
    linear_memory,
    neural_memory,
    selective_scan,
    ssd,
)

__all__ = ["attention", "gated_delta", "neural_memory", "MemoryRule", "init_state", "l2_signal",
           "linear_memory", "selective_scan", "gla", "ssd"]
