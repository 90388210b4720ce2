"""The Win32-shaped API of ``cimfs.h``: a thin facade over :mod:`cimfs.writer`
(and :mod:`cimfs.merged`; the mount calls ``CimMountImage``, ``CimMergeMountImage``
and ``CimDismountImage`` live with the mounts in :mod:`cimfs.mount`).

Handles are opaque objects; every call checks that it got a live handle of the
right kind (``E_HANDLE`` otherwise) and failures are :class:`CimError` carrying
the HRESULT Windows would return.
"""

from __future__ import annotations

import enum
import functools
import operator
import os
from typing import TYPE_CHECKING, NamedTuple

from . import merged
from .errors import E_HANDLE, E_INVALIDARG, E_NOTIMPL, CimError
from .metadata import FileMetadata
from .writer import ImageWriter, StreamWriter

if TYPE_CHECKING:  # annotations only
    from _typeshed import WriteableBuffer

    from .reader import Image


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


def _writer(image: object) -> ImageWriter:
    if not isinstance(image, CIMFS_IMAGE_HANDLE) or image._writer is None:
        raise CimError(E_HANDLE, "not an open image handle", repr(image))
    return image._writer


def _stream(stream: object) -> StreamWriter:
    if not isinstance(stream, CIMFS_STREAM_HANDLE) or stream._stream is None:
        raise CimError(E_HANDLE, "not an open stream handle", repr(stream))
    return stream._stream


def CimCreateImage(
    image_containing_path: str | os.PathLike[str],
    existing_image_name: str | None = None,
    new_image_name: str | None = None,
) -> CIMFS_IMAGE_HANDLE:
    """A new image (``existing`` None), an extension of ``existing`` (``new`` None
    or equal) or a fork of it (both given, different)."""
    if not existing_image_name and not new_image_name:
        raise CimError(
            E_INVALIDARG, "neither an existing nor a new image name was given", os.fspath(image_containing_path)
        )
    return CIMFS_IMAGE_HANDLE(
        ImageWriter(image_containing_path, new_image_name or existing_image_name, existing_image_name or None)
    )


def CimCreateFile(image: CIMFS_IMAGE_HANDLE, image_relative_path: str, metadata: FileMetadata) -> CIMFS_STREAM_HANDLE:
    if not isinstance(metadata, FileMetadata):
        raise CimError(E_INVALIDARG, "metadata must be a FileMetadata", image_relative_path)
    return CIMFS_STREAM_HANDLE(_writer(image).create_file(image_relative_path, metadata))


def CimWriteStream(stream: CIMFS_STREAM_HANDLE, data: bytes | bytearray | memoryview) -> None:
    _stream(stream).write(data)


def CimCloseStream(stream: CIMFS_STREAM_HANDLE) -> None:
    s = _stream(stream)
    stream._stream = None
    s.close()


def CimCreateAlternateStream(image: CIMFS_IMAGE_HANDLE, image_relative_path: str, size: int) -> CIMFS_STREAM_HANDLE:
    return CIMFS_STREAM_HANDLE(_writer(image).create_stream(image_relative_path, size))


def CimCreateHardLink(image: CIMFS_IMAGE_HANDLE, image_relative_path: str, existing_image_relative_path: str) -> None:
    _writer(image).link(image_relative_path, existing_image_relative_path)


def CimDeletePath(image: CIMFS_IMAGE_HANDLE, image_relative_path: str) -> None:
    _writer(image).delete(image_relative_path)


def CimCommitImage(image: CIMFS_IMAGE_HANDLE) -> None:
    _writer(image).commit()


def CimCloseImage(image: CIMFS_IMAGE_HANDLE) -> None:
    w = _writer(image)
    image._writer = None
    w.close()


def CimTombstoneFile(image: CIMFS_IMAGE_HANDLE, image_relative_path: str) -> None:
    """Mark ``path`` deleted from the layers below (see :meth:`ImageWriter.tombstone`)."""
    _writer(image).tombstone(image_relative_path)


def CimCreateMergeLink(image: CIMFS_IMAGE_HANDLE, image_relative_path: str, existing_image_relative_path: str) -> None:
    """A hard link to a file of the layers below, resolved when images are merged."""
    _writer(image).merge_link(image_relative_path, existing_image_relative_path)


def CimAddFsToMergedImage(image: CIMFS_IMAGE_HANDLE, image_path: str | os.PathLike[str]) -> None:
    """Add a source (top layer first) to a merged image made by ``CimCreateImage(dir, None, name)``."""
    merged.add_source(_writer(image), image_path, 0)


def CimAddFsToMergedImage2(image: CIMFS_IMAGE_HANDLE, image_path: str | os.PathLike[str], flags: int = 0) -> None:
    merged.add_source(_writer(image), image_path, flags)


# ---------------------------------------------------------------- newer calls: CimCreateImage2, the Windows 11 read API
class CimCreateFlags(enum.IntFlag):
    """``CimCreateImage2`` flags (values as hcsshim's ``pkg/cimfs`` defines them)."""

    NONE = 0x0
    DO_NOT_EXPAND_PE_IMAGES = 0x1
    FIXED_SIZE_CHUNKS = 0x2
    BLOCK_DEVICE_CIM = 0x4
    SINGLE_FILE_CIM = 0x8
    CONSISTENT_CIM = 0x10
    VERIFIED_CIM = 0x40


