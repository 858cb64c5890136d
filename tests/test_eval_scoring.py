"""Eval metrics on models whose answers are known.

- Hand-set Transformers (zoo.build + parameters set by hand): all-zero parameters give uniform
  logits, so perplexity == vocabulary size and bits-per-byte == log2(V); equal embedding rows and
  zeroed blocks give one fixed, non-uniform next-token distribution p, whose bits-per-byte on the
  held-out bytes is computed here by hand from p.
- Rule oracles: nnx modules with the model contract (init_state, __call__(tokens, state, mask=...),
  check_length) that predict by an exact rule over a token history carried in their state (like a
  KV cache): induction (MQAR), marker copy (selective copying), pointer copy (passkey, needle).
  Eval reaches them through the same path as real models (nnx.split -> zoo.lm.forward /
  zoo.lm.generate), so the full pipeline (generation of the task data, teacher forcing or decoding
  through the state, scoring) must give accuracy 1.0; the same oracle shifted by one token
  (a known-wrong model) must give 0.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from eval import scoring, tasks
from eval.scoring import Model
from train.data import data_defaults, synthetic
from train.sharding import make_mesh

# ----------------------------------------------------------------------------------- oracles

def _matches_at(buf, pattern):
    """[B, S] bool: the pattern ends at position s."""
    S = buf.shape[1]
    m = len(pattern)
    ok = jnp.ones(buf.shape, bool)
    for i, tok in enumerate(pattern):
        shift = m - 1 - i                  # buf[s - shift] == pattern[i]
        shifted = jnp.pad(buf, ((0, 0), (shift, 0)), constant_values=-1)[:, :S]
        ok = ok & (shifted == tok)
    ok = ok & (jnp.arange(S)[None, :] >= m - 1)
    return ok


def _last_at_or_before(flags, limit):
    """[B, T] index of the last s <= limit[b, t] with flags[b, s] (-1: none)."""
    S = flags.shape[1]
    s = jnp.arange(S)[None, None, :]
    cand = flags[:, None, :] & (s <= limit[:, :, None])
    return jnp.max(jnp.where(cand, s, -1), axis=-1)


def _take(buf, idx):
    return jnp.take_along_axis(buf, jnp.clip(idx, 0, buf.shape[1] - 1), axis=1)


def induction_rule(buf, pos):
    """MQAR: predict the token that followed the most recent earlier occurrence of the current
    token."""
    cur = _take(buf, pos)
    S = buf.shape[1]
    s = jnp.arange(S)[None, None, :]
    eq = (buf[:, None, :] == cur[:, :, None]) & (s < pos[:, :, None])
    prev = jnp.max(jnp.where(eq, s, -1), axis=-1)
    return jnp.where(prev >= 0, _take(buf, prev + 1), 0)


def marker_copy_rule(marker):
    """Selective copying: at the i-th marker, predict the i-th data token (not blank, not
    marker) seen so far."""
    def rule(buf, pos):
        is_marker = buf == marker
        is_data = (buf != 0) & ~is_marker
        S = buf.shape[1]
        s = jnp.arange(S)[None, None, :]
        upto = s <= pos[:, :, None]
        i = jnp.sum(is_marker[:, None, :] & upto, axis=-1)                    # markers so far
        rank = jnp.cumsum(is_data, axis=1)                                     # data rank at s
        hit = is_data[:, None, :] & (rank[:, None, :] == i[:, :, None]) & upto
        j = jnp.max(jnp.where(hit, s, -1), axis=-1)
        return jnp.where(j >= 0, _take(buf, j), 0)
    return rule


def pointer_rule(trigger, source):
    """After the last occurrence of `trigger` (ending at q <= t), copy the tokens that follow the
    last occurrence of `source` ending before the trigger starts: predict buf[s + 1 + (t - q)]."""
    def rule(buf, pos):
        q = _last_at_or_before(_matches_at(buf, trigger), pos)
        s = _last_at_or_before(_matches_at(buf, source), q - len(trigger))
        ok = (q >= 0) & (s >= 0)
        return jnp.where(ok, _take(buf, s + 1 + (pos - q)), 0)
    return rule


class RuleOracle(nnx.Module):
    """A model with the zoo's model contract whose next-token prediction at absolute position t
    is rule(history, t). State: {"pos": [B], "buf": [B, S]} (the token history, like a KV cache).
    `shift` adds a constant to every prediction (mod V): shift=1 is a known-wrong model."""

    def __init__(self, vocab_size, rule, *, shift=0, max_len=None):
        self.vocab_size, self.rule, self.shift, self.max_len = vocab_size, rule, shift, max_len
        self.scale = nnx.Param(jnp.asarray(20.0))

    def check_length(self, start, length):
        if self.max_len is not None and start + length > self.max_len:
            raise ValueError(f"sequence of {start + length} tokens exceeds max_len {self.max_len}")

    def init_state(self, batch_size, max_len=None):
        return {"pos": jnp.zeros((batch_size,), jnp.int32),
                "buf": jnp.zeros((batch_size, max_len or 1), jnp.int32)}

    def __call__(self, tokens, state=None, *, mask=None, segment_ids=None, key=None):
        B, T = tokens.shape
        tokens = tokens.astype(jnp.int32)
        if state is None:
            start, buf = jnp.zeros((B,), jnp.int32), tokens
        else:
            start = state["pos"]
            buf = jax.vmap(lambda b, t, p: jax.lax.dynamic_update_slice(b, t, (p,)))(
                state["buf"], tokens, start)
        pos = start[:, None] + jnp.arange(T)[None, :]
        pred = (self.rule(buf, pos) + self.shift) % self.vocab_size
        logits = jax.nn.one_hot(pred, self.vocab_size) * self.scale[...]
        n = T if mask is None else mask.astype(jnp.int32).sum(axis=1)
        return logits, {"pos": start + n, "buf": buf}, {}


def oracle(vocab, rule, shift=0, max_len=None, mesh=None):
    m = RuleOracle(vocab, rule, shift=shift, max_len=max_len)
    g, p = nnx.split(m)
    return Model(g, p, vocab_size=vocab, max_len=max_len, name="oracle", mesh=mesh)


def run_of(**data):
    cfg = data_defaults()
    for k, v in data.items():
        cfg[k] = v
    return tasks.Run(cfg, "r")


OPTS = dict(n_examples=16, batch_size=8, seed=7)


def evaluate_all(task, run, model, **kw):
    opts = tasks.Options(**{**OPTS, **kw})
    out = {}
    for s in task.settings(run, model, opts):
        out[s.name] = task.evaluate(run, model, s, opts)
    return out


# ----------------------------------------------------------------------------------- metrics

def test_labelled_accuracy_by_hand():
    labels = np.array([[-100, 3, -100, 4], [5, -100, 6, -100], [-100] * 4])
    preds = np.array([[0, 3, 0, 9], [5, 0, 6, 0], [1, 1, 1, 1]])
    acc, exact, n = scoring.labelled_accuracy(preds, labels)
    assert n == 2 and acc == pytest.approx((0.5 + 1.0) / 2) and exact == 0.5


def test_answer_spans_and_padding():
    labels = np.array([[-100, -100, 1, 2], [-100, 7, -100, -100]])
    start, n = scoring.answer_spans(labels)
    assert start.tolist() == [2, 1] and n.tolist() == [2, 1]
    with pytest.raises(ValueError, match="contiguous"):
        scoring.answer_spans(np.array([[1, -100, 2]]))
    tok, mask = scoring.pad_prompts([np.array([1, 2, 3]), np.array([4])], 5)
    assert tok.tolist() == [[1, 2, 3, 0, 0], [4, 0, 0, 0, 0]]
    assert mask.sum(axis=1).tolist() == [3, 1]


def test_first_integer_and_bytes():
    assert tasks.first_integer(" 12345. Remember") == "12345"
    assert tasks.first_integer("no digits") is None
    assert tasks.decode_bytes(list(b" 42") + [synthetic.BYTE_EOS, 50]) == " 42"


def _zero(params):
    return jax.tree.map(jnp.zeros_like, params)


def test_uniform_model_perplexity_equals_vocab(tmp_path):
    # a byte-level text source: held-out bytes of a small file written here
    text = ("The quick brown fox jumps over the lazy dog. " * 200).encode()
    path = tmp_path / "t.txt"
    path.write_bytes(text)
    run = run_of(source="text", path=str(path), seq_len=32, val_fraction=0.2)
    V = 256
    m = zoo.build("transformer", {"vocab_size": V, "dim": 16, "n_layers": 1, "n_heads": 2})
    g, p = nnx.split(m)
    model = Model(g, _zero(p), vocab_size=V, mesh=make_mesh((-1, 1, 1)))
    out = tasks.get_task("ppl").evaluate(run, model, tasks.Setting("split=val", {}),
                                         tasks.Options(batch_size=8, ppl_batches=0))
    n_val = int(len(text) * 0.2)
    assert out["tokens"] == ((n_val - 1) // 32) * 32     # every held-out window, no padding row
    assert out["ppl"] == pytest.approx(V, rel=1e-5)
    assert out["loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert out["bpb"] == pytest.approx(8.0, rel=1e-6)


def test_uniform_model_perplexity_on_token_arrays(tmp_path):
    """Pre-tokenized .npy source: perplexity == V; no bits-per-byte (tokens are not bytes)."""
    V = 50
    path = tmp_path / "toks.npy"
    np.save(path, np.random.default_rng(0).integers(0, V, 2000).astype(np.uint16))
    run = run_of(source="tokens", path=str(path), seq_len=16, vocab_size=V, val_fraction=0.1)
    m = zoo.build("transformer", {"vocab_size": V, "dim": 16, "n_layers": 1, "n_heads": 2})
    g, p = nnx.split(m)
    model = Model(g, _zero(p), vocab_size=V)
    out = tasks.get_task("ppl").evaluate(run, model, tasks.Setting("split=val", {}),
                                         tasks.Options(batch_size=4, ppl_batches=2))
    assert out["tokens"] == 2 * 4 * 16
    assert out["ppl"] == pytest.approx(V, rel=1e-5) and "bpb" not in out


def test_known_distribution_bits_per_byte(tmp_path):
    """Equal embedding rows + zeroed blocks: the model predicts one fixed distribution p at
    every position. bpb = -sum_t log2 p[target_t] / #bytes, computed here from p by hand."""
    rng = np.random.default_rng(0)
    text = bytes(rng.choice(np.frombuffer(b"abcdefgh ", np.uint8), 3000).tolist())
    path = tmp_path / "t.txt"
    path.write_bytes(text)
    run = run_of(source="text", path=str(path), seq_len=24, val_fraction=0.25)
    V, D = 256, 8
    m = zoo.build("transformer", {"vocab_size": V, "dim": D, "n_layers": 1, "n_heads": 2,
                                  "tie_embeddings": False})
    g, p = nnx.split(m)
    p = _zero(p)
    e = rng.normal(size=D).astype(np.float32)
    W = rng.normal(size=(D, V)).astype(np.float32)
    pure = p.to_pure_dict()
    pure["embed"]["embedding"] = jnp.tile(e, (V, 1))
    pure["head"]["weight"] = jnp.asarray(W)
    pure["final_norm"]["weight"] = jnp.ones(D)
    p.replace_by_pure_dict(pure)
    model = Model(g, p, vocab_size=V)
    out = tasks.get_task("ppl").evaluate(run, model, tasks.Setting("split=val", {}),
                                         tasks.Options(batch_size=4, ppl_batches=0))
    # by hand: h = rmsnorm(e) (weight 1, eps 1e-5), logits = h W, p = softmax
    h = e / np.sqrt(np.mean(e.astype(np.float64) ** 2) + 1e-5)
    logits = h @ W.astype(np.float64)
    logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    n_val = int(len(text) * 0.25)
    tail = np.frombuffer(text[len(text) - n_val:], np.uint8)
    nw = (n_val - 1) // 24
    targets = np.concatenate([tail[i * 24 + 1:i * 24 + 25] for i in range(nw)])
    bits = -logp[targets].sum() / math.log(2)
    assert out["bpb"] == pytest.approx(bits / targets.size, rel=1e-5)
    assert out["ppl"] == pytest.approx(2 ** (bits / targets.size), rel=1e-5)


