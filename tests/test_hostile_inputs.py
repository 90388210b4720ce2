"""Issue 17, writer and input side: hostile tars, self-referencing sources,
CLI arguments.  Every failure is a CimError from the API and one line with
exit status 1 from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import cimfs
from cimfs.errors import CimError


def cli(*args, check=True, input=None):
    p = subprocess.run([sys.executable, "-m", "cimfs.cli", *map(str, args)], capture_output=True, input=input)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def one_line_error(p) -> str:
    err = p.stderr.decode("utf-8", "replace").strip()
    assert p.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("where", [".", "sub", "sub/deeper"])
def test_create_refuses_an_image_inside_its_source(tmp_path, where):
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "file").write_bytes(b"x" * 100000)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    p = cli("create", src, src / where / "x.cim", check=False)
    assert "inside the source directory" in one_line_error(p)
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
    # through a symlink to the source too
    os.symlink(src, tmp_path / "alias")
    p = cli("create", tmp_path / "alias", src / where / "y.cim", check=False)
    assert "inside the source directory" in one_line_error(p)
    # beside it is fine, and a sibling whose name starts like SRC's is not inside
    (tmp_path / "src2").mkdir()
    cli("create", src, tmp_path / "src2" / "ok.cim")
    with cimfs.open(tmp_path / "src2" / "ok.cim") as img:
        assert sorted(e.name for e in img.scandir(img.root_id)) == ["file", "sub"]
