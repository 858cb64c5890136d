"""docs/results.md from the protocol's cell records: per-task tables, claims, plots.

`write(path, proto, cells, chosen, models, tasks, command)` writes the markdown at `path`, the
cell records beside it (`<stem>_cells.jsonl`: task, model, rate, seed, wall time, held-out and
test metrics, exact config of every cell) and, when MQAR cells exist, two figures
(`<stem>_mqar_state.png`: accuracy against recurrent-state bytes per layer, Zoology's figure;
`<stem>_mqar_pairs.png`: accuracy against the number of key-value pairs, one panel per family).
`claim_status(proto, claim, value)` decides one claim: held / not held / not testable here.
"""
from __future__ import annotations

import json
import operator
import os
from collections import defaultdict

OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def seed_stats(records, lr, metric):
    """(mean, half-range, n seeds) of test[metric] over the records at rate `lr`."""
    vals = [r["test"][metric] for r in records if r["lr"] == lr and metric in r["test"]]
    if not vals:
        return None
    return sum(vals) / len(vals), (max(vals) - min(vals)) / 2, len(vals)


def _fmt(v, digits=3):
    return "—" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _stat(st):
    if st is None:
        return "—"
    mean, half, n = st
    return f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {half:.3f} ({n} seeds)"


def cell_value(cells, chosen, ref):
    """The seed mean of a claim's cell reference (task, model, metric), or None."""
    task, model, metric = ref
    if (task, model) not in chosen:
        return None
    st = seed_stats(cells[(task, model)], chosen[(task, model)], metric)
    return None if st is None else st[0]


def claim_status(claim, value) -> tuple[str, str]:
    """(held | not held | not testable here, the evidence line); `value(ref)` -> float | None."""
    if claim.untestable:
        return "not testable here", claim.untestable
    parts, ok = [], True
    for lhs, op, rhs in claim.checks:
        lv = value(lhs)
        rv = value(rhs) if isinstance(rhs, tuple) else rhs
        name = lambda r: f"{r[0]}-{r[1]} {r[2]}" if isinstance(r, tuple) else f"{r:g}"
        if lv is None or rv is None:
            missing = lhs if lv is None else rhs
            return "not testable here", f"cell {missing[0]}-{missing[1]} not trained"
        holds = OPS[op](lv, rv)
        ok &= holds
        parts.append(f"{name(lhs)} = {lv:.3f} {op} {name(rhs)}"
                     + (f" = {rv:.3f}" if isinstance(rhs, tuple) else "") + ("" if holds else " ✗"))
    return ("held" if ok else "not held"), "; ".join(parts)


