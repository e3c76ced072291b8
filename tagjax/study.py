"""``tagjax study``: the paper's findings and the controls that isolate the hashtag signal, arms x seeds.

An *arm* is one way of producing a trunk (configs/study.py): the demo's pretraining with a few config fields
changed (sigmoid loss, another resampling, label noise, less data, shuffled hashtags), or a control that
trains on no hashtags at all (the initial weights, the same with batch-norm statistics re-estimated on the
pretraining images, a trunk trained on the downstream set alone). Every arm is run with every seed on one
corpus (the demo's, built once: tagjax.demo's stages are reused as they are) and its trunk is probed on the
downstream task with the demo's linear probe.

Arms are **paired by seed**: with seed ``s`` every arm starts from the same initial weights (the trainer's
initialization for ``s``; the study records a digest of each arm's initial trunk to show it), reads the
same training-stream positions and is probed on the same train/validation split. The comparison with the
baseline is then the per-seed difference ``d_s = arm_s - baseline_s``, reported with its mean and a
t-interval over seeds: ``mean(d) ± t(0.975, n-1) * std(d) / sqrt(n)``. Pairing removes the variance the
arms share (initialization, stream, probe split), which is most of it at this scale.

Reuse and resume: every run is a stage of tagjax.demo.Stages under ``WORKDIR/stages``; a rerun reuses each
finished run whose settings did not change and resumes an interrupted one from its checkpoints, so a killed
study continues where it stopped and ``--arms`` / ``--seeds`` add arms or seeds to a finished study.

Outputs: ``study.json`` (every per-seed number, the statistics, the machine, the command, the compute
time), ``study.md`` (the tables) and ``plots/<finding>.png`` (one figure per finding: mean probe top-1
per arm with 95% intervals, each seed as a dot, chance and the controls as reference lines).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
import tensorflow_datasets as tfds

from tagjax import checkpoint, demo, input_pipeline, models, optim, plots, records, sharding, train
from tagjax import config as config_lib
from tagjax import metrics as metrics_lib
from tagjax.errors import UserError

STUDY_JSON = "study.json"
STUDY_MD = "study.md"
PLOTS_DIR = "plots"
ARM_KINDS = ("pretrain", "random", "random_bn", "downstream")
FINDING_TITLES = {
    "controls": "Controls: what the hashtags add beyond training on any labels",
    "loss": "(a) Loss: softmax over 1/k vs per-hashtag sigmoid",
    "sigmoid_lr_sweep": "Sigmoid learning-rate sweep",
    "softmax_lr_sweep": "Softmax learning-rate sweep",
    "sampling": "(b) Hashtag resampling",
    "noise": "(c) Label noise (a fixed corrupted dataset)",
    "data_size": "(d) Pretraining data size",
    "hashtag_share": "The hashtags' own share (real minus shuffled hashtags) against the data size",
    "length": "Pretraining length: the baseline and its shuffled control with 4x the images",
}
# Two-sided 95% quantiles t(0.975, df) of Student's t for df = 1..30; larger df use the Cornish-Fisher
# expansion below (error < 1e-4 past 30). Tabulated, because scipy is not a tagjax dependency.
_T975 = (
    12.7062,
    4.3027,
    3.1824,
    2.7764,
    2.5706,
    2.4469,
    2.3646,
    2.3060,
    2.2622,
    2.2281,
    2.2010,
    2.1788,
    2.1604,
    2.1448,
    2.1314,
    2.1199,
    2.1098,
    2.1009,
    2.0930,
    2.0860,
    2.0796,
    2.0739,
    2.0687,
    2.0639,
    2.0595,
    2.0555,
    2.0518,
    2.0484,
    2.0452,
    2.0423,
)
_Z975 = 1.959964


# ----------------------------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------------------------


def t_quantile_975(df: int) -> float:
    """Student's t 0.975 quantile with ``df`` degrees of freedom (the 95% two-sided interval's factor)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1 (got {df})")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def interval(values: Sequence[float]) -> dict:
    """Mean, sample std, n and the 95% t-interval of the mean (None bounds below two values)."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    n = len(v)
    if not n:
        return {"mean": None, "std": None, "n": 0, "lo": None, "hi": None}
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "std": None, "n": 1, "lo": None, "hi": None}
    std = float(v.std(ddof=1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "lo": mean - half, "hi": mean + half}


def paired_difference(arm: Mapping[int, float], baseline: Mapping[int, float]) -> dict:
    """The per-seed difference arm - baseline over the seeds both have, its mean and 95% t-interval, and
    a verdict: ``higher`` / ``lower`` when the interval excludes zero, else ``not resolved``."""
    seeds = sorted(
        s for s in arm if s in baseline and arm[s] is not None and baseline[s] is not None
    )
    diffs = [arm[s] - baseline[s] for s in seeds]
    stats = interval(diffs)
    if stats["lo"] is not None and stats["lo"] > 0:
        verdict = "higher"
    elif stats["hi"] is not None and stats["hi"] < 0:
        verdict = "lower"
    else:
        verdict = "not resolved"
    return {**stats, "seeds": seeds, "per_seed": diffs, "verdict": verdict}


def share_slope(points: Sequence[tuple[float, float]], target: float, train_records: int) -> dict:
    """Least-squares line ``share = a + b * log2(fraction)`` through per-seed (fraction, share) points:
    ``b`` is the change of the hashtags' share per doubling of the data, with its 95% t-interval
    (df = n - 2). When the whole interval is above zero, the line is extrapolated to the training-set
    size at which the share would reach ``target`` (central slope, and the range the interval allows);
    beyond the measured range this is a guide to the scale a finding needs, not a measurement."""
    x = np.log2(np.asarray([p[0] for p in points], np.float64))
    y = np.asarray([p[1] for p in points], np.float64)
    n = len(x)
    out = {"n": n, "target": target, "slope": None, "lo": None, "hi": None, "intercept": None}
    if n < 3 or np.ptp(x) == 0:
        return out
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    b = float(((x - xm) * (y - ym)).sum() / sxx)
    a = float(ym - b * xm)
    residual = y - (a + b * x)
    se = math.sqrt(float((residual**2).sum()) / (n - 2) / sxx)
    half = t_quantile_975(n - 2) * se
    out.update({"slope": b, "lo": b - half, "hi": b + half, "intercept": a})
    if a >= target:
        out["target_reached"] = True  # already at the whole split: nothing to extrapolate
    elif b - half > 0:

        def records_at(slope: float) -> int | None:
            doublings = (target - a) / slope  # None past 2^40 x the split: no size worth printing
            return round(train_records * 2**doublings) if doublings < 40 else None

        most = records_at(b - half)  # the shallowest slope in the interval needs the most data
        out["records_for_target"] = {
            "central": records_at(b),
            "fewest": records_at(b + half),
            "most": most,
        }
    return out


# ----------------------------------------------------------------------------------------------------
# Arms: configs and runs.
# ----------------------------------------------------------------------------------------------------


def select(requested: str | None, available: Sequence, what: str, convert=str) -> list:
    """A comma-separated ``--arms`` / ``--seeds`` value (``a-b`` ranges for seeds) checked against the
    configured ones; None = all of ``available``."""
    if requested is None or not str(requested).strip():
        return list(available)
    out = []
    for part in str(requested).split(","):
        part = part.strip()
        try:
            if convert is int and re.fullmatch(r"\d+-\d+", part):
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(convert(part))
        except ValueError:
            raise UserError(f"--{what}: {part!r} is not a valid value.") from None
    if convert is str:
        unknown = [a for a in out if a not in available]
        if unknown:
            raise UserError(
                f"--{what}: unknown {', '.join(unknown)}; configured: {', '.join(available)}."
            )
    return list(dict.fromkeys(out))


def _set_dotted(cfg, key: str, value) -> None:
    *path, last = key.split(".")
    node = cfg
    for p in path:
        node = node[p]
    if last not in node:
        raise UserError(f"study arm: the config has no field {key!r}.")
    node[last] = value


def size_schedule_images(cfg, fraction: float, train_records: int) -> int:
    """Images a data-size arm processes: the paper's heuristic (a straight line in the dataset size,
    tagjax.optim.paper_schedule_images) through the baseline's schedule on the whole split and
    ``study.passes_at_smallest_fraction`` passes over ``study.smallest_fraction`` of it; whole batches."""
    st = cfg.study
    full_passes = int(cfg.train.total_images) / train_records
    n = max(1, round(fraction * train_records))
    if fraction >= 1.0:
        images = int(cfg.train.total_images)
    else:
        smallest = max(1, round(float(st.smallest_fraction) * train_records))
        images = optim.paper_schedule_images(
            n,
            short=(smallest, float(st.passes_at_smallest_fraction)),
            long=(train_records, full_passes),
        )
    bs = int(cfg.train.batch_size)
    return max(bs, bs * round(images / bs))


def arm_config(cfg, arm: Mapping, train_records: int):
    """The study config with the arm's changes applied (the demo's pretraining config + ``set``)."""
    acfg = cfg.copy_and_resolve_references()
    with acfg.unlocked():
        for key, value in arm["set"]:
            _set_dotted(acfg, str(key), value)
        fraction = float(arm.get("fraction", 1.0))
        if fraction < 1.0:
            acfg.data.train_fraction = fraction
            acfg.train.total_images = size_schedule_images(cfg, fraction, train_records)
        length = float(arm.get("length", 1.0))
        if length != 1.0:  # a multiple of the (possibly overridden) schedule, in whole batches
            bs = int(acfg.train.batch_size)
            acfg.train.total_images = bs * max(1, round(length * acfg.train.total_images / bs))
    return acfg


def trunk_digest(variables: Mapping) -> str:
    """A digest of the trunk's parameters and batch-norm statistics (everything but the ``fc`` head)."""
    h = hashlib.sha1()
    for collection in ("params", "batch_stats"):
        tree = dict(variables.get(collection, {}))
        tree.pop("fc", None)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            h.update(jax.tree_util.keystr(path).encode())
            h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()[:16]


