"""The mount daemon: opens the image, mounts it, reports readiness, serves it.

``python -m cimfs.mount.daemon IMAGE MOUNTPOINT --volume-id ID --ready-fd N [--detach] ...``

With ``--detach`` it forks once more (so it is no child of the caller and never
lingers as a zombie), writes ``PID <pid>`` on the ready descriptor, and then
``OK`` once the mount is live or ``ERR {json: hresult, reason, path}`` (one line) when the
image cannot be opened or mounted — in which case nothing stays mounted and the
process exits.  SIGTERM, SIGINT and SIGHUP unmount and exit; so does
``fusermount3 -u`` from anyone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys

from ..errors import E_FAIL, CimError
from ..reader import Image
from ..reader import open as open_image
from .registry import STORAGE_OPTIONS_ENV, remove_entry, write_entry


def fsname(cim_path: str) -> str:
    """The mount's source (``fsname=``, the first column of ``mount``): the
    image path with every byte outside printable ASCII, and ``%`` itself,
    written ``%XX`` (URL style, so it decodes back to the path's bytes).
    pyfuse3 hands options to libfuse as ASCII; a path in any other script
    would fail the mount."""
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x25 else f"%{b:02X}" for b in os.fsencode(cim_path))


def _escape_option(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,")


def prepare(
    cim_path: str,
    mountpoint: str,
    *,
    uid=None,
    gid=None,
    umask=None,
    allow_other=False,
    storage_options=None,
    cache_dir=None,
    remove_dir=None,
):
    """Open and check the image, then mount it; raises CimError with a one-line reason.

    ``remove_dir``: the private directory of a merged view (see
    :func:`cimfs.mount.mount_merged`): every region file is opened, then the
    directory is removed.

    Returns ``(image, fs)`` with the kernel mount in place (not yet served)."""
    import pyfuse3  # optional dependency (cimfs[mount]), as are trio and .fs, which needs both

    from .fs import CimFs, Options  # optional dependency: pyfuse3
    from .wire import WireFs  # optional dependency: it serves a mount pyfuse3 made

    try:
        if remove_dir is not None:
            # The merged view's own directory: its links to the sources' region files are cimfs's, checked there.
            image = Image(cim_path, private_links=True)
        else:
            image = open_image(cim_path, storage_options, cache_dir=cache_dir)
    except CimError:
        raise
    except Exception as e:  # noqa: BLE001 - anything else is a damaged image too
        raise CimError(E_FAIL, f"cannot read the image: {e}", cim_path) from None
    try:
        if remove_dir is not None:
            for index in range(len(image.region_names)):
                image._region(index)
            shutil.rmtree(remove_dir, ignore_errors=True)
        fs = (CimFs if os.environ.get(LOOP_ENV) == "pyfuse3" else WireFs)(image, Options(uid, gid, umask))
        # The root and its listing must be readable before anything is mounted.
        fs.entry(image.root_id)
        for _entry in image.scandir(image.root_id):
            pass
    except CimError as e:
        image.close()
        raise CimError(e.hresult, e.strerror, cim_path) from None
    except Exception as e:  # noqa: BLE001
        image.close()
        raise CimError(E_FAIL, f"the image's root cannot be read: {e}", cim_path) from None
    options = set(pyfuse3.default_options) | {"ro", "subtype=cimfs", f"fsname={_escape_option(fsname(cim_path))}"}
    if allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(fs, mountpoint, options)
    except Exception as e:  # noqa: BLE001 - libfuse printed its own reason on stderr
        image.close()
        raise CimError(
            E_FAIL, f"cannot mount (is it an existing directory, is /dev/fuse usable? {e})", mountpoint
        ) from None
    _prepared[id(image)] = fs
    return image, fs


#: ``CIMFS_FUSE_LOOP=pyfuse3`` serves requests with pyfuse3's trio loop instead
#: of answering them on /dev/fuse (:mod:`cimfs.mount.wire`): for comparison.
LOOP_ENV = "CIMFS_FUSE_LOOP"
_prepared: dict = {}  # id(image) -> the file system prepare() made for it, until serve() takes it


#: Kernel read-ahead for the mount (the FUSE default is 128 KiB).  Sequential
#: readers then get 1 MiB READ requests: a quarter of the round trips to this
#: Python daemon, which is what bounds large-file throughput.
READ_AHEAD_KB = 1024


async def tune_read_ahead(mountpoint: str) -> None:
    import trio  # optional dependency (cimfs[mount])

    # The kernel sets the read-ahead from the INIT reply; a stat through the
    # mount returns only after INIT was answered by the loop this runs beside.
    resolved = await trio.to_thread.run_sync(os.path.realpath, mountpoint)
    try:
        await trio.to_thread.run_sync(os.stat, resolved)
    except OSError:
        return
    raise_read_ahead(resolved)


def _mount_device(resolved_mountpoint: str) -> str | None:
    """MAJ:MIN of the FUSE file system mounted on ``resolved_mountpoint`` (a
    real path), from mountinfo: a stat would wait on the daemon, which is not
    serving yet."""
    want = resolved_mountpoint
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(" ")
                if len(fields) > 4:
                    point = (
                        fields[4]
                        .replace("\\040", " ")
                        .replace("\\011", "\t")
                        .replace("\\012", "\n")
                        .replace("\\134", "\\")
                    )
                    if point == want and " - fuse" in line:
                        found = fields[2]  # the last (topmost) mount on that path wins
    except OSError:
        return None
    return found


def raise_read_ahead(resolved_mountpoint: str, kb: int = READ_AHEAD_KB) -> bool:
    """Best effort: only root may write the mount's ``read_ahead_kb``."""
    dev = _mount_device(resolved_mountpoint)
    if not dev:
        return False
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(kb))
        return True
    except OSError:
        return False


