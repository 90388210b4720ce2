"""POSIX trees and tars <-> CimFS images, with WSL's conventions (spec §18).

A CIM has no Unix mode, owner or special files; WSL stores them as EAs
(``$LXUID``, ``$LXGID``, ``$LXMOD``, ``$LXDEV``) and reparse points (LX symlink,
FIFO, character/block device, socket).  This module maps a POSIX tree (a
directory or a tar) onto those conventions when importing, and back when
extracting or exporting.  It is a client of the public library API only.

Conventions this module chooses (documented in docs/CLI.md):

* times: last write = mtime, change = ctime, last access = atime, creation =
  the tar's ``LIBARCHIVE.creationtime`` if any, else mtime; 100 ns precision.
* names: characters a CIM name cannot hold (``\\ : * ? " < > |`` and 1-31) are
  stored as U+F000 + the character, as WSL does; extraction maps them back.
* a file with holes is stored with the SPARSE_FILE attribute; extraction and
  export keep SPARSE_FILE files sparse (zero runs become holes).
* extraction never follows a link while creating anything: every directory is
  opened relative to its parent with O_NOFOLLOW, every file created with
  O_EXCL|O_NOFOLLOW, and the children of an entry that is a link in the image
  (an LX or NT symlink or a mount point that is also a directory) are skipped.
"""

from __future__ import annotations

import errno
import functools
import io
import operator
import os
import re
import stat as S
import tarfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

import cimfs

from .bulk import paused_gc, widen_pipe
from .layout import cim, ntfs
from .names import fold_name
from .errors import (
    E_INVALIDARG,
    ERROR_FILE_EXISTS,
    ERROR_FILE_NOT_FOUND,
    ERROR_INVALID_NAME,
    ERROR_PATH_NOT_FOUND,
    CimError,
)

CHUNK = 1 << 20
SPARSE_BLOCK = 4096

# --------------------------------------------------------------------- times
FILETIME_UNIX_EPOCH = 116444736000000000


def ns_to_filetime(ns: int) -> int:
    """POSIX nanoseconds -> FILETIME ticks (truncated to 100 ns)."""
    return ns // 100 + FILETIME_UNIX_EPOCH


def filetime_to_ns(ft: int) -> int:
    return (ft - FILETIME_UNIX_EPOCH) * 100


def parse_pax_time(text: str) -> int:
    """A PAX time (``[-]sec[.frac]``) as integer nanoseconds, exactly."""
    t = text.strip()
    neg = t.startswith("-")
    if neg or t.startswith("+"):
        t = t[1:]
    sec, _, frac = t.partition(".")
    if not sec.isdigit() or (frac and not frac.isdigit()):
        raise ValueError(f"bad PAX time {text!r}")
    ns = int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])
    return -ns if neg else ns


def format_pax_time(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    a = abs(ns)
    return f"{sign}{a // 1_000_000_000}.{a % 1_000_000_000:09d}"


# --------------------------------------------------------------------- names
_ESCAPED = '\\:*?"<>|' + "".join(chr(c) for c in range(1, 32))
_TO_IMAGE = {ord(c): 0xF000 + ord(c) for c in _ESCAPED}
_FROM_IMAGE = {v: k for k, v in _TO_IMAGE.items()}


_NEEDS_ESCAPE = re.compile("[" + re.escape(_ESCAPED) + "]")


def name_to_image(name: str) -> str:
    """A POSIX file name as stored in an image (WSL private-use escaping)."""
    return name.translate(_TO_IMAGE) if _NEEDS_ESCAPE.search(name) else name


def name_from_image(name: str) -> str:
    return name if name.isascii() else name.translate(_FROM_IMAGE)  # the escapes are all U+F0xx


def check_image_name(name: str, where: str) -> None:
    if name in ("", ".", ".."):
        raise CimError(ERROR_INVALID_NAME, f"invalid name {name!r}", where)
    if len(name) <= 255 and name.isascii():
        return  # the common case: short enough in any encoding
    try:
        units = len(name.encode("utf-16-le")) // 2
    except UnicodeEncodeError:
        raise CimError(ERROR_INVALID_NAME, "name is not valid UTF-8", where) from None
    if units > 255:
        raise CimError(ERROR_INVALID_NAME, "name is longer than 255 UTF-16 units", where)


fold = fold_name  # case-insensitive key, through the upcase table new images carry (spec §7)


# --------------------------------------------------------------------- kinds
DIR, FILE, SYMLINK, FIFO, CHR, BLK, SOCK = "dir", "file", "symlink", "fifo", "chr", "blk", "sock"
_KIND_OF_FMT = {S.S_IFDIR: DIR, S.S_IFREG: FILE, S.S_IFLNK: SYMLINK, S.S_IFIFO: FIFO,
                S.S_IFCHR: CHR, S.S_IFBLK: BLK, S.S_IFSOCK: SOCK}
FMT_OF_KIND = {v: k for k, v in _KIND_OF_FMT.items()}


# Reparse tags of spec §18/§19 (fixed numbers; the blobs are packed by cimfs.layout.ntfs).
TAG_MOUNT_POINT = 0xA0000003
TAG_SYMLINK = 0xA000000C
TAG_LX_SYMLINK = 0xA000001D
TAG_AF_UNIX = 0x80000023
TAG_LX_FIFO = 0x80000024
TAG_LX_CHR = 0x80000025
TAG_LX_BLK = 0x80000026
SPECIAL_TAGS = {FIFO: TAG_LX_FIFO, CHR: TAG_LX_CHR, BLK: TAG_LX_BLK, SOCK: TAG_AF_UNIX}
_KIND_OF_TAG = {v: k for k, v in SPECIAL_TAGS.items()}


# --------------------------------------------------------------------- source tree
class _Group:
    """Hard links to one file: the first one written carries the data."""
    __slots__ = ("written",)

    def __init__(self):
        self.written: str | None = None


@dataclass(eq=False, slots=True)  # slots: a million-entry tree is held in memory
class Node:
    name: str                      # name in the image ("" for the root)
    src: str                       # where it came from, for messages
    kind: str
    mode: int = 0                  # full st_mode, type bits included
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    btime_ns: int | None = None
    size: int = 0
    target: str | None = None      # symlink target
    rdev: tuple[int, int] = (0, 0)
    sparse: bool = False
    opener: Callable[[], io.RawIOBase] | None = None
    order: int = 0
    parent: "Node | None" = None
    children: dict = field(default_factory=dict)   # fold(name) -> Node
    group: _Group | None = None
    implied: bool = False

    def path(self) -> str:
        parts = []
        n = self
        while n is not None and n.parent is not None:
            parts.append(n.name)
            n = n.parent
        return "/".join(reversed(parts))

    def copy_meta_from(self, other: "Node") -> None:
        for f in ("mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns", "btime_ns"):
            setattr(self, f, getattr(other, f))
        self.implied = False


def _walk_nodes(root: Node) -> Iterable[Node]:
    stack = [root]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.children.values())


def _default_dir(name: str, src: str, like: Node | None = None) -> Node:
    now = time.time_ns() if like is None else like.mtime_ns
    return Node(name=name, src=src, kind=DIR, mode=S.S_IFDIR | 0o755,
                atime_ns=now, mtime_ns=now, ctime_ns=now, implied=True)


def resolve_collision(policy: str, report: Callable[[str], None], name: str, src: str, first: str,
                      taken, dir_path: str) -> str | None:
    """``name`` (from ``src``) folds like ``first``, already in a directory
    whose folded names are ``taken``: fail, skip (None) or the renamed name,
    as --on-collision says.  ``dir_path`` is where the message says it went."""
    if policy == "error":
        raise CimError(ERROR_FILE_EXISTS,
                       f"collides case-insensitively with {first!r} (use --on-collision rename|skip)", src)
    if policy == "skip":
        report(f"skipped {src} (collides case-insensitively with {first})")
        return None
    cand = free_name(name, taken)
    check_image_name(cand, src)
    report(f"renamed {src} to {_join(dir_path, name_from_image(cand))} (collides case-insensitively with {first})")
    return cand


def free_name(name: str, taken) -> str:
    """``stem~N.ext``, the first N >= 2 whose folded form is not in ``taken``:
    how --on-collision rename names the later of two names that differ only in case."""
    stem, dot, ext = name.rpartition(".")
    if not stem:
        stem, dot, ext = name, "", ""
    i = 2
    while True:
        cand = f"{stem}~{i}{dot}{ext}"
        if fold(cand) not in taken:
            return cand
        i += 1


