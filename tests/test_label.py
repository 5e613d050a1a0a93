"""jobs.label end to end on real local Ray (the shared ``ray_session``) and moto's S3 server:
images in S3 -> Parquet in S3 read back with DuckDB; odd and broken images; re-runs;
incremental runs; a crashing actor; an object deleted between listing and reading."""

from __future__ import annotations

import io
import json
import os

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
from PIL import Image

from emotion_core import storage
from emotion_core.schema import label_schema
from jobs import label
from tests.helpers import encode, face, face_jpeg, put_tree, save_untrained_model

DATE = "2024-05-01"


def _bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def odd_images() -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, expected error reason or None when it must decode and get a label)."""
    f = face("happy", 7)
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jpeg = encode(noise, "JPEG")
    rgba = f.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((48, 48), 200, np.uint8)))
    frames = [f.convert("P"), face("sad", 8).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "bad/not_an_image.jpg": (b"this is a text file, not a picture\n" * 4, "not_an_image"),
        "bad/zero_bytes.png": (b"", "empty"),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "bad/bomb.png": (_bomb_png(), "decompression_bomb"),
        "odd/cmyk.jpg": (encode(f.convert("CMYK"), "JPEG"), None),
        "odd/gray16.png": (encode(Image.fromarray(np.asarray(f).astype(np.uint16) * 257), "PNG"), None),
        "odd/palette.png": (encode(f.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), None),
        "odd/rgba.png": (encode(rgba, "PNG"), None),
        "odd/animated.gif": (gif.getvalue(), None),
        "odd/png_named.JPG": (encode(f, "PNG"), None),  # wrong (and upper-case) extension
    }


def read_partition(output: str, date: str = DATE) -> pa.Table:
    """Read a committed partition through emotion_core.storage (works for S3 and local)."""
    fs, path = storage.filesystem(storage.join(output, f"dt={date}"))
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def run_label(*argv: str) -> dict:
    """jobs.label.main in-process on the shared Ray; returns the run summary."""
    args = list(argv)
    assert label.main(args) == 0
    output = args[args.index("--output") + 1]
    run_id = args[args.index("--run-id") + 1]
    return json.loads(storage.read_bytes(storage.join(output, "_runs", f"{run_id}.json")))


# ---------------------------------------------------------------------------------------------
# End to end


def test_s3_images_to_s3_parquet_with_odd_and_broken_images(ray_session, s3_bucket, tmp_path):
    classes = ["angry", "happy", "surprise"]  # a 3-class model, stored in S3 too
    model, manifest = save_untrained_model(f"s3://{s3_bucket}/models/m1", classes)
    files = {f"faces/{c}/{i}.jpg": face_jpeg(c, i) for c in ("happy", "sad") for i in range(6)}
    files["faces/deep/er/still.jpeg"] = face_jpeg("fear", 99)
    files["faces/readme.txt"] = b"not listed"
    odd = odd_images()
    files.update({f"faces/{k}": v for k, (v, _) in odd.items()})
    put_tree(f"s3://{s3_bucket}/in", files)
    output = f"s3://{s3_bucket}/lake/labels"

    s = run_label("--input", f"s3://{s3_bucket}/in/faces", "--model", model, "--output", output,
                  "--date", DATE, "--run-id", "e2e", "--actors", "1", "--block-rows", "8")

    table = read_partition(output)
    assert table.schema == label_schema(classes)  # exactly the documented schema (dt is the directory)
    con = duckdb.connect()
    con.register("labels", table)
    n, distinct = con.execute("select count(*), count(distinct image_uri) from labels").fetchone()
    images = {f"s3://{s3_bucket}/in/{k}" for k in files if not k.endswith(".txt")}
    assert n == distinct == len(images)
    assert set(table["image_uri"].to_pylist()) == images
    bad_sum = con.execute(
        "select count(*) from labels where error is null and abs(prob_angry + prob_happy + prob_surprise - 1) > 1e-4"
    ).fetchone()[0]
    assert bad_sum == 0
    ok_rows = con.execute(
        "select count(*) from labels where error is null and label in ('angry','happy','surprise') "
        "and confidence = greatest(prob_angry, prob_happy, prob_surprise) and width > 0 and height > 0"
    ).fetchone()[0]
    assert ok_rows == len(images) - sum(1 for _, r in odd.values() if r)
    by_uri = {r["image_uri"].rsplit("/faces/", 1)[1]: r for r in table.to_pylist()}
    for name, (_, reason) in odd.items():
        row = by_uri[name]
        if reason is None:
            assert row["error"] is None and row["label"] in classes, (name, row["error"])
        else:
            assert row["error"].startswith(reason + ":"), (name, row["error"])
            assert row["label"] is None and row["confidence"] is None and row["prob_happy"] is None
    assert by_uri["odd/gray16.png"]["width"] == 48
    assert set(table["model_version"].to_pylist()) == {manifest.version}
    assert set(table["model_name"].to_pylist()) == {"cnn"} and set(table["run_id"].to_pylist()) == {"e2e"}
    assert table["etag"].null_count == 0 and table["last_modified"].null_count == 0
    # the run summary, next to the data
    assert s["rows"] == s["processed"] == len(images) and s["skipped"] == 0
    assert s["error_rows"] == 4 and s["errors"] == {
        "decompression_bomb": 1,
        "empty": 1,
        "not_an_image": 1,
        "truncated": 1,
    }
    assert sum(s["labels"].values()) == len(images) - 4
    assert s["model"]["version"] == manifest.version and s["files"] and s["images_per_s"] > 0
    assert s["files"] == [f"{output}/dt={DATE}/part-e2e-{i:05d}.parquet" for i in range(s["work_units"])]
    assert s["driver_peak_rss_mb"] > 0 and set(s["seconds"]) >= {"list", "plan", "label_write", "commit"}


def test_rerun_is_idempotent_and_incremental_skips_unchanged(ray_session, tmp_path):
    model, manifest = save_untrained_model(str(tmp_path / "model"), ["happy", "sad"])  # 2 classes
    src = str(tmp_path / "images")
    put_tree(src, {f"{i:02d}.png": encode(face("happy", i), "PNG") for i in range(8)})
    put_tree(src, {"broken.jpg": face_jpeg("sad", 1)[:100]})
    out = str(tmp_path / "labels")
    common = ["--input", src, "--model", model, "--output", out, "--actors", "1"]

    s1 = run_label(*common, "--date", DATE, "--run-id", "r1")
    s2 = run_label(*common, "--date", DATE, "--run-id", "r2")  # same date again: replaces
    t = read_partition(out)
    assert t.num_rows == 9 and len(set(t["image_uri"].to_pylist())) == 9
    assert set(t["run_id"].to_pylist()) == {"r2"} and s1["rows"] == s2["rows"] == 9
    assert sorted(os.listdir(os.path.join(out, f"dt={DATE}"))) == ["_SUCCESS"] + [
        f"part-r2-{i:05d}.parquet" for i in range(s2["work_units"])]

    # The bucket changes: two new images, one rewritten, one deleted; the broken one is still broken.
    put_tree(src, {"new1.png": encode(face("sad", 50), "PNG"), "sub/new2.jpg": face_jpeg("sad", 51)})
    changed = os.path.join(src, "03.png")
    put_tree(src, {"03.png": encode(face("sad", 3), "PNG")})
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000))
    os.remove(os.path.join(src, "00.png"))

    s3 = run_label(*common[:-2], "--date", "2024-05-02", "--run-id", "r3", "--incremental",
                   "--min-actors", "1", "--max-actors", "2")  # an autoscaling pool works too
    assert (s3["processed"], s3["skipped"], s3["rows"]) == (3, 7, 10)  # the broken image is data: carried
    t = read_partition(out, "2024-05-02")
    rows = {os.path.relpath(r["image_uri"], src): r for r in t.to_pylist()}
    assert len(rows) == t.num_rows == 10  # a complete snapshot, exactly once
    assert "00.png" not in rows  # no longer listed: it drops out of the snapshot
    assert {k for k, r in rows.items() if r["run_id"] == "r3"} == {"new1.png", "sub/new2.jpg", "03.png"}
    assert all(r["run_id"] == "r2" for k, r in rows.items() if k not in {"new1.png", "sub/new2.jpg", "03.png"})
    assert rows["broken.jpg"]["error"].startswith("truncated")
    assert t.schema == label_schema(["happy", "sad"])
    assert read_partition(out).num_rows == 9  # the older partition is untouched
    # (Nothing changed -> everything carried, and an incremental run of the same date replacing the
    # partition: tests/test_label_faces.py, per face.)


def _kill_when(predicate, class_fragment: str, timeout: float = 300.0) -> dict:
    """In a thread: find a live actor whose class name contains ``class_fragment`` (its pid from
    Ray's State API), then SIGKILL it as soon as ``predicate()`` holds. Returns a dict the caller
    reads afterwards (``pid``, and ``at``: what the predicate returned at the kill)."""
    import signal
    import threading
    import time

    import ray
    from ray.util.state import list_actors

    seen: dict = {}
    address = ray.get_runtime_context().gcs_address  # this session's Ray, even with others on the machine

    def watch():
        deadline = time.monotonic() + timeout
        pid = None
        while time.monotonic() < deadline and pid is None:
            pid = next((a.pid for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True)
                        if class_fragment in (a.class_name or "") and a.pid), None)
            time.sleep(0.05)
        while pid is not None and time.monotonic() < deadline:
            at = predicate()
            if at:
                os.kill(pid, signal.SIGKILL)
                seen.update(pid=pid, at=at)
                return
            time.sleep(0.005)

    def run():
        try:
            watch()
        except Exception as e:  # surfaced by the caller's assertion
            seen["error"] = repr(e)

    threading.Thread(target=run, daemon=True).start()
    return seen


def test_actor_killed_mid_run_loses_and_duplicates_nothing(ray_session, s3_bucket, tmp_path):
    """A labelling actor is SIGKILLed after it wrote some units: Ray restarts it and retries the
    unit it was on, which rewrites its own file. Every image is in the partition exactly once."""
    model, _ = save_untrained_model(str(tmp_path / "model"), ["fear", "neutral", "surprise"])
    src = f"s3://{s3_bucket}/in"
    put_tree(src, {f"{c}/{i}.jpg": face_jpeg(c, i) for c in ("fear", "neutral", "surprise") for i in range(60)})
    out = str(tmp_path / "labels")
    done = os.path.join(out, "_staging", "crash", "out")
    killed = _kill_when(lambda: os.path.isdir(done) and len(os.listdir(done)) or 0, "Labeller")
    s = run_label("--input", src, "--model", model, "--output", out, "--date", DATE, "--run-id", "crash",
                  "--actors", "2", "--unit-rows", "6", "--fetch-threads", "1")
    assert killed.get("pid"), f"no actor was killed: {killed}"
    assert killed["at"] < s["work_units"], "the kill came after the last unit: nothing was retried"
    t = read_partition(out)
    assert t.num_rows == 180 and len(set(t["image_uri"].to_pylist())) == 180
    assert t["error"].null_count == 180 and s["rows"] == 180


def test_driver_killed_then_resumed_commits_once_and_relabels_only_unfinished_units(ray_session, s3_bucket,
                                                                                     tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import ray

    model, _ = save_untrained_model(str(tmp_path / "model"), ["happy", "sad"])
    src = f"s3://{s3_bucket}/in"
    put_tree(src, {f"{i:03d}.jpg": face_jpeg("happy", i) for i in range(120)})
    out = str(tmp_path / "labels")
    argv = ["--input", src, "--model", model, "--output", out, "--date", DATE, "--run-id", "resume",
            "--actors", "1", "--unit-rows", "10", "--fetch-threads", "1"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.label", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = os.path.join(out, "_staging", "resume", "out")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (os.path.isdir(done) and len(os.listdir(done)) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the driver dies mid-run, as kill -9 would
    proc.wait()
    finished = {f for f in os.listdir(done) if f.endswith(".parquet")}
    assert 2 <= len(finished) < 12, finished
    assert not os.path.exists(os.path.join(out, f"dt={DATE}"))  # nothing committed
    s = run_label(*argv)
    assert s["units_already_done"] >= len(finished) and s["processed"] == 120
    t = read_partition(out)
    assert t.num_rows == 120 and len(set(t["image_uri"].to_pylist())) == 120


def test_packed_shards_give_one_row_per_member_and_carry_whole_shards(ray_session, s3_bucket, tmp_path):
    from emotion_core import shards

    model, _ = save_untrained_model(str(tmp_path / "model"), ["happy", "sad"])
    members = [(f"faces/{c}/{i}.jpg", face_jpeg(c, i)) for c in ("happy", "sad") for i in range(5)]
    members.append(("faces/broken.jpg", face_jpeg("sad", 9)[:60]))
    odd = "odd #1?.tar"  # keys may hold '#', '?' and spaces
    put_tree(f"s3://{s3_bucket}/packed", {
        "a.tar": shards.write_webdataset(members),
        odd: shards.write_webdataset(members[:3]),
        "b.parquet": shards.write_parquet_shard(members),
    })
    out = f"s3://{s3_bucket}/labels"
    common = ["--input", f"s3://{s3_bucket}/packed/", "--model", model, "--output", out, "--actors", "1"]
    s = run_label(*common, "--date", DATE, "--run-id", "p1")
    t = read_partition(out)
    assert t.num_rows == s["rows"] == 11 + 3 + 11 and len(set(t["image_uri"].to_pylist())) == t.num_rows
    by_shard: dict = {}
    for r in t.to_pylist():
        by_shard.setdefault(r["shard_uri"], []).append(r)
        assert shards.split_member_uri(r["image_uri"])[:2] == (r["shard_uri"], r["shard_member"])
    assert set(by_shard) == {f"s3://{s3_bucket}/packed/{k}" for k in ("a.tar", odd, "b.parquet")}
    broken = [r for r in t.to_pylist() if r["shard_member"].endswith("broken.jpg")]
    assert len(broken) == 2 and all(r["error"] and r["label"] is None for r in broken)
    # unchanged shards are carried whole; a rewritten one is labelled again
    put_tree(f"s3://{s3_bucket}/packed", {odd: shards.write_webdataset(members[:4])})
    s2 = run_label(*common, "--date", "2024-05-02", "--run-id", "p2", "--incremental")
    assert (s2["processed"], s2["skipped"], s2["rows"]) == (4, 22, 26)


def test_object_deleted_between_inventory_and_read(ray_session, s3_bucket, tmp_path):
    """An S3 Inventory style manifest lists an object that is gone by the time it is read."""
    model, _ = save_untrained_model(str(tmp_path / "model"), ["neutral", "sad"])
    put_tree(f"s3://{s3_bucket}", {f"faces/{i}.jpg": face_jpeg("sad", i) for i in range(4)})
    inventory = tmp_path / "inventory.csv"
    inventory.write_text(
        "".join(f'"{s3_bucket}","faces/{i}.jpg","1","2024-05-01T00:00:00.000Z","x"\n' for i in range(5))
    )
    storage.s3_client().delete_object(Bucket=s3_bucket, Key="faces/2.jpg")
    out = f"s3://{s3_bucket}/labels"
    s = run_label("--manifest", str(inventory), "--model", model, "--output", out, "--date", DATE,
                  "--run-id", "gone", "--actors", "1", "--max-error-fraction", "0.5")
    t = read_partition(out)
    errors = dict(zip(t["image_uri"].to_pylist(), t["error"].to_pylist()))
    assert len(errors) == 5
    assert errors[f"s3://{s3_bucket}/faces/2.jpg"].startswith("not_found")
    assert errors[f"s3://{s3_bucket}/faces/4.jpg"].startswith("not_found")  # never existed
    assert sum(e is None for e in errors.values()) == 3
    # the etag of a row is the one actually read, not the inventory's stale one
    assert "x" not in {e for u, e in zip(t["image_uri"].to_pylist(), t["etag"].to_pylist()) if errors[u] is None}
    assert s["errors"] == {"not_found": 2}


def test_empty_input_commits_an_empty_partition(ray_session, tmp_path):
    model, _ = save_untrained_model(str(tmp_path / "model"), ["happy", "sad"])
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "labels")
    s = run_label("--input", str(tmp_path / "empty"), "--model", model, "--output", out, "--date", DATE,
                  "--run-id", "none")
    t = read_partition(out)
    assert t.num_rows == 0 == s["rows"] and t.schema == label_schema(["happy", "sad"])


def test_poison_image_is_isolated_as_an_error_row(tmp_path):
    """An image that kills its worker every time (here a PNG whose decode calls os._exit, through a
    test-only sitecustomize on the cluster's PYTHONPATH) exhausts the actor's retries; the job then
    splits the unfinished unit until the poison image is alone, writes it as a worker_crashed row,
    and labels everything else. The job runs in its own embedded Ray (subprocess) so that only its
    workers carry the poison."""
    import subprocess
    import sys

    from PIL.PngImagePlugin import PngInfo

    model, _ = save_untrained_model(str(tmp_path / "model"), ["happy", "sad"])
    src = str(tmp_path / "images")
    put_tree(src, {f"{i:02d}.jpg": face_jpeg("happy", i) for i in range(12)})
    info = PngInfo()
    info.add_text("poison", "1")
    put_tree(src, {"07-poison.png": encode(face("sad", 1), "PNG", pnginfo=info)})
    out = str(tmp_path / "labels")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([repo, os.path.join(repo, "tests", "poison_site")])
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.label", "--input", src, "--model", model, "--output", out, "--date", DATE,
         "--run-id", "poison", "--actors", "1", "--max-retries", "1", "--unit-rows", "7"],
        env=env, capture_output=True, text=True, timeout=900, cwd=repo,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "in isolation" in proc.stdout
    rows = {os.path.basename(r["image_uri"]): r for r in read_partition(out).to_pylist()}
    assert len(rows) == 13
    assert rows["07-poison.png"]["error"].startswith("worker_crashed") and rows["07-poison.png"]["label"] is None
    assert all(r["error"] is None and r["label"] for k, r in rows.items() if k != "07-poison.png")
