"""Listing and reading image objects for ``jobs.label``.

A *listing* is a pyarrow table with :data:`LISTING_SCHEMA`, one row per object, sorted by
``image_uri``:

* S3: ``list_objects_v2`` pagination; ``etag`` is S3's ETag without quotes.
* Local: a recursive ``os.scandir``; S3 has ETags but files do not, so the local ``etag`` is
  ``"<size hex>-<mtime_ns hex>"``: stable while the file is untouched, different after any
  rewrite (the same test rsync uses). It is what ``--incremental`` compares.
* ``--manifest``: a CSV or Parquet list of objects instead of listing (for buckets too large to
  list nightly, e.g. an S3 Inventory report). Columns, case-insensitive: ``uri`` (or
  ``image_uri``/``path``), or ``bucket`` + ``key``; optional ``size``, ``last_modified`` (or
  ``last_modified_date``), ``etag``. A CSV without a header is read as S3 Inventory's
  ``bucket,key[,size,last_modified,etag]`` with URL-encoded keys.

Reading (:func:`fetch`) returns bytes per object with high I/O concurrency: S3 GETs of 1.5 KB
faces are latency bound (tens of ms each), so a thread pool keeps ``threads`` GETs in flight on
one boto3 client per process (its connection pool is sized to match). The object's metadata
as read (ETag, size, LastModified of the GET response; fstat locally) replaces the listed
values, so a row always describes the bytes that were labelled.
"""

from __future__ import annotations

import csv
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import lru_cache
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc

from emotion_core import storage
from emotion_core.preprocess import IMAGE_EXTENSIONS
from emotion_core.schema import TIMESTAMP

LISTING_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("last_modified", TIMESTAMP),
    ]
)


class ListingError(RuntimeError):
    """An input or manifest that cannot be listed or read (message says what to fix)."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def local_etag(size: int, mtime_ns: int) -> str:
    return f"{size:x}-{mtime_ns:x}"


def _table(uris, etags, sizes, mtimes) -> pa.Table:
    return pa.table(
        {
            "image_uri": pa.array(uris, pa.string()),
            "etag": pa.array(etags, pa.string()),
            "size_bytes": pa.array(sizes, pa.int64()),
            "last_modified": pa.array(mtimes, TIMESTAMP),
        },
        schema=LISTING_SCHEMA,
    )


def _ms(dt_or_ns) -> int | None:
    if dt_or_ns is None:
        return None
    if isinstance(dt_or_ns, datetime):
        return int(dt_or_ns.timestamp() * 1000)
    return int(dt_or_ns) // 1_000_000


# ---------------------------------------------------------------------------------------------
# Listing


def list_local(root: str) -> pa.Table:
    if os.path.isfile(root):
        st = os.stat(root)
        return _table([root], [local_etag(st.st_size, st.st_mtime_ns)], [st.st_size], [_ms(st.st_mtime_ns)])
    if not os.path.isdir(root):
        raise ListingError(f"input {root} does not exist (pass a directory of images or s3://bucket/prefix)")
    uris, etags, sizes, mtimes = [], [], [], []
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=True):
                    stack.append(e.path)
                elif is_image_name(e.name) and e.is_file(follow_symlinks=True):
                    st = e.stat()
                    uris.append(e.path)
                    etags.append(local_etag(st.st_size, st.st_mtime_ns))
                    sizes.append(st.st_size)
                    mtimes.append(st.st_mtime_ns // 1_000_000)
    return _table(uris, etags, sizes, mtimes)


def list_s3(uri: str) -> pa.Table:
    loc = storage.parse(uri)
    prefix = loc.key + "/" if loc.key and not loc.key.endswith("/") else loc.key
    client = _client()
    uris, etags, sizes, mtimes = [], [], [], []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                key = obj["Key"]
                if is_image_name(key):
                    uris.append(f"s3://{loc.bucket}/{key}")
                    etags.append(obj.get("ETag", "").strip('"') or None)
                    sizes.append(obj.get("Size"))
                    mtimes.append(_ms(obj.get("LastModified")))
    except Exception as e:  # botocore ClientError / EndpointConnectionError / NoCredentialsError
        raise ListingError(f"cannot list {uri}: {_aws_error(e)}") from e
    return _table(uris, etags, sizes, mtimes)


def list_inputs(inputs: list[str], manifest: str | None = None) -> pa.Table:
    """List every input (or read the manifest, restricted to the inputs' prefixes if both are
    given). Duplicates (overlapping inputs) are dropped; the result is sorted by image_uri."""
    if manifest:
        table = read_manifest(manifest)
        if inputs:
            prefixes = [storage.parse(u).uri.rstrip("/") + "/" for u in inputs]
            mask = pc.or_kleene(*[pc.starts_with(table["image_uri"], p) for p in prefixes]) if len(
                prefixes
            ) > 1 else pc.starts_with(table["image_uri"], prefixes[0])
            table = table.filter(mask)
    else:
        parts = []
        for uri in inputs:
            loc = storage.parse(uri)
            parts.append(list_s3(uri) if loc.is_s3 else list_local(loc.path))
        table = pa.concat_tables(parts) if parts else _table([], [], [], [])
    return unique_sorted(table)


def unique_sorted(table: pa.Table) -> pa.Table:
    """Sorted by image_uri, first row kept per image_uri (vectorised, no Python row loop)."""
    if table.num_rows == 0:
        return table
    table = table.sort_by("image_uri")
    return table.filter(first_of_runs(table["image_uri"]))


def first_of_runs(sorted_keys: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Boolean mask that is true where a key differs from the one before (keys sorted)."""
    keys = sorted_keys.combine_chunks() if isinstance(sorted_keys, pa.ChunkedArray) else sorted_keys
    if len(keys) == 0:
        return pa.array([], pa.bool_())
    differs = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))
    return pa.concat_arrays([pa.array([True]), pc.fill_null(differs, True)])


