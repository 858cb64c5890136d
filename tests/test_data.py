"""The data pipeline (train/data): sources, splits, packing, per-process rows, state."""
import grain
import numpy as np
import pytest

from train import data
from train.data import synthetic
from train.data.sources import write_array_record


def cfg(**kw):
    c = data.data_defaults()
    c.update(kw)
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def concat_processes(c, split, B, seed, P, n):
    its = [data.make_iterator(c, split=split, global_batch=B, seed=seed, process_index=p,
                              process_count=P) for p in range(P)]
    out = []
    for _ in range(n):
        parts = [next(it) for it in its]
        assert all(v.shape[0] == B // P for part in parts for v in part.values())
        out.append({k: np.concatenate([part[k] for part in parts]) for k in parts[0]})
    return out


@pytest.fixture
def token_files(tmp_path):
    """The same 3000 tokens (documents of varying length, each ending with EOS=1) as .npy,
    .bin (uint16 and int32) and ArrayRecord (one record per document)."""
    rng = np.random.default_rng(0)
    docs, n = [], 0
    while n < 3000:
        d = np.append(rng.integers(2, 500, size=int(rng.integers(5, 60))), 1)
        docs.append(d)
        n += d.size
    toks = np.concatenate(docs)[:3000]
    docs[-1] = docs[-1][:docs[-1].size - (n - 3000)]
    files = {"npy": tmp_path / "t.npy", "bin16": tmp_path / "t16.bin",
             "bin32": tmp_path / "t32.bin", "ar": tmp_path / "t.array_record"}
    np.save(files["npy"], toks.astype(np.int32))
    toks.astype(np.uint16).tofile(files["bin16"])
    toks.astype(np.int32).tofile(files["bin32"])
    write_array_record(str(files["ar"]), docs, dtype="uint16")
    return toks, docs, files


# ------------------------------------------------------------------ config, vocab, validation

def test_defaults_and_vocab_sizes(tmp_path):
    c = data.data_defaults()
    for k in ("source", "seq_len", "vocab_size", "num_kv_pairs", "copy_num_tokens", "path",
              "dtype", "val_fraction", "pack", "eos_id", "num_workers", "seed"):
        assert k in c
    assert c.val_fraction == 0.1 and c.num_workers == 0 and c.pack is False
    data.validate(cfg(vocab_size=128))
    assert data.vocab_size(cfg(source="text")) == 256
    assert data.vocab_size(cfg(source="mqar", vocab_size=100)) == 100
    assert data.vocab_size(cfg(source="selective_copying", vocab_size=16)) == 16
    assert data.vocab_size(cfg(source="tokens", vocab_size=50257)) == 50257
    assert data.vocab_size(cfg(source="passkey", passkey_filler_tokens=16)) == 30
    assert data.vocab_size(cfg(source="passkey", passkey_format="bytes")) == 258
    assert data.vocab_size(cfg(source="needle")) == 258


@pytest.mark.parametrize("kw,msg", [
    (dict(num_kv_pairs=40, seq_len=64, vocab_size=128),
     r"^data\.num_kv_pairs=40 does not fit in data\.seq_len=64"),
    (dict(vocab_size=64, seq_len=64), r"^data\.vocab_size=64 must be > data\.seq_len=64"),
    (dict(source="nope"), r"^data\.source: unknown source 'nope'"),
    (dict(source="text", path="/nonexistent/x.txt"), r"^data\.path: file not found: /nonexistent"),
    (dict(source="text"), r"^data\.path: required"),
    (dict(source="selective_copying", copy_num_tokens=40, seq_len=64, vocab_size=16),
     r"^data\.copy_num_tokens=40 does not fit in data\.seq_len=64"),
    (dict(source="passkey", passkey_digits=20, seq_len=30), r"^data\.seq_len=30 is too short"),
    (dict(source="passkey", passkey_format="words"), r"^data\.passkey_format"),
    (dict(source="passkey", passkey_depth=1.5), r"^data\.passkey_depth=1\.5"),
    (dict(source="passkey", passkey_filler="noise"), r"^data\.passkey_filler='noise' is not one"),
    (dict(source="needle", needle_variant="niah_single_2"), r"^data\.needle_haystack_path"),
    (dict(source="needle", needle_variant="niah_multi"), r"^data\.needle_variant"),
    (dict(source="needle", seq_len=100), r"^data\.seq_len=100 is too short"),
    (dict(pack=True, vocab_size=128), r"^data\.pack"),
    (dict(num_workers=-1, vocab_size=128), r"^data\.num_workers=-1"),
])
def test_validate_names_the_key(kw, msg):
    with pytest.raises(ValueError, match=msg) as e:
        data.validate(cfg(**kw))
    assert "\n" not in str(e.value)


def test_validate_unknown_key():
    c = cfg(vocab_size=128)
    c.unlock()
    c.num_kv_pair = 3
    with pytest.raises(ValueError, match=r"^data\.num_kv_pair: unknown key$"):
        data.validate(c)


def test_validate_files(tmp_path, token_files):
    toks, docs, files = token_files
    small = tmp_path / "small.txt"
    small.write_bytes(b"hello world")
    with pytest.raises(ValueError, match=r"^data\.path: .*has 11 tokens, too few"):
        data.validate(cfg(source="text", path=str(small), seq_len=64))
    with pytest.raises(ValueError, match=r"^data\.val_fraction=0\.01: the held-out tail"):
        data.validate(cfg(source="text", path=str(small), seq_len=4, val_fraction=0.01))
    with pytest.raises(ValueError, match=r"^data\.path: unknown token file type"):
        data.validate(cfg(source="tokens", path=str(small)))
    with pytest.raises(ValueError, match=r"^data\.dtype=float32 must be an integer dtype"):
        data.validate(cfg(source="tokens", path=str(files["bin16"]), dtype="float32"))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match=r"^data\.path: cannot read .*odd\.bin: size 3"):
        data.validate(cfg(source="tokens", path=str(odd), dtype="uint16"))
    with pytest.raises(ValueError, match=r"^data\.eos_id: packing .* needs a document separator"):
        data.validate(cfg(source="tokens", path=str(files["npy"]), pack=True, seq_len=16))
    with pytest.raises(ValueError, match=r"^data\.eos_id=600 is outside"):
        data.validate(cfg(source="tokens", path=str(files["npy"]), vocab_size=512, eos_id=600))
    with pytest.raises(ValueError, match=r"^data\.val_fraction=1\.5"):
        data.validate(cfg(source="text", path=str(small), val_fraction=1.5))
    # tokens beyond the vocabulary: one line naming the file, before anything compiles ...
    c = cfg(source="tokens", path=str(files["npy"]), vocab_size=100, seq_len=16)
    with pytest.raises(ValueError, match=r"^data\.path: .*t\.npy has token id \d+ at offset \d+, "
                                         r"outside the vocabulary of 100 tokens"):
        data.validate(c)
    # ... and again by the reader, row by row (files too long to scan whole at start-up)
    with pytest.raises(ValueError, match=r"^data\.path: token .* outside data\.vocab_size=100"):
        next(data.make_iterator(c, split="train", global_batch=4, seed=0))
    for f in files.values():
        data.validate(cfg(source="tokens", path=str(f), vocab_size=512, seq_len=16,
                          dtype="int32" if f.name == "t32.bin" else "uint16"))


