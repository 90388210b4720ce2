"""The kernel engine's index cache, and the files it hands the kernel.

The kernel mounts what cimfs checked, nothing else: the index is built or
verified by the process that mounts it, in a cache directory that is the
caller's alone; every file -- region files, the index, the cache's own
entries -- is opened once without following links and checked through its
descriptor, and the kernel is given ``/proc/self/fd/N`` of those descriptors
(see :func:`prepared`).  docs/MOUNT.md ("Trust") says what is assumed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat

from ..atomic import open_new, replacing
from ..erofs import write_index
from ..errors import E_ACCESSDENIED, E_FAIL, E_INVALIDARG, ERROR_FILE_NOT_FOUND, CimError
from ..reader import _MAX_FILESYSTEM_FILE, Image, _open_regular
from ..reader import open as open_image
from .mergedview import merged_view
from .view import Options

#: Bumped whenever the index layout or the cache entry changes, so old cached indexes are not reused.
INDEX_VERSION = 2
#: A cache entry's JSON is a few hundred bytes per region file: anything near this is not ours.
_MAX_ENTRY = 1 << 20


def _cache_path() -> str:
    d = os.environ.get("CIMFS_CACHE_DIR")
    if not d:
        if os.environ.get("XDG_CACHE_HOME"):
            d = os.path.join(os.environ["XDG_CACHE_HOME"], "cimfs", "erofs")
        elif os.geteuid() == 0:
            d = "/var/cache/cimfs/erofs"
        else:
            d = os.path.join(os.path.expanduser("~"), ".cache", "cimfs", "erofs")
    return os.path.abspath(d)


def _untrusted(st: os.stat_result) -> str | None:
    """Why a cache directory or file with this stat is not the caller's alone (None: it is)."""
    uid = os.geteuid()
    if st.st_uid != uid:
        return f"owned by uid {st.st_uid}, not by uid {uid}"
    if st.st_mode & 0o022:
        who = "group and others" if st.st_mode & 0o022 == 0o022 else "group" if st.st_mode & 0o020 else "others"
        return f"writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _open_cache_dir() -> tuple[str, int]:
    """(path, descriptor) of the index cache, created 0700 where missing.
    [choice] Refused unless it is owned by the caller and writable by no one
    else (as ssh refuses a group-writable key): whoever can write it could
    plant an index the kernel would mount.  Every later step goes through the
    descriptor, so renaming a parent directory cannot redirect it."""
    d = _cache_path()
    missing = []
    p = d
    while not os.path.lexists(p) and os.path.dirname(p) != p:
        missing.append(p)
        p = os.path.dirname(p)
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: the checks below decide
        except OSError as e:
            raise CimError(E_ACCESSDENIED, f"cannot create the index cache directory: {e.strerror}", p) from None
        st = os.lstat(p)
        why = None if stat.S_ISDIR(st.st_mode) else "not a directory"
        why = why or _untrusted(st)
        if why:
            raise CimError(E_ACCESSDENIED, f"refusing the index cache directory created here: {why}", p)
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise CimError(E_ACCESSDENIED, f"cannot open the index cache directory: {e.strerror}", d) from None
    why = _untrusted(os.fstat(fd))
    if why:
        os.close(fd)
        raise CimError(
            E_ACCESSDENIED,
            f"refusing the kernel engine's index cache: {why} "
            "(another user could plant an index the kernel would mount; set CIMFS_CACHE_DIR)",
            d,
        )
    return d, fd