# ----------------------------------------------------------------------------------- tasks

def test_mqar_oracle_and_wrong_model():
    run = run_of(source="mqar", seq_len=32, vocab_size=128, num_kv_pairs=4)
    task = tasks.get_task("mqar")
    good = evaluate_all(task, run, oracle(128, induction_rule), lengths=[32, 64], mqar_kv=[2, 8])
    assert set(good) == {"len=32,kv=2", "len=32,kv=8", "len=64,kv=2", "len=64,kv=8"}
    for v in good.values():
        assert v == {"acc": 1.0, "exact": 1.0}
    bad = evaluate_all(task, run, oracle(128, induction_rule, shift=1), lengths=[32], mqar_kv=[4])
    assert bad["len=32,kv=4"] == {"acc": 0.0, "exact": 0.0}


def test_mqar_on_a_mesh_and_partial_batches():
    """Sharded batches over 8 devices and a last batch padded by repetition give the same
    numbers (16 examples in batches of 8 and of 6)."""
    run = run_of(source="mqar", seq_len=32, vocab_size=128, num_kv_pairs=4)
    mesh = make_mesh((-1, 1, 1))
    for bs in (8, 6):
        out = evaluate_all(tasks.get_task("mqar"), run, oracle(128, induction_rule, mesh=mesh),
                           lengths=[32], batch_size=bs)
        assert out == {"len=32,kv=4": {"acc": 1.0, "exact": 1.0}}


