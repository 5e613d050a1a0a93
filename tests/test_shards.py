"""emotion_core.shards: member URIs, format detection, reading WebDataset and Parquet shards
(good, broken and odd), and deterministic writers. Pure library: no Ray, no S3."""

from __future__ import annotations

import io
import random
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emotion_core import shards
from emotion_core.preprocess import ImageDecodeError, decode_image
from emotion_core.synthetic import face_jpeg

NASTY = [
    "a.jpg", "dir/sub dir/b c.jpg", "x#1.jpg", "q?x=1&y=2.png", "a::b.jpg", "::", "100%.jpg", "%41.jpg",
    "tar://x::y.jpg", "émotion/日本語/😀.jpg", "tab\there.jpg", "new\nline.jpg", "back\\slash.jpg",
    "a+b=c;d,e@f$g!h'i(j)k*l~m.jpg", "2024.01/img.v2.final.jpg", "/leading.jpg", "trailing/", "",
    "%", "%%3A", "a%3A%3Ab", " ", ".hidden.jpg", "dir/../up.jpg",
]
SHARDS = [
    "s3://bucket/shards/shard-000000.tar", "s3://b/odd key#frag?q=1::x%20y/s.tar", "/data/shards/p::q.parquet",
    "/tmp/日本/s #1.tar", "s3://b/tar://x::y.tar",
]
ALPHABET = "ab/.:%#?& +=~\\\t\n\x00é日😀-_*"


def faces(n: int, seed: int = 0) -> list[bytes]:
    labels = ["happy", "sad", "angry", "neutral"]
    return [face_jpeg(labels[i % 4], np.random.default_rng(seed + i)) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Member URIs


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_member_uri_round_trip_nasty_names(fmt):
    rng = random.Random(0)
    names = NASTY + ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 20))) for _ in range(2000)]
    shard_uris = SHARDS + ["s3://b/" + "".join(rng.choice(ALPHABET) for _ in range(12)) for _ in range(50)]
    seen = set()
    for i, name in enumerate(names):
        shard = shard_uris[i % len(shard_uris)]
        uri = shards.member_uri(shard, name, fmt)
        assert uri.startswith(shards.SCHEMES[fmt])
        assert shards.split_member_uri(uri) == (shard, name, fmt)
        seen.add(uri)
    assert len(seen) == len({(shard_uris[i % len(shard_uris)], n) for i, n in enumerate(names)})  # injective


def test_member_uri_is_readable_and_fsspec_shaped():
    assert shards.member_uri("s3://b/p/shard-000000.tar", "faces/2024.01/a.jpg") == (
        "tar://faces/2024.01/a.jpg::s3://b/p/shard-000000.tar")
    assert shards.member_uri("/x/s.parquet", "a b#1") == "parquet://a%20b%231::/x/s.parquet"
    assert shards.member_uri("s3://b/s.tar", "a::b") == "tar://a%3A%3Ab::s3://b/s.tar"


def test_member_uri_needs_a_shard_format():
    with pytest.raises(ValueError):
        shards.member_uri("s3://b/shard.bin", "a.jpg")
    assert shards.member_uri("s3://b/shard.bin", "a.jpg", "webdataset").startswith("tar://")


@pytest.mark.parametrize("uri", ["s3://bucket/a.jpg", "/abs/path/tar://x::y.jpg", "s3://b/parquet://a::b.jpg"])
def test_loose_uris_are_not_members(uri):
    assert shards.split_member_uri(uri) is None


@pytest.mark.parametrize("uri", ["tar://a.jpg", "tar://a.jpg::", "parquet://%FF::s3://b/x.parquet"])
def test_malformed_member_uris_raise(uri):
    with pytest.raises(ValueError):
        shards.split_member_uri(uri)


def test_detect_format_and_extensions():
    assert shards.detect_format("s3://b/p/shard-000001.tar") == "webdataset"
    assert shards.detect_format("/x/Y.PARQUET") == "parquet"
    assert shards.detect_format("s3://b/a.JPG") == "images"
    assert shards.detect_format("s3://b/a.tar.gz") is None
    assert shards.detect_format("s3://b/dir.tar/readme.txt") is None
    assert shards.extensions("webdataset") == (".tar",)
    assert ".parquet" in shards.extensions("auto") and ".jpg" in shards.extensions("auto")
    with pytest.raises(ValueError):
        shards.extensions("zip")


