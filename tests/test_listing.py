"""The distributed listing step (jobs._listing) on a real local Ray and moto's S3 server: the
parallel listing equals the sequential one, shards are sorted and deterministically named, and
S3 Inventory manifests in the layout AWS delivers are read."""

from __future__ import annotations

import gzip
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emotion_core import storage
from jobs import _listing
from jobs._listing import ListingError, list_to_parquet, manifest_to_parquet, read_shards

from .test_storage import ODD_KEYS


def _sequential(inputs: list[str]) -> pa.Table:
    return pa.concat_tables([storage.list_objects(u) for u in inputs]).sort_by("image_uri")


def _check_shards(result) -> pa.Table:
    """Every shard is sorted by image_uri and has the listing schema; returns all rows, sorted."""
    for uri in result.shards:
        fs, path = storage.filesystem(uri)
        t = pq.read_table(path, filesystem=fs)
        assert t.schema == storage.LISTING_SCHEMA
        keys = t["image_uri"].to_pylist()
        assert keys == sorted(keys), uri
    table = read_shards(result.shards)
    assert table.num_rows == result.rows
    return table.sort_by("image_uri")


def _put_many(bucket: str, keys: list[str], threads: int = 16) -> None:
    client = storage.s3_client(max_pool_connections=threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=k.encode()[:8]), keys))


@pytest.fixture(scope="module")
def local_tree(tmp_path_factory):
    """3,000 files in 60 folders two levels deep, plus non-images and a loose file at the top."""
    root = tmp_path_factory.mktemp("tree")
    for i in range(3000):
        d = root / f"cam-{i % 12:02d}" / f"day-{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img {i:05d}#x.jpg").write_bytes(b"x" * (i % 7))
    (root / "top.png").write_bytes(b"t")
    (root / "cam-00" / "readme.txt").write_text("no")
    return root


@pytest.mark.parametrize("target", [1, 10_000])  # flat at once; every level discovered
def test_local_parallel_equals_sequential(ray_session, local_tree, tmp_path, target):
    out = str(tmp_path / "listing")
    result = list_to_parquet([str(local_tree)], out, target_prefixes=target, prefixes_per_task=3, threads=4)
    got = _check_shards(result)
    assert result.rows == 3001
    assert got.equals(_sequential([str(local_tree)]))
    # Deterministic names: listing again overwrites the same shard files, adds none.
    again = list_to_parquet([str(local_tree)], out, target_prefixes=target, prefixes_per_task=3, threads=4)
    assert again.shards == result.shards and sorted(os.listdir(out)) == sorted(
        os.path.basename(s) for s in result.shards
    )


def test_s3_parallel_equals_sequential_with_odd_keys(ray_session, s3_bucket, tmp_path):
    keys = [f"p{i % 64:02d}/d{i % 3}/k{i:05d}.jpg" for i in range(1100)] + ODD_KEYS + ["p01/notes.txt"]
    _put_many(s3_bucket, keys)
    root = f"s3://{s3_bucket}"
    expected = _sequential([root])
    assert expected.num_rows == 1100 + len(ODD_KEYS)  # more than one 1,000-key page
    shard_names = []
    for target in (16, 100_000):  # one level discovered, then flat listings; every level discovered
        out = f"{root}/_staging/run-{target}/listing"
        result = list_to_parquet([root + "/"], out, target_prefixes=target, prefixes_per_task=8, threads=8,
                                 num_cpus=1)  # 4 tasks at a time: fewer worker processes to start
        assert _check_shards(result).equals(expected), target
        shard_names.append(result.shards)
    assert len(shard_names[1]) > len(shard_names[0]) > 1


def test_overlapping_and_single_inputs_are_listed_once(ray_session, local_tree, tmp_path, s3_bucket):
    _put_many(s3_bucket, ["a/b/1.jpg", "a/b/2.jpg", "a/c.jpg", "ab/3.jpg"])
    inputs = [
        f"s3://{s3_bucket}/a",
        f"s3://{s3_bucket}/a/b/",  # inside s3://.../a
        f"s3://{s3_bucket}/a/b/1.jpg",  # inside too
        f"s3://{s3_bucket}/ab/3.jpg",  # a single object next to the prefix, not in it
        str(local_tree / "cam-01"),
        str(local_tree / "cam-01" / "day-1"),
        str(local_tree / "top.png"),
    ]
    result = list_to_parquet(inputs, str(tmp_path / "out"))
    got = _check_shards(result)
    uris = got["image_uri"].to_pylist()
    assert len(uris) == len(set(uris))
    s3_uris = [u for u in uris if u.startswith("s3://")]
    assert s3_uris == [f"s3://{s3_bucket}/{k}" for k in ("a/b/1.jpg", "a/b/2.jpg", "a/c.jpg", "ab/3.jpg")]
    assert len(uris) - len(s3_uris) == 250 + 1


