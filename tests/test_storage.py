"""Storage helpers: retries, atomic writes, redaction, reachability checks."""

from __future__ import annotations

import json
import os
import stat

import pytest

from httm_dist import storage
from httm_dist.errors import ConfigError, StorageError
from httm_dist.storage import (
    check_reachable,
    get_fs,
    read_bytes,
    redact,
    retry,
    write_bytes_atomic,
)


class Flaky:
    """A fake storage call failing ``failures`` times with ``exc`` before returning 42."""

    def __init__(self, exc: BaseException, failures: int):
        self.exc, self.failures, self.calls = exc, failures, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return 42


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)


@pytest.mark.parametrize(
    "exc", [ConnectionError("reset"), TimeoutError("slow"), OSError(5, "EIO")]
)
def test_retry_recovers_from_transient_errors(exc):
    fn = Flaky(exc, failures=3)
    assert retry(fn, what="read s3://b/k", attempts=5) == 42
    assert fn.calls == 4


def test_retry_gives_up_with_storage_error_naming_the_url():
    fn = Flaky(ConnectionError("reset"), failures=10)
    with pytest.raises(StorageError, match="s3://bucket/key") as info:
        retry(fn, what="read s3://bucket/key", attempts=3)
    assert fn.calls == 3
    assert isinstance(info.value.__cause__, ConnectionError)


@pytest.mark.parametrize(
    "exc", [FileNotFoundError("gone"), PermissionError("no"), ValueError("bad")]
)
def test_retry_does_not_retry_permanent_errors(exc):
    fn = Flaky(exc, failures=10)
    with pytest.raises(type(exc)):
        retry(fn, what="read x", attempts=5)
    assert fn.calls == 1


def test_retry_botocore_errors():
    from botocore.exceptions import ClientError, EndpointConnectionError

    slow = ClientError({"Error": {"Code": "SlowDown", "Message": "x"}}, "PutObject")
    fn = Flaky(slow, failures=2)
    assert retry(fn, what="w", attempts=3) == 42 and fn.calls == 3
    fn = Flaky(EndpointConnectionError(endpoint_url="http://x"), failures=1)
    assert retry(fn, what="w", attempts=3) == 42
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "x"}}, "GetObject")
    fn = Flaky(denied, failures=5)
    with pytest.raises(ClientError):
        retry(fn, what="w", attempts=3)
    assert fn.calls == 1


def _http_error(status: int):
    import aiohttp
    from yarl import URL

    url = URL("http://host/imgs")
    return aiohttp.ClientResponseError(aiohttp.RequestInfo(url, "GET", {}, url), (), status=status,
                                       message="x")


@pytest.mark.parametrize("status, raised", [(401, PermissionError), (403, PermissionError),
                                            (404, FileNotFoundError), (410, FileNotFoundError),
                                            (405, OSError), (451, OSError)])
def test_retry_does_not_retry_http_client_errors(status, raised):
    # e.g. 403 on a folder URL of a server that lists no folders: asking again gets 403 again;
    # raised as the OSError callers handle for the same failure on disk or S3
    fn = Flaky(_http_error(status), failures=10)
    with pytest.raises(raised, match=f"HTTP {status} x: http://host/imgs") as info:
        retry(fn, what="list http://host/imgs", attempts=5)
    assert type(info.value) is raised and not isinstance(info.value, StorageError)
    assert fn.calls == 1 and not storage.is_transient(_http_error(status))
    assert isinstance(info.value.__cause__, type(_http_error(status)))


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
def test_retry_retries_http_timeouts_throttling_and_server_errors(status):
    fn = Flaky(_http_error(status), failures=2)
    assert retry(fn, what="read http://host/imgs/f.png", attempts=3) == 42 and fn.calls == 3


def _info_error(cause: BaseException | None) -> FileNotFoundError:
    """What fsspec's HTTP info() raises: ``FileNotFoundError(url) from <the request's error>``."""
    try:
        raise FileNotFoundError("http://host/imgs/f.png") from cause
    except FileNotFoundError as exc:
        return exc


