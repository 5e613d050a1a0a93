"""Does keeping freed memory in glibc's heap speed up training and inference steps?

    python -m bench.malloc_bench [--model emonet_s] [--repeats 5] [--out bench/results/malloc.json]
    python -m bench.malloc_bench --job ../shared/data/fer2013 [--epochs 3] [--repeats 3]

:func:`jobs._train_recipe.keep_freed_memory` raises glibc's mmap and trim thresholds so that a
step's large activations are reused, not page-faulted in afresh every step. The setting is
process-wide and cannot be undone, so each measurement runs in its own child process: pairs of
(glibc defaults, memory kept), the order alternating between pairs, nothing but synthetic tensors
(no data pipeline). Each child times, after warm-up, training steps (forward, backward, AdamW;
batch 128, fp32, channels_last, torch threads = CPUs: the Ray Train worker's step) and inference
forwards (batch 64, the labelling actor's ``infer_batch``). The ratio of each pair is printed with
the median and range over pairs; process start-up and warm-up are outside the timed steps.

``--job DATA`` measures the real thing instead: pairs of whole ``python -m jobs.train`` runs
(``--epochs`` epochs, one worker, local Ray) with ``EMOTION_KEEP_FREED_MEMORY=0`` (glibc's
defaults) and without it, and compares the training images/s of their last epoch (the first
carries the data pipeline's start-up); each job's wall time is printed apart, as its fixed
cost (Ray start-up, decoding, export) is the same either way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import BENCH_ENV


def child(model_name: str, keep: bool, train_steps: int, infer_batches: int) -> dict:
    import resource

    import torch

    from emotion_core.models import create_model
    from jobs._train_recipe import keep_freed_memory, node_cpus

    kept = keep_freed_memory() if keep else False
    torch.set_num_threads(node_cpus())
    torch.manual_seed(0)
    model = create_model(model_name, 7).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    x = torch.randn(128, 1, 48, 48).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (128,))

    def train_step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1).backward()
        opt.step()

    def timed(fn, n: int, images: int) -> float:
        for _ in range(max(3, n // 10)):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return n * images / (time.perf_counter() - t0)

    model.train()
    train_ips = timed(train_step, train_steps, len(x))
    model.eval()
    xi = x[:64].contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        infer_ips = timed(lambda: model(xi).softmax(1), infer_batches, len(xi))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return {"kept": kept, "train_images_per_s": train_ips, "infer_images_per_s": infer_ips, "minor_faults": faults}


def job(data: str, model: str, epochs: int, keep: bool) -> dict:
    """One ``jobs.train`` run in a child process; its last epoch's training images/s."""
    env = {**os.environ, **BENCH_ENV, "EMOTION_KEEP_FREED_MEMORY": "1" if keep else "0"}
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "jobs.train", "--data", data, "--model", model, "--epochs", str(epochs),
               "--output", out, "--name", "run", "--patience", "0", "--max-failures", "0", "--keep", "1"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        history = json.loads((Path(out) / "run" / "metrics.json").read_text())["history"]
    return {"kept": keep, "train_images_per_s": history[-1]["images_per_s"], "wall_s": wall,
            "per_epoch_images_per_s": [h["images_per_s"] for h in history]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="emonet_s")
    p.add_argument("--repeats", type=int, default=5, help="pairs of child processes")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--infer-batches", type=int, default=200)
    p.add_argument("--out", default="bench/results/malloc.json")
    p.add_argument("--child", choices=["default", "kept"], help=argparse.SUPPRESS)
    p.add_argument("--job", metavar="DATA", help="compare whole jobs.train runs on this dataset instead")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each --job run")
    args = p.parse_args(argv)
    if args.repeats <= 0 or args.train_steps <= 0 or args.infer_batches <= 0 or args.epochs < 2:
        p.error("--repeats, --train-steps and --infer-batches must be positive, --epochs at least 2")
    if args.child:
        print(json.dumps(child(args.model, args.child == "kept", args.train_steps, args.infer_batches)))
        return

    def run(mode: str) -> dict:
        if args.job:
            return job(args.job, args.model, args.epochs, mode == "kept")
        cmd = [sys.executable, "-m", "bench.malloc_bench", "--child", mode, "--model", args.model,
               "--train-steps", str(args.train_steps), "--infer-batches", str(args.infer_batches)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    pairs = []
    for i in range(args.repeats):
        order = ("default", "kept") if i % 2 == 0 else ("kept", "default")
        got = {mode: run(mode) for mode in order}
        pairs.append(got)
        d, k = got["default"], got["kept"]
        if args.job:
            print(f"pair {i + 1}: jobs.train last epoch {d['train_images_per_s']:,.0f} -> "
                  f"{k['train_images_per_s']:,.0f} img/s ({k['train_images_per_s'] / d['train_images_per_s']:.2f}x); "
                  f"job wall time {d['wall_s']:.0f} s -> {k['wall_s']:.0f} s", flush=True)
            continue
        print(f"pair {i + 1}: train {d['train_images_per_s']:,.0f} -> {k['train_images_per_s']:,.0f} img/s "
              f"({k['train_images_per_s'] / d['train_images_per_s']:.2f}x), inference "
              f"{d['infer_images_per_s']:,.0f} -> {k['infer_images_per_s']:,.0f} img/s "
              f"({k['infer_images_per_s'] / d['infer_images_per_s']:.2f}x), page faults "
              f"{d['minor_faults']:,} -> {k['minor_faults']:,}", flush=True)
    summary = {}
    for key in ("train_images_per_s",) if args.job else ("train_images_per_s", "infer_images_per_s"):
        ratios = [pr["kept"][key] / pr["default"][key] for pr in pairs]
        summary[key] = {"median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
                        "max_ratio": max(ratios), "ratios": ratios}
        print(f"{key}: memory kept / glibc defaults = {statistics.median(ratios):.2f}x median "
              f"({min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} pairs)")
    result = {"model": args.model, "job": args.job, "epochs": args.epochs if args.job else None,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version()},
              "train_steps": args.train_steps, "infer_batches": args.infer_batches, "pairs": pairs, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
