"""Writing CIM images: the one core behind :func:`cimfs.create` and the Win32 facade.

This module owns editing an image's tree.  An :class:`ImageWriter` holds the
containing directory locked, keeps the directory tree in memory (files,
directories, hard links, alternate streams, deletions, tombstones and merge
links), and streams file contents straight into a new region set as they
arrive (de-duplicated by SHA-256 against this image and, for forks, against
the parent chain's object ID files).  Its commit hands the finished tree to
:class:`cimfs.commit.ImageCommit`, which serialises and publishes it.

A fork or an extension loads its parent lazily: only the directories a change
touches are read, and only the file tables holding a changed record are
written again, so committing a fork costs what changed, not the parent's size.

This module owns the handle: opening (new, fork or extension, the directory
lock), its state, commit, close and ``create``.  ``ImageWriter`` inherits its
other methods, one concern per module, each base building on the one before:

- :mod:`cimfs.writetree`: the tree model (``_Node``), paths walked and cached, records;
- :mod:`cimfs.writeedit`: the Win32-shaped edits, tombstones, merge links, merge marks;
- :mod:`cimfs.writefiles`: the Pythonic conveniences and the copying of local files;
- :mod:`cimfs.writestream`: ``StreamWriter``, an open stream's bytes into the store.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable
from types import TracebackType

from . import reader as _reader
from .bulk import paused_gc
from .commit import COMMIT_TEMP_NAME, ImageCommit
from .commit import EMPTY_DIR_STREAM as _DIR_STREAM
from .errors import (
    E_ACCESSDENIED,
    E_FAIL,
    E_HANDLE,
    E_INVALIDARG,
    ERROR_FILE_EXISTS,
    ERROR_FILE_NOT_FOUND,
    ERROR_INVALID_NAME,
    ERROR_PATH_NOT_FOUND,
    ERROR_SHARING_VIOLATION,
    CimError,
    hresult_from_oserror,
)
from .layout import cim
from .names import NameFolder
from .store import DataProcess, DataPump, LocalCopier, ObjectStore
from .writefiles import FileAdding
from .writestream import StreamWriter
from .writetree import _Node


# ====================================================================== locking
class DirectoryLock:
    """One image handle per containing directory, across threads and processes.

    ``flock`` locks belong to an open file description, so a second open of the
    same directory conflicts even inside one process.
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = -1
            raise CimError(ERROR_SHARING_VIOLATION, "another image handle holds this directory", path) from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the lock
            self.fd = -1

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


