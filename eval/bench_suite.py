"""The benchmark suite: every registered language model at one shared configuration, in one run.

    python -m eval.bench --suite [--models=transformer,mamba2,...] [--peers] [--quick] \
        [--out_dir=docs/bench] [--lengths=1024,4096,16384] [--contexts=1024,4096,16384]

Per model, at the shared configuration `SHARED` (vocabulary 256, width 256, 4 layers, float32,
batch 4, T 256; each model's other fields at its config class's defaults, `impl="auto"`):
  tokens_per_s  the trainer's own training step (train.step.make_train_step: loss, backward,
                global-norm clip, AdamW), jitted with the parameters and optimiser state
                donated as the trainer does; the median of `--steps` steps after one warm-up
  mfu           the FLOPs per token the model declares in the registry (train/mfu.py) x tokens/s
                over the peak measured in the same run (a float32 matmul probe on CPU, the
                datasheet on accelerators)
  peak_mib      the compiled step's arguments + outputs + temporaries - aliased buffers (XLA's
                memory analysis of exactly this program)
  compile_s     lowering + compiling that step
  step_s @ T    the same step at batch 1 for each of `--lengths`, and the fitted exponent of
                log(time) against log(T) (`eval.bench.fitted_exponents`)
  decode        the median latency of one generated token after a prefill of each of
                `--contexts` tokens, and the bytes of the decode state (KV cache / recurrent state)
                that context needs; its exponent too
With `--peers` the models that have a PyTorch peer (eval/peers.py: transformers' Llama, Mamba,
Mamba2, built from seqzoo's export of the same configuration) are trained in the same run at the
same shape, in `PEER_ROUNDS` alternating rounds, and the table reports the median of the rounds'
seqzoo / peer tokens/s ratios (`vs_peer_rounds` keeps each). `--quick` shrinks everything (width 32,
1 layer, T 32, lengths 32,64) for CI. Output: `<out_dir>/suite.jsonl` (one JSON row per model),
`suite.md` (tables) and `suite_*.png` (plots).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import zoo
from eval.bench import exponent, measure_decode
from train import allocator, mfu, optim
from train import config as config_lib
from train.step import make_train_step

SHARED = dict(vocab_size=256, dim=256, n_layers=4)
PEER_ROUNDS = 3
QUICK = dict(vocab_size=64, dim=32, n_layers=1)


@dataclasses.dataclass
class Setting:
    model: dict
    batch: int = 4
    seq_len: int = 256
    lengths: tuple[int, ...] = (1024, 4096, 16384)
    contexts: tuple[int, ...] = (1024, 4096, 16384)
    steps: int = 3


def setting(quick: bool, lengths=None, contexts=None, steps=None) -> Setting:
    s = (Setting(dict(QUICK), batch=2, seq_len=32, lengths=(32, 64), contexts=(32, 64), steps=2)
         if quick else Setting(dict(SHARED)))
    if lengths:
        s.lengths = tuple(lengths)
    if contexts:
        s.contexts = tuple(contexts)
    if steps:
        s.steps = steps
    return s


def suite_models() -> list[str]:
    """Every registered causal language model (the non-causal classifier has no LM step)."""
    return [n for n in zoo.names() if zoo.get(n).causal]


def model_config(name: str, s: Setting):
    """The model's config class at its defaults, with the shared fields set."""
    cls = zoo.get(name).config_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    return dataclasses.replace(cls(), **{k: v for k, v in s.model.items() if k in fields})


def _train_config():
    t = config_lib.train_defaults()
    t.steps, t.warmup_steps = 1000, 10
    return t


def train_step(name: str, cfg, batch: int, seq_len: int, steps: int) -> dict:
    """The trainer's step at (batch, seq_len): compile time, compiled peak bytes, median step."""
    model = zoo.build(name, cfg, rngs=0)
    graphdef, params = nnx.split(model)
    opt = optim.make_optimizer(_train_config())
    opt_state = opt.init(params)
    x = jax.random.randint(jax.random.key(0), (batch, seq_len), 0, cfg.vocab_size, jnp.int32)
    data = {"inputs": x, "targets": jnp.roll(x, -1, axis=1),
            "loss_mask": jnp.ones((batch, seq_len), jnp.float32)}
    fn = jax.jit(make_train_step(graphdef, opt), donate_argnums=(0, 1))
    step = jnp.zeros((), jnp.int32)
    t0 = time.perf_counter()
    compiled = fn.lower(params, opt_state, step, data).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes) / 2**20
    params, opt_state, step, m = compiled(params, opt_state, step, data)
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, opt_state, step, m = compiled(params, opt_state, step, data)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    if not np.isfinite(float(m["loss"])):
        raise FloatingPointError(f"{name}: non-finite loss in the bench step")
    return {"compile_s": compile_s, "step_s": sec, "tokens_per_s": batch * seq_len / sec,
            "peak_mib": peak, "params": sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))}


