"""The one home of test (and benchmark) helpers: synthetic face images and files, an untrained
model checkpoint, putting files locally or in S3, and label datasets produced by the real labelling
job (jobs.label) over synthetic faces plus a few broken files (the report does not care what the
model predicts, only that the job wrote real output). Fixtures live in conftest.py."""

from __future__ import annotations

import io
from pathlib import Path

DATES = ("2026-11-19", "2026-11-20")
BROKEN = {"not_an_image.jpg": b"this is not an image", "empty.png": b""}


def write_images(root: Path, per_class: int = 3, seed: int = 0) -> Path:
    """A folder of synthetic faces (3 classes) plus broken files; returns the folder."""
    import numpy as np

    from emotion_core.synthetic import render_face

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for cls in ("happy", "sad", "surprise"):
        for i in range(per_class):
            buf = io.BytesIO()
            render_face(cls, rng).save(buf, format="JPEG")
            (root / f"{cls}_{i}.jpg").write_bytes(buf.getvalue())
    for name, data in BROKEN.items():
        (root / name).write_bytes(data)
    # a truncated JPEG
    (root / "truncated.jpg").write_bytes((root / "happy_0.jpg").read_bytes()[:200])
    return root


def save_untrained_model(uri, classes=("happy", "sad", "surprise"), architecture: str = "cnn", **model_kwargs):
    """A seeded, untrained model checkpoint: labels are arbitrary but deterministic (inference cost
    does not depend on the weights). Returns ``(model_uri, manifest)``."""
    import torch

    from emotion_core.checkpoint import ModelManifest, save_model
    from emotion_core.models import create_model, resolve_input_spec

    torch.manual_seed(0)
    spec = resolve_input_spec(architecture, model_kwargs.get("img_size"), model_kwargs.get("in_chans"))
    manifest = ModelManifest(architecture=architecture, classes=list(classes), input_spec=spec,
                             training_config={"note": "untrained, for tests and benchmarks"})
    return save_model(str(uri), create_model(architecture, len(classes), **model_kwargs), manifest), manifest


def encode(im, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def face(label: str, seed: int):
    """A synthetic 48x48 face (PIL image) showing ``label``."""
    import numpy as np

    from emotion_core.synthetic import render_face

    return render_face(label, np.random.default_rng(seed))


def face_jpeg(label: str, seed: int) -> bytes:
    return encode(face(label, seed), "JPEG", quality=90)


def put_tree(base: str, files: dict[str, bytes]) -> None:
    """Write ``{relative path: bytes}`` under a local folder or an s3:// prefix."""
    import os

    from emotion_core import storage

    for rel, data in files.items():
        if base.startswith("s3://"):
            loc = storage.parse(storage.join(base, rel))
            storage.s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        else:
            path = os.path.join(base, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)


def upload_dir(local: Path, bucket: str, prefix: str) -> str:
    from emotion_core.storage import s3_client

    s3 = s3_client()
    for p in sorted(local.rglob("*")):
        if p.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(local).as_posix()}", Body=p.read_bytes())
    return f"s3://{bucket}/{prefix}"


def run_label_job(images: str, model: str, output: str, dates=DATES) -> None:
    """Run the real labelling job in-process (on the session's Ray) once per date."""
    from jobs import label

    for d in dates:
        rc = label.main(["--input", images, "--model", model, "--output", output, "--date", d, "--actors", "1"])
        assert rc == 0, f"jobs.label failed for {d} (exit {rc})"


