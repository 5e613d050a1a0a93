"""jobs.label pieces: incremental planning (Ray Data joins on the shared local Ray), the commit
protocol (footer check, intents, recovery that never wedges or rewinds a partition), fencing at
the job level, the outage guards, fail-fast argument/model/output checks and --print-ddl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from emotion_core import storage
from emotion_core.schema import label_schema
from jobs import _label_commit, _label_plan, label
from jobs._label_lock import PartitionLock
from tests.helpers import face_jpeg, save_untrained_model

CLASSES = ["happy", "sad"]


def _write(path, data: bytes = b"x") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Incremental planning


def _rows(uris, etags, version="v1", errors=None, run_id="r1", labelled_at=1_700_000_000_000, **faces):
    """Label rows; without ``faces`` columns they are rows written before faces existed."""
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
        "shard_uri": [None] * n,
        "shard_member": [None] * n,
        **faces,
    }
    return pa.table({f.name: pa.array(cols.get(f.name, [None] * n), f.type) for f in schema}, schema=schema)


def _listing_shard(path, pairs) -> str:
    n = len(pairs)
    table = pa.table({"image_uri": [u for u, _ in pairs], "etag": [e for _, e in pairs],
                      "size_bytes": pa.nulls(n, pa.int64()), "last_modified": pa.nulls(n, pa.timestamp("ms", tz="UTC")),
                      "error": pa.nulls(n, pa.string())}, schema=storage.LISTING_SCHEMA)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)
    return str(path)


def _stage(out, run_id, table, rows_per_file=2) -> list[str]:
    uris = []
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        uri = storage.join(_label_commit.staging_uri(out, run_id), "out", f"unit-{i:03d}.parquet")
        fs, path = storage.filesystem(uri)
        if not storage.is_s3(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table.slice(start, rows_per_file), path, filesystem=fs)
        uris.append(uri)
    return uris


def _commit(out, date, table, run_id, rows_per_file=2):
    return _label_commit.commit(out, date, run_id, _stage(out, run_id, table, rows_per_file), table.num_rows)


def _plan(out, stage, listing, date="2024-05-03", version="v1", engine="auto"):
    return _label_plan.make_plan([listing], 7, stage, output=out, date=date, classes=CLASSES, model_version=version,
                                 incremental=True, input_format="auto", unit_rows=3, engine=engine)


def _uris(files) -> list[str]:
    return sorted(u for f in files for u in pq.read_table(f["uri"])["image_uri"].to_pylist())


@pytest.mark.parametrize("engine", ["ray", "local"])
def test_plan_incremental_semantics(ray_session, tmp_path, engine):
    """The same plan from Ray Data's joins and from the driver-local path small runs take."""
    out, stage = str(tmp_path / "out"), str(tmp_path / "out" / "_staging" / "p")
    # day 1, then day 2: each a full snapshot. On day 2, b was relabelled by model v2, c changed
    # (etag 2), e is a broken image (decode error: data), f could not be read (transient).
    _commit(out, "2024-05-01", _rows([f"{c}.jpg" for c in "abcdef"], list("111111"), run_id="d1"), "d1")
    day2 = pa.concat_tables([
        _rows(["a.jpg"], ["1"], run_id="d1"), _rows(["b.jpg"], ["1"], version="v2", run_id="d2"),
        _rows(["c.jpg"], ["2"], run_id="d2"), _rows(["d.jpg"], ["1"], run_id="d1"),
        _rows(["e.jpg"], ["1"], errors=["truncated: x"], run_id="d2"),
        _rows(["f.jpg"], ["1"], errors=["read_failed: SlowDown"], run_id="d2"),
        # a shard whose members were labelled by different detectors: one fails the carry rule
        _rows(["tar://m1::s.tar", "tar://m2::s.tar"], ["1", "1"], run_id="d2", shard_uri=["s.tar", "s.tar"],
              face_index=[0, 0], faces_in_image=[1, 1], face_detector=["none", "yunet"]),
    ])
    _commit(out, "2024-05-02", day2, "d2")
    listing = _listing_shard(tmp_path / "listing.parquet",
                             [(f"{c}.jpg", e) for c, e in zip("abcdefg", "1129111")] + [("s.tar", "1")])
    plan = _plan(out, stage, listing, engine=engine)
    assert plan.previous == "2024-05-02"  # the latest partition only: it is a full snapshot
    # a: unchanged -> carried; b: labelled by v2 -> redo; c: same etag as day 2 -> carried; d: etag
    # changed -> redo; e: broken image, unchanged -> carried; f: read error -> redo; g: new -> do
    # s.tar: carried whole or not at all; one member fails the rule, so the shard is labelled again
    assert _uris(plan.units) == ["b.jpg", "d.jpg", "f.jpg", "g.jpg", "s.tar"] and plan.todo_rows == 5
    assert all(u["rows"] <= 3 for u in plan.units)  # work units of at most unit_rows
    assert pq.read_table(plan.units[0]["uri"]).column_names == [*storage.LISTING_SCHEMA.names, "format"]
    carried = pa.concat_tables([pq.read_table(c["uri"]) for c in plan.carried]).sort_by("image_uri")
    assert carried.schema == label_schema(CLASSES)
    assert carried["image_uri"].to_pylist() == ["a.jpg", "c.jpg", "e.jpg"]
    assert carried["run_id"].to_pylist() == ["d1", "d2", "d2"] and carried["etag"].to_pylist() == ["1", "2", "1"]
    # a different model version carries nothing; a run for an earlier date plans against day 1
    # (the two rules the joins rely on, checked without another pair of joins)
    assert _label_plan.carryable(day2, CLASSES, "v3").num_rows == 0
    assert _label_plan.previous_partition(out, "2024-05-01")[0] == "2024-05-01"


