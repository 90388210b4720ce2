"""Images read where they are stored: real S3 (moto's server) and a real HTTP
server with byte ranges on 127.0.0.1, read through fsspec, compared with the
local reader; server-side request and byte counts; damaged and unreachable
storage; the ``cim://`` fsspec filesystem."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import subprocess
import sys
import threading

import pytest

fsspec = pytest.importorskip("fsspec", reason="the remote extra (fsspec) is not installed")
pytest.importorskip("s3fs", reason="s3fs is not installed (the test extra)")
pytest.importorskip("moto.server", reason="moto[server] is not installed (the test extra)")

from remote_servers import RangeHTTPServer, S3Server, stop_fsspec_io  # noqa: E402

import cimfs  # noqa: E402
from cimfs import FileAttributes as A  # noqa: E402
from cimfs import FileMetadata  # noqa: E402
from cimfs.fsspec_cim import CimFileSystem, ReadOnlyError  # noqa: E402

BIG = 3 << 20 | 12345


def build_image(directory) -> dict[str, bytes]:
    """An image with directories, small and large files, an empty file, a
    stream and a hard link; returns {path: contents} of its files."""
    rng = random.Random(15)
    files: dict[str, bytes] = {}
    os.makedirs(directory, exist_ok=True)
    with cimfs.create(str(directory), "layer.cim") as w:
        meta = FileMetadata(attributes=A.ARCHIVE, last_write_time=133_000_000_000_000_000)
        for d in ("Files", "Files/docs", "Files/bin", "Hives"):
            w.mkdir(d.replace("/", "\\"))
        for i in range(60):
            data = rng.randbytes(rng.choice([0, 17, 300, 4000, 20000, 70000]))
            path = f"Files/docs/note{i:02d}.txt"
            w.add_file(path.replace("/", "\\"), data, meta)
            files[path] = data
        big = rng.randbytes(BIG)
        w.add_file("Files\\bin\\Big.BIN", big, meta)
        files["Files/bin/Big.BIN"] = big
        w.add_file("Files\\empty", b"", meta)
        files["Files/empty"] = b""
        w.add_stream("Files\\docs\\note01.txt:Zone.Identifier", b"[ZoneTransfer]\r\nZoneId=3\r\n")
        w.link("Files\\alias.txt", "Files\\docs\\note03.txt")
        files["Files/alias.txt"] = files["Files/docs/note03.txt"]
    return files


@pytest.fixture(scope="module", autouse=True)
def no_thread_left():
    yield
    stop_fsspec_io()
    assert threading.active_count() == 1, [t.name for t in threading.enumerate()]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs") / "layers"
    files = build_image(d)
    return d, files


@pytest.fixture(scope="module")
def s3(image_dir):
    d, _ = image_dir
    server = S3Server()
    try:
        server.upload_dir(d, "bucket", "layers")
        yield server
    finally:
        server.stop()


@pytest.fixture
def http(image_dir):
    d, _ = image_dir
    with RangeHTTPServer(d.parent) as server:
        yield server


def stored_bytes(directory) -> int:
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory))


def tree(image) -> dict:
    """Everything the reader says about every path: stat, streams and bytes."""
    out = {}
    for path, fid in image.iter_file_ids():
        st = image.stat(fid)
        entry = {"stat": st, "streams": {}}
        if not st.is_dir:
            entry["data"] = hashlib.sha256(image.read_bytes(fid)).hexdigest()
        for s in image.streams(fid):
            entry["streams"][s] = image.read_bytes(fid, stream=s)
        out[path] = entry
    return out


def run_cli(*args, env=None, check=True):
    full = dict(os.environ)
    full.update(env or {})
    p = subprocess.run([sys.executable, "-m", "cimfs.cli", *map(str, args)], capture_output=True, env=full, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"cimfs {args} failed: {p.stderr.decode(errors='replace')}")
    return p


# ===================================================================== the reader
def test_s3_and_http_read_the_same_tree_and_bytes_as_local(image_dir, s3, http):
    d, files = image_dir
    with cimfs.open(str(d / "layer.cim")) as local:
        expected = tree(local)
    with cimfs.open("s3://bucket/layers/layer.cim", s3.options()) as img:
        assert tree(img) == expected
        assert img.check() == []
        assert img.read_bytes("files/BIN/big.bin") == files["Files/bin/Big.BIN"]
    with cimfs.open(f"{http.url}/layers/layer.cim") as img:
        assert tree(img) == expected
        assert img.read_at("Files/bin/Big.BIN", 1_000_000, 5000) == files["Files/bin/Big.BIN"][1_000_000:1_005_000]


def test_opening_and_one_small_read_are_ranged(image_dir, http):
    d, files = image_dir
    sizes = {n: os.path.getsize(d / n) for n in os.listdir(d)}
    with cimfs.open(f"{http.url}/layers/layer.cim") as img:
        opened = http.counter.bytes
        assert img.read_bytes("Files/docs/note05.txt") == files["Files/docs/note05.txt"]
    log = http.counter.log
    got = http.counter.bytes
    # Nothing but the .cim, the header blocks and the blocks on the path: far
    # less than the image, and no region object fetched whole.
    assert got < 600_000 < stored_bytes(d)
    assert opened < 400_000
    for method, path, n in log:
        name = path.rsplit("/", 1)[-1]
        if name.startswith("region_") and sizes[name] > 128 << 10:
            assert n < sizes[name], f"{name} was fetched whole"
    assert all(method in ("GET", "HEAD") for method, _, _ in log)


def test_sequential_read_of_a_large_file_fetches_it_once(image_dir, s3):
    _, files = image_dir
    with cimfs.open("s3://bucket/layers/layer.cim", s3.options()) as img:
        s3.counter.reset()
        with img.open("Files/bin/Big.BIN") as f:
            chunks = []
            while True:
                b = f.read(50_000)  # small reads: through the block cache with read-ahead
                if not b:
                    break
                chunks.append(b)
        assert b"".join(chunks) == files["Files/bin/Big.BIN"]
        gets = [n for m, _, n in s3.counter.log if m == "GET"]
        assert sum(gets) <= BIG * 1.05
        assert len(gets) <= BIG // (64 << 10) // 4, "read-ahead did not grow"
        s3.counter.reset()
        assert img.read_bytes("Files/bin/Big.BIN") == files["Files/bin/Big.BIN"]
        assert sum(n for _, _, n in s3.counter.log) <= BIG * 1.05


def test_missing_region_object_names_its_url(image_dir, tmp_path):
    d, _ = image_dir
    copy = tmp_path / "layers"
    os.makedirs(copy)
    for n in os.listdir(d):
        (copy / n).write_bytes((d / n).read_bytes())
    big_region = max((n for n in os.listdir(copy) if n.startswith("region_")), key=lambda n: os.path.getsize(copy / n))
    os.unlink(copy / big_region)
    with RangeHTTPServer(tmp_path) as server:
        url = f"{server.url}/layers/layer.cim"
        with cimfs.open(url) as img:  # the metadata is elsewhere: opening works
            with pytest.raises(cimfs.CimFormatError) as e:
                img.read_bytes("Files/bin/Big.BIN")
        assert big_region in str(e.value) and server.url in str(e.value)
        assert "missing" in str(e.value)


def test_truncated_and_deleted_region_objects_on_s3(image_dir, s3):
    d, files = image_dir
    s3.upload_dir(d, "damaged", "layers")
    big_region = max((n for n in os.listdir(d) if n.startswith("region_")), key=lambda n: os.path.getsize(d / n))
    url = "s3://damaged/layers/layer.cim"
    client = s3.client()
    with cimfs.open(url, s3.options()) as img:
        assert img.read_bytes("Files/docs/note02.txt") == files["Files/docs/note02.txt"]
        assert img.read_at("Files/bin/Big.BIN", 0, 10) == files["Files/bin/Big.BIN"][:10]
        # Truncated under an open image: a new version, an error, never short data.
        client.put_object(Bucket="damaged", Key=f"layers/{big_region}", Body=(d / big_region).read_bytes()[: 1 << 20])
        with pytest.raises(cimfs.CimError) as e:
            img.read_bytes("Files/bin/Big.BIN")
        assert "s3://damaged/layers/" + big_region in str(e.value) and "changed while being read" in str(e.value)
    # Opened after the truncation: the object is shorter than the image says.
    with cimfs.open(url, s3.options()) as img:
        with pytest.raises(cimfs.CimFormatError) as e:
            img.read_bytes("Files/bin/Big.BIN")
        assert "outside" in str(e.value) and url in str(e.value)
    client.delete_object(Bucket="damaged", Key=f"layers/{big_region}")
    with cimfs.open(url, s3.options()) as img:
        with pytest.raises(cimfs.CimFormatError) as e:
            img.read_bytes("Files/bin/Big.BIN")
        assert "missing" in str(e.value) and f"s3://damaged/layers/{big_region}" in str(e.value)
    with pytest.raises(cimfs.CimError) as e:
        cimfs.open("s3://damaged/layers/nothing.cim", s3.options())
    assert e.value.errno == 2 and "s3://damaged/layers/nothing.cim" in str(e.value)


def test_unreachable_and_forbidden_storage_are_cim_errors(image_dir, tmp_path):
    d, _ = image_dir
    with RangeHTTPServer(d.parent) as server:
        url = f"{server.url}/layers/layer.cim"
        server.forbidden.add("layer.cim")
        with pytest.raises(cimfs.CimError) as e:
            cimfs.open(url)
        assert e.value.errno == 13 and url in str(e.value)
        server.forbidden.clear()
        img = cimfs.open(url)
    # The server is gone: every read is a CimError naming the URL (bounded retries, no hang).
    with img:
        with pytest.raises(cimfs.CimError) as e:
            img.read_bytes("Files/bin/Big.BIN")
        assert type(e.value) in (cimfs.CimError, cimfs.CimFormatError)
        assert server.url in str(e.value)
    with pytest.raises(cimfs.CimError) as e:
        cimfs.open(url)
    assert url in str(e.value)
    s3 = S3Server()
    endpoint = s3.url
    s3.stop()
    with pytest.raises(cimfs.CimError) as e:
        cimfs.open(
            "s3://bucket/layers/layer.cim",
            {"endpoint_url": endpoint, "key": "k", "secret": "s", "config_kwargs": {"retries": {"max_attempts": 1}}},
        )
    assert "s3://bucket/layers/layer.cim" in str(e.value)


def test_memory_filesystem_and_chained_urls(image_dir):
    d, files = image_dir
    mem = fsspec.filesystem("memory")
    for n in os.listdir(d):
        mem.pipe_file(f"/t15/{n}", (d / n).read_bytes())
    try:
        with cimfs.open("memory://t15/layer.cim") as img:
            assert img.read_bytes("Files/alias.txt") == files["Files/alias.txt"]
        with cimfs.open("simplecache::memory://t15/layer.cim") as img:
            assert img.read_bytes("Files/docs/note07.txt") == files["Files/docs/note07.txt"]
        with cimfs.open(f"file://{d}/layer.cim") as img:
            assert img.storage is None  # local: the mapped reader
    finally:
        mem.rm("/t15", recursive=True)


def test_disk_cache_keeps_fetched_blocks(image_dir, http, tmp_path):
    _, files = image_dir
    url = f"{http.url}/layers/layer.cim"
    cache = tmp_path / "cache"
    with cimfs.open(url, cache_dir=str(cache)) as img:
        assert img.read_bytes("Files/bin/Big.BIN") == files["Files/bin/Big.BIN"]
    first = http.counter.bytes
    http.counter.reset()
    with cimfs.open(url, cache_dir=str(cache)) as img:
        assert img.read_bytes("Files/bin/Big.BIN") == files["Files/bin/Big.BIN"]
    assert http.counter.bytes < first / 10  # only the .cim again
    assert os.listdir(cache)


# ===================================================================== the command line
def test_cli_commands_accept_urls(image_dir, http, s3, tmp_path):
    d, files = image_dir
    local = str(d / "layer.cim")
    url = f"{http.url}/layers/layer.cim"
    s3_url = "s3://bucket/layers/layer.cim"
    for cmd, *rest in (["ls", "-R", "-l"], ["stat", "Files/docs/note01.txt", "--json"]):
        assert run_cli(cmd, local, *rest).stdout == run_cli(cmd, url, *rest).stdout
    a, b = (json.loads(run_cli("info", where, "--json").stdout) for where in (local, url))
    assert (a.pop("path"), b.pop("path")) == (local, url)
    for d_ in (a, b):  # allocation is a local disk's notion: a remote object's is its size
        d_["bytes_stored"] = {k: v for k, v in d_["bytes_stored"].items() if "allocated" not in k}
    assert a == b
    assert run_cli("cat", url, "Files/docs/note01.txt:Zone.Identifier").stdout == b"[ZoneTransfer]\r\nZoneId=3\r\n"
    assert run_cli("cat", s3_url, "Files/bin/Big.BIN", env=s3.env()).stdout == files["Files/bin/Big.BIN"]
    assert run_cli("diff", local, url).stdout == b""
    assert b"ok" in run_cli("fsck", url).stdout
    run_cli("extract", s3_url, tmp_path / "x", env=s3.env())
    for path, data in files.items():
        assert (tmp_path / "x" / path).read_bytes() == data
    run_cli("export", url, tmp_path / "a.tar")
    run_cli("export", local, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    p = run_cli("cat", f"{http.url}/layers/none.cim", "x", check=False)
    assert p.returncode == 1 and b"none.cim" in p.stderr and b"Traceback" not in p.stderr


def test_extract_from_s3_transfers_about_the_stored_bytes(image_dir, s3, tmp_path):
    d, files = image_dir
    s3.counter.reset()
    run_cli("extract", "s3://bucket/layers/layer.cim", tmp_path / "x", env=s3.env())
    assert s3.counter.bytes <= 1.05 * stored_bytes(d)
    assert (tmp_path / "x" / "Files/bin/Big.BIN").read_bytes() == files["Files/bin/Big.BIN"]


# ===================================================================== cim://
@pytest.fixture
def cimfs_protocol():
    fsspec.register_implementation("cim", CimFileSystem, clobber=True)
    yield


def test_cim_filesystem_over_s3(image_dir, s3, cimfs_protocol):
    d, files = image_dir
    fs = fsspec.filesystem("cim", fo="bucket/layers/layer.cim", target_protocol="s3", target_options=s3.options())
    assert fs.ls("", detail=False) == ["Files", "Hives"]
    entries = fs.ls("Files", detail=True)
    assert {e["name"]: e["type"] for e in entries} == {
        "Files/alias.txt": "file",
        "Files/bin": "directory",
        "Files/docs": "directory",
        "Files/empty": "file",
    }
    assert fs.info("Files/bin/Big.BIN")["size"] == BIG
    assert fs.info("files/BIN/big.bin")["size"] == BIG  # the image's case-insensitive lookup
    assert fs.ls("Files/empty", detail=False) == ["Files/empty"]
    expected_files = sorted(files)
    assert fs.find("") == expected_files
    assert fs.du("") == sum(len(v) for v in files.values())
    assert fs.glob("Files/docs/note0*.txt") == [f"Files/docs/note0{i}.txt" for i in range(10)]
    walked = {root: (sorted(dirs), sorted(names)) for root, dirs, names in fs.walk("")}
    assert walked["Files"] == (["bin", "docs"], ["alias.txt", "empty"])
    assert walked[""] == (["Files", "Hives"], [])
    big = files["Files/bin/Big.BIN"]
    assert fs.cat_file("Files/bin/Big.BIN", 100, 200) == big[100:200]
    assert fs.cat_file("Files/bin/Big.BIN", -10) == big[-10:]
    assert fs.cat_file("Files/bin/Big.BIN", 10, -10) == big[10:-10]
    with fs.open("Files/bin/Big.BIN") as f:
        assert f.seekable() and f.size == BIG
        f.seek(2_000_000)
        assert f.read(1000) == big[2_000_000:2_001_000]
        f.seek(-5, 2)
        assert f.read() == big[-5:]
    assert fs.cat("Files/docs/note01.txt:Zone.Identifier") == b"[ZoneTransfer]\r\nZoneId=3\r\n"
    assert fs.info("Files/docs/note01.txt:Zone.Identifier")["size"] == 26
    with pytest.raises(FileNotFoundError):
        fs.info("Files/nothing")
    with pytest.raises(FileNotFoundError):
        fs.cat("Files/docs/note01.txt:nostream")
    with pytest.raises(FileNotFoundError):
        fs.open("Files/nothing")
    with pytest.raises(IsADirectoryError):
        fs.cat_file("Files")
    fs.close()


def test_cim_filesystem_chained_urls_and_read_only(image_dir, s3, http, cimfs_protocol, tmp_path):
    d, files = image_dir
    with fsspec.open("cim://Files/docs/note04.txt::s3://bucket/layers/layer.cim", s3=s3.options()) as f:
        assert f.read() == files["Files/docs/note04.txt"]
    with fsspec.open(f"cim://Files/docs/note06.txt::{http.url}/layers/layer.cim") as f:
        assert f.read() == files["Files/docs/note06.txt"]
    with fsspec.open(f"cim://Files/docs/note01.txt:Zone.Identifier::file://{d}/layer.cim", "rt", newline="") as f:
        assert f.read() == "[ZoneTransfer]\r\nZoneId=3\r\n"
    fs = fsspec.filesystem("cim", fo=str(d / "layer.cim"))
    assert fs.image.storage is None  # a local image: the mapped reader
    for write in (
        lambda: fs.open("Files/new", "wb"),
        lambda: fs.pipe_file("Files/x", b"1"),
        lambda: fs.rm("Files/empty"),
        lambda: fs.mkdir("New"),
        lambda: fs.mv("Files/empty", "e"),
        lambda: fs.touch("Files/t"),
    ):
        with pytest.raises(ValueError) as e:  # as tar:// and libarchive:// raise
            write()
        assert isinstance(e.value, OSError) and e.value.errno == 30 and isinstance(e.value, ReadOnlyError)
    assert fs.cat("Files/empty") == b""
    fs.get("Files/docs", str(tmp_path / "got"), recursive=True)
    assert (tmp_path / "got" / "note09.txt").read_bytes() == files["Files/docs/note09.txt"]


def test_cim_protocol_is_an_entry_point():
    """Registered through pyproject's fsspec.specs entry point (present once the package is installed)."""
    eps = importlib.metadata.entry_points(group="fsspec.specs")
    assert any(ep.name == "cim" and ep.value == "cimfs.fsspec_cim:CimFileSystem" for ep in eps)
    assert fsspec.get_filesystem_class("cim") is CimFileSystem