def test_webdataset_key():
    assert shards.webdataset_key("2024.01/img.v2.jpg") == "2024.01/img"
    assert shards.webdataset_key("a.jpg") == "a"


# ---------------------------------------------------------------------------------------------
# WebDataset


def members(data: bytes, fmt: str = "webdataset", uri: str = "s3://b/s.tar", **kw) -> list[shards.Member]:
    return list(shards.iter_members(data, fmt, uri, **kw))


def test_webdataset_round_trip_one_member_per_image():
    imgs = faces(4)
    tar = shards.write_webdataset([
        ("s/0001.jpg", imgs[0]), ("s/0001.json", b'{"a": 1}'), ("s/0001.cls", b"3"),
        ("s/0002.png", imgs[1]), ("s/0002.jpg", imgs[2]), ("s/0002.txt", b"hi"),
        ("2024.01/x.y.JPEG", imgs[3]),
    ])
    got = members(tar)
    assert [(m.name, m.data, m.error) for m in got] == [
        ("s/0001.jpg", imgs[0], None), ("s/0002.png", imgs[1], None), ("s/0002.jpg", imgs[2], None),
        ("2024.01/x.y.JPEG", imgs[3], None),
    ]


def test_webdataset_writer_is_deterministic_and_standard():
    imgs = faces(3)
    items = [(f"dir/é{i}.jpg", b) for i, b in enumerate(imgs)] + [("x" * 300 + ".jpg", b"long name")]
    a, b = shards.write_webdataset(items), shards.write_webdataset(list(items))
    assert a == b
    with tarfile.open(fileobj=io.BytesIO(a)) as tf:  # a plain tar any tool reads
        assert [m.name for m in tf.getmembers()] == [n for n, _ in items]
        assert all(m.mtime == 0 and m.uid == 0 for m in tf.getmembers())


