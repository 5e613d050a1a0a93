"""Dataset discovery and splitting for jobs.train (no Ray): local folder, .zip with an extra
top-level folder, S3 prefix, aliases, carved stratified split, and every data error."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from jobs._train_data import DataError, discover, stratified_split


def _img(path: Path, data: bytes = b"\xff\xd8fake") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _layout(root: Path, spec: dict[str, dict[str, int]]) -> Path:
    for split, classes in spec.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _img(root / split / cls / f"{i:03d}.jpg")
    return root


def test_local_folder_with_test_split_and_aliases(tmp_path):
    root = _layout(
        tmp_path / "d",
        {"train": {"Happiness": 10, "sadness": 6, "3_angry": 4}, "test": {"happy": 2, "sad": 2, "angry": 1}},
    )
    (root / "train" / "Happiness" / "notes.txt").write_text("not an image, ignored")
    (root / ".DS_Store").write_bytes(b"x")
    s = discover(str(root), val_fraction=0.25, seed=1)
    assert s.classes == ["angry", "happy", "sad"]  # canonical FER order, aliases mapped
    assert (len(s.train) + len(s.validation), len(s.test)) == (20, 5)
    assert s.val_source == "carved" and s.eval_split == "test"
    counts = s.counts()
    assert counts["validation"] == {"angry": 1, "happy": 2, "sad": 2}  # stratified, round(0.25 n)
    # deterministic and recorded
    again = discover(str(root), val_fraction=0.25, seed=1)
    assert [it.rel for it in again.validation] == [it.rel for it in s.validation]
    assert again.fingerprint == s.fingerprint
    assert len(s.split_record()["validation_files"]) == 5
    other = discover(str(root), val_fraction=0.25, seed=2)
    assert {it.rel for it in other.validation} != {it.rel for it in s.validation}


def test_validation_folder_is_used_and_no_test_evaluates_on_validation(tmp_path):
    root = _layout(tmp_path / "d", {"train": {"happy": 3, "sad": 3}, "val": {"happy": 1, "sad": 1}})
    s = discover(f"file://{root}")
    assert s.val_source == "validation" and s.val_fraction is None
    assert (len(s.train), len(s.validation), len(s.test)) == (6, 2, 0)
    assert s.eval_split == "validation"


def test_zip_with_extra_top_level_folder(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("images/", b"")
        for split, n in (("train", 4), ("test", 2)):
            for cls in ("happy", "surprise"):
                zf.writestr(f"images/{split}/{cls}/", b"")
                for i in range(n):
                    zf.writestr(f"images/{split}/{cls}/{i}.jpg", b"\xff\xd8x")
        zf.writestr("__MACOSX/images/train/happy/._0.jpg", b"junk")
    path = tmp_path / "fer.zip"
    path.write_bytes(buf.getvalue())
    s = discover(str(path))
    assert s.source == "zip" and s.classes == ["happy", "surprise"]
    assert len(s.train) + len(s.validation) == 8 and len(s.test) == 4
    assert all("!" in it.path for it in s.test)


def test_s3_prefix(s3_bucket):
    from emotion_core.storage import s3_client

    c = s3_client()
    for split, n in (("train", 3), ("test", 1)):
        for cls in ("fear", "neutral"):
            for i in range(n):
                c.put_object(Bucket=s3_bucket, Key=f"data/fer/{split}/{cls}/{i}.png", Body=b"x")
    s = discover(f"s3://{s3_bucket}/data/fer")
    assert s.source == "s3" and s.classes == ["fear", "neutral"]
    assert len(s.train) + len(s.validation) == 6 and len(s.test) == 2
    assert s.test[0].path.startswith(f"s3://{s3_bucket}/data/fer/test/")


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"test": {"happy": 2}}, "no train/ split"),
        ({}, "found no images at all"),
        ({"train": {"happy": 2, "sad": 0}}, "class folder(s) with no images: train/sad"),
        ({"train": {"happy": 2, "grumpy": 2}}, "unknown emotion class 'grumpy'"),
        ({"train": {"happy": 2}, "test": {"sad": 1}}, "class 'sad' appears in test/ but not in train/"),
    ],
)
def test_data_errors(tmp_path, layout, message):
    root = _layout(tmp_path / "d", layout)
    root.mkdir(exist_ok=True)
    with pytest.raises(DataError) as e:
        discover(str(root))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_folder_and_bad_zip(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        discover(str(tmp_path / "nope"))
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .zip"):
        discover(str(bad))


def test_stratified_split_keeps_rare_classes():
    from jobs._train_data import Item

    items = [Item(f"p{i}", f"train/a/{i}", 0) for i in range(50)] + [Item(f"q{i}", f"train/b/{i}", 1) for i in range(3)]
    items.append(Item("r", "train/c/only", 2))
    train, val = stratified_split(items, 0.1, seed=0)
    by = lambda xs, k: sum(it.label == k for it in xs)  # noqa: E731
    assert (by(val, 0), by(val, 1), by(val, 2)) == (5, 1, 0)  # >= 1 for 2+ images, never all
    assert len(train) + len(val) == len(items)