@pytest.mark.parametrize("cause, raised", [
    (503, None), (500, None), (429, None), ("refused", None), ("timeout", None),
    (404, FileNotFoundError), (410, FileNotFoundError), (403, PermissionError), ("none", FileNotFoundError),
    ("bad value", FileNotFoundError),
])
def test_fsspec_http_file_not_found_is_as_transient_as_its_cause(cause, raised):
    """fsspec's HTTP info() (isfile, size, open) raises FileNotFoundError from any failure of
    its request: a 503 or a refused connection behind it is retried (``raised`` None), a real
    404 is not, nor a 403 (raised as the PermissionError it is)."""
    import asyncio

    import aiohttp

    causes = {"refused": aiohttp.ClientConnectionError("Cannot connect to host"), "timeout": asyncio.TimeoutError(),
              "none": None, "bad value": ValueError("bad")}
    exc = _info_error(_http_error(cause) if isinstance(cause, int) else causes[cause])
    assert storage.is_transient(exc) is (raised is None)
    fn = Flaky(exc, failures=2)
    if raised is None:
        assert retry(fn, what="stat http://host/imgs/f.png", attempts=3) == 42 and fn.calls == 3
    else:
        with pytest.raises(raised) as info:
            retry(fn, what="stat http://host/imgs/f.png", attempts=3)
        assert type(info.value) is raised and fn.calls == 1


def test_a_file_missing_while_a_network_error_was_handled_is_missing():
    # only an explicit cause (raise ... from) counts: a local file looked for in an except
    # block of a network error is not made transient by that error
    try:
        try:
            raise ConnectionError("reset")
        except ConnectionError:
            raise FileNotFoundError("/data/fallback.png")  # noqa: B904 - the case under test
    except FileNotFoundError as exc:
        missing = exc
    assert isinstance(missing.__context__, ConnectionError) and missing.__cause__ is None
    assert not storage.is_transient(missing)


@pytest.mark.parametrize("cause", ["s3 NoSuchVersion", "arrow OSError"])
def test_other_filesystems_not_found_stays_permanent_whatever_it_was_raised_from(cause):
    """s3fs raises FileNotFoundError from botocore's ClientError (a deleted pinned version:
    NoSuchVersion), fsspec's Arrow wrapper from a plain OSError: missing there is missing, not
    retried 5 times into a StorageError that would stop the run."""
    from botocore.exceptions import ClientError

    causes = {"s3 NoSuchVersion": ClientError({"Error": {"Code": "NoSuchVersion", "Message": "gone"}}, "GetObject"),
              "arrow OSError": OSError("hdfs://nn/x.png does not exist")}
    try:
        raise FileNotFoundError("s3://b/x.png") from causes[cause]
    except FileNotFoundError as exc:
        missing = exc
    assert not storage.is_transient(missing)
    fn = Flaky(missing, failures=2)
    with pytest.raises(FileNotFoundError):
        retry(fn, what="read s3://b/x.png", attempts=3)
    assert fn.calls == 1


def test_a_busy_server_behind_file_not_found_is_named_when_retries_run_out(caplog):
    fn = Flaky(_info_error(_http_error(503)), failures=10)
    with pytest.raises(StorageError, match=r"stat http://host/imgs/f.png failed after 3 attempts: "
                                           r"ClientResponseError: 503") as info:
        retry(fn, what="stat http://host/imgs/f.png", attempts=3)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert "attempt 1/3, ClientResponseError: 503" in caplog.text


def test_a_refused_presigned_url_is_redacted_and_named_once():
    import aiohttp
    from yarl import URL

    url = URL("https://bucket.s3.amazonaws.com/imgs/f.png?X-Amz-Credential=AKIAABCDEFGHIJKLMNOP%2F20261130"
              "&X-Amz-Signature=0123456789abcdef0123456789abcdef&X-Amz-Expires=60")
    refused = aiohttp.ClientResponseError(aiohttp.RequestInfo(url, "GET", {}, url), (), status=403,
                                          message="Forbidden")
    for exc in (refused, _info_error(refused)):  # from cat_file, and from info()
        with pytest.raises(PermissionError) as info:
            retry(Flaky(exc, failures=1), what="read photo", attempts=3)
        text = str(info.value)
        assert text.startswith("HTTP 403 Forbidden: https://bucket.s3.amazonaws.com/imgs/f.png?"), text
        assert "0123456789abcdef" not in text and "AKIAABCDEFGHIJKLMNOP" not in text and "X-Amz-Expires=60" in text
        assert storage.error_text(info.value) == "PermissionError: HTTP 403 Forbidden"


