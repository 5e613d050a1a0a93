"""Writing and committing a ``dt=`` partition exactly once (README: "Commit protocol").

1. **Stage**: the run's actors and tasks write its Parquet files under
   ``<output>/_staging/<run_id>/`` (``out/`` labelled rows, ``carry/`` carried-forward rows).
   Readers never look there (Athena/Hive and pyarrow skip paths starting with ``_``; the table's partitions
   are ``dt=*``). A run that crashes before step 3 leaves nothing where queries read.
2. **Check**: the staged files' footers must add up to the planned rows, else nothing is
   committed (a lost or duplicated unit can never be installed).
3. **Intent**: ``_staging/<run_id>/_COMMIT.json`` records the files to install, their final
   names (``dt=<date>/part-<run_id>-NNNNN.parquet``) and the partition's old files. Writing it is
   the commit point: from then on the commit is rolled *forward*, by this run or, if it dies,
   by the next run on the same output (:func:`recover`).
4. **Install**: move each staged file into ``dt=<date>/`` (a rename locally; copy + delete on
   S3, which has no rename), then delete the old files, then write ``dt=<date>/_SUCCESS``
   (JSON: run_id, rows, the committed file names) and remove the staging directory. Every step
   is idempotent, so replaying the intent is safe.

The one non-atomic window is step 4 while it runs (milliseconds to seconds: one copy per file of
up to a million rows, then one delete per old file): a query listing the partition meanwhile
can see the new and old files together. Readers that must never see that read the files named
in ``_SUCCESS``. Re-running a date replaces its files, never adds to them.

One run per (output, date) at a time: two concurrent runs on the same partition would each
replace the other's files.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from emotion_core import storage
from emotion_core.schema import label_schema

from ._cli import JobError
from ._label_lock import try_lock

STAGING = "_staging"
RUNS = "_runs"
INTENT = "_COMMIT.json"
SUCCESS = "_SUCCESS"
COUNT_COLUMNS = ["label", "error", "face_index", "faces_in_image"]
LOCAL_COUNT_FILES = 64  # staged files up to which count_staged runs in the driver
ABANDONED_AFTER_S = 24 * 3600  # uncommitted staging older than this is a crashed run's litter


class CommitError(JobError):
    """A commit that cannot be made or rolled forward; nothing new is visible to readers."""


def partition_uri(output: str, date: str) -> str:
    return storage.join(output, f"dt={date}")


def staging_uri(output: str, run_id: str) -> str:
    return storage.join(output, STAGING, run_id)


def staged_rows(files: list[str], threads: int = 32) -> list[int]:
    """Row counts of staged Parquet files, from their footers (one small read each)."""
    def rows(uri: str) -> int:
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows

    with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
        return list(pool.map(rows, files))


def write_empty(stage: str, classes: list[str]) -> str:
    """A Parquet file with no rows and the label schema, for an empty snapshot."""
    uri = storage.join(stage, "out", "empty.parquet")
    storage.write_parquet_atomic(label_schema(list(classes)).empty_table(), uri)
    return uri


def check_units(units: list[dict], outputs: list[str], threads: int = 32) -> list[int]:
    """Every planned work unit has exactly its own output, covering all of its listed objects
    (from each output's footer: the unit it names and its object count); a unit of plain images
    has rows for exactly as many images as objects (one row per face, or one for an image without
    faces or with an error). Returns each output's row count; raises :class:`CommitError`."""
    from ._label_infer import IMAGES_KEY, OBJECTS_KEY, SHARDS_KEY, UNIT_KEY

    def footer(uri: str):
        fs, path = storage.filesystem(uri)
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
        except (FileNotFoundError, OSError) as e:
            raise CommitError(f"work unit output {uri} is missing or unreadable ({e}); nothing committed") from e
        return meta.num_rows, meta.metadata or {}

    with ThreadPoolExecutor(max(1, min(threads, len(outputs) or 1))) as pool:
        footers = list(pool.map(footer, outputs))
    for unit, out, (rows, meta) in zip(units, outputs, footers):
        name = unit["uri"].rsplit("/", 1)[-1]
        objects, n_shards = int(meta.get(OBJECTS_KEY, -1)), int(meta.get(SHARDS_KEY, 0))
        images = int(meta.get(IMAGES_KEY, -1))
        if meta.get(UNIT_KEY, b"").decode() != name or objects != unit["rows"] or (not n_shards and images != objects):
            raise CommitError(f"{out} does not cover work unit {name} ({unit['rows']} objects planned; it names "
                              f"{meta.get(UNIT_KEY, b'?').decode()} with {objects} objects and {rows} rows); "
                              "nothing committed")
    return [rows for rows, _ in footers]


def _files(uri: str) -> list[pafs.FileInfo]:
    fs, path = storage.filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return [i for i in infos if i.type == pafs.FileType.File]


def commit(output: str, date: str, run_id: str, staged: list[str], rows: int) -> list[str]:
    """Replace partition ``dt=<date>`` with the staged files, atomically as far as the store
    allows (module doc), after checking from their footers that they hold exactly ``rows`` rows.
    Returns the committed file URIs."""
    counted = sum(staged_rows(staged))
    if counted != rows:
        raise CommitError(f"the staged files hold {counted} rows, the plan {rows}; nothing committed")
    part = partition_uri(output, date)
    names = [f"part-{run_id}-{i:05d}.parquet" for i in range(len(staged))]
    old = [i.base_name for i in _files(part) if i.base_name not in names and i.base_name != SUCCESS]
    intent = {
        "run_id": run_id,
        "date": date,
        "rows": rows,
        "staged": staged,
        "final": [storage.join(part, n) for n in names],
        "old": [storage.join(part, n) for n in old],
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    storage.write_bytes(storage.join(staging_uri(output, run_id), INTENT), json.dumps(intent, indent=1).encode())
    _apply(output, intent)
    return intent["final"]


def _apply(output: str, intent: dict) -> None:
    storage.makedirs(partition_uri(output, intent["date"]))

    def install(pair: tuple[str, str]) -> None:
        src, dst = pair
        if storage.exists(src):
            _move(src, dst)
        elif not storage.exists(dst):
            raise CommitError(f"commit of run {intent['run_id']}: {src} is missing and {dst} was never installed")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(install, zip(intent["staged"], intent["final"])))
        list(pool.map(_delete, intent["old"]))
    success = {
        "run_id": intent["run_id"],
        "rows": intent["rows"],
        "files": [u.rsplit("/", 1)[-1] for u in intent["final"]],
        "committed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    storage.write_bytes(
        storage.join(partition_uri(output, intent["date"]), SUCCESS), json.dumps(success, indent=1).encode()
    )
    _delete_tree(staging_uri(output, intent["run_id"]))


# S3 goes through boto3 rather than pyarrow here: pyarrow's S3 delete/move leave zero-byte
# "directory marker" objects (e.g. "dt=2024-05-01/") that some readers trip over.


def _move(src: str, dst: str) -> None:
    s, d = storage.parse(src), storage.parse(dst)
    if not s.is_s3:
        os.replace(s.path, d.path)  # atomic rename
        return
    client = storage.s3_client()
    client.copy_object(Bucket=d.bucket, Key=d.key, CopySource={"Bucket": s.bucket, "Key": s.key})
    client.delete_object(Bucket=s.bucket, Key=s.key)


def _delete(uri: str) -> None:
    loc = storage.parse(uri)
    if loc.is_s3:
        storage.s3_client().delete_object(Bucket=loc.bucket, Key=loc.key)  # no error if absent
    elif os.path.exists(loc.path):
        os.remove(loc.path)


def _delete_tree(uri: str) -> None:
    loc = storage.parse(uri)
    if not loc.is_s3:
        shutil.rmtree(loc.path, ignore_errors=True)
        return
    client = storage.s3_client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.key + "/"):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=loc.bucket, Delete={"Objects": keys, "Quiet": True})


