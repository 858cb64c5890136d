"""Op benchmarks: each Pallas kernel against its chunked XLA form (`python -m eval.bench --ops=...`).

    python -m eval.bench --ops=attention,gated_delta --seq_lens=1024,4096 --batch=1 \
        [--impls=chunked,pallas] [--steps=5] [--out=docs/kernels.jsonl]

Per op, length and implementation: the median milliseconds of the forward and of forward +
backward (jit-compiled, inputs on the device), the achieved FLOP/s of each and its fraction of
the device's peak (train.mfu: the vendor peak on TPU/GPU, the host's matmul probe on CPU), and
`vs_chunked`, the time over the chunked form's in the same run. Shapes: attention causal,
8 query heads over 2 kv heads of 128, bfloat16 on accelerators (float32 on CPU); the gated delta
rule 8 heads of 128 x 128 with normalised keys. FLOPs are the products' (2 per multiply-add):
attention 4 B H T S d forward (the full score matrix, no causal halving), 2.5x that again for
the backward (five products to the forward's two); the gated delta rule 6 B H T dk dv forward
(k S, the rank-1 write, q S), 2x that again for the backward; GLA the same heads with per-key
decay, 4 B H T dk dv forward (the rank-1 write, q S), 2x again backward; the neural memory (Titans' matrix
memory with momentum and forget gate, anchor chunk 16) 8 heads of 128 x 128, 10 B H T dk dv
forward (k A, the gradient's outer product, the momentum and weight updates, q W), 2x that again
for the backward. On a CPU the kernels run only
in interpret mode (`--impls=chunked,pallas_interpret`): that measures the interpreter, not the
kernel; the numbers that matter are an accelerator's.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

OPS = ("attention", "gated_delta", "gla", "neural_memory", "selective_scan", "ssd")


def _attention(B, T, impl, dtype):
    from zoo.ops import attention
    H, Hkv, d = 8, 2, 128
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, H, d), dtype)
    k, v = (jax.random.normal(kk, (B, T, Hkv, d), dtype) for kk in ks[1:])
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    grp = jnp.zeros((B, T), jnp.int32)
    valid = jnp.ones((B, T), bool)

    def f(q, k, v):
        return attention(q, k, v, q_pos=pos, k_pos=pos, q_group=grp, k_group=grp,
                         k_valid=valid, causal=True, impl=impl, block=128)
    return f, (q, k, v), 4.0 * B * H * T * T * d, 2.5


def _gated_delta(B, T, impl, dtype):
    from zoo.ops import gated_delta
    H, dk, dv = 8, 128, 128
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (B, T, H, dk), dtype)
    k = jax.random.normal(ks[1], (B, T, H, dk), jnp.float32)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, dv), dtype)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))
    b = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))

    def f(q, k, v):
        return gated_delta(q, k, v, g, b, scale=dk ** -0.5, impl=impl, block=64)[0]
    return f, (q, k, v), 6.0 * B * H * T * dk * dv, 2.0


def _gla(B, T, impl, dtype):
    from zoo.ops import gla
    H, dk, dv = 8, 128, 128
    ks = jax.random.split(jax.random.key(0), 4)
    q, k = (0.1 * jax.random.normal(kk, (B, T, H, dk), dtype) for kk in ks[:2])
    v = jax.random.normal(ks[2], (B, T, H, dv), dtype)
    g = -0.1 * jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, dk)))

    def f(q, k, v):
        return gla(q, k, v, g, scale=dk ** -0.5, impl=impl, block=64)[0]
    return f, (q, k, v), 4.0 * B * H * T * dk * dv, 2.0


def _neural_memory(B, T, impl, dtype):
    from zoo.ops import MemoryRule, init_state, l2_signal, linear_memory, neural_memory
    H, dk, dv = 8, 128, 128
    rule = MemoryRule(linear_memory, l2_signal, chunk=16)
    ks = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(ks[0], (B, T, H, dk), dtype)
    k = jax.random.normal(ks[1], (B, T, H, dk), jnp.float32)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, dv), dtype)
    log_ret = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))
    lr = 0.1 * jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    log_mom = -jax.nn.softplus(jax.random.normal(ks[5], (B, T, H)))
    W0 = {"w": jnp.zeros((H, dk, dv), jnp.float32)}
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    def f(q, k, v):
        return neural_memory(rule, None, W0, init_state(W0, B, dk, dv), q, k, v,
                             log_ret=log_ret, lr=lr, log_mom=log_mom, pos=pos, reset=pos < 0,
                             real=pos >= 0, impl=impl, block=64)[0]
    return f, (q, k, v), 10.0 * B * H * T * dk * dv, 2.0


def _selective_scan(B, T, impl, dtype):
    from zoo.ops import selective_scan
    Di, N = 1536, 16
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (B, T, Di), dtype)
    dt = (0.1 * jax.nn.softplus(jax.random.normal(ks[1], (B, T, Di)))).astype(dtype)
    A = -jnp.exp(jax.random.normal(ks[2], (Di, N)))
    Bm = jax.random.normal(ks[3], (B, T, N), dtype)
    C = jax.random.normal(ks[4], (B, T, N), dtype)

    def f(x, dt, Bm):
        return selective_scan(x, dt, A, Bm, C, impl=impl, block=64)[0]
    return f, (x, dt, Bm), 6.0 * B * T * Di * N, 2.0


def _ssd(B, T, impl, dtype):
    from zoo.ops import ssd
    H, P, G, N = 24, 64, 1, 128
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (B, T, H, P), dtype)
    dt = 0.1 * jax.nn.softplus(jax.random.normal(ks[1], (B, T, H)))
    A = -jnp.exp(jax.random.normal(ks[2], (H,)))
    Bm = jax.random.normal(ks[3], (B, T, G, N), dtype)
    C = jax.random.normal(ks[4], (B, T, G, N), dtype)

    def f(x, Bm, C):
        return ssd(x, dt, A, Bm, C, impl=impl, block=64)[0]
    return f, (x, Bm, C), 6.0 * B * T * H * P * N, 2.0


CASES = {"ssd": _ssd, "attention": _attention, "gated_delta": _gated_delta, "gla": _gla,
         "neural_memory": _neural_memory,
         "selective_scan": _selective_scan}


def _time(fn, args, steps):
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(ops, lens, batch, impls, steps) -> list[dict]:
    from train.mfu import total_peak_flops
    peak = total_peak_flops(probe=True)
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    rows = []
    for op in ops:
        for T in lens:
            base = None
            for impl in impls:
                f, args, fwd_flops, bwd_factor = CASES[op](batch, T, impl, dtype)

                def train(*a):
                    return jax.grad(lambda *x: jnp.sum(f(*x).astype(jnp.float32)),
                                    argnums=(0, 1, 2))(*a)
                fwd, both = _time(f, args, steps), _time(train, args, steps)
                flops = fwd_flops * (1.0 + bwd_factor)
                row = {"op": op, "impl": impl, "seq_len": T, "batch": batch,
                       "fwd_ms": fwd * 1e3, "fwd_bwd_ms": both * 1e3,
                       "fwd_tflops": fwd_flops / fwd / 1e12, "fwd_bwd_tflops": flops / both / 1e12,
                       "fwd_bwd_of_peak": (flops / both / peak) if peak else None,
                       "device": jax.devices()[0].device_kind}
                if impl == "chunked":
                    base = row
                if base is not None:
                    row["vs_chunked_fwd"] = row["fwd_ms"] / base["fwd_ms"]
                    row["vs_chunked_fwd_bwd"] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]
                rows.append(row)
                print(f"{op:>12} {impl:<17} T={T:<6} fwd {row['fwd_ms']:9.2f} ms  fwd+bwd "
                      f"{row['fwd_bwd_ms']:9.2f} ms  {row['fwd_bwd_tflops']:.3f} TFLOP/s"
                      + (f"  x{row['vs_chunked_fwd_bwd']:.2f} vs chunked" if base else ""),
                      flush=True)
    return rows
