"""Start-up: each ``cimfs`` command imports only what it uses (issue 23).

The commands run in a fresh interpreter with ``-X importtime``; what they
loaded is read from ``sys.modules`` at their end (``importlib.import_module``,
which the lazy loaders use, is not reported by ``-X importtime``) and compared
with what the bare interpreter loads (a site hook may load zlib or lzma
itself).  The heavy list was chosen by their ``-X importtime`` cost or by what
they drag in; no time is asserted.
"""

from __future__ import annotations

import array
import json
import os
import subprocess
import sys

import pytest

import cimfs
from cimfs.names import NameFolder

# The library's own modules no start-up may load, and the standard or extra
# modules that cost a millisecond or more each (or load OpenSSL, ctypes, fork
# machinery) -- what the heavy commands need, not what --version needs.
HEAVY_CIMFS = [
    "cimfs.reader",
    "cimfs.writer",
    "cimfs.writetree",
    "cimfs.writeedit",
    "cimfs.writefiles",
    "cimfs.writestream",
    "cimfs.store",
    "cimfs.storeregions",
    "cimfs.parentindex",
    "cimfs.storecopy",
    "cimfs.dataprocess",
    "cimfs.commit",
    "cimfs.merged",
    "cimfs.win32",
    "cimfs.tools",
    "cimfs.remote",
    "cimfs.oci.store",
    "cimfs.oci.sources",
    "cimfs.winlayer",
    "cimfs.mount",
    "cimfs.erofs",
    "cimfs.posix.extract",
    "cimfs.posix.entries",
    "cimfs.posix.filewriters",
    "cimfs.posix.importer",
    "cimfs.posix.scan",
    "cimfs.posix.tar",
    "cimfs.posix.lx",
    "cimfs.layout.cim",
    "cimfs.layout.ntfs",
    "cimfs.fsspec_cim",
    "cimfs.workers",
    "cimfs.regf.reader",
    "cimfs.regf.writer",
    "cimfs.regf.merge",
]
HEAVY_OTHER = [
    "tarfile",
    "lzma",
    "bz2",
    "zlib",
    "gzip",
    "mmap",
    "hashlib",
    "_hashlib",
    "secrets",
    "json",
    "multiprocessing",
    "ctypes",
    "dataclasses",
    "fsspec",
    "pyfuse3",
    "trio",
    "zstandard",
]

_REPORT = "import sys, json\nprint('\\nMODULES ' + json.dumps(sorted(sys.modules)), file=sys.stderr)\n"


def _loaded(code: str, env=None) -> tuple[set[str], str]:
    """The modules that ``code`` leaves in sys.modules, and the -X importtime report."""
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code + "\n" + _REPORT],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    line = [x for x in p.stderr.splitlines() if x.startswith("MODULES ")][-1]
    return set(json.loads(line[len("MODULES ") :])), p.stderr


@pytest.fixture(scope="module")
def bare() -> set[str]:
    """What the interpreter loads before any of our code (site hooks included)."""
    return _loaded("pass")[0]


def _command(*args: str) -> str:
    """Python code running ``cimfs ARGS`` to its end without leaving the process."""
    return (
        f"import sys\nsys.argv = ['cimfs'] + {list(args)!r}\nfrom cimfs.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\nsys.stdout.flush()\n"
    )


def _assert_light(loaded: set[str], bare: set[str], report: str, allowed=()) -> None:
    heavy = sorted(m for m in (HEAVY_CIMFS + HEAVY_OTHER) if m in loaded - bare and m not in allowed)
    heavy += sorted(m for m in loaded - bare if m.startswith("cimfs.oci.") or m.startswith("cimfs.mount."))
    costs = [
        ln
        for ln in report.splitlines()
        if ln.startswith("import time:") and any(ln.rstrip().endswith(" " + m) for m in heavy)
    ]
    assert not heavy, f"imported at start-up: {heavy}\n" + "\n".join(costs)


