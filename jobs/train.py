"""Train an emotion classifier on Ray Train, evaluate it, export it, optionally publish it.

    python -m jobs.train --data DATA --output runs [--model emonet_s] [--name RUN] [--epochs 30]
        [--time-budget MINUTES] [--batch-size 128] [--lr 0.002] [--num-workers 1] [--use-gpu]
        [--init-weights URI] [--seed 0] [--publish runs/latest.json]

DATA is a Kaggle-layout folder, a .zip of one, or an s3:// prefix (train/ with test/ and/or
validation/; without validation/ a stratified, seeded split is carved from train). Without
RAY_ADDRESS an embedded local Ray is started; with it (or under `ray job submit`) the job joins
that cluster. Everything lands in OUTPUT/NAME/: Ray Train checkpoints (checkpoint_*/), split.json,
metrics.json, confusion_matrix.png, training_curves.png and the exported model in model/.
Running the same command again with the same --name resumes from the latest checkpoint.

--time-budget MINUTES thinks in time, not epochs: the first epoch (train + validation) is timed,
the number of epochs is set to what fits in the budget (--epochs is then only a cap, 1,000 unless
given), and the warm-up + cosine LR schedule is set to end there; while the cosine is in its first
half the number is corrected from the steady time of the later epochs (the first is the slowest). The
budget is the wall-clock time of the training loop; Ray start-up, data decoding, the final
evaluation and the export are not in it.
The decision is printed, stored in the run's progress (a resumed run keeps it) and in
metrics.json ("time_budget"). Early stopping is off for a budgeted run unless --patience is given:
the cosine schedule is meant to run to its end.

Exit codes: 0 success, 2 bad input (nothing started or published), 1 training failed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import numpy as np
import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from emotion_core import metrics as M
from emotion_core import storage
from emotion_core.checkpoint import CheckpointError, ModelManifest, export_model, read_pointer, write_pointer
from emotion_core.faces import DetectorUnavailableError, list_detectors
from emotion_core.models import count_parameters, create_model, list_models, model_descriptions, resolve_input_spec
from emotion_core.tta import TTA_MODES

from . import _cli, _train_data, _train_report, _train_state
from ._cli import JobError, UsageError
from ._train_config import TrainConfig
from ._train_recipe import class_weights
from ._train_worker import evaluate_checkpoint, train_func

JOB = "train"
DEFAULT_EPOCHS = 30
BUDGET_EPOCH_CAP = 1000  # with --time-budget the budget decides the epochs; this only bounds a tiny dataset's run
DEFAULT_PATIENCE = 10  # 0 (off) with --time-budget: a budgeted cosine schedule is meant to run to its end


def build_parser() -> argparse.ArgumentParser:
    models = model_descriptions()
    p = _cli.ArgumentParser(
        prog="python -m jobs.train",
        description=__doc__.split("\n\n", 1)[0],
        epilog="\n".join(["models:"] + [f"  {k:16} {v}" for k, v in models.items()])
        + "\n\n" + __doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--data", required=True,
      help="dataset: local folder, .zip (local or s3://) or s3://bucket/prefix in Kaggle layout")
    a("--model", default="emonet_s", help=f"architecture: {', '.join(models)} (default %(default)s)")
    a("--output", default="outputs/runs",
      help="where runs live: local folder or s3://bucket/prefix (default %(default)s)")
    a("--name", default=None, help="run name under --output; the same name resumes that run (default: the model name)")
    a("--epochs", type=int, default=None,
      help=f"total epochs, counting epochs of a resumed run (default {DEFAULT_EPOCHS}; with --time-budget the "
           f"budget decides and this is only a cap, default {BUDGET_EPOCH_CAP})")
    a("--batch-size", type=int, default=128, help="global batch size, split evenly over workers (default %(default)s)")
    a("--lr", type=float, default=2e-3, help="peak AdamW learning rate after warm-up (default %(default)s)")
    a("--weight-decay", type=float, default=0.05,
      help="AdamW weight decay, not applied to biases/norms (default %(default)s)")
    a("--warmup-epochs", type=float, default=1.0, help="linear LR warm-up before cosine decay (default %(default)s)")
    a("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing (default %(default)s)")
    a("--class-weighting", choices=["none", "sqrt", "balanced"], default="sqrt",
      help="weight the loss by inverse class frequency (balanced) or its square root; helps rare classes "
           "such as disgust: on FER2013 sqrt took macro-F1 from 0.49 to 0.56, see README (default %(default)s)")
    a("--num-workers", type=int, default=1, help="Ray Train workers (DDP processes) (default %(default)s)")
    a("--use-gpu", action="store_true", help="one GPU per worker; AMP (bf16 where supported) and channels_last")
    a("--precision", choices=["auto", "fp32", "bf16"], default="auto",
      help="autocast precision; auto = bf16 on GPUs that support it (else fp16) and on CPUs with native "
           "bf16 (AVX512-BF16/AMX, about 2x faster there), fp32 otherwise (default %(default)s)")
    a("--init-weights", default=None,
      help="start from this weights file (.safetensors or .pth, local or s3://); the head is re-initialised "
           "if only the class count differs")
    a("--seed", type=int, default=0,
      help="seed for the validation split, initialisation, shuffling and augmentation (default %(default)s)")
    a("--val-fraction", type=float, default=0.1,
      help="fraction of train carved out per class when there is no validation/ split (default %(default)s)")
    a("--monitor", choices=["macro_f1", "accuracy"], default="macro_f1",
      help="validation metric for early stopping and best checkpoint (default %(default)s)")
    a("--patience", type=int, default=None,
      help=f"stop after this many epochs without improvement of --monitor; 0 disables (default {DEFAULT_PATIENCE}, "
           "and 0 with --time-budget)")
    a("--keep", type=int, default=2,
      help="checkpoints to keep: the best K by --monitor, plus the latest (default %(default)s)")
    a("--max-failures", type=int, default=2,
      help="worker-group restarts from the last checkpoint after a failure (default %(default)s)")
    a("--image-size", type=int, default=None,
      help="train and label at this square input size (default: the model's, e.g. 48); the seeds' photo "
           "datasets use 256")
    a("--channels", type=int, choices=[1, 3], default=None,
      help="1 = grayscale, 3 = RGB input (default: the model's)")
    a("--faces", default="none", choices=list_detectors(),
      help="crop every image to the largest face this detector finds, as labelling does (images without a face "
           "are skipped); for datasets of photos rather than face crops (default %(default)s: whole images)")
    a("--no-augment", action="store_true", help="disable training augmentation")
    recipe_arguments(p)
    a("--publish", default=None,
      help="after a successful run, atomically write a pointer JSON (e.g. s3://b/models/latest.json) "
           "naming the exported model version")
    a("--keep-models", type=int, default=5,
      help="exported model versions to keep in OUTPUT/NAME/models/; the version --publish names is always "
           "kept (default %(default)s)")
    return p


def recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The time budget, class subset and regularisation options (issue #13); all off by default."""
    a = p.add_argument
    a("--time-budget", type=float, default=None, metavar="MINUTES",
      help="train for this many wall-clock minutes of the training loop: epochs = what fits after timing the "
           "first epoch, at most --epochs; the LR schedule ends there (see below)")
    a("--classes", default=None,
      help="train on a subset of the classes, e.g. happy,sad; other class folders are ignored in every split "
           "(default: every class in train/)")
    a("--random-erasing", type=float, default=0.0, metavar="P",
      help="probability per training image of erasing one random box with noise (default %(default)s = off)")
    a("--mixup", type=float, default=0.0, metavar="ALPHA",
      help="MixUp with lambda ~ Beta(ALPHA, ALPHA), e.g. 0.2; soft targets (default %(default)s = off)")
    a("--cutmix", type=float, default=0.0, metavar="ALPHA",
      help="CutMix with lambda ~ Beta(ALPHA, ALPHA), e.g. 1.0 (default %(default)s = off)")
    a("--mix-prob", type=float, default=1.0,
      help="probability that a batch is mixed when --mixup/--cutmix is on (default %(default)s)")
    a("--mix-switch-prob", type=float, default=0.5,
      help="with both --mixup and --cutmix: probability that a mixed batch uses CutMix (default %(default)s)")
    a("--ema", type=float, default=0.0, metavar="DECAY",
      help="keep an exponential moving average of the weights (e.g. 0.999); it is validated, checkpointed and "
           "exported instead of the raw weights (default %(default)s = off)")
    a("--tta", choices=TTA_MODES, default="none",
      help="test-time augmentation for the final evaluation: flip averages the image and its mirror, flip+shift "
           "adds two shifted views, flip+shift4 eight (10 passes); recorded in model.json (default %(default)s)")


