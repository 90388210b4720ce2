"""NTFS/WSL metadata blobs: known bytes, round trips, and hostile input."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cimfs import CimError, CimFormatError
from cimfs.layout import ntfs

# From shared/vectors/v2-basic/expected.json (written by an independent writer)
VECTOR_EA = bytes.fromhex(
    "1c000000000c0600555345522e434f4d4d454e5400766563746f72000000000000060400244c584d4f4400a4810000"
)
VECTOR_SYMLINK = bytes.fromhex(
    "0c0000a030000000000012001200120001000000680065006c006c006f002e00740078007400680065006c006c006f002e00740078007400"
)


def test_vector_ea_chain():
    entries = ntfs.unpack_eas(VECTOR_EA)
    assert entries == [
        ntfs.EaEntry("USER.COMMENT", b"vector"),
        ntfs.EaEntry("$LXMOD", (0o100644).to_bytes(4, "little")),
    ]
    assert ntfs.pack_eas(entries) == VECTOR_EA
    assert ntfs.parse_lx_eas(entries).mode == 0o100644


def test_vector_symlink():
    rp = ntfs.parse_reparse(VECTOR_SYMLINK)
    assert (rp.tag, rp.relative, rp.target, rp.substitute_name, rp.print_name) == (
        ntfs.IO_REPARSE_TAG_SYMLINK,
        True,
        "hello.txt",
        "hello.txt",
        "hello.txt",
    )
    assert ntfs.pack_symlink_reparse("hello.txt") == VECTOR_SYMLINK


def test_absolute_symlinks_and_mount_points():
    rp = ntfs.parse_reparse(ntfs.pack_symlink_reparse("C:\\Windows\\System32"))
    assert (
        rp.relative is False
        and rp.substitute_name == "\\??\\C:\\Windows\\System32"
        and rp.target == "C:\\Windows\\System32"
    )
    mp = ntfs.parse_reparse(ntfs.pack_mount_point_reparse("C:\\data"))
    assert (
        mp.tag == ntfs.IO_REPARSE_TAG_MOUNT_POINT and mp.substitute_name == "\\??\\C:\\data" and mp.target == "C:\\data"
    )
    lx = ntfs.pack_lx_symlink_reparse("../lib/ä")
    assert lx[:4] == ntfs.IO_REPARSE_TAG_LX_SYMLINK.to_bytes(4, "little") and lx[8:12] == (2).to_bytes(4, "little")
    assert ntfs.parse_reparse(lx).target == "../lib/ä"
    fifo = ntfs.pack_lx_special_reparse(ntfs.IO_REPARSE_TAG_LX_FIFO)
    assert fifo == ntfs.IO_REPARSE_TAG_LX_FIFO.to_bytes(4, "little") + bytes(4)


def test_lx_eas_round_trip():
    entries = ntfs.lx_eas(mode=0o20644, uid=1000, gid=100, rdev_major=4, rdev_minor=64)
    assert [e.name for e in entries] == ["$LXUID", "$LXGID", "$LXMOD", "$LXDEV"]
    md = ntfs.parse_lx_eas(ntfs.unpack_eas(ntfs.pack_eas(entries)))
    assert (md.mode, md.uid, md.gid, md.rdev_major, md.rdev_minor) == (0o20644, 1000, 100, 4, 64)
    # NTFS stores EA names upper-case; lookups ignore case
    assert ntfs.parse_lx_eas([ntfs.EaEntry("$lxuid", (7).to_bytes(4, "little"))]).uid == 7


def test_sddl_known_descriptor():
    sddl = "O:BAG:SYD:PAI(A;;FA;;;SY)(A;OICIIO;GA;;;CO)(D;;0x1200a9;;;S-1-5-21-1-2-3-500)S:(AU;SA;FA;;;WD)"
    sd = ntfs.sddl_to_sd(sddl)
    # header: revision 1, control = self-relative | DACL present/protected/auto-inherited | SACL present
    assert sd[0] == 1 and int.from_bytes(sd[2:4], "little") == 0x8000 | 0x4 | 0x1000 | 0x400 | 0x10
    # owner S-1-5-32-544 right after the 20-byte header
    assert sd[20:36] == bytes([1, 2, 0, 0, 0, 0, 0, 5]) + (32).to_bytes(4, "little") + (544).to_bytes(4, "little")
    assert ntfs.sd_to_sddl(sd) == sddl
    d = ntfs.describe_sd(sd)
    assert d["owner"] == "S-1-5-32-544 (BUILTIN\\Administrators)"
    assert d["dacl"][0] == {
        "type": "allow",
        "flags": [],
        "mask": "0x1f01ff",
        "rights": "FA",
        "sid": "S-1-5-18 (NT AUTHORITY\\SYSTEM)",
    }
    assert d["dacl"][2]["type"] == "deny"


def test_sddl_rejects_bad_text():
    for bad in ("O:XX", "D:(Q;;FA;;;SY)", "D:(A;;ZZ;;;SY)", "garbage"):
        with pytest.raises(CimError):
            ntfs.sddl_to_sd(bad)


def test_malformed_vector_sd_is_a_format_error():
    # the vector's SD offsets point between its SIDs: stored as given, but not parseable
    sd = bytes.fromhex(
        "010004801400000024000000000000003000000001010000000000051200000001010000000000051200000002001c00"
        "0100000000001400ff011f00010100000000000512000000"
    )
    with pytest.raises(CimFormatError):
        ntfs.describe_sd(sd)


names = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), min_size=1, max_size=40)


@given(st.lists(st.tuples(names, st.binary(max_size=300), st.integers(0, 255)), max_size=8))
def test_ea_round_trip(items):
    entries = [ntfs.EaEntry(n, v, f) for n, v, f in items]
    assert ntfs.unpack_eas(ntfs.pack_eas(entries)) == entries


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=100), st.booleans())
def test_symlink_round_trip(target, relative):
    rp = ntfs.parse_reparse(ntfs.pack_symlink_reparse(target, relative))
    assert rp.relative is relative and rp.target == (target[4:] if target.startswith("\\??\\") else target)


@pytest.mark.parametrize("target", ["\0", "a\0b", "dir\\x\0"])
def test_symlink_target_with_nul_is_kept_for_its_reader_to_report(target):
    """No path can hold a NUL (issue 17): the parser returns the target as
    stored, and fsck reports it, extract and export skip it, the mount
    refuses to readlink it (tests/test_hostile.py, test_extract_hostile.py)."""
    rp = ntfs.parse_reparse(ntfs.pack_symlink_reparse(target, True))
    assert "\0" in rp.target and rp.target == target


sids = st.sampled_from(["SY", "BA", "BU", "WD", "CO", "S-1-5-21-1-2-3-1001", "S-1-5-80-1-2"])
aces = st.tuples(
    st.sampled_from(["A", "D"]),
    st.sampled_from(["", "OI", "CI", "OICI", "OICIIO", "ID"]),
    st.sampled_from(["FA", "FR", "0x1301bf", "GA"]),
    sids,
)


@given(
    st.one_of(st.none(), sids),
    st.one_of(st.none(), sids),
    st.lists(aces, max_size=6),
    st.sampled_from(["", "P", "AI", "PAI"]),
)
def test_sddl_round_trip(owner, group, ace_list, flags):
    text = (
        (f"O:{owner}" if owner else "")
        + (f"G:{group}" if group else "")
        + "D:"
        + flags
        + "".join(f"({t};{f};{r};;;{s})" for t, f, r, s in ace_list)
    )
    sd = ntfs.sddl_to_sd(text)
    assert ntfs.sddl_to_sd(ntfs.sd_to_sddl(sd)) == sd


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_parsers_only_raise_format_errors(seed):
    rng = random.Random(seed)
    seeds = [
        VECTOR_EA,
        VECTOR_SYMLINK,
        ntfs.sddl_to_sd("O:BAG:SYD:(A;;FA;;;SY)(A;OICI;FR;;;BU)"),
        ntfs.pack_mount_point_reparse("C:\\x"),
        ntfs.pack_lx_symlink_reparse("t"),
    ]
    for _ in range(60):
        buf = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            if op == 0 and buf:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            elif op == 1:
                del buf[rng.randrange(len(buf) + 1) :]
            else:
                buf[rng.randrange(len(buf) + 1) :] = bytes([0xFF] * rng.randrange(8))
        for parse in (ntfs.unpack_eas, ntfs.parse_reparse, ntfs.describe_sd):
            try:
                parse(bytes(buf))
            except CimFormatError:
                pass


def test_describe_decodes_wsl_eas(tmp_path):
    """`cimfs info` shows the $LX* values decoded; a value of the wrong size stays raw."""
    import cimfs
    from cimfs import FileMetadata, tools

    eas = ntfs.pack_eas(
        [
            ntfs.EaEntry("$LXUID", (1000).to_bytes(4, "little")),
            ntfs.EaEntry("$LXGID", (100).to_bytes(4, "little")),
            ntfs.EaEntry("$LXMOD", (0o20640).to_bytes(4, "little")),
            ntfs.EaEntry("$LXDEV", (4).to_bytes(4, "little") + (64).to_bytes(4, "little")),
            ntfs.EaEntry("USER.X", b"abc"),
        ]
    )
    with cimfs.create(tmp_path, "t.cim") as w:
        w.add_file("tty", b"", FileMetadata(ea_buffer=eas))
    with cimfs.open(tmp_path / "t.cim") as img:
        decoded = {e["name"]: e.get("decoded") for e in tools.describe(img, "tty")["eas"]}
    assert decoded == {"$LXUID": 1000, "$LXGID": 100, "$LXMOD": "20640 (crw-r-----)", "$LXDEV": [4, 64], "USER.X": None}
