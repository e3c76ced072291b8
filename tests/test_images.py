"""tagjax.images: every input mode becomes upright RGB JPEG at the configured size; bad input is a reason."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from tagjax import images

OPTS = images.ImageOptions(max_side=32, min_side=8)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def smooth(h=48, w=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    img = (
        base
        + 80 * np.sin(x[..., None] / 7.0 + rng.uniform(0, 6, 3))
        + 60 * np.cos(y[..., None] / 5.0)
    )
    return np.clip(img, 0, 255).astype(np.uint8)


def decoded(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)))


def test_resize_keeps_aspect_shorter_side_at_max_and_never_upscales():
    p = images.process(encode(Image.fromarray(smooth(48, 96)), "PNG"), OPTS)
    assert (p.width, p.height) == (64, 32)
    assert (p.source_width, p.source_height) == (96, 48)
    assert decoded(p.jpeg).shape == (32, 64, 3)
    small = images.process(encode(Image.fromarray(smooth(20, 24)), "PNG"), OPTS)
    assert (small.width, small.height) == (24, 20)


def test_large_jpeg_decodes_downscaled_to_the_target():
    data = encode(Image.fromarray(smooth(600, 800)), "JPEG", quality=90)
    p = images.process(data, OPTS)
    assert (p.width, p.height) == (43, 32)
    assert p.pixels.shape == (32, 43, 3)


def test_jpegs_decode_at_a_power_of_two_scale_that_covers_the_target():
    """DCT scaling only by 1/2, 1/4, 1/8 (SIMD in libjpeg-turbo; 3/8 or 5/8 are slower and blurrier),
    never below the stored size; the stored pixels stay close to an area-averaged full decode."""
    assert images._dct_scale(1024, 768, 341, 256) == 2  # 3/8 would still cover 256
    assert images._dct_scale(4000, 3000, 341, 256) == 8
    assert images._dct_scale(2048, 1536, 341, 256) == 4
    assert images._dct_scale(640, 480, 341, 256) == 1  # 1/2 gives 240 < 256
    assert images._dct_scale(320, 240, 320, 240) == 1
    rng = np.random.default_rng(0)
    source = np.clip(
        smooth(768, 1024, seed=5).astype(int) + rng.integers(-20, 21, (768, 1024, 3)), 0, 255
    ).astype(np.uint8)
    data = encode(Image.fromarray(source), "JPEG", quality=95)
    stored = images.process(data, images.ImageOptions(max_side=256)).pixels
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    area = cv2.resize(full, (341, 256), interpolation=cv2.INTER_AREA)
    assert stored.shape == area.shape == (256, 341, 3)
    assert np.abs(stored.astype(float) - area).mean() < 2.5


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "1", "I;16"])
def test_every_mode_becomes_rgb(mode):
    src = Image.fromarray(smooth(32, 32))
    if mode == "I;16":
        src = Image.fromarray(np.asarray(src.convert("L"), np.uint16) * 257)
        assert src.mode == "I;16"
    else:
        src = src.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    p = images.process(encode(src, fmt), OPTS)
    assert p.pixels.shape == (32, 32, 3) and p.pixels.dtype == np.uint8
    assert decoded(p.jpeg).shape == (32, 32, 3)
    if mode == "CMYK":  # colours survive the CMYK round trip (not inverted)
        ref = np.asarray(Image.fromarray(smooth(32, 32)), np.float64)
        assert np.abs(p.pixels.astype(np.float64) - ref).mean() < 20


def test_transparency_is_composited_onto_white():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = (255, 0, 0, 255)  # an opaque red square on a fully transparent canvas
    p = images.process(encode(Image.fromarray(rgba, "RGBA"), "PNG"), OPTS)
    assert p.pixels[0, 0].tolist() == [255, 255, 255]
    assert p.pixels[16, 16, 0] > 240 and p.pixels[16, 16, 1] < 20
    pal = Image.fromarray(rgba, "RGBA").convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = pal.getpixel((0, 0))
    q = images.process(encode(pal, "PNG", transparency=pal.getpixel((0, 0))), OPTS)
    assert q.pixels[0, 0].tolist() == [255, 255, 255]
    la = Image.fromarray(rgba, "RGBA").convert("LA")
    assert images.process(encode(la, "PNG"), OPTS).pixels[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("where", ["exif", "xmp", "none"])
def test_exif_orientation_is_applied(where):
    """EXIF or XMP orientation 6 (rotate 90 degrees clockwise to display) turns the picture upright; a
    JPEG with neither (no APP1 segment, which skips PIL's header parsing) stays as it is."""
    src = Image.fromarray(smooth(24, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    kw = {
        "exif": {"exif": exif.tobytes()},
        "xmp": {"xmp": b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'},
        "none": {},
    }[where]
    p = images.process(encode(src, "JPEG", **kw), OPTS)
    upright = (48, 24) if where == "none" else (24, 48)
    assert (p.source_width, p.source_height) == upright
    assert (p.width, p.height) == upright


def test_corrupt_truncated_and_garbage_are_reasons_not_crashes():
    good = encode(Image.fromarray(smooth(64, 64, seed=3)), "JPEG", quality=90)
    corrupt = good[:400] + bytes(200) + good[600:]
    assert images.decode(good, OPTS)
    with pytest.raises(images.ImageSkip) as e:
        images.process(corrupt, OPTS)
    assert e.value.reason == images.CORRUPT
    with pytest.raises(images.ImageSkip) as e:
        images.process(good[: len(good) // 2], OPTS)
    assert e.value.reason == images.TRUNCATED
    png = encode(Image.fromarray(smooth(64, 64)), "PNG")
    with pytest.raises(images.ImageSkip) as e:
        images.process(png[: len(png) // 2], OPTS)
    assert e.value.reason == images.TRUNCATED
    for garbage in (b"", b"not an image at all", b"\xff\xd8\xff" + bytes(50)):
        with pytest.raises(images.ImageSkip) as e:
            images.process(garbage, OPTS)
        assert e.value.reason in (images.CORRUPT, images.TRUNCATED)


def test_bomb_tiny_and_extreme_aspect_are_filtered():
    data = encode(Image.fromarray(smooth(64, 64)), "PNG")
    with pytest.raises(images.ImageSkip) as e:
        images.process(data, images.ImageOptions(max_side=32, min_side=8, max_pixels=64 * 63))
    assert e.value.reason == images.BOMB
    jpeg = encode(Image.fromarray(smooth(64, 64)), "JPEG")
    with pytest.raises(images.ImageSkip) as e:
        images.process(jpeg, images.ImageOptions(max_side=32, min_side=8, max_pixels=1000))
    assert e.value.reason == images.BOMB
    with pytest.raises(images.ImageSkip) as e:
        images.process(encode(Image.fromarray(smooth(6, 6)), "PNG"), OPTS)
    assert e.value.reason == images.TOO_SMALL
    with pytest.raises(images.ImageSkip) as e:
        images.process(encode(Image.fromarray(smooth(10, 200)), "PNG"), OPTS)
    assert e.value.reason == images.EXTREME_ASPECT


def test_output_is_deterministic():
    data = encode(Image.fromarray(smooth(80, 60)), "PNG")
    assert images.process(data, OPTS).jpeg == images.process(data, OPTS).jpeg


def test_bad_options_are_refused():
    with pytest.raises(ValueError):
        images.ImageOptions(max_side=16, min_side=32)
    with pytest.raises(ValueError):
        images.ImageOptions(jpeg_quality=0)


def test_reduction_below_2x_stays_within_a_grey_level_of_area_averaging():
    """Below 2x (where JPEG DCT scaling leaves photos) the cheaper bilinear filter is used; it must stay
    close to area averaging, which is still used beyond 2x."""
    opts = images.ImageOptions(max_side=256, min_side=8)
    source = smooth(480, 640, seed=3)  # 480 -> 256: 1.875x, PNG so no DCT scaling happens first
    near = images.process(encode(Image.fromarray(source), "PNG"), opts).pixels
    area = cv2.resize(source, (341, 256), interpolation=cv2.INTER_AREA)
    assert near.shape == area.shape == (256, 341, 3)
    assert np.abs(near.astype(float) - area).mean() < 1.0
    big = smooth(1024, 1280, seed=4)  # 4x: area averaging, exactly
    far = images.process(encode(Image.fromarray(big), "PNG"), opts).pixels
    assert np.array_equal(far, cv2.resize(big, (320, 256), interpolation=cv2.INTER_AREA))