def initial_variables(pcfg, num_classes: int) -> dict:
    """The weights the trainer starts ``pcfg`` from (tagjax.train.create_train_state, seed pcfg.seed)."""
    model = models.create(pcfg.model, num_classes)
    state = train.create_train_state(pcfg, model, sharding.create_mesh(pcfg.mesh))
    return {"params": state.params, "batch_stats": state.batch_stats}


class Study:
    """One study's runs in one workdir: the corpus, then each (seed, arm), each a reusable stage."""

    def __init__(self, cfg, workdir: Path, stages: demo.Stages, *, progress: bool):
        self.cfg, self.workdir, self.stages, self.progress = cfg, workdir, stages, progress
        self.log = stages.log
        self.corpus: dict = {}
        self.corpus_key = None
        self.num_classes = 0
        self.train_records = 0

    def build_corpus(self) -> dict:
        self.corpus = demo.stage_corpus(self.cfg, self.workdir, self.stages, progress=self.progress)
        self.corpus_key = self.stages.key_of("corpus")
        dataset = Path(self.corpus["dataset"])
        self.num_classes = input_pipeline.num_labels(
            demo.pretrain_config(self.cfg, 0, str(dataset))
        )
        self.train_records = records.load_manifest(dataset).num_records(
            str(self.cfg.data.train_split)
        )
        return self.corpus

    def arm_cfg(self, arm: Mapping):
        return arm_config(self.cfg, arm, self.train_records)

    # --- trunks -----------------------------------------------------------------------------------------

    def init_stage(self, seed: int) -> dict:
        """The seed's initial weights as an inference checkpoint (stage ``seed<s>/random``)."""
        pcfg = demo.pretrain_config(self.cfg, seed, self.corpus["dataset"])
        name, run_dir = f"seed{seed}/random", self.workdir / f"seed{seed}" / "random"
        key = {"seed": seed, "model": pcfg.model, "data": pcfg.data, "corpus": self.corpus_key}
        result = self.stages.begin(name, run_dir, key)
        if result is not None:
            return result
        t0 = time.perf_counter()
        variables = initial_variables(pcfg, self.num_classes)
        path = _fresh_checkpoint_dir(run_dir / "checkpoint")
        checkpoint.save_inference_checkpoint(
            path, variables, {"config": pcfg, "source": "initialization", "seed": seed}
        )
        self.log(f"the initial weights of seed {seed} -> {path}")
        return self.stages.finish(
            name,
            key,
            {
                "checkpoint": str(path),
                "init_digest": trunk_digest(variables),
                "seconds": time.perf_counter() - t0,
            },
        )

    def run_arm(self, seed: int, name: str, arm: Mapping, init: Mapping) -> dict:
        """The arm's trunk for ``seed`` (trained or reused) and its linear probe: one result row."""
        kind = str(arm["kind"])
        heldout, heldout_loss, train_s = None, None, 0.0
        if kind == "pretrain":
            acfg = self.arm_cfg(arm)
            start = demo.pretrain_config(acfg, seed, self.corpus["dataset"])
            digest = trunk_digest(initial_variables(start, self.num_classes))
            pre = demo.stage_pretrain(
                acfg,
                seed,
                self.corpus,
                self.corpus_key,
                self.workdir,
                self.stages,
                progress=self.progress,
                run=name,
            )
            trunk, stage = pre["workdir"], f"seed{seed}/{name}"
            heldout, heldout_loss = _heldout_summary(pre["heldout"]), pre.get("final_heldout_loss")
            train_s = float(pre.get("train_seconds") or 0) + float(pre.get("eval_seconds") or 0)
            images = int(pre["images_seen"])
        elif kind == "random":
            trunk, stage, digest, images = (
                init["checkpoint"],
                f"seed{seed}/random",
                init["init_digest"],
                0,
            )
        elif kind == "random_bn":
            r = demo.stage_random_bn(
                self.cfg, seed, self.corpus, init["checkpoint"], self.workdir, self.stages
            )
            trunk, stage = r["checkpoint"], f"seed{seed}/random_bn"
            digest, images = init["init_digest"], 0
            train_s = float(r["seconds"])
        elif kind == "downstream":
            r = demo.stage_downstream_only(
                self.cfg,
                seed,
                init["checkpoint"],
                self.workdir,
                self.stages,
                progress=self.progress,
            )
            trunk, stage, digest = (
                r["checkpoint"],
                f"seed{seed}/downstream_only",
                init["init_digest"],
            )
            train_s, images = float(r["seconds"]), 0
        else:
            raise UserError(
                f"study arm {name}: kind {kind!r} is not one of {', '.join(ARM_KINDS)}."
            )
        probe = demo.stage_probe(
            self.cfg,
            seed,
            name,
            trunk,
            self.stages.key_of(stage),
            self.workdir,
            self.stages,
            progress=self.progress,
        )
        return {
            "arm": name,
            "seed": seed,
            "init_digest": digest,
            "images_seen": images,
            "probe_top1": probe["test_top1"],
            "probe_top5": probe["test_top5"],
            "heldout": heldout,
            "heldout_loss": heldout_loss,
            "train_seconds": train_s,
            "probe_seconds": float(probe.get("seconds") or 0.0),
            "probe": {k: probe.get(k) for k in ("num_classes", "num_train", "num_test")},
        }


