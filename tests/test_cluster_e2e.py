"""End to end on a real multi-process Ray cluster (cluster.local: `ray start --head` + one worker
node on free ports, its own temp dir): submit the training job, then the labelling job, through the
Ray Jobs API with the repository as working dir; check the model and the Parquet; a job with a bad
--model reports FAILED with its error in the logs (submitted with the `ray job` CLI recipe). The
labels go to a local S3 server, as in production. The
cluster is always stopped, also when a test fails, and nothing of it is left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import local, submit
from tests.helpers import write_images

REPO = Path(__file__).resolve().parents[1]

try:
    local.check_dashboard_deps()
    _DEPS = None
except local.ClusterError as e:
    _DEPS = str(e)
pytestmark = pytest.mark.skipif(_DEPS is not None, reason=f"Ray Jobs API unavailable: {_DEPS}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    # Started after the S3 fixture so the cluster's processes inherit its endpoint/credentials,
    # as real nodes get them from their IAM role.
    state = tmp_path_factory.mktemp("ray_cluster")
    c = local.up(state, workers=1, num_cpus=2, worker_cpus=2, object_store_mb=256, watch_pid=os.getpid())
    try:
        yield c
    finally:
        local.down(state)
        assert not local.cluster_processes(c.cluster_id), "cluster processes left running"
        assert not os.path.exists(c.temp_dir)


@pytest.fixture(scope="module")
def client(cluster):
    return local.client(cluster)


def _run(client, entrypoint: list[str], timeout: float = 300):
    from ray.job_submission import JobStatus

    renv = submit.runtime_env(str(REPO), submit.forwarded_env())
    job_id = submit.submit(client, entrypoint, renv)
    t0 = time.monotonic()
    status = submit.wait(client, job_id, timeout=timeout, poll=0.5)
    logs = client.get_job_logs(job_id)
    print(f"{entrypoint[2]}: {status} in {time.monotonic() - t0:.1f}s")
    assert status == JobStatus.SUCCEEDED, f"{entrypoint[2]} {status}:\n{logs[-4000:]}"
    return logs


def test_cluster_is_isolated(cluster):
    """Two nodes; `ray start` wrote its address into the cluster's own temp dir, not /tmp/ray,
    so a plain ray.init() elsewhere on this machine never attaches to it."""
    st = local.status(cluster.state_dir)
    assert st["running"] and st["num_nodes"] == 2
    assert (Path(cluster.temp_dir) / "ray_current_cluster").read_text().strip() == cluster.gcs_address
    from ray._private.services import find_bootstrap_address

    assert find_bootstrap_address(None) != cluster.gcs_address


def test_train_then_label_through_jobs_api(cluster, client, tmp_path, s3_bucket, monkeypatch, capsys):
    from emotion_core.synthetic import generate_dataset

    data = tmp_path / "faces"
    generate_dataset(data, train_per_class=16, test_per_class=4, classes=("happy", "sad", "surprise"), seed=1)
    runs = tmp_path / "runs"
    logs = _run(client, [
        "python", "-m", "jobs.train", "--data", str(data), "--model", "cnn", "--output", str(runs),
        "--name", "e2e", "--epochs", "1", "--batch-size", "32", "--num-workers", "2",
        "--publish", str(runs / "latest.json"),
    ])
    pointer = json.loads((runs / "latest.json").read_text())  # published only after success
    manifest = json.loads((runs / "e2e" / "models" / pointer["version"] / "model.json").read_text())
    assert manifest["classes"] == ["happy", "sad", "surprise"]
    assert (runs / "e2e" / "models" / pointer["version"] / "model.safetensors").stat().st_size > 0
    assert "e2e" in logs

    # The labelling job through the submit script, as a scheduler would run it: --wait streams the
    # logs and the exit code is the job's result.
    # Its output goes to S3 (the local S3 server; the endpoint reaches the job through the
    # runtime_env's env_vars, the credentials through the nodes' environment, as a role would).
    images = write_images(tmp_path / "images")
    labels = f"s3://{s3_bucket}/labels"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.chdir(REPO)
    rc = submit.main([
        "--address", cluster.dashboard_url, "--wait", "--timeout", "300", "--",
        "python", "-m", "jobs.label", "--input", str(images), "--model", str(runs / "latest.json"),
        "--output", labels, "--date", "2026-11-20", "--actors", "1",
    ])
    logs = capsys.readouterr().out
    assert rc == 0, logs[-4000:]
    assert "SUCCEEDED" in logs and "ray job submit --address" in logs
    import pyarrow.dataset as ds

    from emotion_core.storage import filesystem

    fs, path = filesystem(labels)
    table = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    n_files = sum(1 for p in images.iterdir() if p.is_file())
    assert table.num_rows == n_files
    assert len(set(table.column("image_uri").to_pylist())) == n_files  # every image exactly once
    errors = [e for e in table.column("error").to_pylist() if e]
    assert len(errors) == 3
    assert set(table.column("model_version").to_pylist()) == {manifest["version"]}
    assert f"{labels}/dt=2026-11-20" in logs  # the job says where its output went


def test_failed_job_reports_failed_with_its_error(cluster, tmp_path):
    """The documented CLI recipe (`ray job submit --no-wait`, `ray job status`, `ray job logs`):
    a bad --model fails fast, the job is FAILED, and the one-line reason is in its logs."""
    bindir = str(Path(sys.executable).parent)  # the `ray` CLI of this venv
    env = {**os.environ, "RAY_ADDRESS": cluster.dashboard_url, "RAY_AUTH_MODE": "token",
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    ray = os.path.join(bindir, "ray")
    renv = submit.runtime_env(str(REPO))
    cmd = submit.cli_command(cluster.dashboard_url, [
        "python", "-m", "jobs.label", "--input", str(tmp_path), "--model", str(tmp_path / "no-such-model"),
        "--output", str(tmp_path / "labels"),
    ], renv)
    out = subprocess.run(cmd, shell=True, env=env, capture_output=True, text=True, timeout=330)
    assert out.returncode == 0, out.stderr[-2000:]
    job_id = next(line.split("'")[1] for line in (out.stdout + out.stderr).splitlines() if "Job '" in line)
    from ray.job_submission import JobStatus

    assert submit.wait(local.client(cluster), job_id, timeout=90, poll=0.5) == JobStatus.FAILED
    status = subprocess.run([ray, "job", "status", job_id], env=env, capture_output=True, text=True, timeout=60)
    assert "failed" in (status.stdout + status.stderr).lower()
    logs = subprocess.run([ray, "job", "logs", job_id], env=env, capture_output=True, text=True, timeout=60)
    assert "no-such-model" in logs.stdout
    assert not (tmp_path / "labels").exists() or not any((tmp_path / "labels").glob("dt=*"))
