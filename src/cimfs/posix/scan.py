"""The source side of an import: a POSIX tree held in memory, from a
directory or a tar.

Owns :class:`Node` and :class:`Tree` (case-insensitive placement with the
``--on-collision`` policy, hard-link groups), the scanning of a local
directory or single file into them (stat, link targets, holes), the opening of
a node's contents, and the mapping of a local ``OSError`` to a ``CimError``.
Tar archives are :mod:`.scantar`'s (tarfile is ~2.5 ms of start-up that a
directory import, ``cimfs fork --add DIR``, does not need).
"""

from __future__ import annotations

import errno
import functools
import operator
import os
import stat as S
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import IO

from ..errors import (
    E_INVALIDARG,
    ERROR_FILE_EXISTS,
    ERROR_FILE_NOT_FOUND,
    ERROR_PATH_NOT_FOUND,
    CimError,
)
from .lx import _KIND_OF_FMT, BLK, CHR, DIR, FILE, SYMLINK
from .names import _join, check_image_name, fold, name_from_image, name_to_image

CHUNK = 1 << 20  # the unit in which file data is read and copied


# --------------------------------------------------------------------- source tree
class _Group:
    """Hard links to one file: the first one written carries the data."""

    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written: str | None = None


@dataclass(eq=False, slots=True)  # slots: a million-entry tree is held in memory
class Node:
    name: str  # name in the image ("" for the root)
    src: str  # where it came from, for messages
    kind: str
    mode: int = 0  # full st_mode, type bits included
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    btime_ns: int | None = None
    size: int = 0
    target: str | None = None  # symlink target
    rdev: tuple[int, int] = (0, 0)
    sparse: bool = False
    opener: Callable[[], IO[bytes]] | None = None
    order: int = 0
    parent: Node | None = None
    children: dict = field(default_factory=dict)  # fold(name) -> Node
    group: _Group | None = None
    implied: bool = False

    def path(self) -> str:
        parts = []
        n = self
        while n is not None and n.parent is not None:
            parts.append(n.name)
            n = n.parent
        return "/".join(reversed(parts))

    def copy_meta_from(self, other: Node) -> None:
        for f in ("mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns", "btime_ns"):
            setattr(self, f, getattr(other, f))
        self.implied = False


def _default_dir(name: str, src: str, like: Node | None = None) -> Node:
    now = time.time_ns() if like is None else like.mtime_ns
    return Node(
        name=name, src=src, kind=DIR, mode=S.S_IFDIR | 0o755, atime_ns=now, mtime_ns=now, ctime_ns=now, implied=True
    )


def resolve_collision(
    policy: str, report: Callable[[str], None], name: str, src: str, first: str, taken: Container[str], dir_path: str
) -> str | None:
    """``name`` (from ``src``) folds like ``first``, already in a directory
    whose folded names are ``taken``: fail, skip (None) or the renamed name,
    as --on-collision says.  ``dir_path`` is where the message says it went."""
    if policy == "error":
        raise CimError(
            ERROR_FILE_EXISTS, f"collides case-insensitively with {first!r} (use --on-collision rename|skip)", src
        )
    if policy == "skip":
        report(f"skipped {src} (collides case-insensitively with {first})")
        return None
    cand = free_name(name, taken)
    check_image_name(cand, src)
    report(f"renamed {src} to {_join(dir_path, name_from_image(cand))} (collides case-insensitively with {first})")
    return cand


def free_name(name: str, taken: Container[str]) -> str:
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

    def __init__(self, on_collision: str = "error", report: Callable[[str], None] | None = None) -> None:
        if on_collision not in ("error", "rename", "skip"):
            raise CimError(E_INVALIDARG, f"unknown collision policy {on_collision!r}")
        self.on_collision = on_collision
        self.report = report or (lambda msg: None)
        self.root = _default_dir("", "")
        self.by_src: dict[str, Node | None] = {"": self.root}  # None: skipped
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
        cand = resolve_collision(
            self.on_collision,
            self.report,
            node.name,
            node.src,
            old.src,
            parent.children,
            parent.path() if parent.parent is not None else "",
        )
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
    n = Node(
        name="",
        src=src,
        kind=kind,
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        atime_ns=st.st_atime_ns,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
    )
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


def open_node(node: Node) -> IO[bytes]:
    """The contents of a FILE node: from its opener (tar members), else the
    local file it was scanned from (no per-file closure for a million files)."""
    return node.opener() if node.opener is not None else _open_local(node.src)


_ERRNO_HRESULT: dict[int | None, int] = {  # an OSError's errno may be None
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


def _sorted_listing(path: str | int, where: str | None = None) -> list[os.DirEntry]:
    """A directory's entries by name; ``path`` may be an open directory
    descriptor (the entries' stat() then resolve relative to it)."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=_entry_name)
    except OSError as e:
        raise _oserror(e, where or str(path)) from None


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
