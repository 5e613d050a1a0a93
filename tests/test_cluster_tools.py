"""cluster.submit and cluster.local without starting a cluster (tests/test_cluster_e2e.py starts
one): the submit recipe, its environment rules, and the CLIs' errors."""

from __future__ import annotations

import json
import shlex

import pytest

from cluster import local, submit


def test_runtime_env_keeps_the_upload_small_and_refuses_credentials():
    renv = submit.runtime_env(".", {"AWS_REGION": "us-east-1"})
    assert {".venv", ".git", "data", "outputs", ".ray-local"} <= set(renv["excludes"])
    assert renv["env_vars"] == {"AWS_REGION": "us-east-1"} and "pip" not in renv
    for secret in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        with pytest.raises(ValueError, match="credentials"):
            submit.runtime_env(".", {secret: "x"})


def test_forwarded_env_is_only_non_secret_settings(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-forwarded")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    env = submit.forwarded_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ENDPOINT_URL_S3" not in env


def test_cli_command_is_a_valid_ray_job_submit_line():
    renv = submit.runtime_env(".", {"AWS_REGION": "us-east-1"})
    line = submit.cli_command("http://127.0.0.1:8265", ["python", "-m", "jobs.train", "--use-gpu"], renv, gpus=1)
    argv = shlex.split(line)
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[argv.index("--working-dir") + 1] == "."
    rest = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert rest["excludes"] == submit.EXCLUDES and rest["env_vars"] == {"AWS_REGION": "us-east-1"}
    assert argv[argv.index("--entrypoint-num-gpus") + 1] == "1" and "--no-wait" in argv
    assert argv[argv.index("--") + 1:] == ["python", "-m", "jobs.train", "--use-gpu"]


def test_submit_cli_dry_run_and_usage_errors(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert submit.main(["--address", "http://h:8265", "--dry-run", "--", "python", "-m", "jobs.label", "--help"]) == 0
    assert capsys.readouterr().out.startswith("ray job submit --address http://h:8265 --working-dir .")
    assert submit.main(["python", "-m", "jobs.label"]) == 2  # no "--"
    with pytest.raises(SystemExit) as e:
        submit.main(["--", "python", "-m", "jobs.label"])  # no address
    assert e.value.code == 2
    assert "RAY_ADDRESS" in capsys.readouterr().err


def test_local_cli_without_a_cluster(tmp_path, capsys):
    state = str(tmp_path / "state")
    assert local.main(["status", "--state-dir", state]) == 0
    assert json.loads(capsys.readouterr().out) == {"running": False}
    assert local.main(["url", "--state-dir", state]) == 1
    assert "run `python -m cluster.local up`" in capsys.readouterr().err
    assert local.main(["down", "--state-dir", state]) == 0
    assert "no local cluster recorded" in capsys.readouterr().out


def test_auth_token_is_created_once_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "auth_token"))
    assert local.auth_token() is None
    token = local.auth_token(create=True)
    assert len(token) == 64 and (tmp_path / "auth_token").stat().st_mode & 0o777 == 0o600
    assert local.auth_token(create=True) == token  # never overwritten
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert submit.auth_headers() == {"Authorization": f"Bearer {token}"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submit.auth_headers() == {}


def test_auth_token_file_must_be_private_and_ours(tmp_path, monkeypatch, capsys):
    import os

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    path = tmp_path / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    path.write_text("a" * 64)
    path.chmod(0o664)  # writable by others: possibly their token, never used
    with pytest.raises(local.ClusterError, match="others can change it"):
        local.auth_token()
    with pytest.raises(local.ClusterError, match="others can change it"):
        local.auth_token(create=True)  # not even when asked to create one
    path.chmod(0o644)  # readable by others (how Ray itself writes it): made private, with a warning
    assert local.auth_token() == "a" * 64
    assert path.stat().st_mode & 0o777 == 0o600 and "readable by other users" in capsys.readouterr().err
    link = tmp_path / "link"
    link.symlink_to(path)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(link))
    with pytest.raises(local.ClusterError, match="symlink"):
        local.auth_token()
    if os.getuid() == 0:  # root can hand the file to another user: it must be refused
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
        os.chown(path, 4242, -1)
        with pytest.raises(local.ClusterError, match="owned by uid 4242"):
            local.auth_token()


def test_exposed_listeners_names_sockets_beyond_loopback(tmp_path):
    """A process carrying the cluster's marker listens on 0.0.0.0 and on 127.0.0.1: only the
    first is reported, and the --no-auth warning names its port."""
    import os
    import subprocess
    import sys

    code = ("import socket, sys, time\n"
            "a = socket.socket(); a.bind(('0.0.0.0', 0)); a.listen()\n"
            "b = socket.socket(); b.bind(('127.0.0.1', 0)); b.listen()\n"
            "print(a.getsockname()[1], b.getsockname()[1], flush=True); time.sleep(60)\n")
    env = {**os.environ, local.MARKER_ENV: "test-exposed"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        public, loopback = map(int, proc.stdout.readline().split())
        exposed = local.exposed_listeners("test-exposed")
        assert [(addr, port, pid) for addr, port, pid, _ in exposed] == [("0.0.0.0", public, proc.pid)]
        warning = local.no_auth_warning(exposed)
        assert f"0.0.0.0:{public}" in warning and "--no-auth" in warning and str(loopback) not in warning
        assert local.exposed_listeners("no-such-cluster") == [] and local.no_auth_warning([]) is None
    finally:
        proc.kill()
        proc.wait()


def test_s3_client_rides_out_slowdown_without_losing_objects(s3_bucket):
    """The latency proxy answers 30 % of object GETs with 503 SlowDown; storage.s3_client's retries
    must still return every object intact."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from botocore.config import Config

    from bench.s3_latency_proxy import LatencyProxy
    from emotion_core import storage

    bodies = {f"k/{i}.bin": os.urandom(64) for i in range(40)}
    for key, body in bodies.items():
        storage.s3_client().put_object(Bucket=s3_bucket, Key=key, Body=body)
    with LatencyProxy(os.environ["AWS_ENDPOINT_URL"], delay_ms=0, slowdown=1.0) as proxy:
        # the proxy really throttles: a client without retries sees SlowDown
        bare = boto3.client("s3", endpoint_url=proxy.endpoint, config=Config(retries={"total_max_attempts": 1}))
        with pytest.raises(bare.exceptions.ClientError, match="SlowDown"):
            bare.get_object(Bucket=s3_bucket, Key="k/0.bin")
        proxy.set_slowdown(0.3)
        old = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
        os.environ.update(AWS_ENDPOINT_URL=proxy.endpoint, AWS_ENDPOINT_URL_S3=proxy.endpoint)
        try:
            client = storage.s3_client()
        finally:
            os.environ.update(old)
        with ThreadPoolExecutor(8) as pool:
            got = dict(pool.map(lambda k: (k, client.get_object(Bucket=s3_bucket, Key=k)["Body"].read()), bodies))
        stats = proxy.stats()
    assert got == bodies
    assert stats["slowdowns"] >= 5, stats
