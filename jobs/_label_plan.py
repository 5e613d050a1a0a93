"""Incremental planning for ``jobs.label --incremental``.

Semantics (README: "Incremental runs"):

* The *previous state* of an object is its latest row in the output table: across all ``dt=``
  partitions, the row with the greatest ``dt`` (then ``labelled_at``).
* An object is **skipped** when that latest row has the same ``etag`` (unchanged object), the
  same ``model_version`` (same model) and no ``error``. Everything else is labelled: new and
  changed objects, objects labelled by another model version, and previous error rows (errors
  may be transient, e.g. a read that failed).
* Skipped objects are **carried forward**: their previous rows (unchanged, with their original
  ``run_id`` and ``labelled_at``) are copied into the new partition, so every ``dt=`` partition
  is a complete snapshot holding exactly one row per listed object, incremental or not, and
  ``WHERE dt = '<latest>'`` is the current state of the bucket. Objects no longer listed are not
  carried forward.

Planning scales: only ``image_uri, etag, model_version, error, labelled_at`` (+ the ``dt``
partition key) are read, with ``pyarrow.dataset`` (column projection, and a filter to the listed
URIs evaluated while scanning); the latest row per object is found by one Arrow sort, and the
listing is matched with ``pyarrow.compute.index_in``, no Python loop over rows. One million
labelled rows plan in seconds and a few hundred MB.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from emotion_core import storage
from emotion_core.schema import PARTITION_COLUMN, TIMESTAMP, label_schema

from ._label_io import LISTING_SCHEMA, first_of_runs

PLAN_FIELDS = [
    pa.field("image_uri", pa.string()),
    pa.field("etag", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("error", pa.string()),
    pa.field("labelled_at", TIMESTAMP),
]
_DT = pa.field(PARTITION_COLUMN, pa.string())
_EMPTY_SKIP = pa.schema([pa.field("image_uri", pa.string()), _DT]).empty_table()


@dataclass
class Plan:
    todo: pa.Table  # listing rows to label (LISTING_SCHEMA, sorted by image_uri)
    skipped: pa.Table  # image_uri + dt of the previous row to carry forward
    scanned_rows: int  # previous rows read from the output (after the URI filter)
    seconds: float = 0.0

    @classmethod
    def everything(cls, listing: pa.Table) -> Plan:
        """The plan of a full (non-incremental) run: label every listed object."""
        return cls(listing, _EMPTY_SKIP, 0)


def output_dataset(output_uri: str, fields: list[pa.Field]) -> pads.Dataset | None:
    """The committed label files under ``output_uri`` (``dt=*/*.parquet``; never ``_staging`` or
    ``_runs``), read with ``fields`` as the schema: other columns are never read, columns a file
    lacks read as null."""
    fs, path = storage.filesystem(output_uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    except OSError as e:
        raise storage.StorageError(f"cannot read output {output_uri}: {e}") from e
    files = [
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.base_name.endswith(".parquet")
        and i.path[len(path) :].strip("/").count("/") == 1  # <output>/dt=.../file.parquet
        and i.path[len(path) :].strip("/").startswith(f"{PARTITION_COLUMN}=")
    ]
    if not files:
        return None
    return pads.dataset(
        sorted(files),
        filesystem=fs,
        format="parquet",
        schema=pa.schema([*fields, _DT]),
        partitioning=pads.partitioning(pa.schema([_DT]), flavor="hive"),
        partition_base_dir=path,
    )


def latest_rows(table: pa.Table) -> pa.Table:
    """The latest row per image_uri (greatest dt, then labelled_at), sorted by image_uri."""
    if table.num_rows == 0:
        return table
    table = table.sort_by([("image_uri", "ascending"), (PARTITION_COLUMN, "descending"), ("labelled_at", "descending")])
    return table.filter(first_of_runs(table["image_uri"]))


def plan_incremental(listing: pa.Table, output_uri: str, model_version: str) -> Plan:
    """Split ``listing`` into what to label and what to carry forward (see module doc)."""
    t0 = time.perf_counter()
    dataset = output_dataset(output_uri, PLAN_FIELDS)
    if dataset is None or listing.num_rows == 0:
        return Plan(listing, _EMPTY_SKIP, 0, time.perf_counter() - t0)
    prev = dataset.to_table(filter=pc.field("image_uri").isin(listing["image_uri"]))
    scanned = prev.num_rows
    latest = latest_rows(prev)
    good = latest.filter(
        pc.and_(pc.equal(latest["model_version"], model_version), pc.is_null(latest["error"]))
    )
    idx = pc.index_in(listing["image_uri"], value_set=good["image_uri"])
    prev_etag = good["etag"].take(idx)
    skip = pc.fill_null(pc.equal(listing["etag"], prev_etag), False)
    todo = listing.filter(pc.invert(skip)).cast(LISTING_SCHEMA)
    skipped = pa.table(
        {
            "image_uri": listing["image_uri"].filter(skip),
            PARTITION_COLUMN: good[PARTITION_COLUMN].take(idx).filter(skip),
        }
    )
    return Plan(todo, skipped, scanned, time.perf_counter() - t0)


def _pair_key(uri, dt) -> pa.ChunkedArray:
    return pc.binary_join_element_wise(dt, uri, "\x00")


def carry_forward(output_uri: str, skipped: pa.Table, classes: list[str]) -> pa.Table:
    """The previous rows of skipped objects (exactly the (image_uri, dt) rows chosen by the plan),
    in ``label_schema(classes)``."""
    schema = label_schema(classes)
    if skipped.num_rows == 0:
        return schema.empty_table()
    dataset = output_dataset(output_uri, list(schema))
    dts = pc.unique(skipped[PARTITION_COLUMN])
    rows = dataset.to_table(
        filter=pc.field(PARTITION_COLUMN).isin(dts) & pc.field("image_uri").isin(skipped["image_uri"])
    )
    want = _pair_key(skipped["image_uri"], skipped[PARTITION_COLUMN])
    rows = rows.filter(pc.is_in(_pair_key(rows["image_uri"], rows[PARTITION_COLUMN]), value_set=want))
    rows = latest_rows(rows)
    if rows.num_rows != skipped.num_rows:
        raise RuntimeError(
            f"carry-forward found {rows.num_rows} of {skipped.num_rows} previous rows: the output changed "
            "during the run (another run committing to it?); re-run"
        )
    return rows.drop_columns([PARTITION_COLUMN]).cast(schema)
