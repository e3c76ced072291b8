"""tagjax.optim: the schedule's numbers come from the config; SGD matches PyTorch's update rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagjax import optim
from tagjax.configs import default, tiny
from tagjax.errors import UserError


def _optim(**overrides):
    c = default.get_config().optim
    c.update(overrides)
    return c


def test_paper_defaults_linear_scaling():
    c = default.get_config()
    assert optim.peak_learning_rate(c.optim, 8064) == pytest.approx(0.1 * 8064 / 256)  # 3.15
    assert optim.peak_learning_rate(c.optim, 256) == pytest.approx(0.1)


@pytest.mark.parametrize("batch", [32, 8064])
def test_step_halving_values_at_warmup_end_and_after_each_halving(batch):
    c = _optim(
        warmup_images=100_000,
        num_halvings=3,
        base_lr=0.1,
        lr_reference_batch=256,
        warmup_start_lr=0.0,
    )
    total = 1_000_000
    s = optim.make_schedule(c, batch, total)
    peak = 0.1 * batch / 256
    warm_steps = -(-100_000 // batch)
    assert s.warmup_steps == warm_steps
    # Halvings at 100k + i * 900k / 4 images: 325k, 550k, 775k.
    expected_steps = [-(-(100_000 + i * 225_000) // batch) for i in (1, 2, 3)]
    assert list(s.halving_steps) == expected_steps
    np.testing.assert_allclose(s.values_at([warm_steps]), [peak], rtol=1e-6)
    np.testing.assert_allclose(
        s.values_at([warm_steps - 1]), [peak * (warm_steps - 1) / warm_steps], rtol=1e-5
    )
    for i, hs in enumerate(expected_steps, start=1):
        np.testing.assert_allclose(
            s.values_at([hs - 1, hs]), [peak / 2 ** (i - 1), peak / 2**i], rtol=1e-6
        )
    np.testing.assert_allclose(s.values_at([total // batch]), [peak / 8], rtol=1e-6)


def test_warmup_is_linear_from_the_configured_start():
    peak = 0.1 * 100 / 256
    c = _optim(warmup_images=1000, num_halvings=0, warmup_start_lr=0.25 * peak)
    s = optim.make_schedule(c, 100, 10_000)
    np.testing.assert_allclose(
        s.values_at(range(11)), peak * (0.25 + 0.75 * np.arange(11) / 10).clip(max=1), rtol=1e-6
    )


def test_cosine_reaches_half_and_zero():
    c = _optim(schedule="cosine", warmup_images=1000, num_halvings=0)
    s = optim.make_schedule(c, 100, 11_000)  # 10 warm-up steps, then 100 cosine steps
    peak = 0.1 * 100 / 256
    np.testing.assert_allclose(s.values_at([10, 60, 110]), [peak, peak / 2, 0.0], atol=1e-7)


def test_schedule_is_exact_at_billions_of_images():
    """IG-3.5B: 434k steps of 8,064; the last halving still lands on its step (no float32 drift)."""
    c = _optim(warmup_images=5 * 1_281_167, num_halvings=6)
    s = optim.make_schedule(c, 8064, 3_500_000_000)
    last = s.halving_steps[-1]
    np.testing.assert_allclose(s.values_at([last - 1, last]), [s.peak / 32, s.peak / 64], rtol=1e-6)


def test_tiny_config_schedule_numbers():
    cfg = tiny.get_config()
    s = optim.make_schedule(cfg.optim, cfg.train.batch_size, cfg.train.total_images)
    assert s.warmup_steps == 20 and s.total_steps == 300
    assert s.halving_steps == (114, 207)  # (640 + i * 8960 / 3) / 32 images, rounded up
    np.testing.assert_allclose(s.values_at([20, 114, 207]), [0.1, 0.05, 0.025], rtol=1e-6)


def test_bad_schedule_settings_are_user_errors():
    with pytest.raises(UserError, match="warmup_images"):
        optim.make_schedule(_optim(warmup_images=10), 1, 5)
    with pytest.raises(UserError, match="schedule"):
        optim.make_schedule(_optim(schedule="linear"), 1, 5)


def test_weight_decay_skips_batch_norm_and_biases():
    params = {
        "conv1": {"kernel": jnp.ones((3, 3, 2, 4))},
        "bn1": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))},
        "fc": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones((5,))},
    }
    tx = optim.make_gradient_transform(_optim(weight_decay=0.5, momentum=0.0))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(jnp.max(updates["conv1"]["kernel"])) == 0.5
    assert float(jnp.max(updates["fc"]["kernel"])) == 0.5
    for leaf in (updates["bn1"]["scale"], updates["bn1"]["bias"], updates["fc"]["bias"]):
        assert float(jnp.max(jnp.abs(leaf))) == 0.0


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_pytorch_update_rule(nesterov):
    """v = m v + (g + wd p); p -= lr v (Nesterov: p -= lr (g + wd p + m v)), written out by hand."""
    m, wd, lr = 0.9, 1e-2, 0.3
    tx = optim.make_gradient_transform(_optim(momentum=m, weight_decay=wd, nesterov=nesterov))
    p = {"w": jnp.asarray([[1.0, -2.0], [0.5, 3.0]])}
    state = tx.init(p)
    p_ref, v = np.asarray(p["w"], np.float64), np.zeros((2, 2))
    rng = np.random.default_rng(0)
    for _ in range(3):
        g = rng.normal(size=(2, 2)).astype(np.float32)
        updates, state = tx.update({"w": jnp.asarray(g)}, state, p)
        p = optim.apply_updates(p, updates, lr)
        d = g + wd * p_ref
        v = m * v + d
        p_ref = p_ref - lr * ((d + m * v) if nesterov else v)
    np.testing.assert_allclose(np.asarray(p["w"]), p_ref, rtol=1e-5)


def test_make_optimizer_uses_the_schedule():
    c = _optim(warmup_images=200, num_halvings=1, momentum=0.0, weight_decay=0.0)
    tx, schedule = optim.make_optimizer(c, 100, 1000)
    p = {"w": jnp.zeros((2, 2))}
    state = tx.init(p)
    steps = []
    for _ in range(6):
        updates, state = tx.update({"w": jnp.ones((2, 2))}, state, p)
        steps.append(-float(updates["w"][0, 0]))
    np.testing.assert_allclose(steps, schedule.values_at(range(6)), rtol=1e-6)