def cache_dir() -> str:
    """Where indexes are kept (checked and created, see :func:`_open_cache_dir`):
    ``$CIMFS_CACHE_DIR``, else ``$XDG_CACHE_HOME/cimfs/erofs``, else
    ``/var/cache/cimfs/erofs`` for root, else ``~/.cache/cimfs/erofs``."""
    d, fd = _open_cache_dir()
    os.close(fd)
    return d


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes whenever a file's bytes may have: ctime moves on every
    write and no one but the kernel can set it (an in-place rewrite with its
    size and mtime put back still changes it)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class _Pinned:
    """The region files the kernel will read, each opened once (``O_NOFOLLOW``,
    a regular file, the very file the reader parsed), by region file name."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.paths: dict[str, str] = {}
        self.ids: dict[str, tuple] = {}

    def add(self, image) -> list[tuple[str, tuple]]:
        """Pin every region file of ``image``: [(name, identity)] in the image's order."""
        out = []
        for i, (name, _) in enumerate(image.region_names):
            region = image._region(i)
            if name not in self.fds:
                fd = self._open(region.path, name)
                self.fds[name], self.paths[name] = fd, region.path
                self.ids[name] = _identity(os.fstat(fd))
            self._same_file(image, i, name)
            out.append((name, self.ids[name]))
        return out

    @staticmethod
    def _open(path: str, name: str) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CimError(
                    E_ACCESSDENIED,
                    f"region file {name} is a symbolic link (the kernel engine mounts an image's own files only)",
                    path,
                ) from None
            raise CimError(ERROR_FILE_NOT_FOUND, f"cannot open region file {name}: {e.strerror}", path) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CimError(E_INVALIDARG, f"region file {name} is not a regular file", path)
        return fd

    def _same_file(self, image, i: int, name: str) -> None:
        """The reader's descriptor of region ``i`` is the pinned file: what the
        index says about it was read from the file the kernel gets."""
        region = image._regions[i]
        if region is None or region.fd is None:
            return
        a, b = os.fstat(region.fd), os.fstat(self.fds[name])
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            raise CimError(
                E_ACCESSDENIED, f"region file {name} was replaced while the image was opened", self.paths[name]
            )

    def check(self, image) -> None:
        """Every region file ``image`` (a merged image over pinned sources) read is a pinned one."""
        for i, (name, _) in enumerate(image.region_names):
            if name in self.fds:
                self._same_file(image, i, name)

    def unchanged(self) -> None:
        """No pinned file was written while it was read (else the index may mix old and new)."""
        for name, fd in self.fds.items():
            if _identity(os.fstat(fd)) != self.ids[name]:
                raise CimError(E_FAIL, f"region file {name} changed while it was indexed", self.paths[name])

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class Prepared:
    """An index ready to mount: ``index_fd`` (the checked index), ``devices``
    ([(region file name, descriptor, path)] in the index's device order),
    ``index`` (its path in the cache) and ``built`` (made now)."""

    def __init__(self, index: str, index_fd: int, devices: list, built: bool):
        self.index, self.index_fd, self.devices, self.built = index, index_fd, devices, built


def _read_cim(path: str) -> bytes:
    fd = _open_regular(path, "image", is_image=True)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(_MAX_FILESYSTEM_FILE)
    finally:
        os.close(fd)


@contextlib.contextmanager
def prepared(paths: list[str], options: Options, merged: bool = False):
    """The index of the image ``paths[0]`` (or of the merged view of ``paths``,
    top first), from the cache once verified, else built into it.  The
    descriptors stay open inside the ``with``: mount through them.

    [choice] The cache key is a digest of every source's .cim bytes and of
    every region file's (name, device, inode, size, mtime, ctime) as fstat
    gives them for the pinned descriptors, with the owner options and the
    index version.  Building reads every metadata object (0.5 s for 20 000
    files); verifying a cached entry costs an fstat per region file and a
    SHA-256 of the index (metadata only: 3 ms for those 20 000 files)."""
    paths = [os.path.realpath(p) for p in paths]
    pinned = _Pinned()
    images = []
    dfd = index_fd = None
    try:
        h = hashlib.sha256(
            f"{'merged ' if merged else ''}v{INDEX_VERSION} {options.uid} {options.gid} {options.umask}\0".encode()
        )
        raws = []
        for p in paths:
            raws.append(_read_cim(p))
            images.append(open_image(p))
            h.update(os.fsencode(p) + b"\0" + len(raws[-1]).to_bytes(8, "little") + raws[-1])
            for name, ident in pinned.add(images[-1]):
                h.update(f"{name} {ident}\0".encode())
        key = h.hexdigest()[:32]
        d, dfd = _open_cache_dir()
        found = _load_entry(dfd, key, pinned)
        built = found is None
        if found is None:
            tag = "merged:" + "\0".join(paths) if merged else paths[0]
            found = _build_entry(dfd, key, tag, pinned, lambda fd: _build(images, paths, fd, options, pinned, merged))
            _drop_stale(dfd, tag, key)
        index_fd, regions = found
        for p, raw in zip(paths, raws):
            if _read_cim(p) != raw:
                raise CimError(E_FAIL, "the image changed while it was indexed", p)
        pinned.unchanged()
        yield Prepared(
            os.path.join(d, f"{key}.erofs"), index_fd, [(n, pinned.fds[n], pinned.paths[n]) for n in regions], built
        )
    finally:
        for fd in (index_fd, dfd):
            if fd is not None:
                os.close(fd)
        for image in images:
            image.close()
        pinned.close()


def _build(images, paths, fd: int, options: Options, pinned: _Pinned, merged: bool) -> tuple[dict, list[str]]:
    """Write the index to ``fd``: (write_index's info, the region file name of each device)."""
    if not merged:
        image = images[0]
        info = write_index(image, fd, options=options)
        return info, _device_names(image, info, pinned)
    # [choice] The merged image is built in a private directory (as for the
    # FUSE engine), indexed and removed at once: it holds only metadata
    # (copied into the index), so the devices are the sources' pinned files.
    directory, cim_path = merged_view(paths)
    try:
        with Image(cim_path, private_links=True) as image:
            info = write_index(image, fd, options=options)
            pinned.check(image)
            return info, _device_names(image, info, pinned)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _device_names(image, info: dict, pinned: _Pinned) -> list[str]:
    by_path = {r.path: name for (name, _), r in zip(image.region_names, image._regions) if r is not None}
    names = []
    for path in info["devices"]:
        name = by_path.get(path)
        if name not in pinned.fds:  # a merged image's own region holds no file data: never expected
            raise CimError(
                E_FAIL, f"the index addresses a file that is not a source's region file ({path})", image.path
            )
        names.append(name)
    return names


