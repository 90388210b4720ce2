"""The newer CimFS calls: CimCreateImage2 and its flags, the Windows 11 read
API without a handle (CimReadFile, CimGetFileStatBasicInformation), and the
writer's refusals of what other format-2 readers cannot read."""

from __future__ import annotations

import array
import os

import pytest

import cimfs
from cimfs import (
    CimCloseImage,
    CimCloseStream,
    CimCommitImage,
    CimCreateAlternateStream,
    CimCreateFile,
    CimCreateFlags,
    CimCreateHardLink,
    CimCreateImage,
    CimCreateImage2,
    CimError,
    CimGetFileStatBasicInformation,
    CimReadFile,
    CimWriteStream,
    FileMetadata,
    errors,
)
from cimfs import (
    FileAttributes as A,
)
from cimfs.layout import ntfs

E_NOTIMPL = 0x80004001


def hresult_of(fn, *args, **kw):
    with pytest.raises(CimError) as e:
        fn(*args, **kw)
    return e.value


def write(h, path, data, **meta):
    s = CimCreateFile(h, path, FileMetadata(file_size=len(data), **meta))
    if data:
        CimWriteStream(s, data)
    CimCloseStream(s)


# ------------------------------------------------------------------ CimCreateImage2
def test_create_flags_have_hcsshims_values():
    assert {f.name: int(f) for f in CimCreateFlags} == {
        "DO_NOT_EXPAND_PE_IMAGES": 0x1,
        "FIXED_SIZE_CHUNKS": 0x2,
        "BLOCK_DEVICE_CIM": 0x4,
        "SINGLE_FILE_CIM": 0x8,
        "CONSISTENT_CIM": 0x10,
        "VERIFIED_CIM": 0x40,
    }
    assert CimCreateFlags.NONE == 0


@pytest.mark.parametrize(
    "flag",
    [
        CimCreateFlags.FIXED_SIZE_CHUNKS,
        CimCreateFlags.BLOCK_DEVICE_CIM,
        CimCreateFlags.SINGLE_FILE_CIM,
        CimCreateFlags.VERIFIED_CIM,
        CimCreateFlags.BLOCK_DEVICE_CIM | CimCreateFlags.CONSISTENT_CIM,
    ],
)
def test_unpublished_layouts_are_not_implemented(tmp_path, flag):
    e = hresult_of(CimCreateImage2, str(tmp_path), flag, None, "x.cim")
    assert e.hresult == E_NOTIMPL and "not public" in e.strerror
    assert os.listdir(tmp_path) == []  # nothing that pretends to be one
    # the directory is not left locked
    CimCloseImage(CimCreateImage(str(tmp_path), None, "ok.cim"))


@pytest.mark.parametrize("flags", [0x20, 0x80, 1 << 31, -1, "0x10", None, 1.0])
def test_unknown_flags_are_invalid(tmp_path, flags):
    assert hresult_of(CimCreateImage2, str(tmp_path), flags, None, "x.cim").hresult == errors.E_INVALIDARG
    assert os.listdir(tmp_path) == []


def test_create_image2_cases_match_create_image(tmp_path):
    # plain, DO_NOT_EXPAND_PE_IMAGES (accepted: nothing is ever expanded), fork and extension
    for flags in (CimCreateFlags.NONE, CimCreateFlags.DO_NOT_EXPAND_PE_IMAGES):
        name = f"p{int(flags)}.cim"
        h = CimCreateImage2(str(tmp_path), flags, None, name)
        write(h, "MZ.exe", b"MZ\x90\x00" + bytes(100))
        CimCommitImage(h)
        CimCloseImage(h)
        with cimfs.open(tmp_path / name) as im:
            assert im.read_bytes("MZ.exe") == b"MZ\x90\x00" + bytes(100)
    h = CimCreateImage2(str(tmp_path), 0, "p0.cim", "fork.cim")
    write(h, "new", b"n")
    CimCommitImage(h)
    CimCloseImage(h)
    with cimfs.open(tmp_path / "fork.cim") as im:
        assert sorted(im.listdir()) == ["MZ.exe", "new"]
    assert hresult_of(CimCreateImage2, str(tmp_path), 0, None, None).hresult == errors.E_INVALIDARG
    assert hresult_of(CimCreateImage2, str(tmp_path), 0, "missing.cim", "x.cim").hresult == errors.ERROR_FILE_NOT_FOUND
    assert hresult_of(CimCreateImage2, str(tmp_path / "nodir"), 0, None, "x.cim").hresult == errors.ERROR_PATH_NOT_FOUND


