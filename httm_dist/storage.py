"""fsspec helpers shared by scene discovery (``data/``) and the result store (``results/``).

One place decides how a URL becomes a filesystem, which errors are worth retrying, how an
object is written so that nothing half-written is ever visible under its final key, and how
secrets are kept out of logs and outputs.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import logging
import os
import random
import re
import time
import uuid
from typing import Any, Callable, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from httm_dist.errors import ConfigError, HttmDistError, StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")

REDACTED = "***"

# --------------------------------------------------------------------------- filesystems


def get_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for any fsspec URL (local path, ``s3://``, ``gs://``...).

    ``storage_options`` are the options of the storage the data lives on. For a chained URL
    (``tar://member::s3://bucket/scene.tar``) they go to the innermost (remote) protocol, since
    archive layers take no credentials.
    """
    options = dict(storage_options or {})
    register_secrets(options)  # whatever a filesystem is given, no log or record shows
    if "::" in url:
        inner = url.rsplit("::", 1)[1]
        protocol = fsspec.core.split_protocol(inner)[0] or "file"
        return url_to_fs(url, **({protocol: options} if options else {}))
    fs, path = url_to_fs(url, **options)
    return fs, (normalize_local_path(path) if is_local(fs) else path)


def normalize_local_path(path: str) -> str:
    """One spelling per local file: ``path`` made absolute, without ``.`` segments, repeated
    or trailing slashes, and with each ``..`` segment removed with the folder before it, so
    that the same files given as ``../data/scenes``, ``./scenes/`` or ``/data//scenes`` get
    the same frame URIs (and scene fingerprints) as ``/data/scenes``.

    An absolute path already in that form comes back unchanged (outputs keep their
    fingerprints), and symlinks are kept as named, except when lexical removal of ``..``
    would name another file (``link/..`` where ``link`` points elsewhere): then the path is
    resolved (``os.path.realpath``), which names the same file the original did.
    """
    if not path:
        return path
    absolute = os.path.abspath(path)  # cwd + normpath: drops ".", "//", trailing "/" and ".."
    if absolute.startswith("//") and not absolute.startswith("///"):
        absolute = absolute[1:]  # normpath keeps a leading "//" (POSIX leaves it open); Linux reads "/"
    if ".." in path.replace("\\", "/").split("/") and os.path.realpath(absolute) != os.path.realpath(path):
        return os.path.realpath(path)  # a ".." after a symlink: the lexical path is another file
    return absolute


def normalize_url(url: str) -> str:
    """``url`` with its local path in one spelling (:func:`normalize_local_path`), for URIs
    written into scenes, records and fingerprints: a plain path, a ``file://`` URL (the
    scheme is kept, so that outputs of manifests written with ``file://`` keep their
    fingerprints) or the last link of a chained URL (``tar://m.jpg::../a.tar``; members
    inside an archive are left as named).

    Remote URLs (``s3://``, ``gs://``, ``memory://``...) come back unchanged: an object key
    is a name, not a path, and ``a/../b``, ``a/./b`` and ``a//b`` are keys distinct from
    ``b`` and ``a/b`` (S3 and GCS store each as its own object), so rewriting them could
    name another object.
    """
    head, sep, last = url.rpartition("::")
    if last.startswith("file://"):
        rest = last[len("file://"):]
        return f"{head}{sep}file://{normalize_local_path(rest)}" if rest else url
    if "://" in last or not last or last.startswith("~"):
        return url  # remote, or a home-relative path that fsspec expands
    return f"{head}{sep}{normalize_local_path(last)}"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local disk, where rename is atomic and directories are real."""
    return isinstance(fs, LocalFileSystem)


def join_url(base: str, *parts: str) -> str:
    """Join URL/path segments with ``/`` (fsspec paths always use ``/``)."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL a user can pass back to fsspec for ``path`` on ``fs`` (plain path when local)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def safe_name(name: str, what: str) -> str:
    """Return ``name`` if it is safe as a file name and a hive partition value, else raise.

    Allowed: 1-128 characters from letters, digits, ``.``, ``_``, ``-``, starting with a
    letter or digit (so no ``/``, ``=``, spaces, or hidden/relative names).
    """
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise ConfigError(
            f"{what} {name!r} is not usable as a file name: use 1-128 characters from letters, "
            "digits, '.', '_' and '-', starting with a letter or digit"
        )
    return name


# --------------------------------------------------------------------------- retries

_PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
    gzip.BadGzipFile,  # corrupt data: reading it again gives the same bytes
)


