"""Tar archives as the source of an import: opening one (any compression
tarfile reads, a stream spooled), its members checked for truncation, and
scanned into a :class:`~cimfs.posix.scan.Tree` (PAX times, links, kinds).

Split from :mod:`.scan` so that a directory import (``cimfs fork --add DIR``)
does not load tarfile (start-up time, tests/test_startup.py).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable
from typing import IO, TypeVar, cast

from ..errors import (
    E_INVALIDARG,
    ERROR_FILE_NOT_FOUND,
    ERROR_INVALID_NAME,
    CimError,
)
from ..tarbounds import BoundedTarInfo
from .lx import BLK, CHR, DIR, FIFO, FILE, FMT_OF_KIND, SYMLINK
from .names import parse_pax_time
from .scan import CHUNK, Node, Tree, _Group, _oserror


class OpenTar(tarfile.TarFile):
    """A tar opened by :func:`open_tar`; one read from a stream keeps its spooled bytes in ``spool``."""

    spool: IO[bytes]  # set only when the tar came from a stream (path "-")


def open_tar(path: str, stdin: IO[bytes] | None = None) -> OpenTar:
    """Open a tar (any compression tarfile reads); ``-`` spools stdin to a temporary file."""
    try:
        if path == "-":
            import tempfile  # start-up time: only a tar read from a stream spools

            spool = tempfile.TemporaryFile()
            src = stdin if stdin is not None else __import__("sys").stdin.buffer
            while True:
                buf = src.read(CHUNK)
                if not buf:
                    break
                spool.write(buf)
            spool.seek(0)
            tf = OpenTar.open(fileobj=spool, mode="r:*", tarinfo=BoundedTarInfo)
            tf.spool = spool  # the raw bytes, for a second reader
            return tf
        return OpenTar.open(path, mode="r:*", tarinfo=BoundedTarInfo)
    except (tarfile.TarError, EOFError, ValueError) as e:
        raise CimError(E_INVALIDARG, f"not a readable tar archive ({_tar_reason(e)})", path) from None
    except OSError as e:
        raise _oserror(e, path) from None


def _tar_reason(e: BaseException) -> str:
    """tarfile's reason in one line (``r:*`` lists every method it tried)."""
    text = str(e)
    tried = re.findall(r"- method (\w+): \w+\((['\"])(.*?)\2\)", text)
    if tried:
        # The decompressor that recognised its format has the real reason;
        # the others only say the bytes are not theirs.
        past_magic = [why for method, _, why in tried if method != "tar" and not re.match(r"not an? \w+ file", why)]
        plain = [why for method, _, why in tried if method == "tar"]
        text = (past_magic or plain or [text])[0]
    return " ".join(text.split()) or type(e).__name__


def _tar_parts(name: str, where: str) -> list[str]:
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            raise CimError(ERROR_INVALID_NAME, "member name contains '..'", where)
        parts.append(p)
    return parts


_Default = TypeVar("_Default", int, None)


def _tar_time(m: tarfile.TarInfo, key: str, default: _Default) -> int | _Default:
    v = m.pax_headers.get(key)
    if v is not None:
        try:
            return parse_pax_time(v)
        except ValueError:
            pass
    return default


TAR_READ_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)


def members(tf: tarfile.TarFile, label: str) -> list[tarfile.TarInfo]:
    """Every member header, and a check that the archive is not truncated."""
    try:
        ms = tf.getmembers()
        # A truncated archive ends before the end-of-archive marker: the data of
        # the last member (or its header) runs past the end of the file.
        f = tf.fileobj
        f.seek(tf.offset)
        marker = f.read(tarfile.BLOCKSIZE)
        if len(marker) < tarfile.BLOCKSIZE or marker.count(0) != tarfile.BLOCKSIZE:
            what = f"data of {ms[-1].name!r} or " if ms else ""
            raise CimError(E_INVALIDARG, f"truncated tar: {what}the end-of-archive marker is missing", label)
        return ms
    except CimError:
        raise
    except TAR_READ_ERRORS as e:
        raise CimError(E_INVALIDARG, f"malformed or truncated tar ({_tar_reason(e)})", label) from None


def scan_tar(tf: tarfile.TarFile, tree: Tree, label: str = "-") -> Tree:
    for m in members(tf, label):
        where = f"{label}:{m.name}"
        parts = _tar_parts(m.name, where)
        mtime = _tar_time(m, "mtime", int(m.mtime) * 1_000_000_000)
        node = Node(
            name="",
            src=m.name.rstrip("/") or ".",
            kind=FILE,
            mode=m.mode & 0o7777,
            uid=m.uid,
            gid=m.gid,
            mtime_ns=mtime,
            atime_ns=_tar_time(m, "atime", mtime),
            ctime_ns=_tar_time(m, "ctime", mtime),
            btime_ns=_tar_time(m, "LIBARCHIVE.creationtime", None),
            order=m.offset_data,
        )
        if m.islnk():
            tparts = _tar_parts(m.linkname, where)
            key = "/".join(tparts)
            if key not in tree.by_src:
                raise CimError(
                    ERROR_FILE_NOT_FOUND, f"hard link to {m.linkname!r}, which is not earlier in the archive", where
                )
            target = tree.by_src[key]
            if target is None:  # the target was skipped: this name gets its own copy
                raise CimError(ERROR_FILE_NOT_FOUND, f"hard link to skipped {m.linkname!r}", where)
            if target.kind == DIR:
                raise CimError(E_INVALIDARG, "hard link to a directory", where)
            for f in (
                "kind",
                "mode",
                "uid",
                "gid",
                "atime_ns",
                "mtime_ns",
                "ctime_ns",
                "btime_ns",
                "size",
                "target",
                "rdev",
                "sparse",
                "opener",
                "order",
            ):
                setattr(node, f, getattr(target, f))
            if target.group is None:
                target.group = _Group()
            node.group = target.group
            tree.add(parts, node)
            continue
        if m.isdir():
            node.kind = DIR
        elif m.isreg():
            node.kind = FILE
            node.size = m.size
            node.sparse = m.sparse is not None
            node.opener = cast("Callable[[], IO[bytes]]", lambda m=m: tf.extractfile(m))  # a regular member: never None
        elif m.issym():
            if "\0" in m.linkname:  # a PAX linkpath may carry one; no POSIX path does
                raise CimError(E_INVALIDARG, "symlink target contains a NUL character", where)
            node.kind = SYMLINK
            node.target = m.linkname
        elif m.ischr() or m.isblk():
            node.kind = CHR if m.ischr() else BLK
            node.rdev = (m.devmajor, m.devminor)
        elif m.isfifo():
            node.kind = FIFO
        else:
            raise CimError(E_INVALIDARG, f"unsupported tar member type {m.type!r}", where)
        node.mode |= FMT_OF_KIND[node.kind]
        if not parts:
            if node.kind == DIR:
                tree.add([], node)
                continue
            raise CimError(ERROR_INVALID_NAME, "member has an empty name", where)
        tree.add(parts, node)
    return tree
