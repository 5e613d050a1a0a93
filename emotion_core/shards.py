"""Packed image inputs: WebDataset ``.tar`` shards and Parquet files with an image-bytes column.

One GET per shard instead of one per image (S3 charges per request and serves about 5,500 GETs/s
per prefix), one labelled row per member.

**Member URIs.** ``image_uri`` is the table's unique key per image. A loose image keeps its plain
URI (``s3://bucket/key`` or an absolute local path); a shard member is named in one string::

    tar://<percent-encoded member>::<shard URI>        (WebDataset)
    parquet://<percent-encoded row key>::<shard URI>   (Parquet)

This is fsspec's chained-URL form (``fsspec.open("tar://a.jpg::s3://b/shard.tar")`` opens a
member whose name needs no escaping). The member is encoded with ``urllib.parse.quote(name,
safe="/")`` over its UTF-8 bytes, so it never contains ``:``; the URI is split at the *first*
``::``, and everything after it is the shard URI verbatim (object keys may contain ``#``, ``?``,
``::``, ``%``, spaces, anything). Loose URIs start with ``s3://`` or ``/`` and so never start
with ``tar://`` or ``parquet://``. The empty member name stands for the shard itself: a row named
``tar://::<shard>`` reports that the shard, or its remainder, could not be read.

**Reading.** A shard is read whole (one GET, held in memory while its members are yielded), so
shards must fit a worker: :data:`DEFAULT_MAX_SHARD_BYTES` (1 GiB) is the default limit, checked
against the listed size before the GET (:func:`shard_size_error`) and again by
:func:`iter_members`. Peak memory per shard is about the shard's size plus one member (tar) or
one row group (Parquet). Bad data never raises out of :func:`iter_members`: unreadable parts
become error members (``error`` set, ``data`` None), members with bad image bytes are yielded as
they are (the decoder turns them into error rows). Names are unique within a shard: a repeated
name keeps its first occurrence only.

* WebDataset: an uncompressed tar (images are already compressed). Every regular member with an
  image extension is one image, named by its full path in the tar. A sample's key is its path up
  to the first dot of the basename (dots in directory names belong to the key); other members of
  the sample (``.json``, ``.cls``, ``.txt``, ...) are ignored. A member cut short gets a
  ``truncated`` error; a corrupt header, or a tar that ends without its end-of-archive blocks,
  adds a shard-level error after the good members before it.
* Parquet: the image column is the first binary column named ``image``, ``jpg``, ``jpeg``,
  ``png``, ``webp``, ``img``, ``image_bytes``, ``bytes``, ``data`` or ``content``
  (case-insensitive), or a struct ``image`` with a ``bytes`` field as Hugging Face ``datasets``
  writes it. The name is the first of the columns ``key``, ``__key__``, ``name``, ``path``,
  ``file``, ``filename``; else the struct's ``path``; else the row index. A null cell is a
  ``missing_image`` error member.

**Writing** (``jobs.pack``): :func:`write_webdataset` and :func:`write_parquet_shard` give the
same bytes for the same members (tar: PAX format, mtime 0, owner 0, mode 0644; Parquet: fixed
writer options, no compression of already-compressed images).
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote, unquote_to_bytes

from emotion_core.errors import short_error
from emotion_core.preprocess import IMAGE_EXTENSIONS

FORMATS = ("images", "webdataset", "parquet")
INPUT_FORMATS = ("auto", *FORMATS)
SHARD_EXTENSIONS = {"webdataset": ".tar", "parquet": ".parquet"}
SCHEMES = {"webdataset": "tar://", "parquet": "parquet://"}
DEFAULT_MAX_SHARD_BYTES = 1 << 30
SHARD_ITSELF = ""  # the member name of a row about the whole shard

_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes", "data", "content")
_KEY_COLUMNS = ("key", "__key__", "name", "path", "file", "filename")
_SEP = "::"


@dataclass(frozen=True)
class Member:
    """One image of a shard: its bytes, or an error ("<reason>: <detail>") when it cannot be read.
    ``name`` is :data:`SHARD_ITSELF` for an error about the shard as a whole."""

    name: str
    data: bytes | None
    error: str | None = None


class MemberRef(NamedTuple):
    shard_uri: str
    member: str
    fmt: str  # "webdataset" | "parquet"


# ---------------------------------------------------------------------------------------------
# Names


def member_uri(shard_uri: str, member: str, fmt: str | None = None) -> str:
    """The ``image_uri`` of ``member`` in ``shard_uri``; ``fmt`` defaults to the shard's extension."""
    fmt = fmt or detect_format(shard_uri)
    if fmt not in SCHEMES:
        raise ValueError(f"{shard_uri!r} is not a shard: pass fmt='webdataset' or 'parquet'")
    return f"{SCHEMES[fmt]}{quote(member, safe='/')}{_SEP}{shard_uri}"


