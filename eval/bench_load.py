"""Peak host memory of loading a Hugging Face checkpoint, against its size (issue 17):

    python -m eval.bench_load [--path=DIR | --make_dim=1024 --make_layers=8] [--shards=1]

Each measurement runs in a fresh interpreter: the baseline is its anonymous resident memory
(RssAnon: what the process itself holds; the page cache of a memory-mapped file is the kernel's
and reclaimable, so it is not counted) once `import zoo` and the JAX CPU client are up, the peak
is the largest RssAnon a 2 ms sampling thread sees during `zoo.hf.load(path)`; the row reports the growth over the baseline against the
checkpoint's bytes and the model's float32 parameter bytes. `--make_*` writes a Llama-layout checkpoint of random float32 weights (vocab
32000, GQA 4 kv heads) to a temporary directory first, in `--shards` files. `reader=eager`
reads the same checkpoint the way zoo.hf did before (the whole file into memory, then a copy of
every tensor: `zoo.hf.read_safetensors`), in the same run, for the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

_PROBE = r"""
import json, sys, threading, time
def rss_kb(key="RssAnon:"):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key))
import zoo, zoo.hf
import jax.numpy as jnp
jnp.zeros(1).block_until_ready()          # the CPU client up before the baseline
base = rss_kb()
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_kb())
        time.sleep(0.002)
th = threading.Thread(target=sample, daemon=True)
th.start()
path, reader = sys.argv[1], sys.argv[2]
if reader == "eager":
    cfg = zoo.hf.load_config(path)
    tensors = {}
    import glob, os
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        tensors.update(zoo.hf.read_safetensors(f))
    model = zoo.hf._CONVERTERS[cfg["architectures"][0]](cfg, tensors)
    del tensors
else:
    model = zoo.hf.load(path)
done.set(); th.join()
peak[0] = max(peak[0], rss_kb())
from flax import nnx
import jax
n = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
print(json.dumps({"base_kb": base, "peak_kb": peak[0], "model_bytes": int(n)}))
"""


def make_llama(path: str, dim: int, layers: int, shards: int = 1, vocab: int = 32000) -> int:
    """A Llama-layout checkpoint of random float32 weights; returns its bytes."""
    from safetensors.numpy import save_file
    heads, kv = max(dim // 64, 1), 4
    hd = dim // heads
    ffn = int(8 * dim / 3) // 64 * 64
    rng = np.random.default_rng(0)

    def w(*shape):
        return (0.02 * rng.standard_normal(shape, dtype=np.float32))
    t = {"model.embed_tokens.weight": w(vocab, dim), "model.norm.weight": np.ones(dim, np.float32),
         "lm_head.weight": w(vocab, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": w(heads * hd, dim),
                  p + "self_attn.k_proj.weight": w(kv * hd, dim),
                  p + "self_attn.v_proj.weight": w(kv * hd, dim),
                  p + "self_attn.o_proj.weight": w(dim, heads * hd),
                  p + "mlp.gate_proj.weight": w(ffn, dim), p + "mlp.up_proj.weight": w(ffn, dim),
                  p + "mlp.down_proj.weight": w(dim, ffn),
                  p + "input_layernorm.weight": np.ones(dim, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(dim, np.float32)})
    os.makedirs(path, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
           "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "max_position_embeddings": 2048,
           "tie_word_embeddings": False, "hidden_act": "silu"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    names = sorted(t)
    if shards == 1:
        save_file(t, os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i::shards]
            save_file({k: t[k] for k in part}, os.path.join(path, fname))
            weight_map.update({k: fname for k in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return sum(a.nbytes for a in t.values())


def measure(path: str, reader: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, path, reader], capture_output=True,
                         text=True, check=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors"))
    grow = (rec["peak_kb"] - rec["base_kb"]) * 1024
    return {"reader": reader, "checkpoint_mb": size / 2**20, "model_mb": rec["model_bytes"] / 2**20,
            "rss_growth_mb": grow / 2**20, "growth_vs_checkpoint": grow / size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.bench_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", default="", help="a Hugging Face checkpoint directory")
    ap.add_argument("--make_dim", type=int, default=1024)
    ap.add_argument("--make_layers", type=int, default=8)
    ap.add_argument("--shards", type=int, default=1)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = a.path
        if not path:
            path = os.path.join(tmp, "llama")
            make_llama(path, a.make_dim, a.make_layers, a.shards)
        elif not os.path.isdir(path):
            print(f"eval.bench_load: error: --path={path!r} is not a directory", file=sys.stderr)
            return 2
        rows = [measure(path, r) for r in ("library", "eager")]
    print("| reader | checkpoint MB | model MB | peak RSS growth MB | growth / checkpoint |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['reader']} | {r['checkpoint_mb']:.0f} | {r['model_mb']:.0f} | "
              f"{r['rss_growth_mb']:.0f} | {r['growth_vs_checkpoint']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
