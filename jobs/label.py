"""Label a bucket of face images with a trained model: Ray Data -> Hive-partitioned Parquet.

    python -m jobs.label --input s3://bucket/faces/ --model s3://models/emotion/latest.json \\
        --output s3://lake/emotion_labels/ [--date YYYY-MM-DD] [--incremental] [--manifest URI]
        [--batch-size B] [--actors N | --min-actors M --max-actors N] [--gpus-per-actor G]
        [--run-id ID] [--limit N]
    python -m jobs.label --print-ddl --model ... --output ...   # Athena CREATE TABLE

Steps: check the model and the output (fail fast, exit 2) -> list the inputs (or read
--manifest) -> plan (--incremental) -> Ray Data: listing blocks -> read + decode + infer in an
actor pool -> collect the result rows (about 100 bytes each: ten million rows fit a driver) ->
sort by image_uri -> write Parquet files of --rows-per-file rows to a staging dir -> commit
them as partition dt=<date> (jobs/_label_commit.py) -> run summary in _runs/<run_id>.json.

Without RAY_ADDRESS an embedded local Ray is started; under ``ray job submit`` (or when Ray is
already initialised, as in tests) the existing cluster is used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time
import warnings
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from emotion_core import storage
from emotion_core.checkpoint import new_version_id
from emotion_core.schema import athena_ddl, label_schema

from . import _cli, _label_commit, _label_infer, _label_io, _label_plan
from ._cli import UsageError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _cli.ArgumentParser(prog="python -m jobs.label", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="append", default=[], metavar="URI",
                   help="local directory or s3://bucket/prefix of images, listed recursively (repeatable)")
    p.add_argument("--model", help="model directory or pointer .json (latest.json), local or s3://")
    p.add_argument("--output", help="table root, local or s3://; the run writes <output>/dt=<date>/")
    p.add_argument("--date", default=None, help="partition date YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--incremental", action="store_true",
                   help="skip objects whose latest row has the same etag and model version and no error")
    p.add_argument("--manifest", metavar="URI",
                   help="CSV/Parquet list of objects (e.g. S3 Inventory) instead of listing the inputs")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default 64 on CPU, where larger batches fall out of cache "
                        "and run slower per image; 256 with GPUs)")
    p.add_argument("--block-rows", type=int, default=512,
                   help="images per Ray Data block: one read + decode + infer call (default 512)")
    p.add_argument("--actors", type=int, default=None,
                   help="fixed inference actor pool size (default: cluster CPUs / --cpus-per-actor, "
                        "half that with --split-stages; GPUs / --gpus-per-actor with GPUs)")
    p.add_argument("--min-actors", type=int, default=None, help="autoscaling pool: minimum actors")
    p.add_argument("--max-actors", type=int, default=None, help="autoscaling pool: maximum actors")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (>0: CUDA + fp16)")
    p.add_argument("--fetch-threads", type=int, default=48, help="concurrent GETs per read task (default 48)")
    p.add_argument("--split-stages", action="store_true",
                   help="read + decode in CPU tasks apart from the inference actors (default only with GPUs; "
                        "on CPU one fused actor stage is faster)")
    p.add_argument("--no-jit", action="store_true", help="run the model eagerly (default: traced, oneDNN)")
    p.add_argument("--rows-per-file", type=int, default=1_000_000, help="rows per Parquet file (default 1M)")
    p.add_argument("--max-retries", type=int, default=3,
                   help="Ray retries of a failed read task / restarts of a dead actor (default 3)")
    p.add_argument("--run-id", default=None, help="run id (default: <UTC time>-<random>)")
    p.add_argument("--limit", type=int, default=None, help="label only the first N listed objects (demos)")
    p.add_argument("--print-ddl", action="store_true",
                   help="print the Athena CREATE EXTERNAL TABLE for --model's classes at --output, and exit")
    p.add_argument("--table", default="emotion_labels", help="table name for --print-ddl")
    args = p.parse_args(argv)
    if args.date is None:
        args.date = dt.datetime.now(dt.UTC).date().isoformat()
    if args.batch_size is None:
        args.batch_size = 256 if args.gpus_per_actor > 0 else 64
    return args


def check_args(args: argparse.Namespace) -> None:
    if not args.model or not args.output:
        raise UsageError("--model and --output are required")
    if not args.print_ddl and not (args.input or args.manifest):
        raise UsageError("nothing to label: pass --input URI (repeatable) or --manifest URI")
    try:
        dt.date.fromisoformat(args.date)
    except ValueError:
        raise UsageError(f"--date {args.date!r} is not YYYY-MM-DD") from None
    if args.run_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", args.run_id):
        raise UsageError(f"--run-id {args.run_id!r}: use letters, digits, '.', '_' and '-'")
    for name in ("batch_size", "block_rows", "rows_per_file", "fetch_threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.actors is not None and (args.min_actors or args.max_actors):
        raise UsageError("pass either --actors or --min-actors/--max-actors, not both")


def actor_pool(args, ray_resources: dict):
    from ray.data import ActorPoolStrategy

    if args.min_actors or args.max_actors:
        lo = args.min_actors or 1
        hi = args.max_actors or max(lo, int(ray_resources.get("CPU", 1) // args.cpus_per_actor))
        if lo > hi:
            raise UsageError(f"--min-actors {lo} > --max-actors {hi}")
        return ActorPoolStrategy(min_size=lo, max_size=hi), hi
    n = args.actors
    if n is None:
        if args.gpus_per_actor > 0:
            n = int(ray_resources.get("GPU", 0) // args.gpus_per_actor)
        else:  # all CPUs; half when separate read tasks need CPUs too
            n = int(ray_resources.get("CPU", 1) // (args.cpus_per_actor * (2 if args.split_stages else 1)))
    if n < 1:
        raise UsageError("no room for an inference actor: the cluster lacks the CPUs/GPUs asked per actor")
    return ActorPoolStrategy(size=n), n


def label_objects(todo: pa.Table, args, model_uri: str, manifest) -> pa.Table:
    """Run the Ray Data pipeline over ``todo`` (listing rows); returns the result rows."""
    import ray

    if todo.num_rows == 0:
        return _label_infer.empty_result(list(manifest.classes))
    gpu = args.gpus_per_actor > 0
    compute, n_actors = actor_pool(args, ray.cluster_resources())
    # At least 4 blocks per actor so the pool stays balanced at the end of the run; never more
    # than --block-rows per block.
    per_block = max(1, min(args.block_rows, -(-todo.num_rows // (4 * n_actors))))
    blocks = [todo.slice(i, per_block) for i in range(0, todo.num_rows, per_block)]
    ds = ray.data.from_arrow(blocks)
    fuse = not (gpu or args.split_stages)  # on CPU one actor stage reads, decodes, infers (_label_infer)
    labeller_args = {
        "model_uri": model_uri,
        "expected_version": manifest.version,
        "device": "cuda" if gpu else "cpu",
        "threads": max(1, int(args.cpus_per_actor)),
        "fuse": fuse,
        "fetch_threads": args.fetch_threads,
        "infer_batch": args.batch_size,
        "jit": not args.no_jit,
        "fail_once": os.environ.get(_label_infer.FAIL_ONCE_ENV) or None,
    }
    # Bounded retries of read tasks and restarts of dead actors (Ray's defaults are infinite: an
    # image that kills its process every time would loop forever). Ray 2.60 has no named
    # map_batches parameter for them, only the deprecated **ray_remote_args: hence the filter.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        if not fuse:
            ds = ds.map_batches(
                _label_infer.fetch_decode,
                fn_kwargs={"spec": manifest.input_spec, "threads": args.fetch_threads},
                batch_size=None,
                batch_format="pyarrow",
                num_cpus=1,
                max_retries=args.max_retries,
            )
        ds = ds.map_batches(
            _label_infer.Labeller,
            fn_constructor_kwargs=labeller_args,
            batch_size=None if fuse else per_block,
            batch_format="pyarrow",
            compute=compute,
            num_cpus=args.cpus_per_actor,
            num_gpus=args.gpus_per_actor if gpu else None,
            max_restarts=args.max_retries,
            max_task_retries=args.max_retries,
        )
    parts = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables(parts) if parts else _label_infer.empty_result(list(manifest.classes))


def check_exactly_once(results: pa.Table, todo: pa.Table) -> pa.Table:
    """Sort results by image_uri and verify they are exactly the planned objects, once each."""
    results = results.sort_by("image_uri")
    got, want = results["image_uri"].combine_chunks(), todo["image_uri"].combine_chunks()
    if len(got) != len(want) or not got.equals(want):
        dup = len(got) - pc.count_distinct(got).as_py()
        raise RuntimeError(
            f"pipeline returned {len(got)} rows ({dup} duplicated) for {len(want)} objects; nothing committed"
        )
    return results


def assemble(results: pa.Table, carried: pa.Table, manifest, run_id: str) -> pa.Table:
    """Result rows + run constants (+ carried-forward rows) in label_schema, sorted by image_uri."""
    schema = label_schema(list(manifest.classes))
    n = results.num_rows
    consts = {"model_name": manifest.architecture, "model_version": manifest.version, "run_id": run_id}
    cols = {}
    for f in schema:
        if f.name in consts:
            cols[f.name] = pa.array([consts[f.name]] * n, pa.string())
        else:
            cols[f.name] = results[f.name]
    table = pa.table(cols).cast(schema)
    if carried.num_rows:
        table = pa.concat_tables([table, carried.cast(schema)]).sort_by("image_uri")
    return table


def counts(table: pa.Table) -> dict:
    """Labels and error reasons (the text before the first ':') of a partition's rows."""
    labels = Counter(table["label"].drop_null().to_pylist())
    reasons = Counter(e.split(":", 1)[0] for e in table["error"].drop_null().to_pylist())
    return {
        "rows": table.num_rows,
        "labels": dict(sorted(labels.items())),
        "errors": dict(sorted(reasons.items())),
        "error_rows": sum(reasons.values()),
    }