def run(args: argparse.Namespace) -> dict:
    """Validate, train, evaluate, export, publish. Returns the run's report (metrics.json)."""
    validate_args(args)
    splits = find_data(args)
    run_uri = storage.join(args.output, args.name)
    previous = _train_state.latest_run_state(run_uri, log=lambda s: _cli.say(JOB, s))
    _cli.init_ray()
    check_resources(args.num_workers, args.use_gpu)
    decoded = decode_data(args, splits)
    cfg = make_config(args, splits, decoded)
    check_resumable(previous, cfg, run_uri)
    storage.write_bytes(storage.join(run_uri, "split.json"), json.dumps(splits.split_record(), indent=1).encode())

    result = fit(cfg, args, decoded)
    _train_state.remove_orphan_checkpoints(run_uri)
    best = result.get_best_checkpoint(cfg.monitor_metric, "max") if result.best_checkpoints else result.checkpoint
    if best is None:
        raise JobError("training produced no checkpoint")
    with (result.checkpoint or best).as_directory() as d:
        progress = _train_state.RunProgress(**_train_state.read_state(d)["progress"])

    eval_split = splits.eval_split
    task = ray.remote(evaluate_checkpoint).options(num_cpus=1, num_gpus=1 if cfg.use_gpu else 0)
    modes = [cfg.tta] + (["none"] if cfg.tta != "none" else [])  # with TTA, also the plain figure
    cms = ray.get([task.remote(best, decoded.datasets[eval_split], cfg.to_dict(), m) for m in modes])
    cm = np.asarray(cms[0], dtype=np.int64)
    summary = M.summary(cm, list(cfg.classes))
    _cli.say(JOB, f"{eval_split} split, best checkpoint (epoch {progress.best_epoch}, by val {cfg.monitor}"
                  f"{', EMA weights' if cfg.ema else ''}{', TTA ' + cfg.tta if cfg.tta != 'none' else ''}):")
    print(M.format_table(summary), flush=True)
    if len(cms) > 1:
        plain = M.summary(np.asarray(cms[1], dtype=np.int64), list(cfg.classes))
        summary["without_tta"] = {"accuracy": plain["accuracy"], "macro_f1": plain["macro_f1"]}
        _cli.say(JOB, f"TTA {cfg.tta}: accuracy {summary['accuracy']:.4f} vs {plain['accuracy']:.4f} without")
    report_skipped(decoded.skipped)

    model_uri, manifest, n_params = export(best, cfg, splits, summary, progress, run_uri, eval_split, args)
    report = write_artifacts(run_uri, args, cfg, splits, decoded, summary, cm, progress, model_uri, manifest, n_params)
    _cli.say(JOB, f"accuracy {summary['accuracy']:.4f}, macro-F1 {summary['macro_f1']:.4f}; "
                  f"model exported to {model_uri}")
    _cli.say(JOB, f"artifacts: {run_uri}/metrics.json, confusion_matrix.png, training_curves.png")
    if args.publish:
        write_pointer(args.publish, model_uri, manifest)
        _cli.say(JOB, f"published {args.publish} -> {model_uri} (version {manifest.version})")
    return report


