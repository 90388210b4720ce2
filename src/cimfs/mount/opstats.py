"""Per-request counters of the FUSE daemon, for measuring the mounted read path.

With ``CIMFS_FUSE_STATS=FILE`` in the daemon's environment every request kind
is counted and its handler's time summed (wall and CPU, in the handler only:
pyfuse3's and trio's share of a request is the daemon's CPU minus these sums),
and FILE gets one JSON object when the daemon exits::

    {"requests": {"open": [count, wall_s, cpu_s], ...}, "read_bytes": N,
     "daemon_cpu_s": user+sys of the whole process}

The wire engine (:mod:`cimfs.mount.wire`) counts requests by opcode instead
(``{"opcodes": {"15": count, ...}}``): its handlers are not coroutines.

Off (the default) it costs nothing: the handlers are not wrapped.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import os
import time

ENV = "CIMFS_FUSE_STATS"

#: The request kinds a read-only mount sees.
OPS = (
    "lookup",
    "getattr",
    "readlink",
    "opendir",
    "readdir",
    "releasedir",
    "open",
    "read",
    "release",
    "flush",
    "statfs",
    "listxattr",
    "getxattr",
    "forget",
    "access",
)


def install(fs) -> None:
    """Wrap ``fs``'s handlers with counters when ``CIMFS_FUSE_STATS`` names a file."""
    path = os.environ.get(ENV)
    if not path:
        return
    table: dict[str, list] = {}
    totals = {"read_bytes": 0}
    for name in OPS:
        fn = getattr(fs, name, None)
        if fn is None or not inspect.iscoroutinefunction(fn):
            continue
        table[name] = row = [0, 0.0, 0.0]
        setattr(fs, name, _counted(fn, row, totals if name == "read" else None))

    def dump():
        cpu = os.times()
        with open(path, "w") as f:
            json.dump({"requests": table, **totals, "daemon_cpu_s": cpu.user + cpu.system}, f, indent=1)

    atexit.register(dump)


def _counted(fn, row, totals):
    wall, cpu = time.perf_counter, time.thread_time

    @functools.wraps(fn)
    async def wrapper(*args):
        t, c = wall(), cpu()
        try:
            out = await fn(*args)
        finally:
            row[0] += 1
            row[1] += wall() - t
            row[2] += cpu() - c
        if totals is not None and out is not None:
            totals["read_bytes"] += len(out)
        return out

    return wrapper


def wire_counter() -> dict | None:
    """A dict the wire engine counts requests in (opcode -> count), dumped at
    exit; None when ``CIMFS_FUSE_STATS`` is unset."""
    path = os.environ.get(ENV)
    if not path:
        return None
    counts: dict[int, int] = {}

    def dump():
        cpu = os.times()
        with open(path, "w") as f:
            json.dump(
                {"opcodes": {str(k): v for k, v in sorted(counts.items())}, "daemon_cpu_s": cpu.user + cpu.system},
                f,
                indent=1,
            )

    atexit.register(dump)
    return counts