class Tree:
    """A POSIX tree to import, with case-insensitive collision handling."""

    def __init__(self, on_collision: str = "error", report: Callable[[str], None] | None = None):
        if on_collision not in ("error", "rename", "skip"):
            raise CimError(E_INVALIDARG, f"unknown collision policy {on_collision!r}")
        self.on_collision = on_collision
        self.report = report or (lambda msg: None)
        self.root = _default_dir("", "")
        self.by_src: dict[str, Node | None] = {"": self.root}   # None: skipped
        self.groups: dict = {}

    # -- building
    def set_root(self, node: Node) -> None:
        self.root.copy_meta_from(node)

    def _dir(self, src_parts: list[str], like: Node) -> Node | None:
        key = "/".join(src_parts)
        if key in self.by_src:
            d = self.by_src[key]
            if d is not None and d.kind != DIR:
                raise CimError(ERROR_PATH_NOT_FOUND, "is not a directory", d.src)
            return d
        parent = self._dir(src_parts[:-1], like)
        if parent is None:
            self.by_src[key] = None
            return None
        d = self._attach(parent, _default_dir(name_to_image(src_parts[-1]), key, like))
        self.by_src[key] = d
        return d

    def add(self, src_parts: list[str], node: Node, remember: bool = True) -> Node | None:
        """Place ``node`` at the source path; returns it (or the node it merged into), None if skipped.

        ``remember=False``: the node will never be looked up by its source path
        (a directory scan visits each path once), so it is not indexed."""
        key = "/".join(src_parts)
        if not src_parts:
            if node.kind != DIR:
                raise CimError(E_INVALIDARG, "the root must be a directory", node.src or ".")
            self.set_root(node)
            return self.root
        parent = self._dir(src_parts[:-1], node)
        if parent is None:
            self.by_src[key] = None
            self.report(f"skipped {node.src} (its directory was skipped)")
            return None
        node.name = name_to_image(src_parts[-1])
        placed = self._attach(parent, node)
        if remember or placed is None:
            self.by_src[key] = placed
        return placed

    def _attach(self, parent: Node, node: Node) -> Node | None:
        check_image_name(node.name, node.src)
        k = fold(node.name)
        old = parent.children.get(k)
        if old is None:
            node.parent = parent
            parent.children[k] = node
            return node
        if old.name == node.name:
            # The same name again (a tar may repeat a member): the later one wins.
            if old.kind == DIR and node.kind == DIR:
                old.copy_meta_from(node)
                return old
            if old.kind == DIR:
                raise CimError(ERROR_FILE_EXISTS, "would replace a directory with a non-directory", node.src)
            node.parent = parent
            parent.children[k] = node
            return node
        cand = resolve_collision(self.on_collision, self.report, node.name, node.src, old.src,
                                 parent.children, parent.path() if parent.parent is not None else "")
        if cand is None:
            return None
        node.name = cand
        node.parent = parent
        parent.children[fold(cand)] = node
        return node

    # -- queries
    def iter_nodes(self) -> Iterable[Node]:
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(reversed(list(n.children.values())))

    def total_bytes(self) -> int:
        return sum(n.size for n in self.iter_nodes() if n.kind == FILE)


def _node_from_stat(st: os.stat_result, src: str) -> Node:
    kind = _KIND_OF_FMT.get(S.S_IFMT(st.st_mode))
    if kind is None:
        raise CimError(E_INVALIDARG, f"unsupported file type {S.S_IFMT(st.st_mode):#o}", src)
    n = Node(name="", src=src, kind=kind, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
             atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns)
    if kind in (CHR, BLK):
        n.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if kind == FILE:
        n.size = st.st_size
    return n


def _has_holes(path: str, size: int) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < size
    except OSError:
        return False
    finally:
        os.close(fd)


