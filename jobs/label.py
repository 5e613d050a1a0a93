"""Label a bucket of face images with a trained model: Ray Data -> Hive-partitioned Parquet.

    python -m jobs.label --input s3://bucket/faces/ --model s3://models/emotion/latest.json \\
        --output s3://lake/emotion_labels/ [--date YYYY-MM-DD] [--incremental] [--manifest URI]
        [--input-format auto|images|webdataset|parquet] [--actors N | --min-actors M --max-actors N]
        [--gpus-per-actor G] [--run-id ID] [--max-error-fraction F] [--allow-empty] [--limit N]
        [--faces auto|none|yunet|retinaface|haar]
    python -m jobs.label --print-ddl --model ... --output ...   # Athena CREATE TABLE

Data flows through Ray tasks and actors; the driver only orchestrates and commits, and holds
O(work units), never O(objects): list (Ray tasks fan out over prefixes, or a distributed read of
an S3 Inventory) -> listing shards in ``_staging/<run_id>/listing/`` -> plan (Ray Data joins with
the latest partition for --incremental) -> work units ``todo/`` -> an actor pool labels each unit
and writes ``out/<unit>.parquet`` itself -> commit from the staged files' footers -> run summary
in ``_runs/<run_id>.json``. Photos get one row per face (``--faces``: detect, crop, classify
each face; ``auto`` classifies images no larger than the model input whole). Running again with
the same --run-id resumes: the plan is reused and units whose output exists are not labelled again.

Without RAY_ADDRESS an embedded local Ray is started; under ``ray job submit`` (or when Ray is
already initialised, as in tests) the existing cluster is used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import resource
import sys
import time
import warnings

import ray
from ray.data import ActorPoolStrategy

from emotion_core import storage
from emotion_core.checkpoint import CheckpointError, load_model, new_version_id, resolve_model_uri
from emotion_core.schema import athena_ddl
from emotion_core.tta import TTA_MODES

from . import _cli, _label_commit, _label_plan, _listing
from ._cli import JobError, UsageError
from ._label_infer import Labeller, label_isolated
from ._label_lock import LockHeld, PartitionLock

JOB = "label"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.label", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--input", action="append", default=[], metavar="URI",
      help="local directory, s3://bucket/prefix or single object, listed recursively (repeatable)")
    a("--model", help="model directory or pointer .json (latest.json), local or s3://")
    a("--output", help="table root, local or s3://; the run writes <output>/dt=<date>/")
    a("--date", default=None, help="partition date YYYY-MM-DD (default: today, UTC)")
    a("--incremental", action="store_true",
      help="carry forward objects whose row in the latest partition has the same etag and model version")
    a("--manifest", metavar="URI",
      help="S3 Inventory manifest.json, or a CSV/Parquet object list, instead of listing the inputs")
    a("--input-format", choices=["auto", *_label_plan.FORMATS], default="auto",
      help="images, or shards of images: WebDataset .tar or Parquet with an image-bytes column "
           "(default auto: by file extension)")
    a("--faces", default="auto", metavar="DETECTOR",
      help="find faces first and label each one (one row per face): a detector (yunet, retinaface, haar), "
           "none (each image is one face crop), or auto: images larger than the model input go through the "
           "default detector, images at or below it are face crops (default %(default)s)")
    a("--tta", choices=["auto", *TTA_MODES], default="auto",
      help="test-time augmentation: average the model over views of each face (flip: 2 forward passes, "
           "flip+shift: 4, flip+shift4: 10); auto = what the model was evaluated with in training (model.json), "
           "else none")
    a("--batch-size", type=int, default=None,
      help="images per forward pass (default 64 on CPU, where larger batches fall out of cache; 256 on GPU)")
    a("--block-rows", type=int, default=512, help="images fetched, decoded and labelled together (default 512)")
    a("--unit-rows", type=int, default=20_000,
      help="most listing rows per work unit: one actor call and one output file (default 20000)")
    a("--actors", type=int, default=None,
      help="fixed actor pool size (default: cluster CPUs / --cpus-per-actor; GPUs / --gpus-per-actor)")
    a("--min-actors", type=int, default=None, help="autoscaling pool: minimum actors")
    a("--max-actors", type=int, default=None, help="autoscaling pool: maximum actors")
    a("--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor")
    a("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (>0: CUDA + fp16)")
    a("--fetch-threads", type=int, default=48, help="concurrent GETs per actor (default 48)")
    a("--max-object-bytes", type=int, default=50 << 20,
      help="larger images are error rows (too_large), never read whole (default 50 MiB)")
    a("--max-error-fraction", type=float, default=0.2,
      help="abort before commit (exit 1) when more than this share of labelled objects could not be read: "
           "an outage is not data (default 0.2)")
    a("--wait-for-lock", action="store_true",
      help="wait while another run commits the same --output and --date (default: exit 2 at once)")
    a("--allow-empty", action="store_true",
      help="commit an empty partition even when the previous one had rows (default: refuse)")
    a("--no-jit", action="store_true", help="run the model eagerly (default: traced, oneDNN)")
    a("--max-retries", type=int, default=3,
      help="Ray retries of a failed unit / restarts of a dead actor (default 3)")
    a("--run-id", default=None, help="run id (default: <UTC time>-<random>); the same id resumes a killed run")
    a("--limit", type=int, default=None, help="label at most N listed objects (demos, benchmarks)")
    a("--print-ddl", action="store_true",
      help="print the Athena CREATE EXTERNAL TABLE for --model's classes at --output, and exit")
    a("--table", default="emotion_labels", help="table name for --print-ddl")
    args = p.parse_args(argv)
    if args.date is None:
        args.date = dt.datetime.now(dt.UTC).date().isoformat()
    if args.batch_size is None:
        args.batch_size = 256 if args.gpus_per_actor > 0 else 64
    return args


def run(args: argparse.Namespace) -> dict:
    t = {"start": time.perf_counter()}
    model_uri, manifest = check_args(args)
    if args.print_ddl:
        print(athena_ddl(list(manifest.classes), args.output, table=args.table))
        return {}
    run_id = args.run_id or new_version_id()
    stage = _label_commit.staging_uri(args.output, run_id)
    try:  # one run commits (output, date) at a time: the store enforces it (jobs/_label_lock.py)
        lock = PartitionLock(args.output, args.date, run_id).acquire(wait=args.wait_for_lock)
    except LockHeld as e:
        raise UsageError(f"{e}; wait for it, or pass --wait-for-lock") from None
    try:
        return label_partition(args, run_id, stage, model_uri, manifest, lock, t)
    finally:
        lock.release()


def label_partition(args, run_id: str, stage: str, model_uri: str, manifest, lock, t: dict) -> dict:
    recovered = _label_commit.recover(args.output, args.date, lock.storage_now)
    if run_id in recovered:  # this run had died while committing: recovery finished its commit
        _cli.say(JOB, f"run {run_id} was already committed (its interrupted commit was rolled forward)")
        return {"run_id": run_id, "recovered_commits": recovered}
    _cli.init_ray()
    compute, n_actors = actor_pool(args, ray.cluster_resources())

    plan = _label_plan.Plan.load(stage)  # a run started before with this --run-id resumes
    if plan is None:
        listing = list_inputs(args, stage)
        check_not_empty(listing.rows, args)
        t["list"] = time.perf_counter()
        unit_rows = max(1, min(args.unit_rows, math.ceil(listing.rows / (4 * n_actors))))
        plan = _label_plan.make_plan(
            listing.shards, listing.rows, stage, output=args.output, date=args.date, classes=list(manifest.classes),
            model_version=manifest.version, incremental=args.incremental, input_format=args.input_format,
            unit_rows=unit_rows, faces=_label_plan.FaceRule(args.faces, args.detector, manifest.input_spec.size))
        plan.save(stage)
    else:
        _cli.say(JOB, f"resuming run {run_id}: plan of {len(plan.units)} work units found in {stage}")
        t["list"] = time.perf_counter()
    t["plan"] = time.perf_counter()
    _cli.say(JOB, f"run {run_id}: {plan.listed} objects listed, {plan.todo_rows} to label in {len(plan.units)} "
                  f"work units, {plan.carried_rows} unchanged rows carried forward"
                  + (f" from dt={plan.previous}" if plan.previous else "")
                  + f"; model {manifest.architecture} {manifest.version} ({len(manifest.classes)} classes)")

    outputs, already_done = label_units(plan, args, compute, model_uri, manifest, run_id, stage)
    labelled = _label_commit.count_staged(outputs)
    check_read_errors(labelled, args)
    carried = _label_commit.count_staged([c["uri"] for c in plan.carried])
    t["label"] = time.perf_counter()

    rows = sum(_label_commit.check_units(plan.units, outputs)) + plan.carried_rows
    staged = outputs + [c["uri"] for c in plan.carried]
    if not staged:  # an empty snapshot still carries the schema
        staged = [_label_commit.write_empty(stage, manifest.classes)]
    files = _label_commit.commit(args.output, args.date, run_id, staged, rows)
    t["commit"] = time.perf_counter()
    summary = run_summary(args, run_id, model_uri, manifest, plan, labelled, carried, files, recovered, t)
    summary["units_already_done"] = already_done
    summary["summary_uri"] = _label_commit.write_run_summary(args.output, run_id, summary)
    print_summary(summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Steps of run(), in order


def check_args(args: argparse.Namespace):
    """Fail fast, before anything is read: arguments, the model (weights included), the output."""
    if not args.model or not args.output:
        raise UsageError("--model and --output are required")
    if not args.print_ddl and not (args.input or args.manifest):
        raise UsageError("nothing to label: pass --input URI (repeatable) or --manifest URI")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.date or ""):
        raise UsageError(f"--date {args.date!r}: use YYYY-MM-DD")
    try:
        dt.date.fromisoformat(args.date)
    except ValueError:
        raise UsageError(f"--date {args.date!r} is not a calendar date (YYYY-MM-DD)") from None
    if args.run_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", args.run_id):
        raise UsageError(f"--run-id {args.run_id!r}: use letters, digits, '.', '_' and '-'")
    for name in ("batch_size", "block_rows", "unit_rows", "fetch_threads", "max_object_bytes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.max_error_fraction <= 1:
        raise UsageError("--max-error-fraction must be between 0 and 1")
    if args.actors is not None and (args.min_actors or args.max_actors):
        raise UsageError("pass either --actors or --min-actors/--max-actors, not both")
    from emotion_core import faces

    try:  # the detector must exist and be installed here before anything starts
        args.detector = faces.default_detector() if args.faces == "auto" else faces.create_detector(args.faces).name
    except (faces.UnknownDetectorError, faces.DetectorUnavailableError) as e:
        raise UsageError(f"--faces: {e}") from None
    try:
        model_uri = resolve_model_uri(args.model)
        _, manifest = load_model(model_uri)
    except (CheckpointError, storage.StorageError) as e:
        raise UsageError(f"--model: {e}") from None
    try:
        args.output = storage.parse(args.output).uri
        if not args.print_ddl:
            storage.check_writable(args.output)
    except storage.StorageError as e:
        raise UsageError(str(e)) from None
    return model_uri, manifest


def actor_pool(args, resources: dict) -> tuple[ActorPoolStrategy, int]:
    if args.min_actors or args.max_actors:
        lo = args.min_actors or 1
        hi = args.max_actors or max(lo, int(resources.get("CPU", 1) // args.cpus_per_actor))
        if lo > hi:
            raise UsageError(f"--min-actors {lo} > --max-actors {hi}")
        return ActorPoolStrategy(min_size=lo, max_size=hi), hi
    n = args.actors
    if n is None:
        per, have = (args.gpus_per_actor, resources.get("GPU", 0)) if args.gpus_per_actor > 0 else \
            (args.cpus_per_actor, resources.get("CPU", 1))
        n = int(have // per)
    if n < 1:
        raise UsageError("no room for an inference actor: the cluster lacks the CPUs/GPUs asked per actor")
    return ActorPoolStrategy(size=n), n


def fit_pool(compute: ActorPoolStrategy, units: int) -> ActorPoolStrategy:
    """No more actors than work units: each actor loads the model, and one with no unit to take is
    start-up paid for nothing (4 actors for a 1-image run)."""
    if compute.max_size <= units:
        return compute
    return ActorPoolStrategy(min_size=min(compute.min_size, units), max_size=units)


def list_inputs(args, stage: str) -> _listing.ListingResult:
    """The listing, written as Parquet shards by Ray tasks (jobs/_listing.py)."""
    out = storage.join(stage, "listing")
    try:
        if args.manifest:
            listing = _listing.manifest_to_parquet(args.manifest, out, inputs=args.input)
        else:
            listing = _listing.list_to_parquet(args.input, out)
    except (_listing.ListingError, storage.StorageError) as e:
        raise UsageError(str(e)) from None
    if args.limit is not None and listing.rows > args.limit:
        listing = _label_plan.limit_listing(listing, args.limit, storage.join(stage, "listing-limit"))
    return listing


def check_not_empty(listed: int, args) -> None:
    """An input that lists nothing where the previous partition had rows is an outage until the
    operator says otherwise (--allow-empty)."""
    if listed or args.allow_empty:
        return
    previous = _label_commit.previous_rows(args.output, args.date)
    if previous:
        raise JobError(f"the inputs list 0 objects but the previous partition has {previous} rows: "
                       "is the prefix or the credentials wrong? Nothing committed; pass --allow-empty if it is real")


def label_units(plan, args, compute, model_uri: str, manifest, run_id: str, stage: str) -> tuple[list[str], int]:
    """Label every work unit whose output is not there yet (a resumed run's finished units are
    not labelled again); returns all units' output files and how many were already there."""
    out_dir = storage.join(stage, "out")
    outputs = [storage.join(out_dir, u["uri"].rsplit("/", 1)[-1]) for u in plan.units]
    done = _label_commit.existing_files(out_dir)
    todo = [u["uri"] for u, out in zip(plan.units, outputs) if out.rsplit("/", 1)[-1] not in done]
    if len(todo) < len(plan.units):
        _cli.say(JOB, f"{len(plan.units) - len(todo)} of {len(plan.units)} work units already labelled")
    if not todo:
        return outputs, len(plan.units)
    gpu = args.gpus_per_actor > 0
    labeller = {
        "model_uri": model_uri,
        "expected_version": manifest.version,
        "expected_sha256": manifest.weights_sha256,
        "run_constants": {"model_name": manifest.architecture, "model_version": manifest.version, "run_id": run_id},
        "out_dir": out_dir,
        "device": "cuda" if gpu else "cpu",
        "threads": max(1, int(args.cpus_per_actor)),
        "fetch_threads": args.fetch_threads,
        "infer_batch": args.batch_size,
        "chunk_rows": args.block_rows,
        "max_object_bytes": args.max_object_bytes,
        "jit": not args.no_jit,
        "faces": args.faces,
        "tta": resolved_tta(args.tta, manifest),
    }
    units = ray.data.from_items([{"unit": u} for u in todo], override_num_blocks=len(todo))
    compute = fit_pool(compute, len(todo))
    try:
        with warnings.catch_warnings():  # Ray 2.60 takes max_restarts/max_task_retries only as ray_remote_args
            warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
            units.map_batches(
                Labeller,
                fn_constructor_kwargs=labeller,
                batch_size=1,
                batch_format="numpy",
                compute=compute,
                num_cpus=args.cpus_per_actor,
                num_gpus=args.gpus_per_actor if gpu else None,
                max_restarts=args.max_retries,
                max_task_retries=args.max_retries,
            ).materialize()
    except Exception as e:  # e.g. an image that kills its actor on every retry: isolate it, lose nothing else
        done = _label_commit.existing_files(out_dir)
        left = [u for u in todo if u.rsplit("/", 1)[-1] not in done]
        _cli.say(JOB, f"the actor pool failed after {args.max_retries} retries ({storage.short_error(e)}); "
                      f"labelling the {len(left)} unfinished unit(s) in isolation")
        try:
            label_isolated(left, labeller, list(manifest.classes), log=print)
        except Exception as e2:  # not a poison object: a real failure, reported as one line
            raise JobError(f"labelling failed: {storage.short_error(e2)}; nothing committed") from e2
    return outputs, len(plan.units) - len(todo)


