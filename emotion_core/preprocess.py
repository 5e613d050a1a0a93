"""Image bytes -> model input. ONE code path, used by training and by labelling.

:func:`decode_image` turns bytes into the model's uint8 ``(C, size, size)`` input (and the
original size); :func:`decode_batch` does a list and turns failures into error strings (the
labelling job's error rows); :func:`normalize` turns a uint8 batch into the model's float tensor
in one op. Broken input raises :class:`ImageDecodeError` with a short machine-friendly ``reason``.
The decoding policy (formats, EXIF orientation, draft-mode JPEG decode, the decompression-bomb
limit, compositing on white, scaling of high bit depths) is documented next to its constants below.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

from emotion_core.errors import short_error


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: a square ``size`` x ``size`` image with ``channels`` channels
    (1 = grayscale, 3 = RGB), normalised per channel as ``(x / 255 - mean) / std``."""

    size: int = 48
    channels: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(
            size=int(d["size"]),
            channels=int(d["channels"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
        )


class ImageDecodeError(ValueError):
    """An image that cannot be turned into model input. ``reason`` is a short code for error rows
    (e.g. "empty", "not_an_image", "truncated", "decompression_bomb", "unsupported_mode")."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# --------------------------------------------------------------------------------------------
# Decoding policy (decisions, in one place):
# * Formats: JPEG (incl. MPO), PNG, WebP, GIF (first frame), BMP, TIFF (first page). Anything
#   else, including formats Pillow could open (EPS would even start Ghostscript), is
#   "not_an_image".
# * Decompression bombs: the pixel count from the header is checked BEFORE any pixel is decoded;
#   more than MAX_PIXELS (64 MP) is rejected. Pillow's own DecompressionBombError (and its
#   warning, if a caller turned warnings into errors) maps to the same reason. Pillow's warning
#   alone can only fire above Pillow's limit (89 MP), i.e. for images we then reject anyway.
# * Truncated files are errors: ImageFile.LOAD_TRUNCATED_IMAGES is never set, and the image is
#   fully load()ed inside the try block.
# * Big JPEGs are decoded at 1/2, 1/4 or 1/8 scale by libjpeg (Image.draft) to the smallest
#   size still >= the target, and a grayscale model gets the JPEG's luma plane directly.
# * Geometry: the whole image is resized to size x size (no crop, no padding: aspect ratio is
#   not kept, as Keras' ``target_size``), with antialiased BILINEAR (reducing_gap=3, so huge
#   non-JPEG images are box-reduced first); images already at the target size are not touched.
# * EXIF orientation is applied (as ImageOps.exif_transpose would), after the resize since the
#   target is square; the reported width/height are as a viewer shows the image, i.e. after
#   the orientation is applied.
# * Transparency (RGBA, LA, PA, P/L/RGB with a transparent colour) is composited on WHITE,
#   as the image looks on a web page or in most viewers.
# * High bit depth is scaled, not clipped: I;16* by 255/65535; I and F by their value range
#   (values within 0..1 (F only), 0..255 or 0..65535 keep that scale, otherwise min-max).
# * Colour: CMYK, YCbCr, P, 1 etc. go through Pillow's convert(); RGB -> L uses ITU-R 601
#   luma (same as the JPEG luma plane); L -> RGB repeats the channel.
# --------------------------------------------------------------------------------------------

MAX_PIXELS = 64_000_000
REASONS = frozenset(
    {"empty", "not_an_image", "truncated", "decompression_bomb", "unsupported_mode", "decode_failed"}
)
FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# File extensions of the formats above (listing inputs; compare with str.lower().endswith).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
BACKGROUND = 255  # composite transparent images on white
RESAMPLE = Image.Resampling.BILINEAR
REDUCING_GAP = 3.0

_SIGNATURES: dict[bytes, str] = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
_EXIF_INFO_KEYS = frozenset({"exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif"})
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = {"RGBA": "RGBA", "LA": "LA", "RGBa": "RGBA", "La": "LA", "PA": "RGBA"}


def decode_image(data: bytes, spec: InputSpec) -> tuple[np.ndarray, int, int]:
    """Decode image bytes to the model's pixels.

    Returns ``(pixels, width, height)``: a C-contiguous, writable uint8 array shaped
    ``(spec.channels, spec.size, spec.size)`` and the image's original size as a viewer shows it
    (after EXIF orientation). Any problem with the bytes raises :class:`ImageDecodeError`, never
    another exception type.
    """
    if not data:
        raise ImageDecodeError("empty", "0 bytes")
    if not isinstance(data, bytes):  # bytearray, memoryview, numpy bytes...
        try:
            data = bytes(data)
        except TypeError:
            raise ImageDecodeError("not_an_image", f"expected bytes, got {type(data).__name__}") from None
    try:
        return _decode(data, spec)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("decompression_bomb", short_error(e)) from None
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except Exception as e:  # every failure on untrusted bytes becomes a typed error
        raise ImageDecodeError(_failure_reason(e, data), short_error(e)) from None


def _decode(data: bytes, spec: InputSpec) -> tuple[np.ndarray, int, int]:
    im = Image.open(io.BytesIO(data), formats=FORMATS)
    width, height = im.size
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(
            "decompression_bomb", f"{width}x{height} is {width * height} pixels, more than {MAX_PIXELS}"
        )
    size = spec.size
    if im.format == "JPEG" or im.format == "MPO":
        im.draft("L" if spec.channels == 1 else "RGB", (size, size))
    im.load()

    orientation = 1
    if im.format == "TIFF" or not _EXIF_INFO_KEYS.isdisjoint(im.info):
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in (5, 6, 7, 8):
            width, height = height, width

    im = _to_8bit(im, "L" if spec.channels == 1 else "RGB")
    if im.mode == "RGB" and spec.channels == 1:
        im = im.convert("L")
    if im.size != (size, size):
        im = im.resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)
    if orientation in _TRANSPOSE:
        im = im.transpose(_TRANSPOSE[orientation])

    pixels = np.asarray(im)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[None], spec.channels, axis=0)  # (1|3, H, W), a writable copy
    else:
        pixels = np.ascontiguousarray(pixels.transpose(2, 0, 1))
    return pixels, width, height


def _to_8bit(im: Image.Image, want: str) -> Image.Image:
    """Any supported mode -> an 8-bit "L" or "RGB" image (``want`` picks for colour sources)."""
    mode = im.mode
    if "transparency" in im.info and mode in ("P", "L", "RGB"):
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("L", "RGB"):
        return im
    if mode in _ALPHA_MODES:
        if im.mode != _ALPHA_MODES[mode]:
            im = im.convert(_ALPHA_MODES[mode])
        base = "L" if im.mode == "LA" else "RGB"
        out = Image.new(base, im.size, (BACKGROUND,) * len(base))
        out.paste(im.convert(base), mask=im.getchannel("A"))
        return out
    if mode == "1":
        return im.convert("L")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(im), mode), "L")
    try:
        try:
            return im.convert(want)  # P, CMYK, YCbCr, RGBX, HSV, ...
        except ValueError:
            return im.convert("RGB")  # e.g. LAB has no direct route to L
    except ValueError as e:
        raise ImageDecodeError("unsupported_mode", f"cannot convert mode {mode} to {want}: {e}") from None


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """High bit depth -> 0..255 by scaling (never clipping). Memory: one working copy (uint32 or
    float32) of the full-resolution image, scaled in place, then the uint8 result."""
    if mode.startswith("I;16"):
        w = a.astype(np.uint32)
        w *= 255
        w += 32767
        w //= 65535
        return w.astype(np.uint8)
    w = a.astype(np.float32)
    np.nan_to_num(w, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(w.min()), float(w.max())
    if lo >= 0 and hi <= 1 and mode == "F":
        lo, hi = 0.0, 1.0
    elif lo >= 0 and hi <= 255:
        lo, hi = 0.0, 255.0
    elif lo >= 0 and hi <= 65535:
        lo, hi = 0.0, 65535.0
    w -= lo
    w *= 255.0 / (hi - lo) if hi > lo else 0.0
    np.rint(w, out=w)
    return w.astype(np.uint8)


def _signature(data: bytes) -> str | None:
    for magic, fmt in _SIGNATURES.items():
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _unidentified(data: bytes) -> ImageDecodeError:
    """Why Pillow could not identify the bytes: a known signature whose header does not parse is
    truncated/corrupt (or in a pixel layout Pillow cannot represent); anything else is not an image."""
    fmt = _signature(data)
    if fmt is None:
        return ImageDecodeError("not_an_image", f"not a {'/'.join(FORMATS)} image ({len(data)} bytes)")
    try:  # error path only: ask the format's own parser what is wrong
        Image.OPEN[fmt][0](io.BytesIO(data), "")
    except Exception as e:  # any parser error explains the failure
        if "mode" in str(e).lower():
            return ImageDecodeError("unsupported_mode", f"{fmt}: {short_error(e)}")
        return ImageDecodeError("truncated", f"{fmt} header incomplete or corrupt: {short_error(e)}")
    return ImageDecodeError("decode_failed", f"{fmt} file could not be identified")


def _failure_reason(e: Exception, data: bytes) -> str:
    msg = str(e).lower()
    if "truncated" in msg or "broken data stream" in msg:
        return "truncated"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and int.from_bytes(data[4:8], "little") + 8 > len(data):
        return "truncated"
    return "decode_failed"


def decode_batch(
    items: Sequence[bytes | None], spec: InputSpec
) -> tuple[np.ndarray, list[int | None], list[int | None], list[str | None]]:
    """Decode many images; never raises for bad bytes.

    Returns ``(pixels, widths, heights, errors)``: uint8 ``(N, C, size, size)``; per item the
    original width/height (None where decoding failed) and ``None`` or ``"<reason>: <detail>"``.
    Failed items are all-zero pixels. ``None`` items (e.g. unreadable objects) count as empty.
    """
    n = len(items)
    pixels = np.zeros((n, spec.channels, spec.size, spec.size), dtype=np.uint8)
    widths: list[int | None] = [None] * n
    heights: list[int | None] = [None] * n
    errors: list[str | None] = [None] * n
    for i, data in enumerate(items):
        try:
            pixels[i], widths[i], heights[i] = decode_image(data or b"", spec)
        except ImageDecodeError as e:
            errors[i] = f"{e.reason}: {e.detail or e.reason}"
    return pixels, widths, heights, errors


@lru_cache(maxsize=32)
def _mean_std(spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std shaped (C, 1, 1) for broadcasting over a batch."""
    import torch

    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    return mean, std


def normalize(batch: np.ndarray | torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` or ``(C, H, W)`` (numpy or torch, any device) -> float32 tensor of the
    same shape, ``(x / 255 - mean) / std`` per channel, computed for the whole batch at once.
    torch is imported here, not at module level: decoding (listing, shard and decode tasks) never
    needs it."""
    import torch

    if isinstance(batch, np.ndarray):
        if batch.dtype != np.uint8:
            raise TypeError(f"normalize expects uint8 pixels, got numpy {batch.dtype}")
        if not batch.flags.writeable:
            batch = batch.copy()
        batch = torch.from_numpy(batch)
    elif not isinstance(batch, torch.Tensor):
        raise TypeError(f"normalize expects a numpy array or torch tensor, got {type(batch).__name__}")
    if batch.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got torch {batch.dtype}")
    if batch.dim() not in (3, 4) or batch.shape[-3] != spec.channels:
        raise ValueError(
            f"normalize expects (N, {spec.channels}, H, W) or ({spec.channels}, H, W), got {tuple(batch.shape)}"
        )
    mean, std = (t.to(batch.device) for t in _mean_std(spec))
    return batch.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def preprocess(data: bytes, spec: InputSpec) -> torch.Tensor:
    """Image bytes -> normalised float32 ``(C, size, size)`` tensor; raises ImageDecodeError."""
    return normalize(decode_image(data, spec)[0], spec)
