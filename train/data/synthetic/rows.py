"""Fixed-length byte-level training rows of the text tasks (passkey, needle) for byte-level
models (vocabulary `BYTE_VOCAB`)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from train.data.synthetic.common import BYTE_BOS, BYTE_EOS, IGNORE, _finish
from train.data.synthetic.needle import needle_text
from train.data.synthetic.passkey import passkey_text

# ------------------------------------------------------------------------------------------------
# Fixed-length byte-level training rows for the text tasks
# ------------------------------------------------------------------------------------------------

def _byte_row(seq_len: int, prompt_ids: np.ndarray, answer_text: str,
              scored: Callable[[str], bool], **meta) -> dict:
    """[BOS] prompt " " answer [EOS], right-padded with EOS to seq_len + 1, shifted into
    inputs/labels; scored at the answer characters for which scored(char) holds."""
    ans = list((" " + answer_text).encode())
    full = np.concatenate([[BYTE_BOS], prompt_ids, ans, [BYTE_EOS]]).astype(np.int64)
    if full.size > seq_len + 1:
        raise ValueError(f"example of {full.size} tokens does not fit seq_len={seq_len}")
    start = 1 + prompt_ids.size  # index of the space in full
    full = np.concatenate([full, np.full(seq_len + 1 - full.size, BYTE_EOS)])
    labels = np.full(seq_len, IGNORE, np.int64)
    pos = [start + 1 + i - 1 for i, ch in enumerate(answer_text) if scored(ch)]  # input index
    pos = np.asarray(pos, np.int64)
    labels[pos] = full[pos + 1]
    return _finish(full[:-1], labels, answer_positions=pos.astype(np.int32),
                   prompt_len=int(start + 1), **meta)


def passkey_sequence(rng: np.random.Generator, *, seq_len: int, depth: float | None = None,
                     key_range: tuple[int, int] = (1, 50000)) -> dict:
    """A byte-level passkey training row (§3.3 "byte-level"): `[BOS] prompt " K" [EOS]` with the
    Landmark text prompt of `passkey_text` filling the row (right-padded with EOS when the key is
    short); the loss is on the digit bytes of K only. "prompt_len" is the length of
    `[BOS] prompt " "`; eval prompts with `[BOS] + prompt_ids` and reads the first integer."""
    budget = seq_len - 2 - len(str(key_range[1]))  # BOS, space, EOS, the longest key
    ex = passkey_text(rng, length=budget, depth=depth, key_range=key_range)
    return _byte_row(seq_len, ex["prompt_ids"], ex["answer"], str.isdigit, key=ex["key"],
                     depth=ex["depth"], answer=ex["answer"])


def needle_sequence(rng: np.random.Generator, *, seq_len: int, variant: str,
                    haystack_text: str | None = None, depth: float | None = None) -> dict:
    """A byte-level S-NIAH training row: `[BOS] input+answer_prefix " value" [EOS]`, the haystack
    sized by `needle_text` to leave room for the answer; the loss is on every byte of the value.
    """
    room = 3 + (36 if variant == "niah_single_3" else 7)  # BOS, space, EOS and the value
    ex = needle_text(rng, variant=variant, length=seq_len + 1, haystack_text=haystack_text,
                     depth=depth, answer_room=room)
    return _byte_row(seq_len, ex["prompt_ids"], ex["answer"], lambda ch: True, key=ex["key"],
                     depth=ex["depth"], answer=ex["answer"])