# ---------------------------------------------------------------------------------------------
# Steps of run(), in order


def resolve_defaults(args) -> None:
    """The defaults that depend on --time-budget, in one place: --epochs and --patience."""
    if args.epochs is None:
        args.epochs = BUDGET_EPOCH_CAP if args.time_budget else DEFAULT_EPOCHS
    if args.patience is None:
        args.patience = 0 if args.time_budget else DEFAULT_PATIENCE


def validate_args(args) -> None:
    resolve_defaults(args)
    if args.model not in list_models():
        raise UsageError(f"unknown model {args.model!r}: use --model with one of {', '.join(list_models())}")
    for flag in ("epochs", "batch_size", "num_workers", "keep", "keep_models"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    validate_recipe_args(args)
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.patience < 0 or args.max_failures < 0 or args.warmup_epochs < 0 or args.weight_decay < 0:
        raise UsageError("--patience, --max-failures, --warmup-epochs and --weight-decay must not be negative")
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    try:
        _train_data.face_detector(args.faces)  # not installed here: refused before Ray starts
    except DetectorUnavailableError as e:
        raise UsageError(f"--faces {args.faces}: {e}") from e
    args.name = args.name or args.model
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.name):
        raise UsageError(f"--name {args.name!r}: use letters, digits, '.', '_' or '-' (no slashes)")
    if args.publish and not args.publish.endswith(".json"):
        raise UsageError(f"--publish {args.publish!r} must be a .json pointer path, e.g. .../latest.json")
    try:
        args.input_spec = resolve_input_spec(args.model, args.image_size, args.channels)
        if args.publish:
            read_pointer(args.publish)  # an unreadable pointer is refused before hours of training
    except ValueError as e:
        raise UsageError(f"--image-size/--channels: {e}") from e
    except CheckpointError as e:
        raise UsageError(f"--publish: {e}") from e
    try:  # absolute local paths: the published pointer and the manifest must not depend on the cwd
        args.output = storage.parse(args.output).uri
        storage.check_writable(args.output)
        if args.publish:
            storage.check_writable(args.publish.rsplit("/", 1)[0] if "/" in args.publish else ".")
    except storage.StorageError as e:
        raise UsageError(f"{e}; fix --output/--publish or the credentials") from e


