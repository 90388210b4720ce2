"""Remote images against storage that misbehaves (issue 22, items 6, 10, 11):
objects replaced while they are read, a server that trickles one byte at a
time, a server that ignores ``Range`` on a large object, and a disk cache
with planted or foreign blocks.  Servers are the real ones of
``remote_servers`` on 127.0.0.1; every wait is bounded by small timeouts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import pytest

fsspec = pytest.importorskip("fsspec", reason="the remote extra (fsspec) is not installed")
pytest.importorskip("s3fs", reason="s3fs is not installed (the test extra)")
pytest.importorskip("moto.server", reason="moto[server] is not installed (the test extra)")

from remote_servers import RangeHTTPServer, S3Server, stop_fsspec_io  # noqa: E402
from test_remote import build_image  # noqa: E402

import cimfs  # noqa: E402

CHANGED = "changed while being read"


@pytest.fixture(scope="module", autouse=True)
def no_thread_left():
    yield
    stop_fsspec_io()
    assert threading.active_count() == 1, [t.name for t in threading.enumerate()]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs") / "layers"
    return d, build_image(d)


@pytest.fixture
def served(image_dir, tmp_path):
    """A private copy of the image (tests change its objects) behind a Range server."""
    d, files = image_dir
    copy = tmp_path / "www" / "layers"
    shutil.copytree(d, copy)
    with RangeHTTPServer(copy.parent) as server:
        yield server, copy, files


def big_region(directory) -> str:
    return max(
        (n for n in os.listdir(directory) if n.startswith("region_")),
        key=lambda n: os.path.getsize(os.path.join(directory, n)),
    )


def replace_in_place(path) -> None:
    """The object rewritten with other bytes of the same size (a new version)."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[-200_000:] = bytes(b ^ 0x5A for b in data[-200_000:])
        f.seek(0)
        f.write(data)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def run_cli(*args, env=None, timeout=120):
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "cimfs.cli", *map(str, args)], capture_output=True, env=full, timeout=timeout
    )


def one_line_error(p) -> str:
    err = p.stderr.decode(errors="replace").strip()
    assert p.returncode == 1, (p.returncode, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ===================================================================== item 6: one version or an error
@pytest.mark.parametrize("conditions", [True, False], ids=["server-honours-If-Match", "server-ignores-If-Match"])
def test_http_object_replaced_between_reads_is_an_error(served, conditions):
    server, d, files = served
    server.conditions = conditions  # off: the answer's own ETag must give the change away
    region = big_region(d)
    with cimfs.open(f"{server.url}/layers/layer.cim") as img:
        big = img.read_at("Files/bin/Big.BIN", 0, 100_000)
        assert big == files["Files/bin/Big.BIN"][:100_000]
        replace_in_place(d / region)
        with pytest.raises(cimfs.CimError) as e:
            img.read_bytes("Files/bin/Big.BIN")
    assert CHANGED in str(e.value) and f"{server.url}/layers/{region}" in str(e.value)
    assert type(e.value) is cimfs.CimError  # the storage's failure, not damage in the image
    assert "412" in str(e.value) if conditions else "ETag" in str(e.value)


def test_cli_cat_of_an_object_replaced_mid_read_fails(served):
    server, d, files = served
    region = big_region(d)
    gets = []

    def replace_after_two_reads(name):
        if name == region:
            gets.append(name)
            if len(gets) == 3:
                replace_in_place(d / region)

    server.before_get = replace_after_two_reads
    p = run_cli("cat", f"{server.url}/layers/layer.cim", "Files/bin/Big.BIN")
    err = one_line_error(p)
    assert CHANGED in err and region in err
    assert len(gets) >= 3
    assert len(p.stdout) < len(files["Files/bin/Big.BIN"])


def test_s3_object_replaced_mid_read(image_dir):
    d, files = image_dir
    with S3Server() as s3:
        s3.upload_dir(d, "plain", "layers")
        region = big_region(d)
        new = bytearray((d / region).read_bytes())
        new[-200_000:] = bytes(200_000)
        with cimfs.open("s3://plain/layers/layer.cim", s3.options()) as img:
            assert img.read_at("Files/bin/Big.BIN", 0, 1000) == files["Files/bin/Big.BIN"][:1000]
            s3.client().put_object(Bucket="plain", Key=f"layers/{region}", Body=bytes(new))
            with pytest.raises(cimfs.CimError) as e:
                img.read_bytes("Files/bin/Big.BIN")
        assert CHANGED in str(e.value) and f"s3://plain/layers/{region}" in str(e.value)
        assert type(e.value) is cimfs.CimError

        # A versioned bucket: the read stays on the version first seen, whole.
        client = s3.client()
        client.create_bucket(Bucket="versioned")
        client.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})
        s3.upload_dir(d, "versioned", "layers")
        with cimfs.open("s3://versioned/layers/layer.cim", s3.options()) as img:
            assert img.read_at("Files/bin/Big.BIN", 0, 1000) == files["Files/bin/Big.BIN"][:1000]
            client.put_object(Bucket="versioned", Key=f"layers/{region}", Body=bytes(new))
            assert img.read_bytes("Files/bin/Big.BIN") == files["Files/bin/Big.BIN"]
    stop_fsspec_io()


