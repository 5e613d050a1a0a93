"""Pack a folder or prefix of images into shards (WebDataset tar or Parquet), as a Ray job.

    python -m jobs.pack --input s3://bucket/faces/ --output s3://bucket/faces-packed/ \\
        [--shard-size 1000] [--format webdataset|parquet] [--read-threads 32]

Labelling packed inputs costs one GET per shard instead of one per image (S3: $0.40 per million
GETs, about 5,500 GETs/s per prefix). Steps: list the input (sorted by URI) -> shard i holds the
i-th ``--shard-size`` objects -> one Ray task per shard reads its objects and writes
``<output>/shard-<i>.tar`` (or ``.parquet``; i zero-padded to 6 digits, more when needed) ->
shards left from an earlier, larger pack of the same output are deleted -> ``_pack.json``.

Shard names depend only on the listing and ``--shard-size``, so a retried task overwrites its own
shard and a re-run rewrites the same files: it never adds shards. The output prefix belongs to the
job (keep other data out of it). Bytes are copied verbatim (broken images stay broken and become
error rows when labelled). Member names are the object's path relative to the input prefix, so
``tar://2024.01/a.jpg::s3://bucket/faces-packed/shard-000000.tar`` holds the bytes of
``s3://bucket/faces/2024.01/a.jpg`` (input ``s3://bucket/faces/``); dots in directory names are part of the
WebDataset key (the path up to the first dot of the *basename*), and within a shard members are
ordered by key so the files of one sample are adjacent, as WebDataset readers expect. An object
deleted between listing and reading is skipped and counted; any other read failure fails the task
(Ray retries it) rather than packing a shard with a hole in it.

Without RAY_ADDRESS an embedded local Ray is started; under ``ray job submit`` (or when Ray is
already initialised) the existing cluster is used.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import pyarrow.compute as pc

from emotion_core import shards, storage

from . import _cli
from ._cli import JobError, UsageError

PACK_FORMATS = ("webdataset", "parquet")
_SHARD_NAME = re.compile(r"shard-\d{6,}\.(tar|parquet)")


class PackError(RuntimeError):
    """An object that could not be read (an outage, not bad data): the shard is not written."""


class PackFailed(JobError):
    """A shard task failed for good (exit 1); shards written so far stay and a re-run overwrites them."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _cli.ArgumentParser(prog="python -m jobs.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, metavar="URI", help="local directory or s3://bucket/prefix of images")
    p.add_argument("--output", required=True, metavar="URI", help="where the shards go, local or s3://")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--format", choices=PACK_FORMATS, default="webdataset",
                   help="webdataset (.tar, default) or parquet (columns key, image)")
    p.add_argument("--read-threads", type=int, default=32, help="concurrent reads per task (default 32)")
    p.add_argument("--max-shard-bytes", type=int, default=shards.DEFAULT_MAX_SHARD_BYTES,
                   help=f"refuse shards larger than this (default {shards.DEFAULT_MAX_SHARD_BYTES}, the "
                        "labelling job's limit)")
    p.add_argument("--max-retries", type=int, default=3, help="Ray retries of a failed shard task (default 3)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    for name in ("shard_size", "read_threads", "max_shard_bytes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_retries < 0:
        raise UsageError("--max-retries must be >= 0")
    try:
        args.input = storage.parse(args.input).uri
        args.output = storage.parse(args.output).uri
    except storage.StorageError as e:
        raise UsageError(str(e)) from None
    if args.output == args.input or args.output.startswith(args.input + "/"):
        raise UsageError(f"--output {args.output} must not be inside --input {args.input}")


def relative_names(uris: list[str], input_uri: str) -> list[str]:
    """Each object's path relative to the input prefix (its basename when the input is one file)."""
    prefix = input_uri.rstrip("/") + "/"
    return [u[len(prefix):] if u.startswith(prefix) else u.rsplit("/", 1)[-1] for u in uris]


def shard_uri(output: str, index: int, n_shards: int, fmt: str) -> str:
    width = max(6, len(str(n_shards - 1)))
    return storage.join(output, f"shard-{index:0{width}d}{shards.SHARD_EXTENSIONS[fmt]}")


def build_shard(uris: list[str], names: list[str], out_uri: str, fmt: str, threads: int) -> dict:
    """Read the objects and write one shard (runs in a Ray task). Returns its counts."""
    members, missing = [], 0
    for uri, name, read in zip(uris, names, storage.read_objects(uris, threads)):
        if read.error and read.error.startswith(storage.NOT_FOUND):
            missing += 1
        elif read.error:
            raise PackError(f"{uri}: {read.error}")
        else:
            members.append((name, read.data))
    members.sort(key=lambda m: (shards.webdataset_key(m[0]), m[0]))
    blob = shards.write_webdataset(members) if fmt == "webdataset" else shards.write_parquet_shard(members)
    storage.write_bytes(out_uri, blob)
    return {"shard": out_uri, "members": len(members), "missing": missing, "bytes": len(blob)}


def remove_stale_shards(output: str, keep: set[str]) -> list[str]:
    """Delete ``shard-N.tar|parquet`` files directly under ``output`` that this run did not write."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(output)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except OSError as e:
        raise storage.StorageError(f"cannot list {output}: {e}") from e
    removed = []
    for info in infos:
        uri = storage.join(output, info.base_name)
        if info.type == pafs.FileType.File and _SHARD_NAME.fullmatch(info.base_name) and uri not in keep:
            fs.delete_file(info.path)
            removed.append(uri)
    return removed


def run_tasks(plan: list[tuple[list[str], list[str], str]], args) -> list[dict]:
    """One Ray task per shard, at most about two per CPU in flight so the driver's object store
    use stays bounded; results in shard order."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=args.max_retries, retry_exceptions=True)(build_shard)
    window = max(2, int(ray.cluster_resources().get("CPU", 1)) * 2)
    results: dict = {}
    pending: dict = {}
    for i, (uris, names, out) in enumerate(plan):
        if len(pending) >= window:
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
        pending[task.remote(uris, names, out, args.format, args.read_threads)] = i
    for ref, i in pending.items():
        results[i] = ray.get(ref)
    return [results[i] for i in range(len(plan))]


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    check_args(args)
    try:
        storage.check_writable(args.output)
        listing = storage.list_objects(args.input)
    except storage.StorageError as e:
        raise UsageError(str(e)) from None
    listing = listing.filter(pc.invert(pc.is_valid(listing["error"]))).sort_by("image_uri")
    uris = [u for u in listing["image_uri"].to_pylist() if shards.detect_format(u) == "images"]
    sizes = dict(zip(listing["image_uri"].to_pylist(), listing["size_bytes"].to_pylist()))
    sizes = [sizes[u] for u in uris]
    if not uris:
        raise UsageError(f"no images under {args.input}")
    names = relative_names(uris, args.input)
    n = args.shard_size
    n_shards = (len(uris) + n - 1) // n
    plan = []
    for i in range(n_shards):
        listed = sum(s or 0 for s in sizes[i * n:(i + 1) * n])
        if listed > args.max_shard_bytes:
            raise UsageError(f"shard {i} would hold {listed} bytes > --max-shard-bytes {args.max_shard_bytes}: "
                             f"use a smaller --shard-size")
        out = shard_uri(args.output, i, n_shards, args.format)
        plan.append((uris[i * n:(i + 1) * n], names[i * n:(i + 1) * n], out))
    print(f"[pack] {len(uris)} objects under {args.input} -> {n_shards} {args.format} shard(s) of up to {n} "
          f"in {args.output}", flush=True)

    _cli.init_ray()
    try:
        results = run_tasks(plan, args)
    except Exception as e:  # ray.exceptions.RayTaskError after --max-retries: nothing half-done is kept
        raise PackFailed(f"a shard task failed after {args.max_retries} retries: {_first_line(e)}") from e
    removed = remove_stale_shards(args.output, {out for _, _, out in plan})
    seconds = time.perf_counter() - t0
    summary = {
        "input": args.input,
        "output": args.output,
        "format": args.format,
        "shard_size": n,
        "objects": len(uris),
        "members": sum(r["members"] for r in results),
        "missing": sum(r["missing"] for r in results),
        "shards": n_shards,
        "bytes": sum(r["bytes"] for r in results),
        "stale_shards_removed": len(removed),
        "seconds": round(seconds, 3),
    }
    storage.write_bytes(storage.join(args.output, "_pack.json"), json.dumps(summary, indent=2).encode())
    print(f"[pack] {summary['objects']} objects -> {summary['shards']} shards, {summary['bytes']} bytes, "
          f"{summary['seconds']:.1f} s ({summary['missing']} deleted after listing, "
          f"{summary['stale_shards_removed']} stale shards removed)", flush=True)
    return summary


def _first_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e  # RayTaskError wraps the task's exception
    return (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:300]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return _cli.run_main("jobs.pack", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
