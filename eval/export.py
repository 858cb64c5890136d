"""A trained run as a Hugging Face checkpoint:

    python -m eval.export --run_dir=runs/x [--step=N] --out=DIR [--max_shard_mb=5120]

restores the run's parameters (the latest complete checkpoint, or --step) through
train.rundir.RunDir and writes them with `zoo.hf.save` for the families that have a public format
(`zoo.hf.exporters()`: the Llama-layout Transformer, Mamba, Mamba-2): config.json and
model.safetensors, sharded above --max_shard_mb as transformers shards. A family without a format,
a run directory that is not one, a checkpoint that is damaged: one line, exit 2.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run_dir", required=True)
    ap.add_argument("--out", required=True, help="the Hugging Face checkpoint directory to write")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--max_shard_mb", type=float, default=5120.0)
    a = ap.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"eval.export: error: {msg}", file=sys.stderr)
        return 2
    from train.rundir import RunDir
    run = RunDir(a.run_dir)
    try:
        name, _ = run.model_config()
    except (FileNotFoundError, ValueError) as e:
        return fail(str(e).splitlines()[0])
    import zoo.hf
    if name not in zoo.hf.exporters():
        return fail(f"model {name!r} of {a.run_dir} has no Hugging Face format (exportable: "
                    f"{', '.join(zoo.hf.exporters())})")
    from flax import nnx
    try:
        name, model_cfg, graphdef, params = run.restore_params(a.step)
    except (FileNotFoundError, ValueError) as e:
        return fail(str(e).splitlines()[0])
    model = nnx.merge(graphdef, params)
    try:
        files = zoo.hf.save(name, model, model_cfg, a.out,
                            max_shard_bytes=int(a.max_shard_mb * 2**20))
    except ValueError as e:
        return fail(str(e).splitlines()[0])
    print(f"wrote {a.out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
