"""Planning a labelling run, as distributed data: what to label, and what to carry forward.

Inputs are the listing shards (Parquet, written by :mod:`jobs._listing`); outputs are Parquet
files in the run's staging area, written by Ray tasks, never gathered on the driver (except for
small runs, below):

* ``todo/todo-<hash>.parquet``: *work units* of at most ``unit_rows`` listing rows (plus a
  ``format`` column: ``images``, ``webdataset`` or ``parquet``), one actor call each;
* ``carry/carry-<hash>.parquet``: with ``--incremental``, the previous rows of unchanged objects,
  already in the label schema, committed as they are.

File names are a hash of their content (first and last key, row count), so a retried task
rewrites its own file. The driver keeps only ``(file, rows)`` pairs: O(files), not O(objects),
above ``LOCAL_PLAN_ROWS``.

Incremental semantics (README, "Incremental runs"). Every partition is a full snapshot, so the
previous state is the latest partition on or before ``--date`` only. The unit of change is the
listed object: a plain image, or a whole shard (its members' rows carry the shard's ``etag``).
An object is unchanged when the previous partition has rows for it with the same ``etag`` and the
same ``model_version`` and none of them is a read error (``not_found``/``read_failed``/...:
transient, so labelled again); decode errors of unchanged bytes are data and are carried. Faces
follow the object: all rows of an image (one per face) are carried or relabelled together, and an
image's rows are carried only if they came from the detector this run would use (``--faces``:
the named one, ``none``, or under ``auto`` the default detector for images larger than the model
input and ``none`` for the others, from the row's width and height). Rows written before faces
existed were whole-image labels: they read as face 0 of detector ``none``. Both
sides are matched with Ray Data hash joins on ``(object, etag)``: ``left_anti`` gives the work
units, ``left_semi`` the carried rows. Objects no longer listed drop out of the new snapshot.

Small runs are planned in the driver. A Ray Data execution has a fixed start-up (worker
processes for its tasks, in their own pools for the shuffle's map and reduce sides, and for every
``read_parquet`` a pool of footer-reader actors, 32 by default): on 2 cores the three-join plan of
7 objects took 59-72 s, the same work in one process 0.05 s (2026-12-06); with 2 footer readers
(what :func:`jobs._cli.init_ray` sets for a local Ray) the Ray Data plan took 35-49 s (2026-12-07).
When the listing plus the previous partition's rows (from its ``_SUCCESS``) are at most
``LOCAL_PLAN_ROWS``, :func:`make_plan` runs the same batch functions and pyarrow's hash joins (the
ones Ray Data's join calls per partition) on the driver: memory bounded by the threshold (a few
hundred bytes a row, tens of MB), the same files, named the same way. Larger runs, and previous
partitions without a ``_SUCCESS`` (size unknown), take the distributed path; ``engine="ray"``
forces it (the tests check both agree).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from emotion_core import shards, storage
from emotion_core.schema import label_schema

from ._label_commit import latest_partition, partition_uri, read_success

PLAN_FILE = "plan.json"
FORMATS = shards.FORMATS
LOCAL_PLAN_ROWS = 100_000  # listing + previous rows up to which the plan runs in the driver (module doc)


@dataclass(frozen=True)
class FaceRule:
    """Which detector a run applies to an image: ``mode`` is --faces (auto, none or a name),
    ``detector`` the one used for detection (the default under auto), ``size`` the model input."""

    mode: str = "none"
    detector: str = "none"
    size: int = 48

    def expected(self, width: pa.Array, height: pa.Array) -> pa.Array:
        """The detector name each image of this size gets from this run."""
        if self.mode != "auto":
            return pa.array([self.detector] * len(width), pa.string())
        large = pc.greater(pc.max_element_wise(width, height), self.size)
        return pc.if_else(pc.fill_null(large, False), self.detector, "none")


@dataclass
class Plan:
    listed: int
    units: list[dict] = field(default_factory=list)  # [{"uri", "rows"}] work units
    carried: list[dict] = field(default_factory=list)  # [{"uri", "rows"}] carried-forward rows
    previous: str | None = None  # the dt= partition used as the previous state

    @property
    def todo_rows(self) -> int:
        return sum(u["rows"] for u in self.units)

    @property
    def carried_rows(self) -> int:
        return sum(c["rows"] for c in self.carried)

    def save(self, stage: str) -> None:
        storage.write_bytes(storage.join(stage, PLAN_FILE), json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def load(cls, stage: str) -> Plan | None:
        uri = storage.join(stage, PLAN_FILE)
        return cls(**json.loads(storage.read_bytes(uri))) if storage.exists(uri) else None


def make_plan(listing_shards: list[str], listed: int, stage: str, *, output: str, date: str, classes: list[str],
              model_version: str, incremental: bool, input_format: str, unit_rows: int,
              faces: FaceRule = FaceRule(), engine: str = "auto") -> Plan:
    """Write the work units (and carried rows) under ``stage``; see the module doc. ``engine``:
    ``auto`` (the driver for small runs, else Ray Data), ``ray`` or ``local``."""
    plan = Plan(listed=listed)
    if listed == 0:
        return plan
    previous = previous_partition(output, date) if incremental else None
    prev_rows = 0
    if previous is not None:
        plan.previous, files, prev_rows = previous
    small = prev_rows is not None and listed + prev_rows <= LOCAL_PLAN_ROWS
    if engine == "local" or (engine == "auto" and small):
        plan_local(plan, listing_shards, stage, files if previous else None, output, classes, model_version,
                   input_format, unit_rows, faces)
        return plan
    listing = ray.data.read_parquet(listing_shards, filesystem=storage.filesystem(stage)[0])
    listing = listing.map_batches(add_format, fn_kwargs={"input_format": input_format}, batch_format="pyarrow")
    if previous is not None:
        prev = ray.data.read_parquet(files, filesystem=storage.filesystem(output)[0])
        prev = prev.map_batches(mark_carryable, batch_format="pyarrow",
                                fn_kwargs={"classes": classes, "model_version": model_version, "faces": faces})
        parts = max(1, math.ceil(listed / 250_000))  # hash partitions: one per 250k objects
        # An object is carried whole or not at all: one failing row (e.g. a shard member labelled by
        # another detector) sends the whole object back to labelling.
        failing = prev.map_batches(_failing_keys, batch_format="pyarrow")
        prev = prev.join(failing, "left_anti", parts, on=("object_uri", "etag")).drop_columns(["carry"])
        keys = prev.select_columns(["object_uri", "etag"])
        listing = listing.join(keys, "left_anti", parts, on=("image_uri", "etag"), right_on=("object_uri", "etag"))
        carried = prev.join(ray.data.read_parquet(listing_shards, filesystem=storage.filesystem(stage)[0])
                            .select_columns(["image_uri", "etag"]),
                            "left_semi", parts, on=("object_uri", "etag"), right_on=("image_uri", "etag"))
        carried = carried.drop_columns(["object_uri"])
        plan.carried = write_files(carried, storage.join(stage, "carry"), "carry", unit_rows * 4, label_schema(classes))
    plan.units = write_files(listing, storage.join(stage, "todo"), "todo", unit_rows)
    return plan


def plan_local(plan: Plan, listing_shards: list[str], stage: str, previous_files: list[str] | None, output: str,
               classes: list[str], model_version: str, input_format: str, unit_rows: int, faces: FaceRule) -> None:
    """:func:`make_plan`'s distributed steps in this process, for small runs (module doc): the same
    batch functions, pyarrow's hash joins, the same files."""
    everything = read_tables([storage.filesystem(u)[1] for u in listing_shards], storage.filesystem(stage)[0])
    listing = add_format(everything, input_format)
    if previous_files is not None:
        prev = mark_carryable(read_tables(previous_files, storage.filesystem(output)[0]), classes, model_version, faces)
        prev = prev.join(_failing_keys(prev), ["object_uri", "etag"], join_type="left anti").drop_columns(["carry"])
        keys = prev.select(["object_uri", "etag"])
        listing = listing.join(keys, ["image_uri", "etag"], ["object_uri", "etag"], join_type="left anti")
        carried = prev.join(everything.select(["image_uri", "etag"]), ["object_uri", "etag"], ["image_uri", "etag"],
                            join_type="left semi").drop_columns(["object_uri"])
        plan.carried = write_chunks(carried, storage.join(stage, "carry"), "carry", unit_rows * 4,
                                    label_schema(classes))
    plan.units = write_chunks(listing, storage.join(stage, "todo"), "todo", unit_rows)