# ====================================================================== the writer
class ImageWriter(FileAdding):
    """A new image, a fork of ``base`` or an extension of it (``base == name``)."""

    def __init__(
        self,
        containing_dir: str | os.PathLike,
        name: str | None,
        base: str | None = None,
        *,
        sync: bool = True,
        data_process: bool | int = True,
        consistent: bool = False,
        clamp_time: int | None = None,
    ) -> None:
        directory = os.fspath(containing_dir)
        name = name or base
        if not name:
            raise CimError(E_INVALIDARG, "neither an existing nor a new image name was given", directory)
        try:
            st = os.stat(directory)
        except PermissionError:
            raise CimError(E_ACCESSDENIED, "no access to the containing directory", directory) from None
        except OSError:
            raise CimError(ERROR_PATH_NOT_FOUND, "containing directory does not exist", directory) from None
        if not stat.S_ISDIR(st.st_mode):
            raise CimError(ERROR_PATH_NOT_FOUND, "containing path is not a directory", directory)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise CimError(E_ACCESSDENIED, "no write access to the containing directory", directory)
        for n in filter(None, (name, base)):
            if os.sep in n or (os.altsep and os.altsep in n) or n in (".", ".."):
                raise CimError(ERROR_INVALID_NAME, "an image name is a file name, not a path", n)
        if name != base and (cim.REGION_FILE_NAME.match(name) or COMMIT_TEMP_NAME.match(name)):
            # gc/rm recognise images by their header whatever their name; a
            # commit's leftover temporary file they remove, and a region
            # file's name on an image would only mislead.
            raise CimError(
                ERROR_INVALID_NAME,
                "the name of a region file or of a commit's temporary file cannot name an image",
                name,
            )
        self.directory = os.path.abspath(directory)
        self.name = name
        self.path = os.path.join(self.directory, name)
        self.extending = bool(base) and base == name
        self._sync = sync
        # data_process: True, as many data processes as the machine has cores; an int, that many (0: none).
        self.consistent = bool(consistent)
        if clamp_time is not None and not (isinstance(clamp_time, int) and 0 <= clamp_time < 1 << 63):
            raise CimError(E_INVALIDARG, f"clamp time {clamp_time!r} is not a FILETIME", directory)
        self._clamp_time = clamp_time
        self._lock = DirectoryLock(self.directory)
        self._base: _reader.Image | None = None
        self._committed = False
        self._commit_error: str | None = None
        self._closed = False
        self._open_stream: StreamWriter | None = None
        self._pump: DataPump | None = None
        self._process: DataProcess | LocalCopier | None = None
        self._copied: list = []  # per data process: (nodes, RegionOffsets of their contents) (see _commit)
        self._use_process = data_process
        # A merged image's sources, top first, and what builds its tree at commit
        # (both set by cimfs.merged.add_source: merging is a client of the writer).
        self._merge_sources: list[str] = []
        self._build_merged: Callable[[], tuple[list, int]] | None = None
        self._merge_dir_flags: dict = {}  # directory node -> its merge marker's flags (make_opaque ...)
        try:
            if base:
                base_path = os.path.join(self.directory, base)
                if not os.path.exists(base_path):
                    raise CimError(ERROR_FILE_NOT_FOUND, "existing image not found", base_path)
                if not self.extending and os.path.lexists(self.path):
                    raise CimError(ERROR_FILE_EXISTS, "the new image already exists", self.path)
                self._base = _reader.Image(base_path)
            elif os.path.lexists(self.path):
                # [choice] CimCreateImage with only a new name that exists: refuse
                # rather than silently replace an image others may fork from.
                raise CimError(ERROR_FILE_EXISTS, "an image of that name already exists", self.path)
            self._store = ObjectStore(self.directory, self._base, sync, consistent=self.consistent)
            self._base_nodes: dict[int, _Node] = {}
            # Directories looked up by path ("a\\b" -> node), so importers adding
            # to one directory after another do not walk from the root each time.
            # Only _unlink removes nodes from the tree, and it empties this.
            self._dir_cache: dict[str, _Node] = {}
            if self._base is not None:
                self._folder = self._base._folder
                self._root = self._base_node(self._base.root_id)
            else:
                self._folder = NameFolder.for_table(cim.load_upcase_table())
                self._root = _Node(cim.FileRecord(stream=_DIR_STREAM))
                self._root.nlink = 1
        except PermissionError as e:
            self._release()
            raise CimError(E_ACCESSDENIED, e.strerror or "permission denied", e.filename or self.directory) from None
        except BaseException:
            self._release()
            raise

    # ------------------------------------------------------------ state
    def _check_open(self, mutating: bool = True, committing: bool = False) -> None:
        if self._closed:
            raise CimError(E_HANDLE, "image handle is closed", self.path)
        if mutating and self._merge_sources and not committing:
            raise CimError(E_INVALIDARG, "a merged image has no changes of its own, only its sources", self.path)
        if mutating and self._committed:
            raise CimError(E_INVALIDARG, "image is already committed; no further change is allowed", self.path)
        if mutating and self._commit_error is not None:
            # The data processes are gone and the store may be half finished:
            # another commit would publish records whose contents were never written.
            raise CimError(
                E_FAIL, f"an earlier commit failed ({self._commit_error}); close the image and start again", self.path
            )
        if mutating and self._open_stream is not None:
            raise CimError(ERROR_SHARING_VIOLATION, f"a stream is still open on {self._open_stream.path!r}", self.path)

    @property
    def committed(self) -> bool:
        return self._committed

    @property
    def base(self) -> _reader.Image | None:
        """A reader on the image this writer forks or extends (None for a new
        image), open until the writer closes: reading the parent while adding
        to it (``posix.Importer``'s ``base``) needs no second open of it."""
        return self._base

    # ------------------------------------------------------------ commit
    def commit(self) -> str:
        """Write the image (crash-safely) and return the ``.cim`` path."""
        self._check_open(committing=True)
        try:
            try:
                self._drain()  # the data thread sets records; the commit patches them next
                with paused_gc():
                    self._commit(self._build_merged() if self._build_merged is not None else None)
            except PermissionError as e:
                raise CimError(E_ACCESSDENIED, e.strerror or "permission denied", e.filename or self.path) from None
            except OSError as e:
                if isinstance(e, CimError):
                    raise
                raise CimError(
                    hresult_from_oserror(e), f"commit failed: {e.strerror or e}", e.filename or self.path
                ) from None
        except BaseException as e:
            self._commit_error = str(e) or type(e).__name__
            raise
        self._committed = True
        return self.path

    def _commit(self, merged: tuple[list, int] | None = None) -> None:
        """``merged``: (the sources' region sets, the upcase table's offset) of a merged image."""
        if self._process is not None:
            # The last files' batches go out before the tables are packed: a
            # data process that had caught up would wait for them meanwhile.
            self._process.end_input()
        ImageCommit(
            self.directory,
            self.name,
            root=self._root,
            base=self._base,
            store=self._store,
            extending=self.extending,
            sync=self._sync,
        ).run(self._copies_done, merged)

    def _copies_done(self) -> list:
        """Wait for the contents still being copied; per data process, (nodes, RegionOffsets)."""
        self._finish_copies()
        copied, self._copied = self._copied, []
        return copied

    # ------------------------------------------------------------ close
    def _release(self) -> None:
        # The loaded tree goes now, not with the handle: a caller may keep the
        # handle (stats()), and while the cyclic GC is paused (paused_gc) the
        # nodes are freed by reference counting instead of all being scanned
        # by the first collection after it (~60 ms for 60 000 files).
        self._root = None  # type: ignore[assignment]  # a released handle walks no tree (_check_open refuses)
        self._dir_cache = {}
        self._base_nodes = {}
        self._copied = []
        if self._base is not None:
            self._base.close()
            self._base = None
        if getattr(self, "_lock", None) is not None:
            self._lock.release()

    def close(self) -> None:
        """Free the handle; uncommitted changes (and their region files) are discarded."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._pump is not None:
                self._pump.stop()
                self._pump = None
            if self._process is not None and not self._process.done:
                self._process.abandon()  # before its region files are removed
            store = getattr(self, "_store", None)  # none if __init__ failed before making it
            if not self._committed and store is not None:
                store.abandon()
        finally:
            self._release()

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with paused_gc():  # commit and free the tree in one pause (see _release)
            try:
                if exc_type is None and not self._committed and not self._closed:
                    if self._open_stream is not None:
                        self._open_stream.close()
                    self.commit()
            finally:
                self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass

    # ------------------------------------------------------------ statistics
    def stats(self) -> dict:
        """Bytes callers stored, bytes written after dedup, region files.
        Before commit this waits for the contents still being copied."""
        if not self._committed and not self._closed:
            self._finish_copies()
        s = self._store
        return {"bytes_logical": s.bytes_logical, "bytes_stored": s.bytes_stored, "region_files": s.region_count()}


def create(
    containing_dir: str | os.PathLike,
    name: str,
    base: str | os.PathLike | None = None,
    *,
    sync: bool = True,
    data_process: bool | int = True,
    consistent: bool = False,
    clamp_time: int | None = None,
) -> ImageWriter:
    """A writer for the image ``name`` in ``containing_dir``; with ``base`` a fork
    of that image (or its extension when ``base == name``).  As a context
    manager it commits on a clean exit and discards everything on an exception.

    ``base`` is a name in ``containing_dir`` (a path to it is accepted): a fork
    shares its parent's region files, so both live in one directory.

    Local files added by path are copied by a forked data process (when the
    caller runs no other thread); ``data_process=False`` copies them in this
    process instead, an int sets how many processes.

    ``consistent=True`` (``CONSISTENT_CIM``): the same calls give the same
    files, byte for byte and by name, however the contents are copied.
    ``clamp_time`` (FILETIME) caps every time stored (``SOURCE_DATE_EPOCH``).
    """
    if base is not None:
        base = os.fspath(base)
        if os.path.dirname(base):
            if os.path.abspath(os.path.dirname(base)) != os.path.abspath(os.fspath(containing_dir)):
                raise CimError(E_INVALIDARG, "a fork's parent must be in the same directory as the fork", base)
            base = os.path.basename(base)
    return ImageWriter(
        containing_dir, name, base, sync=sync, data_process=data_process, consistent=consistent, clamp_time=clamp_time
    )
