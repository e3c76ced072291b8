"""``tagjax demo``: the whole system end to end on a real, user-tagged corpus, on a CPU.

1. **Corpus.** Debian's ``openclipart-svg`` cliparts (keywords written by their uploaders: noisy, Zipfian,
   synonyms and non-visual words, like hashtags) are read, rasterized (cached in ``~/.cache/tagjax/raster``
   so a re-run skips cairosvg), canonicalized into a WordNet noun vocabulary built from the corpus' own
   counts, deduplicated, decontaminated against the downstream *test* images, and written as shards
   with a build report (tagjax.build). The downstream set (color emoji by Unicode subgroup, prepared
   offline by tagjax.emoji_dataset) is prepared first because decontamination needs its test split.
2. **Pretraining** of a small ResNeXt on the hashtags with square-root resampling and the softmax loss
   (tagjax.train, checkpoints included), then hashtag-prediction mAP and precision@k on the held-out
   posts (tagjax.evaluate).
3. **Baselines**: the same architecture randomly initialized, and the same architecture trained from
   that initialization on the downstream training split alone (tagjax.transfer.run_finetune).
4. **Linear probes** of all three trunks on the downstream set (tagjax.transfer.run_linear: frozen
   trunk, logistic regression, L2 chosen on a held-out part of the training split).
5. **Summary**: a table on stdout, ``summary.json`` + ``summary.md`` and the figures (tagjax.plots) in the
   workdir.

Every size, duration and seed comes from ``configs/demo.py``; ``--seeds N`` repeats stages 2-4 with seeds
``seed, seed+1, ...`` and reports mean, standard deviation and range. Each stage records what it was run
with in ``WORKDIR/stages/``: rerunning the same command reuses finished stages and resumes an interrupted
one (training and fine-tuning continue from their checkpoints); a stage whose settings changed is redone
from scratch, as is everything with ``--fresh``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from tagjax import build as build_lib
from tagjax import (
    build_steps,
    checkpoint,
    downstream,
    input_pipeline,
    models,
    plots,
    records,
    train,
    transfer,
)
from tagjax import config as config_lib
from tagjax import dedup as dedup_lib
from tagjax import evaluate as evaluate_lib
from tagjax import images as images_lib
from tagjax import metrics as metrics_lib
from tagjax import progress as progress_lib
from tagjax import sampling as sampling_lib
from tagjax import vocab as vocab_lib
from tagjax.errors import UserError

STAGES_DIR = "stages"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
PLOTS_DIR = "plots"
# The trunks of the downstream comparison, in table order: key -> label.
TRUNKS = {
    "pretrained": "hashtag-pretrained",
    "shuffled": "shuffled hashtags",
    "random_bn": "random init, BN re-estimated",
    "random": "random init",
    "downstream": "downstream only",
}
# The controls the headline is measured against besides random init (config demo.controls): the same
# pretraining with each image's hashtags taken from another image, and the random trunk with batch-norm
# statistics re-estimated on the pretraining images.
CONTROLS = ("shuffled", "random_bn")
# Config sections the pretraining reads; the stage key is made of these (the demo's own sections, e.g.
# probe settings, do not invalidate a finished pretraining).
PRETRAIN_SECTIONS = ("data", "model", "loss", "optim", "train", "mesh", "checkpoint")
# Fields of a config's data section that decide how records are read, not what a run computes: left out
# of stage keys (stage_key), so that a new reader option does not redo the stages already finished.
READER_FIELDS = ("max_open_shards",)


# ----------------------------------------------------------------------------------------------------
# Stage bookkeeping: banners, timings, reuse of finished stages.
# ----------------------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    """Plain JSON values (ConfigDicts, tuples and numpy scalars included), NaN as None."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_jsonable(v) for v in x.tolist()]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        x = float(x)
        return None if not math.isfinite(x) else x
    if isinstance(x, str | int | bool) or x is None:
        return x
    return str(x)


def stage_key(key: Any) -> Any:
    """``key`` as plain JSON, without READER_FIELDS in any ``data`` section it holds."""

    def strip(x: Any, parent: str = "") -> Any:
        if isinstance(x, dict):
            return {
                k: strip(v, k)
                for k, v in x.items()
                if not (parent == "data" and k in READER_FIELDS)
            }
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(_jsonable(key))


