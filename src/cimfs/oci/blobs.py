"""Content-addressed blobs: digests, media types, and streams that check what
they read (blob digest and size, then the uncompressed layer's diff ID) as the
layer is imported, with no temporary copy.
"""

from __future__ import annotations

import hashlib
import io
import queue
import re
import threading
import zlib

from ..errors import E_INVALIDARG, CimError

CHUNK = 1 << 20

# ---------------------------------------------------------------- media types
OCI_LAYOUT_FILE = "oci-layout"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)

OCI_LAYER = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}

# media type -> (compression, foreign/non-distributable)
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": ("none", False),
    "application/vnd.oci.image.layer.v1.tar+gzip": ("gzip", False),
    "application/vnd.oci.image.layer.v1.tar+zstd": ("zstd", False),
    "application/vnd.oci.image.layer.nondistributable.v1.tar": ("none", True),
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": ("gzip", True),
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": ("zstd", True),
    "application/vnd.docker.image.rootfs.diff.tar": ("none", False),
    "application/vnd.docker.image.rootfs.diff.tar.gzip": ("gzip", False),
    "application/vnd.docker.image.rootfs.diff.tar.zstd": ("zstd", False),
    "application/vnd.docker.image.rootfs.foreign.diff.tar": ("none", True),
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": ("gzip", True),
}

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _RawReader(io.RawIOBase):
    """Any object with ``read(n)`` as a raw stream, so that a BufferedReader
    can peek at it; closing it closes the object only if asked to."""

    def __init__(self, f, close_source: bool):
        self.f = f
        self.close_source = close_source

    def readable(self):
        return True

    def readinto(self, b):
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self):
        try:
            if self.close_source and not self.closed:
                self.f.close()
        finally:
            super().close()


def sniff_compression(f, *, close_source: bool) -> tuple[io.BufferedReader[_RawReader], str]:
    """``f`` buffered, and its compression (``gzip``, ``zstd`` or ``none``)
    told by its first bytes; nothing is consumed."""
    reader = io.BufferedReader(_RawReader(f, close_source), CHUNK)
    return reader, compression_of(reader.peek(4)[:4])


def compression_of(head: bytes) -> str:
    """``gzip``, ``zstd`` or ``none``, from a stream's first four bytes."""
    return "gzip" if head.startswith(GZIP_MAGIC) else "zstd" if head.startswith(ZSTD_MAGIC) else "none"


# ---------------------------------------------------------------- digests
_DIGEST = re.compile(r"(sha256|sha512):([0-9a-f]+)")
_HEX_LEN = {"sha256": 64, "sha512": 128}


def parse_digest(digest, what: str = "digest") -> tuple[str, str]:
    """``"sha256:<hex>"`` -> (algorithm, hex); anything else is a CimError."""
    m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if not m or len(m.group(2)) != _HEX_LEN[m.group(1)]:
        raise CimError(E_INVALIDARG, f"{what} {digest!r} is not a sha256/sha512 digest")
    return m.group(1), m.group(2)


def digest_bytes(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI chain IDs: ChainID(L0) = DiffID(L0), ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else digest_bytes(f"{out[-1]} {d}".encode("ascii")))
    return out


# ---------------------------------------------------------------- reading streams
class DigestReader:
    """Reads ``raw`` while hashing and counting; ``verify()`` reads to the end
    and checks the size (when known) and the digest.  Reading past a known
    size is an error at once (a blob never grows an import)."""

    def __init__(self, raw, digest: str, size: int | None, label: str, progress=None):
        self.raw = raw
        self.algorithm, self.hex = parse_digest(digest, f"{label}: digest")
        self.digest = digest
        self.h = hashlib.new(self.algorithm)
        self.size = size
        self.count = 0
        self.label = label
        self.progress = progress
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        if self.eof:
            return b""
        b = self.raw.read(CHUNK if n is None or n < 0 else n)
        if not b:
            self.eof = True
            if self.size is not None and self.count < self.size:
                raise CimError(E_INVALIDARG, f"truncated blob: {self.count} of {self.size} bytes", self.label)
            return b""
        self.count += len(b)
        if self.size is not None and self.count > self.size:
            raise CimError(E_INVALIDARG, f"blob is longer than the {self.size} bytes its descriptor says", self.label)
        self.h.update(b)
        if self.progress is not None:
            self.progress(len(b))
        return b

    def verify(self) -> None:
        while self.read(CHUNK):
            pass
        got = self.h.hexdigest()
        if got != self.hex:
            raise CimError(
                E_INVALIDARG, f"digest mismatch: expected {self.digest}, read {self.algorithm}:{got}", self.label
            )


