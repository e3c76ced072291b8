"""tagjax.checkpoint: round trips, keep policies, refusals, restores onto other meshes, transfer loads.

The train state here is hand-built (same pytree shape as tagjax.train.TrainState: step, params,
batch_stats, opt_state, rng) so these tests depend on the checkpoint module alone. The end-to-end runs
through the real trainer (kill and resume) are in tests/test_resume.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tagjax import checkpoint, models
from tagjax.configs import tiny
from tagjax.errors import UserError

REPO = Path(__file__).resolve().parent.parent


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    rng: jax.Array


def _config(**overrides):
    cfg = tiny.get_config()
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


def _state(num_classes=5, step=7, seed=0):
    """A small state with every kind of leaf the trainer has (incl. optax momentum and a typed key).

    Shapes come from ``jax.eval_shape`` and values from numpy, so building it compiles nothing.
    """
    model = models.create(_config().model, num_classes)
    shapes = jax.eval_shape(
        lambda r, x: model.init(r, x, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )
    counter = iter(range(1, 10_000))

    def fill(x):
        rng = np.random.default_rng(seed * 1000 + next(counter))
        return rng.standard_normal(x.shape).astype(x.dtype)

    variables = jax.tree.map(fill, shapes)
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    opt_state = jax.tree.map(fill, jax.eval_shape(tx.init, variables["params"]))
    state = State(
        step=np.asarray(step, np.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=opt_state,
        rng=jax.random.key(seed + 1),
    )
    return jax.device_put(state)


def _host(tree):
    return jax.tree.map(
        lambda x: np.asarray(jax.random.key_data(x) if checkpoint._is_prng_key(x) else x), tree
    )


def _assert_equal(a, b):
    ha, hb = _host(a), _host(b)
    assert jax.tree.structure(ha) == jax.tree.structure(hb)
    for x, y in zip(jax.tree.leaves(ha), jax.tree.leaves(hb)):
        np.testing.assert_array_equal(x, y)


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _manager(workdir, cfg=None, meta=None, **kw):
    return checkpoint.CheckpointManager(
        workdir, cfg or _config(), meta or {"vocab_fingerprint": "v1"}, **kw
    )


def test_round_trip_state_data_and_metadata(tmp_path):
    state = _state()
    with _manager(tmp_path, install_signal_handler=False) as mgr:
        assert mgr.restore_latest(_abstract(state)) == (None, None)  # fresh workdir
        assert mgr.save(7, state, {"next_index": 224, "seed": 0})
        assert not mgr.save(7, state, {"next_index": 224, "seed": 0})  # already saved: no-op
    with _manager(tmp_path, install_signal_handler=False) as mgr:
        restored, data_state = mgr.restore_latest(_abstract(state))
        meta = mgr.metadata(7)
    _assert_equal(restored, state)
    assert isinstance(restored, State)
    assert data_state == {"next_index": 224, "seed": 0}
    assert meta["step"] == 7 and meta["images_seen"] == 7 * 32
    assert meta["num_classes"] == 5 and meta["vocab_fingerprint"] == "v1"
    assert meta["config"]["model"]["name"] == "tiny_resnext"
    assert meta["tagjax_version"] and meta["device_count"] == jax.device_count()


def test_grain_iterator_resumes_the_same_batches(tmp_path):
    import grain

    def make():
        return iter(grain.MapDataset.range(1000).shuffle(seed=3).batch(4).to_iter_dataset())

    it = make()
    for _ in range(5):
        next(it)
    state = _state()
    with _manager(tmp_path, install_signal_handler=False) as mgr:
        mgr.save(5, state, it)
    expected = [next(it).tolist() for _ in range(3)]
    fresh = make()
    with _manager(tmp_path, install_signal_handler=False) as mgr:
        mgr.restore_latest(_abstract(state), data_iterator=fresh)
    assert [next(fresh).tolist() for _ in range(3)] == expected


def test_async_save_is_not_affected_by_donating_the_state(tmp_path):
    """The loop donates the state to the next step right after save() returns."""
    state = _state()
    expected = _host(state)
    bump = jax.jit(
        lambda s: jax.tree.map(lambda x: x * 2 if jnp.issubdtype(x.dtype, jnp.floating) else x, s),
        donate_argnums=0,
    )
    with _manager(tmp_path, install_signal_handler=False) as mgr:
        mgr.save(7, state, None)
        abstract = _abstract(state)
        state = bump(bump(state))  # overwrite the buffers while writing
        mgr.wait_until_finished()
        restored, data_state = mgr.restore_latest(jax.tree.map(lambda x: x, abstract))
    assert data_state is None
    _assert_equal(restored, jax.tree.map(jnp.asarray, expected))


def test_should_save_follows_images_seen(tmp_path):
    mgr = _manager(
        tmp_path,
        _config(**{"train.checkpoint_every_images": 100}),
        install_signal_handler=False,
    )
    try:
        # batch 32: images 128, 224, 320, 416 cross 100, 200, 300, 400
        assert [s for s in range(1, 14) if mgr.should_save(s)] == [4, 7, 10, 13]
    finally:
        mgr.close()


def test_keep_last_and_keep_every_images(tmp_path):
    cfg = _config(**{"checkpoint.keep_last": 2, "checkpoint.keep_every_images": 32 * 4})
    state = _state()
    with _manager(tmp_path, cfg, install_signal_handler=False) as mgr:
        for step in range(1, 11):
            mgr.save(step, state.replace(step=jnp.asarray(step, jnp.int32)), None)
            mgr.wait_until_finished()
        # last 2 (9, 10) + the first checkpoint of each 128-image bucket (1, 4, 8)
        assert mgr.all_steps() == [1, 4, 8, 9, 10]
    assert sorted(
        int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()
    ) == [1, 4, 8, 9, 10]


def test_sigterm_requests_a_save_at_the_next_step_boundary(tmp_path):
    state = _state()
    before = signal.getsignal(signal.SIGTERM)
    mgr = _manager(tmp_path, _config(**{"train.checkpoint_every_images": 0}))
    try:
        ours = signal.getsignal(signal.SIGTERM)
        assert callable(ours) and ours is not before  # else the kill below would end pytest
        assert not mgr.should_save(3)
        os.kill(os.getpid(), signal.SIGTERM)
        assert mgr.should_save(3) and not mgr.preempted
        mgr.save(3, state, None)
        assert mgr.preempted  # the trainer stops after this save
    finally:
        mgr.close()
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back after close
    assert checkpoint.read_metadata(tmp_path)["step"] == 3


def test_interrupted_save_directory_is_never_restored(tmp_path):
    state = _state()
    with _manager(tmp_path, install_signal_handler=False) as mgr:
        mgr.save(4, state, None)
    # What a SIGKILL during the write of step 8 leaves behind.
    partial = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp"
    (partial / "state").mkdir(parents=True)
    assert checkpoint.resolve(tmp_path).name == "4"
    with _manager(tmp_path, install_signal_handler=False) as mgr:
        assert mgr.latest_step() == 4
        restored, _ = mgr.restore_latest(_abstract(state))
    _assert_equal(restored, state)
    assert not partial.exists()  # cleaned up on start


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model.name": "tiny_resnet"}, "model.name='tiny_resnext'"),
        ({"train.batch_size": 64}, "train.batch_size=32"),
        ({"loss": "sigmoid"}, "loss='softmax'"),
    ],
)
def test_incompatible_config_is_refused_naming_the_field(tmp_path, change, message):
    state = _state()
    with _manager(tmp_path, install_signal_handler=False) as mgr:
        mgr.save(7, state, None)
    with (
        _manager(tmp_path, _config(**change), install_signal_handler=False) as mgr,
        pytest.raises(UserError, match=message),
    ):
        mgr.restore_latest(_abstract(state))


def test_other_vocabulary_or_head_size_is_refused(tmp_path):
    state = _state(num_classes=5)
    with _manager(tmp_path, install_signal_handler=False) as mgr:
        mgr.save(7, state, None)
    with (
        _manager(tmp_path, meta={"vocab_fingerprint": "v2"}, install_signal_handler=False) as mgr,
        pytest.raises(UserError, match=r"vocabulary v1 .* is v2"),
    ):
        mgr.restore_latest(_abstract(state))
    other = _state(num_classes=9)
    with (
        _manager(tmp_path, install_signal_handler=False) as mgr,
        pytest.raises(
            UserError, match=r"params/fc/bias has shape \(5,\) in the checkpoint but \(9,\) now"
        ),
    ):
        mgr.restore_latest(_abstract(other))
    no_momentum = other.replace(params=state.params, opt_state=optax.sgd(0.1).init(state.params))
    with (
        _manager(tmp_path, install_signal_handler=False) as mgr,
        pytest.raises(UserError, match="does not match this config's train state"),
    ):
        mgr.restore_latest(_abstract(no_momentum))


def test_backbone_restore_into_a_model_with_a_new_head(tmp_path):
    state = _state(num_classes=5)
    with _manager(tmp_path, install_signal_handler=False) as mgr:
        mgr.save(7, state, None)

    # Notebook use: two lines.
    variables, meta = checkpoint.load_for_inference(tmp_path)
    backbone, _ = checkpoint.load_backbone(tmp_path)
    assert (
        meta["num_classes"] == 5 and "fc" in variables["params"] and "fc" not in backbone["params"]
    )
    _assert_equal(variables["params"], state.params)
    _assert_equal(backbone["batch_stats"], state.batch_stats)

    new_model = models.create(_config().model, 11)
    new_vars = new_model.init(jax.random.key(42), jnp.zeros((1, 32, 32, 3)), train=False)
    merged, meta = checkpoint.restore_backbone(tmp_path, new_vars)
    _assert_equal(merged["params"]["fc"], new_vars["params"]["fc"])  # the new head, untouched
    _assert_equal(
        {k: v for k, v in merged["params"].items() if k != "fc"},
        {k: v for k, v in state.params.items() if k != "fc"},
    )
    _assert_equal(merged["batch_stats"], state.batch_stats)
    # The new model runs on the merged variables (flax accepts the tree as its own).
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    logits = jax.jit(new_model.apply)(merged, images)
    assert logits.shape == (2, 11) and bool(jnp.isfinite(logits).all())

    other_arch = models.create(_config(**{"model.name": "tiny_resnet"}).model, 11)
    wrong = other_arch.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    with pytest.raises(UserError, match="does not match"):
        checkpoint.restore_backbone(tmp_path, wrong)


def test_inference_checkpoint_reads_like_a_trained_one(tmp_path):
    state = _state(num_classes=5)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    cfg = _config()
    out = checkpoint.save_inference_checkpoint(
        tmp_path / "imported",
        jax.device_get(variables),
        {
            "config": {"model": cfg.model.to_dict()},
            "vocab_fingerprint": "in1k-fp",
            "source": "test",
        },
    )
    loaded, meta = checkpoint.load_for_inference(out)
    _assert_equal(loaded, variables)
    assert meta["kind"] == "inference" and meta["num_classes"] == 5 and meta["source"] == "test"
    assert (
        meta["config"]["model"]["name"] == "tiny_resnext" and meta["vocab_fingerprint"] == "in1k-fp"
    )
    backbone, _ = checkpoint.load_backbone(out)
    assert set(backbone["params"]) == set(variables["params"]) - {"fc"}
    with pytest.raises(UserError, match="already exists"):
        checkpoint.save_inference_checkpoint(
            out, variables, {"config": {"model": cfg.model.to_dict()}}
        )
    with pytest.raises(ValueError, match=r"model\.name"):
        checkpoint.save_inference_checkpoint(tmp_path / "x", variables, {})


def test_bad_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load_for_inference(tmp_path / "nope")
    with pytest.raises(UserError, match="no complete checkpoint"):
        checkpoint.load_backbone(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="is a file, not a checkpoint directory"):
        checkpoint.load_for_inference(tmp_path / "config.json")


def _truncate_arrays(step_dir):
    for f in (step_dir / "state" / "d").iterdir():
        os.truncate(f, 100)


def _remove_arrays(step_dir):
    shutil.rmtree(step_dir / "state" / "d")
    (step_dir / "state" / "manifest.ocdbt").unlink()


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (_truncate_arrays, "it does not restore (ValueError: "),
        (_remove_arrays, "state/manifest.ocdbt is missing"),
        (lambda step_dir: (step_dir / "_CHECKPOINT_METADATA").unlink(), "_CHECKPOINT_METADATA"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_for_every_reader(tmp_path, capsys, damage, what):
    """predict/embed/evaluate/transfer/export read checkpoints through load_for_inference,
    load_backbone, restore_backbone and read_metadata: each names the damage and the previous intact
    checkpoint in one line (the trainer's file check; nothing is moved) instead of a traceback."""
    from tagjax import cli

    with _manager(tmp_path, install_signal_handler=False) as mgr:
        mgr.save(4, _state(), None)
        mgr.save(8, _state(), None)
    damage(tmp_path / "checkpoints" / "8")
    message = f"checkpoint {tmp_path / 'checkpoints' / '8'} is damaged: "
    instead = f"pass --checkpoint {tmp_path / 'checkpoints' / '4'} to use the previous one."
    new_vars = models.create(_config().model, 3).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
    )
    readers = [
        checkpoint.load_for_inference,
        checkpoint.load_backbone,
        lambda path: checkpoint.restore_backbone(path, new_vars),
    ]
    if damage is not _truncate_arrays:  # the metadata alone still reads when only arrays are cut
        readers.append(checkpoint.read_metadata)
    for read in readers:
        with pytest.raises(UserError) as e:
            read(tmp_path)
        assert str(e.value).startswith(message) and what in str(e.value), e.value
        assert str(e.value).endswith(instead) and "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "8"]
    assert checkpoint.load_for_inference(tmp_path / "checkpoints" / "4")[1]["step"] == 4

    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(image)
    for argv in (
        ["predict", str(image)],
        ["embed", "--input", str(tmp_path), "-o", str(tmp_path / "emb")],
        ["evaluate", "--dataset", "synthetic"],
    ):
        assert cli.main([*argv, "--checkpoint", str(tmp_path)]) == 3
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"tagjax {argv[0]}: error: {message}") and what in err, err
        assert len(err.splitlines()) == 1 and err.endswith(instead), err


