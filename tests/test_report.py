"""jobs.report over Parquet from the real labelling job (local and S3), plus the report's own
cases (model versions, date selection, plot, missing dataset) on directly written Parquet."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from jobs import report
from tests.helpers import DATES, real_labels, write_fake_labels


@pytest.fixture(scope="module")
def labels(tmp_path_factory, s3_server, ray_session):
    return real_labels(tmp_path_factory, s3_server, ray_session)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_report_on_real_label_job_output(labels, where, capsys):
    days = len(DATES) if where == "local" else 1
    args = ["--labels", labels[where]] + (["--since", DATES[0]] if days > 1 else [])
    assert report.main(args) == 0
    out = capsys.readouterr().out
    n, errors = labels["images"] * days, labels["broken"] * days
    assert f"{n} images: {n - errors} labelled, {errors} errors" in out
    ok = labels["images"] - labels["broken"]
    assert f"faces per image {labels['faces'] / ok:.2f}: {labels['faces'] * days} faces; {days} image(s) " \
           f"({100.0 / ok:.1f}%) without a face" in out
    assert (f"dt {DATES[0]} .. {DATES[1]} (2 days)" if days > 1 else f"dt {DATES[1]}\n") in out
    # every error reason the job wrote shows up, and the per-model table names the model
    assert "Errors by reason" in out and "Per model" in out and "cnn" in out
    table = report.load_labels(labels[where])
    reasons = {e.split(":", 1)[0].strip() for e in table.column("error").to_pylist() if e}
    for r in reasons:
        assert re.search(rf"^{re.escape(r)}\s+\d+", out, re.M), r


def test_report_by_day_with_plot(labels, tmp_path, capsys):
    png = tmp_path / "days.png"
    assert report.main(["--labels", labels["local"], "--since", DATES[1], "--by", "dt", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert f"dt {DATES[1]}\n" in out and DATES[0] not in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_by_model_version_and_date(tmp_path, capsys):
    root = tmp_path / "labels"
    write_fake_labels(str(root))
    assert report.main(["--labels", str(root), "--by", "model_version", "--since", DATES[0]]) == 0
    out = capsys.readouterr().out
    assert "14 images: 11 labelled, 3 errors (21.43%)" in out
    assert re.search(r"cnn\s+v1\s+6\s+5\s+1", out) and re.search(r"cnn\s+v2\s+8\s+6\s+2", out)  # images faces errors
    assert re.search(r"^not_an_image\s+3\s", out, re.M)

    assert report.main(["--labels", str(root), "--date", DATES[0]]) == 0
    out = capsys.readouterr().out
    assert "6 images: 5 labelled, 1 errors" in out and "v2" not in out

    assert report.main(["--labels", str(root)]) == 0  # default: the latest snapshot
    out = capsys.readouterr().out
    assert f"dt {DATES[1]}\n" in out and "8 images: 6 labelled, 2 errors" in out and "v1" not in out


def test_report_errors_are_clear(tmp_path, s3_bucket, capsys):
    assert report.main(["--labels", str(tmp_path / "nope")]) == 1
    assert "not found" in capsys.readouterr().err
    assert report.main(["--labels", f"s3://{s3_bucket}/nothing-here"]) == 1
    assert "not found" in capsys.readouterr().err
    write_fake_labels(str(tmp_path / "labels"))
    assert report.main(["--labels", str(tmp_path / "labels"), "--date", "2020-01-01"]) == 1
    assert "no labels for dt=2020-01-01" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        report.main(["--labels", str(tmp_path / "labels"), "--date", "yesterday"])
    assert e.value.code == 2


def test_report_cli_exit_codes(tmp_path):
    """The CLI itself (what a scheduler runs): 0 with a report, 1 with a one-line error."""
    write_fake_labels(str(tmp_path / "labels"))
    ok = subprocess.run([sys.executable, "-m", "jobs.report", "--labels", str(tmp_path / "labels")],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "Label distribution" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "jobs.report", "--labels", str(tmp_path / "missing")],
                         capture_output=True, text=True)
    assert (
        bad.returncode == 1
        and bad.stderr.startswith("jobs.report: error: labels dataset")
        and len(bad.stderr.splitlines()) == 1
    )
