"""Downstream (transfer) datasets as random-access grain sources, and our own emoji-by-subgroup dataset.

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
  oxford_iiit_pet, cifar10), prepared once with ``file_format="array_record"`` (README: "Transfer");
  read with ``tfds.data_source`` -- random access, no TensorFlow at run time. Our "train"/"test" map onto
  the dataset's own split names (e.g. ImageNet's and Places365's labelled test split is "validation").
* ``emoji_subgroups`` (or ``emoji_subgroups/128px``): color emoji rendered from Debian's
  fonts-noto-color-emoji, labelled by Unicode subgroup (:class:`EmojiSubgroups`). Prepared on first use,
  offline, in a few seconds.
* any other TFDS name whose prepared copy has ``image`` and ``label`` features and train/test splits.
* a directory of class-per-folder images: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (``val`` or
  ``validation`` also name the test split), or ``DIR/<class>/*`` split deterministically by file path
  (``test_fraction``).

Decontamination (the paper's method, in feature space) also lives here: :func:`find_near_duplicates`
compares trunk embeddings of evaluation images with those of the pretraining images and writes the post
ids of training images too close to an evaluation image, a list ``tagjax build --exclude`` drops.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tagjax.errors import UserError

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
    from tagjax import images

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
    prepare: str = ""  # one line for the README and the "not prepared" error


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
            import tensorflow_datasets as tfds

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
    import tensorflow_datasets as tfds

    base_name = name.split("/")[0].split(":")[0]
    stock = STOCK.get(base_name)
    ours = base_name in OWN_BUILDERS
    if ours:
        builder_dir = prepare_own(name, data_dir)
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
                f"unknown dataset {name!r}: use one of {', '.join([*STOCK, *OWN_BUILDERS])}, another prepared "
                f"TFDS dataset, or a class-per-folder directory ({type(e).__name__})."
            ) from None
        if not _tfds_ready(builder):
            how = stock.prepare if stock else "see the TFDS catalog"
            raise UserError(
                f"TFDS dataset {name!r} is not prepared in {data_dir or default_data_dir()} ({how}): run "
                f"`python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
                f"data_dir='{data_dir or default_data_dir()}').download_and_prepare(file_format='array_record')\"`"
                " once (README: Transfer)."
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
    import tensorflow_datasets as tfds

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


# ----------------------------------------------------------------------------------------------------
# The emoji dataset: color emoji by Unicode subgroup (our own TFDS builder, prepared offline).
# ----------------------------------------------------------------------------------------------------

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"  # Debian fonts-noto-color-emoji
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"  # Debian unicode-data
# CBDT color fonts have fixed bitmap strikes; Noto Color Emoji's only strike is 109 px (136 x 128 glyphs).
EMOJI_STRIKE = 109

_SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
_GENDER_SIGNS = frozenset({0x2640, 0x2642})
# man / woman -> person, boy / girl -> child, old man / old woman -> older person: variants of one picture.
_GENDERED = {
    0x1F468: 0x1F9D1,
    0x1F469: 0x1F9D1,
    0x1F466: 0x1F9D2,
    0x1F467: 0x1F9D2,
    0x1F474: 0x1F9D3,
    0x1F475: 0x1F9D3,
}
_ZWJ, _VS16 = 0x200D, 0xFE0F


@dataclasses.dataclass(frozen=True)
class Emoji:
    codepoints: tuple[int, ...]
    name: str
    group: str  # Unicode emoji group, e.g. "Smileys & Emotion"
    subgroup: str  # the label, e.g. "face-smiling"

    @property
    def text(self) -> str:
        return "".join(map(chr, self.codepoints))

    @property
    def key(self) -> str:
        return "-".join(f"{c:04X}" for c in self.codepoints)

    @property
    def variant_group(self) -> str:
        """The emoji with skin tones, gender signs and man/woman/person distinctions removed.

        Variants that differ only there are one picture drawn several ways; they share a group so that a
        split never puts one in training and its twin in test.
        """
        cps = [c for c in self.codepoints if c not in _SKIN_TONES and c != _VS16]
        out, i = [], 0
        while i < len(cps):
            if cps[i] == _ZWJ and i + 1 < len(cps) and cps[i + 1] in _GENDER_SIGNS:
                i += 2
                continue
            out.append(_GENDERED.get(cps[i], cps[i]))
            i += 1
        return "-".join(f"{c:04X}" for c in out)


def _require_file(path: str, package: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"{path} is missing: install Debian's {package} (`apt-get install {package}`)."
        )
    return p


def parse_emoji_test(path: str = EMOJI_TEST) -> list[Emoji]:
    """The fully-qualified emoji of emoji-test.txt, in file (CLDR) order, with group and subgroup."""
    text = _require_file(path, "unicode-data").read_text(encoding="utf-8")
    out, group, subgroup = [], "", ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            fields, _, comment = line.partition("#")
            cps, _, status = fields.partition(";")
            if status.strip() != "fully-qualified":
                continue
            # comment: "<emoji> E<version> <name>"
            parts = comment.strip().split(" ", 2)
            name = parts[2] if len(parts) == 3 else comment.strip()
            out.append(Emoji(tuple(int(c, 16) for c in cps.split()), name, group, subgroup))
    if not out:
        raise UserError(f"{path} lists no fully-qualified emoji; is it Unicode's emoji-test.txt?")
    return out


def emoji_classes(emoji: Sequence[Emoji], min_groups: int) -> list[str]:
    """Subgroups (in file order) with at least ``min_groups`` distinct variant groups."""
    groups: dict[str, set[str]] = {}
    for e in emoji:
        groups.setdefault(e.subgroup, set()).add(e.variant_group)
    return [s for s, g in groups.items() if len(g) >= min_groups]


def emoji_split(
    emoji: Sequence[Emoji], classes: Sequence[str], test_fraction: float, seed: int
) -> dict[str, str]:
    """variant group -> "train" | "test", stratified by subgroup: in each subgroup the groups are ordered
    by a seeded hash and the first ``round(test_fraction * n)`` (at least one) go to test."""
    by_class: dict[str, list[str]] = {}
    for e in emoji:
        if e.subgroup in classes:
            groups = by_class.setdefault(e.subgroup, [])
            if e.variant_group not in groups:
                groups.append(e.variant_group)
    side = {}
    for groups in by_class.values():
        ordered = sorted(groups, key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())
        n_test = min(len(ordered) - 1, max(1, round(test_fraction * len(ordered))))
        for i, g in enumerate(ordered):
            side[g] = "test" if i < n_test else "train"
    return side


class EmojiNotRendered(ValueError):
    """The font has no single glyph for this emoji (it would draw several)."""


def render_emoji(
    text: str, font, size: int, margin: float = 0.06, background=(255, 255, 255)
) -> np.ndarray:
    """One emoji -> RGB uint8 [size, size, 3]: drawn at the font's strike, cropped to its pixels, centred
    on a square ``background`` canvas with ``margin`` (fraction of the side) around it, resized (Lanczos)."""
    from PIL import Image, ImageDraw

    left, _, right, bottom = font.getbbox(text)
    if (
        right - left > 1.5 * font.size * 1.25 or right <= left
    ):  # several glyphs side by side: not in font
        raise EmojiNotRendered(text)
    canvas = Image.new("RGBA", (right + 8, bottom + 8), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        raise EmojiNotRendered(text)
    glyph = canvas.crop(bbox)
    side = math.ceil(max(glyph.size) / (1 - 2 * margin))
    square = Image.new("RGBA", (side, side), (*background, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return np.asarray(
        square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS), np.uint8
    )


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _emoji_builder_class():
    """Defines (once) and returns the TFDS builder; TFDS registers it by class name: ``emoji_subgroups``."""
    global _EMOJI_BUILDER
    if _EMOJI_BUILDER is not None:
        return _EMOJI_BUILDER
    import tensorflow_datasets as tfds

    @dataclasses.dataclass
    class EmojiSubgroupsConfig(tfds.core.BuilderConfig):
        image_size: int = 64  # output side, pixels
        test_fraction: float = 0.25  # of each subgroup's variant groups
        min_groups_per_class: int = 5  # subgroups with fewer variant groups are left out
        split_seed: int = 0
        margin: float = 0.06  # blank border around the glyph, fraction of the side

    class EmojiSubgroups(tfds.core.GeneratorBasedBuilder):
        """Color emoji (Noto Color Emoji, Debian) labelled by their Unicode emoji subgroup.

        Reads two local files (no download): the font (``$TAGJAX_EMOJI_FONT``, default Debian's
        fonts-noto-color-emoji) and emoji-test.txt (``$TAGJAX_EMOJI_TEST``, default Debian's
        unicode-data). Skin-tone and gender variants share a ``group`` and always the same split.
        """

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES: ClassVar[dict] = {
            "1.0.0": "Emoji 15.0 subgroups; skin-tone and gender variants grouped."
        }
        BUILDER_CONFIGS: ClassVar[list] = [
            EmojiSubgroupsConfig(name="64px", description="64 x 64 images", image_size=64),
            EmojiSubgroupsConfig(name="32px", description="32 x 32 images", image_size=32),
            EmojiSubgroupsConfig(name="128px", description="128 x 128 images", image_size=128),
        ]

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            # TFDS finds a builder's file through importlib.resources, which fails for an editable install
            # of tagjax (its finder makes a namespace-like package); the file defining the class is the answer.
            from etils import epath

            return epath.Path(__file__)

        def _paths(self) -> tuple[str, str]:
            return (
                os.environ.get("TAGJAX_EMOJI_FONT", EMOJI_FONT),
                os.environ.get("TAGJAX_EMOJI_TEST", EMOJI_TEST),
            )

        def _info(self):
            _, test_path = self._paths()
            emoji = parse_emoji_test(test_path)
            classes = emoji_classes(emoji, self.builder_config.min_groups_per_class)
            size = self.builder_config.image_size
            return tfds.core.DatasetInfo(
                builder=self,
                description=(
                    "Color emoji rendered from Noto Color Emoji, labelled by Unicode emoji subgroup "
                    f"({len(classes)} classes); skin-tone and gender variants share a group and a split."
                ),
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                        "label": tfds.features.ClassLabel(names=classes),
                        "group": tfds.features.Text(),  # variant group (code points without tones/gender)
                        "name": tfds.features.Text(),  # CLDR short name, e.g. "waving hand: medium skin tone"
                        "emoji": tfds.features.Text(),  # the characters themselves
                    }
                ),
                supervised_keys=("image", "label"),
                homepage="https://unicode.org/emoji/charts/emoji-list.html",
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # everything is local
            font_path, test_path = self._paths()
            emoji = parse_emoji_test(test_path)
            cfg = self.builder_config
            classes = emoji_classes(emoji, cfg.min_groups_per_class)
            side = emoji_split(emoji, classes, cfg.test_fraction, cfg.split_seed)
            kept = [e for e in emoji if e.subgroup in classes]
            return {
                split: self._generate_examples(
                    [e for e in kept if side[e.variant_group] == split], font_path, classes
                )
                for split in ("train", "test")
            }

        def _generate_examples(self, emoji, font_path, classes):
            from PIL import ImageFont

            _require_file(font_path, "fonts-noto-color-emoji")
            font = ImageFont.truetype(font_path, EMOJI_STRIKE, layout_engine=ImageFont.Layout.RAQM)
            index = {c: i for i, c in enumerate(classes)}
            cfg = self.builder_config
            for e in emoji:
                try:
                    pixels = render_emoji(e.text, font, cfg.image_size, cfg.margin)
                except EmojiNotRendered:
                    continue  # an older font without this emoji: it is left out
                yield (
                    e.key,
                    {
                        "image": _png(
                            pixels
                        ),  # encoded bytes: TFDS stores them as is (no TensorFlow)
                        "label": index[e.subgroup],
                        "group": e.variant_group,
                        "name": e.name,
                        "emoji": e.text,
                    },
                )

    _EMOJI_BUILDER = EmojiSubgroups
    return EmojiSubgroups


_EMOJI_BUILDER = None
# Builders tagjax defines and prepares itself (offline, on first use).
OWN_BUILDERS = {"emoji_subgroups": _emoji_builder_class}


def prepare_own(name: str, data_dir: str | None = None) -> Path:
    """Prepares one of tagjax's own TFDS datasets (if not already) and returns its directory.

    ``name`` is ``emoji_subgroups`` or ``emoji_subgroups/<config>``; written in ArrayRecord format, which
    ``tfds.data_source`` reads without TensorFlow.
    """
    base, _, config = name.partition("/")
    if base not in OWN_BUILDERS:
        raise UserError(
            f"{name!r} is not one of tagjax's own datasets ({', '.join(OWN_BUILDERS)})."
        )
    cls = OWN_BUILDERS[base]()
    configs = {c.name: c for c in cls.BUILDER_CONFIGS}
    if config and config not in configs:
        raise UserError(f"{base} has no config {config!r}: choose one of {', '.join(configs)}.")
    root = Path(data_dir or default_data_dir()).expanduser()
    prepared = root / base / (config or cls.BUILDER_CONFIGS[0].name) / str(cls.VERSION)
    if (prepared / "dataset_info.json").is_file():
        return prepared  # reading a prepared copy needs neither the font nor emoji-test.txt
    builder = cls(config=config or None, data_dir=str(root), file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare()
    return Path(builder.data_dir)


# ----------------------------------------------------------------------------------------------------
# Decontamination in feature space.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NearDuplicates:
    """Training images whose embedding lies within ``threshold`` cosine similarity of an evaluation image."""

    train_ids: list[str]  # post ids to exclude, most similar first
    pairs: list[dict]  # {"train_id", "eval_index", "eval_name", "similarity"} for inspection
    threshold: float
    num_train: int
    num_eval: int
    nearest: (
        np.ndarray
    )  # [num_eval]: each evaluation image's highest similarity (to choose a threshold)


def nearest_neighbours(
    queries: np.ndarray,
    keys: np.ndarray,
    k: int,
    *,
    chunk: int = 4096,
    center: np.ndarray | None = None,
):
    """Cosine top-``k`` neighbours of each query among ``keys`` -> (similarities [Q, k], indices [Q, k]).

    ``center`` (e.g. the mean key) is subtracted from both sides first, then rows are L2-normalized; keys
    are scanned ``chunk`` rows at a time (a memory-mapped .npy works), so memory stays at Q x chunk
    similarities whatever the number of training images.
    """
    import jax
    import jax.numpy as jnp

    shift = None if center is None else np.asarray(center, np.float32)

    def normalize(x):
        x = np.asarray(x, np.float32)
        if shift is not None:
            x = x - shift
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    q = jnp.asarray(normalize(queries))
    k = min(k, len(keys))
    best_s = jnp.full((len(queries), k), -jnp.inf)
    best_i = jnp.zeros((len(queries), k), jnp.int32)

    @jax.jit
    def merge(best_s, best_i, block, offset):
        sims = q @ block.T
        ids = offset + jnp.arange(block.shape[0], dtype=jnp.int32)
        all_s = jnp.concatenate([best_s, sims], axis=1)
        all_i = jnp.concatenate([best_i, jnp.broadcast_to(ids, sims.shape)], axis=1)
        s, pos = jax.lax.top_k(all_s, k)
        return s, jnp.take_along_axis(all_i, pos, axis=1)

    for start in range(0, len(keys), chunk):
        block = normalize(keys[start : start + chunk])
        if (
            len(block) < chunk and len(keys) > chunk
        ):  # keep one compiled shape: pad with zero vectors
            block = np.pad(block, ((0, chunk - len(block)), (0, 0)))
        best_s, best_i = merge(best_s, best_i, jnp.asarray(block), jnp.int32(start))
    s, i = np.asarray(best_s), np.asarray(best_i)
    i = np.where(i < len(keys), i, -1)
    return s, i


def mean_embedding(embeddings: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Mean row of a (possibly memory-mapped) embedding matrix, read ``chunk`` rows at a time."""
    total = np.zeros(embeddings.shape[1], np.float64)
    for start in range(0, len(embeddings), chunk):
        total += np.asarray(embeddings[start : start + chunk], np.float64).sum(axis=0)
    return (total / max(len(embeddings), 1)).astype(np.float32)


