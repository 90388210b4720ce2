"""Unit tests of cimfs.posix: time and name mappings, collisions, tar parsing, the safe extractor."""

from __future__ import annotations

import io
import os
import stat as S
import tarfile

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from cimfs import posix
from cimfs.errors import CimError

EPOCH = 116444736000000000


# ------------------------------------------------------------------ times
def test_filetime_mapping():
    assert posix.ns_to_filetime(0) == EPOCH
    assert posix.ns_to_filetime(1_234_567_891) == EPOCH + 12_345_678
    assert posix.filetime_to_ns(EPOCH + 12_345_678) == 1_234_567_800
    # before 1970: floor, not truncation toward zero
    assert posix.ns_to_filetime(-1) == EPOCH - 1
    assert posix.filetime_to_ns(posix.ns_to_filetime(-150)) == -200


@given(st.integers(min_value=-(10**19), max_value=10**19))
def test_pax_time_round_trip(ns):
    assert posix.parse_pax_time(posix.format_pax_time(ns)) == ns


def test_pax_time_parsing():
    assert posix.parse_pax_time("1.5") == 1_500_000_000
    assert posix.parse_pax_time("-1.5") == -1_500_000_000
    assert posix.parse_pax_time("12") == 12_000_000_000
    assert posix.parse_pax_time("1.1234567891") == 1_123_456_789
    with pytest.raises(ValueError):
        posix.parse_pax_time("x")


# ------------------------------------------------------------------ names
@given(st.text(min_size=1))
def test_name_escaping_round_trip(name):
    # WSL's escapes are private-use characters: a name that already holds one of
    # them (U+F001...) reads back as the character it escapes, in WSL as here
    # (test below), so the round trip holds for every other name.
    assume(posix.name_from_image(name) == name)
    assert posix.name_from_image(posix.name_to_image(name)) == name


def test_a_name_holding_an_escape_character_reads_back_as_wsl_reads_it():
    assert posix.name_to_image("a\uf001") == "a\uf001"
    assert posix.name_from_image("a\uf001") == "a\x01"


def test_name_escaping_is_wsls():
    assert posix.name_to_image('a:b\\c*?"<>|\x01') == "a\uf03ab\uf05cc\uf02a\uf03f\uf022\uf03c\uf03e\uf07c\uf001"
    assert posix.name_to_image("plain.txt") == "plain.txt"


def test_fold():
    assert posix.fold("Readme.TXT") == posix.fold("readme.txt")
    assert posix.fold("straße") != posix.fold("STRASSE")  # ß has no single-unit upper case
    assert posix.fold("é") == posix.fold("É")
    assert posix.fold("\U0001f600") == "\U0001f600"


def test_invalid_names():
    with pytest.raises(CimError):
        posix.check_image_name("x" * 256, "p")
    with pytest.raises(CimError):
        posix.check_image_name("bad\udcff", "p")  # not valid UTF-8 on disk
    posix.check_image_name("日" * 255, "p")


# ------------------------------------------------------------------ trees and collisions
def _file(name):
    return posix.Node(name="", src=name, kind=posix.FILE, mode=S.S_IFREG | 0o644)


def test_tree_collision_error_names_both():
    t = posix.Tree("error")
    t.add(["a", "File"], _file("a/File"))
    with pytest.raises(CimError) as e:
        t.add(["a", "FILE"], _file("a/FILE"))
    assert "a/File" in str(e.value) and "a/FILE" in str(e.value)


def test_tree_collision_rename_and_skip():
    msgs = []
    t = posix.Tree("rename", report=msgs.append)
    t.add(["Dir", "x"], _file("Dir/x"))
    t.add(["dir", "y.txt"], _file("dir/y.txt"))
    t.add(["dir", "Y.TXT"], _file("dir/Y.TXT"))
    names = {n.path() for n in t.iter_nodes()}
    assert names == {"", "Dir", "Dir/x", "dir~2", "dir~2/y.txt", "dir~2/Y~2.TXT"}
    assert len(msgs) == 2 and all("renamed" in m for m in msgs)
    msgs.clear()
    t = posix.Tree("skip", report=msgs.append)
    t.add(["Dir", "x"], _file("Dir/x"))
    t.add(["dir", "y"], _file("dir/y"))
    assert {n.path() for n in t.iter_nodes()} == {"", "Dir", "Dir/x"}
    assert msgs and "skipped" in msgs[0]


