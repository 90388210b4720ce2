"""Images stored behind fsspec (S3, HTTP, memory, chained URLs): the I/O layer
under :class:`cimfs.Image` when :func:`cimfs.open` is given a URL.

Local paths never come here: they keep the reader's mmap/pread path.  A
remote image is read lazily and in ranges: opening it reads the ``.cim`` and,
per region object, one HEAD and the first block; every later read fetches the
blocks it touches.  Small reads go through a bounded in-memory block cache
(LRU, shared by the image's regions), with read-ahead that grows while reads
are sequential and adjacent missing blocks fetched in one request; large reads
are fetched as one range and not kept.  With ``cache_dir`` every fetched block
is also kept on local disk and never fetched again.

Every failure of the storage becomes a :class:`CimError` naming the URL
(``CimFormatError`` for an object shorter than the image says); requests are
retried a bounded number of times on top of the backend's own retries, except
timed-out ones.  What is fetched, how each answer is checked against the
object's version and the time limits are :mod:`cimfs.remote_fetch`'s.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
import time
from collections import OrderedDict
from typing import TypeGuard

from .errors import (
    E_ACCESSDENIED,
    E_INVALIDARG,
    ERROR_FILE_NOT_FOUND,
    CimError,
    CimFormatError,
)
from .layout import cim

E_FAIL = 0x80004005

#: Unit of the block cache and of ranged requests for metadata and small files.
BLOCK_SIZE = 64 << 10
#: Reads at least this long are one ranged request of exactly their bytes (not cached in memory).
DIRECT_READ = 1 << 20
#: Most bytes read ahead of a sequential reader.
MAX_READ_AHEAD = 1 << 20
#: Bytes of blocks an image keeps in memory.
MEMORY_CACHE = 32 << 20
#: Adjacent missing runs of blocks separated by at most this many cached blocks are fetched together.
_MERGE_GAP = 2
_INDEX_MAGIC = b"CIMFSBC1"  # a disk cache index starts with this and its object's identity digest
_INDEX_ENTRY = struct.Struct("<Q32s")  # a block number and the checksum of its bytes (as long as the header)
#: Attempts per request (the backends retry inside each attempt too, boundedly).
ATTEMPTS = 2
_RETRY_PAUSE = 0.25

#: Errors that retrying does not cure.
_FINAL = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)


def is_url(path: object) -> TypeGuard[str]:
    """Whether ``path`` names an fsspec URL (``proto://...`` or a ``::`` chain) rather than a local file."""
    return isinstance(path, str) and ("://" in path or "::" in path)


def local_path(url: str) -> str | None:
    """The local path of a plain ``file://`` URL (read with the local reader), else None."""
    if url.startswith("file://") and "::" not in url:
        return url[len("file://") :] or "/"
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def storage_error(e: BaseException, url: str, doing: str) -> CimError:
    """The library's error for a failed storage call (never the backend's own exception)."""
    if isinstance(e, CimError):
        return e
    if isinstance(e, FileNotFoundError):
        return CimError(ERROR_FILE_NOT_FOUND, f"{doing}: no such object", url)
    if isinstance(e, PermissionError) or getattr(e, "status", None) in (401, 403):
        return CimError(E_ACCESSDENIED, f"{doing}: access denied ({_one_line(e)})", url)
    return CimError(E_FAIL, f"{doing}: {type(e).__name__}: {_one_line(e)}", url)


class BlockCache:
    """A bounded LRU of blocks, keyed by (region, block index); thread-safe."""

    def __init__(self, max_bytes: int = MEMORY_CACHE):
        self.max_bytes = max_bytes
        self._blocks: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            data = self._blocks.get(key)
            if data is not None:
                self._blocks.move_to_end(key)
            return data

    def put(self, key, data: bytes) -> None:
        with self._lock:
            old = self._blocks.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._blocks[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes and self._blocks:
                _, dropped = self._blocks.popitem(last=False)
                self._bytes -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._bytes = 0


def private_dir(path: str) -> str:
    """``path`` as a directory only the caller can write (made 0700 when
    absent); refused when another user owns it or may write in it, since
    whoever writes there chooses what is served as the image's bytes."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as e:
        raise CimError(E_FAIL, f"cannot use the cache directory: {e.strerror}", path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise CimError(E_INVALIDARG, "the cache directory is not a directory", path)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise CimError(
            E_ACCESSDENIED,
            "refusing the cache directory: another user owns it or may write in it "
            "(it must be the caller's, not group- or world-writable)",
            path,
        )
    return path


class DiskBlocks:
    """The blocks of one version of one region object kept in ``cache_dir``:
    a sparse file of the object's size (``<key>.blocks``) and an append-only
    index (``<key>.index``) of the blocks it holds with the checksum of each.

    The key and every checksum are derived from the object's identity (URL,
    size and version), so a block is served only when its bytes hash to what
    the index recorded for this very object: blocks of another object, of
    another version, planted or damaged are fetched again, never served.  The
    index entry is written after its block, so a crash loses at most blocks.
    The directory must be the caller's own (:func:`private_dir`)."""

    def __init__(self, cache_dir: str, identity: str, size: int):
        import hashlib  # start-up time (OpenSSL): every reader imports this module, few use a cache directory

        private_dir(cache_dir)
        self._sha256 = hashlib.sha256
        self._salt = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).digest()
        base = os.path.join(cache_dir, self._salt.hex()[:32])
        self._header = _INDEX_MAGIC + self._salt
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        self._data = _own_file(base + ".blocks", flags)
        try:
            self._index = _own_file(base + ".index", flags | os.O_APPEND)
        except BaseException:
            os.close(self._data)
            raise
        if os.fstat(self._data).st_size != size:
            os.ftruncate(self._data, size)
        self.held = self._read_index()
        self._lock = threading.Lock()

    def _read_index(self) -> dict[int, bytes]:
        raw = bytearray()
        while True:
            chunk = os.read(self._index, 1 << 20)
            if not chunk:
                break
            raw += chunk
        if raw[: len(self._header)] != self._header:  # new, or another object's index: start it again
            os.ftruncate(self._index, 0)
            os.write(self._index, self._header)
            return {}
        held = {}
        usable = len(raw) - len(raw) % _INDEX_ENTRY.size  # a torn last entry (a crash mid-append) is dropped
        for block, digest in _INDEX_ENTRY.iter_unpack(bytes(raw[len(self._header) : usable])):
            held[block] = digest  # the header written twice by two first openers reads as a block never asked for
        return held

    def _digest(self, block: int, data: bytes) -> bytes:
        return self._sha256(self._salt + block.to_bytes(8, "little") + data).digest()

    def get(self, block: int, length: int) -> bytes | None:
        digest = self.held.get(block)
        if digest is None:
            return None
        data = os.pread(self._data, length, block * BLOCK_SIZE)
        if len(data) == length and self._digest(block, data) == digest:
            return data
        with self._lock:
            self.held.pop(block, None)  # not what was kept: fetched again (and kept again)
        return None

    def put(self, block: int, data: bytes) -> None:
        """Keep a block; a cache that cannot be written (disk full) is only a cache: the read goes on."""
        with self._lock:
            if block in self.held:
                return
            digest = self._digest(block, data)
            try:
                os.pwrite(self._data, data, block * BLOCK_SIZE)
                os.write(self._index, _INDEX_ENTRY.pack(block, digest))
            except OSError:
                return
            self.held[block] = digest

    def close(self) -> None:
        for fd in (self._data, self._index):
            try:
                os.close(fd)
            except OSError:
                pass