# Layouts Microsoft has not published: refused rather than imitated.
_UNPUBLISHED_LAYOUTS = {
    CimCreateFlags.FIXED_SIZE_CHUNKS: "fixed-size chunks",
    CimCreateFlags.BLOCK_DEVICE_CIM: "block-device CIMs",
    CimCreateFlags.SINGLE_FILE_CIM: "single-file CIMs",
    CimCreateFlags.VERIFIED_CIM: "verified CIMs",
}
_ALL_CREATE_FLAGS = int(functools.reduce(operator.or_, CimCreateFlags))


def CimCreateImage2(
    image_containing_path: str | os.PathLike[str],
    flags: int,
    existing_image_name: str | None = None,
    new_image_name: str | None = None,
) -> CIMFS_IMAGE_HANDLE:
    """``CimCreateImage`` with flags.  ``DO_NOT_EXPAND_PE_IMAGES`` is accepted
    (cimfs never expands PE images); ``CONSISTENT_CIM`` writes a consistent
    image (``cimfs.create(..., consistent=True)``); the block, single-file,
    verified and fixed-size-chunk layouts are not public: ``E_NOTIMPL``."""
    where = os.fspath(image_containing_path)
    if not isinstance(flags, int) or isinstance(flags, bool) or flags < 0 or flags & ~_ALL_CREATE_FLAGS:
        raise CimError(E_INVALIDARG, f"unknown CimCreateImage2 flags {flags!r}", where)
    unpublished = [what for flag, what in _UNPUBLISHED_LAYOUTS.items() if flags & flag]
    if unpublished:
        raise CimError(
            E_NOTIMPL,
            f"{', '.join(unpublished)}: their on-disk layout is not public, so cimfs cannot write them",
            where,
        )
    if not existing_image_name and not new_image_name:
        raise CimError(E_INVALIDARG, "neither an existing nor a new image name was given", where)
    return CIMFS_IMAGE_HANDLE(
        ImageWriter(
            image_containing_path,
            new_image_name or existing_image_name,
            existing_image_name or None,
            consistent=bool(flags & CimCreateFlags.CONSISTENT_CIM),
        )
    )


class FILE_STAT_BASIC_INFORMATION(NamedTuple):
    """What ``CimGetFileStatBasicInformation`` returns (ntifs.h field names and order)."""

    FileId: int
    CreationTime: int
    LastAccessTime: int
    LastWriteTime: int
    ChangeTime: int
    AllocationSize: int
    EndOfFile: int
    FileAttributes: int
    ReparseTag: int
    NumberOfLinks: int
    DeviceType: int
    DeviceCharacteristics: int
    Reserved: int
    VolumeSerialNumber: int
    FileId128: bytes


# [choice] What an image reports where it has no NTFS volume behind it.
FILE_DEVICE_DISK = 0x7
FILE_READ_ONLY_DEVICE = 0x2
_ALLOCATION_UNIT = 4096  # a data region's alignment


def _open_for_read(image_path: str | os.PathLike[str]) -> Image:
    from . import reader  # start-up time: only the read calls need the reader

    return reader.Image(image_path)


def CimReadFile(
    image_path: str | os.PathLike[str], file_path: str, offset: int, buffer: WriteableBuffer
) -> tuple[int, int]:
    """Read ``file_path`` (``file:stream`` for an alternate stream) of the
    image at ``image_path`` from ``offset`` into ``buffer`` (any writable
    bytes-like object) without an image handle.  Returns ``(bytes_read,
    bytes_remaining)``: remaining counts the bytes after what was read."""
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise CimError(E_INVALIDARG, f"offset {offset!r} is not a byte offset", file_path)
    try:
        view = memoryview(buffer)
    except TypeError:
        raise CimError(E_INVALIDARG, "buffer is not a bytes-like object", file_path) from None
    if view.readonly:
        raise CimError(E_INVALIDARG, "buffer is read-only", file_path)
    if not view.c_contiguous:
        raise CimError(E_INVALIDARG, "buffer is not contiguous", file_path)
    with _open_for_read(image_path) as image:
        desc = image.stream_descriptor(file_path)
        n = image.readinto_at(desc, offset, view.cast("B"))
        return n, max(desc.length - offset - n, 0)


def CimGetFileStatBasicInformation(image_path: str | os.PathLike[str], file_path: str) -> FILE_STAT_BASIC_INFORMATION:
    """The ``FILE_STAT_BASIC_INFORMATION`` of ``file_path`` in the image at
    ``image_path``, without an image handle; for ``file:stream`` the sizes
    are the alternate stream's."""
    with _open_for_read(image_path) as image:
        st = image.stat(file_path)
        size, sparse = (0, False) if st.is_dir else (st.size, st.is_sparse)
        if ":" in file_path.replace("/", "\\").rpartition("\\")[2]:
            desc = image.stream_descriptor(file_path)
            size, sparse = desc.length, desc.sparse
        serial = int.from_bytes(image.header.region_set.id.bytes_le[:4], "little")
    allocation = 0 if sparse else -(-size // _ALLOCATION_UNIT) * _ALLOCATION_UNIT
    return FILE_STAT_BASIC_INFORMATION(
        st.file_id,
        st.creation_time,
        st.last_access_time,
        st.last_write_time,
        st.change_time,
        allocation,
        size,
        st.attributes,
        st.reparse_tag,
        st.nlink,
        FILE_DEVICE_DISK,
        FILE_READ_ONLY_DEVICE,
        0,
        serial,
        st.file_id.to_bytes(16, "little"),
    )