def test_missing_input_is_a_listing_error(ray_session, tmp_path, s3_bucket):
    with pytest.raises(ListingError, match="does not exist"):
        list_to_parquet([str(tmp_path / "nope")], str(tmp_path / "out"))
    with pytest.raises(ListingError, match="NoSuchBucket"):
        list_to_parquet(["s3://no-such-bucket-x3/p/"], str(tmp_path / "out"))


def test_local_robustness_cases_in_parallel_listing(ray_session, tmp_path):
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "ok.jpg").write_bytes(b"1")
    (tree / "d" / "loop").symlink_to(tree)
    (tree / "out.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    (tmp_path / "elsewhere.jpg").write_bytes(b"2")
    with open(os.fsencode(str(tree / "d")) + b"/bad\xff.jpg", "wb") as f:
        f.write(b"3")
    result = list_to_parquet([str(tree)], str(tmp_path / "out"), target_prefixes=1)
    rows = {r["image_uri"]: r["error"] for r in _check_shards(result).to_pylist()}
    assert rows == {
        str(tree / "d" / "ok.jpg"): None,
        str(tree / "out.jpg"): "not_followed: symlink leads outside the input tree",
        f"{tree}/d/bad\\xff.jpg": "bad_name: file name is not valid UTF-8",
    }


# ---------------------------------------------------------------------------------------------
# S3 Inventory and plain manifests

INVENTORY_KEYS = ["photos/a.jpg", "photos/sp ace.jpg", "photos/a#b?c.jpg", "photos/plus+.png", "photos/ünï.jpg",
                  "photos/notes.txt", "other/x.jpg"]
WHEN = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)


def _inventory(bucket: str, fmt: str, files: list[bytes], schema: str, ext: str) -> str:
    """Write an inventory in AWS's layout: <dest>/<source>/<config>/data/*.ext and
    <dest>/<source>/<config>/<date>/manifest.json; returns the manifest URI."""
    client = storage.s3_client()
    base = f"src-bucket/nightly-{fmt.lower()}"
    keys = []
    for i, body in enumerate(files):
        key = f"{base}/data/{i:08x}-1111-2222-3333-444455556666.{ext}"
        client.put_object(Bucket=bucket, Key=key, Body=body)
        keys.append({"key": key, "size": len(body), "MD5checksum": "0" * 32})
    manifest = {
        "sourceBucket": "src-bucket",
        "destinationBucket": f"arn:aws:s3:::{bucket}",
        "version": "2016-11-30",
        "creationTimestamp": "1714521600000",
        "fileFormat": fmt,
        "fileSchema": schema,
        "files": keys,
    }
    key = f"{base}/2024-05-01T01-00Z/manifest.json"
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps(manifest).encode())
    return f"s3://{bucket}/{key}"


def _csv_gz(rows: list[list[str]]) -> bytes:
    text = "".join(",".join(f'"{v}"' for v in r) + "\n" for r in rows)
    return gzip.compress(text.encode())


def _expected(keys, bucket="src-bucket"):
    return sorted(f"s3://{bucket}/{k}" for k in keys if storage.is_image_name(k))


def test_inventory_csv_gz(ray_session, s3_bucket):
    rows = [["src-bucket", quote_plus(k), str(10 + i), "2024-05-01T12:30:00.000Z", f"etag{i}", "STANDARD"]
            for i, k in enumerate(INVENTORY_KEYS)]
    manifest = _inventory(s3_bucket, "CSV", [_csv_gz(rows[:3]), _csv_gz(rows[3:])],
                          "Bucket, Key, Size, LastModifiedDate, ETag, StorageClass", "csv.gz")
    result = manifest_to_parquet(manifest, f"s3://{s3_bucket}/_staging/r1/listing")
    got = _check_shards(result)
    assert got["image_uri"].to_pylist() == _expected(INVENTORY_KEYS)
    row = next(r for r in got.to_pylist() if r["image_uri"].endswith("/photos/sp ace.jpg"))
    assert (row["etag"], row["size_bytes"], row["last_modified"], row["error"]) == ("etag1", 11, WHEN, None)
    # Restricted to the inputs' prefixes.
    only = manifest_to_parquet(manifest, f"s3://{s3_bucket}/_staging/r2/listing", inputs=["s3://src-bucket/photos"])
    assert _check_shards(only)["image_uri"].to_pylist() == _expected([k for k in INVENTORY_KEYS if "photos" in k])


