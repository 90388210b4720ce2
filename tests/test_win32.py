"""The Win32-shaped API: CimCreateImage's cases, stream rules and HRESULTs."""

import os
import subprocess
import sys
import threading

import pytest

import cimfs
from cimfs import (
    CimCloseImage,
    CimCloseStream,
    CimCommitImage,
    CimCreateAlternateStream,
    CimCreateFile,
    CimCreateHardLink,
    CimCreateImage,
    CimDeletePath,
    CimError,
    CimWriteStream,
    FileMetadata,
    errors,
)
from cimfs import (
    FileAttributes as A,
)


def hresult_of(fn, *args):
    with pytest.raises(CimError) as e:
        fn(*args)
    return e.value.hresult


def write_file(image, path, data, **meta):
    s = CimCreateFile(image, path, FileMetadata(file_size=len(data), **meta))
    if data:
        CimWriteStream(s, data)
    CimCloseStream(s)


def make_image(d, name, files):
    h = CimCreateImage(str(d), None, name)
    for path, data in files.items():
        if data is None:
            CimCloseStream(CimCreateFile(h, path, FileMetadata(attributes=A.DIRECTORY)))
        else:
            write_file(h, path, data)
    CimCommitImage(h)
    CimCloseImage(h)


def test_new_image_and_handle_lifecycle(tmp_path):
    h = CimCreateImage(str(tmp_path), None, "new.cim")
    CimCloseStream(CimCreateFile(h, "dir", FileMetadata(attributes=A.DIRECTORY)))
    write_file(h, "dir\\file", b"hello")
    s = CimCreateAlternateStream(h, "dir\\file:ads", 3)
    CimWriteStream(s, b"ads")
    CimCloseStream(s)
    CimCreateHardLink(h, "link", "dir\\file")
    write_file(h, "gone", b"x")
    CimDeletePath(h, "gone")
    CimCommitImage(h)
    assert hresult_of(CimCreateFile, h, "after", FileMetadata()) == errors.E_INVALIDARG
    assert hresult_of(CimDeletePath, h, "link") == errors.E_INVALIDARG
    assert hresult_of(CimCommitImage, h) == errors.E_INVALIDARG
    CimCloseImage(h)
    assert hresult_of(CimCloseImage, h) == errors.E_HANDLE
    assert hresult_of(CimCreateFile, h, "x", FileMetadata()) == errors.E_HANDLE
    with cimfs.open(tmp_path / "new.cim") as im:
        assert im.read_bytes("LINK") == b"hello" and im.read_bytes("dir/file:ads") == b"ads"
        assert sorted(im.listdir()) == ["dir", "link"]


def test_argument_errors(tmp_path):
    assert hresult_of(CimCreateImage, str(tmp_path), None, None) == errors.E_INVALIDARG
    assert hresult_of(CimCreateImage, str(tmp_path / "nodir"), None, "x.cim") == errors.ERROR_PATH_NOT_FOUND
    assert hresult_of(CimCreateImage, str(tmp_path), "missing.cim", "x.cim") == errors.ERROR_FILE_NOT_FOUND
    assert hresult_of(CimCreateImage, str(tmp_path), "missing.cim", None) == errors.ERROR_FILE_NOT_FOUND
    make_image(tmp_path, "a.cim", {"f": b"1"})
    make_image(tmp_path, "b.cim", {"g": b"2"})
    assert hresult_of(CimCreateImage, str(tmp_path), "a.cim", "b.cim") == errors.ERROR_FILE_EXISTS
    assert os.listdir(tmp_path).count("b.cim") == 1
    with cimfs.open(tmp_path / "b.cim") as im:
        assert im.listdir() == ["g"]