def read_tables(paths: list[str], fs: pafs.FileSystem) -> pa.Table:
    """Parquet files (paths of ``fs``, no scheme) as one table."""
    return pa.concat_tables([pq.read_table(p, filesystem=fs) for p in paths], promote_options="permissive")


def write_chunks(table: pa.Table, directory: str, prefix: str, rows: int, schema: pa.Schema | None = None):
    """:func:`write_files` for a table in this process: files of at most ``rows`` rows, in
    ``image_uri`` order."""
    table = table.sort_by("image_uri")
    written = [_write_file(table.slice(i, rows), directory, prefix, schema) for i in range(0, table.num_rows, rows)]
    return sorted(({"uri": w["uri"][0].as_py(), "rows": w["rows"][0].as_py()} for w in written),
                  key=lambda w: w["uri"])


def limit_listing(listing, n: int, directory: str):
    """The first ``n`` rows of a listing (any n rows: the listing has no global order), as one
    shard; for demos and benchmarks."""
    from ._listing import ListingResult

    fs = storage.filesystem(directory)[0]
    written = write_files(ray.data.read_parquet(listing.shards, filesystem=fs).limit(n), directory, "listing", n)
    return ListingResult(shards=[w["uri"] for w in written], rows=sum(w["rows"] for w in written))


def add_format(batch: pa.Table, input_format: str) -> pa.Table:
    """The ``format`` of each listed object (images, or a shard format), keeping only what
    ``--input-format`` asks for (``auto``: by extension, all of them)."""
    formats = [shards.detect_format(u) for u in batch["image_uri"].to_pylist()]
    if input_format != "auto":
        formats = [f if f == input_format else None for f in formats]
    batch = batch.append_column("format", pa.array(formats, pa.string()))
    return batch.filter(pc.is_valid(batch["format"]))


