"""How one remote object's size, version and byte ranges are fetched and
checked: the transports under :class:`cimfs.remote.RemoteStorage`, and the
time limits of every request.

An object's version is what its storage reports when it is first looked at
(ETag, Last-Modified, VersionId...); every later answer must be of that
version, or the read fails with a one-line :class:`CimError` ("... changed
while being read ..."), never a file made of two versions:

- HTTP(S) (fsspec's ``HTTPFileSystem``): the HEAD and the ranged GETs are made
  here, on the filesystem's own aiohttp session (its headers, auth and client
  options apply).  A ranged GET carries ``If-Match: <ETag>`` (or
  ``If-Unmodified-Since: <Last-Modified>`` when the ETag is weak or absent),
  so a server answers 412 once the object changed; the answer's ETag,
  Last-Modified, ``Content-Range`` (start, end and total size) and length are
  compared with what was asked too, for servers that ignore the condition.
  A ``200`` answer to a ranged request (a server that ignores ``Range``) is
  refused without reading its body, and no body is read past the bytes asked.
- S3 (s3fs): ``get_object`` is called here on s3fs's client with the range,
  ``IfMatch`` and, when the object has one, its ``VersionId`` (the read then
  stays on that version); the answer's ETag, ``ContentRange`` and length are
  checked and its body read only up to the bytes asked.
- any other filesystem: its ``cat_file``, then its ``info`` again, whose size
  and version must be unchanged.

Time limits (``storage_options`` keys, else ``CIMFS_*`` environment
variables, else the defaults below): ``connect_timeout``, ``read_timeout``
(the longest silence while a request waits for bytes) and ``request_timeout``
(the whole request, however steadily the bytes trickle in).  A timed-out
request is not retried.
"""

from __future__ import annotations

import errno
import inspect
import math
import os
import re
from dataclasses import dataclass

from .errors import E_FAIL, E_INVALIDARG, CimError

#: Seconds, unless ``storage_options`` or the environment say otherwise.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
REQUEST_TIMEOUT = 120.0
#: Most bytes asked in one request (a longer read is several requests, each within ``request_timeout``).
MAX_REQUEST = 16 << 20

#: botocore's retries for S3 unless the caller configures them: its default
#: (legacy, 5 attempts with back-off) takes ~8 s to give up on an unreachable
#: endpoint, on every request.
S3_RETRIES = {"mode": "standard", "total_max_attempts": 3}

TIMEOUT_OPTIONS = {
    "connect_timeout": ("connect", "CIMFS_CONNECT_TIMEOUT"),
    "read_timeout": ("read", "CIMFS_READ_TIMEOUT"),
    "request_timeout": ("request", "CIMFS_REQUEST_TIMEOUT"),
}

#: What an fsspec backend's ``info`` may carry that names the object's version,
#: most specific first (``Last-Modified`` is fsspec HTTP's, ``LastModified`` s3fs').
VERSION_KEYS = (
    "ETag",
    "etag",
    "VersionId",
    "generation",
    "md5Hash",
    "Last-Modified",
    "LastModified",
    "last_modified",
    "mtime",
    "created",
)