def _fresh_checkpoint_dir(path: Path) -> Path:
    """``path`` cleared: a run killed after writing it but before recording the stage writes it again."""
    if path.exists():
        shutil.rmtree(path)
    return path


def _heldout_summary(heldout: Mapping) -> dict:
    """The held-out hashtag numbers the study reports: mAP overall and per frequency bucket, P@1."""
    out = {"mAP": heldout["mAP"], "precision@1": heldout["precision@1"]}
    for bucket in metrics_lib.BUCKETS:
        out[f"{bucket}_mAP"] = heldout["buckets"][bucket]["mAP"]
    return out


# ----------------------------------------------------------------------------------------------------
# Summary: statistics per arm, paired differences, tables, figures.
# ----------------------------------------------------------------------------------------------------

_NO_INTERVAL = {"mean": None, "lo": None, "hi": None}
HELDOUT_KEYS = ("mAP", *(f"{b}_mAP" for b in metrics_lib.BUCKETS))


def reference_of(cfg, name: str) -> str:
    """The arm ``name`` is compared with, seed by seed: its ``reference``, else the study's baseline."""
    return str(cfg.study.arms[name].get("reference", "") or cfg.study.baseline)


def is_share_arm(arm: Mapping) -> bool:
    """A shuffled-hashtag arm that changes nothing else (not the schedule's length either): with its
    reference it measures the hashtags' own share at its data fraction (the ``hashtag_share`` figure)."""
    return [tuple(kv) for kv in arm["set"]] == [("data.shuffle_labels", True)] and float(
        arm.get("length", 1.0)
    ) == 1.0


