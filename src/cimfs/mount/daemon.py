"""The mount daemon: opens the image, mounts it, reports readiness, serves it.

``python -m cimfs.mount.daemon IMAGE MOUNTPOINT --volume-id ID [--ready-fd N]``
writes ``OK`` or ``ERR <hresult> <reason>`` on the ready descriptor.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def _report(fd: int | None, line: str) -> None:
    if fd is None:
        if not line.startswith("OK"):
            print(f"cimfs: {line[4:] if line.startswith('ERR ') else line}", file=sys.stderr)
        return
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
    finally:
        os.close(fd)


def serve(cim_path, mountpoint, volume_id, *, uid=None, gid=None, umask=None, allow_other=False, ready: int | None = None) -> int:
    import pyfuse3
    import trio

    from .. import CimError, open as open_image
    from . import remove_entry, write_entry
    from .fs import CimFs, Options

    try:
        image = open_image(cim_path)
        fs = CimFs(image, Options(uid, gid, umask))
        fs._entry(image.root_id)  # the root must be readable before we mount
        options = set(pyfuse3.default_options) | {"fsname=cimfs", "subtype=cimfs", "ro"}
        if allow_other:
            options.add("allow_other")
        pyfuse3.init(fs, mountpoint, options)
    except CimError as e:
        _report(ready, f"ERR {e.hresult:#x} {e}")
        return 1
    except pyfuse3.FUSEError as e:
        _report(ready, f"ERR 0x80004005 {cim_path}: the image's root cannot be read ({os.strerror(e.errno)})")
        return 1
    except Exception as e:  # noqa: BLE001 - reported to the caller as one line
        _report(ready, f"ERR 0x80004005 {mountpoint}: cannot mount: {e}")
        return 1
    write_entry(volume_id, mountpoint, cim_path, os.getpid())
    _report(ready, "OK")
    # SIGTERM ends the daemon like Ctrl-C: unmount, then exit.
    signal.signal(signal.SIGTERM, lambda *a: signal.raise_signal(signal.SIGINT))
    unmount = True
    try:
        trio.run(pyfuse3.main)
        unmount = False  # the kernel ended the session: already unmounted
    except KeyboardInterrupt:
        pass
    finally:
        pyfuse3.close(unmount=unmount)
        remove_entry(volume_id)
        image.close()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cimfs-mount-daemon")
    p.add_argument("image")
    p.add_argument("mountpoint")
    p.add_argument("--volume-id", required=True)
    p.add_argument("--uid", type=int)
    p.add_argument("--gid", type=int)
    p.add_argument("--umask", type=lambda s: int(s, 8))
    p.add_argument("--allow-other", action="store_true")
    p.add_argument("--ready-fd", type=int)
    a = p.parse_args(argv)
    return serve(a.image, a.mountpoint, a.volume_id, uid=a.uid, gid=a.gid, umask=a.umask,
                 allow_other=a.allow_other, ready=a.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
