"""Train several models on the same split and compare them in one table and one plot.

    python -m jobs.compare --data DATA --models cnn,efficientnet_b2,emonet --output runs/compare \\
        [--epochs 10 | --time-budget 30] [--classes happy,sad] [any other jobs.train option]

Each model is trained with `jobs.train` (same data, same seeded validation split, same options,
e.g. the same --time-budget) as run OUTPUT/<prefix><model>, so an interrupted comparison resumes
model by model. The table has accuracy and macro-F1 on the test split (validation when there is
none), recall per class, parameters, training time and training images/s, and labelling
images/s; it is printed and written to OUTPUT/comparison.json and, as a Markdown table ready for
the README, OUTPUT/comparison.md. OUTPUT/val_accuracy_vs_minutes.png plots validation accuracy
against wall-clock training minutes for every model.

Labelling images/s is measured in this process on the labelling actor's own inference path,
`jobs._label_infer.Labeller.label_images` (decode of the encoded image bytes with the shared
preprocessing, normalisation, the traced CPU model or the fp16 GPU model, softmax, the result
rows), on up to --label-images encoded images of the evaluation split, with as many torch
threads as this machine's CPUs, on CPU (or the GPU with --use-gpu): one warm-up pass, then
--label-repeats timed passes; the median is in the table and every pass in comparison.json.
Fetching from storage is not included (the bytes are read first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from emotion_core import storage
from emotion_core.models import list_models

from . import _cli, _train_data, _train_report, train
from ._cli import UsageError


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m jobs.compare",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 2)[2]
        + "\nOptions not listed here (--epochs, --batch-size, --lr, --num-workers, --use-gpu, --seed, ...)"
        " are passed to jobs.train for every model; see python -m jobs.train --help.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="dataset URI, as for jobs.train")
    p.add_argument("--models", default="cnn,efficientnet_b2,emonet",
                   help="comma-separated models (default %(default)s)")
    p.add_argument("--output", default="outputs/compare",
                   help="where the runs and the table go (default %(default)s)")
    p.add_argument("--name-prefix", default="compare-", help="run name = prefix + model (default %(default)s)")
    p.add_argument("--label-images", type=int, default=1000,
                   help="encoded evaluation images for the labelling images/s measurement; 0 skips it "
                        "(default %(default)s)")
    p.add_argument("--label-repeats", type=int, default=3,
                   help="timed passes of the labelling measurement (default %(default)s)")
    return p


def table_rows(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Headers and cells of the comparison table (recall per class of the first model's classes)."""
    classes = rows[0]["classes"] if rows else []
    headers = (["model", "accuracy", "macro-F1"] + [f"recall {c}" for c in classes]
               + ["params", "train time", "train img/s", "label img/s", "epochs", "eval split"])
    cells = [
        [r["model"], f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}"]
        + [f"{r['recall'].get(c, 0.0):.3f}" for c in classes]
        + [f"{r['params']:,}", f"{r['train_time_s']:.0f}s", f"{r['images_per_s']:,.0f}",
           f"{r['label_images_per_s']:,.0f}" if r.get("label_images_per_s") else "-", r["epochs"], r["eval_split"]]
        for r in rows
    ]
    return headers, cells


def table(rows: list[dict]) -> str:
    return _cli.format_table(*table_rows(rows))


def label_images_per_s(model_uri: str, datas: list[bytes], *, device: str = "cpu",
                       repeats: int = 3) -> list[float]:
    """Images/s of the labelling actor's inference path on encoded images (module doc), one
    figure per timed pass."""
    from emotion_core.checkpoint import load_manifest

    from ._label_infer import Labeller, image_rows
    from ._train_recipe import node_cpus

    manifest = load_manifest(model_uri)
    labeller = Labeller(model_uri, manifest.version, manifest.weights_sha256,
                        {"model_name": manifest.architecture, "model_version": manifest.version, "run_id": "compare"},
                        out_dir="", device=device, threads=node_cpus(),
                        tta=(manifest.training_config or {}).get("tta") or "none")
    chunk = labeller.chunk_rows

    def rows(n: int):
        return image_rows({"image_uri": [f"eval/{i}" for i in range(n)], "shard_uri": [None] * n,
                            "shard_member": [None] * n, "etag": [None] * n, "size_bytes": [None] * n,
                            "last_modified": [None] * n, "error": [None] * n})

    labeller.label_images(rows(min(len(datas), labeller.infer_batch)), datas[: labeller.infer_batch])  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for start in range(0, len(datas), chunk):
            part = datas[start : start + chunk]
            labeller.label_images(rows(len(part)), part)
        rates.append(len(datas) / max(time.perf_counter() - t0, 1e-9))
    return rates