def consistent_win32_image(d) -> dict:
    d.mkdir()
    h = CimCreateImage2(str(d), CimCreateFlags.CONSISTENT_CIM | CimCreateFlags.DO_NOT_EXPAND_PE_IMAGES, None, "c.cim")
    CimCloseStream(CimCreateFile(h, "dir", FileMetadata(attributes=A.DIRECTORY, last_write_time=5)))
    write(h, "dir\\small", b"s" * 100, last_write_time=6)
    write(h, "dir\\large", bytes(range(256)) * 300, last_write_time=7)
    s = CimCreateAlternateStream(h, "dir\\small:ads", 3)
    CimWriteStream(s, b"ads")
    CimCloseStream(s)
    CimCreateHardLink(h, "link", "dir\\small")
    CimCommitImage(h)
    CimCloseImage(h)
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


def test_consistent_cim_flag_gives_identical_files(tmp_path):
    a = consistent_win32_image(tmp_path / "a")
    b = consistent_win32_image(tmp_path / "b")
    assert a == b
    with cimfs.open(tmp_path / "b" / "c.cim") as im:
        assert im.read_bytes("link") == b"s" * 100
        assert str(im.header.region_set.id) in " ".join(a)
    # without the flag: same contents, a random region set id
    c = tmp_path / "c"
    c.mkdir()
    h = CimCreateImage2(str(c), 0, None, "c.cim")
    CimCommitImage(h)
    CimCloseImage(h)
    h = CimCreateImage2(str(c), 0, None, "d.cim")
    CimCommitImage(h)
    CimCloseImage(h)
    assert (c / "c.cim").read_bytes() != (c / "d.cim").read_bytes()


# ------------------------------------------------------------------ reading without a handle
@pytest.fixture
def image(tmp_path):
    h = CimCreateImage(str(tmp_path), None, "r.cim")
    CimCloseStream(
        CimCreateFile(
            h,
            "dir",
            FileMetadata(
                attributes=A.DIRECTORY | A.HIDDEN,
                creation_time=11,
                last_write_time=12,
                change_time=13,
                last_access_time=14,
            ),
        )
    )
    write(
        h,
        "dir\\file.txt",
        b"0123456789",
        attributes=A.READONLY | A.ARCHIVE,
        creation_time=21,
        last_write_time=22,
        change_time=23,
        last_access_time=24,
    )
    write(h, "big", bytes(range(256)) * 300)
    s = CimCreateAlternateStream(h, "dir\\file.txt:Zone.Identifier", 5)
    CimWriteStream(s, b"zone!")
    CimCloseStream(s)
    CimCreateHardLink(h, "dir\\again.txt", "dir\\file.txt")
    CimCloseStream(CimCreateFile(h, "sparse", FileMetadata(file_size=1 << 20)))  # nothing written: sparse
    CimCloseStream(
        CimCreateFile(
            h, "link", FileMetadata(reparse_data=ntfs.pack_lx_symlink_reparse("dir"), attributes=A.REPARSE_POINT)
        )
    )
    CimCommitImage(h)
    CimCloseImage(h)
    return str(tmp_path / "r.cim")


def test_read_file_into_any_writable_buffer(image):
    buf = bytearray(4)
    assert CimReadFile(image, "dir\\file.txt", 3, buf) == (4, 3) and buf == b"3456"
    big = bytes(range(256)) * 300
    out = array.array("H", bytes(4000))  # 2000 items of 2 bytes
    assert CimReadFile(image, "BIG", 1000, out) == (4000, len(big) - 5000)
    assert out.tobytes() == big[1000:5000]
    mv = memoryview(bytearray(100))[10:20]
    assert CimReadFile(image, "/dir/file.txt", 5, mv) == (5, 0) and bytes(mv[:5]) == b"56789"
    assert CimReadFile(image, "dir\\file.txt", 10, bytearray(8)) == (0, 0)
    assert CimReadFile(image, "dir\\file.txt", 99, bytearray(8)) == (0, 0)
    assert CimReadFile(image, "dir\\file.txt", 0, bytearray(0)) == (0, 10)
    buf = bytearray(10)
    assert CimReadFile(image, "dir\\file.txt:Zone.Identifier", 1, buf) == (4, 0) and buf[:4] == b"one!"
    assert CimReadFile(image, "sparse", 4096, buf) == (10, (1 << 20) - 4106) and buf == bytes(10)


