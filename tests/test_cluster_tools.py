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
