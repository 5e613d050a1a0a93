"""Train an emotion classifier on Ray Train, evaluate it, export it, optionally publish it.

    python -m jobs.train --data DATA --model emonet --output runs [--name RUN] [--epochs 30]
        [--batch-size 128] [--lr 0.002] [--num-workers 1] [--use-gpu] [--init-weights URI]
        [--seed 0] [--publish runs/latest.json]

DATA is a Kaggle-layout folder, a .zip of one, or an s3:// prefix (train/ with test/ and/or
validation/; without validation/ a stratified, seeded split is carved from train). Without
RAY_ADDRESS an embedded local Ray is started; with it (or under `ray job submit`) the job joins
that cluster. Everything lands in OUTPUT/NAME/: Ray Train checkpoints (checkpoint_*/), split.json,
metrics.json, confusion_matrix.png, training_curves.png and the exported model in model/.
Running the same command again with the same --name resumes from the latest checkpoint.

Exit codes: 0 success, 2 bad input (nothing started or published), 1 training failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from emotion_core import storage

DEFAULTS = {
    "model": "emonet",
    "output": "outputs/runs",
    "epochs": 30,
    "batch_size": 128,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "num_workers": 1,
    "seed": 0,
    "val_fraction": 0.1,
    "patience": 10,
    "label_smoothing": 0.1,
    "warmup_epochs": 1.0,
    "keep": 2,
    "max_failures": 2,
}


class UsageError(ValueError):
    """Bad input: one line for stderr, exit code 2."""


class TrainingError(RuntimeError):
    """Training started but failed: exit code 1."""


def build_parser() -> argparse.ArgumentParser:
    from emotion_core.models import model_descriptions

    models = model_descriptions()
    p = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description=__doc__.split("\n\n", 1)[0],
        epilog="\n".join(["models:"] + [f"  {k:16} {v}" for k, v in models.items()]) + "\n\n" + __doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = DEFAULTS
    p.add_argument("--data", required=True, help="dataset: local folder, .zip (local or s3://) or s3://bucket/prefix in Kaggle layout")
    p.add_argument("--model", default=d["model"], help=f"architecture: {', '.join(models)} (default %(default)s)")
    p.add_argument("--output", default=d["output"], help="where runs live: local folder or s3://bucket/prefix (default %(default)s)")
    p.add_argument("--name", default=None, help="run name under --output; the same name resumes that run (default: the model name)")
    p.add_argument("--epochs", type=int, default=d["epochs"], help="total epochs, counting epochs of a resumed run (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch size, split evenly over workers (default %(default)s)")
    p.add_argument("--lr", type=float, default=d["lr"], help="peak AdamW learning rate after warm-up (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay, not applied to biases/norms (default %(default)s)")
    p.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"], help="linear LR warm-up before cosine decay (default %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=d["label_smoothing"], help="cross-entropy label smoothing (default %(default)s)")
    p.add_argument("--class-weighting", choices=["none", "sqrt", "balanced"], default="none",
                   help="weight the loss by inverse class frequency (balanced) or its square root; helps rare classes such as disgust (default %(default)s)")
    p.add_argument("--num-workers", type=int, default=d["num_workers"], help="Ray Train workers (DDP processes) (default %(default)s)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker; AMP (bf16 where supported) and channels_last")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="autocast precision; auto = bf16 on GPUs that support it (else fp16) and on CPUs with native "
                        "bf16 (AVX512-BF16/AMX, about 2x faster there), fp32 otherwise (default %(default)s)")
    p.add_argument("--init-weights", default=None, help="start from this weights file (.safetensors or .pth, local or s3://); the head is re-initialised if only the class count differs")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed for the validation split, initialisation, shuffling and augmentation (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"], help="fraction of train carved out per class when there is no validation/ split (default %(default)s)")
    p.add_argument("--monitor", choices=["macro_f1", "accuracy"], default="macro_f1", help="validation metric for early stopping and best checkpoint (default %(default)s)")
    p.add_argument("--patience", type=int, default=d["patience"], help="stop after this many epochs without improvement of --monitor; 0 disables (default %(default)s)")
    p.add_argument("--keep", type=int, default=d["keep"], help="checkpoints to keep: the best K by --monitor, plus the latest (default %(default)s)")
    p.add_argument("--max-failures", type=int, default=d["max_failures"], help="worker-group restarts from the last checkpoint after a failure (default %(default)s)")
    p.add_argument("--no-augment", action="store_true", help="disable training augmentation")
    p.add_argument("--publish", default=None, help="after a successful run, atomically write a pointer JSON (e.g. s3://b/models/latest.json) naming the exported model")
    p.add_argument("--quiet", action="store_true", help="less Ray logging")
    return p


def validate_args(args) -> None:
    from emotion_core.models import list_models

    if args.model not in list_models():
        raise UsageError(f"unknown model {args.model!r}: use --model with one of {', '.join(list_models())}")
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--num-workers", args.num_workers), ("--keep", args.keep)):
        if value <= 0:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.patience < 0 or args.max_failures < 0 or args.warmup_epochs < 0 or args.weight_decay < 0:
        raise UsageError("--patience, --max-failures, --warmup-epochs and --weight-decay must not be negative")
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    args.name = args.name or args.model
    try:  # absolute local paths: the published pointer and the manifest must not depend on the cwd
        args.output = storage.parse(args.output).uri
    except storage.StorageError as e:
        raise UsageError(f"--output: {e}") from e
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.name):
        raise UsageError(f"--name {args.name!r}: use letters, digits, '.', '_' or '-' (no slashes)")
    if args.publish and not args.publish.endswith(".json"):
        raise UsageError(f"--publish {args.publish!r} must be a .json pointer path, e.g. .../latest.json")


# ---------------------------------------------------------------------------------------------
# Ray


def ensure_ray(quiet: bool = False):
    """Join RAY_ADDRESS (or the cluster of `ray job submit`), reuse an initialised Ray (tests,
    notebooks), or start an embedded local one."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_ACCEPT_CPU_ONLY", "1")
        kwargs = {"include_dashboard": False} if not os.environ.get("RAY_ADDRESS") else {}
        if quiet:
            kwargs["log_to_driver"] = True
            kwargs["logging_level"] = "warning"
        ray.init(**kwargs)
    return ray


