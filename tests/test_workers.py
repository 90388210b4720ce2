"""The forked-worker plumbing (cimfs.workers) and how its two users report a worker that dies."""

import multiprocessing
import os

import pytest

import cimfs
from cimfs import CimError, dataprocess, store, workers

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def _sum_batches(scale, batches):
    return [scale * sum(b) for b in batches]


def _die_at_second_batch(batches):
    for i, _ in enumerate(batches):
        if i == 1:
            os._exit(7)
    return "unreachable"


def _wait_forever(batches):
    for _ in batches:
        pass
    return "ended"


def test_batches_go_out_and_one_result_comes_back():
    ctx = workers.fork_context()
    first = workers.Worker(ctx, _sum_batches, (10,), name="t-a")
    second = workers.Worker(ctx, _sum_batches, (1,), name="t-b", others=[first])
    for i in range(100):
        first.send([i, i])
        second.send([i])
    first.end()
    second.end()
    assert first.result() == [20 * i for i in range(100)]
    assert second.result() == list(range(100))
    assert first.proc.exitcode == 0 and second.proc.exitcode == 0
    assert first.jobs.closed and first.results.closed
    assert not multiprocessing.active_children()


def test_a_worker_that_dies_gives_no_result_and_sends_do_not_raise():
    w = workers.Worker(workers.fork_context(), _die_at_second_batch, (), name="t-die")
    for i in range(50):
        w.send(list(range(1000)))  # after the death: EPIPE is swallowed
    w.end()
    assert w.result() is None
    assert w.proc.exitcode == 7
    assert not multiprocessing.active_children()


def test_a_worker_leaves_when_the_owner_goes_away():
    """The job pipe's end of file (every owner end closed, also the one a
    second worker inherited) ends the worker with exit code 1."""
    ctx = workers.fork_context()
    a = workers.Worker(ctx, _wait_forever, (), name="t-a")
    b = workers.Worker(ctx, _wait_forever, (), name="t-b", others=[a])
    a.close()  # b closed its copies at start: a sees end of file now
    a.proc.join(timeout=60)
    assert a.proc.exitcode == 1
    b.end()
    assert b.result() == "ended"


def test_abandon_kills_and_reaps():
    ctx = workers.fork_context()
    ws = [workers.Worker(ctx, _wait_forever, (), name="t-a")]
    ws.append(workers.Worker(ctx, _wait_forever, (), name="t-b", others=ws))
    workers.abandon_all(ws)
    assert all(w.proc.exitcode is not None and w.proc.exitcode < 0 for w in ws)
    assert all(w.jobs.closed and w.results.closed for w in ws)
    assert not multiprocessing.active_children()


def test_a_data_process_that_dies_fails_the_image(tmp_path, monkeypatch):
    if not store.DataProcess.available():
        pytest.skip("no data process here")
    monkeypatch.setattr(dataprocess, "_data_process_main", lambda *args: os._exit(3))
    src = tmp_path / "f"
    src.write_bytes(os.urandom(100_000))
    (tmp_path / "img").mkdir()
    with pytest.raises(CimError, match=r"data process ended unexpectedly \(exit code 3\)"):
        with cimfs.create(tmp_path / "img", "t.cim", data_process=True) as w:
            w.add_file("f", src)
    assert os.listdir(tmp_path / "img") == []
    assert not multiprocessing.active_children()