# ---------------------------------------------------------------------------------------------------
# 8 -> 4 -> 1 devices, each in its own process (the device count is fixed when JAX starts).
# ---------------------------------------------------------------------------------------------------


def fsdp_sharding(mesh, x):
    """FSDP-style: shard the first axis divisible by the mesh's fsdp size; replicate the rest."""
    fsdp = mesh.shape["fsdp"]
    for axis, n in enumerate(x.shape):
        if fsdp > 1 and n % fsdp == 0:
            spec = [None] * len(x.shape)
            spec[axis] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


_RESTORE_WORKER = textwrap.dedent(
    """
    import sys, json
    import jax
    sys.path.insert(0, {tests!r})
    from absl import flags; flags.FLAGS.mark_as_parsed()
    import test_checkpoint as t
    from tagjax import checkpoint
    workdir, data, fsdp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    assert jax.device_count() == data * fsdp, jax.device_count()
    mesh = jax.make_mesh((data, fsdp), ("data", "fsdp"))
    reference = t._state()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=t.fsdp_sharding(mesh, x)), reference)
    mgr = checkpoint.CheckpointManager(workdir, t._config(), {{"vocab_fingerprint": "v1"}},
                                       install_signal_handler=False)
    state, data_state = mgr.restore_latest(abstract)
    assert data_state == {{"pos": 1}}
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
        assert leaf.sharding == want.sharding, (leaf.sharding, want.sharding)
        assert len(leaf.sharding.device_set) == data * fsdp
    t._assert_equal(state, reference)
    mgr.close()
    print("restored on", jax.device_count())
    """
)


