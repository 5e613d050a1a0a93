"""Pieces of the labelling benchmark: input preparation, a local S3 server behind a latency proxy,
the naive single-process baseline, and small measuring helpers.

The naive baseline is what a straightforward user would write in one process, with no Ray:
list -> read/GET one object at a time -> decode -> batched eager PyTorch forward (torch threads =
all cores) -> one pyarrow Parquet file of the same schema as the job writes.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emotion_core.preprocess import IMAGE_EXTENSIONS

BENCH_ENV = {
    "RAY_ACCEPT_CPU_ONLY": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}


# ---------------------------------------------------------------------------------------------
# Small helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class LocalFile:
    uri: str  # absolute path
    size: int
    mtime: float


def list_local(root: str | Path) -> list[LocalFile]:
    """Image files under ``root``, recursively, sorted."""
    out = []
    for dirpath, _, names in os.walk(root, followlinks=True):
        for name in names:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(dirpath, name)
                st = os.stat(path)
                out.append(LocalFile(os.path.abspath(path), st.st_size, st.st_mtime))
    out.sort(key=lambda f: f.uri)
    return out


def fer_subset(fer_root: Path, n: int, workdir: Path) -> tuple[Path, int]:
    """A directory holding exactly ``n`` FER faces (class sub-folders kept).

    The whole folder is used in place when ``n`` covers it; otherwise a directory of hard links to
    the first ``n`` files in sorted order is made under ``workdir`` (outside the repo; a copy only
    where a hard link cannot be made, across filesystems), so the job and the naive loop list
    exactly the same inputs. Not symlinks: the job's listing does not follow symlinks that leave
    the listed folder (they become ``not_followed`` error rows). Returns (dir, count).
    """
    files = fer_files(fer_root)
    if n >= len(files):
        return fer_root.resolve(), len(files)
    subset = workdir / f"fer_links_{n}"
    marker = subset / ".complete"
    if not marker.exists():
        shutil.rmtree(subset, ignore_errors=True)
        for p in files[:n]:
            link = subset / p.parent.name / p.name
            link.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, link)
            except OSError:  # another filesystem: a copy (faces are ~1.5 KB)
                shutil.copyfile(p, link)
        marker.touch()
    return subset, n


def fer_files(fer_root: Path) -> list[Path]:
    """The FER faces under ``fer_root``, sorted."""
    files = sorted(p for p in Path(fer_root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"no images under {fer_root}: pass --fer DIR (the FER2013 train folder)")
    return files


def fer_members(fer_root: Path, n: int) -> Iterator[tuple[str, bytes]]:
    """``n`` shard members ``(name, bytes)`` from the FER faces, cycling over them when ``n`` is
    larger than the folder: the bytes repeat, the names never do
    (``<class>/<index>-<original stem>.jpg``; WebDataset keys are unique too)."""
    files = fer_files(fer_root)
    cache: dict[int, bytes] = {}
    for i in range(n):
        k = i % len(files)
        if k not in cache:
            cache[k] = files[k].read_bytes()
        p = files[k]
        yield f"{p.parent.name}/{i:08d}-{p.stem}.jpg", cache[k]


def fer_webdataset(fer_root: Path, n: int, workdir: Path, members_per_shard: int = 5000) -> Path:
    """WebDataset ``.tar`` shards of ``n`` members built from the FER faces
    (:func:`fer_members`, :func:`emotion_core.shards.write_webdataset`), cached under ``workdir``.
    Shard *i* holds members ``[i * members_per_shard, (i + 1) * members_per_shard)``; so a smaller
    set is a prefix of a larger one and, where the larger one is cached, is made of hard links to
    its first shards (no second copy of the bytes)."""
    from emotion_core.shards import write_webdataset

    out = workdir / f"fer_wds_n{n}_m{members_per_shard}"
    if (out / ".complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    n_shards = -(-n // members_per_shard)
    bigger = sorted(
        (p for p in workdir.glob(f"fer_wds_n*_m{members_per_shard}") if (p / ".complete").exists()
         and int(p.name.split("_")[2][1:]) >= n and int(p.name.split("_")[2][1:]) % members_per_shard == 0),
        key=lambda p: int(p.name.split("_")[2][1:]))
    if bigger and n % members_per_shard == 0:
        for i in range(n_shards):
            os.link(bigger[0] / f"shard-{i:06d}.tar", out / f"shard-{i:06d}.tar")
    else:
        members = fer_members(fer_root, n)
        for i in range(n_shards):
            chunk = [next(members) for _ in range(min(members_per_shard, n - i * members_per_shard))]
            (out / f"shard-{i:06d}.tar").write_bytes(write_webdataset(chunk))
    (out / ".complete").touch()
    return out


def _draw_large_photo(rng: np.random.Generator, noise: np.ndarray, width: int, height: int):
    """A colour photo-like JPEG source: background shapes, a drawn face (ellipse, eyes, brows,
    mouth) at a random place and scale, then camera-like noise."""
    from PIL import Image, ImageDraw

    bg = tuple(int(c) for c in rng.integers(40, 200, 3))
    img = Image.new("RGB", (width, height), bg)
    d = ImageDraw.Draw(img)
    for _ in range(12):  # background clutter
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(50, 500)), int(rng.integers(50, 500))
        d.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    side = int(rng.integers(height // 2, int(height * 0.9)))
    cx = int(rng.integers(side // 2, width - side // 2))
    cy = int(rng.integers(side // 2, height - side // 2))
    skin = tuple(int(c) for c in rng.integers([150, 100, 80], [255, 200, 170]))
    fw, fh = int(side * 0.38), int(side * 0.48)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)
    ex, ey, er = int(side * 0.15), cy - int(side * 0.1), max(4, int(side * 0.04))
    for sx in (-1, 1):
        d.ellipse([cx + sx * ex - er, ey - er, cx + sx * ex + er, ey + er], fill=(30, 30, 30))
        brow_tilt = int(rng.integers(-er, er + 1))
        d.line([cx + sx * ex - 2 * er, ey - 3 * er, cx + sx * ex + 2 * er, ey - 3 * er + brow_tilt],
               fill=(60, 40, 30), width=max(2, er // 2))
    mw, my = int(side * 0.16), cy + int(side * 0.2)
    curve = int(rng.integers(-side // 12, side // 12 + 1))
    d.arc([cx - mw, my - abs(curve) - 2, cx + mw, my + abs(curve) + 2], 0 if curve > 0 else 180,
          180 if curve > 0 else 360, fill=(120, 30, 30), width=max(3, side // 80))
    arr = np.asarray(img, dtype=np.int16)
    oy, ox = int(rng.integers(0, noise.shape[0] - height)), int(rng.integers(0, noise.shape[1] - width))
    arr = np.clip(arr + noise[oy : oy + height, ox : ox + width], 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def large_photos(workdir: Path, n: int, width: int = 1600, height: int = 1200, seed: int = 0) -> Path:
    """``n`` procedurally generated ``width`` x ``height`` colour JPEGs (quality 90), cached under
    ``workdir`` so repeated runs do not regenerate them."""
    out = workdir / f"large_{width}x{height}_n{n}_s{seed}"
    marker = out / ".complete"
    if marker.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # One noise field reused at random offsets: per-image noise would dominate generation time.
    noise = rng.normal(0.0, 8.0, (height + 256, width + 256, 3)).astype(np.int16)
    for i in range(n):
        _draw_large_photo(rng, noise, width, height).save(out / f"photo_{i:05d}.jpg", quality=90)
    marker.touch()
    return out


def save_untrained_model(model_dir: Path, architecture: str = "cnn") -> str:
    """An untrained 7-class model checkpoint (inference cost does not depend on trained weights)."""
    from emotion_core.labels import CANONICAL
    from tests.helpers import save_untrained_model as save

    return save(model_dir, classes=CANONICAL, architecture=architecture)[0]


# ---------------------------------------------------------------------------------------------
# S3: moto's HTTP server and the latency proxy, each in its own process


def _serve_moto(port: int) -> None:
    """Entry point of the moto subprocess: a ThreadedMotoServer with request logging silenced."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


