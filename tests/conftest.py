"""Session-wide test services: one loopback S3 server (moto) and one Ray session.

Both are started at most once per test session and only when a test asks for them: Ray takes
seconds to start, and Ray workers are separate processes, so S3 must be a real server on
loopback rather than an in-process mock.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"

# Credentials for the loopback server only; set before anything imports botocore.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its ``storage_options`` for fsspec/s3fs."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    yield {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket per test: yields ``(bucket_url, storage_options)``."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    # boto3 directly: s3fs's mkdir sends a LocationConstraint that moto rejects for us-east-1.
    client = boto3.client(
        "s3",
        endpoint_url=s3_server["client_kwargs"]["endpoint_url"],
        aws_access_key_id=s3_server["key"],
        aws_secret_access_key=s3_server["secret"],
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
    yield f"s3://{name}", s3_server


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole suite, with two logical GPUs (the models run on CPU)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # a private instance, never a cluster that `ray start` left running
            num_cpus=2,
            num_gpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
        )
    yield ray
    ray.shutdown()