def test_mqar_partial_credit_is_the_mean_per_example_fraction():
    """An oracle that gets only the first query of each example right scores 1/D."""
    def first_only(buf, pos):
        pred = induction_rule(buf, pos)
        # query keys sit in the query block (after the 2D context); wrong after the first one
        D = 4
        is_q = (pos >= 2 * D) & (_take(buf, pos) != 0)
        nth = jnp.cumsum(is_q, axis=1)
        return jnp.where(is_q & (nth > 1), pred + 1, pred)
    run = run_of(source="mqar", seq_len=32, vocab_size=128, num_kv_pairs=4)
    out = evaluate_all(tasks.get_task("mqar"), run, oracle(128, first_only), lengths=[32])
    assert out["len=32,kv=4"] == {"acc": 0.25, "exact": 0.0}


def test_selective_copying_oracle_and_wrong_model():
    A = 16
    run = run_of(source="selective_copying", seq_len=40, vocab_size=A, copy_num_tokens=8)
    task = tasks.get_task("selcopy")
    good = evaluate_all(task, run, oracle(A, marker_copy_rule(A - 1)), lengths=[40, 80])
    assert good == {"len=40": {"acc": 1.0, "exact": 1.0}, "len=80": {"acc": 1.0, "exact": 1.0}}
    bad = evaluate_all(task, run, oracle(A, marker_copy_rule(A - 1), shift=1), lengths=[40])
    assert bad == {"len=40": {"acc": 0.0, "exact": 0.0}}


