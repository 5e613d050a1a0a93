"""Publish a model version behind a pointer, roll back to an older one, or list the versions.

    python -m jobs.publish runs/emonet-v1/models/VERSION --pointer s3://bucket/models/emotion/latest.json
    python -m jobs.publish --list runs/emonet-v1/models [--pointer s3://bucket/models/emotion/latest.json]

Publishing (or rolling back, which is publishing an older version) first loads the model fully:
model.json validated, weights read and checked against its sha256, the state dict loaded into
its architecture. Only then is the pointer replaced, in one atomic write, with the version's
URI, version id and weights sha256. MODEL may also be a pointer (promote staging to prod).
--list prints the complete versions under a models root, newest first; "*" marks the one the
pointer publishes. Exit 0 on success; 2 on bad arguments, a model that does not load or an
invalid pointer; 1 when the pointer cannot be written.
"""

from __future__ import annotations

import argparse
import sys

from emotion_core import storage
from emotion_core.checkpoint import (
    CheckpointError,
    list_model_versions,
    load_model,
    read_pointer,
    resolve_model_uri,
    write_pointer,
)

from ._cli import ArgumentParser, UsageError, run_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m jobs.publish",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="model version directory (or pointer) to publish")
    p.add_argument("--pointer", metavar="URI", help="the pointer .json to write (or, with --list, to read)")
    p.add_argument("--list", metavar="MODELS_ROOT", help="list the versions under MODELS_ROOT instead")
    args = p.parse_args(argv)
    if args.list and args.model:
        p.error("give either MODEL or --list MODELS_ROOT, not both")
    if not args.list and not args.model:
        p.error("give the MODEL to publish, or --list MODELS_ROOT")
    if args.model and not args.pointer:
        p.error("--pointer URI is required to publish")
    if args.pointer and not args.pointer.strip().endswith(".json"):
        p.error(f"--pointer {args.pointer!r} must be a .json file, e.g. .../latest.json")
    return args


def publish(model: str, pointer: str) -> str:
    """Load ``model`` fully, then point ``pointer`` at it; returns the line to print."""
    before = read_pointer(pointer)
    model_uri = storage.parse(resolve_model_uri(model)).uri  # absolute: relative ones resolve against the pointer
    _, manifest = load_model(model_uri)
    write_pointer(pointer, model_uri, manifest)
    was = f" (was {before.version})" if before else ""
    return f"published {pointer} -> {model_uri} (version {manifest.version}, sha256 {manifest.weights_sha256}){was}"


def list_versions(models_root: str, pointer: str | None) -> list[str]:
    """One line per version, newest first; ``*`` marks the published one."""
    published = read_pointer(pointer) if pointer else None
    lines = []
    for v in list_model_versions(models_root):
        if v.manifest is None:
            lines.append(f"! {v.version}  INVALID: {v.problem}")
            continue
        m = v.manifest
        live = published is not None and published.version == m.version \
            and published.sha256 in (None, m.weights_sha256)
        scores = " ".join(f"{k} {m.metrics[k]:.4f}" for k in ("accuracy", "macro_f1")
                          if isinstance(m.metrics.get(k), float))
        mark = "*" if live else " "
        lines.append(f"{mark} {v.version}  {m.created_at}  {m.architecture}  {scores}  {v.uri}".rstrip())
    if pointer and published is None:
        lines.append(f"(no pointer at {pointer} yet)")
    elif published and not any(line.startswith("*") for line in lines):
        lines.append(f"(the pointer publishes version {published.version} at {published.model_uri}, not listed here)")
    return lines or [f"(no complete model versions under {models_root})"]


def run(args: argparse.Namespace) -> None:
    try:
        print("\n".join(list_versions(args.list, args.pointer)) if args.list else publish(args.model, args.pointer))
    except CheckpointError as e:  # the model or pointer named is missing or invalid: bad input
        raise UsageError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("jobs.publish", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
