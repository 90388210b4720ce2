"""The ``cimfs hive`` command group: list a registry hive's keys and values
(``ls``), write them as regedit's ``.reg`` text (``export``), and flatten a
base hive with differencing hives (``merge``).

A HIVE argument is a local file, a URL (fsspec, as the other read commands
take), or with ``--image IMAGE`` a path inside a CIM image, read through the
library without extracting.  Errors are the ``cimfs: ...`` line of
:func:`cimfs.cli.main`.

The hive package, the image reader and fsspec are imported inside the
commands (start-up time: the module is loaded whenever `cimfs hive` runs).
"""

from __future__ import annotations

# Function-local imports in this module defer the library (start-up time), as the package docstring says.
import os

import click

from ..errors import E_INVALIDARG, ERROR_FILE_NOT_FOUND, CimError, hresult_from_oserror
from .common import CONTEXT

MAX_DEPTH = 512  # keys nested deeper than this are refused (as the reader's walk does)
BRIEF = 60  # characters of a value's data shown by `hive ls`
# Default .reg roots by hive file name (Hives\<X>_BASE / _DELTA, config\<X>).
_ROOTS = {
    "SYSTEM": "HKEY_LOCAL_MACHINE\\SYSTEM",
    "SOFTWARE": "HKEY_LOCAL_MACHINE\\SOFTWARE",
    "SAM": "HKEY_LOCAL_MACHINE\\SAM",
    "SECURITY": "HKEY_LOCAL_MACHINE\\SECURITY",
    "DEFAULT": "HKEY_USERS\\.DEFAULT",
    "DEFAULTUSER": "HKEY_USERS\\.DEFAULT",
}

image_option = click.option(
    "--image",
    "image",
    metavar="IMAGE",
    help="Read HIVE (a path like Hives/SOFTWARE_BASE) inside this CIM image (a path or URL).",
)


# ------------------------------------------------------------------ reading a hive
def _dumps(obj, **kw) -> str:
    import json  # start-up time: `cimfs --help` loads this module

    return json.dumps(obj, **kw)


def _read_url(url: str) -> bytes:
    from ..remote import storage_error

    try:
        import fsspec

        with fsspec.open(url, "rb") as f:
            return f.read()
    except ImportError:
        raise CimError(E_INVALIDARG, "reading a URL needs fsspec (pip install cimfs[remote])", url) from None
    except Exception as e:  # noqa: BLE001 - every backend's own errors become the library's
        raise storage_error(e, url, "cannot read the hive") from None


def _read_in_image(image: str, path: str) -> bytes:
    import cimfs

    from ..remote import is_url  # start-up time: loaded by the command that needs it

    if not is_url(image) and not os.path.exists(image):
        raise CimError(ERROR_FILE_NOT_FOUND, "no such image", image)
    inner = path.replace("/", "\\").strip("\\")
    with cimfs.open(image) as img:
        st = img.stat(inner)
        if st.is_dir:
            raise CimError(E_INVALIDARG, "is a directory, not a hive", f"{image}:{path}")
        with img.open(inner) as f:
            return f.read()


def open_hive_arg(hive: str, image: str | None):
    """The hive named by a HIVE argument (and ``--image``), labelled for error messages."""
    from .. import regf
    from ..remote import is_url

    if image:
        return regf.open_hive(_read_in_image(image, hive), name=f"{image}:{hive}")
    if is_url(hive):
        return regf.open_hive(_read_url(hive), name=hive)
    if not os.path.exists(hive):
        raise CimError(ERROR_FILE_NOT_FOUND, "no such file", hive)
    if os.path.isdir(hive):
        raise CimError(E_INVALIDARG, "is a directory, not a hive", hive)
    return regf.open_hive(hive)


def _find_key(h, key: str | None):
    return h.key(key or "")


def _default_prefix(hive_arg: str, h) -> str:
    stem = hive_arg.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].rsplit("::", 1)[-1]
    up = stem.upper()
    for suffix in ("_BASE", "_DELTA"):
        if up.endswith(suffix):
            up = up[: -len(suffix)]
    return _ROOTS.get(up, f"HKEY_LOCAL_MACHINE\\{stem or h.root.name}")


# ------------------------------------------------------------------ showing values
def _type_name(type_: int) -> str:
    from ..regf import REG_TYPE_NAMES

    return REG_TYPE_NAMES.get(type_, f"REG_0x{type_:x}")


def _strings(data: bytes) -> list[str]:
    text = (
        data.decode("utf-16-le", "surrogatepass")
        if len(data) % 2 == 0
        else data[:-1].decode("utf-16-le", "surrogatepass")
    )
    parts = text.split("\0")
    while parts and parts[-1] == "":
        parts.pop()
    return parts


