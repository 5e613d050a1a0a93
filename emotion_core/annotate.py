"""Draw what :class:`emotion_core.recognize.Recognizer` found on the photo it found it in.

    from emotion_core.annotate import annotate
    result = rec(["party.jpg"])[0]
    annotate("party.jpg", result).save("party.annotated.jpg")   # or display it in a notebook

Each face gets its box and a filled label box ("happy 0.87") above it, or inside the top of the
face box when there is no room above; one colour per emotion, the same in every picture. Line
width and font size scale with the photo (about 1/300 and 1/32 of its longer side), so a label is
readable on a 512 px portrait and on a 4000 px group photo alike. The font is Pillow's bundled
default at that size (``ImageFont.load_default(size=...)``, FreeType); nothing is downloaded.

The photo is shown as a viewer shows it (EXIF orientation applied), which is the frame the boxes
are in. The result is a new RGB image; the input is never modified.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from emotion_core import storage
from emotion_core.faces import decode_photo
from emotion_core.labels import CANONICAL
from emotion_core.recognize import ImageInput, ImageResult

# One colour per canonical emotion (colour-blind-friendly Okabe-Ito palette plus grey).
COLOURS = dict(zip(CANONICAL, [
    (213, 94, 0),  # angry: vermillion
    (0, 158, 115),  # disgust: bluish green
    (204, 121, 167),  # fear: reddish purple
    (240, 228, 66),  # happy: yellow
    (153, 153, 153),  # neutral: grey
    (0, 114, 178),  # sad: blue
    (86, 180, 233),  # surprise: sky blue
]))


def annotate(image: ImageInput | Image.Image, result: ImageResult) -> Image.Image:
    """``image`` (path/URI, bytes, RGB/gray uint8 array or PIL image: the one ``result`` came from)
    with each face's box, label and confidence drawn on it."""
    im = _load(image).copy()
    if result.width and result.height and im.size != (result.width, result.height):
        raise ValueError(f"image is {im.width}x{im.height} but the result is for {result.width}x{result.height}")
    draw = ImageDraw.Draw(im)
    longer = max(im.size)
    line = max(2, round(longer / 300))
    font = ImageFont.load_default(size=max(12, round(longer / 32)))
    for face in result.faces:
        x, y, w, h = face.box
        colour = COLOURS.get(face.label, (255, 255, 255))
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=line)
        text = f"{face.label} {face.confidence:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        pad = max(2, line)
        bw, bh = right - left + 2 * pad, bottom - top + 2 * pad
        ly = y - bh if y - bh >= 0 else y  # above the face, else inside its top edge
        lx = min(max(0, x), max(0, im.width - bw))
        draw.rectangle([lx, ly, lx + bw - 1, ly + bh - 1], fill=colour)
        ink = (0, 0, 0) if sum(c * k for c, k in zip(colour, (0.299, 0.587, 0.114))) > 140 else (255, 255, 255)
        draw.text((lx + pad - left, ly + pad - top), text, fill=ink, font=font)
    return im


def _load(image: ImageInput | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        a = image if image.ndim == 2 else image[:, :, :3]
        return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")
    data = storage.read_bytes(str(image)) if isinstance(image, str | Path) else bytes(image)
    return Image.fromarray(decode_photo(data).pixels)  # the recogniser's decode: same orientation