def test_passkey_tokens_decoded_through_state():
    F = 8
    voc = synthetic.passkey_token_vocab(F)
    run = run_of(source="passkey", seq_len=48, passkey_filler_tokens=F, passkey_digits=5)
    rule = pointer_rule([voc["query"]], [voc["key_start"]])
    task = tasks.get_task("passkey")
    good = evaluate_all(task, run, oracle(voc["vocab_size"], rule), lengths=[48, 96],
                        passkey_depths=[0.0, 0.5, 1.0])
    assert len(good) == 6
    for v in good.values():
        assert v == {"acc": 1.0, "digit_acc": 1.0}
    bad = evaluate_all(task, run, oracle(voc["vocab_size"], rule, shift=1), lengths=[48],
                       passkey_depths=[0.5])
    assert bad == {"len=48,depth=0.5": {"acc": 0.0, "digit_acc": 0.0}}


def test_passkey_bytes_and_max_len_skip():
    run = run_of(source="passkey", passkey_format="bytes", seq_len=400)
    pat = list(b"The pass key is")
    rule = pointer_rule(pat, pat)
    task = tasks.get_task("passkey")
    V = synthetic.BYTE_VOCAB
    good = evaluate_all(task, run, oracle(V, rule, max_len=600), lengths=[400, 800],
                        passkey_depths=[0.0, 1.0])
    assert good["len=400,depth=0"] == {"acc": 1.0}
    assert good["len=400,depth=1"] == {"acc": 1.0}
    # beyond the learned-position limit: the limit is reported instead of a number
    assert good["len=800,depth=0"] == {tasks.SKIPPED: 600.0}
    bad = evaluate_all(task, run, oracle(V, rule, shift=1), lengths=[400], passkey_depths=[0.5])
    assert bad == {"len=400,depth=0.5": {"acc": 0.0}}