# ------------------------------------------------------------------ synthetic sources

@pytest.mark.parametrize("source,kw,gen,gkw", [
    ("mqar", dict(vocab_size=128, num_kv_pairs=8), synthetic.mqar,
     dict(num_kv_pairs=8, vocab_size=128)),
    ("selective_copying", dict(vocab_size=16, copy_num_tokens=4), synthetic.selective_copying,
     dict(num_tokens_to_copy=4, vocab_size=16)),
    ("passkey", dict(passkey_depth=0.25), synthetic.passkey_tokens,
     dict(depth=0.25, num_filler_tokens=16)),
    ("passkey", dict(passkey_filler="random"), synthetic.passkey_tokens,
     dict(num_filler_tokens=16, filler="random")),
    ("needle", dict(seq_len=400), synthetic.needle_sequence, dict(variant="niah_single_1")),
])
def test_synthetic_batches_are_the_generators_examples(source, kw, gen, gkw):
    c = cfg(source=source, seq_len=kw.pop("seq_len", 64), val_examples=10, **kw)
    data.validate(c)
    T, B = c.seq_len, 4
    it = data.make_iterator(c, split="train", global_batch=B, seed=3)
    batches = take(it, 2)
    for j, batch in enumerate(batches):
        assert set(batch) == {"inputs", "targets", "loss_mask"}
        assert batch["inputs"].dtype == np.int32 and batch["targets"].dtype == np.int32
        assert batch["loss_mask"].dtype == np.float32 and batch["inputs"].shape == (B, T)
        assert batch["inputs"].max() < data.vocab_size(c)
        for r in range(B):
            ex = gen(synthetic.example_rng(3, synthetic.TRAIN_STREAM, j * B + r), seq_len=T, **gkw)
            for k in batch:
                np.testing.assert_array_equal(batch[k][r], ex[k])
        assert batch["loss_mask"].sum() > 0
    # val: a fixed finite set from the other stream, last batch completed with unscored rows
    val = list(data.make_iterator(c, split="val", global_batch=B, seed=3))
    assert len(val) == 3
    rows = np.concatenate([b["inputs"] for b in val])
    masks = np.concatenate([b["loss_mask"] for b in val])
    assert np.all(masks[10:] == 0) and np.all(rows[10:] == 0) and np.all(masks[:10].sum(1) > 0)
    ex0 = gen(synthetic.example_rng(3, synthetic.VAL_STREAM, 0), seq_len=T, **gkw)
    np.testing.assert_array_equal(rows[0], ex0["inputs"])
    assert_batches_equal(val, list(data.make_iterator(c, split="val", global_batch=B, seed=3)))