def value_data(type_: int, data: bytes):
    """The data in JSON terms: text for the string types, a list for REG_MULTI_SZ,
    a number for a 4-byte DWORD or 8-byte QWORD, else lowercase hex."""
    try:
        if type_ in (1, 2, 6):  # REG_SZ, REG_EXPAND_SZ, REG_LINK
            s = _strings(data)
            return s[0] if s else ""
        if type_ == 7:  # REG_MULTI_SZ
            return _strings(data)
    except UnicodeDecodeError:
        pass
    if type_ == 4 and len(data) == 4:
        return int.from_bytes(data, "little")
    if type_ == 5 and len(data) == 4:
        return int.from_bytes(data, "big")
    if type_ == 11 and len(data) == 8:
        return int.from_bytes(data, "little")
    return data.hex()


def _is_text(type_: int, data: bytes) -> bool:
    if type_ not in (1, 2, 6, 7):
        return False
    try:
        _strings(data)
    except UnicodeDecodeError:
        return False
    return True


def _brief(type_: int, data: bytes) -> str:
    v = value_data(type_, data)
    if isinstance(v, int):
        text = f"0x{v:0{len(data) * 2}x} ({v})"
    elif _is_text(type_, data):
        text = _dumps(v, ensure_ascii=False)
    else:
        text = v
    return text if len(text) <= BRIEF else text[: BRIEF - 3] + "..."


def _when(ft: int) -> str:
    from ..tools import filetime_iso

    return filetime_iso(ft)[:19].replace("T", " ")


def _layer_marks(key) -> str:
    from ..regf import LAYER_SEMANTICS_NAMES

    marks = [LAYER_SEMANTICS_NAMES.get(key.layer_semantics, str(key.layer_semantics))]
    if key.inherit_class:
        marks.append("inherit-class")
    return "[" + ",".join(marks) + "]"


def _key_row(key, layered: bool, long: bool) -> str:
    name = key.name + "\\"
    if not long:
        return name
    cols = [_when(key.last_written)]
    if layered:
        cols.append(_layer_marks(key))
    cls = key.class_name
    if cls:
        cols.append(f"class={_dumps(cls, ensure_ascii=False)}")
    return "  ".join(cols + [name])


def _value_row(v, layered: bool, long: bool) -> str:
    name = "(default)" if v.name == "" else _dumps(v.name, ensure_ascii=False)
    if v.tombstone:
        return f"{name}  [tombstone]"
    return f"{name}  {_type_name(v.type)}  {v.size}  {_brief(v.type, v.data)}"


def _key_json(key, path: str, layered: bool) -> dict:
    from ..regf import LAYER_SEMANTICS_NAMES
    from ..tools import filetime_iso

    d = {
        "kind": "key",
        "path": path,
        "name": key.name,
        "subkeys": key.subkey_count,
        "values": key.value_count,
        "class": key.class_name,
        "last_written": filetime_iso(key.last_written),
        "last_written_filetime": key.last_written,
    }
    if layered:
        d["layer_semantics"] = LAYER_SEMANTICS_NAMES.get(key.layer_semantics, key.layer_semantics)
        d["inherit_class"] = key.inherit_class
    return d


def _value_json(v, key_path: str) -> dict:
    d = {
        "kind": "value",
        "key": key_path,
        "name": v.name,
        "type": _type_name(v.type),
        "type_id": v.type,
        "size": v.size,
        "tombstone": v.tombstone,
    }
    d["data"] = None if v.tombstone else value_data(v.type, v.data)
    return d


def _subtree(key, path: str, label: str):
    """(path, key) of ``key`` and every key below it, pre-order in stored order;
    refuses cycles and nesting deeper than 512 (``label`` names the hive)."""
    seen = set()
    stack = [(path, key, 0)]
    while stack:
        p, k, depth = stack.pop()
        if k.offset in seen:
            raise CimError(E_INVALIDARG, f"key {p!r} is reached twice (a cycle in the key lists)", label)
        seen.add(k.offset)
        yield p, k
        if k.subkey_count:
            if depth >= MAX_DEPTH:
                raise CimError(E_INVALIDARG, f"keys nested deeper than {MAX_DEPTH} under {p!r}", label)
            stack.extend((f"{p}\\{c.name}" if p else c.name, c, depth + 1) for c in reversed(k.subkeys()))


# ------------------------------------------------------------------ the commands
@click.group("hive", context_settings=CONTEXT)
def hive() -> None:
    """Registry hives: list keys and values, export .reg text, merge differencing hives.

    HIVE is a hive file, a URL, or with --image a path inside a CIM image.
    """