def test_stream_rules(tmp_path):
    h = CimCreateImage(str(tmp_path), None, "s.cim")
    s = CimCreateFile(h, "a", FileMetadata(file_size=10))
    CimWriteStream(s, b"12345")
    # one open stream per image; no commit while it is open
    assert hresult_of(CimCreateFile, h, "b", FileMetadata(file_size=1)) == errors.ERROR_SHARING_VIOLATION
    assert hresult_of(CimCreateAlternateStream, h, "a:x", 1) == errors.ERROR_SHARING_VIOLATION
    assert hresult_of(CimCommitImage, h) == errors.ERROR_SHARING_VIOLATION
    assert hresult_of(CimWriteStream, s, b"678901") == errors.E_INVALIDARG  # past the fixed size
    CimWriteStream(s, b"67")
    CimCloseStream(s)
    assert hresult_of(CimWriteStream, s, b"x") == errors.E_HANDLE
    assert hresult_of(CimCreateFile, h, "missing\\child", FileMetadata()) == errors.ERROR_PATH_NOT_FOUND
    assert hresult_of(CimCreateFile, h, "a\\child", FileMetadata()) == errors.ERROR_PATH_NOT_FOUND
    assert hresult_of(CimCreateFile, h, "bad|name", FileMetadata()) == errors.ERROR_INVALID_NAME
    assert hresult_of(CimCreateFile, h, "huge", FileMetadata(file_size=1 << 48)) == errors.E_INVALIDARG
    assert hresult_of(CimCreateAlternateStream, h, "nofile:x", 1) == errors.ERROR_FILE_NOT_FOUND
    CimCommitImage(h)
    CimCloseImage(h)
    with cimfs.open(tmp_path / "s.cim") as im:
        assert im.read_bytes("a") == b"1234567" + bytes(3)


def test_close_without_commit_leaves_nothing(tmp_path):
    (tmp_path / "keep").write_text("x")
    h = CimCreateImage(str(tmp_path), None, "t.cim")
    write_file(h, "big", os.urandom(1 << 20))
    write_file(h, "small", b"s")
    CimCloseImage(h)
    assert os.listdir(tmp_path) == ["keep"]


def test_sharing_violation_across_threads(tmp_path):
    h = CimCreateImage(str(tmp_path), None, "a.cim")
    result = {}

    def other():
        try:
            CimCreateImage(str(tmp_path), None, "b.cim")
        except CimError as e:
            result["hr"] = e.hresult

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert result["hr"] == errors.ERROR_SHARING_VIOLATION
    CimCloseImage(h)
    h2 = CimCreateImage(str(tmp_path), None, "b.cim")  # free again once closed
    CimCloseImage(h2)


CHILD = r"""
import os, sys, cimfs
from cimfs import errors, CimCreateImage, CimCloseImage, CimError  # loaded now: cimfs loads names on first use
if len(sys.argv) > 2:  # drop to an unprivileged user once the interpreter and the API are loaded
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
try:
    h = cimfs.CimCreateImage(sys.argv[1], None, "other.cim")
except cimfs.CimError as e:
    print(hex(e.hresult)); sys.exit(0)
cimfs.CimCloseImage(h); print("opened")
"""


def run_child(*args):
    return subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=60)


def test_sharing_violation_across_processes(tmp_path):
    h = CimCreateImage(str(tmp_path), None, "a.cim")
    out = run_child(str(tmp_path))
    assert out.stdout.strip() == hex(errors.ERROR_SHARING_VIOLATION), out.stderr
    CimCloseImage(h)
    out = run_child(str(tmp_path))
    assert out.stdout.strip() == "opened", out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
def test_access_denied(tmp_path):
    d = tmp_path / "locked"
    d.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    out = run_child(str(d), "drop-privileges")  # pytest's tmp root is private: no search access
    assert out.stdout.strip() == hex(errors.E_ACCESSDENIED), out.stderr
    import tempfile

    with tempfile.TemporaryDirectory() as public:  # searchable, but not writable by nobody
        os.chmod(public, 0o755)
        out = run_child(public, "drop-privileges")
        assert out.stdout.strip() == hex(errors.E_ACCESSDENIED), out.stderr
        assert os.listdir(public) == []


def test_extend_overwrites_at_commit_only(tmp_path):
    make_image(tmp_path, "img.cim", {"old": b"old data", "dir": None, "dir\\keep": b"kept"})
    before = (tmp_path / "img.cim").read_bytes()
    for new_name in (None, "img.cim"):
        h = CimCreateImage(str(tmp_path), "img.cim", new_name)
        write_file(h, "added", b"new data")
        CimDeletePath(h, "old")
        # until commit the old image reads as before
        assert (tmp_path / "img.cim").read_bytes() == before
        with cimfs.open(tmp_path / "img.cim") as im:
            assert im.read_bytes("old") == b"old data"
        CimCommitImage(h)
        CimCloseImage(h)
        with cimfs.open(tmp_path / "img.cim") as im:
            assert sorted(im.listdir()) == ["added", "dir"] and im.read_bytes("dir/keep") == b"kept"
        # start again from an image that has "old" for the second spelling
        h = CimCreateImage(str(tmp_path), "img.cim", None)
        write_file(h, "old", b"old data")
        CimDeletePath(h, "added")
        CimCommitImage(h)
        CimCloseImage(h)
        before = (tmp_path / "img.cim").read_bytes()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
