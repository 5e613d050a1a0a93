"""Submit a job to a Ray cluster through the Ray Jobs API: what `ray job submit` does, with this
project's working-dir excludes and environment rules built in, and an exit code a scheduler can use.

    python -m cluster.submit --address http://127.0.0.1:8265 [--gpus 1] [--wait] \\
        -- python -m jobs.train --data s3://bucket/fer2013 --output s3://bucket/runs --name nightly

prints the equivalent `ray job submit` command line, submits, and either returns at once (job id,
then `ray job status/logs/stop` to follow it) or, with --wait, streams the logs and exits 0 only
if the job SUCCEEDED.

Decisions:
- The working dir (default ".") is uploaded with EXCLUDES (the virtualenv, data, outputs, caches:
  the upload stays well under a MiB). Ray also honours .gitignore and .rayignore.
- No pip/uv runtime_env by default: clusters run an image (or launcher setup_commands) that
  already has the project's pinned dependencies, so jobs start in seconds and cannot drift from
  constraints.txt. Only the project's own code travels with the job (--working-dir shadows the
  installed copy). `--pip` exists for ad-hoc extra packages.
- Environment: only non-secret settings are forwarded (S3 endpoint and region by default, more
  with --env/--pass-env). Credentials never go into a runtime_env (it is visible in the
  dashboard); nodes get S3 access from their IAM role (instance profile / IRSA).
- The entrypoint reserves --cpus/--gpus for the driver (`--entrypoint-num-cpus/-gpus`); Ray Train
  and Ray Data request their own worker resources.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

EXCLUDES = [
    ".venv",
    ".git",
    "data",
    "outputs",
    "demo_out",
    "bench/results",
    ".ray-local",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.png",
    "*.parquet",
    "*.zip",
]
# Non-secret settings forwarded to the job when they are set here.
DEFAULT_PASS_ENV = ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"]
SECRET_ENV = {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"}


def runtime_env(
    working_dir: str = ".",
    env_vars: dict[str, str] | None = None,
    pip: list[str] | None = None,
    excludes: list[str] | None = None,
) -> dict:
    """The runtime_env every job of this project is submitted with."""
    env = {"working_dir": working_dir, "excludes": list(EXCLUDES if excludes is None else excludes)}
    if env_vars:
        leaked = SECRET_ENV & set(env_vars)
        if leaked:
            raise ValueError(
                f"refusing to put credentials in a runtime_env ({', '.join(sorted(leaked))}): use IAM roles"
            )
        env["env_vars"] = dict(env_vars)
    if pip:
        env["pip"] = list(pip)
    return env


def forwarded_env(names: list[str] | None = None) -> dict[str, str]:
    return {k: os.environ[k] for k in (names or DEFAULT_PASS_ENV) if os.environ.get(k)}


def auth_headers() -> dict[str, str]:
    """The bearer token for clusters with Ray token auth, when RAY_AUTH_MODE=token is set here
    (the token from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as Ray reads it).
    Explicit, because Ray's client only adds it if its config was initialised with that mode."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    from cluster.local import auth_token

    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def cli_command(address: str, entrypoint: list[str], renv: dict, gpus: float = 0, cpus: float = 0) -> str:
    """The equivalent `ray job submit` command line (what the README shows)."""
    rest = {k: v for k, v in renv.items() if k != "working_dir"}
    parts = ["ray", "job", "submit", "--address", address, "--working-dir", renv["working_dir"]]
    parts += ["--runtime-env-json", json.dumps(rest, separators=(",", ":"))]
    if gpus:
        parts += ["--entrypoint-num-gpus", f"{gpus:g}"]
    if cpus:
        parts += ["--entrypoint-num-cpus", f"{cpus:g}"]
    return shlex.join([*parts, "--no-wait", "--", *entrypoint])


def submit(
    client,
    entrypoint: list[str],
    renv: dict,
    gpus: float = 0,
    cpus: float = 0,
    submission_id: str | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Submit through a `ray.job_submission.JobSubmissionClient`; returns the job id."""
    kwargs = {}
    if gpus:
        kwargs["entrypoint_num_gpus"] = gpus
    if cpus:
        kwargs["entrypoint_num_cpus"] = cpus
    return client.submit_job(
        entrypoint=shlex.join(entrypoint),
        runtime_env=renv,
        submission_id=submission_id,
        metadata=metadata,
        **kwargs,
    )


def wait(client, job_id: str, timeout: float = 3600, poll: float = 1.0, follow: bool = False):
    """Wait for a terminal status (optionally printing new log text as it arrives)."""
    deadline = time.monotonic() + timeout
    printed = 0
    while True:
        status = client.get_job_status(job_id)
        if follow:
            logs = client.get_job_logs(job_id)
            sys.stdout.write(logs[printed:])
            sys.stdout.flush()
            printed = len(logs)
        if status.is_terminal():
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f}s")
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m cluster.submit [options] -- python -m jobs.<name> [job options]", file=sys.stderr)
        return 2
    split = argv.index("--")
    own, entrypoint = argv[:split], argv[split + 1 :]
    p = argparse.ArgumentParser(prog="python -m cluster.submit", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS"),
                   help="Ray dashboard / Jobs API URL (default: $RAY_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="uploaded with the job (default: .)")
    p.add_argument("--gpus", type=float, default=0, help="GPUs reserved for the entrypoint (driver) process")
    p.add_argument("--cpus", type=float, default=0, help="CPUs reserved for the entrypoint (driver) process")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env var for the job")
    p.add_argument("--pass-env", action="append", default=[], metavar="KEY",
                   help=f"forward this env var if set (default: {', '.join(DEFAULT_PASS_ENV)})")
    p.add_argument("--pip", action="append", default=[], help="extra pip requirement (avoid: use the image)")
    p.add_argument("--submission-id", help="job id (default: generated); an id that exists is refused")
    p.add_argument("--wait", action="store_true", help="stream logs; exit 0 only if the job SUCCEEDED")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="--wait: give up after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="print the `ray job submit` command only")
    args = p.parse_args(own)
    if not entrypoint:
        p.error("no entrypoint after --")
    if not args.address:
        p.error("no cluster: pass --address http://HEAD:8265 or set RAY_ADDRESS")

    env_vars = forwarded_env(DEFAULT_PASS_ENV + args.pass_env)
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--env {item!r}: use KEY=VALUE")
        env_vars[key] = value
    try:
        renv = runtime_env(args.working_dir, env_vars, args.pip)
    except ValueError as e:
        p.error(str(e))
    print(cli_command(args.address, entrypoint, renv, args.gpus, args.cpus))
    if args.dry_run:
        return 0

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address, headers=auth_headers())
    job_id = submit(client, entrypoint, renv, args.gpus, args.cpus, args.submission_id)
    print(f"submitted {job_id}")
    if not args.wait:
        print(f"  ray job status --address {args.address} {job_id}")
        print(f"  ray job logs   --address {args.address} -f {job_id}")
        print(f"  ray job stop   --address {args.address} {job_id}")
        return 0
    status = wait(client, job_id, args.timeout, follow=True)
    info = client.get_job_info(job_id)
    print(f"\njob {job_id} {status}: {info.message or ''}".rstrip())
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
