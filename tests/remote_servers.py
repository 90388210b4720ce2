"""Real servers on 127.0.0.1 (OS-assigned ports) for the remote-storage tests
and benchmarks: an HTTP server that serves byte ranges, and moto's S3 server.
Both count, on the server side, the requests they answer and the body bytes
they send."""

from __future__ import annotations

import email.utils
import http.server
import os
import re
import socket
import sys
import threading
import urllib.parse

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class Counter:
    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.bytes = 0
            self.log: list[tuple[str, str, int]] = []  # (method, path, body bytes sent)

    def add(self, method: str, path: str, n: int) -> None:
        """Counted before the bytes are sent, so a client never sees bytes not counted yet."""
        with self._lock:
            self.requests += 1
            self.bytes += n
            self.log.append((method, path, n))


def _track(handler_class):
    """A request handler class whose connections ``_close_all`` can cut, so a
    stopped server is stopped for kept-alive connections too."""

    class Tracked(handler_class):
        def setup(self):
            super().setup()
            with _LIVE_LOCK:
                _LIVE.setdefault(self.server, set()).add(self.connection)

        def finish(self):
            with _LIVE_LOCK:
                _LIVE.get(self.server, set()).discard(self.connection)
            super().finish()

    return Tracked


_LIVE: dict = {}
_LIVE_LOCK = threading.Lock()


def _close_all(server) -> None:
    with _LIVE_LOCK:
        conns = _LIVE.pop(server, set())
    for c in conns:
        try:
            c.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Trickle:
    """A connection's output sent one byte per ``interval`` seconds (a slow
    server), until the client hangs up or the server stops."""

    def __init__(self, raw, interval: float, stopped: threading.Event):
        self.raw, self.interval, self.stopped = raw, interval, stopped

    def write(self, data) -> int:
        for i in range(len(data)):
            if self.stopped.is_set():
                raise ConnectionAbortedError("server stopped")
            self.raw.write(bytes(data[i : i + 1]))
            self.raw.flush()
            self.stopped.wait(self.interval)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()

    def __getattr__(self, name):
        return getattr(self.raw, name)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """GET (whole or one ``Range: bytes=a-b``) and HEAD of the files of one
    directory, with ``ETag`` and ``Last-Modified`` (unless ``server.versions``
    is off) and honouring ``If-Match``/``If-Unmodified-Since`` (unless
    ``server.conditions`` is off).  Names listed in ``server.forbidden`` get
    403; names in ``server.ignore_range`` are sent whole, streamed, whatever
    the ``Range`` asked; ``server.trickle`` (seconds) sends every answer one
    byte at a time; ``server.before_get(name)`` runs before each GET;
    ``server.no_head`` answers every HEAD 405."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        if self.server.trickle:
            self.wfile = _Trickle(self.wfile, self.server.trickle, self.server.stopped)

    def _version_headers(self, path: str, size: int) -> None:
        if self.server.versions:
            st = os.stat(path)
            self.send_header("ETag", f'"{st.st_mtime_ns:x}-{size:x}"')
            self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))

    def _precondition_failed(self, path: str, size: int) -> bool:
        """Whether the request's If-Match/If-Unmodified-Since exclude the file as it is now (RFC 9110 13.1)."""
        if not self.server.conditions:
            return False
        st = os.stat(path)
        match = self.headers.get("If-Match")
        if match is not None:
            current = f'"{st.st_mtime_ns:x}-{size:x}"'
            tags = [t.strip() for t in match.split(",")]
            return "*" not in tags and current not in tags  # strong comparison: a W/ tag never matches
        since = self.headers.get("If-Unmodified-Since")
        if since is not None:
            try:
                limit = email.utils.parsedate_to_datetime(since).timestamp()
            except (TypeError, ValueError):
                return False
            return int(st.st_mtime) > limit
        return False

    def _file(self):
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        if ".." in rel.split("/"):
            return None, None
        if os.path.basename(rel) in self.server.forbidden:
            return "forbidden", None
        path = os.path.join(self.server.root, rel)
        return (path, os.path.getsize(path)) if os.path.isfile(path) else (None, None)

    def _status(self, code: int) -> None:
        self.server.counter.add(self.command, self.path, 0)
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        if self.server.no_head:  # as a URL signed for GET only answers
            return self._status(405)
        path, size = self._file()
        if path is None or path == "forbidden":
            return self._status(404 if path is None else 403)
        self.server.counter.add("HEAD", self.path, 0)
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("Accept-Ranges", "bytes")
        self._version_headers(path, size)
        self.end_headers()

    def do_GET(self):
        path, size = self._file()
        if path is None or path == "forbidden":
            return self._status(404 if path is None else 403)
        if self.server.before_get is not None:
            self.server.before_get(os.path.basename(path))
            size = os.path.getsize(path)
        if self._precondition_failed(path, size):
            return self._status(412)
        if os.path.basename(path) in self.server.ignore_range:
            return self._send_whole(path, size)
        start, end = 0, size  # [start, end)
        ranged = self.headers.get("Range")
        if ranged:
            m = _RANGE.match(ranged.strip())
            if not m or (not m.group(1) and not m.group(2)):
                return self._status(416)
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:  # suffix range
                start = max(0, size - int(m.group(2)))
            if start >= size:
                return self._status(416)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self._version_headers(path, size)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.server.counter.add("GET", self.path, len(body))
        self.end_headers()
        self.wfile.write(body)

    def _send_whole(self, path: str, size: int) -> None:
        """200 and the whole file, read and sent 256 KiB at a time (each piece
        counted before it is sent), until the client hangs up."""
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self._version_headers(path, size)
        self.end_headers()
        with open(path, "rb") as f:
            while True:
                piece = f.read(256 << 10)
                if not piece:
                    break
                self.server.counter.add("GET", self.path, len(piece))
                try:
                    self.wfile.write(piece)
                except OSError:  # the client hung up: what it took is counted
                    self.close_connection = True
                    return


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client that hung up is no error
            super().handle_error(request, client_address)


