"""Benchmark of the labelling job (`jobs.label`) against a naive single-process loop.

    python -m bench.label_bench [--fer ../shared/data/fer2013/train] [--n 20000] [--quick] [--repeats 2]
                                [--only local,s3,large,plan,throttled,shards,scale] [--slowdown 0.05]
                                [--scale-sizes 20000,200000,1000000] [--scale-repeats N] [--shards-n 10000]

Scenarios, each on the same inputs for both sides:
  local  real FER faces (48x48 JPEGs, ~1.5 KB) read in place from local disk. Goal >= 1.0x naive.
  s3     the same faces in a local S3 server (moto, own process) behind a proxy that adds 20 ms
         per request, as real S3 does. Also measures the store's own ceiling: 64 threads of
         boto3 get_object through the proxy. Goal: pipeline >= 80 % of that ceiling.
  throttled  FER faces in the same S3 setup (+20 ms per request), with the proxy answering a share
         (--slowdown, 5 %) of object GETs with 503 SlowDown, as S3 does when a prefix is over its
         request rate. Unthrottled and throttled runs alternate on the same objects and the same
         Ray (--repeats pairs). Nothing may be lost: every run must write one row per object and no
         read_failed / not_found rows. Goal: throttled >= 50 % of unthrottled images/s.
  large  >= 1 megapixel colour JPEGs (generated) on local disk. The naive loop decodes full size
         and resizes (Image.open().convert("L").resize()); the job uses the shared preprocessing
         (JPEG draft-mode reduced decode). Goal >= 3x naive.
  plan   ``jobs._label_plan.make_plan`` (--incremental: Ray Data hash joins) over 1,000,000
         already-labelled rows in the previous dt= partition and a listing of 1,050,000 objects as
         4 Parquet listing shards (50,000 new, 5,000 changed), in a fresh process (Ray start not
         timed). Goal < 60 s and a few GB driver peak RSS.
  shards the same 10,000 FER faces behind the 20 ms proxy as loose objects and as 10 WebDataset
         shards of 1,000, alternating (--repeats rounds): images/s and object GETs per image,
         counted at the proxy. Goal: shards >= 10x loose images/s.
  scale  ``python -m jobs.label`` as a subprocess per size (20k, 200k, 1M) on WebDataset shards of
         5,000 FER faces (bytes repeat, names do not; built once under --workdir, smaller sets are
         hard links to the first shards), attached by RAY_ADDRESS to one Ray started here: wall time,
         images/s, the job's driver_peak_rss_mb and per-step seconds. Goals: driver peak RSS grows
         < 50 MB from 20k to 1M; images/s at 1M >= 0.9x 200k.

The naive loop (bench/_common.py) is: list -> read/GET one object at a time -> decode ->
eager PyTorch forward in batches of 256 with torch threads = all cores -> one Parquet file of the
job's schema. It runs before Ray starts, so it has the machine to itself.

The pipeline is ``jobs.label.main([...])`` in this process on an embedded Ray started once
(``ray.init()`` with default num_cpus; its start-up is NOT timed). Timed: the whole call, i.e.
listing, model checks, Ray Data execution including actor start-up and model loading, the
Parquet write and the commit of the partition. Results go to bench/results/label.json (or
--output-json). Every measurement records the load average when it started: the machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import _common as C

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FER = REPO.parent / "shared" / "data" / "fer2013" / "train"
RESULTS = REPO / "bench" / "results" / "label.json"
RUN_DATE = "2024-06-01"
BUCKET = "bench-faces"

FULL = {"local": 20000, "s3": 5000, "s3_naive": 1000, "ceiling_gets": 3000, "large": 1000,
        "plan_rows": 1_000_000, "plan_new": 50_000, "throttled": 3000, "shards": 10_000, "shard_members": 1000,
        "scale": (20_000, 200_000, 1_000_000), "scale_members": 5000}
QUICK = {"local": 600, "s3": 300, "s3_naive": 100, "ceiling_gets": 300, "large": 30,
         "plan_rows": 20_000, "plan_new": 1_000, "throttled": 200, "shards": 300, "shard_members": 100,
         "scale": (2000, 6000), "scale_members": 500}
GOALS = {"local": "ratio >= 1.0", "s3": "pipeline >= 0.8 x ceiling", "large": "ratio >= 3.0",
         "plan": "< 60 s, a few GB", "throttled": "throttled >= 0.5 x unthrottled, nothing lost",
         "shards": "shards >= 10 x loose images/s",
         "scale": "driver peak RSS +< 50 MB from smallest to largest; images/s at largest >= 0.9 x the one before"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.label_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--fer", type=Path, default=DEFAULT_FER, help="FER2013 train folder (read in place)")
    p.add_argument("--n", type=int, help=f"faces for 'local' (default {FULL['local']})")
    p.add_argument("--s3-n", type=int, help=f"faces uploaded for 's3' (default {FULL['s3']})")
    p.add_argument("--s3-naive-n", type=int, help=f"GETs for the naive S3 loop (default {FULL['s3_naive']})")
    p.add_argument("--large-n", type=int, help=f"large photos for 'large' (default {FULL['large']})")
    p.add_argument("--plan-rows", type=int, help=f"already-labelled rows for 'plan' (default {FULL['plan_rows']})")
    p.add_argument("--delay-ms", type=float, default=20.0, help="latency the proxy adds per S3 request")
    p.add_argument("--throttled-n", type=int, help=f"faces for 'throttled' (default {FULL['throttled']})")
    p.add_argument("--slowdown", type=float, default=0.05,
                   help="'throttled': share of object GETs answered 503 SlowDown (default %(default)s)")
    p.add_argument("--repeats", type=int, default=2,
                   help="'throttled', 'shards', 'scale': rounds of the compared runs (default %(default)s)")
    p.add_argument("--scale-sizes", help="'scale': comma-separated object counts (default 20000,200000,1000000)")
    p.add_argument("--scale-repeats", type=int, help="'scale': rounds over the sizes (default --repeats)")
    p.add_argument("--shards-n", type=int, help=f"faces for 'shards' (default {FULL['shards']})")
    p.add_argument("--quick", action="store_true", help="tiny sizes everywhere: a 1-2 minute smoke run")
    p.add_argument("--only", default=",".join(GOALS), help=f"comma-separated subset of {','.join(GOALS)}")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "emotion-label-bench",
                   help="scratch space outside the repo; generated inputs are cached here")
    p.add_argument("--job-args", default="", help="extra arguments for jobs.label, e.g. '--batch-size 512'")
    p.add_argument("--output-json", type=Path, default=None,
                   help=f"default {RESULTS.relative_to(REPO)} (label_quick.json with --quick)")
    p.add_argument("--plan-child", type=Path, help=argparse.SUPPRESS)  # internal: run 'plan' here
    args = p.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    for key, value in (("local", args.n), ("s3", args.s3_n), ("s3_naive", args.s3_naive_n),
                       ("large", args.large_n), ("plan_rows", args.plan_rows), ("throttled", args.throttled_n),
                       ("shards", args.shards_n)):
        if value is not None:
            sizes[key] = value
    if args.scale_sizes:
        sizes["scale"] = tuple(int(x) for x in args.scale_sizes.split(","))
    if args.scale_repeats is None:
        args.scale_repeats = args.repeats
    sizes["s3_naive"] = min(sizes["s3_naive"], sizes["s3"])
    sizes["ceiling_gets"] = min(sizes["ceiling_gets"], sizes["s3"])
    args.sizes = sizes
    if args.output_json is None:
        args.output_json = RESULTS.with_name("label_quick.json") if args.quick else RESULTS
    args.scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(GOALS)
    if unknown:
        p.error(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}; choose from {','.join(GOALS)}")
    if not 0.0 <= args.slowdown <= 1.0 or args.repeats < 1 or args.scale_repeats < 1:
        p.error("--slowdown must be in [0, 1] and --repeats, --scale-repeats >= 1")
    return args


# ---------------------------------------------------------------------------------------------
# Naive side


def time_naive(list_items, read, decode, model_uri: str, out: Path) -> dict:
    """Time the naive loop, listing included."""
    shutil.rmtree(out, ignore_errors=True)
    load = C.load_average()
    t0 = time.perf_counter()
    rows = C.naive_label(list_items(), read, decode, model_uri, out / f"dt={RUN_DATE}" / "part-0.parquet")
    seconds = time.perf_counter() - t0
    return {"n": rows, "seconds": round(seconds, 3), "images_per_s": round(rows / seconds, 1), "load_avg": load}


def shared_decode(spec):
    from emotion_core.preprocess import decode_image

    return lambda data: decode_image(data, spec)


# ---------------------------------------------------------------------------------------------
# Pipeline side


def run_pipeline(input_uri: str, model_uri: str, out: Path, expected: int, extra: list[str]) -> dict:
    """Time ``jobs.label.main`` on the already-running Ray and check its output."""
    import pyarrow.dataset as ds

    from jobs import label

    shutil.rmtree(out, ignore_errors=True)
    run_id = f"bench-{time.time_ns()}"
    argv = ["--input", input_uri, "--model", model_uri, "--output", str(out),
            "--date", RUN_DATE, "--run-id", run_id, *extra]
    load = C.load_average()
    t0 = time.perf_counter()
    rc = label.main(argv)
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"jobs.label exited {rc} for {input_uri}; argv: {shlex.join(argv)}")
    table = ds.dataset(out / f"dt={RUN_DATE}", format="parquet").to_table(columns=["image_uri", "error"])
    rows, errors = table.num_rows, table.num_rows - table["error"].null_count
    files = len(list((out / f"dt={RUN_DATE}").rglob("*.parquet")))
    if rows != expected or errors:
        print(f"WARNING: pipeline wrote {rows} rows ({errors} errors), expected {expected} clean rows")
    result = {"n": rows, "seconds": round(seconds, 3), "images_per_s": round(rows / seconds, 1),
              "errors": errors, "parquet_files": files, "load_avg": load}
    summary = out / "_runs" / f"{run_id}.json"
    if summary.exists():  # the job's own view: time per step, images/s inside Ray Data
        job = json.loads(summary.read_text())
        result["job_seconds"] = job.get("seconds")
        result["job_label_stage_images_per_s"] = job.get("label_stage_images_per_s")
    return result


def start_s3(stack: contextlib.ExitStack, args) -> C.S3Servers:
    """moto + the latency proxy (stopped by ``stack``), with the faces of each S3 scenario uploaded
    (``s3`` under faces/, ``throttled`` under throttled/)."""
    s3 = stack.enter_context(C.s3_servers(args.delay_ms))
    for name, prefix in (("s3", "faces"), ("throttled", "throttled")):
        if name not in args.scenarios:
            continue
        fer_dir, n = C.fer_subset(args.fer, args.sizes[name], args.workdir)
        args.sizes[name] = n
        t0 = time.perf_counter()
        C.upload_files(s3.moto_endpoint, BUCKET, prefix, C.list_local(fer_dir), fer_dir)
        print(f"[{name}] uploaded {n:,} faces to moto in {time.perf_counter() - t0:.1f} s; "
              f"proxy {s3.proxy_endpoint} adds {args.delay_ms:g} ms per request", flush=True)
    if "shards" in args.scenarios:
        t0 = time.perf_counter()
        n, per = upload_shards_inputs(s3.moto_endpoint, args)
        print(f"[shards] uploaded {n:,} faces to moto as loose objects (shards-loose/) and as "
              f"{-(-n // per)} tar shards of {per:,} (shards-packed/) in {time.perf_counter() - t0:.1f} s", flush=True)
    return s3


def upload_shards_inputs(moto: str, args) -> tuple[int, int]:
    """The same FER faces twice: loose objects under ``shards-loose/`` and WebDataset shards of
    ``shard_members`` faces under ``shards-packed/``. Returns (faces, members per shard)."""
    from emotion_core.shards import write_webdataset

    fer_dir, n = C.fer_subset(args.fer, args.sizes["shards"], args.workdir)
    args.sizes["shards"] = n
    files = C.list_local(fer_dir)
    C.upload_files(moto, BUCKET, "shards-loose", files, fer_dir)
    per = args.sizes["shard_members"]
    client = C.boto_client(moto)
    for i in range(0, n, per):
        members = [(os.path.relpath(f.uri, fer_dir), Path(f.uri).read_bytes()) for f in files[i : i + per]]
        client.put_object(Bucket=BUCKET, Key=f"shards-packed/shard-{i // per:05d}.tar", Body=write_webdataset(members))
    return n, per


def proxy_stats(proxy: str) -> dict:
    """The proxy's counters (object GETs seen, SlowDown answers)."""
    import urllib.request

    with urllib.request.urlopen(f"{proxy}/__proxy__/stats", timeout=10) as r:
        return json.loads(r.read())


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    import statistics

    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1), "n": len(values)}


