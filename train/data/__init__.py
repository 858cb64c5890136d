"""The trainer's data pipeline (grain Dataset API).

Modules: `config` (the `data` section: defaults, vocabulary, validation), `sources` (token
streams of local files), `synthetic` (the synthetic task generators, shared with eval),
`pipeline` (rows, batches, iterators). The public API is re-exported here:
  data_defaults() -> ConfigDict             the `data` config section with its defaults
  vocab_size(data_cfg) -> int               the vocabulary the model must have
  validate(data_cfg) -> None                ValueError with one line naming the bad key/file
  make_iterator(data_cfg, *, split, global_batch, seed, process_index=0, process_count=1)
      -> grain DatasetIterator of dicts of numpy arrays (this process's rows of each batch)
  make_dataset(...) -> grain MapDataset of the same batches (random access)

Batches: "inputs" int32 [b, T], "targets" int32 [b, T] (the next tokens / the task labels),
"loss_mask" float32 [b, T] (1 where scored: every position for text/tokens, the answer positions
for synthetic tasks) and, when `data.pack` is on, "segment_ids" int32 [b, T] (1, 2, ... per
document in the row; 0 marks the padding rows of a final held-out batch). Here
b = global_batch // process_count and process p gets rows p*b:(p+1)*b of the global batch, so
a run over any number of processes sees the batches of a one-process run.

Splits: "train" repeats forever, deterministic from `seed` (synthetic: fresh examples of stream
TRAIN_STREAM; files: windows shuffled anew every epoch). "val" is finite and deterministic
(synthetic: `data.val_examples` examples of the disjoint stream VAL_STREAM; files: the held-out
tail, the last `data.val_fraction` of the tokens); its last batch is completed with rows whose
loss_mask is 0.

Iterator state (`get_state`/`set_state`, `grain.checkpoint.CheckpointSave/CheckpointRestore`)
is `{"next_index": k}` when `num_workers == 0`: the number of batches consumed, the same on every
process, so a state saved by N processes also restores on M processes.
"""
from train.data.config import (
    FILE_SOURCES,
    SOURCES,
    SYNTHETIC_SOURCES,
    data_defaults,
    validate,
    vocab_size,
)
from train.data.pipeline import SyntheticRows, WindowRows, make_dataset, make_iterator

__all__ = ["data_defaults", "vocab_size", "validate", "make_iterator", "make_dataset",
           "SyntheticRows", "WindowRows", "SOURCES", "SYNTHETIC_SOURCES", "FILE_SOURCES"]
