"""The sequence ops of `pallas_kernels/` that layers build on, re-exported one level up (the import
direction is pallas_kernels <- layers <- zoo): `zoo.ops` hands them to benchmarks and notebooks."""
from layers.memory_nets import linear_memory
from pallas_kernels.attention import attention
from pallas_kernels.gated_delta import gated_delta
from pallas_kernels.gla import gla
from pallas_kernels.neural_memory import MemoryRule, init_state, l2_signal, neural_memory
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.ssd import ssd

__all__ = ["attention", "gated_delta", "neural_memory", "MemoryRule", "init_state", "l2_signal",
           "linear_memory", "selective_scan", "gla", "ssd"]
