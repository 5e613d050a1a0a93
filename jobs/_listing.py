"""The listing step of ``jobs.label`` as distributed work: inputs in, Parquet listing shards out.

The driver only orchestrates: it holds input prefixes, sub-prefixes and the names and row
counts of the shards, never the listing itself. Every shard has :data:`storage.LISTING_SCHEMA`,
is sorted by ``image_uri`` within itself (no global order across shards) and has a
deterministic name, so a retried task overwrites its own file instead of adding one. Callers
use :attr:`ListingResult.shards` (not a glob of the folder).

**Prefixes** (:func:`list_to_parquet`), local directories and ``s3://`` prefixes alike:

1. Inputs are normalised: each names either one object/file (listed as that one row) or a
   prefix/folder; an input contained in another (``s3://b/p/q/`` in ``s3://b/p``, a file in a
   listed folder) or repeated is dropped, so the remaining inputs are disjoint and no object is
   listed twice. Overlap through local symlinks cannot happen: directory symlinks are not followed.
2. *Discovery*: Ray tasks list one level of each prefix (S3 ``Delimiter="/"``, local one
   ``os.scandir``), write the objects found at that level as a shard and return the
   sub-prefixes, level by level, until there are at least ``target_prefixes`` of them (or none
   are left, or ``max_depth`` levels were listed).
3. *Flat*: each remaining prefix is listed whole, one paginator each (1,000 keys a request;
   local: a walk), by tasks that take at least ``prefixes_per_task`` prefixes (more when there
   are more than two prefixes per cluster CPU, so a round has about 2 tasks per CPU) and run
   ``threads`` listings at once. Shards roll over every ``rows_per_shard`` rows.

Listing is I/O bound, so tasks ask for little CPU (``num_cpus``). Local inputs are listed on
the driver's node (the paths exist there). Limitation: one folder with millions of keys and no
sub-folders is listed by one paginator (about 1,000 keys per round trip).

**Manifests** (:func:`manifest_to_parquet`): an S3 Inventory ``manifest.json`` (CSV/CSV.gz,
Parquet or ORC data files, column names from ``fileSchema``, URL-encoded CSV keys decoded,
versioned inventories reduced to the latest non-deleted version) or a plain CSV/Parquet object
list. The data files are read in parallel with Ray Data (one file per task, streamed in chunks)
and written as listing shards named after the data file.

Shard names: ``part-<mode>-<sha1 of what the task lists, 16 hex>-<chunk 4 digits>.parquet``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from emotion_core import storage
from emotion_core.storage import LISTING_SCHEMA

log = logging.getLogger(__name__)


class ListingError(RuntimeError):
    """An input or manifest that cannot be listed or read (the message says what to fix)."""


@dataclass
class ListingResult:
    shards: list[str] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0

    def add(self, written: list[tuple[str, int]]) -> None:
        for shard, rows in written:
            self.shards.append(shard)
            self.rows += rows


# ---------------------------------------------------------------------------------------------
# Shards


def _shard_uri(out_uri: str, mode: str, what: list[str], chunk: int) -> str:
    digest = hashlib.sha1("\n".join(what).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return storage.join(out_uri, f"part-{mode}-{digest}-{chunk:04d}.parquet")


def _write_shard(table: pa.Table, uri: str) -> tuple[str, int]:
    """Write one shard sorted by image_uri (overwrites: a retry replaces its own file)."""
    table = table.sort_by("image_uri")
    fs, path = storage.filesystem(uri)
    if not storage.parse(uri).is_s3:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, filesystem=fs)
    return uri, table.num_rows


class _ShardWriter:
    """Collects listing tables and writes a shard each ``rows_per_shard`` rows."""

    def __init__(self, out_uri: str, mode: str, what: list[str], rows_per_shard: int) -> None:
        self.out_uri, self.mode, self.what, self.limit = out_uri, mode, what, rows_per_shard
        self.parts: list[pa.Table] = []
        self.pending = 0
        self.written: list[tuple[str, int]] = []

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.parts.append(table)
            self.pending += table.num_rows
        if self.pending >= self.limit:
            self.flush()

    def flush(self) -> list[tuple[str, int]]:
        if self.pending:
            uri = _shard_uri(self.out_uri, self.mode, self.what, len(self.written))
            self.written.append(_write_shard(pa.concat_tables(self.parts), uri))
            self.parts, self.pending = [], 0
        return self.written


def read_shards(shards: list[str]) -> pa.Table:
    """All rows of some listing shards in one table (for small listings and tests)."""
    parts = []
    for uri in shards:
        fs, path = storage.filesystem(uri)
        parts.append(pq.read_table(path, filesystem=fs, schema=LISTING_SCHEMA))
    return pa.concat_tables(parts) if parts else LISTING_SCHEMA.empty_table()


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class _Input:
    uri: str  # a prefix (S3 prefix ends with "/") or a local folder, or one object
    scope: str  # what it covers, for containment: "s3://bucket/prefix/" or "/abs/dir/", or the object
    single: bool


def _resolve(uri: str) -> _Input:
    loc = storage.parse(uri)
    if storage.single_object(uri) is not None:
        return _Input(loc.uri, loc.uri, True)
    if loc.is_s3:
        prefix_uri = storage.s3_uri(loc.bucket, loc.prefix)
        return _Input(prefix_uri, prefix_uri, False)
    if not os.path.isdir(loc.path):
        raise ListingError(f"input {uri} does not exist (pass a directory of images or s3://bucket/prefix)")
    return _Input(loc.path, loc.path.rstrip(os.sep) + os.sep, False)


def normalise_inputs(inputs: list[str]) -> list[_Input]:
    """Resolved inputs with repeats and inputs contained in another prefix input dropped."""
    resolved = sorted({_resolve(u) for u in inputs}, key=lambda i: (i.scope, i.single))
    kept: list[_Input] = []
    for item in resolved:
        if any(not k.single and item.scope.startswith(k.scope) for k in kept):
            continue  # sorted: a containing prefix sorts before everything it contains
        if any(k.scope == item.scope for k in kept):
            continue
        kept.append(item)
    return kept


# ---------------------------------------------------------------------------------------------
# Ray tasks


def _list_one_level(prefix: str, root: str) -> tuple[list[pa.Table], list[tuple[str, str]]]:
    table, subs = storage.list_level(prefix, root=root)
    return [table], [(s, root) for s in subs]


def _list_whole(prefix: str, root: str) -> Iterator[pa.Table]:
    if storage.is_s3(prefix):
        yield from storage.list_pages(prefix)
        return
    stack = [prefix]
    while stack:
        table, subs = storage.list_level(stack.pop(), root=root)
        yield table
        stack.extend(reversed(subs))


def _task(mode: str, prefixes: list[tuple[str, str]], out_uri: str, threads: int, rows_per_shard: int):
    """List ``prefixes`` ((uri, root) pairs) one level deep ("level") or whole ("flat"), write the
    objects as shards; returns (written shards, sub-prefixes found)."""
    writer = _ShardWriter(out_uri, mode, [p for p, _ in prefixes], rows_per_shard)
    subs: list[tuple[str, str]] = []

    def one(item: tuple[str, str]) -> tuple[list[pa.Table], list[tuple[str, str]]]:
        return _list_one_level(*item) if mode == "level" else (list(_list_whole(*item)), [])

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(prefixes)))) as pool:
        for tables, found in pool.map(one, prefixes):
            for t in tables:
                writer.add(t)
            subs.extend(found)
    return writer.flush(), subs


def _remote(fn, num_cpus: float, local: bool):
    import ray

    options: dict = {"num_cpus": num_cpus, "max_retries": 3, "retry_exceptions": False}
    if local:  # local paths exist on this node
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), False)
    return ray.remote(fn).options(**options)


def _cause(e: BaseException, context: str = "") -> str:
    """One line for an exception that Ray wrapped: our own error's message if it is in the chain,
    else the innermost cause's first line."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or getattr(e, "cause", None)
    from ray.exceptions import RayError

    for x in chain:  # Ray's wrappers may also be instances of the cause's class: skip them
        if isinstance(x, (ListingError, storage.StorageError)) and not isinstance(x, RayError):
            msg = str(x).strip().splitlines()[0]
            return msg if msg.startswith(("input", "manifest", "cannot")) else context + msg
    for x in chain:  # Ray Data keeps the UDF's exception only as traceback text
        found = re.findall(r"(?:ListingError|StorageError): (.+)", str(x))
        if found:
            return found[-1] if found[-1].startswith(("input", "manifest", "cannot")) else context + found[-1]
    inner = [x for x in chain if not isinstance(x, RayError)] or chain
    return context + storage.short_error(inner[-1])