def test_tree_same_name_later_wins():
    t = posix.Tree()
    a, b = _file("x"), _file("x")
    b.size = 7
    t.add(["x"], a)
    t.add(["x"], b)
    assert [n for n in t.iter_nodes() if n.name == "x"] == [b]


# ------------------------------------------------------------------ tars
def _tar(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return tarfile.open(fileobj=buf, mode="r:")


def test_tar_member_with_dotdot_is_rejected():
    ti = tarfile.TarInfo("a/../../etc/passwd")
    ti.size = 1
    with pytest.raises(CimError) as e:
        posix.scan_tar(_tar([(ti, b"x")]), posix.Tree(), "t.tar")
    assert "'..'" in str(e.value)


def test_tar_times_exact_and_implied_dirs():
    ti = tarfile.TarInfo("./a/b/c")
    ti.size = 3
    ti.pax_headers = {"mtime": "1600000000.123456789", "atime": "1600000001.5"}
    t = posix.scan_tar(_tar([(ti, b"abc")]), posix.Tree(), "t.tar")
    node = {n.path(): n for n in t.iter_nodes()}["a/b/c"]
    assert node.mtime_ns == 1_600_000_000_123_456_789
    assert node.atime_ns == 1_600_000_001_500_000_000
    pytest.importorskip("cimfs.layout.ntfs")
    meta = posix.node_metadata(node)
    assert meta.last_write_time == posix.ns_to_filetime(1_600_000_000_123_456_789)
    assert {n.path() for n in t.iter_nodes()} == {"", "a", "a/b", "a/b/c"}


def test_tar_hard_link_to_missing_member():
    ti = tarfile.TarInfo("link")
    ti.type = tarfile.LNKTYPE
    ti.linkname = "nothere"
    with pytest.raises(CimError) as e:
        posix.scan_tar(_tar([(ti, None)]), posix.Tree(), "t.tar")
    assert "nothere" in str(e.value)


# ------------------------------------------------------------------ sparse writing
def test_write_sparse_leaves_holes(tmp_path):
    data = bytearray(1 << 20)
    data[5000:5004] = b"abcd"
    data[-3:] = b"end"
    p = tmp_path / "f"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    posix._write_sparse(fd, bytes(data), 0)
    os.ftruncate(fd, len(data))
    os.close(fd)
    assert p.read_bytes() == bytes(data)
    assert os.stat(p).st_blocks * 512 <= 64 * 1024


def _listing(image_path) -> list:
    import cimfs

    out = []
    with cimfs.open(image_path) as im:
        for dirpath, dirs, files in im.walk():
            for name in [""] + sorted(dirs + files) if dirpath == "" else sorted(dirs + files):
                p = f"{dirpath}\\{name}" if dirpath and name else (name or dirpath)
                st = im.stat(p)
                out.append(
                    (
                        p,
                        st.attributes,
                        st.last_write_time,
                        bytes(st.ea_buffer),
                        bytes(st.reparse_data),
                        st.nlink,
                        im.read_bytes(p) if not st.is_dir else None,
                    )
                )
    return out


@pytest.mark.parametrize("policy", ["rename", "skip"])
def test_directory_importer_matches_tree_importer(tmp_path, policy):
    """Streaming a directory into an image gives the image Tree + Importer
    gives: the same entries, metadata, links and even the same region bytes
    (contents are written in the same order)."""
    import cimfs

    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "Coll" / "in").mkdir(parents=True)
    (src / "coll").mkdir()
    (src / "coll" / "x").write_bytes(b"under the lower-case twin")
    (src / "a" / "b" / "big").write_bytes(bytes(range(256)) * 400)
    (src / "a" / "small").write_bytes(b"small")
    (src / "Small").write_bytes(b"other")
    (src / "small").write_bytes(b"same name other case")
    os.link(src / "a" / "small", src / "a" / "b" / "hard")
    os.symlink("../small", src / "a" / "link")
    os.mkfifo(src / "a" / "fifo")
    for i in range(40):
        (src / "a" / f"f{i:02d}").write_bytes(os.urandom(i * 997))
    out = tmp_path / "out"
    out.mkdir()
    reports_tree, reports_stream = [], []
    with cimfs.create(out, "tree.cim") as w:
        tree = posix.scan_directory(str(src), posix.Tree(policy, report=reports_tree.append))
        posix.Importer(w, tree.root).run()
    with cimfs.create(out, "stream.cim") as w:
        imp = posix.DirectoryImporter(w, str(src), on_collision=policy, report=reports_stream.append)
        imp.run()
    assert _listing(out / "tree.cim") == _listing(out / "stream.cim")
    assert len(reports_stream) == len(reports_tree) == 2
    with cimfs.open(out / "stream.cim") as im:
        assert im.stat("a/b/hard").nlink == 2 and im.read_bytes("a/b/hard") == b"small"
        assert im.exists("small~2") == im.exists("coll~2/x") == (policy == "rename")
    from cimfs.layout import cim

    def contents(image):
        """The data and small-data regions past their headers (metadata blobs
        are stored in another order; data processes number regions as they
        start them)."""
        with cimfs.open(image) as im:
            blobs = [(out / n).read_bytes() for n, _ in im.region_names]
        return sorted(
            b[cim.REGION_HEADER.size :]
            for b in blobs
            if cim.unpack_region_header(b, "region")[1] != cim.REGION_METADATA
        )

    assert contents(out / "tree.cim") == contents(out / "stream.cim") != []