def test_read_file_errors(image, tmp_path):
    buf = bytearray(4)
    assert (
        hresult_of(CimReadFile, str(tmp_path / "none.cim"), "dir\\file.txt", 0, buf).hresult
        == errors.ERROR_FILE_NOT_FOUND
    )
    assert hresult_of(CimReadFile, image, "dir\\none", 0, buf).hresult == errors.ERROR_FILE_NOT_FOUND
    assert hresult_of(CimReadFile, image, "nodir\\file.txt", 0, buf).hresult == errors.ERROR_PATH_NOT_FOUND
    assert hresult_of(CimReadFile, image, "dir\\file.txt:nostream", 0, buf).hresult == errors.ERROR_FILE_NOT_FOUND
    assert hresult_of(CimReadFile, image, "dir", 0, buf).hresult == errors.E_INVALIDARG
    assert hresult_of(CimReadFile, image, "dir\\file.txt", -1, buf).hresult == errors.E_INVALIDARG
    assert hresult_of(CimReadFile, image, "dir\\file.txt", 0, b"read-only").hresult == errors.E_INVALIDARG
    assert hresult_of(CimReadFile, image, "dir\\file.txt", 0, "text").hresult == errors.E_INVALIDARG
    (tmp_path / "junk.cim").write_bytes(b"not an image at all" * 10)
    assert isinstance(hresult_of(CimReadFile, str(tmp_path / "junk.cim"), "x", 0, buf), cimfs.CimFormatError)


def test_stat_basic_information(image, tmp_path):
    st = CimGetFileStatBasicInformation(image, "dir\\file.txt")
    assert st._fields == (
        "FileId",
        "CreationTime",
        "LastAccessTime",
        "LastWriteTime",
        "ChangeTime",
        "AllocationSize",
        "EndOfFile",
        "FileAttributes",
        "ReparseTag",
        "NumberOfLinks",
        "DeviceType",
        "DeviceCharacteristics",
        "Reserved",
        "VolumeSerialNumber",
        "FileId128",
    )
    with cimfs.open(image) as im:
        fid = im.lookup("dir\\file.txt")
        serial = int.from_bytes(im.header.region_set.id.bytes_le[:4], "little")
    assert (st.FileId, st.CreationTime, st.LastWriteTime, st.ChangeTime, st.LastAccessTime) == (fid, 21, 22, 23, 24)
    assert st.EndOfFile == 10 and st.AllocationSize == 4096
    assert st.FileAttributes == A.READONLY | A.ARCHIVE and st.ReparseTag == 0 and st.NumberOfLinks == 2
    assert st.FileId128 == fid.to_bytes(16, "little") and st.VolumeSerialNumber == serial
    assert (st.DeviceType, st.DeviceCharacteristics, st.Reserved) == (0x7, 0x2, 0)
    d = CimGetFileStatBasicInformation(image, "dir")
    assert d.FileAttributes == A.DIRECTORY | A.HIDDEN and d.EndOfFile == 0 and d.AllocationSize == 0
    assert (d.CreationTime, d.LastWriteTime, d.ChangeTime, d.LastAccessTime) == (11, 12, 13, 14)
    big = CimGetFileStatBasicInformation(image, "big")
    assert big.EndOfFile == 76800 and big.AllocationSize == 77824
    sparse = CimGetFileStatBasicInformation(image, "sparse")
    assert sparse.EndOfFile == 1 << 20 and sparse.AllocationSize == 0
    ads = CimGetFileStatBasicInformation(image, "dir\\file.txt:Zone.Identifier")
    assert (ads.FileId, ads.EndOfFile, ads.AllocationSize, ads.LastWriteTime) == (fid, 5, 4096, 22)
    link = CimGetFileStatBasicInformation(image, "link")
    assert link.ReparseTag == 0xA000001D and link.FileAttributes & A.REPARSE_POINT
    assert CimGetFileStatBasicInformation(image, "").FileAttributes & A.DIRECTORY
    assert hresult_of(CimGetFileStatBasicInformation, image, "dir\\none").hresult == errors.ERROR_FILE_NOT_FOUND
    assert (
        hresult_of(CimGetFileStatBasicInformation, image, "dir\\file.txt:none").hresult == errors.ERROR_FILE_NOT_FOUND
    )
    assert hresult_of(CimGetFileStatBasicInformation, image, "no\\x").hresult == errors.ERROR_PATH_NOT_FOUND
    assert (
        hresult_of(CimGetFileStatBasicInformation, str(tmp_path / "no.cim"), "x").hresult == errors.ERROR_FILE_NOT_FOUND
    )


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("bad", ["lone\ud800", "\udfffx", "pair\ud83d\ude00spelled-as-two"])
def test_unpaired_surrogates_are_invalid_names(tmp_path, bad):
    h = CimCreateImage(str(tmp_path), None, "s.cim")
    write(h, "ok", b"x")
    CimCloseStream(CimCreateFile(h, "d", FileMetadata(attributes=A.DIRECTORY)))
    cases = [
        lambda: CimCreateFile(h, bad, FileMetadata()),
        lambda: CimCreateFile(h, "d\\" + bad, FileMetadata()),
        lambda: CimCreateFile(h, bad + "\\f", FileMetadata()),
        lambda: CimCreateAlternateStream(h, "ok:" + bad, 1),
        lambda: CimCreateHardLink(h, bad, "ok"),
        lambda: CimCreateHardLink(h, "d\\l", bad),
    ]
    for case in cases:
        e = hresult_of(case)
        assert e.hresult == errors.ERROR_INVALID_NAME and "surrogate" in e.strerror
    CimCommitImage(h)
    CimCloseImage(h)
    with cimfs.open(tmp_path / "s.cim") as im:
        assert sorted(im.listdir()) == ["d", "ok"] and im.listdir("d") == []
    # the bulk path of importers too
    (tmp_path / "src").write_bytes(b"data")
    with cimfs.create(tmp_path, "t.cim") as w:
        w.mkdir("d")
        e = hresult_of(w.add_local_files, "d", [(bad, str(tmp_path / "src"), FileMetadata(file_size=4))])
        assert e.hresult == errors.ERROR_INVALID_NAME
    # a proper pair is one character
    with cimfs.create(tmp_path, "u.cim") as w:
        w.add_file("smile\U0001f600", b"ok")
    with cimfs.open(tmp_path / "u.cim") as im:
        assert im.listdir() == ["smile\U0001f600"]


