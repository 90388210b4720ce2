"""Reading a stream's bytes: :class:`CimFile` (a seekable file object over one
stream) and :class:`StreamReading`, the :class:`cimfs.reader.Image` methods
that read stream data -- whole, at an offset, into a buffer, copied to a
descriptor (``copy_file_range`` where it can), through a PE image's
mappings -- each checking that the stream lies wholly inside its region file.
"""

from __future__ import annotations

import bisect
import errno
import io
import os
from typing import TYPE_CHECKING

from .errors import E_OUTOFMEMORY, CimError
from .layout import cim
from .regionfile import _physical_memory, _Region

if TYPE_CHECKING:
    from collections.abc import Callable

    from _typeshed import WriteableBuffer

    from .errors import CimFormatError

#: The largest single read (``read_bytes``, ``read()``, ``read_at``) the
#: reader attempts: the machine's physical memory.  Larger streams (sparse
#: ones may claim up to 2^48 bytes) are read in pieces; a larger read gives
#: ``CimError(E_OUTOFMEMORY)`` instead of a MemoryError or the OOM killer.
MAX_READ_SIZE = _physical_memory()

#: Bytes per copy_file_range / read-write step of :meth:`Image.copy_stream`.
COPY_CHUNK = 8 << 20
_HAVE_COPY_FILE_RANGE = hasattr(os, "copy_file_range")
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)
#: copy_file_range refusals that mean "not between these files": copy by hand.
_COPY_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.ETXTBSY}


