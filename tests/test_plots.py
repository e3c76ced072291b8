"""The demo's figures read at a glance: images seen on every x axis, never-drawn hashtags counted rather
than pinned to a fake value, chance levels on the probe and AP plots."""

import numpy as np
import pytest

from tagjax import plots


@pytest.fixture
def figures(monkeypatch, tmp_path):
    """The figures the plot functions draw, kept instead of only written (they are written too)."""
    drawn = []
    save = plots._save

    def keep(fig, path):
        drawn.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return drawn


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_loss_x_axis_is_images_seen(figures, tmp_path):
    records = [
        {"split": "train", "step": s, "images_seen": 32 * s, "loss": 5.0 - s / 10}
        for s in (1, 2, 3)
    ]
    records.append({"split": "eval", "step": 3, "images_seen": 96, "loss": 4.9})
    plots.loss_curves({"pretraining": [("seed 0", records)]}, tmp_path / "loss.png")
    (ax,) = figures[0].axes
    assert ax.get_xlabel() == "images seen"
    assert ax.lines[0].get_xdata().tolist() == [32, 64, 96]


def test_never_drawn_hashtags_are_counted_not_pinned(figures, tmp_path):
    before = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
    after = np.array([0.3, 0.3, 0.2, 0.0, 0.0])
    path = plots.tag_frequency(before, after, list("abcde"), tmp_path / "freq.png")
    assert path.is_file()
    (ax,) = figures[0].axes
    ys = np.concatenate([np.asarray(line.get_ydata(), float) for line in ax.lines[:2]])
    assert not np.isclose(ys, 1e-6).any()
    assert ax.lines[1].get_xdata().tolist() == [1, 2, 3]  # the drawn ones, at their share
    assert any("never drawn in the stream (2 hashtags" in t for t in _legend(ax))


def test_chance_levels_on_probe_and_ap(figures, tmp_path):
    rows = [
        {"key": "pretrained", "label": "pre", "top1": [0.5]},
        {"key": "random", "label": "rnd", "top1": [0.2]},
    ]
    plots.probe_comparison(rows, tmp_path / "probe.png", num_classes=20)
    (ax,) = figures[0].axes
    assert any(t.startswith("chance (1/20 = 5.0%)") for t in _legend(ax))
    assert any(np.allclose(line.get_ydata(), 5.0) for line in ax.lines)

    ap = np.array([0.9, 0.4, np.nan, 0.2])
    chance = np.array([0.5, 0.1, 0.0, 0.1])
    plots.per_label_ap(
        ap, np.array([40, 20, 10, 5]), list("abcd"), tmp_path / "ap.png", chance=chance
    )
    left, right = figures[1].axes
    assert any(t == "chance (random ranking) 23.3" for t in _legend(left))
    assert "chance (random ranking)" in _legend(right)