def test_synthetic_seed_changes_the_stream():
    c = cfg(vocab_size=128)
    a = next(data.make_iterator(c, split="train", global_batch=4, seed=0))
    b = next(data.make_iterator(c, split="train", global_batch=4, seed=1))
    assert not np.array_equal(a["inputs"], b["inputs"])


@pytest.mark.parametrize("P", [2, 4])
def test_processes_split_the_global_batch(P, token_files):
    toks, docs, files = token_files
    for c, split in [(cfg(vocab_size=128), "train"), (cfg(vocab_size=128, val_examples=9), "val"),
                     (cfg(source="tokens", path=str(files["npy"]), vocab_size=512, seq_len=16,
                          pack=True, eos_id=1), "train"),
                     (cfg(source="tokens", path=str(files["ar"]), vocab_size=512, seq_len=16),
                      "val")]:
        one = take(data.make_iterator(c, split=split, global_batch=8, seed=2), 2)
        assert_batches_equal(concat_processes(c, split, 8, 2, P, 2), one)
    with pytest.raises(ValueError, match="multiple"):
        data.make_iterator(cfg(vocab_size=128), split="train", global_batch=6, seed=0,
                           process_count=4)


# ------------------------------------------------------------------ file sources

def test_text_windows_split_and_epochs(tmp_path):
    text = bytes(np.random.default_rng(0).integers(32, 127, size=1001).astype(np.uint8))
    path = tmp_path / "t.txt"
    path.write_bytes(text)
    arr = np.frombuffer(text, np.uint8).astype(np.int32)
    T, B = 10, 3
    c = cfg(source="text", path=str(path), seq_len=T, val_fraction=0.1)
    data.validate(c)
    n_train = 1001 - 100
    nw = (n_train - 1) // T  # 90 windows
    assert nw % B == 0
    it = data.make_iterator(c, split="train", global_batch=B, seed=0)
    epoch = lambda: [next(it) for _ in range(nw // B)]  # noqa: E731
    starts = []
    for batch in epoch():
        np.testing.assert_array_equal(batch["loss_mask"], 1.0)
        assert "segment_ids" not in batch
        for x, y in zip(batch["inputs"], batch["targets"]):
            s = next(i for i in range(0, n_train - T, T) if np.array_equal(arr[i:i + T], x))
            np.testing.assert_array_equal(arr[s + 1:s + T + 1], y)  # targets = next bytes
            assert s + T + 1 <= n_train                            # never the held-out tail
            starts.append(s)
    assert sorted(starts) == list(range(0, nw * T, T))  # an epoch visits each window once
    assert starts != sorted(starts)                     # shuffled
    second = [s for b in epoch() for s in
              [next(i for i in range(0, nw * T, T) if np.array_equal(arr[i:i + T], x))
               for x in b["inputs"]]]
    assert sorted(second) == sorted(starts) and second != starts  # reshuffled per epoch
    # val: the tail, in order, finite
    val = list(data.make_iterator(c, split="val", global_batch=B, seed=0))
    rows = np.concatenate([b["inputs"] for b in val])
    mask = np.concatenate([b["loss_mask"] for b in val])
    n_real = (100 - 1) // T
    assert rows.shape[0] == -(-n_real // B) * B
    for k in range(n_real):
        np.testing.assert_array_equal(rows[k], arr[n_train + k * T:n_train + (k + 1) * T])
    assert np.all(mask[:n_real] == 1) and np.all(mask[n_real:] == 0)


def test_token_formats_agree(token_files):
    toks, docs, files = token_files
    out = {}
    for name, f in files.items():
        c = cfg(source="tokens", path=str(f), vocab_size=512, seq_len=16,
                dtype="int32" if name == "bin32" else "uint16")
        out[name] = (take(data.make_iterator(c, split="train", global_batch=4, seed=1), 5),
                     list(data.make_iterator(c, split="val", global_batch=4, seed=1)))
    for name in ("bin16", "bin32", "ar"):
        assert_batches_equal(out[name][0], out["npy"][0])
        assert_batches_equal(out[name][1], out["npy"][1])
    n_train = 3000 - 300
    val_rows = np.concatenate([b["inputs"] for b in out["npy"][1]])
    np.testing.assert_array_equal(val_rows[0], toks[n_train:n_train + 16])


def check_packed(batch, is_start):
    """segment_ids restart after each document boundary; the target is never scored across it."""
    for x, y, seg, m, st in zip(batch["inputs"], batch["targets"], batch["segment_ids"],
                                batch["loss_mask"], is_start):
        # st[t]: token t of the window (t = 0..T) starts a document
        assert seg[0] == 1
        np.testing.assert_array_equal(np.diff(seg), st[1:-1].astype(int))
        np.testing.assert_array_equal(m, (~st[1:]).astype(np.float32))
        np.testing.assert_array_equal(x[1:], y[:-1])


def test_packing_with_eos(token_files):
    toks, docs, files = token_files
    c = cfg(source="tokens", path=str(files["bin16"]), vocab_size=512, seq_len=32, pack=True,
            eos_id=1)
    data.validate(c)
    total_docs = 0
    for batch in take(data.make_iterator(c, split="train", global_batch=4, seed=0), 6):
        assert batch["segment_ids"].dtype == np.int32
        for r in range(4):
            w = np.append(batch["inputs"][r], batch["targets"][r, -1])
            st = np.zeros(33, bool)
            st[1:] = w[:-1] == 1
            check_packed({k: v[r:r + 1] for k, v in batch.items()}, st[None])
            total_docs += int(batch["segment_ids"][r].max())
            # the loss mask is 0 exactly where the input is EOS (its target opens a new document)
            np.testing.assert_array_equal(batch["loss_mask"][r] == 0, batch["inputs"][r] == 1)
    assert total_docs > 24  # documents average ~33 tokens: rows hold several


def test_packing_array_record_documents(token_files):
    toks, docs, files = token_files
    offsets = np.concatenate([[0], np.cumsum([d.size for d in docs])])
    c = cfg(source="tokens", path=str(files["ar"]), vocab_size=512, seq_len=32, pack=True)
    data.validate(c)  # records are documents: no eos_id needed
    starts = np.zeros(3001, bool)
    starts[offsets[:-1]] = True
    for batch in list(data.make_iterator(c, split="val", global_batch=2, seed=0)):
        for r in range(2):
            if batch["loss_mask"][r].sum() == 0:
                continue
            x = batch["inputs"][r]
            lo = next(i for i in range(2700, 3000 - 32, 32) if np.array_equal(toks[i:i + 32], x))
            st = starts[lo:lo + 33].copy()
            st[0] = False
            check_packed({k: v[r:r + 1] for k, v in batch.items()}, st[None])


# ------------------------------------------------------------------ state and checkpoints

@pytest.mark.parametrize("which", ["mqar", "tokens"])
def test_state_restore_gives_identical_next_batches(which, token_files):
    toks, docs, files = token_files
    c = (cfg(vocab_size=128) if which == "mqar" else
         cfg(source="tokens", path=str(files["ar"]), vocab_size=512, seq_len=16, pack=True))
    it = data.make_iterator(c, split="train", global_batch=4, seed=5)
    take(it, 7)  # the file has 168 training windows: crosses an epoch at 42 batches
    state = it.get_state()
    expect = take(it, 40)
    it2 = data.make_iterator(c, split="train", global_batch=4, seed=5)
    it2.set_state(state)
    assert_batches_equal(take(it2, 40), expect)
    # the state of a 2-process run restores a 1-process run (it counts global batches)
    parts = [data.make_iterator(c, split="train", global_batch=4, seed=5, process_index=p,
                                process_count=2) for p in range(2)]
    for p in parts:
        take(p, 7)
    assert parts[0].get_state() == parts[1].get_state() == state


def test_orbax_checkpoint_of_iterator(tmp_path):
    import orbax.checkpoint as ocp

    c = cfg(vocab_size=128)
    it = data.make_iterator(c, split="train", global_batch=8, seed=0)
    ref = take(data.make_iterator(c, split="train", global_batch=8, seed=0), 8)
    take(it, 6)
    assert it.get_state() == {"next_index": 6}
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(1, args=ocp.args.Composite(raw=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    it3 = data.make_iterator(c, split="train", global_batch=8, seed=0)
    mngr.restore(1, args=ocp.args.Composite(raw=grain.checkpoint.CheckpointRestore(it3)))
    np.testing.assert_array_equal(next(it3)["inputs"], ref[6]["inputs"])
    mngr.close()


def test_worker_processes_match_and_restore():
    c = cfg(vocab_size=128, num_workers=1)
    ref = take(data.make_iterator(cfg(vocab_size=128), split="train", global_batch=4, seed=0), 9)
    it = data.make_iterator(c, split="train", global_batch=4, seed=0)
    assert_batches_equal(take(it, 5), ref[:5])
    state = it.get_state()
    expect = take(it, 4)
    assert_batches_equal(expect, ref[5:])
    it2 = data.make_iterator(c, split="train", global_batch=4, seed=0)
    it2.set_state(state)
    assert_batches_equal(take(it2, 4), expect)


WORKER = r'''
import sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
from absl import flags
flags.FLAGS.mark_as_parsed()
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from train import data

def main(pid, port, out):
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=60,
                               heartbeat_timeout_seconds=20, shutdown_timeout_seconds=20)
    c = data.data_defaults()
    c.vocab_size = 128
    mesh = jax.make_mesh((4,), ("data",))
    it = data.make_iterator(c, split="train", global_batch=8, seed=4,
                            process_index=jax.process_index(), process_count=jax.process_count())
    sharding = NamedSharding(mesh, P("data"))
    got = []
    for _ in range(3):
        b = jax.make_array_from_process_local_data(sharding, next(it)["inputs"])
        assert b.shape == (8, 64)
        got.append(multihost_utils.process_allgather(b, tiled=True))
    if pid == 0:
        np.save(out, np.stack(got))
    jax.distributed.shutdown()

if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
'''


def test_two_processes_build_the_one_process_global_batch(tmp_path):
    import os
    import pathlib
    import subprocess
    import sys

    import portpicker

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = portpicker.pick_unused_port()
    out = tmp_path / "got.npy"
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), XLA_FLAGS="")
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(out)],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=120)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), logs
    ref = take(data.make_iterator(cfg(vocab_size=128), split="train", global_batch=8, seed=4), 3)
    np.testing.assert_array_equal(np.load(out), np.stack([b["inputs"] for b in ref]))