def _open_local(path: str):
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        # leave the source's access time alone when allowed (owner or root)
        fd = os.open(path, flags | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        fd = os.open(path, flags)
    return os.fdopen(fd, "rb", buffering=0)


def _file_opener(path: str):
    return functools.partial(_open_local, path)


def open_node(node: "Node"):
    """The contents of a FILE node: from its opener (tar members), else the
    local file it was scanned from (no per-file closure for a million files)."""
    return node.opener() if node.opener is not None else _open_local(node.src)


_ERRNO_HRESULT = {
    errno.ENOENT: ERROR_FILE_NOT_FOUND,
    errno.ENOTDIR: ERROR_PATH_NOT_FOUND,
    errno.EACCES: 0x80070005,
    errno.EPERM: 0x80070005,
    errno.EEXIST: ERROR_FILE_EXISTS,
}


def _oserror(e: OSError, path: str) -> CimError:
    """An OSError from the local filesystem as the library's error type."""
    return CimError(_ERRNO_HRESULT.get(e.errno, E_INVALIDARG), e.strerror or str(e), path)


def _scan_entry(ent: os.DirEntry, full: str, groups: dict) -> Node:
    """The node of one entry of a local directory listing.  Files with more
    than one link share the ``_Group`` of their inode in ``groups``."""
    try:
        st = ent.stat(follow_symlinks=False)
    except OSError as e:
        raise _oserror(e, full) from None
    return _node_from_entry(ent, st, full, groups)


def _node_from_entry(ent: os.DirEntry, st: os.stat_result, full: str, groups: dict) -> Node:
    node = _node_from_stat(st, full)
    if node.kind == SYMLINK:
        try:
            node.target = os.readlink(full)
        except OSError as e:
            raise _oserror(e, full) from None
    elif node.kind == FILE:
        if st.st_blocks * 512 < st.st_size and _has_holes(full, st.st_size):
            node.sparse = True
    if node.kind != DIR and st.st_nlink > 1:
        node.group = groups.setdefault((st.st_dev, st.st_ino), _Group())
    return node


def _stat_root(src_dir: str) -> Node:
    try:
        st = os.stat(src_dir)
    except OSError as e:
        raise _oserror(e, src_dir) from None
    if not S.S_ISDIR(st.st_mode):
        raise CimError(E_INVALIDARG, "is not a directory", src_dir)
    return _node_from_stat(st, src_dir)


def _sorted_listing(path: "str | int", where: str | None = None) -> list[os.DirEntry]:
    """A directory's entries by name; ``path`` may be an open directory
    descriptor (the entries' stat() then resolve relative to it)."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=_entry_name)
    except OSError as e:
        raise _oserror(e, where or path) from None


_entry_name = operator.attrgetter("name")  # a sort key called once per entry: no Python frame


def scan_directory(src_dir: str, tree: Tree) -> Tree:
    """Add the tree rooted at ``src_dir`` (which itself becomes the root)."""
    tree.add([], _stat_root(src_dir))
    order = 0
    stack: list[tuple[str, list[str]]] = [(src_dir, [])]
    while stack:
        path, parts = stack.pop()
        entries = _sorted_listing(path)
        subdirs = []
        for ent in entries:
            full = os.path.join(path, ent.name)
            node = _scan_entry(ent, full, tree.groups)
            order += 1
            node.order = order
            placed = tree.add(parts + [ent.name], node, remember=node.kind == DIR)
            if placed is not None and node.kind == DIR:
                subdirs.append((full, parts + [ent.name]))
        stack.extend(reversed(subdirs))
    return tree


def scan_single(path: str, tree: Tree) -> Node:
    """A node for one local file, symlink or special file (not a directory)."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise _oserror(e, path) from None
    node = _node_from_stat(st, path)
    if node.kind == SYMLINK:
        node.target = os.readlink(path)
    elif node.kind == FILE:
        node.opener = _file_opener(path)
        node.sparse = st.st_blocks * 512 < st.st_size and _has_holes(path, st.st_size)
    node.name = name_to_image(os.path.basename(os.path.normpath(path)))
    return node


# --------------------------------------------------------------------- tars
def open_tar(path: str, stdin=None):
    """Open a tar (any compression tarfile reads); ``-`` spools stdin to a temporary file."""
    try:
        if path == "-":
            import tempfile
            spool = tempfile.TemporaryFile()
            src = stdin if stdin is not None else __import__("sys").stdin.buffer
            while True:
                buf = src.read(CHUNK)
                if not buf:
                    break
                spool.write(buf)
            spool.seek(0)
            tf = tarfile.open(fileobj=spool, mode="r:*")
            tf.spool = spool      # the raw bytes, for a second reader
            return tf
        return tarfile.open(path, mode="r:*")
    except (tarfile.TarError, EOFError) as e:
        raise CimError(E_INVALIDARG, f"not a readable tar archive ({_tar_reason(e)})", path) from None
    except OSError as e:
        raise _oserror(e, path) from None


def _tar_reason(e: BaseException) -> str:
    """tarfile's reason in one line (``r:*`` lists every method it tried)."""
    text = str(e)
    m = re.search(r"method tar: \w+\((['\"])(.*?)\1\)", text)
    if m:
        text = m.group(2)
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


def _tar_time(m: tarfile.TarInfo, key: str, default: int | None) -> int | None:
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
        node = Node(name="", src=m.name.rstrip("/") or ".", kind=FILE, mode=m.mode & 0o7777,
                    uid=m.uid, gid=m.gid, mtime_ns=mtime,
                    atime_ns=_tar_time(m, "atime", mtime), ctime_ns=_tar_time(m, "ctime", mtime),
                    btime_ns=_tar_time(m, "LIBARCHIVE.creationtime", None), order=m.offset_data)
        if m.islnk():
            tparts = _tar_parts(m.linkname, where)
            key = "/".join(tparts)
            if key not in tree.by_src:
                raise CimError(ERROR_FILE_NOT_FOUND, f"hard link to {m.linkname!r}, which is not earlier in the archive", where)
            target = tree.by_src[key]
            if target is None:      # the target was skipped: this name gets its own copy
                raise CimError(ERROR_FILE_NOT_FOUND, f"hard link to skipped {m.linkname!r}", where)
            if target.kind == DIR:
                raise CimError(E_INVALIDARG, "hard link to a directory", where)
            for f in ("kind", "mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns", "btime_ns",
                      "size", "target", "rdev", "sparse", "opener", "order"):
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
            node.opener = (lambda m=m: tf.extractfile(m))
        elif m.issym():
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


# --------------------------------------------------------------------- metadata mapping
_EA_CACHE: dict[tuple, bytes] = {}


def _lx_ea_buffer(mode: int, uid: int, gid: int, rdev: tuple | None) -> bytes:
    """A tree has few distinct (mode, owner) combinations: pack each EA chain once."""
    key = (mode, uid, gid, rdev)
    ea = _EA_CACHE.get(key)
    if ea is None:
        n = ntfs
        kw = dict(mode=mode, uid=uid, gid=gid)
        if rdev is not None:
            kw.update(rdev_major=rdev[0], rdev_minor=rdev[1])
        ea = _EA_CACHE[key] = n.pack_eas(n.lx_eas(**kw))
    return ea


_FA_DIRECTORY, _FA_SPARSE_FILE, _FA_REPARSE_POINT = 0x10, 0x200, 0x400  # plain ints: IntFlag math is slow per entry
_FLAG_READONLY, _FLAG_SPARSE = cim.FLAG_READONLY, cim.FLAG_SPARSE  # FileRecord.flags


def plain_file_metadata(st: os.stat_result) -> "cimfs.FileMetadata":
    """What :func:`node_metadata` gives a regular, not sparse, file scanned
    with this stat, without building its Node (the bulk of any tree)."""
    mt = st.st_mtime_ns // 100 + FILETIME_UNIX_EPOCH  # ns_to_filetime, inline: once per file of a tree
    ea = _EA_CACHE.get((st.st_mode, st.st_uid, st.st_gid, None)) or _lx_ea_buffer(st.st_mode, st.st_uid, st.st_gid, None)
    return cimfs.FileMetadata(0, st.st_size, mt, mt, st.st_ctime_ns // 100 + FILETIME_UNIX_EPOCH,
                              st.st_atime_ns // 100 + FILETIME_UNIX_EPOCH, b"", b"", ea)


def plain_file_metadata_consistent(st: os.stat_result) -> "cimfs.FileMetadata":
    """:func:`plain_file_metadata` for a consistent image (see :func:`node_metadata`)."""
    mt = st.st_mtime_ns // 100 + FILETIME_UNIX_EPOCH
    ea = _EA_CACHE.get((st.st_mode, st.st_uid, st.st_gid, None)) or _lx_ea_buffer(st.st_mode, st.st_uid, st.st_gid, None)
    return cimfs.FileMetadata(0, st.st_size, mt, mt, mt, mt, b"", b"", ea)


def _writes_consistent(w) -> bool:
    return bool(getattr(w, "consistent", False))


def node_metadata(node: Node, consistent: bool = False) -> "cimfs.FileMetadata":
    """The image metadata of a scanned entry.  ``consistent``: [choice] for
    a consistent image, change time and last access time are the last write
    time: reading a tree moves atimes and ``touch -a``, chmod or a copy move
    ctimes, so neither is the tree's content (mksquashfs keeps mtime alone)."""
    attrs = 0
    reparse = b""
    rdev = tuple(node.rdev) if node.kind in (CHR, BLK) else None
    eas = _lx_ea_buffer(node.mode, node.uid, node.gid, rdev)
    if node.kind == DIR:
        attrs = _FA_DIRECTORY
    elif node.kind == SYMLINK:
        reparse = ntfs.pack_lx_symlink_reparse(node.target)
    elif node.kind in (FIFO, CHR, BLK, SOCK):
        reparse = ntfs.pack_lx_special_reparse(SPECIAL_TAGS[node.kind])
    if reparse:
        attrs |= _FA_REPARSE_POINT
    if node.kind == FILE and node.sparse:
        attrs |= _FA_SPARSE_FILE
    mt = ns_to_filetime(node.mtime_ns)
    return cimfs.FileMetadata(
        attributes=attrs,
        file_size=node.size if node.kind == FILE else 0,
        creation_time=ns_to_filetime(node.btime_ns) if node.btime_ns is not None else mt,
        last_write_time=mt,
        change_time=mt if consistent else ns_to_filetime(node.ctime_ns),
        last_access_time=mt if consistent else ns_to_filetime(node.atime_ns),
        ea_buffer=eas,
        reparse_data=reparse,
    )


_ATTR_MASK = 0x1 | 0x2 | 0x4 | 0x10 | 0x20 | 0x200 | 0x400


def metadata_matches(meta, st) -> bool:
    """Whether an image entry (Stat) already holds exactly this metadata."""
    return ((meta.attributes & _ATTR_MASK) == (st.attributes & _ATTR_MASK)
            and meta.creation_time == st.creation_time
            and meta.last_write_time == st.last_write_time
            and meta.change_time == st.change_time
            and meta.last_access_time == st.last_access_time
            and bytes(meta.ea_buffer) == bytes(st.ea_buffer)
            and bytes(meta.reparse_data) == bytes(st.reparse_data)
            and bytes(meta.security_descriptor) == bytes(st.security_descriptor)
            and (st.is_dir or meta.file_size == st.size))


@dataclass
class PosixInfo:
    kind: str
    mode: int            # full st_mode
    uid: int
    gid: int
    rdev: tuple[int, int]
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    btime_ns: int
    size: int
    target: str | None   # symlink target
    link_has_children: bool = False


def _link_target(n, st) -> str | None:
    """The POSIX symlink target of an LX symlink, NT symlink or mount point."""
    rp = n.parse_reparse(st.reparse_data)
    if st.reparse_tag == TAG_LX_SYMLINK:
        t = rp.target
        return os.fsdecode(t) if isinstance(t, (bytes, bytearray)) else t
    name = rp.print_name or rp.substitute_name or ""
    if name.startswith("\\??\\"):
        name = name[4:]
    return name.replace("\\", "/")


_LX_OF_EAS: dict[bytes, "ntfs.LxMetadata | None"] = {}  # most entries of an image share a few EA buffers


def _lx_of_eas(ea_buffer: bytes):
    lx = _LX_OF_EAS.get(ea_buffer, _LX_OF_EAS)
    if lx is _LX_OF_EAS:
        try:
            lx = ntfs.parse_lx_eas(ntfs.unpack_eas(ea_buffer))
        except (ValueError, CimError):
            lx = None
        if len(_LX_OF_EAS) >= 4096:
            _LX_OF_EAS.clear()
        _LX_OF_EAS[bytes(ea_buffer)] = lx
    return lx


def posix_info(st) -> PosixInfo:
    """How an image entry appears as a POSIX file (type, mode, owner, device, times)."""
    n = ntfs
    lx = _lx_of_eas(st.ea_buffer) if st.ea_buffer else None
    tag = st.reparse_tag if st.reparse_data else 0
    target = None
    kind = DIR if st.is_dir else FILE
    link_tags = (TAG_LX_SYMLINK, TAG_SYMLINK, TAG_MOUNT_POINT)
    if tag in link_tags:
        try:
            target = _link_target(n, st)
            kind = SYMLINK
        except (ValueError, CimError):
            target = None
    elif tag and not st.is_dir:
        kind = _KIND_OF_TAG.get(tag, FILE)
    defaults = {DIR: 0o755, FILE: 0o644, SYMLINK: 0o777}
    perm = defaults.get(kind, 0o644)
    if kind == FILE and st.attributes & 0x1:
        perm = 0o444
    uid = gid = 0
    rdev = (0, 0)
    if lx is not None:
        mode = getattr(lx, "mode", None)
        if mode is not None:
            perm = mode & 0o7777
        uid = getattr(lx, "uid", None) or 0
        gid = getattr(lx, "gid", None) or 0
        if getattr(lx, "rdev_major", None) is not None:
            rdev = (lx.rdev_major, getattr(lx, "rdev_minor", None) or 0)
    return PosixInfo(kind=kind, mode=FMT_OF_KIND[kind] | perm, uid=uid, gid=gid, rdev=rdev,
                     atime_ns=filetime_to_ns(st.last_access_time), mtime_ns=filetime_to_ns(st.last_write_time),
                     ctime_ns=filetime_to_ns(st.change_time), btime_ns=filetime_to_ns(st.creation_time),
                     size=st.size if kind == FILE else 0, target=target,
                     link_has_children=(kind == SYMLINK and st.is_dir))


# --------------------------------------------------------------------- import
def _split(path: str) -> list[str]:
    return [p for p in path.replace("\\", "/").split("/") if p]


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


class Importer:
    """Write a :class:`Tree` into an open image writer.

    ``base`` is a reader on the image the writer starts from (fork or extend),
    or None for a new image.  The tree's root lands at ``at``.  With
    ``delete_extra`` the result mirrors the tree exactly below ``at``;
    otherwise the tree is merged over what is there.  Entries the base already
    holds with the same name, metadata and content are left alone, so a fork
    stores only what changed.
    """

    def __init__(self, writer, root: Node, *, base=None, at: str = "", delete_extra: bool = False,
                 progress: Callable[[int], None] | None = None, hidden: set[str] | None = None):
        self.w = writer
        # folded paths (and everything below them) whose base entry no longer
        # counts: deleted, or written by an earlier import into the same writer
        self.hidden = hidden or set()
        self.root = root
        self.base = base
        self.at = "/".join(_split(at))
        self.delete_extra = delete_extra
        self.progress = progress or (lambda n: None)
        self.deletes: list[str] = []
        self.dirs: list[tuple[str, object, bool]] = []
        self.files: list[tuple[Node, str]] = []
        self.consistent = _writes_consistent(writer)
        if self.consistent and root.kind == DIR and root.implied and root.parent is None:
            # [choice] A tar without an entry for its root: the root is as new
            # as its newest entry, not the time of the import.
            root.atime_ns = root.mtime_ns = root.ctime_ns = max(
                (n.mtime_ns for n in _walk_nodes(root) if not n.implied), default=0)

    def _meta(self, node: Node):
        # Not cached: a FileMetadata per entry would double the memory of a large import.
        return node_metadata(node, self.consistent)

    def _is_hidden(self, path: str) -> bool:
        if not self.hidden:
            return False
        parts = fold(path).split("/")
        return any("/".join(parts[:i]) in self.hidden for i in range(1, len(parts) + 1))

    def _base_entries(self, dir_id: int, path: str) -> dict:
        return {fold(e.name): e for e in self.base.scandir(dir_id)
                if not self._is_hidden(_join(path, e.name))}

    def _base_child(self, dir_id: int | None, path: str, name: str):
        if self.base is None or dir_id is None:
            return None
        return self._base_entries(dir_id, path).get(fold(name))

    def written_keys(self) -> set[str]:
        """Folded paths this import wrote (directories merged into are not included)."""
        keys = {fold(p) for _, p in self.files}
        keys |= {fold(p) for p, _, exists in self.dirs if not exists and p}
        return keys

    def plan(self) -> None:
        parts = _split(self.at)
        base_id = self.base.root_id if self.base is not None else None
        path = ""
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            cpath = _join(path, p)
            child = self._base_child(base_id, path, p)
            if child is not None:
                keep = (child.name == p and (not last or self.root.kind == DIR)
                        and posix_info(self.base.stat(child.file_id)).kind == DIR)
                if not keep:
                    self.deletes.append(_join(path, child.name))
                    child = None
            if child is None and not last:
                # A directory the import needs above its target: now, or in a
                # consistent image the time of what is imported.
                meta = node_metadata(_default_dir(p, cpath, self.root if self.consistent else None), self.consistent)
                self.dirs.append((cpath, meta, False))
            base_id = child.file_id if child is not None else None
            path = cpath
        self._plan_node(self.root, path, base_id)

    def _same_content(self, node: Node, fid: int) -> bool:
        if node.size == 0:
            return True
        with open_node(node) as a, self.base.open(fid) as b:
            left = node.size
            while left:
                x = a.read(min(CHUNK, left))
                if not x or x != b.read(len(x)):
                    return False
                left -= len(x)
        return True

    def _plan_node(self, node: Node, path: str, base_id: int | None) -> None:
        meta = self._meta(node)
        if node.kind != DIR:
            self.files.append((node, path))
            return
        base_children = {}
        if base_id is None:
            self.dirs.append((path, meta, False))
        else:
            bst = self.base.stat(base_id)
            if not metadata_matches(meta, bst):
                self.dirs.append((path, meta, True))
            base_children = self._base_entries(base_id, path)
        for key, child in node.children.items():
            cpath = _join(path, child.name)
            b = base_children.pop(key, None)
            if b is not None:
                bst = self.base.stat(b.file_id)
                keep = (b.name == child.name and posix_info(bst).kind == child.kind
                        and (child.kind == DIR or (child.group is None and bst.nlink == 1
                                                   and bst.stream_count == 0
                                                   and metadata_matches(self._meta(child), bst)
                                                   and self._same_content(child, b.file_id))))
                if not keep:
                    self.deletes.append(_join(path, b.name))
                    b = None
                elif child.kind != DIR:
                    continue
            self._plan_node(child, cpath, b.file_id if b is not None else None)
        if self.delete_extra:
            for b in base_children.values():
                self.deletes.append(_join(path, b.name))

    def bytes_to_write(self) -> int:
        return sum(n.size for n, _ in self.files if n.kind == FILE)

    def execute(self) -> None:
        w = self.w
        for p in self.deletes:
            if w.exists(p):
                w.delete(p)
        for path, meta, exists in self.dirs:
            # exist_ok: an earlier import into the same writer may have made it
            w.mkdir(path, meta, exist_ok=True)
        for node, path in sorted(self.files, key=lambda t: t[0].order):
            write_node(w, node, path, self.progress)

    def run(self) -> None:
        with paused_gc():
            self.plan()
            self.execute()


def write_node(w, node: Node, path: str, progress: Callable[[int], None]) -> None:
    """Write one non-directory node at ``path``: its contents, or a hard link
    to the first name of its link group already written."""
    if node.group is not None and node.group.written is not None:
        w.link(path, node.group.written)
        return
    meta = node_metadata(node, _writes_consistent(w))
    if node.kind == FILE and node.size:
        _copy_node(w, node, path, meta, progress)
    else:
        w.add_file(path, b"", meta)
    if node.group is not None:
        node.group.written = path


class _LocalFile(os.PathLike):
    """A scanned file handed to the writer by path: its data thread opens,
    reads and closes it (cheaper than a pathlib.Path per file)."""
    __slots__ = ("path",)

    def __init__(self, path: str):
        self.path = path

    def __fspath__(self) -> str:
        return self.path


def _copy_node(w, node: Node, path: str, meta, progress: Callable[[int], None]) -> None:
    if node.opener is None:
        w.add_file(path, _LocalFile(node.src), meta)
        progress(node.size)
        return
    try:
        src = open_node(node)
    except OSError as e:
        raise _oserror(e, node.src) from None
    if _is_regular_file(src):
        # The writer copies regular files on its own thread (read, hash and
        # write overlap the next files' metadata work).
        with src:
            w.add_file(path, src, meta)
        progress(node.size)
        return
    with src, w.create_file(path, meta) as out:
        left = node.size
        while left:
            try:
                buf = src.read(min(CHUNK, left))
            except TAR_READ_ERRORS as e:
                raise CimError(E_INVALIDARG, f"cannot read data ({_tar_reason(e)})", node.src) from None
            if not buf:
                raise CimError(E_INVALIDARG, "unexpected end of data (file shrank or archive truncated)", node.src)
            out.write(buf)
            left -= len(buf)
            progress(len(buf))


class DirectoryImporter:
    """Write a local directory into a new image while it is scanned.

    :class:`Tree` + :class:`Importer` hold the whole source tree before
    writing (a tar must be read in order, a fork compares with its parent);
    a new image from a directory needs neither, so this keeps only the
    directories still to visit, one listing at a time and the link groups of
    files with several links: a million-entry tree imports in bounded memory.
    Entries are written in the same order (depth first, by name) and with the
    same metadata and collision policy as ``Importer(scan_directory(...))``.
    """

    def __init__(self, writer, src_dir: str, *, on_collision: str = "error",
                 report: Callable[[str], None] | None = None,
                 progress: Callable[[int], None] | None = None):
        if on_collision not in ("error", "rename", "skip"):
            raise CimError(E_INVALIDARG, f"unknown collision policy {on_collision!r}")
        self.w = writer
        self.src_dir = src_dir
        self.on_collision = on_collision
        self.report = report or (lambda msg: None)
        self.progress = progress or (lambda n: None)
        self.groups: dict = {}   # (st_dev, st_ino) -> _Group, files with st_nlink > 1 only
        self.entries = 0

    def _place_name(self, name: str, src: str, taken: dict, dir_path: str) -> str | None:
        """The image name for ``name`` (from ``src``) in a directory whose
        names so far are ``taken`` (folded name -> source path), or None to skip it."""
        check_image_name(name, src)
        k = fold(name)
        first = taken.get(k)
        if first is None:
            taken[k] = src
            return name
        cand = resolve_collision(self.on_collision, self.report, name, src, first, taken, dir_path)
        if cand is not None:
            taken[fold(cand)] = src
        return cand

    def run(self) -> None:
        with paused_gc():
            self._run()

    def _run(self) -> None:
        w = self.w
        consistent = _writes_consistent(w)
        file_meta = plain_file_metadata_consistent if consistent else plain_file_metadata
        w.mkdir("", node_metadata(_stat_root(self.src_dir), consistent), exist_ok=True)
        stack: list[tuple[str, str, str]] = [(self.src_dir, "", "")]   # (local, image path, POSIX path)
        add_file = w.add_file
        add_files = w.add_local_files
        files: list = []
        progress = self.progress
        while stack:
            local, image_dir, posix_dir = stack.pop()
            taken: dict[str, str] = {}
            subdirs = []
            prefix = local + "/" if not local.endswith("/") else local
            image_prefix = image_dir + "/" if image_dir else ""
            try:
                dfd = os.open(local, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise _oserror(e, local) from None
            try:
                for ent in _sorted_listing(dfd, local):   # stat()s are relative to dfd: no path walks
                    full = prefix + ent.name
                    try:
                        st = ent.stat(follow_symlinks=False)
                    except OSError as e:
                        raise _oserror(e, full) from None
                    if S.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_blocks * 512 >= st.st_size:
                        # The bulk of any tree: a plain file, straight from its stat,
                        # added with the others of its directory in one call.
                        name = self._place_name(name_to_image(ent.name), full, taken, posix_dir)
                        if name is None:
                            continue
                        self.entries += 1
                        if st.st_size:
                            files.append((name, full, file_meta(st)))
                        else:
                            add_file(image_prefix + name, b"", file_meta(st))
                        progress(st.st_size)
                        continue
                    node = _node_from_entry(ent, st, full, self.groups)
                    name = self._place_name(name_to_image(ent.name), full, taken, posix_dir)
                    if name is None:
                        continue
                    node.name = name
                    path = image_prefix + name
                    self.entries += 1
                    if node.kind == DIR:
                        w.mkdir(path, node_metadata(node, consistent))
                        subdirs.append((full, path, _join(posix_dir, name_from_image(name))))
                    else:
                        add_files(image_dir, files)  # contents are copied in scan order
                        files.clear()
                        write_node(w, node, path, progress)
                # Mostly one call per directory (subdirectories are visited after it).
                add_files(image_dir, files)
                files.clear()
            finally:
                os.close(dfd)
            stack.extend(reversed(subdirs))


def _is_regular_file(f) -> bool:
    try:
        return S.S_ISREG(os.fstat(f.fileno()).st_mode)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


# --------------------------------------------------------------------- extraction
class ExtractReport:
    def __init__(self, warn: Callable[[str], None] | None = None):
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self._warn = warn or (lambda m: None)

    def problem(self, msg: str) -> None:
        self.problems.append(msg)
        self._warn(msg)

    def warning(self, msg: str) -> None:
        self.warnings.append(msg)
        self._warn(msg)


def _safe_local_name(name: str) -> str | None:
    local = name_from_image(name)
    if local in ("", ".", "..") or "/" in local or "\0" in local:
        return None
    return local


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _DirChain:
    """Directories below DEST, opened one step at a time with O_NOFOLLOW;
    the open path is kept, so neighbours in a walk share their common part
    (about one open per directory instead of a walk from DEST)."""

    def __init__(self, dest_fd: int):
        self._parts: list[str] = []
        self._fds = [dest_fd]  # the caller's; never closed here

    def open(self, parts) -> int:
        mine = self._parts
        same, n = 0, min(len(parts), len(mine))
        while same < n and parts[same] == mine[same]:
            same += 1
        while len(mine) > same:
            mine.pop()
            os.close(self._fds.pop())
        for p in parts[same:]:
            self._fds.append(os.open(p, _DIR_FLAGS, dir_fd=self._fds[-1]))
            mine.append(p)
        return self._fds[-1]

    def close(self) -> None:
        for fd in self._fds[1:]:
            os.close(fd)
        del self._fds[1:], self._parts[:]


class _FileWriters:
    """Forked processes that create an extraction's plain files.

    Creating a file is kernel work (inode allocation, the copy, times) that
    one process does one file at a time; two processes do it on two cores.
    The extractor walks the image, makes the directories and the other
    entries, and hands each plain file (no reparse point, no alternate
    streams, not stored sparse, its first name) to a writer, a directory's
    files together; the writer opens the directory from DEST with O_NOFOLLOW
    at every step as the extractor does.  Problems come back at
    :meth:`finish`; a corrupt image ends the writer that meets it.  Forked
    only while the caller runs no other thread.
    """

    _BATCH_FILES = 128
    _FILE_COST = 16 << 10  # a file's creation, as bytes copied in the same time

    @staticmethod
    def available() -> bool:
        import threading

        return hasattr(os, "fork") and (os.cpu_count() or 1) >= 2 and threading.active_count() == 1

    def __init__(self, extractor: "Extractor", dest_fd: int, count: int = 2):
        self._extractor, self._dest_fd, self._count = extractor, dest_fd, count
        self._procs, self._jobs, self._results = [], [], []
        self._queued = [0] * count
        self._batches: list[list] = [[] for _ in range(count)]
        self._batch_files = [0] * count
        self.done = False

    def _start(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        extractor, dest_fd = self._extractor, self._dest_fd
        for _ in range(self._count):
            jobs_r, jobs_w = ctx.Pipe(duplex=False)
            # The walk runs ahead where files dominate, and what it has sent
            # keeps the writers busy where small directories do and the walk
            # is the slower side (with a 64 KiB pipe the walk blocked 0.3-0.4 s
            # in sends, then each writer waited 0.13-0.23 s for work).
            widen_pipe(jobs_w)
            results_r, results_w = ctx.Pipe(duplex=False)
            owner_ends = self._jobs + self._results + [jobs_w, results_r]
            proc = ctx.Process(target=_file_writer_main, args=(extractor, dest_fd, jobs_r, results_w, owner_ends),
                               name="cimfs-extract", daemon=True)
            proc.start()
            jobs_r.close()
            results_w.close()
            self._procs.append(proc)
            self._jobs.append(jobs_w)
            self._results.append(results_r)

    def add(self, parts: tuple, files: list, size: int, plain_dir: bool) -> int:
        """A directory's plain files, ``[(name in the image, FileID), ...]``,
        to the writer with the least work queued; returns which writer.
        ``plain_dir``: the extractor made the directory where nothing
        changes what a new file gets (see :func:`_dir_is_plain`)."""
        i = min(range(self._count), key=self._queued.__getitem__)
        self._queued[i] += size + self._FILE_COST * len(files)
        self._batches[i].append((parts, files, plain_dir))
        self._batch_files[i] += len(files)
        if self._batch_files[i] >= self._BATCH_FILES:
            self._send(i)
        return i

    def set_dir_meta(self, parts: tuple, info: PosixInfo, writer: int | None) -> None:
        """A directory's owner, mode and times, set by ``writer`` (the one that
        has its files: after them) once the extractor has made everything
        else in it, instead of by the extractor at the end on one core."""
        i = writer if writer is not None else min(range(self._count), key=self._queued.__getitem__)
        self._queued[i] += self._FILE_COST
        self._batches[i].append((parts, (info.uid, info.gid, info.mode, info.atime_ns, info.mtime_ns)))  # a _DirMeta

    def _send(self, i: int) -> None:
        if self._batches[i]:
            if not self._procs:
                self._start()
            try:
                self._jobs[i].send(self._batches[i])
            except OSError:
                pass  # the writer is gone; finish() says why
            self._batches[i], self._batch_files[i] = [], 0

    def finish(self) -> tuple[list[str], str | None]:
        """Wait for every file; returns (problems, the corrupt image's message or None)."""
        for i in range(self._count):
            self._send(i)
        for jobs in self._jobs:
            try:
                jobs.send(None)
            except OSError:
                pass
        problems: list[str] = []
        fatal = None
        for proc, results in zip(self._procs, self._results):
            try:
                p, f = results.recv()
            except (EOFError, OSError):
                p, f = [], None
                proc.join()
                problems.append(f"a file writer process ended unexpectedly (exit code {proc.exitcode})")
            problems += p
            fatal = fatal or f
            proc.join()
        for c in self._jobs + self._results:
            c.close()
        self.done = True  # only now: an interrupted wait leaves abandon() to kill them
        return problems, fatal

    def abandon(self) -> None:
        if self.done:
            return
        self.done = True
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join()
        for c in self._jobs + self._results:
            c.close()


def _file_writer_main(extractor: "Extractor", dest_fd: int, jobs, results, owner_ends: list) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the extractor's; it ends us by closing the pipe
    for c in owner_ends:
        c.close()
    # Files are created with their final mode (one fchmod fewer each); this
    # process creates nothing else.
    os.umask(0)
    extractor._ids = (os.geteuid(), os.getegid())
    extractor.progress = lambda n: None  # counted by the extractor as it hands files out
    problems: list[str] = []
    fatal = None
    chain = _DirChain(dest_fd)
    while fatal is None:
        try:
            batch = jobs.recv()
        except (EOFError, OSError):  # the extractor went away
            os._exit(1)
        if batch is None:
            break
        for item in batch:
            if len(item) == 2:  # a directory's own metadata
                parts, meta = item
                try:
                    extractor._set_meta_fd(chain.open(parts), _DirMeta(*meta))
                except OSError as e:
                    problems.append(f"{'/'.join(parts)}: {e.strerror or e}")
                continue
            parts, files, plain_dir = item
            try:
                dfd = chain.open(parts)
                plain_dir = plain_dir or _dir_is_plain(dfd)
            except OSError as e:
                problems.append(f"{'/'.join(parts)}: {e.strerror or e}")
                continue
            try:
                recs = extractor.image.records([fid for name, fid in files])
            except cimfs.errors.CimFormatError as e:
                fatal = str(e)
                break
            for (name, fid), rec in zip(files, recs):
                try:
                    extractor._write_plain(dfd, plain_dir, parts, name, fid, rec)
                except cimfs.errors.CimFormatError as e:
                    fatal = str(e)
                    break
                except CimError as e:
                    problems.append(str(e))
                except OSError as e:
                    problems.append(f"{'/'.join(parts + (name,))}: {e.strerror or e}")
            if fatal is not None:
                break
    chain.close()
    results.send((problems, fatal))


def _dir_is_plain(fd: int) -> bool:
    """Whether a file created in this directory gets exactly the mode given
    to open() (under umask 0) and its creator's uid and gid: no default ACL
    (it, not the umask, would shape the mode), no set-group-ID bit, the
    creator's group (what ``grpid`` mounts hand down)."""
    st = os.fstat(fd)
    if st.st_mode & S.S_ISGID or st.st_gid != os.getegid():
        return False
    try:
        os.getxattr(fd, "system.posix_acl_default")
    except OSError:
        return True
    return False


_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _plain_owner(ea: bytes, perm: int) -> tuple[int, int, int]:
    """What :func:`posix_info` gives a plain file or directory with these
    EAs: its permissions (``perm`` without a mode EA), uid and gid."""
    lx = _lx_of_eas(ea) if ea else None
    uid = gid = 0
    if lx is not None:
        if getattr(lx, "mode", None) is not None:
            perm = lx.mode & 0o7777
        uid = getattr(lx, "uid", None) or 0
        gid = getattr(lx, "gid", None) or 0
    return perm, uid, gid


class _DirMeta(NamedTuple):
    """What setting a plain directory's metadata needs of a PosixInfo."""

    uid: int
    gid: int
    mode: int
    atime_ns: int
    mtime_ns: int


class Extractor:
    """Extract an image (or a subtree) into DEST without ever leaving DEST.

    Hard links are found as the walk meets a FileID a second time (the
    format keeps no link counts) and made once every first name exists.
    """

    def __init__(self, image, dest: str, *, restore_owner: bool | None = None,
                 progress: Callable[[int], None] | None = None, warn: Callable[[str], None] | None = None):
        self.image = image
        self.dest = dest
        self._root = os.geteuid() == 0
        self.owner = self._root if restore_owner is None else restore_owner
        self.progress = progress or (lambda n: None)
        self.report = ExtractReport(warn)
        self.streams_skipped = 0
        self._writers: _FileWriters | None = None
        self._first_dir: dict[int, int] = {}              # file FileID -> the directory of its first name
        self._dir_parts: dict[int, tuple] = {}            # directory FileID -> its local path parts
        self._links: list[tuple[tuple, str, int]] = []    # (parts, name, FileID) of later names
        self._moved_first: dict[int, tuple[tuple, str]] = {}  # FileID -> (parts, local) where a copy stands in
        # (EA RegionOffset, length, permissions without a mode EA) -> (permissions,
        # uid, gid): most entries share a few EA buffers, stored once, so
        # their place names them.
        self._owners: dict[tuple[int, int, int], tuple[int, int, int]] = {}
        self._early_meta: dict[tuple, PosixInfo | _DirMeta] = {}  # directories whose metadata the writers set
        # A directory's mode and times wait for everything in it (a file or
        # link created in it afterwards would change its mtime).
        self._dir_meta: list[tuple[list[str], PosixInfo | _DirMeta]] = []

    # -- helpers
    def _remove(self, dfd: int, name: str, rel: str) -> None:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if S.S_ISDIR(st.st_mode):
            try:
                os.rmdir(name, dir_fd=dfd)
            except OSError:
                raise CimError(ERROR_FILE_EXISTS, "exists in the destination as a non-empty directory", rel) from None
        else:
            os.unlink(name, dir_fd=dfd)

    def _retry(self, fn, dfd: int, name: str, rel: str):
        try:
            return fn()
        except FileExistsError:
            self._remove(dfd, name, rel)
            return fn()

    def _set_meta_fd(self, fd: int, info: PosixInfo) -> None:
        if self.owner:
            os.fchown(fd, info.uid, info.gid)
        os.fchmod(fd, info.mode & 0o7777)
        os.utime(fd, ns=(info.atime_ns, info.mtime_ns))

    def _set_meta_path(self, dfd: int, name: str, info: PosixInfo) -> None:
        """Metadata of a symlink or special file, never following a link."""
        if info.kind == SYMLINK:
            if self.owner:
                os.chown(name, info.uid, info.gid, dir_fd=dfd, follow_symlinks=False)
            os.utime(name, ns=(info.atime_ns, info.mtime_ns), dir_fd=dfd, follow_symlinks=False)
            return
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            if S.S_IFMT(os.fstat(fd).st_mode) != S.S_IFMT(info.mode):
                raise CimError(ERROR_FILE_EXISTS, "changed while being extracted", name)
            proc = f"/proc/self/fd/{fd}"
            if self.owner:
                os.chown(proc, info.uid, info.gid)
            os.chmod(proc, info.mode & 0o7777)
            os.utime(proc, ns=(info.atime_ns, info.mtime_ns))
        finally:
            os.close(fd)

    # -- public
    def total_bytes(self, path: str = "") -> int:
        total = 0
        seen = set()
        for fid, st in self._iter_stats(path):
            if not st.is_dir and fid not in seen:
                seen.add(fid)
                total += st.size
        return total

    def _iter_stats(self, path):
        img = self.image
        root = img.lookup(path) if path else img.root_id
        st = img.stat(root, links=False)
        yield root, st
        if not st.is_dir:
            return
        stack, seen = [root], {root}
        while stack:
            d = stack.pop()
            for e in img.scandir(d):
                st = img.stat(e.file_id, links=False)
                yield e.file_id, st
                if st.is_dir and e.file_id not in seen and posix_info(st).kind == DIR:
                    seen.add(e.file_id)
                    stack.append(e.file_id)

    def run(self, path: str = "") -> ExtractReport:
        # The walk keeps a record per entry and makes no cycles: collections
        # would only re-scan them (1.6 of 3.6 us per record read).  The
        # writer processes inherit the pause.
        with paused_gc():
            try:
                return self._run(path)
            finally:
                # dropped while paused: the first collection afterwards would scan them
                self._first_dir, self._dir_parts, self._early_meta, self._owners = {}, {}, {}, {}

    def _run(self, path: str) -> ExtractReport:
        img = self.image
        fid = img.lookup(path) if path else img.root_id
        st = img.stat(fid, links=False)
        created = False
        if not os.path.lexists(self.dest):
            os.makedirs(self.dest)
            created = True
        dfd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            info = posix_info(st)
            if st.is_dir and info.kind == DIR:
                if _FileWriters.available():
                    self._writers = _FileWriters(self, dfd)
                try:
                    self._extract_dir(dfd, fid, [], {fid}, _dir_is_plain(dfd))
                    self._finish(dfd)
                finally:
                    if self._writers is not None:
                        self._writers.abandon()
                        self._writers = None
                if created:
                    self._set_meta_fd(dfd, info)
            else:
                name = _split(path)[-1] if path else ""
                local = _safe_local_name(name)
                if local is None:
                    self.report.problem(f"{path}: unsafe name, not extracted")
                else:
                    self._extract_entry(dfd, local, fid, st, [], path, set())
        finally:
            os.close(dfd)
        if self.streams_skipped:
            self.report.warning(f"{self.streams_skipped} alternate data stream(s) not extracted (POSIX has none)")
        return self.report

    def _finish(self, dest_fd: int) -> None:
        """Once the walk is done: wait for the file writers, make the hard
        links, then give the directories their metadata, deepest first."""
        if self._writers is not None:
            problems, fatal = self._writers.finish()
            for msg in problems:
                self.report.problem(msg)
            if fatal is not None:
                raise cimfs.errors.CimFormatError(fatal)
        chain, sources = _DirChain(dest_fd), _DirChain(dest_fd)
        try:
            relinked = set()
            for parts, name, fid in self._links:
                self._make_link(chain, sources, parts, name, fid)
                if parts in self._early_meta and parts not in relinked:
                    relinked.add(parts)  # a new name changed its times
                    self._dir_meta.append((list(parts), self._early_meta[parts]))
            self._links.clear()
            # Children come before their parent in the list (each was added
            # once its subtree was done).
            for parts, info in self._dir_meta:
                try:
                    self._set_meta_fd(chain.open(parts), info)
                except OSError as e:
                    self.report.problem(f"{'/'.join(parts)}: {e.strerror or e}")
            self._dir_meta.clear()
        finally:
            chain.close()
            sources.close()

    def _entry_failed(self, e: Exception, rel: str) -> None:
        """One entry could not be made: a problem of the extraction, named by
        its path; a corrupt image ends it."""
        if isinstance(e, cimfs.errors.CimFormatError):
            raise e
        self.report.problem(str(e) if isinstance(e, CimError) else f"{rel}: {e.strerror or e}")

    def _first_name(self, fid: int) -> tuple[tuple, str] | None:
        """Where the first name of ``fid`` was extracted: (parts, local name)."""
        moved = self._moved_first.get(fid)
        if moved is not None:
            return moved
        dir_id = self._first_dir[fid]
        for ent in self.image.scandir(dir_id):
            if ent.file_id == fid:
                local = _safe_local_name(ent.name)
                return None if local is None else (self._dir_parts[dir_id], local)
        return None

    def _make_link(self, chain: _DirChain, sources: _DirChain, parts: tuple, name: str, fid: int) -> None:
        """``chain`` opens the new name's directory, ``sources`` the first name's."""
        rel = "/".join(parts + (name,))
        local = _safe_local_name(name)
        if local is None:
            self.report.problem(f"{rel}: unsafe name {name!r}, not extracted")
            return
        try:
            dfd = chain.open(parts)
            first = self._first_name(fid)
            if first is not None:
                try:
                    sfd = sources.open(first[0])
                    self._retry(lambda: os.link(first[1], local, src_dir_fd=sfd, dst_dir_fd=dfd,
                                                follow_symlinks=False), dfd, local, rel)
                    return
                except OSError as e:
                    self.report.warning(f"{rel}: could not hard link ({e.strerror}); extracting a copy")
            # the first name was not extracted: this one takes its place
            self._extract_entry(dfd, local, fid, self.image.stat(fid, links=False), list(parts), rel, set())
            self._moved_first[fid] = (parts, local)
        except (CimError, OSError) as e:
            self._entry_failed(e, rel)

    def _extract_dir(self, dfd, dir_id: int, parts: list[str], ancestors: set, plain_dir: bool = False) -> int | None:
        """The entries of directory ``dir_id`` (extracted at ``parts``).
        ``dfd`` is its open descriptor, or a function that opens it: a
        directory holding only plain files, all made by the writers, is
        never opened here.  ``plain_dir``: made here below a plain directory
        (see :func:`_dir_is_plain`).  Returns the writer that got its files."""
        image, writers, first_dir = self.image, self._writers, self._first_dir
        key = tuple(parts)
        self._dir_parts[dir_id] = key
        plain: list[tuple[str, int]] = []
        plain_bytes = 0
        later: list = []
        writer = None
        # Told apart by the record alone; a plain file's metadata is read by
        # the writer that creates it.
        entries = image.scandir(dir_id)
        for (name, fid), rec in zip(entries, image.records([e.file_id for e in entries])):
            if not rec.is_dir:
                if fid in first_dir:
                    self._links.append((key, name, fid))
                    continue
                first_dir[fid] = dir_id
                if (writers is not None and not rec.reparse_offset and not rec.stream_table_offset
                        and not rec.stream.sparse):
                    plain.append((name, fid))
                    plain_bytes += rec.stream.length
                    continue
            later.append((name, fid, rec))
        if plain:
            writer = writers.add(key, plain, plain_bytes, plain_dir)
            self.progress(plain_bytes)
        if not later:
            return writer
        opened = None
        if callable(dfd):
            dfd = opened = dfd()
        try:
            for name, fid, rec in later:
                rel = "/".join(parts + [name])
                local = _safe_local_name(name)
                if local is None:
                    self.report.problem(f"{rel}: unsafe name {name!r}, not extracted")
                    continue
                try:
                    if rec.is_dir and not rec.reparse_offset and not rec.stream_table_offset:
                        # a plain directory: what posix_info would say, from the record
                        perm, uid, gid = self._owner(fid, rec, 0o755)
                        meta = _DirMeta(uid, gid, S.S_IFDIR | perm, filetime_to_ns(rec.last_access_time),
                                        filetime_to_ns(rec.last_write_time))
                        self._extract_subdir(dfd, local, fid, meta, parts, rel, ancestors, plain_dir)
                        continue
                    self._extract_entry(dfd, local, fid, image.stat(fid, links=False), parts, rel, ancestors, plain_dir)
                except (CimError, OSError) as e:
                    self._entry_failed(e, rel)
        finally:
            if opened is not None:
                os.close(opened)
        return writer

    def _extract_entry(self, dfd, local, fid, st, parts, rel, ancestors, plain_dir: bool = False) -> None:
        info = posix_info(st)
        if st.stream_count:
            self.streams_skipped += st.stream_count
        if info.kind == DIR:
            self._extract_subdir(dfd, local, fid, info, parts, rel, ancestors, plain_dir)
            return
        if info.kind == FILE:
            self._write_file(dfd, local, fid, st, info, rel)
        elif info.kind == SYMLINK:
            if info.link_has_children and self.image.scandir(fid):
                self.report.warning(f"{rel}: is a link in the image; the entries below it are not extracted")
            self._retry(lambda: os.symlink(info.target, local, dir_fd=dfd), dfd, local, rel)
            self._set_meta_path(dfd, local, info)
        elif info.kind in (FIFO, SOCK):
            self._retry(lambda: os.mknod(local, FMT_OF_KIND[info.kind] | 0o600, dir_fd=dfd), dfd, local, rel)
            self._set_meta_path(dfd, local, info)
        elif info.kind in (CHR, BLK):
            try:
                self._retry(lambda: os.mknod(local, FMT_OF_KIND[info.kind] | 0o600, os.makedev(*info.rdev),
                                             dir_fd=dfd), dfd, local, rel)
            except PermissionError:
                self.report.warning(f"{rel}: device nodes need root; not created")
                return
            self._set_meta_path(dfd, local, info)

    def _owner(self, fid: int, rec, perm: int) -> tuple[int, int, int]:
        """(permissions, uid, gid) of a plain entry, looked up by where its EA
        buffer is stored: most entries share a few, each stored once."""
        key = (rec.ea_offset, rec.ea_length, perm)
        owner = self._owners.get(key)
        if owner is None:
            if len(self._owners) >= 4096:
                self._owners.clear()
            owner = self._owners[key] = _plain_owner(self.image.ea_buffer(fid), perm)
        return owner

    def _write_plain(self, dfd: int, plain_dir: bool, parts: tuple, name: str, fid: int, rec) -> None:
        """A plain file in a writer process (umask 0): created with its final
        mode, then its data and times; owner and mode only where the new
        file would not already have them."""
        local = _safe_local_name(name)
        if local is None:
            raise CimError(ERROR_INVALID_NAME, f"unsafe name {name!r}, not extracted", "/".join(parts + (name,)))
        image = self.image
        if rec.flags & _FLAG_SPARSE:  # its zero blocks become holes: the general path
            st = image.stat(fid, links=False)
            self._write_file(dfd, local, fid, st, posix_info(st), "/".join(parts + (name,)))
            return
        perm, uid, gid = self._owner(fid, rec, 0o444 if rec.flags & _FLAG_READONLY else 0o644)
        try:
            fd = os.open(local, _NEW_FILE_FLAGS, perm, dir_fd=dfd)
        except FileExistsError:
            self._remove(dfd, local, "/".join(parts + (name,)))
            fd = os.open(local, _NEW_FILE_FLAGS, perm, dir_fd=dfd)
        try:
            stream = rec.stream
            if stream.length and image.copy_stream(stream, fd) != stream.length:
                raise cimfs.errors.CimFormatError("stream shorter than its size", "/".join(parts + (name,)))
            chown = self.owner and ((uid, gid) != self._ids or not plain_dir)
            if chown:
                os.fchown(fd, uid, gid)
            if not plain_dir or (chown and perm & 0o6000):  # chown clears set-ID bits
                os.fchmod(fd, perm)
            os.utime(fd, ns=((rec.last_access_time - FILETIME_UNIX_EPOCH) * 100,  # filetime_to_ns, inline
                             (rec.last_write_time - FILETIME_UNIX_EPOCH) * 100))
        finally:
            os.close(fd)

    def _extract_subdir(self, dfd, local: str, fid: int, info, parts, rel: str, ancestors: set, plain_dir: bool) -> None:
        """A directory: made (or one in the way replaced), its entries, then
        its metadata (``info``: a PosixInfo or _DirMeta)."""
        if fid in ancestors:
            self.report.problem(f"{rel}: directory loop in the image, not followed")
            return
        child = parts + [local]
        try:
            os.mkdir(local, 0o700, dir_fd=dfd)
            cfd = functools.partial(os.open, local, _DIR_FLAGS, dir_fd=dfd)  # ours: opened if needed
        except FileExistsError:
            plain_dir = False  # not made here: a writer looks at it
            try:
                cfd = os.open(local, _DIR_FLAGS, dir_fd=dfd)
            except OSError:
                # something that is not a directory (maybe a link) is in the way: replace it
                self._remove(dfd, local, rel)
                os.mkdir(local, 0o700, dir_fd=dfd)
                cfd = os.open(local, _DIR_FLAGS, dir_fd=dfd)
        try:
            writer = self._extract_dir(cfd, fid, child, ancestors | {fid}, plain_dir)
        finally:
            if type(cfd) is int:
                os.close(cfd)
        # Early, by a writer, where nothing is made in it later but hard
        # links (its metadata is then set again) and its mode cannot stop
        # the writers going through it or the links being made.
        if self._writers is not None and (self._root or info.mode & 0o300 == 0o300):
            key = tuple(child)
            self._writers.set_dir_meta(key, info, writer)
            self._early_meta[key] = info
        else:
            self._dir_meta.append((child, info))

    def _write_file(self, dfd, local, fid, st, info, rel) -> None:
        fd = self._retry(lambda: os.open(local, _NEW_FILE_FLAGS, 0o600, dir_fd=dfd), dfd, local, rel)
        try:
            size = st.size
            if size and not st.is_sparse and not st.attributes & _FA_SPARSE_FILE:
                # copy_file_range inside the kernel; region file -> new file,
                # which then has its size: no ftruncate
                n = self.image.copy_stream(fid, fd, progress=self.progress)
                if n != size:
                    raise cimfs.errors.CimFormatError("stream shorter than its size", rel)
            elif size and not st.is_sparse:
                # a file marked sparse keeps its holes: zero blocks are skipped
                with self.image.open(fid) as src:
                    pos = 0
                    while pos < size:
                        buf = src.read(min(CHUNK, size - pos))
                        if not buf:
                            raise cimfs.errors.CimFormatError("stream shorter than its size", rel)
                        _write_sparse(fd, buf, pos)
                        pos += len(buf)
                        self.progress(len(buf))
                os.ftruncate(fd, size)  # holes at the end still count
            elif size:
                self.progress(size)
                os.ftruncate(fd, size)  # all of it a hole
            self._set_meta_fd(fd, info)
        finally:
            os.close(fd)


def _write_sparse(fd: int, buf: bytes, pos: int) -> None:
    """pwrite ``buf`` at ``pos`` leaving all-zero 4 KiB blocks as holes."""
    mv = memoryview(buf)
    zero = bytes(SPARSE_BLOCK)
    i = 0
    n = len(buf)
    while i < n:
        j = i
        # a run of data blocks
        while j < n and mv[j:j + SPARSE_BLOCK] != zero[: min(SPARSE_BLOCK, n - j)]:
            j += SPARSE_BLOCK
        if j > i:
            end = min(j, n)
            data = mv[i:end]
            off = pos + i
            while data:
                k = os.pwrite(fd, data, off)
                data = data[k:]
                off += k
            i = end
        while i < n and mv[i:i + SPARSE_BLOCK] == zero[: min(SPARSE_BLOCK, n - i)]:
            i += SPARSE_BLOCK


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
                blk = buf[off:off + SPARSE_BLOCK]
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
        extents.append((size, 0))     # marks the real size, as GNU tar does
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
            self._cur = self._cur[len(take):]
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


def export_tar(image, out: tarfile.TarFile, *, progress=None, warn=None) -> ExtractReport:
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
            ti.type = tarfile.SYMTYPE
            ti.linkname = info.target
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
                extents = _data_map(image, st.file_id, ti.size)
                body = _SparseReader(image, st.file_id, extents, progress)
                real = ti.name
                ti.pax_headers.update({"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                       "GNU.sparse.name": real, "GNU.sparse.realsize": str(ti.size)})
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
