"""Mount CIM images read-only with FUSE or the kernel (``CimMountImage`` / ``CimDismountImage``).

A mount is served by a daemon process (``python -m cimfs.mount.daemon``), or by
the kernel itself as EROFS (:mod:`.kernel`); :func:`mount` returns once the
mount is live, or raises the one-line reason with no mount and no process left
behind.  Live mounts are recorded in a small registry in the runtime directory
(:mod:`.registry`), so any process of the same user can dismount by volume id.
See docs/MOUNT.md.

This package only re-exports: :mod:`.mounting` mounts and dismounts,
:mod:`.registry` records, :mod:`.mergedview` builds a merged view's private
directory, :mod:`.view` maps CIM metadata to POSIX (shared with
:mod:`cimfs.erofs`), :mod:`.fs` serves FUSE requests, :mod:`.kernel` and
:mod:`.kindex` are the kernel engine.  Importing it does not need pyfuse3;
mounting with FUSE does.
"""

from __future__ import annotations

# The names below __all__ are re-exported for the daemon's callers and the tests (cimfs.mount.X).
from .mounting import (  # noqa: F401
    E_FAIL,
    MAX_ID,
    MOUNT_FLAG_BLOCK_DEVICE_CIM,
    MOUNT_FLAG_SINGLE_FILE_CIM,
    MOUNT_FLAG_VERIFIED_CIM,
    CimDismountImage,
    CimMergeMountImage,
    CimMountImage,
    mount,
    mount_merged,
    unmount,
)
from .registry import (  # noqa: F401
    STORAGE_OPTIONS_ENV,
    _alive,
    _mounted,
    _unescape_mountinfo,
    is_cimfs_mount,
    mounts,
    registry_dir,
    remove_entry,
    write_entry,
    write_entry_data,
)

__all__ = [
    "mount",
    "mount_merged",
    "unmount",
    "mounts",
    "CimMountImage",
    "CimMergeMountImage",
    "CimDismountImage",
    "registry_dir",
]