def test_saved_on_8_devices_restores_on_4_and_1(tmp_path):
    """Saved FSDP-sharded on a 4x2 mesh here; restored in fresh processes on 2x2 and on 1 device."""
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    state = jax.tree.map(lambda x: jax.device_put(x, fsdp_sharding(mesh, x)), _state())
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
    with _manager(tmp_path / "w", install_signal_handler=False) as mgr:
        mgr.save(7, state, {"pos": 1})
    meta = checkpoint.read_metadata(tmp_path / "w")
    assert meta["mesh_shape"] == {"data": 4, "fsdp": 2} and meta["device_count"] == 8

    script = tmp_path / "restore_worker.py"
    script.write_text(_RESTORE_WORKER.format(tests=str(REPO / "tests")))
    for data, fsdp in ((2, 2), (1, 1)):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={data * fsdp}")
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "w"), str(data), str(fsdp)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert f"restored on {data * fsdp}" in proc.stdout


def test_restore_on_the_simulated_8_device_mesh_in_process(tmp_path):
    """The same reshard in-process: saved replicated, restored FSDP-sharded on the 8-device mesh."""
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    state = _state()
    with _manager(tmp_path, install_signal_handler=False) as mgr:
        mgr.save(7, state, None)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape,
            x.dtype,
            sharding=NamedSharding(mesh, P("fsdp") if x.ndim and x.shape[0] % 2 == 0 else P()),
        ),
        state,
    )
    with _manager(tmp_path, install_signal_handler=False) as mgr:
        restored, _ = mgr.restore_latest(abstract)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(restored))
    _assert_equal(restored, state)
