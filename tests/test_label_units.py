"""jobs.label pieces that need no Ray: listing, manifests, incremental planning, the commit
protocol, fail-fast argument/model/output checks and --print-ddl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emotion_core import storage
from emotion_core.schema import label_schema
from jobs import _label_commit, _label_io, _label_plan, label
from tests.helpers import face_jpeg, save_untrained_model

CLASSES = ["happy", "sad"]


def _write(path, data: bytes = b"x") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Listing


def test_list_local_recursive_case_insensitive_and_etag_changes(tmp_path):
    a = _write(tmp_path / "a" / "one.JPG")
    _write(tmp_path / "a" / "b" / "two.png")
    _write(tmp_path / "a" / "b" / "c" / "three.TiFf")
    _write(tmp_path / "a" / "notes.txt")
    _write(tmp_path / "a" / "noext")
    t = _label_io.list_inputs([str(tmp_path / "a"), str(tmp_path / "a" / "b")])  # overlapping inputs
    assert t.schema == _label_io.LISTING_SCHEMA
    assert [os.path.basename(u) for u in t["image_uri"].to_pylist()] == ["three.TiFf", "two.png", "one.JPG"]
    assert t["image_uri"].to_pylist() == sorted(t["image_uri"].to_pylist())
    before = t.filter(pa.compute.equal(t["image_uri"], a))["etag"][0].as_py()
    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    again = _label_io.list_local(a)["etag"][0].as_py()
    assert again != before and again == _label_io.list_local(a)["etag"][0].as_py()  # stable, and changes


def test_list_missing_input_is_a_usage_error(tmp_path):
    with pytest.raises(_label_io.ListingError, match="does not exist"):
        _label_io.list_inputs([str(tmp_path / "nope")])


def test_list_s3(s3_bucket):
    c = storage.s3_client()
    for key in ("in/x/1.jpg", "in/x/y/2.PNG", "in/readme.md", "input-other/3.jpg", "in2/4.jpg"):
        c.put_object(Bucket=s3_bucket, Key=key, Body=b"data")
    t = _label_io.list_inputs([f"s3://{s3_bucket}/in"])
    assert t["image_uri"].to_pylist() == [f"s3://{s3_bucket}/in/x/1.jpg", f"s3://{s3_bucket}/in/x/y/2.PNG"]
    assert all(e and '"' not in e for e in t["etag"].to_pylist())
    assert t["size_bytes"].to_pylist() == [4, 4]
    assert t["last_modified"].null_count == 0
    with pytest.raises(_label_io.ListingError, match="cannot list"):
        _label_io.list_inputs([f"s3://{s3_bucket}-missing/in"])


def test_manifests_csv_inventory_and_parquet(tmp_path):
    # CSV with a header and a uri column (any case), non-images filtered out
    p = tmp_path / "m.csv"
    p.write_text("URI,ETag,Size\n/data/a.jpg,\"e1\",10\n/data/b.txt,e2,3\ns3://bk/c.png,e3,\n")
    t = _label_io.read_manifest(str(p))
    assert t["image_uri"].to_pylist() == ["/data/a.jpg", "s3://bk/c.png"]
    assert t["etag"].to_pylist() == ["e1", "e3"] and t["size_bytes"].to_pylist() == [10, None]
    # S3 Inventory CSV: no header, bucket,key,size,last_modified,etag, URL-encoded keys
    p = tmp_path / "inv.csv"
    p.write_text('"bk","faces/my+face%281%29.jpg","123","2024-05-01T10:00:00.000Z","abc"\n"bk","faces/x.gif","1","",""\n')
    t = _label_io.read_manifest(str(p))
    assert t["image_uri"].to_pylist() == ["s3://bk/faces/my face(1).jpg", "s3://bk/faces/x.gif"]
    assert t["last_modified"][0].as_py().year == 2024 and t["etag"].to_pylist() == ["abc", None]
    # Parquet with bucket/key columns
    p = tmp_path / "m.parquet"
    pq.write_table(pa.table({"Bucket": ["bk", "bk"], "Key": ["k/1.webp", "k/2.bmp"]}), p)
    t = _label_io.read_manifest(str(p))
    assert t["image_uri"].to_pylist() == ["s3://bk/k/1.webp", "s3://bk/k/2.bmp"]
    # restricted to the inputs' prefixes when both are given
    t = _label_io.list_inputs(["s3://bk/k/1"], manifest=str(p))
    assert t.num_rows == 0
    t = _label_io.list_inputs(["s3://bk/k"], manifest=str(p))
    assert t.num_rows == 2
    p = tmp_path / "bad.csv"
    p.write_text("name,size\nx.jpg,1\n")
    with pytest.raises(_label_io.ListingError, match="needs a 'uri' column"):
        _label_io.read_manifest(str(p))


def test_fetch_reports_missing_and_unreadable(tmp_path, s3_bucket):
    ok = _write(tmp_path / "ok.jpg", b"abc")
    datas, errors, metas = _label_io.fetch([ok, str(tmp_path / "gone.jpg")])
    assert datas[0] == b"abc" and errors[0] is None and metas[0][1] == 3
    assert datas[1] is None and errors[1].startswith("not_found")
    storage.s3_client().put_object(Bucket=s3_bucket, Key="a.jpg", Body=b"xyz")
    uris = [f"s3://{s3_bucket}/a.jpg", f"s3://{s3_bucket}/deleted.jpg", "s3://no-such-bucket-zz/a.jpg"]
    datas, errors, metas = _label_io.fetch(uris)
    assert datas[0] == b"xyz" and metas[0][0] and metas[0][1] == 3
    assert errors[1].startswith("not_found")
    assert errors[2].startswith(("read_failed", "not_found"))


# ---------------------------------------------------------------------------------------------
# Incremental planning


def _rows(uris, etags, version="v1", errors=None, run_id="r1", labelled_at=1_700_000_000_000):
    n = len(uris)
    schema = label_schema(CLASSES)
    cols = {
        "image_uri": uris,
        "etag": etags,
        "size_bytes": [1] * n,
        "last_modified": [labelled_at] * n,
        "label": ["happy"] * n,
        "confidence": [0.9] * n,
        "prob_happy": [0.9] * n,
        "prob_sad": [0.1] * n,
        "model_name": ["cnn"] * n,
        "model_version": [version] * n,
        "run_id": [run_id] * n,
        "labelled_at": [labelled_at] * n,
        "width": [48] * n,
        "height": [48] * n,
        "error": errors or [None] * n,
    }
    return pa.table({f.name: pa.array(cols[f.name]).cast(f.type) for f in schema}, schema=schema)


def _listing(pairs):
    return pa.table(
        {
            "image_uri": [u for u, _ in pairs],
            "etag": [e for _, e in pairs],
            "size_bytes": pa.nulls(len(pairs), pa.int64()),
            "last_modified": pa.nulls(len(pairs), pa.timestamp("ms", tz="UTC")),
        },
        schema=_label_io.LISTING_SCHEMA,
    )


def _commit(out, date, table, run_id, rows_per_file=2):
    staged = _label_commit.write_staged(table, out, run_id, rows_per_file)
    return _label_commit.commit(out, date, run_id, staged, table.num_rows)


def test_plan_incremental_semantics(tmp_path):
    out = str(tmp_path / "out")
    assert _label_plan.plan_incremental(_listing([("a", "1")]), out, "v1").todo.num_rows == 1  # no output yet
    # day 1: a, b, c, d ok; e errored
    _commit(
        out, "2024-05-01", _rows(list("abcde"), list("11111"), errors=[None] * 4 + ["truncated: x"], run_id="d1"), "d1"
    )
    # day 2 (newer): b relabelled by another model version; c relabelled by v1 with a later etag
    _commit(out, "2024-05-02", pa.concat_tables([_rows(["b"], ["1"], version="v2", run_id="d2"),
                                                 _rows(["c"], ["2"], run_id="d2")]), "d2")
    listing = _listing([("a", "1"), ("b", "1"), ("c", "2"), ("d", "9"), ("e", "1"), ("f", "1")])
    plan = _label_plan.plan_incremental(listing, out, "v1")
    # a: unchanged -> skip; b: latest row is v2 -> redo; c: latest row (day 2) matches -> skip;
    # d: etag changed -> redo; e: previous error -> redo; f: new -> do
    assert plan.todo["image_uri"].to_pylist() == ["b", "d", "e", "f"]
    assert plan.todo.schema == _label_io.LISTING_SCHEMA
    assert dict(zip(plan.skipped["image_uri"].to_pylist(), plan.skipped["dt"].to_pylist())) == {
        "a": "2024-05-01", "c": "2024-05-02"}
    carried = _label_plan.carry_forward(out, plan.skipped, CLASSES)
    assert carried.schema == label_schema(CLASSES)
    assert carried["image_uri"].to_pylist() == ["a", "c"]
    assert carried["run_id"].to_pylist() == ["d1", "d2"] and carried["etag"].to_pylist() == ["1", "2"]
    # a different model version skips nothing
    assert _label_plan.plan_incremental(listing, out, "v3").skipped.num_rows == 0


def test_plan_scales_vectorised(tmp_path):
    """50k labelled rows in 2 files + a 52k listing: vectorised planning takes a fraction of a second."""
    out = str(tmp_path / "out")
    n = 50_000
    uris = [f"s3://b/{i:07d}.jpg" for i in range(n)]
    _commit(out, "2024-05-01", _rows(uris, ["e"] * n), "big", rows_per_file=30_000)
    listing = _listing(
        [(u, "e" if i % 10 else "new") for i, u in enumerate(uris + [f"s3://b/x{i}.jpg" for i in range(2000)])]
    )
    t0 = time.perf_counter()
    plan = _label_plan.plan_incremental(listing, out, "v1")
    assert time.perf_counter() - t0 < 5
    assert plan.todo.num_rows == n // 10 + 2000 and plan.skipped.num_rows == n - n // 10


# ---------------------------------------------------------------------------------------------
# Commit protocol


def _parquet_files(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".parquet"))


def test_commit_replaces_partition_and_writes_success(tmp_path):
    out = str(tmp_path / "out")
    files1 = _commit(out, "2024-05-01", _rows(list("abc"), list("111")), "run1")
    assert len(files1) == 2  # rows_per_file=2
    part = tmp_path / "out" / "dt=2024-05-01"
    assert _parquet_files(part) == ["part-run1-00000.parquet", "part-run1-00001.parquet"]
    _commit(out, "2024-05-01", _rows(list("xy"), list("11")), "run2")
    assert _parquet_files(part) == ["part-run2-00000.parquet"]
    assert pq.read_table(part / "part-run2-00000.parquet")["image_uri"].to_pylist() == ["x", "y"]
    ok = json.loads((part / "_SUCCESS").read_text())
    assert ok["run_id"] == "run2" and ok["rows"] == 2
    assert _label_commit.read_committed(out, "2024-05-01") == [str(part / "part-run2-00000.parquet")]
    assert not os.listdir(tmp_path / "out" / "_staging")


def test_crash_after_intent_is_rolled_forward_and_abandoned_staging_cleaned(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    _commit(out, "2024-05-01", _rows(list("abc"), list("111")), "old")
    staged = _label_commit.write_staged(_rows(list("de"), list("11")), out, "crashy", 10)
    # The run dies right after writing its intent: nothing installed yet.
    monkeypatch.setattr(_label_commit, "_apply", lambda *a, **k: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        _label_commit.commit(out, "2024-05-01", "crashy", staged, 2)
    monkeypatch.undo()
    part = tmp_path / "out" / "dt=2024-05-01"
    assert _parquet_files(part) == ["part-old-00000.parquet", "part-old-00001.parquet"]  # readers: old data
    # A run that died before committing: staging without an intent.
    _label_commit.write_staged(_rows(["z"], ["1"]), out, "died-early", 10)
    assert _label_commit.recover(out) == ["crashy"]
    assert _parquet_files(part) == ["part-crashy-00000.parquet"]
    assert os.listdir(tmp_path / "out" / "_staging") == ["died-early"]  # too young to be litter
    assert _label_commit.recover(out, now=time.time() + 2 * 86400) == []
    assert os.listdir(tmp_path / "out" / "_staging") == []


def test_commit_on_s3(s3_bucket):
    out = f"s3://{s3_bucket}/labels"
    _commit(out, "2024-05-01", _rows(list("abc"), list("111")), "r1")
    _commit(out, "2024-05-01", _rows(list("ab"), list("11")), "r2")
    keys = sorted(o["Key"] for o in storage.s3_client().list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == ["labels/dt=2024-05-01/_SUCCESS", "labels/dt=2024-05-01/part-r2-00000.parquet"]


# ---------------------------------------------------------------------------------------------
# Fail fast + DDL (no Ray, no image read)


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    return save_untrained_model(str(tmp_path_factory.mktemp("m") / "model"), ["angry", "happy", "sad"])[0]


def _bad_models(tmp_path, good_model):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("model.json", "model.safetensors"):
        (corrupt / name).write_bytes(open(os.path.join(good_model, name), "rb").read())
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "model.json").write_text(json.dumps({"hello": "world"}))
    torch_pickle = tmp_path / "pickled"
    torch_pickle.mkdir()
    (torch_pickle / "model.pth").write_bytes(b"PK\x03\x04 not for us")
    return {"missing": str(tmp_path / "nope"), "corrupt": str(corrupt), "wrong_format": str(wrong),
            "pickle_dir": str(torch_pickle)}


def test_bad_model_or_output_fails_fast(tmp_path, good_model, capsys):
    images = tmp_path / "images"
    _write(images / "a.jpg", face_jpeg("happy", 0))
    for kind, model in _bad_models(tmp_path, good_model).items():
        out = tmp_path / f"out-{kind}"
        rc = label.main(["--input", str(images), "--model", model, "--output", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2, kind
        assert len(err.splitlines()) == 1 and "--model" in err, (kind, err)
        assert not out.exists(), kind  # nothing written, nothing read
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc = label.main(["--input", str(images), "--model", good_model, "--output", str(blocker / "sub")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not writable" in err
    rc = label.main(["--input", str(tmp_path / "missing"), "--model", good_model, "--output", str(tmp_path / "o")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = label.main(["--input", str(images), "--model", good_model, "--output", str(tmp_path / "o"), "--date", "May 1"])
    assert rc == 2 and "YYYY-MM-DD" in capsys.readouterr().err


def test_unwritable_s3_output_fails_fast(s3_bucket, good_model, tmp_path, capsys):
    rc = label.main(["--input", str(tmp_path), "--model", good_model, "--output", f"s3://{s3_bucket}-nope/labels"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not writable" in err


def test_print_ddl(good_model, capsys):
    assert label.main(["--print-ddl", "--model", good_model, "--output", "s3://lake/labels"]) == 0
    ddl = capsys.readouterr().out
    assert "CREATE EXTERNAL TABLE" in ddl and "PARTITIONED BY (`dt` string)" in ddl
    assert "`prob_angry` float" in ddl and "`prob_sad` float" in ddl and "prob_fear" not in ddl
    assert "LOCATION 's3://lake/labels/'" in ddl


def test_cli_exit_code_and_one_line_error(tmp_path):
    """The real CLI entry point: bad --model -> exit 2 with a single-line error."""
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.label", "--input", str(tmp_path), "--model", str(tmp_path / "none"),
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jobs.label: error: --model:"), proc.stderr

