"""The kernel's new mount API (fsopen/fsconfig/fsmount/move_mount) through ctypes."""

from __future__ import annotations

import ctypes
import errno
import os

# Syscall numbers shared by every architecture that has these calls (they
# were added after the numbering was unified).
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432

FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class MountError(OSError):
    """A failed step, with the kernel's own message (from the fs context) when it gave one."""


def _log(fd: int) -> str:
    """Messages the kernel left in the fs context (``e erofs: ...`` lines)."""
    out = []
    while True:
        try:
            raw = os.read(fd, 4096)
        except OSError:
            break
        if not raw:
            break
        out.append(raw.decode("utf-8", "replace").strip())
    return "; ".join(x for x in out if x)


def _check(ret: int, what: str, fd: int | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        detail = _log(fd) if fd is not None else ""
        raise MountError(err, f"{what}: {os.strerror(err)}" + (f" ({detail})" if detail else ""))
    return ret


def mount_fs(
    fstype: str, source: str, mountpoint: str, options: list[tuple[str, str]], *, trusted: bool = False
) -> None:
    """Mount a read-only ``fstype`` file system from ``source`` at ``mountpoint``;
    ``options`` are (key, string value) pairs given to fsconfig in order.
    Unless ``trusted``, it is ``nosuid,nodev`` like a FUSE mount: an image's
    set-user-ID files and device nodes are shown, never honoured."""
    fd = _check(_syscall(_SYS_FSOPEN, fstype.encode(), FSOPEN_CLOEXEC), f"fsopen({fstype})")
    try:
        # A read-only superblock: block devices are then opened for reading only.
        _check(_syscall(_SYS_FSCONFIG, fd, FSCONFIG_SET_FLAG, b"ro", None, 0), "ro", fd)
        for key, value in [("source", source)] + list(options):
            _check(
                _syscall(_SYS_FSCONFIG, fd, FSCONFIG_SET_STRING, key.encode(), os.fsencode(value), 0),
                f"{key}={value}",
                fd,
            )
        _check(_syscall(_SYS_FSCONFIG, fd, FSCONFIG_CMD_CREATE, None, None, 0), f"cannot mount {source}", fd)
        attrs = MOUNT_ATTR_RDONLY | (0 if trusted else MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        mfd = _check(_syscall(_SYS_FSMOUNT, fd, FSMOUNT_CLOEXEC, attrs), "fsmount", fd)
    finally:
        os.close(fd)
    try:
        _check(
            _syscall(_SYS_MOVE_MOUNT, mfd, b"", AT_FDCWD, os.fsencode(mountpoint), MOVE_MOUNT_F_EMPTY_PATH),
            f"move_mount to {mountpoint}",
        )
    finally:
        os.close(mfd)


def umount(mountpoint: str, detach: bool = False) -> None:
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH if detach else 0) != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"umount {mountpoint}: {os.strerror(err)}")


def available() -> bool:
    """Whether this process may use fsopen("erofs") (root, a kernel with EROFS)."""
    fd = _syscall(_SYS_FSOPEN, b"erofs", FSOPEN_CLOEXEC)
    if fd < 0:
        return False
    os.close(fd)
    return True


__all__ = ["mount_fs", "umount", "available", "MountError", "errno"]
