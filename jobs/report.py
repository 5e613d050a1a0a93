"""Summarise a labels dataset: label distribution, error rate and reasons, per-model counts.

    python -m jobs.report --labels s3://bucket/emotion-labels --since 2026-11-01 --by dt --plot days.png

Each ``dt=YYYY-MM-DD`` partition written by `jobs.label` is a complete snapshot (one row per face
found in each listed image; one row for an image without faces or with an error), so without
--date/--since the report covers the latest partition: the current state. Images are counted once
(the row with ``face_index`` 0 or null), labels per face; partitions written before faces existed
read as one face per labelled image.

Reads the Hive-partitioned Parquet dataset written by `jobs.label` (``<labels>/dt=YYYY-MM-DD/``)
with pyarrow.dataset through `emotion_core.storage` (local or S3, S3-compatible endpoints from
AWS_ENDPOINT_URL), pruning partitions for --date/--since and reading only the columns the report
needs, then hands the Arrow table to DuckDB for the SQL (DuckDB's own S3 reader, httpfs, would
need an extension download). Files and folders starting with "_" or "." (run summaries under
``_runs/``, staging) are not data and are skipped.

Exit codes: 0 when a report was printed (error rows are data, not a failure), 1 when the dataset
is missing or the selection is empty, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from emotion_core.labels import CANONICAL
from emotion_core.schema import PARTITION_COLUMN, label_schema
from emotion_core.storage import StorageError, filesystem

from ._cli import ArgumentParser, JobError, format_table, run_main

COLUMNS = ["label", "confidence", "error", "model_name", "model_version", "labelled_at"]
FACE_COLUMNS = ["face_index", "faces_in_image"]  # null in partitions written before faces existed
BY_CHOICES = ("label", "model_version", "dt")


class ReportError(JobError):
    """Nothing to report on: missing dataset, unreadable files, or an empty selection."""


def _date(value: str) -> str:
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date: use YYYY-MM-DD") from None


def load_labels(uri: str, date: str | None = None, since: str | None = None) -> pa.Table:
    """The report's columns (plus ``dt``) for the selected partitions, as one Arrow table."""
    try:
        fs, path = filesystem(uri)
        info = fs.get_file_info(path)
    except (StorageError, OSError) as e:
        raise ReportError(f"cannot open labels dataset {uri}: {e}") from e
    if info.type == pafs.FileType.NotFound:
        raise ReportError(f"labels dataset {uri} not found: pass the --output URI of `python -m jobs.label`")
    if info.type != pafs.FileType.Directory:
        raise ReportError(f"labels dataset {uri} is a file: pass the dataset's folder (the --output of jobs.label)")
    partitioning = ds.partitioning(pa.schema([(PARTITION_COLUMN, pa.string())]), flavor="hive")
    try:
        dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning=partitioning)
    except (OSError, pa.ArrowInvalid) as e:
        raise ReportError(f"cannot read labels dataset {uri}: {str(e).splitlines()[0]}") from e
    if not dataset.files:
        raise ReportError(f"labels dataset {uri} not found or empty: no Parquet files under it")
    missing = [c for c in COLUMNS if c not in dataset.schema.names]
    if missing:
        raise ReportError(f"{uri} is not a labels dataset: missing column(s) {', '.join(missing)}")
    # An explicit schema reads the face columns as null from files written without them.
    fields = {f.name: f for f in label_schema(["x"])}
    schema = pa.schema([fields[c] for c in COLUMNS + FACE_COLUMNS] + [pa.field(PARTITION_COLUMN, pa.string())])
    dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning=partitioning, schema=schema)
    part = ds.field(PARTITION_COLUMN)
    if date:
        flt = part == date
    elif since:
        flt = part >= since
    else:  # each partition is a complete snapshot of the bucket: by default, the latest one
        days = sorted({m.group(1) for f in dataset.files if (m := _DT_DIR.search(f))})
        if not days:
            raise ReportError(f"{uri} has no {PARTITION_COLUMN}=YYYY-MM-DD partitions")
        flt = part == days[-1]
    try:
        table = dataset.to_table(columns=[*COLUMNS, *FACE_COLUMNS, PARTITION_COLUMN], filter=flt)
        # Naive UTC timestamps: DuckDB returns tz-aware Python values only with pytz installed.
        i = table.schema.get_field_index("labelled_at")
        return table.set_column(i, "labelled_at", table.column(i).cast(pa.timestamp("ms")))
    except (OSError, pa.ArrowInvalid) as e:
        raise ReportError(f"cannot read labels dataset {uri}: {str(e).splitlines()[0]}") from e


_DT_DIR = re.compile(rf"(?:^|/){PARTITION_COLUMN}=(\d{{4}}-\d{{2}}-\d{{2}})/")

# Errors are "<reason>: <detail>"; the reason is the part before the first colon.
_REASON = "trim(split_part(error, ':', 1))"
# Each image has exactly one row with face_index 0 (its first face) or null (no face, or an error).
_IMAGE = "coalesce(face_index, 0) = 0"
_IMAGES = f"count(*) FILTER ({_IMAGE})"