try:
    from aiohttp import ClientError as _HTTPClientError  # optional (fsspec http)
    from aiohttp import ClientResponseError as _HTTPResponseError
except ImportError:  # pragma: no cover - no http support installed
    _HTTPClientError = _HTTPResponseError = None


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:  # botocore is there whenever s3fs is; its network errors are not OSErrors
        from botocore.exceptions import BotoCoreError, ClientError  # optional (s3fs)

        types += [BotoCoreError, ClientError]
    except ImportError:  # pragma: no cover - no s3 support installed
        pass
    if _HTTPClientError is not None:
        types.append(_HTTPClientError)
    types.append(asyncio.TimeoutError)
    return tuple(types)


_TRANSIENT = _transient_types()
_PERMANENT_CLIENT_CODES = {
    "NoSuchBucket", "NoSuchKey", "AccessDenied", "InvalidAccessKeyId",
    "SignatureDoesNotMatch", "AllAccessDisabled", "InvalidBucketName", "404", "403",
}

# The 4xx (client error) HTTP statuses worth retrying: 408 Request Timeout, 429 Too Many
# Requests; any other (403 Forbidden, 401, 410, ...) answers the same again.
_RETRIED_HTTP_4XX = {408, 429}
# What fsspec's HTTP info() raises its FileNotFoundError from when its request failed.
_HTTP_FAILURES = (asyncio.TimeoutError, TimeoutError) + ((_HTTPClientError,) if _HTTPClientError else ())


def _wrapped_cause(exc: BaseException) -> BaseException | None:
    """The HTTP error a ``FileNotFoundError`` was raised from (``raise FileNotFoundError(url)
    from exc``, as fsspec's HTTP ``info()`` does for any failure of its request: an aiohttp
    error or a timeout), or ``None``. Other filesystems' not-found errors keep their meaning
    whatever they were raised from (s3fs raises one from botocore's ``NoSuchVersion``, fsspec's
    Arrow wrapper from an ``OSError``: missing is missing there)."""
    cause = exc.__cause__
    if isinstance(exc, FileNotFoundError) and isinstance(cause, _HTTP_FAILURES):
        return cause
    return None


def is_transient(exc: BaseException) -> bool:
    """Is ``exc`` worth retrying? Network/timeouts/5xx yes; missing, forbidden, bad input no.

    An HTTP error response (aiohttp's ``ClientResponseError``, which fsspec's HTTP filesystem
    raises unchanged for any status but 404) is permanent for a 4xx status other than 408 and
    429 (e.g. 403 on a folder URL of a server that does not list folders), transient else.

    A ``FileNotFoundError`` raised *from* another error (fsspec's HTTP ``info()``, behind
    ``isfile``/``size``/``open``, raises one from any failure of its request: a 503, a
    timeout, a refused connection) is as transient as that error, its ``__cause__``: a real
    404's cause is a 404 ``ClientResponseError``, permanent. Only ``__cause__`` counts (``raise
    ... from``), not ``__context__``: a file missing on disk, looked for while another
    error was handled, is missing all the same.
    """
    wrapped = _wrapped_cause(exc)
    if wrapped is not None:
        return is_transient(wrapped)
    if isinstance(exc, (HttmDistError, ValueError, *_PERMANENT_OS_ERRORS)):
        return False
    code = getattr(exc, "response", None)
    if isinstance(code, dict):  # botocore ClientError
        err_code = str(code.get("Error", {}).get("Code", ""))
        if err_code in _PERMANENT_CLIENT_CODES:
            return False
    if _HTTPResponseError is not None and isinstance(exc, _HTTPResponseError):
        if 400 <= exc.status < 500 and exc.status not in _RETRIED_HTTP_4XX:
            return False
    return isinstance(exc, _TRANSIENT)