def state_bytes(name: str, cfg, context: int) -> int:
    """Bytes of the decode state for one sequence of `context` tokens (nothing allocated)."""
    model = nnx.eval_shape(lambda: zoo.build(name, cfg, rngs=0))
    st = jax.eval_shape(lambda: model.init_state(1, context))
    return int(sum(np.prod(v.shape) * v.dtype.itemsize for v in jax.tree.leaves(st)))


def bench_model(name: str, s: Setting, peak_flops: float | None, peers: bool) -> dict:
    cfg = model_config(name, s)
    row = {"model": name, "batch": s.batch, "seq_len": s.seq_len,
           "config": {k: getattr(cfg, k) for k in s.model if hasattr(cfg, k)},
           **train_step(name, cfg, s.batch, s.seq_len, s.steps)}
    entry = zoo.get(name)
    if entry.flops is not None and peak_flops:
        row["flops_per_token"] = float(entry.flops(cfg, s.seq_len))
        row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / peak_flops
    row["by_length"] = {str(T): train_step(name, _fit(cfg, T), 1, T, s.steps)["step_s"]
                        for T in s.lengths}
    if entry.conformance is None or entry.conformance.decode:
        row["decode_s"] = {str(L): measure_decode(name, _fit(cfg, L + s.steps + 2), 1, L,
                                                  s.steps) for L in s.contexts}
    row["state_bytes"] = {str(L): state_bytes(name, _fit(cfg, L + 1), L) for L in s.contexts}
    for key in ("by_length", "decode_s"):
        slope = exponent(row.get(key, {}))
        if slope is not None:
            row[f"{'step_s' if key == 'by_length' else key}_exponent"] = slope
    if peers:
        from eval import peers as peers_lib
        if name in peers_lib.PEERS:
            # PEER_ROUNDS alternating (seqzoo, peer) measurements; the ratio is the median of
            # the rounds' ratios (one pair of runs moved 1.4x between runs on a shared CPU)
            model = zoo.build(name, cfg, rngs=0)
            ours, theirs = [row["step_s"]], []
            for r in range(PEER_ROUNDS):
                if r:
                    ours.append(train_step(name, cfg, s.batch, s.seq_len, s.steps)["step_s"])
                theirs.append(peers_lib.train_step_time(name, model, cfg, s.batch, s.seq_len,
                                                        s.steps)["peer_step_s"])
            row.update(peer=peers_lib.PEERS[name], peer_step_s=float(np.median(theirs)),
                       peer_tokens_per_s=s.batch * s.seq_len / float(np.median(theirs)),
                       vs_peer_rounds=[p / o for o, p in zip(ours, theirs)])
            row["vs_peer"] = float(np.median(row["vs_peer_rounds"]))
    return row


def _fit(cfg, length: int):
    """`cfg` with room for `length` positions where the model has a length limit field."""
    if hasattr(cfg, "max_len") and cfg.max_len is not None and cfg.max_len < length:
        return dataclasses.replace(cfg, max_len=length)
    return cfg


def _g(v, fmt="{:.3g}"):
    return "–" if v is None else fmt.format(v)