# ---------------------------------------------------------------------------------------------
# Manifests


_URI_COLUMNS = ("uri", "image_uri", "path", "url")
_MTIME_COLUMNS = ("last_modified", "last_modified_date", "lastmodifieddate", "lastmodified")


def read_manifest(uri: str) -> pa.Table:
    """A CSV or Parquet object list -> listing (filtered to image extensions)."""
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as e:
        raise ListingError(f"manifest {e}") from e
    if data[:4] == b"PAR1":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        table = table.rename_columns([c.strip().lower() for c in table.column_names])
        rows = table.to_pydict()
        keys_encoded = False
    else:
        text = data.decode("utf-8-sig", errors="replace")
        lines = list(csv.reader(io.StringIO(text)))
        lines = [r for r in lines if r and any(x.strip() for x in r)]
        header = [c.strip().lower() for c in lines[0]] if lines else []
        if set(header) & (set(_URI_COLUMNS) | {"key", "bucket"}) or all(
            re.fullmatch(r"[a-z_][a-z0-9_ ]*", h) for h in header
        ):  # a header row (one naming no known column is reported below)
            body = lines[1:]
            keys_encoded = False
        else:  # S3 Inventory CSV: no header, bucket,key,size,last_modified,etag, keys URL-encoded
            header = ["bucket", "key", "size", "last_modified", "etag"]
            body = lines
            keys_encoded = True
        rows = {h: [r[i] if i < len(r) else None for r in body] for i, h in enumerate(header)}
    return _manifest_table(rows, keys_encoded, uri)


def _manifest_table(rows: dict, keys_encoded: bool, uri: str) -> pa.Table:
    col = next((c for c in _URI_COLUMNS if c in rows), None)
    if col:
        uris = [str(u).strip() for u in rows[col]]
        uris = [storage.parse(u).uri for u in uris]
    elif "bucket" in rows and "key" in rows:
        keys = [unquote_plus(k) if keys_encoded else k for k in rows["key"]]
        uris = [f"s3://{b}/{k}" for b, k in zip(rows["bucket"], keys)]
    else:
        raise ListingError(
            f"manifest {uri} needs a 'uri' column or 'bucket' and 'key' columns "
            f"(found: {', '.join(rows) or 'none'})"
        )
    n = len(uris)
    sizes = rows.get("size") or [None] * n
    etags = rows.get("etag") or [None] * n
    mcol = next((c for c in _MTIME_COLUMNS if c in rows), None)
    mtimes = rows[mcol] if mcol else [None] * n
    keep = [i for i, u in enumerate(uris) if is_image_name(u)]
    return _table(
        [uris[i] for i in keep],
        [str(etags[i]).strip('"') if etags[i] not in (None, "") else None for i in keep],
        [int(sizes[i]) if sizes[i] not in (None, "") else None for i in keep],
        [_parse_time(mtimes[i]) for i in keep],
    )


def _parse_time(v) -> int | None:
    if v in (None, ""):
        return None
    if isinstance(v, datetime):
        return _ms(v if v.tzinfo else v.replace(tzinfo=UTC))
    try:
        t = datetime.fromisoformat(str(v).strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return _ms(t if t.tzinfo else t.replace(tzinfo=UTC))


# ---------------------------------------------------------------------------------------------
# Reading


@lru_cache(maxsize=1)
def _client():
    """One boto3 client per process (thread-safe); its pool matches the fetch threads."""
    return storage.s3_client(max_pool_connections=64)


def _aws_error(e: Exception) -> str:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error", {})
        code = err.get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{code} {err.get('Message', '')}".strip()
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _get_s3(uri: str):
    loc = storage.parse(uri)
    try:
        r = _client().get_object(Bucket=loc.bucket, Key=loc.key)
        data = r["Body"].read()
    except Exception as e:
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            return None, "not_found: object was deleted after listing", None
        return None, f"read_failed: {_aws_error(e)}", None
    meta = (r.get("ETag", "").strip('"') or None, r.get("ContentLength", len(data)), _ms(r.get("LastModified")))
    return data, None, meta


def _get_local(path: str):
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        return None, "not_found: file was deleted after listing", None
    except OSError as e:
        return None, f"read_failed: {e.strerror or type(e).__name__}", None
    return data, None, (local_etag(st.st_size, st.st_mtime_ns), st.st_size, st.st_mtime_ns // 1_000_000)


def fetch(uris: list[str], threads: int = 32) -> tuple[list, list, list]:
    """Read objects. Returns ``(datas, errors, metas)`` per uri: bytes or None, None or
    ``"not_found: ..."`` / ``"read_failed: ..."``, and ``(etag, size, last_modified_ms)`` as read."""
    get = [(_get_s3 if u.startswith("s3://") else _get_local) for u in uris]
    if any(g is _get_s3 for g in get) and threads > 1 and len(uris) > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(uris))) as pool:
            results = list(pool.map(lambda gu: gu[0](gu[1]), zip(get, uris)))
    else:  # local files: a plain loop is faster than threads for small files
        results = [g(u) for g, u in zip(get, uris)]
    datas, errors, metas = (list(x) for x in zip(*results)) if results else ([], [], [])
    return datas, errors, metas