def validate_recipe_args(args) -> None:
    if args.time_budget is not None and not args.time_budget > 0:
        raise UsageError(f"--time-budget must be a positive number of minutes, got {args.time_budget}")
    for flag in ("random_erasing", "mix_prob", "mix_switch_prob"):
        if not 0 <= getattr(args, flag) <= 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be a probability in [0, 1], got {getattr(args, flag)}")
    if args.mixup < 0 or args.cutmix < 0:
        raise UsageError("--mixup and --cutmix must not be negative (0 = off)")
    if not 0 <= args.ema < 1:
        raise UsageError(f"--ema must be a decay in [0, 1) (0 = off), e.g. 0.999; got {args.ema}")


def class_subset(value: str | None) -> list[str] | None:
    """``--classes a,b`` as a list (None: every class)."""
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


def find_data(args) -> _train_data.DataSplits:
    try:
        splits = _train_data.discover(args.data, val_fraction=args.val_fraction, seed=args.seed,
                                      classes=class_subset(args.classes))
    except _train_data.DataError as e:
        raise UsageError(str(e)) from e
    if args.init_weights:
        try:
            create_model(args.model, len(splits.classes), init_weights=args.init_weights,
                         img_size=args.input_spec.size, in_chans=args.input_spec.channels)
        except ValueError as e:
            raise UsageError(f"--init-weights: {e}") from e
    _cli.say(JOB, f"data {args.data}: {len(splits.classes)} classes ({', '.join(splits.classes)}); "
                  f"train {len(splits.train)}, validation {len(splits.validation)} ({splits.val_source}), "
                  f"test {len(splits.test)}")
    return splits


def check_resources(num_workers: int, use_gpu: bool) -> None:
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


