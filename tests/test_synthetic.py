"""Synthetic faces: determinism (byte-identical trees), layout for class subsets and splits,
decodability through the shared preprocessing, and the CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from emotion_core.labels import CANONICAL
from emotion_core.preprocess import InputSpec, decode_image
from emotion_core.synthetic import generate_dataset, image_rng, main, render_face


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _layout(root: Path) -> dict[str, dict[str, int]]:
    return {
        split.name: {cls.name: len(list(cls.glob("*.jpg"))) for cls in sorted(split.iterdir())}
        for split in sorted(root.iterdir())
    }


def test_same_seed_gives_byte_identical_tree(tmp_path):
    a = generate_dataset(tmp_path / "a", train_per_class=6, test_per_class=2, seed=7)
    b = generate_dataset(tmp_path / "b", train_per_class=6, test_per_class=2, seed=7)
    assert a == b == {"train": 42, "test": 14}
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    generate_dataset(tmp_path / "c", train_per_class=6, test_per_class=2, seed=8)
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


@pytest.mark.parametrize(
    "classes,expected",
    [
        (["happy", "sad"], ["happy", "sad"]),
        (["Surprised", "anger", "happiness"], ["angry", "happy", "surprise"]),
        (
            ["sad", "fear", "neutral", "happy", "surprise", "angry"],
            ["angry", "fear", "happy", "neutral", "sad", "surprise"],
        ),
    ],
    ids=["2", "3-aliases", "6"],
)
def test_class_subsets_layout(tmp_path, classes, expected):
    counts = generate_dataset(tmp_path, train_per_class=3, test_per_class=1, classes=classes)
    assert counts == {"train": 3 * len(expected), "test": len(expected)}
    assert _layout(tmp_path) == {"test": dict.fromkeys(expected, 1), "train": dict.fromkeys(expected, 3)}
    assert sorted(p.name for p in (tmp_path / "train" / expected[0]).iterdir()) == [
        "00000.jpg",
        "00001.jpg",
        "00002.jpg",
    ]


def test_images_do_not_depend_on_which_others_are_generated(tmp_path):
    generate_dataset(tmp_path / "all", train_per_class=2, test_per_class=0, seed=3)
    generate_dataset(tmp_path / "two", train_per_class=2, test_per_class=0, classes=["sad", "happy"], seed=3)
    for name in ("00000.jpg", "00001.jpg"):
        assert (tmp_path / "all/train/sad" / name).read_bytes() == (
            tmp_path / "two/train/sad" / name
        ).read_bytes()


def test_other_splits(tmp_path):
    counts = generate_dataset(
        tmp_path, train_per_class=2, test_per_class=1, classes=["neutral"], splits=("train", "validation")
    )
    assert counts == {"train": 2, "validation": 1}
    assert _layout(tmp_path) == {"train": {"neutral": 2}, "validation": {"neutral": 1}}


def test_images_are_48px_grayscale_jpegs_that_decode(tmp_path):
    generate_dataset(tmp_path, train_per_class=1, test_per_class=0, seed=0)
    files = sorted((tmp_path / "train").rglob("*.jpg"))
    assert len(files) == len(CANONICAL)
    for path in files:
        data = path.read_bytes()
        assert data[:3] == b"\xff\xd8\xff"
        pixels, w, h = decode_image(data, InputSpec())
        assert (w, h) == (48, 48) and pixels.shape == (1, 48, 48)
        assert pixels.std() > 5  # not a blank image


def test_classes_differ_and_render_face_is_deterministic():
    faces = {c: np.asarray(render_face(c, image_rng(0, "train", c, 0)), dtype=np.float32) for c in CANONICAL}
    again = np.asarray(render_face("happy", image_rng(0, "train", "happy", 0)))
    np.testing.assert_array_equal(faces["happy"], again)
    im = render_face("happiness", np.random.default_rng(1), size=64)
    assert im.mode == "L" and im.size == (64, 64)
    # class means over a few faces differ (expression signal exists, beyond per-face noise)
    means = {
        c: np.mean([np.asarray(render_face(c, image_rng(1, "t", c, i)), np.float32) for i in range(20)], 0)
        for c in ("happy", "sad", "surprise")
    }
    assert np.abs(means["happy"] - means["sad"]).mean() > 1.0
    assert np.abs(means["surprise"] - means["sad"]).mean() > 1.0


def test_generation_is_fast(tmp_path):
    import time

    start = time.perf_counter()
    counts = generate_dataset(tmp_path, train_per_class=50, test_per_class=0)
    elapsed = time.perf_counter() - start
    assert counts["train"] == 350
    assert elapsed < 5.0, f"350 images took {elapsed:.1f}s"


def test_unknown_class_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown emotion class"):
        generate_dataset(tmp_path, classes=["happy", "bored"])
    assert (
        main(
            [
                str(tmp_path / "cli"),
                "--train-per-class",
                "2",
                "--test-per-class",
                "1",
                "--classes",
                "happy,sad",
                "--seed",
                "5",
            ]
        )
        == 0
    )
    assert "wrote 4 train, 2 test images" in capsys.readouterr().out
    assert _layout(tmp_path / "cli") == {"test": {"happy": 1, "sad": 1}, "train": {"happy": 2, "sad": 2}}
    assert main([str(tmp_path / "bad"), "--classes", "happy,bored"]) == 2
    assert "unknown emotion class 'bored'" in capsys.readouterr().err
