"""Labelling photos per face: label accuracy on found faces vs the same faces as crops, and
photos/s of ``jobs.label --faces`` against a naive single-process loop, in the same run.

Scenes come from bench/scenes.py with FER2013 faces pasted into 1280x960 photos (0-3 faces of
90-260 px, 30 % rotated, ~20 % without faces). With ``--split RUN/split.json`` only the faces of
that training run's carved validation split are pasted, so the model never saw them.

1. Accuracy, per detector: every pasted face the detector finds (IoU >= 0.3) is classified from
   its ``find_faces`` crop (the labelling job's pixels) and, separately, from its source 48x48
   crop decoded as the training data is; both against the face's FER label. The difference is
   what detection + re-cropping costs. Each detector is measured with its crops as cut and with
   eye alignment (crops rotated so the eyes are level: 30 % of the pasted faces are rotated).
2. Throughput: the scenes are written as JPEGs to a folder, then labelled (a) by a naive loop in
   one process (read, decode, detect, crop, classify with the eager model, one Parquet file at the
   end: what a notebook user writes around ``Recognizer``) and (b) by ``jobs.label --faces D``
   with one actor per core on an embedded Ray. Both wall times are end to end; the job's fixed
   start-up cost (Ray, listing, plan, actor start, model trace) is measured separately with
   ``--limit 1`` and reported, as is the job's label-stage rate. Pairs alternate, ``--repeats`` times.

    PYTHONPATH=$PWD .venv/bin/python -m bench.faces_label_bench --model RUN/models/VERSION \\
        [--split RUN/split.json] [--faces FER_TRAIN_DIR] [--scenes 200] [--detectors yunet,retinaface]
        [--repeats 2] [--accuracy-only]

The machine is shared and noisy (2 cores here): rates are as measured, with min-max and the load.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import scenes as S
from bench.faces_bench import DEFAULT_FER, match
from emotion_core import faces as F
from emotion_core.preprocess import decode_image


def accuracy(model, manifest, detector: F.FaceDetector, scenes: list[S.Scene]) -> dict:
    """Accuracy on the found faces' job crops vs their source crops (module doc, 1)."""
    import torch

    from emotion_core.preprocess import normalize

    spec, classes = manifest.input_spec, list(manifest.classes)
    found_px, source_px, truth, known = [], [], [], 0
    for scene in scenes:
        known += len(scene.boxes)
        found = F.find_faces(scene.jpeg, detector, spec)
        for ki, fi in match(scene.boxes, found.faces):
            if scene.labels[ki] not in classes:
                continue
            found_px.append(found.pixels[fi])
            buf = io.BytesIO()
            scene.crops[ki].save(buf, format="PNG")
            source_px.append(decode_image(buf.getvalue(), spec)[0])
            truth.append(classes.index(scene.labels[ki]))
    y = np.asarray(truth)

    def predict(pixels) -> np.ndarray:
        with torch.inference_mode():
            return model(normalize(np.stack(pixels), spec)).argmax(1).numpy()

    acc_found = float((predict(found_px) == y).mean()) if truth else 0.0
    acc_source = float((predict(source_px) == y).mean()) if truth else 0.0
    return {"detector": detector.name, "known": known, "classified": len(truth), "acc_found": acc_found,
            "acc_source": acc_source}