def eval_image_bytes(targs: argparse.Namespace, limit: int) -> list[bytes]:
    """Up to ``limit`` encoded images of the evaluation split (as jobs.train split the data)."""
    splits = _train_data.discover(targs.data, val_fraction=targs.val_fraction, seed=targs.seed,
                                  classes=train.class_subset(targs.classes))
    return [d for d in _train_data.read_bytes(splits, getattr(splits, splits.eval_split)[:limit]) if d]


def run(args: argparse.Namespace, rest: list[str]) -> list[dict]:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in list_models()]
    if not models or unknown:
        raise UsageError(f"--models: unknown model(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(list_models())}")
    if args.label_images < 0 or args.label_repeats <= 0:
        raise UsageError("--label-images must not be negative and --label-repeats must be positive")
    parser = train.build_parser()
    runs = [(m, parser.parse_args(["--data", args.data, "--model", m, "--output", args.output,
                                   "--name", f"{args.name_prefix}{m}", *rest])) for m in models]
    rows, curves, datas = [], {}, None
    for m, targs in runs:
        _cli.say("compare", f"=== {m}")
        report = train.run(targs)
        test = report["test"]
        row = {
            "model": m,
            "accuracy": test["accuracy"],
            "macro_f1": test["macro_f1"],
            "classes": test["classes"],
            "recall": {c: v["recall"] for c, v in test["per_class"].items()},
            "params": report["num_parameters"],
            "train_time_s": report["train_time_s"],
            "images_per_s": report["images_per_s"],
            "epochs": report["epochs_completed"],
            "eval_split": report["eval_split"],
            "model_uri": report["model_uri"],
            "time_budget": report.get("time_budget"),
        }
        if args.label_images:
            datas = datas if datas is not None else eval_image_bytes(targs, args.label_images)
            rates = label_images_per_s(report["model_uri"], datas, device="cuda" if targs.use_gpu else "cpu",
                                       repeats=args.label_repeats)
            row.update(label_images_per_s=statistics.median(rates), label_images_per_s_runs=rates,
                       label_images=len(datas))
            _cli.say("compare", f"{m}: labelling {row['label_images_per_s']:,.0f} images/s "
                                f"(median of {len(rates)}: {', '.join(f'{r:,.0f}' for r in rates)})")
        rows.append(row)
        curves[m] = report["history"]
    text = table(rows)
    _cli.say("compare", "results\n" + text)
    storage.write_bytes(storage.join(args.output, "comparison.json"), json.dumps(rows, indent=1).encode())
    md = _train_report.markdown_table(*table_rows(rows))
    note = (f"\n\nMeasured {time.strftime('%Y-%m-%d')}; accuracy, macro-F1 and recall on the {rows[0]['eval_split']} "
            "split; train img/s over the training passes; label img/s: `Labeller.label_images` in one process "
            f"(decode + model + result rows, {'GPU' if runs[0][1].use_gpu else 'CPU'}), median of "
            f"{args.label_repeats} passes. Curves: `val_accuracy_vs_minutes.png`.\n")
    storage.write_bytes(storage.join(args.output, "comparison.md"), (md + note).encode())
    storage.write_bytes(storage.join(args.output, "val_accuracy_vs_minutes.png"),
                        _train_report.val_accuracy_vs_minutes_png(curves, "validation accuracy vs training time"))
    return rows


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    return _cli.run_main("jobs.compare", lambda: run(args, rest))


if __name__ == "__main__":
    sys.exit(main())
