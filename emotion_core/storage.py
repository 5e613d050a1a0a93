"""One place that turns a URI into something we can list, read and write.

Supported URIs: a plain local path, ``file:///abs/path``, and ``s3://bucket/key``.

**S3 keys are exact.** ``parse("s3://bucket/<key>")`` takes everything after the first ``/``
behind the bucket as the key, verbatim: it is never URL-parsed or percent-decoded, so ``#``,
``?``, ``%``, spaces, control characters, unicode and a leading ``/`` (``s3://b//x.jpg`` is key
``/x.jpg``) are all part of the key, and :attr:`Location.uri` gives back the same string. A
listing row's ``image_uri`` is ``"s3://" + bucket + "/" + key`` with the key as stored in S3
(not percent-encoded); bucket names cannot contain ``/``, so the first ``/`` after the bucket
separates them unambiguously. Local paths are made absolute; ``file://`` is stripped verbatim
(not percent-decoded either).

**Listing** (:func:`list_objects`, :func:`list_level`) returns :data:`LISTING_SCHEMA` tables of
image files (by extension). S3's ``etag`` is the ETag without quotes; a local file has none, so
its ``etag`` is ``"<size hex>-<mtime_ns hex>"``: stable while the file is untouched, different
after any rewrite (rsync's test). A URI that names one existing object or file lists just it
(any extension: the user named it). Local listing never raises on what it finds in the tree:

* a symlink that leaves the input tree is not followed: an image-named one becomes an error row
  ``not_followed: ...``; one to a directory is skipped (its target is outside the input);
* a symlink to a directory inside the tree is not descended (its target is listed under its real
  path already, and this is what makes symlink loops harmless); a dangling or looping symlink
  with an image name becomes an error row ``bad_link: ...``;
* a file name that is not valid UTF-8 becomes an error row ``bad_name: ...`` whose ``image_uri``
  shows the raw bytes as ``\\xNN`` escapes (it cannot be read back through that string);
* a folder that cannot be read becomes an error row ``read_failed: ...`` with the folder's path;
* a file deleted between the scan and its stat is skipped: the listing describes what exists.

**Reading** (:func:`read_object`, :func:`read_objects`) uses one error vocabulary, the prefix
before ``:`` in the message: ``not_found`` (deleted after listing), ``read_failed`` (access
denied, throttling after the client's retries, endpoint down; S3 messages are ``<code>
<message>``), ``too_large`` (bigger than ``max_bytes``, told from the size before the body is
read: S3 ContentLength of the GET, local ``fstat``). :func:`is_read_error` says which errors
look like an outage (``not_found``, ``read_failed``) as opposed to data (everything else).

S3 uses the standard AWS credential chain (env vars, shared config/profile, IAM role /
instance profile / IRSA). S3-compatible servers (MinIO, Ceph, moto, ...) are reached through
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``; boto3 honours those itself but pyarrow does not,
so :func:`filesystem` passes ``endpoint_override`` (and ``scheme="http"`` for plain-HTTP
endpoints) explicitly. Credentials are never logged or put in error messages (:func:`short_error`).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from emotion_core.errors import short_error
from emotion_core.preprocess import IMAGE_EXTENSIONS
from emotion_core.schema import TIMESTAMP

log = logging.getLogger(__name__)

LISTING_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("last_modified", TIMESTAMP),
        pa.field("error", pa.string()),  # null for a listed object; else "<kind>: <detail>"
    ]
)

# Error kinds (the text before ":" in an error message).
NOT_FOUND = "not_found"
READ_FAILED = "read_failed"
TOO_LARGE = "too_large"
READ_ERROR_KINDS = (NOT_FOUND, READ_FAILED)


class StorageError(RuntimeError):
    """A URI that cannot be parsed, reached, read or written."""


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``scheme`` is "file" or "s3"; ``path`` is the absolute local path, or
    ``bucket/key`` with the key verbatim (see the module docstring)."""

    scheme: str
    path: str

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def key(self) -> str:
        parts = self.path.split("/", 1)
        return parts[1] if len(parts) > 1 else ""

    @property
    def prefix(self) -> str:
        """The S3 prefix this location lists: the key with one trailing ``/`` (none for the bucket)."""
        key = self.key
        return key if not key or key.endswith("/") else key + "/"

    @property
    def uri(self) -> str:
        return f"s3://{self.path}" if self.is_s3 else self.path


