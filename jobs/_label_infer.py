"""The labelling actor: one *work unit* per call, from listing rows to a Parquet file of labels.

A work unit is a Parquet file of listing rows in the run's staging area (``todo/<name>.parquet``,
written by the plan). :class:`Labeller` is a Ray Data actor that loads the model once, and for
each unit reads its rows, fetches the objects (many GETs in flight, or one GET per shard whose
members are the images), decodes them with the shared :mod:`emotion_core.preprocess`, runs the
model in batches, and writes the result rows, sorted by ``image_uri``, to
``out/<name>.parquet``. It returns one small stats row per unit; result rows never travel to the
driver. The output name is the unit's, so a retried unit overwrites its own file and never adds
one, and a resumed run skips units whose output exists (writes are atomic: a local rename, or a
single S3 PUT / completed multipart upload).

Image bytes never cross a process boundary. On CPU the model runs traced and frozen (oneDNN,
several times faster than eager for these small CNNs; checked against eager on load, falling
back to eager on any mismatch); on GPU in fp16 autocast with channels_last. With ``tta`` the
probabilities are the mean over the views of :mod:`emotion_core.tta` (one forward pass each). Memory per actor is
bounded: ``chunk_rows`` images (or one shard, read whole, at most ``max_shard_bytes``) at a time.
"""

from __future__ import annotations

import io
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from emotion_core import faces as F
from emotion_core import shards, storage
from emotion_core.preprocess import ImageDecodeError, InputSpec, decode_batch, normalize
from emotion_core.schema import TIMESTAMP, label_schema, prob_column
from emotion_core.tta import tta_probs

IMAGE_COLUMNS = ["image_uri", "shard_uri", "shard_member", "etag", "size_bytes", "last_modified"]
UNIT_KEY, OBJECTS_KEY, SHARDS_KEY = b"emotion.unit", b"emotion.unit_objects", b"emotion.unit_shards"
IMAGES_KEY = b"emotion.unit_images"
SHARD_FORMATS = pa.array(["webdataset", "parquet"])
ROW_ORDER = [("image_uri", "ascending"), ("face_index", "ascending")]  # the key; an image's rows together


def is_shard(formats) -> pa.Array:
    """Which listing rows are shard objects (their members are the images)."""
    return pc.fill_null(pc.is_in(formats, SHARD_FORMATS), False)


def unit_metadata(name: str, listing: pa.Table, rows: pa.Table) -> dict:
    """What the commit checks in a unit's output footer: which unit it is, how many listed objects
    (of which shards) it covered, and how many distinct images its rows (one per face) are about."""
    return {UNIT_KEY: name, OBJECTS_KEY: str(listing.num_rows),
            SHARDS_KEY: str(int(pc.sum(is_shard(listing["format"])).as_py() or 0)),
            IMAGES_KEY: str(pc.count_distinct(rows["image_uri"]).as_py() if rows.num_rows else 0)}


def fast_forward(model: torch.nn.Module, spec: InputSpec, device: torch.device, jit: bool = True):
    """A callable float32 (N, C, H, W) -> logits, as fast as this device allows (module doc)."""
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

        def forward(x):
            with torch.autocast("cuda", dtype=torch.float16):
                return model(x.contiguous(memory_format=torch.channels_last)).float()

        return forward
    if not jit:
        return model
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(4, spec.channels, spec.size, spec.size, generator=gen)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            traced = torch.jit.optimize_for_inference(torch.jit.trace(model, probe[:2]))
            ok = torch.allclose(traced(probe), model(probe), rtol=1e-3, atol=1e-4)
    except Exception:  # any model the tracer cannot handle runs eager
        return model
    return traced if ok else model