def test_inventory_versioned_csv(ray_session, s3_bucket):
    rows = [
        ["src-bucket", "v/keep.jpg", "v2", "true", "false", "2", "2024-05-01T12:30:00.000Z", "new"],
        ["src-bucket", "v/keep.jpg", "v1", "false", "false", "1", "2024-04-01T12:30:00.000Z", "old"],
        ["src-bucket", "v/deleted.jpg", "v3", "true", "true", "", "2024-05-01T12:30:00.000Z", ""],
        ["src-bucket", "v/deleted.jpg", "v2", "false", "false", "5", "2024-04-01T12:30:00.000Z", "gone"],
        ["src-bucket", "v/unversioned.jpg", "", "true", "false", "3", "2024-05-01T12:30:00.000Z", "u"],
    ]
    manifest = _inventory(s3_bucket, "CSV", [_csv_gz(rows)],
                          "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag", "csv.gz")
    got = _check_shards(manifest_to_parquet(manifest, f"s3://{s3_bucket}/_staging/r/listing")).to_pylist()
    assert [(r["image_uri"], r["etag"], r["size_bytes"]) for r in got] == [
        ("s3://src-bucket/v/keep.jpg", "new", 2),
        ("s3://src-bucket/v/unversioned.jpg", "u", 3),
    ]


@pytest.mark.parametrize("fmt", ["Parquet", "ORC"])
def test_inventory_parquet_and_orc(ray_session, s3_bucket, fmt):
    table = pa.table({
        "bucket": ["src-bucket"] * len(INVENTORY_KEYS),
        "key": INVENTORY_KEYS,  # not URL-encoded in Parquet/ORC inventories
        "version_id": ["v1"] * len(INVENTORY_KEYS),
        "is_latest": [True] * (len(INVENTORY_KEYS) - 1) + [False],
        "is_delete_marker": [False] * len(INVENTORY_KEYS),
        "size": pa.array(range(len(INVENTORY_KEYS)), pa.int64()),
        "last_modified_date": pa.array([WHEN] * len(INVENTORY_KEYS), pa.timestamp("ms", tz="UTC")),
        "e_tag": [f"e{i}" for i in range(len(INVENTORY_KEYS))],
    })
    buf = io.BytesIO()
    if fmt == "Parquet":
        pq.write_table(table, buf)
    else:
        import pyarrow.orc as orc

        orc.write_table(table, buf)
    schema = "message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); ... }"
    manifest = _inventory(s3_bucket, fmt, [buf.getvalue()], schema, fmt.lower())
    got = _check_shards(manifest_to_parquet(manifest, f"s3://{s3_bucket}/_staging/r/listing"))
    assert got["image_uri"].to_pylist() == _expected(INVENTORY_KEYS[:-1])
    assert got["etag"].to_pylist()[0] == "e2"  # photos/a#b?c.jpg sorts first
    assert set(got["last_modified"].to_pylist()) == {WHEN}


def test_plain_manifests(ray_session, tmp_path, s3_bucket):
    uri_csv = tmp_path / "m.csv"
    uri_csv.write_text("URI,size,etag\ns3://b1/x #1.jpg,4,\"e\"\ns3://b1/y.txt,1,\n/data/z.png,,\n")
    got = _check_shards(manifest_to_parquet(str(uri_csv), str(tmp_path / "o1")))
    assert got.select(["image_uri", "size_bytes", "etag"]).to_pylist() == [
        {"image_uri": "/data/z.png", "size_bytes": None, "etag": None},
        {"image_uri": "s3://b1/x #1.jpg", "size_bytes": 4, "etag": "e"},
    ]
    headerless = tmp_path / "inv.csv"
    headerless.write_text(f"b1,{quote_plus('a b+c.jpg')},5,2024-05-01T12:30:00Z,e1\n")
    got = _check_shards(manifest_to_parquet(str(headerless), str(tmp_path / "o2"))).to_pylist()
    assert [(r["image_uri"], r["last_modified"]) for r in got] == [("s3://b1/a b+c.jpg", WHEN)]
    pq.write_table(pa.table({"bucket": ["b1", "b1"], "key": ["p/1.jpg", "q/2.jpg"]}), tmp_path / "m.parquet")
    got = _check_shards(manifest_to_parquet(str(tmp_path / "m.parquet"), str(tmp_path / "o3"), inputs=["s3://b1/p"]))
    assert got["image_uri"].to_pylist() == ["s3://b1/p/1.jpg"]
    bad = tmp_path / "bad.csv"
    bad.write_text("name,size\nx.jpg,1\n")
    with pytest.raises(ListingError, match="needs a 'uri' column"):
        manifest_to_parquet(str(bad), str(tmp_path / "o4"))


def test_inventory_manifest_errors(ray_session, s3_bucket):
    storage.write_bytes(f"s3://{s3_bucket}/m/manifest.json", b'{"files": []}')
    with pytest.raises(ListingError, match="not an S3 Inventory manifest"):
        manifest_to_parquet(f"s3://{s3_bucket}/m/manifest.json", f"s3://{s3_bucket}/out")
    with pytest.raises(ListingError, match="cannot read"):
        _listing.inventory_files(f"s3://{s3_bucket}/m/missing.json")
