"""The token sets the shared conformance suite (tests/test_conformance.py) feeds a model, for
the families whose equality tests rest on discrete decisions (MoM's routing, MemMamba's
insertions, Hydra's MoE / global tokens / PKM): their tests assert every decision of these runs
is clear of its threshold (the contract notes' margins)."""
import jax
import jax.numpy as jnp
import numpy as np


def conformance_rows(spec):
    """(tokens [N, L], mask [N, L]) stacking the suite's runs: `tokens_for`'s seeds and batch
    sizes, the causality perturbations, and the document-reset test's second document shifted
    to the front (right padded); plus (x6, seg): that test's packed rows and segment ids."""
    V, L = spec.config.vocab_size, spec.length
    n = len(spec.cuts)
    tok = lambda b, s: jax.random.randint(jax.random.key(s), (b, L), 0, V, jnp.int32)  # noqa: E731
    x0 = tok(2, 0)
    rows = [tok(b, s) for b, s in ((2, 0), (1, 5), (n, 1), (2, 2), (2, 3), (4, 4), (n, 6))]
    rows += [x0.at[:, c:].set((x0[:, c:] + 7) % V) for c in (L // 3, L - 2)]
    a, t = L // 2 - 1, np.arange(L)[None]
    x6 = tok(n, 6)
    rows.append(jnp.take_along_axis(x6, jnp.asarray(np.minimum(t + a, L - 1)).repeat(n, 0),
                                    axis=1))
    x = jnp.concatenate(rows)
    mask = np.ones(x.shape, bool)
    mask[-n:] = t < L - a
    seg = jnp.asarray(np.where(np.arange(L) < a, 0, 1)[None].repeat(n, 0), jnp.int32)
    return x, jnp.asarray(mask), (x6, seg)
