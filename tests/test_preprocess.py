"""Preprocessing: every format x mode to a grayscale-48 and an RGB-96 spec, orientation, big JPEGs,
and bad input (empty, truncated, non-image, decompression bombs) as typed errors."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from PIL.JpegImagePlugin import JpegImageFile

from emotion_core import preprocess as pp
from emotion_core.preprocess import (
    ImageDecodeError,
    InputSpec,
    decode_batch,
    decode_image,
    normalize,
    preprocess,
)

GRAY48 = InputSpec(size=48, channels=1, mean=(0.5,), std=(0.5,))
RGB96 = InputSpec(size=96, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
SPECS = [pytest.param(GRAY48, id="gray48"), pytest.param(RGB96, id="rgb96")]

W, H = 60, 40  # not square, not the target size: exercises the resize


def _base_rgb() -> Image.Image:
    ramp = np.tile(np.linspace(0, 255, W).astype(np.uint8), (H, 1))
    vert = np.tile(np.linspace(0, 255, H).astype(np.uint8)[:, None], (1, W))
    return Image.merge("RGB", [Image.fromarray(ramp), Image.fromarray(vert), Image.fromarray(255 - ramp)])


def _in_mode(mode: str) -> Image.Image:
    rgb = _base_rgb()
    gray = rgb.convert("L")
    if mode == "RGBA":
        im = rgb.convert("RGBA")
        alpha = np.full((H, W), 255, np.uint8)
        alpha[:, : W // 4] = 0  # a transparent strip
        im.putalpha(Image.fromarray(alpha))
        return im
    if mode == "LA":
        im = gray.convert("LA")
        im.putalpha(Image.fromarray(np.full((H, W), 128, np.uint8)))
        return im
    if mode == "I;16":
        return Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    if mode == "F":
        return Image.fromarray(np.asarray(gray).astype(np.float32) / 255.0)
    if mode == "1":
        return gray.convert("1")
    return rgb.convert(mode)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


CASES = [
    ("JPEG", "L"),
    ("JPEG", "RGB"),
    ("JPEG", "CMYK"),
    ("PNG", "L"),
    ("PNG", "RGB"),
    ("PNG", "RGBA"),
    ("PNG", "P"),
    ("PNG", "LA"),
    ("PNG", "1"),
    ("PNG", "I;16"),
    ("BMP", "L"),
    ("BMP", "RGB"),
    ("BMP", "P"),
    ("BMP", "1"),
    ("WEBP", "RGB"),
    ("WEBP", "RGBA"),
    ("GIF", "L"),
    ("GIF", "P"),
    ("GIF", "1"),
    ("TIFF", "L"),
    ("TIFF", "RGB"),
    ("TIFF", "RGBA"),
    ("TIFF", "P"),
    ("TIFF", "CMYK"),
    ("TIFF", "I;16"),
    ("TIFF", "LA"),
    ("TIFF", "1"),
    ("TIFF", "F"),
    ("TIFF", "YCbCr"),
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("fmt,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_every_format_and_mode(fmt, mode, spec):
    data = _encode(_in_mode(mode), fmt)
    pixels, width, height = decode_image(data, spec)
    assert (width, height) == (W, H)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (spec.channels, spec.size, spec.size)
    assert pixels.flags.c_contiguous and pixels.flags.writeable
    assert pixels.max() > 100, "image content lost (all dark)"
    if mode != "1":
        assert len(np.unique(pixels)) > 8, "gradient collapsed to a few levels (clipping?)"
    if spec.channels == 3 and mode in ("RGB", "CMYK", "RGBA", "P") and fmt != "GIF":
        assert not np.array_equal(pixels[0], pixels[2]), "colour lost"
    x = preprocess(data, spec)
    assert x.dtype == torch.float32 and x.shape == pixels.shape


def test_gray_output_matches_pillow_reference():
    """Grayscale = ITU-R 601 luma, then an antialiased bilinear resize to the square target."""
    rgb = _base_rgb()
    ref = np.asarray(rgb.convert("L").resize((48, 48), Image.Resampling.BILINEAR), dtype=np.int16)
    got, _, _ = decode_image(_encode(rgb, "PNG"), GRAY48)
    assert np.abs(got[0].astype(np.int16) - ref).max() <= 1


def test_already_at_target_size_is_untouched():
    arr = np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)
    got, w, h = decode_image(_encode(Image.fromarray(arr), "PNG"), GRAY48)
    assert (w, h) == (48, 48)
    np.testing.assert_array_equal(got[0], arr)
    got3, _, _ = decode_image(_encode(Image.fromarray(arr), "PNG"), InputSpec(48, 3, (0.5,) * 3, (0.5,) * 3))
    np.testing.assert_array_equal(got3, np.stack([arr] * 3))


def test_transparency_is_composited_on_white():
    im = Image.new("RGBA", (48, 48), (255, 0, 0, 0))  # fully transparent red
    got, _, _ = decode_image(_encode(im, "PNG"), RGB96)
    assert (got == pp.BACKGROUND).all()
    pal = Image.new("P", (48, 48), 0)
    pal.putpalette([0, 0, 0] * 256)
    got, _, _ = decode_image(_encode(pal, "PNG", transparency=0), GRAY48)
    assert (got == pp.BACKGROUND).all()


def test_16_bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, 0).repeat(12, 1)  # 4x48
    im = Image.fromarray(np.tile(values, (12, 1)))  # 48x48
    for fmt in ("PNG", "TIFF"):
        got, _, _ = decode_image(_encode(im, fmt), GRAY48)
        assert sorted(np.unique(got).tolist()) == [0, 1, 128, 255]


def test_animated_gif_uses_first_frame():
    frames = [Image.new("L", (50, 50), 0), Image.new("L", (50, 50), 255)]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    got, w, h = decode_image(data, GRAY48)
    assert (w, h) == (50, 50)
    assert got.max() == 0


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_applied_and_size_as_displayed(orientation):
    half = np.zeros((H, W), np.uint8)
    half[:, W // 2 :] = 255  # left black, right white
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(half), "JPEG", exif=exif.tobytes(), quality=95)
    got, w, h = decode_image(data, GRAY48)
    assert (w, h) == ((H, W) if orientation in (6, 8) else (W, H))
    img = got[0].astype(int)
    top, bottom = img[:20].mean(), img[-20:].mean()
    left, right = img[:, :20].mean(), img[:, -20:].mean()
    bright = {1: right > left, 3: left > right, 6: bottom > top, 8: top > bottom}[orientation]
    assert bright, f"orientation {orientation} not applied"


def test_large_jpeg_uses_draft_mode(monkeypatch):
    im = Image.linear_gradient("L").resize((4000, 3000)).convert("RGB")
    data = _encode(im, "JPEG", quality=80)
    scales = []
    real_draft = JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        scales.append(self.decoderconfig[0] if result else 1)
        return result

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    start = time.perf_counter()
    got, w, h = decode_image(data, GRAY48)
    elapsed = time.perf_counter() - start
    assert (w, h) == (4000, 3000)
    assert got.shape == (1, 48, 48)
    assert scales == [8], "JPEG was not decoded at reduced size"
    assert elapsed < 1.0
    # the top of a vertical gradient is dark, the bottom bright
    assert got[0, :5].mean() < 40 and got[0, -5:].mean() > 215


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height 8-bit grayscale pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)  # a few rows; the rest would be missing
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


@pytest.mark.parametrize("width,height", [(30000, 30000), (9000, 9000)])
def test_decompression_bomb_rejected_before_decoding(width, height):
    data = _png_header_only(width, height)
    assert len(data) < 1000
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data, GRAY48)
    assert e.value.reason == "decompression_bomb"


def test_compressible_bomb_just_over_limit():
    side = int(pp.MAX_PIXELS**0.5) + 1
    assert side * side > pp.MAX_PIXELS
    with pytest.raises(ImageDecodeError) as e:
        decode_image(_png_header_only(side, side), GRAY48)
    assert e.value.reason == "decompression_bomb"


def _truncated(fmt: str) -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), fmt)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "data,reason",
    [
        pytest.param(b"", "empty", id="empty"),
        pytest.param(None, "empty", id="none"),
        pytest.param(b"hello, this is text and not an image\n" * 3, "not_an_image", id="text"),
        pytest.param(np.random.default_rng(2).bytes(5000), "not_an_image", id="random"),
        pytest.param(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not_an_image", id="svg"),
        pytest.param(_truncated("JPEG"), "truncated", id="jpeg-half"),
        pytest.param(_truncated("PNG"), "truncated", id="png-half"),
        pytest.param(_truncated("WEBP"), "truncated", id="webp-half"),
        pytest.param(_truncated("GIF"), "truncated", id="gif-half"),
        pytest.param(_truncated("TIFF"), "truncated", id="tiff-half"),
        pytest.param(_truncated("JPEG")[:40], "truncated", id="jpeg-header-only"),
        pytest.param(b"GIF89a\x01", "truncated", id="gif-magic-only"),
    ],
)
def test_bad_bytes_raise_typed_error(data, reason):
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data, GRAY48)
    assert e.value.reason == reason
    assert "\n" not in str(e.value) and str(e.value).startswith(reason)


@pytest.mark.parametrize("spec", SPECS)
def test_lab_tiff_is_converted(spec):
    pixels, _, _ = decode_image(_encode(_base_rgb().convert("LAB"), "TIFF"), spec)
    assert pixels.shape == (spec.channels, spec.size, spec.size) and pixels.max() > 100


def test_bytes_like_inputs():
    data = _encode(_base_rgb(), "PNG")
    expected = decode_image(data, GRAY48)[0]
    for wrapped in (bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(decode_image(wrapped, GRAY48)[0], expected)
    with pytest.raises(ImageDecodeError) as e:
        decode_image(memoryview(b"plain text, not an image"), GRAY48)
    assert e.value.reason == "not_an_image"
    with pytest.raises(ImageDecodeError) as e:
        decode_image("a file name, not bytes", GRAY48)
    assert e.value.reason == "not_an_image"


def test_unsupported_mode():
    """A TIFF with 24-bit grayscale samples: a valid file in a layout Pillow cannot represent."""
    data = bytearray(_encode(Image.new("L", (8, 8), 7), "TIFF"))
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == 258:  # BitsPerSample
            data[entry + 8 : entry + 10] = struct.pack("<H", 24)
    with pytest.raises(ImageDecodeError) as e:
        decode_image(bytes(data), GRAY48)
    assert e.value.reason == "unsupported_mode"


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about corrupt TIFF tags
def test_corrupted_bytes_never_raise_another_exception():
    rng = np.random.default_rng(3)
    kinds = [("JPEG", "RGB"), ("PNG", "RGBA"), ("GIF", "P"), ("TIFF", "RGB"), ("WEBP", "RGB"), ("BMP", "RGB")]
    originals = [_encode(_in_mode(mode), fmt) for fmt, mode in kinds]
    for data in originals:
        for _ in range(15):
            bad = bytearray(data)
            for pos in rng.integers(0, len(bad), 8):
                bad[pos] = int(rng.integers(0, 256))
            try:
                pixels, _, _ = decode_image(bytes(bad), GRAY48)
                assert pixels.shape == (1, 48, 48)
            except ImageDecodeError as e:
                assert e.reason in pp.REASONS


def test_truncated_images_stay_errors():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_batch_mixes_good_and_bad():
    good = _encode(_base_rgb(), "JPEG")
    pixels, widths, heights, errors = decode_batch([good, b"", b"not an image", good], RGB96)
    assert pixels.shape == (4, 3, 96, 96) and pixels.dtype == np.uint8
    assert widths == [W, None, None, W] and heights == [H, None, None, H]
    assert errors[0] is None and errors[3] is None
    assert errors[1].startswith("empty: ") and errors[2].startswith("not_an_image: ")
    assert not pixels[1].any() and not pixels[2].any()
    np.testing.assert_array_equal(pixels[0], decode_image(good, RGB96)[0])


@pytest.mark.parametrize("spec", SPECS)
def test_normalize_batch_matches_per_image(spec):
    rng = np.random.default_rng(4)
    batch = rng.integers(0, 256, (5, spec.channels, spec.size, spec.size), dtype=np.uint8)
    out = normalize(batch, spec)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    for i in range(len(batch)):
        torch.testing.assert_close(out[i], normalize(torch.from_numpy(batch[i]), spec))
    mean, std = np.array(spec.mean)[:, None, None], np.array(spec.std)[:, None, None]
    expected = (batch.astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    torch.testing.assert_close(normalize(torch.from_numpy(batch), spec), out)


def test_normalize_range_and_bad_input():
    x = normalize(np.array([[[0, 255]]], dtype=np.uint8), GRAY48)
    assert x.tolist() == [[[-1.0, 1.0]]]
    with pytest.raises(TypeError):
        normalize(np.zeros((1, 48, 48), np.float32), GRAY48)
    with pytest.raises(ValueError):
        normalize(np.zeros((3, 48, 48), np.uint8), GRAY48)


def test_input_spec_round_trip():
    assert InputSpec.from_dict(RGB96.to_dict()) == RGB96
    with pytest.raises(ValueError):
        InputSpec(channels=2, mean=(0.5, 0.5), std=(0.5, 0.5))


def test_high_bit_depth_conversion_makes_one_working_copy():
    """A full-resolution float or 16-bit image is scaled in place: peak extra memory is one
    float32 (or uint32) copy plus the uint8 result, not several float64 copies."""
    import tracemalloc

    from emotion_core.preprocess import _scale_to_uint8

    rng = np.random.default_rng(0)
    for mode, a in (("F", rng.random((1500, 1500), dtype=np.float32) * 3000 - 1000),
                    ("I;16", rng.integers(0, 65535, (1500, 1500), dtype=np.uint16))):
        tracemalloc.start()
        out = _scale_to_uint8(a, mode)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert out.dtype == np.uint8 and out.shape == a.shape and out.max() == 255
        assert peak < 12 * a.size, (mode, peak / a.size)  # measured 9 B/pixel; the float64 version took 24