def test_import_cli_is_light(bare):
    loaded, report = _loaded("import cimfs.cli")
    _assert_light(loaded, bare, report)
    assert "click" in loaded and "cimfs.cli.common" in loaded  # the check itself sees imports
    assert not {m for m in loaded if m.startswith("cimfs.cli.")} - {"cimfs.cli.common"}  # no family yet


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["cat", "--help"], ["create", "--help"]])
def test_version_and_help_are_light(bare, args):
    loaded, report = _loaded(_command(*args))
    _assert_light(loaded, bare, report)


def test_import_cimfs_is_light(bare):
    loaded, report = _loaded("import cimfs")
    _assert_light(loaded, bare, report)
    assert not {m for m in loaded - bare if m.startswith("click")}


def test_cat_loads_no_writer(bare, tmp_path):
    data = bytes(range(256)) * 41
    with cimfs.create(str(tmp_path), "t.cim") as w:
        w.mkdir("d")
        w.add_file("d\\small.bin", data)
    out = tmp_path / "out"
    code = _command("cat", str(tmp_path / "t.cim"), "d/small.bin").replace(
        "sys.argv", f"sys.stdout = open({str(out)!r}, 'w')\nsys.argv", 1
    )
    loaded, report = _loaded(code)
    assert out.read_bytes() == data
    # cat reads: the reader and the modules the reader is made of
    _assert_light(
        loaded,
        bare,
        report,
        allowed={"cimfs.reader", "cimfs.remote", "cimfs.layout.cim", "cimfs.layout.ntfs", "mmap", "dataclasses"},
    )
    assert "cimfs.reader" in loaded
    assert {m for m in loaded if m.startswith("cimfs.cli.")} == {"cimfs.cli.common", "cimfs.cli.reading"}


def test_families_table_matches_the_modules():
    """Every command of every family module is in cimfs.cli.FAMILIES, under its own module, and runs."""
    import importlib

    import click

    from cimfs.cli import FAMILIES, cli

    for family, names in FAMILIES.items():
        module = importlib.import_module(f"cimfs.cli.{family}")
        assert sorted(c.name for c in module.COMMANDS) == sorted(names), family
        for c in module.COMMANDS:
            assert cli.get_command(click.Context(cli), c.name) is c
    assert cli.get_command(click.Context(cli), "no-such-command") is None


def test_gc_loads_no_tar_or_worker_machinery(bare, tmp_path):
    loaded, report = _loaded(_command("gc", str(tmp_path)))
    assert "cimfs.tools" in loaded and "cimfs.writer" in loaded  # the writers' lock
    for m in (
        "tarfile",
        "cimfs.posix.extract",
        "cimfs.posix.scan",
        "cimfs.oci.store",
        "cimfs.winlayer",
        "cimfs.mount",
        "multiprocessing",
    ):
        assert m not in loaded - bare, m


def test_fork_of_a_directory_loads_no_tar_or_worker_machinery(bare, tmp_path):
    src = tmp_path / "add"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.txt").write_bytes(b"file %d\n" % i * (i + 1))
    img = tmp_path / "img"
    img.mkdir()
    with cimfs.create(str(img), "t.cim") as w:
        w.add_file("old.txt", b"old")
    loaded, report = _loaded(_command("fork", str(img / "t.cim"), str(img / "f.cim"), "--add", str(src)))
    with cimfs.open(str(img / "f.cim")) as im:
        assert im.read_bytes("old.txt") == b"old"
        assert [im.read_bytes(f"add/f{i}.txt") for i in range(3)] == [b"file %d\n" % i * (i + 1) for i in range(3)]
    assert "cimfs.writer" in loaded and "cimfs.posix.scan" in loaded
    for m in (
        "tarfile",
        "cimfs.posix.scantar",
        "cimfs.tarbounds",
        "cimfs.remote_fetch",
        "ctypes",
        "hmac",
        "multiprocessing",
    ):
        assert m not in loaded - bare, m