def shards_scenario(args, proxy: str, model_uri: str, scratch: Path, extra: list[str]) -> dict:
    """The same faces behind the proxy as loose objects and as tar shards, alternating, on the same
    Ray: images/s (end to end, and in the label+write step) and object GETs per image, counted at
    the proxy."""
    n = args.sizes["shards"]
    runs = []
    for rep in range(args.repeats):
        for kind in ("loose", "packed"):
            load = C.load_average()
            before = proxy_stats(proxy)
            pipe = run_pipeline(f"s3://{BUCKET}/shards-{kind}", model_uri, scratch / "pipe-shards", n, extra)
            gets = proxy_stats(proxy)["object_gets"] - before["object_gets"]
            label_s = (pipe.get("job_seconds") or {}).get("label_write")
            run = {"repeat": rep, "input": kind, "rows": pipe["n"], "errors": pipe["errors"],
                   "seconds": pipe["seconds"], "images_per_s": pipe["images_per_s"],
                   "job_seconds": pipe.get("job_seconds"),
                   "label_write_images_per_s": round(pipe["n"] / label_s, 1) if label_s else None,
                   "object_gets": gets, "gets_per_image": round(gets / max(pipe["n"], 1), 4), "load_avg": load}
            runs.append(run)
            print(f"[shards] repeat {rep} {kind}: {pipe['images_per_s']:,.0f} img/s end to end in "
                  f"{pipe['seconds']:.1f} s "
                  f"({run['label_write_images_per_s'] or 0:,.0f} img/s in label+write), {gets} GETs for {pipe['n']} "
                  f"rows, load {load[0]:.1f}", flush=True)
    by = {k: [r for r in runs if r["input"] == k] for k in ("loose", "packed")}
    ratios = [p["images_per_s"] / lo["images_per_s"] for lo, p in zip(by["loose"], by["packed"])]
    step = [p["label_write_images_per_s"] / lo["label_write_images_per_s"] for lo, p in zip(by["loose"], by["packed"])
            if p["label_write_images_per_s"] and lo["label_write_images_per_s"]]
    return {"n": n, "shard_members": args.sizes["shard_members"], "delay_ms": args.delay_ms, "runs": runs,
            **{f"{k}_images_per_s": spread([r["images_per_s"] for r in v]) for k, v in by.items()},
            **{f"{k}_gets_per_image": max(r["gets_per_image"] for r in v) for k, v in by.items()},
            "ratios": [round(r, 2) for r in ratios], "label_write_ratios": [round(r, 2) for r in step],
            "goal_met": min(ratios) >= 10}