def check_resources(num_workers: int, use_gpu: bool) -> None:
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    if num_workers > cpus:
        raise UsageError(
            f"--num-workers {num_workers} needs {num_workers} CPUs but the Ray cluster has {cpus:g}; "
            f"use --num-workers {max(1, int(cpus))} or fewer, or add nodes"
        )
    if use_gpu and num_workers > gpus:
        raise UsageError(
            f"--use-gpu with --num-workers {num_workers} needs {num_workers} GPUs but the cluster has {gpus:g}; "
            "lower --num-workers or drop --use-gpu"
        )


# ---------------------------------------------------------------------------------------------
# Checkpoints of an existing run


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints


def _checkpoint_dirs(run_uri: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(run_uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise UsageError(f"cannot list run folder {run_uri}: {storage._short(e)}") from e
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def _snapshot(run_uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(run_uri, SNAPSHOT_FILE)))
    except (storage.StorageError, ValueError):
        return None


def latest_run_state(run_uri: str) -> dict | None:
    """state.json of the checkpoint Ray Train will resume ``run_uri`` from, or None for a new run.

    Ray Train V2 restores a run from its snapshot file (the latest *registered* checkpoint) when
    the same storage_path/name is used again; a checkpoint written just before a crash may not be
    registered yet, so the snapshot is the truth and the newest checkpoint dir only a fallback."""
    snap = _snapshot(run_uri)
    names = []
    latest = (snap or {}).get("latest_checkpoint_result") or {}
    if latest.get("checkpoint_dir_name"):
        names.append(latest["checkpoint_dir_name"])
    elif snap is None:
        names = _checkpoint_dirs(run_uri)[::-1]
    for name in names:
        try:
            return json.loads(storage.read_bytes(storage.join(run_uri, name, "state.json")))
        except (storage.StorageError, ValueError):
            continue
    return None


def remove_orphan_checkpoints(run_uri: str) -> None:
    """Delete checkpoint dirs that Ray Train does not track (written by a run killed before it
    registered them); the kept best-k and latest stay."""
    snap = _snapshot(run_uri)
    if snap is None:
        return
    tracked = {r.get("checkpoint_dir_name") for r in snap.get("checkpoint_results", [])}
    tracked.add((snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name"))
    for name in _checkpoint_dirs(run_uri):
        if name not in tracked:
            storage.delete_dir(storage.join(run_uri, name))


# ---------------------------------------------------------------------------------------------
# The job


def run(args, log=print) -> dict:
    """Validate, train, evaluate, export, publish. Returns a summary dict. Raises UsageError /
    TrainingError."""
    validate_args(args)
    from emotion_core.models import create_model, get_input_spec
    from jobs import _data

    spec = get_input_spec(args.model)
    try:
        storage.check_writable(args.output)
        if args.publish:
            storage.check_writable(args.publish.rsplit("/", 1)[0] if "/" in args.publish else ".")
    except storage.StorageError as e:
        raise UsageError(f"{e}; fix --output/--publish or the credentials") from e
    try:
        splits = _data.discover(args.data, val_fraction=args.val_fraction, seed=args.seed)
    except _data.DataError as e:
        raise UsageError(str(e)) from e
    classes = splits.classes
    if args.init_weights:
        try:
            create_model(args.model, len(classes), init_weights=args.init_weights)
        except ValueError as e:
            raise UsageError(f"--init-weights: {e}") from e

    run_uri = storage.join(args.output, args.name)
    run_key = {"model": args.model, "classes": classes, "fingerprint": splits.fingerprint}
    previous = latest_run_state(run_uri)
    if previous is not None and previous.get("run_key") != run_key:
        old = previous.get("run_key") or {}
        what = "model" if old.get("model") != args.model else "classes" if old.get("classes") != classes else "data"
        raise UsageError(
            f"run {run_uri} already holds checkpoints with a different {what}; "
            "pass a new --name (or the original --data/--model to resume it)"
        )

    ensure_ray(args.quiet)
    from jobs._train_loop import quiet_ray_logs

    quiet_ray_logs()
    check_resources(args.num_workers, args.use_gpu)
    log(f"[train] data {args.data}: {len(classes)} classes ({', '.join(classes)}); "
        f"train {len(splits.train)}, validation {len(splits.validation)} ({splits.val_source}), test {len(splits.test)}")
    t_decode = time.perf_counter()
    decoded = _data.decode_splits(splits, spec, seed=args.seed)
    train_counts = _data.class_counts(decoded.datasets["train"], len(classes)) if "train" in decoded.datasets else None
    if train_counts is None or (train_counts == 0).any():
        empty = [c for c, n in zip(classes, train_counts if train_counts is not None else [0] * len(classes)) if n == 0]
        raise UsageError(f"--data {args.data}: no readable training images for class(es) {', '.join(empty)}")
    if decoded.counts.get("validation", 0) == 0:
        raise UsageError(f"--data {args.data}: no readable validation images")
    log(f"[train] decoded {sum(decoded.counts.values())} images in {time.perf_counter() - t_decode:.1f}s"
        + (f"; skipped {len(decoded.skipped)} unreadable" if decoded.skipped else ""))
    storage.write_bytes(storage.join(run_uri, "split.json"), json.dumps(splits.split_record(), indent=1).encode())

    from jobs._train_loop import class_weights

    config = {
        "model": args.model,
        "classes": classes,
        "input_spec": spec.to_dict(),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs,
        "label_smoothing": args.label_smoothing,
        "class_weighting": args.class_weighting,
        "class_weights": class_weights(train_counts, args.class_weighting),
        "monitor": args.monitor,
        "patience": args.patience,
        "seed": args.seed,
        "use_gpu": args.use_gpu,
        "precision": args.precision,
        "channels_last": True,
        "num_workers": args.num_workers,
        "init_weights": args.init_weights,
        "train_size": decoded.counts["train"],
        "augment": {"shift": 0, "rotate_deg": 0, "zoom": 0, "hflip": False, "brightness": 0, "contrast": 0}
        if args.no_augment else {},
        "run_key": run_key,
    }
    if previous is not None:
        log(f"[train] resuming run {run_uri} after epoch {previous.get('epoch')} (of {args.epochs})")
    result = _fit(args, config, decoded, run_uri)
    remove_orphan_checkpoints(run_uri)

    metric = "val_macro_f1" if args.monitor == "macro_f1" else "val_acc"
    best = result.get_best_checkpoint(metric, "max") if result.best_checkpoints else None
    if best is None:
        best = result.checkpoint
    if best is None:
        raise TrainingError("training produced no checkpoint")
    latest = result.checkpoint or best
    with latest.as_directory() as d:
        from jobs._train_loop import read_state_json

        state = read_state_json(d)
    history = state["history"]
    best_epoch = state.get("best_epoch")

    eval_split = splits.eval_split
    cm = _evaluate(best, decoded.datasets[eval_split], config)
    from emotion_core import metrics as M
    from jobs import _train_report as R

    summary = M.summary(cm, classes)
    log(f"\n[train] {eval_split} split, best checkpoint (epoch {best_epoch}, by val {args.monitor}):")
    log(M.format_table(summary))
    if decoded.skipped:
        reasons: dict[str, int] = {}
        for s in decoded.skipped:
            reasons[s["error"].split(":", 1)[0]] = reasons.get(s["error"].split(":", 1)[0], 0) + 1
        log(f"[train] skipped {len(decoded.skipped)} unreadable image(s): "
            + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
            + "; e.g. " + ", ".join(s["path"] for s in decoded.skipped[:3]))

    model_uri, manifest, n_params = _export(best, config, splits, summary, history, best_epoch, run_uri, eval_split)
    train_time = sum(h["epoch_time_s"] for h in history)
    images_per_s = (sum(h["images_per_s"] * h["epoch_time_s"] for h in history) / train_time) if train_time else 0.0
    report = {
        "run": run_uri,
        "model": args.model,
        "model_uri": model_uri,
        "version": manifest.version,
        "num_parameters": n_params,
        "eval_split": eval_split,
        "test": summary,
        "best_epoch": best_epoch,
        "epochs_completed": state["epoch"],
        "stopped_early": state["epoch"] < args.epochs,
        "history": history,
        "train_time_s": train_time,
        "images_per_s": images_per_s,
        "data": splits.manifest(),
        "skipped_images": decoded.skipped,
        "config": {k: v for k, v in config.items() if k not in ("run_key",)},
    }
    storage.write_bytes(storage.join(run_uri, "metrics.json"), json.dumps(report, indent=1).encode())
    storage.write_bytes(storage.join(run_uri, "confusion_matrix.png"),
                        R.confusion_matrix_png(cm, classes, f"{args.model} on {eval_split} (acc {summary['accuracy']:.3f})"))
    storage.write_bytes(storage.join(run_uri, "training_curves.png"), R.training_curves_png(history, f"{args.model} ({args.name})"))
    log(f"[train] accuracy {summary['accuracy']:.4f}, macro-F1 {summary['macro_f1']:.4f}; model exported to {model_uri}")
    log(f"[train] artifacts: {run_uri}/metrics.json, confusion_matrix.png, training_curves.png")
    if args.publish:
        from emotion_core.checkpoint import write_pointer

        write_pointer(args.publish, model_uri, manifest)
        log(f"[train] published {args.publish} -> {model_uri} (version {manifest.version})")
    return report


def _fit(args, config: dict, decoded, run_uri: str):
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs._train_loop import train_loop_per_worker

    loc = storage.parse(args.output)
    fs, path = storage.filesystem(args.output)
    run_config = ray.train.RunConfig(
        name=args.name,
        storage_path=path,
        storage_filesystem=fs if loc.is_s3 else None,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=args.keep,
            checkpoint_score_attribute="val_macro_f1" if args.monitor == "macro_f1" else "val_acc",
            checkpoint_score_order="max",
        ),
        failure_config=ray.train.FailureConfig(max_failures=args.max_failures),
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu),
        run_config=run_config,
        datasets={"train": decoded.datasets["train"].randomize_block_order(), "validation": decoded.datasets["validation"]},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    try:
        return trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError and friends
        raise TrainingError(f"training failed: {_root_cause(e)}") from e


def _root_cause(e: BaseException) -> str:
    """One line for a Ray Train failure: the last line of the first worker's traceback."""
    failures = getattr(e, "worker_failures", None) or {}
    inner = next(iter(failures.values()), None) or getattr(e, "controller_failure", None) or e
    lines = [ln.strip() for ln in str(inner).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(inner).__name__)[:300]


def _evaluate(checkpoint, dataset, config: dict):
    """Score a checkpoint on a decoded dataset in a Ray task (on a GPU node when training used GPUs)."""
    import numpy as np
    import ray

    from jobs._train_loop import evaluate_checkpoint

    task = ray.remote(evaluate_checkpoint).options(num_cpus=1, num_gpus=1 if config["use_gpu"] else 0)
    return np.asarray(ray.get(task.remote(checkpoint, dataset, config)), dtype=np.int64)


def _export(best, config, splits, summary, history, best_epoch, run_uri, eval_split):
    from emotion_core.checkpoint import ModelManifest, save_model
    from emotion_core.models import count_parameters, create_model
    from emotion_core.preprocess import InputSpec
    from jobs._train_loop import load_state

    model = create_model(config["model"], len(config["classes"]))
    with best.as_directory() as d:
        load_state(d, model=model)
    metrics = {
        "eval_split": eval_split,
        "accuracy": summary["accuracy"],
        "macro_f1": summary["macro_f1"],
        "per_class": summary["per_class"],
        "best_epoch": best_epoch,
        "val": next((h for h in history if h["epoch"] == best_epoch), None),
    }
    training_config = {k: v for k, v in config.items() if k not in ("run_key", "classes", "input_spec")}
    training_config["data"] = splits.manifest()
    manifest = ModelManifest(
        architecture=config["model"],
        classes=list(config["classes"]),
        input_spec=InputSpec.from_dict(config["input_spec"]),
        metrics=metrics,
        training_config=training_config,
        dataset_fingerprint=splits.fingerprint,
    )
    model_uri = save_model(storage.join(run_uri, "model"), model, manifest)
    return model_uri, manifest, count_parameters(model)


def main(argv: list[str] | None = None) -> int:
    from emotion_core.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, storage.StorageError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
