"""Benchmarks: forward+backward speed and compiled memory of registered models and of each
model's implementation forms (its reference form against its fast forms), measured in one run.

    python -m eval.bench --models=transformer,mamba --seq_lens=256,1024 --batch=4 \
        --set=dim=64,n_layers=2 [--steps=5] [--out=docs/bench.jsonl]

Each model starts from the tiny config of its registered ConformanceSpec; `--set` overrides the
fields a config has (others are ignored for that model). The variants of a model are its
`reference` overrides and each of its `fast` overrides (`--set` wins over both, e.g. to bench a
real kernel block size: `--set=block=64`). Ratios are within this run: `vs_ref` is
the variant's time over the model's reference form; `vs_<baseline>` is over the baseline model's
first variant at the same length. Absolute times on a shared CPU are noisy; compare ratios.

A model name may carry config overrides of its own, `name@key=value+key=value` (e.g.
`--models=transformer,rat@chunk=16,rat@chunk=64`: one model at several chunk sizes in one run).
`--decode` adds `decode_s`: the median latency of one generated token after a prefill of
`seq_len` tokens (state / KV cache sized for seq_len + steps + 1). With several lengths, the
table ends with the fitted exponents: the slope of log(time) against log(seq_len) per row kind.

`--ops=attention,gated_delta` benches the ops instead of models: each Pallas kernel against its
chunked XLA form (`--impls`, default chunked and the platform's kernel), eval/bench_ops.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import zoo
from train import allocator


def _parse_set(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise ValueError(f"--set: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def split_name(text: str) -> tuple[str, dict]:
    """`name@key=value+key=value` -> (name, its own overrides)."""
    name, _, own = text.partition("@")
    return name, _parse_set(own.replace("+", ","))


def variants(name: str, overrides: dict):
    spec = zoo.get(name).conformance
    if spec is None:
        raise ValueError(f"model {name!r} has no ConformanceSpec to start from")
    fields = {f.name for f in dataclasses.fields(spec.config)}
    base = dataclasses.replace(spec.config, **{k: v for k, v in overrides.items() if k in fields})
    mine = {k: v for k, v in overrides.items() if k in fields}
    out = [("reference", dataclasses.replace(base, **{**dict(spec.reference), **mine}))]
    for fast in spec.fast:
        label = ",".join(f"{k}={v}" for k, v in fast.items() if k not in mine)
        out.append((label, dataclasses.replace(base, **{**dict(fast), **mine})))
    return out


def measure_decode(name: str, cfg, batch: int, seq_len: int, steps: int) -> float:
    """Median seconds of one single-token step after a prefill of `seq_len` tokens."""
    model = zoo.build(name, cfg, rngs=0)
    graphdef, params = nnx.split(model)
    x = jax.random.randint(jax.random.key(1), (batch, seq_len), 0, cfg.vocab_size, jnp.int32)
    state = model.init_state(batch, seq_len + steps + 1)
    fwd = jax.jit(lambda p, t, s: zoo.lm.forward(graphdef, p, t, s)[1:2])
    (state,) = jax.block_until_ready(fwd(params, x, state))
    tok = x[:, :1]
    (state,) = jax.block_until_ready(fwd(params, tok, state))  # compile the one-token step
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        (state,) = jax.block_until_ready(fwd(params, tok, state))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def exponent(times: dict) -> float | None:
    """Slope of log(time) against log(length) over {length: seconds} (None below 2 points)."""
    pts = sorted((int(k), v) for k, v in times.items() if v)
    if len(pts) < 2:
        return None
    return float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])


def fitted_exponents(rows: list[dict], keys=("step_s", "decode_s")) -> list[tuple]:
    """(model, variant, key, slope of log(time) vs log(seq_len)) for each row kind with 2+ lengths."""
    out = []
    for model, variant in dict.fromkeys((r["model"], r["variant"]) for r in rows):
        sel = [r for r in rows if r["model"] == model and r["variant"] == variant]
        for key in keys:
            slope = exponent({r["seq_len"]: r.get(key) for r in sel})
            if slope is not None:
                out.append((model, variant, key, slope))
    return out


def measure(name: str, cfg, batch: int, seq_len: int, steps: int) -> dict:
    model = zoo.build(name, cfg, rngs=0)
    graphdef, params = nnx.split(model)
    x = jax.random.randint(jax.random.key(0), (batch, seq_len), 0, cfg.vocab_size, jnp.int32)
    data = {"inputs": x, "targets": jnp.roll(x, -1, axis=1)}
    step = jax.jit(jax.value_and_grad(lambda p, b: zoo.lm.loss(graphdef, p, b)[0]))
    t0 = time.perf_counter()
    compiled = step.lower(params, data).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    jax.block_until_ready(compiled(params, data))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, data))
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    return {"compile_s": round(compile_s, 3), "step_s": sec,
            "tokens_per_s": batch * seq_len / sec, "temp_mib": None if temp is None else temp / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="", help="comma-separated (default: transformer; with "
                    "--suite every registered language model)")
    ap.add_argument("--seq_lens", default="", help="comma-separated (default 256; with --suite "
                    "its main length, default 256, --quick 32)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--set", default="", help="config overrides key=value,... (applied where the field exists)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; suite 3)")
    ap.add_argument("--baseline", default=None, help="model whose reference is the vs_<baseline> unit")
    ap.add_argument("--only_fast", action="store_true", help="skip reference forms (long lengths)")
    ap.add_argument("--decode", action="store_true", help="also time one decode step at seq_len")
    ap.add_argument("--out", default=None, help="append JSON rows to this file")
    ap.add_argument("--ops", default="", help="bench these ops' kernels instead of models "
                    "(eval/bench_ops.py: attention, gated_delta, gla, neural_memory, "
                    "selective_scan, ssd)")
    ap.add_argument("--impls", default="", help="with --ops: implementations (default chunked "
                    "and pallas, pallas_interpret on a CPU)")
    ap.add_argument("--suite", action="store_true", help="the benchmark suite: every registered "
                    "LM (or --models) at one shared config: tokens/s, MFU, peak memory, compile "
                    "time, step and decode against length (eval/bench_suite.py)")
    ap.add_argument("--quick", action="store_true", help="with --suite: tiny shapes (CI)")
    ap.add_argument("--peers", action="store_true", help="with --suite: the PyTorch peers in the "
                    "same run (pip install -e '.[peers]')")
    ap.add_argument("--lengths", default="", help="with --suite: training lengths of the fit")
    ap.add_argument("--contexts", default="", help="with --suite: decode contexts")
    ap.add_argument("--out_dir", default="docs/bench", help="with --suite: where suite.* go")
    a = ap.parse_args(argv)
    if a.suite:
        return _bench_suite(a, ap)
    a.steps = a.steps or 5
    a.models = a.models or "transformer"
    a.seq_lens = a.seq_lens or "256"
    if a.ops:
        return _bench_ops(a)
    try:
        names = [n for n in a.models.split(",") if n]
        for n in names:
            zoo.get(split_name(n)[0])
        lens = [int(s) for s in a.seq_lens.split(",")]
        overrides = _parse_set(a.set)
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(f"# {jax.devices()[0].device_kind} x{jax.device_count()}, allocator "
          f"{allocator.name()}", flush=True)
    rows = []
    base_time = {}
    for T in lens:
        for n in names:
            ref_time = None
            model_name, own = split_name(n)
            for label, cfg in variants(model_name, {**overrides, **own}):
                if (a.only_fast and label == "reference"
                        and len(zoo.get(model_name).conformance.fast) > 0):
                    continue
                r = measure(model_name, cfg, a.batch, T, a.steps)
                if a.decode:
                    r["decode_s"] = measure_decode(model_name, cfg, a.batch, T, a.steps)
                ref_time = ref_time or r["step_s"]
                if a.baseline == n and T not in base_time:
                    base_time[T] = r["step_s"]
                row = {"model": n, "variant": label, "seq_len": T, "batch": a.batch, **r,
                       "vs_ref": r["step_s"] / ref_time, "device": jax.devices()[0].device_kind,
                       "allocator": allocator.name()}
                rows.append(row)
                print(f"{n:>14} {label:<28} T={T:<6} {r['tokens_per_s']:>10.0f} tok/s  "
                      f"step {r['step_s'] * 1e3:8.1f} ms  compile {r['compile_s']:.1f}s  "
                      f"x{row['vs_ref']:.2f} vs ref"
                      + (f"  decode {r['decode_s'] * 1e3:.2f} ms" if a.decode else ""), flush=True)
    if a.baseline:
        for row in rows:
            if row["seq_len"] in base_time:
                row[f"vs_{a.baseline}"] = row["step_s"] / base_time[row["seq_len"]]
    print()
    cols = ["model", "variant", "seq_len", "tokens_per_s", "step_s", "vs_ref"] + (
        [f"vs_{a.baseline}"] if a.baseline else []) + (["decode_s"] if a.decode else []) + [
        "temp_mib", "compile_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")
    fits = fitted_exponents(rows)
    if fits:
        print("\n| model | variant | time | exponent (log time / log seq_len) |\n|---|---|---|---|")
        for model, variant, key, slope in fits:
            print(f"| {model} | {variant} | {key} | {slope:.2f} |")
    if a.out:
        with open(a.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


def _bench_suite(a, ap) -> int:
    from eval import bench_suite

    def ints(text, flag):
        try:
            return [int(v) for v in text.split(",") if v]
        except ValueError:
            ap.error(f"{flag} expects comma-separated integers, got {text!r}")

    names = [n for n in a.models.split(",") if n] or bench_suite.suite_models()
    unknown = [n for n in names if n not in zoo.names()]
    if unknown:
        print(f"error: --models: unknown model {unknown[0]!r}", file=sys.stderr)
        return 2
    s = bench_suite.setting(a.quick, ints(a.lengths, "--lengths"), ints(a.contexts, "--contexts"),
                            a.steps)
    if a.seq_lens:                   # the suite's main length (and the peers')
        s.seq_len = ints(a.seq_lens, "--seq_lens")[0]
    rows = bench_suite.run(names, s, a.out_dir, a.peers)
    print(f"wrote {a.out_dir}/suite.jsonl, suite.md and suite_*.png")
    return 1 if any("error" in r for r in rows) else 0


def _bench_ops(a) -> int:
    from eval import bench_ops
    ops = [o for o in a.ops.split(",") if o]
    kernel = "pallas_interpret" if jax.default_backend() == "cpu" else "pallas"
    impls = [i for i in (a.impls or f"chunked,{kernel}").split(",") if i]
    bad = [o for o in ops if o not in bench_ops.OPS]
    if bad:
        print(f"error: --ops: unknown op {bad[0]!r} (known: {', '.join(bench_ops.OPS)})",
              file=sys.stderr)
        return 2
    try:
        lens = [int(s) for s in a.seq_lens.split(",")]
    except ValueError:
        print(f"error: --seq_lens expects comma-separated integers, got {a.seq_lens!r}",
              file=sys.stderr)
        return 2
    rows = bench_ops.run(ops, lens, a.batch, impls, a.steps)
    if a.out:
        with open(a.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