@pytest.mark.parametrize("exc, text", [
    (FileNotFoundError(2, "No such file or directory", "/data/a.png"), "FileNotFoundError: No such file or directory"),
    (FileNotFoundError("s3://bucket/a.png"), "FileNotFoundError: not found"),
    (FileNotFoundError("no archive at s3://bucket/a.tar"), "FileNotFoundError: no archive at s3://bucket/a.tar"),
    (ValueError("token=abcdefgh1234 is bad"), "ValueError: token=*** is bad"),
])
def test_error_text_leaves_the_file_to_the_message_naming_it(exc, text):
    assert storage.error_text(exc) == text


def test_backoff_grows(monkeypatch):
    delays = []
    monkeypatch.setattr(storage.time, "sleep", delays.append)
    with pytest.raises(StorageError):
        retry(Flaky(ConnectionError(), 10), what="x", attempts=4, base_delay=0.1)
    assert len(delays) == 3
    # jitter is in [0.5, 1.5) of 0.1 * 2**k: ranges do not overlap past the first step
    for k, d in enumerate(delays):
        assert 0.05 * 2**k <= d < 0.15 * 2**k


def test_redact_removes_secrets_and_keeps_the_rest():
    opts = {
        "key": "AKIAXXXX",
        "secret": "s3cr3t",
        "token": "tok",
        "client_kwargs": {"endpoint_url": "http://minio:9000", "region_name": "eu"},
        "config_kwargs": {"aws_secret_access_key": "a", "aws_access_key_id": "b"},
        "headers": {"Authorization": "Bearer abc"},
        "sessionToken": "st",
        "db_password": "pw",
        "anon": False,
        "merging": {"q_keep": 0.2, "num_tokens": 5, "token_ratio": 0.5},
        "nested": [{"api_key": "k"}],
        "credentials": {"user": "someone", "pin": 1234},
    }
    out = redact(opts)
    text = json.dumps(out)
    for secret in ("AKIAXXXX", "s3cr3t", "tok\"", "Bearer", "\"st\"", "\"pw\"", "\"k\"", "\"a\"", "\"b\""):
        assert secret not in text, secret
    assert out["credentials"] == "***" and "someone" not in text
    assert out["client_kwargs"] == opts["client_kwargs"]
    assert out["merging"] == opts["merging"]
    assert out["anon"] is False
    assert opts["key"] == "AKIAXXXX"  # input untouched


def test_redact_urls():
    url = "https://user:hunter2@host/path?X-Amz-Signature=abc&part=1"
    out = redact({"endpoint": url, "msg": f"failed to read {url} now"})
    assert "hunter2" not in json.dumps(out) and "abc" not in json.dumps(out)
    assert "part=1" in out["endpoint"] and out["msg"].startswith("failed to read https://user:")
    assert redact("s3://bucket/scene.tar") == "s3://bucket/scene.tar"


def test_atomic_write_local_leaves_no_temp(tmp_path):
    url = str(tmp_path / "a" / "b.bin")
    write_bytes_atomic(url, b"one")
    write_bytes_atomic(url, b"two")
    assert read_bytes(url) == b"two"
    assert os.listdir(tmp_path / "a") == ["b.bin"]
    with pytest.raises(FileNotFoundError):
        read_bytes(str(tmp_path / "missing"))


def test_atomic_write_local_failure_keeps_old_object(tmp_path, monkeypatch):
    url = str(tmp_path / "x.bin")
    write_bytes_atomic(url, b"old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(StorageError):
        write_bytes_atomic(url, b"new")
    assert read_bytes(url) == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_follows_the_umask(tmp_path, umask, mode):
    """Output files get 0o666 minus the umask, like any tool's, whether the object is new or
    replaced (a temp file from mkstemp would be owner-only whatever the umask)."""
    old = os.umask(umask)
    try:
        for data in (b"new", b"replaced"):
            write_bytes_atomic(str(tmp_path / "d" / "x.bin"), data)
            assert stat.S_IMODE(os.stat(tmp_path / "d" / "x.bin").st_mode) == mode
    finally:
        os.umask(old)


@pytest.mark.s3
def test_s3_write_read_and_reachability(s3_bucket):
    bucket, opts = s3_bucket
    write_bytes_atomic(f"{bucket}/d/x.bin", b"abc", opts)
    assert read_bytes(f"{bucket}/d/x.bin", opts) == b"abc"
    check_reachable(f"{bucket}/d", opts)
    check_reachable(f"{bucket}/out", opts, for_write=True)
    fs, path = get_fs(bucket, opts)
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.find(path)] == ["x.bin"]  # probe removed
    with pytest.raises(ConfigError, match="does not exist"):
        check_reachable(f"{bucket}/nothing-here", opts)
    with pytest.raises(ConfigError, match="not reachable") as info:
        check_reachable("s3://no-such-bucket-httm/out", opts, for_write=True)
    assert "testing" not in str(info.value)