def _as_os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` standing for an HTTP error response that is not worth retrying, or
    ``None`` for any other error. fsspec's HTTP filesystem raises aiohttp's
    ``ClientResponseError`` for any failed status but 404 (``FileNotFoundError``), which no
    caller knows, and its ``info()`` a ``FileNotFoundError`` from any such error (a 403 too):
    401/403 become ``PermissionError`` and 404/410 ``FileNotFoundError``, as s3fs translates
    S3's answers, any other ``OSError``; so callers handle them as they handle the same
    failure on disk or S3 (a frame a server refuses fails its scene).

    The message is ``HTTP <status> <reason>: <URL>``, the URL redacted (a presigned URL's
    signature stays out of logs and records); ``strerror`` holds the part without the URL,
    for a message that names the file already (:func:`error_text`).
    """
    response = _wrapped_cause(exc) or exc
    if _HTTPResponseError is None or not isinstance(response, _HTTPResponseError):
        return None
    kind = {401: PermissionError, 403: PermissionError, 404: FileNotFoundError,
            410: FileNotFoundError}.get(response.status, OSError)
    reason = f"HTTP {response.status} {response.message}"
    error = kind(redact_text(f"{reason}: {response.request_info.real_url}"))
    error.strerror = reason
    return error


_LOCATION = re.compile(r"(/|\./|\.\./|~|[A-Za-z][\w+.-]*://)\S.*$")  # a path or URL, whole


def error_text(exc: BaseException) -> str:
    """``"<type>: <message>"`` of ``exc``, redacted, for a message that names the file or URL
    itself, so that it is named once: an ``OSError`` shows its ``strerror`` without the file
    name it carries (``FileNotFoundError: No such file or directory``, ``PermissionError:
    HTTP 403 Forbidden``), and a ``FileNotFoundError`` whose whole message is a path or URL
    (fsspec raises ``FileNotFoundError(path)``, spaces and all) shows ``not found``."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    elif isinstance(exc, FileNotFoundError) and len(exc.args) == 1 and _LOCATION.match(text):
        text = "not found"
    return f"{type(exc).__name__}: {redact_text(text)}"


def retry(
    fn: Callable[[], T], *, what: str, attempts: int = 5, base_delay: float = 0.2
) -> T:
    """Call ``fn()``, retrying transient storage errors with exponential backoff and jitter.

    Permanent errors (missing file, permission denied, bad value; see :func:`is_transient`)
    are raised at once, unchanged, but for an HTTP 4xx error response (or fsspec's
    ``FileNotFoundError`` raised from one), raised as the matching ``OSError`` (see
    :func:`_as_os_error`) from it. After the last failed attempt a :class:`StorageError`
    naming ``what`` (which should contain the URL) and the last error (the one behind
    fsspec's ``FileNotFoundError``, e.g. ``HTTP 503``) is raised from that error.
    """
    if attempts < 1:
        raise ValueError(f"retry attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except BaseException as exc:  # noqa: BLE001 - filtered just below
            if not is_transient(exc):
                translated = _as_os_error(exc)
                if translated is None:
                    raise
                raise translated from exc
            shown = _wrapped_cause(exc) or exc  # the 503 behind fsspec's FileNotFoundError
            if attempt == attempts:
                raise StorageError(
                    redact(f"{what} failed after {attempts} attempts: {type(shown).__name__}: {shown}")
                ) from exc
            delay = base_delay * (2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning(
                "%s failed (attempt %d/%d, %s: %s); retrying in %.2fs",
                redact(what), attempt, attempts, type(shown).__name__, redact(str(shown)), delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- whole objects


def write_bytes_fs(
    fs: fsspec.AbstractFileSystem, path: str, data: bytes, tmp_dir: str | None = None
) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial object.

    Local disk: a temporary file (in ``tmp_dir``, which must be on the same filesystem, else
    beside ``path`` with a name starting with ``.``), then ``os.replace`` (atomic rename). The
    file is created with mode ``0o666`` minus the process umask, like any file a tool writes
    (``tempfile.mkstemp`` would make it owner-only). Object stores: a single PUT
    (``pipe_file``), which is visible whole or not at all.
    """
    if is_local(fs):
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        if tmp_dir is not None:
            os.makedirs(tmp_dir, exist_ok=True)
        tmp = os.path.join(tmp_dir or folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    else:
        fs.pipe_file(path, data)


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` to ``url`` whole (see :func:`write_bytes_fs`), retrying transient errors."""
    fs, path = get_fs(url, storage_options)
    retry(lambda: write_bytes_fs(fs, path, data), what=f"write {url}")


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    """Read the whole object at ``url``, retrying transient errors.

    A missing object raises ``FileNotFoundError`` at once (not retried).
    """
    fs, path = get_fs(url, storage_options)
    return read_bytes_fs(fs, path, shown=url)


def read_bytes_fs(fs: fsspec.AbstractFileSystem, path: str, shown: str | None = None) -> bytes:
    """:func:`read_bytes` for a path on a filesystem in hand; messages name ``shown`` (default:
    the path's full URL), redacted."""
    return retry(lambda: fs.cat_file(path), what=f"read {shown or full_url(fs, path)}")


# --------------------------------------------------------------------------- secrets

_SENSITIVE_WORDS = ("secret", "password", "passwd", "credential", "private", "access_key")
_SENSITIVE_LAST = {
    "key", "token", "signature", "sig", "auth", "authorization", "pwd", "sas", "apikey",
    "cookie", "session",
}
_HARMLESS = {
    "sort_key", "partition_key", "primary_key", "cache_key", "scene_key", "key_prefix",
    "dict_key", "hash_key", "merge_key", "run_key", "kms_key_id", "ssekms_key_id",
    "sse_kms_key_id",
}


def _is_sensitive_name(name: str) -> bool:
    low = str(name).lower()
    if low in _HARMLESS:
        return False
    if any(word in low for word in _SENSITIVE_WORDS):
        return True
    # split snake/kebab/camel case: "sessionToken" -> ["session", "token"]
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower())
    return bool(words) and words[-1] in _SENSITIVE_LAST