def test_directory_importer_collision_error_names_both(tmp_path):
    import cimfs

    src = tmp_path / "src"
    src.mkdir()
    (src / "Readme").write_bytes(b"1")
    (src / "README").write_bytes(b"2")
    with pytest.raises(CimError) as e:
        with cimfs.create(tmp_path, "x.cim") as w:
            posix.DirectoryImporter(w, str(src)).run()
    assert "README" in str(e.value) and "Readme" in str(e.value)
    assert not (tmp_path / "x.cim").exists()


# ------------------------------------------------------------------ extraction by file writer processes
def _image_of(tmp_path, files: dict[str, bytes]):
    import cimfs

    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    os.utime(src / "d", ns=(1_000_000_000, 2_000_000_000))
    (tmp_path / "img").mkdir()
    with cimfs.create(tmp_path / "img", "t.cim") as w:
        posix.DirectoryImporter(w, str(src)).run()
    return tmp_path / "img" / "t.cim"


def test_extract_with_file_writers(tmp_path, monkeypatch):
    """Plain files are created by forked writers: contents, modes and the
    directory times set after them come out as a one-process extraction's;
    a file that cannot be created is a problem named by its path, the rest
    still lands."""
    import cimfs

    if not posix._FileWriters.available():
        pytest.skip("file writer processes need fork and two cores")
    files = {f"d/f{i:03d}": os.urandom(i * 97) for i in range(300)}
    files["d/sub/big"] = os.urandom(3 << 20)
    files["top"] = b"top"
    cim_path = _image_of(tmp_path, files)
    out = tmp_path / "out"
    (out / "d" / "f007").mkdir(parents=True)  # a non-empty directory where a file goes
    (out / "d" / "f007" / "keep").write_bytes(b"")
    started = []
    real_init = posix._FileWriters.__init__
    monkeypatch.setattr(
        posix._FileWriters, "__init__", lambda self, *a, **k: started.append(1) or real_init(self, *a, **k)
    )
    with cimfs.open(cim_path) as img:
        report = posix.Extractor(img, str(out)).run()
    assert started, "the writer processes were not used"
    assert len(report.problems) == 1 and "d/f007" in report.problems[0], report.problems
    for rel, data in files.items():
        if rel != "d/f007":
            assert (out / rel).read_bytes() == data, rel
            assert S.S_IMODE(os.stat(out / rel).st_mode) == S.S_IMODE(os.stat(tmp_path / "src" / rel).st_mode)
    assert os.stat(out / "d").st_mtime_ns == 2_000_000_000  # set after the writers created its files


