"""Downstream (transfer) datasets as random-access grain sources, and the image readers for files.

Every dataset opens the same way and yields the same example format::

    ds = downstream.open_split("cifar10", "train", data_dir="~/tensorflow_datasets")
    ds.num_classes, ds.class_names, len(ds.source)
    ds.source[i] -> {"image": uint8 [H, W, 3] array or JPEG bytes, "label": int, "group": str}

``image`` is whatever :func:`tagjax.augment.eval_image` / ``train_image`` take (arrays from TFDS, JPEG bytes
from folders, so the JPEG is decoded at a reduced DCT scale); ``group`` is "" unless the dataset says which
examples are variants of one another (the emoji dataset does), so a held-out part of the training split
never separates variants.

Names ``open_split`` accepts:

* a stock TFDS dataset from :data:`STOCK` (imagenet2012, caltech_birds2011, places365_small,
  oxford_iiit_pet, cifar10), prepared once with ``file_format="array_record"`` (docs/evaluation.md, "Downstream datasets");
  read with ``tfds.data_source`` -- random access, no TensorFlow at run time. Our "train"/"test" map onto
  the dataset's own split names (e.g. ImageNet's and Places365's labelled test split is "validation").
* ``emoji_subgroups`` (or ``emoji_subgroups/128px``): color emoji rendered from Debian's
  fonts-noto-color-emoji, labelled by Unicode subgroup (tagjax.emoji_dataset). Prepared on first use,
  offline, in a few seconds.
* any other TFDS name whose prepared copy has ``image`` and ``label`` features and train/test splits.
* a directory of class-per-folder images: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (``val`` or
  ``validation`` also name the test split), or ``DIR/<class>/*`` split deterministically by file path
  (``test_fraction``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tagjax import emoji_dataset, images
from tagjax.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".svg")
TEST_SPLIT_DIRS = ("test", "val", "validation")
DEFAULT_FOLDER_TEST_FRACTION = 0.2


def default_data_dir() -> str:
    """TFDS's own default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR") or str(Path("~/tensorflow_datasets").expanduser())


# ----------------------------------------------------------------------------------------------------
# Image bytes -> what tagjax.augment takes.
# ----------------------------------------------------------------------------------------------------


class BadImage(ValueError):
    """An image file that cannot be read; callers skip and count it."""


def read_image(data: bytes, *, svg_size: int = 256) -> bytes | np.ndarray:
    """Encoded image -> JPEG bytes (left for the reduced-size JPEG decoder) or an RGB uint8 array.

    Non-JPEG formats are decoded here with PIL so transparency is composited onto white (cliparts, emoji,
    logos) instead of onto black; SVG is rasterized with cairosvg, its longer side ``svg_size`` pixels.
    """

    if not data:
        raise BadImage("empty file")
    if data[:3] == b"\xff\xd8\xff":
        return data
    head = data[:512].lstrip()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096]):
        try:
            import cairosvg

            data = cairosvg.svg2png(bytestring=data, output_width=svg_size)
        except Exception as e:  # cairosvg raises many parser errors for broken SVG
            raise BadImage(f"unreadable SVG ({type(e).__name__}: {e})") from None
    try:
        image, _, _ = images.decode(
            data, images.ImageOptions(max_side=1 << 15, min_side=1, max_aspect=1e9)
        )
    except images.ImageSkip as e:
        raise BadImage(str(e)) from None
    return np.asarray(image, np.uint8)


def read_image_file(path: str | Path, *, svg_size: int = 256) -> bytes | np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImage(f"cannot read {path}: {e.strerror}") from None
    return read_image(data, svg_size=svg_size)


# ----------------------------------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StockDataset:
    """A TFDS dataset known to tagjax: its split names, the features to read, how to prepare it."""

    tfds_name: str
    train_split: str
    test_split: str
    label_key: str = "label"
    skip_decoding: tuple[str, ...] = ()  # image features we never need (segmentation masks)
    prepare: str = ""  # one line for the docs and the "not prepared" error


