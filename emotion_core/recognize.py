"""Find and classify every face in a few images, for notebooks: load once, call many times.

    from emotion_core.recognize import Recognizer
    rec = Recognizer("outputs/models/emonet/latest.json")        # local path or s3:// URI
    for image in rec(["party.jpg", open("b.png", "rb").read(), numpy_rgb_array]):
        for face in image.faces:
            print(face.box, face.label, f"{face.confidence:.2f}")
    pandas.DataFrame(rec.rows(["party.jpg"]))                     # one row per face
    rec.annotate("party.jpg").save("party.annotated.jpg")         # boxes, labels, confidences

Like deepface's one call, without its downloads: the model is a local/S3 checkpoint
(:func:`emotion_core.checkpoint.load_model`) and the detector's weights ship in its package.
Faces go through :func:`emotion_core.faces.find_faces` (bytes) or the same detect + crop steps
(arrays), i.e. the pixels the labelling job classifies.

Detector ``"auto"`` (the default) decides per image: an image whose longer side is at most the
model's input size is already a face crop and is classified whole (``none``); anything larger
goes through :func:`emotion_core.faces.default_detector`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from emotion_core import faces as F
from emotion_core import storage
from emotion_core.checkpoint import load_model
from emotion_core.preprocess import ImageDecodeError, normalize

ImageInput = str | Path | bytes | bytearray | memoryview | np.ndarray


@dataclass(frozen=True)
class FaceResult:
    box: tuple[int, int, int, int]  # x, y, w, h in original-image pixels (after EXIF orientation)
    score: float  # detector score (1.0 for the whole image)
    label: str
    confidence: float  # probability of label
    probabilities: dict[str, float]
    landmarks: F.Landmarks | None = None


@dataclass(frozen=True)
class ImageResult:
    source: str  # the path/URI, or "<bytes>" / "<array>" with the position in the call
    width: int | None
    height: int | None
    detector: str
    faces: list[FaceResult] = field(default_factory=list)
    error: str | None = None  # set (and faces empty) when the image could not be decoded


class Recognizer:
    """A loaded model plus a face detector. ``detector`` is ``"auto"``, a registered name or a
    :class:`emotion_core.faces.FaceDetector`; ``detector_kwargs`` go to ``create_detector``."""

    def __init__(self, model_uri: str, detector: str | F.FaceDetector = "auto", device: str = "cpu",
                 **detector_kwargs):
        self.model, self.manifest = load_model(model_uri, device)
        self.spec = self.manifest.input_spec
        self.classes = list(self.manifest.classes)
        self.device = torch.device(device)
        self._auto = detector == "auto"
        if isinstance(detector, F.FaceDetector):
            self.detector = detector
        else:
            name = F.default_detector() if self._auto else detector
            self.detector = F.create_detector(name, **detector_kwargs)
        self._none = F.create_detector("none")

    def __call__(self, images: Iterable[ImageInput], errors: str = "raise") -> list[ImageResult]:
        """One :class:`ImageResult` per image, in order. ``errors="raise"`` raises the first
        :class:`ImageDecodeError` or :class:`emotion_core.storage.StorageError` (message names the
        image); ``"keep"`` records it in ``error``."""
        if errors not in ("raise", "keep"):
            raise ValueError(f"errors must be 'raise' or 'keep', got {errors!r}")
        out = []
        for i, image in enumerate(images):
            source = _source_name(image, i)
            try:
                out.append(self._one(image, source))
            except ImageDecodeError as e:
                if errors == "raise":
                    raise ImageDecodeError(e.reason, f"{source}: {e.detail or e.reason}") from None
                out.append(ImageResult(source, None, None, self.detector.name, error=str(e)))
            except storage.StorageError as e:
                if errors == "raise":
                    raise
                out.append(ImageResult(source, None, None, self.detector.name, error=f"unreadable: {e}"))
        return out

    def rows(self, images: Iterable[ImageInput], errors: str = "raise") -> list[dict]:
        """Flat rows (one per face; one row with ``face_index`` None for an image without faces or
        with an error), ready for ``pandas.DataFrame``."""
        rows = []
        for r in self(images, errors):
            base = {"source": r.source, "width": r.width, "height": r.height, "detector": r.detector,
                    "faces_in_image": len(r.faces), "error": r.error}
            if not r.faces:
                rows.append({**base, "face_index": None, "label": None, "confidence": None})
            for k, f in enumerate(r.faces):
                x, y, w, h = f.box
                rows.append({**base, "face_index": k, "face_x": x, "face_y": y, "face_w": w, "face_h": h,
                             "face_score": f.score, "label": f.label, "confidence": f.confidence,
                             **{f"p_{c}": p for c, p in f.probabilities.items()}})
        return rows

    def annotate(self, image: ImageInput, result: ImageResult | None = None):
        """``image`` as a PIL image with each face's box, label and confidence drawn on it
        (:func:`emotion_core.annotate.annotate`); recognised first unless ``result`` is given."""
        from emotion_core.annotate import annotate

        return annotate(image, result or self([image])[0])

    def _one(self, image: ImageInput, source: str) -> ImageResult:
        if isinstance(image, np.ndarray):
            photo = F.Photo.from_array(image)
            detector = self._pick(photo.width, photo.height)
            faces = detector.detect(photo)
            found = F.FoundFaces(faces, F.crop_faces(photo, faces, self.spec, detector), photo.width, photo.height)
        else:
            data = storage.read_bytes(str(image)) if isinstance(image, str | Path) else bytes(image)
            detector = self.detector
            if self._auto:
                detector = self._pick(*F.image_size(data))
            found = F.find_faces(data, detector, self.spec)
        return ImageResult(source, found.width, found.height, detector.name, self._classify(found))

    def _pick(self, width: int, height: int) -> F.FaceDetector:
        if self._auto and not F.needs_detection(width, height, self.spec):
            return self._none
        return self.detector

    def _classify(self, found: F.FoundFaces) -> list[FaceResult]:
        if not found.faces:
            return []
        with torch.no_grad():
            logits = self.model(normalize(found.pixels, self.spec).to(self.device))
            probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        results = []
        for face, p in zip(found.faces, probs):
            k = int(p.argmax())
            results.append(FaceResult(face.box, face.score, self.classes[k], float(p[k]),
                                      {c: float(v) for c, v in zip(self.classes, p)}, face.landmarks))
        return results


def recognize(images: Sequence[ImageInput], model_uri: str, detector: str = "auto",
              device: str = "cpu") -> list[ImageResult]:
    """One call: load the model, find and classify the faces in ``images``. For repeated calls
    keep a :class:`Recognizer` (loading the model is the slow part)."""
    return Recognizer(model_uri, detector, device)(images)


def _source_name(image: ImageInput, i: int) -> str:
    if isinstance(image, str | Path):
        return str(image)
    return f"<{'array' if isinstance(image, np.ndarray) else 'bytes'} {i}>"