def write_fake_labels(fs_root: str, classes=("happy", "sad", "surprise")) -> int:
    """Parquet in the documented schema, written directly with pyarrow (no job): for the cases the
    real job cannot produce on demand (two model versions, mixed class sets). Returns the rows."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from emotion_core.schema import label_schema, prob_column
    from emotion_core.storage import filesystem, join

    total = 0
    now = dt.datetime(2026, 11, 21, 2, 0, tzinfo=dt.UTC)
    for day, (version, n, errors) in zip(DATES, [("v1", 6, 1), ("v2", 8, 2)]):
        schema = label_schema(list(classes))
        rows = []
        for i in range(n):
            err = "not_an_image: cannot identify image file" if i < errors else None
            label = None if err else classes[i % len(classes)]
            row = {
                "image_uri": f"s3://in/{day}/{i}.jpg",
                "etag": f"e{i}",
                "size_bytes": 1500,
                "last_modified": now,
                "label": label,
                "confidence": None if err else 0.9,
                "model_name": "cnn",
                "model_version": version,
                "run_id": f"run-{day}",
                "labelled_at": now,
                "width": None if err else 48,
                "height": None if err else 48,
                "error": err,
            }
            for c in classes:
                row[prob_column(c)] = None if err else (0.9 if c == label else 0.1 / (len(classes) - 1))
            rows.append(row)
        fs, path = filesystem(join(fs_root, f"dt={day}", "part-0.parquet"))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)
        total += n
    fs, path = filesystem(join(fs_root, "_runs", "run.json"))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(b"{}")
    return total


_CACHE: dict[str, dict] = {}


def write_scene_photos(root: Path) -> dict[str, list]:
    """Two 1280x960 photos: ``group.jpg`` with two large upright synthetic faces and
    ``empty_room.jpg`` with none. Returns each photo's known face boxes (x, y, w, h)."""
    import numpy as np

    from bench.scenes import make_scene, synthetic_faces

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n, seed in (("group.jpg", 2, 1), ("empty_room.jpg", 0, 2)):
        scene = make_scene(np.random.default_rng(seed), synthetic_faces(), n_faces=n, sizes=(170, 230),
                           rotated_share=0.0)
        (root / name).write_bytes(scene.jpeg)
        out[name] = scene.boxes
    return out


def real_labels(tmp_path_factory, s3_server, ray_session) -> dict:
    """Label datasets written by the real jobs.label, built once per session: local (both DATES)
    and on S3 (the last date), over synthetic face crops, broken files and two scene photos (two
    faces, none): {"local": path, "s3": uri, "images", "broken", "faces", "no_face", "rows", "inputs",
    "model", "scenes": {name: known boxes}}."""
    if "real" in _CACHE:
        return _CACHE["real"]
    import uuid

    from emotion_core.storage import s3_client

    root = tmp_path_factory.mktemp("real_labels")
    images = write_images(root / "images")
    scenes = write_scene_photos(images)
    model, _ = save_untrained_model(root / "model")
    run_label_job(str(images), model, str(root / "labels"))
    bucket = f"labels-{uuid.uuid4().hex[:8]}"
    s3_client().create_bucket(Bucket=bucket)
    s3_images = upload_dir(images, bucket, "images")
    s3_model = upload_dir(root / "model", bucket, "models/cnn")
    run_label_job(s3_images, s3_model, f"s3://{bucket}/labels", dates=DATES[-1:])
    n = sum(1 for p in images.iterdir() if p.is_file())
    broken = 3
    faces = n - broken - len(scenes) + sum(len(b) for b in scenes.values())
    _CACHE["real"] = {"local": str(root / "labels"), "s3": f"s3://{bucket}/labels", "images": n, "broken": broken,
                      "faces": faces, "no_face": 1, "rows": faces + broken + 1, "inputs": str(images),
                      "model": model, "scenes": scenes}
    return _CACHE["real"]


def photo_jpeg(label: str | None, seed: int, size: tuple[int, int] = (320, 240), face: int = 120) -> bytes:
    """A small "photo": a cluttered background (bench.scenes.background) with one synthetic face
    showing ``label`` pasted at ``face`` px, upright, somewhere inside; ``label`` None: no face."""
    import numpy as np

    from bench.scenes import background
    from emotion_core.synthetic import render_face

    rng = np.random.default_rng([seed, 7])
    im = background(rng, *size)
    if label is not None:
        crop = render_face(label, rng, 48).convert("RGB").resize((face, face))
        im.paste(crop, (int(rng.integers(0, size[0] - face + 1)), int(rng.integers(0, size[1] - face + 1))))
    return encode(im, "JPEG", quality=90)