def split_member_uri(uri: str) -> MemberRef | None:
    """``(shard_uri, member, fmt)`` of a member URI; None for a loose object's URI. A URI with a
    member scheme but no ``::`` separator, or a member that is not UTF-8, raises ValueError."""
    for fmt, scheme in SCHEMES.items():
        if uri.startswith(scheme):
            encoded, sep, shard = uri[len(scheme):].partition(_SEP)
            if not sep or not shard:
                raise ValueError(f"{uri!r}: a member URI is {scheme}<member>{_SEP}<shard URI>")
            try:
                member = unquote_to_bytes(encoded).decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{uri!r}: member is not percent-encoded UTF-8") from None
            return MemberRef(shard, member, fmt)
    return None


def detect_format(uri: str) -> str | None:
    """"webdataset" for ``.tar``, "parquet" for ``.parquet``, "images" for an image extension,
    else None (``--input-format auto``; case-insensitive)."""
    name = uri.rsplit("/", 1)[-1].lower()
    for fmt, ext in SHARD_EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    return "images" if name.endswith(IMAGE_EXTENSIONS) else None


def extensions(input_format: str) -> tuple[str, ...]:
    """The object extensions a listing keeps for ``--input-format`` (auto: images and shards)."""
    if input_format == "images":
        return IMAGE_EXTENSIONS
    if input_format in SHARD_EXTENSIONS:
        return (SHARD_EXTENSIONS[input_format],)
    if input_format == "auto":
        return (*IMAGE_EXTENSIONS, *SHARD_EXTENSIONS.values())
    raise ValueError(f"input format {input_format!r}: use one of {', '.join(INPUT_FORMATS)}")


def webdataset_key(name: str) -> str:
    """WebDataset's sample key: the path up to the first dot of the basename."""
    head, base = posixpath.split(name)
    return posixpath.join(head, base.split(".", 1)[0])


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------------------------
# Reading