@pytest.mark.parametrize("field", ["creation_time", "last_write_time", "change_time", "last_access_time"])
def test_times_from_2_63_are_refused(tmp_path, field):
    h = CimCreateImage(str(tmp_path), None, "t.cim")
    for t in (1 << 63, (1 << 64) - 1, -1):
        assert hresult_of(CimCreateFile, h, "f", FileMetadata(**{field: t})).hresult == errors.E_INVALIDARG
    CimCloseStream(CimCreateFile(h, "f", FileMetadata(**{field: (1 << 63) - 1})))
    CimCommitImage(h)
    CimCloseImage(h)
    with cimfs.open(tmp_path / "t.cim") as im:
        assert getattr(im.stat("f"), field) == (1 << 63) - 1


def test_paths_longer_than_32767_units_are_refused(tmp_path):
    name = "d" * 200
    depth = 32767 // 201 + 1  # the path of the deepest directory passes the limit
    (tmp_path / "src").write_bytes(b"data")
    with cimfs.create(tmp_path, "p.cim", sync=False) as w:
        path = ""
        for i in range(depth - 1):
            path = f"{path}\\{name}" if path else name
            w.mkdir(path)  # each a short step from the last: the writer's cached-directory path
        assert len(path) <= 32767
        e = hresult_of(w.mkdir, f"{path}\\{name}")
        assert e.hresult == errors.ERROR_INVALID_NAME and "32767" in e.strerror
        e = hresult_of(w.add_file, f"{path}\\{name}", b"x")
        assert e.hresult == errors.ERROR_INVALID_NAME
        e = hresult_of(w.add_local_files, path, [(name, str(tmp_path / "src"), FileMetadata(file_size=4))])
        assert e.hresult == errors.ERROR_INVALID_NAME
        # up to the limit is fine, in UTF-16 units (a supplementary character counts two)
        room = 32767 - len(path) - 1
        assert room == 4
        w.add_local_files(path, [("\U0001f600xx", str(tmp_path / "src"), FileMetadata(file_size=4))])
        e = hresult_of(w.add_local_files, path, [("\U0001f600xxx", str(tmp_path / "src"), FileMetadata(file_size=4))])
        assert e.hresult == errors.ERROR_INVALID_NAME
    with cimfs.open(tmp_path / "p.cim") as im:
        assert im.read_bytes(path + "\\\U0001f600xx") == b"data"