@pytest.mark.parametrize("refused", ["none", "copy_file_range", "both"])
def test_extract_copies_where_the_kernel_refuses_a_way(tmp_path, monkeypatch, refused):
    """The file writers copy in the kernel: copy_file_range, then sendfile
    once the destination refuses it (EXDEV: DEST on another file system
    than the image), then the reader's read/write path; every way gives the
    same bytes, and the refused way is not tried again for every file."""
    import errno

    import cimfs

    if not posix._FileWriters.available():
        pytest.skip("file writer processes need fork and two cores")
    files = {f"d/f{i:03d}": os.urandom(i * 331) for i in range(1, 200)}
    files["d/big"] = os.urandom(9 << 20)
    cim_path = _image_of(tmp_path, files)
    calls = tmp_path / "calls"  # appended to by the writer processes
    real = {"copy_file_range": os.copy_file_range, "sendfile": os.sendfile}

    def way(name, refuse):
        def call(*args):
            with open(calls, "a") as f:
                f.write(name + "\n")
            if refuse:
                raise OSError(errno.EXDEV if name == "copy_file_range" else errno.EINVAL, "refused")
            return real[name](*args)

        return call

    monkeypatch.setattr(os, "copy_file_range", way("copy_file_range", refused != "none"))
    monkeypatch.setattr(os, "sendfile", way("sendfile", refused == "both"))
    with cimfs.open(cim_path) as img:
        report = posix.Extractor(img, str(tmp_path / "out")).run()
    assert not report.problems, report.problems
    for rel, data in files.items():
        assert (tmp_path / "out" / rel).read_bytes() == data, rel
    made = calls.read_text().split()
    if refused == "none":
        assert set(made) == {"copy_file_range"}
    elif refused == "copy_file_range":
        # at most one refusal per writer process, then sendfile for every file
        assert made.count("copy_file_range") <= 2 and made.count("sendfile") >= len(files)
    else:
        assert made.count("sendfile") <= 2  # then the reader's own path (it tries copy_file_range itself)