def _own_file(path: str, flags: int) -> int:
    """A regular file of the caller's, opened without following a symlink."""
    fd = os.open(path, flags, 0o600)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise CimError(E_ACCESSDENIED, "refusing a cache file that is not a regular file of the caller's", path)
    return fd


class RemoteStorage:
    """The directory holding an image on an fsspec filesystem: its ``.cim``
    and the region and object ID objects beside it."""

    def __init__(
        self,
        url: str,
        storage_options: dict | None = None,
        *,
        cache_dir: str | None = None,
        memory_cache: int = MEMORY_CACHE,
        filesystem=None,
    ):
        """``url`` with ``storage_options``; or, with ``filesystem`` (an fsspec
        filesystem instance), ``url`` is the image's path on it."""
        # start-up time: remote_fetch (~1 ms) is loaded by the first URL opened, not by every reader and writer
        from .remote_fetch import split_options, transport_for

        self.url = url
        timeouts, backend_options = split_options(url, storage_options)
        if filesystem is not None:
            self.fs, self.path = filesystem, filesystem._strip_protocol(url)
            self.url = filesystem.unstrip_protocol(self.path)
        else:
            try:
                import fsspec.core  # optional dependency (cimfs[remote])
            except ImportError as e:
                raise CimError(
                    E_INVALIDARG, f"reading URLs needs the 'remote' extra (pip install 'cimfs[remote]'): {e}", url
                ) from None
            try:
                self.fs, self.path = fsspec.core.url_to_fs(url, **backend_options)
            except ImportError as e:
                raise CimError(
                    E_INVALIDARG, f"no fsspec filesystem for this URL is installed: {_one_line(e)}", url
                ) from None
            except Exception as e:  # noqa: BLE001 - a backend's own error for a bad URL or option
                raise CimError(E_INVALIDARG, f"cannot use this URL: {_one_line(e)}", url) from None
        self.transport = transport_for(self.fs, timeouts)
        self.name = self.path.rstrip("/").rsplit("/", 1)[-1]
        self.parent = self.fs._parent(self.path)
        self.cache = BlockCache(memory_cache)
        self.cache_dir = cache_dir
        self.requests = 0  # ranged reads and HEADs made, for benchmarks and tests
        self.bytes_fetched = 0
        self._sizes: dict[str, int] = {}
        self._infos: dict[str, dict] = {}
        self._counter_lock = threading.Lock()

    # ------------------------------------------------------------ names
    def url_of(self, path: str) -> str:
        """The user's spelling of the object ``path`` beside the image (for messages)."""
        if path == self.path:
            return self.url
        name = path.rsplit("/", 1)[-1]
        if self.url.endswith(self.name) and "::" not in self.url:
            return self.url[: len(self.url) - len(self.name)] + name
        try:
            return self.fs.unstrip_protocol(path)
        except Exception:  # noqa: BLE001
            return path

    def _beside(self, name: str) -> str:
        return f"{self.parent}/{name}" if self.parent else name

    # ------------------------------------------------------------ calls
    def _call(self, url: str, doing: str, fn, *args, **kwargs):
        for attempt in range(ATTEMPTS):
            try:
                return fn(*args, **kwargs)
            except CimError:
                raise
            except Exception as e:  # noqa: BLE001 - botocore, aiohttp, timeouts...: never past this layer
                from .remote_fetch import is_timeout  # start-up time (loaded by __init__ already)

                if is_timeout(e):  # the whole time allowed was spent already: not again
                    why = _one_line(e) if str(e).strip() else "no complete answer within request_timeout"
                    raise CimError(
                        E_FAIL, f"{doing}: timed out ({why}; {self.transport.timeouts.describe()})", url
                    ) from None
                if isinstance(e, _FINAL) or attempt + 1 == ATTEMPTS:
                    raise storage_error(e, url, doing) from None
            time.sleep(_RETRY_PAUSE * (attempt + 1))
        raise AssertionError("unreachable")

    def size(self, path: str) -> int:
        size = self._sizes.get(path)
        if size is None:
            url = self.url_of(path)
            try:
                info = self._call(url, "cannot stat", self.transport.info, path)
            except CimError as e:
                from .remote_fetch import Transport  # start-up time (loaded by __init__ already)

                if e.hresult == ERROR_FILE_NOT_FOUND and type(self.transport) is Transport:
                    # Some backends say "not found" for any failed stat: a
                    # one-byte read tells access denied (or a server error) apart.
                    self._call(url, "cannot read", self.transport.call, "cat_file", path, start=0, end=1)
                raise
            self._count(0)
            if info.get("type") == "directory":
                raise CimError(E_INVALIDARG, "is a directory, not an object", url)
            size = info.get("size")
            if not isinstance(size, int) or size < 0:
                raise CimError(E_FAIL, "the storage does not report the object's size", url)
            self._sizes[path] = size
            self._infos[path] = info
        return size

    def identity(self, path: str) -> str | None:
        """URL, size and version of an object (the key of its disk cache);
        None when the storage reports no version (then nothing is cached on disk)."""
        self.size(path)
        from .remote_fetch import version_of  # start-up time (loaded by __init__ already)

        info = self._infos[path]
        version = version_of(info)
        if version is None:
            return None
        return f"{self.fs.unstrip_protocol(path)}\0{info.get('size')}\0{version}"

    def fetch(self, path: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object ``path``, all of the version first
        seen: exactly those, or an error naming the URL."""
        from .remote_fetch import MAX_REQUEST  # start-up time (loaded by __init__ already)

        self.size(path)
        if end - start > MAX_REQUEST:
            out = bytearray(end - start)
            for at in range(start, end, MAX_REQUEST):
                piece = self.fetch(path, at, min(end, at + MAX_REQUEST))
                out[at - start : at - start + len(piece)] = piece
            return bytes(out)
        url = self.url_of(path)
        data = self._call(
            url, f"cannot read bytes {start}-{end}", self.transport.fetch, path, start, end, self._infos[path], url
        )
        self._count(len(data))
        if len(data) != end - start:
            raise CimFormatError(
                f"object ended at {start + len(data)}, where the image needs {end} bytes (was it truncated?)", url
            )
        return bytes(data)

    def _count(self, n: int) -> None:
        with self._counter_lock:
            self.requests += 1
            self.bytes_fetched += n

    def find(self, name: str) -> str | None:
        """The path of ``name`` beside the image; matched case-insensitively
        (one listing) when the exact name is absent."""
        path = self._beside(name)
        try:
            self.size(path)
            return path
        except CimError as e:
            if e.hresult != ERROR_FILE_NOT_FOUND:
                raise
        try:
            entries = self._call(
                self.url_of(self.parent), "cannot list", self.transport.call, "ls", self.parent, detail=False
            )
        except CimError as e:
            if e.hresult == ERROR_FILE_NOT_FOUND:
                return None
            raise
        lowered = name.lower()
        for entry in entries:
            entry = entry.rstrip("/")
            if entry.rsplit("/", 1)[-1].lower() == lowered:
                return entry
        return None

    # ------------------------------------------------------------ what the reader asks for
    def read_cim(self, limit: int) -> bytes:
        """The ``.cim`` (at most ``limit`` bytes)."""
        size = self.size(self.path)
        return self.fetch(self.path, 0, min(size, limit)) if size else b""

    def read_object(self, path: str) -> bytes:
        return self.fetch(path, 0, self.size(path)) if self.size(path) else b""

    def open_region(self, name: str, what: str) -> RemoteRegion:
        path = self.find(name)
        if path is None:
            raise CimFormatError(f"{what} is missing", self.url_of(self._beside(name)))
        return RemoteRegion(self, path, what)

    def close(self) -> None:
        self.cache.clear()


class RemoteRegion:
    """One region object read in ranges.  Has no ``fd`` and no ``map``: the
    reader then takes its ``pread`` path for everything."""

    fd = None
    map = None

    def __init__(self, storage: RemoteStorage, path: str, what: str):
        self.storage = storage
        self.path = storage.url_of(path)
        self._object = path
        self.size = storage.size(path)
        self._key = path  # the cache is shared by the image's regions
        self._lock = threading.Lock()
        self._seq_end = -1
        self._read_ahead = 0
        self.disk: DiskBlocks | None = None
        identity = storage.identity(path) if storage.cache_dir else None
        if identity is not None:
            assert storage.cache_dir is not None  # identity() needs one
            try:
                self.disk = DiskBlocks(storage.cache_dir, identity, self.size)
            except OSError as e:
                raise CimError(E_FAIL, f"cannot use the cache directory: {e.strerror}", storage.cache_dir) from None
        if self.size < cim.REGION_HEADER.size:
            raise CimFormatError(f"{what} is truncated ({self.size} bytes)", self.path)
        try:
            self.index, self.region_type = cim.unpack_region_header(self.pread(0, cim.REGION_HEADER.size), what)
        except CimFormatError as e:
            raise CimFormatError(e.strerror, self.path) from None

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
            self.disk = None

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        end = offset + length
        if offset < 0 or end > self.size:
            raise CimFormatError(
                f"read of {length} bytes at {offset} lies outside the object ({self.size} bytes)", self.path
            )
        if length >= DIRECT_READ and self.disk is None:
            self._seq_end = end
            return self.storage.fetch(self._object, offset, end)
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        blocks = self._blocks(first, last, offset, keep=length < DIRECT_READ)
        self._seq_end = end
        start = offset - first * BLOCK_SIZE
        if first == last:
            return blocks[0][start : start + length]
        return b"".join(blocks)[start : start + length]

    def _block_length(self, block: int) -> int:
        return min(BLOCK_SIZE, self.size - block * BLOCK_SIZE)

    def _blocks(self, first: int, last: int, offset: int, keep: bool) -> list[bytes]:
        cache, key = self.storage.cache, self._key
        found: dict[int, bytes] = {}
        missing = []
        for b in range(first, last + 1):
            data = cache.get((key, b))
            if data is None and self.disk is not None:
                data = self.disk.get(b, self._block_length(b))
                if data is not None and keep:
                    cache.put((key, b), data)
            if data is None:
                missing.append(b)
            else:
                found[b] = data
        if missing:
            # Read-ahead doubles while reads follow each other, and stops at a jump.
            if self._seq_end >= 0 and self._seq_end <= offset <= self._seq_end + BLOCK_SIZE:
                self._read_ahead = min(MAX_READ_AHEAD, max(BLOCK_SIZE, self._read_ahead * 2))
            else:
                self._read_ahead = 0
            last_block = (self.size - 1) // BLOCK_SIZE
            wanted = list(missing)
            for b in range(missing[-1] + 1, min(last_block, missing[-1] + self._read_ahead // BLOCK_SIZE) + 1):
                if cache.get((key, b)) is not None or (self.disk is not None and b in self.disk.held):
                    break  # read ahead only up to what is here already
                wanted.append(b)
            for lo, hi in _runs(wanted):
                raw = self.storage.fetch(self._object, lo * BLOCK_SIZE, min(self.size, (hi + 1) * BLOCK_SIZE))
                for b in range(lo, hi + 1):
                    data = raw[(b - lo) * BLOCK_SIZE : (b - lo + 1) * BLOCK_SIZE]
                    if self.disk is not None:
                        self.disk.put(b, data)
                    if keep or b > last:
                        cache.put((key, b), data)
                    if first <= b <= last:
                        found[b] = data
        return [found[b] for b in range(first, last + 1)]


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted block numbers as (first, last) runs, merging runs separated by small gaps."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b - runs[-1][1] <= _MERGE_GAP + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return [(lo, hi) for lo, hi in runs]
