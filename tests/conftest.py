"""Shared fixtures: one real local S3 server (moto's HTTP server on 127.0.0.1) and one real
local Ray instance for the whole session, plus small synthetic datasets.

The S3 environment variables are set before Ray starts so Ray's worker processes inherit them.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

import pytest

os.environ.setdefault("RAY_ACCEPT_CPU_ONLY", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Data starts this many Parquet footer-reader actors per read_parquet (Ray's default is 32,
# one process each: on 2 cores that start-up dominated every test that plans or counts with Ray
# Data). jobs._cli.init_ray does the same for the local Ray it starts.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint (moto) on loopback; exports AWS_* so boto3, pyarrow and Ray see it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket name on the shared S3 server."""
    from emotion_core.storage import s3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One real local Ray for the whole test session (started after the S3 env is exported).

    4 logical CPUs on a 2-core machine so a 2-worker Ray Train run and its Ray Data ingest fit.
    The dashboard (on 127.0.0.1) serves the State API: Ray Train polls it, and tests use it to
    find an actor's pid to kill.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=_free_port(),
                 log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A small 7-class synthetic Kaggle-layout dataset (train/ + test/), generated once."""
    from emotion_core.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("faces")
    generate_dataset(root, train_per_class=40, test_per_class=12, seed=0)
    return root


@pytest.fixture(scope="module")
def yunet():
    """The default face detector, or a skip where its package is not installed."""
    from emotion_core import faces as F

    try:
        return F.create_detector("yunet")
    except F.DetectorUnavailableError as e:
        pytest.skip(str(e))