S3_ENV_BASE = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class S3Servers:
    moto_endpoint: str  # direct, for the bulk upload
    proxy_endpoint: str  # what boto3/pyarrow/the job use


@contextmanager
def s3_servers(delay_ms: float) -> Iterator[S3Servers]:
    """moto's S3 server and the latency proxy in two child processes (so their Python threads do
    not compete for the benchmark driver's GIL, as a remote store would not). Exports
    ``AWS_ENDPOINT_URL`` = the proxy, plus dummy credentials, in this process; start Ray after
    this so its workers inherit them."""
    moto_port, proxy_port = free_port(), free_port()
    env = {**os.environ, **S3_ENV_BASE}
    root = str(Path(__file__).resolve().parent.parent)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", f"from bench._common import _serve_moto; _serve_moto({moto_port})"],
            cwd=root, env=env,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "bench.s3_latency_proxy", "--port", str(proxy_port),
             "--upstream", f"http://127.0.0.1:{moto_port}", "--delay-ms", str(delay_ms)],
            cwd=root, env=env, stdout=subprocess.DEVNULL,
        ),
    ]
    old = {k: os.environ.get(k) for k in [*S3_ENV_BASE, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"]}
    try:
        wait_for_port(moto_port)
        wait_for_port(proxy_port)
        proxy = f"http://127.0.0.1:{proxy_port}"
        os.environ.update(S3_ENV_BASE, AWS_ENDPOINT_URL=proxy, AWS_ENDPOINT_URL_S3=proxy)
        yield S3Servers(f"http://127.0.0.1:{moto_port}", proxy)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def boto_client(endpoint: str, pool: int = 64):
    import boto3
    from botocore.config import Config

    cfg = Config(max_pool_connections=pool, retries={"max_attempts": 5, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=cfg)


def upload_files(endpoint: str, bucket: str, prefix: str, files: list[LocalFile], root: Path,
                 threads: int = 32) -> list[str]:
    """Upload local files to ``s3://bucket/prefix/<path relative to root>`` with a thread pool
    (straight to moto, no proxy). Returns the keys."""
    client = boto_client(endpoint, pool=threads)
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    root = Path(root)

    def put(f: LocalFile) -> str:
        key = f"{prefix}/{Path(os.path.relpath(f.uri, root)).as_posix()}"
        with open(f.uri, "rb") as fh:
            client.put_object(Bucket=bucket, Key=key, Body=fh.read())
        return key

    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(put, files))


@dataclass(frozen=True)
class S3Object:
    uri: str
    key: str
    etag: str
    size: int
    last_modified: dt.datetime


def list_s3(client, bucket: str, prefix: str) -> list[S3Object]:
    """Image objects under ``s3://bucket/prefix/``, sorted, listed by :mod:`emotion_core.storage`
    (the job's own lister) through the endpoint in the environment. ``client`` is not used: it is
    kept for the existing callers."""
    from emotion_core import storage

    table = storage.list_objects(storage.s3_uri(bucket, prefix + "/")).sort_by("image_uri")
    return [
        S3Object(r["image_uri"], storage.parse(r["image_uri"]).key, r["etag"], r["size_bytes"], r["last_modified"])
        for r in table.to_pylist()
    ]


def concurrent_get_rate(endpoint: str, bucket: str, keys: list[str], threads: int = 64) -> float:
    """The store's own ceiling: GETs/s with ``threads`` concurrent boto3 get_object calls."""
    client = boto_client(endpoint, pool=threads)

    def get(key: str) -> int:
        return len(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(get, keys[: threads * 2]))  # warm the connection pool
        t0 = time.perf_counter()
        list(ex.map(get, keys))
        return len(keys) / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# The naive baseline


def naive_pil_decode(data: bytes, size: int = 48) -> tuple[np.ndarray, int, int]:
    """What a straightforward user writes: full-size decode, then grayscale and resize."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    w, h = img.size
    arr = np.asarray(img.convert("L").resize((size, size)), dtype=np.uint8)
    return arr[None], w, h


@dataclass(frozen=True)
class Item:
    """One input object for the naive loop: enough for the output row, plus how to read it."""

    uri: str
    etag: str
    size: int
    last_modified: dt.datetime


def local_items(files: Iterable[LocalFile]) -> list[Item]:
    return [
        Item(f.uri, f"{int(f.mtime * 1e6):x}-{f.size:x}", f.size,
             dt.datetime.fromtimestamp(f.mtime, dt.UTC))
        for f in files
    ]


def s3_items(objects: Iterable[S3Object]) -> list[Item]:
    return [Item(o.uri, o.etag, o.size, o.last_modified) for o in objects]


def naive_label(
    items: list[Item],
    read: Callable[[Item], bytes],
    decode: Callable[[bytes], tuple[np.ndarray, int, int]],
    model_uri: str,
    out_path: Path,
    batch_size: int = 256,
) -> int:
    """Label ``items`` one at a time in this process and write one Parquet file; returns rows.

    Decode failures become error rows, like the job. The model forward is eager PyTorch under
    ``torch.inference_mode`` with as many threads as cores."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from emotion_core.checkpoint import load_model
    from emotion_core.preprocess import normalize
    from emotion_core.schema import label_schema, prob_column

    torch.set_num_threads(os.cpu_count() or 1)
    model, manifest = load_model(model_uri)
    model.eval()
    classes, spec = list(manifest.classes), manifest.input_spec
    schema = label_schema(classes)
    cols: dict[str, list] = {f.name: [] for f in schema}
    run_id = f"naive-{int(time.time())}"
    pending: list[tuple[Item, np.ndarray, int, int]] = []

    def add_row(item: Item, probs, w, h, error) -> None:
        cols["image_uri"].append(item.uri)
        cols["etag"].append(item.etag)
        cols["size_bytes"].append(item.size)
        cols["last_modified"].append(item.last_modified)
        if probs is None:
            cols["label"].append(None)
            cols["confidence"].append(None)
            for c in classes:
                cols[prob_column(c)].append(None)
        else:
            k = int(probs.argmax())
            cols["label"].append(classes[k])
            cols["confidence"].append(float(probs[k]))
            for i, c in enumerate(classes):
                cols[prob_column(c)].append(float(probs[i]))
        cols["model_name"].append(manifest.architecture)
        cols["model_version"].append(manifest.version)
        cols["run_id"].append(run_id)
        cols["labelled_at"].append(dt.datetime.now(dt.UTC))
        cols["width"].append(w)
        cols["height"].append(h)
        cols["error"].append(error)
        cols["shard_uri"].append(None)  # loose objects only
        cols["shard_member"].append(None)
        whole = error is None  # face crops: the whole image is face 0 of detector "none"
        for name, value in (("face_index", 0), ("face_x", 0), ("face_y", 0), ("face_w", w), ("face_h", h),
                            ("face_score", 1.0), ("faces_in_image", 1), ("face_detector", "none")):
            cols[name].append(value if whole else None)

    def flush() -> None:
        if not pending:
            return
        x = normalize(np.stack([p[1] for p in pending]), spec)
        with torch.inference_mode():
            probs = torch.softmax(model(x), dim=1).numpy()
        for (item, _, w, h), p in zip(pending, probs):
            add_row(item, p, w, h, None)
        pending.clear()

    for item in items:
        try:
            pixels, w, h = decode(read(item))
        except Exception as e:  # a broken image is an error row, never a crash
            add_row(item, None, None, None, f"{getattr(e, 'reason', type(e).__name__)}: {e}"[:200])
            continue
        pending.append((item, pixels, w, h))
        if len(pending) >= batch_size:
            flush()
    flush()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=schema), out_path)
    return len(cols["image_uri"])


