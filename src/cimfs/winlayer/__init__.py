"""Windows container layer tars <-> CimFS images (spec §17, docs/WINDOWS-LAYERS.md).

A Windows layer tar is a PAX tar whose top-level directories are ``Files/``
(the file system), ``Hives/`` (registry hive deltas) and, in base layers,
sometimes ``UtilityVM/``.  They are kept as plain paths in the image
(``Files\\Windows\\...``).  Windows metadata travels in PAX records:

==============================  ==============================================
``MSWINDOWS.fileattr``          Win32 attributes, decimal
``MSWINDOWS.rawsd``             base64 self-relative security descriptor
``MSWINDOWS.sd``                (old tars) the descriptor as SDDL text
``MSWINDOWS.xattr.<name>``      base64 value of the extended attribute <name>
``MSWINDOWS.mountpoint``        on a symlink entry: a mount point (junction)
``LIBARCHIVE.creationtime``     creation time, PAX time ``sec[.frac]``
``mtime`` / ``ctime`` / ``atime``  last write / change / last access times
``CIMFS.rawreparse``            (this project) base64 REPARSE_DATA_BUFFER of a
                                reparse point a symlink entry cannot express
==============================  ==============================================

Symlink entries are NT symlinks (or mount points), type ``1`` entries are hard
links, ``<file>:<stream>:$DATA`` regular entries following their file are
alternate data streams, and ``.wh.<name>`` entries delete ``<name>`` from the
layers below.  Each layer of a multi-layer image is imported as a fork of the
layer below it.

Only the public library API is used: :func:`cimfs.create` to write (it discards
everything on an exception, so a failed import leaves nothing behind) and
:func:`cimfs.open` to read; the NTFS blobs (EA chains, reparse buffers, SDDL)
are packed and parsed by :mod:`cimfs.layout.ntfs`.

The package, one module per concern: :mod:`.pax` (the PAX vocabulary and
times), :mod:`.tarsource` (detecting and reading a layer tar), :mod:`.importer`,
:mod:`.exporter`, :mod:`.hives` (the registry hive processing hcsshim does on
layer import).
"""

from __future__ import annotations

from .exporter import export_layer
from .importer import import_layer, import_layers
from .pax import (  # noqa: F401 - the vocabulary, for callers that name the records
    FILETIME_UNIX_EPOCH,
    LAYER_TOP_LEVEL,
    PAX_CREATIONTIME,
    PAX_EA_PREFIX,
    PAX_FILEATTR,
    PAX_MOUNTPOINT,
    PAX_RAWREPARSE,
    PAX_RAWSD,
    PAX_SDDL,
    WHITEOUT_OPAQUE,
    WHITEOUT_PREFIX,
    filetime_to_pax_time,
    format_pax_time,
    parse_pax_time,
    pax_time_to_filetime,
)
from .tarsource import is_windows_layer

__all__ = [
    "is_windows_layer",
    "import_layer",
    "import_layers",
    "export_layer",
    "parse_pax_time",
    "format_pax_time",
    "pax_time_to_filetime",
    "filetime_to_pax_time",
]
