"""The kernel engine: mount an image as EROFS, served by the kernel itself.

The EROFS index (:func:`cimfs.erofs.write_index`) holds the metadata and
points at the file contents inside the image's own region files, which the
kernel gets as extra devices.  Indexes are kept in a cache directory keyed by
the image's identity (its .cim bytes and the identity of every region file),
so mounting the same image again builds nothing.

The mount is file-backed through the new mount API (no loop device); where the
kernel refuses regular files (``ENOTBLK``: no ``CONFIG_EROFS_FS_BACKED_BY_FILE``)
the index and region files are attached to read-only loop devices, which
``unmount`` detaches.  Root only (mounting needs CAP_SYS_ADMIN).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import uuid

from ..atomic import remove_quietly
from ..errors import E_ACCESSDENIED, E_FAIL, E_INVALIDARG, ERROR_FILE_NOT_FOUND, CimError
from . import _newmount
from .view import Options

#: Bumped whenever the index layout changes, so old cached indexes are not reused.
INDEX_VERSION = 1
FSTYPE = "erofs"


def cache_dir() -> str:
    """Where indexes are kept: ``$CIMFS_CACHE_DIR``, else ``$XDG_CACHE_HOME/cimfs/erofs``,
    else ``/var/cache/cimfs/erofs`` for root, else ``~/.cache/cimfs/erofs``."""
    d = os.environ.get("CIMFS_CACHE_DIR")
    if not d:
        if os.environ.get("XDG_CACHE_HOME"):
            d = os.path.join(os.environ["XDG_CACHE_HOME"], "cimfs", "erofs")
        elif os.geteuid() == 0:
            d = "/var/cache/cimfs/erofs"
        else:
            d = os.path.join(os.path.expanduser("~"), ".cache", "cimfs", "erofs")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def available() -> bool:
    """Whether the kernel engine can be used here (root and a kernel with EROFS)."""
    return os.geteuid() == 0 and _newmount.available()


def image_key(image, options: Options) -> str:
    """The identity of an open image as the index cache sees it: the .cim's
    bytes and path, every region file's (path, device, inode, size, mtime),
    the owner options and the index version."""
    from ..reader import find_region_file

    h = hashlib.sha256()
    h.update(f"v{INDEX_VERSION} {options.uid} {options.gid} {options.umask}\0".encode())
    real = os.path.realpath(image.path)
    h.update(os.fsencode(real) + b"\0")
    with open(real, "rb") as f:
        h.update(f.read())
    for name in image.info()["region_files"]:
        path = find_region_file(image.directory, name)
        if path is None:
            raise CimError(ERROR_FILE_NOT_FOUND, f"region file {name} is missing", image.path)
        st = os.stat(path)
        h.update(f"\0{os.path.realpath(path)}\0{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns}".encode(
            "utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def ensure_index(cim_path: str, options: Options) -> tuple[str, list[str], bool]:
    """(index path, device paths, built now?) for the image, from the cache or built into it."""
    from .. import open as open_image
    from ..erofs import write_index

    with open_image(cim_path) as image:
        real = os.path.realpath(cim_path)
        return _cached_index(image_key(image, options), real,
                             lambda out: write_index(image, out, options=options), cim_path)


def merged_key(paths: list[str], options: Options) -> str:
    """The identity of the merged view of ``paths`` (top first): the identities
    of its sources, in order (the merged image itself is a function of them)."""
    from .. import open as open_image

    h = hashlib.sha256(f"merged v{INDEX_VERSION}\0".encode())
    for p in paths:
        with open_image(p) as image:
            h.update(image_key(image, options).encode() + b"\0")
    return h.hexdigest()[:32]


def ensure_merged_index(paths: list[str], options: Options) -> tuple[str, list[str], bool]:
    """(index path, device paths, built now?) for the merged view of ``paths``
    (top first).  [choice] Cached like a single image's index, keyed by the
    sources' identities.  On a miss the merged image is built in a private
    directory (as for the FUSE engine), indexed, and the directory removed at
    once: the merged image holds only metadata (copied into the index), so
    the index's devices are the sources' own region files, by real path."""
    from .. import open as open_image
    from ..erofs import write_index
    from . import _merged_view

    paths = [os.path.realpath(p) for p in paths]

    def build(out: str) -> dict:
        directory, cim_path = _merged_view(paths)
        try:
            with open_image(cim_path) as image:
                info = write_index(image, out, options=options)
            private = os.path.realpath(directory) + os.sep
            devices = [os.path.realpath(d) for d in info["devices"]]
            inside = [d for d in devices if d.startswith(private)]
            if inside:  # the merged image's own region holds no file data: never expected
                raise CimError(E_FAIL, f"the merged image holds file data of its own ({inside[0]})", paths[0])
            info["devices"] = devices
            return info
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    tag = "merged:" + "\0".join(paths)
    return _cached_index(merged_key(paths, options), tag, build, paths[0])


def _cached_index(key: str, tag: str, build, where: str) -> tuple[str, list[str], bool]:
    """The cached index ``key`` or, when missing, one ``build(path)`` writes
    (to a temporary name first: a failed build leaves no partial index).
    ``tag`` names what was indexed (older indexes with the same tag are
    dropped)."""
    d = cache_dir()
    index = os.path.join(d, f"{key}.erofs")
    meta = os.path.join(d, f"{key}.json")
    try:
        with open(meta) as f:
            devices = json.load(f)["devices"]
        if os.path.isfile(index):
            return index, devices, False
    except (OSError, ValueError, KeyError):
        pass
    tmp_index = f"{index}.{os.getpid()}.tmp"
    tmp_meta = f"{meta}.{os.getpid()}.tmp"
    try:
        info = build(tmp_index)
        with open(tmp_meta, "w") as f:
            json.dump({"image": tag, "devices": info["devices"],
                       "block_size": info["block_size"], "copied_bytes": info["copied_bytes"]}, f)
        os.replace(tmp_index, index)
        os.replace(tmp_meta, meta)
    except BaseException:
        for p in (tmp_index, tmp_meta):
            remove_quietly(p)
        raise
    _drop_stale(d, tag, key)
    return index, info["devices"], True


def _drop_stale(d: str, image: str, keep: str) -> None:
    """Forget older indexes of the same .cim path (the image changed since)."""
    for name in os.listdir(d):
        if not name.endswith(".json") or name.startswith(keep):
            continue
        path = os.path.join(d, name)
        try:
            with open(path) as f:
                if json.load(f).get("image") != image:
                    continue
        except (OSError, ValueError, AttributeError):
            continue
        for p in (path, path[:-5] + ".erofs"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


# ===================================================================== loop devices
def _attach_loop(path: str) -> str:
    r = subprocess.run(["losetup", "--find", "--show", "--read-only", path], capture_output=True, text=True)
    if r.returncode != 0:
        raise CimError(E_FAIL, f"losetup failed: {r.stderr.strip()}", path)
    return r.stdout.strip()


def _detach_loops(loops) -> None:
    for dev in loops:
        subprocess.run(["losetup", "--detach", dev], capture_output=True)


def _mount_with_loops(index: str, devices: list[str], mountpoint: str) -> list[str]:
    loops: list[str] = []
    try:
        for path in [index] + devices:
            loops.append(_attach_loop(path))
        _newmount.mount_fs(FSTYPE, loops[0], mountpoint, [("device", dev) for dev in loops[1:]])
        return loops
    except BaseException:
        _detach_loops(loops)
        raise


# ===================================================================== mount / unmount
def mount(cim_path: str, mountpoint: str, volume_id: uuid.UUID, options: Options,
          sources: list[str] | None = None) -> dict:
    """Mount with the kernel; returns the registry entry written for it.
    ``sources`` (top first): mount the merged view of these images instead
    (``cim_path`` is then the top one).  On any failure nothing stays
    mounted or attached."""
    if os.geteuid() != 0:
        raise CimError(E_ACCESSDENIED, "the kernel engine needs root (mounting is CAP_SYS_ADMIN)", mountpoint)
    from . import write_entry_data

    try:
        if sources:
            index, devices, _ = ensure_merged_index(sources, options)
        else:
            index, devices, _ = ensure_index(cim_path, options)
    except CimError:
        raise
    except OSError as e:
        raise CimError(E_FAIL, f"cannot build the EROFS index: {e}", cim_path) from None
    loops: list[str] = []
    try:
        if os.environ.get("CIMFS_EROFS_LOOP") == "1":  # testing knob: the loop-device path
            raise _newmount.MountError(errno.ENOTBLK, "loop devices requested")
        _newmount.mount_fs(FSTYPE, index, mountpoint, [("device", dev) for dev in devices])
    except _newmount.MountError as e:
        if e.errno != errno.ENOTBLK:
            raise CimError(E_FAIL, f"the kernel refused the EROFS mount: {e.strerror}", mountpoint) from None
        try:
            loops = _mount_with_loops(index, devices, mountpoint)
        except _newmount.MountError as e2:
            raise CimError(E_FAIL, f"the kernel refused the EROFS mount on loop devices: {e2.strerror}", mountpoint) from None
    entry = {"volume_id": str(volume_id), "mountpoint": os.path.abspath(mountpoint), "image": os.path.abspath(cim_path),
             "pid": 0, "engine": "kernel", "index": index, "loops": loops}
    if sources:
        entry["sources"] = [os.path.abspath(s) for s in sources]
    try:
        write_entry_data(entry)
    except BaseException:
        _undo(mountpoint, loops)
        raise
    return entry


def _undo(mountpoint: str, loops) -> None:
    try:
        _newmount.umount(mountpoint, detach=True)
    except OSError:
        pass
    _detach_loops(loops)


def is_live(entry: dict, table: dict[str, str]) -> bool:
    return table.get(os.path.realpath(entry.get("mountpoint", ""))) == FSTYPE


def unmount(entry: dict) -> None:
    """Unmount a kernel-engine mount and detach its loop devices."""
    from . import ERROR_SHARING_VIOLATION, _mounted, remove_entry

    mountpoint = entry["mountpoint"]
    if is_live(entry, _mounted()):
        try:
            _newmount.umount(mountpoint)
        except _newmount.MountError as e:
            code = ERROR_SHARING_VIOLATION if e.errno == errno.EBUSY else E_FAIL
            raise CimError(code, e.strerror, mountpoint) from None
    _detach_loops(entry.get("loops") or [])
    remove_entry(entry["volume_id"])


def _mount_source(mountpoint: str) -> str | None:
    """The source of the EROFS mount on ``mountpoint`` (a real path), from mountinfo."""
    from . import _unescape_mountinfo

    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rest = left.split(), right.split()
                if len(fields) >= 5 and len(rest) >= 2 and rest[0] == FSTYPE and _unescape_mountinfo(fields[4]) == mountpoint:
                    found = _unescape_mountinfo(rest[1])  # the topmost mount wins
    except OSError:
        return None
    return found


def unmount_orphan(mountpoint: str) -> bool:
    """Unmount a file-backed kernel-engine mount whose registry entry is gone
    (its source is an index in our cache); False when ``mountpoint`` holds no
    such mount.  (A loop-device mount without its entry is left alone: which
    loop devices were its region files is only in the entry.)"""
    from . import ERROR_SHARING_VIOLATION

    real = os.path.realpath(mountpoint)
    index = _mount_source(real)
    if not index or not index.endswith(".erofs") or os.path.dirname(index) != os.path.realpath(cache_dir()):
        return False
    try:
        _newmount.umount(real)
    except _newmount.MountError as e:
        code = ERROR_SHARING_VIOLATION if e.errno == errno.EBUSY else E_FAIL
        raise CimError(code, e.strerror, mountpoint) from None
    return True


def check_engine(engine: str, where: str) -> str:
    """``auto`` -> ``kernel`` when this process can mount EROFS, else ``fuse``."""
    if engine not in ("auto", "kernel", "fuse"):
        raise CimError(E_INVALIDARG, f"unknown mount engine {engine!r} (auto, kernel or fuse)", where)
    if engine == "auto":
        return "kernel" if available() else "fuse"
    return engine
