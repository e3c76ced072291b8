"""One image as a user uploaded it -> the RGB JPEG a dataset stores, or a counted reason to skip it.

Uploaded images come in every shape a camera, a phone or an editor writes: grayscale, CMYK from print
workflows, palette GIFs and PNGs with transparency, 16-bit PNGs, rotated phone photos (EXIF orientation),
files cut off mid-download, and hostile ones whose header claims billions of pixels. :func:`process` turns
any of them into one canonical form (RGB, transparency composited onto white, upright, shorter side at most
``max_side``, baseline JPEG) or raises :class:`ImageSkip` with a reason from :data:`SKIP_REASONS`. The
builder counts the reasons; none of them ends a build on its own (a failure *fraction* above a threshold
does, in :mod:`tagjax.build`).

Decoding: baseline JPEGs (nearly all of a photo corpus) go through libjpeg-turbo via ``simplejpeg`` in
strict mode: it downsamples in the DCT domain while decoding (a 4000px photo built at 256px decodes at
1/8 scale, ~10x faster than a full decode) and, unlike PIL, refuses entropy-coded data that is corrupt
instead of returning a half-grey picture. Everything else (PNG, GIF, WebP, BMP, TIFF, CMYK/YCCK JPEGs)
goes through PIL, which raises on truncated or broken streams.
"""

from __future__ import annotations

import dataclasses
import io
import re
import warnings

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps

# A file that ends early must fail, not decode as a grey lower half.
ImageFile.LOAD_TRUNCATED_IMAGES = False

CORRUPT = "corrupt_image"  # not an image, or its data stream is broken
TRUNCATED = "truncated_image"  # the file ends before the image does
BOMB = "decompression_bomb"  # the header claims more pixels than ``max_pixels``
TOO_SMALL = "too_small"  # shorter side below ``min_side``
EXTREME_ASPECT = "extreme_aspect"  # longer side / shorter side above ``max_aspect``
SKIP_REASONS = (CORRUPT, TRUNCATED, BOMB, TOO_SMALL, EXTREME_ASPECT)
# Reasons that mean "the input is broken", counted against the build's failure threshold; the others
# are filters a healthy corpus trips too.
FAILURE_REASONS = frozenset({CORRUPT, TRUNCATED, BOMB})

DEFAULT_MAX_FILE_BYTES = 50 * 2**20  # 50 MiB: far above any photo, far below a memory problem

_EXIF_ORIENTATION = 0x0112


_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


class ImageSkip(Exception):
    """This image cannot or should not enter the dataset; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        # PIL names its in-memory file in messages ("cannot identify image file <_io.BytesIO object
        # at 0x7f...>"): an internal repr that tells the user nothing, dropped here.
        detail = _OBJECT_REPR.sub("", detail).strip()
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How images are normalized. Sizes in pixels; the builder exposes each one as a flag."""

    max_side: int = 256  # the shorter side is resized down to at most this (never up)
    min_side: int = 16  # a source whose shorter side is smaller is skipped (too_small)
    max_pixels: int = (
        89_478_485  # width*height above this is a decompression bomb (PIL's own default)
    )
    max_aspect: float = 8.0  # longer/shorter side above this is skipped (banners, strips)
    jpeg_quality: int = 90  # re-encoding quality (libjpeg scale 1-100)
    # Size cap of one input file, archive member or manifest line, checked before reading
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES

    def __post_init__(self):
        if self.max_side < 1 or self.min_side < 1 or self.min_side > self.max_side:
            raise ValueError(
                f"need 1 <= min_side <= max_side, got {self.min_side}, {self.max_side}"
            )
        if self.max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be positive, got {self.max_file_bytes}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


