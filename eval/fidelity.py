"""MemMamba's memory-fidelity metrics (specs/memmamba.md §2.4), for any causal LM of the zoo.

    etmf(logits, tokens, embedding, shift=0)   horizontal: mean cos(E[x_{j+shift}], Σ_v p_j(v) E[v])
                                               with p_j = softmax(logits_j / tau); shift 0 is the
                                               paper-literal estimator, shift 1 compares the
                                               prediction with the token it predicts (§8)
    eclmf(hiddens, gap, lam=1e-4)              vertical: mean over l of 1 - ||Y - X W|| / (||X|| + eps),
                                               X = H_l, Y = H_{l+gap}, W the ridge decoder
                                               (X^T X + lam I)^{-1} X^T Y, solved in float64
    hidden_states(model, tokens)               the residual stream after each block [L][B, T, D]

ETMF_Δ (the distance-sensitive variant) is `etmf(..., shift=Δ)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def etmf(logits, tokens, embedding, *, shift: int = 0, tau: float = 1.0, mask=None) -> float:
    """logits [B, T, V], tokens [B, T], embedding [V, D]; `mask` [B, T] marks real tokens (a
    position counts when it and its partner at +shift are real)."""
    logits, tokens = jnp.asarray(logits, jnp.float32), jnp.asarray(tokens)
    emb = jnp.asarray(embedding, jnp.float32)
    T = tokens.shape[1]
    if not 0 <= shift < T:
        raise ValueError(f"shift={shift} must be in [0, {T})")
    p = jax.nn.softmax(logits / tau, axis=-1)
    expected = p @ emb                                        # [B, T, D]
    target = emb[tokens]
    a, b = target[:, shift:], expected[:, :T - shift]          # t_{j+shift} vs t̂_j
    cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-12)
    m = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
    w = (m[:, shift:] & m[:, :T - shift]).astype(jnp.float32)
    return float(jnp.sum(cos * w) / jnp.maximum(jnp.sum(w), 1.0))


def eclmf(hiddens, gap: int, *, lam: float = 1e-4, eps: float = 1e-6, mask=None) -> float:
    """hiddens: a list of [B, T, D] per layer (float32 or wider); `mask` [B, T] drops pads."""
    hs = [np.asarray(h, np.float64) for h in hiddens]
    if not 1 <= gap < len(hs):
        raise ValueError(f"gap={gap} needs at least {gap + 1} layers, got {len(hs)}")
    keep = None if mask is None else np.asarray(mask, bool).reshape(-1)
    scores = []
    for lo in range(len(hs) - gap):
        X = hs[lo].reshape(-1, hs[lo].shape[-1])
        Y = hs[lo + gap].reshape(-1, hs[lo + gap].shape[-1])
        if keep is not None:
            X, Y = X[keep], Y[keep]
        W = np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ Y)
        r = np.linalg.norm(Y - X @ W) / (np.linalg.norm(X) + eps)
        scores.append(1.0 - r)
    return float(np.mean(scores))


def hidden_states(model, tokens, *, mask=None) -> list:
    """The residual stream after each block of a zoo CausalLM (before the final norm)."""
    B, T = tokens.shape
    h0 = model.embed_tokens(tokens, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    out: list = []
    model.run_blocks(h0, (None,) * len(model.blocks), mask=mask, segment_ids=None, key=None,
                     hiddens=out)
    return out


# ------------------------------------------------------------------------------------------------
# `python -m eval.fidelity`: the metrics of trained runs on their own held-out rows, plotted
# ------------------------------------------------------------------------------------------------

def run_fidelity(run_dir: str, *, shifts, n_rows: int = 32, seed: int = 1_000_003,
                 seq_len: int | None = None, step: int | None = None) -> dict:
    """ETMF_Δ for every Δ in `shifts` and ECLMF at every gap the depth allows, for checkpoint
    `step` (None: the latest) of `run_dir`, on `n_rows` held-out rows of the run's own data section (data seed
    `seed`; `seq_len` overrides the row length, e.g. beyond the training length)."""
    from flax import nnx

    from train import data as data_lib
    from train.rundir import RunDir
    run = RunDir(run_dir)
    cfg = run.read_config()
    name, _, graphdef, params = run.restore_params(step)
    model = nnx.merge(graphdef, params)
    data_cfg = cfg.data.copy_and_resolve_references()
    if seq_len is not None:
        data_cfg.seq_len = int(seq_len)
    batch = next(data_lib.make_iterator(data_cfg, split="val", global_batch=n_rows, seed=seed))
    tokens, mask = jnp.asarray(batch["inputs"]), None
    T = tokens.shape[1]
    bad = [s for s in shifts if not 0 <= s < T]
    if bad:
        raise ValueError(f"--shifts: {bad} not in [0, {T}) (the rows' length)")
    logits = model(tokens)
    logits = logits[0] if isinstance(logits, tuple) else logits
    hs = hidden_states(model, tokens, mask=mask)
    emb = model.embed.embedding[...]
    return {"run": run_dir, "model": name, "seq_len": T,
            "step": run.steps()[-1] if step is None else int(step),
            "etmf": {int(s): etmf(logits, tokens, emb, shift=int(s)) for s in shifts},
            "eclmf": {g: eclmf(hs, g) for g in range(1, len(hs))}}


def plot_fidelity(results: list[dict], path: str) -> str:
    """ETMF_Δ against Δ and ECLMF against the layer gap, one line per run."""
    from eval.plots import _save, plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        label = f"{'/'.join(r['run'].rstrip('/').split('/')[-2:])}, T={r['seq_len']}"
        xs = sorted(r["etmf"])
        a.plot(xs, [r["etmf"][x] for x in xs], marker="o", label=label)
        gs = sorted(r["eclmf"])
        if gs:
            b.plot(gs, [r["eclmf"][g] for g in gs], marker="o", label=label)
    a.set_xlabel("shift Δ (tokens)")
    a.set_ylabel("ETMF_Δ")
    a.set_title("horizontal fidelity (memmamba.md §2.4)")
    b.set_xlabel("layer gap")
    b.set_ylabel("ECLMF")
    b.set_title("vertical fidelity")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return path


def main(argv=None) -> int:
    import argparse
    import json
    import os
    import sys

    from train.errors import one_line
    p = argparse.ArgumentParser(prog="python -m eval.fidelity", description=(
        "MemMamba's fidelity metrics (ETMF_Δ, ECLMF) of trained runs on their held-out rows, "
        "as JSON lines and one plot"))
    p.add_argument("--run_dir", required=True, help="comma separated run directories")
    p.add_argument("--shifts", default="0,1,2,4,8,16,32", help="ETMF shifts Δ")
    p.add_argument("--n_rows", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=None, help="row length (default: the run's)")
    p.add_argument("--seed", type=int, default=1_000_003, help="data seed of the rows")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--out", default="docs/fidelity.png", help="plot path (JSON beside it)")
    a = p.parse_args(argv)
    try:
        shifts = [int(s) for s in a.shifts.split(",") if s]
        dirs = [d for d in a.run_dir.split(",") if d]
        for d in dirs:
            if not os.path.isdir(d):
                raise FileNotFoundError(f"--run_dir: no such directory: {d}")
        results = [run_fidelity(d, shifts=shifts, n_rows=a.n_rows, seed=a.seed,
                                seq_len=a.seq_len, step=a.step) for d in dirs]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    jpath = os.path.splitext(a.out)[0] + ".jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(jpath, "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
            print(f"{r['model']:12s} T={r['seq_len']}  ETMF " + "  ".join(
                f"Δ{s}:{v:.3f}" for s, v in r["etmf"].items()) + "  ECLMF " + "  ".join(
                f"gap{g}:{v:.3f}" for g, v in r["eclmf"].items()))
    print(f"plot: {plot_fidelity(results, a.out)}\njson: {jpath}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