def decode_data(args, splits) -> _train_data.Decoded:
    t0 = time.perf_counter()
    decoded = _train_data.decode_splits(splits, args.input_spec, faces=args.faces, seed=args.seed)
    counts = _train_data.class_counts(decoded.datasets["train"], len(splits.classes)) \
        if "train" in decoded.datasets else np.zeros(len(splits.classes), np.int64)
    if (counts == 0).any():
        empty = [c for c, n in zip(splits.classes, counts) if n == 0]
        raise UsageError(f"--data {args.data}: no readable training images for class(es) {', '.join(empty)}")
    if decoded.counts.get("validation", 0) == 0:
        raise UsageError(f"--data {args.data}: no readable validation images")
    decoded.train_class_counts = counts
    _cli.say(JOB, f"decoded {sum(decoded.counts.values())} images in {time.perf_counter() - t0:.1f}s"
                  + (f"; skipped {len(decoded.skipped)} (unreadable or no face)" if decoded.skipped else ""))
    return decoded


def make_config(args, splits, decoded) -> TrainConfig:
    weights = class_weights(decoded.train_class_counts, args.class_weighting)
    return TrainConfig(
        model=args.model, classes=tuple(splits.classes), input_spec=args.input_spec,
        train_size=decoded.counts["train"], epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        class_weighting=args.class_weighting, class_weights=tuple(weights) if weights else None,
        monitor=args.monitor, patience=args.patience, seed=args.seed, augment=not args.no_augment,
        use_gpu=args.use_gpu, precision=args.precision, num_workers=args.num_workers,
        init_weights=args.init_weights, dataset_fingerprint=splits.fingerprint, faces=args.faces,
        random_erasing=args.random_erasing, mixup=args.mixup, cutmix=args.cutmix, mix_prob=args.mix_prob,
        mix_switch_prob=args.mix_switch_prob, ema=args.ema, tta=args.tta, time_budget_min=args.time_budget,
    )


def check_resumable(previous: dict | None, cfg: TrainConfig, run_uri: str) -> None:
    """A run name that holds another model, class list or dataset is refused."""
    if previous is None:
        return
    old = TrainConfig.from_dict(previous["config"]).run_key if "config" in previous else previous.get("run_key", {})
    old = {"faces": "none", **old}  # runs from before --faces cut no faces
    new = cfg.run_key
    if old != new:
        what = next((k for k in ("model", "classes", "fingerprint", "faces") if old.get(k) != new[k]), "data")
        raise UsageError(
            f"run {run_uri} already holds checkpoints with a different "
            f"{'data' if what == 'fingerprint' else '--faces detector' if what == 'faces' else what}; "
            "pass a new --name (or the original --data/--model to resume it)"
        )
    budget, total = previous["progress"].get("budget"), f"of {cfg.epochs}"
    if budget and cfg.time_budget_min:
        same = budget["budget_s"] == cfg.time_budget_min * 60 and budget["cap"] == cfg.epochs
        total = (f"of {budget['epochs']}, decided for its {budget['budget_s'] / 60:g}-minute budget" if same else
                 f"re-planned for {cfg.time_budget_min:g} minutes from the measured {budget['epoch_s']:.1f} s/epoch")
    _cli.say(JOB, f"resuming run {run_uri} after epoch {previous['progress']['epoch']} ({total})")


