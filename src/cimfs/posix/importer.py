"""Writing a POSIX tree into an image.

Owns :class:`Importer` (a scanned :class:`~cimfs.posix.scan.Tree` written
into a new, forked or extended image, keeping what the base already holds
unchanged) and :class:`DirectoryImporter` (a local directory streamed into a
new image while it is scanned, in bounded memory), and the writing of one
node's contents or hard link (:func:`write_node`).
"""

from __future__ import annotations

import io
import os
import stat as S
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..bulk import paused_gc
from ..errors import E_INVALIDARG, ERROR_ALREADY_EXISTS, CimError
from ..metadata import FileMetadata
from ..names import fold_key
from .lx import _FA_DIRECTORY, DIR, FILE, _lx_ea_buffer, metadata_matches, node_metadata, posix_info, writes_consistent
from .names import (
    _NEEDS_ESCAPE,
    FILETIME_UNIX_EPOCH,
    _join,
    _split,
    check_image_name,
    fold,
    name_from_image,
    name_to_image,
)
from .scan import (
    CHUNK,
    Node,
    _default_dir,
    _node_from_entry,
    _oserror,
    _sorted_listing,
    _stat_root,
    open_node,
    resolve_collision,
)

if TYPE_CHECKING:
    from ..reader import Image
    from ..writer import ImageWriter


def _walk_nodes(root: Node):
    stack = [root]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.children.values())


class Importer:
    """Write a :class:`Tree` into an open image writer.

    ``base`` is a reader on the image the writer starts from (fork or extend),
    or None for a new image.  The tree's root lands at ``at``.  With
    ``delete_extra`` the result mirrors the tree exactly below ``at``;
    otherwise the tree is merged over what is there.  Entries the base already
    holds with the same name, metadata and content are left alone, so a fork
    stores only what changed.

    An entry of the base that is a directory where the tree has something
    else, or the other way round (also on the way to ``at``: a file where
    the tree needs a directory), is replaced only with ``replace_kind``;
    otherwise that is a CimError naming it.  It defaults to ``delete_extra``:
    a mirror replaces anything, a merge never turns a file into a directory
    or removes a directory by surprise.
    """

    def __init__(
        self,
        writer: ImageWriter,
        root: Node,
        *,
        base: Image | None = None,
        at: str = "",
        delete_extra: bool = False,
        progress: Callable[[int], None] | None = None,
        hidden: set[str] | None = None,
        replace_kind: bool | None = None,
        listings: dict[int, dict[str, list]] | None = None,
    ) -> None:
        self.w = writer
        # A base directory's entries by folded name, as _base_child finds its
        # target's path through them; importers into one writer (``fork``'s
        # --add each) may share it: the base does not change.
        self.listings: dict[int, dict[str, list]] = {} if listings is None else listings
        self.replace_kind = delete_extra if replace_kind is None else replace_kind
        # folded paths (and everything below them) whose base entry no longer
        # counts: deleted, or written by an earlier import into the same writer
        self.hidden = hidden or set()
        self.root = root
        self.base = base
        self.at = "/".join(_split(at))
        self.delete_extra = delete_extra
        self.progress = progress or (lambda n: None)
        self.deletes: list[str] = []
        self.dirs: list[tuple[str, FileMetadata, bool]] = []
        self.files: list[tuple[Node, str]] = []
        self.consistent = writes_consistent(writer)
        if self.consistent and root.kind == DIR and root.implied and root.parent is None:
            # [choice] A tar without an entry for its root: the root is as new
            # as its newest entry, not the time of the import.
            root.atime_ns = root.mtime_ns = root.ctime_ns = max(
                (n.mtime_ns for n in _walk_nodes(root) if not n.implied), default=0
            )

    def _meta(self, node: Node) -> FileMetadata:
        # Not cached: a FileMetadata per entry would double the memory of a large import.
        return node_metadata(node, self.consistent)

    def _is_hidden(self, path: str) -> bool:
        if not self.hidden:
            return False
        parts = fold(path).split("/")
        return any("/".join(parts[:i]) in self.hidden for i in range(1, len(parts) + 1))

    def _base_entries(self, dir_id: int, path: str) -> dict:
        assert self.base is not None  # a directory ID of the base
        return {fold(e.name): e for e in self.base.scandir(dir_id) if not self._is_hidden(_join(path, e.name))}

    def _base_child(self, dir_id: int | None, path: str, name: str):
        """The base's entry ``name`` of directory ``dir_id``, unless hidden (the
        last such, as a dict of the listing keeps it).  The hidden check is made
        for the one name asked for, the listing folded once per directory
        (``self.listings``): ``fork --add`` plans each addition's path through
        directories of thousands of entries."""
        if self.base is None or dir_id is None:
            return None
        by_key = self.listings.get(dir_id)
        if by_key is None:
            by_key = self.listings[dir_id] = {}
            for e in self.base.scandir(dir_id):
                by_key.setdefault(fold(e.name), []).append(e)
        for e in reversed(by_key.get(fold(name), ())):
            if not self._is_hidden(_join(path, e.name)):
                return e
        return None

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
            if child is not None:  # found in the base
                assert self.base is not None
                is_dir = posix_info(self.base.stat(child.file_id)).kind == DIR
                self._check_kind(_join(path, child.name), is_dir, not last or self.root.kind == DIR)
                keep = child.name == p and (not last or self.root.kind == DIR) and is_dir
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

    def _check_kind(self, path: str, was_dir: bool, is_dir: bool) -> None:
        if was_dir != is_dir and not self.replace_kind:
            what = ("a directory", "something else") if was_dir else ("not a directory", "a directory")
            raise CimError(
                ERROR_ALREADY_EXISTS,
                f"is {what[0]} in the image and the addition would make it "
                f"{what[1]} (an explicit replace allows it: --replace)",
                path,
            )

    def _same_content(self, node: Node, fid: int) -> bool:
        if node.size == 0:
            return True
        assert self.base is not None  # fid is a file of the base
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
            assert self.base is not None  # base_id is a directory of the base
            bst = self.base.stat(base_id)
            if not metadata_matches(meta, bst, not self.consistent):
                self.dirs.append((path, meta, True))
            base_children = self._base_entries(base_id, path)
        for key, child in node.children.items():
            cpath = _join(path, child.name)
            b = base_children.pop(key, None)
            if b is not None:  # an entry of the base
                assert self.base is not None
                bst = self.base.stat(b.file_id)
                self._check_kind(_join(path, b.name), posix_info(bst).kind == DIR, child.kind == DIR)
                keep = (
                    b.name == child.name
                    and posix_info(bst).kind == child.kind
                    and (
                        child.kind == DIR
                        or (
                            child.group is None
                            and bst.nlink == 1
                            and bst.stream_count == 0
                            and metadata_matches(self._meta(child), bst, not self.consistent)
                            and self._same_content(child, b.file_id)
                        )
                    )
                )
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