class RangeHTTPServer:
    """``with RangeHTTPServer(directory) as s: s.url + "/name"``."""

    def __init__(self, root):
        self.counter = Counter()
        self._httpd = _QuietServer(("127.0.0.1", 0), _track(_RangeHandler))
        self._httpd.daemon_threads = True
        self._httpd.root = os.fspath(root)
        self._httpd.forbidden = set()
        self._httpd.ignore_range = set()
        self._httpd.counter = self.counter
        self._httpd.versions = True
        self._httpd.conditions = True
        self._httpd.trickle = 0.0
        self._httpd.before_get = None
        self._httpd.no_head = False
        self._httpd.stopped = threading.Event()
        self.forbidden = self._httpd.forbidden
        self.ignore_range = self._httpd.ignore_range
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def __setattr__(self, name, value):
        if name in ("versions", "conditions", "trickle", "before_get", "no_head"):  # settings the handlers read
            setattr(self._httpd, name, value)
        else:
            super().__setattr__(name, value)

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.stopped.set()
            self._httpd.shutdown()
            self._httpd.server_close()
            _close_all(self._httpd)
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class _CountingApp:
    """WSGI middleware counting what moto's app sends back."""

    def __init__(self, app, counter: Counter):
        self.app, self.counter = app, counter

    def __call__(self, environ, start_response):
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        body = self.app(environ, start_response)
        if method == "HEAD":
            self.counter.add(method, path, 0)
            yield from body
            return
        chunks = list(body)  # moto answers from memory: counted whole before any of it is sent
        self.counter.add(method, path, sum(map(len, chunks)))
        yield from chunks


class S3Server:
    """moto's S3 (its standalone server's WSGI app) on 127.0.0.1, in a thread.

    ``stop()`` then ``start()`` again serves the same buckets on the same port."""

    def __init__(self):
        from moto.server import DomainDispatcherApplication, create_backend_app

        self.counter = Counter()
        self._app = _CountingApp(DomainDispatcherApplication(create_backend_app), self.counter)
        self.port = 0  # the OS picks one; a restart binds the same one again
        self._server = None
        self.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from werkzeug.serving import WSGIRequestHandler, make_server

        self._server = make_server(
            "127.0.0.1", self.port, self._app, threaded=True, request_handler=_track(WSGIRequestHandler)
        )
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            _close_all(self._server)
            self._thread.join()
            self._server = None

    def options(self) -> dict:
        """s3fs storage options for this server."""
        return {
            "endpoint_url": self.url,
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
        }

    def env(self) -> dict:
        """Environment for a subprocess (the ``cimfs`` command) to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def upload_dir(self, directory, bucket: str, prefix: str) -> list[str]:
        c = self.client()
        try:
            c.create_bucket(Bucket=bucket)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        keys = []
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                key = f"{prefix}/{name}"
                c.upload_file(path, bucket, key)
                keys.append(key)
        return keys

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def stop_fsspec_io() -> None:
    """Stop fsspec's IO thread (async filesystems such as s3fs and HTTP start
    it and leave it running) and forget the instances bound to its loop: the
    library forks worker processes only while a process runs no other thread,
    and later tests in this process expect that."""
    import threading as _threading
    import time as _time

    import fsspec
    import fsspec.asyn

    for cls in list(fsspec.registry.values()):
        try:
            cls.clear_instance_cache()
        except Exception:  # noqa: BLE001 - a class that keeps no cache
            pass
    lp, th = fsspec.asyn.loop[0], fsspec.asyn.iothread[0]
    if lp is not None:
        import asyncio

        try:  # aiohttp resolves names in the loop's default executor: its threads go too
            asyncio.run_coroutine_threadsafe(lp.shutdown_default_executor(), lp).result(10)
        except Exception:  # noqa: BLE001
            pass
        lp.call_soon_threadsafe(lp.stop)
        if th is not None:
            th.join(10)
        fsspec.asyn.reset_lock()
    deadline = _time.monotonic() + 10  # the servers' last request threads end once their connections are cut
    while _threading.active_count() > 1 and _time.monotonic() < deadline:
        _time.sleep(0.05)
