"""Forked worker processes: the plumbing the store's data processes and the
extractor's file writers share.

A :class:`Worker` is one forked process with two one-way pipes: batches of
jobs go out (the pipe widened so the owner can run ahead), one result comes
back once the owner has sent the end.  With ``feed=True`` a third pipe
carries what the worker produces as it goes (the owner reads ``feed``).  The child ignores Ctrl-C (the owner
handles it and ends the child by closing the pipe), closes every owner end
it inherited (so that end-of-file on its job pipe means the owner is gone,
and it then exits at once, leaving the clean-up to the owner), and sends
what its function returns.  :func:`abandon_all` kills and reaps workers.  What
the jobs and the result are is the caller's business.
"""

from __future__ import annotations

import os
import threading


def can_fork() -> bool:
    """Whether workers may be forked now: a fork copies only the calling
    thread, so any other thread's held locks would stay held in the child."""
    return hasattr(os, "fork") and threading.active_count() == 1


def fork_context():
    import multiprocessing  # start-up time: only the first worker needs it

    return multiprocessing.get_context("fork")


def widen_pipe(conn, size: int = 1 << 20) -> None:
    """Room for many batches in a job pipe to a forked worker (Linux: 64 KiB,
    about one batch, by default): the owner and the worker each run ahead of
    the other instead of taking turns whenever one batch takes longer than
    the next one to build."""
    try:
        import fcntl  # start-up time: only the first worker needs it

        fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except OSError:
        pass  # a lower pipe-max-size: the default still works


class Worker:
    """One forked process running ``main(*args, batches)``, where
    ``batches`` yields what the owner sends until it sends the end; what
    ``main`` returns comes back from :meth:`result`.  ``others``: workers
    started earlier by the same owner, whose pipe ends the child closes too.
    ``feed``: ``main`` gets one more argument before ``batches``, the
    writing end of a pipe whose reading end is the owner's ``feed``."""

    def __init__(self, ctx, main, args: tuple, *, name: str, others=(), pipe_size: int = 1 << 20, feed: bool = False):
        jobs_r, self.jobs = ctx.Pipe(duplex=False)
        widen_pipe(self.jobs, pipe_size)
        self.results, results_w = ctx.Pipe(duplex=False)
        self.feed = feed_w = None
        if feed:
            self.feed, feed_w = ctx.Pipe(duplex=False)
            widen_pipe(feed_w, pipe_size)
            args = tuple(args) + (feed_w,)
        owner_ends = [c for w in others for c in (w.jobs, w.results, w.feed) if c is not None]
        owner_ends += [c for c in (self.jobs, self.results, self.feed) if c is not None]
        self.proc = ctx.Process(target=_child, args=(main, args, jobs_r, results_w, owner_ends), name=name, daemon=True)
        self.proc.start()
        jobs_r.close()
        results_w.close()
        if feed_w is not None:
            feed_w.close()

    def send(self, batch) -> None:
        try:
            self.jobs.send(batch)
        except OSError:
            pass  # the worker is gone; result() says so

    def end(self) -> None:
        """No more batches: the worker finishes and sends its result."""
        self.send(None)

    def result(self):
        """Wait for the worker's result (None if it ended without one: see
        ``proc.exitcode``); the worker is then reaped and its pipes closed."""
        try:
            value = self.results.recv()
        except (EOFError, OSError):
            value = None
        self.proc.join()
        self.close()
        return value

    def close(self) -> None:
        self.jobs.close()
        self.results.close()
        if self.feed is not None:
            self.feed.close()


def abandon_all(workers) -> None:
    """Kill the workers still running, reap them all and close their pipes."""
    for w in workers:
        if w.proc.is_alive():
            w.proc.kill()
    for w in workers:
        w.proc.join()
        w.close()


def _child(main, args: tuple, jobs, results, owner_ends: list) -> None:
    import signal  # start-up time: only stopping a worker needs it

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the owner's; it ends us by closing the pipe
    for c in owner_ends:
        c.close()
    results.send(main(*args, _batches(jobs)))


def _batches(jobs):
    while True:
        try:
            batch = jobs.recv()
        except (EOFError, OSError):  # the owner went away: leave, it removes what was written
            os._exit(1)
        if batch is None:
            return
        yield batch
