"""tagjax.models: sizes match the published models, the two grouped-conv modes agree, BN semantics hold."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tagjax import models
from tagjax.configs import default
from tagjax.errors import UserError

# torchvision / timm parameter counts with the 1000-way head (the paper's table rounds them).
PARAM_COUNTS = {
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x4d": 44_177_704,
    "resnext101_32x8d": 88_791_336,
    "resnext101_32x16d": 194_026_792,
    "resnext101_32x32d": 468_530_472,
    "resnext101_32x48d": 828_411_176,
}


def model_config(**overrides):
    cfg = default.get_config().model
    cfg.update(dict(name="tiny_resnext", dtype="float32", bn_group_size=0))
    cfg.update(overrides)
    return cfg


def init(model, seed=0):
    """``model.init`` in one canonical form (initialization does not depend on dtype, conv mode, remat
    or BN grouping), so its compilation (slow on XLA:CPU: the random initializers) is shared through the
    persistent compilation cache."""
    canonical = model.clone(dtype=jnp.float32, grouped_conv="xla", remat=False, bn_group_size=0)
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    return jax.jit(lambda r: canonical.init(r, x, train=False))(jax.random.key(seed))


def random_variables(model, seed=0):
    """Random variables of the right shapes without compiling an initializer: He-scaled kernels and
    batch-norm scales, biases and running statistics away from their defaults (so every layer matters)."""
    shapes = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 32, 32, 3))), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            return rng.standard_normal(s.shape).astype(np.float32) * np.sqrt(
                2.0 / np.prod(s.shape[:-1])
            )
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        return rng.uniform(-0.2, 0.2, s.shape).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(fill, shapes)


def apply(model, variables, x, train=False, **kw):
    """Jitted apply (eager Flax dispatches op by op, which is slow on a busy CPU)."""
    if train:
        return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"], **kw))(
            variables, x
        )
    return jax.jit(lambda v, x: model.apply(v, x, train=False, **kw))(variables, x)


def images(batch=8, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_parameter_counts_match_published_models(name):
    model = models.create(model_config(name=name, dtype="bfloat16"), 1000)
    shapes = jax.eval_shape(
        lambda rng: model.init(rng, jnp.zeros((1, 224, 224, 3)), train=False), jax.random.key(0)
    )
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    assert count == PARAM_COUNTS[name]
    # Parameters stay float32 whatever the compute dtype.
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


def test_parameter_tree_uses_torchvision_names():
    model = models.create(model_config(name="resnet50"), 1000)
    shapes = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 64, 64, 3))), jax.random.key(0))
    params, stats = shapes["params"], shapes["batch_stats"]
    expected_blocks = [f"layer{s + 1}_{b}" for s, n in enumerate((3, 4, 6, 3)) for b in range(n)]
    assert set(params) == {"conv1", "bn1", "fc", *expected_blocks}
    assert set(params["layer1_0"]) == {
        "conv1",
        "bn1",
        "conv2",
        "bn2",
        "conv3",
        "bn3",
        "downsample_conv",
        "downsample_bn",
    }
    assert "downsample_conv" not in params["layer1_1"]
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)  # HWIO
    assert set(params["bn1"]) == {"scale", "bias"} and set(stats["bn1"]) == {"mean", "var"}
    assert params["fc"]["kernel"].shape == (2048, 1000)


@pytest.mark.parametrize("mode", models.GROUPED_CONV_MODES)
def test_grouped_kernels_are_stored_grouped_in_both_modes(mode):
    model = models.create(model_config(name="resnext101_32x8d", grouped_conv=mode), 1000)
    shapes = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 64, 64, 3))), jax.random.key(0))
    assert shapes["params"]["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 8, 256)
    assert shapes["params"]["layer4_2"]["conv2"]["kernel"].shape == (3, 3, 64, 2048)


def test_flops_match_published_macs():
    # torchvision's model cards: ResNet-50 4.09 GMACs, ResNeXt-101 32x8d 16.41 GMACs at 224px.
    assert models.flops_per_image(model_config(name="resnet50"), 224) / 2e9 == pytest.approx(
        4.089, abs=2e-3
    )
    assert models.flops_per_image(
        model_config(name="resnext101_32x8d"), 224
    ) / 2e9 == pytest.approx(16.41, abs=1e-2)
    # The head adds 2 * 2048 * classes; the grouped-conv mode changes nothing.
    trunk = models.flops_per_image(model_config(name="resnet50"), 224)
    assert (
        models.flops_per_image(model_config(name="resnet50"), 224, num_classes=17_000)
        == trunk + 2 * 2048 * 17_000
    )
    assert (
        models.flops_per_image(model_config(name="resnet50", grouped_conv="block_diagonal"), 224)
        == trunk
    )
    # Non-square sizes and the conv-arithmetic of odd sizes.
    assert models.flops_per_image(model_config(name="resnet50"), (224, 224)) == trunk
    assert models.flops_per_image(model_config(name="resnet50"), 225) > trunk


def test_tiny_forward_shapes_dtypes_and_features():
    cfg = model_config(dtype="bfloat16")
    model = models.create(cfg, 5)
    x = images(4)
    variables = init(model, 0)
    assert set(variables) == {"params", "batch_stats"}
    logits = apply(model, variables, x)
    assert logits.shape == (4, 5) and logits.dtype == jnp.float32
    feats = apply(model, variables, x, method=model.features)
    spec = models.ARCHS["tiny_resnext"]
    assert feats.shape == (4, spec.feature_dim) and feats.dtype == jnp.float32
    logits_train, updates = apply(model, variables, x, train=True)
    assert logits_train.shape == (4, 5)
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"]
    )
    # The head applied to the features gives the logits.
    fc = variables["params"]["fc"]
    np.testing.assert_allclose(feats @ fc["kernel"] + fc["bias"], logits, rtol=1e-5, atol=1e-5)


def test_zero_init_last_bn_gamma():
    model = models.create(model_config(zero_init_last_bn=True), 5)
    variables = init(model, 0)
    params = variables["params"]
    blocks = [k for k in params if k.startswith("layer")]
    assert len(blocks) == 2
    for k in blocks:
        np.testing.assert_array_equal(params[k]["bn3"]["scale"], 0.0)
        np.testing.assert_array_equal(params[k]["bn2"]["scale"], 1.0)
        np.testing.assert_array_equal(params[k]["downsample_bn"]["scale"], 1.0)


def _loss_and_grads(model, variables, x):
    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


def test_grouped_and_block_diagonal_convs_agree():
    x = images(4)
    # No zero-init so every conv influences the output and receives a gradient.
    xla = models.create(model_config(zero_init_last_bn=False), 5)
    block = models.create(model_config(zero_init_last_bn=False, grouped_conv="block_diagonal"), 5)
    variables = random_variables(xla, 1)
    # The same variables drive both modes: the stored kernels are identical.
    block_shapes = jax.eval_shape(lambda r: block.init(r, x), jax.random.key(1))
    assert jax.tree.map(jnp.shape, block_shapes) == jax.tree.map(jnp.shape, variables)
    np.testing.assert_allclose(
        apply(xla, variables, x), apply(block, variables, x), rtol=1e-5, atol=1e-5
    )
    (l1, g1), (l2, g2) = _loss_and_grads(xla, variables, x), _loss_and_grads(block, variables, x)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The grouped kernel's gradient keeps the grouped shape (no leak into the off-diagonal zeros).
    assert (
        g2["layer1_0"]["conv2"]["kernel"].shape
        == variables["params"]["layer1_0"]["conv2"]["kernel"].shape
    )


def test_remat_changes_nothing_numerically():
    x = images(4)
    plain = models.create(model_config(zero_init_last_bn=False), 5)
    remat = models.create(model_config(zero_init_last_bn=False, remat=True), 5)
    variables = random_variables(plain, 2)
    (l1, g1), (l2, g2) = _loss_and_grads(plain, variables, x), _loss_and_grads(remat, variables, x)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bn_group_equal_to_batch_is_global_bn():
    x = images(8)
    glob = models.create(model_config(bn_group_size=0, zero_init_last_bn=False), 5)
    grouped = models.create(model_config(bn_group_size=8, zero_init_last_bn=False), 5)
    variables = random_variables(glob, 3)
    out_g, upd_g = apply(glob, variables, x, train=True)
    out_n, upd_n = apply(grouped, variables, x, train=True)
    np.testing.assert_allclose(out_g, out_n, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(upd_g), jax.tree.leaves(upd_n)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bn_groups_are_independent_and_running_stats_average_them():
    """Grouped BN on [A; B] == global BN on A and on B separately; running stats are their average."""
    x = images(8)
    glob = models.create(model_config(bn_group_size=0, zero_init_last_bn=False), 5)
    grouped = models.create(model_config(bn_group_size=4, zero_init_last_bn=False), 5)
    variables = random_variables(glob, 4)
    out, upd = apply(grouped, variables, x, train=True)
    out_a, upd_a = apply(glob, variables, x[:4], train=True)
    out_b, upd_b = apply(glob, variables, x[4:], train=True)
    np.testing.assert_allclose(out, jnp.concatenate([out_a, out_b]), rtol=1e-5, atol=1e-5)
    # Running stats after one step: m * old + (1 - m) * mean_over_groups(stat), which is linear in the stat.
    expected = jax.tree.map(lambda a, b: (a + b) / 2, upd_a, upd_b)
    for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Deeper layers see different inputs in the two runs only through the groups: the first BN proves the
    # statistics really moved with momentum 0.9.
    old = variables["batch_stats"]["bn1"]["mean"]
    assert not np.allclose(upd["batch_stats"]["bn1"]["mean"], old)


def test_eval_mode_uses_running_statistics():
    x = images(4)
    model = models.create(model_config(zero_init_last_bn=False), 5)
    variables = random_variables(model, 5)
    # Eval output does not depend on the other images of the batch.
    full = apply(model, variables, x)
    single = apply(model, variables, x[:1])
    np.testing.assert_allclose(full[:1], single, rtol=1e-5, atol=1e-5)


def test_user_errors():
    with pytest.raises(UserError, match="unknown model"):
        models.create(model_config(name="resnet18"), 5)
    with pytest.raises(UserError, match="grouped_conv"):
        models.create(model_config(grouped_conv="cudnn"), 5)
    with pytest.raises(UserError, match="dtype"):
        models.create(model_config(dtype="int8"), 5)
    model = models.create(model_config(bn_group_size=3), 5)
    variables = jax.eval_shape(lambda r: model.init(r, images(4)), jax.random.key(0))
    with pytest.raises(UserError, match="bn_group_size"):
        jax.eval_shape(
            lambda v: model.apply(v, images(4), train=True, mutable=["batch_stats"]), variables
        )


def test_create_accepts_plain_mappings_and_the_default_config():
    cfg = default.get_config().model
    assert isinstance(cfg, ml_collections.ConfigDict)
    model = models.create(cfg, 1000)
    assert model.spec == models.ARCHS["resnext101_32x8d"]
    assert model.dtype == jnp.bfloat16 and model.bn_group_size == 24 and model.bn_momentum == 0.9
    assert models.create({"name": "tiny_resnet"}, 2).spec == models.ARCHS["tiny_resnet"]
