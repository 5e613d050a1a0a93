"""Generated "photos in the wild" with known face boxes, for the face-detection tests and benchmark.

A scene is a 1280x960 RGB background (smooth colour gradients, random rectangles, ellipses, lines
and sensor noise, so that a detector has edges and blobs to be fooled by) with 0-3 square face
crops pasted in, each upscaled from its source size to 90-260 px and some rotated by up to 25
degrees. A share of the scenes has no face at all.

Face sources: :func:`synthetic_faces` (emotion_core.synthetic cartoon faces; tests) or
:func:`fer_faces` (the FER2013 train crops under ``../shared/data/fer2013/train``, read in place,
never copied into the repository; benchmark). FER faces are 48x48 tight grayscale crops: pasted
at 90-260 px they are 2-5x upscaled and blurry, and pasted as grey squares into colour scenes.
That is harder than real photos for a detector trained on WIDER FACE, so recall measured here is a
pessimistic figure for sharp photos.

The known box of a FER face is the pasted square (side = pasted size, centred where the face
centre lands; for a rotated face the un-rotated square around the same centre), i.e. exactly the
FER crop's extent: the box a perfect detector + crop margin would reproduce. A synthetic face's
box is the square around its oval (0.6 of the pasted side, same centre).

CLI (writes scene JPEGs and ``scenes.json`` with the boxes and labels)::

    python -m bench.scenes OUT [--count N] [--faces synthetic|FER_TRAIN_DIR] [--seed S]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from emotion_core.labels import CANONICAL
from emotion_core.preprocess import IMAGE_EXTENSIONS
from emotion_core.synthetic import render_face

WIDTH, HEIGHT = 1280, 960
FACE_SIZES = (90, 260)
FACE_COUNT_P = (0.2, 0.4, 0.25, 0.15)  # P(0, 1, 2, 3 faces)
ROTATED_SHARE = 0.3
MAX_ROTATION_DEG = 25.0
JPEG_QUALITY = 90
# A synthetic face's oval spans ~0.5-0.65 of its 48 px crop (emotion_core.synthetic: scale 0.8-0.98
# of the half-side, oval radii 0.56-0.64 x 0.74-0.82).
SYNTHETIC_FACE_FRACTION = 0.6



@dataclass(frozen=True)
class FaceSource:
    """``draw(rng) -> (face crop, label)``; ``face_fraction``: the side of the face's box as a share
    of the crop's side (FER crops are the reference box, 1.0; a synthetic face's oval fills ~0.6)."""

    draw: Callable[[np.random.Generator], tuple[Image.Image, str]]
    face_fraction: float = 1.0


@dataclass
class Scene:
    jpeg: bytes
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # x, y, w, h
    labels: list[str] = field(default_factory=list)
    angles: list[float] = field(default_factory=list)
    crops: list[Image.Image] = field(default_factory=list)  # each face's source crop, as drawn


def synthetic_faces() -> FaceSource:
    """emotion_core.synthetic faces (48x48), classes drawn uniformly."""

    def draw(rng: np.random.Generator) -> tuple[Image.Image, str]:
        label = CANONICAL[int(rng.integers(len(CANONICAL)))]
        return render_face(label, rng, 48), label

    return FaceSource(draw, SYNTHETIC_FACE_FRACTION)


def fer_faces(root: str | Path, only: set[str] | None = None) -> FaceSource:
    """Random FER crops from a Kaggle-layout ``root/<class>/*.jpg`` folder, read in place;
    ``only``: just these ``<class>/<file>`` names (e.g. a training run's validation split)."""
    root = Path(root)
    files = sorted(p for p in root.glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS
                   and (only is None or f"{p.parent.name}/{p.name}" in only))
    if not files:
        raise ValueError(f"no images under {root}/<class>/")

    def draw(rng: np.random.Generator) -> tuple[Image.Image, str]:
        path = files[int(rng.integers(len(files)))]
        with Image.open(path) as im:
            return im.convert("L"), path.parent.name

    return FaceSource(draw)


def background(rng: np.random.Generator, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """A face-less cluttered RGB background."""
    xx, yy = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    a = np.empty((height, width, 3), np.float32)
    for c in range(3):
        gx, gy = rng.uniform(-0.1, 0.1, 2)
        a[..., c] = np.add.outer(gy * yy, gx * xx + rng.uniform(40, 215))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(8, 30))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(-100, width), rng.uniform(-100, height)
        w, h = rng.uniform(20, 400, 2)
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            draw.line([x0, y0, x0 + w, y0 + h], fill=colour, width=int(rng.integers(2, 15)))
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * np.float32(rng.uniform(2, 8))
    noisy = np.asarray(im, np.float32) + noise
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def _overlaps(box: tuple[float, float, float, float], others: list[tuple[float, float, float, float]]) -> bool:
    x, y, s, pad = *box[:3], 0.15 * box[2]
    return any(
        x - pad < ox + os_ and ox < x + s + pad and y - pad < oy + os_ and oy < y + s + pad
        for ox, oy, os_, _ in others
    )


def make_scene(
    rng: np.random.Generator,
    faces: FaceSource,
    n_faces: int | None = None,
    sizes: tuple[int, int] = FACE_SIZES,
    rotated_share: float = ROTATED_SHARE,
) -> Scene:
    """One scene; ``n_faces`` None draws 0-3 with :data:`FACE_COUNT_P`; pasted sides are drawn
    from ``sizes`` (inclusive), a ``rotated_share`` of the faces is rotated by 5-25 degrees."""
    if n_faces is None:
        n_faces = int(rng.choice(len(FACE_COUNT_P), p=FACE_COUNT_P))
    im = background(rng)
    scene = Scene(b"")
    placed: list[tuple[float, float, float, float]] = []
    for _ in range(n_faces):
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        rotated = rng.random() < rotated_share
        angle = float(rng.uniform(5, MAX_ROTATION_DEG) * rng.choice([-1, 1])) if rotated else 0.0
        reach = size * (abs(math.cos(math.radians(angle))) + abs(math.sin(math.radians(angle))))
        margin = (reach - size) / 2 + 2
        for _attempt in range(50):
            x = float(rng.uniform(margin, WIDTH - size - margin))
            y = float(rng.uniform(margin, HEIGHT - size - margin))
            if not _overlaps((x, y, size, 0), placed):
                break
        else:
            continue  # no room left
        face, label = faces.draw(rng)
        scene.crops.append(face)
        face = face.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        mask = Image.new("L", (size, size), 255)
        if angle:
            face = face.rotate(angle, Image.Resampling.BICUBIC, expand=True)
            mask = mask.rotate(angle, Image.Resampling.BICUBIC, expand=True)
        cx, cy = x + size / 2, y + size / 2
        im.paste(face, (round(cx - face.width / 2), round(cy - face.height / 2)), mask)
        placed.append((x, y, size, angle))
        side = size * faces.face_fraction
        scene.boxes.append((round(cx - side / 2), round(cy - side / 2), round(side), round(side)))
        scene.labels.append(label)
        scene.angles.append(angle)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=JPEG_QUALITY)
    scene.jpeg = buf.getvalue()
    return scene


def make_scenes(count: int, faces: FaceSource, seed: int = 0) -> list[Scene]:
    """``count`` scenes; scene i depends only on ``(seed, i)`` and the face source."""
    return [make_scene(np.random.default_rng([seed, i]), faces) for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scenes", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (created)")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--faces", default="synthetic", help="'synthetic' or a FER-layout train folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.count < 0:
        print("error: --count must be >= 0", file=sys.stderr)
        return 2
    try:
        source = synthetic_faces() if args.faces == "synthetic" else fer_faces(args.faces)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for i, scene in enumerate(make_scenes(args.count, source, args.seed)):
        name = f"scene_{i:05d}.jpg"
        (out / name).write_bytes(scene.jpeg)
        manifest[name] = {"boxes": scene.boxes, "labels": scene.labels, "angles": scene.angles}
    (out / "scenes.json").write_text(json.dumps(manifest, indent=1))
    faces = sum(len(v["boxes"]) for v in manifest.values())
    print(f"wrote {args.count} scenes with {faces} faces to {out} (boxes in scenes.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
