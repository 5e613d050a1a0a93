"""End-to-end demo on embedded defaults, no network: `make demo` (or `make demo-s3`).

synthetic faces -> train the classic CNN with 2 Ray Train workers -> publish latest.json ->
label a folder of images with Ray Data -> Parquet (dt=YYYY-MM-DD) -> DuckDB summary. The folder
holds face crops, a few deliberately broken files, and photos (generated scenes from
bench/scenes.py, 0-3 faces each): the crops are classified whole, the photos go through the face
detector and get one row per face (``--faces auto``), and the report prints faces per image.

With --s3 the same flow runs against a local S3 server (moto's HTTP server on 127.0.0.1):
training data, checkpoints, the model pointer, the images and the labels all live in a bucket.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import logging
import os
import shutil
import socket
import sys
from pathlib import Path

from emotion_core import storage
from emotion_core.synthetic import generate_dataset, render_face


def write_label_inputs(folder: Path, n_per_class: int = 30) -> None:
    """Faces to label, plus broken files that must come out as error rows."""
    import numpy as np

    from emotion_core.labels import CANONICAL

    rng = np.random.default_rng(1234)
    for cls in CANONICAL:
        sub = folder / "camera-1" / cls[:2]
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            render_face(cls, rng).save(sub / f"{cls}_{i:03d}.jpg", quality=90)
    broken = folder / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    render_face("happy", rng).save(good, format="JPEG")
    (broken / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "notes.png").write_bytes(b"this is not an image\n")
    png = io.BytesIO()
    render_face("surprise", rng).save(png, format="PNG")
    (broken / "really_a_png.jpg").write_bytes(png.getvalue())  # wrong extension, still decodes
    write_photos(folder / "photos")


def write_photos(folder: Path, faces_per_photo=(2, 1, 3, 0, 1, 2)) -> None:
    """Scene photos (1280x960) with synthetic faces pasted at 90-260 px; one has none."""
    import numpy as np

    from bench.scenes import make_scene, synthetic_faces

    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(faces_per_photo):
        scene = make_scene(np.random.default_rng([7, i]), synthetic_faces(), n_faces=n)
        (folder / f"photo_{i:02d}_{len(scene.boxes)}faces.jpg").write_bytes(scene.jpeg)


def start_s3() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="demo",
        AWS_SECRET_ACCESS_KEY="demo",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    storage.s3_client().create_bucket(Bucket="demo")
    return server, "s3://demo"


def upload_tree(local: Path, uri: str) -> None:
    client = storage.s3_client()
    loc = storage.parse(uri)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            key = "/".join(filter(None, [loc.key, path.relative_to(local).as_posix()]))
            client.put_object(Bucket=loc.bucket, Key=key, Body=path.read_bytes())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="demo_out", help="local folder for generated data and outputs")
    p.add_argument("--s3", action="store_true", help="run everything through a local S3 server (moto)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--train-per-class", type=int, default=300)
    args = p.parse_args(argv)

    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    data, inbox = work / "faces", work / "inbox"
    print(f"[demo] generating synthetic faces in {data}")
    generate_dataset(data, train_per_class=args.train_per_class, test_per_class=40, seed=0)
    write_label_inputs(inbox)

    server = None
    root = str(work)
    if args.s3:
        server, root = start_s3()
        print(f"[demo] local S3 server at {os.environ['AWS_ENDPOINT_URL']}; uploading data to {root}")
        upload_tree(data, f"{root}/faces")
        upload_tree(inbox, f"{root}/inbox")
    data_uri, inbox_uri = f"{root}/faces", f"{root}/inbox"
    models_uri, labels_uri = f"{root}/models", f"{root}/labels"
    pointer = f"{models_uri}/latest.json"
    today = dt.datetime.now(dt.UTC).date().isoformat()

    import ray

    from jobs import label, report, train

    # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls.
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=True, dashboard_host="127.0.0.1")
    try:
        steps = [
            ("train", train.main, ["--data", data_uri, "--model", "cnn", "--output", models_uri,
                                   "--name", "demo-cnn", "--epochs", str(args.epochs), "--num-workers", "2",
                                   "--publish", pointer]),
            ("label", label.main, ["--input", inbox_uri, "--model", pointer, "--output", labels_uri,
                                   "--date", today, "--run-id", "demo"]),
            ("report", report.main, ["--labels", labels_uri, "--date", today]),
        ]
        for name, fn, argv_ in steps:
            print(f"\n[demo] === {name}: python -m jobs.{name} {' '.join(argv_)}")
            rc = fn(argv_)
            if rc:
                print(f"[demo] {name} failed with exit code {rc}", file=sys.stderr)
                return rc
    finally:
        ray.shutdown()
        if server is not None:
            server.stop()
    print(f"\n[demo] done. Outputs under {root} (model pointer {pointer}, labels {labels_uri}/dt={today}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