@dataclasses.dataclass(frozen=True)
class Processed:
    """The stored form of one image, plus the pixels the hashes are computed from."""

    jpeg: bytes
    width: int
    height: int
    source_width: (
        int  # as uploaded (after EXIF rotation); the dedup keep rule prefers larger sources
    )
    source_height: int
    pixels: np.ndarray  # uint8 [height, width, 3], exactly what was JPEG-encoded

    @property
    def source_pixels(self) -> int:
        return self.source_width * self.source_height


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) with the shorter side at most ``max_side``, aspect kept, never upscaled."""
    short = min(width, height)
    if short <= max_side:
        return width, height
    scale = max_side / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def _check_geometry(width: int, height: int, opts: ImageOptions) -> None:
    if width <= 0 or height <= 0:
        raise ImageSkip(CORRUPT, f"header says {width}x{height}")
    if width * height > opts.max_pixels:
        raise ImageSkip(BOMB, f"{width}x{height} > {opts.max_pixels} pixels")
    if min(width, height) < opts.min_side:
        raise ImageSkip(TOO_SMALL, f"{width}x{height}, shorter side < {opts.min_side}")
    if max(width, height) / min(width, height) > opts.max_aspect:
        raise ImageSkip(EXTREME_ASPECT, f"{width}x{height}, aspect > {opts.max_aspect}")


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _has_app1_segment(jpeg: bytes) -> bool:
    """Whether the JPEG's header holds an APP1 segment (EXIF or XMP: where PIL finds an orientation),
    or cannot be walked; False means upright for sure, without the ~0.08 ms of PIL parsing the header."""
    i = 2  # after SOI
    while i + 4 <= len(jpeg):
        if jpeg[i] != 0xFF:
            return True  # not a marker where one must be: let PIL judge
        marker = jpeg[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
        elif marker in (0xDA, 0xD9):  # start of scan / end of image: the header is over
            return False
        elif marker == 0xE1:
            return True
        else:
            i += 2 + (jpeg[i + 2] << 8 | jpeg[i + 3])
    return True


def _exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1 = upright) without decoding pixels; 1 when absent or unreadable."""
    if not _has_app1_segment(data):
        return 1
    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:
        return 1


# EXIF orientation -> the PIL transpose that makes the image upright (EXIF 2.3, tag 0x0112).
_ORIENT = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


