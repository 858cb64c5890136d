"""The hybrids around any memory (titans.md §3.5–3.6; atlas.md §3 and miras.md §3 host their
memories the same way): which mixer each of a model's blocks gets (`hybrid_mixers`: MAG, or MAL
in the Samba layout or the paper's literal form), their parameter counts and FLOPs. The mixers
themselves are layers.titans'."""
from __future__ import annotations

from typing import Callable

from flax import nnx

from layers.attention import Attention, attention_mixer_flops
from layers.titans import (
    MAGMixer,
    MALMixer,
    Memory,
    PrefixedMemory,
    _built,
    mag_mixer_flops,
    mal_mixer_flops,
    prefixed_memory_flops,
)

HYBRIDS = ("mag", "mal")
MAL_LAYOUTS = ("samba", "literal")


def prefixed(memory: Memory, *, dim: int, n_persistent: int, rngs: nnx.Rngs,
             init_std: float = 0.02) -> nnx.Module:
    """The memory on [P; x] (`PrefixedMemory`), or the bare memory when n_persistent = 0."""
    if not n_persistent:
        return _built(memory, rngs)
    return PrefixedMemory(memory, dim=dim, n_persistent=n_persistent, rngs=rngs,
                          init_std=init_std)


def hybrid_mixers(kind: str, memory: Callable[[nnx.Rngs], nnx.Module], *, n_layers: int,
                  dim: int, n_heads: int, window: int, n_persistent: int, rngs: nnx.Rngs,
                  mal_layout: str = "samba", rope_base: float = 10000.0, max_len: int = 2048,
                  norm_eps: float = 1e-6, init_std: float = 0.02, impl: str = "auto",
                  block: int = 128) -> list[nnx.Module]:
    """The mixers of a hybrid's `n_layers` blocks around a memory factory (titans.md §3.5–3.6;
    atlas.md §3 and miras.md §3 host their memories the same way):

      mag            every block a `MAGMixer` (the memory on [P; x] in parallel with
                     sliding-window attention with the persistent prefix, gated)
      mal, samba     even blocks the memory on [P; x], odd blocks sliding-window attention
                     (`n_heads` heads, window W: W + 1 keys, no prefix)
      mal, literal   every block a `MALMixer`: SWA(memory([P; x]))
    """
    att = dict(rope_base=rope_base, init_std=init_std, impl=impl, block=block)
    out = []
    for i in range(n_layers):
        if kind == "mag":
            out.append(MAGMixer(memory, dim=dim, n_heads=n_heads, window=window,
                                n_persistent=n_persistent, rngs=rngs, max_len=max_len,
                                norm_eps=norm_eps, **att))
        elif mal_layout == "literal":
            out.append(MALMixer(memory, dim=dim, n_heads=n_heads, window=window,
                                n_persistent=n_persistent, rngs=rngs, max_len=max_len, **att))
        elif i % 2 == 0:
            out.append(prefixed(memory, dim=dim, n_persistent=n_persistent, rngs=rngs,
                                init_std=init_std))
        else:
            out.append(Attention(dim, n_heads, n_heads, dim // n_heads, rngs=rngs,
                                 rope_base=rope_base, window=window, max_len=max_len,
                                 std=init_std, impl=impl, block=block))
    return out


def hybrid_mixer_counts(kind: str, memory: int, *, n_layers: int, dim: int, n_persistent: int,
                        mal_layout: str = "samba") -> list[int]:
    """Parameters of `hybrid_mixers`' mixers around a memory of `memory` parameters."""
    D = dim
    attn, mem = 4 * D * D, memory + n_persistent * D
    if kind == "mag":
        return [attn + mem + 2 * D + D * D] * n_layers
    if mal_layout == "literal":
        return [mem + attn] * n_layers
    return [mem if i % 2 == 0 else attn for i in range(n_layers)]


def hybrid_mixer_flops(kind: str, memory: float, *, n_layers: int, dim: int, n_heads: int,
                       window_keys: int, n_persistent: int, seq_len: int,
                       mal_layout: str = "samba") -> list[float]:
    """Forward FLOPs per token of `hybrid_mixers`' mixers around a memory of `memory` forward
    FLOPs per token; `window_keys`: keys per query of the sliding window (W + 1, at most
    seq_len), the persistent ones added here where the attention has them."""
    kw = dict(dim=dim, n_heads=n_heads, keys=window_keys + n_persistent,
              n_persistent=n_persistent, seq_len=seq_len)
    if kind == "mag":
        return [mag_mixer_flops(memory, **kw)] * n_layers
    if mal_layout == "literal":
        return [mal_mixer_flops(memory, **kw)] * n_layers
    mem = prefixed_memory_flops(memory, n_persistent=n_persistent, seq_len=seq_len)
    attn = attention_mixer_flops(dim, n_heads, n_heads, dim // n_heads, window_keys)
    return [mem if i % 2 == 0 else attn for i in range(n_layers)]