@pytest.mark.parametrize("variant", ["niah_single_1", "niah_single_2", "niah_single_3"])
def test_needle_variants(variant, tmp_path):
    hay = tmp_path / "essay.txt"
    hay.write_text("Some essay text goes here. It has sentences! Does it? Yes it does. " * 40)
    run = run_of(source="mqar", seq_len=300)
    # needle "... for {key} is: {value}." ; answer prefix "... mentioned in the provided text is"
    rule = pointer_rule(list(b"provided text is"), list(b" is:"))
    task = tasks.get_task(variant)
    V = synthetic.BYTE_VOCAB
    lengths = [512, 1024] if variant == "niah_single_1" else [640]
    good = evaluate_all(task, run, oracle(V, rule), lengths=lengths, niah_haystack=str(hay),
                        n_examples=8)
    assert good == {f"len={L}": {"acc": 1.0} for L in lengths}
    bad = evaluate_all(task, run, oracle(V, rule, shift=1), lengths=[512], niah_haystack=str(hay),
                       n_examples=8)
    assert bad == {"len=512": {"acc": 0.0}}


def test_decode_throughput_positive_and_limited():
    run = run_of(source="mqar", seq_len=32, vocab_size=128)
    out = evaluate_all(tasks.get_task("decode"), run, oracle(128, induction_rule),
                       decode_prompt=16, decode_new=64)
    (v,) = out.values()
    # 63 sequential state updates after one prefill: the decode share is well above 10%
    assert v["tokens_per_s"] > 0 and v["decode_tokens_per_s"] > v["tokens_per_s"] * 0.5
    out = evaluate_all(tasks.get_task("decode"), run, oracle(128, induction_rule, max_len=20),
                       decode_prompt=16, decode_new=8)
    assert list(out.values()) == [{tasks.SKIPPED: 20.0}]


def test_lengths_too_short_for_the_format_are_not_settings(capsys):
    run = run_of(source="mqar", seq_len=64)
    V = synthetic.BYTE_VOCAB
    opts = tasks.Options(lengths=[64, 512], passkey_format="bytes", passkey_depths=[0.5])
    model = oracle(V, induction_rule)
    assert [s.name for s in tasks.get_task("niah_single_1").settings(run, model, opts)] == ["len=512"]
    assert [s.name for s in tasks.get_task("passkey").settings(run, model, opts)] == \
        ["len=512,depth=0.5"]
    err = capsys.readouterr().err
    assert "niah_single_1 len=64 not run" in err and "passkey len=64 not run" in err


def test_plain_byte_lm_gets_prompts_without_bos():
    """A text-trained byte LM (vocabulary 256) is prompted with the bare bytes: the oracle that
    requires the prompt to start with the task line (no BOS) still scores 1."""
    run = run_of(source="text", seq_len=256)
    pat = list(b"The pass key is")
    starts_with_task = list(synthetic.PASSKEY_TASK.encode()[:8])

    def rule(buf, pos):
        ok = jnp.all(buf[:, :8] == jnp.asarray(starts_with_task)[None, :], axis=1)
        return jnp.where(ok[:, None], pointer_rule(pat, pat)(buf, pos), 0)
    out = evaluate_all(tasks.get_task("passkey"), run, oracle(256, rule), lengths=[512],
                       passkey_depths=[0.5])
    assert out == {"len=512,depth=0.5": {"acc": 1.0}}
