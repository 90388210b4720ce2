"""Exporting an image as a POSIX (PAX) tar.

Owns :func:`export_tar`: every entry as a tar member with its type, mode,
owner, device and times (to 100 ns in PAX headers), hard links as link
members, and files marked sparse as PAX 1.0 sparse members whose holes are
the all-zero blocks.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import CimError
from .entries import SPARSE_BLOCK, ExtractReport, _local_target, _safe_local_name
from .lx import BLK, CHR, DIR, FIFO, FILE, SYMLINK, posix_info
from .names import format_pax_time
from .scan import CHUNK

if TYPE_CHECKING:
    from ..reader import Image


# --------------------------------------------------------------------- export to a POSIX tar
def _data_map(image, fid: int, size: int) -> list[tuple[int, int]]:
    """The data extents of a stream, treating all-zero 4 KiB blocks as holes."""
    extents = []
    start = None
    with image.open(fid) as f:
        pos = 0
        while pos < size:
            buf = f.read(min(CHUNK, size - pos))
            if not buf:
                break
            for off in range(0, len(buf), SPARSE_BLOCK):
                blk = buf[off : off + SPARSE_BLOCK]
                if blk.count(0) == len(blk):
                    if start is not None:
                        extents.append((start, pos + off - start))
                        start = None
                elif start is None:
                    start = pos + off
            pos += len(buf)
    if start is not None:
        extents.append((start, size - start))
    if not extents or extents[-1][0] + extents[-1][1] != size:
        extents.append((size, 0))  # marks the real size, as GNU tar does
    return extents


class _SparseReader(io.RawIOBase):
    """The PAX 1.0 sparse member body: the map in text, padded, then the data extents."""

    def __init__(self, image, fid, extents, progress):
        super().__init__()
        text = f"{len(extents)}\n" + "".join(f"{o}\n{n}\n" for o, n in extents)
        head = text.encode()
        head += bytes(-len(head) % tarfile.BLOCKSIZE)
        self._parts = [("mem", head)] + [("img", (o, n)) for o, n in extents if n]
        self._image, self._fid, self._progress = image, fid, progress
        self.size = len(head) + sum(n for _, n in extents)
        self._cur = b""

    def readable(self):
        return True

    def read(self, size=-1):
        out = []
        want = size if size >= 0 else 1 << 62
        while want > 0:
            if not self._cur:
                if not self._parts:
                    break
                kind, v = self._parts.pop(0)
                if kind == "mem":
                    self._cur = v
                else:
                    o, n = v
                    if n > CHUNK:
                        self._parts.insert(0, ("img", (o + CHUNK, n - CHUNK)))
                        n = CHUNK
                    self._cur = self._image.read_at(self._fid, o, n)
                    self._progress(n)
            take = self._cur[:want]
            self._cur = self._cur[len(take) :]
            out.append(take)
            want -= len(take)
        return b"".join(out)


class _CountingReader(io.RawIOBase):
    def __init__(self, f, progress):
        super().__init__()
        self._f, self._progress = f, progress

    def readable(self):
        return True

    def read(self, size=-1):
        b = self._f.read(size)
        self._progress(len(b))
        return b


def export_tar(
    image: Image,
    out: tarfile.TarFile,
    *,
    progress: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> ExtractReport:
    """Write the whole image as a POSIX (PAX) tar: every type, mode, owner and time (to 100 ns)."""
    progress = progress or (lambda n: None)
    report = ExtractReport(warn)
    first_link: dict[int, str] = {}
    streams = 0

    def tarinfo(name: str, st) -> tarfile.TarInfo | None:
        nonlocal streams
        info = posix_info(st)
        streams += st.stream_count
        ti = tarfile.TarInfo(name)
        ti.mode = info.mode & 0o7777
        ti.uid, ti.gid = info.uid, info.gid
        ti.uname = ti.gname = ""
        ti.mtime = info.mtime_ns // 1_000_000_000
        ti.pax_headers = {
            "mtime": format_pax_time(info.mtime_ns),
            "atime": format_pax_time(info.atime_ns),
            "ctime": format_pax_time(info.ctime_ns),
        }
        if info.btime_ns != info.mtime_ns:
            # only when it carries information: GNU tar warns about the keyword
            ti.pax_headers["LIBARCHIVE.creationtime"] = format_pax_time(info.btime_ns)
        if info.kind != DIR and st.nlink > 1:
            if st.file_id in first_link:
                ti.type = tarfile.LNKTYPE
                ti.linkname = first_link[st.file_id]
                return ti
            first_link[st.file_id] = name
        if info.kind == DIR:
            ti.type = tarfile.DIRTYPE
        elif info.kind == FILE:
            ti.type = tarfile.REGTYPE
            ti.size = info.size
        elif info.kind == SYMLINK:
            try:
                linkname = _local_target(info.target, name)
            except CimError as e:
                report.problem(str(e).replace("not extracted", "not exported"))
                return None
            ti.type = tarfile.SYMTYPE
            ti.linkname = linkname
            if info.link_has_children and image.scandir(st.file_id):
                report.warning(f"{name}: is a link in the image; the entries below it are not exported")
        elif info.kind == FIFO:
            ti.type = tarfile.FIFOTYPE
        elif info.kind in (CHR, BLK):
            ti.type = tarfile.CHRTYPE if info.kind == CHR else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = info.rdev
        else:
            report.warning(f"{name}: sockets cannot be stored in a tar; skipped")
            return None
        return ti

    def add(name: str, st) -> None:
        ti = tarinfo(name, st)
        if ti is None:
            return
        if ti.type == tarfile.REGTYPE and ti.size:
            if st.is_sparse or st.attributes & 0x200:
                # Stored sparse: nothing is stored, all of it is a hole (a
                # length near 2^48 must cost nothing); marked sparse: the
                # zero blocks of what is stored.
                extents = [(ti.size, 0)] if st.is_sparse else _data_map(image, st.file_id, ti.size)
                body = _SparseReader(image, st.file_id, extents, progress)
                real = ti.name
                ti.pax_headers = {
                    **ti.pax_headers,
                    "GNU.sparse.major": "1",
                    "GNU.sparse.minor": "0",
                    "GNU.sparse.name": real,
                    "GNU.sparse.realsize": str(ti.size),
                }
                head, _, tail = real.rpartition("/")
                ti.name = f"{head + '/' if head else ''}GNUSparseFile.0/{tail}"
                ti.size = body.size
                out.addfile(ti, body)
            else:
                with image.open(st.file_id) as f:
                    out.addfile(ti, _CountingReader(f, progress))
        else:
            out.addfile(ti)

    root = image.stat(image.root_id)
    add(".", root)
    stack = [(image.root_id, "")]
    seen = {image.root_id}
    while stack:
        did, prefix = stack.pop()
        subdirs = []
        for e in image.scandir(did):
            local = _safe_local_name(e.name)
            rel = prefix + e.name
            if local is None:
                report.problem(f"{rel}: unsafe name, not exported")
                continue
            st = image.stat(e.file_id)
            name = prefix + local
            add(name, st)
            if st.is_dir and posix_info(st).kind == DIR:
                if e.file_id in seen:
                    report.problem(f"{name}: directory loop in the image, not followed")
                    continue
                seen.add(e.file_id)
                subdirs.append((e.file_id, name + "/"))
        stack.extend(reversed(subdirs))
    if streams:
        report.warning(f"{streams} alternate data stream(s) not exported (POSIX has none)")
    return report