def _run_level(mode, frontier, out_uri, *, per_task, threads, rows_per_shard, num_cpus):
    """Run one round of tasks over ``frontier``; returns (written, sub-prefixes)."""
    import ray

    # Enough tasks to use the cluster (listing is I/O bound: ~2 per CPU), no more: each task pays
    # for a worker and an S3 client, so small prefixes are grouped.
    cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)))
    per_task = max(per_task, -(-len(frontier) // max(1, int(2 * cpus))))
    refs = []
    for i in range(0, len(frontier), per_task):
        batch = frontier[i : i + per_task]
        local = not storage.is_s3(batch[0][0])
        refs.append(_remote(_task, num_cpus, local).remote(mode, batch, out_uri, threads, rows_per_shard))
    written, subs = [], []
    try:
        for w, s in ray.get(refs):
            written.extend(w)
            subs.extend(s)
    except ray.exceptions.RayTaskError as e:
        raise ListingError(_cause(e)) from None
    return written, subs


def list_to_parquet(
    inputs: list[str],
    out_uri: str,
    *,
    target_prefixes: int = 256,
    max_depth: int = 4,
    prefixes_per_task: int = 16,
    threads: int = 16,
    rows_per_shard: int = 500_000,
    num_cpus: float = 0.25,
) -> ListingResult:
    """List local directories and ``s3://`` prefixes (or single objects) into Parquet shards
    under ``out_uri`` with Ray tasks (see the module docstring). Needs Ray initialised.

    Raises :class:`ListingError` for an input that does not exist or cannot be listed."""
    t0 = time.perf_counter()
    result = ListingResult()
    try:
        normalised = normalise_inputs(inputs)
    except storage.StorageError as e:
        raise ListingError(str(e)) from None
    singles = [i.uri for i in normalised if i.single]
    if singles:
        tables = [storage.single_object(u) for u in singles]
        table = pa.concat_tables([t for t in tables if t is not None])
        if table.num_rows:
            result.add([_write_shard(table, _shard_uri(out_uri, "single", singles, 0))])
    frontier = sorted((i.uri, i.uri) for i in normalised if not i.single)
    kw = dict(per_task=prefixes_per_task, threads=threads, rows_per_shard=rows_per_shard, num_cpus=num_cpus)
    depth = 0
    while frontier and len(frontier) < target_prefixes and depth < max_depth:
        written, subs = _run_level("level", frontier, out_uri, **kw)
        result.add(written)
        frontier, depth = sorted(subs), depth + 1
    if frontier:
        written, _ = _run_level("flat", frontier, out_uri, **kw)
        result.add(written)
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------
# Manifests: S3 Inventory (manifest.json) and plain CSV/Parquet object lists


_URI_COLUMNS = ("uri", "imageuri", "path", "url")
_MTIME_COLUMNS = ("lastmodified", "lastmodifieddate")
_INVENTORY_FORMATS = {"csv": "csv", "parquet": "parquet", "orc": "orc"}


def _norm(name: str) -> str:
    return "".join(ch for ch in str(name).strip().lower() if ch.isalnum())


@dataclass(frozen=True)
class _DataFile:
    uri: str
    format: str  # "csv", "parquet", "orc"
    columns: tuple[str, ...] | None  # CSV without a header: the column names (S3 Inventory fileSchema)
    keys_encoded: bool  # S3 Inventory CSV keys are URL-encoded


def inventory_files(manifest_uri: str) -> list[_DataFile]:
    """The data files an S3 Inventory ``manifest.json`` lists, with their format and schema."""
    try:
        manifest = json.loads(storage.read_bytes(manifest_uri))
    except (storage.StorageError, ValueError) as e:
        raise ListingError(f"manifest {manifest_uri}: cannot read it as S3 Inventory JSON ({e})") from None
    try:
        fmt = _INVENTORY_FORMATS[str(manifest["fileFormat"]).lower()]
        files = [f["key"] for f in manifest["files"]]
        dest = str(manifest.get("destinationBucket") or "")
        bucket = dest.rsplit(":", 1)[-1] if dest else storage.parse(manifest_uri).bucket
    except (KeyError, TypeError) as e:
        raise ListingError(f"manifest {manifest_uri}: not an S3 Inventory manifest (missing {e})") from None
    columns = None
    if fmt == "csv":
        columns = tuple(c.strip() for c in str(manifest.get("fileSchema", "")).split(",") if c.strip())
        if not columns:
            raise ListingError(f"manifest {manifest_uri}: CSV inventory without fileSchema")
    return [_DataFile(storage.s3_uri(bucket, k), fmt, columns, fmt == "csv") for k in files]


def _plain_file(uri: str) -> _DataFile:
    """A plain manifest: Parquet, CSV with a header, or a headerless S3-Inventory-style CSV
    ``bucket,key[,size,last_modified,etag]`` with URL-encoded keys (today's rules)."""
    fs, path = storage.filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            head = f.read(64 * 1024)
    except OSError as e:
        raise ListingError(f"manifest {uri}: cannot read it ({storage.short_error(e)})") from None
    if head[:4] == b"PAR1":
        return _DataFile(uri, "parquet", None, False)
    first = next(csv.reader(io.StringIO(head.decode("utf-8-sig", "replace"))), [])
    names = [_norm(c) for c in first]
    if set(names) & {*_URI_COLUMNS, "key", "bucket"} or all(re.fullmatch(r"[a-z_][a-z0-9_ ]*", c.strip().lower())
                                                               for c in first):
        return _DataFile(uri, "csv", None, False)  # a header (one naming no known column is reported later)
    return _DataFile(uri, "csv", ("bucket", "key", "size", "last_modified", "etag"), True)


def _file_batches(df: _DataFile, chunk_rows: int) -> Iterator[pa.Table]:
    fs, path = storage.filesystem(df.uri)
    if df.format == "parquet":
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=chunk_rows):
                yield pa.Table.from_batches([batch])
    elif df.format == "orc":
        import pyarrow.orc as orc

        with fs.open_input_file(path) as f:
            reader = orc.ORCFile(f)
            for i in range(reader.nstripes):
                yield pa.Table.from_batches([reader.read_stripe(i)])
    else:
        import pyarrow.csv as pacsv

        compression = "gzip" if df.uri.endswith(".gz") else None
        with fs.open_input_stream(path, compression=compression) as f:
            if df.columns:
                names, skip = list(df.columns), 0
            else:  # header row: read it to type every column as string
                header = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16)).schema.names
                names, skip = header, 1
        with fs.open_input_stream(path, compression=compression) as f:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip, block_size=16 << 20),
                convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}),
            )
            for batch in reader:
                yield pa.Table.from_batches([batch])