def test_memory_object_replaced_between_reads_is_an_error(image_dir):
    d, files = image_dir
    mem = fsspec.filesystem("memory")
    region = big_region(d)
    for n in os.listdir(d):
        mem.pipe_file(f"/replaced/{n}", (d / n).read_bytes())
    try:
        with cimfs.open("memory://replaced/layer.cim") as img:
            assert img.read_at("Files/bin/Big.BIN", 0, 1000) == files["Files/bin/Big.BIN"][:1000]
            mem.pipe_file(f"/replaced/{region}", (d / region).read_bytes())  # same bytes, a new object
            with pytest.raises(cimfs.CimError) as e:
                img.read_bytes("Files/bin/Big.BIN")
        assert CHANGED in str(e.value) and region in str(e.value)
    finally:
        mem.rm("/replaced", recursive=True)


def test_a_server_refusing_head_is_read_through_ranged_gets(served):
    server, _, files = served
    server.no_head = True
    with cimfs.open(f"{server.url}/layers/layer.cim") as img:
        assert img.read_bytes("Files/bin/Big.BIN") == files["Files/bin/Big.BIN"]
        assert img.read_bytes("Files/empty") == b""
    log = server.counter.log
    assert [m for m, _, _ in log].count("HEAD") >= 3  # refused: each size came from a one-byte ranged GET
    assert [n for m, _, n in log if m == "GET"].count(1) >= 3


# ===================================================================== item 6: the disk cache
def cache_files(cache, suffix):
    return sorted(cache / n for n in os.listdir(cache) if n.endswith(suffix))


def test_disk_cache_never_serves_planted_or_foreign_blocks(served, tmp_path):
    server, _, files = served
    url = f"{server.url}/layers/layer.cim"
    cache = tmp_path / "cache"
    big = files["Files/bin/Big.BIN"]
    with cimfs.open(url, cache_dir=str(cache)) as img:
        assert img.read_bytes("Files/bin/Big.BIN") == big
    blocks = cache_files(cache, ".blocks")
    largest = max(blocks, key=os.path.getsize)
    # Planted bytes over every block of the largest region's cache file.
    size = os.path.getsize(largest)
    with open(largest, "r+b") as f:
        f.write(b"\xee" * size)
    server.counter.reset()
    with cimfs.open(url, cache_dir=str(cache)) as img:
        assert img.read_bytes("Files/bin/Big.BIN") == big
    assert server.counter.bytes > len(big)  # all fetched again, none served from the planted file
    # Foreign files: another object's blocks and index put in place of this one's.
    server.counter.reset()
    other = min(blocks, key=os.path.getsize)
    for suffix in (".blocks", ".index"):
        shutil.copyfile(str(other)[: -len(".blocks")] + suffix, str(largest)[: -len(".blocks")] + suffix)
    with cimfs.open(url, cache_dir=str(cache)) as img:
        assert img.read_bytes("Files/bin/Big.BIN") == big
    assert server.counter.bytes > len(big)
    # Kept again: a third read is served from the cache.
    server.counter.reset()
    with cimfs.open(url, cache_dir=str(cache)) as img:
        assert img.read_bytes("Files/bin/Big.BIN") == big
    assert server.counter.bytes < len(big) / 10


