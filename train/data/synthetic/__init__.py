"""Synthetic sequence tasks as pure NumPy generators (specs/tasks.md), shared by train and eval.

Every task is a function of an explicit `numpy.random.Generator` that builds **one** example.
`example_rng(seed, stream, index)` gives each example its own generator, so any example of a
data set can be regenerated from `(seed, stream, index)` alone; train and held-out sets use
disjoint streams (`TRAIN_STREAM`, `VAL_STREAM`), the zoo's form of Zoology's disjoint seed
ranges. `generate(task, seed=..., n=...)` stacks `n` examples.

Token-level tasks return a dict with
  "inputs"    int32 [T]  the model's input tokens,
  "labels"    int32 [T]  the target of the output *at* position t, `IGNORE` (-100) where unscored
                         (inputs and labels are already shifted: no shift in the loss),
  "targets"   int32 [T]  labels with IGNORE replaced by 0 (what the trainer's loss consumes),
  "loss_mask" float32 [T] 1.0 exactly at the scored positions,
plus task metadata (answer positions, keys, values, depth, ...) documented per task.

The text tasks (`passkey_text`, `needle_text`) are tokenizer-agnostic builders: they take
`tokenize(str) -> list[int]` (byte-level by default, `byte_tokenize`) and measure lengths in
that tokenizer. `passkey_sequence` / `needle_sequence` turn them into fixed-length training rows
for byte-level models (vocabulary 256 bytes + BOS + EOS, `BYTE_VOCAB`).

The tasks live by family: common.py (streams, IGNORE, the byte vocabulary, `generate`), recall.py
(MQAR, selective copying), passkey.py, needle.py (RULER S-NIAH), rows.py (byte-level training
rows of the text tasks); every public name is importable from here.
"""
from train.data.synthetic.common import (  # noqa: F401
    ARRAY_KEYS,
    BYTE_BOS,
    BYTE_EOS,
    BYTE_VOCAB,
    IGNORE,
    TRAIN_STREAM,
    VAL_STREAM,
    example_rng,
    generate,
)
from train.data.synthetic.needle import (  # noqa: F401
    NIAH_DEPTHS,
    NIAH_VARIANTS,
    WORDLISTS,
    key_multiplicities,
    needle_text,
    niah_key,
    niah_value,
    word_lists,
)
from train.data.synthetic.passkey import (  # noqa: F401
    PASSKEY_FILLER_UNIT,
    PASSKEY_QUESTION,
    PASSKEY_TASK,
    byte_tokenize,
    passkey_needle,
    passkey_prompt,
    passkey_text,
    passkey_token_vocab,
    passkey_tokens,
    passkey_tokens_check,
)
from train.data.synthetic.recall import (  # noqa: F401
    mqar,
    mqar_check,
    selective_copying,
    selective_copying_check,
    weighted_sample_without_replacement,
)
from train.data.synthetic.rows import (  # noqa: F401
    needle_sequence,
    passkey_sequence,
)