def summarize(
    cfg,
    rows: Sequence[Mapping],
    arm_names: Sequence[str],
    seeds: Sequence[int],
    train_records: int = 0,
) -> dict:
    """study.json's numbers from the result rows (one per arm and seed); ``train_records`` (the whole
    training split) scales the hashtag-share extrapolation."""
    base = str(cfg.study.baseline)
    by_arm = {a: {r["seed"]: r for r in rows if r["arm"] == a} for a in arm_names}

    def metric(arm: str, key: str) -> dict[int, float]:
        """``seed -> value`` of one number of one arm (held-out ones are None for untrained trunks)."""
        return {
            seed: (r["heldout"] or {}).get(key) if key in HELDOUT_KEYS else r.get(key)
            for seed, r in by_arm[arm].items()
        }

    def against(arm: str, other: str) -> dict:
        """Per compared metric, ``arm`` minus ``other`` paired by seed."""
        return {
            key: paired_difference(metric(arm, key), metric(other, key))
            for key in ("probe_top1", "probe_top5", *HELDOUT_KEYS)
        }

    arms = {}
    for a in arm_names:
        spec = cfg.study.arms[a]
        entry = {
            "label": str(spec.label),
            "kind": str(spec.kind),
            "finding": str(spec.finding),
            "fraction": float(spec.fraction),
            "length": float(spec.get("length", 1.0)),
            "set": [[str(k), v] for k, v in spec.set],
            "images_seen": max((r["images_seen"] for r in by_arm[a].values()), default=0),
            "per_seed": {str(s): dict(r) for s, r in sorted(by_arm[a].items())},
        }
        for key in ("probe_top1", "probe_top5", *HELDOUT_KEYS, "heldout_loss"):
            entry[key] = interval(list(metric(a, key).values()))
        if a != base:
            entry["vs_baseline"] = against(a, base)
        ref = reference_of(cfg, a)
        entry["reference"] = ref
        if ref not in (a, base):
            entry["vs_reference"] = against(a, ref)
        arms[a] = entry
    digests = {
        str(s): {a: by_arm[a][s]["init_digest"] for a in arm_names if s in by_arm[a]} for s in seeds
    }
    return {
        "baseline": base,
        "seeds": list(seeds),
        "arms": arms,
        "hashtag_share": hashtag_share(cfg, arms, train_records),
        "initial_trunk_digests": digests,
        "paired_initialization": all(len(set(d.values())) == 1 for d in digests.values()),
    }