# ------------------------------------------------------------ lazy packages
def test_every_public_name_of_cimfs():
    import importlib

    for name in cimfs.__all__:
        module = importlib.import_module(f"cimfs.{cimfs._MODULE_OF[name]}")
        assert getattr(cimfs, name) is getattr(module, name), name
        assert name in dir(cimfs)
    assert set(cimfs.__all__) == set(cimfs._MODULE_OF)
    from cimfs import CimWriteStream  # noqa: F401
    from cimfs import open as cim_open

    assert cim_open is cimfs.open
    assert cimfs.posix.fold("abc") == "ABC"  # a submodule by attribute, as when __init__ imported everything
    with pytest.raises(AttributeError):
        _ = cimfs.no_such_name
    with pytest.raises(ImportError):
        from cimfs import no_such_name  # noqa: F401


def test_every_name_of_posix():
    from cimfs import posix

    for name in posix.__all__:
        assert getattr(posix, name) is not None
        assert name in dir(posix)
    from cimfs.posix import Extractor, _write_sparse  # noqa: F401
    from cimfs.posix.extract import Extractor as direct

    assert Extractor is direct
    with pytest.raises(AttributeError):
        _ = posix.no_such_name


def _full_map(table: bytes) -> dict[int, int]:
    units = array.array("H")
    units.frombytes(table)
    return {i: u for i, u in enumerate(units) if i != u}


def test_upcase_map_built_on_first_use():
    from cimfs.layout.cim import load_upcase_table

    table = load_upcase_table()
    folder = NameFolder(table)
    assert folder._map is None
    assert folder.key("Readme.TXT") == "README.TXT" and folder._map is None  # ASCII: no map needed
    assert folder.key("straße_é") == "STRAßE_É"
    assert folder._map == _full_map(table)
    # a table that changes the first and last unit and a whole block
    odd = bytearray(table)
    odd[0:2] = (5).to_bytes(2, "little")
    odd[-2:] = (0x41).to_bytes(2, "little")
    odd[0x4000 * 2 : 0x4100 * 2] = bytes(0x200)
    f = NameFolder(bytes(odd))
    assert f.key("\x00\uffff\u4001é") == "\x05A\x00É"
    assert f._map == _full_map(bytes(odd))


def test_cli_module_runs(tmp_path):
    """``python -m cimfs.cli`` and the console script's target are the same program."""
    env = dict(os.environ, COLUMNS="80")
    a = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "--version"], capture_output=True, text=True, env=env, timeout=60
    )
    b = subprocess.run(
        [sys.executable, "-c", "from cimfs.cli import entry_point; entry_point()", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout == f"cimfs, version {cimfs.__version__}\n"


@pytest.mark.parametrize("exc", ["tar", "cim"])
def test_failures_print_one_line(capsys, exc):
    """The error printing of cimfs.cli.common: a tar error (tarfile imported by the command) and a
    CimError each end the program with one 'cimfs: ...' line and status 1."""
    import click

    from cimfs.cli import cli, main
    from cimfs.errors import E_INVALIDARG, CimError

    @click.command("raise-for-test")
    def raiser():
        import tarfile

        raise {"tar": tarfile.ReadError("bad  tar\nheader"), "cim": CimError(E_INVALIDARG, "broken", "x.cim")}[exc]

    cli.add_command(raiser)
    try:
        with pytest.raises(SystemExit) as e:
            main(["raise-for-test"])
    finally:
        cli.commands.pop("raise-for-test")
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("cimfs: ") and err.count("\n") == 1, err
    assert {"tar": "bad tar header", "cim": "broken"}[exc] in err


@pytest.mark.parametrize("package", ["cimfs", "cimfs.posix"])
def test_type_checking_imports_match_the_lazy_table(package):
    """What type checkers see (the TYPE_CHECKING imports) is what __getattr__ serves, module for module."""
    import ast
    import importlib

    module = importlib.import_module(package)
    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    seen = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.level == 1
                seen.update({alias.name: imp.module for alias in imp.names})
    public = {name: mod for name, mod in module._MODULE_OF.items() if not name.startswith("_")}
    assert seen == public
