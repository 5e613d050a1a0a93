"""Train several models on the same split and print one comparison table.

    python -m jobs.compare --data DATA --models cnn,efficientnet_b2,emonet --output runs/compare \\
        [--epochs 10] [any other jobs.train option]

Each model is trained with `jobs.train` (same data, same seeded validation split, same options)
as run OUTPUT/<prefix><model>, so an interrupted comparison resumes model by model. The table
(accuracy and macro-F1 on the test split, or validation when there is none; parameters; training
time; training images/s) is printed and written to OUTPUT/comparison.json and comparison.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from emotion_core import storage


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.compare",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 2)[2]
        + "\nOptions not listed here (--epochs, --batch-size, --lr, --num-workers, --use-gpu, --seed, ...)"
        " are passed to jobs.train for every model; see python -m jobs.train --help.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="dataset URI, as for jobs.train")
    p.add_argument("--models", default="cnn,efficientnet_b2,emonet", help="comma-separated models (default %(default)s)")
    p.add_argument("--output", default="outputs/compare", help="where the runs and the table go (default %(default)s)")
    p.add_argument("--name-prefix", default="compare-", help="run name = prefix + model (default %(default)s)")
    return p


def table(rows: list[dict]) -> str:
    from jobs._train_report import format_rows

    return format_rows(
        ["model", "accuracy", "macro-F1", "params", "train time", "images/s", "epochs", "eval split"],
        [
            [
                r["model"],
                f"{r['accuracy']:.4f}",
                f"{r['macro_f1']:.4f}",
                f"{r['params']:,}",
                f"{r['train_time_s']:.0f}s",
                f"{r['images_per_s']:,.0f}",
                r["epochs"],
                r["eval_split"],
            ]
            for r in rows
        ],
    )


def main(argv: list[str] | None = None) -> int:
    from emotion_core.checkpoint import CheckpointError
    from emotion_core.models import list_models
    from jobs import train

    args, rest = build_parser().parse_known_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in list_models()]
    if not models or unknown:
        print(f"error: --models: unknown model(s) {', '.join(unknown) or '(none given)'}; "
              f"choose from {', '.join(list_models())}", file=sys.stderr)
        return 2
    parser = train.build_parser()
    runs = []
    for m in models:
        argv_m = ["--data", args.data, "--model", m, "--output", args.output, "--name", f"{args.name_prefix}{m}", *rest]
        try:
            runs.append((m, parser.parse_args(argv_m)))
        except SystemExit as e:  # argparse already printed the problem
            return int(e.code or 2)

    rows = []
    for m, targs in runs:
        print(f"\n[compare] === {m}")
        try:
            report = train.run(targs)
        except train.UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (train.TrainingError, storage.StorageError, CheckpointError) as e:
            print(f"error: {m}: {e}", file=sys.stderr)
            return 1
        rows.append(
            {
                "model": m,
                "accuracy": report["test"]["accuracy"],
                "macro_f1": report["test"]["macro_f1"],
                "params": report["num_parameters"],
                "train_time_s": report["train_time_s"],
                "images_per_s": report["images_per_s"],
                "epochs": report["epochs_completed"],
                "eval_split": report["eval_split"],
                "model_uri": report["model_uri"],
            }
        )
    text = table(rows)
    print("\n[compare] results\n" + text)
    storage.write_bytes(storage.join(args.output, "comparison.json"), json.dumps(rows, indent=1).encode())
    storage.write_bytes(storage.join(args.output, "comparison.md"), ("```\n" + text + "\n```\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