def hashtag_share(cfg, arms: Mapping[str, Mapping], train_records: int) -> dict:
    """The hashtags' own share of the probe top-1 (reference minus shuffled arm, paired by seed) at each
    data fraction that has a shuffled arm, and its slope per doubling of the data (:func:`share_slope`)."""

    def top1(entry: Mapping) -> dict[int, float]:
        return {int(seed): r["probe_top1"] for seed, r in entry["per_seed"].items()}

    points, pairs = [], []
    for name, a in arms.items():
        ref = a["reference"]
        if not is_share_arm(a) or ref == name or ref not in arms:
            continue
        d = paired_difference(top1(arms[ref]), top1(a))  # reference minus shuffled: the share
        pairs.append(
            {
                "fraction": a["fraction"],
                "arm": name,
                "reference": ref,
                "seeds": d["seeds"],
                "per_seed": d["per_seed"],
                **{k: d[k] for k in ("mean", "lo", "hi", "n")},
            }
        )
        points += [(a["fraction"], v) for v in d["per_seed"]]
    pairs.sort(key=lambda p: p["fraction"])
    return {
        "points": pairs,
        "slope_per_doubling": share_slope(
            points, float(cfg.study.get("share_target", 0.10)), train_records
        ),
    }


def _pct(x, signed: bool = False) -> str:
    return "-" if x is None else f"{100 * x:{'+' if signed else ''}.1f}"


def _ci(stats: Mapping, signed: bool = False) -> str:
    if stats["mean"] is None:
        return "-"
    text = _pct(stats["mean"], signed)
    if stats["lo"] is not None:
        text += f" [{_pct(stats['lo'], signed)}, {_pct(stats['hi'], signed)}]"
    return text


