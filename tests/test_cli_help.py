"""``cimfs --help`` and every command's ``--help`` stay as recorded in
tests/cli_help.txt (recorded from the single-module cli.py before it became
the cimfs.cli package).

A deliberate change of a help text (or a new command) is recorded again with
``python tests/test_cli_help.py --update``; review the diff of cli_help.txt.
"""

from __future__ import annotations

import os
import subprocess
import sys

RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli_help.txt")
ENV = dict(os.environ, COLUMNS="80")  # the width a pipe gets by default, pinned


def _help(*args: str) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", *args, "--help"], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert p.returncode == 0 and not p.stderr, p.stderr
    return p.stdout


def _commands(main_help: str) -> list[str]:
    lines = main_help.split("\nCommands:\n", 1)[1].splitlines()
    return [ln.split()[0] for ln in lines if ln.startswith("  ") and ln.strip()]


def help_texts() -> str:
    main = _help()
    parts = [f"==== cimfs --help\n{main}"]
    parts += [f"==== cimfs {c} --help\n{_help(c)}" for c in _commands(main)]
    return "".join(parts)


def test_help_unchanged():
    with open(RECORD, encoding="utf-8") as f:
        recorded = f.read()
    now = help_texts()
    if now != recorded:
        import difflib

        diff = "".join(difflib.unified_diff(recorded.splitlines(True), now.splitlines(True), "recorded", "now"))
        raise AssertionError(f"the help differs from {RECORD} (if meant: python {__file__} --update):\n{diff}")


def test_record_covers_every_command():
    import click

    from cimfs.cli import cli

    with open(RECORD, encoding="utf-8") as f:
        recorded = f.read()
    names = cli.list_commands(click.Context(cli))
    assert len(names) >= 20
    for name in names:
        assert f"==== cimfs {name} --help\n" in recorded, name


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        with open(RECORD, "w", encoding="utf-8") as f:
            f.write(help_texts())
        print(f"wrote {RECORD}")
    else:
        sys.exit(f"usage: python {sys.argv[0]} --update")
