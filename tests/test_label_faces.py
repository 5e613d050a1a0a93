"""Labelling per face with the real job (jobs.label, default --faces auto): one row per face keyed
by (image_uri, face_index), boxes where the faces are, a face-less photo as one row without a
label, face crops classified whole, error rows; incremental re-runs carry an image's face rows
together and relabel them when the detector changes. The local and S3 datasets come from
tests.helpers.real_labels (shared with the query and report tests)."""

from __future__ import annotations

import json
import shutil

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from bench.faces_bench import iou
from emotion_core.storage import filesystem
from jobs import label
from tests.helpers import DATES, real_labels

DAY = DATES[-1]


@pytest.fixture(scope="module")
def labels(tmp_path_factory, s3_server, ray_session):
    return real_labels(tmp_path_factory, s3_server, ray_session)


def partition(uri: str, day: str = DAY):
    fs, path = filesystem(uri)
    return ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table(
        filter=ds.field("dt") == day).drop_columns(["dt"])


def rows_of(table, name: str) -> list[dict]:
    mine = table.filter(pc.ends_with(table["image_uri"], "/" + name))
    return sorted(mine.to_pylist(), key=lambda r: (r["face_index"] is None, r["face_index"]))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_one_row_per_face(labels, where):
    t = partition(labels[where])
    assert t.num_rows == labels["rows"]
    keys = list(zip(t["image_uri"].to_pylist(), t["face_index"].to_pylist()))
    assert len(set(keys)) == len(keys)  # (image_uri, face_index) is the key

    group = rows_of(t, "group.jpg")
    assert [r["face_index"] for r in group] == [0, 1]
    assert all(r["faces_in_image"] == 2 and r["face_detector"] == "yunet" and r["label"] and r["error"] is None
               and (r["width"], r["height"]) == (1280, 960) for r in group)
    assert sorted(r["face_score"] for r in group)[0] > 0.5
    for known in labels["scenes"]["group.jpg"]:  # each pasted face is found where it was put
        assert max(iou(known, (r["face_x"], r["face_y"], r["face_w"], r["face_h"])) for r in group) >= 0.3

    [empty] = rows_of(t, "empty_room.jpg")  # no face: one row, no label, no error
    assert (empty["face_index"], empty["faces_in_image"], empty["label"], empty["confidence"], empty["error"]) == \
        (None, 0, None, None, None)
    assert empty["face_detector"] == "yunet" and empty["width"] == 1280

    [crop] = rows_of(t, "happy_0.jpg")  # a 48x48 face crop: classified whole (auto -> none)
    assert (crop["face_index"], crop["faces_in_image"], crop["face_detector"]) == (0, 1, "none")
    assert (crop["face_x"], crop["face_y"], crop["face_w"], crop["face_h"], crop["face_score"]) == (0, 0, 48, 48, 1.0)

    [broken] = rows_of(t, "truncated.jpg")
    assert broken["error"].startswith("truncated") and broken["face_index"] is None
    assert broken["faces_in_image"] is None and broken["face_detector"] is None


def test_incremental_rerun_carries_faces_and_a_new_detector_relabels(labels, tmp_path):
    out = str(tmp_path / "labels")
    shutil.copytree(labels["local"], out)
    before = partition(out)
    day = "2026-11-21"

    def run(run_id: str, *extra: str) -> dict:
        rc = label.main(["--input", labels["inputs"], "--model", labels["model"], "--output", out, "--date", day,
                         "--actors", "1", "--incremental", "--run-id", run_id, *extra])
        assert rc == 0
        return json.loads((tmp_path / "labels" / "_runs" / f"{run_id}.json").read_text())

    # Nothing changed: every image's rows (all its faces) are carried, none relabelled.
    s = run("carry")
    assert (s["processed"], s["skipped"], s["rows"], s["faces"]) == (0, labels["images"], labels["rows"],
                                                                     labels["faces"])
    after = partition(out, day)
    cols = ["image_uri", "face_index", "face_x", "face_y", "face_w", "face_h", "label", "run_id"]
    order = [("image_uri", "ascending"), ("face_index", "ascending")]
    assert after.select(cols).sort_by(order).to_pylist() == before.select(cols).sort_by(order).to_pylist()

    # The same date again with --faces none: the photos (detected by yunet) are relabelled whole,
    # the crops and broken images are carried; the partition is replaced, not appended to.
    s = run("whole", "--faces", "none")
    assert s["processed"] == 2 and s["skipped"] == labels["images"] - 2
    t = partition(out, day)
    assert t.num_rows == labels["images"]
    [group] = rows_of(t, "group.jpg")
    assert (group["face_index"], group["face_detector"], group["face_w"], group["faces_in_image"]) == \
        (0, "none", 1280, 1)


def test_unknown_detector_is_a_usage_error(labels, tmp_path, capsys):
    rc = label.main(["--input", labels["inputs"], "--model", labels["model"], "--output", str(tmp_path / "o"),
                     "--faces", "mtcnn"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--faces" in err[0] and "yunet" in err[0]


def test_labeller_honours_an_rgb_256_model(tmp_path):
    """A model trained at --image-size 256 --channels 3 (the seeds' photo datasets) is fed 256x256
    RGB face crops by the labelling actor; a 48x48 face crop is smaller than its input, so under
    auto it is classified whole (upscaled), a photo goes through the detector."""
    from emotion_core.checkpoint import load_manifest
    from jobs._label_infer import Labeller, image_rows
    from tests.helpers import face_jpeg, save_untrained_model, write_scene_photos

    model, _ = save_untrained_model(tmp_path / "model", classes=("happy", "sad"), img_size=256, in_chans=3)
    manifest = load_manifest(model)
    assert (manifest.input_spec.size, manifest.input_spec.channels) == (256, 3)
    photos = write_scene_photos(tmp_path / "photos")
    datas = [(tmp_path / "photos" / "group.jpg").read_bytes(), face_jpeg("happy", 3)]
    n = len(datas)
    labeller = Labeller(model, manifest.version, manifest.weights_sha256, {"model_name": "cnn", "model_version":
                        manifest.version, "run_id": "t"}, out_dir=str(tmp_path), faces="auto", jit=False)
    rows = labeller.label_images(image_rows({"image_uri": ["group.jpg", "crop.jpg"], "shard_uri": [None] * n,
                                             "shard_member": [None] * n, "etag": [None] * n,
                                             "size_bytes": [None] * n, "last_modified": [None] * n,
                                             "error": [None] * n}), datas).to_pylist()
    assert [(r["image_uri"], r["face_index"], r["face_detector"]) for r in rows] == \
        [("group.jpg", 0, "yunet"), ("group.jpg", 1, "yunet"), ("crop.jpg", 0, "none")]
    assert all(r["label"] in ("happy", "sad") and r["error"] is None for r in rows)
    assert len(photos["group.jpg"]) == 2
