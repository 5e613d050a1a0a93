"""Label a few images with a trained model, for one-off checks (batch work is `jobs.label`).

    python -m jobs.predict --model runs/emonet/model  face1.jpg face2.png s3://bucket/x.jpg
    python -m jobs.predict --model s3://bucket/models/latest.json --json face.jpg

--model is a model directory or a pointer JSON (latest.json), local or s3://. Each image is read
through emotion_core.storage and decoded with the same preprocessing as training. Output: one line
per image with the predicted label, its probability and all class probabilities (or JSON lines
with --json). An unreadable image gets an ERROR line and the exit code is 1; a bad --model is a
one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from ._cli import ArgumentParser, JobError, UsageError, run_main


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m jobs.predict",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory or pointer .json (local path or s3://)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (local paths or s3:// URIs)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    return p


def predict(model, manifest, blobs: list[bytes | None]) -> list[dict]:
    """Class probabilities for image bytes; failed decodes give ``{"error": ...}``."""
    import numpy as np
    import torch

    from emotion_core.preprocess import decode_batch, normalize

    spec = manifest.input_spec
    pixels, _, _, errors = decode_batch(blobs, spec)
    ok = [i for i, e in enumerate(errors) if e is None]
    out: list[dict] = [{"error": e} if e else {} for e in errors]
    if ok:
        with torch.no_grad():
            probs = torch.softmax(model(normalize(pixels[np.asarray(ok)], spec)), dim=1).numpy()
        for i, p in zip(ok, probs):
            top = int(p.argmax())
            out[i] = {
                "label": manifest.classes[top],
                "confidence": float(p[top]),
                "probabilities": {c: float(v) for c, v in zip(manifest.classes, p)},
            }
    return out


def run(args: argparse.Namespace) -> list[dict]:
    from emotion_core import storage
    from emotion_core.checkpoint import CheckpointError, load_model

    try:
        model, manifest = load_model(args.model)
    except (CheckpointError, storage.StorageError, ValueError) as e:
        raise UsageError(f"--model: {e}") from e
    blobs: list[bytes | None] = []
    read_errors: dict[int, str] = {}
    for i, uri in enumerate(args.images):
        try:
            blobs.append(storage.read_bytes(uri))
        except storage.StorageError as e:
            blobs.append(None)
            read_errors[i] = f"unreadable: {e}"
    results = [{"error": read_errors[i]} if i in read_errors else r
               for i, r in enumerate(predict(model, manifest, blobs))]
    width = max(len(p) for p in args.images)
    for uri, r in zip(args.images, results):
        if args.json:
            print(json.dumps({"image": uri, **r}))
        elif "error" in r:
            print(f"{uri:<{width}}  ERROR {r['error']}")
        else:
            probs = "  ".join(f"{c} {p:.3f}" for c, p in r["probabilities"].items())
            print(f"{uri:<{width}}  {r['label']:<8} {r['confidence']:.3f}   [{probs}]")
    failed = sum("error" in r for r in results)
    if failed:
        raise JobError(f"{failed} of {len(args.images)} image(s) could not be read or decoded")
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("jobs.predict", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
