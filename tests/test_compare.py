"""jobs.compare on a Kaggle-style .zip (extra top-level folder, one broken and one empty image):
two models on the same split, one table (per-class recall, training and labelling images/s), the
validation-accuracy-vs-minutes plot, unreadable images skipped and reported."""

from __future__ import annotations

import io
import json
import zipfile

from jobs import compare


def test_compare_two_models_on_a_zip(ray_session, synthetic_data, tmp_path, capsys):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(synthetic_data.rglob("*.jpg")):
            if path.parent.name in ("happy", "surprise"):
                zf.write(path, f"images/{path.relative_to(synthetic_data).as_posix()}")
        zf.writestr("images/train/happy/broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
        zf.writestr("images/test/surprise/empty.png", b"")
    data = tmp_path / "archive.zip"
    data.write_bytes(buf.getvalue())
    out = tmp_path / "cmp"
    rc = compare.main(["--data", str(data), "--models", "cnn,emonet", "--output", str(out),
                       "--epochs", "1", "--batch-size", "32", "--max-failures", "0"])
    assert rc == 0
    text = capsys.readouterr().out
    table = text[text.index("[compare] results"):]
    for word in ("model", "accuracy", "macro-F1", "recall happy", "recall surprise", "params", "train time",
                 "train img/s", "label img/s", "cnn", "emonet"):
        assert word in table
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["model"] for r in rows] == ["cnn", "emonet"]
    assert rows[0]["params"] == 77_015 - 5 * 257  # the Keras CNN with a 2-class head
    assert all(r["eval_split"] == "test" and 0 <= r["accuracy"] <= 1 and r["images_per_s"] > 0 for r in rows)
    for r in rows:  # the labelling path ran on the 24 readable test images (the empty one is skipped)
        assert r["label_images"] == 24 and len(r["label_images_per_s_runs"]) == 3 and r["label_images_per_s"] > 0
        assert set(r["recall"]) == {"happy", "surprise"} and all(0 <= v <= 1 for v in r["recall"].values())
    md = (out / "comparison.md").read_text().splitlines()
    assert md[0].startswith("| model | accuracy | macro-F1 | recall happy | recall surprise | params")
    assert md[2].startswith("| cnn |") and md[3].startswith("| emonet |")
    png = (out / "val_accuracy_vs_minutes.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    runs = [json.loads((out / f"compare-{m}" / "metrics.json").read_text()) for m in ("cnn", "emonet")]
    assert runs[0]["data"]["source"] == "zip"
    assert runs[0]["data"]["fingerprint"] == runs[1]["data"]["fingerprint"]
    assert sorted(s["path"] for s in runs[0]["skipped_images"]) == ["test/surprise/empty.png", "train/happy/broken.jpg"]
    assert runs[0]["test"]["num_samples"] == 24  # 12 per class; the empty file is not counted


def test_compare_rejects_unknown_model(tmp_path, capsys):
    assert compare.main(["--data", str(tmp_path), "--models", "cnn,nope"]) == 2
    assert "unknown model(s) nope" in capsys.readouterr().err