def _digest(fd: int) -> tuple[str, int]:
    h = hashlib.sha256()
    at = 0
    while True:
        chunk = os.pread(fd, 1 << 20, at)
        if not chunk:
            return h.hexdigest(), at
        h.update(chunk)
        at += len(chunk)


class _Untrusted(Exception):
    """A cache entry that is not what this process wrote: dropped and rebuilt."""


def _open_entry_file(name: str, dfd: int) -> int:
    """A cache file opened without following a link, checked to be a regular file only the caller could write."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dfd)
    st = os.fstat(fd)
    why = "not a regular file" if not stat.S_ISREG(st.st_mode) else _untrusted(st)
    if why:
        os.close(fd)
        raise _Untrusted(f"{name}: {why}")
    return fd


def _read_entry(name: str, dfd: int) -> dict:
    fd = _open_entry_file(name, dfd)
    try:
        raw = os.pread(fd, _MAX_ENTRY + 1, 0)
    finally:
        os.close(fd)
    if len(raw) > _MAX_ENTRY:
        raise _Untrusted(f"{name}: too large")
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise _Untrusted(f"{name}: not an object")
    return meta


def _load_entry(dfd: int, key: str, pinned: _Pinned) -> tuple[int, list[str]] | None:
    """(index descriptor, device region names) of the cached entry ``key``
    once it checks out: its JSON names only region files of this image and
    the SHA-256 of the index, which is hashed from the descriptor the kernel
    will get.  A damaged, foreign or stale entry is removed: None."""
    index_fd = None
    try:
        meta = _read_entry(f"{key}.json", dfd)
        regions, digest, size = meta.get("regions"), meta.get("index_sha256"), meta.get("index_size")
        if meta.get("version") != INDEX_VERSION or meta.get("key") != key:
            raise _Untrusted("another key or version")
        if not isinstance(regions, list) or not all(isinstance(n, str) and n in pinned.fds for n in regions):
            raise _Untrusted("devices that are not this image's region files")
        index_fd = _open_entry_file(f"{key}.erofs", dfd)
        if (digest, size) != _digest(index_fd):
            raise _Untrusted("the index is not the one recorded")
        return index_fd, regions
    except FileNotFoundError:
        pass  # no entry (or half of one: rebuilt below)
    except (OSError, ValueError, TypeError, RecursionError, _Untrusted):
        pass
    if index_fd is not None:
        os.close(index_fd)
    for name in (f"{key}.json", f"{key}.erofs"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)
    return None


def _build_entry(dfd: int, key: str, tag: str, pinned: _Pinned, build) -> tuple[int, list[str]]:
    """Build the index into the cache (temporary names, ``O_EXCL``: a failed
    build leaves nothing, a planted name is never written through) and
    record it; (index descriptor, device region names)."""
    fd = None
    try:
        with replacing(f"{key}.erofs", dir_fd=dfd) as tmp:
            fd = open_new(tmp, 0o600, dir_fd=dfd, readable=True)
            info, regions = build(fd)
            digest, size = _digest(fd)
        meta = {
            "version": INDEX_VERSION,
            "key": key,
            "image": tag,
            "regions": regions,
            "paths": [pinned.paths[n] for n in regions],
            "index_sha256": digest,
            "index_size": size,
            "block_size": info["block_size"],
            "copied_bytes": info["copied_bytes"],
        }
        with replacing(f"{key}.json", dir_fd=dfd) as tmp:
            mfd = open_new(tmp, 0o600, dir_fd=dfd)
            try:
                os.write(mfd, json.dumps(meta).encode())
                os.fsync(mfd)
            finally:
                os.close(mfd)
        return fd, regions
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def ensure_index(cim_path: str, options: Options) -> tuple[str, list[str], bool]:
    """(index path, device paths, built now?) for the image, from the cache or built into it."""
    with prepared([cim_path], options) as p:
        return p.index, [path for _, _, path in p.devices], p.built


def ensure_merged_index(paths: list[str], options: Options) -> tuple[str, list[str], bool]:
    """(index path, device paths, built now?) for the merged view of ``paths`` (top first)."""
    with prepared(paths, options, merged=True) as p:
        return p.index, [path for _, _, path in p.devices], p.built


def _drop_stale(dfd: int, image: str, keep: str) -> None:
    """Forget older indexes of the same .cim path (the image changed since)."""
    for name in os.listdir(dfd):
        if not name.endswith(".json") or name.startswith(keep):
            continue
        try:
            if _read_entry(name, dfd).get("image") != image:
                continue
        except (OSError, ValueError, RecursionError, _Untrusted):
            continue
        for n in (name, name[:-5] + ".erofs"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(n, dir_fd=dfd)