def scale_scenario(args, model_uri: str, scratch: Path, extra: list[str]) -> dict:
    """``python -m jobs.label`` as its own process per size (so each driver's peak RSS is its own)
    on WebDataset shards of FER faces, attached with RAY_ADDRESS to the Ray this process started
    (Ray's start-up is not in the figures). Sizes in rounds: smallest to largest, ``--scale-repeats``
    times."""
    import ray

    sizes, per = args.sizes["scale"], args.sizes["scale_members"]
    inputs = {}
    for n in sorted(sizes, reverse=True):  # largest first: smaller sets are hard links to its shards
        t0 = time.perf_counter()
        inputs[n] = C.fer_webdataset(args.fer, n, args.workdir, per)
        print(f"[scale] {n:,} faces in {-(-n // per)} shards ready in {time.perf_counter() - t0:.1f} s", flush=True)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    runs = []
    for rep in range(args.scale_repeats):
        for n in sizes:
            out = scratch / f"scale-{n}"
            shutil.rmtree(out, ignore_errors=True)
            run_id = f"bench-scale-{n}-{rep}"
            argv = [sys.executable, "-m", "jobs.label", "--input", str(inputs[n]), "--model", model_uri,
                    "--output", str(out), "--date", RUN_DATE, "--run-id", run_id, *extra]
            load = C.load_average()
            t0 = time.perf_counter()
            proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"jobs.label exited {proc.returncode} at {n:,}: {shlex.join(argv)}\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            job = json.loads((out / "_runs" / f"{run_id}.json").read_text())
            shutil.rmtree(out, ignore_errors=True)
            run = {"repeat": rep, "n": n, "rows": job["rows"], "processed": job["processed"],
                   "error_rows": job["error_rows"], "work_units": job["work_units"], "wall_s": round(wall, 2),
                   "images_per_s": round(job["processed"] / wall, 1),
                   "job_images_per_s": job["images_per_s"], "label_write_images_per_s": job["label_stage_images_per_s"],
                   "driver_peak_rss_mb": job["driver_peak_rss_mb"], "seconds": job["seconds"],
                   "load_avg": [load, C.load_average()]}
            if job["rows"] != n or job["error_rows"]:
                print(f"WARNING: {n:,} objects gave {job['rows']:,} rows, {job['error_rows']} errors", flush=True)
            runs.append(run)
            print(f"[scale] repeat {rep} {n:,}: {wall:.1f} s wall, {run['images_per_s']:,.0f} img/s, driver peak RSS "
                  f"{run['driver_peak_rss_mb']:.0f} MB, steps {job['seconds']}, load {load[0]:.1f}", flush=True)
    per_size = {}
    for n in sizes:
        mine = [r for r in runs if r["n"] == n]
        per_size[n] = {k: spread([r[k] for r in mine]) for k in
                       ("wall_s", "images_per_s", "label_write_images_per_s", "driver_peak_rss_mb")}
        per_size[n]["seconds"] = {k: spread([r["seconds"][k] for r in mine]) for k in mine[0]["seconds"]}
    lo, hi = min(sizes), max(sizes)
    rss_growth = per_size[hi]["driver_peak_rss_mb"]["max"] - per_size[lo]["driver_peak_rss_mb"]["min"]
    result = {"sizes": list(sizes), "members_per_shard": per, "repeats": args.scale_repeats, "runs": runs,
              "per_size": per_size, "rss_growth_mb_worst": round(rss_growth, 1),
              "rss_growth_mb_median": round(per_size[hi]["driver_peak_rss_mb"]["median"]
                                            - per_size[lo]["driver_peak_rss_mb"]["median"], 1)}
    if len(sizes) > 1:
        prev = sorted(sizes)[-2]
        result["throughput_ratio_largest_vs_previous"] = round(
            per_size[hi]["images_per_s"]["median"] / per_size[prev]["images_per_s"]["median"], 3)
        result["goal_met"] = rss_growth < 50 and result["throughput_ratio_largest_vs_previous"] >= 0.9
    return result


