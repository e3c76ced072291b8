"""Our own downstream dataset: color emoji by Unicode subgroup, a TFDS builder prepared offline.

The emoji come from Debian's unicode-data (emoji-test.txt: the fully-qualified emoji with their group and
subgroup) and are drawn with Debian's fonts-noto-color-emoji. The label is the Unicode subgroup
(``face-smiling``, ``animal-mammal``, ...); skin-tone and gender variants of one picture share a variant
group and always land in the same split (:func:`emoji_split`).

Importing this module registers the builder with TFDS under its class name, ``emoji_subgroups``, so
``tfds.data_source("emoji_subgroups/64px", ...)`` finds it; :func:`prepare_own` prepares it on first use
(a few seconds, ArrayRecord format, which ``tfds.data_source`` reads without TensorFlow). Opening it for
transfer is tagjax.downstream's job (``open_split("emoji_subgroups", ...)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from tagjax import progress
from tagjax.errors import UserError

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
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


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
        return epath.Path(__file__)

    # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and prepared"
    # to stdout; nothing is downloaded here, so one line on stderr says what happens instead.
    def _log_download_bytes(self) -> None:
        progress.say(
            f"preparing {self.name}/{self.builder_config.name}: rendering emoji from local files "
            f"(nothing is downloaded) into {self.data_dir}"
        )

    def _log_download_done(self) -> None:
        pass

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
                    "image": _png(pixels),  # encoded bytes: TFDS stores them as is (no TensorFlow)
                    "label": index[e.subgroup],
                    "group": e.variant_group,
                    "name": e.name,
                    "emoji": e.text,
                },
            )


# Builders tagjax defines and prepares itself (offline, on first use).
OWN_BUILDERS = {"emoji_subgroups": EmojiSubgroups}


def prepare_own(name: str, data_dir: str | Path) -> Path:
    """Prepares one of tagjax's own TFDS datasets (if not already) and returns its directory.

    ``name`` is ``emoji_subgroups`` or ``emoji_subgroups/<config>``; written in ArrayRecord format, which
    ``tfds.data_source`` reads without TensorFlow.
    """
    base, _, config = name.partition("/")
    if base not in OWN_BUILDERS:
        raise UserError(
            f"{name!r} is not one of tagjax's own datasets ({', '.join(OWN_BUILDERS)})."
        )
    cls = OWN_BUILDERS[base]
    configs = {c.name: c for c in cls.BUILDER_CONFIGS}
    if config and config not in configs:
        raise UserError(f"{base} has no config {config!r}: choose one of {', '.join(configs)}.")
    root = Path(data_dir).expanduser()
    prepared = root / base / (config or cls.BUILDER_CONFIGS[0].name) / str(cls.VERSION)
    if (prepared / "dataset_info.json").is_file():
        return prepared  # reading a prepared copy needs neither the font nor emoji-test.txt
    with _quiet_tfds():
        builder = cls(config=config or None, data_dir=str(root), file_format="array_record")
        if not builder.is_prepared():
            builder.download_and_prepare()
    return Path(builder.data_dir)


class _NoVariantWarnings(logging.Filter):
    """Drops absl's "Variant folder ... has no dataset_info.json": TFDS says it while looking for a
    prepared copy of a dataset that is about to be prepared."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Variant folder")


@contextlib.contextmanager
def _quiet_tfds():
    """TFDS without its lookup warnings, and without its bars when stderr is not a terminal."""
    if not sys.stderr.isatty():
        tfds.disable_progress_bar()
    quiet = _NoVariantWarnings()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    try:
        yield
    finally:
        absl_logger.removeFilter(quiet)
