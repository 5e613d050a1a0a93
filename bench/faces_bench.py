"""Face-detection benchmark on generated scenes (bench/scenes.py) with known face boxes.

For each detector: recall (a known face counts as found when a detection overlaps it with
IoU >= 0.3, each detection used once), false faces per photo (detections matching no known face),
recall on rotated faces and on small faces (<= 130 px), crop IoU (the detector's FER-style crop
region vs the pasted FER square: how well the crop reproduces the training crop), and photos/s of
the detection path in one process (decode_photo at the detector's size + detect, the share of the
labelling cost that detection adds). Ratios are against the first detector listed, measured in the
same run; speed is the median over --repeats passes with the spread (min-max), and CPU ms per
photo (process time, less sensitive to other users of a shared machine than wall time).

--calibrate prints, per detector, the median (pasted square side / detected box side) and the
median vertical offset of the square's centre: the ``crop_scale`` / ``crop_shift`` values in
emotion_core/faces.py come from this.

Label accuracy on found faces vs on the original crops, and jobs.label --faces throughput against a
naive loop, are to be added once labelling integrates faces: :func:`evaluate` returns every match
(scene index, known-face index, Face) so a classifier can be run on ``find_faces`` crops of the
matched faces and on the source crops (Scene.labels gives the truth).

    PYTHONPATH=$PWD .venv/bin/python -m bench.faces_bench [--scenes 300] [--faces FER_TRAIN_DIR|synthetic]
        [--detectors yunet,retinaface,haar] [--repeats 3] [--calibrate]

The machine is shared and noisy: photos/s are as measured, with their spread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import scenes as S
from emotion_core import faces as F

DEFAULT_FER = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013" / "train"
IOU_MIN = 0.3
SMALL = 130


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """IoU of two x, y, w, h boxes."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def match(known: list[tuple[int, int, int, int]], found: list[F.Face]) -> list[tuple[int, int]]:
    """Greedy one-to-one matching by IoU >= IOU_MIN: ``[(known index, found index)]``."""
    pairs = sorted(
        ((iou(k, f.box), ki, fi) for ki, k in enumerate(known) for fi, f in enumerate(found)), reverse=True
    )
    used_k, used_f, out = set(), set(), []
    for v, ki, fi in pairs:
        if v < IOU_MIN:
            break
        if ki not in used_k and fi not in used_f:
            used_k.add(ki)
            used_f.add(fi)
            out.append((ki, fi))
    return out


@dataclass
class Result:
    name: str
    known: int = 0
    found: int = 0
    false: int = 0
    photos: int = 0
    rotated: int = 0
    rotated_found: int = 0
    small: int = 0
    small_found: int = 0
    crop_iou: list[float] = field(default_factory=list)
    speeds: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    matches: list[tuple[int, int, F.Face]] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    shift_x: list[float] = field(default_factory=list)
    shift_y: list[float] = field(default_factory=list)


def evaluate(detector: F.FaceDetector, scenes: list[S.Scene], repeats: int = 1) -> Result:
    r = Result(detector.name)
    detector.detect(F.decode_photo(scenes[0].jpeg, detector.max_side))  # warm-up
    for rep in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        found_all = [detector.detect(F.decode_photo(s.jpeg, detector.max_side)) for s in scenes]
        r.speeds.append(len(scenes) / (time.perf_counter() - t0))
        r.cpu_ms.append((time.process_time() - c0) / len(scenes) * 1000)
        if rep:
            continue
        for si, (scene, found) in enumerate(zip(scenes, found_all)):
            pairs = match(scene.boxes, found)
            r.photos += 1
            r.known += len(scene.boxes)
            r.found += len(pairs)
            r.false += len(found) - len(pairs)
            hit = {ki for ki, _ in pairs}
            for ki, box in enumerate(scene.boxes):
                if scene.angles[ki]:
                    r.rotated += 1
                    r.rotated_found += ki in hit
                if box[2] <= SMALL:
                    r.small += 1
                    r.small_found += ki in hit
            for ki, fi in pairs:
                face, (gx, gy, gs, _) = found[fi], scene.boxes[ki]
                r.matches.append((si, ki, face))
                x0, y0, x1, y1 = detector.crop_box(face)
                r.crop_iou.append(iou((x0, y0, x1 - x0, y1 - y0), scene.boxes[ki]))
                side = max(face.w, face.h)
                r.scale.append(gs / side)
                r.shift_x.append((gx + gs / 2 - face.x - face.w / 2) / gs)
                r.shift_y.append((gy + gs / 2 - face.y - face.h / 2) / gs)
    return r


