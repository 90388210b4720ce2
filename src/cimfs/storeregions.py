"""Region files being written and the names of what goes in them.

:class:`RegionWriter` appends objects to one region file (aligned, batched
into ``pwritev``, written back early when a final fsync is coming) and
reserves room for contents written piecewise.  Also here: the size limits
that decide which region a content goes to (``SMALL_DATA_MAX``, the soft cap,
a consistent image's lanes), an object's key and digest, the all-zero check
behind holes, and ``write_file`` for whole small files (object ID files).
The store that uses them is :mod:`cimfs.store`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import uuid

from .layout import cim

# [choice] Contents shorter than this go to the small-data region (512-byte
# aligned); longer ones to a data region (4096-byte aligned).  32 KiB keeps the
# alignment padding of a typical source tree near 1 % of its size while large
# files stay page-aligned for mmap and the page cache.
SMALL_DATA_MAX = 32 * 1024
# [choice] A region file is closed and a new one of its type started once it
# passes this size (a single larger object still goes in whole).
REGION_SOFT_CAP = 4 << 30
# [choice] Consistent images (CimCreateImage2's CONSISTENT_CIM): the contents
# of local files added by path go to a fixed number of lanes chosen by their
# size alone (small or large, and one bit of a hash of the size), each lane
# its own sequence of regions, filled in the order the files were added.  A
# data process takes whole lanes (lane % workers), so where a content lands
# depends on the input only, never on how many processes copy it or which
# finishes first; equal contents have equal sizes, so dedup stays exact.
CONSISTENT_LANES = 4


def lane_of(size: int) -> int:
    """The consistent-mode lane of a local file's contents of ``size`` bytes."""
    return (2 if size > SMALL_DATA_MAX else 0) | ((size * 0x9E3779B97F4A7C15) >> 40) & 1


# Appends to metadata/small-data regions are buffered up to this many bytes.
_FLUSH_BYTES = 4 << 20
_PADDING = bytes(max(cim.REGION_ALIGNMENT.values()))
_WRITEBACK_STEP = 8 << 20


@functools.cache  # bound at the first region past _WRITEBACK_STEP, not at import: ctypes is ~1.5 ms of start-up
def writeback_starter():
    """``sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE)``: start writing a
    range back without waiting (Linux; None elsewhere).  Advisory only: the
    fsync at the end is what makes the data durable."""
    try:
        import ctypes  # start-up time: bound at the first use (a fork or a small image never needs it)

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return lambda fd, off, n: fn(fd, off, n, 2)


_IOV_MAX = 1024  # pwritev takes at most this many buffers (Linux UIO_MAXIOV)
ZERO_CHUNK = bytes(1 << 20)
HOLE_MIN = 64 * 1024  # all-zero writes at least this long become holes in the region file


def object_key(length: int, digest: bytes) -> bytes:
    """In-memory key that sorts like object ID entries: by (length, digest)."""
    return length.to_bytes(8, "big") + digest


def digest_of(data) -> bytes:
    """[choice] object digest: the first 24 bytes of SHA-256 (spec §4)."""
    return hashlib.sha256(data).digest()[: cim.DIGEST_SIZE]


def all_zero(data) -> bool:
    # bytes.startswith is a memcmp; comparing a memoryview with bytes unpacks
    # byte by byte (~4 ms per MiB when the first non-zero byte is late).
    view = memoryview(data).cast("B")
    step = len(ZERO_CHUNK)
    return all(ZERO_CHUNK.startswith(view[i : i + step]) for i in range(0, len(view), step))


def write_file(path: str, data: bytes, sync: bool, exclusive: bool = False) -> None:
    fd = write_new_file(path, data, exclusive)
    try:
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: str, data: bytes, exclusive: bool = False) -> int:
    """Write ``data`` to ``path``; returns the open descriptor (for a later fsync), the caller closes it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


# ====================================================================== regions
class RegionWriter:
    """One region file being appended to."""

    def __init__(
        self,
        directory: str,
        set_id: uuid.UUID,
        index: int,
        combined_index: int,
        region_type: int,
        early_writeback: bool = False,
        cap: int = REGION_SOFT_CAP,
    ):
        self.name = cim.RegionSet(set_id, 0).file_name("region", index)
        self.path = os.path.join(directory, self.name)
        self.index = index
        self.combined_index = combined_index
        self.region_type = region_type
        self.alignment = cim.REGION_ALIGNMENT[region_type]
        self.cap = cap  # a lane's region (consistent mode) is closed by the owner's count, not here
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        header = cim.pack_region_header(index, region_type)
        os.pwrite(self.fd, header, 0)
        self.flushed = self.end = len(header)
        # Appended objects wait here and go out in one pwritev: no copy into a buffer.
        self.pending: list[bytes] = []
        # With a final fsync coming, start writing back as we go, so the disk
        # works while the CPU does and the fsync only waits for the tail.
        self._writeback = early_writeback
        self._written_back = 0

    def full(self, size: int) -> bool:
        return self.end > cim.REGION_HEADER.size and self.end + size > self.cap

    def append(self, data) -> int:
        a = self.alignment  # a power of two
        start = (self.end + a - 1) & -a
        pending = self.pending
        if start != self.end:
            pending.append(_PADDING[: start - self.end])
        pending.append(data if type(data) is bytes else bytes(data))  # a caller's buffer may change
        self.end = start + len(data)
        if self.end - self.flushed >= _FLUSH_BYTES or len(pending) >= _IOV_MAX:
            self.flush()
        return start

    def flush(self) -> None:
        pending = self.pending
        if not pending:
            return
        pos = self.flushed
        for i in range(0, len(pending), _IOV_MAX):
            part = pending[i : i + _IOV_MAX]
            size = sum(map(len, part))
            n = os.pwritev(self.fd, part, pos)
            if n < size:  # a short write (a signal, a nearly full disk): write the rest plainly
                self.write_at(memoryview(b"".join(part))[n:], pos + n)
            pos += size
        assert pos == self.end
        self.flushed = pos
        pending.clear()
        if self._writeback and pos - self._written_back >= _WRITEBACK_STEP:
            self._start_writeback(pos)

    def _start_writeback(self, upto: int) -> None:
        start = writeback_starter()
        if start is not None:
            start(self.fd, self._written_back, upto - self._written_back)
        self._written_back = upto

    def reserve(self, size: int) -> int:
        """Room for an object written piecewise with :meth:`write_at`."""
        self.flush()
        start = cim.align(self.end, self.alignment)
        self.flushed = self.end = start + size
        return start

    def write_at(self, data, pos: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, pos)
            view = view[n:]
            pos += n
        if self._writeback and pos - self._written_back >= _WRITEBACK_STEP:
            self._start_writeback(pos)

    def release_tail(self, start: int, previous_end: int) -> None:
        """Give back a reserved object (its content was a duplicate)."""
        self.flushed = self.end = previous_end
        self._written_back = min(self._written_back, previous_end)
        os.ftruncate(self.fd, previous_end)

    def finish(self, sync: bool) -> None:
        fd = self.finish_open()
        try:
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def finish_open(self) -> int:
        """Write out what is pending; returns the region's descriptor, now the
        caller's to fsync (with the set's other files, see fsync_together) and close."""
        self.flush()
        os.ftruncate(self.fd, self.end)
        fd, self.fd = self.fd, -1
        return fd

    def abandon(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