def test_carry_rule_follows_the_face_detector():
    """All rows of an image (one per face) are carried together, and only when the detector that
    made them is the one this run would use; rows from before faces read as whole-image face 0."""
    photo = dict(width=[640, 640, 640], height=[480, 480, 480], face_index=[0, 1, None],
                 faces_in_image=[2, 2, 0], face_detector=["yunet", "yunet", "yunet"])
    rows = pa.concat_tables([
        _rows(["p.jpg", "p.jpg", "q.jpg"], ["1", "1", "1"], **photo),  # 2 faces; q: none found
        _rows(["crop.jpg"], ["1"], face_index=[0], faces_in_image=[1], face_detector=["none"]),
        _rows(["old.jpg"], ["1"]),  # written before faces: a 48x48 whole-image label
        _rows(["bad.jpg"], ["1"], errors=["truncated: x"], width=[None], height=[None]),
    ])

    def carried(rule):
        return sorted(set(_label_plan.carryable(rows, CLASSES, "v1", rule)["image_uri"].to_pylist()))

    auto = _label_plan.FaceRule("auto", "yunet", 48)
    assert carried(auto) == ["bad.jpg", "crop.jpg", "old.jpg", "p.jpg", "q.jpg"]
    assert _label_plan.carryable(rows, CLASSES, "v1", auto).num_rows == 6
    assert carried(_label_plan.FaceRule("auto", "retinaface", 48)) == ["bad.jpg", "crop.jpg", "old.jpg"]
    assert carried(_label_plan.FaceRule("none", "none", 48)) == ["bad.jpg", "crop.jpg", "old.jpg"]
    assert carried(_label_plan.FaceRule("yunet", "yunet", 48)) == ["bad.jpg", "p.jpg", "q.jpg"]
    old = _label_plan.carryable(rows, CLASSES, "v1", auto).filter(pc.equal(pc.field("image_uri"), "old.jpg"))
    assert old.select(["face_index", "face_x", "face_w", "face_h", "faces_in_image", "face_detector"]).to_pylist() \
        == [{"face_index": 0, "face_x": 0, "face_w": 48, "face_h": 48, "faces_in_image": 1, "face_detector": "none"}]


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


def test_commit_refuses_staged_files_that_do_not_add_up(tmp_path):
    out = str(tmp_path / "out")
    _commit(out, "2024-05-01", _rows(list("ab"), list("11")), "good")
    staged = _stage(out, "dup", _rows(list("xyz"), list("111")))
    with pytest.raises(_label_commit.CommitError, match="hold 3 rows, the plan 2"):
        _label_commit.commit(out, "2024-05-01", "dup", staged, 2)  # e.g. a duplicated unit
    assert _parquet_files(tmp_path / "out" / "dt=2024-05-01") == ["part-good-00000.parquet"]