def carryable(batch: pa.Table, classes: list[str], model_version: str, faces: FaceRule = FaceRule()) -> pa.Table:
    """Previous rows that pass the carry rule (module doc), in the label schema, plus the
    ``object_uri`` they were listed as (the shard for a member, else the image). The plan carries
    an object only when all its rows pass (:func:`mark_carryable` + a join)."""
    batch = mark_carryable(batch, classes, model_version, faces)
    return batch.filter(batch["carry"]).drop_columns(["carry"])


def _failing_keys(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.invert(batch["carry"])).select(["object_uri", "etag"])


def mark_carryable(batch: pa.Table, classes: list[str], model_version: str, faces: FaceRule = FaceRule()) -> pa.Table:
    """Previous rows in the label schema, plus ``object_uri`` and ``carry`` (the row passes the
    carry rule of the module doc)."""
    batch = whole_image_faces(conform(batch, label_schema(classes)))
    reason = pc.replace_substring_regex(pc.fill_null(batch["error"], ""), "(?s):.*", "")
    read_error = pc.is_in(reason, value_set=pa.array(list(storage.READ_ERROR_KINDS), pa.string()))
    same_faces = pc.or_kleene(pc.is_valid(batch["error"]),  # broken bytes stay broken whatever the detector
                              pc.equal(batch["face_detector"], faces.expected(batch["width"], batch["height"])))
    keep = pc.and_(pc.and_(pc.equal(batch["model_version"], model_version), pc.invert(read_error)), same_faces)
    batch = batch.append_column("object_uri", pc.coalesce(batch["shard_uri"], batch["image_uri"]))
    return batch.append_column("carry", pc.fill_null(keep, False))


def whole_image_faces(batch: pa.Table) -> pa.Table:
    """Rows written before faces existed (no ``face_detector``, a label) as what they were: the
    whole image as face 0 of detector ``none``."""
    old = pc.fill_null(pc.and_(pc.is_null(batch["face_detector"]), pc.is_valid(batch["label"])), False)
    if not pc.any(old).as_py():
        return batch
    n = batch.num_rows
    values = {"face_index": pa.array(np.zeros(n, np.int32)), "face_x": pa.array(np.zeros(n, np.int32)),
              "face_y": pa.array(np.zeros(n, np.int32)), "face_w": batch["width"], "face_h": batch["height"],
              "face_score": pa.array(np.ones(n, np.float32)), "faces_in_image": pa.array(np.ones(n, np.int32)),
              "face_detector": pa.array(["none"] * n, pa.string())}
    for name, value in values.items():
        i = batch.schema.get_field_index(name)
        batch = batch.set_column(i, batch.schema.field(i), pc.if_else(old, value, batch[name]))
    return batch


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``'s column order and types; columns it lacks (older files) are null."""
    cols = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def write_files(ds: ray.data.Dataset, directory: str, prefix: str, rows: int, schema: pa.Schema | None = None):
    """Write ``ds`` as Parquet files of at most ``rows`` rows, each sorted by ``image_uri`` and
    named by its content; returns ``[{"uri", "rows"}]`` sorted by name."""
    written = ds.map_batches(_write_file, batch_size=rows, batch_format="pyarrow",
                             fn_kwargs={"directory": directory, "prefix": prefix, "schema": schema}).take_all()
    return sorted(({"uri": w["uri"], "rows": int(w["rows"])} for w in written), key=lambda w: w["uri"])


def _write_file(batch: pa.Table, directory: str, prefix: str, schema: pa.Schema | None) -> pa.Table:
    if batch.num_rows == 0:
        return pa.table({"uri": pa.array([], pa.string()), "rows": pa.array([], pa.int64())})
    batch = batch.sort_by("image_uri")
    if schema is not None:
        batch = conform(batch, schema)
    keys = batch["image_uri"]
    digest = hashlib.sha1(f"{keys[0]}\x00{keys[-1]}\x00{batch.num_rows}".encode()).hexdigest()[:20]
    uri = storage.join(directory, f"{prefix}-{digest}.parquet")
    storage.write_parquet_atomic(batch, uri)
    return pa.table({"uri": [uri], "rows": pa.array([batch.num_rows], pa.int64())})


def previous_partition(output: str, date: str) -> tuple[str, list[str], int | None] | None:
    """The latest committed ``dt=`` partition on or before ``date``, its files and its rows (from
    its ``_SUCCESS``; for partitions written without one, every file of the directory and rows
    None: not known without reading every footer)."""
    day = latest_partition(output, date)
    if day is None:
        return None
    part = partition_uri(output, day)
    rows = None
    if (record := read_success(output, day)) is not None:
        names, rows = record["files"], record.get("rows")
    else:
        pfs, ppath = storage.filesystem(part)
        names = [i.base_name for i in pfs.get_file_info(pafs.FileSelector(ppath)) if i.base_name.endswith(".parquet")]
    files = [storage.filesystem(storage.join(part, n))[1] for n in sorted(names)]
    return (day, files, rows) if files else None