#: The caller's s3fs settings that a GetObject takes too (server-side encryption keys, requester pays...).
_GET_OBJECT_OPTIONS = (
    "SSECustomerAlgorithm",
    "SSECustomerKey",
    "SSECustomerKeyMD5",
    "RequestPayer",
    "ExpectedBucketOwner",
    "ChecksumMode",
)
_CONTENT_RANGE = re.compile(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Timeouts:
    connect: float = CONNECT_TIMEOUT
    read: float = READ_TIMEOUT
    request: float = REQUEST_TIMEOUT

    def describe(self) -> str:
        return f"connect_timeout={self.connect:g}s, read_timeout={self.read:g}s, request_timeout={self.request:g}s"


def _seconds(value, name: str, where: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not (seconds > 0 and math.isfinite(seconds)):
        raise CimError(E_INVALIDARG, f"{name} must be a positive number of seconds, not {value!r}", where)
    return seconds


def split_options(url: str, options: dict | None) -> tuple[Timeouts, dict]:
    """The time limits in ``options`` (or the environment) and the options
    left for the backend, with those limits (and bounded S3 retries) put in
    the backend's own settings unless the caller set them there."""
    options = dict(options or {})
    limits = {}
    for key, (field, env) in TIMEOUT_OPTIONS.items():
        if key in options:
            limits[field] = _seconds(options.pop(key), key, url)
        elif os.environ.get(env):
            limits[field] = _seconds(os.environ[env], env, url)
    timeouts = Timeouts(**limits)
    if "::" in url:
        return timeouts, options
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", dict(S3_RETRIES))
        config.setdefault("connect_timeout", timeouts.connect)
        config.setdefault("read_timeout", timeouts.read)
        options["config_kwargs"] = config
    elif scheme in ("http", "https"):
        client = dict(options.get("client_kwargs") or {})
        if "timeout" not in client:
            import aiohttp  # optional dependency (fsspec's HTTP backend)

            client["timeout"] = aiohttp.ClientTimeout(
                total=timeouts.request, sock_connect=timeouts.connect, sock_read=timeouts.read
            )
        options["client_kwargs"] = client
    return timeouts, options


def version_of(info: dict) -> str | None:
    """The object's version as its ``info`` reports it; None when it reports none."""
    parts = [f"{k}={info[k]}" for k in VERSION_KEYS if info.get(k) not in (None, "")]
    return ";".join(parts) or None


def is_timeout(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or "Timeout" in type(e).__name__


def changed(url: str, what: str) -> CimError:
    return CimError(E_FAIL, f"the object changed while being read ({what}); open the image again", url)


def _same_etag(a: str, b: str) -> bool:
    """Weak comparison (RFC 9110 8.8.3.2): the opaque tags, quotes and ``W/`` aside."""

    def opaque(tag: str) -> str:
        tag = tag.strip()
        return (tag[2:] if tag[:2] in ("W/", "w/") else tag).strip('"')

    return opaque(a) == opaque(b)


def _check_range(content_range: str | None, url: str, start: int, end: int, size: int) -> None:
    m = _CONTENT_RANGE.match(content_range or "")
    if not m:
        raise CimError(
            E_FAIL, f"the server answered a ranged request without a valid Content-Range ({content_range!r})", url
        )
    if m.group(3) != "*" and int(m.group(3)) != size:
        raise changed(url, f"it is now {m.group(3)} bytes, was {size}")
    if m.group(1) is None or (int(m.group(1)), int(m.group(2))) != (start, end - 1):
        raise CimError(
            E_FAIL, f"the server sent bytes {m.group(1)}-{m.group(2)} for a request of bytes {start}-{end - 1}", url
        )


def _ignored_range(url: str) -> CimError:
    return CimError(
        E_FAIL,
        "the server ignored the byte range asked for (it answered with the whole object); "
        "remote images are read only in ranges",
        url,
    )


class Transport:
    """Any fsspec filesystem: its own calls, then a second ``info`` to see that
    the object did not change under the read."""

    def __init__(self, fs, timeouts: Timeouts):
        self.fs = fs
        self.timeouts = timeouts

    def call(self, name: str, *args, **kwargs):
        """``fs.name(*args, **kwargs)``, within ``request_timeout`` on async filesystems."""
        fs = self.fs
        if getattr(fs, "async_impl", False) and hasattr(fs, "_" + name) and getattr(fs, "loop", None) is not None:
            from fsspec.asyn import sync  # optional dependency (cimfs[remote])

            return sync(fs.loop, getattr(fs, "_" + name), *args, timeout=self.timeouts.request, **kwargs)
        return getattr(fs, name)(*args, **kwargs)

    def run(self, coroutine_function, *args):
        from fsspec.asyn import sync  # optional dependency (cimfs[remote])

        return sync(self.fs.loop, coroutine_function, *args, timeout=self.timeouts.request)

    def info(self, path: str) -> dict:
        return self.call("info", path)

    def fetch(self, path: str, start: int, end: int, info: dict, url: str) -> bytes:
        data = self.call("cat_file", path, start=start, end=end)
        try:
            self.fs.invalidate_cache(path)
        except Exception:  # noqa: BLE001 - a filesystem that caches nothing
            pass
        now = self.info(path)
        if now.get("size") != info.get("size"):
            raise changed(url, f"it is now {now.get('size')} bytes, was {info.get('size')}")
        if version_of(now) != version_of(info):
            raise changed(url, f"{version_of(info)} became {version_of(now)}")
        return data


class HTTPTransport(Transport):
    """fsspec's HTTPFileSystem, with the HEAD and ranged GETs made here."""

    def _request(self, extra: dict) -> tuple[dict, dict]:
        import aiohttp  # optional dependency (fsspec's HTTP backend)

        kwargs = dict(self.fs.kwargs)
        headers = dict(kwargs.pop("headers", None) or {})
        headers.update(extra)
        headers["Accept-Encoding"] = "identity"  # ranges of an encoded body are not ranges of the object
        kwargs.pop("allow_redirects", None)
        t = self.timeouts
        if "timeout" not in (getattr(self.fs, "client_kwargs", None) or {}):  # else the caller's session timeout
            kwargs["timeout"] = aiohttp.ClientTimeout(total=t.request, sock_connect=t.connect, sock_read=t.read)
        return headers, kwargs

    @staticmethod
    def _status_error(status: int, reason: str | None, path: str) -> OSError:
        if status in (404, 410):
            return FileNotFoundError(errno.ENOENT, f"HTTP {status}", path)
        if status in (401, 403):
            return PermissionError(errno.EACCES, f"HTTP {status} {reason or ''}".strip(), path)
        return OSError(errno.EIO, f"HTTP {status} {reason or ''}".strip())

    def info(self, path: str) -> dict:
        return self.run(self._info, path)

    async def _info(self, path: str) -> dict:
        session = await self.fs.set_session()
        url = self.fs.encode_url(path)
        headers, kwargs = self._request({})
        async with session.head(url, headers=headers, allow_redirects=True, **kwargs) as r:
            status, reason, h = r.status, r.reason, r.headers
        if (
            status == 200
            and h.get("Content-Length", "").isdigit()
            and h.get("Content-Encoding", "identity") in ("identity", "")
        ):
            return self._info_dict(path, int(h["Content-Length"]), h)
        if status in (401, 403, 404, 410) or (status >= 500 and status != 501):
            raise self._status_error(status, reason, path)
        # HEAD refused (405, 501, a URL signed for GET only) or without a length: the first byte tells the size.
        headers, kwargs = self._request({"Range": "bytes=0-0"})
        async with session.get(url, headers=headers, allow_redirects=True, **kwargs) as r:
            status, reason, h = r.status, r.reason, r.headers
            r.close()  # never read a body not asked for
        m = _CONTENT_RANGE.match(h.get("Content-Range", ""))
        if status in (206, 416) and m and m.group(3) != "*":
            return self._info_dict(path, int(m.group(3)), h)
        if status == 200 and h.get("Content-Length", "").isdigit():
            return self._info_dict(path, int(h["Content-Length"]), h)
        if status in (200, 206, 416):
            raise OSError(errno.EIO, "the server does not tell the object's size")
        raise self._status_error(status, reason, path)

    @staticmethod
    def _info_dict(path: str, size: int, headers) -> dict:
        info = {"name": path, "size": size, "type": "file"}
        for key in ("ETag", "Last-Modified"):
            if headers.get(key):
                info[key] = headers[key]
        return info

    def fetch(self, path: str, start: int, end: int, info: dict, url: str) -> bytes:
        return self.run(self._get, path, start, end, info, url)

    async def _get(self, path: str, start: int, end: int, info: dict, url: str) -> bytes:
        etag, modified = info.get("ETag"), info.get("Last-Modified")
        condition = {"Range": f"bytes={start}-{end - 1}"}
        if etag and not etag.strip().startswith(("W/", "w/")):
            condition["If-Match"] = etag  # a weak ETag never matches If-Match (strong comparison)
        elif modified:
            condition["If-Unmodified-Since"] = modified
        headers, kwargs = self._request(condition)
        session = await self.fs.set_session()
        async with session.get(self.fs.encode_url(path), headers=headers, allow_redirects=True, **kwargs) as r:
            try:
                self._check(r, url, start, end, info, condition)
                data = await self._body(r, url, end - start)
            except BaseException:
                r.close()  # drop the connection rather than read (or wait for) a body not wanted
                raise
        return data

    def _check(self, r, url: str, start: int, end: int, info: dict, condition: dict) -> None:
        size, h = info["size"], r.headers
        if r.status == 412:
            sent = "; ".join(f"{k}: {v}" for k, v in condition.items() if k.startswith("If-"))
            raise changed(url, f"the server answered 412 Precondition Failed to {sent}")
        if r.status == 416:
            m = _CONTENT_RANGE.match(h.get("Content-Range", ""))
            total = m.group(3) if m else "?"
            raise changed(url, f"it is now {total} bytes, was {size}")
        if r.status == 200:
            if (start, end) != (0, size):
                raise _ignored_range(url)
        elif r.status == 206:
            _check_range(h.get("Content-Range"), url, start, end, size)
        else:
            raise self._status_error(r.status, r.reason, url)
        if h.get("Content-Encoding", "identity") not in ("identity", ""):
            raise CimError(E_FAIL, f"the server encoded a ranged answer ({h['Content-Encoding']})", url)
        if info.get("ETag") and h.get("ETag") and not _same_etag(info["ETag"], h["ETag"]):
            raise changed(url, f"ETag {info['ETag']} became {h['ETag']}")
        if info.get("Last-Modified") and h.get("Last-Modified") and info["Last-Modified"] != h["Last-Modified"]:
            raise changed(url, f"Last-Modified {info['Last-Modified']} became {h['Last-Modified']}")
        length = h.get("Content-Length")
        if length is not None and length.isdigit() and int(length) != end - start:
            raise CimError(E_FAIL, f"the server announced {length} bytes for a request of {end - start}", url)

    @staticmethod
    async def _body(r, url: str, want: int) -> bytes:
        data = bytearray()
        while len(data) < want:
            chunk = await r.content.read(min(_CHUNK, want - len(data)))
            if not chunk:
                break
            data += chunk
        if len(data) == want and await r.content.read(1):
            raise CimError(E_FAIL, f"the server sent more than the {want} bytes asked for", url)
        return bytes(data)


class S3Transport(Transport):
    """s3fs, with ``get_object`` called here on its client."""

    def info(self, path: str) -> dict:
        return self.call("info", path, refresh=True)

    def fetch(self, path: str, start: int, end: int, info: dict, url: str) -> bytes:
        return self.run(self._get, path, start, end, info, url)

    async def _get(self, path: str, start: int, end: int, info: dict, url: str) -> bytes:
        from botocore.exceptions import ClientError  # optional dependency (s3fs)

        fs = self.fs
        bucket, key, version = fs.split_path(path)
        await fs.set_session()
        client = await fs.get_s3(bucket)
        extra = {**(getattr(fs, "s3_additional_kwargs", None) or {}), **(getattr(fs, "req_kw", None) or {})}
        kwargs = {k: v for k, v in extra.items() if k in _GET_OBJECT_OPTIONS}
        kwargs.update(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        if info.get("ETag"):
            kwargs["IfMatch"] = info["ETag"]
        if version or info.get("VersionId"):
            kwargs["VersionId"] = version or info["VersionId"]  # the read stays on the version first seen
        try:
            resp = await client.get_object(**kwargs)
        except ClientError as e:
            raise self._client_error(e, url, info) from None
        body = resp["Body"]
        try:
            if resp.get("ContentRange"):
                _check_range(resp["ContentRange"], url, start, end, info["size"])
            elif (start, end) != (0, info["size"]):
                raise _ignored_range(url)
            if info.get("ETag") and resp.get("ETag") and not _same_etag(info["ETag"], resp["ETag"]):
                raise changed(url, f"ETag {info['ETag']} became {resp['ETag']}")
            if resp.get("ContentLength") not in (None, end - start):
                raise CimError(
                    E_FAIL, f"the storage announced {resp['ContentLength']} bytes for a request of {end - start}", url
                )
            data = bytearray()
            while len(data) < end - start:
                chunk = await body.read(min(_CHUNK, end - start - len(data)))
                if not chunk:
                    break
                data += chunk
            if len(data) == end - start and await body.read(1):
                raise CimError(E_FAIL, f"the storage sent more than the {end - start} bytes asked for", url)
            return bytes(data)
        finally:
            closing = body.close()
            if inspect.isawaitable(closing):
                await closing

    @staticmethod
    def _client_error(e, url: str, info: dict) -> BaseException:
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "PreconditionFailed" or status == 412:
            return changed(url, f"the storage answered PreconditionFailed to IfMatch: {info.get('ETag')}")
        if code == "InvalidRange" or status == 416:
            return changed(url, f"the byte range is no longer inside it (was {info['size']} bytes)")
        if code in ("NoSuchKey", "NoSuchVersion", "404") or status == 404:
            return FileNotFoundError(errno.ENOENT, code or "not found", url)
        if code == "AccessDenied" or status in (401, 403):
            return PermissionError(errno.EACCES, code or "access denied", url)
        return OSError(errno.EIO, f"{code}: {error.get('Message', '')}".strip())


def transport_for(fs, timeouts: Timeouts) -> Transport:
    """The transport that reads ``fs`` (an fsspec filesystem instance)."""
    for module, name, cls in (
        ("fsspec.implementations.http", "HTTPFileSystem", HTTPTransport),
        ("s3fs", "S3FileSystem", S3Transport),
    ):
        try:
            kind = getattr(__import__(module, fromlist=[name]), name)
        except ImportError:
            continue
        if isinstance(fs, kind):
            return cls(fs, timeouts)
    return Transport(fs, timeouts)