def read_local(item: Item) -> bytes:
    with open(item.uri, "rb") as f:
        return f.read()


def s3_reader(endpoint: str) -> Callable[[Item], bytes]:
    client = boto_client(endpoint, pool=1)

    def read(item: Item) -> bytes:
        bucket, key = item.uri[len("s3://") :].split("/", 1)
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    return read


# ---------------------------------------------------------------------------------------------
# Incremental planning data

PLAN_MODEL_VERSION = "20240101T000000Z-benchplan"
PLAN_PREVIOUS_DATE = "2024-05-31"  # the latest partition: the previous state of an incremental run
PLAN_FILES = 4  # files of the previous partition, and listing shards


def _uris(ids: np.ndarray) -> list[str]:
    return [
        f"s3://acme-photos/uploads/cam-{i % 997:04d}/2024/05/{1 + i % 28:02d}/IMG_{i:09d}.jpg"
        for i in ids.tolist()
    ]


def _etags(rng: np.random.Generator, n: int) -> list[str]:
    raw = rng.bytes(16 * n).hex()
    return [raw[32 * i : 32 * i + 32] for i in range(n)]


def plan_data(workdir: Path, rows: int, new: int, classes: list[str], seed: int = 0) -> Path:
    """Generated inputs for the incremental-planning benchmark, cached under ``workdir``:

    - ``labels/dt=<PLAN_PREVIOUS_DATE>/part-<i>.parquet``: ``rows`` already-labelled rows of the
      label schema in one partition (the previous state is the latest partition only), labelled by
      model version :data:`PLAN_MODEL_VERSION`, in :data:`PLAN_FILES` files;
    - ``listing/part-<i>.parquet``: a bucket listing as the job's listing shards
      (:data:`storage.LISTING_SCHEMA`, each shard sorted by ``image_uri``) of ``rows + new``
      objects: every labelled object (``new // 10`` of them with a changed etag) plus ``new`` new
      objects. So ``new + new // 10`` objects need labelling.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from emotion_core.schema import label_schema, prob_column
    from emotion_core.storage import LISTING_SCHEMA

    out = workdir / f"plan_shards_r{rows}_n{new}_s{seed}"
    if (out / ".complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(seed)
    schema = label_schema(classes)
    ids = rng.permutation(rows + new) + 1_000_000
    old_ids, new_ids = ids[:rows], ids[rows:]
    etags = _etags(rng, rows)
    sizes = rng.integers(800, 4000, rows)
    base = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
    modified = [base + dt.timedelta(seconds=int(s)) for s in rng.integers(0, 27 * 86400, rows)]
    labelled_at = dt.datetime(2024, 5, 31, 3, 0, tzinfo=dt.UTC)
    probs = rng.dirichlet(np.ones(len(classes)), rows).astype(np.float32)
    top = probs.argmax(1)
    uris = _uris(old_ids)
    part = out / "labels" / f"dt={PLAN_PREVIOUS_DATE}"
    part.mkdir(parents=True)
    for k in range(PLAN_FILES):
        sl = slice(k * rows // PLAN_FILES, (k + 1) * rows // PLAN_FILES)
        m = sl.stop - sl.start
        cols = {
            "image_uri": uris[sl], "etag": etags[sl], "size_bytes": sizes[sl],
            "last_modified": modified[sl], "label": [classes[i] for i in top[sl]],
            "confidence": probs[sl].max(1),
            **{prob_column(c): probs[sl, i] for i, c in enumerate(classes)},
            "model_name": ["cnn"] * m, "model_version": [PLAN_MODEL_VERSION] * m,
            "run_id": [f"run-{PLAN_PREVIOUS_DATE}"] * m, "labelled_at": [labelled_at] * m,
            "width": np.full(m, 48, np.int32), "height": np.full(m, 48, np.int32), "error": [None] * m,
            "shard_uri": [None] * m, "shard_member": [None] * m,
            "face_index": np.zeros(m, np.int32), "face_x": np.zeros(m, np.int32), "face_y": np.zeros(m, np.int32),
            "face_w": np.full(m, 48, np.int32), "face_h": np.full(m, 48, np.int32),
            "face_score": np.ones(m, np.float32), "faces_in_image": np.ones(m, np.int32),
            "face_detector": ["none"] * m,
        }
        pq.write_table(pa.table(cols, schema=schema).sort_by("image_uri"), part / f"part-{k}.parquet",
                       row_group_size=128 * 1024)
    # The listing: changed etags for new // 10 of the labelled objects, then the new objects.
    changed = rng.choice(rows, new // 10, replace=False)
    list_etags = list(etags)
    for i, e in zip(changed.tolist(), _etags(rng, len(changed))):
        list_etags[i] = e
    n_new = len(new_ids)
    total = rows + n_new
    listing = pa.table({
        "image_uri": uris + _uris(new_ids),
        "etag": list_etags + _etags(rng, n_new),
        "size_bytes": np.concatenate([sizes, rng.integers(800, 4000, n_new)]),
        "last_modified": modified + [base + dt.timedelta(days=28)] * n_new,
        "error": pa.nulls(total, pa.string()),
    }, schema=LISTING_SCHEMA)
    listing = listing.take(rng.permutation(total))  # shards hold unrelated keys, as prefixes would
    (out / "listing").mkdir()
    for k in range(PLAN_FILES):
        shard = listing.slice(k * total // PLAN_FILES, (k + 1) * total // PLAN_FILES - k * total // PLAN_FILES)
        pq.write_table(shard.sort_by("image_uri"), out / "listing" / f"part-{k}.parquet")
    (out / ".complete").touch()
    return out


def plan_listing_shards(data: Path) -> list[str]:
    """The listing shards of :func:`plan_data`, as the job's lister returns them."""
    return sorted(str(p) for p in (data / "listing").glob("*.parquet"))


def plan_new_count(labelled: int, listed: int) -> int:
    """Objects of :func:`plan_data`'s listing that need labelling: the new ones plus the tenth of
    that number whose etag changed."""
    new = listed - labelled
    return new + new // 10