def recover(output: str, held_date: str, now: float, log=print) -> list[str]:
    """Roll forward commits whose run died after writing its intent; returns their run ids.

    Safe against live runs and never wedges the table:
    - an intent is replayed only under its date's lock (``held_date``'s is the caller's), so
      never while its owner still runs;
    - an intent older than its partition's ``_SUCCESS`` (a later run committed since) is not
      replayed, and one that cannot be rolled forward (a staged file lost) is not retried
      forever: both are moved to ``_staging/_quarantine/<run_id>.json`` with the reason, logged;
    - staging of runs that died before committing is deleted once its newest file is more than
      a day plus an hour old; ``now`` is the store's clock (the lock's write time), so a skewed
      local clock cannot delete a live run's files."""
    fs, root = storage.filesystem(storage.join(output, STAGING))
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True))
    newest: dict[str, float] = {}
    intents: dict[str, float] = {}
    for i in infos:
        run_id = i.path[len(root) :].strip("/").split("/", 1)[0]
        if i.type != pafs.FileType.File or run_id.startswith("_"):  # _locks, _quarantine
            continue
        mtime = i.mtime.timestamp() if i.mtime else 0.0
        newest[run_id] = max(newest.get(run_id, 0.0), mtime)
        if i.base_name == INTENT and i.path[len(root):].strip("/") == f"{run_id}/{INTENT}":
            intents[run_id] = mtime
    rolled = []
    for run_id, written in sorted(intents.items()):
        intent = json.loads(storage.read_bytes(storage.join(staging_uri(output, run_id), INTENT)))
        lock = None if intent["date"] == held_date else try_lock(output, intent["date"], f"recovery-{run_id}")
        if intent["date"] != held_date and lock is None:
            log(f"[label] commit of run {run_id} (dt={intent['date']}) belongs to a live run; left to it")
            continue
        try:
            stale = _newer_success(output, intent, written)
            if stale:
                _quarantine(output, run_id, intent, stale, log)
                continue
            _apply(output, intent)
            rolled.append(run_id)
        except CommitError as e:
            _quarantine(output, run_id, intent, str(e), log)
        finally:
            if lock is not None:
                lock.release()
    for run_id, mtime in newest.items():
        if run_id not in intents and now - mtime > ABANDONED_AFTER_S + 3600:
            _delete_tree(staging_uri(output, run_id))
    return rolled