STOCK: dict[str, StockDataset] = {
    "imagenet2012": StockDataset(
        "imagenet2012",
        "train",
        "validation",
        prepare="manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
        "DATA_DIR/downloads/manual, then prepare",
    ),
    "caltech_birds2011": StockDataset(
        "caltech_birds2011",
        "train",
        "test",
        skip_decoding=("segmentation_mask",),
        prepare="downloads ~1.2 GB from Caltech's server when prepared",
    ),
    "places365_small": StockDataset(
        "places365_small",
        "train",
        "validation",
        prepare="downloads ~24 GB (256x256 images); its test split has no labels, so 'test' is validation",
    ),
    "oxford_iiit_pet": StockDataset(
        "oxford_iiit_pet",
        "train",
        "test",
        skip_decoding=("segmentation_mask",),
        prepare="downloads ~800 MB from the Oxford VGG server when prepared",
    ),
    "cifar10": StockDataset("cifar10", "train", "test", prepare="downloads 163 MB when prepared"),
}


class TfdsSource:
    """A random-access view of one prepared TFDS split in tagjax's example format.

    Opens ``tfds.data_source`` lazily, so the object pickles into grain worker processes cheaply.
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None,
        *,
        label_key: str = "label",
        group_key: str | None = None,
        skip_decoding: Sequence[str] = (),
        builder_dir: str | None = None,
    ):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.label_key, self.group_key = label_key, group_key
        self.skip_decoding = tuple(skip_decoding)
        self.builder_dir = builder_dir
        self._source = None

    def _open(self):
        if self._source is None:
            decoders = {k: tfds.decode.SkipDecoding() for k in self.skip_decoding} or None
            if self.builder_dir:  # read-only: needs neither the builder's code nor its input files
                builder = tfds.builder_from_directory(self.builder_dir)
                self._source = builder.as_data_source(split=self.split, decoders=decoders)
            else:
                self._source = tfds.data_source(
                    self.name,
                    split=self.split,
                    data_dir=self.data_dir,
                    download=False,
                    decoders=decoders,
                )
        return self._source

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __len__(self) -> int:
        return len(self._open())

    def __getitem__(self, index: int) -> dict:
        ex = self._open()[int(index)]
        image = np.asarray(ex["image"])
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        elif image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=2)
        group = ex.get(self.group_key, b"") if self.group_key else b""
        return {
            "image": image,
            "label": int(np.asarray(ex[self.label_key])),
            "group": group.decode() if isinstance(group, bytes) else str(group),
        }


class FolderSource:
    """Class-per-folder images as a random-access source; files are read (not decoded) on access."""

    def __init__(self, files: Sequence[tuple[str, int]], *, svg_size: int = 256):
        self.files = list(files)
        self.svg_size = svg_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path, label = self.files[int(index)]
        return {
            "image": read_image_file(path, svg_size=self.svg_size),
            "label": label,
            "group": "",
            "path": path,
        }


@dataclasses.dataclass
class Downstream:
    """One split of a downstream dataset: the source, its classes, and where it came from."""

    name: str
    split: str
    source: Any  # __len__ / __getitem__ -> {"image", "label", "group"}
    class_names: list[str]
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def identity(self) -> dict:
        """What the feature cache is keyed on (a different dataset or split never reuses features)."""
        return {
            "name": self.name,
            "split": self.split,
            "num_examples": len(self.source),
            "num_classes": self.num_classes,
        }


def _folder_split(root: Path, split: str, test_fraction: float) -> Downstream:
    split_dirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    test_dir = next((split_dirs[n] for n in TEST_SPLIT_DIRS if n in split_dirs), None)
    if "train" in split_dirs and test_dir is not None:
        base = split_dirs["train"] if split == "train" else test_dir
        classes = sorted(p.name for p in split_dirs["train"].iterdir() if p.is_dir())
        files = _list_class_files(base, classes)
        unknown = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in classes)
        if unknown:  # a classifier cannot be scored on classes it never saw
            log.warning(
                "%s: %d %s class folder(s) with no training folder are left out: %s",
                root,
                len(unknown),
                split,
                ", ".join(unknown[:10]) + (", ..." if len(unknown) > 10 else ""),
            )
    else:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        all_files = _list_class_files(root, classes)
        if not 0 < test_fraction < 1:
            raise UserError(f"test fraction {test_fraction} must lie strictly between 0 and 1.")

        # Deterministic, order-free split: a file's side depends only on its path inside the dataset.
        def is_test(path: str) -> bool:
            digest = hashlib.sha1(os.path.relpath(path, root).encode()).digest()
            return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction

        files = [(p, c) for p, c in all_files if is_test(p) == (split == "test")]
    if not classes:
        raise UserError(
            f"{root} has no class folders: lay it out as DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg, "
            "or DIR/<class>/*.jpg."
        )
    if not files:
        raise UserError(
            f"{root} has no images for the {split} split (extensions: {', '.join(IMAGE_EXTENSIONS)})."
        )
    return Downstream(
        f"folder:{root}", split, FolderSource(files), classes, f"class-per-folder images in {root}"
    )


def _list_class_files(base: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    out = []
    for label, name in enumerate(classes):
        folder = base / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                out.append((str(path), label))
    return out


def _tfds_split(name: str, split: str, data_dir: str | None) -> Downstream:
    base_name = name.split("/")[0].split(":")[0]
    stock = STOCK.get(base_name)
    ours = base_name in emoji_dataset.OWN_BUILDERS
    if ours:
        builder_dir = emoji_dataset.prepare_own(name, data_dir or default_data_dir())
        builder = tfds.builder_from_directory(builder_dir)
        split_name = {"train": "train", "test": "test"}[split]
        source = TfdsSource(
            name, split_name, data_dir, group_key="group", builder_dir=str(builder_dir)
        )
    else:
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # tfds raises DatasetNotFoundError and friends
            raise UserError(
                f"unknown dataset {name!r}: use one of {', '.join([*STOCK, *emoji_dataset.OWN_BUILDERS])}, another prepared "
                f"TFDS dataset, or a class-per-folder directory ({type(e).__name__})."
            ) from None
        if not _tfds_ready(builder):
            how = stock.prepare if stock else "see the TFDS catalog"
            raise UserError(
                f"TFDS dataset {name!r} is not prepared in {data_dir or default_data_dir()} ({how}): run "
                f"`python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
                f"data_dir='{data_dir or default_data_dir()}').download_and_prepare(file_format='array_record')\"`"
                ' once (docs/evaluation.md, "Downstream datasets").'
            )
        split_name = (
            (stock.train_split if split == "train" else stock.test_split) if stock else split
        )
        source = TfdsSource(
            name,
            split_name,
            data_dir,
            label_key=stock.label_key if stock else "label",
            skip_decoding=stock.skip_decoding if stock else (),
        )
    label = builder.info.features["label"]
    names = (
        list(label.names)
        if getattr(label, "names", None)
        else [str(i) for i in range(label.num_classes)]
    )
    return Downstream(name, split, source, names, builder.info.description or "")


def _tfds_ready(builder) -> bool:
    """Prepared on disk, or served by ``tfds.testing.mock_data`` (which replaces ``as_data_source``)."""
    if builder.is_prepared():
        return True
    reader = tfds.core.DatasetBuilder.as_data_source
    return getattr(reader, "__module__", "") != "tensorflow_datasets.core.dataset_builder"


def open_split(
    name: str,
    split: str,
    data_dir: str | None = None,
    *,
    folder_test_fraction: float = DEFAULT_FOLDER_TEST_FRACTION,
) -> Downstream:
    """One split ("train" or "test") of a downstream dataset by name (see the module docstring)."""
    if split not in ("train", "test"):
        raise UserError(f"split {split!r}: downstream datasets have 'train' and 'test'.")
    path = Path(name.removeprefix("folder:")).expanduser()
    if name.startswith("folder:") or path.is_dir():
        if not path.is_dir():
            raise UserError(f"{path} is not a directory of class folders.")
        return _folder_split(path, split, folder_test_fraction)
    return _tfds_split(name, split, data_dir)
