"""A local HTTP file server in a thread, for tests of inputs and photos read over HTTP(S).

:func:`serve` serves a folder as ``python -m http.server`` does (Content-Length and
Last-Modified, no ETag, an index page for a folder, like nginx's autoindex), with switches on
the returned server to misbehave the ways real servers do.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
from typing import Iterator
from urllib.parse import urlsplit


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``server_folder``. Switches on the server: ``forbid_folders`` (403 for any folder
    URL: nginx without autoindex, S3/GCS static sites, CDNs), ``forbidden`` (paths answering
    403: a presigned URL expired or refused), ``unavailable`` (``{path: n}``: 503 to the first
    ``n`` requests of ``path``, then served: a server briefly overloaded; fsspec's ``info()``
    asks HEAD, then GET, so 2 fail one ``info()``). Records ``(method, path)`` requests."""

    server_folder = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=self.server_folder, **kwargs)

    def log_message(self, *args):
        pass

    def send_head(self):
        server = self.server
        server.requests.append((self.command, self.path))
        path = urlsplit(self.path).path
        with server.lock:
            unavailable = server.unavailable.get(path, 0) > 0
            if unavailable:
                server.unavailable[path] -= 1
        if unavailable:
            self.send_error(503)
            return None
        if path in server.forbidden or (server.forbid_folders and os.path.isdir(self.translate_path(self.path))):
            self.send_error(403)
            return None
        return super().send_head()


@contextlib.contextmanager
def serve(folder: str, *, forbid_folders: bool = False) -> Iterator[tuple[str, http.server.ThreadingHTTPServer]]:
    """``(base URL, server)`` of a server of ``folder`` on a free loopback port, stopped on exit.
    Set ``server.forbidden`` (a set of URL paths, ``/a/f.png``) / ``server.unavailable`` (a
    dict of them) at any time; ``server.requests`` lists what was asked."""
    handler = type("Handler", (_Handler,), {"server_folder": str(folder)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests, server.forbid_folders = [], forbid_folders
    server.forbidden, server.unavailable, server.lock = set(), {}, threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