@hive.command("ls", context_settings=CONTEXT)
@click.argument("hive_path", metavar="HIVE")
@click.argument("key", required=False, default="")
@click.option(
    "-l",
    "long",
    is_flag=True,
    help="Long listing: last-written time, class, and for a differencing hive the layer semantics and tombstones.",
)
@click.option("-R", "recursive", is_flag=True, help="List every key below KEY too.")
@click.option("--json", "as_json", is_flag=True, help="JSON output (everything -l shows).")
@image_option
def ls(hive_path, key, long, recursive, as_json, image):
    """List the subkeys (ending in \\) and values of KEY (the root by default).

    A value shows as: name (or "(default)"), type, size in bytes, data in brief.

    \b
    Examples:
      cimfs hive ls SOFTWARE 'Microsoft\\Windows NT\\CurrentVersion'
      cimfs hive ls --image app.cim Hives/SOFTWARE_BASE Microsoft -l
      cimfs hive ls https://example.com/layer/system_Delta -R --json
    """
    with open_hive_arg(hive_path, image) as h:
        top = _find_key(h, key)
        layered = h.layered
        base = top.path
        keys = _subtree(top, base, h.name) if recursive else [(base, top)]
        if as_json:
            rows = []
            for path, k in keys:
                if recursive or path == base:
                    rows.extend(_value_json(v, path) for v in k.values())
                if recursive:
                    if path != base:
                        rows.append(_key_json(k, path, layered))
                else:
                    rows.extend(_key_json(c, f"{path}\\{c.name}" if path else c.name, layered) for c in k.subkeys())
            click.echo(_dumps(rows, indent=2, ensure_ascii=False))
            return
        first = True
        for path, k in keys:
            if recursive:
                if not first:
                    click.echo("")
                click.echo(f"{path or '.'}:")
            first = False
            for c in k.subkeys():
                if layered and not long and c.layer_semantics == 1:  # a tombstone key: a deletion, shown with -l
                    continue
                click.echo(_key_row(c, layered, long))
            for v in k.values():
                if v.tombstone and not long:
                    continue
                click.echo(_value_row(v, layered, long))


@hive.command("export", context_settings=CONTEXT)
@click.argument("hive_path", metavar="HIVE")
@click.argument("key", required=False, default="")
@click.option("-o", "out", default="-", metavar="OUT.reg", help="Output file (default: stdout).")
@click.option(
    "--prefix",
    metavar="ROOT",
    help="The path the hive's root stands for (default from the file name: HKEY_LOCAL_MACHINE\\SOFTWARE "
    "for SOFTWARE, SOFTWARE_BASE, ...; HKEY_USERS\\.DEFAULT for DEFAULT).",
)
@click.option(
    "--encoding",
    type=click.Choice(["utf-16", "utf-8"]),
    default="utf-16",
    show_default=True,
    help="utf-16: UTF-16LE with a byte order mark, as regedit writes; utf-8: the same text in UTF-8.",
)
@image_option
def export(hive_path, key, out, prefix, encoding, image):
    """Write KEY (the root by default) and everything below it as .reg text
    ("Windows Registry Editor Version 5.00", as regedit exports).

    \b
    Examples:
      cimfs hive export SOFTWARE -o software.reg
      cimfs hive export --image app.cim Hives/SYSTEM_BASE 'ControlSet001\\Services' --encoding utf-8
    """
    from ..regf import regtext

    with open_hive_arg(hive_path, image) as h:
        top = _find_key(h, key)
        root = (prefix if prefix is not None else _default_prefix(hive_path, h)).rstrip("\\")
        full = f"{root}\\{top.path}" if top.path else root
        chunks = regtext.encode(regtext.export_lines(top, full, h.name), encoding)
        if out == "-":
            stream = click.get_binary_stream("stdout")
            for c in chunks:
                stream.write(c)
            stream.flush()
            return
        data = b"".join(chunks)  # the walk may still fail on a damaged hive: nothing is written then
    _write_file(out, data)


def _write_file(out: str, data: bytes) -> None:
    from ..atomic import replacing

    try:
        with replacing(out) as tmp, open(tmp, "xb") as f:
            f.write(data)
    except OSError as e:
        if isinstance(e, CimError):
            raise
        raise CimError(hresult_from_oserror(e), f"cannot write: {e.strerror or e}", out) from None


@hive.command("merge", context_settings=CONTEXT)
@click.argument("base", metavar="BASE")
@click.argument("deltas", metavar="DELTA...", nargs=-1, required=True)
@click.option("-o", "out", required=True, metavar="OUT", help="The flattened hive to write.")
@image_option
def merge(base, deltas, out, image):
    """Flatten BASE with the differencing hives DELTA... (oldest first, as
    hcsshim's ORMergeHives([base, delta])) into a plain hive OUT.

    \b
    Examples:
      cimfs hive merge SOFTWARE_BASE SOFTWARE_DELTA -o SOFTWARE
      cimfs hive merge --image app.cim Hives/SYSTEM_BASE Hives/System_Delta -o SYSTEM
    """
    from .. import regf

    base_hive = open_hive_arg(base, image)
    opened = [base_hive]
    try:
        for d in deltas:
            opened.append(open_hive_arg(d, image))
        data = regf.merge(base_hive, opened[1:])
    finally:
        for h in opened:
            h.close()
    _write_file(out, data)


COMMANDS = (hive,)