def render_table(s: Mapping) -> str:
    """The study's main table (Markdown): per arm the mean with its 95% interval, and the paired
    difference to the baseline."""
    lines = [
        "| arm | finding | probe top-1 (%) | probe top-5 (%) | held-out mAP (%) | head / torso / tail mAP |"
        " compared with | top-1 difference (points) | top-1 verdict |",
        "|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for name, a in s["arms"].items():
        buckets = " / ".join(_pct(a[f"{b}_mAP"]["mean"]) for b in metrics_lib.BUCKETS)
        ref, diff = comparison(s, name)
        lines.append(
            f"| {a['label']} (`{name}`) | {a['finding']} | {_ci(a['probe_top1'])} | "
            f"{_ci(a['probe_top5'])} | {_ci(a['mAP'])} | {buckets if a['mAP']['n'] else '-'} | "
            + (
                f"`{ref}` | {_ci(diff, signed=True)} | {diff['verdict']} |"
                if diff
                else "(baseline) | | |"
            )
        )
    return "\n".join(lines)


def comparison(s: Mapping, name: str) -> tuple[str, dict | None]:
    """The arm an arm is compared with in the table and figures, and the paired top-1 difference."""
    a = s["arms"][name]
    if "vs_reference" in a:
        return a["reference"], a["vs_reference"]["probe_top1"]
    return s["baseline"], a.get("vs_baseline", {}).get("probe_top1")


def render_share(s: Mapping) -> str:
    """The hashtags' own share per data fraction and its slope per doubling (Markdown)."""
    h = s.get("hashtag_share") or {}
    if len(h.get("points", [])) < 2:
        return ""
    lines = [
        "| share of the training split | real-hashtag arm | shuffled arm | top-1 share per seed (points) "
        "| mean [95% interval] |",
        "|---:|---|---|---|---:|",
    ]
    for p in h["points"]:
        seeds = ", ".join(_pct(v, signed=True) for v in p["per_seed"])
        lines.append(
            f"| {p['fraction']:g} | `{p['reference']}` | `{p['arm']}` | {seeds} | "
            f"{_ci(p, signed=True)} |"
        )
    fit = h["slope_per_doubling"]
    if fit["slope"] is None:
        return "\n".join(lines)
    lines.append(
        f"\nFit over the {fit['n']} per-seed points, share = a + b log2(fraction): b = "
        f"{_pct(fit['slope'], True)} points per doubling of the data [95%: {_pct(fit['lo'], True)}, "
        f"{_pct(fit['hi'], True)}], a (the whole split) = {_pct(fit['intercept'], True)} points."
    )
    extra = fit.get("records_for_target")
    if fit.get("target_reached"):
        lines.append(
            f"The line is at or above {_pct(fit['target'], True)} points at the whole split already."
        )
    elif extra:

        def size(n: int | None) -> str:
            return "more than 2^40 times the split" if n is None else f"{n:,}"

        lines.append(
            f"Extrapolated, the share would reach {_pct(fit['target'], True)} points at "
            f"~{size(extra['central'])} training images ({size(extra['fewest'])} to "
            f"{size(extra['most'])} within the slope's interval): a guide beyond the measured range, "
            "not a measurement."
        )
    else:
        lines.append(
            "The slope's interval includes zero: no size at which the share reaches "
            f"{_pct(fit['target'], True)} points can be read from these runs."
        )
    return "\n".join(lines)


def render_sweep(s: Mapping) -> str:
    """The learning-rate sweeps: for each loss, the arms that change only the loss, the head's start and
    ``optim.base_lr`` (and the baseline, for its own loss), by held-out hashtag loss, lowest first."""
    pre = s.get("pretraining", {})
    groups: dict[str, list] = {}
    for name, a in s["arms"].items():
        changes = {str(k): v for k, v in a["set"]}
        if name != s["baseline"] and (
            "optim.base_lr" not in changes
            or not set(changes) <= {"loss", "model.head_bias", "optim.base_lr"}
        ):
            continue
        lr = changes.get("optim.base_lr", pre.get("base_lr"))
        if lr is None:
            continue
        loss = str(changes.get("loss", pre.get("loss", "softmax")))
        groups.setdefault(loss, []).append((a["heldout_loss"]["mean"], name, lr, a))
    tables = []
    for loss, rows in groups.items():
        if len(rows) < 2:
            continue
        rows.sort(key=lambda r: math.inf if r[0] is None else r[0])
        lines = [
            f"| {loss} arm | base_lr | held-out {loss} loss | held-out mAP (%) | probe top-1 (%) |",
            "|---|---:|---:|---:|---:|",
        ]
        for value, name, lr, a in rows:
            lines.append(
                f"| `{name}` | {lr} | {'-' if value is None else f'{value:.4f}'} | "
                f"{_ci(a['mAP'])} | {_ci(a['probe_top1'])} |"
            )
        lines.append(f"\nThe {loss} rate with the lowest held-out loss is `{rows[0][1]}`'s.")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def make_plots(s: Mapping, out: Path) -> dict[str, str]:
    """One figure per finding present among the arms (tagjax.plots.study_finding)."""
    base = s["baseline"]
    chance = 1.0 / s["downstream"]["num_classes"]
    refs = {
        s["arms"][c]["label"]: s["arms"][c]["probe_top1"]["mean"]
        for c in ("shuffled", "random_bn", "random")
        if c in s["arms"]
    }
    files = {}
    share = s.get("hashtag_share") or {}
    if len(share.get("points", [])) >= 2:
        files["hashtag_share"] = str(
            plots.study_share(
                [
                    {
                        "fraction": p["fraction"],
                        "real": _per_seed_top1(s, p["reference"]),
                        "shuffled": _per_seed_top1(s, p["arm"]),
                        "share": p,
                    }
                    for p in share["points"]
                ],
                share["slope_per_doubling"],
                out / "hashtag_share.png",
                title=FINDING_TITLES["hashtag_share"],
                chance=chance,
            )
        )
    for finding in dict.fromkeys(a["finding"] for a in s["arms"].values()):
        if finding in ("baseline", "hashtag_share"):
            continue
        names = [base] + [n for n, a in s["arms"].items() if a["finding"] == finding]
        arms = []
        for n in names:
            a = s["arms"][n]
            ref, diff = comparison(s, n)
            label = a["label"] if n == base or ref == base else f"{a['label']}\n(vs {ref})"
            arms.append(
                {
                    "label": label,
                    "fraction": a["fraction"],
                    "top1": [r["probe_top1"] for r in a["per_seed"].values()],
                    "top1_ci": a["probe_top1"],
                    "diff": (diff or {}).get("per_seed", []),
                    "diff_ci": diff or _NO_INTERVAL,
                    "mAP": [(r["heldout"] or {}).get("mAP") for r in a["per_seed"].values()],
                    "mAP_ci": a["mAP"],
                }
            )
        lines = {"chance": chance} | (
            {k: v for k, v in refs.items() if v is not None} if finding != "controls" else {}
        )
        files[finding] = str(
            plots.study_finding(
                arms,
                out / f"{finding}.png",
                title=FINDING_TITLES.get(finding, finding),
                reference_lines=lines,
                log_x=finding == "data_size",
            )
        )
    return files


def _per_seed_top1(s: Mapping, name: str) -> dict:
    a = s["arms"][name]
    return {"per_seed": [r["probe_top1"] for r in a["per_seed"].values()], **a["probe_top1"]}


def render_markdown(s: Mapping, workdir: Path) -> str:
    m = s["machine"]
    d = s["downstream"]
    seeds = ", ".join(map(str, s["seeds"]))
    lines = [
        "# tagjax study",
        "",
        f"`{s['command']}` on {m['cpu']} ({m['cpu_count']} cores, {m['devices']}, jax {m['jax']}): "
        f"{demo._duration(s['compute_seconds'])} of computation, {demo._duration(s['wall_seconds'])} "
        f"for this invocation ({s['stages_reused']} finished stages reused).",
        "",
        f"Corpus: {s['corpus']['records'].get('train', 0):,} training and "
        f"{s['corpus']['records'].get('heldout', 0):,} held-out openclipart images, "
        f"{s['corpus']['labels']:,} hashtags. Downstream: linear probe on {d['dataset']} "
        f"({d['num_classes']} classes, chance {100 / d['num_classes']:.1f}% top-1). Seeds {seeds}, paired "
        f"(initial trunks identical across arms within each seed: {s['paired_initialization']}). "
        "Numbers are means with their 95% t-interval over seeds; the difference to the baseline is "
        "paired by seed.",
        "",
        render_table(s),
        "",
    ]
    share = render_share(s)
    if share:
        lines += ["## The hashtags' own share against the data size", "", share, ""]
    sweep = render_sweep(s)
    if sweep:
        lines += ["## Learning-rate sweeps", "", sweep, ""]
    if s["plots"]:
        lines += ["## Figures", ""]
        for finding, path in s["plots"].items():
            rel = os.path.relpath(path, workdir)
            lines += [f"![{FINDING_TITLES.get(finding, finding)}]({rel})", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The whole study.
# ----------------------------------------------------------------------------------------------------


def check_config(cfg) -> None:
    if "study" not in cfg:
        raise UserError("the config has no `study` section; start from configs/study.py.")
    demo.check_config(cfg)
    base = str(cfg.study.baseline)
    if base not in cfg.study.arms:
        raise UserError(f"config.study.baseline={base!r} is not one of config.study.arms.")
    for name, arm in cfg.study.arms.items():
        if str(arm.kind) not in ARM_KINDS:
            raise UserError(
                f"config.study.arms.{name}.kind={arm.kind!r}: choose one of {', '.join(ARM_KINDS)}."
            )
        if str(arm.kind) == "pretrain" and name in ("random", "random_bn", "downstream_only"):
            raise UserError(
                f"config.study.arms.{name}: that name is the {name} trunk's; rename it."
            )
        if not 0.0 < float(arm.fraction) <= 1.0:
            raise UserError(f"config.study.arms.{name}.fraction must be in (0, 1].")
        ref = str(arm.get("reference", "") or "")
        if ref and ref not in cfg.study.arms:
            raise UserError(
                f"config.study.arms.{name}.reference={ref!r} is not one of config.study.arms."
            )
        if ref == name or (ref and str(cfg.study.arms[ref].get("reference", "") or "")):
            raise UserError(
                f"config.study.arms.{name}.reference={ref!r}: an arm is compared with an arm that "
                "is itself compared with the baseline (not with itself, not through a chain)."
            )
        if float(arm.get("length", 1.0)) <= 0:
            raise UserError(f"config.study.arms.{name}.length must be positive.")


def run_study(
    cfg,
    workdir: str | Path,
    *,
    arms: str | None = None,
    seeds: str | None = None,
    fresh: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    command: str = "",
) -> dict:
    """Runs the selected arms x seeds (reusing finished runs); returns study.json's content."""
    check_config(cfg)
    st = cfg.study
    arm_names = select(arms, list(st.arms.keys()), "arms") if arms else list(st.default_arms)
    select(",".join(arm_names), list(st.arms.keys()), "arms")  # the default list, checked too
    if str(st.baseline) not in arm_names:
        log(f"adding the baseline arm {st.baseline!r}: every comparison is with it")
        arm_names.insert(0, str(st.baseline))
    for name in list(arm_names):
        ref = reference_of(cfg, name)
        if ref not in arm_names:
            log(f"adding arm {ref!r}: arm {name!r} is compared with it")
            arm_names.insert(arm_names.index(name), ref)
    seed_list = select(seeds, [int(x) for x in st.seeds], "seeds", convert=int)
    config_lib.ensure_absl_flags_parsed()
    if not progress:
        tfds.disable_progress_bar()
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config_lib.to_json(cfg) + "\n")
    stages = demo.Stages(workdir, fresh=fresh, log=log)
    log(
        f"tagjax study: workdir {workdir}; arms {', '.join(arm_names)}; seeds "
        f"{', '.join(map(str, seed_list))} ({len(arm_names) * len(seed_list)} runs)"
    )
    stages.banner("corpus: openclipart -> vocabulary -> deduplicated, decontaminated shards")
    study = Study(cfg, workdir, stages, progress=progress)
    corpus = study.build_corpus()

    rows, total, done = [], len(arm_names) * len(seed_list), 0
    for seed in seed_list:
        init = study.init_stage(seed)
        for name in arm_names:
            done += 1
            arm = st.arms[name]
            stages.banner(f"[{done}/{total}] arm {name} ({arm.label}), seed {seed}")
            row = study.run_arm(seed, name, arm, init)
            rows.append(row)
            log(
                f"arm {name}, seed {seed}: probe top-1 {_pct(row['probe_top1'])}%, top-5 "
                f"{_pct(row['probe_top5'])}%"
                + (f", held-out mAP {_pct(row['heldout']['mAP'])}%" if row["heldout"] else "")
            )

    stages.banner("summary, tables and figures")
    summary = summarize(cfg, rows, arm_names, seed_list, study.train_records)
    probe = rows[0]["probe"]
    stats = corpus["stats"]
    summary.update(
        {
            "command": command,
            "machine": demo.machine_info(),
            "corpus": {
                "dataset": corpus["dataset"],
                "records": stats["records"],
                "labels": stats["labels"]["vocabulary_size"],
            },
            "downstream": {
                "dataset": str(cfg.demo.downstream),
                **probe,
            },
            "pretraining": {
                "loss": str(cfg.loss),
                "base_lr": float(cfg.optim.base_lr),
                "model": str(cfg.model.name),
                "image_size": int(cfg.data.image_size),
                "batch_size": int(cfg.train.batch_size),
                "images_seen": int(cfg.train.total_images),
            },
            "compute_seconds": float(
                (corpus.get("seconds") or 0.0)
                + sum(r["train_seconds"] + r["probe_seconds"] for r in rows)
            ),
            "wall_seconds": time.perf_counter() - stages.start,
            "stages_reused": stages.reused,
        }
    )
    summary["plots"] = make_plots(summary, workdir / PLOTS_DIR)
    summary = demo._jsonable(summary)
    (workdir / STUDY_JSON).write_text(json.dumps(summary, indent=1) + "\n")
    (workdir / STUDY_MD).write_text(render_markdown(summary, workdir))
    log(render_table(summary))
    log(f"\nwrote {workdir / STUDY_JSON}, {workdir / STUDY_MD} and {len(summary['plots'])} figures")
    return summary
