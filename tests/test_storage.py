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
    assert loc == Location("s3", "bucket/some/prefix")
    assert (loc.bucket, loc.key, loc.uri, loc.is_s3) == (
        "bucket",
        "some/prefix",
        "s3://bucket/some/prefix",
        True,
    )
    assert storage.parse("s3a://bucket/k").path == "bucket/k"
    assert storage.parse("s3://bucket").key == ""
    assert storage.is_s3("s3://bucket/k")


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