def _newer_success(output: str, intent: dict, written: float) -> str | None:
    """Why the intent must not be replayed: the partition's ``_SUCCESS`` is from another, later
    commit (by the store's timestamps)."""
    uri = storage.join(partition_uri(output, intent["date"]), SUCCESS)
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File or not info.mtime or info.mtime.timestamp() <= written:
        return None
    run = json.loads(storage.read_bytes(uri)).get("run_id")
    return None if run == intent["run_id"] else f"older than the partition's _SUCCESS of run {run}"


def _quarantine(output: str, run_id: str, intent: dict, reason: str, log) -> None:
    uri = storage.join(output, STAGING, "_quarantine", f"{run_id}.json")
    storage.write_bytes(uri, json.dumps(dict(intent, quarantine_reason=reason), indent=1).encode())
    _delete(storage.join(staging_uri(output, run_id), INTENT))
    log(f"[label] commit of run {run_id} (dt={intent['date']}) cannot be rolled forward ({reason}); "
        f"moved aside to {uri}")


def count_staged(files: list[str]) -> dict:
    """Rows, images, faces, images without faces, labels and error reasons of staged files,
    counted by Ray tasks; the driver merges one small row per block. Each image has exactly one
    row whose ``face_index`` is 0 or null, so images are counted without a distinct. Up to
    ``LOCAL_COUNT_FILES`` files the driver counts them itself, one file at a time per thread: the
    same counts without a Ray Data execution's start-up (seconds, paid twice per run)."""
    import ray

    empty = {"rows": 0, "images": 0, "faces": 0, "no_face": 0, "labels": {}, "errors": {}, "error_rows": 0}
    if not files:
        return empty
    if len(files) <= LOCAL_COUNT_FILES:
        with ThreadPoolExecutor(16) as pool:
            parts = list(pool.map(lambda f: _count_block(_read_count_columns(f)).to_pylist()[0], files))
    else:
        fs = storage.filesystem(files[0])[0]
        paths = [storage.filesystem(f)[1] for f in files]
        parts = ray.data.read_parquet(paths, filesystem=fs, columns=COUNT_COLUMNS) \
            .map_batches(_count_block, batch_format="pyarrow").take_all()
    out = {**empty, "labels": {}, "errors": {}}
    for p in parts:
        for k in ("rows", "images", "faces", "no_face"):
            out[k] += int(p[k])
        for key in ("labels", "errors"):
            for k, v in json.loads(p[key]).items():
                out[key][k] = out[key].get(k, 0) + v
    out["labels"], out["errors"] = dict(sorted(out["labels"].items())), dict(sorted(out["errors"].items()))
    out["error_rows"] = sum(out["errors"].values())
    return out


