"""PyTorch peers for `python -m eval.bench --suite --peers`: the same model in `transformers`,
trained on the same CPU in the same run, so the bench can report seqzoo / peer ratios.

Optional (`pip install -e '.[peers]'`: torch 2.13.0, transformers 5.24.0), never a dependency of
the zoo: `missing()` names what is not installed, and the bench prints that line instead of a
ratio. A peer is built from seqzoo's own export of the model (`zoo.hf.export`: the Hugging Face
config.json of exactly this configuration) with random weights, and trained with torch's AdamW
(the trainer's default betas and weight decay, global-norm clip 1) on the same batch shape:
forward + backward + clip + optimiser.
"""
from __future__ import annotations

import os
import time

import numpy as np

import zoo

# registry name -> the transformers class that is its peer
PEERS = {"transformer": "LlamaForCausalLM", "mamba": "MambaForCausalLM",
         "mamba2": "Mamba2ForCausalLM"}


def missing() -> str | None:
    """None when the peers can run, else the line saying what to install."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return (f"PyTorch peers not installed ({e.name} missing): pip install -e '.[peers]' "
                "(torch 2.13.0, transformers 5.24.0)")
    return None


def versions() -> str:
    import torch
    import transformers
    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def hf_model(name: str, model, cfg):
    """The transformers model with the config seqzoo exports for `model` (random weights)."""
    import transformers
    config, _ = zoo.hf.export(name, model, cfg)
    # config.json's spelling of a non-finite float ({"__float__": "Infinity"}) back to a float
    config = {k: [zoo.hf.hf_float(x) if isinstance(x, dict) else x for x in v]
              if isinstance(v, list) else v
              for k, v in config.items() if k not in ("architectures", "torch_dtype")}
    hf_cfg = transformers.AutoConfig.for_model(**config)
    cls = getattr(transformers, PEERS[name])
    return cls(hf_cfg).float()


def train_step_time(name: str, model, cfg, batch: int, seq_len: int, steps: int, *,
                    lr: float = 1e-3, clip: float = 1.0, threads: int | None = None) -> dict:
    """Median seconds of one peer training step (forward, loss, backward, clip, AdamW) and its
    tokens/s, at seqzoo's batch shape and vocabulary."""
    import torch
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    peer = hf_model(name, model, cfg)
    peer.train()
    opt = torch.optim.AdamW(peer.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.1)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len)))

    def one():
        opt.zero_grad(set_to_none=True)
        loss = peer(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), clip)
        opt.step()

    one()
    one()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    return {"peer": PEERS[name], "peer_step_s": sec, "peer_tokens_per_s": batch * seq_len / sec}