def markdown(rows: list[dict], header: str) -> str:
    lens = sorted({int(T) for r in rows for T in r.get("by_length", {})})
    ctxs = sorted({int(L) for r in rows for L in r.get("state_bytes", {})})
    out = [header, "",
           "| model | params | tok/s | MFU | peak MiB | compile s | step exponent | "
           "decode exponent | peer tok/s | seqzoo / peer |", "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | error: {r['error']} |" + " |" * 8)
            continue
        out.append(
            f"| {r['model']} | {r['params']:,} | {r['tokens_per_s']:,.0f} | "
            f"{_g(r.get('mfu'), '{:.1%}')} | {_g(r.get('peak_mib'), '{:.0f}')} | "
            f"{r['compile_s']:.1f} | {_g(r.get('step_s_exponent'), '{:.2f}')} | "
            f"{_g(r.get('decode_s_exponent'), '{:.2f}')} | "
            f"{_g(r.get('peer_tokens_per_s'), '{:,.0f}')} | {_g(r.get('vs_peer'), '{:.2f}')} |")
    out += ["", "Training step (batch 1) against sequence length, ms:", "",
            "| model | " + " | ".join(f"T={T}" for T in lens) + " |", "|" + "---|" * (len(lens) + 1)]
    for r in rows:
        if "by_length" in r:
            out.append(f"| {r['model']} | " + " | ".join(
                _g(r["by_length"].get(str(T)) and r["by_length"][str(T)] * 1e3, "{:.1f}")
                for T in lens) + " |")
    out += ["", "Decode: ms per token after a prefill of L tokens / decode-state bytes at L:", "",
            "| model | " + " | ".join(f"L={L}" for L in ctxs) + " |", "|" + "---|" * (len(ctxs) + 1)]
    for r in rows:
        if "state_bytes" in r:
            dec = r.get("decode_s", {})
            out.append(f"| {r['model']} | " + " | ".join(
                f"{_g(dec.get(str(L)) and dec[str(L)] * 1e3, '{:.2f}')} / "
                f"{r['state_bytes'][str(L)]:,}" for L in ctxs) + " |")
    return "\n".join(out) + "\n"


def plots(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if "error" not in r]
    paths = []
    fig, ax = plt.subplots(figsize=(8, max(3, 0.25 * len(ok))))
    ax.barh([r["model"] for r in ok], [r["tokens_per_s"] for r in ok])
    ax.set_xlabel("training tokens/s (forward + backward + AdamW)")
    ax.invert_yaxis()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "suite_tokens_per_s.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    for key, xlabel, ylabel, fname in (
            ("by_length", "sequence length", "training step (batch 1), s", "suite_step_vs_length.png"),
            ("decode_s", "context", "decode s / token", "suite_decode_vs_context.png"),
            ("state_bytes", "context", "decode state bytes", "suite_state_bytes.png")):
        fig, ax = plt.subplots(figsize=(7, 5))
        for r in ok:
            pts = sorted((int(k), v) for k, v in r.get(key, {}).items() if v)
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=r["model"])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, fname))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def run(names: list[str], s: Setting, out_dir: str, peers: bool, log=print) -> list[dict]:
    if peers:
        from eval import peers as peers_lib
        why = peers_lib.missing()
        if why:
            log(f"# {why}; the peer columns stay empty")
            peers = False
        else:
            log(f"# peers: {peers_lib.versions()}")
    dev = jax.devices()[0]
    peak = mfu.total_peak_flops() if dev.platform == "cpu" else mfu.device_peak_flops(dev)
    head = (f"{dev.device_kind} ({dev.platform}, {len(os.sched_getaffinity(0))} CPU cores), allocator "
            f"{allocator.name()}, matmul peak {_g(peak and peak / 1e9, '{:.0f}')} GFLOP/s; "
            f"{', '.join(f'{k} {v}' for k, v in s.model.items())}, batch {s.batch}, "
            f"T {s.seq_len}, float32")
    log(f"# {head}")
    rows = []
    os.makedirs(out_dir, exist_ok=True)
    jsonl = os.path.join(out_dir, "suite.jsonl")
    open(jsonl, "w").close()
    for name in names:
        t0 = time.perf_counter()
        try:
            row = bench_model(name, s, peak, peers)
        except Exception as e:  # one model's failure is a row of the table, not the end of it
            row = {"model": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        row.update(device=dev.device_kind, allocator=allocator.name())
        rows.append(row)
        with open(jsonl, "a") as f:       # each model's row at once: a stopped suite keeps it
            f.write(json.dumps(row) + "\n")
        if "error" in row:
            log(f"{name:>22}  error {row['error']}")
        else:
            log(f"{name:>22}  {row['tokens_per_s']:>9,.0f} tok/s  MFU {_g(row.get('mfu'), '{:.1%}')}"
                f"  peak {_g(row.get('peak_mib'), '{:.0f}')} MiB  compile {row['compile_s']:.1f}s"
                + (f"  x{row['vs_peer']:.2f} vs {row['peer']}" if "vs_peer" in row else "")
                + f"  ({time.perf_counter() - t0:.0f}s)")
    with open(os.path.join(out_dir, "suite.md"), "w") as f:
        f.write(markdown(rows, f"Measured on {head}."))
    plots(rows, out_dir)
    return rows
