"""``cim://``: the inside of a CIM image as a read-only fsspec filesystem.

::

    fs = fsspec.filesystem("cim", fo="layer.cim")
    fs.ls("Files")
    with fsspec.open("cim://Files/data.csv::s3://bucket/layer.cim") as f:
        ...

Registered under the protocol ``cim`` through the ``fsspec.specs`` entry
point.  The image itself may be local (read through the mapped local reader)
or on any fsspec filesystem (``target_protocol``/``target_options``, or a
chained URL); it is read lazily in both cases: listing a directory reads that
directory's link table and records, not the whole tree.

Paths use ``/`` and are relative to the image's root (``""``); names are
looked up case-insensitively with the image's own upcase table, and listings
give names as stored.  ``path:stream`` names an alternate data stream.
"""

from __future__ import annotations

import errno
import os

from fsspec.archive import AbstractArchiveFileSystem
from fsspec.spec import AbstractBufferedFile

from . import posix
from .errors import ERROR_FILE_NOT_FOUND, ERROR_PATH_NOT_FOUND, CimError
from .metadata import filetime_to_ns
from .reader import Image
from .remote import RemoteStorage, is_url
from .remote_fetch import TIMEOUT_OPTIONS, split_options
from .tools import split_stream

_NOT_FOUND = (ERROR_FILE_NOT_FOUND, ERROR_PATH_NOT_FOUND)
_LOCAL_PROTOCOLS = (None, "file", "local")


class ReadOnlyError(PermissionError, ValueError):
    """Raised by every writing call: an ``OSError`` (``EROFS``), and a
    ``ValueError`` as ``tar://`` and ``libarchive://`` raise for writes."""

    def __init__(self, path):
        super().__init__(errno.EROFS, "cim:// is a read-only filesystem implementation", str(path))