def serve(image, volume_id, mountpoint: str) -> None:
    """Serve the mount until it is unmounted or a signal arrives, then clean up."""
    import pyfuse3  # optional dependency (cimfs[mount])

    from .wire import WireFs, fuse_fd  # optional dependency: it serves a mount pyfuse3 made

    fs = _prepared.pop(id(image), None)
    unmounted = False
    try:
        fd = fuse_fd() if isinstance(fs, WireFs) else None
        if fd is not None:
            unmounted = _serve_wire(fs, fd, image, mountpoint)
        else:
            unmounted = _serve_pyfuse3(fs, mountpoint)
    finally:
        try:
            pyfuse3.close(unmount=not unmounted)
        finally:
            remove_entry(volume_id)
            image.close()


def _serve_wire(fs, fd: int, image, mountpoint: str) -> bool:
    """Answer the kernel on ``fd`` (:class:`cimfs.mount.wire.WireFs`); True once the mount is gone."""
    import subprocess  # start-up time: only the daemon's request loop needs these
    import threading  # start-up time: as above

    from .wire import THREADS, THREADS_REMOTE  # optional dependency: as in serve()

    stopped = threading.Event()
    signalled = []

    def on_signal(signum, frame):
        signalled.append(signum)
        stopped.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        pool = fs.run(fd, THREADS_REMOTE if getattr(image, "storage", None) is not None else THREADS, stopped)
        threading.Thread(target=_tune_read_ahead_blocking, args=(mountpoint,), daemon=True).start()
        while not stopped.wait(1.0):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not signalled:
        # The kernel ended the session (unmounted), or a request loop failed
        # (then the unmount below ends the others).
        return not any(t.is_alive() for t in pool)
    # Detach the mount so every loop's read ends (ENODEV) before libfuse closes the descriptor.
    subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, check=False)
    for t in pool:
        t.join(timeout=5.0)
    return True


def _tune_read_ahead_blocking(mountpoint: str) -> None:
    resolved = os.path.realpath(mountpoint)
    try:
        os.stat(resolved)  # returns once INIT was answered
    except OSError:
        return
    raise_read_ahead(resolved)


def _serve_pyfuse3(fs, mountpoint: str) -> bool:
    import pyfuse3  # optional dependency (cimfs[mount])
    import trio  # optional dependency (cimfs[mount])

    from . import opstats  # start-up time: only this loop counts requests here

    if fs is not None:
        opstats.install(fs)
    unmounted_by_kernel = False

    async def run():
        nonlocal unmounted_by_kernel
        async with trio.open_nursery() as nursery:

            async def on_signal():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(on_signal)
            nursery.start_soon(tune_read_ahead, mountpoint)
            await pyfuse3.main()
            unmounted_by_kernel = True  # fusermount3 -u ended the session
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    return unmounted_by_kernel


def _write_line(fd: int, line: str) -> None:
    os.write(fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cimfs.mount.daemon")
    p.add_argument("image")
    p.add_argument("mountpoint")
    p.add_argument("--volume-id", required=True)
    p.add_argument("--uid", type=int)
    p.add_argument("--gid", type=int)
    p.add_argument("--umask", type=lambda s: int(s, 8))
    p.add_argument("--allow-other", action="store_true")
    p.add_argument("--remove-dir", help="a merged view's private directory: removed once every region file is open")
    p.add_argument("--source", action="append", help="a merged view's images, top first (for the mount registry)")
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--cache-dir", help="keep a remote image's fetched blocks here")
    p.add_argument("--detach", action="store_true", help="fork once more and leave the caller")
    a = p.parse_args(argv)
    fd = a.ready_fd
    if a.detach:
        if os.fork() > 0:
            os._exit(0)  # the caller reaps this one at once; the grandchild serves
    os.chdir("/")  # hold no directory busy
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s cimfs-mount[%(process)d] %(levelname)s %(message)s")
    try:
        _write_line(fd, f"PID {os.getpid()}")
        try:
            options = os.environ.pop(STORAGE_OPTIONS_ENV, None)
            image, fs = prepare(
                a.image,
                a.mountpoint,
                uid=a.uid,
                gid=a.gid,
                umask=a.umask,
                allow_other=a.allow_other,
                storage_options=json.loads(options) if options else None,
                cache_dir=a.cache_dir,
                remove_dir=a.remove_dir,
            )
        except CimError as e:
            _write_line(fd, "ERR " + json.dumps({"hresult": e.hresult, "reason": e.strerror, "path": e.filename}))
            return 1
        try:
            write_entry(a.volume_id, a.mountpoint, a.image, os.getpid(), a.source)
        except OSError as e:
            import pyfuse3  # optional dependency (cimfs[mount])

            pyfuse3.close(unmount=True)
            image.close()
            _write_line(fd, "ERR " + json.dumps({"hresult": E_FAIL, "reason": f"cannot write the mount registry: {e}"}))
            return 1
        _write_line(fd, "OK")
    finally:
        os.close(fd)
    serve(image, a.volume_id, a.mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
