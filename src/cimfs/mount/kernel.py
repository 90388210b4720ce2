"""The kernel engine: mount an image as EROFS, served by the kernel itself.

The EROFS index (:func:`cimfs.erofs.write_index`) holds the metadata and
points at the file contents inside the image's own region files, which the
kernel gets as extra devices.  Indexes are kept in a cache directory keyed by
the image's identity (its .cim bytes and the identity of every region file),
so mounting the same image again builds nothing; :mod:`.kindex` owns that
cache and the checks that make the kernel see only the files cimfs checked.

The mount is file-backed through the new mount API (no loop device); where the
kernel refuses regular files (``ENOTBLK``: no ``CONFIG_EROFS_FS_BACKED_BY_FILE``)
the index and region files are attached to read-only loop devices, which
``unmount`` detaches.  Root only (mounting needs CAP_SYS_ADMIN).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import subprocess
import uuid

from ..errors import E_ACCESSDENIED, E_FAIL, E_INVALIDARG, ERROR_SHARING_VIOLATION, CimError
from ..layout import erofs as L
from . import _newmount
from .kindex import (  # noqa: F401 - the engine's public names
    INDEX_VERSION,
    Prepared,
    _open_cache_dir,
    _open_entry_file,
    _Untrusted,
    cache_dir,
    ensure_index,
    ensure_merged_index,
    prepared,
)
from .registry import KERNEL_FSTYPE as FSTYPE
from .registry import _mounted, _unescape_mountinfo, remove_entry, write_entry_data
from .registry import is_live_kernel_mount as is_live
from .view import Options

#: FS_IOC_GETFSUUID (_IOR(0x15, 0, struct fsuuid2 {u8 len; u8 uuid[16]})): the mounted EROFS's UUID.
_FS_IOC_GETFSUUID = 0x80111500
_UUID_AT = L.SUPER_OFFSET + 0x30


def _fd_path(fd: int) -> str:
    """The name under which the kernel opens exactly the file behind ``fd``."""
    return f"/proc/self/fd/{fd}"


def available() -> bool:
    """Whether the kernel engine can be used here (root and a kernel with EROFS)."""
    return os.geteuid() == 0 and _newmount.available()


# ===================================================================== loop devices
def _attach_loop(fd: int, shown: str) -> str:
    # losetup opens the file through the descriptor it inherits: the checked file, not a path.
    r = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", _fd_path(fd)], capture_output=True, text=True, pass_fds=(fd,)
    )
    if r.returncode != 0:
        raise CimError(E_FAIL, f"losetup failed: {r.stderr.strip()}", shown)
    return r.stdout.strip()


def _detach_loops(loops) -> None:
    for dev in loops:
        subprocess.run(["losetup", "--detach", dev], capture_output=True)


def _mount_with_loops(p: Prepared, mountpoint: str) -> list[str]:
    loops: list[str] = []
    try:
        for fd, shown in [(p.index_fd, p.index)] + [(fd, path) for _, fd, path in p.devices]:
            loops.append(_attach_loop(fd, shown))
        _newmount.mount_fs(FSTYPE, loops[0], mountpoint, [("device", dev) for dev in loops[1:]])
        return loops
    except BaseException:
        _detach_loops(loops)
        raise


#: Called with the prepared index just before the kernel is asked to mount it (tests race it here).
_before_mount = None


# ===================================================================== mount / unmount
def mount(
    cim_path: str, mountpoint: str, volume_id: uuid.UUID, options: Options, sources: list[str] | None = None
) -> dict:
    """Mount with the kernel; returns the registry entry written for it.
    ``sources`` (top first): mount the merged view of these images instead
    (``cim_path`` is then the top one).  The kernel is given the index and
    region files as ``/proc/self/fd/N`` of the descriptors that were checked
    (see :func:`prepared`), never a path it would resolve again.  On any
    failure nothing stays mounted or attached."""
    if os.geteuid() != 0:
        raise CimError(E_ACCESSDENIED, "the kernel engine needs root (mounting is CAP_SYS_ADMIN)", mountpoint)
    try:
        with prepared(sources or [cim_path], options, merged=bool(sources)) as p:
            if _before_mount is not None:
                _before_mount(p)
            loops = _mount_prepared(p, mountpoint)
            index = p.index
    except CimError:
        raise
    except OSError as e:
        raise CimError(E_FAIL, f"cannot build the EROFS index: {e.strerror or e}", cim_path) from None
    entry = {
        "volume_id": str(volume_id),
        "mountpoint": os.path.abspath(mountpoint),
        "image": os.path.abspath(cim_path),
        "pid": 0,
        "engine": "kernel",
        "index": index,
        "loops": loops,
    }
    if sources:
        entry["sources"] = [os.path.abspath(s) for s in sources]
    try:
        write_entry_data(entry)
    except BaseException:
        _undo(mountpoint, loops)
        raise
    return entry


def _mount_prepared(p: Prepared, mountpoint: str) -> list[str]:
    """Mount ``p`` file-backed, else on loop devices; the loop devices attached."""
    try:
        if os.environ.get("CIMFS_EROFS_LOOP") == "1":  # testing knob: the loop-device path
            raise _newmount.MountError(errno.ENOTBLK, "loop devices requested")
        _newmount.mount_fs(
            FSTYPE, _fd_path(p.index_fd), mountpoint, [("device", _fd_path(fd)) for _, fd, _ in p.devices]
        )
        return []
    except _newmount.MountError as e:
        if e.errno != errno.ENOTBLK:
            raise CimError(
                E_FAIL, f"the kernel refused the EROFS mount: {_named(e.strerror or str(e), p)}", mountpoint
            ) from None
    try:
        return _mount_with_loops(p, mountpoint)
    except _newmount.MountError as e2:
        raise CimError(
            E_FAIL,
            f"the kernel refused the EROFS mount on loop devices: {_named(e2.strerror or str(e2), p)}",
            mountpoint,
        ) from None


def _named(message: str, p: Prepared) -> str:
    """``message`` with each ``/proc/self/fd/N`` of ``p`` replaced by the file's path."""
    names = {p.index_fd: p.index, **{fd: path for _, fd, path in p.devices}}
    return re.sub(r"/proc/self/fd/(\d+)", lambda m: names.get(int(m.group(1)), m.group(0)), message)