class Stages:
    """Stage banners with timings, and the record of finished stages in ``WORKDIR/stages/<name>.json``.

    A stage's *key* is everything its output depends on. :meth:`begin` returns the stored result when the
    stage already finished with the same key; otherwise it returns None with the stage's directory ready:
    kept as it is when an unfinished attempt had the same key (the work resumes from its checkpoints or
    caches), created empty otherwise (outputs made with other settings must not mix with new ones).
    """

    def __init__(self, workdir: Path, *, fresh: bool, log: Callable[[str], None]):
        self.workdir = workdir
        self.fresh = fresh
        self.log = log
        self.reused = 0  # stages whose stored result this invocation used
        self.start = time.perf_counter()
        (workdir / STAGES_DIR).mkdir(parents=True, exist_ok=True)

    def banner(self, title: str) -> None:
        elapsed = time.perf_counter() - self.start
        self.log("")
        self.log(f"==== {title}  [{_duration(elapsed)} elapsed] " + "=" * max(3, 70 - len(title)))

    def _marker(self, name: str) -> Path:
        return self.workdir / STAGES_DIR / f"{name.replace('/', '__')}.json"

    def begin(self, name: str, directory: Path, key: Mapping) -> Any:
        key = stage_key(key)
        marker = self._marker(name)
        if marker.is_file() and not self.fresh:
            stored = json.loads(marker.read_text())
            if stored.get("key") == key:
                if "result" in stored and directory.exists():
                    self.log(f"{name}: reusing the finished stage in {directory} (same settings)")
                    self.reused += 1
                    return stored["result"]
                if "result" not in stored:
                    self.log(f"{name}: resuming the unfinished stage in {directory}")
                    directory.mkdir(parents=True, exist_ok=True)
                    return None
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        marker.write_text(json.dumps({"key": key}, indent=1, sort_keys=True) + "\n")
        return None

    def finish(self, name: str, key: Mapping, result: Any) -> Any:
        result = _jsonable(result)
        payload = {"key": stage_key(key), "result": result}
        marker = self._marker(name)
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, marker)
        return result

    def key_of(self, name: str) -> Any:
        """The key a stage was (or is being) run with: later stages that build on it include it in theirs."""
        return json.loads(self._marker(name).read_text())["key"]


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    m, s = divmod(seconds, 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


# ----------------------------------------------------------------------------------------------------
# Stage 1: the corpus.
# ----------------------------------------------------------------------------------------------------


def _data_dir(cfg, workdir: Path) -> str:
    return (
        str(Path(cfg.demo.data_dir).expanduser())
        if str(cfg.demo.data_dir)
        else str(workdir / "tensorflow_datasets")
    )


def _eval_set_spec(name: str, data_dir: str) -> tuple[str, Any]:
    """The downstream test split as a ``tagjax build --eval-set`` spec (preparing our own datasets)."""

    test = downstream.open_split(name, "test", data_dir)
    source = test.source
    if isinstance(source, downstream.TfdsSource):
        return f"tfds:{source.name}/{source.split}", test
    # A class-folder dataset: decontaminate against the whole folder (a superset of its test images).
    return str(Path(name.removeprefix("folder:")).expanduser()), test


def build_config(cfg, workdir: Path, eval_spec: str, data_dir: str, *, progress: bool | None):

    c = cfg.corpus
    cache = str(c.raster_cache)
    try:
        images = images_lib.ImageOptions(max_side=int(c.max_side), min_side=int(c.min_side))
    except ValueError as e:
        raise UserError(f"config.corpus: {e}.") from None
    return build_steps.BuildConfig(
        inputs=tuple(str(s) for s in c.inputs),
        output=str(workdir / "dataset"),
        vocab_mode=str(c.vocab_mode),
        vocab_top_k=int(c.vocab_top_k),
        vocab_min_count=int(c.vocab_min_count),
        images=images,
        dedup=dedup_lib.DedupOptions(
            near_threshold=int(c.near_threshold), eval_threshold=int(c.eval_threshold)
        ),
        eval_sets=(eval_spec,),
        tfds_data_dir=data_dir,
        habit_fraction=float(c.habit_fraction),
        habit_min_posts=int(c.habit_min_posts),
        heldout_fraction=float(c.heldout_fraction),
        split_seed=str(c.split_seed),
        shard_size=int(c.shard_size),
        workers=int(c.workers),
        limit=int(c.limit),
        raster_cache=None if cache == "default" else cache,
        overwrite=True,
        progress=progress,
    )


def stage_corpus(cfg, workdir: Path, stages: Stages, *, progress: bool | None) -> dict:

    log = stages.log
    data_dir = _data_dir(cfg, workdir)
    t0 = time.perf_counter()
    eval_spec, test = _eval_set_spec(str(cfg.demo.downstream), data_dir)
    log(
        f"downstream set {cfg.demo.downstream}: {test.num_classes} classes, {len(test.source):,} test images "
        f"(in {data_dir}); its test split is what the corpus is decontaminated against ({eval_spec})"
    )
    bcfg = build_config(cfg, workdir, eval_spec, data_dir, progress=progress)
    key = {"build": bcfg.to_json()}
    dataset = Path(bcfg.output)
    result = stages.begin("corpus", dataset, key)
    if result is None or not (dataset / "dataset.json").is_file():
        log(
            f"building the corpus from {', '.join(bcfg.inputs)} into {dataset} (SVGs rasterized at "
            f"{bcfg.images.max_side}px through the raster cache)"
        )
        summary = build_lib.build(bcfg)
        report = build_steps.render_report(summary)
        result = stages.finish(
            "corpus",
            key,
            {
                "dataset": str(dataset),
                "stats": {
                    k: summary[k]
                    for k in (
                        "posts_read",
                        "posts_written",
                        "records",
                        "dropped",
                        "labels",
                        "images",
                        "timing_s",
                    )
                    if k in summary
                },
                "dedup": {k: v for k, v in summary.get("dedup", {}).items() if k != "eval_matches"},
                "eval_matches": summary.get("dedup", {}).get("eval_matches", []),
                "eval_set": eval_spec,
                "seconds": time.perf_counter() - t0,  # downstream set + build
            },
        )
    else:
        report = (dataset / "report.txt").read_text()
    log(report.rstrip())
    return result


# ----------------------------------------------------------------------------------------------------
# Stage 2: pretraining and hashtag metrics.
# ----------------------------------------------------------------------------------------------------


def pretrain_config(cfg, seed: int, dataset: str):
    pcfg = cfg.copy_and_resolve_references()
    with pcfg.unlocked():
        pcfg.seed = int(seed)
        pcfg.data.synthetic = False
        pcfg.data.dataset = str(dataset)
    return pcfg


def _pretrain_key(pcfg, corpus_key: Mapping) -> dict:
    return {"seed": int(pcfg.seed), "corpus": corpus_key, **{s: pcfg[s] for s in PRETRAIN_SECTIONS}}


def stage_pretrain(
    cfg,
    seed: int,
    corpus: dict,
    corpus_key: Mapping,
    workdir: Path,
    stages: Stages,
    *,
    progress: bool | None,
    run: str = "pretrain",
) -> dict:
    """Pretrains ``cfg`` with ``seed`` in ``WORKDIR/seed<seed>/<run>`` and evaluates it on the held-out posts
    (``run`` names the run: tagjax.study runs one per arm)."""

    log = stages.log
    pcfg = pretrain_config(cfg, seed, corpus["dataset"])
    run_dir = workdir / f"seed{seed}" / run
    key = _pretrain_key(pcfg, corpus_key)
    name = f"seed{seed}/{run}"
    result = stages.begin(name, run_dir, key)
    if result is not None:
        log(
            metrics_lib.format_table(
                _metrics_for_table(result["heldout"]),
                title=f"hashtag prediction on held-out posts (seed {seed})",
            )
        )
        return result
    t0 = time.perf_counter()
    bs = int(pcfg.train.batch_size)
    log(
        f"pretraining {pcfg.model.name} on {corpus['stats']['records'].get('train', 0):,} cliparts, seed {seed}: "
        f"{int(pcfg.train.total_images) // bs:,} steps of {bs} ({int(pcfg.train.total_images):,} images seen), "
        f"{pcfg.data.image_size}px crops, {pcfg.data.sampling} resampling, {pcfg.loss} loss -> {run_dir}"
    )
    train_summary = train.train_and_evaluate(pcfg, run_dir, progress=progress)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics = evaluate_lib.evaluate_checkpoint(
        run_dir, corpus["dataset"], str(pcfg.data.eval_split), progress=progress
    )
    table = metrics_lib.format_table(
        metrics, title=f"hashtag prediction on held-out posts (seed {seed})"
    )
    out = run_dir / "eval" / f"{pcfg.data.eval_split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics_lib.to_json(metrics), indent=1) + "\n")
    out.with_suffix(".txt").write_text(table + "\n")
    log(table)
    heldout = {
        k: metrics[k]
        for k in (
            "num_images",
            "num_labels",
            "labels_with_positives",
            "mAP",
            "precision@1",
            "recall@1",
            "precision@5",
            "recall@5",
        )
    }
    heldout["buckets"] = {b: {k: v for k, v in e.items()} for b, e in metrics["buckets"].items()}
    heldout["per_label_ap"] = metrics["per_label_ap"]
    result = {
        "seed": seed,
        "workdir": str(run_dir),
        "steps": int(train_summary["step"]),
        "images_seen": int(train_summary["images_seen"]),
        "final_train_loss": train_summary.get("train_loss"),
        "final_heldout_loss": train_summary.get(
            "eval_loss"
        ),  # in the run's own loss (softmax/sigmoid)
        "images_per_second": train_summary.get("train_images_per_second"),
        "train_seconds": train_s,
        "eval_seconds": time.perf_counter() - t1,
        "heldout": heldout,
    }
    return stages.finish(name, key, result)


def _metrics_for_table(heldout: Mapping) -> dict:
    """A stored (JSON) held-out result back in the shape ``evaluate.format_table`` reads."""
    m = dict(heldout)
    m["labels_without_positives"] = int(m["num_labels"]) - int(m["labels_with_positives"])
    m = {k: (float("nan") if v is None else v) for k, v in m.items()}
    m["buckets"] = {
        b: {k: (float("nan") if v is None else v) for k, v in e.items()}
        for b, e in heldout["buckets"].items()
    }
    return m


# ----------------------------------------------------------------------------------------------------
# Stage 3: baselines.  Stage 4: linear probes.
# ----------------------------------------------------------------------------------------------------


def stage_random(cfg, seed: int, corpus: dict, workdir: Path, stages: Stages) -> dict:
    """The "no pretraining" trunk: the pretraining architecture at its initialization for this seed."""

    pcfg = pretrain_config(cfg, seed, corpus["dataset"])
    run_dir = workdir / f"seed{seed}" / "random"
    key = {"seed": seed, "model": pcfg.model, "data": pcfg.data}
    name = f"seed{seed}/random"
    result = stages.begin(name, run_dir, key)
    if result is not None:
        return result
    t0 = time.perf_counter()
    path = run_dir / "checkpoint"
    transfer.write_random_init_checkpoint(pcfg, path, num_classes=1, seed=seed)
    stages.log(f"random-init {pcfg.model.name} trunk (seed {seed}) -> {path}")
    return stages.finish(name, key, {"checkpoint": str(path), "seconds": time.perf_counter() - t0})


def reestimate_batch_norm(pcfg, variables: Mapping, num_images: int) -> dict:
    """``variables`` with batch-norm statistics re-estimated on ``num_images`` pretraining images.

    The images are the training stream of ``pcfg`` (the positions a pretraining run with this seed reads,
    with its augmentation), passed through the network in training mode with the weights frozen; the
    running averages update exactly as during pretraining. A random trunk's statistics are otherwise
    those of initialization (mean 0, variance 1), which makes its features a needlessly weak baseline.
    """
    num_classes = int(np.shape(variables["params"]["fc"]["kernel"])[-1])
    model = models.create(pcfg.model, num_classes)
    dtype = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(
        str(pcfg.model.dtype), jnp.float32
    )

    @jax.jit
    def update(batch_stats, images):
        _, new = model.apply(
            {"params": variables["params"], "batch_stats": batch_stats},
            train.normalize_images(images, pcfg.data, dtype),
            train=True,
            mutable=["batch_stats"],
        )
        return new["batch_stats"]

    it = input_pipeline.make_train_iterator(pcfg, process_index=0, process_count=1)
    stats = variables["batch_stats"]
    try:
        for _ in range(max(1, num_images // int(pcfg.train.batch_size))):
            stats = update(stats, next(it)["image"])
    finally:
        it.close()
    return {"params": variables["params"], "batch_stats": jax.device_get(stats)}


def stage_random_bn(
    cfg, seed: int, corpus: dict, random_ckpt: str, workdir: Path, stages: Stages
) -> dict:
    """The random trunk of stage ``seed<s>/random`` with batch-norm statistics re-estimated on as many
    pretraining images as a pretraining run sees."""

    pcfg = pretrain_config(cfg, seed, corpus["dataset"])
    num_images = int(pcfg.train.total_images)
    run_dir = workdir / f"seed{seed}" / "random_bn"
    name = f"seed{seed}/random_bn"
    key = {"init": stages.key_of(f"seed{seed}/random"), "images": num_images, "data": pcfg.data}
    result = stages.begin(name, run_dir, key)
    if result is not None:
        return result
    t0 = time.perf_counter()
    stages.log(
        f"re-estimating the batch-norm statistics of the random trunk (seed {seed}) on {num_images:,} "
        "pretraining images, the count a pretraining run sees"
    )
    variables, _ = checkpoint.load_for_inference(random_ckpt)
    variables = reestimate_batch_norm(pcfg, variables, num_images)
    path = run_dir / "checkpoint"
    if path.exists():  # written by a run killed before it recorded the stage
        shutil.rmtree(path)
    checkpoint.save_inference_checkpoint(
        path,
        variables,
        {"config": pcfg, "source": "random initialization, batch norm re-estimated", "seed": seed},
    )
    return stages.finish(name, key, {"checkpoint": str(path), "seconds": time.perf_counter() - t0})


def shuffled_config(cfg):
    """The shuffled-hashtag control: the same pretraining, each image shown with another's hashtags."""
    scfg = cfg.copy_and_resolve_references()
    with scfg.unlocked():
        scfg.data.shuffle_labels = True
    return scfg


def scratch_config(cfg, seed: int, data_dir: str):
    scfg = cfg.scratch.copy_and_resolve_references()
    with scfg.unlocked():
        scfg.seed = int(seed)
        scfg.transfer.dataset = str(cfg.demo.downstream)
        scfg.transfer.data_dir = data_dir
    return scfg


def stage_downstream_only(
    cfg, seed: int, random_ckpt: str, workdir: Path, stages: Stages, *, progress: bool | None
) -> dict:
    """The same architecture trained from the random initialization on the downstream training split."""

    data_dir = _data_dir(cfg, workdir)
    scfg = scratch_config(cfg, seed, data_dir)
    run_dir = workdir / f"seed{seed}" / "downstream_only"
    key = {"seed": seed, "scratch": scfg, "init": stages.key_of(f"seed{seed}/random")}
    name = f"seed{seed}/downstream_only"
    result = stages.begin(name, run_dir, key)
    if result is not None:
        return result
    t0 = time.perf_counter()
    stages.log(
        f"training the same trunk on {scfg.transfer.dataset} alone (seed {seed}): "
        f"{int(scfg.train.total_images):,} images seen in batches of {int(scfg.train.batch_size)}, "
        f"{scfg.data.image_size}px crops -> {run_dir}"
    )
    r = transfer.run_finetune(scfg, random_ckpt, run_dir, progress=progress, log_fn=stages.log)
    keep = ("test_top1", "test_top5", "step", "images_seen", "num_train", "num_test", "num_classes")
    return stages.finish(
        name,
        key,
        {
            "checkpoint": str(run_dir),
            "seconds": time.perf_counter() - t0,
            "finetuned_head": {k: r.get(k) for k in keep},
        },
    )


def probe_config(cfg, seed: int, data_dir: str):

    pc = ml_collections.ConfigDict()
    pc.seed = int(seed)
    pc.transfer = cfg.probe.transfer.copy_and_resolve_references()
    pc.linear = cfg.probe.linear.copy_and_resolve_references()
    pc.data = cfg.data.copy_and_resolve_references()  # the bad-record rule's thresholds
    pc.transfer.dataset = str(cfg.demo.downstream)
    pc.transfer.data_dir = data_dir
    return pc


def stage_probe(
    cfg,
    seed: int,
    trunk: str,
    checkpoint: str,
    trunk_key: Mapping,
    workdir: Path,
    stages: Stages,
    *,
    progress: bool | None,
) -> dict:

    data_dir = _data_dir(cfg, workdir)
    pc = probe_config(cfg, seed, data_dir)
    run_dir = workdir / f"seed{seed}" / f"probe_{trunk}"
    key = {"probe": pc, "trunk": trunk_key}
    name = f"seed{seed}/probe_{trunk}"
    result = stages.begin(name, run_dir, key)
    if result is not None:
        stages.log(
            f"{TRUNKS.get(trunk, trunk):<20} test top-1 {100 * result['test_top1']:.1f}%  top-5 "
            f"{100 * result['test_top5']:.1f}%"
        )
        return result
    t0 = time.perf_counter()
    stages.log(f"-- linear probe, {TRUNKS.get(trunk, trunk)} trunk (seed {seed})")
    r = transfer.run_linear(pc, checkpoint, run_dir, progress=progress, log_fn=stages.log)
    keep = (
        "test_top1",
        "test_top5",
        "train_top1",
        "l2",
        "feature_dim",
        "num_train",
        "num_test",
        "num_classes",
        "image_size",
    )
    return stages.finish(
        name,
        key,
        {k: r.get(k) for k in keep}
        | {"workdir": str(run_dir), "seconds": time.perf_counter() - t0},
    )


# ----------------------------------------------------------------------------------------------------
# Stage 5: summary, plots.
# ----------------------------------------------------------------------------------------------------


def _stats(values) -> dict:
    """mean, sample standard deviation (0 for one seed), min, max, n."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": len(v),
    }


def _pm(s: Mapping, scale: float = 100.0, signed: bool = False) -> str:
    if s["mean"] is None:
        return "-"
    sign = "+" if signed else ""
    text = f"{scale * s['mean']:{sign}.1f}"
    if s["n"] > 1:
        text += f" ± {scale * s['std']:.1f}"
    return text


def _range(s: Mapping, scale: float = 100.0) -> str:
    if s["mean"] is None or s["n"] < 2:
        return ""
    return f"{scale * s['min']:.1f}-{scale * s['max']:.1f}"


def machine_info() -> dict:

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu or platform.processor(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "load_average_at_end": [round(x, 2) for x in load] if load else None,
    }


def resampled_label_share(dataset: str, num_labels: int, sampling: str, seed: int, positions: int):
    """Share of training samples carrying each label (a) with every image drawn equally, (b) in the
    trainer's stream over positions ``[0, positions)`` (exactly the run's: tagjax.sampling is a pure
    function of the seed and the position); and (c) the probability of each hashtag being the *drawn* one
    (None without hashtag resampling)."""

    # The demo's split is small: its label index is loaded whole.
    index = records.open_label_store(Path(dataset), "train", num_labels).load()
    before = index.counts(num_labels) / max(1, index.num_records)
    inverted = (
        sampling_lib.InvertedIndex.in_memory(index, num_labels) if sampling != "images" else None
    )
    sampler = sampling_lib.make_sampler(sampling, seed, index.num_records, inverted)
    drawn = sampler.sample(np.arange(positions, dtype=np.int64)).record
    # Each record's labels, weighted by how often the stream drew that record.
    times_drawn = np.bincount(drawn, minlength=index.num_records)
    weights = np.repeat(times_drawn, np.diff(index.offsets))
    after = np.bincount(index.labels, weights=weights, minlength=num_labels) / max(1, len(drawn))
    drawn_p = sampler.label_probabilities() if inverted is not None else None
    return before, after, drawn_p


def make_plots(
    cfg, workdir: Path, corpus: dict, pretrain: list[dict], scratch: list[dict], probes: dict
) -> dict:

    out = workdir / PLOTS_DIR
    dataset = corpus["dataset"]
    vocab = vocab_lib.Vocabulary.load(Path(dataset) / "vocab.json")
    names = [vocab.name_of(i) for i in range(vocab.num_labels)]
    files = {}
    pre_runs = [
        (f"seed {r['seed']}", plots.read_metrics(Path(r["workdir"]) / "metrics.jsonl"))
        for r in pretrain
    ]
    scr_runs = [
        (f"seed {p['seed']}", plots.read_metrics(Path(s["checkpoint"]) / "metrics.jsonl"))
        for p, s in zip(pretrain, scratch)
    ]
    files["loss"] = plots.loss_curves(
        {
            "hashtag pretraining (openclipart)": pre_runs,
            f"downstream-only trunk ({cfg.demo.downstream})": scr_runs,
        },
        out / "loss.png",
    )
    first = pretrain[0]
    before, after, drawn_p = resampled_label_share(
        dataset,
        vocab.num_labels,
        str(cfg.data.sampling),
        int(first["seed"]),
        int(first["images_seen"]),
    )
    files["tag_frequency"] = plots.tag_frequency(
        before,
        after,
        names,
        out / "tag_frequency.png",
        sampling=str(cfg.data.sampling),
        drawn=drawn_p,
    )
    ap = np.asarray(
        [np.nan if v is None else v for v in first["heldout"]["per_label_ap"]], np.float64
    )
    counts = metrics_lib.label_counts_of(dataset, vocab.num_labels)
    heldout = metrics_lib.label_counts_of(dataset, vocab.num_labels, str(cfg.data.eval_split))
    # A random ranking's AP is the hashtag's share of the held-out images: the chance level.
    chance = None if heldout is None else heldout / max(1, int(first["heldout"]["num_images"]))
    files["per_label_ap"] = plots.per_label_ap(
        ap, counts, names, out / "per_label_ap.png", chance=chance
    )
    rows = [
        {"key": t, "label": TRUNKS[t], "top1": [p["test_top1"] for p in probes[t]]}
        for t in TRUNKS
        if probes.get(t)
    ]
    files["probe"] = plots.probe_comparison(
        rows,
        out / "probe.png",
        title=f"Linear probe on {cfg.demo.downstream} "
        f"({len(pretrain)} seed{'s' if len(pretrain) > 1 else ''})",
        num_classes=int(probes[next(iter(TRUNKS))][0]["num_classes"]),
    )
    return {k: str(v) for k, v in files.items()}


def compute_seconds(
    corpus: dict,
    pretrain: list[dict],
    randoms: list[dict],
    scratch: list[dict],
    probes: dict,
    controls: Sequence[dict] = (),
) -> dict[str, float]:
    """What producing the results cost, per stage, whether computed now or by an earlier invocation (the
    stage results carry their own durations)."""

    def total(results, key="seconds"):
        return float(sum(r.get(key) or 0.0 for r in results))

    return {
        "corpus": float(corpus.get("seconds") or 0.0),
        "pretrain": total(pretrain, "train_seconds"),
        "hashtag_eval": total(pretrain, "eval_seconds"),
        "random_init": total(randoms),
        "downstream_only": total(scratch),
        "probes": total([p for t in probes.values() for p in t]),
    } | (
        {  # the shuffled-hashtag pretraining and the batch-norm re-estimation
            "controls": total(controls, "train_seconds")
            + total(controls, "eval_seconds")
            + total(controls)
        }
        if controls
        else {}
    )


def summarize(
    cfg,
    corpus: dict,
    pretrain: list[dict],
    randoms: list[dict],
    scratch: list[dict],
    probes: dict,
    wall: float,
    reused: int,
    command: str,
    controls: Sequence[dict] = (),
) -> dict:
    seeds = [r["seed"] for r in pretrain]
    trunks = {}
    for t in (t for t in TRUNKS if probes.get(t)):
        trunks[t] = {
            "label": TRUNKS[t],
            "top1": _stats([p["test_top1"] for p in probes[t]]),
            "top5": _stats([p["test_top5"] for p in probes[t]]),
            "per_seed_top1": [p["test_top1"] for p in probes[t]],
        }
    gains = [
        p["test_top1"] - r["test_top1"] for p, r in zip(probes["pretrained"], probes["random"])
    ]
    gain = _stats(gains)
    # The headline against the controls: what is left for the hashtags themselves.
    control_gains = {
        f"gain_pretrained_minus_{c}": {**_stats(g), "per_seed": g}
        for c in CONTROLS
        if probes.get(c)
        for g in [
            [p["test_top1"] - r["test_top1"] for p, r in zip(probes["pretrained"], probes[c])]
        ]
    }
    threshold = float(cfg.demo.target_gain)
    hashtag = {
        k: _stats([r["heldout"][k] for r in pretrain])
        for k in ("mAP", "precision@1", "precision@5", "recall@5")
    }
    stats = corpus["stats"]
    first_probe = probes["pretrained"][0]
    return {
        "command": command,
        "seeds": seeds,
        "machine": machine_info(),
        "compute_seconds": compute_seconds(corpus, pretrain, randoms, scratch, probes, controls),
        "wall_seconds": wall,  # this invocation (less than the compute time when stages were reused)
        "stages_reused": reused,
        "corpus": {
            "posts_read": stats["posts_read"],
            "records": stats["records"],
            "labels": stats["labels"]["vocabulary_size"],
            "labels_used_in_train": stats["labels"]["used_in_train"],
            "labels_per_post": stats["labels"]["mean_per_post"],
            "dropped": stats["dropped"],
            "eval_near_duplicates_removed": corpus["dedup"].get("eval_removed"),
            "dataset": corpus["dataset"],
            "content_hash": corpus.get("content_hash"),
        },
        "pretraining": {
            "model": str(cfg.model.name),
            "image_size": int(cfg.data.image_size),
            "batch_size": int(cfg.train.batch_size),
            "images_seen": pretrain[0]["images_seen"],
            "steps": pretrain[0]["steps"],
            "sampling": str(cfg.data.sampling),
            "loss": str(cfg.loss),
            "train_seconds": _stats([r["train_seconds"] for r in pretrain]),
        },
        "hashtag_prediction": {
            "split": str(cfg.data.eval_split),
            "num_images": pretrain[0]["heldout"]["num_images"],
            **hashtag,
            "per_seed": [{k: r["heldout"][k] for k in hashtag} for r in pretrain],
        },
        "downstream": {
            "dataset": str(cfg.demo.downstream),
            "num_classes": first_probe["num_classes"],
            "num_train": first_probe["num_train"],
            "num_test": first_probe["num_test"],
            "feature_dim": first_probe["feature_dim"],
            "image_size": first_probe["image_size"],
            "trunks": trunks,
            "downstream_only_finetuned_head_top1": _stats(
                [s["finetuned_head"]["test_top1"] for s in scratch]
            ),
            "gain_pretrained_minus_random": {**gain, "per_seed": gains},
            **control_gains,
            "target_gain": threshold,
            "meets_target": gain["mean"] is not None and gain["mean"] >= threshold,
        },
    }


def render_table(s: Mapping) -> str:
    """The summary table (plain text, also valid Markdown)."""
    d = s["downstream"]
    n = len(s["seeds"])
    spread = (
        "mean ± std over seeds " + ", ".join(str(x) for x in s["seeds"])
        if n > 1
        else f"seed {s['seeds'][0]}"
    )
    c, p, h = s["corpus"], s["pretraining"], s["hashtag_prediction"]
    lines = [
        f"corpus: {c['posts_read']:,} openclipart posts read -> {c['records'].get('train', 0):,} train + "
        f"{c['records'].get('heldout', 0):,} held-out images, {c['labels']:,} canonical hashtags "
        f"({c['labels_per_post']} per image); {c['eval_near_duplicates_removed']} near-duplicates of "
        "downstream test images removed"
        + (f"; content hash {c['content_hash']}" if c.get("content_hash") else ""),
        f"pretraining: {p['model']}, {p['image_size']}px, {p['steps']:,} steps x {p['batch_size']} = "
        f"{p['images_seen']:,} images, {p['sampling']} resampling, {p['loss']} loss",
        f"hashtag prediction on {h['num_images']:,} held-out posts ({spread}): mAP {_pm(h['mAP'])}, "
        f"P@1 {_pm(h['precision@1'])}, P@5 {_pm(h['precision@5'])}, R@5 {_pm(h['recall@5'])} (%)",
        "",
        f"linear probe on {d['dataset']}: {d['num_classes']} classes, {d['num_train']:,} train / "
        f"{d['num_test']:,} test images, {d['feature_dim']}-d pooled features at {d['image_size']}px ({spread})",
        "",
        "| trunk | top-1 (%) | top-5 (%) | top-1 range |",
        "|---|---:|---:|---:|",
    ]
    for t in d["trunks"].values():
        lines.append(
            f"| {t['label']} | {_pm(t['top1'])} | {_pm(t['top5'])} | {_range(t['top1'])} |"
        )
    g = d["gain_pretrained_minus_random"]
    verdict = "meets" if d["meets_target"] else "falls short of"
    lines += [
        "",
        f"hashtag-pretrained minus random init: {_pm(g, signed=True)} points top-1 "
        f"(per seed: {', '.join(f'{100 * x:+.1f}' for x in g['per_seed'])}); {verdict} the target of "
        f"+{100 * d['target_gain']:.0f}",
        *(
            f"hashtag-pretrained minus {TRUNKS[c]}: {_pm(g, signed=True)} points top-1 (per seed: "
            f"{', '.join(f'{100 * x:+.1f}' for x in g['per_seed'])})"
            + ("; what the hashtags themselves add" if c == "shuffled" else "")
            for c in CONTROLS
            for g in [d.get(f"gain_pretrained_minus_{c}")]
            if g
        ),
        f"downstream-only trunk with its own trained head (not a probe): top-1 "
        f"{_pm(d['downstream_only_finetuned_head_top1'])}%",
        "",
        "compute time: "
        + ", ".join(f"{k} {_duration(v)}" for k, v in s["compute_seconds"].items())
        + f"; total {_duration(sum(s['compute_seconds'].values()))}"
        + (
            f" (this invocation {_duration(s['wall_seconds'])}, reusing {s['stages_reused']} finished stages)"
            if s["stages_reused"]
            else f" (wall time {_duration(s['wall_seconds'])})"
        ),
    ]
    return "\n".join(lines)


def render_markdown(s: Mapping, plots: Mapping[str, str], workdir: Path) -> str:
    m = s["machine"]
    rel = {k: os.path.relpath(v, workdir) for k, v in plots.items()}
    return "\n".join(
        [
            "# tagjax demo: summary",
            "",
            f"`{s['command']}` on {m['cpu']} ({m['cpu_count']} cores, {m['devices']}, jax {m['jax']}), "
            f"{_duration(sum(s['compute_seconds'].values()))} of computation"
            + (
                f" ({_duration(s['wall_seconds'])} for this invocation, which reused finished stages)."
                if s["stages_reused"]
                else f", {_duration(s['wall_seconds'])} wall time."
            ),
            "",
            render_table(s),
            "",
            "## Figures",
            "",
            f"![loss curves]({rel['loss']})",
            "",
            f"![hashtag frequency before and after resampling]({rel['tag_frequency']})",
            "",
            f"![per-hashtag AP]({rel['per_label_ap']})",
            "",
            f"![linear probe comparison]({rel['probe']})",
            "",
        ]
    )


# ----------------------------------------------------------------------------------------------------
# The whole run.
# ----------------------------------------------------------------------------------------------------


def check_config(cfg) -> None:
    for section in ("demo", "corpus", "probe", "scratch"):
        if section not in cfg:
            raise UserError(f"the config has no `{section}` section; start from configs/demo.py.")
    unknown = [c for c in cfg.demo.get("controls", ()) if c not in CONTROLS]
    if unknown:
        raise UserError(
            f"config.demo.controls: unknown {', '.join(map(str, unknown))}; choose from "
            f"{', '.join(CONTROLS)}."
        )
    if int(cfg.demo.seeds) < 1:
        raise UserError(f"--seeds must be at least 1 (got {int(cfg.demo.seeds)}).")
    if cfg.data.synthetic:
        raise UserError(
            "the demo trains on the openclipart corpus; set config.data.synthetic=False."
        )


def run_all(
    cfg,
    workdir: str | Path,
    *,
    fresh: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    command: str = "",
) -> dict:
    """Runs every stage (reusing finished ones, see the module docstring); returns the summary dict that
    is also written to ``WORKDIR/summary.json`` (``render_table`` shows it). ``log`` receives the stage
    banners and progress lines."""

    check_config(cfg)
    config_lib.ensure_absl_flags_parsed()
    if not progress_lib.wanted(progress):  # TFDS draws its own bars preparing the downstream set
        tfds.disable_progress_bar()
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config_lib.to_json(cfg) + "\n")
    stages = Stages(workdir, fresh=fresh, log=log)
    seeds = [int(cfg.seed) + i for i in range(int(cfg.demo.seeds))]
    log(f"tagjax demo: workdir {workdir}, seeds {', '.join(map(str, seeds))}")

    stages.banner("[1/5] corpus: openclipart -> vocabulary -> deduplicated, decontaminated shards")
    corpus = stage_corpus(cfg, workdir, stages, progress=progress)
    # What the corpus holds, in one digest a run elsewhere can compare (tagjax.records.content_hash).
    corpus["content_hash"] = records.content_hash(Path(corpus["dataset"]))
    corpus_key = stages.key_of("corpus")

    controls = [str(c) for c in cfg.demo.get("controls", ())]
    pretrain, randoms, scratch, control_runs = [], [], [], []
    probes: dict[str, list[dict]] = {t: [] for t in TRUNKS}
    for i, seed in enumerate(seeds):
        of = f" (seed {seed}, {i + 1} of {len(seeds)})" if len(seeds) > 1 else ""
        stages.banner(f"[2/5] pretraining on hashtags + held-out hashtag metrics{of}")
        pre = stage_pretrain(cfg, seed, corpus, corpus_key, workdir, stages, progress=progress)
        pretrain.append(pre)

        stages.banner(
            "[3/5] baselines and controls: random init"
            + (", its batch norm re-estimated" if "random_bn" in controls else "")
            + (", shuffled hashtags" if "shuffled" in controls else "")
            + f", trunk trained on the downstream set alone{of}"
        )
        rnd = stage_random(cfg, seed, corpus, workdir, stages)
        randoms.append(rnd)
        trunk_ckpts = {"pretrained": pre["workdir"], "random": rnd["checkpoint"]}
        trunk_stages = {"pretrained": f"seed{seed}/pretrain", "random": f"seed{seed}/random"}
        if "random_bn" in controls:
            rbn = stage_random_bn(cfg, seed, corpus, rnd["checkpoint"], workdir, stages)
            control_runs.append(rbn)
            trunk_ckpts["random_bn"] = rbn["checkpoint"]
            trunk_stages["random_bn"] = f"seed{seed}/random_bn"
        if "shuffled" in controls:
            shuf = stage_pretrain(
                shuffled_config(cfg),
                seed,
                corpus,
                corpus_key,
                workdir,
                stages,
                progress=progress,
                run="pretrain_shuffled",
            )
            control_runs.append(shuf)
            trunk_ckpts["shuffled"] = shuf["workdir"]
            trunk_stages["shuffled"] = f"seed{seed}/pretrain_shuffled"
        scr = stage_downstream_only(
            cfg, seed, rnd["checkpoint"], workdir, stages, progress=progress
        )
        scratch.append(scr)
        trunk_ckpts["downstream"] = scr["checkpoint"]
        trunk_stages["downstream"] = f"seed{seed}/downstream_only"

        stages.banner(f"[4/5] linear probes on {cfg.demo.downstream}{of}")
        for t in (t for t in TRUNKS if t in trunk_ckpts):
            probes[t].append(
                stage_probe(
                    cfg,
                    seed,
                    t,
                    trunk_ckpts[t],
                    stages.key_of(trunk_stages[t]),
                    workdir,
                    stages,
                    progress=progress,
                )
            )

    stages.banner("[5/5] summary and plots")
    plot_files = make_plots(cfg, workdir, corpus, pretrain, scratch, probes)
    summary = summarize(
        cfg,
        corpus,
        pretrain,
        randoms,
        scratch,
        probes,
        time.perf_counter() - stages.start,
        stages.reused,
        command,
        control_runs,
    )
    summary["plots"] = plot_files
    summary = _jsonable(summary)
    (workdir / SUMMARY_JSON).write_text(json.dumps(summary, indent=1) + "\n")
    (workdir / SUMMARY_MD).write_text(render_markdown(summary, plot_files, workdir))
    log(
        f"\nwrote {workdir / SUMMARY_JSON}, {workdir / SUMMARY_MD} and {len(plot_files)} figures in "
        f"{workdir / PLOTS_DIR}"
    )
    return summary
