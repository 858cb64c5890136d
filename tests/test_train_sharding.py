"""Data parallel, FSDP and tensor parallel train steps on 8 virtual devices equal the
single-device step (loss and every updated parameter), and parameters are really sharded as
the logical-axis rules say (per-device shard shapes)."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from train import config as C
from train import sharding as sh
from train import trainer as T
from train.guard import init_guard


def _cfg(mesh_shape):
    model = C.model_section("transformer", vocab_size=64, dim=32, n_layers=1, n_heads=4,
                            ffn="swiglu", ffn_dim=64, max_len=16, tie_embeddings=False)
    cfg = C.base_config(model)
    cfg.data.seq_len = 16
    cfg.data.vocab_size = 64
    cfg.data.num_kv_pairs = 2
    cfg.train.batch_size = 16
    cfg.train.warmup_steps = 0
    cfg.train.lr = 1e-2
    cfg.mesh.shape = mesh_shape
    return cfg


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 64, (16, 16)).astype(np.int32)
    y = rng.integers(0, 64, (16, 16)).astype(np.int32)
    m = (rng.random((16, 16)) < 0.7).astype(np.float32)
    return {"inputs": x, "targets": y, "loss_mask": m}


def _one_step(mesh_shape, devices, host_params, batch):
    cfg, mcfg = C.resolve(_cfg(mesh_shape), device_count=len(devices))
    tr = T.Trainer(cfg, mcfg, verbose=False, devices=devices)
    s = tr.s
    params = jax.device_put(host_params, s.param_shardings)
    opt_state = jax.jit(s.opt.init, out_shardings=s.opt_shardings)(params)
    step = jax.device_put(np.int32(0), NamedSharding(s.mesh, P()))
    guard = jax.device_put(init_guard(1), NamedSharding(s.mesh, P()))
    params, opt_state, step, guard, m = tr.step_fn(params, opt_state, step, guard,
                                                   T.to_global(batch, s.mesh, s.batch_spec))
    params, opt_state, step, guard, m2 = tr.step_fn(params, opt_state, step, guard,
                                                    T.to_global(_batch(1), s.mesh, s.batch_spec))
    assert int(guard["skipped"]) == 0
    return s, params, opt_state, (float(m["loss"]), float(m2["loss"]))


@pytest.fixture(scope="module")
def reference():
    devices = jax.devices()[:1]
    cfg, mcfg = C.resolve(_cfg((1, 1, 1)), device_count=1)
    s = T.build_setup(cfg, mcfg, devices)
    host = jax.tree.map(np.asarray, T.init_params(s))
    _, params, _, losses = _one_step((1, 1, 1), devices, host, _batch())
    return host, jax.tree.map(np.asarray, params), losses


# mesh (data, fsdp, tensor) -> expected per-device shard shapes of a few parameters
EXPECTED = {
    "dp": ((8, 1, 1), {("embed", "embedding"): (64, 32), ("head", "weight"): (32, 64),
                       ("blocks", 0, "mixer", "wq", "weight"): (32, 32),
                       ("blocks", 0, "ffn", "w2", "weight"): (64, 32)}),
    "fsdp": ((2, 4, 1), {("embed", "embedding"): (64, 8), ("head", "weight"): (8, 64),
                         ("blocks", 0, "mixer", "wq", "weight"): (8, 32),
                         ("blocks", 0, "ffn", "w2", "weight"): (64, 8)}),
    "tp": ((2, 1, 4), {("embed", "embedding"): (16, 32), ("head", "weight"): (32, 16),
                       ("blocks", 0, "mixer", "wq", "weight"): (32, 8),
                       ("blocks", 0, "ffn", "w2", "weight"): (16, 32)}),
    "fsdp_tp": ((2, 2, 2), {("embed", "embedding"): (32, 16), ("head", "weight"): (16, 32),
                            ("blocks", 0, "mixer", "wq", "weight"): (16, 16),
                            ("blocks", 0, "ffn", "w2", "weight"): (32, 16)}),
}


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


@pytest.mark.parametrize("strategy", list(EXPECTED))
def test_strategy_equals_single_device(strategy, reference):
    host, ref_params, ref_losses = reference
    mesh_shape, shards = EXPECTED[strategy]
    s, params, opt_state, losses = _one_step(mesh_shape, jax.devices(), host, _batch())
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_params)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        # atol: Adam divides each gradient element by its own RMS, so float summation-order
        # differences in near-zero gradient elements show up as differences of a small fraction
        # of one step (lr = 1e-2); 2e-5 is 0.2% of a step
        np.testing.assert_allclose(np.asarray(leaf), flat_ref[path], rtol=1e-4, atol=2e-5,
                                   err_msg=f"{strategy}: {jax.tree_util.keystr(path)}")
    for path, shape in shards.items():
        arr = _get(params, path)
        assert arr.addressable_shards[0].data.shape == shape, (strategy, path)
        assert {sh_.data.shape for sh_ in arr.addressable_shards} == {shape}
        # Adam moments are sharded like their parameters
        mu = _get(opt_state[-1][0].mu, path)
        assert mu.addressable_shards[0].data.shape == shape, (strategy, "mu", path)
    if strategy == "fsdp":
        # every parameter with an `embed` dimension is split 4 ways over fsdp (no accidental
        # replication): its shard holds a quarter of it
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            if leaf.ndim == 2:
                assert leaf.addressable_shards[0].data.size * 4 == leaf.size, jax.tree_util.keystr(path)


def test_batch_is_split_over_data_and_fsdp():
    mesh = sh.make_mesh((2, 2, 2))
    g = T.to_global(_batch(), mesh, sh.BATCH_AXES_SPEC)
    assert g["inputs"].addressable_shards[0].data.shape == (4, 16)
    np.testing.assert_array_equal(np.asarray(g["inputs"]), _batch()["inputs"])


# The logical-axis table as this test expects it, written out independently of train.sharding:
# a wrong entry there (say kv_heads on fsdp) changes some parameter's shard shape below.
EXPECTED_RULES = {"embed": "fsdp", "vocab": "tensor", "mlp": "tensor", "heads": "tensor",
                  "kv_heads": "tensor", "conv": "tensor", "inner": "tensor", "head_dim": None,
                  "state": None, "norm": None, "layers": None, "expert": "fsdp"}


def _expected_shard(names, shape, mesh_sizes):
    used, out = set(), []
    for name, size in zip(names, shape):
        axis = EXPECTED_RULES[name] if name is not None else None
        if axis is not None and axis not in used and size % mesh_sizes[axis] == 0:
            used.add(axis)
            out.append(size // mesh_sizes[axis])
        else:
            out.append(size)
    return tuple(out), used


def test_every_parameter_of_every_family_shards_by_the_table():
    """On the (2, 2, 2) mesh, every parameter of every registered model (its conformance config)
    has one logical name per dimension, every name is in the table, and its per-device shard
    shape is what the table gives; every mesh axis the table names shards some parameter."""
    from flax import nnx

    import zoo
    mesh = sh.make_mesh((2, 2, 2))
    sizes = dict(mesh.shape)
    axes_used, checked = set(), 0
    for name in zoo.names():
        cfg = zoo.get(name).conformance.config
        state = nnx.split(nnx.eval_shape(lambda: zoo.build(name, cfg, nnx.Rngs(0))))[1]
        shardings = sh.param_shardings(state, mesh)
        leaves = jax.tree_util.tree_flatten_with_path(
            state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
        for (path, var), sd in zip(leaves, jax.tree.leaves(shardings)):
            where = f"{name}{jax.tree_util.keystr(path)}"
            names = getattr(var, "out_sharding", None) or getattr(var, "sharding_names", None)
            shape = tuple(var.get_value().shape)
            assert names is not None and len(names) == len(shape), (where, names, shape)
            unknown = [n for n in names if n is not None and n not in EXPECTED_RULES]
            assert not unknown, (where, unknown)
            want, used = _expected_shard(names, shape, sizes)
            assert tuple(sd.shard_shape(shape)) == want, (where, names, shape, sd.spec)
            axes_used |= used
            checked += 1
    assert axes_used == {"fsdp", "tensor"} and checked > 500, (axes_used, checked)
