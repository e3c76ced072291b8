"""The evaluation sets a build is decontaminated against: folders of images or TFDS splits -> perceptual
hashes (tagjax.dedup.phash) of every image, after the same normalization as a training image.

``tagjax build --eval-set SPEC`` (repeatable): SPEC is a folder (searched recursively) or
``tfds:NAME/SPLIT``, read with ``tfds.data_source`` (the dataset prepared in the TFDS data dir; no
TensorFlow). TFDS is imported only for such a set: importing it costs every build process ~0.4 s,
a quarter of a small build. A prepared dataset whose builder is not registered, such as tagjax's own
(tagjax.emoji_dataset), is read from its files. Both builders (tagjax.build, tagjax.build_beam) call
:func:`load_eval_hashes`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from tagjax import build_steps, dedup
from tagjax import images as images_lib
from tagjax import posts as posts_lib
from tagjax.errors import UserError

log = logging.getLogger(__name__)


def hashes_of_set(spec: str, image_options, data_dir: str | None = None) -> list[tuple[str, int]]:
    """(name, phash) of every image of an evaluation set.

    ``spec`` is a folder of images (searched recursively) or ``tfds:NAME/SPLIT`` (read with
    ``tfds.data_source``, which needs the dataset prepared in the TFDS data dir but not TensorFlow).
    Images go through the same normalization as training images (:func:`tagjax.images.process`).
    """

    out: list[tuple[str, int]] = []
    if spec.startswith("tfds:"):
        # The split is after the last '/': names may carry a config (tfds:emoji_subgroups/64px/test).
        name, _, split = spec[len("tfds:") :].rpartition("/")
        if not name or not split:
            raise UserError(
                f"evaluation set {spec!r}: write tfds:NAME/SPLIT, e.g. tfds:imagenet2012/validation."
            )
        import tensorflow_datasets as tfds  # optional; only for tfds: sets (module docstring)

        try:
            # download=False: an unprepared dataset is an error to report, never a download to start.
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:
            raise UserError(
                f"cannot open TFDS split {name}/{split} ({type(e).__name__}: {e}); prepare it "
                "first (tfds build) or pass a folder of images."
            ) from None
        for i in range(len(source)):
            example = source[i]
            image = example.get("image")
            if image is None:
                raise UserError(
                    f"TFDS dataset {name} has no 'image' feature; pass a folder of images."
                )
            pixels = np.asarray(image)
            if pixels.ndim == 3 and pixels.shape[-1] == 1:
                pixels = pixels[..., 0]
            # Through the same normalization as every training image (RGB, resize), via lossless PNG.
            buf = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
            try:
                processed = images_lib.process(buf.getvalue(), image_options)
            except images_lib.ImageSkip:
                continue
            out.append((f"{name}/{split}/{i}", dedup.phash(processed.pixels)))
        return out
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise UserError(f"evaluation set {spec!r} is neither a folder nor tfds:NAME/SPLIT.")
    files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in posts_lib.IMAGE_EXTENSIONS and p.is_file()
    )
    for p in files:
        try:
            processed = images_lib.process(p.read_bytes(), image_options)
        except images_lib.ImageSkip:
            continue  # an unreadable evaluation image cannot contaminate anything
        out.append((p.relative_to(root).as_posix(), dedup.phash(processed.pixels)))
    return out


def _eval_options(options: images_lib.ImageOptions) -> images_lib.ImageOptions:
    """Evaluation images are hashed whatever their size or shape: a tiny one can still be copied."""
    return dataclasses.replace(options, min_side=1, max_aspect=1e9)


def load_eval_hashes(cfg: build_steps.BuildConfig, pool) -> list[tuple[str, int]]:
    """(name, phash) of every image of every ``cfg.eval_sets``; folder images are hashed in ``pool``
    (worker processes started with :func:`tagjax.build_steps.worker_init`, or None: in this process)."""
    out = []
    options = _eval_options(cfg.images)
    for spec in cfg.eval_sets:
        before = len(out)
        if spec.startswith("tfds:"):
            out.extend(hashes_of_set(spec, options, cfg.tfds_data_dir))
            _check_readable(spec, len(out) - before)
            continue
        root = Path(spec).expanduser()
        if not root.is_dir():
            raise UserError(f"evaluation set {spec!r} is neither a folder nor tfds:NAME/SPLIT.")
        files = sorted(
            str(p)
            for p in root.rglob("*")
            if p.suffix.lower() in posts_lib.IMAGE_EXTENSIONS and p.is_file()
        )
        results = (
            pool.imap(build_steps.worker_eval_hash, files, chunksize=16)
            if pool
            else map(build_steps.worker_eval_hash, files)
        )
        for r in results:
            if r is not None:
                out.append((f"{spec}:{Path(r[0]).relative_to(root).as_posix()}", r[1]))
        _check_readable(spec, len(out) - before, len(files))
    return out


def _check_readable(spec: str, hashed: int, files: int | None = None) -> None:
    """An evaluation set with no readable image decontaminates nothing: a mistyped or not yet synced
    folder must stop the build, not pass as "0 near-duplicates of eval images"."""
    if hashed == 0:
        found = "" if files is None else f" ({files} image files found, none readable)"
        raise UserError(
            f"evaluation set {spec!r} has no readable image{found}; check the path, or drop "
            "--eval-set for it."
        )
    if files is not None and hashed < files:
        log.warning(
            "evaluation set %r: %d of %d image files could not be read and are not decontaminated "
            "against",
            spec,
            files - hashed,
            files,
        )
