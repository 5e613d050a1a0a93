"""Writing and committing a ``dt=`` partition exactly once (README: "Commit protocol").

1. **Stage**: the run writes its Parquet files to ``<output>/_staging/<run_id>/``. Readers never
   look there (Athena/Hive and pyarrow skip paths starting with ``_``; the table's partitions
   are ``dt=*``). A run that crashes before step 2 leaves nothing where queries read.
2. **Intent**: ``_staging/<run_id>/_COMMIT.json`` records the files to install, their final
   names (``dt=<date>/part-<run_id>-NNNNN.parquet``) and the partition's old files. Writing it is
   the commit point: from then on the commit is rolled *forward*, by this run or, if it dies,
   by the next run on the same output (:func:`recover`).
3. **Install**: move each staged file into ``dt=<date>/`` (a rename locally; copy + delete on
   S3, which has no rename), then delete the old files, then write ``dt=<date>/_SUCCESS``
   (JSON: run_id, rows, the committed file names) and remove the staging directory. Every step
   is idempotent, so replaying the intent is safe.

The one non-atomic window is step 3 while it runs (milliseconds to seconds: one copy per file of
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
import time
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from emotion_core import storage

STAGING = "_staging"
RUNS = "_runs"
INTENT = "_COMMIT.json"
SUCCESS = "_SUCCESS"
ABANDONED_AFTER_S = 24 * 3600  # uncommitted staging older than this is a crashed run's litter


def partition_uri(output: str, date: str) -> str:
    return storage.join(output, f"dt={date}")


def staging_uri(output: str, run_id: str) -> str:
    return storage.join(output, STAGING, run_id)


def write_staged(table: pa.Table, output: str, run_id: str, rows_per_file: int) -> list[str]:
    """Write ``table`` as files of at most ``rows_per_file`` rows into the run's staging dir
    (one file, possibly empty, at least, so an empty partition still carries the schema)."""
    stage = staging_uri(output, run_id)
    storage.makedirs(stage)
    fs, _ = storage.filesystem(stage)
    uris = []
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        uri = storage.join(stage, f"part-{run_id}-{i:05d}.parquet")
        _, path = storage.filesystem(uri)
        pq.write_table(
            table.slice(start, rows_per_file),
            path,
            filesystem=fs,
            compression="snappy",
            row_group_size=128 * 1024,
        )
        uris.append(uri)
    return uris


def _files(uri: str) -> list[pafs.FileInfo]:
    fs, path = storage.filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return [i for i in infos if i.type == pafs.FileType.File]


def commit(output: str, date: str, run_id: str, staged: list[str], rows: int) -> list[str]:
    """Atomically-as-S3-allows replace partition ``dt=<date>`` with the staged files (module doc).
    Returns the committed file URIs."""
    part = partition_uri(output, date)
    names = [u.rsplit("/", 1)[-1] for u in staged]
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
    for src, dst in zip(intent["staged"], intent["final"]):
        if storage.exists(src):
            _move(src, dst)
        elif not storage.exists(dst):
            raise RuntimeError(f"commit of run {intent['run_id']}: {src} is missing and {dst} was never installed")
    for uri in intent["old"]:
        _delete(uri)
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


def recover(output: str, now: float | None = None) -> list[str]:
    """Roll forward commits whose run died after its intent was written, and delete staging of
    runs that died before committing once it is older than a day (younger ones may belong to a
    run still in progress). Returns the run_ids rolled forward."""
    fs, root = storage.filesystem(storage.join(output, STAGING))
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True))
    newest: dict[str, float] = {}
    intents = []
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        run_id = i.path[len(root) :].strip("/").split("/", 1)[0]
        mtime = i.mtime.timestamp() if i.mtime else 0.0
        newest[run_id] = max(newest.get(run_id, 0.0), mtime)
        if i.base_name == INTENT:
            intents.append(run_id)
    for run_id in intents:
        intent = json.loads(storage.read_bytes(storage.join(staging_uri(output, run_id), INTENT)))
        _apply(output, intent)
    now = time.time() if now is None else now
    for run_id, mtime in newest.items():
        if run_id not in intents and now - mtime > ABANDONED_AFTER_S:
            _delete_tree(staging_uri(output, run_id))
    return intents


def write_run_summary(output: str, run_id: str, summary: dict) -> str:
    uri = storage.join(output, RUNS, f"{run_id}.json")
    storage.write_bytes(uri, (json.dumps(summary, indent=1, default=str) + "\n").encode())
    return uri


def read_committed(output: str, date: str) -> list[str]:
    """The committed file URIs of a partition, from its ``_SUCCESS`` (strict readers)."""
    part = partition_uri(output, date)
    d = json.loads(storage.read_bytes(storage.join(part, SUCCESS)))
    return [storage.join(part, n) for n in d["files"]]
