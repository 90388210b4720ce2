"""The Win32-shaped API of ``cimfs.h``: a thin facade over :mod:`cimfs.writer`.

Handles are opaque objects; every call checks that it got a live handle of the
right kind (``E_HANDLE`` otherwise) and failures are :class:`CimError` carrying
the HRESULT Windows would return.
"""

from __future__ import annotations

import os
import uuid

from .errors import E_HANDLE, E_INVALIDARG, CimError
from .metadata import FileMetadata
from .writer import ImageWriter, StreamWriter


class CIMFS_IMAGE_HANDLE:
    __slots__ = ("_writer",)

    def __init__(self, writer: ImageWriter):
        self._writer: ImageWriter | None = writer

    def __repr__(self) -> str:
        w = self._writer
        return f"<CIMFS_IMAGE_HANDLE {w.path if w else 'closed'}>"


class CIMFS_STREAM_HANDLE:
    __slots__ = ("_stream",)

    def __init__(self, stream: StreamWriter):
        self._stream: StreamWriter | None = stream

    def __repr__(self) -> str:
        s = self._stream
        return f"<CIMFS_STREAM_HANDLE {s.path if s else 'closed'}>"


def _writer(image) -> ImageWriter:
    if not isinstance(image, CIMFS_IMAGE_HANDLE) or image._writer is None:
        raise CimError(E_HANDLE, "not an open image handle", repr(image))
    return image._writer


def _stream(stream) -> StreamWriter:
    if not isinstance(stream, CIMFS_STREAM_HANDLE) or stream._stream is None:
        raise CimError(E_HANDLE, "not an open stream handle", repr(stream))
    return stream._stream


def CimCreateImage(image_containing_path, existing_image_name=None, new_image_name=None) -> CIMFS_IMAGE_HANDLE:
    """A new image (``existing`` None), an extension of ``existing`` (``new`` None
    or equal) or a fork of it (both given, different)."""
    if not existing_image_name and not new_image_name:
        raise CimError(E_INVALIDARG, "neither an existing nor a new image name was given", os.fspath(image_containing_path))
    return CIMFS_IMAGE_HANDLE(ImageWriter(image_containing_path, new_image_name or existing_image_name, existing_image_name or None))


def CimCreateFile(image, image_relative_path: str, metadata: FileMetadata) -> CIMFS_STREAM_HANDLE:
    if not isinstance(metadata, FileMetadata):
        raise CimError(E_INVALIDARG, "metadata must be a FileMetadata", image_relative_path)
    return CIMFS_STREAM_HANDLE(_writer(image).create_file(image_relative_path, metadata))


def CimWriteStream(stream, data) -> None:
    _stream(stream).write(data)


def CimCloseStream(stream) -> None:
    s = _stream(stream)
    stream._stream = None
    s.close()


def CimCreateAlternateStream(image, image_relative_path: str, size: int) -> CIMFS_STREAM_HANDLE:
    return CIMFS_STREAM_HANDLE(_writer(image).create_stream(image_relative_path, size))


def CimCreateHardLink(image, image_relative_path: str, existing_image_relative_path: str) -> None:
    _writer(image).link(image_relative_path, existing_image_relative_path)


def CimDeletePath(image, image_relative_path: str) -> None:
    _writer(image).delete(image_relative_path)


def CimCommitImage(image) -> None:
    _writer(image).commit()


def CimCloseImage(image) -> None:
    w = _writer(image)
    image._writer = None
    w.close()


def CimTombstoneFile(image, image_relative_path: str) -> None:
    """Mark ``path`` deleted from the layers below (see :meth:`ImageWriter.tombstone`)."""
    _writer(image).tombstone(image_relative_path)


def CimCreateMergeLink(image, image_relative_path: str, existing_image_relative_path: str) -> None:
    """A hard link to a file of the layers below, resolved when images are merged."""
    _writer(image).merge_link(image_relative_path, existing_image_relative_path)


def CimAddFsToMergedImage(image, image_path) -> None:
    """Add a source (top layer first) to a merged image made by ``CimCreateImage(dir, None, name)``."""
    _writer(image).add_merge_source(image_path, 0)


def CimAddFsToMergedImage2(image, image_path, flags: int = 0) -> None:
    _writer(image).add_merge_source(image_path, flags)


def CimMountImage(image_containing_path, image_name, flags: int = 0, volume_id: uuid.UUID | None = None, *, mountpoint) -> uuid.UUID:
    """Mount read-only with FUSE; returns the volume id (see :mod:`cimfs.mount`)."""
    from .mount import CimMountImage as _mount

    return _mount(image_containing_path, image_name, flags, volume_id, mountpoint=mountpoint)


def CimMergeMountImage(paths, flags: int = 0, volume_id: uuid.UUID | None = None, *, mountpoint) -> uuid.UUID:
    """Mount the merged view of ``paths`` (top layer first); see :mod:`cimfs.mount`."""
    from .mount import CimMergeMountImage as _merge_mount

    return _merge_mount(paths, flags, volume_id, mountpoint=mountpoint)


def CimDismountImage(volume_id: uuid.UUID) -> None:
    from .mount import CimDismountImage as _dismount

    return _dismount(volume_id)
