"""Decode and augment one image into a caller's uint8 buffer: the CPU cost of the input pipeline.

Training: random-resized-crop (area and aspect ranges, as torchvision's RandomResizedCrop) + horizontal
flip (+ optional color jitter). Evaluation: resize the shorter side, center crop. Output is always uint8 HWC
RGB written in place into a slice of the batch array; normalization (mean/std) runs on the accelerator.

Why it is fast (see benchmarks/README.md for the numbers against a plain PIL pipeline):

* The crop is chosen from the JPEG header *before* decoding, so libjpeg-turbo (simplejpeg) can decode at
  the smallest DCT scale M/8 that still leaves the crop at least as large as the output (reduced-size
  decoding: a 1000px image cropped to 224 decodes at 1/4 the pixels). The remaining resize is then always
  a mild one, which bilinear interpolation handles without aliasing.
* OpenCV resizes the crop (a view, no copy) straight into the batch slice; the flip is done in place.
* ``fast_jpeg`` uses libjpeg-turbo's fast integer DCT and fast chroma upsampling (a few % faster; the
  difference is below JPEG's own quantization error).

Random choices come from a vector of uniforms the caller draws per position (tagjax.sampling.uniforms),
so an image's augmentation depends only on ``(seed, position)``.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import simplejpeg

cv2.setNumThreads(1)  # one image per call; parallelism comes from worker processes

# torchvision's RandomResizedCrop tries 10 times to fit a crop, then falls back to a center crop.
CROP_ATTEMPTS = 10
# Uniforms one training image consumes: 2 per crop attempt, 2 for the crop offset, 1 flip, 3 jitter, 1 order.
NUM_UNIFORMS = 2 * CROP_ATTEMPTS + 7
_U_OFFSET = 2 * CROP_ATTEMPTS
_U_FLIP = _U_OFFSET + 2
_U_JITTER = _U_FLIP + 1
_GRAY = np.asarray([0.299, 0.587, 0.114], np.float32)


class BadImage(ValueError):
    """An image that cannot be decoded."""


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    size: int  # output side, pixels
    area_range: tuple[float, float] = (0.08, 1.0)  # crop area as a fraction of the image
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height
    flip: bool = True
    color_jitter: float = 0.0  # brightness/contrast/saturation factors in [1 - s, 1 + s]
    fast_jpeg: bool = True

    @classmethod
    def from_config(cls, data) -> TrainAugment:
        return cls(
            size=int(data.image_size),
            area_range=tuple(float(x) for x in data.crop_area_range),
            aspect_range=tuple(float(x) for x in data.crop_aspect_range),
            flip=bool(data.flip),
            color_jitter=float(data.color_jitter),
            fast_jpeg=bool(data.get("fast_jpeg", True)),
        )


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    resize: int  # shorter side after resizing, pixels
    size: int  # center crop side, pixels
    fast_jpeg: bool = True

    @classmethod
    def from_config(cls, data) -> EvalTransform:
        return cls(
            int(data.eval_resize), int(data.eval_image_size), bool(data.get("fast_jpeg", True))
        )


def crop_window(
    h: int, w: int, u: np.ndarray, area_range, aspect_range
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop of an ``h`` x ``w`` image, from uniforms ``u``."""
    area = h * w
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    for a in range(CROP_ATTEMPTS):
        target = area * (area_range[0] + (area_range[1] - area_range[0]) * u[2 * a])
        ratio = math.exp(log_lo + (log_hi - log_lo) * u[2 * a + 1])
        cw = round(math.sqrt(target * ratio))
        ch = round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:  # fall back to the largest centered crop within the aspect range
        in_ratio = w / h
        if in_ratio < aspect_range[0]:
            cw, ch = w, round(w / aspect_range[0])
        elif in_ratio > aspect_range[1]:
            ch, cw = h, round(h * aspect_range[1])
        else:
            ch, cw = h, w
        ch, cw = max(1, min(ch, h)), max(1, min(cw, w))
        return (h - ch) // 2, (w - cw) // 2, ch, cw
    top = min(int(u[_U_OFFSET] * (h - ch + 1)), h - ch)
    left = min(int(u[_U_OFFSET + 1] * (w - cw + 1)), w - cw)
    return top, left, ch, cw


