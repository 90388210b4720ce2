"""Mounting and dismounting: :func:`mount`, :func:`mount_merged`, :func:`unmount`
and the Win32-shaped ``CimMountImage`` / ``CimMergeMountImage`` / ``CimDismountImage``.

A FUSE mount is served by a daemon process (:mod:`cimfs.mount.daemon`), started
here and waited for until it reports the mount live or its one-line reason; a
failed start leaves no mount and no process behind.  The kernel engine
(:mod:`cimfs.mount.kernel`) serves EROFS instead.  Live mounts are recorded in
:mod:`cimfs.mount.registry`.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid

from ..errors import (
    E_FAIL,
    E_INVALIDARG,
    ERROR_ALREADY_EXISTS,
    ERROR_FILE_CORRUPT,
    ERROR_FILE_NOT_FOUND,
    ERROR_PATH_NOT_FOUND,
    ERROR_SHARING_VIOLATION,
    CimError,
    CimFormatError,
)
from ..remote import is_url, local_path
from .mergedview import in_user_terms, merged_view
from .registry import (
    STORAGE_OPTIONS_ENV,
    _alive,
    _log_path,
    _mounted,
    find_entry,
    is_cimfs_mount,
    mounts,
    remove_entry,
    write_entry,
)
from .view import Options

MAX_ID = 0xFFFFFFFF  # uid/gid: 32-bit, and (uid_t)-1 is no id
_READY_TIMEOUT = 60.0
_EXIT_TIMEOUT = 20.0


def _daemon_args(
    cim_path, mountpoint, volume_id, uid, gid, umask, allow_other, cache_dir=None, remove_dir=None, sources=None
) -> list[str]:
    args = [sys.executable, "-m", "cimfs.mount.daemon", cim_path, mountpoint, "--volume-id", str(volume_id)]
    if cache_dir is not None:
        args += ["--cache-dir", cache_dir]
    if remove_dir is not None:
        args += ["--remove-dir", remove_dir]
    for s in sources or ():
        args += ["--source", os.path.abspath(s)]
    for flag, value in (("--uid", uid), ("--gid", gid), ("--umask", None if umask is None else format(umask, "o"))):
        if value is not None:
            args += [flag, str(value)]
    if allow_other:
        args.append("--allow-other")
    return args


def _check_pyfuse3(where: str) -> None:
    try:
        import pyfuse3  # noqa: F401 - optional dependency (cimfs[mount])
        import trio  # noqa: F401 - optional dependency (cimfs[mount])
    except ImportError as e:
        raise CimError(
            E_INVALIDARG,
            f"mounting needs pyfuse3 and trio (scripts/install-system-deps.sh, pip install 'cimfs[mount]'): {e}",
            where,
        ) from None


def mount(
    cim_path,
    mountpoint,
    *,
    foreground: bool = False,
    uid: int | None = None,
    gid: int | None = None,
    umask: int | None = None,
    allow_other: bool = False,
    volume_id: uuid.UUID | None = None,
    engine: str = "fuse",
    storage_options: dict | None = None,
    cache_dir: str | None = None,
    _remove_dir: str | None = None,
    _sources: list | None = None,
    _kernel_merge: list | None = None,
) -> uuid.UUID:
    """Mount ``cim_path`` read-only at ``mountpoint``; returns the volume id.

    ``cim_path`` may be an fsspec URL (``s3://bucket/layer.cim``): the mount is
    then lazy, fetching contents when they are read (``storage_options`` go to
    the URL's filesystem; ``cache_dir`` keeps fetched blocks on local disk).
    Only the FUSE engine serves a remote image (``auto`` picks it).

    ``engine``: ``"fuse"`` (the daemon), ``"kernel"`` (an EROFS index over the
    region files, served by the kernel; root only, see
    :mod:`cimfs.mount.kernel`) or ``"auto"`` (kernel when it can, else FUSE).

    In the background (the default) this returns once the mount is live; with
    ``foreground`` it serves the mount in this process until it is unmounted
    (``fusermount3 -u``, ``cimfs umount`` or a signal) and then returns.
    ``uid``/``gid``/``umask`` apply to entries without WSL ``$LX*`` metadata.
    """
    cim_path = os.fspath(cim_path)
    if is_url(cim_path) and local_path(cim_path) is not None:
        cim_path = local_path(cim_path)
    remote = is_url(cim_path)
    if not remote:
        cim_path = os.path.abspath(cim_path)
    if cache_dir is not None:
        cache_dir = os.path.abspath(os.fspath(cache_dir))
    mountpoint = os.path.abspath(os.fspath(mountpoint))
    volume_id = uuid.uuid4() if volume_id is None else uuid.UUID(str(volume_id))
    if umask is not None and (not isinstance(umask, int) or not 0 <= umask <= 0o777):
        raise CimError(E_INVALIDARG, f"umask {umask!r} is not an octal mode 0..777", mountpoint)
    for what, value in (("uid", uid), ("gid", gid)):
        # (uid_t)-1 means "no change" to the kernel; nothing above it exists.
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_ID):
            raise CimError(E_INVALIDARG, f"{what} {value!r} is not a valid id (0..{MAX_ID - 1})", mountpoint)
    if not remote and not os.path.isfile(cim_path):
        raise CimError(ERROR_FILE_NOT_FOUND, "image not found", cim_path)
    if not os.path.isdir(mountpoint):
        raise CimError(ERROR_PATH_NOT_FOUND, "mount point is not a directory", mountpoint)
    if os.path.realpath(mountpoint) in _mounted():
        raise CimError(ERROR_ALREADY_EXISTS, "something is already mounted here", mountpoint)
    if any(e["volume_id"] == str(volume_id) for e in mounts()):
        raise CimError(ERROR_ALREADY_EXISTS, f"volume {volume_id} is already mounted", mountpoint)
    from . import kernel  # start-up time: `import cimfs` leaves the kernel engine (index cache, EROFS) unloaded

    if remote and engine == "kernel":
        raise CimError(
            E_INVALIDARG, "the kernel engine reads local region files: a remote image mounts with FUSE", cim_path
        )
    if not remote and kernel.check_engine(engine, mountpoint) == "kernel":
        if foreground:
            raise CimError(E_INVALIDARG, "the kernel engine has no foreground mode (nothing to serve)", mountpoint)
        kernel.mount(cim_path, mountpoint, volume_id, Options(uid, gid, umask), sources=_kernel_merge)
        return volume_id
    if shutil.which("fusermount3") is None:
        raise CimError(E_INVALIDARG, "fusermount3 not found (install the fuse3 package)", mountpoint)
    _check_pyfuse3(cim_path)
    if foreground:
        return _mount_foreground(
            cim_path,
            mountpoint,
            volume_id,
            uid,
            gid,
            umask,
            allow_other,
            storage_options,
            cache_dir,
            _remove_dir,
            _sources,
        )
    env = dict(os.environ)
    env.pop(STORAGE_OPTIONS_ENV, None)
    if storage_options:
        env[STORAGE_OPTIONS_ENV] = json.dumps(storage_options)
    read_end, write_end = os.pipe()
    try:
        with open(_log_path(volume_id), "ab") as log:
            proc = subprocess.Popen(
                _daemon_args(
                    cim_path, mountpoint, volume_id, uid, gid, umask, allow_other, cache_dir, _remove_dir, _sources
                )
                + ["--ready-fd", str(write_end), "--detach"],
                pass_fds=(write_end,),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
                env=env,
            )
    except BaseException:
        os.close(read_end)
        os.close(write_end)
        remove_entry(volume_id)
        raise
    os.close(write_end)
    try:
        pid, message = _read_ready(read_end)
    finally:
        os.close(read_end)
        proc.wait()  # the intermediate process exits at once (the daemon is its child)
    if message == "OK":
        return volume_id
    # The daemon failed: make sure neither it nor a mount is left behind.
    detail = _last_log_line(volume_id)
    _stop(pid, mountpoint)
    remove_entry(volume_id)
    if message.startswith("ERR "):
        try:
            info = json.loads(message[4:])
            hresult, reason, path = int(info["hresult"]), str(info["reason"]), info.get("path")
        except (ValueError, KeyError, TypeError):
            hresult, reason, path = E_FAIL, message[4:], cim_path
        cls = CimFormatError if hresult == ERROR_FILE_CORRUPT else CimError
        raise cls(reason, path, hresult) if cls is CimFormatError else CimError(hresult, reason, path)
    raise CimError(E_FAIL, message + (f" ({detail})" if detail else ""), cim_path)


def _mount_foreground(
    cim_path,
    mountpoint,
    volume_id,
    uid,
    gid,
    umask,
    allow_other,
    storage_options=None,
    cache_dir=None,
    remove_dir=None,
    sources=None,
) -> uuid.UUID:
    from .daemon import prepare, serve  # start-up time: the daemon's side (argparse, logging, pyfuse3) loads to serve

    image, _ = prepare(
        cim_path,
        mountpoint,
        uid=uid,
        gid=gid,
        umask=umask,
        allow_other=allow_other,
        storage_options=storage_options,
        cache_dir=cache_dir,
        remove_dir=remove_dir,
    )
    write_entry(volume_id, mountpoint, cim_path, os.getpid(), sources)
    serve(image, volume_id, mountpoint)
    return volume_id


def _read_ready(fd: int) -> tuple[int | None, str]:
    """(daemon pid, "OK" | "ERR {json}" | why nothing came)."""
    deadline = time.monotonic() + _READY_TIMEOUT
    data = b""
    pid = None
    while True:
        lines = data.split(b"\n")
        for line in lines[:-1]:
            text = line.decode("utf-8", "replace").strip()
            if text.startswith("PID "):
                try:
                    pid = int(text[4:])
                except ValueError:
                    pass
            elif text == "OK" or text.startswith("ERR "):
                return pid, text
        left = deadline - time.monotonic()
        if left <= 0:
            return pid, f"the mount daemon did not report within {_READY_TIMEOUT:.0f} s"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return pid, "the mount daemon exited without reporting"
        data += chunk


def _last_log_line(volume_id) -> str:
    try:
        with open(_log_path(volume_id), "rb") as f:
            lines = [ln.strip() for ln in f.read()[-4096:].decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1] if lines else ""
    except OSError:
        return ""


def _stop(pid: int | None, mountpoint: str) -> None:
    """Leave no mount and no daemon behind after a failed start."""
    if is_cimfs_mount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
    if pid is None:
        return
    for sig, wait in ((None, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if sig is not None and _alive(pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not _alive(pid):
            return


# ===================================================================== merged views
def mount_merged(paths: list, mountpoint, **kw) -> uuid.UUID:
    """Mount the merged view of ``paths`` (top layer first) without writing a
    merged image next to them.  [choice] The merged image is written to a
    private directory in the runtime directory (links to the sources' region
    files and its own metadata region).  FUSE: the daemon opens every region
    file and removes that directory before it reports the mount ready, so
    nothing is left behind whatever happens to it later.  Kernel
    (``engine="kernel"``, or ``"auto"`` as root): the EROFS index is built from
    it (its devices are the sources' region files, by real path), the
    directory removed, then the index mounted (see
    :func:`cimfs.mount.kernel.ensure_merged_index`)."""
    where = os.fspath(mountpoint)
    if not paths:
        raise CimError(E_INVALIDARG, "a merged mount needs at least one image", where)
    for p in paths:
        if is_url(os.fspath(p)):
            raise CimError(E_INVALIDARG, "a merged view is made of local images (not URLs)", os.fspath(p))
    from . import kernel  # start-up time: `import cimfs` leaves the kernel engine (index cache, EROFS) unloaded

    if kernel.check_engine(kw.get("engine", "fuse"), where) == "kernel":
        kw["engine"] = "kernel"
        for p in paths:
            if not os.path.isfile(os.fspath(p)):
                raise CimError(ERROR_FILE_NOT_FOUND, "image not found", os.path.abspath(os.fspath(p)))
        try:
            return mount(paths[0], mountpoint, _kernel_merge=[os.path.abspath(os.fspath(p)) for p in paths], **kw)
        except CimError as e:
            raise in_user_terms(e, paths) from None
    kw["engine"] = "fuse"
    try:
        directory, cim_path = merged_view(paths)
        try:
            return mount(cim_path, mountpoint, _remove_dir=directory, _sources=list(paths), **kw)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    except CimError as e:
        raise in_user_terms(e, paths) from None


# ===================================================================== unmount
def unmount(target) -> None:
    """Unmount by mount point or volume id; waits for the daemon to exit and
    drops the registry entry."""
    entry = find_entry(target)
    if entry is not None and entry.get("engine") == "kernel":
        from . import kernel  # start-up time, as in mount()

        kernel.unmount(entry)
        return
    if entry is None and not isinstance(target, uuid.UUID):
        from . import kernel  # start-up time, as in mount()

        if kernel.unmount_orphan(os.fspath(target)):
            return
    if entry is None:
        if isinstance(target, uuid.UUID) or not is_cimfs_mount(target):
            raise CimError(ERROR_FILE_NOT_FOUND, "no cimfs mount here (or with this volume id)", str(target))
        mountpoint, pid, vid = os.path.realpath(os.fspath(target)), None, None
    else:
        mountpoint, pid, vid = entry["mountpoint"], entry["pid"], entry["volume_id"]
    r = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if r.returncode != 0 and is_cimfs_mount(mountpoint):
        reason = (r.stderr.strip().splitlines() or ["fusermount3 -u failed"])[-1]
        code = ERROR_SHARING_VIOLATION if "busy" in reason.lower() else E_FAIL
        raise CimError(code, reason, mountpoint)
    if pid is not None:
        deadline = time.monotonic() + _EXIT_TIMEOUT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _alive(pid):  # unmounted but stuck: it serves nothing any more
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if vid is not None:
        remove_entry(vid)


# ===================================================================== Win32 shape
def CimMountImage(
    image_containing_path,
    image_name,
    flags: int = 0,
    volume_id: uuid.UUID | None = None,
    *,
    mountpoint,
    engine: str = "fuse",
) -> uuid.UUID:
    """Mount ``image_name`` from ``image_containing_path`` at ``mountpoint``;
    returns the volume id (a new one when ``volume_id`` is None).  ``engine``
    as for :func:`mount` (``"kernel"``: EROFS served by the kernel, root only)."""
    if flags:
        raise CimError(E_INVALIDARG, f"unsupported mount flags {flags:#x}", os.fspath(image_containing_path))
    path = os.path.join(os.fspath(image_containing_path), os.fspath(image_name))
    if not os.path.isdir(os.fspath(image_containing_path)):
        raise CimError(ERROR_PATH_NOT_FOUND, "image containing path not found", os.fspath(image_containing_path))
    return mount(path, mountpoint, volume_id=volume_id, engine=engine)


MOUNT_FLAG_BLOCK_DEVICE_CIM = 0x10
MOUNT_FLAG_SINGLE_FILE_CIM = 0x20
MOUNT_FLAG_VERIFIED_CIM = 0x80


def CimMergeMountImage(
    paths: list, flags: int = 0, volume_id: uuid.UUID | None = None, *, mountpoint, engine: str = "fuse"
) -> uuid.UUID:
    """Mount the merged view of ``paths`` (top layer first, base last) at
    ``mountpoint`` with the rules of a merged image; returns the volume id.
    ``engine`` as for :func:`mount`."""
    where = os.fspath(paths[0]) if paths else os.fspath(mountpoint)
    layout_flags = MOUNT_FLAG_BLOCK_DEVICE_CIM | MOUNT_FLAG_SINGLE_FILE_CIM | MOUNT_FLAG_VERIFIED_CIM
    if not isinstance(flags, int) or flags < 0 or flags & ~layout_flags:
        raise CimError(E_INVALIDARG, f"unsupported mount flags {flags!r}", where)
    if flags:
        raise CimError(
            0x80004001,
            f"mount flags {flags:#x} (block, single-file or verified CIMs): their on-disk layout is not public",
            where,
        )
    return mount_merged(list(paths), mountpoint, volume_id=volume_id, engine=engine)


def CimDismountImage(volume_id: uuid.UUID) -> None:
    """Dismount the volume mounted with ``volume_id`` (from any process of this user)."""
    try:
        vid = volume_id if isinstance(volume_id, uuid.UUID) else uuid.UUID(str(volume_id))
    except ValueError:
        raise CimError(E_INVALIDARG, "not a volume id", str(volume_id)) from None
    entry = find_entry(vid)
    if entry is None:
        raise CimError(ERROR_FILE_NOT_FOUND, "no mounted volume with this id", str(vid))
    unmount(vid)