def find_near_duplicates(
    eval_embeddings: np.ndarray,
    train_embeddings: np.ndarray,
    train_ids: Sequence[str],
    *,
    threshold: float,
    k: int = 5,
    eval_names: Sequence[str] | None = None,
    center: bool = True,
) -> NearDuplicates:
    """Training images among the ``k`` nearest neighbours of some evaluation image with cosine similarity
    >= ``threshold``. The paper removed such images (after inspecting them) before pretraining.

    ``center``: measure similarity between features minus the mean training feature. Pooled ReLU features
    are all non-negative, so raw cosine similarities of unrelated images crowd near 1; centring spreads them
    and makes one threshold meaningful across models.
    """
    if len(train_ids) != len(train_embeddings):
        raise ValueError(f"{len(train_ids)} ids for {len(train_embeddings)} training embeddings")
    shift = mean_embedding(train_embeddings) if center else None
    sims, idx = nearest_neighbours(eval_embeddings, train_embeddings, k, center=shift)
    best: dict[int, tuple[float, int]] = {}
    for q in range(sims.shape[0]):
        for s, t in zip(sims[q], idx[q]):
            if t >= 0 and s >= threshold and (t not in best or s > best[t][0]):
                best[int(t)] = (float(s), q)
    order = sorted(best, key=lambda t: -best[t][0])
    pairs = [
        {
            "train_id": str(train_ids[t]),
            "eval_index": best[t][1],
            "eval_name": str(eval_names[best[t][1]]) if eval_names is not None else str(best[t][1]),
            "similarity": round(best[t][0], 6),
        }
        for t in order
    ]
    return NearDuplicates(
        [str(train_ids[t]) for t in order],
        pairs,
        threshold,
        len(train_embeddings),
        len(eval_embeddings),
        sims[:, 0].copy(),
    )


