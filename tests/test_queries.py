"""The copy-paste queries in cluster/QUERIES.md, run exactly as written (only the URI and the date
replaced) against Parquet written by the real labelling job: DuckDB, pandas and polars on a local
folder and on a local S3 server, the DuckDB SQL on local files, the Athena queries on DuckDB (a
check of their SQL), and the Athena DDL shown there against what `jobs.label --print-ddl` prints."""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pytest

from emotion_core.storage import filesystem
from tests.helpers import DATES, real_labels, save_untrained_model

DOC = Path(__file__).resolve().parents[1] / "cluster" / "QUERIES.md"
PLACEHOLDER_URI = "s3://my-emotion-bucket/emotion-labels"
PLACEHOLDER_DATE = "2026-11-20"
DAY = DATES[-1]  # the date both real datasets have


def snippets() -> dict[str, str]:
    """Fenced code blocks tagged ```<lang> test=<name>."""
    blocks = re.findall(r"^```\w+ test=([\w-]+)\n(.*?)^```", DOC.read_text(), re.S | re.M)
    out = dict(blocks)
    assert len(out) == len(blocks), "duplicate test= names in QUERIES.md"
    return out


@pytest.fixture(scope="module")
def labels(tmp_path_factory, s3_server, ray_session):
    return real_labels(tmp_path_factory, s3_server, ray_session)


def expected_counts(uri: str, day: str) -> Counter:
    """Labels per face in partition ``day``, counted without SQL."""
    fs, path = filesystem(uri)
    t = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table(
        columns=["label"], filter=ds.field("dt") == day
    )
    return Counter(lab for lab in t.column("label").to_pylist() if lab)


def run_python(code: str, uri: str) -> dict:
    assert PLACEHOLDER_URI in code
    code = code.replace(PLACEHOLDER_URI, uri).replace(PLACEHOLDER_DATE, DAY)
    ns: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, str(DOC), "exec"), ns)  # noqa: S102 - the documented snippet itself
    ns["__stdout__"] = out.getvalue()
    return ns


def test_snippets_are_all_there():
    assert set(snippets()) == {"duckdb", "duckdb-sql", "pandas", "polars", "athena-ddl", "athena", "spark"}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_duckdb_snippet(labels, where):
    ns = run_python(snippets()["duckdb"], labels[where])
    want = expected_counts(labels[where], DAY)
    assert dict(zip(ns["faces"]["label"], ns["faces"]["faces"])) == want and sum(want.values()) == labels["faces"]
    assert ns["faces"]["pct"].sum() == pytest.approx(100, abs=0.05)
    images = ns["images"].iloc[0]
    assert (images["images"], images["errors"], images["without_faces"]) == \
        (labels["images"], labels["broken"], labels["no_face"])
    assert images["faces_per_image"] == pytest.approx(labels["faces"] / (labels["images"] - labels["broken"]), abs=0.01)
    assert int(ns["errors"]["images"].sum()) == labels["broken"]
    assert all(re.fullmatch(r"[a-z_]+", r) for r in ns["errors"]["reason"]), list(ns["errors"]["reason"])
    assert ns["__stdout__"].strip()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_pandas_snippet(labels, where):
    ns = run_python(snippets()["pandas"], labels[where])
    assert dict(ns["faces"]) == expected_counts(labels[where], DAY)
    assert len(ns["images"]) == labels["images"] and len(ns["df"]) == labels["rows"]
    assert set(ns["df"]["dt"].astype(str)) == {DAY}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_polars_snippet(labels, where):
    ns = run_python(snippets()["polars"], labels[where])
    got = dict(zip(ns["faces"]["label"].to_list(), ns["faces"]["faces"].to_list()))
    assert got == expected_counts(labels[where], DAY)


def test_polars_native_local_scan(labels):
    import polars as pl

    line = re.search(r"`(pl\.scan_parquet\(.*?\))`", DOC.read_text()).group(1)
    lf = eval(line.replace("emotion-labels/", labels["local"] + "/"), {"pl": pl})  # noqa: S307
    assert lf.select(pl.len()).collect().item() == labels["rows"] * len(DATES)


def test_duckdb_sql_snippet_on_local_files(labels):
    sql = snippets()["duckdb-sql"].replace("emotion-labels/", labels["local"] + "/")
    rows = duckdb.sql(sql).fetchall()
    per_day = Counter()
    for day, label, n in rows:
        per_day[str(day)] += n
        if str(day) == DAY:
            assert expected_counts(labels["local"], DAY)[label] == n
    assert per_day == {d: labels["faces"] for d in DATES}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_athena_queries_run_on_duckdb(labels, where):
    fs, path = filesystem(labels[where])
    dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
    con = duckdb.connect()
    con.register("emotion_labels", dataset)
    statements = [s.strip() for s in snippets()["athena"].replace(PLACEHOLDER_DATE, DAY).split(";") if s.strip()]
    assert len(statements) == 4
    faces, images, errors, models = (con.sql(s).arrow().read_all().to_pylist() for s in statements)
    assert {r["label"]: r["faces"] for r in faces} == expected_counts(labels[where], DAY)
    assert (images[0]["images"], images[0]["without_faces"]) == (labels["images"], labels["no_face"])
    assert sum(r["images"] for r in errors) == labels["broken"]
    assert len(models) == 1 and models[0]["images"] == labels["images"]


def test_athena_ddl_matches_print_ddl(tmp_path, capsys):
    from emotion_core.labels import CANONICAL
    from jobs import label

    model, _ = save_untrained_model(tmp_path / "model7", classes=CANONICAL)
    assert label.main(["--print-ddl", "--model", model, "--output", PLACEHOLDER_URI]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == snippets()["athena-ddl"].strip()
