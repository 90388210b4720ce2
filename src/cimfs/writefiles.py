"""Adding files the Pythonic way: :class:`FileAdding`, the conveniences of
:class:`~cimfs.writer.ImageWriter` (``exists``, ``is_dir``, ``mkdir``,
``add_file``, ``add_stream``) and the fast paths of importers
(``add_local_files``, ``add_scanned_files``), with the copying they start:
local files handed to the data processes or the data thread, or copied at
once, and waited for before commit.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import TYPE_CHECKING, BinaryIO

from .errors import (
    E_INVALIDARG,
    ERROR_ALREADY_EXISTS,
    ERROR_FILE_NOT_FOUND,
    ERROR_PATH_NOT_FOUND,
    CimError,
    hresult_from_oserror,
)
from .layout import cim
from .metadata import FileAttributes, FileMetadata
from .names import MAX_NAME_UNITS, join_path, name_is_valid, split_path
from .names import PATH_CHECK_FROM as _PATH_CHECK_FROM
from .store import SMALL_DATA_MAX, DataProcess, DataPump, LocalCopier, open_source, read_exactly
from .writeedit import TreeEditing
from .writetree import _Node

if TYPE_CHECKING:
    from .writestream import StreamWriter


class FileAdding(TreeEditing):
    """The Pythonic conveniences of :class:`cimfs.writer.ImageWriter` (a base class of it)."""

    if TYPE_CHECKING:  # what ImageWriter sets up (for the type checker only)
        consistent: bool
        _closed: bool
        _committed: bool
        _pump: DataPump | None
        _process: DataProcess | LocalCopier | None
        _copied: list
        _use_process: bool | int

    # ------------------------------------------------------------ Pythonic conveniences
    def exists(self, path: str) -> bool:
        try:
            parent, key, existing, stream, _ = self._find(path, allow_stream=True)
        except CimError as e:
            if e.hresult in (ERROR_PATH_NOT_FOUND, ERROR_FILE_NOT_FOUND):
                return False
            raise
        if existing is None:
            return False
        return stream is None or self._folder.key(stream) in self._streams(existing[1])

    def is_dir(self, path: str) -> bool:
        try:
            _, _, existing, _, _ = self._find(path)
        except CimError:
            return False
        return existing is not None and existing[1].is_dir

    def mkdir(
        self, path: str, metadata: FileMetadata | None = None, *, exist_ok: bool = False, parents: bool = False
    ) -> None:
        meta = metadata or FileMetadata()
        if not meta.is_dir:
            meta = dataclasses.replace(meta, attributes=meta.attributes | FileAttributes.DIRECTORY)
        if parents:
            parts, _ = split_path(path)
            for i in range(1, len(parts)):
                if not self.is_dir(join_path(parts[:i])):
                    self.mkdir(join_path(parts[:i]), FileMetadata(attributes=FileAttributes.DIRECTORY))
        found = self._find(path)  # one look-up: importers make thousands of directories
        existing = found[2]
        if existing is not None:
            if exist_ok and existing[1].is_dir and metadata is None:
                return
            if not exist_ok:
                raise CimError(ERROR_ALREADY_EXISTS, "already exists", path)
        # create_file() and close() without a StreamWriter: a directory has no contents
        self._create(path, meta, found=found)

    def add_file(
        self, path: str, data: bytes | BinaryIO | os.PathLike = b"", metadata: FileMetadata | None = None
    ) -> None:
        """Add a file from bytes, a binary file object (read to its end) or a
        local file given by path (``os.PathLike``; not a symlink).

        Regular files are copied by the writer's data process (or data
        thread): a read error or a vanished source is reported by a later
        call or by :meth:`commit`, naming ``path``.  ``metadata.file_size``, when set, is how many
        bytes to take (a source that turns out shorter is an error)."""
        meta = metadata or FileMetadata()
        if meta.is_dir:
            raise CimError(E_INVALIDARG, "use mkdir() for directories", path)
        if isinstance(data, os.PathLike):
            self._add_local_file(path, os.fspath(data), meta)
            return
        if isinstance(data, (bytes, bytearray, memoryview)):
            if not meta.file_size and not len(data):
                self._create(path, meta, placeholder=True)  # an empty file: its record is final, packed at once
                return
            if not meta.file_size:
                meta = dataclasses.replace(meta, file_size=len(data))
            with self.create_file(path, meta) as s:
                s.write(data)
            return
        if not meta.file_size:
            size = _size_of(data)
            if size is None:
                data = data.read()
                self.add_file(path, data, dataclasses.replace(meta, file_size=len(data)))
                return
            meta = dataclasses.replace(meta, file_size=size)
        # Not in a consistent image: the data thread would number its regions
        # in whatever order it and this thread get to them.
        fd = _regular_file_fd(data) if meta.file_size > SMALL_DATA_MAX and not self.consistent else None
        if fd is not None:
            self._add_file_async(path, meta, data, fd)
            return
        with self.create_file(path, meta) as s:
            _copy_into(data, s)

    def _bulk_target(self, directory: str, process: DataProcess | LocalCopier) -> tuple[_Node, dict]:
        """The directory node a bulk add links into, and its children: a copy that
        already failed raises now, not at commit; the node is marked dirty before
        the first link, so a failure midway leaves no linked node unwritten."""
        if process.failed():
            self._finish_copies()
        dir_key = directory.replace("/", "\\")
        parent = self._dir_cache.get(dir_key)
        if parent is None:
            _, _, found, _, _ = self._find(directory)
            if found is None or not found[1].is_dir:
                raise CimError(ERROR_PATH_NOT_FOUND, "no such directory", directory)
            parent = found[1]
            self._cache_dir(dir_key, parent)
        children = self._children(parent)
        parent.dirty = True
        return parent, children

    def add_local_files(self, directory: str, files: list) -> None:
        """Add regular local files to the existing ``directory``: each of
        ``files`` is ``(name, source path, metadata)``, ``metadata.file_size``
        the bytes to take.  The same as ``add_file(directory\\name,
        pathlib.Path(source), metadata)`` for each, errors included, but the
        directory is looked up once and new names take a short path: an
        importer makes one call per source directory."""
        if not files:
            return
        prefix = directory.replace("/", "\\") + "\\" if directory else ""
        # Names are checked below (at most MAX_NAME_UNITS each): a directory
        # this deep sends every file through the checked path, which measures it.
        long_prefix = len(prefix) + MAX_NAME_UNITS > _PATH_CHECK_FROM
        process = self._process or self._start_copier()
        if process is None or process.done or self._closed or self._committed or self._open_stream is not None:
            for name, src, meta in files:
                self._add_local_file(prefix + name, os.fsdecode(src), meta)
            return
        parent, children = self._bulk_target(directory, process)
        key_of = self._folder.key
        record_for = self._record_for
        submit = process.submit
        cwd = None
        for name, src, meta in files:
            size = meta.file_size
            if type(src) is not str:
                src = os.fsdecode(src)
            key = key_of(name) if type(name) is str else None
            if (
                key is None
                or key in children
                or long_prefix
                or not name_is_valid(name)
                or type(size) is not int
                or not 0 < size <= cim.MAX_STREAM_LENGTH
                or meta.attributes & 0x10
            ):
                self._add_local_file(prefix + name, src, meta)  # replacing, an error, an empty file: the checked path
                continue
            node = _Node(record_for(meta, prefix + name, None, True), is_dir=False)
            children[key] = (name, node)
            node.nlink = 1
            if src[:1] != "/":  # the process opens it later: the caller may chdir meanwhile
                cwd = cwd or os.getcwd()
                src = os.path.join(cwd, src)
            submit(node, src, size)

    def add_scanned_files(self, directory: str, files: list) -> None:
        """:meth:`add_local_files` for an importer that has the stat of each
        file at hand and has already checked, escaped and folded its name:
        each of ``files`` is ``(name, key, source path, size, last write
        time, change time, last access time, EA buffer)``, times in FILETIME
        ticks, ``key`` the name folded by the default upcase table.  The file
        has no attributes, no security descriptor, and its creation time is
        its last write time; an empty file's source is not opened.  Its
        record is packed from these fields (no FileMetadata per file: this is
        once per file of a directory import); anything unusual takes
        :meth:`add_local_files`' checked path."""
        if not files:
            return
        process = self._process or self._start_copier()
        prefix = directory.replace("/", "\\") + "\\" if directory else ""
        if (
            process is None
            or process.done
            or self._closed
            or self._committed
            or self._open_stream is not None
            or self._base is not None
            or len(prefix) + MAX_NAME_UNITS > _PATH_CHECK_FROM
        ):
            self.add_local_files(directory, [_scanned_metadata(f) for f in files])
            return
        parent, children = self._bulk_target(directory, process)
        put_blob = self._store.put_blob
        pack = cim.pack_new_file_record
        placeholder = cim.placeholder_stream_word(0)
        clamp = self._clamp_time
        submit = process.submit
        Node = _Node
        cwd = None
        for f in files:
            name, key, src, size, wt, ct, at, ea = f
            if clamp is not None:
                wt, ct, at = min(wt, clamp), min(ct, clamp), min(at, clamp)
            if key in children or not 0 <= size <= cim.MAX_STREAM_LENGTH or (wt | ct | at) >> 63 or len(ea) > 0xFFFF:
                # replacing, a time or size out of range: the checked path says what is wrong
                self.add_local_files(directory, [_scanned_metadata(f)])
                continue
            node = Node(
                pack(
                    0, len(ea), 0, wt, wt, ct, at, 0, placeholder | size if size else 0, 0, put_blob(ea) if ea else 0, 0
                ),
                is_dir=False,
            )
            children[key] = (name, node)
            node.nlink = 1
            if size:  # an empty file's record is final
                if src[:1] != "/":  # the process opens it later: the caller may chdir meanwhile
                    cwd = cwd or os.getcwd()
                    src = os.path.join(cwd, src)
                submit(node, src, size)

    def _start_copier(self) -> DataProcess | LocalCopier | None:
        """The data processes for local files, forked at the first one (None:
        this process copies them).  A consistent image always has a copier:
        its lanes decide where contents go (in-process when nothing can be
        forked), whatever copies them."""
        n = self._use_process
        if n and DataProcess.available():
            self._process = DataProcess(self._store, None if n is True else int(n))
        elif self.consistent:
            self._process = LocalCopier(self._store)
        return self._process

    def _add_file_async(self, path: str, meta: FileMetadata, src: BinaryIO, fd: int) -> None:
        """The contents of a regular file go through the data pump; the node
        gets its stream when the copy is done (at the latest before commit)."""
        pos = src.tell()
        self._submit(path, meta, os.dup(fd), pos)
        src.seek(pos + meta.file_size)

    def _add_local_file(self, path: str, src: str | bytes, meta: FileMetadata) -> None:
        if isinstance(src, bytes):
            src = os.fsdecode(src)
        if not meta.file_size:
            try:
                st = os.lstat(src)
            except OSError as e:
                raise CimError(hresult_from_oserror(e), f"cannot stat the source {src!r}: {e.strerror}", path) from None
            if not stat.S_ISREG(st.st_mode):
                raise CimError(E_INVALIDARG, f"source {src!r} is not a regular file", path)
            if not st.st_size:
                self.create_file(path, meta).close()
                return
            meta = dataclasses.replace(meta, file_size=st.st_size)
        if self._process is None:
            self._start_copier()
        if self._process is not None and not self._process.done:
            if self._process.failed():
                self._finish_copies()  # raises the copy's error now, not at commit
            node, size = self._create_copied(path, meta)
            if src[:1] != "/":  # the process opens it later: the caller may chdir meanwhile (POSIX: fork)
                src = os.path.join(os.getcwd(), src)
            self._process.submit(node, src, size)
        elif meta.file_size <= SMALL_DATA_MAX:
            # No data process: a thread would only contend for the GIL over a small file.
            fd = open_source(src, path)
            try:
                data = read_exactly(fd, 0, meta.file_size, path)
            finally:
                os.close(fd)
            self.add_file(path, data, meta)
        else:
            self._submit(path, meta, src, 0)

    def _create_copied(self, path: str, meta: FileMetadata) -> tuple[_Node, int]:
        """A new file whose contents a data thread or process copies later:
        until then its stream is a placeholder of the right size (reads as
        zeros), and its record is kept packed."""
        return self._create(path, meta, placeholder=True)

    def _submit(self, path: str, meta: FileMetadata, source: int | str, pos: int) -> None:
        """A file whose contents the data pump copies from ``source``; until it
        has, its stream reads as zeros (the pump is drained before commit)."""
        if self.consistent:
            # No data thread: it would number its regions in whatever order
            # it and this thread get to them.
            self._copy_now(path, meta, source, pos)
            return
        try:
            self._check_pump()
            node, size = self._create_copied(path, meta)
        except BaseException:
            if isinstance(source, int):
                os.close(source)
            raise
        if self._pump is None:
            self._pump = DataPump(self._store)
        self._pump.submit(node, source, pos, size, path)

    def _copy_now(self, path: str, meta: FileMetadata, source: int | str, pos: int) -> None:
        fd = source
        try:
            if not isinstance(fd, int):
                fd = open_source(fd, path)
            with self.create_file(path, meta) as s:
                done = 0
                while done < s.size:
                    chunk = read_exactly(fd, pos + done, min(s.size - done, 1 << 20), path)
                    s.write(chunk)
                    done += len(chunk)
        finally:
            if isinstance(fd, int):
                os.close(fd)

    def _check_pump(self) -> None:
        if self._pump is not None and self._pump.error is not None:
            self._drain()

    def _drain(self) -> None:
        if self._pump is not None:
            self._pump.drain()

    def _finish_copies(self) -> None:
        """Every file's contents in place: the data thread drained, the data process finished."""
        self._drain()
        if self._process is not None and not self._process.done:
            # Records get these offsets as the commit writes its file tables
            # (the serial tail of a commit: no per-file record copy here).
            self._copied = self._process.finish(self._path_of)

    def add_stream(self, path: str, data: bytes | BinaryIO) -> None:
        """Add an alternate stream ``file:stream`` from bytes or a file object."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = data.read()
        with self.create_stream(path, len(data)) as s:
            s.write(data)


def _scanned_metadata(f: tuple) -> tuple:
    """An :meth:`ImageWriter.add_scanned_files` entry as an :meth:`~ImageWriter.add_local_files` one."""
    name, _, src, size, wt, ct, at, ea = f
    return name, src, FileMetadata(0, size, wt, wt, ct, at, b"", b"", ea)


def _regular_file_fd(f: BinaryIO) -> int | None:
    try:
        fd = f.fileno()
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (AttributeError, OSError, ValueError):
        return None


def _size_of(f: BinaryIO) -> int | None:
    try:
        fd = f.fileno()
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return st.st_size - f.tell()
    except (AttributeError, OSError, ValueError):
        pass
    try:
        pos = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(pos)
        return end - pos
    except (AttributeError, OSError, ValueError):
        return None


def _copy_into(src: BinaryIO, stream: StreamWriter) -> None:
    remaining = stream.size
    buf = bytearray(min(remaining, 1 << 20) or 1)
    view = memoryview(buf)
    readinto = getattr(src, "readinto", None)
    while remaining:
        want = min(remaining, len(buf))
        if readinto is not None:
            n = readinto(view[:want])
            chunk = view[:n] if n else b""
        else:
            chunk = src.read(want)
            n = len(chunk)
        if not n:
            raise CimError(E_INVALIDARG, f"source ended {remaining} bytes before the declared size", stream.path)
        stream.write(chunk)
        remaining -= n