class _GzipReader:
    """gzip (any number of members) decompressed as a stream.

    Input is decompressed a chunk at a time into an output buffer that small
    reads are served from (asking zlib for a few KiB at a time would copy the
    rest of the input chunk on every call)."""

    def __init__(self, raw, label: str):
        self.raw, self.label = raw, label
        self.d = zlib.decompressobj(31)
        self.pending = b""
        self.out = memoryview(b"")
        self.done = False
        self.started = False

    def read(self, n: int = -1) -> bytes:
        n = CHUNK if n is None or n < 0 else n
        if not self.out:
            try:
                self.out = memoryview(self._produce())
            except zlib.error as e:
                raise CimError(E_INVALIDARG, f"damaged gzip stream ({e})", self.label) from None
        if n >= len(self.out):
            b, self.out = bytes(self.out), memoryview(b"")
            return b
        b, self.out = bytes(self.out[:n]), self.out[n:]
        return b

    def _produce(self) -> bytes:
        while True:
            if self.pending:
                out = self.d.decompress(self.pending, 4 * CHUNK)
                self.pending = self.d.unconsumed_tail
                if self.d.eof:
                    rest = self.d.unused_data + self.pending
                    self.d = zlib.decompressobj(31)
                    self.pending = rest
                    self.started = bool(rest)
                if out:
                    return out
                continue
            if self.done:
                return b""
            chunk = self.raw.read(CHUNK)
            if not chunk:
                self.done = True
                if self.started:
                    raise CimError(E_INVALIDARG, "truncated gzip stream", self.label)
                return b""
            self.started = True
            self.pending = chunk


class _ZstdStream:
    def __init__(self, raw, label: str):
        try:
            import zstandard  # optional dependency (cimfs[oci])
        except ImportError:
            raise CimError(
                E_INVALIDARG, "a zstd layer needs the 'zstandard' package (pip install cimfs[oci])", label
            ) from None
        self.zstd_error = zstandard.ZstdError
        self.r = zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK, read_across_frames=True)
        self.label = label

    def read(self, n=-1):
        try:
            return self.r.read(CHUNK if n is None or n < 0 else n)
        except self.zstd_error as e:
            raise CimError(E_INVALIDARG, f"damaged zstd stream ({e})", self.label) from None


class LayerStream:
    """A layer blob decompressed, with both checks: the blob against its
    digest and size, the tar against its diff ID.  ``finish()`` reads both to
    their ends and raises on any mismatch."""

    def __init__(
        self, raw, compression: str, digest: str | None, size: int | None, diff_id: str, label: str, progress=None
    ):
        self.label = label
        self.blob = DigestReader(raw, digest, size, f"{label} (blob {digest})", progress) if digest else None
        src = self.blob if self.blob is not None else _Counting(raw, progress)
        self.tar: _GzipReader | _ZstdStream | DigestReader | _Counting
        if compression == "gzip":
            self.tar = _GzipReader(src, label)
        elif compression == "zstd":
            self.tar = _ZstdStream(src, label)
        elif compression == "none":
            self.tar = src
        else:
            raise CimError(E_INVALIDARG, f"unknown layer compression {compression!r}", label)
        self.src = src
        self.diff = DigestReader(self.tar, diff_id, None, f"{label} (diff ID {diff_id})")

    @property
    def uncompressed_bytes(self) -> int:
        return self.diff.count

    def read(self, n: int = -1) -> bytes:
        return self.diff.read(n)

    def finish(self) -> None:
        self.diff.verify()
        if self.blob is not None:
            self.blob.verify()
        else:
            while self.src.read(CHUNK):
                pass


class _Counting:
    def __init__(self, raw, progress):
        self.raw, self.progress = raw, progress

    def read(self, n=-1):
        b = self.raw.read(CHUNK if n is None or n < 0 else n)
        if b and self.progress is not None:
            self.progress(len(b))
        return b


class Prefetch:
    """Runs a LayerStream (read, decompress, hash) on a thread ``depth`` chunks
    ahead of its reader: zlib, zstd and hashlib release the GIL, so the
    decompression and digests overlap with the import."""

    _END = object()

    def __init__(self, stream: LayerStream, depth: int = 8, chunk: int = CHUNK):
        self.stream = stream
        self.chunk = chunk  # bigger: fewer turns of the GIL between this thread and the reader's
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.buf = memoryview(b"")
        self.error: BaseException | None = None
        self.ended = False
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, name="cimfs-layer-prefetch", daemon=True)
        self.t.start()

    @property
    def uncompressed_bytes(self) -> int:
        return self.stream.uncompressed_bytes

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while True:
                b = self.stream.read(self.chunk)
                if not b:
                    break
                if not self._put(b):
                    return
            self.stream.finish()
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            self._put(e)

    def _next(self) -> bool:
        if self.ended:
            return False
        item = self.q.get()
        if item is self._END:
            self.ended = True
            return False
        if isinstance(item, BaseException):
            self.ended = True
            self.error = item
            raise item
        self.buf = memoryview(item)
        return True

    def read(self, n: int = -1) -> bytes:
        if self.error is not None:
            raise self.error
        if not self.buf and not self._next():
            return b""
        if n is None or n < 0 or n >= len(self.buf):
            out, self.buf = bytes(self.buf), memoryview(b"")
            return out
        out, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return out

    def finish(self) -> None:
        while self.read(CHUNK):
            pass
        if self.error is not None:
            raise self.error
        self.t.join()

    def close(self) -> None:
        self.stop.set()
        while self.t.is_alive():
            try:
                self.q.get_nowait()
            except queue.Empty:
                pass
            self.t.join(0.05)