def proxy_slowdown(proxy: str, share: float) -> dict:
    """Set the proxy's SlowDown share; returns its counters."""
    import urllib.request

    req = urllib.request.Request(f"{proxy}/__proxy__/config?slowdown={share}", method="PUT")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def read_error_rows(out: Path) -> dict:
    """Error rows of the committed partition by reason (``read_failed``, ``not_found``, ...)."""
    import pyarrow.dataset as ds

    errors = ds.dataset(out / f"dt={RUN_DATE}", format="parquet").to_table(columns=["error"])["error"]
    counts: dict = {}
    for e in errors.drop_null().to_pylist():
        reason = e.split(":", 1)[0]
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def throttled_scenario(args, proxy: str, model_uri: str, scratch: Path, extra: list[str]) -> dict:
    """Alternate unthrottled and throttled runs of ``jobs.label`` on the same objects; check that
    nothing is lost in any run (one row per object, no read errors)."""
    from emotion_core import storage

    n, share = args.sizes["throttled"], args.slowdown
    runs = []
    for rep in range(args.repeats):
        for s in (0.0, share):
            load = C.load_average()
            before = proxy_slowdown(proxy, s)
            pipe = run_pipeline(f"s3://{BUCKET}/throttled", model_uri, scratch / "pipe-throttled", n, extra)
            after = proxy_slowdown(proxy, 0.0)
            errors = read_error_rows(scratch / "pipe-throttled")
            run = {"repeat": rep, "slowdown": s, "images_per_s": pipe["images_per_s"], "seconds": pipe["seconds"],
                   "rows": pipe["n"], "error_rows": errors,
                   "object_gets": after["object_gets"] - before["object_gets"],
                   "slowdowns_sent": after["slowdowns"] - before["slowdowns"],
                   "lost": n - pipe["n"] + errors.get("read_failed", 0) + errors.get("not_found", 0),
                   "load_avg": load}
            runs.append(run)
            print(f"[throttled] repeat {rep} slowdown {s:.0%}: {pipe['images_per_s']:,.0f} img/s in "
                  f"{pipe['seconds']:.1f} s, {run['slowdowns_sent']} SlowDown answers to {run['object_gets']} GETs, "
                  f"rows {pipe['n']}/{n}, error rows {errors or 0}", flush=True)
    base = [r["images_per_s"] for r in runs if r["slowdown"] == 0.0]
    hit = [r["images_per_s"] for r in runs if r["slowdown"] > 0.0]
    ratios = [h / b for b, h in zip(base, hit)]
    lost = sum(r["lost"] for r in runs)
    return {"n": n, "slowdown": share, "delay_ms": args.delay_ms, "repeats": args.repeats,
            "retries": storage.s3_client().meta.config.retries, "runs": runs,
            "unthrottled_images_per_s": base, "throttled_images_per_s": hit,
            "ratios": [round(r, 3) for r in ratios], "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3), "lost": lost,
            "goal_met": min(ratios) >= 0.5 and lost == 0}