def run(args: argparse.Namespace) -> dict:
    from emotion_core.checkpoint import CheckpointError, load_model, resolve_model_uri

    check_args(args)
    t_start = time.perf_counter()
    started_at = dt.datetime.now(dt.UTC)
    # Fail fast, before any image is read: the model must load (weights included) ...
    try:
        model_uri = resolve_model_uri(args.model)
        _, manifest = load_model(model_uri)
    except (CheckpointError, storage.StorageError) as e:
        raise UsageError(f"--model: {e}") from None
    classes = list(manifest.classes)
    if args.print_ddl:
        print(athena_ddl(classes, storage.parse(args.output).uri, table=args.table))
        return {}
    # ... and the output writable.
    output = storage.parse(args.output).uri
    try:
        storage.check_writable(output)
    except storage.StorageError as e:
        raise UsageError(str(e)) from None
    run_id = args.run_id or new_version_id()
    recovered = _label_commit.recover(output)

    try:
        listing = _label_io.list_inputs(args.input, args.manifest)
    except (_label_io.ListingError, storage.StorageError) as e:
        raise UsageError(str(e)) from None
    if args.limit is not None:
        listing = listing.slice(0, max(0, args.limit))
    t_listed = time.perf_counter()

    if args.incremental:
        plan = _label_plan.plan_incremental(listing, output, manifest.version)
    else:
        plan = _label_plan.Plan.everything(listing)
    todo = plan.todo
    t_planned = time.perf_counter()
    print(f"[label] run {run_id}: {listing.num_rows} objects listed, {todo.num_rows} to label, "
          f"{plan.skipped.num_rows} unchanged (carried forward); model {manifest.architecture} "
          f"{manifest.version} ({len(classes)} classes)", flush=True)

    started_ray = _cli.init_ray() if todo.num_rows else False
    t_ray = time.perf_counter()
    try:
        results = label_objects(todo, args, model_uri, manifest)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    results = check_exactly_once(results, todo)
    t_labelled = time.perf_counter()

    carried = _label_plan.carry_forward(output, plan.skipped, classes)
    table = assemble(results, carried, manifest, run_id)
    staged = _label_commit.write_staged(table, output, run_id, args.rows_per_file)
    files = _label_commit.commit(output, args.date, run_id, staged, table.num_rows)
    t_end = time.perf_counter()

    label_s = t_labelled - t_ray
    summary = dict(
        run_id=run_id,
        date=args.date,
        output=output,
        partition=_label_commit.partition_uri(output, args.date),
        inputs=[storage.parse(u).uri for u in args.input],
        manifest=args.manifest,
        model={"uri": model_uri, "name": manifest.architecture, "version": manifest.version, "classes": classes},
        incremental=args.incremental,
        listed=listing.num_rows,
        processed=todo.num_rows,
        skipped=plan.skipped.num_rows,
        **counts(table),
        images_per_s=round(todo.num_rows / (t_end - t_start), 1) if todo.num_rows else 0.0,
        label_stage_images_per_s=round(todo.num_rows / label_s, 1) if todo.num_rows and label_s > 0 else 0.0,
        seconds={
            "list": round(t_listed - t_start, 3),
            "plan": round(t_planned - t_listed, 3),
            "ray_init": round(t_ray - t_planned, 3),
            "label": round(label_s, 3),
            "write_commit": round(t_end - t_labelled, 3),
            "total": round(t_end - t_start, 3),
        },
        files=files,
        recovered_commits=recovered,
        started_at=started_at.isoformat(timespec="seconds"),
        finished_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    summary["summary_uri"] = _label_commit.write_run_summary(output, run_id, summary)
    print_summary(summary)
    return summary


def print_summary(s: dict) -> None:
    print(f"[label] {s['partition']}: {s['rows']} rows in {len(s['files'])} file(s); "
          f"labelled {s['processed']} ({s['images_per_s']:.0f} images/s end to end, "
          f"{s['label_stage_images_per_s']:.0f}/s in Ray Data), skipped {s['skipped']}, "
          f"{s['error_rows']} error rows, {s['seconds']['total']:.1f} s", flush=True)
    print(f"[label] labels: {json.dumps(s['labels'])}", flush=True)
    if s["errors"]:
        print(f"[label] errors by reason: {json.dumps(s['errors'])}", flush=True)
    print(f"[label] summary: {s['summary_uri']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return _cli.run_main("jobs.label", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
