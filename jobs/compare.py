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
from emotion_core.models import list_models

from . import _cli, train
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
    return p


def table(rows: list[dict]) -> str:
    return _cli.format_table(
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


def run(args: argparse.Namespace, rest: list[str]) -> list[dict]:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in list_models()]
    if not models or unknown:
        raise UsageError(f"--models: unknown model(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(list_models())}")
    parser = train.build_parser()
    runs = [(m, parser.parse_args(["--data", args.data, "--model", m, "--output", args.output,
                                   "--name", f"{args.name_prefix}{m}", *rest])) for m in models]
    rows = []
    for m, targs in runs:
        _cli.say("compare", f"=== {m}")
        report = train.run(targs)
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
    _cli.say("compare", "results\n" + text)
    storage.write_bytes(storage.join(args.output, "comparison.json"), json.dumps(rows, indent=1).encode())
    storage.write_bytes(storage.join(args.output, "comparison.md"), ("```\n" + text + "\n```\n").encode())
    return rows


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    return _cli.run_main("jobs.compare", lambda: run(args, rest))


if __name__ == "__main__":
    sys.exit(main())