def fit(cfg: TrainConfig, args, decoded) -> ray.train.Result:
    # The workers' Ray Data iterators inherit the driver's DataContext: without this each epoch's
    # validation pass printed its own "execution finished" bar; the epoch lines are the progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    fs, path = storage.filesystem(args.output)
    trainer = TorchTrainer(
        train_func,
        train_loop_config=cfg.to_dict(),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=ray.train.RunConfig(
            name=args.name,
            storage_path=path,
            storage_filesystem=fs if storage.is_s3(args.output) else None,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=args.keep, checkpoint_score_attribute=cfg.monitor_metric, checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=args.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": decoded.datasets["train"].randomize_block_order(),
                  "validation": decoded.datasets["validation"]},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    try:
        return trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError and friends
        raise JobError(f"training failed: {_root_cause(e)}") from e


def report_skipped(skipped: list[dict]) -> None:
    if not skipped:
        return
    reasons: dict[str, int] = {}
    for s in skipped:
        reason = s["error"].split(":", 1)[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    _cli.say(JOB, f"skipped {len(skipped)} image(s), unreadable or without a face: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
                  + "; e.g. " + ", ".join(s["path"] for s in skipped[:3]))


def export(best, cfg: TrainConfig, splits, summary, progress, run_uri: str, eval_split: str, args):
    """The best checkpoint's weights as a new, immutable model version in OUTPUT/NAME/models/;
    the last --keep-models versions and the one --publish names now are kept."""
    model = cfg.create_model()
    with best.as_directory() as d:
        _train_state.load_eval_weights(d, model)
    metrics = {
        "eval_split": eval_split,
        "accuracy": summary["accuracy"],
        "macro_f1": summary["macro_f1"],
        "per_class": summary["per_class"],
        "best_epoch": progress.best_epoch,
        "weights": "ema" if cfg.ema else "trained",
        "tta": cfg.tta,
        "val": next((h for h in progress.history if h["epoch"] == progress.best_epoch), None),
    }
    training_config = {k: v for k, v in cfg.to_dict().items() if k not in ("classes", "input_spec")}
    training_config["data"] = splits.manifest()
    manifest = ModelManifest(
        architecture=cfg.model,
        classes=list(cfg.classes),
        input_spec=cfg.input_spec,
        metrics=metrics,
        training_config=training_config,
        dataset_fingerprint=splits.fingerprint,
    )
    published = read_pointer(args.publish) if args.publish else None
    model_uri = export_model(storage.join(run_uri, "models"), model, manifest, keep=args.keep_models,
                             protect=[published.version] if published and published.version else [])
    return model_uri, manifest, count_parameters(model)


def write_artifacts(run_uri, args, cfg, splits, decoded, summary, cm, progress, model_uri, manifest, n_params) -> dict:
    history = progress.history
    train_time = sum(h["epoch_time_s"] for h in history)
    planned = progress.budget["epochs"] if progress.budget else cfg.epochs
    report = {
        "run": run_uri,
        "model": cfg.model,
        "model_uri": model_uri,
        "version": manifest.version,
        "num_parameters": n_params,
        "eval_split": splits.eval_split,
        "test": summary,
        "best_epoch": progress.best_epoch,
        "epochs_completed": progress.epoch,
        "epochs_planned": planned,
        "stopped_early": progress.epoch < planned,
        "time_budget": progress.budget,  # {budget_s, epoch_s (first), cap, epochs, replans} or None
        "history": history,
        "train_time_s": train_time,  # training passes only
        "loop_time_s": history[-1]["elapsed_s"] if history else 0.0,  # train + validation + checkpoints
        "images_per_s": sum(h["images_per_s"] * h["epoch_time_s"] for h in history) / train_time if train_time else 0.0,
        "data": splits.manifest(),
        "skipped_images": decoded.skipped,
        "config": cfg.to_dict(),
    }
    title = f"{cfg.model} on {splits.eval_split} (acc {summary['accuracy']:.3f})"
    storage.write_bytes(storage.join(run_uri, "metrics.json"), json.dumps(report, indent=1).encode())
    storage.write_bytes(storage.join(run_uri, "confusion_matrix.png"),
                        _train_report.confusion_matrix_png(cm, list(cfg.classes), title))
    storage.write_bytes(storage.join(run_uri, "training_curves.png"),
                        _train_report.training_curves_png(history, f"{cfg.model} ({args.name})"))
    return report


def _root_cause(e: BaseException) -> str:
    """One line for a Ray Train failure: the last line of the first worker's traceback."""
    failures = getattr(e, "worker_failures", None) or {}
    inner = next(iter(failures.values()), None) or getattr(e, "controller_failure", None) or e
    lines = [ln.strip() for ln in str(inner).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(inner).__name__)[:300]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _cli.run_main("jobs.train", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
