"""What every ``cimfs`` command shares: the group itself, the context settings,
warnings and JSON output, finding and opening the IMAGE argument, and the
program's end -- every failure printed as one ``cimfs: ...`` line with an exit
status, never a traceback.

Like the family modules, this one imports only click and the light modules at
the top (see :mod:`cimfs.cli`).
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import os
import sys

import click

import cimfs

from ..errors import ERROR_FILE_NOT_FOUND, CimError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _warn(msg: str) -> None:
    click.echo(f"cimfs: {_one_line(msg)}", err=True)


def _json(obj) -> None:
    import json  # start-up time: only the --json outputs need it

    click.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _image_location(image: str) -> tuple[str, str]:
    image = os.fspath(image)
    directory, name = os.path.split(os.path.abspath(image))
    if not name:
        raise click.UsageError(f"{image}: an image is a file name")
    return directory, name


def _check_image_exists(path: str) -> None:
    """A missing local image is named before anything else; a URL is checked by opening it."""
    from ..remote import is_url  # start-up time: the remote reader is only for the commands that read

    if not is_url(path) and not os.path.exists(path):
        raise CimError(ERROR_FILE_NOT_FOUND, "no such image", path)


@contextlib.contextmanager
def _open_image(path: str):
    _check_image_exists(path)
    with cimfs.open(path) as img:
        yield img


def _image_path_arg(path: str | None) -> str:
    return (path or "").replace("\\", "/").strip("/")


# ===================================================================== the group
class FamilyGroup(click.Group):
    """A group whose commands are loaded with their family module when first
    asked for: ``cimfs cat`` loads :mod:`.reading` only, ``--version`` none
    (``--help`` lists them all, so it loads every family)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.families: dict[str, str] = {}  # command name -> the module defining it (with a COMMANDS tuple)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(self.families))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = self.families.get(cmd_name)
        if cmd_name not in self.commands and module is not None:
            for command in importlib.import_module(module).COMMANDS:
                self.add_command(command)
        return super().get_command(ctx, cmd_name)


@click.group(cls=FamilyGroup, context_settings=CONTEXT)
@click.version_option(cimfs.__version__, "-V", "--version", prog_name="cimfs")
def cli() -> None:
    """Build, fork, inspect, verify, extract and mount CimFS images.

    \b
    Examples:
      cimfs create ./rootfs base.cim           # a directory or tar as an image
      cimfs create layer.tar.gz img.cim        # any tar compression Python reads
      cimfs fork base.cim app.cim --add ./app:/opt/app --delete /tmp
      cimfs ls app.cim /opt -lR
      cimfs cat app.cim /etc/hostname
      cimfs extract app.cim ./out
      cimfs diff base.cim app.cim
    """


# ===================================================================== the end
def _escape_unprintable(e: UnicodeError) -> tuple[str | bytes, int]:
    """Bytes a host name could not decode (surrogateescape) go out as they
    were; any other unencodable character -- a lone UTF-16 surrogate in an
    image's name -- as a ``\\udXXX`` escape."""
    assert isinstance(e, UnicodeEncodeError)  # the handler is used for encoding only
    chunk = e.object[e.start : e.end]
    if all(0xDC80 <= ord(c) <= 0xDCFF for c in chunk):
        return codecs.lookup_error("surrogateescape")(e)
    return codecs.lookup_error("backslashreplace")(e)


codecs.register_error("cimfs-escape", _escape_unprintable)


def _tolerant_output() -> None:
    """Names in an image may hold a lone UTF-16 surrogate (NTFS allows it),
    which no encoding can print: the command must write it escaped, not end
    with a UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(Exception):
                reconfigure(errors="cimfs-escape")


def _is_tar_error(e: BaseException) -> bool:
    # tarfile is imported by the commands that read or write tars; when it was
    # never imported, no tar error can have been raised.
    tarfile = sys.modules.get("tarfile")
    return isinstance(e, EOFError) or (tarfile is not None and isinstance(e, tarfile.TarError))


def main(argv: list[str] | None = None) -> None:
    _tolerant_output()
    try:
        rv = cli.main(args=argv, prog_name="cimfs", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except click.exceptions.Abort:
        click.echo("cimfs: aborted", err=True)
        code = 1
    except CimError as e:
        click.echo(f"cimfs: {_one_line(e)}", err=True)
        code = 1
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = None
        code = 1
    except KeyboardInterrupt:
        click.echo("cimfs: interrupted", err=True)
        code = 130
    except OSError as e:
        where = e.filename if e.filename is not None else "cimfs"
        click.echo(f"cimfs: {where}: {_one_line(e.strerror or e)}", err=True)
        code = 1
    except Exception as e:
        if not _is_tar_error(e):
            raise
        click.echo(f"cimfs: {_one_line(e)}", err=True)
        code = 1
    sys.exit(code)


def entry_point() -> None:
    """The ``cimfs`` program: :func:`main`, then the process ends at once.
    Tearing the interpreter down would free, one by one, every object the
    command built just before the system frees them all (a 60 000-file
    create: ~70 ms of 1.6 s).  Output is flushed first; the data processes
    and mounts have been waited for by the command itself."""
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                code = code or 1
        os._exit(code)
