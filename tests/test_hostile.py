"""The reader never trusts its input: thousands of mutated images per run must
read fully or fail with CimFormatError, never another exception, a hang or a
huge allocation."""

import multiprocessing
import os
import pathlib
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import traceback

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cimfs
from cimfs import CimError, CimFormatError, FileMetadata, errors
from cimfs import FileAttributes as A
from cimfs.layout import cim, ntfs
from cimfs.reader import find_region_file

VECTORS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "vectors"
SD = ntfs.sddl_to_sd("O:BAG:SYD:(A;;FA;;;SY)(A;OICI;FR;;;BU)")
LOOKUP_MISSES = (errors.ERROR_FILE_NOT_FOUND, errors.ERROR_PATH_NOT_FOUND)
CHUNK = 1 << 16
#: The mutation process's address-space limit, the resident set it must stay
#: under, and the seconds one mutated image may take to read in full.
RSS_LIMIT = 3 << 30
RSS_PEAK = 256 << 20
CASE_SECONDS = 20


def build_seeds(root: pathlib.Path) -> list[pathlib.Path]:
    seeds = []
    d = root / "own"
    d.mkdir()
    with cimfs.create(d, "base.cim") as w:
        w.mkdir("dir/sub", parents=True)
        w.add_file(
            "dir/a.txt",
            b"alpha" * 100,
            FileMetadata(
                attributes=A.ARCHIVE, security_descriptor=SD, ea_buffer=ntfs.pack_eas(ntfs.lx_eas(mode=0o100644, uid=1))
            ),
        )
        w.add_file("dir/sub/big", os.urandom(70_000))
        w.add_file("link", b"", FileMetadata(reparse_data=ntfs.pack_symlink_reparse("dir\\a.txt")))
        w.add_stream("dir/a.txt:ads", b"stream")
        w.link("hard", "dir/a.txt")
        for i in range(30):
            w.add_file(f"dir/f{i:02}", bytes([i]) * i)
        w.create_file("sparse", FileMetadata(file_size=1 << 33)).close()
    with cimfs.create(d, "fork.cim", base="base.cim") as w:
        w.add_file("dir/new", b"new")
        w.delete("dir/f07")
    seeds += [d / "base.cim", d / "fork.cim"]
    for v in ("v2-basic", "v3-shaped"):
        if (VECTORS / v).is_dir():
            shutil.copytree(VECTORS / v, root / v)
            for p in (root / v).iterdir():
                p.chmod(0o644)
            seeds.append(root / v / "image.cim")
    return seeds