def table(results: list[Result]) -> str:
    base = statistics.median(results[0].speeds)
    n = max(11, *(len(r.name) for r in results))
    head = (
        f"{'detector':<{n}} {'recall':>7} {'false/photo':>11} {'rotated':>8} {'small':>7} {'crop IoU':>8} "
        f"{'photos/s (min-max)':>20} {'vs ' + results[0].name:>10} {'CPU ms/photo':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        med = statistics.median(r.speeds)
        speed = f"{med:.1f} ({min(r.speeds):.1f}-{max(r.speeds):.1f})"
        lines.append(
            f"{r.name:<{n}} {r.found / max(1, r.known):>7.3f} {r.false / max(1, r.photos):>11.3f} "
            f"{r.rotated_found / max(1, r.rotated):>8.3f} {r.small_found / max(1, r.small):>7.3f} "
            f"{np.mean(r.crop_iou) if r.crop_iou else 0:>8.3f} {speed:>20} {med / base:>9.2f}x "
            f"{statistics.median(r.cpu_ms):>12.1f}"
        )
    return "\n".join(lines)


def parse_detector(spec: str) -> F.FaceDetector:
    """``name`` or ``name[key=value;key=value]`` -> a detector labelled with ``spec``."""
    name, _, rest = spec.partition("[")
    kwargs: dict[str, float | int] = {}
    for item in filter(None, rest.rstrip("]").split(";")):
        key, _, value = item.partition("=")
        kwargs[key] = int(value) if value.isdigit() else float(value)
    detector = F.create_detector(name, **kwargs)
    detector.name = spec
    return detector


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faces_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=300)
    p.add_argument("--faces", default=str(DEFAULT_FER), help="FER-layout train folder or 'synthetic'")
    p.add_argument("--detectors", default="yunet,retinaface,haar",
                   help="comma-separated; options in brackets, e.g. yunet[max_side=960;score_threshold=0.3]")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibrate", action="store_true", help="print crop_scale / crop_shift medians")
    args = p.parse_args(argv)
    try:
        source = S.synthetic_faces() if args.faces == "synthetic" else S.fer_faces(args.faces)
        detectors = [parse_detector(spec) for spec in args.detectors.split(",")]
    except (ValueError, F.DetectorUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    scenes = S.make_scenes(args.scenes, source, args.seed)
    known = sum(len(s.boxes) for s in scenes)
    print(
        f"{len(scenes)} scenes {S.WIDTH}x{S.HEIGHT}, {known} faces from {args.faces}, "
        f"{sum(not s.boxes for s in scenes)} without faces (built in {time.perf_counter() - t0:.1f} s); "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    results = [evaluate(d, scenes, args.repeats) for d in detectors]
    print(table(results))
    print(f"recall: known faces found at IoU >= {IOU_MIN}; rotated: 5-25 deg; small: <= {SMALL} px; "
          f"crop IoU: crop region vs pasted FER square")
    if args.calibrate:
        for r in results:
            if r.scale:
                print(f"{r.name}: crop_scale {statistics.median(r.scale):.3f}  "
                      f"shift_x {statistics.median(r.shift_x):+.3f}  shift_y {statistics.median(r.shift_y):+.3f} "
                      f"(of the square side; {len(r.scale)} faces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
