"""Recipe ablation: one training option at a time against the same time budget, one process.

    python -m bench.recipe_ablation [--data ../shared/data/fer2013] [--model emonet_lite]
                                    [--minutes 4] [--out bench/results/recipe_ablation.json]
                                    [--only recipe,no_ema,...]

Every variant is `jobs.train` (`train.run`, in this process, one Ray) on the same seeded
validation split with the same --time-budget; each variant differs from `recipe` in exactly one
option (see VARIANTS), except `sqrt_only`: jobs.train's defaults (no EMA, no random erasing, sqrt
class weighting) with TTA flip, the recipe the ablation led to. `recipe_seed1` repeats `recipe`
with another --seed (which also draws another validation split, of the same size and class
balance): the run-to-run spread a difference must beat.
Accuracy with and without TTA comes from the same run (metrics.json's `without_tta`).

A short budget ranks options for a short budget: regularisers (erasing, mixup/cutmix) tend to
pay off only with more epochs than a few minutes buy, so read the table with the budget in mind.
Runs go to a temporary folder unless --runs is given; the table is printed and --out written.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from bench._common import BENCH_ENV

# --class-weighting none: the recipe as first measured (sqrt became jobs.train's default after it).
COMMON = ["--tta", "flip", "--class-weighting", "none"]
RECIPE = ["--ema", "0.999", "--random-erasing", "0.25", *COMMON]
VARIANTS: dict[str, list[str]] = {
    "recipe": RECIPE,
    "recipe_seed1": [*RECIPE, "--seed", "1"],
    "no_ema": ["--random-erasing", "0.25", *COMMON],
    "no_random_erasing": ["--ema", "0.999", *COMMON],
    "sqrt_only": ["--tta", "flip", "--class-weighting", "sqrt"],  # jobs.train's defaults + TTA
    "class_weighting_sqrt": [*RECIPE, "--class-weighting", "sqrt"],
    "mixup_cutmix": [*RECIPE, "--mixup", "0.2", "--cutmix", "1.0", "--mix-prob", "0.5"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/fer2013")
    p.add_argument("--model", default="emonet_lite")
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants (default: all)")
    p.add_argument("--runs", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--out", default="bench/results/recipe_ablation.json")
    args = p.parse_args(argv)
    for k, v in BENCH_ENV.items():
        os.environ.setdefault(k, v)
    from jobs import train

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"--only: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    runs = args.runs or tempfile.mkdtemp(prefix="recipe-ablation-")
    rows = []
    for name in names:
        targs = train.build_parser().parse_args([
            "--data", args.data, "--model", args.model, "--output", runs, "--name", name,
            "--time-budget", str(args.minutes), "--epochs", "200", *VARIANTS[name]])
        t0 = time.perf_counter()
        report = train.run(targs)
        test = report["test"]
        rows.append({
            "variant": name, "options": " ".join(VARIANTS[name]),
            "accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
            "accuracy_without_tta": test.get("without_tta", {}).get("accuracy", test["accuracy"]),
            "disgust_recall": test["per_class"].get("disgust", {}).get("recall"),
            "epochs": report["epochs_completed"], "loop_time_s": report["loop_time_s"],
            "images_per_s": report["images_per_s"], "wall_s": time.perf_counter() - t0,
            "load_avg": os.getloadavg(),
        })
        print(f"[ablation] {name}: acc {test['accuracy']:.4f} macro-F1 {test['macro_f1']:.4f} "
              f"epochs {report['epochs_completed']}", flush=True)
        write_table(rows, args.model, args.minutes, args.data, args.out)
    return 0


def write_table(rows: list[dict], model: str, minutes: float, data: str, out: str) -> None:
    """Print the table so far and rewrite --out: a stopped ablation keeps the variants it finished."""
    base = next((r for r in rows if r["variant"] == "recipe"), rows[0])
    print(f"\nmodel {model}, --time-budget {minutes} min, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| variant | options | val acc (TTA flip) | without TTA | macro-F1 | disgust recall | epochs | Δ acc |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | `{r['options']}` | {r['accuracy']:.1%} | {r['accuracy_without_tta']:.1%} | "
              f"{r['macro_f1']:.3f} | {r['disgust_recall'] or 0:.2f} | {r['epochs']} | "
              f"{(r['accuracy'] - base['accuracy']) * 100:+.1f} |", flush=True)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"model": model, "minutes": minutes, "data": data, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