def _decode(data: bytes, min_h: int, min_w: int, fast: bool) -> np.ndarray:
    """JPEG -> RGB uint8, at the smallest DCT scale keeping at least ``min_h`` x ``min_w`` pixels.

    Other formats (PNG, CMYK JPEGs libjpeg-turbo refuses) go through OpenCV at full size.
    """
    try:
        return simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            fastdct=fast,
            fastupsample=fast,
            min_height=min_h,
            min_width=min_w,
        )
    except (ValueError, TypeError):
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise BadImage("undecodable image") from None
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _header(data: bytes) -> tuple[int, int]:
    """(height, width) from the JPEG header without decoding; (0, 0) when it is not a readable JPEG."""
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        return int(h), int(w)
    except (ValueError, TypeError):
        return 0, 0


def _resize_into(src: np.ndarray, out: np.ndarray) -> None:
    oh, ow = out.shape[:2]
    if src.shape[0] == oh and src.shape[1] == ow:
        out[...] = src
        return
    shrinking = (
        src.shape[0] > 2 * oh or src.shape[1] > 2 * ow
    )  # only when the DCT scale could not help
    cv2.resize(
        src, (ow, oh), dst=out, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    )


def train_image(image, out: np.ndarray, u: np.ndarray, aug: TrainAugment) -> None:
    """Random-resized-crop + flip (+ jitter) of ``image`` (JPEG bytes or an RGB uint8 array) into ``out``."""
    if isinstance(image, np.ndarray):
        h, w = image.shape[:2]
        top, left, ch, cw = crop_window(h, w, u, aug.area_range, aug.aspect_range)
        crop = image[top : top + ch, left : left + cw]
    else:
        h, w = _header(image)
        if h and w:
            top, left, ch, cw = crop_window(h, w, u, aug.area_range, aug.aspect_range)
            img = _decode(
                image, math.ceil(h * aug.size / ch), math.ceil(w * aug.size / cw), aug.fast_jpeg
            )
        else:  # not a JPEG: decode fully, then crop
            img = _decode(image, 0, 0, aug.fast_jpeg)
            h, w = img.shape[:2]
            top, left, ch, cw = crop_window(h, w, u, aug.area_range, aug.aspect_range)
        sy, sx = img.shape[0] / h, img.shape[1] / w
        y0, x0 = int(top * sy), int(left * sx)
        y1 = max(y0 + 1, min(img.shape[0], round((top + ch) * sy)))
        x1 = max(x0 + 1, min(img.shape[1], round((left + cw) * sx)))
        crop = img[y0:y1, x0:x1]
    _resize_into(crop, out)
    if aug.flip and u[_U_FLIP] < 0.5:
        cv2.flip(out, 1, dst=out)
    if aug.color_jitter > 0:
        color_jitter(out, aug.color_jitter, u[_U_JITTER : _U_JITTER + 3])


def eval_image(image, out: np.ndarray, tf: EvalTransform) -> None:
    """Resize the shorter side to ``tf.resize`` and center crop ``tf.size``, into ``out``.

    Only the central window is resampled (straight to ``size`` x ``size``); it equals resize-then-crop.
    """
    if isinstance(image, np.ndarray):
        img = image
    else:
        h, w = _header(image)
        if h and w:  # the smallest DCT scale that keeps the shorter side >= resize
            short = min(h, w)
            img = _decode(
                image,
                math.ceil(h * tf.resize / short),
                math.ceil(w * tf.resize / short),
                tf.fast_jpeg,
            )
        else:
            img = _decode(image, 0, 0, tf.fast_jpeg)
    h, w = img.shape[:2]
    scale = tf.resize / min(h, w)  # decoded pixels -> resized pixels
    side = min(tf.size / scale, h, w)  # the window, in decoded pixels, that becomes the center crop
    top, left = (h - side) / 2, (w - side) / 2
    # At least one pixel each way: a window under 1 px (an image 1 px wide or tall) would round to none.
    y0, x0 = round(top), round(left)
    crop = img[y0 : max(y0 + 1, round(top + side)), x0 : max(x0 + 1, round(left + side))]
    _resize_into(crop, out)


def color_jitter(img: np.ndarray, strength: float, u: np.ndarray) -> None:
    """Brightness, contrast, saturation factors in [1 - s, 1 + s] (torchvision's ColorJitter), in place."""
    b, c, s = (1.0 - strength + 2.0 * strength * float(x) for x in u[:3])
    x = img.astype(np.float32)
    x *= b
    mean = float((x @ _GRAY).mean())
    x -= mean
    x *= c
    x += mean
    gray = (x @ _GRAY)[..., None]
    x -= gray
    x *= s
    x += gray
    np.clip(x, 0, 255, out=x)
    np.rint(x, out=x)
    img[...] = x.astype(np.uint8)