def naive_loop(folder: Path, model, manifest, detector: F.FaceDetector, out: Path) -> int:
    """Read, decode, detect, crop, classify, write: one process, one image at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from emotion_core.preprocess import normalize

    rows = []
    for path in sorted(folder.glob("*.jpg")):
        found = F.find_faces(path.read_bytes(), detector, manifest.input_spec)
        if not found.faces:
            rows.append({"image_uri": str(path), "face_index": None, "label": None})
            continue
        with torch.inference_mode():
            probs = torch.softmax(model(normalize(found.pixels, manifest.input_spec)), 1).numpy()
        for k, p in enumerate(probs):
            rows.append({"image_uri": str(path), "face_index": k, "label": manifest.classes[int(p.argmax())]})
    pq.write_table(pa.Table.from_pylist(rows), out)
    return len(rows)


def job(folder: Path, model_uri: str, detector: str, out: Path, limit: int | None = None) -> dict:
    from jobs import label

    run_id = f"bench-{time.time_ns()}"
    argv = ["--input", str(folder), "--model", model_uri, "--output", str(out), "--faces", detector,
            "--run-id", run_id, "--date", "2026-01-01"] + (["--limit", str(limit)] if limit else [])
    assert label.main(argv) == 0, "jobs.label failed"
    return json.loads((out / "_runs" / f"{run_id}.json").read_text())


def speed(scenes: list[S.Scene], model_uri: str, model, manifest, detector: F.FaceDetector, repeats: int) -> dict:
    import ray

    work = Path(tempfile.mkdtemp(prefix="faces-label-bench-"))
    folder = work / "photos"
    folder.mkdir()
    for i, scene in enumerate(scenes):
        (folder / f"scene_{i:04d}.jpg").write_bytes(scene.jpeg)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    naive, jobs_, stage, fixed = [], [], [], []
    try:
        job(folder, model_uri, detector.name, work / "warm", limit=1)  # first actor start, trace, imports
        for rep in range(repeats):
            t0 = time.perf_counter()
            naive_loop(folder, model, manifest, detector, work / "naive.parquet")
            naive.append(len(scenes) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            summary = job(folder, model_uri, detector.name, work / f"out-{rep}")
            jobs_.append(len(scenes) / (time.perf_counter() - t0))
            stage.append(summary["label_stage_images_per_s"])
            t0 = time.perf_counter()
            job(folder, model_uri, detector.name, work / f"fixed-{rep}", limit=1)
            fixed.append(time.perf_counter() - t0)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return {"naive": naive, "job": jobs_, "stage": stage, "fixed_s": fixed}


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faces_label_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported model directory or pointer .json")
    p.add_argument("--split", help="the training run's split.json: paste only its validation faces")
    p.add_argument("--faces", default=str(DEFAULT_FER), help="FER-layout train folder")
    p.add_argument("--scenes", type=int, default=200)
    p.add_argument("--detectors", default="yunet,retinaface")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-speed", "--accuracy-only", dest="accuracy_only", action="store_true")
    args = p.parse_args(argv)

    import torch

    from emotion_core.checkpoint import load_model, resolve_model_uri

    torch.set_num_threads(os.cpu_count() or 1)
    model_uri = resolve_model_uri(args.model)
    model, manifest = load_model(model_uri)
    only = None
    if args.split:
        names = json.loads(Path(args.split).read_text()).get("validation_files") or []
        only = {"/".join(n.split("/")[-2:]) for n in names}
    scenes = S.make_scenes(args.scenes, S.fer_faces(args.faces, only), args.seed)
    known = sum(len(s.boxes) for s in scenes)
    print(f"{len(scenes)} scenes, {known} faces ({'validation split only' if only else 'any train face'}); "
          f"model {manifest.architecture} {manifest.version}; {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    detectors = [F.create_detector(d) for d in args.detectors.split(",")]
    for d in detectors:
        default = d.align
        for align in (False, True):  # crops as cut, and rotated so the eyes are level
            d.align = align
            a = accuracy(model, manifest, d, scenes)
            print(f"{d.name} (align {'on' if align else 'off'}): found {a['classified']}/{a['known']} faces; "
                  f"accuracy on found-face crops {a['acc_found']:.3f} vs the same faces' source crops "
                  f"{a['acc_source']:.3f} ({100 * (a['acc_found'] - a['acc_source']):+.1f} points)")
        d.align = default
    if args.accuracy_only:
        return 0
    for d in detectors:
        s = speed(scenes, model_uri, model, manifest, d, args.repeats)
        ratios = [j / n for j, n in zip(s["job"], s["naive"])]
        print(f"{d.name}: photos/s naive loop {_spread(s['naive'])}, jobs.label --faces {_spread(s['job'])} "
              f"end to end = {_spread(ratios)}x; label stage {_spread(s['stage'])} photos/s "
              f"= {statistics.median(s['stage']) / statistics.median(s['naive']):.2f}x; "
              f"fixed start-up (--limit 1) {_spread(s['fixed_s'])} s; load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