def test_row_makers_pickle_for_worker_processes(tmp_path, token_files):
    import pickle

    import cloudpickle  # what grain's worker processes use

    toks, docs, files = token_files
    hay = tmp_path / "essay.txt"
    hay.write_text(" ".join(f"Line {i} of a local essay. It goes on!" for i in range(400)))
    configs = [cfg(source="tokens", path=str(f), vocab_size=512, seq_len=16, pack=True, eos_id=1,
                   dtype="int32" if name == "bin32" else "uint16") for name, f in files.items()]
    configs.append(cfg(source="needle", needle_variant="niah_single_2", seq_len=512,
                       needle_haystack_path=str(hay), val_examples=4))
    for c in configs:
        data.validate(c)
        ds = data.make_dataset(c, split="val", global_batch=2, seed=0)
        first = ds[0]
        again = pickle.loads(cloudpickle.dumps(ds))[0]
        for k in first:
            np.testing.assert_array_equal(first[k], again[k])
    # opened files and the haystack text stay behind when pickled
    from train.data.sources import open_tokens
    for c in configs[:-1]:
        rows = data.WindowRows(c, open_tokens(c), 0, 5)
        rows(0)
        copy = pickle.loads(pickle.dumps(rows))
        assert getattr(copy.stream, "_arr", None) is None and getattr(copy.stream, "_src", None) is None
        np.testing.assert_array_equal(copy(3)["inputs"], rows(3)["inputs"])
    rows = data.SyntheticRows(configs[-1], 0, 0)
    rows(0)
    assert rows.haystack is not None and pickle.loads(pickle.dumps(rows)).haystack is None
    # the essay needle rows carry the value as their scored targets
    row = data.make_dataset(configs[-1], split="train", global_batch=1, seed=0)[0]
    scored = row["targets"][0][row["loss_mask"][0] > 0]
    assert re_fullmatch(r"[1-9]\d{6}", bytes(scored.astype(np.uint8)).decode())


def re_fullmatch(pattern, s):
    import re
    return re.fullmatch(pattern, s) is not None
