"""Find and label the faces in a few images with a trained model, for one-off checks (batch work is `jobs.label`).

    python -m jobs.predict --model runs/emonet/models/latest.json  party.jpg face.png s3://bucket/x.jpg
    python -m jobs.predict --model s3://bucket/models/latest.json --json photo.jpg
    python -m jobs.predict --model runs/latest.json --annotate out.jpg photo.jpg     # draws the faces
    python -m jobs.predict --model runs/latest.json --annotate annotated/ a.jpg b.jpg

--model is a model directory or a pointer JSON (latest.json), local or s3://. Images are local
paths or s3:// URIs. --faces auto (the default) classifies an image no larger than the model's
input (a face crop, e.g. 48x48) whole and runs the default face detector on anything larger; a
detector name forces that detector for every image ("none": always the whole image).

Output: one line per face (`IMAGE  face K  box X,Y,W,H  LABEL CONF  [probabilities]`, boxes in
original-image pixels), `IMAGE  no face found` for an image without one, or one JSON object per
face with --json (face_index null for an image without faces or with an error). --annotate OUT
draws each face's box, label and confidence: with one image OUT is the picture (.jpg, .jpeg or
.png), with several OUT is a folder that receives <stem>.annotated.jpg per image.

An unreadable image gets an ERROR line and the exit code is 1; a bad --model, --faces or
--annotate is a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from ._cli import ArgumentParser, JobError, UsageError, run_main

PICTURE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def build_parser() -> argparse.ArgumentParser:
    from emotion_core.faces import list_detectors

    p = ArgumentParser(
        prog="python -m jobs.predict",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory or pointer .json (local path or s3://)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (local paths or s3:// URIs)")
    p.add_argument("--faces", default="auto", choices=["auto", *list_detectors()],
                   help="face detector: auto (whole image when it is no larger than the model input, else "
                        "the default detector) or a registered one (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object per face instead of text")
    p.add_argument("--annotate", metavar="OUT", default=None,
                   help="draw boxes and labels: the output picture (.jpg/.png) for one image, a folder for several")
    return p


def rows(image: str, result) -> list[dict]:
    """The --json objects for one :class:`emotion_core.recognize.ImageResult`: one per face, or one
    with face_index null for an image without faces or with an error."""
    base = {"image": image, "width": result.width, "height": result.height, "detector": result.detector,
            "faces_in_image": len(result.faces)}
    if not result.faces:
        return [{**base, "face_index": None, "box": None, "score": None, "label": None, "confidence": None,
                 "probabilities": None, "error": result.error}]
    return [{**base, "face_index": k, "box": list(f.box), "score": round(f.score, 4), "label": f.label,
             "confidence": f.confidence, "probabilities": f.probabilities, "error": None}
            for k, f in enumerate(result.faces)]


def text_lines(image: str, result, width: int) -> list[str]:
    """The text output for one image: one line per face, or one ``no face found`` / ``ERROR`` line."""
    if result.error:
        return [f"{image:<{width}}  ERROR {result.error}"]
    if not result.faces:
        return [f"{image:<{width}}  no face found"]
    out = []
    for k, f in enumerate(result.faces):
        probs = "  ".join(f"{c} {p:.3f}" for c, p in f.probabilities.items())
        box = ",".join(str(v) for v in f.box)
        out.append(f"{image:<{width}}  face {k}  box {box}  {f.label:<8} {f.confidence:.3f}   [{probs}]")
    return out


def annotation_targets(out: str | None, images: list[str]) -> list[str | None]:
    """Where each image's annotated picture goes (see module doc); a bad OUT is a UsageError."""
    from pathlib import PurePosixPath

    from emotion_core import storage

    if out is None:
        return [None] * len(images)
    suffix = PurePosixPath(out).suffix.lower()
    if len(images) == 1:
        if suffix not in PICTURE_FORMATS:
            raise UsageError(f"--annotate {out!r}: with one image, name the output picture (.jpg, .jpeg or .png)")
        return [out]
    if suffix in PICTURE_FORMATS:
        raise UsageError(f"--annotate {out!r}: with {len(images)} images, pass a folder (each image becomes "
                         "FOLDER/<stem>.annotated.jpg)")
    targets, used = [], set()
    for image in images:
        stem = PurePosixPath(image.rstrip("/")).stem or "image"
        name, n = f"{stem}.annotated.jpg", 1
        while name in used:  # a/x.jpg and b/x.jpg: x.annotated.jpg, x-2.annotated.jpg
            n += 1
            name = f"{stem}-{n}.annotated.jpg"
        used.add(name)
        targets.append(storage.join(out, name))
    return targets


def save_picture(im, uri: str) -> None:
    import io
    from pathlib import PurePosixPath

    from emotion_core import storage

    buf = io.BytesIO()
    fmt = PICTURE_FORMATS[PurePosixPath(uri).suffix.lower()]
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    storage.write_bytes(uri, buf.getvalue())


def run(args: argparse.Namespace) -> list[dict]:
    from emotion_core import storage
    from emotion_core.checkpoint import CheckpointError
    from emotion_core.faces import DetectorUnavailableError
    from emotion_core.recognize import ImageResult, Recognizer

    targets = annotation_targets(args.annotate, args.images)
    try:
        rec = Recognizer(args.model, detector=args.faces)
    except DetectorUnavailableError as e:
        raise UsageError(f"--faces {args.faces}: {e}") from e
    except (CheckpointError, storage.StorageError, ValueError) as e:
        raise UsageError(f"--model: {e}") from e

    width = max(len(p) for p in args.images)
    out, failed = [], 0
    for image, target in zip(args.images, targets):
        try:
            data = storage.read_bytes(image)
        except storage.StorageError as e:
            result = ImageResult(image, None, None, rec.detector.name, error=f"unreadable: {e}")
        else:
            result = rec([data], errors="keep")[0]
        failed += result.error is not None
        written = None
        if target and result.error is None:
            save_picture(rec.annotate(data, result), target)
            written = target
        if args.json:
            for row in rows(image, result):
                print(json.dumps({**row, **({"annotated": written} if written else {})}))
                out.append(row)
        else:
            print("\n".join(text_lines(image, result, width)))
            if written:
                print(f"{image:<{width}}  annotated -> {written}")
            out.extend(rows(image, result))
    if failed:
        raise JobError(f"{failed} of {len(args.images)} image(s) could not be read or decoded")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("jobs.predict", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