def shard_size_error(size_bytes: int | None, max_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str | None:
    """The error of a shard too large to read whole, else None (None size: unknown, allowed)."""
    if size_bytes is not None and size_bytes > max_bytes:
        return f"shard_too_large: {size_bytes} bytes > {max_bytes} (repack with a smaller --shard-size)"
    return None


def failed_shard(error: str) -> Member:
    """The member row of a shard that could not be read at all (e.g. the GET failed)."""
    return Member(SHARD_ITSELF, None, error)


def iter_members(
    data: bytes, fmt: str, shard_uri: str, max_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> Iterator[Member]:
    """The images of one shard held in memory, in shard order; never raises for bad data."""
    if fmt not in SHARD_EXTENSIONS:
        raise ValueError(f"{fmt!r} is not a shard format: use webdataset or parquet")
    too_large = shard_size_error(len(data), max_bytes)
    if too_large:
        yield failed_shard(too_large)
        return
    members = _tar_members(data) if fmt == "webdataset" else _parquet_members(data)
    seen: set[str] = set()
    for m in members:
        if m.name not in seen:
            seen.add(m.name)
            yield m


def _tar_members(data: bytes) -> Iterator[Member]:
    f = io.BytesIO(data)
    try:
        tf = tarfile.open(fileobj=f, mode="r:", encoding="utf-8", errors="backslashreplace")
    except Exception as e:  # tarfile.ReadError and friends: not a (plain) tar
        yield failed_shard(f"shard_unreadable: not an uncompressed tar ({short_error(e)})")
        return
    while True:
        try:
            info = tf.next()
        except Exception as e:  # "unexpected end of data" while skipping a member, bad PAX header
            yield failed_shard(f"truncated_shard: {short_error(e)} at byte {tf.offset}")
            return
        if info is None:
            break
        if not (info.isreg() and is_image_name(info.name)):
            continue
        try:
            blob = tf.extractfile(info).read()
        except Exception as e:
            yield Member(info.name, None, f"truncated: member cut short ({short_error(e)})")
            yield failed_shard(f"truncated_shard: ends inside member {info.name!r}")
            return
        yield Member(info.name, blob, None)
    # tarfile reports a corrupt header or a tar cut at a member boundary as a normal end: what
    # follows the last header must be the zero blocks of the end-of-archive marker.
    rest = len(data) - tf.offset
    if data.count(b"\0", tf.offset) != rest:
        yield failed_shard(f"corrupt_shard: unreadable tar header at byte {tf.offset}; later members lost")
    elif rest < 2 * tarfile.BLOCKSIZE:
        yield failed_shard(f"truncated_shard: no end-of-archive marker after byte {tf.offset}")


def _parquet_members(data: bytes) -> Iterator[Member]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        schema = pf.schema_arrow
    except Exception as e:
        yield failed_shard(f"shard_unreadable: not a Parquet file ({short_error(e)})")
        return
    image_col, struct_image = _image_column(schema)
    if image_col is None:
        yield failed_shard(f"shard_unreadable: no image-bytes column in Parquet (columns: {', '.join(schema.names)})")
        return
    lower = {n.lower(): n for n in schema.names}
    key_col = next((lower[c] for c in _KEY_COLUMNS if c in lower and lower[c] != image_col), None)
    columns = [image_col] + ([key_col] if key_col else [])
    row = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        try:
            table = pf.read_row_group(rg, columns=columns)
            images = table[image_col].combine_chunks()
            paths = None
            if struct_image:
                paths = images.field("path").to_pylist() if "path" in {f.name for f in images.type} else None
                images = images.field("bytes")
            blobs = images.to_pylist()
            keys = table[key_col].to_pylist() if key_col else paths
        except Exception as e:
            rows = f"rows {row}..{row + n - 1}"
            yield failed_shard(f"corrupt_shard: row group {rg} ({rows}) unreadable ({short_error(e)})")
            row += n
            continue
        for i, blob in enumerate(blobs):
            key = keys[i] if keys is not None and keys[i] is not None else row + i
            name = str(key)
            if blob is None:
                yield Member(name, None, "missing_image: null image bytes in Parquet row")
            else:
                yield Member(name, bytes(blob), None)
        row += n


def _image_column(schema) -> tuple[str | None, bool]:
    import pyarrow as pa

    lower = {n.lower(): n for n in schema.names}
    for c in _IMAGE_COLUMNS:
        name = lower.get(c)
        if name is None:
            continue
        t = schema.field(name).type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
            return name, False
        if pa.types.is_struct(t):
            fields = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
            bt = fields.get("bytes")
            if bt is not None and (pa.types.is_binary(bt) or pa.types.is_large_binary(bt)):
                return name, True
    return None, False


# ---------------------------------------------------------------------------------------------
# Writing


def write_webdataset(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A plain tar of ``(name, bytes)`` in the given order; the same input gives the same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tf:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def write_parquet_shard(members: Iterable[tuple[str, bytes]], row_group_rows: int = 1024) -> bytes:
    """A Parquet file with columns ``key`` (string) and ``image`` (binary), in the given order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names, blobs = [], []
    for name, blob in members:
        names.append(name)
        blobs.append(blob)
    table = pa.table({"key": pa.array(names, pa.string()), "image": pa.array(blobs, pa.binary())})
    buf = io.BytesIO()
    pq.write_table(
        table, buf, row_group_size=row_group_rows, compression={"key": "zstd", "image": "none"},
        use_dictionary=False, write_statistics=["key"],
    )
    return buf.getvalue()
