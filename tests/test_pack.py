"""jobs.pack on the shared real local Ray (``ray_session``) and moto's S3 server: packing round-trips
every image's bytes, shard names and bytes are deterministic, re-runs overwrite (and drop shards a
larger earlier pack left), and bad arguments are one line with exit 2."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from emotion_core import shards, storage
from emotion_core.synthetic import face_jpeg
from jobs import pack

NAMES = ["a.jpg", "2024.01/b.jpg", "2024.01/b.png", "dir with space/c#1.jpg", "q?x=1.png", "é/日本.jpg",
         "x::y.jpg", "100%.jpeg", "img.v2.final.jpg", "deep/er/d.jpg", "broken.jpg"]


def images() -> dict[str, bytes]:
    out = {n: face_jpeg("happy", np.random.default_rng(i)) for i, n in enumerate(NAMES)}
    out["broken.jpg"] = out["broken.jpg"][:100]  # packed as it is; labelling makes it an error row
    return out


def write_local(root, objs: dict[str, bytes]) -> None:
    for name, data in objs.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    with open(os.path.join(root, "notes.txt"), "w") as f:  # not an image: not packed
        f.write("x")


def read_back(output: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(member name -> bytes, shard name -> shard bytes) of every shard under ``output``."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(output)
    files = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File)
    got, raw = {}, {}
    for name in files:
        fmt = shards.detect_format(name)
        if fmt not in ("webdataset", "parquet"):
            continue
        uri = storage.join(output, name)
        raw[name] = storage.read_bytes(uri)
        for m in shards.iter_members(raw[name], fmt, uri):
            assert m.error is None, m
            assert shards.split_member_uri(shards.member_uri(uri, m.name)) == (uri, m.name, fmt)
            got[m.name] = m.data
    return got, raw


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_pack_local_round_trip_deterministic(ray_session, tmp_path, capsys, fmt):
    src, out = tmp_path / "in", tmp_path / "out"
    objs = images()
    write_local(src, objs)
    argv = ["--input", str(src), "--output", str(out), "--shard-size", "4", "--format", fmt]
    assert pack.main(argv) == 0
    got, first = read_back(str(out))
    assert got == objs  # every image, exact bytes, named by its path relative to --input
    ext = shards.SHARD_EXTENSIONS[fmt]
    assert sorted(first) == [f"shard-00000{i}{ext}" for i in range(3)]
    summary = json.loads((out / "_pack.json").read_text())
    assert summary["objects"] == summary["members"] == len(objs) and summary["shards"] == 3
    assert "11 objects -> 3 shards" in capsys.readouterr().out

    assert pack.main(argv) == 0  # a re-run rewrites the same shards with the same bytes
    got2, second = read_back(str(out))
    assert second == first


def test_rerun_with_fewer_shards_removes_stale_ones(ray_session, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    objs = images()
    write_local(src, objs)
    out.mkdir()
    (out / "keep-me.txt").write_text("not ours")
    assert pack.main(["--input", str(src), "--output", str(out), "--shard-size", "2"]) == 0
    assert len(read_back(str(out))[1]) == 6
    assert pack.main(["--input", str(src), "--output", str(out), "--shard-size", "5", "--format", "parquet"]) == 0
    got, raw = read_back(str(out))
    assert sorted(raw) == [f"shard-00000{i}.parquet" for i in range(3)] and got == objs
    assert (out / "keep-me.txt").exists()


def test_pack_s3_round_trip(ray_session, s3_bucket):
    client = storage.s3_client()
    objs = {n: b for n, b in images().items() if not set(n) & set("#?")}  # see the test below
    for name, data in objs.items():
        client.put_object(Bucket=s3_bucket, Key=f"faces/{name}", Body=data)
    client.put_object(Bucket=s3_bucket, Key="faces-other/z.jpg", Body=b"not under the prefix")
    out = f"s3://{s3_bucket}/packed"
    assert pack.main(["--input", f"s3://{s3_bucket}/faces/", "--output", out, "--shard-size", "5"]) == 0
    got, raw = read_back(out)
    assert got == objs and sorted(raw) == ["shard-000000.tar", "shard-000001.tar"]
    # shard 0 holds the first 5 objects of the sorted listing
    first5 = sorted(f"s3://{s3_bucket}/faces/{n}" for n in objs)[:5]
    members0 = {m.name for m in shards.iter_members(raw["shard-000000.tar"], "webdataset", "x")}
    assert members0 == set(pack.relative_names(first5, f"s3://{s3_bucket}/faces"))


def test_pack_s3_keys_with_hash_and_query(ray_session, s3_bucket):
    client = storage.s3_client()
    objs = {"c#1.jpg": b"hash", "q?x=1.png": b"query"}
    for name, data in objs.items():
        client.put_object(Bucket=s3_bucket, Key=f"faces/{name}", Body=data)
    out = f"s3://{s3_bucket}/packed"
    assert pack.main(["--input", f"s3://{s3_bucket}/faces", "--output", out]) == 0
    assert read_back(out)[0] == objs


def test_members_of_a_sample_are_adjacent(ray_session, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    # sorted listing: a.b/x.jpg, a.jpg, a.png -> keys a.b/x, a, a: the two "a" files must be adjacent
    write_local(src, {"a.png": b"p", "a.b/x.jpg": b"x", "a.jpg": b"j"})
    assert pack.main(["--input", str(src), "--output", str(out)]) == 0
    names = [m.name for m in shards.iter_members((out / "shard-000000.tar").read_bytes(), "webdataset", "x")]
    assert names == ["a.jpg", "a.png", "a.b/x.jpg"]


@pytest.mark.parametrize("extra, message", [
    (["--shard-size", "0"], "--shard-size must be >= 1"),
    (["--format", "zip"], "invalid choice"),
    (["--max-shard-bytes", "1000"], "use a smaller --shard-size"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, extra, message):
    src = tmp_path / "in"
    write_local(src, images())
    with pytest.raises(SystemExit) as e:
        raise SystemExit(pack.main(["--input", str(src), "--output", str(tmp_path / "out"), *extra]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("jobs.pack: error:") and len(err.splitlines()) == 1


@pytest.mark.parametrize("input_name, output_name, message", [
    ("missing", "out", "does not exist"),
    ("in", "in/packed", "must not be inside"),
])
def test_bad_inputs_exit_2(tmp_path, capsys, input_name, output_name, message):
    write_local(tmp_path / "in", {"a.jpg": b"a"})
    code = pack.main(["--input", str(tmp_path / input_name), "--output", str(tmp_path / output_name)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_relative_names():
    assert pack.relative_names(["s3://b/p/x/y.jpg", "s3://b/p/z.jpg"], "s3://b/p") == ["x/y.jpg", "z.jpg"]
    assert pack.relative_names(["/data/one.jpg"], "/data/one.jpg") == ["one.jpg"]
