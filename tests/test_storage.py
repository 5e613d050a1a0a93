"""Storage: URI parsing, joining, local and S3 (moto HTTP server) reads/writes, writability checks."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from emotion_core import storage
from emotion_core.storage import Location, StorageError


def test_parse_local_and_file_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.parse("data/x") == Location("file", str(tmp_path / "data" / "x"))
    assert storage.parse("file:///tmp/a/b") == Location("file", "/tmp/a/b")
    assert storage.parse("~/x").path == os.path.expanduser("~/x")
    assert not storage.is_s3("/tmp/a")


def test_parse_s3_uris():
    loc = storage.parse("s3://bucket/some/prefix/")
    assert loc == Location("s3", "bucket/some/prefix/")
    assert (loc.bucket, loc.key, loc.prefix, loc.uri, loc.is_s3) == (
        "bucket",
        "some/prefix/",
        "some/prefix/",
        "s3://bucket/some/prefix/",
        True,
    )
    assert storage.parse("s3://bucket/some/prefix").prefix == "some/prefix/"
    assert storage.parse("s3a://bucket/k").path == "bucket/k"
    assert storage.parse("s3://bucket").key == "" and storage.parse("s3://bucket").prefix == ""
    assert storage.is_s3("s3://bucket/k")
    assert storage.filesystem("s3://bucket/some/prefix/")[1] == "bucket/some/prefix"


# Keys that a URL parser would change. A newline is also a valid S3 key character, but moto's
# HTTP server rejects it, so it is not in the set.
ODD_KEYS = [
    "a#b.jpg",
    "q?x=1&y=2.jpg",
    "sp ace.jpg",
    "trail .jpg",
    " lead-space.jpg",
    "/leading-slash.jpg",
    "dir//double.jpg",
    "ctl\x01\x1b\x7f.jpg",
    "tab\t.jpg",
    "cr\r.jpg",
    "pct%20literal.jpg",
    "plus+.jpg",
    "ünï/文字 😀.png",
    "..%2F..jpg",
]


@pytest.mark.parametrize("key", ODD_KEYS)
def test_parse_takes_s3_keys_verbatim(key):
    uri = f"s3://bucket/{key}"
    loc = storage.parse(uri)
    assert (loc.bucket, loc.key, loc.uri) == ("bucket", key, uri)
    assert storage.s3_uri("bucket", key) == uri


def test_odd_keys_round_trip_through_s3(s3_bucket):
    client = storage.s3_client()
    for key in ODD_KEYS:
        client.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    listing = storage.list_objects(f"s3://{s3_bucket}")
    uris = listing["image_uri"].to_pylist()
    assert sorted(uris) == sorted(storage.s3_uri(s3_bucket, k) for k in ODD_KEYS)
    reads = storage.read_objects(uris, threads=8)
    for uri, r in zip(uris, reads):
        assert r.error is None and r.data == storage.parse(uri).key.encode(), uri
        assert storage.parse(uri).uri == uri
        assert storage.read_object(uri).data == r.data
        assert storage.list_objects(uri)["image_uri"].to_pylist() == [uri]  # names one object
    # One level at a time finds the same objects (the parallel lister's building block).
    found, stack = [], [f"s3://{s3_bucket}"]
    while stack:
        table, subs = storage.list_level(stack.pop())
        found += table["image_uri"].to_pylist()
        stack += subs
    assert sorted(found) == sorted(uris)
    assert f"s3://{s3_bucket}//" in storage.list_level(f"s3://{s3_bucket}")[1]


@pytest.mark.parametrize(
    "bad, expected", [("", "empty URI"), ("s3:///key", "no bucket"), ("gs://b/k", "unsupported URI scheme")]
)
def test_parse_errors(bad, expected):
    with pytest.raises(StorageError, match=expected):
        storage.parse(bad)


def test_join():
    assert storage.join("s3://b/p/", "models", "/v1/") == "s3://b/p/models/v1"
    assert storage.join("/tmp/out", "a.parquet") == "/tmp/out/a.parquet"
    assert storage.join("s3://b/p") == "s3://b/p"


def test_local_read_write(tmp_path):
    uri = str(tmp_path / "deep" / "dir" / "file.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.exists(uri)
    storage.write_bytes(uri, b"again")  # atomic replace, no temp files left behind
    assert storage.read_bytes(f"file://{uri}") == b"again"
    assert os.listdir(tmp_path / "deep" / "dir") == ["file.bin"]
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(str(tmp_path / "missing"))
    storage.delete_dir(str(tmp_path / "deep"))
    assert not storage.exists(str(tmp_path / "deep"))


def test_s3_read_write(s3_bucket):
    uri = f"s3://{s3_bucket}/a/b/file.bin"
    fs, path = storage.filesystem(uri)
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{s3_bucket}/a/b/file.bin"
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello s3")
    assert storage.exists(uri) and storage.exists(f"s3://{s3_bucket}/a")
    assert storage.read_bytes(uri) == b"hello s3"
    body = storage.s3_client().get_object(Bucket=s3_bucket, Key="a/b/file.bin")["Body"].read()
    assert body == b"hello s3"
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(f"s3://{s3_bucket}/missing")
    storage.delete_dir(f"s3://{s3_bucket}/a")
    assert not storage.exists(uri)


def test_check_writable_local(tmp_path):
    storage.check_writable(str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []  # the probe is removed
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="is not writable"):
        storage.check_writable(str(blocker / "out"))


def test_check_writable_s3(s3_bucket):
    storage.check_writable(f"s3://{s3_bucket}/labels")
    objects = storage.s3_client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    assert not [o["Key"] for o in objects if "_write_probe_" in o["Key"]]
    with pytest.raises(StorageError, match="s3://no-such-bucket-x1/labels is not writable") as e:
        storage.check_writable("s3://no-such-bucket-x1/labels")
    assert "testing" not in str(e.value)  # credentials are never put in messages


def test_endpoint_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:9000")
    assert storage.s3_endpoint() == "http://s3only:9000"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert storage.s3_endpoint() == "http://general:9000"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert storage.s3_endpoint() is None


# ---------------------------------------------------------------------------------------------
# Listing and reading


def test_single_object_uri_lists_that_object(s3_bucket, tmp_path):
    client = storage.s3_client()
    client.put_object(Bucket=s3_bucket, Key="p/key.jpg", Body=b"x")
    client.put_object(Bucket=s3_bucket, Key="p/key.jpg.more/other.jpg", Body=b"y")
    assert storage.list_objects(f"s3://{s3_bucket}/p/key.jpg")["image_uri"].to_pylist() == [
        f"s3://{s3_bucket}/p/key.jpg"
    ]
    assert storage.list_objects(f"s3://{s3_bucket}/p")["size_bytes"].to_pylist() == [1, 1]
    assert storage.list_objects(f"s3://{s3_bucket}/p/missing.jpg").num_rows == 0  # an empty prefix
    f = tmp_path / "one.png"
    f.write_bytes(b"abc")
    row = storage.list_objects(str(f)).to_pylist()
    assert [(r["image_uri"], r["size_bytes"], r["error"]) for r in row] == [(str(f), 3, None)]


def test_local_listing_rows(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.jpg").write_bytes(b"12")
    (tmp_path / "a" / "b" / "y.PNG").write_bytes(b"123")
    (tmp_path / "notes.txt").write_text("not an image")
    table = storage.list_objects(str(tmp_path))
    assert table.schema == storage.LISTING_SCHEMA
    rows = {r["image_uri"]: r for r in table.to_pylist()}
    assert set(rows) == {str(tmp_path / "a" / "x.jpg"), str(tmp_path / "a" / "b" / "y.PNG")}
    st = os.stat(tmp_path / "a" / "x.jpg")
    assert rows[str(tmp_path / "a" / "x.jpg")]["etag"] == f"{st.st_size:x}-{st.st_mtime_ns:x}"
    level, subs = storage.list_level(str(tmp_path))
    assert level.num_rows == 0 and subs == [str(tmp_path / "a")]
    with pytest.raises(StorageError, match="does not exist"):
        storage.list_objects(str(tmp_path / "nope"))


def test_local_listing_symlinks(tmp_path):
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    (tree / "sub").mkdir(parents=True)
    outside.mkdir()
    (tree / "sub" / "in.jpg").write_bytes(b"in")
    (outside / "secret.jpg").write_bytes(b"secret")
    (tree / "loop").symlink_to(tree)  # a directory loop
    (tree / "self.jpg").symlink_to(tree / "self.jpg")  # a symlink to itself
    (tree / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tree / "out.jpg").symlink_to(outside / "secret.jpg")
    (tree / "outdir").symlink_to(outside)
    (tree / "alias.jpg").symlink_to(tree / "sub" / "in.jpg")  # inside the tree: listed
    rows = {r["image_uri"]: r["error"] for r in storage.list_objects(str(tree)).to_pylist()}
    assert rows == {
        str(tree / "sub" / "in.jpg"): None,
        str(tree / "alias.jpg"): None,
        str(tree / "self.jpg"): rows[str(tree / "self.jpg")],
        str(tree / "dangling.jpg"): rows[str(tree / "dangling.jpg")],
        str(tree / "out.jpg"): "not_followed: symlink leads outside the input tree",
    }
    assert rows[str(tree / "self.jpg")].startswith("bad_link: ")
    assert rows[str(tree / "dangling.jpg")].startswith("bad_link: ")


def test_local_listing_non_utf8_name(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9.jpg"
    with open(raw, "wb") as f:
        f.write(b"x")
    (tmp_path / "ok.jpg").write_bytes(b"y")
    rows = storage.list_objects(str(tmp_path)).to_pylist()
    bad = [r for r in rows if r["error"]]
    assert [r["image_uri"] for r in bad] == [f"{tmp_path}/caf\\xe9.jpg"]
    assert bad[0]["error"].startswith("bad_name: ")
    assert [r["image_uri"] for r in rows if not r["error"]] == [str(tmp_path / "ok.jpg")]


def test_local_file_deleted_between_scan_and_stat_is_skipped(tmp_path):
    rows = storage._Rows()
    storage._stat_file(rows, str(tmp_path / "vanished.jpg"), follow=True)
    assert rows.table().num_rows == 0


def test_unreadable_folder_is_an_error_row(tmp_path):
    """Run as an unprivileged user (root reads any folder), in a child process."""
    import json
    import subprocess
    import sys
    import tempfile

    base = tempfile.mkdtemp(prefix="unreadable-")
    try:
        os.chmod(base, 0o755)
        os.makedirs(os.path.join(base, "locked"))
        with open(os.path.join(base, "ok.jpg"), "wb") as f:
            f.write(b"x")
        os.chmod(os.path.join(base, "locked"), 0)
        code = (
            "import json, os, sys\n"
            "from emotion_core import storage\n"
            "if os.geteuid() == 0:\n"
            "    os.setgid(65534); os.setuid(65534)\n"
            "print(json.dumps(storage.list_objects(sys.argv[1]).select(['image_uri', 'error']).to_pylist()))\n"
        )
        out = subprocess.run([sys.executable, "-c", code, base], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        rows = {r["image_uri"]: r["error"] for r in json.loads(out.stdout.strip().splitlines()[-1])}
        assert rows[os.path.join(base, "ok.jpg")] is None
        assert rows[os.path.join(base, "locked")].startswith("read_failed: cannot list folder: Permission denied")
    finally:
        os.chmod(os.path.join(base, "locked"), 0o755)
        storage.delete_dir(base)


def test_read_object_errors_and_metadata(tmp_path, s3_bucket):
    f = tmp_path / "a.jpg"
    f.write_bytes(b"abcd")
    r = storage.read_object(str(f))
    st = os.stat(f)
    assert (r.data, r.error, r.etag, r.size) == (b"abcd", None, f"{st.st_size:x}-{st.st_mtime_ns:x}", 4)
    missing = storage.read_object(str(tmp_path / "gone.jpg"))
    assert missing.data is None and missing.error.startswith("not_found: ")
    assert storage.read_object(str(tmp_path)).error.startswith("read_failed: ")
    storage.s3_client().put_object(Bucket=s3_bucket, Key="k.jpg", Body=b"s3data")
    r = storage.read_object(f"s3://{s3_bucket}/k.jpg")
    assert (r.data, r.error, r.size) == (b"s3data", None, 6) and len(r.etag) == 32 and r.last_modified_ms
    assert storage.read_object(f"s3://{s3_bucket}/gone.jpg").error.startswith("not_found: ")
    denied = storage.read_object("s3://no-such-bucket-x2/k.jpg")
    assert denied.error == "read_failed: NoSuchBucket The specified bucket does not exist"
    reads = storage.read_objects([f"s3://{s3_bucket}/k.jpg", str(f), f"s3://{s3_bucket}/gone.jpg"], threads=4)
    assert [x.data for x in reads] == [b"s3data", b"abcd", None]


def test_too_large_is_not_read_whole(tmp_path, s3_bucket):
    import subprocess
    import sys

    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:
        f.truncate(1 << 40)  # a sparse 1 TiB file: reading it whole would not finish
    r = storage.read_object(str(huge), max_bytes=50 << 20)
    assert r.data is None and r.error == f"too_large: {1 << 40} bytes > max {50 << 20} bytes (not read)"
    assert r.size == 1 << 40
    big = os.urandom(1024) * (24 * 1024)  # 24 MiB
    storage.s3_client().put_object(Bucket=s3_bucket, Key="big.jpg", Body=big)
    uri = f"s3://{s3_bucket}/big.jpg"
    # Measured in a child process: moto's server runs in this one and allocates the body itself.
    code = (
        "import sys, tracemalloc\n"
        "from emotion_core import storage\n"
        "storage.read_object(sys.argv[1], max_bytes=1)\n"  # warm the client outside the measurement
        "tracemalloc.start()\n"
        "r = storage.read_object(sys.argv[1], max_bytes=1 << 20)\n"
        "print(tracemalloc.get_traced_memory()[1], r.size, r.error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, uri], capture_output=True, text=True, timeout=120)
    peak, size, error = out.stdout.strip().splitlines()[-1].split(" ", 2)
    assert int(size) == len(big) and error.startswith("too_large: 25165824 bytes"), out.stderr
    assert int(peak) < 4 << 20, f"{peak} bytes allocated: the body was read"
    assert storage.read_object(uri, max_bytes=len(big)).data == big


def test_error_vocabulary_and_short_error():
    from botocore.exceptions import ClientError

    assert storage.is_read_error("read_failed: AccessDenied Access Denied")
    assert storage.is_read_error("not_found: object was deleted after listing")
    for data_error in (None, "", "too_large: 9 bytes > max 1 bytes", "decode_failed: x", "bad_name: x"):
        assert not storage.is_read_error(data_error)
    e = ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}}, "GetObject")
    assert storage.short_error(e) == "SlowDown Please reduce your request rate."
    leak = RuntimeError("bad request Credential=AKIAABCDEFGHIJKLMNOP/20240101/us-east-1 more\nsecond line")
    assert storage.short_error(leak) == "bad request Credential=<redacted> more"
    assert storage.short_error(ValueError()) == "ValueError"
