"""The Parquet schema of emotion labels: one module defines it, the README documents it.

One row per face found in an input image, keyed by ``(image_uri, face_index)``: an image with
several faces has several rows; an image where the detector finds no face has one row with
``face_index`` null, ``faces_in_image`` 0 and no label; an unreadable image has one error row
(``face_index`` null). With detector ``none`` the whole image is face 0. Partitioned Hive-style by
``dt=YYYY-MM-DD/`` (the partition column is in the directory name, not in the files). Timestamps
are UTC, millisecond precision (readable by Athena/Trino, Spark, DuckDB, pandas and polars alike).
"""

from __future__ import annotations

import pyarrow as pa

TIMESTAMP = pa.timestamp("ms", tz="UTC")
PARTITION_COLUMN = "dt"

# Columns before the per-class probabilities.
HEAD_FIELDS: list[pa.Field] = [
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("etag", pa.string()),
    pa.field("size_bytes", pa.int64()),
    pa.field("last_modified", TIMESTAMP),
    pa.field("label", pa.string()),  # null when error is set
    pa.field("confidence", pa.float32()),  # probability of `label`; null on error
]
# Columns after the per-class probabilities.
TAIL_FIELDS: list[pa.Field] = [
    pa.field("model_name", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("labelled_at", TIMESTAMP),
    pa.field("width", pa.int32()),  # original image width; null if it could not be decoded
    pa.field("height", pa.int32()),
    pa.field("error", pa.string()),  # null when ok; else "<reason>: <detail>"
    # Images packed in shards (WebDataset .tar, Parquet): the shard object and the member's name
    # in it; null for plain image objects. Appended last, so older files read with nulls here.
    pa.field("shard_uri", pa.string()),
    pa.field("shard_member", pa.string()),
    # Faces (appended after the shard columns; partitions written before read with nulls here):
    # the box in original-image pixels after EXIF orientation, x/y = top-left corner.
    pa.field("face_index", pa.int32()),  # 0.. by detector score; null: no face, or an error row
    pa.field("face_x", pa.int32()),
    pa.field("face_y", pa.int32()),
    pa.field("face_w", pa.int32()),
    pa.field("face_h", pa.int32()),
    pa.field("face_score", pa.float32()),  # detector score (1.0 for a whole image)
    pa.field("faces_in_image", pa.int32()),  # faces found in this image; null on error
    pa.field("face_detector", pa.string()),  # detector that produced the row ("none": whole image)
]
FACE_COLUMNS = ["face_index", "face_x", "face_y", "face_w", "face_h", "face_score", "faces_in_image",
                "face_detector"]


def prob_column(cls: str) -> str:
    return f"prob_{cls}"


def label_schema(classes: list[str]) -> pa.Schema:
    """The schema of the label files written for a model with these classes."""
    if not classes:
        raise ValueError("a label schema needs at least one class")
    probs = [pa.field(prob_column(c), pa.float32()) for c in classes]
    return pa.schema(HEAD_FIELDS + probs + TAIL_FIELDS)


_ATHENA_TYPES = {
    pa.string(): "string",
    pa.int64(): "bigint",
    pa.int32(): "int",
    pa.float32(): "float",
    TIMESTAMP: "timestamp",
}


def athena_ddl(
    classes: list[str],
    location: str,
    table: str = "emotion_labels",
    database: str = "default",
    projection_start: str = "2024-01-01",
) -> str:
    """``CREATE EXTERNAL TABLE`` for Athena, with partition projection on ``dt`` so new nightly
    partitions are queryable without ``MSCK REPAIR TABLE``."""
    cols = ",\n".join(f"  `{f.name}` {_ATHENA_TYPES[f.type]}" for f in label_schema(classes))
    location = location.rstrip("/") + "/"
    return (
        f"CREATE EXTERNAL TABLE IF NOT EXISTS `{database}`.`{table}` (\n{cols}\n)\n"
        f"PARTITIONED BY (`{PARTITION_COLUMN}` string)\n"
        "STORED AS PARQUET\n"
        f"LOCATION '{location}'\n"
        "TBLPROPERTIES (\n"
        "  'projection.enabled'='true',\n"
        "  'projection.dt.type'='date',\n"
        "  'projection.dt.format'='yyyy-MM-dd',\n"
        f"  'projection.dt.range'='{projection_start},NOW',\n"
        "  'projection.dt.interval'='1',\n"
        "  'projection.dt.interval.unit'='DAYS',\n"
        f"  'storage.location.template'='{location}{PARTITION_COLUMN}=${{dt}}/'\n"
        ");"
    )
