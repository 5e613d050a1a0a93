"""jobs.predict per face (through emotion_core.recognize) and --annotate (emotion_core.annotate), on
generated scenes with known boxes (bench.scenes), a real photo shipped with matplotlib and 48x48
face crops. The model is untrained (labels arbitrary, deterministic): what is tested is which faces
are found, where, how they are printed and drawn."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from bench import scenes as S
from bench.faces_bench import iou, match
from emotion_core import faces as F
from jobs import predict
from tests.helpers import face_jpeg, save_untrained_model

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
CLASSES = ("happy", "sad", "surprise")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return save_untrained_model(tmp_path_factory.mktemp("model"), CLASSES)[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory, yunet) -> dict:
    """A scene in which yunet finds exactly its 2 pasted faces, a face-less scene, a 48x48 crop."""
    root = tmp_path_factory.mktemp("photos")
    for seed in range(20):
        two = S.make_scene(np.random.default_rng([seed, 2]), S.synthetic_faces(), n_faces=2, sizes=(150, 220),
                           rotated_share=0.0)
        found = yunet.detect(F.decode_photo(two.jpeg, yunet.max_side))
        if len(two.boxes) == 2 and len(found) == 2 and len(match(two.boxes, found)) == 2:
            break
    else:
        pytest.fail("no generated 2-face scene in which yunet finds both faces")
    none = S.make_scene(np.random.default_rng(5), S.synthetic_faces(), n_faces=0)
    paths = {"two": root / "two.jpg", "none": root / "none.jpg", "crop": root / "crop.jpg"}
    paths["two"].write_bytes(two.jpeg)
    paths["none"].write_bytes(none.jpeg)
    paths["crop"].write_bytes(face_jpeg("happy", 0))
    return {**{k: str(v) for k, v in paths.items()}, "boxes": two.boxes}


def run(capsys, *argv) -> tuple[int, list[str], str]:
    code = predict.main(list(argv))
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err


def parse_line(line: str) -> tuple[str, int, tuple[int, ...], str, float]:
    """``IMAGE  face K  box X,Y,W,H  LABEL CONF  [probs]`` -> its fields."""
    image, rest = line.split("  face ", 1)
    k, rest = rest.split("  box ", 1)
    box, label, conf = rest.split()[:3]
    return image.strip(), int(k), tuple(int(v) for v in box.split(",")), label, float(conf)


def test_one_line_per_face(model, photos, capsys):
    code, lines, _ = run(capsys, "--model", model, photos["two"], photos["none"], photos["crop"])
    assert code == 0 and len(lines) == 4, lines
    faces = [parse_line(x) for x in lines[:2]]
    assert [f[0] for f in faces] == [photos["two"]] * 2 and [f[1] for f in faces] == [0, 1]
    for _, _, box, label, conf in faces:
        assert max(iou(box, known) for known in photos["boxes"]) >= 0.3, (box, photos["boxes"])
        assert label in CLASSES and 1 / 3 <= conf <= 1
        assert all(f"{c} 0." in lines[0] or f"{c} 1." in lines[0] for c in CLASSES)
    assert lines[2].split() == [photos["none"], "no", "face", "found"]
    crop = parse_line(lines[3])  # auto: a 48x48 crop is classified whole
    assert crop[:3] == (photos["crop"], 0, (0, 0, 48, 48))


def test_json_one_object_per_face(model, photos, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code, lines, err = run(capsys, "--model", model, "--json", photos["two"], photos["none"], str(broken))
    assert code == 1 and "1 of 3 image(s)" in err
    rows = [json.loads(x) for x in lines]
    assert [(r["image"], r["face_index"]) for r in rows] == [
        (photos["two"], 0), (photos["two"], 1), (photos["none"], None), (str(broken), None)]
    keys = {"image", "face_index", "box", "score", "label", "confidence", "probabilities", "error"}
    assert all(keys <= set(r) for r in rows)
    for r in rows[:2]:
        assert len(r["box"]) == 4 and 0 < r["score"] <= 1 and r["detector"] == "yunet"
        assert r["confidence"] == max(r["probabilities"].values()) and r["label"] in CLASSES
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5) and r["faces_in_image"] == 2
    assert rows[2]["faces_in_image"] == 0 and rows[2]["error"] is None and rows[2]["label"] is None
    assert rows[3]["error"].split(":")[0] in ("truncated", "not_an_image") and rows[3]["box"] is None


def test_real_photo_one_face(model, yunet, capsys):
    for faces in ("auto", "yunet"):
        code, lines, _ = run(capsys, "--model", model, "--faces", faces, str(GRACE_HOPPER))
        assert code == 0 and len(lines) == 1, lines
        assert iou(parse_line(lines[0])[2], (180, 110, 175, 220)) > 0.5  # her face, measured by eye
    code, lines, _ = run(capsys, "--model", model, "--faces", "none", str(GRACE_HOPPER))
    assert code == 0 and parse_line(lines[0])[2] == (0, 0, 512, 600)


def test_annotate_one_image_draws_on_the_boxes(model, photos, tmp_path, capsys):
    out = tmp_path / "out.jpg"
    code, lines, _ = run(capsys, "--model", model, "--annotate", str(out), photos["two"])
    assert code == 0 and lines[-1].endswith(f"annotated -> {out}")
    boxes = [parse_line(x)[2] for x in lines[:2]]
    with Image.open(out) as im:
        assert im.format == "JPEG" and im.size == (S.WIDTH, S.HEIGHT)
        drawn = np.asarray(im.convert("RGB"), np.float32)
    original = np.asarray(Image.open(photos["two"]).convert("RGB"), np.float32)
    diff = np.abs(drawn - original).mean(axis=2)
    for x, y, w, h in boxes:
        assert diff[y + h // 4: y + 3 * h // 4, x - 1: x + 2].mean() > 20  # the box's left edge
        assert diff[y + h // 4: y + 3 * h // 4, x + w // 3: x + 2 * w // 3].mean() < 6  # the face is untouched
    mask = np.ones(diff.shape, bool)
    for x, y, w, h in boxes:
        mask[max(0, y - 80): y + h + 10, max(0, x - 10): x + w + 200] = False  # box and label box
    assert diff[mask].mean() < 3  # elsewhere: only JPEG re-encoding noise


def test_annotate_png_and_several_images_to_a_folder(model, photos, tmp_path, capsys):
    png = tmp_path / "crop.png"
    assert run(capsys, "--model", model, "--annotate", str(png), photos["crop"])[0] == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (48, 48)
    folder = tmp_path / "annotated"
    code, lines, _ = run(capsys, "--model", model, "--annotate", str(folder), photos["two"], photos["none"])
    assert code == 0
    assert sorted(p.name for p in folder.iterdir()) == ["none.annotated.jpg", "two.annotated.jpg"]
    assert sum("annotated -> " in x for x in lines) == 2
    with Image.open(folder / "none.annotated.jpg") as im:
        assert im.size == (S.WIDTH, S.HEIGHT)


def test_annotate_api_on_arrays(model, photos):
    from emotion_core.annotate import annotate
    from emotion_core.recognize import Recognizer

    rec = Recognizer(model)
    array = np.asarray(Image.open(photos["two"]).convert("RGB"))
    result = rec([array])[0]
    assert len(result.faces) == 2
    drawn = rec.annotate(array, result)
    assert drawn.size == (S.WIDTH, S.HEIGHT) and not np.array_equal(np.asarray(drawn), array)
    assert np.array_equal(np.asarray(annotate(array, result)), np.asarray(drawn))
    with pytest.raises(ValueError, match="1280x960"):
        annotate(array[:100], result)


@pytest.mark.parametrize("argv, expected", [
    (["--faces", "mtcnn", "x.jpg"], "invalid choice: 'mtcnn' (choose from 'auto', "),
    (["--annotate", "out.gif", "x.jpg"], "name the output picture (.jpg, .jpeg or .png)"),
    (["--annotate", "out.jpg", "x.jpg", "y.jpg"], "with 2 images, pass a folder"),
])
def test_usage_errors(model, argv, expected, capsys):
    try:
        code = predict.main(["--model", model, *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and expected in err, err


def test_bad_model_is_a_usage_error(photos, tmp_path, capsys):
    code, _, err = run(capsys, "--model", str(tmp_path / "nothing"), photos["crop"])
    assert code == 2 and err.startswith("jobs.predict: error: --model:") and err.count("\n") == 1


def test_png_annotations_are_lossless(model, photos, tmp_path, capsys):
    """PNG output keeps every pixel outside the drawing exactly (format chosen by extension)."""
    out = tmp_path / "two.png"
    assert run(capsys, "--model", model, "--annotate", str(out), photos["two"])[0] == 0
    drawn = np.asarray(Image.open(out).convert("RGB"))
    original = np.asarray(Image.open(io.BytesIO(Path(photos["two"]).read_bytes())).convert("RGB"))
    assert drawn.shape == original.shape and 0 < (drawn != original).any(axis=2).mean() < 0.05