def parse(uri: str) -> Location:
    text = "" if uri is None else str(uri)
    if not text.strip():
        raise StorageError("empty URI: pass a local path, file:///path or s3://bucket/prefix")
    head = text.lstrip()
    for scheme in ("s3://", "s3a://"):
        if head.startswith(scheme):
            rest = head[len(scheme) :]  # the key is taken verbatim: never URL-parse it
            bucket = rest.split("/", 1)[0]
            if not bucket:
                raise StorageError(f"{text!r} has no bucket: use s3://bucket/prefix")
            return Location("s3", rest)
    if head.startswith("file://"):
        return Location("file", os.path.abspath(head[len("file://") :]))
    text = text.strip()
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme:
        raise StorageError(f"unsupported URI scheme {scheme.group(1)!r} in {text!r}: use a local path, file:// or s3://")
    return Location("file", os.path.abspath(os.path.expanduser(text)))


def s3_uri(bucket: str, key: str) -> str:
    """The URI of an S3 object: the key verbatim (the inverse of :func:`parse`)."""
    return f"s3://{bucket}/{key}"


def is_s3(uri: str) -> bool:
    return parse(uri).is_s3


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    base = str(uri).rstrip("/")
    tail = "/".join(p.strip("/") for p in parts if p)
    return f"{base}/{tail}" if tail else base


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        kwargs["allow_bucket_creation"] = False
    if region:
        kwargs["region"] = region
    # Credentials: pyarrow's S3 client uses the AWS SDK's default chain (env, profile, IMDS, IRSA).
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    return _s3_filesystem(s3_endpoint(), _region())


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(pyarrow filesystem, path)`` for a URI (pyarrow paths carry no trailing ``/``;
    keys with empty path segments, e.g. ``//``, are read through boto3 in :func:`read_object`)."""
    loc = parse(uri)
    if loc.is_s3:
        return s3_filesystem(), loc.path.rstrip("/")
    return pafs.LocalFileSystem(), loc.path


def s3_client(max_pool_connections: int = 64):
    """A boto3 S3 client using the standard credential chain and the endpoint from the environment.

    Retries: botocore's ``standard`` mode, not ``adaptive``. Standard retries throttling errors
    (503 SlowDown) with full-jitter exponential backoff (rand * min(2**i, 20) s) and a retry quota;
    adaptive adds a client-side rate limiter that, shared by the 48 fetch threads of a labelling
    actor, collapses throughput under a few percent of SlowDown. Measured with
    ``bench.label_bench --only throttled`` (5 % SlowDown, +20 ms per request, 3,000 faces): standard
    keeps 0.92-0.98x of the unthrottled images/s, adaptive kept 0.21-0.36x; nothing lost in either.
    Ten attempts ride out about a minute of sustained SlowDown per object before a read fails."""
    import boto3
    from botocore.config import Config

    cfg = Config(
        max_pool_connections=max_pool_connections,
        retries={"total_max_attempts": 10, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.client("s3", endpoint_url=s3_endpoint(), region_name=_region(), config=cfg)


@lru_cache(maxsize=4)
def _shared_client(pool: int):
    """One boto3 client per process and pool size (boto3 clients are thread-safe)."""
    return s3_client(max_pool_connections=pool)


def shared_s3_client(threads: int = 64):
    """The process's S3 client with a connection pool of at least ``threads`` (min 10)."""
    return _shared_client(max(10, int(threads)))




def _error_code(e: BaseException) -> str:
    resp = getattr(e, "response", None)
    if not isinstance(resp, dict):
        return ""
    code = (resp.get("Error") or {}).get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or ""
    return str(code)


def is_read_error(error: str | None) -> bool:
    """True for errors that say the object could not be read (``not_found``, ``read_failed``):
    what an outage, expired credentials or a vanished prefix produce. Decode errors, ``too_large``
    and listing oddities (``bad_name``, ``bad_link``, ``not_followed``) are data."""
    return bool(error) and error.split(":", 1)[0].strip() in READ_ERROR_KINDS


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise StorageError(f"{uri}: not found") from e
    except OSError as e:
        raise StorageError(f"{uri}: cannot read ({short_error(e)})") from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. On S3 a PUT is atomic; locally we write a temp file and rename."""
    fs, path = filesystem(uri)
    try:
        if parse(uri).is_s3:
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        raise StorageError(f"{uri}: cannot write ({short_error(e)})") from e


def write_parquet_atomic(table: pa.Table, uri: str) -> None:
    """Write one Parquet file so that readers see all of it or nothing: a temp file renamed into
    place locally; on S3 a single PUT (or a completed multipart upload) is already atomic."""
    fs, path = filesystem(uri)
    if parse(uri).is_s3:
        pq.write_table(table, path, filesystem=fs, compression="snappy", row_group_size=128 * 1024)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, tmp, compression="snappy", row_group_size=128 * 1024)
    os.replace(tmp, path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if not parse(uri).is_s3:
        fs.create_dir(path, recursive=True)


def check_writable(uri: str) -> None:
    """Fail fast (StorageError) if we cannot create and delete a small object under ``uri``."""
    probe = join(uri, f"_write_probe_{uuid.uuid4().hex[:8]}")
    loc = parse(probe)
    if loc.is_s3:  # boto3 directly: pyarrow's delete would leave a "directory" marker object behind
        try:
            client = s3_client()
            client.put_object(Bucket=loc.bucket, Key=loc.key, Body=b"ok")
            client.delete_object(Bucket=loc.bucket, Key=loc.key)
            return
        except Exception as e:  # botocore raises several unrelated types (ClientError, EndpointConnectionError)
            raise StorageError(f"output {uri} is not writable: {short_error(e)}") from e
    try:
        write_bytes(probe, b"ok")
        fs, path = filesystem(probe)
        fs.delete_file(path)
    except StorageError as e:
        raise StorageError(f"output {uri} is not writable: {e}") from e
    except OSError as e:
        raise StorageError(f"output {uri} is not writable: {short_error(e)}") from e


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
    elif parse(uri).is_s3:
        # S3 "directories" may have no marker object; delete contents if any.
        try:
            fs.delete_dir_contents(path, missing_dir_ok=True)
        except OSError:
            pass


# Kept for callers not yet moved to the public name (jobs/_data.py).


# ---------------------------------------------------------------------------------------------
# Listing


# What a listing keeps: images, and the shard files that pack them (WebDataset .tar, Parquet);
# jobs.label's plan keeps the formats --input-format asks for.
LISTED_EXTENSIONS = (*IMAGE_EXTENSIONS, ".tar", ".parquet")


def in_metadata_folder(relative_key: str) -> bool:
    """True under a folder whose name starts with ``_`` (the Hive/Spark convention for metadata:
    ``_staging``, ``_runs``, ``_temporary``): listings skip those, so a table or staging area
    inside an input prefix is never read as input."""
    return any(part.startswith("_") for part in relative_key.split("/")[:-1])


def is_image_name(name: str) -> bool:
    """An image or image shard, by extension (case-insensitive): what listings keep."""
    return name.lower().endswith(LISTED_EXTENSIONS)


def local_etag(size: int, mtime_ns: int) -> str:
    return f"{size:x}-{mtime_ns:x}"


def _ms(value) -> int | None:
    """Milliseconds since the epoch from a datetime or nanoseconds."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return int(value) // 1_000_000


class _Rows:
    """Column lists of a listing under construction."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = {f.name: [] for f in LISTING_SCHEMA}

    def add(self, uri: str, etag=None, size=None, mtime_ms=None, error=None) -> None:
        for name, v in zip(LISTING_SCHEMA.names, (uri, etag, size, mtime_ms, error)):
            self.cols[name].append(v)

    def table(self) -> pa.Table:
        return listing_table(**self.cols)


def listing_table(image_uri, etag=None, size_bytes=None, last_modified=None, error=None) -> pa.Table:
    """A :data:`LISTING_SCHEMA` table from columns (``last_modified`` in ms since the epoch or
    datetimes); missing columns are null."""
    n = len(image_uri)
    cols = [image_uri, etag, size_bytes, last_modified, error]
    arrays = [pa.array(c if c is not None else [None] * n, f.type) for c, f in zip(cols, LISTING_SCHEMA)]
    return pa.Table.from_arrays(arrays, schema=LISTING_SCHEMA)


def empty_listing() -> pa.Table:
    return LISTING_SCHEMA.empty_table()


def _printable_path(path: str) -> str | None:
    """``None`` if ``path`` is valid UTF-8 text, else its bytes with ``\\xNN`` escapes."""
    try:
        path.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def _within(path: str, root_real: str) -> bool:
    return path == root_real or path.startswith(root_real.rstrip(os.sep) + os.sep)


def _stat_file(rows: _Rows, path: str, follow: bool) -> None:
    """Add the row of one image file; a file deleted since the scan is skipped."""
    try:
        st = os.stat(path, follow_symlinks=follow)
    except FileNotFoundError:
        log.debug("%s was deleted during the listing; skipped", path)
        return
    except OSError as e:
        rows.add(path, error=f"{READ_FAILED}: cannot stat: {e.strerror or short_error(e)}")
        return
    rows.add(path, local_etag(st.st_size, st.st_mtime_ns), st.st_size, st.st_mtime_ns // 1_000_000)


def _local_entry(rows: _Rows, subdirs: list[str], entry: os.DirEntry, root_real: str) -> None:
    """Classify one directory entry (see the module docstring for the rules)."""
    path = entry.path
    bad = _printable_path(path)
    try:
        is_link = entry.is_symlink()
        is_dir = not is_link and entry.is_dir(follow_symlinks=False)
    except OSError as e:  # only on exotic file systems
        if is_image_name(entry.name):
            rows.add(bad or path, error=f"{READ_FAILED}: cannot stat: {e.strerror or short_error(e)}")
        return
    if is_dir:
        if entry.name.startswith("_"):
            return  # a metadata folder (Hive/Spark convention: _staging, _runs, _temporary): not input
        if bad:
            rows.add(bad, error="bad_name: folder name is not valid UTF-8; its contents are not listed")
        else:
            subdirs.append(path)
        return
    if is_link:
        try:
            target = os.path.realpath(path, strict=True)
        except OSError as e:
            if is_image_name(entry.name):
                rows.add(bad or path, error=f"bad_link: dangling or looping symlink ({e.strerror or type(e).__name__})")
            return
        if os.path.isdir(target):
            return  # never descended: inside the tree it is listed by its real path; outside it is not input
        if not _within(target, root_real):
            if is_image_name(entry.name):
                rows.add(bad or path, error="not_followed: symlink leads outside the input tree")
            return
    if not is_image_name(entry.name):
        return
    if bad:
        rows.add(bad, error="bad_name: file name is not valid UTF-8")
        return
    _stat_file(rows, path, follow=True)


def _local_level(path: str, root_real: str) -> tuple[pa.Table, list[str]]:
    rows, subdirs = _Rows(), []
    try:
        with os.scandir(path) as it:
            for entry in it:
                _local_entry(rows, subdirs, entry, root_real)
    except FileNotFoundError:
        log.debug("%s was deleted during the listing; skipped", path)
    except OSError as e:
        rows.add(
            _printable_path(path) or path, error=f"{READ_FAILED}: cannot list folder: {e.strerror or short_error(e)}"
        )
    return rows.table(), sorted(subdirs)


def _local_root(uri: str, root: str | None) -> tuple[str, str]:
    path = parse(uri).path
    if not os.path.lexists(path):
        raise StorageError(f"input {uri} does not exist (pass a directory of images or s3://bucket/prefix)")
    return path, os.path.realpath(parse(root).path if root else path)


def _s3_level(loc: Location, client) -> tuple[pa.Table, list[str]]:
    rows, subs = _Rows(), []
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.prefix, Delimiter="/")
    for page in pages:
        _add_s3_objects(rows, loc.bucket, page, loc.prefix)
        subs.extend(s3_uri(loc.bucket, p["Prefix"]) for p in page.get("CommonPrefixes", ())
                    if not p["Prefix"][len(loc.prefix):].startswith("_"))  # metadata folders are not input
    return rows.table(), subs


def _add_s3_objects(rows: _Rows, bucket: str, page: dict, prefix: str) -> None:
    for obj in page.get("Contents", ()):
        key = obj["Key"]
        if is_image_name(key) and not in_metadata_folder(key[len(prefix):]):
            rows.add(s3_uri(bucket, key), obj.get("ETag", "").strip('"') or None, obj.get("Size"),
                     _ms(obj.get("LastModified")))


def _s3_single(loc: Location, client) -> pa.Table | None:
    """The one-row listing of ``loc`` if it names an existing object, else None."""
    if not loc.key or loc.key.endswith("/"):
        return None
    try:
        head = client.head_object(Bucket=loc.bucket, Key=loc.key)
    except Exception as e:  # botocore: ClientError 404 for a prefix; anything else: treat as a prefix too
        if _error_code(e) not in ("404", "NoSuchKey", "NotFound"):
            log.debug("HEAD %s failed (%s); listing it as a prefix", loc.uri, short_error(e))
        return None
    rows = _Rows()
    rows.add(loc.uri, head.get("ETag", "").strip('"') or None, head.get("ContentLength"), _ms(head.get("LastModified")))
    return rows.table()


def single_object(uri: str) -> pa.Table | None:
    """The one-row listing of ``uri`` if it names one existing file or S3 object, else None."""
    loc = parse(uri)
    if loc.is_s3:
        return _s3_single(loc, shared_s3_client())
    if os.path.isfile(loc.path):
        rows = _Rows()
        _stat_file(rows, loc.path, follow=True)
        return rows.table()
    return None


def list_level(uri: str, *, root: str | None = None) -> tuple[pa.Table, list[str]]:
    """One level of a listing: ``(objects directly under uri, sub-prefix URIs)``.

    S3: ``list_objects_v2`` with ``Delimiter="/"`` (sub-prefixes end with ``/``); local: one
    ``os.scandir`` (sub-folders, sorted). ``root`` is the input tree that symlinks may not leave
    (default: ``uri`` itself). Raises :class:`StorageError` if an S3 prefix cannot be listed."""
    loc = parse(uri)
    if loc.is_s3:
        try:
            return _s3_level(loc, shared_s3_client())
        except Exception as e:  # botocore raises several unrelated types
            raise StorageError(f"cannot list {uri}: {short_error(e)}") from e
    path, root_real = _local_root(uri, root)
    return _local_level(path, root_real)


def list_objects(uri: str, *, root: str | None = None) -> pa.Table:
    """Every image object under ``uri`` (one paginator / one walk), or the single object or file
    that ``uri`` names. Not sorted. Raises :class:`StorageError` for an input that does not
    exist locally or an S3 prefix that cannot be listed."""
    single = single_object(uri)
    if single is not None:
        return single
    loc = parse(uri)
    if loc.is_s3:
        return list_flat(uri)
    path, root_real = _local_root(uri, root)
    parts, stack = [], [path]
    while stack:
        table, subdirs = _local_level(stack.pop(), root_real)
        parts.append(table)
        stack.extend(reversed(subdirs))
    return pa.concat_tables(parts) if parts else empty_listing()


def list_pages(uri: str) -> Iterator[pa.Table]:
    """Everything under an S3 prefix with one paginator and no delimiter, a table per page
    (1,000 keys a request)."""
    loc = parse(uri)
    try:
        for page in shared_s3_client().get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.prefix):
            rows = _Rows()
            _add_s3_objects(rows, loc.bucket, page, loc.prefix)
            yield rows.table()
    except Exception as e:  # botocore raises several unrelated types
        raise StorageError(f"cannot list {uri}: {short_error(e)}") from e


def list_flat(uri: str) -> pa.Table:
    """Everything under an S3 prefix with one paginator (see :func:`list_pages`)."""
    return pa.concat_tables([empty_listing(), *list_pages(uri)])


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class ObjectRead:
    """One object as read: ``data`` or ``error``, and its metadata as read (ETag, size,
    LastModified of the GET; ``fstat`` locally), which may differ from the listing."""

    data: bytes | None
    error: str | None = None
    etag: str | None = None
    size: int | None = None
    last_modified_ms: int | None = None


def _too_large(size: int, max_bytes: int) -> str:
    return f"{TOO_LARGE}: {size} bytes > max {max_bytes} bytes (not read)"


def _read_s3(loc: Location, max_bytes: int | None, client) -> ObjectRead:
    try:
        r = client.get_object(Bucket=loc.bucket, Key=loc.key)
    except Exception as e:  # botocore: ClientError, EndpointConnectionError, NoCredentialsError, ...
        if _error_code(e) in ("NoSuchKey", "404", "NotFound"):
            return ObjectRead(None, f"{NOT_FOUND}: object was deleted after listing")
        return ObjectRead(None, f"{READ_FAILED}: {short_error(e)}")
    etag, size, mtime = r.get("ETag", "").strip('"') or None, r.get("ContentLength"), _ms(r.get("LastModified"))
    body = r["Body"]
    if max_bytes is not None and size is not None and size > max_bytes:
        body.close()  # the body is never read: the connection is dropped, not drained
        return ObjectRead(None, _too_large(size, max_bytes), etag, size, mtime)
    try:
        data = body.read()
    except Exception as e:  # urllib3/botocore read errors (timeout, connection reset, incomplete read)
        return ObjectRead(None, f"{READ_FAILED}: {short_error(e)}", etag, size, mtime)
    return ObjectRead(data, None, etag, len(data), mtime)


def _read_local(path: str, max_bytes: int | None) -> ObjectRead:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            meta = (local_etag(st.st_size, st.st_mtime_ns), st.st_size, st.st_mtime_ns // 1_000_000)
            if max_bytes is not None and st.st_size > max_bytes:
                return ObjectRead(None, _too_large(st.st_size, max_bytes), *meta)
            data = f.read()
    except FileNotFoundError:
        return ObjectRead(None, f"{NOT_FOUND}: file was deleted after listing")
    except OSError as e:
        return ObjectRead(None, f"{READ_FAILED}: {e.strerror or short_error(e)}")
    return ObjectRead(data, None, *meta)


def read_object(uri: str, max_bytes: int | None = None) -> ObjectRead:
    """Read one object; never raises for a missing, unreadable or too large object."""
    try:
        loc = parse(uri)
    except StorageError as e:
        return ObjectRead(None, f"{READ_FAILED}: {e}")
    if loc.is_s3:
        return _read_s3(loc, max_bytes, shared_s3_client())
    return _read_local(loc.path, max_bytes)


def read_objects(uris: Iterable[str], threads: int = 32, max_bytes: int | None = None) -> list[ObjectRead]:
    """Read many objects, in order. S3 GETs of small objects are latency bound, so they run on a
    thread pool of ``threads`` sharing the process's client (pool sized to match); local files are
    read in a plain loop, which is faster than threads for small files."""
    uris = list(uris)
    if threads > 1 and len(uris) > 1 and any(u.lstrip().startswith(("s3://", "s3a://")) for u in uris):
        shared_s3_client(threads)  # create it once, before the threads race to
        with ThreadPoolExecutor(max_workers=min(threads, len(uris))) as pool:
            return list(pool.map(lambda u: _read_pooled(u, max_bytes, threads), uris))
    return [read_object(u, max_bytes) for u in uris]


def _read_pooled(uri: str, max_bytes: int | None, threads: int) -> ObjectRead:
    loc = parse(uri)
    if loc.is_s3:
        return _read_s3(loc, max_bytes, shared_s3_client(threads))
    return _read_local(loc.path, max_bytes)
