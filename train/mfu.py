"""Model FLOPs utilisation: an analytic FLOP count per token and the peak of the devices.

FLOPs per trained token (forward + backward) = 6 * N_matmul + attention term, where N_matmul
counts the parameters used in matrix products (every parameter except embedding tables that are
only looked up: the input table when the head is untied, learned positions) and the attention
term is 12 * sum over attention layers of (heads * head_dim * keys per query), the PaLM
convention (keys = sequence length, or the window + 1 for sliding-window layers; no causal
halving). Work inside recurrent scans that is not a parameter product (state updates) is not
counted. XLA's cost analysis is not used: it counts a while/scan body once.

Peak: a table of known accelerators (dense bf16 FLOP/s per device); on CPU a short float32
matmul probe on the first device measures the host's peak (the host's cores are shared by its
virtual devices, so the CPU peak is not multiplied by the device count).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# dense bf16 peak FLOP/s per device (vendor datasheets)
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "tpu7x": 2307e12,
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
    "l4": 121e12,
    "a10g": 125e12,
    "v100": 125e12,
    "b200": 2250e12,
    "gb200": 2500e12,
}


def device_peak_flops(device=None) -> float | None:
    """Peak FLOP/s of one accelerator from the table (None when unknown or CPU)."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name in kind:
            return PEAK_FLOPS[name]
    return None


def cpu_probe_flops(n: int = 1024, reps: int = 5) -> float:
    """Measured float32 matmul FLOP/s on the first device (best of `reps`)."""
    dev = jax.local_devices()[0]
    a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32), dev)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def total_peak_flops(probe: bool = True) -> float | None:
    """Peak FLOP/s of all devices of the run (the host's probe on CPU)."""
    devs = jax.devices()
    if devs[0].platform == "cpu":
        return cpu_probe_flops() * jax.process_count() if probe else None
    per = device_peak_flops(devs[0])
    return None if per is None else per * len(devs)


def _embedding_only_params(model) -> int:
    """Parameters only looked up: untied input embeddings and learned position tables."""
    from layers.embed import Embed, LearnedPositions
    n = 0
    head_tied = getattr(model, "head", 1) is None
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LearnedPositions):
            n += sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
        elif isinstance(m, Embed) and not head_tied:
            n += sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    return n


def attention_layers(model) -> list[tuple[int, int, int | None]]:
    """(heads, head_dim, window) of every attention layer in the model."""
    from layers.attention import Attention
    return [(m.n_heads, m.head_dim, m.window) for _, m in nnx.iter_modules(model)
            if isinstance(m, Attention)]


def flops_per_token(model, seq_len: int) -> float:
    """Analytic training FLOPs per token (forward + backward), see the module docstring."""
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_matmul = n_params - _embedding_only_params(model)
    attn = 0.0
    for heads, hd, window in attention_layers(model):
        keys = seq_len if window is None else min(seq_len, window + 1)
        attn += 12.0 * heads * hd * keys
    return 6.0 * n_matmul + attn
