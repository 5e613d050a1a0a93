"""jobs.compare on a Kaggle-style .zip (extra top-level folder, one broken and one empty image):
two models on the same split, one table, unreadable images skipped and reported."""

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
    for word in ("model", "accuracy", "macro-F1", "params", "train time", "images/s", "cnn", "emonet"):
        assert word in table
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["model"] for r in rows] == ["cnn", "emonet"]
    assert rows[0]["params"] == 77_015 - 5 * 257  # the Keras CNN with a 2-class head
    assert all(r["eval_split"] == "test" and 0 <= r["accuracy"] <= 1 and r["images_per_s"] > 0 for r in rows)
    runs = [json.loads((out / f"compare-{m}" / "metrics.json").read_text()) for m in ("cnn", "emonet")]
    assert runs[0]["data"]["source"] == "zip"
    assert runs[0]["data"]["fingerprint"] == runs[1]["data"]["fingerprint"]
    assert sorted(s["path"] for s in runs[0]["skipped_images"]) == ["test/surprise/empty.png", "train/happy/broken.jpg"]
    assert runs[0]["test"]["num_samples"] == 24  # 12 per class; the empty file is not counted


def test_compare_rejects_unknown_model(tmp_path, capsys):
    assert compare.main(["--data", str(tmp_path), "--models", "cnn,nope"]) == 2
    assert "unknown model(s) nope" in capsys.readouterr().err