def test_extract_with_file_writers_stops_on_a_corrupt_image(tmp_path):
    import cimfs
    from cimfs.errors import CimFormatError

    if not posix._FileWriters.available():
        pytest.skip("file writer processes need fork and two cores")
    cim_path = _image_of(tmp_path, {f"d/f{i}": os.urandom(100_000) for i in range(8)})
    regions = sorted(p for p in (tmp_path / "img").iterdir() if p.name.startswith("region_"))
    biggest = max(regions, key=lambda p: p.stat().st_size)
    with cimfs.open(cim_path) as img:
        os.truncate(biggest, biggest.stat().st_size // 2)  # after the reader checked the sizes
        with pytest.raises(CimFormatError):
            posix.Extractor(img, str(tmp_path / "out")).run()
    import multiprocessing

    assert not multiprocessing.active_children()


def test_extract_when_a_file_writer_dies(tmp_path, monkeypatch):
    """A writer process that dies is a problem of the extraction, not a hang,
    and leaves no process behind."""
    import multiprocessing

    import cimfs

    if not posix._FileWriters.available():
        pytest.skip("file writer processes need fork and two cores")
    cim_path = _image_of(tmp_path, {f"d/f{i}": b"x" * i for i in range(1, 300)})
    monkeypatch.setattr(posix.filewriters, "_file_writer_main", lambda *args: os._exit(3))
    with cimfs.open(cim_path) as img:
        report = posix.Extractor(img, str(tmp_path / "out")).run()
    assert any("ended unexpectedly (exit code 3)" in p for p in report.problems), report.problems
    assert not multiprocessing.active_children()


def _lx(mode: int, uid: int = 0, gid: int = 0):
    import cimfs
    from cimfs.layout import ntfs

    return cimfs.FileMetadata(ea_buffer=ntfs.pack_eas(ntfs.lx_eas(mode=mode, uid=uid, gid=gid)))


@pytest.mark.parametrize("writers", [True, False], ids=["writer-processes", "one-process"])
def test_extract_hard_links_found_by_the_walk(tmp_path, monkeypatch, writers):
    """Names of one FileID become hard links of the first name extracted;
    when the first name cannot be extracted (a non-empty directory is in its
    way here), the next one takes its place and the others link to it.
    The same with and without the writer processes."""
    import cimfs

    if not writers:
        monkeypatch.setattr(posix._FileWriters, "available", staticmethod(lambda: False))
    elif not posix._FileWriters.available():
        pytest.skip("file writer processes need fork and two cores")

    with cimfs.create(tmp_path, "h.cim") as w:
        for i, d in enumerate("abcde"):
            w.mkdir(
                d,
                cimfs.FileMetadata(
                    attributes=0x10, last_write_time=EPOCH + (i + 1) * 10**7, last_access_time=EPOCH + (i + 1) * 10**7
                ),
            )
        w.add_file("a/x", b"shared", _lx(0o100640))
        w.link("b/second", "a/x")
        w.link("c/third", "a/x")
        w.link("c/fourth", "a/x")
        w.add_file("d/plain", b"p" * 5000, _lx(0o100600))
        w.link("d/plain-again", "d/plain")
        for i in range(200):  # enough files for the writer processes to start
            w.add_file(f"e/f{i}", bytes([i]) * i)
    out = tmp_path / "out"
    (out / "a" / "x").mkdir(parents=True)
    (out / "a" / "x" / "keep").write_bytes(b"")
    with cimfs.open(tmp_path / "h.cim") as img:
        report = posix.Extractor(img, str(out)).run()
    assert len(report.problems) == 1 and "a/x" in report.problems[0], report.problems
    assert (out / "a" / "x" / "keep").exists()
    group = [out / "b" / "second", out / "c" / "third", out / "c" / "fourth"]
    assert {p.read_bytes() for p in group} == {b"shared"}
    assert len({os.stat(p).st_ino for p in group}) == 1 and os.stat(group[0]).st_nlink == 3
    assert S.S_IMODE(os.stat(group[0]).st_mode) == 0o640
    assert os.stat(out / "d" / "plain").st_ino == os.stat(out / "d" / "plain-again").st_ino
    assert (out / "d" / "plain-again").read_bytes() == b"p" * 5000
    for i in range(200):
        assert (out / "e" / f"f{i}").read_bytes() == bytes([i]) * i
    for i, d in enumerate("bcde"):  # set after the links made in them
        assert os.stat(out / d).st_mtime_ns == (i + 2) * 10**9, d


@pytest.mark.skipif(os.geteuid() != 0, reason="owners and a foreign set-group-ID directory need root")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0])
@pytest.mark.parametrize("writers", [True, False], ids=["writer-processes", "one-process"])
def test_extract_directory_modes_owners_and_times_exact(tmp_path, monkeypatch, writers, umask):
    """Directories made with their final mode where mkdir gives it (plain
    destination, owner already right, nothing the umask takes) and those
    that are not (other owners, set-ID and sticky bits, modes the umask
    cuts, no write permission) all end with the image's mode, owner and
    times, and hold their files."""
    import cimfs

    if not writers:
        monkeypatch.setattr(posix._FileWriters, "available", staticmethod(lambda: False))
    ids = (os.geteuid(), os.getegid())
    kinds = [
        (0o755, *ids),
        (0o700, *ids),
        (0o777, *ids),
        (0o555, *ids),
        (0o2755, *ids),
        (0o1777, *ids),
        (0o750, 7, 8),
        (0o711, ids[0], 5),
    ]
    if os.geteuid() != 0:
        kinds = [k for k in kinds if (k[1], k[2]) == ids]
    want = {}
    with cimfs.create(tmp_path, "m.cim") as w:
        for i, (mode, uid, gid) in enumerate(kinds):
            for k, rel in enumerate((f"d{i}", f"d{i}/sub")):
                meta = _lx(S.S_IFDIR | mode, uid, gid)
                meta.last_write_time = meta.last_access_time = 133_000_000_000_000_000 + 10_000_000 * (2 * i + k)
                w.mkdir(rel, meta)
            for j in range(3):
                w.add_file(f"d{i}/sub/f{j}", b"y" * j, _lx(0o100644, uid, gid))
            want[f"d{i}"] = want[f"d{i}/sub"] = (mode, uid, gid)
    with cimfs.open(tmp_path / "m.cim") as img:
        times = {rel: img.stat(rel).last_write_time for rel in want}
    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        with cimfs.open(tmp_path / "m.cim") as img:
            report = posix.Extractor(img, str(out)).run()
    finally:
        os.umask(old)
    assert not report.problems, report.problems
    for rel, (mode, uid, gid) in want.items():
        st = os.stat(out / rel)
        assert (S.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid), rel
        assert posix.filetime_to_ns(times[rel]) == st.st_mtime_ns, rel
    for i in range(len(kinds)):
        assert sorted(os.listdir(out / f"d{i}" / "sub")) == ["f0", "f1", "f2"]