def test_local_reachability(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_reachable(str(tmp_path / "nope"))
    check_reachable(str(tmp_path / "new" / "out"), for_write=True)
    assert (tmp_path / "new" / "out").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        check_reachable(str(tmp_path / "f"), for_write=True)


def test_get_fs_chained_url_passes_options_to_the_inner_protocol(tmp_path):
    import tarfile

    member = tmp_path / "m.txt"
    member.write_bytes(b"hello")
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        tar.add(member, arcname="sub/m.txt")
    fs, path = get_fs(f"tar://sub/m.txt::{tmp_path}/a.tar", {"auto_mkdir": False})
    assert fs.cat_file(path) == b"hello"


@pytest.mark.s3
def test_unreachable_endpoint_is_a_storage_error_without_secrets():
    opts = {
        "key": "k", "secret": "hunter2",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    with pytest.raises(StorageError, match="input 's3://bucket/in' is not reachable") as info:
        check_reachable("s3://bucket/in", opts)
    assert "hunter2" not in str(info.value)


def test_local_paths_get_one_spelling_and_normal_ones_stay_as_they_are(tmp_path, monkeypatch):
    real = tmp_path / "data" / "scenes"
    real.mkdir(parents=True)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    plain = str(real)
    for spelling in (plain, f"{plain}/", f"{tmp_path}//data/./scenes", "../data/scenes", "../cwd/../data/scenes/",
                     f"file://{plain}", "file://../data/scenes", f"file://{tmp_path}/data/../data/scenes"):
        fs, path = get_fs(spelling)
        assert path == plain, spelling
    assert storage.normalize_local_path("//" + plain.lstrip("/")) == plain
    # remote keys are names, not paths: kept as written
    for url in ("s3://b/a/../x", "gs://b/a//./y", "memory://a/../b", "tar://m/../x::s3://b/a/../t.tar"):
        assert storage.normalize_url(url) == url
    assert storage.normalize_url("tar://m/../x.jpg::../data/./s.tar") == f"tar://m/../x.jpg::{tmp_path}/data/s.tar"
    assert storage.normalize_url(f"file://{tmp_path}/data/x/../s.png") == f"file://{tmp_path}/data/s.png"


def test_a_dotdot_after_a_symlink_names_the_file_the_symlink_leads_to(tmp_path):
    """``link/..`` is the parent of the symlink's target, not the folder holding the link:
    the lexical removal of ``..`` would name another file, so such a path is resolved."""
    (tmp_path / "far" / "deep").mkdir(parents=True)
    (tmp_path / "far" / "scenes").mkdir()
    (tmp_path / "near").mkdir()
    os.symlink(tmp_path / "far" / "deep", tmp_path / "near" / "link")
    assert storage.normalize_local_path(f"{tmp_path}/near/link/../scenes") == os.path.realpath(tmp_path / "far" / "scenes")
    # a symlink named without ".." after it is kept as named
    assert storage.normalize_local_path(f"{tmp_path}/near/link/./x") == f"{tmp_path}/near/link/x"


@pytest.mark.parametrize("path", ["s3://b/my scene/a.png", "/data/my scene/a.png", "s3://b/a.png"])
def test_error_text_names_no_path_a_message_names_already(path):
    """fsspec raises FileNotFoundError(path): the message naming the file says it once,
    spaces in the path or not; a sentence keeps its words."""
    assert storage.error_text(FileNotFoundError(path)) == "FileNotFoundError: not found"
    assert storage.error_text(FileNotFoundError("no such frame in the archive")) == (
        "FileNotFoundError: no such frame in the archive")