def _task_section(proto, task, cells, chosen, models) -> list[str]:
    t = proto.TASKS[task]
    metrics = list(proto.METRICS[task])
    sel = t.select
    setting = ", ".join(f"{k}={v}" for k, v in t.data.items() if k != "source")
    lines = [f"## {task}: {setting}; {t.steps} steps x {t.batch} sequences", "",
             f"Rate chosen by held-out `{sel}` ({'max' if sel == 'val_accuracy' else 'min'}) "
             f"over {', '.join(f'{r:g}' for r in t.rates)}; test scores on data seed "
             f"{proto.TEST_SEED}.", ""]
    heads = ["model", "params", "state B/layer", f"held-out {sel} by rate", "rate", *metrics,
             "train wall (s)"]
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for m in models:
        if (task, m) not in cells:
            continue
        recs = cells[(task, m)]
        if not recs:
            lines.append(f"| {m} | — | — | (no finished cell) | — |" + " — |" * (len(metrics) + 1))
            continue
        lr = chosen[(task, m)]
        first = min(r["seed"] for r in recs)
        sweep = ", ".join(f"{r['lr']:g}: {r['val'][sel]:.3f}" for r in
                          sorted((r for r in recs if r["seed"] == first), key=lambda r: r["lr"]))
        at = [r for r in recs if r["lr"] == lr]
        walls = [r["train_wall_s"] for r in at if r["train_wall_s"] is not None]
        row = [m, f"{at[0]['params']:,}", f"{at[0]['state_bytes_per_layer']:,}", sweep, f"{lr:g}",
               *(_stat(seed_stats(recs, lr, k)) for k in metrics),
               _fmt(sum(walls) / len(walls), 0) if walls else "—"]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def write(path, proto, cells, chosen, models, tasks, command) -> None:
    import jax
    stem = os.path.splitext(path)[0]
    base = os.path.basename(stem)
    lines = ["# Results under the protocol", "",
             f"Every number below was measured on {jax.device_count()} × "
             f"{jax.devices()[0].device_kind}, outside CI, by the protocol's command (every "
             "cell; cells already in the ledger are read, not retrained):", "",
             "    python -m eval.table", "",
             f"This file was last written by `{command}`; the cells of the other models and "
             "tasks come from the ledger, written by earlier invocations.", "",
             "The protocol is `configs/results.py` (its docstring: fixed settings per task, the "
             "per-cell budget, rates, seeds, the models' own settings and why). It is resumable: "
             "a finished cell is read from its record, an interrupted one resumes from its "
             "checkpoint, so cells may come from earlier invocations. Wall times are on a shared "
             "CPU: compare them within this file only. Every cell's seed, rate, wall time and "
             f"exact config: `{base}_cells.jsonl`.", ""]
    value = lambda ref: cell_value(cells, chosen, ref)
    lines += ["## Claims", "", "| claim | source | status | cells |", "|---|---|---|---|"]
    for cl in proto.CLAIMS:
        status, evidence = claim_status(cl, value)
        lines.append(f"| {cl.text} | {cl.source} | **{status}** | {evidence} |")
    lines.append("")
    for task in tasks:
        if any(k[0] == task for k in cells):
            lines += _task_section(proto, task, cells, chosen, models)
    figs = plots(stem, proto, cells, chosen) if "mqar" in tasks else []
    lines += [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figs] + [""]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    with open(f"{stem}_cells.jsonl", "w") as f:
        for key in sorted(cells):
            for r in sorted(cells[key], key=lambda r: (r["lr"], r["seed"])):
                f.write(json.dumps(r, sort_keys=True) + "\n")


def plots(stem, proto, cells, chosen) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import zoo
    pts = [(m, cells[("mqar", m)]) for (t, m) in sorted(cells) if t == "mqar" and cells[(t, m)]]
    if not pts:
        return []
    fam = {m: zoo.get(recs[0].get("name", m)).family for m, recs in pts}
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(sorted(set(fam.values())))}
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, recs in pts:
        st = seed_stats(recs, chosen[("mqar", m)], "acc")
        x = recs[0]["state_bytes_per_layer"]
        if st:
            ax.errorbar([x], [st[0]], yerr=[st[1]], fmt="o", color=colors[fam[m]], label=fam[m])
            ax.annotate(m, (x, st[0]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    handles = {lab: h for h, lab in zip(*ax.get_legend_handles_labels())}
    ax.legend(handles.values(), handles.keys(), fontsize=7)
    ax.set(xscale="log", xlabel="recurrent-state bytes per layer (batch 1, T = train length)",
           ylabel="MQAR accuracy (test)", ylim=(-0.02, 1.02), title="MQAR accuracy vs state size")
    fig.tight_layout()
    state_png = f"{stem}_mqar_state.png"
    fig.savefig(state_png, dpi=120)
    plt.close(fig)
    kv = sorted(int(k.split("kv")[1]) for k in proto.METRICS["mqar"] if "kv" in k)
    base_kv = int(proto.TASKS["mqar"].data["num_kv_pairs"])
    kvs = sorted({base_kv, *kv})
    by_fam = defaultdict(list)
    for m, recs in pts:
        by_fam[fam[m]].append((m, recs))
    fig, axes = plt.subplots(1, len(by_fam), figsize=(3.2 * len(by_fam), 3), squeeze=False)
    for ax, (f, group) in zip(axes[0], sorted(by_fam.items())):
        for m, recs in group:
            ys = [seed_stats(recs, chosen[("mqar", m)], "acc" if k == base_kv else f"acc@kv{k}")
                  for k in kvs]
            ax.plot(kvs, [y[0] if y else float("nan") for y in ys], "o-", label=m)
        ax.set(title=f, xlabel=f"key-value pairs (T = {proto.TASKS['mqar'].data['seq_len']})",
               xscale="log", ylim=(-0.02, 1.02))
        ax.set_xticks(kvs, [str(k) for k in kvs])
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("MQAR accuracy (test)")
    fig.tight_layout()
    pairs_png = f"{stem}_mqar_pairs.png"
    fig.savefig(pairs_png, dpi=120)
    plt.close(fig)
    return [state_png, pairs_png]