def _read_count_columns(uri: str) -> pa.Table:
    fs, path = storage.filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=COUNT_COLUMNS)


def _count_block(batch: pa.Table) -> pa.Table:
    labels = pc.value_counts(batch["label"].drop_null()) if batch.num_rows else []
    reasons = pc.value_counts(pc.replace_substring_regex(batch["error"].drop_null(), "(?s):.*", ""))
    face = batch["face_index"]
    return pa.table({
        "rows": [batch.num_rows],
        "images": [pc.sum(pc.fill_null(pc.equal(face, 0), True)).as_py() or 0],
        "faces": [pc.count(face).as_py()],
        "no_face": [pc.sum(pc.fill_null(pc.equal(batch["faces_in_image"], 0), False)).as_py() or 0],
        "labels": [json.dumps({v["values"]: v["counts"] for v in (labels.to_pylist() if len(labels) else [])})],
        "errors": [json.dumps({v["values"]: v["counts"] for v in reasons.to_pylist()})],
    })


def existing_files(directory: str) -> set[str]:
    """Names of the files in a staging directory (one listing)."""
    fs, path = storage.filesystem(directory)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {i.base_name for i in infos if i.type == pafs.FileType.File}


def latest_partition(output: str, date: str) -> str | None:
    """The latest ``dt=`` partition of ``output`` on or before ``date``: every partition is a full
    snapshot, so it is the previous state of the table for a run of ``date``."""
    fs, path = storage.filesystem(output)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise storage.StorageError(f"cannot list output {output}: {storage.short_error(e)}") from e
    days = [i.base_name[3:] for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("dt=")]
    days = sorted(d for d in days if d <= date)
    return days[-1] if days else None


def read_success(output: str, day: str) -> dict | None:
    """A partition's ``_SUCCESS`` record (run_id, rows, files), or None when it has none."""
    uri = storage.join(partition_uri(output, day), SUCCESS)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def previous_rows(output: str, date: str) -> int:
    """Rows of the latest committed partition on or before ``date`` (0 when there is none)."""
    day = latest_partition(output, date)
    record = read_success(output, day) if day else None
    return int(record.get("rows", 0)) if record else 0


def write_run_summary(output: str, run_id: str, summary: dict) -> str:
    uri = storage.join(output, RUNS, f"{run_id}.json")
    storage.write_bytes(uri, (json.dumps(summary, indent=1, default=str) + "\n").encode())
    return uri


def read_committed(output: str, date: str) -> list[str]:
    """The committed file URIs of a partition, from its ``_SUCCESS`` (strict readers)."""
    part = partition_uri(output, date)
    d = json.loads(storage.read_bytes(storage.join(part, SUCCESS)))
    return [storage.join(part, n) for n in d["files"]]