class StreamReading:
    """The stream-data methods of :class:`cimfs.reader.Image` (mixed into it:
    they use its ``_locate``, ``_view``, ``_data``, ``_fail`` and
    ``stream_descriptor``)."""

    if TYPE_CHECKING:  # what Image provides (for the type checker only)
        path: str
        _copy_file_range: bool

        def _fail(self, reason: str) -> CimFormatError: ...
        def _locate(self, ro: int, length: int, what: str) -> tuple[_Region, int]: ...
        def _view(self, ro: int, length: int, what: str) -> memoryview: ...
        def _data(self, ro: int, length: int, what: str) -> bytes: ...
        def stream_descriptor(self, path: str | int, stream: str | None = None) -> cim.Stream: ...

    def open(self, path: str | int, stream: str | None = None) -> CimFile:
        desc = self.stream_descriptor(path, stream)
        return CimFile(self, desc, str(path))

    def read_bytes(self, path: str | int, stream: str | None = None) -> bytes:
        with self.open(path, stream) as f:
            return f.read()

    def read_at(self, path: str | int | cim.Stream, offset: int, size: int, stream: str | None = None) -> bytes:
        desc = path if isinstance(path, cim.Stream) else self.stream_descriptor(path, stream)
        return self._read_stream(desc, offset, size)

    def readinto_at(
        self,
        path: str | int | cim.Stream,
        offset: int,
        buffer: WriteableBuffer,
        stream: str | None = None,
        *,
        nowait: bool = False,
    ) -> int:
        """Fill ``buffer`` (a writable bytes-like object) from the stream at
        ``offset``; returns the count, short only at the end of the stream.

        With ``nowait`` a plain data stream is read only as far as the page
        cache holds it (``RWF_NOWAIT``): the count may then be short, and 0
        means "would wait for the disk" (callers then read in a thread).
        """
        desc = path if isinstance(path, cim.Stream) else self.stream_descriptor(path, stream)
        view = memoryview(buffer).cast("B")
        length = desc.length
        if offset >= length or not len(view):
            return 0
        n = min(len(view), length - offset)
        if desc.sparse:
            view[:n] = bytes(n)
            return n
        if desc.type != cim.STREAM_TYPE_DATA:
            data = self._read_stream(desc, offset, n)
            view[: len(data)] = data
            return len(data)
        region, off = self._check_stream(desc)
        if region.fd is None:  # a remote region: no page cache to ask, no descriptor to read into
            if nowait:
                return 0
            data = self._data(desc.offset + offset, n, "stream data")
            view[:n] = data
            return n
        if nowait:
            if _RWF_NOWAIT is None:
                return 0
            try:
                return os.preadv(region.fd, [view[:n]], off + offset, _RWF_NOWAIT)
            except BlockingIOError:
                return 0
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    return 0
                raise self._fail(f"stream data: cannot read {region.path}: {e.strerror}") from None
        done = 0
        while done < n:
            try:
                k = os.preadv(region.fd, [view[done:n]], off + offset + done)
            except OSError as e:
                raise self._fail(f"stream data: cannot read {region.path}: {e.strerror}") from None
            if not k:
                raise self._fail(f"region file ended at {off + offset + done} (was it truncated?)")
            done += k
        return done

    def copy_stream(
        self,
        path: str | int | cim.Stream,
        fd: int,
        stream: str | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> int:
        """Write the whole stream to the file descriptor ``fd`` at its current
        position; returns the number of bytes written.

        Plain data streams go region file -> ``fd`` with ``copy_file_range``
        (no copy through Python, reflinks where the filesystem has them);
        sparse and PE-image streams, and file systems that refuse the call,
        take the ``read``/``write`` path.  ``progress(n)`` is called as bytes land.
        """
        desc = path if isinstance(path, cim.Stream) else self.stream_descriptor(path, stream)
        length = desc.length
        if not length:
            return 0
        done = 0
        if desc.type == cim.STREAM_TYPE_DATA and not desc.sparse and self._copy_file_range:
            region, off = self._check_stream(desc)
            while done < length:
                try:
                    n = os.copy_file_range(region.fd, fd, min(COPY_CHUNK, length - done), off + done)
                except OSError as e:
                    if e.errno not in _COPY_FALLBACK_ERRNOS or done:
                        raise
                    break  # not between these two files: read and write below
                if n <= 0:
                    raise self._fail(f"region file ended at {off + done} (was it truncated?)")
                done += n
                if progress:
                    progress(n)
            else:
                return done
        while done < length:
            buf = self._read_stream(desc, done, min(COPY_CHUNK, length - done))
            view = memoryview(buf)
            while view:
                k = os.write(fd, view)
                view = view[k:]
            done += len(buf)
            if progress:
                progress(len(buf))
        return done

    def data_location(self, desc: cim.Stream) -> tuple[str, int, int] | None:
        """Where a plain data stream's bytes lie: (region file path, byte
        offset, region file size), checked to lie inside the file; None for
        empty, sparse and PE-image streams (they have no one place), and for
        a remote image's streams (no local file)."""
        if desc.sparse or not desc.length or desc.type != cim.STREAM_TYPE_DATA:
            return None
        region, off = self._check_stream(desc)
        if region.fd is None:
            return None
        return region.path, off, region.size

    def _pe_image(self, desc: cim.Stream) -> cim.PeImage:
        what = "PE image object"
        head = self._view(desc.offset, cim.PE_IMAGE.size, what)
        count = cim.U16.unpack_from(head, 20)[0]
        return cim.unpack_pe_image(self._view(desc.offset, cim.pe_image_object_size(count), what), what)

    def _read_stream(self, desc: cim.Stream, pos: int, size: int) -> bytes:
        length = desc.length
        if pos >= length or size <= 0:
            return b""
        end = min(length, pos + size)
        if end - pos > MAX_READ_SIZE:
            # A sparse length may be near 2^48 in a tiny image: one read of it
            # all would fail (or be killed) allocating, not report it.
            raise CimError(
                E_OUTOFMEMORY,
                f"a read of {end - pos} bytes is larger than memory "
                f"({MAX_READ_SIZE} bytes): read the stream in pieces (open(), read_at, copy_stream)",
                self.path,
            )
        if desc.sparse:
            try:
                return bytes(end - pos)
            except MemoryError:
                raise CimError(
                    E_OUTOFMEMORY, f"no memory for a read of {end - pos} bytes: read the stream in pieces", self.path
                ) from None
        if desc.type == cim.STREAM_TYPE_DATA:
            self._check_stream(desc)
            return self._data(desc.offset + pos, end - pos, "stream data")
        if desc.type == cim.STREAM_TYPE_PE_IMAGE:
            return self._read_pe(desc, pos, end)
        raise self._fail(f"stream of type {desc.type} cannot be read as data")

    def _check_stream(self, desc: cim.Stream) -> tuple[_Region, int]:
        # The whole stream must lie inside its region, so a reader never returns
        # a short read in the middle of a file.
        return self._locate(desc.offset, desc.length, "stream data")

    def _read_pe(self, desc: cim.Stream, pos: int, end: int) -> bytes:
        pe = self._pe_image(desc)
        maps = pe.mappings
        starts = [m[0] for m in maps]
        out = []
        while pos < end:
            i = bisect.bisect_right(starts, pos) - 1
            delta = maps[i][1] if i >= 0 else 0
            seg_end = min(maps[i + 1][0] if i + 1 < len(maps) else end, end)
            if seg_end <= pos:
                raise self._fail("PE image mappings do not cover the stream")
            src = pe.data_offset + pos + delta
            if src < pe.data_offset:
                raise self._fail("PE image mapping points before its data")
            out.append(self._data(src, seg_end - pos, "PE image data"))
            pos = seg_end
        return b"".join(out)


class CimFile(io.RawIOBase):
    """A read-only, seekable view of one stream of an image."""

    def __init__(self, image: StreamReading, desc: cim.Stream, name: str):
        super().__init__()
        self._image = image
        self._desc = desc
        self.name = name
        self._pos = 0
        if desc.length and not desc.sparse:
            if desc.type == cim.STREAM_TYPE_DATA:
                image._check_stream(desc)
            elif desc.type == cim.STREAM_TYPE_PE_IMAGE:
                image._pe_image(desc)
            else:
                raise image._fail(f"{name}: stream type {desc.type} is not data")

    @property
    def size(self) -> int:
        return self._desc.length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._desc.length + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def read(self, size: int = -1) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if size is None or size < 0:
            size = max(0, self._desc.length - self._pos)
        data = self._image._read_stream(self._desc, self._pos, size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b: WriteableBuffer) -> int:
        mv = memoryview(b).cast("B")
        data = self.read(len(mv))
        n = len(data)
        mv[:n] = data
        return n
