"""Lazy FUSE mounts of images on S3 (moto's server on 127.0.0.1): contents are
fetched when read, a network failure is EIO for that read and the mount stays
up, and the local cache directory keeps what was fetched."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time

import pytest

pytest.importorskip("fsspec", reason="the remote extra (fsspec) is not installed")
pytest.importorskip("s3fs", reason="s3fs is not installed (the test extra)")
pytest.importorskip("moto.server", reason="moto[server] is not installed (the test extra)")
pytest.importorskip("pyfuse3", reason="pyfuse3 is not installed (scripts/install-system-deps.sh + the mount extra)")
if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
    pytest.skip("no /dev/fuse or fusermount3 on this machine", allow_module_level=True)

from remote_servers import S3Server, stop_fsspec_io  # noqa: E402
from test_mount import daemons  # noqa: E402
from test_remote import BIG, build_image, stored_bytes  # noqa: E402

import cimfs  # noqa: E402
from cimfs import mount as cmount  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def no_thread_left():
    yield
    stop_fsspec_io()


@pytest.fixture
def s3_image(tmp_path, monkeypatch):
    monkeypatch.setenv("CIMFS_RUNTIME_DIR", str(tmp_path / "registry"))
    d = tmp_path / "layers"
    files = build_image(d)
    server = S3Server()
    try:
        server.upload_dir(d, "bucket", "layers")
        yield server, d, files
    finally:
        server.stop()
        for e in cmount.mounts():  # whatever a failed test left behind
            subprocess.run(["fusermount3", "-u", "-z", e["mountpoint"]], capture_output=True)
            try:
                os.kill(e["pid"], 9)
            except ProcessLookupError:
                pass
            cmount.remove_entry(e["volume_id"])
        assert not daemons(str(tmp_path)), "a mount daemon was left running"


def _wait_gone(tag: str) -> None:
    for _ in range(100):
        if not daemons(tag):
            return
        time.sleep(0.1)


def test_lazy_mount_network_failure_is_eio_and_the_mount_survives(s3_image, tmp_path):
    server, d, files = s3_image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    server.counter.reset()
    vid = cmount.mount("s3://bucket/layers/layer.cim", str(mnt), storage_options=server.options(), cache_dir=str(cache))
    try:
        assert server.counter.bytes < stored_bytes(d) / 4  # mounting fetched metadata, not contents
        listed = sorted(os.listdir(mnt / "Files" / "docs"))
        assert listed == sorted(p.rsplit("/", 1)[1] for p in files if p.startswith("Files/docs/"))
        for path, data in files.items():
            if path != "Files/bin/Big.BIN":
                assert (mnt / path).read_bytes() == data
        with open(mnt / "Files/bin/Big.BIN", "rb", buffering=0) as f:
            assert f.read(100_000) == files["Files/bin/Big.BIN"][:100_000]
            server.stop()  # in the middle of reading the file
            os.lseek(f.fileno(), 2_500_000, os.SEEK_SET)
            with pytest.raises(OSError) as e:
                f.read(100_000)
            assert e.value.errno == errno.EIO
            # Still mounted and serving what it has.
            assert cmount.is_cimfs_mount(str(mnt))
            assert sorted(os.listdir(mnt / "Files" / "docs")) == listed
            assert (mnt / "Files/docs/note10.txt").read_bytes() == files["Files/docs/note10.txt"]
            server.start()  # back: the same read works
            os.lseek(f.fileno(), 2_500_000, os.SEEK_SET)
            assert f.read(100_000) == files["Files/bin/Big.BIN"][2_500_000:2_600_000]
        assert os.listdir(cache)
    finally:
        cmount.unmount(str(mnt))
    assert not cmount.is_cimfs_mount(str(mnt))
    assert not any(e["volume_id"] == str(vid) for e in cmount.mounts())
    _wait_gone(str(tmp_path))
    assert not daemons(str(tmp_path))


def test_cli_mount_of_an_s3_url_with_a_cache_dir(s3_image, tmp_path):
    server, d, files = s3_image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    env = dict(os.environ, **server.env())
    for round_ in range(2):
        server.counter.reset()
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "cimfs.cli",
                "mount",
                "s3://bucket/layers/layer.cim",
                str(mnt),
                "--cache-dir",
                str(cache),
            ],
            capture_output=True,
            env=env,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
        try:
            assert (mnt / "Files/bin/Big.BIN").read_bytes() == files["Files/bin/Big.BIN"]
        finally:
            subprocess.run([sys.executable, "-m", "cimfs.cli", "umount", str(mnt)], check=True, env=env, timeout=60)
        if round_ == 0:
            assert server.counter.bytes >= BIG
        else:  # every block came from the cache directory
            assert server.counter.bytes < BIG / 10
    _wait_gone(str(tmp_path))


def test_a_remote_image_is_never_given_to_the_kernel_engine(s3_image, tmp_path):
    server, d, files = s3_image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(cimfs.CimError) as e:
        cmount.mount("s3://bucket/layers/layer.cim", str(mnt), engine="kernel", storage_options=server.options())
    assert "FUSE" in str(e.value) and not cmount.is_cimfs_mount(str(mnt))
    cmount.mount("s3://bucket/layers/layer.cim", str(mnt), engine="auto", storage_options=server.options())
    try:
        assert (mnt / "Files/docs/note03.txt").read_bytes() == files["Files/docs/note03.txt"]
        assert os.statvfs(mnt).f_blocks * 4096 >= stored_bytes(d) - 4096 * 8
    finally:
        cmount.unmount(str(mnt))
    assert not cmount.is_cimfs_mount(str(mnt))