@pytest.mark.parametrize("writers", [True, False], ids=["writer-processes", "one-process"])
def test_extract_modes_and_owners_exact_under_any_umask(tmp_path, monkeypatch, writers):
    """Whatever the caller's umask, and inside a set-group-ID destination of
    another group, every file gets the mode and owner the image gives it."""
    import cimfs

    if not writers:
        monkeypatch.setattr(posix._FileWriters, "available", staticmethod(lambda: False))

    want = {}
    with cimfs.create(tmp_path, "m.cim") as w:
        w.mkdir("d")
        for i, (mode, uid, gid) in enumerate(
            [
                (0o100644, 0, 0),
                (0o100444, 0, 0),
                (0o104755, 0, 0),
                (0o102750, 7, 8),
                (0o100600, 1000, 1000),
                (0o101777, 0, 5),
            ]
            * 40
        ):
            w.add_file(f"d/f{i}", b"x" * i, _lx(mode, uid, gid))
            want[f"d/f{i}"] = (S.S_IMODE(mode), uid, gid)
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, 0, 4321)
    os.chmod(out, 0o2775)
    old = os.umask(0o077)
    try:
        with cimfs.open(tmp_path / "m.cim") as img:
            report = posix.Extractor(img, str(out)).run()
    finally:
        os.umask(old)
    assert not report.problems, report.problems
    for rel, (mode, uid, gid) in want.items():
        st = os.stat(out / rel)
        assert (S.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid), rel


def test_record_kinds_tell_entries_apart_as_the_full_records_do(tmp_path):
    """The walk's light accessor against the records themselves, for every
    entry, on the fast path (one mapped table), the per-entry path (FileIDs
    in two tables) and a bad FileID."""
    import cimfs
    from cimfs.layout import cim

    with cimfs.create(tmp_path, "k.cim") as w:
        w.mkdir("d")
        w.add_file("d/plain", b"x" * 1234)
        w.add_file("d/empty", b"")
        w.add_file("d/streamed", b"abc")
        w.add_stream("d/streamed:alt", b"alternate")
        w.add_file("d/sparse", b"\0" * 8192, cimfs.FileMetadata(attributes=0x200))
        w.mkdir("d/sub")
        w.mkdir("many")
        for i in range(cim.FILE_TABLE_CAPACITY + 8):  # a directory whose records span two file tables
            w.add_file(f"many/f{i}", b"")
    with cimfs.open(tmp_path / "k.cim") as img:
        d = img.lookup("d")
        names, fids = img.listing(d)
        assert names == [e.name for e in img.scandir(d)] and fids == [e.file_id for e in img.scandir(d)]
        many = img.listing(img.lookup("many"))[1]
        far = max(many)  # in the second table: a call with it reads entry by entry
        fast = img.record_kinds(fids)
        slow = [img.record_kinds([f, far])[0] for f in fids]
        by_name = dict(zip(names, fast))
        assert fast == slow == [cim.file_record_kind(img.record(f)) for f in fids]
        assert by_name["plain"] == 1234 and by_name["empty"] == 0
        assert by_name["sub"] == cim.KIND_DIRECTORY and by_name["streamed"] == cim.KIND_OTHER
        assert by_name["sparse"] == (cim.KIND_OTHER if img.record(img.lookup("d/sparse")).stream.sparse else 8192)
        assert img.record_kinds([img.root_id]) == [cim.KIND_DIRECTORY]
        assert len({(f - 1) // cim.FILE_TABLE_CAPACITY for f in many}) == 2
        assert img.record_kinds(many) == [0] * len(many) == [cim.file_record_kind(img.record(f)) for f in many]
        with pytest.raises(cimfs.CimFormatError):
            img.record_kinds([*fids, 10**6])