def resolved_tta(option: str, manifest) -> str:
    """``--tta auto`` is what the model was evaluated with (model.json's training config)."""
    return option if option != "auto" else (manifest.training_config or {}).get("tta") or "none"


def check_read_errors(labelled: dict, args) -> None:
    """Objects that could not be read (not decode errors: broken images are data) above
    --max-error-fraction mean an outage: abort before commit."""
    unread = sum(n for reason, n in labelled["errors"].items() if storage.is_read_error(reason + ":"))
    if labelled["images"] and unread / labelled["images"] > args.max_error_fraction:
        reasons = ", ".join(f"{k} {v}" for k, v in labelled["errors"].items() if storage.is_read_error(k + ":"))
        raise JobError(f"{unread} of {labelled['images']} objects could not be read ({reasons}): more than "
                       f"--max-error-fraction {args.max_error_fraction:g}; an outage is not committed as data. "
                       "Fix access and run again (or raise --max-error-fraction)")


def run_summary(args, run_id, model_uri, manifest, plan, labelled, carried, files, recovered, t) -> dict:
    rows = labelled["rows"] + carried["rows"]
    images, faces, no_face = (labelled[k] + carried[k] for k in ("images", "faces", "no_face"))
    error_rows = labelled["error_rows"] + carried["error_rows"]
    errors = {k: labelled["errors"].get(k, 0) + carried["errors"].get(k, 0)
              for k in sorted(set(labelled["errors"]) | set(carried["errors"]))}
    labels = {k: labelled["labels"].get(k, 0) + carried["labels"].get(k, 0)
              for k in sorted(set(labelled["labels"]) | set(carried["labels"]))}
    label_s = t["label"] - t["plan"]
    return dict(
        run_id=run_id,
        date=args.date,
        output=args.output,
        partition=_label_commit.partition_uri(args.output, args.date),
        inputs=[storage.parse(u).uri for u in args.input],
        manifest=args.manifest,
        model={"uri": model_uri, "name": manifest.architecture, "version": manifest.version,
               "classes": list(manifest.classes)},
        incremental=args.incremental,
        previous_partition=plan.previous,
        listed=plan.listed,
        processed=labelled["images"],
        skipped=carried["images"],
        work_units=len(plan.units),
        rows=rows,
        labels=labels,
        errors=errors,
        error_rows=sum(errors.values()),
        faces_mode=args.faces,
        tta=resolved_tta(args.tta, manifest),
        images=images,
        faces=faces,
        images_without_faces=no_face,
        faces_per_image=round(faces / (images - error_rows), 3) if images > error_rows else 0.0,  # readable ones
        images_per_s=round(labelled["images"] / (t["commit"] - t["start"]), 1) if labelled["images"] else 0.0,
        label_stage_images_per_s=round(labelled["images"] / label_s, 1)
        if labelled["images"] and label_s > 0 else 0.0,
        seconds={"list": round(t["list"] - t["start"], 3), "plan": round(t["plan"] - t["list"], 3),
                 "label_write": round(label_s, 3), "commit": round(t["commit"] - t["label"], 3),
                 "total": round(t["commit"] - t["start"], 3)},
        driver_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        files=files,
        recovered_commits=recovered,
        finished_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


def print_summary(s: dict) -> None:
    _cli.say(JOB, f"{s['partition']}: {s['rows']} rows ({s['images']} images) in {len(s['files'])} file(s); "
                  f"labelled {s['processed']} "
                  f"({s['images_per_s']:.0f} images/s end to end, {s['label_stage_images_per_s']:.0f}/s in Ray Data), "
                  f"carried {s['skipped']}, {s['error_rows']} error rows, {s['seconds']['total']:.1f} s, "
                  f"driver peak RSS {s['driver_peak_rss_mb']:.0f} MB")
    if s["faces_mode"] != "none":
        readable = s["images"] - s["error_rows"]
        share = s["images_without_faces"] / readable if readable else 0.0
        _cli.say(JOB, f"faces ({s['faces_mode']}): {s['faces']} in {readable} readable images, "
                      f"{s['faces_per_image']:.2f} per image; {s['images_without_faces']} image(s) "
                      f"({share:.1%}) without a face")
    _cli.say(JOB, f"labels: {json.dumps(s['labels'])}")
    if s["errors"]:
        _cli.say(JOB, f"errors by reason: {json.dumps(s['errors'])}")
    _cli.say(JOB, f"summary: {s['summary_uri']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return _cli.run_main("jobs.label", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
