"""Model FLOPs utilisation: the analytic FLOP count per token and the peak of the devices.

FLOPs per trained token (forward + backward) are declared by every registry entry beside its
parameter count (`zoo.register(..., flops=...)`; the convention is in `zoo.lm`: every product,
attention and the scans' state updates included). XLA's cost analysis is not used at run time:
it counts a while/scan body once (tests/test_flops.py compares the declarations to it with the
loops unrolled).

Peak: a table of known accelerators (dense bf16 FLOP/s per device); on CPU a short float32
matmul probe on the first device measures the host's peak (the host's cores are shared by its
virtual devices, so the CPU peak is not multiplied by the device count).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import zoo

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


def flops_per_token(name: str, model_cfg, seq_len: int) -> float:
    """Analytic training FLOPs per token (forward + backward) that model `name` declares in the
    registry (`zoo.lm` documents the convention; tests/test_flops.py checks every entry)."""
    entry = zoo.get(name)
    if entry.flops is None:
        raise ValueError(f"model {name!r} declares no training FLOPs per token")
    return float(entry.flops(model_cfg, seq_len))
