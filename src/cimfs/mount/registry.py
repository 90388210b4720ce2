"""Where live mounts are recorded, and which mounts are live.

The registry is a directory of JSON entries (one per mount, named by volume
id) next to each FUSE daemon's log, in the runtime directory, so any process
of the same user can list and dismount mounts.  Liveness is read from the
daemon's pid and /proc/self/mountinfo (parsed here: a mount is never
stat'ed, which could hang on a dead FUSE daemon).  The environment variable
that hands a remote image's storage options to the daemon is named here too,
for both ends of that hand-over.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid

from ..remote import is_url

#: How the daemon gets a remote image's storage options (JSON): not on its
#: command line, where every user could read credentials in them.
STORAGE_OPTIONS_ENV = "CIMFS_MOUNT_STORAGE_OPTIONS"
#: The file system type of a kernel-engine mount in mountinfo.
KERNEL_FSTYPE = "erofs"


def registry_dir() -> str:
    """Where live mounts are recorded: ``$CIMFS_RUNTIME_DIR``, else
    ``$XDG_RUNTIME_DIR/cimfs/mounts``, else ``/run/cimfs/mounts`` for root,
    else ``$TMPDIR/cimfs-UID/mounts`` (created 0700)."""
    base = os.environ.get("CIMFS_RUNTIME_DIR")
    if base:
        d = base
    elif os.environ.get("XDG_RUNTIME_DIR") and os.access(os.environ["XDG_RUNTIME_DIR"], os.W_OK):
        d = os.path.join(os.environ["XDG_RUNTIME_DIR"], "cimfs", "mounts")
    elif os.getuid() == 0 and os.access("/run", os.W_OK):
        d = "/run/cimfs/mounts"
    else:
        d = os.path.join(tempfile.gettempdir(), f"cimfs-{os.getuid()}", "mounts")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def _entry_path(volume_id) -> str:
    return os.path.join(registry_dir(), f"{volume_id}.json")


def _log_path(volume_id) -> str:
    return os.path.join(registry_dir(), f"{volume_id}.log")


def write_entry(volume_id, mountpoint: str, image: str, pid: int, sources: list | None = None) -> None:
    """``sources``: the images of a merged view (top first); ``image`` is then the top one."""
    if sources:
        image = sources[0]
    entry = {
        "volume_id": str(volume_id),
        "mountpoint": os.path.abspath(mountpoint),
        "image": image if is_url(image) else os.path.abspath(image),
        "pid": pid,
    }
    if sources:
        entry["sources"] = [os.path.abspath(s) for s in sources]
    write_entry_data(entry)


def write_entry_data(entry: dict) -> None:
    path = _entry_path(entry["volume_id"])
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(entry, f)
    os.replace(tmp, path)


def remove_entry(volume_id) -> None:
    """Forget a mount (its registry entry and its daemon's log)."""
    _remove(_entry_path(volume_id))
    _remove(_log_path(volume_id))


def _alive(pid: int) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _unescape_mountinfo(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounted() -> dict[str, str]:
    """Mount point -> file system type, from /proc/self/mountinfo (never stats a mount)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and right:
                    out[_unescape_mountinfo(fields[4])] = right.split()[0]
    except OSError:
        pass
    return out


def is_cimfs_mount(mountpoint) -> bool:
    return _mounted().get(os.path.realpath(os.fspath(mountpoint))) == "fuse.cimfs"


def is_live_kernel_mount(entry: dict, table: dict[str, str]) -> bool:
    """Whether the kernel still has the EROFS mount of a kernel-engine ``entry`` (``table``: :func:`_mounted`)."""
    return table.get(os.path.realpath(entry.get("mountpoint", ""))) == KERNEL_FSTYPE


def mounts() -> list[dict]:
    """Live mounts of this user: dicts with volume_id, mountpoint, image, pid.

    Entries whose daemon is gone are dropped (a non-empty daemon log is kept
    for a post-mortem; empty logs without an entry are removed)."""
    out = []
    d = registry_dir()
    table = _mounted()
    names = sorted(os.listdir(d))
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(d, name)) as f:
                entry = json.load(f)
        except (OSError, ValueError):
            continue
        if entry.get("engine") == "kernel":  # no daemon: live while the kernel has the mount
            if is_live_kernel_mount(entry, table):
                out.append(entry)
            else:
                _remove(_entry_path(name[:-5]))
            continue
        pid = entry.get("pid", -1)
        mp = os.path.realpath(entry.get("mountpoint", ""))
        if _alive(pid) and table.get(mp) == "fuse.cimfs":
            out.append(entry)
        elif not _alive(pid):
            _remove(_entry_path(name[:-5]))
    for name in names:
        if name.endswith(".log") and name[:-4] + ".json" not in names:
            path = os.path.join(d, name)
            try:
                if os.stat(path).st_size == 0 and time.time() - os.stat(path).st_mtime > 60:
                    _remove(path)
            except OSError:
                pass
    return out


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def find_entry(target) -> dict | None:
    """The live mount at mount point ``target``, or with volume id ``target``; None if there is none."""
    live = mounts()
    vid: str | None
    if isinstance(target, uuid.UUID):
        vid = str(target)
    else:
        try:
            vid = str(uuid.UUID(str(target))) if not os.path.exists(os.fspath(target)) else None
        except ValueError:
            vid = None
    for e in live:
        if vid is not None and e["volume_id"] == vid:
            return e
        if vid is None and os.path.realpath(e["mountpoint"]) == os.path.realpath(os.fspath(target)):
            return e
    return None