def _dct_scale(width: int, height: int, target_w: int, target_h: int) -> int:
    """The largest of 8, 4, 2, 1 that a JPEG can be decoded smaller by and still cover the target.

    Only powers of two: libjpeg-turbo's SIMD inverse DCTs cover those, while the other M/8 factors it
    offers run in plain C and cost more than decoding at the next power of two (decode and resize,
    1024x768 -> 341x256: 1.28 ms at 1/2 instead of 1.45 at 3/8; 500x375: 0.57 at 1/1 instead of 0.82
    at 6/8). The stored pixels are as close to an area-averaged full decode either way (photos:
    1.0 grey levels mean error at 1/2 against 1.7 at 3/8; benchmarks/README.md, "Side by side")."""
    scale = 8
    while scale > 1 and (-(-width // scale) < target_w or -(-height // scale) < target_h):
        scale //= 2
    return scale


def _decode_fast_jpeg(data: bytes, opts: ImageOptions) -> tuple[np.ndarray, int, int] | None:
    """Baseline YCbCr/gray JPEG -> (RGB pixels, source w, h) via libjpeg-turbo; None to use PIL instead.

    The pixels stay a numpy array (no PIL round trip) unless the EXIF orientation needs a transpose."""

    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # let PIL name the problem
    if colorspace not in ("YCbCr", "Gray"):
        return None  # CMYK / YCCK: PIL knows Adobe's inverted CMYK convention
    orientation = _exif_orientation(data)
    w, h = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    _check_geometry(w, h, opts)
    scale = _dct_scale(width, height, *target_size(width, height, opts.max_side))
    try:
        # min_height/min_width: libjpeg picks the largest DCT scaling that stays at or above them,
        # here exactly 1/scale.
        array = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            min_height=-(-height // scale),
            min_width=-(-width // scale),
            strict=True,
        )
    except ValueError as e:
        message = str(e)
        reason = TRUNCATED if "Premature end" in message else CORRUPT
        raise ImageSkip(reason, message) from None
    if orientation in _ORIENT:
        image = Image.fromarray(array)
        for op in _ORIENT[orientation]:
            image = image.transpose(op)
        array = np.asarray(image)
    return array, w, h


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white (cliparts, logos, stickers)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _decode_pil(data: bytes, opts: ImageOptions) -> tuple[Image.Image, int, int]:
    try:
        with warnings.catch_warnings():
            # Our own pixel limit is checked from the header below; PIL's warning would be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > opts.max_pixels:
                raise ImageSkip(BOMB, f"{width}x{height} > {opts.max_pixels} pixels")
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
            w, h = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
            _check_geometry(w, h, opts)
            if image.format == "JPEG":
                # DCT-domain downscaling for the JPEGs simplejpeg left to us (CMYK, progressive oddities).
                tw, th = target_size(width, height, opts.max_side)
                image.draft(image.mode, (tw, th))
            image.load()
            image = ImageOps.exif_transpose(image) if orientation != 1 else image
            return _to_rgb(image), w, h
    except ImageSkip:
        raise
    except Image.DecompressionBombError as e:
        raise ImageSkip(BOMB, str(e)) from None
    except OSError as e:
        message = str(e)
        reason = TRUNCATED if "truncated" in message.lower() else CORRUPT
        raise ImageSkip(reason, message) from None
    except (
        Exception
    ) as e:  # PIL raises many types (SyntaxError, ValueError, struct.error) on bad input
        raise ImageSkip(CORRUPT, f"{type(e).__name__}: {e}") from None


def decode_pixels(data: bytes, opts: ImageOptions) -> tuple[np.ndarray, int, int]:
    """Encoded bytes -> (RGB uint8 pixels [H, W, 3], upright source width, height). The pixels may
    already be partly downscaled (JPEG DCT scaling), never below ``max_side`` on their shorter side."""
    if not data:
        raise ImageSkip(CORRUPT, "empty file")
    if _is_jpeg(data):
        fast = _decode_fast_jpeg(data, opts)
        if fast is not None:
            return fast
    image, w, h = _decode_pil(data, opts)
    return np.asarray(image, dtype=np.uint8), w, h


def decode(data: bytes, opts: ImageOptions) -> tuple[Image.Image, int, int]:
    """:func:`decode_pixels` as a PIL image (for callers that transform it with PIL)."""
    pixels, w, h = decode_pixels(data, opts)
    return Image.fromarray(pixels), w, h


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """RGB uint8 [H, W, 3] -> baseline JPEG (4:2:0), the format every decoder reads fastest."""

    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(pixels), quality=quality, colorspace="RGB", colorsubsampling="420"
    )


def process(data: bytes, opts: ImageOptions) -> Processed:
    """Decode, make RGB and upright, shrink the shorter side to ``max_side``, re-encode as JPEG.

    Raises ImageSkip (never anything else for bad input) with a reason from SKIP_REASONS.
    """
    pixels, source_w, source_h = decode_pixels(data, opts)
    height, width = pixels.shape[:2]
    tw, th = target_size(width, height, opts.max_side)
    if (tw, th) != (width, height):
        # Only ever a downscale. Beyond 2x, area averaging (the alias-free filter; OpenCV's is twice as
        # fast as PIL's bicubic). Below 2x, which is where JPEG DCT scaling leaves nearly every photo,
        # bilinear: every source pixel still contributes, it is ~5x faster than OpenCV's area filter at
        # fractional factors, and it differs from it by ~0.4 grey levels on average (far below the
        # JPEG re-encoding's error; benchmarks/README.md, "Dataset build throughput").
        factor = min(width / tw, height / th)
        interpolation = cv2.INTER_LINEAR if factor < 2 else cv2.INTER_AREA
        pixels = cv2.resize(pixels, (tw, th), interpolation=interpolation)
    return Processed(
        jpeg=encode_jpeg(pixels, opts.jpeg_quality),
        width=tw,
        height=th,
        source_width=source_w,
        source_height=source_h,
        pixels=pixels,
    )
