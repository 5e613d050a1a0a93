"""jobs.train --faces on a Kaggle layout of small generated photos (one synthetic face each, pasted
into a 320x240 cluttered background, plus one photo without a face), on the real local Ray: the
images are cropped by the same find_faces path labelling uses, the face-less photo is skipped as
no_face, model.json records the detector and the input size, and the exported model then finds and
labels the face in a photo at that size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emotion_core import faces as F
from emotion_core.models import resolve_input_spec
from jobs import _train_data, predict, train
from tests.helpers import photo_jpeg, put_tree

CLASSES = ("happy", "sad")
FACELESS = "train/happy/no_face.jpg"


@pytest.fixture(scope="module")
def photo_data(tmp_path_factory) -> tuple[str, dict[str, bytes]]:
    """train/: 12 photos per class plus one without a face; test/: 3 per class."""
    files = {FACELESS: photo_jpeg(None, 99)}
    for c, cls in enumerate(CLASSES):
        for i in range(15):
            split = "train" if i < 12 else "test"
            files[f"{split}/{cls}/{i:02d}.jpg"] = photo_jpeg(cls, 100 * c + i)
    root = tmp_path_factory.mktemp("photos")
    put_tree(str(root), files)
    return str(root), files


def test_decode_faces_crops_the_largest_face(yunet):
    spec = resolve_input_spec("cnn", 64, 3)
    pixels, errors = _train_data.decode_faces([photo_jpeg("happy", 1), photo_jpeg(None, 2), b"junk"], spec, "yunet")
    assert pixels.shape == (3, 3, 64, 64) and errors[0] is None
    assert errors[1].startswith("no_face: detector yunet found no face in the 320x240 image")
    assert errors[2].startswith("not_an_image") and not pixels[1:].any()
    whole, none_errors = _train_data.decode_faces([photo_jpeg("happy", 1)], spec, "none")
    assert none_errors == [None] and not np.array_equal(whole[0], pixels[0])  # none: the whole photo, squeezed


def test_train_with_faces_on_photos(ray_session, photo_data, yunet, tmp_path, capsys):
    root, files = photo_data
    spec = resolve_input_spec("cnn", 64, 3)
    # What the same detector finds on its own (a few low-contrast synthetic faces are missed):
    no_face = sorted(rel for rel, data in files.items() if not F.find_faces(data, yunet, spec).faces)
    assert FACELESS in no_face and len(no_face) <= 4, no_face
    rc = train.main(["--data", root, "--output", str(tmp_path), "--name", "photos", "--model", "cnn",
                     "--faces", "yunet", "--image-size", "64", "--channels", "3", "--epochs", "1",
                     "--batch-size", "8", "--max-failures", "0", "--num-workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"no_face {len(no_face)}" in out

    metrics = json.loads((tmp_path / "photos" / "metrics.json").read_text())
    skipped = metrics["skipped_images"]
    assert sorted(s["path"] for s in skipped) == no_face
    assert all(s["error"].startswith("no_face:") for s in skipped)
    assert metrics["config"]["faces"] == "yunet"
    evaluated = metrics["test"]["num_samples"]
    assert evaluated == 6 - sum(rel.startswith("test/") for rel in no_face)

    [version] = (tmp_path / "photos" / "models").iterdir()
    manifest = json.loads((version / "model.json").read_text())
    assert manifest["training_config"]["faces"] == "yunet"
    assert manifest["input_spec"]["size"] == 64 and manifest["input_spec"]["channels"] == 3

    # The exported model finds and labels the face in a new photo, at its own input size.
    from emotion_core.recognize import Recognizer

    rec = Recognizer(str(version))
    assert (rec.spec.size, rec.spec.channels) == (64, 3)
    photo = next(p for p in (photo_jpeg("sad", 1000 + s) for s in range(10)) if F.find_faces(p, yunet, spec).faces)
    [result] = rec([photo])
    assert result.detector == "yunet" and len(result.faces) == 1 and result.faces[0].label in CLASSES
    path = tmp_path / "new.jpg"
    path.write_bytes(photo)
    assert predict.main(["--model", str(version), str(path)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{path}  face 0  box ") and line.split()[5] in CLASSES


def test_unknown_faces_is_a_usage_error(photo_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", photo_data[0], "--output", str(tmp_path), "--faces", "mtcnn"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'mtcnn'" in err
