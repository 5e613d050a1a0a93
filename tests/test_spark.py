"""The Spark snippet in cluster/QUERIES.md, run as written (only the URI and date replaced) with
pyspark on the per-face table the real labelling job wrote. Needs the optional ``spark`` extra and
Java 17+, and runs only in its own pytest process (`make test-spark` sets EMOTION_SPARK_TESTS=1):
in the full suite, the Ray Train test that followed a Spark session in the same process waited
forever for its placement group (seen twice, not yet understood), so the JVM never shares a
process with the Ray tests."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.helpers import real_labels
from tests.test_queries import DAY, PLACEHOLDER_DATE, expected_counts, snippets

if os.environ.get("EMOTION_SPARK_TESTS") != "1":
    pytest.skip("Spark runs in its own process: make test-spark", allow_module_level=True)
pyspark = pytest.importorskip("pyspark", reason="the optional 'spark' extra is not installed (make test-spark)")


def _java_major() -> int | None:
    java = shutil.which("java")
    if not java:
        return None
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    try:
        version = out.split('"')[1]
        return int(version.split(".")[0])
    except (IndexError, ValueError):
        return None


@pytest.fixture(scope="module")
def spark():
    if (_java_major() or 0) < 17:
        pytest.skip("Spark 4 needs Java 17+; none found")
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[1]").appName("emotion-labels-test")
               .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1")
               .config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_spark_snippet_on_the_per_face_table(spark, tmp_path_factory, s3_server, ray_session, capsys):
    labels = real_labels(tmp_path_factory, s3_server, ray_session)
    code = snippets()["spark"]
    assert "s3a://my-emotion-bucket/emotion-labels/" in code
    code = code.replace("s3a://my-emotion-bucket/emotion-labels/", labels["local"] + "/")
    code = code.replace(PLACEHOLDER_DATE, DAY)
    ns = {"spark": spark}
    exec(compile(code, "cluster/QUERIES.md#spark", "exec"), ns)  # noqa: S102 - the documented snippet itself
    assert {r["label"]: r["count"] for r in ns["faces"].collect()} == expected_counts(labels["local"], DAY)
    row = ns["images"].collect()[0]
    assert (row["images"], row["without_faces"]) == (labels["images"], labels["no_face"])
    assert "faces_per_image" in capsys.readouterr().out