def _truthy(col: pa.ChunkedArray) -> pa.Array:
    if pa.types.is_boolean(col.type):
        return pc.fill_null(col, False)
    return pc.fill_null(pc.equal(pc.utf8_lower(pc.utf8_trim_whitespace(col.cast(pa.string()))), "true"), False)


def _parse_time(v) -> datetime | None:
    if v in (None, ""):
        return None
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=UTC)
    try:
        t = datetime.fromisoformat(str(v).strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _to_listing(table: pa.Table, df: _DataFile, scopes: list[str]) -> pa.Table:
    """One chunk of a manifest data file -> listing rows (images only, latest versions only)."""
    table = table.rename_columns([_norm(c) for c in table.column_names])
    cols = set(table.column_names)
    if "islatest" in cols:  # versioned inventory: the current version, unless it is a delete marker
        keep = _truthy(table["islatest"])
        if "isdeletemarker" in cols:
            keep = pc.and_(keep, pc.invert(_truthy(table["isdeletemarker"])))
        table = table.filter(keep)
    uri_col = next((c for c in _URI_COLUMNS if c in cols), None)
    if uri_col:
        uris = [storage.parse(str(u).strip()).uri for u in table[uri_col].to_pylist()]
    elif {"bucket", "key"} <= cols:
        keys = table["key"].to_pylist()
        if df.keys_encoded:
            keys = [unquote_plus(k) for k in keys]
        uris = [storage.s3_uri(b, k) for b, k in zip(table["bucket"].to_pylist(), keys)]
    else:
        raise ListingError(
            f"manifest {df.uri} needs a 'uri' column or 'bucket' and 'key' columns "
            f"(found: {', '.join(table.column_names) or 'none'})"
        )
    n = len(uris)
    size = table["size"].to_pylist() if "size" in cols else [None] * n
    etag = table["etag"].to_pylist() if "etag" in cols else [None] * n
    mcol = next((c for c in _MTIME_COLUMNS if c in cols), None)
    mtime = table[mcol].to_pylist() if mcol else [None] * n
    keep = [i for i, u in enumerate(uris) if storage.is_image_name(u) and _in_scope(u, scopes)]
    out = storage.listing_table(
        [uris[i] for i in keep],
        [str(etag[i]).strip().strip('"') if etag[i] not in (None, "") else None for i in keep],
        [int(size[i]) if size[i] not in (None, "") else None for i in keep],
        [_parse_time(mtime[i]) for i in keep],
    )
    return out


def _in_scope(uri: str, scopes: list[str]) -> bool:
    """True without scopes; else ``uri`` is one of them or under one ending in ``/``."""
    return not scopes or any(uri == s or (s.endswith(("/", os.sep)) and uri.startswith(s)) for s in scopes)


def _convert_file(batch: pa.Table, out_uri: str, scopes: list[str], chunk_rows: int) -> pa.Table:
    """Ray Data UDF: one manifest data file (one row of ``batch``) -> listing shards."""
    written = []
    for spec in batch.to_pylist():
        df = _DataFile(spec["uri"], spec["format"], tuple(spec["columns"]) if spec["columns"] else None,
                       spec["keys_encoded"])
        for chunk, table in enumerate(_file_batches(df, chunk_rows)):
            listing = _to_listing(table, df, scopes)
            if listing.num_rows:
                written.append(_write_shard(listing, _shard_uri(out_uri, "manifest", [df.uri], chunk)))
    return pa.table({"shard": [w[0] for w in written], "rows": pa.array([w[1] for w in written], pa.int64())})


def manifest_to_parquet(
    manifest_uri: str, out_uri: str, *, inputs: list[str] | None = None, chunk_rows: int = 500_000
) -> ListingResult:
    """Read an S3 Inventory ``manifest.json`` or a plain CSV/Parquet object list into listing
    shards under ``out_uri``, in parallel with Ray Data. With ``inputs``, only objects under
    those prefixes (or equal to those objects) are kept. Needs Ray initialised.

    A plain manifest is one file, so one task; duplicates in it are kept once per chunk only
    (planning must not rely on a manifest being duplicate-free)."""
    import ray

    t0 = time.perf_counter()
    if manifest_uri.rstrip().endswith(".json"):
        files = inventory_files(manifest_uri)
    else:
        files = [_plain_file(manifest_uri)]
    scopes = []
    for uri in inputs or []:
        loc = storage.parse(uri)
        scopes += [loc.uri, storage.s3_uri(loc.bucket, loc.prefix)] if loc.is_s3 else [loc.path, loc.path + os.sep]
    items = [{"uri": f.uri, "format": f.format, "columns": list(f.columns or []), "keys_encoded": f.keys_encoded}
             for f in files]
    result = ListingResult()
    if items:
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _convert_file, batch_size=1, batch_format="pyarrow", num_cpus=0.5,
            fn_kwargs={"out_uri": out_uri, "scopes": scopes, "chunk_rows": chunk_rows},
        )
        try:
            rows = ds.take_all()
        except Exception as e:  # Ray wraps the UDF's exception
            raise ListingError(_cause(e, f"manifest {manifest_uri}: ")) from None
        result.add([(r["shard"], r["rows"]) for r in rows])
    result.seconds = time.perf_counter() - t0
    return result
