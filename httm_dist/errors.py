"""Exceptions shared by every room, so the driver can tell a bad scene from a bad job.

- ``ConfigError``: the job's configuration is wrong; raised before any work starts.
- ``SceneError``: one scene (or chunk) cannot be processed (corrupt or missing image, empty
  scene, unreadable archive, too few frames). The driver records it as failed and goes on.
- ``StorageError``: a storage operation failed after its retries.
"""


class HttmDistError(Exception):
    """Base of every error httm-dist raises on purpose."""


class ConfigError(HttmDistError, ValueError):
    """The configuration (or a CLI argument) is invalid; the message names the key."""


class SceneError(HttmDistError):
    """A single scene cannot be processed; the job records it as failed and goes on."""


class StorageError(HttmDistError, OSError):
    """Reading or writing an fsspec URL failed after retries; the message names the URL."""