def test_truncated_image_member_is_yielded_for_the_decoder():
    from emotion_core.models import get_input_spec

    good, = faces(1)
    tar = shards.write_webdataset([("bad.jpg", good[: len(good) // 2]), ("good.jpg", good)])
    got = members(tar)
    assert [m.name for m in got] == ["bad.jpg", "good.jpg"] and all(m.error is None for m in got)
    with pytest.raises(ImageDecodeError):  # the labeller turns it into an error row
        decode_image(got[0].data, get_input_spec("cnn"))


def _five_member_tar() -> tuple[bytes, list[bytes]]:
    imgs = [bytes([i]) * 3000 for i in range(5)]  # 512-byte header + 3072 bytes of data each
    return shards.write_webdataset([(f"m{i}.jpg", b) for i, b in enumerate(imgs)]), imgs


def test_tar_cut_inside_a_member():
    tar, imgs = _five_member_tar()
    got = members(tar[: 2 * 3584 + 512 + 1000])  # inside m2's data
    assert [(m.name, m.data) for m in got[:2]] == [("m0.jpg", imgs[0]), ("m1.jpg", imgs[1])]
    assert got[2].name == "m2.jpg" and got[2].data is None and got[2].error.startswith("truncated:")
    assert got[3].name == shards.SHARD_ITSELF and got[3].error.startswith("truncated_shard:")
    assert len(got) == 4


def test_tar_cut_at_a_member_boundary():
    tar, imgs = _five_member_tar()
    got = members(tar[: 2 * 3584])
    assert [m.data for m in got[:2]] == imgs[:2]
    assert got[2].name == "" and got[2].error.startswith("truncated_shard: no end-of-archive")


def test_tar_with_a_corrupt_header():
    tar, imgs = _five_member_tar()
    bad = bytearray(tar)
    bad[3 * 3584 + 10] ^= 0xFF  # m3's header checksum no longer matches
    got = members(bytes(bad))
    assert [m.data for m in got[:3]] == imgs[:3]
    assert got[3].name == "" and got[3].error.startswith("corrupt_shard:") and len(got) == 4


@pytest.mark.parametrize("data", [b"", b"not a tar at all" * 100, b"\x1f\x8b" + bytes(600)])
def test_not_a_tar_is_one_error_member(data):
    got = members(data)
    assert len(got) == 1 and got[0].name == "" and got[0].error.startswith("shard_unreadable:")


def test_tar_with_no_images_yields_nothing():
    assert members(shards.write_webdataset([("a.json", b"{}")])) == []


def test_repeated_member_name_keeps_the_first():
    tar = shards.write_webdataset([("a.jpg", b"1"), ("a.jpg", b"2"), ("b.jpg", b"3")])
    assert [(m.name, m.data) for m in members(tar)] == [("a.jpg", b"1"), ("b.jpg", b"3")]


def test_max_bytes():
    tar, _ = _five_member_tar()
    got = members(tar, max_bytes=1000)
    assert len(got) == 1 and got[0].error.startswith("shard_too_large:")
    assert shards.shard_size_error(len(tar), max_bytes=len(tar)) is None
    assert shards.shard_size_error(None) is None
    assert shards.shard_size_error(shards.DEFAULT_MAX_SHARD_BYTES + 1).startswith("shard_too_large:")


# ---------------------------------------------------------------------------------------------
# Parquet


def parquet(table: pa.Table, **kw) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kw)
    return buf.getvalue()


def test_parquet_round_trip_and_deterministic():
    imgs = faces(5)
    items = [(f"d/{i}.jpg", b) for i, b in enumerate(imgs)]
    data = shards.write_parquet_shard(items, row_group_rows=2)
    assert data == shards.write_parquet_shard(list(items), row_group_rows=2)
    got = members(data, "parquet", "/x/s.parquet")
    assert [(m.name, m.data, m.error) for m in got] == [(n, b, None) for n, b in items]


def test_parquet_null_cell_is_an_error_member():
    imgs = faces(2)
    data = parquet(pa.table({"__key__": ["a", "b", "c"], "jpg": pa.array([imgs[0], None, imgs[1]], pa.binary())}))
    got = members(data, "parquet")
    assert [(m.name, m.data) for m in got] == [("a", imgs[0]), ("b", None), ("c", imgs[1])]
    assert got[1].error.startswith("missing_image:")


def test_parquet_hugging_face_image_struct():
    imgs = faces(2)
    image = pa.array([{"bytes": imgs[0], "path": "x/0.jpg"}, {"bytes": imgs[1], "path": None}],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    data = parquet(pa.table({"image": image, "label": [1, 2]}))
    got = members(data, "parquet")
    assert [(m.name, m.data) for m in got] == [("x/0.jpg", imgs[0]), ("1", imgs[1])]


def test_parquet_without_a_key_column_uses_the_row_index():
    data = parquet(pa.table({"Bytes": pa.array([b"1", b"2", b"3"], pa.large_binary())}), row_group_size=2)
    assert [(m.name, m.data) for m in members(data, "parquet")] == [("0", b"1"), ("1", b"2"), ("2", b"3")]


def test_parquet_image_column_of_paths_is_not_bytes():
    data = parquet(pa.table({"image": ["a.jpg"], "path": ["a.jpg"]}))
    got = members(data, "parquet")
    assert len(got) == 1 and got[0].name == "" and "no image-bytes column" in got[0].error


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_parquet_is_one_error_member(cut):
    data = shards.write_parquet_shard([(f"{i}.jpg", bytes(100)) for i in range(10)])
    got = members(data[: int(len(data) * cut)], "parquet")
    assert len(got) == 1 and got[0].name == "" and got[0].error.startswith("shard_unreadable:")


def test_parquet_corrupt_row_group_keeps_the_others():
    imgs = [bytes([i]) * 2000 for i in range(6)]
    data = bytearray(shards.write_parquet_shard([(f"{i}.jpg", b) for i, b in enumerate(imgs)], row_group_rows=3))
    # Overwrite the first row group's pages (they follow the 4-byte magic) with garbage.
    data[4:1500] = b"\xff" * 1496
    got = members(bytes(data), "parquet")
    good = [m for m in got if m.error is None]
    assert [(m.name, m.data) for m in good] == [(f"{i}.jpg", imgs[i]) for i in range(3, 6)]
    assert any(m.name == "" and m.error.startswith("corrupt_shard:") for m in got)


def test_unknown_format_is_a_caller_bug():
    with pytest.raises(ValueError):
        list(shards.iter_members(b"", "images", "x"))
