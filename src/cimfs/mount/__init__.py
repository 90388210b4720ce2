"""Mount CIM images read-only with FUSE (``CimMountImage`` / ``CimDismountImage``).

A mount is served by a daemon process (``python -m cimfs.mount.daemon``);
:func:`mount` returns once the kernel has the mount, or raises the daemon's
one-line reason with nothing left behind.  Live mounts are recorded in a small
registry in the runtime directory, so any process of the same user can
dismount by volume id.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

from ..errors import (
    E_INVALIDARG,
    ERROR_ALREADY_EXISTS,
    ERROR_FILE_NOT_FOUND,
    ERROR_PATH_NOT_FOUND,
    CimError,
)

_READY_TIMEOUT = 60.0
_EXIT_TIMEOUT = 20.0


def registry_dir() -> str:
    """``$XDG_RUNTIME_DIR/cimfs/mounts``, ``/run/cimfs/mounts`` for root, else ``/tmp/cimfs-UID/mounts``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.access(base, os.W_OK):
        d = os.path.join(base, "cimfs", "mounts")
    elif os.getuid() == 0 and os.access("/run", os.W_OK):
        d = "/run/cimfs/mounts"
    else:
        d = os.path.join(tempfile.gettempdir(), f"cimfs-{os.getuid()}", "mounts")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def _entry_path(volume_id) -> str:
    return os.path.join(registry_dir(), f"{volume_id}.json")


def write_entry(volume_id, mountpoint: str, image: str, pid: int) -> None:
    path = _entry_path(volume_id)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"volume_id": str(volume_id), "mountpoint": mountpoint, "image": image, "pid": pid}, f)
    os.replace(tmp, path)


def remove_entry(volume_id) -> None:
    try:
        os.unlink(_entry_path(volume_id))
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours has exited
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def mounts() -> list[dict]:
    """Live mounts of this user (stale registry entries are dropped)."""
    out = []
    d = registry_dir()
    for name in os.listdir(d):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(d, name)) as f:
                entry = json.load(f)
        except (OSError, ValueError):
            continue
        if _alive(entry.get("pid", -1)) and os.path.ismount(entry.get("mountpoint", "")):
            out.append(entry)
        else:
            remove_entry(name[:-5])
    return out


def _daemon_args(cim_path, mountpoint, volume_id, uid, gid, umask, allow_other) -> list[str]:
    args = [sys.executable, "-m", "cimfs.mount.daemon", cim_path, mountpoint, "--volume-id", str(volume_id)]
    for flag, value in (("--uid", uid), ("--gid", gid), ("--umask", None if umask is None else oct(umask))):
        if value is not None:
            args += [flag, str(value)]
    if allow_other:
        args.append("--allow-other")
    return args


