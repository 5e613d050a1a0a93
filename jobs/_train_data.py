"""Training data: find a Kaggle-layout dataset, split it, and turn it into Ray Datasets.

Discovery (driver only, before any worker starts) accepts
- a local folder, ``file://`` URI or ``s3://`` prefix holding ``train/`` plus ``test/`` and/or
  ``validation/`` (aliases: ``val``, ``valid``; ``training``, ``testing``), one folder per class;
- the same as a ``.zip`` (local or on S3), exactly as downloaded from Kaggle;
- either of them with one extra top-level folder (``images/train/...``).

Class folders are mapped through :mod:`emotion_core.labels` aliases and kept in canonical FER
order; the class list comes from ``train/``, or is the ``classes`` subset asked for (folders of
other classes are then ignored in every split). Files are taken by image extension; hidden files and
``__MACOSX`` are ignored. Empty classes, a missing ``train/``, or a split with no images are a
:class:`DataError` (one line, says what to fix) raised before Ray is asked to do anything.

Without a validation split, a stratified one is carved from train with a seeded RNG
(``val_fraction`` per class, at least one image for classes with two or more); the split is
recorded (seed, fraction, file list) so a resumed or compared run uses the same one.

Ray Data: rows are ``(path, label, data)``. For local folders and zips the driver reads the
bytes (a local path is not visible to other nodes, and a zip member cannot be read remotely);
for S3 the decode tasks read the objects themselves, in parallel. Decoding goes through
:func:`emotion_core.faces.find_faces`, the code path labelling uses: with ``faces="none"`` (the
default) that is exactly :func:`emotion_core.preprocess.decode_image` on the whole image; with a
detector (``jobs.train --faces yunet``, for datasets of photos rather than face crops) every split
is cropped to the largest face the detector finds, as labelling crops it, and an image without a
face is skipped with reason ``no_face``. Each decode worker process creates the detector once
(:func:`face_detector`). Images that fail are dropped from training and reported with their
reason. The decoded uint8 dataset is materialised once in the object store (48x48 gray is 2.3 KB
per image), so epochs re-read pixels, not files.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from emotion_core import storage
from emotion_core.checkpoint import dataset_fingerprint
from emotion_core.labels import UnknownLabelError, canonical_label, sort_classes
from emotion_core.preprocess import IMAGE_EXTENSIONS

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "test": "test",
    "testing": "test",
}


class DataError(ValueError):
    """A dataset that cannot be trained on; the message says what to fix."""


@dataclass(frozen=True)
class Item:
    """One image: ``path`` is a readable URI (or ``zip-path!member``), ``rel`` its path inside
    the dataset (``train/happy/x.jpg``), ``size`` in bytes (for the fingerprint)."""

    path: str
    rel: str
    label: int
    size: int = 0


@dataclass
class DataSplits:
    classes: list[str]
    train: list[Item]
    validation: list[Item]
    test: list[Item]
    source: str  # "dir", "zip" or "s3"
    val_source: str  # "validation" (given) or "carved" (from train)
    val_fraction: float | None
    seed: int
    fingerprint: str
    zip_bytes: bytes | None = field(default=None, repr=False)

    @property
    def eval_split(self) -> str:
        return "test" if self.test else "validation"

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for name in ("train", "validation", "test"):
            c = Counter(it.label for it in getattr(self, name))
            out[name] = {cls: int(c.get(i, 0)) for i, cls in enumerate(self.classes)}
        return out

    def manifest(self) -> dict:
        """What to record about the data with a run/model (no file lists; see split_record)."""
        return {
            "source": self.source,
            "classes": self.classes,
            "counts": self.counts(),
            "validation": self.val_source,
            "val_fraction": self.val_fraction,
            "split_seed": self.seed,
            "eval_split": self.eval_split,
            "fingerprint": self.fingerprint,
        }

    def split_record(self) -> dict:
        """The split itself: which files went to validation (when carved), for reproducibility."""
        d = self.manifest()
        if self.val_source == "carved":
            d["validation_files"] = sorted(it.rel for it in self.validation)
        return d


# ---------------------------------------------------------------------------------------------
# Listing


def _list_local_dir(root: str) -> list[tuple[str, str, int]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        if rel_dir != ".":
            out.append((dirpath, rel_dir + "/", -1))
        for f in filenames:
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            try:
                size = os.path.getsize(full)
            except OSError:
                size = -1
            out.append((full, rel, size))
    return out


def _list_s3(uri: str) -> list[tuple[str, str, int]]:
    loc = storage.parse(uri)
    prefix = loc.prefix if loc.key else ""
    try:
        listing = storage.list_objects(storage.s3_uri(loc.bucket, prefix)).sort_by("image_uri")
    except storage.StorageError as e:  # no such bucket, access denied, endpoint down
        raise DataError(f"cannot list {uri}: {e}") from e
    return [(u, storage.parse(u).key[len(prefix):], int(n or 0))
            for u, n in zip(listing["image_uri"].to_pylist(), listing["size_bytes"].to_pylist())]


def _list_zip(data: bytes, name: str) -> list[tuple[str, str, int]]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise DataError(f"{name} is not a readable .zip ({e})") from e
    return [(f"{name}!{info.filename}", info.filename, int(info.file_size)) for info in zf.infolist()]


def _hidden(rel: str) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in rel.rstrip("/").split("/"))


def _strip_extra_top_folder(files: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """If no split folder is at the top but everything sits under one folder, descend into it
    (at most twice: Kaggle's extra folder, plus a zip's own root folder)."""
    for _ in range(2):
        tops = {rel.split("/", 1)[0].lower() for _, rel, _ in files if "/" in rel}
        if tops & set(SPLIT_ALIASES) or len(tops) != 1:
            break
        files = [(p, rel.split("/", 1)[1], s) for p, rel, s in files if "/" in rel and rel.split("/", 1)[1]]
    return files


def discover(uri: str, *, val_fraction: float = 0.1, seed: int = 0, classes: list[str] | None = None) -> DataSplits:
    """List and split a dataset (see module doc); ``classes`` keeps only those class folders
    (names or aliases; at least two, each with training images). Raises :class:`DataError`."""
    uri = str(uri).strip()
    try:
        loc = storage.parse(uri)
    except storage.StorageError as e:
        raise DataError(str(e)) from e
    zip_bytes = None
    if uri.lower().endswith(".zip"):
        try:
            zip_bytes = storage.read_bytes(uri)
        except storage.StorageError as e:
            raise DataError(f"cannot read dataset zip: {e}") from e
        files, source = _list_zip(zip_bytes, loc.uri), "zip"
    elif loc.is_s3:
        files, source = _list_s3(uri), "s3"
    else:
        if not os.path.isdir(loc.path):
            raise DataError(
                f"--data {uri}: no such folder; pass a Kaggle-layout folder (train/ + test/), a .zip, or s3://bucket/prefix"
            )
        files, source = _list_local_dir(loc.path), "dir"

    files = _strip_extra_top_folder([f for f in files if not _hidden(f[1])])
    by_split: dict[str, list[tuple[str, str, str, int]]] = {"train": [], "validation": [], "test": []}
    class_dirs: set[tuple[str, str]] = set()  # (split folder, class folder) seen as directories
    for path, rel, size in files:
        parts = rel.rstrip("/").split("/")
        split = SPLIT_ALIASES.get(parts[0].lower())
        if split is None or len(parts) < 2:
            continue
        if rel.endswith("/"):
            if len(parts) == 2:
                class_dirs.add((parts[0], parts[1]))
            continue
        if len(parts) >= 3:
            class_dirs.add((parts[0], parts[1]))
            if rel.lower().endswith(IMAGE_EXTENSIONS):
                by_split[split].append((path, rel, parts[1], size))

    if not by_split["train"]:
        found = sorted({rel.split("/", 1)[0] for _, rel, _ in files if "/" in rel})
        hint = f" (found folders: {', '.join(found[:8])})" if found else " (found no images at all)"
        raise DataError(
            f"--data {uri}: no train/ split with images in class folders{hint}; "
            "expected train/<class>/*.jpg plus test/ and/or validation/"
        )
    if classes:
        by_split, class_dirs = _only_classes(by_split, class_dirs, classes, uri)
    try:
        train_folders = {folder for _, _, folder, _ in by_split["train"]}
        classes = sort_classes(train_folders)
        index = {c: i for i, c in enumerate(classes)}
        splits: dict[str, list[Item]] = {}
        for name, rows in by_split.items():
            items = []
            for path, rel, folder, size in rows:
                canon = canonical_label(folder)
                if canon not in index:
                    raise DataError(
                        f"--data {uri}: class {folder!r} appears in {name}/ but not in train/; "
                        "add training images for it or remove the folder"
                    )
                items.append(Item(path, rel, index[canon], size))
            splits[name] = items
    except UnknownLabelError as e:
        raise DataError(f"--data {uri}: {e}") from e

    have = {(rel.split("/")[0], folder) for rows in by_split.values() for _, rel, folder, _ in rows}
    empty = sorted(f"{split}/{folder}" for split, folder in class_dirs - have)
    if empty:
        raise DataError(
            f"--data {uri}: class folder(s) with no images: {', '.join(empty)}; add images or remove them"
        )

    val_source, frac = "validation", None
    if not splits["validation"]:
        if not 0 < val_fraction < 1:
            raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
        splits["train"], splits["validation"] = stratified_split(splits["train"], val_fraction, seed)
        val_source, frac = "carved", val_fraction
        if not splits["validation"]:
            raise DataError(
                f"--data {uri}: too few training images to carve a validation split; add a validation/ folder"
            )

    fp = dataset_fingerprint((it.rel, it.size) for name in splits for it in splits[name])
    return DataSplits(
        classes=classes,
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        source=source,
        val_source=val_source,
        val_fraction=frac,
        seed=seed,
        fingerprint=fp,
        zip_bytes=zip_bytes,
    )


def _only_classes(by_split: dict, class_dirs: set, classes: list[str], uri: str) -> tuple[dict, set]:
    """The listing restricted to the ``classes`` subset (``--classes``)."""
    try:
        wanted = set(sort_classes(classes))
    except UnknownLabelError as e:
        raise DataError(f"--classes: {e}") from e
    if len(wanted) < 2:
        raise DataError(f"--classes {','.join(classes)}: name at least two classes")

    def keep(folder: str) -> bool:
        try:
            return canonical_label(folder) in wanted
        except UnknownLabelError:
            return False

    by_split = {name: [r for r in rows if keep(r[2])] for name, rows in by_split.items()}
    missing = wanted - {canonical_label(folder) for _, _, folder, _ in by_split["train"]}
    if missing:
        raise DataError(f"--classes: no training images for {', '.join(sorted(missing))} in {uri}/train")
    return by_split, {(split, folder) for split, folder in class_dirs if keep(folder)}


def stratified_split(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Seeded per-class split: ``round(fraction * n)`` of each class (at least 1 when the class has
    2 or more images, never all of them) goes to validation. Independent of listing order."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Item]] = {}
    for it in sorted(items, key=lambda it: it.rel):
        by_class.setdefault(it.label, []).append(it)
    train, val = [], []
    for label in sorted(by_class):
        group = by_class[label]
        n = len(group)
        k = min(max(1, round(fraction * n)), n - 1) if n >= 2 else 0
        order = rng.permutation(n)
        val.extend(group[i] for i in order[:k])
        train.extend(group[i] for i in order[k:])
    return train, val


# ---------------------------------------------------------------------------------------------
# Ray Data


def read_bytes(splits: DataSplits, items: list[Item]) -> list[bytes | None]:
    """The encoded bytes of ``items`` (of ``splits``, from any source), ``None`` where unreadable."""
    if splits.source == "s3":
        return [r.data for r in storage.read_objects([it.path for it in items], threads=16)]
    return _read_local(items, splits.zip_bytes)


def _read_local(items: list[Item], zip_bytes: bytes | None) -> list[bytes | None]:
    if zip_bytes is not None:
        zf = zipfile.ZipFile(io.BytesIO(zip_bytes))
        out: list[bytes | None] = []
        for it in items:
            try:
                out.append(zf.read(it.path.split("!", 1)[1]))
            except (KeyError, zipfile.BadZipFile, OSError, EOFError, ValueError):
                out.append(None)  # -> decode error row ("empty"), counted like any unreadable image
        return out

    def read(path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError:
            return None

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(read, (it.path for it in items)))


def _rows_table(items: list[Item], source: str, zip_bytes: bytes | None, seed: int):
    """Arrow table of (path, label, data), rows shuffled once (seeded) so blocks mix classes."""
    import pyarrow as pa

    order = np.random.default_rng(seed + 1).permutation(len(items))
    items = [items[i] for i in order]
    data = [None] * len(items) if source == "s3" else _read_local(items, zip_bytes)
    return pa.table(
        {
            "path": pa.array([it.rel for it in items], pa.string()),
            "uri": pa.array([it.path for it in items], pa.string()),
            "label": pa.array([it.label for it in items], pa.int64()),
            "idx": pa.array(np.arange(len(items)), pa.int64()),
            "data": pa.array(data, pa.binary()),
        }
    )


_DETECTORS: dict = {}  # detector name -> FaceDetector, one per process (decode tasks reuse worker processes)


def face_detector(name: str):
    """The registered face detector ``name``, created once per process. Raises
    :class:`emotion_core.faces.UnknownDetectorError` or ``DetectorUnavailableError``."""
    from emotion_core.faces import create_detector

    if name not in _DETECTORS:
        _DETECTORS[name] = create_detector(name)  # single-threaded (the decode tasks are the parallelism)
    return _DETECTORS[name]


def decode_faces(items: list[bytes | None], spec, faces: str = "none") -> tuple[np.ndarray, list[str | None]]:
    """Model input for each image: uint8 ``(N, C, size, size)`` and per image None or
    ``"<reason>: <detail>"`` (then its pixels are zero). The largest face the ``faces`` detector
    finds (``none``: the whole image); an image without a face is the error ``no_face``."""
    from emotion_core.faces import find_faces
    from emotion_core.preprocess import ImageDecodeError

    detector = face_detector(faces)
    pixels = np.zeros((len(items), spec.channels, spec.size, spec.size), dtype=np.uint8)
    errors: list[str | None] = [None] * len(items)
    for i, data in enumerate(items):
        try:
            found = find_faces(data or b"", detector, spec)
        except ImageDecodeError as e:
            errors[i] = f"{e.reason}: {e.detail or e.reason}"
            continue
        if not found.faces:
            errors[i] = f"no_face: detector {faces} found no face in the {found.width}x{found.height} image"
            continue
        largest = max(range(len(found.faces)), key=lambda k: found.faces[k].w * found.faces[k].h)
        pixels[i] = found.pixels[largest]
    return pixels, errors


def _decode_block(batch: dict, spec: dict, faces: str = "none") -> dict:
    """Ray Data map_batches fn: bytes (or S3 URI) -> uint8 pixels via :func:`decode_faces`.
    Never raises for bad images: ``error`` is "" or "<reason>: <detail>"."""
    from emotion_core.preprocess import InputSpec

    data = list(batch["data"])
    missing = [i for i, d in enumerate(data) if d is None]
    if missing:  # S3 objects: read in parallel threads inside this task (an unreadable one is an error row)
        for i, read in zip(missing, storage.read_objects([batch["uri"][i] for i in missing], threads=16)):
            data[i] = read.data
    pixels, errors = decode_faces(data, InputSpec.from_dict(spec), faces)
    return {
        "image": pixels,
        "label": np.asarray(batch["label"], dtype=np.int64),
        "idx": np.asarray(batch["idx"], dtype=np.int64),
        "path": np.asarray(batch["path"], dtype=object),
        "error": np.asarray([e or "" for e in errors], dtype=object),
    }


def _good_rows(batch: dict) -> dict:
    ok = batch["error"] == ""
    return {"image": batch["image"][ok], "label": batch["label"][ok], "idx": batch["idx"][ok]}


def _bad_rows(batch: dict) -> dict:
    bad = batch["error"] != ""
    return {"path": batch["path"][bad], "error": batch["error"][bad]}


@dataclass
class Decoded:
    """Materialised Ray Datasets of decoded images (columns ``image`` uint8 (C,S,S), ``label``)."""

    datasets: dict  # split name -> ray.data.Dataset (good rows only)
    counts: dict[str, int]  # split name -> number of good rows
    skipped: list[dict]  # [{"split", "path", "error"}] for images that could not be decoded or hold no face
    train_class_counts: np.ndarray | None = None  # set by jobs.train once decoded


def decode_splits(splits: DataSplits, spec, *, faces: str = "none", rows_per_block: int = 256,
                  seed: int = 0) -> Decoded:
    """Decode every split with Ray Data (parallel tasks), cropped to faces by the ``faces``
    detector (module doc), and materialise the pixels."""
    import ray

    if faces != "none":  # detection costs ~10-50 ms per photo: smaller blocks, more parallel tasks
        rows_per_block = min(rows_per_block, 32)
    datasets, counts, skipped = {}, {}, []
    for name in ("train", "validation", "test"):
        items = getattr(splits, name)
        if not items:
            continue
        table = _rows_table(items, splits.source, splits.zip_bytes, seed)
        chunks = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
        decoded = (
            ray.data.from_arrow(chunks)
            .map_batches(_decode_block, batch_size=None, batch_format="numpy",
                         fn_kwargs={"spec": spec.to_dict(), "faces": faces})
            .materialize()
        )
        bad = decoded.map_batches(_bad_rows, batch_size=None, batch_format="numpy").take_all()
        skipped.extend({"split": name, "path": r["path"], "error": r["error"]} for r in bad)
        good = decoded.map_batches(_good_rows, batch_size=None, batch_format="numpy").materialize()
        datasets[name], counts[name] = good, good.count()
        del decoded
    return Decoded(datasets, counts, skipped)


def class_counts(ds, num_classes: int) -> np.ndarray:
    """Images per class in a decoded dataset."""
    labels = np.concatenate([b["label"] for b in ds.select_columns(["label"]).iter_batches(batch_format="numpy")])
    return np.bincount(labels, minlength=num_classes)


def dataset_to_arrays(ds) -> tuple[np.ndarray, np.ndarray]:
    """Collect a decoded dataset into numpy (for the plain-PyTorch baseline and evaluation)."""
    images, labels = [], []
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        images.append(b["image"])
        labels.append(b["label"])
    return np.concatenate(images), np.concatenate(labels)