def start_ray() -> float:
    import ray

    t0 = time.perf_counter()
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=True)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Planning


def plan_scenario(args) -> dict:
    """Generate (cached) a labelled previous partition + listing shards, then time the job's
    planner in a fresh process, so the peak RSS is the planning driver's own (plus interpreter,
    imports and the Ray client)."""
    from emotion_core.labels import CANONICAL

    t0 = time.perf_counter()
    data = C.plan_data(args.workdir, args.sizes["plan_rows"], args.sizes["plan_new"], list(CANONICAL))
    print(f"[plan] inputs ready in {time.perf_counter() - t0:.1f} s: {data}", flush=True)
    load = C.load_average()
    proc = subprocess.run([sys.executable, "-m", "bench.label_bench", "--plan-child", str(data)],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"planning child failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_avg"] = [load, C.load_average()]
    result["goal_met"] = result["seconds"] < 60 and result["peak_rss_mb"] < 4096 and result["counts_ok"]
    return result


def plan_child(data: Path) -> dict:
    """In a fresh process: time ``jobs._label_plan.make_plan`` (``--incremental``) over the
    generated listing shards and previous partition, as ``jobs.label`` calls it (the hash joins,
    the work units and the carried rows written to a staging folder). Ray is started first and
    not timed (RAY_ADDRESS is used when set)."""
    import pyarrow.parquet as pq
    import ray

    from emotion_core.labels import CANONICAL
    from jobs import _cli, _label_plan

    shards = C.plan_listing_shards(data)
    listed = sum(pq.ParquetFile(f).metadata.num_rows for f in shards)
    labelled = sum(pq.ParquetFile(f).metadata.num_rows for f in (data / "labels").rglob("*.parquet"))
    t0 = time.perf_counter()
    _cli.init_ray()
    ray_init_s = time.perf_counter() - t0
    stage = Path(tempfile.mkdtemp(prefix="plan-stage-", dir=data.parent))
    try:
        rss_before = C.current_rss_mb()
        peak_before = C.peak_rss_mb()
        t0 = time.perf_counter()
        plan = _label_plan.make_plan(
            shards, listed, str(stage), output=str(data / "labels"), date=RUN_DATE, classes=list(CANONICAL),
            model_version=C.PLAN_MODEL_VERSION, incremental=True, input_format="auto", unit_rows=20_000)
        seconds = time.perf_counter() - t0
        peak = C.peak_rss_mb()
    finally:
        ray.shutdown()
        shutil.rmtree(stage, ignore_errors=True)
    changed = C.plan_new_count(labelled, listed)
    return {
        "labelled_rows": labelled, "listing_rows": listed, "listing_shards": len(shards),
        "previous": plan.previous, "todo": plan.todo_rows, "work_units": len(plan.units),
        "carried": plan.carried_rows, "carry_files": len(plan.carried),
        "counts_ok": plan.todo_rows == changed and plan.carried_rows == listed - changed,
        "seconds": round(seconds, 2), "peak_rss_mb": round(peak), "peak_rss_before_plan_mb": round(peak_before),
        "rss_before_plan_mb": round(rss_before), "ray_init_s": round(ray_init_s, 1),
        "function": "jobs._label_plan.make_plan(listing shards, ..., incremental=True, unit_rows=20000)",
    }


