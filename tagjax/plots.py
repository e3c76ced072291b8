"""The demo's and the study's figures (PNG, matplotlib): loss curves, hashtag frequency before and after
resampling, per-hashtag average precision, the downstream comparison, and one figure per study finding.

Each function takes plain numbers (what ``summary.json`` and ``metrics.jsonl`` hold), writes one PNG and
returns its path, so a notebook can redraw any figure from a finished run. Figures are built on
``matplotlib.figure.Figure`` directly rather than through ``pyplot``: no global state, no GUI backend, safe
in worker threads and on headless machines.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

DPI = 110
# One color per trunk in the comparison, the same in every figure.
TRUNK_COLORS = {
    "pretrained": "#1f77b4",
    "shuffled": "#9ecae1",  # the hashtag trunk's colour, paler: same training, labels shuffled
    "random_bn": "#bdbdbd",
    "random": "#7f7f7f",
    "downstream": "#ff7f0e",
}


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, (np.atleast_1d(axes).tolist())


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)  # a figure is never left half-written under its final name
    return path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` log (tagjax.metrics_writer), [] when the file is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(records: Sequence[Mapping], split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(images seen, value) of ``key`` in the ``split`` rows: every figure's x axis is images seen."""
    rows = [
        (r["images_seen"], r[key])
        for r in records
        if r.get("split") == split and r.get(key) is not None and math.isfinite(r[key])
    ]
    if not rows:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*rows)
    return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def loss_curves(
    panels: Mapping[str, Sequence[tuple[str, Sequence[Mapping]]]], path: str | Path
) -> Path:
    """One panel per training (title -> [(run label, metrics.jsonl records)]): training loss per logged
    window as lines, held-out loss (where the run evaluated) as markers of the same color."""
    fig, axes = _figure(5.2 * len(panels), 3.8, len(panels))
    for ax, (title, runs) in zip(axes, panels.items()):
        for i, (label, records) in enumerate(runs):
            color = f"C{i}"
            steps, loss = _series(records, "train", "loss")
            ax.plot(steps, loss, color=color, label=f"{label} train")
            steps, loss = _series(records, "eval", "loss")
            if len(steps):
                ax.plot(steps, loss, "o--", color=color, alpha=0.7, label=f"{label} held-out")
        ax.set_title(title)
        ax.set_xlabel("images seen")
        ax.set_ylabel("cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def tag_frequency(
    before: np.ndarray,
    after: np.ndarray,
    names: Sequence[str],
    path: str | Path,
    *,
    sampling: str = "sqrt",
    drawn: np.ndarray | None = None,
    label_top: int = 8,
) -> Path:
    """Share of training samples carrying each hashtag, hashtags ranked by their natural frequency:
    ``before`` with every image drawn equally (the corpus as it is), ``after`` as the trainer's resampled
    stream drew them, and ``drawn`` (optional) the probability of each hashtag being the one the sampler
    draws. Resampling flattens the Zipfian head so the tail is seen far more often."""
    before = np.asarray(before, np.float64)
    after = np.asarray(after, np.float64)
    order = np.argsort(-before, kind="stable")
    order = order[before[order] > 0]
    rank = np.arange(1, len(order) + 1)
    fig, (ax,) = _figure(7.0, 4.2)
    ax.plot(rank, before[order], color="#7f7f7f", lw=1.5, label="natural (every image equally)")
    seen = after[order] > 0
    ax.plot(
        rank[seen],
        after[order][seen],
        ".",
        ms=3,
        color="#1f77b4",
        label=f"after {sampling} resampling (the training stream)",
    )
    if not seen.all():
        # Hashtags the stream never drew have no place on a log axis: marked on its floor, counted.
        ax.plot(
            rank[~seen],
            np.full(int((~seen).sum()), 0.02),
            "|",
            ms=6,
            color="#d62728",
            transform=ax.get_xaxis_transform(),
            label=f"never drawn in the stream ({int((~seen).sum())} hashtags, marked on the floor)",
        )
    if drawn is not None:
        ax.plot(
            rank,
            np.asarray(drawn, np.float64)[order],
            color="#1f77b4",
            lw=1,
            alpha=0.8,
            label="probability of being the drawn hashtag",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    for r in range(min(label_top, len(order))):
        ax.annotate(
            f"#{names[order[r]]}",
            (rank[r], before[order[r]]),
            fontsize=7,
            rotation=30,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("hashtag rank (by images carrying it)")
    ax.set_ylabel("share of training samples carrying the hashtag")
    ax.set_title(f"Hashtag frequency before and after resampling ({len(order)} hashtags)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def per_label_ap(
    ap: np.ndarray,
    train_counts: np.ndarray,
    names: Sequence[str],
    path: str | Path,
    *,
    chance: np.ndarray | None = None,
    bar_labels: int = 25,
) -> Path:
    """Held-out average precision per hashtag: against the hashtag's number of training images (left;
    NaN = no held-out positive, left out), and for the most frequent hashtags by name (right).
    ``chance``: per hashtag, the AP of a random ranking (its share of the held-out images), drawn as
    the chance level (its mean on the left, per bar on the right)."""
    ap = np.asarray(ap, np.float64)
    counts = np.asarray(train_counts, np.float64)
    valid = ~np.isnan(ap)
    fig, (left, right) = _figure(11.0, 4.6, 2)
    left.scatter(np.maximum(counts[valid], 0.8), 100 * ap[valid], s=10, alpha=0.6, color="#1f77b4")
    left.set_xscale("log")
    left.set_xlabel("training images carrying the hashtag")
    left.set_ylabel("held-out AP (%)")
    mean = 100 * float(np.mean(ap[valid])) if valid.any() else float("nan")
    left.axhline(mean, color="#d62728", lw=1, ls="--", label=f"mAP {mean:.1f}")
    if chance is not None and valid.any():
        chance = np.asarray(chance, np.float64)
        level = 100 * float(np.mean(chance[valid]))
        left.axhline(
            level, color="black", lw=1, ls=":", label=f"chance (random ranking) {level:.1f}"
        )
    left.set_title(f"Per-hashtag AP ({int(valid.sum())} hashtags with held-out positives)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    order = [i for i in np.argsort(-counts, kind="stable") if valid[i]][:bar_labels]
    y = np.arange(len(order))
    right.barh(y, [100 * ap[i] for i in order], color="#1f77b4")
    if chance is not None and order:
        right.plot([100 * chance[i] for i in order], y, "k|", ms=9, label="chance (random ranking)")
        right.legend(fontsize=7, loc="lower right")
    right.set_yticks(y, [f"#{names[i]} ({int(counts[i])})" for i in order], fontsize=7)
    right.invert_yaxis()
    right.set_xlim(0, 100)
    right.set_xlabel("held-out AP (%)")
    right.set_title(f"The {len(order)} most frequent hashtags (training images)")
    right.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def probe_comparison(
    rows: Sequence[Mapping], path: str | Path, *, title: str = "", num_classes: int | None = None
) -> Path:
    """Bars of mean linear-probe top-1 per trunk with the seeds' min-max as error bars and each seed as a
    dot. ``rows``: [{"key", "label", "top1": [per-seed fractions]}]; ``num_classes`` draws the chance
    level, 1 / num_classes."""
    fig, (ax,) = _figure(6.0, 3.8)
    for i, row in enumerate(rows):
        values = 100 * np.asarray(row["top1"], np.float64)
        mean = float(values.mean())
        color = TRUNK_COLORS.get(row["key"], f"C{i}")
        ax.bar(i, mean, color=color, alpha=0.85)
        if len(values) > 1:
            ax.errorbar(
                i,
                mean,
                yerr=[[mean - values.min()], [values.max() - mean]],
                color="black",
                capsize=5,
            )
        ax.plot(np.full(len(values), i), values, "k.", ms=5)
        ax.annotate(
            f"{mean:.1f}",
            (i, float(values.max())),
            ha="center",
            xytext=(0, 7),
            textcoords="offset points",
            fontsize=9,
        )  # above the error bar
    top = max((100 * float(np.max(r["top1"])) for r in rows), default=1.0)
    ax.set_ylim(0, top * 1.15)  # room for the value labels under the title
    # Labels wrapped to two lines so five trunks fit under their bars without overlapping.
    labels = [textwrap.fill(str(r["label"]), 16) for r in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("linear probe test top-1 (%)")
    if num_classes:
        ax.axhline(
            100 / num_classes,
            color="black",
            lw=1,
            ls=":",
            label=f"chance (1/{num_classes} = {100 / num_classes:.1f}%)",
        )
        ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or "Downstream linear probe")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _mean_and_seeds(ax, x: float, ci: Mapping, per_seed: Sequence, color: str, label=None) -> None:
    """A mean with its 95% interval as an error bar at ``x`` and each seed's value as a dot (fractions,
    drawn in percent); nothing when there is no mean."""
    if ci["mean"] is None:
        return
    mean = 100 * ci["mean"]
    yerr = None if ci["lo"] is None else [[mean - 100 * ci["lo"]], [100 * ci["hi"] - mean]]
    ax.errorbar(x, mean, yerr=yerr, fmt="o", color=color, capsize=5, ms=7, label=label)
    values = [100 * v for v in per_seed if v is not None]
    ax.plot(np.full(len(values), x), values, ".", color="black", ms=4, alpha=0.6)


def study_finding(
    arms: Sequence[Mapping],
    path: str | Path,
    *,
    title: str,
    reference_lines: Mapping[str, float],
    log_x: bool = False,
) -> Path:
    """One finding of ``tagjax study``: linear-probe top-1 (left), its paired difference to the arm it is
    compared with (the baseline unless the label says otherwise; middle) and held-out hashtag mAP
    (right) per arm, each a mean with its 95% t-interval as error bars and each seed as a dot; ``reference_lines`` (label -> top-1 fraction: chance, the controls) are drawn
    across the probe panel. With ``log_x`` the arms sit at their ``fraction`` of the data on a log axis
    (the data-size finding); otherwise one slot per arm.

    ``arms``: [{"label", "fraction", "top1": [per seed], "top1_ci": {mean, lo, hi}, "diff": [per-seed
    difference to the arm it is compared with; [] for the baseline], "diff_ci": {...}, "mAP": [per
    seed or None], "mAP_ci": {...}}].
    """
    fig, axes = _figure(15.0, 4.2, ncols=3)
    x = (
        np.asarray([a["fraction"] for a in arms], np.float64)
        if log_x
        else np.arange(len(arms), dtype=np.float64)
    )
    for ax, key, ylabel in (
        (axes[0], "top1", "linear probe test top-1 (%)"),
        (axes[1], "diff", "top-1 difference, paired by seed (points)"),
        (axes[2], "mAP", "held-out hashtag mAP (%)"),
    ):
        for i, arm in enumerate(arms):
            if any(v is not None for v in arm[key]):
                _mean_and_seeds(ax, x[i], arm[f"{key}_ci"], arm[key], f"C{i}")
        if log_x:
            ax.set_xscale("log", base=2)
            ax.set_xticks(x, [f"{f:g}" for f in x])
            ax.set_xlabel("share of the training split (schedule grows with the data)")
        else:
            ax.set_xticks(x, [a["label"] for a in arms], fontsize=8, rotation=15)
            ax.set_xlim(-0.6, len(arms) - 0.4)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    for j, (label, value) in enumerate(reference_lines.items()):
        axes[0].axhline(100 * value, ls=":" if label == "chance" else "--", color=f"C{j + 5}")
        axes[0].annotate(
            f"{label} {100 * value:.1f}",
            (0.01, 100 * value),
            xycoords=("axes fraction", "data"),
            xytext=(0, 2),
            textcoords="offset points",
            fontsize=7,
            color=f"C{j + 5}",
        )
    axes[1].axhline(0.0, color="black", lw=0.8)
    axes[0].set_title("linear probe (95% intervals over seeds)", fontsize=9)
    axes[1].set_title("difference to the baseline or the named arm (95% paired)", fontsize=9)
    axes[2].set_title("hashtag prediction, held-out posts", fontsize=9)
    fig.suptitle(title)
    return _save(fig, path)


def study_share(
    points: Sequence[Mapping],
    fit: Mapping,
    path: str | Path,
    *,
    title: str,
    chance: float,
) -> Path:
    """The hashtags' own share against the data size (``tagjax study``): left, the probe top-1 of the
    real- and the shuffled-hashtag arms at each fraction of the training split; right, their paired
    difference (real minus shuffled) with its 95% interval, each seed a dot, and the fitted line
    ``a + b log2(fraction)`` when there is one.

    ``points``: [{"fraction", "real": {"per_seed", "mean", "lo", "hi"}, "shuffled": {...},
    "share": {"per_seed", "mean", "lo", "hi"}}]; ``fit``: tagjax.study.share_slope's result.
    """
    fig, axes = _figure(11.0, 4.2, ncols=2)
    x = np.asarray([p["fraction"] for p in points], np.float64)

    def draw(ax, stats, color, label, offset=1.0):
        for i, st in enumerate(stats):
            _mean_and_seeds(ax, x[i] * offset, st, st["per_seed"], color, label if i == 0 else None)

    draw(axes[0], [p["real"] for p in points], "C0", "real hashtags", 0.97)
    draw(axes[0], [p["shuffled"] for p in points], "C3", "shuffled hashtags", 1.03)
    axes[0].axhline(100 * chance, ls=":", color="gray")
    axes[0].set_ylabel("linear probe test top-1 (%)")
    axes[0].legend(fontsize=8, loc="lower right")
    draw(axes[1], [p["share"] for p in points], "C2", "real minus shuffled")
    if fit.get("slope") is not None:
        xs = np.geomspace(x.min(), x.max(), 50)
        axes[1].plot(
            xs,
            100 * (fit["intercept"] + fit["slope"] * np.log2(xs)),
            "--",
            color="C2",
            label=f"fit: {100 * fit['slope']:+.1f} points per doubling "
            f"[{100 * fit['lo']:+.1f}, {100 * fit['hi']:+.1f}]",
        )
    axes[1].axhline(0.0, color="black", lw=0.8)
    axes[1].set_ylabel("hashtags' share of top-1, paired by seed (points)")
    axes[1].legend(fontsize=8, loc="upper left")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{f:g}" for f in x])
        ax.set_xlabel("share of the training split (schedule grows with the data)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_title("real and shuffled hashtags (95% intervals over seeds)", fontsize=9)
    axes[1].set_title("the hashtags' own share (95% paired intervals)", fontsize=9)
    fig.suptitle(title)
    return _save(fig, path)