def write_node(w: ImageWriter, node: Node, path: str, progress: Callable[[int], None]) -> None:
    """Write one non-directory node at ``path``: its contents, or a hard link
    to the first name of its link group already written."""
    if node.group is not None and node.group.written is not None:
        w.link(path, node.group.written)
        return
    meta = node_metadata(node, writes_consistent(w))
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
    # start-up time: only a tar member (not a regular file) gets here; a directory import never loads tarfile
    from .scantar import TAR_READ_ERRORS, _tar_reason

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


def check_output_outside(src_dir: str, image_dir: str | None) -> None:
    """[choice] An image written inside the tree it is made of would read its
    own region files as they grow: refused, rather than excluded (what to
    leave out would be a guess: other images there are the user's files)."""
    if image_dir is None:
        return
    top, out = os.path.realpath(src_dir), os.path.realpath(image_dir)
    if out == top or out.startswith(top.rstrip(os.sep) + os.sep):
        raise CimError(
            E_INVALIDARG,
            f"the image would be written inside the source directory {src_dir!r}; write it outside the source",
            image_dir,
        )


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

    def __init__(
        self,
        writer: ImageWriter,
        src_dir: str,
        *,
        on_collision: str = "error",
        report: Callable[[str], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if on_collision not in ("error", "rename", "skip"):
            raise CimError(E_INVALIDARG, f"unknown collision policy {on_collision!r}")
        check_output_outside(src_dir, getattr(writer, "directory", None))
        self.w = writer
        self.src_dir = src_dir
        self.on_collision = on_collision
        self.report = report or (lambda msg: None)
        self.progress = progress or (lambda n: None)
        self.groups: dict = {}  # (st_dev, st_ino) -> _Group, files with st_nlink > 1 only
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
        consistent = writes_consistent(w)
        w.mkdir("", node_metadata(_stat_root(self.src_dir), consistent), exist_ok=True)
        stack: list[tuple[str, str, str]] = [(self.src_dir, "", "")]  # (local, image path, POSIX path)
        add_files = w.add_scanned_files
        files: list = []
        progress = self.progress
        key_of = fold_key()
        needs_escape = _NEEDS_ESCAPE.search
        epoch = FILETIME_UNIX_EPOCH
        plain = 0  # plain files added (self.entries counts them at the end)
        last_owner, ea = None, b""
        while stack:
            local, image_dir, posix_dir = stack.pop()
            taken: dict[str, str] = {}
            subdirs = []
            prefix = local + "/" if not local.endswith("/") else local
            image_prefix = image_dir + "/" if image_dir else ""
            done = 0  # bytes of this directory's files, reported to progress at once
            try:
                dfd = os.open(local, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise _oserror(e, local) from None
            try:
                for ent in _sorted_listing(dfd, local):  # stat()s are relative to dfd: no path walks
                    full = prefix + ent.name
                    try:
                        st = ent.stat(follow_symlinks=False)
                    except OSError as e:
                        raise _oserror(e, full) from None
                    mode = st.st_mode
                    size = st.st_size
                    if S.S_ISREG(mode) and st.st_nlink == 1 and st.st_blocks * 512 >= size:
                        # The bulk of any tree: a plain file, straight from its stat,
                        # added with the others of its directory in one call.
                        name = ent.name
                        if needs_escape(name):
                            name = name_to_image(name)
                        if not name.isascii() or len(name) > 255:
                            check_image_name(name, full)
                        key = key_of(name)
                        if key in taken:
                            name = self._place_name(name, full, taken, posix_dir)
                            if name is None:
                                continue
                            key = key_of(name)
                        else:
                            taken[key] = full
                        plain += 1
                        done += size
                        mt = st.st_mtime_ns // 100 + epoch  # ns_to_filetime, inline
                        owner = (mode, st.st_uid, st.st_gid)
                        if owner != last_owner:  # most files of a directory share mode and owner
                            ea = _lx_ea_buffer(mode, st.st_uid, st.st_gid, None)
                            last_owner = owner
                        if consistent:  # see node_metadata: change and access time are the write time
                            entry = (name, key, full, size, mt, mt, mt, ea)
                        else:
                            entry = (
                                name,
                                key,
                                full,
                                size,
                                mt,
                                st.st_ctime_ns // 100 + epoch,
                                st.st_atime_ns // 100 + epoch,
                                ea,
                            )
                        if size:
                            files.append(entry)
                        else:
                            add_files(image_dir, [entry])  # now: an empty file is in the image at once
                        continue
                    if S.S_ISDIR(mode):
                        # What node_metadata gives a scanned directory, without its Node.
                        name = self._place_name(name_to_image(ent.name), full, taken, posix_dir)
                        if name is None:
                            continue
                        path = image_prefix + name
                        self.entries += 1
                        mt = st.st_mtime_ns // 100 + epoch
                        ct, at = (
                            (mt, mt) if consistent else (st.st_ctime_ns // 100 + epoch, st.st_atime_ns // 100 + epoch)
                        )
                        w.mkdir(
                            path,
                            FileMetadata(
                                _FA_DIRECTORY,
                                0,
                                mt,
                                mt,
                                ct,
                                at,
                                b"",
                                b"",
                                _lx_ea_buffer(mode, st.st_uid, st.st_gid, None),
                            ),
                        )
                        subdirs.append((full, path, _join(posix_dir, name_from_image(name))))
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
            if done:
                progress(done)
            stack.extend(reversed(subdirs))
        self.entries += plain


def _is_regular_file(f) -> bool:
    try:
        return S.S_ISREG(os.fstat(f.fileno()).st_mode)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False