class CimFileSystem(AbstractArchiveFileSystem):
    """A CIM image's tree as an fsspec filesystem (read-only).

    ``fo``: the image: a local path, an fsspec URL (with ``target_options``
    as its storage options), a path on ``target_protocol``'s filesystem, or an
    open :class:`cimfs.Image` (not closed by this filesystem).
    ``cache_dir`` keeps a remote image's fetched blocks on local disk.
    ``target_options`` may carry the remote reads' time limits
    (``connect_timeout``, ``read_timeout``, ``request_timeout``).
    """

    protocol = "cim"
    root_marker = ""
    cachable = False

    def __init__(self, fo="", mode="r", target_protocol=None, target_options=None, cache_dir=None, **kwargs):
        super().__init__(**kwargs)
        if mode != "r":
            raise ReadOnlyError(fo)
        self._owns_image = not isinstance(fo, Image)
        if isinstance(fo, Image):
            self.image = fo
        else:
            fo = os.fspath(fo)
            if target_protocol in _LOCAL_PROTOCOLS and not is_url(fo):
                self.image = Image(fo)
            elif target_protocol in _LOCAL_PROTOCOLS:
                from .reader import (
                    open as open_image,  # start-up time: fsspec imports this module to learn the protocol
                )

                self.image = open_image(fo, target_options, cache_dir=cache_dir)
            else:
                import fsspec  # optional dependency (cimfs[remote])

                limits = {k: v for k, v in (target_options or {}).items() if k in TIMEOUT_OPTIONS}
                protocol = target_protocol if isinstance(target_protocol, str) else target_protocol[0]
                _, backend_options = split_options(f"{protocol}://", target_options)
                target = fsspec.filesystem(target_protocol, **backend_options)
                storage = RemoteStorage(fo, limits, filesystem=target, cache_dir=cache_dir)
                try:
                    self.image = Image(storage.url, storage=storage)
                except BaseException:
                    storage.close()
                    raise
        self.fo = self.image.path
        self.dir_cache = None

    @classmethod
    def _strip_protocol(cls, path):
        # image paths are always relative to the image's root
        return super()._strip_protocol(path).replace("\\", "/").strip("/")

    def close(self) -> None:
        """Closes the image (when this filesystem opened it)."""
        if self._owns_image:
            self.image.close()

    def __del__(self):
        if getattr(self, "_owns_image", False) and hasattr(self, "image"):
            self.image.close()

    # ------------------------------------------------------------ reading the tree
    def _lookup(self, path: str):
        """(FileID, stream name or None) of ``path``; FileNotFoundError when absent."""
        fpath, stream = split_stream(path)
        try:
            fid = self.image.lookup(fpath) if fpath else self.image.root_id
            if stream is not None:
                self.image.stream_descriptor(fid, stream)  # raises when there is no such stream
        except CimError as e:
            if e.hresult in _NOT_FOUND:
                raise FileNotFoundError(errno.ENOENT, e.strerror, path) from None
            raise
        return fid, stream

    def _entry(self, name: str, fid: int, stream: str | None = None) -> dict:
        st = self.image.stat(fid, links=False)
        if stream is not None:
            return {
                "name": name,
                "size": self.image.stream_size(fid, stream),
                "type": "file",
                "file_id": fid,
                "stream": stream,
                "mtime": filetime_to_ns(st.last_write_time) / 1e9,
            }
        kind = posix.posix_info(st).kind
        return {
            "name": name,
            "size": st.size,
            "type": "directory" if st.is_dir else "file",
            "kind": kind,
            "islink": kind == posix.SYMLINK,
            "file_id": fid,
            "attributes": int(st.attributes),
            "mtime": filetime_to_ns(st.last_write_time) / 1e9,
            "created": filetime_to_ns(st.creation_time) / 1e9,
            "stream_count": st.stream_count,
        }

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        fid, stream = self._lookup(path)
        return self._entry(path, fid, stream)

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        fid, stream = self._lookup(path)
        if stream is not None or not self.image.record(fid).is_dir:
            entries = [self._entry(path, fid, stream)]
        else:
            prefix = f"{path}/" if path else ""
            entries = [self._entry(prefix + e.name, e.file_id) for e in self.image.scandir(fid)]
        return entries if detail else [e["name"] for e in entries]

    def exists(self, path, **kwargs):
        try:
            self.info(path)
            return True
        except FileNotFoundError:
            return False

    def isdir(self, path):
        try:
            return self.info(path)["type"] == "directory"
        except FileNotFoundError:
            return False

    # ------------------------------------------------------------ reading bytes
    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if mode != "rb":
            raise ReadOnlyError(path)
        path = self._strip_protocol(path)
        fid, stream = self._lookup(path)
        if stream is None and self.image.record(fid).is_dir:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        kwargs.setdefault("cache_type", "none")  # the image reader caches (remote) or maps (local) already
        return CimBufferedFile(self, path, fid, stream, block_size=block_size, cache_options=cache_options, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        fid, stream = self._lookup(path)
        if stream is None and self.image.record(fid).is_dir:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        size = self.image.stream_size(fid, stream)
        start = 0 if start is None else (max(0, size + start) if start < 0 else start)
        end = size if end is None else (max(0, size + end) if end < 0 else min(end, size))
        if end <= start:
            return b""
        return self.image.read_at(fid, start, end - start, stream=stream)

    # ------------------------------------------------------------ writing: never
    def _readonly(self, path, *args, **kwargs):
        raise ReadOnlyError(path)

    mkdir = makedirs = rmdir = rm = rm_file = _rm = touch = pipe_file = put_file = _readonly
    cp_file = mv = copy = move = rename = _readonly


class CimBufferedFile(AbstractBufferedFile):
    """One stream of the image, read-only and seekable; reads are ranged."""

    def __init__(self, fs: CimFileSystem, path: str, file_id: int, stream: str | None, **kwargs):
        self._file_id = file_id
        self._stream = stream
        size = fs.image.stream_size(file_id, stream)
        super().__init__(fs, path, mode="rb", size=size, **kwargs)

    def _fetch_range(self, start, end):
        end = min(end, self.size)
        if end <= start:
            return b""
        return self.fs.image.read_at(self._file_id, start, end - start, stream=self._stream)
