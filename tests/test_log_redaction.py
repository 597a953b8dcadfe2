"""No secret, token or signed URL reaches a log, a record, a run summary or an error message
(issue 11, item 9); ``-v`` raises httm-dist's own loggers, not botocore's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from httm_dist import storage
from httm_dist.cli import _one_line
from httm_dist.errors import StorageError
from httm_dist.results import ResultStore
from httm_dist.results.record import RunSummary, SceneRecord
from httm_dist.storage import redact_text, register_secrets

# known credentials, in the shapes AWS uses (none is real)
KEY_ID = "ASIAZZEXAMPLE7KEY2ID"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzSECRETzz"
TOKEN = "FwoGZXIvYXdzEBYaDEXAMPLEsessionTOKENvalueQQ" * 3
SIGNED_URL = (
    "https://bucket.s3.amazonaws.com/scene/f1.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    f"&X-Amz-Credential={KEY_ID}%2F20261129%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
    f"&X-Amz-Security-Token={TOKEN}"
)
LEAKS = (KEY_ID, SECRET, TOKEN[:40], "0f1e2d3c4b5a6978")

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    import boto3
    from httm_dist.cli import setup_logging
    setup_logging(verbose=1, debug_libraries=sys.argv[1] == "libs")
    logging.getLogger("httm_dist.pipeline").debug("httm-dist debug line, options {'token': '%s'}", sys.argv[4])
    logging.getLogger("httm_dist.data").warning("could not read %s", sys.argv[5])
    client = boto3.client("s3", endpoint_url=sys.argv[2], region_name="us-east-1",
                          aws_access_key_id=sys.argv[3], aws_secret_access_key=sys.argv[6],
                          aws_session_token=sys.argv[4])
    client.list_buckets()
    try:
        client.head_object(Bucket="no-such-bucket", Key="k")
    except Exception:
        logging.getLogger("httm_dist.storage").exception("head failed")
    """
)


def _run(s3_server, mode: str) -> str:
    endpoint = s3_server["client_kwargs"]["endpoint_url"]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, endpoint, KEY_ID, TOKEN, SIGNED_URL, SECRET],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def test_verbose_raises_only_httm_dist_loggers(s3_server):
    out = _run(s3_server, "own")
    assert "httm-dist debug line" in out and "head failed" in out
    assert "DEBUG botocore" not in out and "DEBUG urllib3" not in out
    for leak in LEAKS:
        assert leak not in out, leak


def test_library_debug_logging_is_redacted(s3_server):
    """The reported case: botocore at DEBUG prints the session token (and signs requests)."""
    out = _run(s3_server, "libs")
    assert out.count("DEBUG botocore") > 20  # the libraries really were at DEBUG
    assert "X-Amz-Security-Token" in out or "x-amz-security-token" in out
    for leak in LEAKS:
        assert leak not in out, leak


def test_records_run_summaries_and_errors_carry_no_credentials(tmp_path):
    """A second kind: the same credentials inside text (not under a secret-named key)."""
    message = (
        f"read failed for {SIGNED_URL}: headers {{'Authorization': 'AWS4-HMAC-SHA256 "
        f"Credential={KEY_ID}/20261129/us-east-1/s3/aws4_request, Signature=0f1e2d3c4b5a6978aa'}}"
        f" x-amz-security-token:{TOKEN}"
    )
    store = ResultStore(str(tmp_path / "out"), {"key": KEY_ID, "secret": SECRET, "token": TOKEN})
    store.write_failure(SceneRecord.failed(
        "s", StorageError(message), unit="scene", num_frames=2, chunks=1, model_hash="m",
        merge_hash="g", attempts=1,
    ))
    store.write_run_summary(RunSummary(
        run_id="r1", failures=[{"scene_id": "s", "error": message, "attempts": 1}],
        config={"storage_options": {"key": KEY_ID, "token": TOKEN}, "input": SIGNED_URL},
    ))
    for path in (tmp_path / "out").rglob("*.json"):
        text = path.read_text()
        json.loads(text)
        for leak in LEAKS:
            assert leak not in text, (path.name, leak)
    line = _one_line(StorageError(message))
    assert "read failed for https://bucket.s3.amazonaws.com/scene/f1.jpg" in line
    for leak in LEAKS:
        assert leak not in line, leak


@pytest.mark.parametrize("text", [
    "scene 'a': frame_09.png cannot be decoded; q_keep=0.4 merge_key=abc sort key: 3",
    "override 'x' must look like key=value, e.g. workers=2",
    "s3://bucket/in/scene.tar has 12 frames in /work/out",
])
def test_redaction_keeps_ordinary_text(text):
    assert redact_text(text) == text


def test_secrets_set_or_changed_after_a_first_redaction_are_hidden(monkeypatch):
    # the secret list is cached between calls: it must follow the environment and registrations
    first, second, registered = (f"{word}-{uuid.uuid4().hex}" for word in ("first", "second", "registered"))
    line = f"sent {first} then {second} and {registered}"
    assert redact_text(line) == line  # warms the cache with none of them
    monkeypatch.setenv("HTTM_TEST_API_TOKEN", first)
    assert redact_text(line) == f"sent *** then {second} and {registered}"
    monkeypatch.setenv("HTTM_TEST_API_TOKEN", second)  # same name, new value
    assert redact_text(line) == f"sent {first} then *** and {registered}"
    register_secrets({"options": {"session_token": registered}})
    assert redact_text(line) == f"sent {first} then *** and ***"
    monkeypatch.delenv("HTTM_TEST_API_TOKEN")
    assert redact_text(line) == f"sent {first} then {second} and ***"


def test_the_secret_list_is_rebuilt_only_when_the_environment_changes(monkeypatch):
    monkeypatch.setenv("HTTM_TEST_PASSWORD", f"pw-{uuid.uuid4().hex}")
    secrets = storage._secrets()
    assert storage._secrets() is secrets  # unchanged environment: the cached tuple
    monkeypatch.setenv("HTTM_TEST_UNRELATED", "a plain value, not a secret")
    assert storage._secrets() is secrets  # a variable whose name is not a secret's changes nothing
    monkeypatch.setenv("HTTM_TEST_PASSWORD", f"pw-{uuid.uuid4().hex}")
    assert storage._secrets() is not secrets and os.environ["HTTM_TEST_PASSWORD"] in storage._secrets()