# ---------------------------------------------------------------------------------------------
# Reporting


def fmt(x, spec=",.0f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict) -> str:
    head = ["scenario", "N (naive/pipe)", "naive img/s", "pipeline img/s", "ratio", "ceiling img/s",
            "pipe/ceiling", "goal", "met", "fixed cost s", "pipe img/s after it"]
    rows = []
    for name in ("local", "s3", "large"):
        r = results.get(name)
        if not r:
            continue
        ceiling = r.get("ceiling", {}).get("gets_per_s")
        rows.append([name, f"{r['naive']['n']:,}/{r['pipeline']['n']:,}", fmt(r["naive"]["images_per_s"]),
                     fmt(r["pipeline"]["images_per_s"]), fmt(r["ratio"], ".2f") + "x", fmt(ceiling),
                     fmt(r.get("of_ceiling"), ".0%"), GOALS[name], "yes" if r["goal_met"] else "NO",
                     fmt(r["pipeline"].get("fixed_cost_s"), ".1f"),
                     fmt(r["pipeline"].get("after_fixed_cost_images_per_s"))])
    if "plan" in results:
        r = results["plan"]
        rows.append(["plan", f"{r['labelled_rows']:,} + {r['listing_rows']:,} listed",
                     "-", "-", f"{r['seconds']:.1f} s", "-", "-",
                     f"{GOALS['plan']} (peak RSS {r['peak_rss_mb'] / 1024:.2f} GB)",
                     "yes" if r["goal_met"] else "NO", "-", "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    lines = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)] if rows else []
    if "throttled" in results:
        r = results["throttled"]
        lines.append(
            f"throttled: {r['n']:,} faces, {r['slowdown']:.0%} SlowDown, +{r['delay_ms']:g} ms, "
            f"retries {r['retries']}: unthrottled {' / '.join(fmt(x) for x in r['unthrottled_images_per_s'])} img/s, "
            f"throttled {' / '.join(fmt(x) for x in r['throttled_images_per_s'])} img/s -> "
            f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}x "
            f"(goal {GOALS['throttled']}: {'yes' if r['goal_met'] else 'NO'}; lost {r['lost']})")
    if "shards" in results:
        r = results["shards"]
        lo, pk = r["loose_images_per_s"], r["packed_images_per_s"]
        lines.append(
            f"shards: {r['n']:,} faces, +{r['delay_ms']:g} ms/request: loose {fmt(lo['median'])} img/s "
            f"({fmt(lo['min'])}-{fmt(lo['max'])}), {r['loose_gets_per_image']:.3f} GET/image; tar shards of "
            f"{r['shard_members']:,}: {fmt(pk['median'])} img/s ({fmt(pk['min'])}-{fmt(pk['max'])}), "
            f"{r['packed_gets_per_image']:.4f} GET/image -> {' / '.join(f'{x:.1f}x' for x in r['ratios'])} "
            f"(label+write step {' / '.join(f'{x:.1f}x' for x in r['label_write_ratios'])}; "
            f"goal {GOALS['shards']}: {'yes' if r['goal_met'] else 'NO'})")
    if "scale" in results:
        r = results["scale"]
        lines.append(f"scale: WebDataset shards of {r['members_per_shard']:,} FER faces, jobs.label as a subprocess "
                     f"per size, {r['repeats']} round(s); median (min-max)")
        for n, p in r["per_size"].items():
            sec = " ".join(f"{k} {v['median']:.1f}" for k, v in p["seconds"].items())
            lines.append(f"  {int(n):>9,}: wall {p['wall_s']['median']:.1f} s, "
                         f"{fmt(p['images_per_s']['median'])} img/s "
                         f"({fmt(p['images_per_s']['min'])}-{fmt(p['images_per_s']['max'])}), driver peak RSS "
                         f"{p['driver_peak_rss_mb']['median']:.0f} MB ({p['driver_peak_rss_mb']['min']:.0f}-"
                         f"{p['driver_peak_rss_mb']['max']:.0f}); steps s: {sec}")
        lines.append(f"  RSS growth {r['rss_growth_mb_median']:+.0f} MB median "
                     f"({r['rss_growth_mb_worst']:+.0f} worst); "
                     f"img/s largest / previous {r.get('throughput_ratio_largest_vs_previous', '-')} "
                     f"(goal {GOALS['scale']}: {'yes' if r.get('goal_met') else 'NO'})")
    return "\n".join(lines)


def fixed_cost(input_uri: str, model_uri: str, out: Path, pipe: dict, extra: list[str]) -> None:
    """Run the job again with ``--limit 8`` (same listing, 8 images): its wall time is the job's
    fixed cost (listing, model checks, actor start-up, commit). Adds it to ``pipe`` with the
    throughput once that cost is paid. Measured after the timed run, so Ray's worker pool is warm:
    it is a lower bound of the fixed cost inside the timed run."""
    small = run_pipeline(input_uri, model_uri, out, 8, [*extra, "--limit", "8"])
    pipe["fixed_cost_s"] = small["seconds"]
    busy = pipe["seconds"] - small["seconds"]
    pipe["after_fixed_cost_images_per_s"] = round((pipe["n"] - 8) / busy, 1) if busy > 0 else None


def finish(name: str, results: dict, naive: dict, pipe: dict, goal_ratio: float | None) -> None:
    r = {"naive": naive, "pipeline": pipe, "ratio": round(pipe["images_per_s"] / naive["images_per_s"], 3)}
    steady = pipe.get("after_fixed_cost_images_per_s")
    if steady:
        r["ratio_after_fixed_cost"] = round(steady / naive["images_per_s"], 3)
    if goal_ratio is not None:
        r["goal_met"] = r["ratio"] >= goal_ratio
    results[name] = r
    print(f"[{name}] naive {naive['images_per_s']:,.0f} img/s, pipeline {pipe['images_per_s']:,.0f} img/s "
          f"-> {r['ratio']:.2f}x", flush=True)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan_child:
        print(json.dumps(plan_child(args.plan_child)))
        return 0
    for k, v in C.BENCH_ENV.items():
        os.environ.setdefault(k, v)
    sizes, scen = args.sizes, args.scenarios
    args.workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    extra = shlex.split(args.job_args)
    results: dict = {}
    meta = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg_at_start": C.load_average(),
        "quick": args.quick,
        "sizes": sizes,
        "job_args": extra,
        "timed": "pipeline: the whole jobs.label.main() call (listing, model checks, Ray Data execution "
                 "incl. actor start-up and model load, Parquet write, commit); ray.init() excluded. "
                 "naive: list + read + decode + forward + Parquet write, one process, before Ray starts.",
    }
    print(f"workdir {args.workdir} (scratch {scratch}); sizes {sizes}", flush=True)

    model_uri = C.save_untrained_model(scratch / "model")
    from emotion_core.checkpoint import load_manifest

    spec = load_manifest(model_uri).input_spec
    naive: dict = {}
    try:
        # ---- inputs --------------------------------------------------------------------------
        if {"local", "s3", "throttled", "shards", "scale"} & set(scen):
            if not args.fer.is_dir():
                raise SystemExit(f"FER folder {args.fer} not found: pass --fer DIR")
        if "local" in scen:
            fer_dir, n = C.fer_subset(args.fer, sizes["local"], args.workdir)
            sizes["local"] = n
        if "large" in scen:
            t0 = time.perf_counter()
            large_dir = C.large_photos(args.workdir, sizes["large"])
            print(f"large photos ready in {time.perf_counter() - t0:.1f} s: {large_dir}", flush=True)

        with contextlib.ExitStack() as stack:
            s3 = start_s3(stack, args) if {"s3", "throttled", "shards"} & set(scen) else None
            # ---- naive loops, before Ray starts ------------------------------------------------
            if "local" in scen:
                naive["local"] = time_naive(lambda: C.local_items(C.list_local(fer_dir)), C.read_local,
                                            shared_decode(spec), model_uri, scratch / "naive-local")
                print(f"[local] naive: {naive['local']}", flush=True)
            if "large" in scen:
                naive["large"] = time_naive(lambda: C.local_items(C.list_local(large_dir)), C.read_local,
                                            C.naive_pil_decode, model_uri, scratch / "naive-large")
                print(f"[large] naive: {naive['large']}", flush=True)
            if "s3" in scen:
                client = C.boto_client(s3.proxy_endpoint)
                naive["s3"] = time_naive(
                    lambda: C.s3_items(C.list_s3(client, BUCKET, "faces")[: sizes["s3_naive"]]),
                    C.s3_reader(s3.proxy_endpoint), shared_decode(spec), model_uri, scratch / "naive-s3")
                print(f"[s3] naive: {naive['s3']}", flush=True)
                keys = [o.key for o in C.list_s3(client, BUCKET, "faces")][: sizes["ceiling_gets"]]
                ceiling = C.concurrent_get_rate(s3.proxy_endpoint, BUCKET, keys, threads=64)
                print(f"[s3] ceiling: {ceiling:,.0f} GETs/s (64 threads, {len(keys)} GETs)", flush=True)

            # ---- pipelines on one embedded Ray -------------------------------------------------
            if {"local", "s3", "large", "throttled", "shards", "scale"} & set(scen):
                meta["ray_init_s"] = round(start_ray(), 2)
                if "local" in scen:
                    pipe = run_pipeline(str(fer_dir), model_uri, scratch / "pipe-local", sizes["local"], extra)
                    fixed_cost(str(fer_dir), model_uri, scratch / "pipe-small", pipe, extra)
                    finish("local", results, naive["local"], pipe, 1.0)
                if "large" in scen:
                    pipe = run_pipeline(str(large_dir), model_uri, scratch / "pipe-large", sizes["large"], extra)
                    fixed_cost(str(large_dir), model_uri, scratch / "pipe-small", pipe, extra)
                    finish("large", results, naive["large"], pipe, 3.0)
                if "s3" in scen:
                    pipe = run_pipeline(f"s3://{BUCKET}/faces", model_uri, scratch / "pipe-s3", sizes["s3"], extra)
                    fixed_cost(f"s3://{BUCKET}/faces", model_uri, scratch / "pipe-small", pipe, extra)
                    finish("s3", results, naive["s3"], pipe, None)
                    r = results["s3"]
                    r["ceiling"] = {"gets_per_s": round(ceiling, 1), "threads": 64, "gets": len(keys)}
                    r["of_ceiling"] = round(pipe["images_per_s"] / ceiling, 3)
                    r["delay_ms"] = args.delay_ms
                    r["goal_met"] = r["of_ceiling"] >= 0.8
                    if pipe.get("after_fixed_cost_images_per_s"):
                        r["of_ceiling_after_fixed_cost"] = round(pipe["after_fixed_cost_images_per_s"] / ceiling, 3)
                if "throttled" in scen:
                    results["throttled"] = throttled_scenario(args, s3.proxy_endpoint, model_uri, scratch, extra)
                if "shards" in scen:
                    results["shards"] = shards_scenario(args, s3.proxy_endpoint, model_uri, scratch, extra)
                if "scale" in scen:
                    results["scale"] = scale_scenario(args, model_uri, scratch, extra)
                import ray

                ray.shutdown()

        # ---- planning ---------------------------------------------------------------------------
        if "plan" in scen:
            results["plan"] = plan_scenario(args)
            print(f"[plan] {results['plan']}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    meta["load_avg_at_end"] = C.load_average()
    meta["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    print()
    print(table(results))
    print(f"\nload average at start {meta['load_avg_at_start']}, at end {meta['load_avg_at_end']}; {meta['timed']}")
    args.output_json.parent.mkdir(parents=True, exist_ok=True)
    args.output_json.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str) + "\n")
    print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