def test_crash_after_intent_is_rolled_forward_and_abandoned_staging_cleaned(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    _commit(out, "2024-05-01", _rows(list("abc"), list("111")), "old")
    staged = _stage(out, "crashy", _rows(list("de"), list("11")), 10)
    # The run dies right after writing its intent: nothing installed yet.
    monkeypatch.setattr(_label_commit, "_apply", lambda *a, **k: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        _label_commit.commit(out, "2024-05-01", "crashy", staged, 2)
    monkeypatch.undo()
    part = tmp_path / "out" / "dt=2024-05-01"
    assert _parquet_files(part) == ["part-old-00000.parquet", "part-old-00001.parquet"]  # readers: old data
    _stage(out, "died-early", _rows(["z"], ["1"]))  # a run that died before committing: no intent
    assert _label_commit.recover(out, "2024-05-09", time.time()) == ["crashy"]
    assert _parquet_files(part) == ["part-crashy-00000.parquet"]
    runs = lambda: sorted(d for d in os.listdir(tmp_path / "out" / "_staging") if not d.startswith("_"))  # noqa: E731
    assert runs() == ["died-early"]  # too young to be litter
    assert _label_commit.recover(out, "2024-05-09", time.time() + 2 * 86400) == []
    assert runs() == []


def test_recovery_never_wedges_nor_rewinds_the_table(tmp_path):
    out = str(tmp_path / "out")
    logged = []
    # 1. a broken intent: a staged file was lost before it was installed
    staged = _stage(out, "lost", _rows(list("ab"), list("11")))
    intent = {"run_id": "lost", "date": "2024-05-01", "rows": 2, "staged": staged,
              "final": [f"{out}/dt=2024-05-01/part-lost-00000.parquet"], "old": []}
    os.remove(storage.parse(staged[0]).path)
    _write(os.path.join(out, "_staging", "lost", "_COMMIT.json"), json.dumps(intent).encode())
    assert _label_commit.recover(out, "2024-05-09", time.time(), log=logged.append) == []
    assert any("moved aside" in line for line in logged)
    assert json.loads(open(os.path.join(out, "_staging", "_quarantine", "lost.json")).read())["quarantine_reason"]
    assert _label_commit.recover(out, "2024-05-09", time.time()) == []  # not retried on every run
    # 2. an intent older than the partition's _SUCCESS of a later commit is not replayed
    staged = _stage(out, "stale", _rows(["old"], ["1"]), 10)
    intent = {"run_id": "stale", "date": "2024-05-02", "rows": 1, "staged": staged,
              "final": [f"{out}/dt=2024-05-02/part-stale-00000.parquet"], "old": []}
    _write(os.path.join(out, "_staging", "stale", "_COMMIT.json"), json.dumps(intent).encode())
    time.sleep(1.1)
    _commit(out, "2024-05-02", _rows(list("xy"), list("11")), "newer")
    assert _label_commit.recover(out, "2024-05-09", time.time(), log=logged.append) == []
    assert _parquet_files(tmp_path / "out" / "dt=2024-05-02") == ["part-newer-00000.parquet"]
    assert any("older than the partition's _SUCCESS" in line for line in logged)
    # 3. an intent whose date a live run holds is left to that run
    staged = _stage(out, "busy", _rows(["b"], ["1"]), 10)
    intent = {"run_id": "busy", "date": "2024-05-03", "rows": 1, "staged": staged,
              "final": [f"{out}/dt=2024-05-03/part-busy-00000.parquet"], "old": []}
    _write(os.path.join(out, "_staging", "busy", "_COMMIT.json"), json.dumps(intent).encode())
    with PartitionLock(out, "2024-05-03", "busy"):
        assert _label_commit.recover(out, "2024-05-09", time.time(), log=logged.append) == []
    assert _label_commit.recover(out, "2024-05-09", time.time()) == ["busy"]


def test_commit_on_s3(s3_bucket):
    out = f"s3://{s3_bucket}/labels"
    _commit(out, "2024-05-01", _rows(list("abc"), list("111")), "r1")
    _commit(out, "2024-05-01", _rows(list("ab"), list("11")), "r2")
    keys = sorted(o["Key"] for o in storage.s3_client().list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == ["labels/dt=2024-05-01/_SUCCESS", "labels/dt=2024-05-01/part-r2-00000.parquet"]


# ---------------------------------------------------------------------------------------------
# Fencing and outage guards, through the job


def test_second_run_on_the_same_partition_fails_fast(tmp_path, good_model, capsys):
    images = tmp_path / "images"
    _write(images / "a.jpg", face_jpeg("happy", 0))
    out = str(tmp_path / "out")
    with PartitionLock(out, "2024-05-01", "first"):
        rc = label.main(["--input", str(images), "--model", good_model, "--output", out, "--date", "2024-05-01"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "run first is committing" in err and "--wait-for-lock" in err


def test_outage_and_empty_listing_are_not_committed(ray_session, s3_bucket, tmp_path, good_model, capsys):
    """Objects that cannot be read (an outage) abort before commit; so does a prefix that lists
    nothing where yesterday's partition had rows. A single-object URI labels that object."""
    out = f"s3://{s3_bucket}/labels"
    key = f"s3://{s3_bucket}/in/one face.jpg"
    storage.write_bytes(key, face_jpeg("sad", 1))
    assert label.main(["--input", key, "--model", good_model, "--output", out, "--date", "2024-05-01"]) == 0
    assert pq.read_table(storage.filesystem(out)[1] + "/dt=2024-05-01", filesystem=storage.filesystem(out)[0]
                         )["image_uri"].to_pylist() == [key]
    manifest = tmp_path / "objects.csv"
    manifest.write_text("uri\n" + "".join(f"s3://{s3_bucket}/in/gone-{i}.jpg\n" for i in range(4)) + key + "\n")
    rc = label.main(["--manifest", str(manifest), "--model", good_model, "--output", out, "--date", "2024-05-02"])
    err = capsys.readouterr().err
    assert rc == 1 and "4 of 5 objects could not be read" in err and "not_found 4" in err
    assert not storage.exists(f"{out}/dt=2024-05-02/_SUCCESS")
    rc = label.main(["--input", f"s3://{s3_bucket}/vanished/", "--model", good_model, "--output", out,
                     "--date", "2024-05-03"])
    err = capsys.readouterr().err
    assert rc == 1 and "list 0 objects but the previous partition has 1 rows" in err
    assert label.main(["--input", f"s3://{s3_bucket}/vanished/", "--model", good_model, "--output", out,
                       "--date", "2024-05-03", "--allow-empty"]) == 0


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
    for bad_date in ("May 1", "20240501", "2024-W18-3", "2024-02-30"):
        rc = label.main(["--input", str(images), "--model", good_model, "--output", str(tmp_path / "o"),
                         "--date", bad_date])
        assert rc == 2 and "YYYY-MM-DD" in capsys.readouterr().err, bad_date


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



def test_tta_auto_resolves_to_what_the_model_was_evaluated_with():
    from types import SimpleNamespace

    assert label.resolved_tta("auto", SimpleNamespace(training_config={"tta": "flip"})) == "flip"
    assert label.resolved_tta("auto", SimpleNamespace(training_config=None)) == "none"  # models from before --tta
    assert label.resolved_tta("none", SimpleNamespace(training_config={"tta": "flip"})) == "none"


def test_count_staged_in_the_driver_equals_the_ray_count(ray_session, tmp_path, monkeypatch):
    """Small runs count their staged rows in the driver; the Ray Data count gives the same."""
    table = pa.concat_tables([
        _rows(["a.jpg", "b.jpg", "c.jpg"], ["1", "1", "1"]),
        _rows(["e.jpg", "f.jpg"], ["1", "1"], errors=["truncated: x", "read_failed: SlowDown"]),
        _rows(["g.jpg", "g.jpg"], ["1", "1"], face_index=[0, 1], faces_in_image=[2, 2],
              face_detector=["yunet", "yunet"]),
    ])
    files = _stage(str(tmp_path / "out"), "r", table, rows_per_file=2)
    local = _label_commit.count_staged(files)
    assert (local["rows"], local["images"], local["faces"], local["error_rows"]) == (7, 6, 2, 2)
    assert local["errors"] == {"read_failed": 1, "truncated": 1}
    monkeypatch.setattr(_label_commit, "LOCAL_COUNT_FILES", 0)
    assert _label_commit.count_staged(files) == local


def test_actor_pool_is_no_larger_than_the_work():
    from ray.data import ActorPoolStrategy

    one = label.fit_pool(ActorPoolStrategy(size=4), 1)  # a 1-unit run starts one actor, not one per CPU
    assert (one.min_size, one.max_size) == (1, 1)
    scaling = label.fit_pool(ActorPoolStrategy(min_size=2, max_size=8), 3)
    assert (scaling.min_size, scaling.max_size) == (2, 3)
    enough = ActorPoolStrategy(size=2)
    assert label.fit_pool(enough, 10) is enough