QUERIES = {
    "totals": f"""
        SELECT {_IMAGES} AS images, {_IMAGES} - count(*) FILTER (error IS NOT NULL) AS ok,
               count(*) FILTER (error IS NOT NULL) AS errors,
               round(100.0 * count(*) FILTER (error IS NOT NULL) / {_IMAGES}, 2) AS error_pct,
               min({PARTITION_COLUMN}) AS first_dt, max({PARTITION_COLUMN}) AS last_dt,
               count(DISTINCT {PARTITION_COLUMN}) AS days,
               count(label) AS faces,
               count(*) FILTER (faces_in_image = 0) AS without_faces
        FROM labels""",
    "label": """
        SELECT label, count(*) AS faces,
               round(100.0 * count(*) / sum(count(*)) OVER (), 2) AS pct,
               round(avg(confidence), 3) AS mean_confidence
        FROM labels WHERE label IS NOT NULL
        GROUP BY label ORDER BY faces DESC, label""",
    "errors": f"""
        SELECT {_REASON} AS reason, count(*) AS images, any_value(error) AS example
        FROM labels WHERE error IS NOT NULL
        GROUP BY reason ORDER BY images DESC, reason""",
    "model_version": f"""
        SELECT model_name, model_version, {_IMAGES} AS images, count(label) AS faces,
               count(*) FILTER (error IS NOT NULL) AS errors,
               min(labelled_at) AS first_labelled, max(labelled_at) AS last_labelled
        FROM labels GROUP BY model_name, model_version ORDER BY last_labelled DESC, model_version""",
    "dt": f"""
        SELECT {PARTITION_COLUMN}, {_IMAGES} AS images, count(label) AS faces,
               count(*) FILTER (error IS NOT NULL) AS errors,
               round(100.0 * count(*) FILTER (error IS NOT NULL) / {_IMAGES}, 2) AS error_pct,
               mode(label) AS top_label, count(DISTINCT model_version) AS models
        FROM labels GROUP BY {PARTITION_COLUMN} ORDER BY {PARTITION_COLUMN}""",
    "per_day_labels": f"""
        SELECT {PARTITION_COLUMN}, coalesce(label, 'error') AS label, count(*) AS faces
        FROM labels WHERE label IS NOT NULL OR error IS NOT NULL GROUP BY ALL ORDER BY {PARTITION_COLUMN}, label""",
}


def run_queries(table: pa.Table, names: list[str]) -> dict[str, tuple[list[str], list[tuple]]]:
    """Run the named queries over the Arrow table; returns name -> (column names, rows)."""
    con = duckdb.connect()
    try:
        con.register("labels", table)
        out = {}
        for name in names:
            rel = con.sql(QUERIES[name])
            out[name] = (list(rel.columns), rel.fetchall())
        return out
    finally:
        con.close()


def plot_per_day(rows: list[tuple], out: str) -> None:
    """Stacked bars: images per label per day (errors as their own grey segment)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = sorted({r[0] for r in rows})
    seen = {r[1] for r in rows}
    labels = [c for c in CANONICAL if c in seen] + sorted(seen - set(CANONICAL) - {"error"})
    labels += ["error"] if "error" in seen else []
    counts = {(d, lab): n for d, lab, n in rows}
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(days) + 3), 4.5))
    bottom = [0] * len(days)
    cmap = plt.get_cmap("tab10")
    for i, lab in enumerate(labels):
        heights = [counts.get((d, lab), 0) for d in days]
        color = "0.6" if lab == "error" else cmap(i % 10)
        ax.bar(days, heights, bottom=bottom, label=lab, color=color)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("dt")
    ax.set_ylabel("faces (errors: images)")
    ax.set_title("Emotion labels per day")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m jobs.report",
        description="Label distribution, error rate and reasons, and per-model counts of a labels dataset.",
    )
    p.add_argument("--labels", required=True, help="labels dataset: the --output of jobs.label (local path or s3://)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--date", type=_date, help="this partition (YYYY-MM-DD); default: the latest one")
    sel.add_argument("--since", type=_date,
                     help="partitions on or after this date (YYYY-MM-DD); each is a full snapshot, so rows "
                     "add up over days: see them per day with --by dt")
    p.add_argument(
        "--by", choices=BY_CHOICES, default="label", help="main breakdown: per label, per model version or per day"
    )
    p.add_argument("--plot", metavar="PNG", help="also draw images per label per day to this PNG file")
    args = p.parse_args(argv)
    return run_main("jobs.report", lambda: run(args))


def run(args: argparse.Namespace) -> dict:
    table = load_labels(args.labels, args.date, args.since)
    if table.num_rows == 0:
        which = f"dt={args.date}" if args.date else f"dt>={args.since}"
        raise ReportError(f"no labels for {which} in {args.labels}")
    names = ["totals", args.by, "errors"] + (["model_version"] if args.by != "model_version" else [])
    if args.plot:
        names.append("per_day_labels")
    res = run_queries(table, names)

    (images, ok, errors, error_pct, first, last, days, faces, without) = res["totals"][1][0]
    span = first if first == last else f"{first} .. {last} ({days} days)"
    print(f"Labels {args.labels}  dt {span}")
    print(f"{images} images: {ok} labelled, {errors} errors ({error_pct:g}%)")
    print(f"faces per image {faces / ok if ok else 0:.2f}: {faces} faces; {without} image(s) "
          f"({100.0 * without / ok if ok else 0:.1f}%) without a face\n")
    titles = {"label": "Label distribution", "model_version": "Per model", "dt": "Per day"}
    print(titles[args.by])
    print(format_table(*res[args.by]) + "\n")
    print("Errors by reason")
    print((format_table(*res["errors"]) if res["errors"][1] else "(none)") + "\n")
    if "model_version" in names and args.by != "model_version":
        print("Per model")
        print(format_table(*res["model_version"]))
    if args.plot:
        try:
            plot_per_day(res["per_day_labels"][1], args.plot)
        except OSError as e:
            raise ReportError(f"cannot write plot {args.plot}: {e}") from e
        print(f"\nplot written to {args.plot}")
    return res


if __name__ == "__main__":
    sys.exit(main())