def write_exclude_list(result: NearDuplicates, path: str | Path) -> Path:
    """Writes the ids ``tagjax build --exclude`` reads (one post id per line, ``#`` comments) and, beside
    it, ``<path>.pairs.jsonl`` with every (train, eval, similarity) pair for inspection."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# tagjax decontamination: {len(result.train_ids)} of {result.num_train} training images within "
        f"cosine similarity {result.threshold} of one of {result.num_eval} evaluation images\n"
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + "".join(f"{i}\n" for i in result.train_ids))
    os.replace(tmp, path)
    pairs = path.with_name(path.name + ".pairs.jsonl")
    pairs.write_text("".join(json.dumps(p) + "\n" for p in result.pairs))
    return path


def read_id_list(path: str | Path) -> list[str]:
    """Post ids from an exclude list (blank lines and ``#`` comments ignored)."""
    lines = Path(path).read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


# ----------------------------------------------------------------------------------------------------
# tagjax decontaminate
# ----------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="the trunk whose features define similarity (a trained "
        "or imported checkpoint; the better the features, the better the matches)",
    )
    parser.add_argument(
        "--train",
        required=True,
        help="the pretraining images: a dataset built by `tagjax build` "
        "(ids are post ids) or a folder of images (ids are relative paths)",
    )
    parser.add_argument(
        "--train-split", default="train", help="split of a built dataset (default train)"
    )
    parser.add_argument(
        "--eval",
        required=True,
        action="append",
        dest="evals",
        metavar="EVAL",
        help="evaluation images: a downstream dataset name (cifar10, emoji_subgroups, ...), "
        "a class-per-folder directory or a folder of images; repeat for several",
    )
    parser.add_argument(
        "--eval-split", default="test", help="split of each downstream dataset (default test)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="TFDS data directory for downstream datasets"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.95,
        help="cosine similarity (of mean-centred "
        "features) at or above which a training image is excluded (default 0.95)",
    )
    parser.add_argument(
        "--neighbours", type=int, default=5, help="neighbours examined per evaluation image"
    )
    parser.add_argument(
        "--output",
        required=True,
        help="the exclude list (one post id per line) for "
        "`tagjax build`; PATH.pairs.jsonl lists every match for inspection",
    )
    parser.add_argument(
        "--embeddings-dir",
        default=None,
        help="where embeddings are cached (default: beside --output); an interrupted run resumes",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")


def run(args) -> int:
    from tagjax import predict

    if not -1.0 <= args.threshold <= 1.0:
        raise UserError(
            f"--threshold {args.threshold} is not a cosine similarity (between -1 and 1)."
        )
    output = Path(args.output).expanduser()
    cache = (
        Path(args.embeddings_dir).expanduser()
        if args.embeddings_dir
        else output.parent / f"{output.name}.embeddings"
    )
    inference = predict.Inference(args.checkpoint, head=False)

    def embed(spec: str, split: str | None, prefix: Path):
        source = predict.resolve_input(spec, split, args.data_dir)
        print(f"embedding {source.description}: {source.length:,} images")
        predict.embed(inference, source, prefix, batch_size=args.batch_size)
        rows = predict.read_index(f"{prefix}.index.jsonl")
        emb = np.load(f"{prefix}.npy", mmap_mode="r")
        keep = np.asarray([r["valid"] for r in rows], bool)
        return emb, [str(r["id"]) for r in rows], keep

    train_emb, train_ids, train_ok = embed(args.train, args.train_split, cache / "train")
    eval_parts, eval_names = [], []
    for i, spec in enumerate(args.evals):
        emb, ids, ok = embed(spec, args.eval_split, cache / f"eval{i}")
        eval_parts.append(np.asarray(emb)[ok])
        eval_names.extend(np.asarray(ids)[ok].tolist())
    rows = np.flatnonzero(train_ok)
    result = find_near_duplicates(
        np.concatenate(eval_parts),
        np.asarray(train_emb)[rows],
        [train_ids[r] for r in rows],
        threshold=args.threshold,
        k=args.neighbours,
        eval_names=eval_names,
    )
    write_exclude_list(result, output)
    q = (
        np.percentile(result.nearest, [50, 90, 99, 100])
        if len(result.nearest)
        else [float("nan")] * 4
    )
    print(
        f"nearest training image per evaluation image, cosine similarity: median {q[0]:.3f}, p90 {q[1]:.3f}, "
        f"p99 {q[2]:.3f}, max {q[3]:.3f}"
    )
    print(
        f"{len(result.train_ids):,} of {result.num_train:,} training images are within {args.threshold} of one of "
        f"{result.num_eval:,} evaluation images -> {output} (pairs for inspection: {output}.pairs.jsonl)"
    )
    return 0
