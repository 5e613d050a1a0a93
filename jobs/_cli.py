"""The command-line contract every job keeps, in one place.

- ``main(argv) -> int`` parses the arguments (:class:`ArgumentParser`) and calls ``run(args)``;
  :func:`run_main` turns what ``run`` raises into the exit code: :class:`UsageError` (a bad argument or input, nothing
  started) is one line ``<prog>: error: <what to fix>`` on stderr and exit 2; :class:`JobError`
  (and the library's storage/checkpoint errors) once work started is one line and exit 1.
- :func:`init_ray` attaches to ``RAY_ADDRESS`` (or the cluster of ``ray job submit``), reuses an
  initialised Ray (tests, notebooks), or starts an embedded local one. The embedded one runs the
  dashboard on 127.0.0.1 because Ray's State API lives there: Ray Train V2's placement-group
  cleaner polls it every second and logs a warning each time it is missing. It also sizes Ray
  Data's Parquet footer readers to the machine (``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``, unless
  set): Ray 2.60 starts 32 actor processes for every ``read_parquet``, which on 2 cores cost
  more than the read (the Ray Data plan of 7 objects: 90 s with 32, 35-49 s with 2).
- :func:`say` prints one progress/summary line, prefixed ``[<job>]``; :func:`format_table` is
  the one plain-text table formatter.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from collections.abc import Callable, Sequence


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with the contract's one-line usage error (argparse's own prints the usage too)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog.removeprefix('python -m ')}: error: {message} (see {self.prog} --help)\n")


class UsageError(ValueError):
    """Bad arguments or inputs, found before any work started: one line on stderr, exit 2."""


class JobError(RuntimeError):
    """The job started and failed: one line on stderr, exit 1."""


def run_main(prog: str, run: Callable[[], object]) -> int:
    """Call ``run()`` and map the project's errors to exit codes (module doc)."""
    from emotion_core.checkpoint import CheckpointError
    from emotion_core.storage import StorageError

    try:
        run()
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (JobError, StorageError, CheckpointError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def init_ray() -> bool:
    """Attach to or start Ray (module doc). Returns True when this call started Ray, so the
    caller should shut it down when done."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ACCEPT_CPU_ONLY", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False)
    else:
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(min(32, max(2, os.cpu_count() or 2))))
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False)
    return True


def say(job: str, text: str) -> None:
    print(f"[{job}] {text}", flush=True)


def format_table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    """Aligned plain-text table: numbers right-aligned, None as ``-``, floats with ``%g``."""

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, dt.datetime):
            return v.strftime("%Y-%m-%d %H:%M:%S")
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in text:
        lines.append("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _numeric(s: str) -> bool:
    try:
        float(s.replace(",", "").rstrip("s%"))
        return True
    except ValueError:
        return False