class Labeller:
    """Ray Data actor over work units (module doc). Returns per unit: ``unit``, ``out``, ``rows``."""

    def __init__(
        self,
        model_uri: str,
        expected_version: str,
        expected_sha256: str,
        run_constants: dict,
        out_dir: str,
        device: str = "cpu",
        threads: int = 1,
        fetch_threads: int = 48,
        infer_batch: int = 64,
        chunk_rows: int = 512,
        max_object_bytes: int = 50 << 20,
        max_shard_bytes: int = 1 << 30,
        jit: bool = True,
        faces: str = "none",
        tta: str = "none",
    ):
        from emotion_core.checkpoint import load_model

        torch.set_num_threads(max(1, threads))
        self.device = torch.device(device)
        model, manifest = load_model(model_uri, device=self.device, expect_sha256=expected_sha256)
        if manifest.version != expected_version:
            raise RuntimeError(
                f"{model_uri} changed during the run: version {manifest.version}, expected {expected_version}"
            )
        self.classes = list(manifest.classes)
        self.schema = label_schema(self.classes)
        self.spec = manifest.input_spec
        self.forward = fast_forward(model, self.spec, self.device, jit)
        self.constants = run_constants
        self.out_dir = out_dir
        self.fetch_threads, self.infer_batch, self.chunk_rows = fetch_threads, infer_batch, chunk_rows
        self.max_object_bytes, self.max_shard_bytes = max_object_bytes, max_shard_bytes
        self.tta = tta
        self.auto = faces == "auto"
        self.whole = F.create_detector("none")
        self.detector = F.create_detector(F.default_detector() if self.auto else faces)

    def __call__(self, batch: dict) -> dict:
        outs, rows = [], []
        for unit in batch["unit"]:
            out, n = self.label_unit(str(unit))
            outs.append(out)
            rows.append(n)
        return {"unit": np.asarray(batch["unit"], dtype=object), "out": np.asarray(outs, dtype=object),
                "rows": np.asarray(rows, dtype=np.int64)}

    def label_unit(self, unit_uri: str) -> tuple[str, int]:
        listing = pq.read_table(io.BytesIO(storage.read_bytes(unit_uri)))
        parts = []
        for start in range(0, listing.num_rows, self.chunk_rows):
            chunk = listing.slice(start, self.chunk_rows)
            shard = is_shard(chunk["format"])
            loose = chunk.filter(pc.invert(shard))
            if loose.num_rows:
                parts.append(self.label_images(*self.read_loose(loose)))
            for row in chunk.filter(shard).to_pylist():
                parts.extend(self.label_images(*images) for images in self.read_shard(row))
        table = pa.concat_tables(parts).sort_by(ROW_ORDER) if parts else self.schema.empty_table()
        name = unit_uri.rsplit("/", 1)[-1]
        table = table.replace_schema_metadata(unit_metadata(name, listing, table))
        out = storage.join(self.out_dir, name)
        storage.write_parquet_atomic(table, out)
        return out, table.num_rows

    # -- reading -------------------------------------------------------------------------------

    def read_loose(self, listing: pa.Table) -> tuple[pa.Table, list]:
        """Listing rows of plain image objects -> image rows (metadata as read) and their bytes."""
        uris = listing["image_uri"].to_pylist()
        listed_errors = listing["error"].to_pylist()
        fetched = iter(storage.read_objects([u for u, le in zip(uris, listed_errors) if not le],
                                            self.fetch_threads, self.max_object_bytes))
        # rows the listing already marked as errors are not fetched
        reads = [storage.ObjectRead(None) if le else next(fetched) for le in listed_errors]
        meta = {
            "image_uri": uris,
            "shard_uri": [None] * len(uris),
            "shard_member": [None] * len(uris),
            "etag": [_first(r.etag, e) for r, e in zip(reads, listing["etag"].to_pylist())],
            "size_bytes": [_first(r.size, s) for r, s in zip(reads, listing["size_bytes"].to_pylist())],
            "last_modified": [r.last_modified_ms for r in reads],
            "error": [le or r.error for le, r in zip(listed_errors, reads)],
        }
        datas = [None if le else r.data for le, r in zip(listed_errors, reads)]
        return image_rows(meta, listing["last_modified"]), datas

    def read_shard(self, row: dict):
        """One shard object (one GET) -> image rows and bytes, ``chunk_rows`` members at a time."""
        shard_uri = row["image_uri"]
        read = storage.read_object(shard_uri, self.max_shard_bytes) if not row["error"] else None
        error = row["error"] or read.error
        etag = (read.etag if read else None) or row["etag"]
        mtime = read.last_modified_ms if read and read.last_modified_ms is not None else _ms(row["last_modified"])
        if error:  # the shard itself cannot be read: one error row names it
            meta = {"image_uri": [shard_uri], "shard_uri": [shard_uri], "shard_member": [None], "etag": [etag],
                    "size_bytes": [row["size_bytes"]], "last_modified": [mtime], "error": [error]}
            yield image_rows(meta), [None]
            return
        group: list = []
        for member in shards.iter_members(read.data, row["format"], shard_uri):
            group.append(member)
            if len(group) == self.chunk_rows:
                yield self._member_rows(group, shard_uri, etag, mtime)
                group = []
        if group:
            yield self._member_rows(group, shard_uri, etag, mtime)

    @staticmethod
    def _member_rows(members: list, shard_uri: str, etag, mtime) -> tuple[pa.Table, list]:
        n = len(members)
        meta = {
            "image_uri": [shards.member_uri(shard_uri, m.name) for m in members],
            "shard_uri": [shard_uri] * n,
            "shard_member": [m.name for m in members],
            "etag": [etag] * n,
            "size_bytes": [len(m.data) if m.data is not None else None for m in members],
            "last_modified": [mtime] * n,
            "error": [m.error for m in members],
        }
        return image_rows(meta), [m.data for m in members]

    # -- faces, decoding and inference ---------------------------------------------------------

    def find_faces(self, datas: list, read_errors: list) -> list[tuple[F.FoundFaces | str, str | None]]:
        """Per image: (its faces and their crops at the model input, the detector's name), or
        (``"<reason>: <detail>"``, None). ``--faces none`` decodes each image whole in one batch
        (exactly the crop-bucket pixels); ``auto`` picks per image from its header
        (:func:`emotion_core.faces.needs_detection`); a detector name always detects."""
        if self.detector.whole_image:
            pixels, widths, heights, decode_errors = decode_batch(datas, self.spec)
            return [(r or d, None) if r or d else
                    (F.FoundFaces([F.Face(0, 0, w, h, 1.0)], pixels[i:i + 1], w, h), self.detector.name)
                    for i, (r, d, w, h) in enumerate(zip(read_errors, decode_errors, widths, heights))]
        found: list[tuple[F.FoundFaces | str, str | None]] = []
        for data, read_error in zip(datas, read_errors):
            if read_error:
                found.append((read_error, None))
                continue
            try:
                detector = self.detector
                if self.auto and not F.needs_detection(*F.image_size(data or b""), self.spec):
                    detector = self.whole
                found.append((F.find_faces(data or b"", detector, self.spec), detector.name))
            except ImageDecodeError as e:
                found.append((f"{e.reason}: {e.detail or e.reason}", None))
        return found

    def label_images(self, images: pa.Table, datas: list) -> pa.Table:
        """Image rows + bytes -> result rows in the label schema: one per face, one for an image
        without faces (face_index null, no label), one error row for an image that failed."""
        rows: dict[str, list] = {k: [] for k in ("image", "face_index", "box", "score", "in_image", "detector",
                                                 "error", "width", "height")}
        crops = []
        for i, (f, detector) in enumerate(self.find_faces(datas, images["error"].to_pylist())):
            error = f if isinstance(f, str) else None
            faces = [] if error else f.faces
            for k, face in enumerate(faces or [None]):
                rows["image"].append(i)
                rows["face_index"].append(k if face else None)
                rows["box"].append(face.box if face else (None,) * 4)
                rows["score"].append(face.score if face else None)
                rows["in_image"].append(None if error else len(faces))
                rows["error"].append(error)
                rows["width"].append(None if error else f.width)
                rows["height"].append(None if error else f.height)
                rows["detector"].append(detector)
            if faces:
                crops.append(f.pixels)
        has_face = np.array([fi is not None for fi in rows["face_index"]], dtype=bool)
        probs = np.zeros((len(has_face), len(self.classes)), dtype=np.float32)
        if crops:
            probs[has_face] = self.classify(np.concatenate(crops))
        return self.result_table(images.take(rows["image"]), probs, has_face, rows)

    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities of uint8 model-input crops ``(N, C, S, S)``, ``infer_batch`` at a time."""
        out = np.empty((len(pixels), len(self.classes)), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(pixels), self.infer_batch):
                x = torch.from_numpy(pixels[start:start + self.infer_batch]).to(self.device, non_blocking=True)
                out[start:start + len(x)] = tta_probs(self.forward, normalize(x, self.spec), self.tta).cpu().numpy()
        return out

    def result_table(self, images: pa.Table, probs: np.ndarray, labelled: np.ndarray, rows: dict) -> pa.Table:
        n, unlabelled = images.num_rows, ~labelled
        best = probs.argmax(axis=1).astype(np.int32) if n else np.zeros(0, np.int32)
        cols = {c: images[c] for c in IMAGE_COLUMNS}
        labels = pa.DictionaryArray.from_arrays(pa.array(best, mask=unlabelled), pa.array(self.classes))
        cols["label"] = labels.cast(pa.string())
        cols["confidence"] = pa.array(probs[np.arange(n), best] if n else [], pa.float32(), mask=unlabelled)
        for j, c in enumerate(self.classes):
            cols[prob_column(c)] = pa.array(probs[:, j], pa.float32(), mask=unlabelled)
        for name, value in self.constants.items():
            cols[name] = pa.array([value] * n, pa.string())
        cols["labelled_at"] = pa.array(np.full(n, int(time.time() * 1000), dtype=np.int64)).cast(TIMESTAMP)
        cols["width"] = pa.array(rows["width"], pa.int32())
        cols["height"] = pa.array(rows["height"], pa.int32())
        cols["error"] = pa.array(rows["error"], pa.string())
        cols["face_index"] = pa.array(rows["face_index"], pa.int32())
        for j, name in enumerate(("face_x", "face_y", "face_w", "face_h")):
            cols[name] = pa.array([b[j] for b in rows["box"]], pa.int32())
        cols["face_score"] = pa.array(rows["score"], pa.float32())
        cols["faces_in_image"] = pa.array(rows["in_image"], pa.int32())
        cols["face_detector"] = pa.array(rows["detector"], pa.string())
        return pa.table({f.name: cols[f.name] for f in self.schema}).cast(self.schema)


def _first(value, fallback):
    """The value as read when there is one, else as listed."""
    return value if value is not None else fallback


def _ms(value) -> int | None:
    if value is None:
        return None
    return int(value.timestamp() * 1000) if hasattr(value, "timestamp") else int(value)


def image_rows(meta: dict, listed_mtime: pa.ChunkedArray | None = None) -> pa.Table:
    mtimes = meta["last_modified"]
    if listed_mtime is not None:
        listed = listed_mtime.cast(pa.int64()).to_pylist()
        mtimes = [m if m is not None else lm for m, lm in zip(mtimes, listed)]
    return pa.table({
        "image_uri": pa.array(meta["image_uri"], pa.string()),
        "shard_uri": pa.array(meta["shard_uri"], pa.string()),
        "shard_member": pa.array(meta["shard_member"], pa.string()),
        "etag": pa.array(meta["etag"], pa.string()),
        "size_bytes": pa.array(meta["size_bytes"], pa.int64()),
        "last_modified": pa.array(mtimes, pa.int64()).cast(TIMESTAMP),
        "error": pa.array(meta["error"], pa.string()),
    })


# ---------------------------------------------------------------------------------------------
# Poison objects: isolate what kills its worker every time


CRASHED = "worker_crashed"


def label_isolated(units: list[str], labeller: dict, classes: list[str], log) -> None:
    """Label ``units`` one Ray task each, without retries; a unit whose worker dies (a poison
    image that crashes the decoder or the process, every time) is split in halves, recursively,
    until the object that kills it is alone: that object becomes a ``worker_crashed`` error row
    and every other object is labelled. Each unit still ends as one ``out/<unit>.parquet``."""
    import ray
    from ray.exceptions import ActorDiedError, OutOfMemoryError, WorkerCrashedError

    task = ray.remote(num_cpus=labeller.get("threads", 1), max_retries=0)(_label_unit_task)
    pieces: dict[str, list[str]] = {u: [] for u in units}  # unit -> its leaf outputs
    isolated: set[str] = set()  # units that crashed at least once
    pending = {task.remote(u, labeller): (u, u) for u in units}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        unit, piece = pending.pop(done[0])
        try:
            pieces[unit].append(ray.get(done[0]))
            continue
        except (WorkerCrashedError, ActorDiedError, OutOfMemoryError) as e:
            crash = f"{CRASHED}: labelling it killed its worker ({type(e).__name__})"
        isolated.add(unit)
        listing = pq.read_table(io.BytesIO(storage.read_bytes(piece)))
        if listing.num_rows == 1:
            log(f"[label] {listing['image_uri'][0]} kills its worker every time: written as an error row")
            out = storage.join(labeller["out_dir"], piece.rsplit("/", 1)[-1])
            storage.write_parquet_atomic(crash_rows(listing, crash, classes, labeller["run_constants"]), out)
            pieces[unit].append(out)
            continue
        half = listing.num_rows // 2
        for i, part in enumerate((listing.slice(0, half), listing.slice(half))):
            sub = piece.removesuffix(".parquet") + f"~{i}.parquet"
            storage.write_parquet_atomic(part, sub)
            pending[task.remote(sub, labeller)] = (unit, sub)
    for unit in isolated:
        _merge_pieces(unit, pieces[unit], labeller["out_dir"])


def _label_unit_task(unit: str, labeller: dict) -> str:
    return Labeller(**labeller).label_unit(unit)[0]


def crash_rows(listing: pa.Table, error: str, classes: list[str], constants: dict) -> pa.Table:
    """Error rows, in the label schema, for listed objects that could not be labelled at all."""
    from ._label_plan import conform

    shard = is_shard(listing["format"])
    n = listing.num_rows
    rows = {
        "image_uri": listing["image_uri"],
        "shard_uri": pc.if_else(shard, listing["image_uri"], pa.nulls(n, pa.string())),
        "etag": listing["etag"], "size_bytes": listing["size_bytes"], "last_modified": listing["last_modified"],
        "error": pa.array([error] * n, pa.string()),
        "labelled_at": pa.array(np.full(n, int(time.time() * 1000), dtype=np.int64)).cast(TIMESTAMP),
        **{k: pa.array([v] * n, pa.string()) for k, v in constants.items()},
    }
    return conform(pa.table(rows), label_schema(classes))


def _merge_pieces(unit: str, outs: list[str], out_dir: str) -> None:
    """One output for a unit labelled in pieces (at most one unit's rows, so the driver may)."""
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(o))) for o in outs]
    listing = pq.read_table(io.BytesIO(storage.read_bytes(unit)))
    name = unit.rsplit("/", 1)[-1]
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables]).sort_by(ROW_ORDER)
    table = table.replace_schema_metadata(unit_metadata(name, listing, table))
    storage.write_parquet_atomic(table, storage.join(out_dir, name))
    for o in outs:
        if o.rsplit("/", 1)[-1] != name:
            storage.delete_dir(o)