def mount(cim_path, mountpoint, *, foreground: bool = False, uid: int | None = None, gid: int | None = None,
          umask: int | None = None, allow_other: bool = False, volume_id: uuid.UUID | None = None) -> uuid.UUID:
    """Mount ``cim_path`` read-only at ``mountpoint``; returns the volume id.

    In the background (the default) this returns once the mount is live; with
    ``foreground`` it serves the mount in this process until it is unmounted.
    """
    cim_path = os.path.abspath(os.fspath(cim_path))
    mountpoint = os.path.abspath(os.fspath(mountpoint))
    volume_id = uuid.UUID(str(volume_id)) if volume_id is not None else uuid.uuid4()
    if not os.path.isdir(mountpoint):
        raise CimError(ERROR_PATH_NOT_FOUND, "mount point is not a directory", mountpoint)
    if os.path.ismount(mountpoint):
        raise CimError(ERROR_ALREADY_EXISTS, "something is already mounted here", mountpoint)
    if not os.path.isfile(cim_path):
        raise CimError(ERROR_FILE_NOT_FOUND, "image not found", cim_path)
    if any(e["volume_id"] == str(volume_id) for e in mounts()):
        raise CimError(ERROR_ALREADY_EXISTS, f"volume {volume_id} is already mounted", mountpoint)
    if shutil.which("fusermount3") is None:
        raise CimError(E_INVALIDARG, "fusermount3 not found (install the fuse3 package)", mountpoint)
    if foreground:
        from .daemon import serve

        serve(cim_path, mountpoint, volume_id, uid=uid, gid=gid, umask=umask, allow_other=allow_other, ready=None)
        return volume_id
    read_end, write_end = os.pipe()
    log_path = os.path.join(registry_dir(), f"{volume_id}.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            _daemon_args(cim_path, mountpoint, volume_id, uid, gid, umask, allow_other) + ["--ready-fd", str(write_end)],
            pass_fds=(write_end,), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
    os.close(write_end)
    try:
        message = _read_ready(read_end, proc)
    finally:
        os.close(read_end)
    if message == "OK":
        return volume_id
    # The daemon failed: make sure neither it nor a mount is left behind.
    _stop(proc, mountpoint)
    remove_entry(volume_id)
    raise CimError(E_INVALIDARG if not message.startswith("ERR ") else _hresult(message), message[4:] if message.startswith("ERR ") else message, cim_path)


def _hresult(message: str) -> int:
    try:
        return int(message.split()[1], 16)
    except (IndexError, ValueError):
        return E_INVALIDARG


def _read_ready(fd: int, proc) -> str:
    deadline = time.monotonic() + _READY_TIMEOUT
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return "the mount daemon did not report within 60 s"
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
        elif proc.poll() is not None and not data:
            break
    line = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    if line == "OK":
        return "OK"
    if line.startswith("ERR "):
        # "ERR <hresult> <reason>" -> keep the hresult for the caller
        parts = line.split(" ", 2)
        return f"ERR {parts[1]} {parts[2] if len(parts) > 2 else ''}".strip() if len(parts) > 1 else line
    return line or f"the mount daemon exited with status {proc.wait()}"


def _stop(proc, mountpoint: str) -> None:
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _find(target) -> dict | None:
    live = mounts()
    try:
        vid = str(uuid.UUID(str(target)))
    except ValueError:
        vid = None
    for e in live:
        if vid is not None and e["volume_id"] == vid:
            return e
        if vid is None and os.path.realpath(e["mountpoint"]) == os.path.realpath(os.fspath(target)):
            return e
    return None


def unmount(target) -> None:
    """Unmount by mount point or volume id and wait for the daemon to exit."""
    entry = _find(target)
    if entry is None:
        if isinstance(target, uuid.UUID) or not os.path.ismount(os.fspath(target)):
            raise CimError(ERROR_FILE_NOT_FOUND, "no cimfs mount here (or with this volume id)", str(target))
        mountpoint, pid, vid = os.path.abspath(os.fspath(target)), None, None
    else:
        mountpoint, pid, vid = entry["mountpoint"], entry["pid"], entry["volume_id"]
    r = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if r.returncode != 0 and os.path.ismount(mountpoint):
        raise CimError(E_INVALIDARG, (r.stderr.strip().splitlines() or ["fusermount3 -u failed"])[-1], mountpoint)
    if pid is not None:
        deadline = time.monotonic() + _EXIT_TIMEOUT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    if vid is not None:
        remove_entry(vid)
        try:
            os.unlink(os.path.join(registry_dir(), f"{vid}.log"))
        except FileNotFoundError:
            pass


def CimMountImage(image_containing_path, image_name, flags: int = 0, volume_id: uuid.UUID | None = None, *, mountpoint) -> uuid.UUID:
    """Mount ``image_name`` from ``image_containing_path`` at ``mountpoint``; returns the volume id."""
    if flags:
        raise CimError(E_INVALIDARG, f"unsupported mount flags {flags:#x}", os.fspath(image_containing_path))
    return mount(os.path.join(os.fspath(image_containing_path), image_name), mountpoint, volume_id=volume_id)


def CimDismountImage(volume_id: uuid.UUID) -> None:
    """Dismount the volume mounted with ``volume_id`` (from any process of this user)."""
    entry = _find(volume_id)
    if entry is None:
        raise CimError(ERROR_FILE_NOT_FOUND, "no mounted volume with this id", str(volume_id))
    unmount(entry["volume_id"])