def _undo(mountpoint: str, loops) -> None:
    try:
        _newmount.umount(mountpoint, detach=True)
    except OSError:
        pass
    _detach_loops(loops)


def unmount(entry: dict) -> None:
    """Unmount a kernel-engine mount and detach its loop devices."""
    mountpoint = entry["mountpoint"]
    if is_live(entry, _mounted()):
        try:
            _newmount.umount(mountpoint)
        except _newmount.MountError as e:
            code = ERROR_SHARING_VIOLATION if e.errno == errno.EBUSY else E_FAIL
            raise CimError(code, e.strerror or str(e), mountpoint) from None
    _detach_loops(entry.get("loops") or [])
    remove_entry(entry["volume_id"])


def _mount_source(mountpoint: str) -> str | None:
    """The source of the EROFS mount on ``mountpoint`` (a real path), from mountinfo."""
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rest = left.split(), right.split()
                if (
                    len(fields) >= 5
                    and len(rest) >= 2
                    and rest[0] == FSTYPE
                    and _unescape_mountinfo(fields[4]) == mountpoint
                ):
                    found = _unescape_mountinfo(rest[1])  # the topmost mount wins
    except OSError:
        return None
    return found


def _mounted_uuid(mountpoint: str) -> bytes | None:
    """The UUID of the file system mounted on ``mountpoint`` (FS_IOC_GETFSUUID), or None."""
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        buf = bytearray(17)
        buf[0] = 16
        fcntl.ioctl(fd, _FS_IOC_GETFSUUID, buf)
        return bytes(buf[1 : 1 + buf[0]]) if buf[0] == 16 else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _is_cached_index(source: str, mountpoint: str) -> bool:
    """Whether the EROFS mount of ``source`` on ``mountpoint`` serves an index of our cache.
    The source reads ``/proc/self/fd/N`` (the mounting process's descriptor,
    long closed): the mounted superblock's UUID, set at random for each
    index built, is compared with those of the cached indexes.  (Mounts made
    before indexes were passed by descriptor name the index by path.)"""
    try:
        d, dfd = _open_cache_dir()
    except CimError:
        return False
    try:
        if not source.startswith("/proc/self/fd/"):
            return source.endswith(".erofs") and os.path.dirname(source) == os.path.realpath(d)
        wanted = _mounted_uuid(mountpoint)
        if wanted is None:
            return False
        for name in os.listdir(dfd):
            if not name.endswith(".erofs"):
                continue
            try:
                fd = _open_entry_file(name, dfd)
            except (OSError, _Untrusted):
                continue
            try:
                if os.pread(fd, 16, _UUID_AT) == wanted:
                    return True
            finally:
                os.close(fd)
        return False
    finally:
        os.close(dfd)


def unmount_orphan(mountpoint: str) -> bool:
    """Unmount a file-backed kernel-engine mount whose registry entry is gone
    (it serves an index in our cache); False when ``mountpoint`` holds no
    such mount.  (A loop-device mount without its entry is left alone: which
    loop devices were its region files is only in the entry.)"""
    real = os.path.realpath(mountpoint)
    source = _mount_source(real)
    if not source or not _is_cached_index(source, real):
        return False
    try:
        _newmount.umount(real)
    except _newmount.MountError as e:
        code = ERROR_SHARING_VIOLATION if e.errno == errno.EBUSY else E_FAIL
        raise CimError(code, e.strerror or str(e), mountpoint) from None
    return True


def check_engine(engine: str, where: str) -> str:
    """``auto`` -> ``kernel`` when this process can mount EROFS, else ``fuse``."""
    if engine not in ("auto", "kernel", "fuse"):
        raise CimError(E_INVALIDARG, f"unknown mount engine {engine!r} (auto, kernel or fuse)", where)
    if engine == "auto":
        return "kernel" if available() else "fuse"
    return engine