def test_disk_cache_follows_a_new_version_and_needs_one(served, tmp_path):
    server, d, files = served
    url = f"{server.url}/layers/layer.cim"
    cache = tmp_path / "cache"
    with cimfs.open(url, cache_dir=str(cache)) as img:
        assert img.read_bytes("Files/bin/Big.BIN") == files["Files/bin/Big.BIN"]
    region = big_region(d)
    replace_in_place(d / region)
    expected = (d / region).read_bytes()
    with cimfs.open(url, cache_dir=str(cache)) as img:  # the new version's blocks, not the old version's
        region_object = img.storage.open_region(region, "the region")
        try:
            assert region_object.pread(0, len(expected)) == expected
            assert region_object.disk is not None
        finally:
            region_object.close()
    # A server that reports no version: nothing is kept on disk (it could not be told apart from a new one).
    server.versions = False
    empty = tmp_path / "cache2"
    with cimfs.open(url, cache_dir=str(empty)) as img:
        assert img.read_bytes("Files/docs/note05.txt") == files["Files/docs/note05.txt"]
    assert not os.path.exists(empty) or os.listdir(empty) == []


def test_cache_directory_writable_by_others_is_refused(served, tmp_path):
    server, _, _ = served
    cache = tmp_path / "shared"
    cache.mkdir()
    os.chmod(cache, 0o777)
    with pytest.raises(cimfs.CimError) as e:
        with cimfs.open(f"{server.url}/layers/layer.cim", cache_dir=str(cache)) as img:
            img.read_bytes("Files/docs/note05.txt")
    assert str(cache) in str(e.value) and "writ" in str(e.value)
    assert os.listdir(cache) == []


# ===================================================================== item 10: a slow server
def test_a_trickling_server_times_out_by_the_options(served):
    server, _, _ = served
    url = f"{server.url}/layers/layer.cim"
    server.trickle = 0.2  # a byte every 0.2 s: never silent for read_timeout, never done within request_timeout
    with pytest.raises(cimfs.CimError) as e:
        cimfs.open(url, {"connect_timeout": 1, "read_timeout": 1, "request_timeout": 1.5})
    assert "timed out" in str(e.value) and url in str(e.value) and "request_timeout=1.5s" in str(e.value)
    from cimfs.fsspec_cim import CimFileSystem

    with pytest.raises(cimfs.CimError) as e:
        CimFileSystem(fo=url, target_protocol="http", target_options={"request_timeout": 1.5})
    assert "timed out" in str(e.value) and "request_timeout=1.5s" in str(e.value)
    p = run_cli("ls", url, env={"CIMFS_REQUEST_TIMEOUT": "1.5"}, timeout=60)
    err = one_line_error(p)
    assert "timed out" in err and url in err
    with pytest.raises(cimfs.CimError) as e:
        cimfs.open(url, {"read_timeout": "soon"})
    assert "read_timeout" in str(e.value)


# ===================================================================== item 11: a server that ignores Range
def test_a_server_that_ignores_range_is_refused_unread(served):
    server, d, _ = served
    region = big_region(d)
    os.truncate(d / region, os.path.getsize(d / region) + (400 << 20))  # a 400 MB object (sparse on disk)
    server.ignore_range.add(region)
    server.ignore_range.add("layer.cim")  # asked whole anyway: a 200 is the answer asked for
    url = f"{server.url}/layers/layer.cim"
    with cimfs.open(url) as img:
        server.counter.reset()
        with pytest.raises(cimfs.CimError) as e:
            img.read_at("Files/bin/Big.BIN", 1000, 100)
    assert "ignored the byte range" in str(e.value) and region in str(e.value)
    # The client hung up at the headers: what the server got to send is bounded by the socket buffers.
    assert server.counter.bytes < 64 << 20
    server.counter.reset()
    p = run_cli("cat", url, "Files/bin/Big.BIN", timeout=120)
    err = one_line_error(p)
    assert "ignored the byte range" in err
    assert server.counter.bytes < 64 << 20
