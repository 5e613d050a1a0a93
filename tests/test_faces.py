"""Face detection and crops (emotion_core.faces), the notebook API (emotion_core.recognize) and the
scene generator (bench.scenes): a real photo shipped with matplotlib, generated scenes with known
boxes (emotion_core.synthetic faces), EXIF rotation, crop shapes and the ``none`` detector."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from bench import scenes as S
from bench.faces_bench import iou, match
from emotion_core import faces as F
from emotion_core.checkpoint import ModelManifest, save_model
from emotion_core.models import GRAY_48, create_model
from emotion_core.preprocess import ImageDecodeError, InputSpec, decode_image
from emotion_core.recognize import Recognizer

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
# Her face in the 512x600 photo (forehead to chin, cheek to cheek), measured by eye.
GRACE_FACE = (180, 110, 175, 220)
RGB_256 = InputSpec(size=256, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)


def installed(name: str) -> F.FaceDetector:
    try:
        return F.create_detector(name)
    except F.DetectorUnavailableError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def yunet() -> F.FaceDetector:
    return installed("yunet")


@pytest.fixture(scope="module")
def scenes() -> list[S.Scene]:
    return S.make_scenes(10, S.synthetic_faces(), seed=3)


def one_face_scene(seed: int = 0, size: int = 200) -> S.Scene:
    rng = np.random.default_rng(seed)
    scene = S.make_scene(rng, S.synthetic_faces(), n_faces=1, sizes=(size, size), rotated_share=0.0)
    assert len(scene.boxes) == 1
    return scene


def test_registry_lists_and_rejects():
    assert {"yunet", "retinaface", "haar", "none"} <= set(F.list_detectors())
    with pytest.raises(F.UnknownDetectorError, match="choose one of: .*yunet"):
        F.create_detector("mtcnn")
    with pytest.raises(ValueError, match="already registered"):
        F.register_detector("none", None, "again")(lambda: None)
    assert F.create_detector("none", max_side=320).max_side == 320  # input policy override


@pytest.mark.parametrize("name", ["yunet", "retinaface", "haar"])
def test_real_photo_one_face(name):
    detector = installed(name)
    data = GRACE_HOPPER.read_bytes()
    faces = detector.detect(F.decode_photo(data, detector.max_side))
    assert len(faces) == 1, faces
    face = faces[0]
    assert iou(face.box, GRACE_FACE) > 0.5, face
    if name != "haar":
        assert face.landmarks is not None and len(face.landmarks) == 5
        (rx, ry), (lx, ly) = face.landmarks[:2]
        assert rx < lx and abs(ry - ly) < 20  # right eye left in the image, eyes level
        for x, y in face.landmarks:
            assert face.x <= x <= face.x + face.w and face.y <= y <= face.y + face.h


def test_boxes_in_original_pixels_whatever_the_detection_size(yunet):
    data = GRACE_HOPPER.read_bytes()
    full = yunet.detect(F.decode_photo(data))[0]
    small = F.create_detector("yunet", max_side=256)
    photo = F.decode_photo(data, 256)
    assert max(photo.pixels.shape[:2]) <= 256 and (photo.width, photo.height) == (512, 600)
    reduced = small.detect(photo)[0]
    assert iou(full.box, reduced.box) > 0.7, (full, reduced)


def test_generated_scenes_faces_found(yunet, scenes):
    known = sum(len(s.boxes) for s in scenes)
    assert known >= 10
    found = false = 0
    for s in scenes:
        faces = yunet.detect(F.decode_photo(s.jpeg, yunet.max_side))
        pairs = match(s.boxes, faces)
        found += len(pairs)
        false += len(faces) - len(pairs)
    # Cartoon faces, some small and rotated: most, not all, are found; nothing else is.
    assert found / known >= 0.8, (found, known)
    assert false == 0


@pytest.mark.parametrize("seed", range(4))
def test_large_upright_faces_all_found(yunet, seed):
    scene = one_face_scene(seed)
    faces = yunet.detect(F.decode_photo(scene.jpeg, yunet.max_side))
    assert len(faces) == 1 and iou(faces[0].box, scene.boxes[0]) >= 0.3, (faces, scene.boxes)


@pytest.mark.parametrize("name", ["yunet", "retinaface", "haar"])
def test_no_face_in_a_faceless_scene(name):
    detector = installed(name)
    for seed in range(3):
        scene = S.make_scene(np.random.default_rng([99, seed]), S.synthetic_faces(), n_faces=0)
        assert scene.boxes == []
        assert detector.detect(F.decode_photo(scene.jpeg, detector.max_side)) == []


def with_orientation(jpeg: bytes, orientation: int, stored: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=92, exif=exif)
    return buf.getvalue()


def test_exif_rotated_photo_boxes_in_the_rotated_frame(yunet):
    scene = one_face_scene(seed=7)
    upright = Image.open(io.BytesIO(scene.jpeg))
    # Orientation 6: the viewer rotates the stored pixels 90 degrees clockwise. Stored = upright
    # turned counter-clockwise, so a viewer (and we) must see the upright 1280x960 scene.
    data = with_orientation(scene.jpeg, 6, upright.transpose(Image.Transpose.ROTATE_90))
    photo = F.decode_photo(data, yunet.max_side)
    assert (photo.width, photo.height) == (S.WIDTH, S.HEIGHT)
    assert photo.pixels.shape[1] > photo.pixels.shape[0]  # landscape after orientation
    assert F.image_size(data) == (S.WIDTH, S.HEIGHT)
    faces = yunet.detect(photo)
    assert len(faces) == 1 and iou(faces[0].box, scene.boxes[0]) >= 0.3, (faces, scene.boxes)
    found = F.find_faces(data, yunet, GRAY_48)
    assert (found.width, found.height) == (S.WIDTH, S.HEIGHT)
    assert iou(found.faces[0].box, scene.boxes[0]) >= 0.3


@pytest.mark.parametrize("spec", [GRAY_48, RGB_256], ids=["gray48", "rgb256"])
def test_crops_have_the_model_shape(yunet, spec):
    scene = one_face_scene(seed=1, size=240)
    found = F.find_faces(scene.jpeg, yunet, spec)
    assert found.pixels.shape == (1, spec.channels, spec.size, spec.size)
    assert found.pixels.dtype == np.uint8
    # The crop is the face, not background: the synthetic face is centred in it, so the centre
    # of the crop differs from its border.
    p = found.pixels[0].astype(np.float32)
    assert p.std() > 10


def test_crop_box_square_and_edge_pixels_repeated():
    detector = installed("yunet")
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, :100] = 200  # left half bright
    photo = F.Photo.from_array(a)
    face = F.Face(0, 0, 40, 60, 1.0)  # at the top-left corner: the crop leaves the image
    x0, y0, x1, y1 = detector.crop_box(face)
    assert x1 - x0 == pytest.approx(y1 - y0) == pytest.approx(detector.crop_scale * 60)
    crop = F.crop_faces(photo, [face], GRAY_48, detector)[0, 0]
    assert crop.shape == (48, 48) and crop.min() >= 190  # no black bars: edges repeat


def test_crop_from_reduced_decode_matches_full_resolution(yunet):
    scene = one_face_scene(seed=2, size=240)
    face = yunet.detect(F.decode_photo(scene.jpeg, yunet.max_side))[0]
    full = F.crop_faces(F.decode_photo(scene.jpeg), [face], GRAY_48, yunet)
    reduced = F.crop_faces(F.decode_photo(scene.jpeg, 640), [face], GRAY_48, yunet)
    assert np.abs(full.astype(int) - reduced.astype(int)).mean() < 6


def test_none_is_the_whole_image_as_decode_image_gives_it():
    none = F.create_detector("none")
    data = GRACE_HOPPER.read_bytes()
    for spec in (GRAY_48, RGB_256):
        found = F.find_faces(data, none, spec)
        assert [f.box for f in found.faces] == [(0, 0, 512, 600)]
        assert np.array_equal(found.pixels[0], decode_image(data, spec)[0])
    whole = none.detect(np.zeros((30, 40, 3), np.uint8))
    assert [f.box for f in whole] == [(0, 0, 40, 30)]


@pytest.mark.parametrize(
    "data, reason", [(b"", "empty"), (b"not an image at all", "not_an_image"), (None, "truncated")]
)
def test_bad_bytes_are_decode_errors(yunet, data, reason):
    if data is None:
        data = GRACE_HOPPER.read_bytes()[:2000]
    with pytest.raises(ImageDecodeError) as e:
        F.find_faces(data, yunet, GRAY_48)
    assert e.value.reason == reason


def test_auto_rule():
    assert not F.needs_detection(48, 48, GRAY_48)
    assert F.needs_detection(49, 20, GRAY_48)
    assert not F.needs_detection(256, 200, RGB_256)
    assert F.default_detector() in F.available_detectors()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    classes = ["happy", "sad"]
    model = create_model("cnn", len(classes))
    manifest = ModelManifest(architecture="cnn", classes=classes, input_spec=GRAY_48)
    return save_model(str(tmp_path_factory.mktemp("model")), model, manifest)


def test_recognizer_per_face_results(model_dir, scenes, yunet):
    rec = Recognizer(model_dir)  # auto
    crop = S.synthetic_faces().draw(np.random.default_rng(0))[0]
    buf = io.BytesIO()
    crop.save(buf, "PNG")
    two_faces = next(s for s in scenes if len(s.boxes) >= 2 and len(match(s.boxes, yunet.detect(
        F.decode_photo(s.jpeg, yunet.max_side)))) >= 2)
    array = np.asarray(Image.open(GRACE_HOPPER).convert("RGB"))
    results = rec([str(GRACE_HOPPER), buf.getvalue(), two_faces.jpeg, array])
    photo, small, scene, arr = results
    assert photo.source == str(GRACE_HOPPER) and photo.detector == F.default_detector()
    assert len(photo.faces) == 1 and iou(photo.faces[0].box, GRACE_FACE) > 0.5
    assert small.detector == "none" and [f.box for f in small.faces] == [(0, 0, 48, 48)]
    assert len(scene.faces) >= 2
    assert [f.box for f in arr.faces] == [f.box for f in photo.faces]
    assert arr.faces[0].probabilities == pytest.approx(photo.faces[0].probabilities, abs=0.02)
    for f in photo.faces + small.faces + scene.faces:
        assert f.label in ("happy", "sad") and f.confidence == max(f.probabilities.values())
        assert sum(f.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_recognizer_errors_and_rows(model_dir, tmp_path):
    rec = Recognizer(model_dir, detector="yunet")
    with pytest.raises(ImageDecodeError, match="<bytes 0>"):
        rec([b"garbage"])
    faceless = S.make_scene(np.random.default_rng(5), S.synthetic_faces(), n_faces=0).jpeg
    rows = rec.rows([b"garbage", faceless, str(GRACE_HOPPER)], errors="keep")
    assert [r["face_index"] for r in rows] == [None, None, 0]
    assert rows[0]["error"].startswith("not_an_image") and rows[1]["error"] is None
    assert rows[1]["faces_in_image"] == 0 and rows[2]["faces_in_image"] == 1
    assert rows[2]["label"] in ("happy", "sad") and {"p_happy", "p_sad", "face_w"} <= set(rows[2])
    missing = rec([str(tmp_path / "nope.jpg")], errors="keep")[0]
    assert missing.error.startswith("unreadable") and missing.faces == []


def test_scene_cli_writes_scenes_and_boxes(tmp_path):
    assert S.main([str(tmp_path), "--count", "3", "--seed", "1"]) == 0
    manifest = json.loads((tmp_path / "scenes.json").read_text())
    assert sorted(manifest) == ["scene_00000.jpg", "scene_00001.jpg", "scene_00002.jpg"]
    for name, entry in manifest.items():
        with Image.open(tmp_path / name) as im:
            assert im.size == (S.WIDTH, S.HEIGHT)
        for x, y, w, h in entry["boxes"]:
            assert 0 <= x and x + w <= S.WIDTH and 0 <= y and y + h <= S.HEIGHT
    again = S.make_scenes(3, S.synthetic_faces(), seed=1)
    assert (tmp_path / "scene_00001.jpg").read_bytes() == again[1].jpeg  # deterministic
    assert S.main([str(tmp_path), "--faces", str(tmp_path / "empty")]) == 2


@pytest.mark.parametrize("tilt", [-20, 15])
def test_eye_alignment_levels_a_tilted_face(tilt):
    """A real face (Grace Hopper) tilted by ``tilt`` degrees: with ``align`` its crop is rotated
    back by about that angle (from the eye landmarks) and is closer to the upright face's crop than
    the crop as cut."""
    upright = Image.open(GRACE_HOPPER).convert("RGB")
    tilted = upright.rotate(tilt, resample=Image.Resampling.BICUBIC, expand=False)
    aligned, unaligned = F.create_detector("yunet"), F.create_detector("yunet", align=False)
    assert aligned.align and not unaligned.align  # on by default
    spec = InputSpec(48, 1, (0.5,), (0.5,))
    [face] = aligned.detect(F.Photo.from_array(np.asarray(tilted)))
    [straight] = aligned.detect(F.Photo.from_array(np.asarray(upright)))
    own = math.degrees(math.atan2(straight.landmarks[1][1] - straight.landmarks[0][1],
                                  straight.landmarks[1][0] - straight.landmarks[0][0]))  # her head's own tilt
    assert aligned.eye_angle(face) == pytest.approx(own - tilt, abs=7) and unaligned.eye_angle(face) == 0.0
    reference = F.crop_faces(F.Photo.from_array(np.asarray(upright)), [straight], spec, aligned)[0, 0]

    def error(detector) -> float:
        crop = F.crop_faces(F.Photo.from_array(np.asarray(tilted)), [face], spec, detector)[0, 0]
        return float(np.abs(crop.astype(np.float32) - reference).mean())

    assert error(aligned) < error(unaligned)