def full_read(cim_path: str) -> None:
    """Everything a user could ask of an image, in bounded reads: a damaged
    entry may fail (CimFormatError), the rest must still be served."""
    from cimfs import posix, tools

    try:
        with cimfs.open(cim_path) as im:
            im.check()
            im.info()
            for dirpath, dirs, files in im.walk(onerror=lambda e: None):
                for name in dirs + files:
                    p = f"{dirpath}\\{name}" if dirpath else name
                    try:
                        st = im.stat(p)
                        posix.posix_info(st)
                        tools.describe(im, p)
                        im.exists(p.upper())
                        for s in ([] if st.is_dir else [None]) + im.streams(p):
                            with im.open(p, stream=s) as f:
                                for off in (0, f.size // 2, max(0, f.size - CHUNK)):
                                    f.seek(off)
                                    f.read(CHUNK)
                    except CimError as e:
                        if not isinstance(e, CimFormatError) and e.hresult not in LOOKUP_MISSES:
                            raise
            for _ in tools.iter_entries(im):
                pass
    except CimFormatError:
        pass
    tools.fsck(cim_path)  # a report, never an exception


# ---------------------------------------------------------------- mutations
def targets(cim_path: pathlib.Path):
    """(file name, offset, width) of fields worth hitting, found with the reader."""
    out = []
    with cimfs.open(cim_path) as im:
        name = cim_path.name
        out += [(name, 12, 1), (name, 16, 4), (name, 48, 2), (name, 56, 8), (name, 70, 2)]

        def region_file(ro):
            on_disk = os.path.basename(find_region_file(str(cim_path.parent), im.region_names[ro >> 48][0]))
            return on_disk, ro & ((1 << 48) - 1)

        rf, off = region_file(im.header.filesystem_offset)
        out += [(rf, off + i, 8) for i in (0, 8)] + [(rf, off + 16, 4), (rf, off + 20, 4)]
        for t in im.file_tables:
            rf, off = region_file(t.offset)
            dir_rf, dir_off = region_file(im.filesystem.file_table_directory_offset)
            out += [(dir_rf, dir_off + i, w) for i, w in ((0, 8), (8, 2), (10, 2))]
            for slot in range(min(t.count, 64)):
                base = off + slot * t.entry_size
                out += [
                    (rf, base + o, w)
                    for o, w in (
                        (2, 2),
                        (4, 4),
                        (40, 8),
                        (48, 8),
                        (54, 1),
                        (55, 1),
                        (56, 8),
                        (64, 8),
                        (72, 8),
                        (80, 8),
                        (88, 4),
                    )
                ]
                rec = im.record(1 + slot + im.file_tables.index(t) * 1024)
                if rec.is_dir and rec.stream.length:
                    lrf, loff = region_file(rec.stream.offset)
                    out += [(lrf, loff, 4), (lrf, loff + 4, 4), (lrf, loff + 8, 4), (lrf, loff + 8 + 4 * 1, 4)]
                if rec.stream.type == cim.STREAM_TYPE_PE_IMAGE:
                    prf, poff = region_file(rec.stream.offset)
                    out += [(prf, poff + o, w) for o, w in ((0, 8), (8, 8), (20, 2), (24, 4), (28, 4))]
                if rec.stream_table_offset:
                    srf, soff = region_file(rec.stream_table_offset)
                    out += [(srf, soff, 4), (srf, soff + 4, 4), (srf, soff + 8, 4), (srf, soff + 12, 8)]
                for ro in (rec.security_descriptor_offset, rec.reparse_offset):
                    if ro:
                        brf, boff = region_file(ro)
                        out.append((brf, boff, 2))
    return out


def structural(cim_path: pathlib.Path) -> list[tuple[str, str, int, bytes, int]]:
    """Edits that reproduce each class of issue 17 somewhere in the image:
    (class, file name, offset, new bytes, size to extend the file to sparsely
    or 0).  The mutation runs apply them alone and mixed with random ones, so
    a new variant of a known class is found, not only the example."""
    edits = []
    with cimfs.open(cim_path) as im:

        def at(ro):
            on_disk = os.path.basename(find_region_file(str(cim_path.parent), im.region_names[ro >> 48][0]))
            return on_disk, ro & ((1 << 48) - 1)

        dirs, files, tables = [], [], []
        for path, fid in im.iter_file_ids():
            rec = im.record(fid)
            t = im.file_tables[(fid - 1) // cim.FILE_TABLE_CAPACITY]
            rec_at = at(t.offset + ((fid - 1) % cim.FILE_TABLE_CAPACITY) * t.entry_size)
            size = min(96, t.entry_size)
            (dirs if rec.is_dir else files).append((fid, rec, rec_at, size))
            if rec.is_dir and rec.stream.length:
                tables.append((at(rec.stream.offset), im._bytes(rec.stream.offset, rec.stream.length, "t"), 4))
            if rec.stream_table_offset:
                n = struct.unpack("<I", im._bytes(rec.stream_table_offset, 4, "s"))[0]
                tables.append((at(rec.stream_table_offset + 4), im._bytes(rec.stream_table_offset + 4, n, "s"), 16))
        for (f, off), table, vsize in tables:
            count = struct.unpack_from("<I", table, 4)[0]
            if not count:
                continue
            offsets = struct.unpack_from(f"<{count}I", table, 8 + vsize * count)
            for o in offsets[:4]:
                for units in (256, 0xFFFF, 0):  # class 4: long names (and empty ones)
                    edits.append(("long name", f, off + o, struct.pack("<H", units), 0))
                for unit in (0xD800, 0xDC00, 0, 0x5C, 0x3A):  # class 2: surrogates, NUL, separators
                    edits.append(("bad unit", f, off + o + 2, struct.pack("<H", unit), 0))
            longest = max(offsets, key=lambda o: struct.unpack_from("<H", table, o)[0])
            edits.append(("shared name", f, off + 8 + vsize * count, struct.pack(f"<{count}I", *[longest] * count), 0))
            if vsize == 4 and dirs:  # class 3/7: a directory under a second name, or a cycle
                for k in range(min(count, 4)):
                    for fid, *_ in dirs[:3]:
                        edits.append(("second name", f, off + 8 + 4 * k, struct.pack("<I", fid), 0))
        for fid, rec, (f, off), size in dirs[1:4]:  # class 3/4: two directories, one link table
            for _, other, *_ in dirs[:3]:
                if other.stream != rec.stream:
                    edits.append(
                        ("shared table", f, off, cim.pack_file_record(rec._replace(stream=other.stream))[:size], 0)
                    )
        for fid, rec, (f, off), size in files[:6]:
            # class 3: a sparse stream near 2^48 (and a plain one the region cannot hold)
            for sparse in (True, False):
                huge = cim.Stream(rec.stream.offset, cim.MAX_STREAM_LENGTH, rec.stream.type, sparse)
                edits.append(("huge stream", f, off, cim.pack_file_record(rec._replace(stream=huge))[:size], 0))
            # class 2: a reparse tag that disagrees with the buffer
            if rec.reparse_offset:
                for tag in (
                    ntfs.IO_REPARSE_TAG_LX_SYMLINK,
                    ntfs.IO_REPARSE_TAG_MOUNT_POINT,
                    ntfs.IO_REPARSE_TAG_SYMLINK,
                    ntfs.IO_REPARSE_TAG_LX_FIFO,
                    0x12345678,
                ):
                    edits.append(("reparse tag", f, off, cim.pack_file_record(rec._replace(reparse_tag=tag))[:size], 0))
                rf, roff = at(rec.reparse_offset)
                for delta in (2 + 8 + 12, 2 + 8 + 14):  # into the target's first units: NUL, lone surrogate
                    for unit in (0, 0xD800):
                        edits.append(("reparse target", rf, roff + delta, struct.pack("<H", unit), 0))
        # class 4: counts that pass size checks only because the region file is sparse
        f, off = at(im.header.filesystem_offset)
        for n in (cim.MAX_FILE_TABLES, cim.MAX_FILE_TABLES + 1, 1 << 20, 0xFFFFFFFF):
            edits.append(("sparse count", f, off + 16, struct.pack("<I", n), 256 << 20))
    return edits


BOUNDARY = [0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 31, 1 << 47, (1 << 48) - 1, (1 << 63), (1 << 64) - 1]


def mutate_structure(files: dict, edits: list, rng: random.Random) -> tuple[str, bytes, int]:
    _cls, name, off, new, extend = rng.choice(edits)
    data = bytearray(files[name])
    data[off : off + len(new)] = new[: max(0, len(data) - off)]
    return name, bytes(data), extend


def mutate(files: dict, names: list, fields: list, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.randrange(6)
    if kind <= 2 and fields:
        name, off, width = rng.choice(fields)
        data = bytearray(files[name])
        if off + width > len(data):
            return name, bytes(data)
        value = rng.choice(BOUNDARY + [len(data), len(data) + 1, rng.randrange(1 << (8 * width))]) % (1 << (8 * width))
        if kind == 2:
            value = int.from_bytes(data[off : off + width], "little") + rng.choice((-1, 1, 8, -8, 4096))
            value %= 1 << (8 * width)
        data[off : off + width] = value.to_bytes(width, "little")
        return name, bytes(data)
    name = rng.choice(names)
    data = bytearray(files[name])
    if not data:
        return name, b""
    if kind == 3:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 4:  # truncation
        del data[rng.randrange(len(data)) :]
    else:  # zeroed or 0xFF range
        i = rng.randrange(len(data))
        n = rng.randint(1, 256)
        data[i : i + n] = bytes([rng.choice((0, 0xFF))]) * len(data[i : i + n])
    return name, bytes(data)


def run_mutations(seed_path: str, seed: int, count: int, conn) -> None:
    """Child process: bounded address space, a watchdog per image; sends
    the findings and the largest resident set it had."""
    resource.setrlimit(resource.RLIMIT_AS, (RSS_LIMIT, RSS_LIMIT))

    def on_alarm(*_):
        raise TimeoutError(f"reading a mutated image took over {CASE_SECONDS} s (a hang?)")

    signal.signal(signal.SIGALRM, on_alarm)
    failures = []
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        seed_path = pathlib.Path(seed_path)
        d = seed_path.parent
        names = [
            p.name
            for p in d.iterdir()
            if p.is_file() and (p.name.endswith(".cim") or p.name.lower().startswith(("region_", "objectid_")))
        ]
        files = {n: (d / n).read_bytes() for n in names}
        fields = targets(seed_path)
        edits = structural(seed_path)
        rng = random.Random(seed)
        for i in range(count):
            extend = 0
            if edits and i % 3 == 0:  # every class of issue 17, alone
                name, data, extend = mutate_structure(files, edits, rng)
            else:
                name, data = mutate(files, names, fields, rng)
            (d / name).write_bytes(data)
            if extend > len(data):
                os.truncate(d / name, extend)
            signal.alarm(CASE_SECONDS)
            try:
                full_read(str(seed_path))
            except BaseException as e:  # noqa: BLE001 - anything but CimFormatError is a finding
                failures.append(f"mutation {i} of {name}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}")
            finally:
                signal.alarm(0)
                (d / name).write_bytes(files[name])
            if len(failures) >= 5:
                break
    except BaseException as e:  # noqa: BLE001
        failures.append(f"driver: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}")
    conn.send((failures, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) << 10))
    conn.close()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return build_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.mark.parametrize("index", range(4))
def test_mutated_images_only_raise_format_errors(seeds, index):
    if index >= len(seeds):
        pytest.skip("test vectors not present")
    full_read(str(seeds[index]))  # the unmutated seed reads cleanly
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=run_mutations, args=(str(seeds[index]), 1000 + index, 500, child))
    p.start()
    child.close()
    failures, peak = parent.recv() if parent.poll(600) else (["no answer from the mutation process in 600 s"], 0)
    p.join(30)
    assert p.exitcode == 0, f"mutation process died with exit code {p.exitcode}"
    assert not failures, "\n".join(failures)
    # Images of under 1 MB: a reader within O(image size + what is read) grows far less than this.
    assert peak < RSS_PEAK, f"the mutation process grew by {peak >> 20} MiB resident"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_field_values(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("hyp")
    d = root / "img"
    d.mkdir()
    with cimfs.create(d, "x.cim") as w:
        w.mkdir("a")
        w.add_file("a/b", b"bee" * 50)
        w.add_stream("a/b:s", b"ess")
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    name = data.draw(st.sampled_from(sorted(files)))
    blob = bytearray(files[name])
    off = data.draw(st.integers(0, max(0, len(blob) - 1)))
    width = data.draw(st.sampled_from([1, 2, 4, 8]))
    value = data.draw(st.integers(0, (1 << (8 * width)) - 1))
    blob[off : off + width] = value.to_bytes(width, "little")[: len(blob[off : off + width])]
    (d / name).write_bytes(bytes(blob))
    full_read(str(d / "x.cim"))


def test_cycles_are_reported_and_skipped(tmp_path):
    """A directory that lists its own parent: walk, nlink and check must stop
    there, report it, and serve the rest (class 3 and 7 of issue 17)."""
    with cimfs.create(tmp_path, "c.cim") as w:
        w.mkdir("a/b", parents=True)
        w.add_file("a/b/f", b"x")
        w.add_file("top", b"y")
    with cimfs.open(tmp_path / "c.cim") as im:
        b_id, root = im.lookup("a/b"), im.root_id
        rec = im.record(b_id)
        ri, off = rec.stream.offset >> 48, rec.stream.offset & ((1 << 48) - 1)
        region = tmp_path / im.region_names[ri][0]
        table = im._bytes(rec.stream.offset, rec.stream.length, "t")
    # b's only entry now points back at the root
    data = bytearray(region.read_bytes())
    data[off + 8 : off + 12] = struct.pack("<I", root)
    region.write_bytes(bytes(data))
    with cimfs.open(tmp_path / "c.cim") as im:
        damage = []
        walked = list(im.walk(onerror=damage.append))
        # the loop is entered once, reported once, and the rest is served
        assert [d for d, _, _ in walked] == ["", "a", "a\\b"]
        assert len(damage) == 1 and isinstance(damage[0], CimFormatError) and "second name" in str(damage[0])
        assert any("second name" in f for f in im.check())
        assert im.stat("top").nlink == 1  # a file's link count walks the tree: the loop must not stop it
        assert im.read_bytes("top") == b"y"
        assert [p for p, _ in im.iter_file_ids()] == ["", "a", "top", "a\\b", "a\\b\\f"]  # "f" now names the root
    assert table


@pytest.mark.parametrize(
    "path", ["a\0b", "a\x01", "..", "a/../b", "x" * 40000, "\ud800", "a:b:c:d", ":", "a|b", 42, b"bytes"]
)
def test_hostile_paths_are_cim_errors(tmp_path, path):
    with cimfs.create(tmp_path, "p.cim") as w:
        w.add_file("a", b"x")
        for op in (w.exists, w.delete, lambda p: w.add_file(p, b"1"), lambda p: w.link(p, "a")):
            try:
                op(path)
            except CimError:
                pass
    with cimfs.open(tmp_path / "p.cim") as im:
        for op in (im.stat, im.listdir, im.read_bytes, im.exists, im.streams):
            try:
                op(path)
            except CimError:
                pass


def test_stored_names_windows_forbids_can_be_looked_up(tmp_path):
    """A name another writer stored with a control or wildcard character is
    listed as it is, so stat/read by that path must find it (mutation 504 of a
    seed found the reader listing 'f1\\x19' and then refusing to stat it)."""
    with cimfs.create(tmp_path, "n.cim") as w:
        w.mkdir("dir")
        w.add_file("dir/fQ", b"payload")
    # patch the stored name "fQ" to "f\x19" in the region file holding the link table
    with cimfs.open(tmp_path / "n.cim") as im:
        rec = im.record(im.lookup("dir"))
        region = tmp_path / im.region_names[rec.stream.offset >> 48][0]
    data = region.read_bytes()
    needle = "fQ".encode("utf-16-le")
    assert data.count(needle) == 1
    region.write_bytes(data.replace(needle, "f\x19".encode("utf-16-le")))
    with cimfs.open(tmp_path / "n.cim") as im:
        assert im.listdir("dir") == ["f\x19"]
        assert im.read_bytes("dir/f\x19") == b"payload"
        assert im.exists("dir\\f\x19")
        with pytest.raises(CimError) as e:
            im.stat("dir/f\x00")
        assert e.value.hresult == errors.ERROR_INVALID_NAME


# ---------------------------------------------------------------- issue 17, one test per class
class Patch:
    """Edits an image's region files in place, at RegionOffsets the reader reports."""

    def __init__(self, cim_path):
        self.cim = pathlib.Path(cim_path)
        with cimfs.open(self.cim) as im:
            self.names = [n for n, _ in im.region_names]

    def _file(self, ro):
        return pathlib.Path(find_region_file(str(self.cim.parent), self.names[ro >> 48])), ro & ((1 << 48) - 1)

    def read(self, ro, n) -> bytes:
        path, off = self._file(ro)
        with open(path, "rb") as f:
            f.seek(off)
            return f.read(n)

    def write(self, ro, data: bytes) -> None:
        path, off = self._file(ro)
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(data)

    def record(self, fid, **changes) -> None:
        with cimfs.open(self.cim) as im:
            t = im.file_tables[(fid - 1) // cim.FILE_TABLE_CAPACITY]
            rec = im.record(fid)
        ro = t.offset + ((fid - 1) % cim.FILE_TABLE_CAPACITY) * t.entry_size
        self.write(ro, cim.pack_file_record(rec._replace(**changes))[: min(96, t.entry_size)])

    def link_table(self, dir_fid):
        """(RegionOffset, bytes) of a directory's link table."""
        with cimfs.open(self.cim) as im:
            s = im.record(dir_fid).stream
        return s.offset, self.read(s.offset, s.length)


def cli(*args, check_exit=None, report=False):
    """Run the CLI; it must never print a traceback."""
    p = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", *map(str, args)],
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    out, err = p.stdout.decode("utf-8", "backslashreplace"), p.stderr.decode("utf-8", "backslashreplace")
    assert "Traceback" not in err, err
    if check_exit is not None:
        assert p.returncode == check_exit, (p.returncode, out, err)
    if p.returncode:  # an error is one line (a report, as fsck's, may have more)
        assert p.returncode == 1 and (report or len(err.strip().splitlines()) == 1), (p.returncode, err)
    return p.returncode, out, err


def test_class4_long_stored_names_are_format_errors(tmp_path):
    with cimfs.create(tmp_path, "n.cim") as w:
        w.mkdir("d")
        w.add_file("d/" + "x" * 255, b"longest allowed")
    with cimfs.open(tmp_path / "n.cim") as im:
        d = im.lookup("d")
        assert im.read_bytes("d/" + "x" * 255) == b"longest allowed"
    patch = Patch(tmp_path / "n.cim")
    ro, table = patch.link_table(d)
    (name_off,) = struct.unpack_from("<I", table, 12)
    assert struct.unpack_from("<H", table, name_off) == (255,)
    patch.write(ro + name_off, struct.pack("<H", 256))
    with cimfs.open(tmp_path / "n.cim") as im:
        with pytest.raises(CimFormatError, match="256 UTF-16 units"):
            im.listdir("d")
        assert im.listdir("") == ["d"]  # the rest is served
    code, _, err = cli("ls", tmp_path / "n.cim", "d")
    assert code == 1 and "256 UTF-16 units" in err


def test_class4_link_entries_sharing_one_name_are_refused(tmp_path):
    """Every entry pointing at one 255-unit name: refused before decoding
    (decoded, a 420 KB image became gigabytes)."""
    n = 2000
    with cimfs.create(tmp_path, "s.cim") as w:
        w.mkdir("d")
        w.add_file("d/" + "a" * 255, b"x")
        for i in range(n):
            w.add_file(f"d/{i:05}", b"")
    with cimfs.open(tmp_path / "s.cim") as im:
        d = im.lookup("d")
        assert len(im.listdir("d")) == n + 1
    patch = Patch(tmp_path / "s.cim")
    ro, table = patch.link_table(d)
    length, count = struct.unpack_from("<II", table)
    offsets = struct.unpack_from(f"<{count}I", table, 8 + 4 * count)
    longest = max(offsets, key=lambda o: struct.unpack_from("<H", table, o)[0])
    patch.write(ro + 8 + 4 * count, struct.pack(f"<{count}I", *[longest] * count))
    with cimfs.open(tmp_path / "s.cim") as im:
        with pytest.raises(CimFormatError, match="overlap"):
            im.listdir("d")
        assert any("overlap" in f for f in im.check())
        assert [p for p, _ in im.iter_file_ids()] == ["", "d"]


def test_class4_sparse_region_counts_are_bounded(tmp_path):
    """A file-table count that passes the size check only because the region
    file is sparse: bounded by 32-bit FileIDs, and what stays within that costs
    memory only for what is read (measured in a child process)."""
    with cimfs.create(tmp_path, "c.cim") as w:
        w.add_file("f", b"intact")
    with cimfs.open(tmp_path / "c.cim") as im:
        fs_ro = im.header.filesystem_offset
    patch = Patch(tmp_path / "c.cim")
    region, _ = patch._file(fs_ro)
    os.truncate(region, 1 << 40)  # sparse: every offset now "inside" the file
    obj = bytearray(patch.read(fs_ro, cim.FILESYSTEM_OBJECT.size))
    struct.pack_into("<I", obj, 16, cim.MAX_FILE_TABLES + 1)
    patch.write(fs_ro, bytes(obj))
    with pytest.raises(CimFormatError, match="32-bit"):
        cimfs.open(tmp_path / "c.cim")
    struct.pack_into("<I", obj, 16, cim.MAX_FILE_TABLES)
    patch.write(fs_ro, bytes(obj))
    code = (
        "im = cimfs.open(sys.argv[1])\n"
        "assert im.read_bytes('f') == b'intact'\n"
        "assert im.listdir('') == ['f']\n"
        "assert im.info()['file_tables'] == cimfs.layout.cim.MAX_FILE_TABLES\n"
    )
    grown_kib = _rss_growth_kib(code, tmp_path / "c.cim")
    assert grown_kib < 64 << 10, (
        f"opening grew the process by {grown_kib} KiB"
    )  # 4M table entries unpacked would be ~400 MiB


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_class5_region_file_not_regular(tmp_path, kind):
    with cimfs.create(tmp_path, "r.cim") as w:
        w.add_file("f", b"data")
    with cimfs.open(tmp_path / "r.cim") as im:
        region = tmp_path / im.region_names[0][0]
    region.unlink()
    if kind == "fifo":
        os.mkfifo(region)  # nobody writes it: a blocking open would hang
    else:
        region.mkdir()
    code = "import cimfs, sys\ntry:\n    cimfs.open(sys.argv[1]).read_bytes('f')\nexcept cimfs.CimFormatError as e:\n    print(e)\n"
    p = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "r.cim")], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert f"is {'a FIFO' if kind == 'fifo' else 'a directory'}" in p.stdout
    code, _, err = cli("cat", tmp_path / "r.cim", "f")
    assert code == 1 and "region file" in err
    # the .cim itself as a FIFO: a CimError, no hang
    os.rename(tmp_path / "r.cim", tmp_path / "moved")
    os.mkfifo(tmp_path / "r.cim")
    with pytest.raises(CimError, match="FIFO"):
        cimfs.open(tmp_path / "r.cim")


def _linked_twice(tmp_path):
    """An image whose directory "a" is also named "b" (b's entry patched to a's FileID)."""
    with cimfs.create(tmp_path, "t.cim") as w:
        w.mkdir("a")
        w.add_file("a/inner", b"in")
        w.mkdir("b")
        w.add_file("top", b"intact file")
        w.link("top2", "top")
    with cimfs.open(tmp_path / "t.cim") as im:
        a, b, root = im.lookup("a"), im.lookup("b"), im.root_id
    patch = Patch(tmp_path / "t.cim")
    ro, table = patch.link_table(root)
    length, count = struct.unpack_from("<II", table)
    ids = list(struct.unpack_from(f"<{count}I", table, 8))
    ids[ids.index(b)] = a
    patch.write(ro + 8, struct.pack(f"<{count}I", *ids))
    return tmp_path / "t.cim"


def test_class7_one_bad_directory_does_not_hide_the_image(tmp_path):
    path = _linked_twice(tmp_path)
    with cimfs.open(path) as im:
        assert im.listdir("") == ["a", "b", "top", "top2"]
        assert im.read_bytes("top") == b"intact file"
        assert im.stat("top").nlink == 2 and im.stat("").is_dir and im.stat("b").is_dir
        assert im.info()["file_records"] >= 5
        damage = []
        assert [d for d, _, _ in im.walk(onerror=damage.append)] == ["", "a"]
        assert ["b"] == [e.filename for e in damage]
        assert any("b: directory FileID" in f and "second name" in f for f in im.check())
    assert cli("ls", path, check_exit=0)[1].split() == ["a", "b", "top", "top2"]
    assert cli("cat", path, "top", check_exit=0)[1] == "intact file"
    assert "Links: 2" in cli("stat", path, "top", check_exit=0)[1]
    cli("info", path, check_exit=0)
    code, out, err = cli("fsck", path, report=True)
    assert code == 1 and "second name" in out + err


def test_class3_deep_trees_without_recursion_or_quadratic_work(tmp_path, monkeypatch):
    """3000 levels (the recursion limit is 1000): every walker finishes, and
    fsck looks up each entry once in its directory, not from the root."""
    depth = 3000
    with cimfs.create(tmp_path, "deep.cim") as w:
        w.mkdir("\\".join(["d"] * depth), parents=True)
        w.add_file("\\".join(["d"] * depth + ["leaf"]), b"bottom")
    path = str(tmp_path / "deep.cim")
    assert sys.getrecursionlimit() < depth
    from cimfs import tools
    from cimfs.reader import Image

    calls = {"n": 0}
    real_child = Image._child

    def counting_child(self, dir_id, name):
        calls["n"] += 1
        return real_child(self, dir_id, name)

    monkeypatch.setattr(Image, "_child", counting_child)
    assert tools.fsck(path) == []
    assert calls["n"] <= 3 * (depth + 2), f"fsck did {calls['n']} name lookups for {depth + 2} entries"
    with cimfs.open(path) as im, cimfs.open(path) as im2:
        assert sum(1 for _ in im.walk()) == depth + 1
        assert len(list(im.iter_file_ids())) == depth + 2
        assert im.check() == []
        assert len(list(tools.iter_entries(im))) == depth + 2
        assert tools.diff_images(im, im2) == {"added": [], "removed": [], "changed": []}
        assert im.stat("\\".join(["d"] * depth + ["leaf"])).nlink == 1


def test_class3_sparse_stream_near_2_48_is_not_read(tmp_path, monkeypatch):
    size = (1 << 48) - 1
    with cimfs.create(tmp_path, "a.cim") as w:
        w.create_file("huge", FileMetadata(file_size=size)).close()
        w.add_stream("huge:ads", b"s")
    with cimfs.create(tmp_path, "b.cim") as w:
        w.create_file("huge", FileMetadata(file_size=size)).close()
        w.add_stream("huge:ads", b"s")
    from cimfs import tools
    from cimfs.reader import Image

    read = {"bytes": 0}
    real = Image._read_stream

    def counting(self, desc, pos, n):
        data = real(self, desc, pos, n)
        read["bytes"] += len(data)
        return data

    monkeypatch.setattr(Image, "_read_stream", counting)
    assert tools.fsck(str(tmp_path / "a.cim")) == []
    with cimfs.open(tmp_path / "a.cim") as a, cimfs.open(tmp_path / "b.cim") as b:
        assert tools.diff_images(a, b)["changed"] == []
        assert read["bytes"] < 1 << 20, "holes were read"
        with pytest.raises(CimError) as e:
            a.read_bytes("huge")
        assert e.value.hresult == errors.E_OUTOFMEMORY and "pieces" in str(e.value)
        assert a.read_at("huge", size - 4, 100) == bytes(4)


def _weird_names_image(tmp_path):
    """Names and link targets with a lone surrogate, one target with a NUL,
    one record whose reparse tag disagrees with its buffer."""
    with cimfs.create(tmp_path, "w.cim") as w:
        w.add_file("sQQ", b"lone surrogate name")
        w.add_file("lnkQ", b"", FileMetadata(reparse_data=ntfs.pack_symlink_reparse("tQQ")))
        w.add_file("nulQ", b"", FileMetadata(reparse_data=ntfs.pack_symlink_reparse("nQQ")))
        w.add_file("tag", b"", FileMetadata(reparse_data=ntfs.pack_symlink_reparse("x")))
        w.add_file("ok", b"fine")
    with cimfs.open(tmp_path / "w.cim") as im:
        tag_fid = im.lookup("tag")
    for region in tmp_path.glob("region_*"):
        data = region.read_bytes()
        for old, new in (("sQQ", "s\ud800Q"), ("tQQ", "t\udc01Q"), ("nQQ", "n\0Q")):
            data = data.replace(old.encode("utf-16-le"), new.encode("utf-16-le", "surrogatepass"))
        region.write_bytes(data)
    Patch(tmp_path / "w.cim").record(tag_fid, reparse_tag=ntfs.IO_REPARSE_TAG_LX_SYMLINK)
    return tmp_path / "w.cim"


def test_class2_surrogates_nul_targets_and_tag_mismatch(tmp_path):
    path = _weird_names_image(tmp_path)
    with cimfs.open(path) as im:
        assert "s\ud800Q" in im.listdir("")
        assert im.read_bytes("s\ud800Q") == b"lone surrogate name"
        for name in im.listdir(""):
            im.stat(name)  # the API serves every entry; what is wrong in a buffer is reported by its parser
        assert "\0" in ntfs.parse_reparse(im.stat("nulQ").reparse_data).target  # reported by fsck, skipped by extract
    out = cli("ls", path, check_exit=0)[1]
    assert "s\\ud800Q" in out and "ok" in out
    out = cli("ls", "-l", path, check_exit=0)[1]
    assert "t\\udc01Q" in out and "n\\0Q" in out
    for name in ("lnkQ", "nulQ", "tag"):
        cli("stat", path, name, check_exit=0)
    cli("info", path, check_exit=0)
    code, out, err = cli("fsck", path, report=True)
    assert code == 1 and "NUL" in out + err and "reparse tag" in out + err


def _rss_growth_kib(code: str, *args) -> int:
    """How far a child process running ``code`` grows its peak resident set
    beyond one that only imports cimfs (KiB); ``code`` must succeed."""
    probe = "import resource, sys, cimfs\n{}\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    base = subprocess.run([sys.executable, "-c", probe.format("")], capture_output=True, text=True, check=True)
    p = subprocess.run(
        [sys.executable, "-c", probe.format(code), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    return int(p.stdout.split()[-1]) - int(base.stdout)


def test_class4_sparse_link_table_counts_cost_nothing(tmp_path):
    """A directory whose link table claims 25 million entries, held up only by
    a sparse region file: refused at the first hole, without building them."""
    with cimfs.create(tmp_path, "l.cim") as w:
        w.add_file("f", b"x")
    with cimfs.open(tmp_path / "l.cim") as im:
        root = im.root_id
        ri = im.record(root).stream.offset >> 48
    patch = Patch(tmp_path / "l.cim")
    region, _ = patch._file(ri << 48)
    end = (region.stat().st_size + 7) & ~7
    length = 200 << 20
    with open(region, "r+b") as f:
        f.seek(end)
        f.write(struct.pack("<II", length, (length - 8) // 8))
    os.truncate(region, end + length)
    patch.record(root, stream=cim.Stream((ri << 48) | end, length, cim.STREAM_TYPE_LINK_TABLE))
    code = (
        "im = cimfs.open(sys.argv[1])\n"
        "try:\n    im.listdir('')\nexcept cimfs.CimFormatError as e:\n    assert 'UTF-16 units' in str(e), e\n"
        "else:\n    raise AssertionError('listed')\n"
    )
    grown = _rss_growth_kib(code, tmp_path / "l.cim")
    assert grown < 32 << 10, f"listing grew the process by {grown} KiB"  # 25M FileIDs as ints: ~1 GiB


def _shared_long_name(tmp_path, count: int = 20_000):
    """An image whose directory "d" has a link table of ``count`` entries all
    pointing at one stored name of 65 535 UTF-16 units (~300 KB of table):
    decoded once per entry, it is gigabytes of text (issue 22 item 18)."""
    with cimfs.create(tmp_path, "u.cim") as w:
        w.mkdir("d")
        w.add_file("d/f", b"in d")
        w.add_file("top", b"intact file")
    with cimfs.open(tmp_path / "u.cim") as im:
        d, f = im.lookup("d"), im.lookup("d/f")
        ri = im.record(d).stream.offset >> 48
    patch = Patch(tmp_path / "u.cim")
    region, _ = patch._file(ri << 48)
    end = (region.stat().st_size + 7) & ~7
    name_at = 8 + 8 * count
    table = (
        struct.pack("<II", name_at + 2 + 2 * 65535, count)
        + struct.pack(f"<{count}I", *[f] * count)
        + struct.pack(f"<{count}I", *[name_at] * count)
        + struct.pack("<H", 65535)
        + "n".encode("utf-16-le") * 65535
    )
    with open(region, "r+b") as out:
        out.seek(end)
        out.write(table)
    patch.record(d, stream=cim.Stream((ri << 48) | end, len(table), cim.STREAM_TYPE_LINK_TABLE))
    return tmp_path / "u.cim"


def limited_cli(*args, limit=1 << 30):
    """The CLI under an address-space limit: (exit code, stdout, stderr); never a traceback."""
    p = subprocess.run(
        ["prlimit", f"--as={limit}", sys.executable, "-m", "cimfs.cli", *map(str, args)],
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    out, err = p.stdout.decode("utf-8", "backslashreplace"), p.stderr.decode("utf-8", "backslashreplace")
    assert "Traceback" not in err and "MemoryError" not in out + err, err
    assert p.returncode in (0, 1), (p.returncode, err)
    return p.returncode, out, err


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is not installed")
def test_link_entries_sharing_one_long_name_are_refused_before_decoding(tmp_path):
    """Issue 22 item 18: every command reads the damaged directory under 1 GiB
    of address space and says what is wrong, the rest of the image intact."""
    path = _shared_long_name(tmp_path)
    with cimfs.open(path) as im:
        with pytest.raises(CimFormatError, match="65535 UTF-16 units"):
            im.listdir("d")
        assert im.read_bytes("top") == b"intact file"
    assert limited_cli("ls", path)[1].split() == ["d", "top"]
    for args in (("ls", path, "d"), ("ls", "-l", path, "d")):
        code, _, err = limited_cli(*args)
        assert code == 1 and len(err.strip().splitlines()) == 1 and "65535 UTF-16 units" in err
    code, out, err = limited_cli("fsck", path)
    assert code == 1 and "65535 UTF-16 units" in out + err
    code, out, err = limited_cli("info", path)  # counts every entry: the damage is its one-line error
    assert code == 1 and len(err.strip().splitlines()) == 1 and "65535 UTF-16 units" in err
    for args in (("extract", path, tmp_path / "x"), ("export", path, tmp_path / "x.tar")):
        code, _, err = limited_cli(*args)  # a corrupt directory ends an extraction
        assert code == 1 and len(err.strip().splitlines()) == 1 and "65535 UTF-16 units" in err
    code, _, err = limited_cli("extract", path, tmp_path / "top", "top")
    assert code == 0 and (tmp_path / "top" / "top").read_bytes() == b"intact file"