def _redact_url(text: str) -> str:
    """Hide the password of ``scheme://user:pass@host`` and sensitive query parameters."""

    def one(match: re.Match) -> str:
        url = match.group(0)
        try:
            parts = urlsplit(url)
        except ValueError:
            return url
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{REDACTED}@{host}" if ":" in userinfo else f"{REDACTED}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(_is_sensitive_name(k) or k.lower().startswith("x-amz-") for k, _ in pairs):
                query = urlencode(
                    [
                        (k, REDACTED if (_is_sensitive_name(k) or k.lower() in
                                         ("x-amz-signature", "x-amz-credential",
                                          "x-amz-security-token")) else v)
                        for k, v in pairs
                    ]
                )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    return re.sub(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+", one, text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with secrets replaced by ``***``, safe for logs and outputs.

    Dicts: the value of any key naming a secret (``key``, ``secret``, ``token``, ``password``,
    ``aws_secret_access_key``, ``session_token``, ``Authorization``...) is replaced whole (even a
    nested dict), and other values are searched recursively. Strings: passwords in URLs and signed-URL query parameters are
    replaced. Other values are returned unchanged.
    """
    if isinstance(obj, dict):
        return {
            k: (REDACTED if (_is_sensitive_name(k) and v is not None) else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


# Secret values seen in storage options (register_secrets) or the environment: hidden
# wherever they appear in text, whatever the surrounding syntax.
_KNOWN_SECRETS: set[str] = set()
_MIN_SECRET_LENGTH = 8  # shorter values ("1", "true") are flags, not secrets
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
# name=value, 'name': 'value', "name": value and header lines name:value (no space)
_PAIR = re.compile(
    r"""(?P<q>['"]?)(?P<name>[A-Za-z][A-Za-z0-9_.\-]*)(?P=q)"""
    r"""(?P<sep>=|(?<=['"]):\s*|:(?=\S))"""
    r"""(?P<value>b?'[^']*'|b?"[^"]*"|[^\s'",;&)}\]]+)"""
)
_SIGNATURE_BLOCK = re.compile(r"(?i)\b(signature:?\s*\n\s*)([0-9a-f]{32,})")


def register_secrets(obj: Any) -> None:
    """Remember the secret values in ``obj`` (a dict of options, searched like :func:`redact`)
    so that :func:`redact_text` hides them wherever they appear later, e.g. in a library's
    DEBUG line that prints a header or a signed request."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str) and _is_sensitive_name(k) and len(v) >= _MIN_SECRET_LENGTH:
                _KNOWN_SECRETS.add(v)
            else:
                register_secrets(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            register_secrets(v)


_ENV_NOT_SECRET = {"PWD", "OLDPWD"}  # "pwd" names a password elsewhere, a folder here


@functools.lru_cache(maxsize=4096)
def _is_secret_env_name(name: str) -> bool:
    """Does the environment variable ``name`` hold a secret? (Cached: names are few and fixed.)"""
    return name not in _ENV_NOT_SECRET and _is_sensitive_name(name)


_secrets_cache: tuple[Any, tuple[str, ...]] = (None, ())


def _secrets() -> tuple[str, ...]:
    """Registered and environment secret values, longest first (so a secret holding another
    is hidden whole).

    The environment is read on every call, since a secret may be set at any time, but its
    names are classified once (:func:`_is_secret_env_name`) and the list is rebuilt only when
    the secret values in the environment or the number of registered secrets (which only
    grows, through :func:`register_secrets`) changed.
    """
    global _secrets_cache
    values = (os.environ.get(k, "") for k in os.environ if _is_secret_env_name(k))  # decodes only secrets' values
    env = tuple(v for v in values if len(v) >= _MIN_SECRET_LENGTH)
    key = (env, len(_KNOWN_SECRETS))
    cached_key, secrets = _secrets_cache
    if key != cached_key:
        secrets = tuple(sorted(_KNOWN_SECRETS.union(env), key=len, reverse=True))
        _secrets_cache = (key, secrets)
    return secrets


def redact_text(text: str) -> str:
    """``text`` with secrets replaced by ``***``: the one redaction of logs, records, run
    summaries and error messages.

    Hides registered and environment secret values wherever they appear, passwords and
    signed-URL parameters in URLs, the values of ``name=value`` / ``'name': 'value'`` /
    ``header-name:value`` pairs whose name says secret (token, signature, credential,
    authorization, ...), AWS access key ids and signature blocks.
    """
    if not text:
        return text
    for secret in _secrets():
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "://" in text:
        text = _redact_url(text)

    def pair(m: re.Match) -> str:
        name = m.group("name")
        # a bare "key" in prose is a dict/config key ("must look like key=value"); secret keys
        # given as the "key" option are hidden by value above
        if name.lower() == "key" or not _is_sensitive_name(name) or m.group("value").strip("b'\"") == REDACTED:
            return m.group(0)
        value = m.group("value")
        quote = value[-1] if value[-1:] in ("'", '"') and len(value) > 1 else ""
        prefix = "b" if value.startswith("b") and quote else ""
        return f"{m.group('q')}{m.group('name')}{m.group('q')}{m.group('sep')}{prefix}{quote}{REDACTED}{quote}"

    text = _PAIR.sub(pair, text)
    text = _AWS_KEY_ID.sub(REDACTED, text)
    return _SIGNATURE_BLOCK.sub(lambda m: m.group(1) + REDACTED, text)


class RedactingFilter(logging.Filter):
    """A handler filter passing every log record (message, arguments, traceback) through
    :func:`redact_text`. :func:`install_log_redaction` attaches it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's own error to show
            return True
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Attach one :class:`RedactingFilter` to every handler of ``logger`` (default: root)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


# --------------------------------------------------------------------------- validation


def check_reachable(
    url: str, storage_options: dict | None = None, *, for_write: bool = False, attempts: int = 1
) -> None:
    """Fail fast, before any work, if ``url`` cannot be used.

    Reading (``for_write=False``): the URL must exist; otherwise :class:`ConfigError`.
    Writing: the folder is created (local) or a small probe object is written and removed
    (object stores), proving the bucket exists and is writable. Network failures after
    retries raise :class:`StorageError`; missing bucket/forbidden raise :class:`ConfigError`.
    One attempt by default: the storage clients already retry connection errors themselves
    (s3fs: about 5 s before giving up on a dead endpoint), and a check should answer quickly.
    """
    shown = redact(url)
    try:
        fs, path = get_fs(url, storage_options)
    except (ValueError, ImportError, TypeError) as exc:
        raise ConfigError(f"cannot open storage URL {shown!r}: {exc}") from exc
    try:
        if not for_write:
            if not retry(lambda: fs.exists(path), what=f"check {shown}", attempts=attempts):
                raise ConfigError(f"input {shown!r} does not exist (check the path and storage_options)")
            return
        if is_local(fs):
            if os.path.exists(path) and not os.path.isdir(path):
                raise ConfigError(f"output {shown!r} exists and is not a folder")
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK):
                raise ConfigError(f"output folder {shown!r} is not writable")
            return
        probe = join_url(path, f"_probe-{uuid.uuid4().hex}")
        retry(lambda: fs.pipe_file(probe, b""), what=f"write probe to {shown}", attempts=attempts)
        try:
            retry(lambda: fs.rm_file(probe), what=f"remove probe from {shown}", attempts=attempts)
        except (StorageError, FileNotFoundError):
            log.warning("could not remove the write probe %s", redact(full_url(fs, probe)))
    except StorageError as exc:
        raise StorageError(
            f"{'output' if for_write else 'input'} {shown!r} is not reachable: {exc}; check the "
            "endpoint/network and storage_options"
        ) from exc
    except (FileNotFoundError, PermissionError) as exc:
        what = "output" if for_write else "input"
        raise ConfigError(
            f"{what} {shown!r} is not reachable ({type(exc).__name__}: {redact(str(exc))}); "
            "check that the bucket/folder exists and the credentials in storage_options allow it"
        ) from exc
