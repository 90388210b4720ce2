"""The reading commands: ``ls``, ``cat``, ``stat``, ``info``, ``diff``, ``fsck``,
``extract`` and ``export`` -- everything that reads an image and changes none.

The library modules are imported inside the commands (start-up time, see
:mod:`cimfs.cli`): ``cimfs cat`` loads the reader and nothing else."""

from __future__ import annotations

# Function-local imports: a command imports the library modules it uses (start-up time, cli/__init__.py).
import contextlib
import os
import sys

import click

from ..errors import E_INVALIDARG, CimError
from ..progress import Progress
from .common import CONTEXT, _check_image_exists, _image_path_arg, _json, _open_image, _warn

_CAT_CHUNK = 1 << 20  # cat copies in the unit the library reads and copies file data in (posix.CHUNK)


# ===================================================================== reading
def _entry_json(path: str, st) -> dict:
    from .. import posix, tools

    info = posix.posix_info(st)
    return {
        "path": path,
        "name": path.rsplit("/", 1)[-1] if path else "",
        "file_id": st.file_id,
        "type": info.kind,
        "mode": f"{info.mode:o}",
        "mode_string": tools.mode_string(info.mode),
        "uid": info.uid,
        "gid": info.gid,
        "nlink": st.nlink,
        "size": st.size,
        "attributes": st.attributes,
        "mtime": tools.filetime_iso(st.last_write_time),
        "last_write_time": st.last_write_time,
        "target": info.target,
        "rdev": list(info.rdev) if info.kind in ("chr", "blk") else None,
    }


def _long_line(name: str, st) -> str:
    from .. import posix, tools

    info = posix.posix_info(st)
    if info.kind in ("chr", "blk"):
        size = f"{info.rdev[0]}, {info.rdev[1]}"
    elif info.kind == "symlink" and info.target is not None:
        size = str(len(info.target.encode("utf-8", "cimfs-escape")))
    else:
        size = str(st.size)
    when = tools.filetime_iso(st.last_write_time)[:19].replace("T", " ")
    line = f"{tools.mode_string(info.mode)} {st.nlink:>3} {info.uid:>5} {info.gid:>5} {size:>10} {when} {name}"
    if info.target is not None:
        line += f" -> {info.target}".replace("\0", "\\0")
    return line


@click.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("path", required=False, default="")
@click.option("-l", "long", is_flag=True, help="Long listing: mode, links, owner, size, time, name.")
@click.option("-R", "recursive", is_flag=True, help="List everything below PATH (paths relative to PATH).")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
def ls(image, path, long, recursive, as_json):
    """List the entries of a directory in IMAGE (the root by default).

    \b
    Examples:
      cimfs ls base.cim
      cimfs ls base.cim /etc -l
      cimfs ls base.cim -R --json
    """
    from .. import tools

    path = _image_path_arg(path)
    # Link counts cost a walk of the whole tree (the format keeps none): only
    # for the outputs that show them (on a remote image, a fetch of every directory).
    links = long or as_json
    with _open_image(image) as img:
        st = img.stat(path, links=links)
        rows = []
        if not st.is_dir:
            rows.append((path.rsplit("/", 1)[-1], path, st))
        elif recursive:
            for p, fid, cst in tools.iter_entries(img, path):
                if p == path:
                    continue
                rel = p[len(path) + 1 :] if path else p
                rows.append((rel, p, cst))
        else:
            for e in img.scandir(path):
                rows.append((e.name, f"{path}/{e.name}" if path else e.name, img.stat(e.file_id, links=links)))
        if as_json:
            _json([_entry_json(p, s) for _, p, s in rows])
            return
        for name, _, s in rows:
            click.echo(_long_line(name, s) if long else name)


@click.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("path")
def cat(image, path):
    """Write the contents of PATH (or PATH:stream, an alternate data stream) to stdout.

    \b
    Examples:
      cimfs cat base.cim /etc/os-release
      cimfs cat layer.cim 'Files/readme.txt:Zone.Identifier'
    """
    from ..names import split_stream

    path = path.replace("\\", "/").lstrip("/")
    with _open_image(image) as img:
        fpath, stream = split_stream(path)
        st = img.stat(fpath, links=False)
        if st.is_dir and stream is None:
            raise CimError(E_INVALIDARG, "is a directory", path)
        out = click.get_binary_stream("stdout")
        with img.open(fpath, stream=stream) as f:
            while True:
                buf = f.read(_CAT_CHUNK)
                if not buf:
                    break
                out.write(buf)
        out.flush()


@click.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("path")
@click.option("--json", "as_json", is_flag=True)
def stat(image, path, as_json):
    """Show every field of PATH: attributes, times, EAs, reparse data, security descriptor, streams.

    \b
    Examples:
      cimfs stat base.cim /bin/sh
      cimfs stat layer.cim Files/Windows --json
    """
    import json

    from .. import tools

    path = _image_path_arg(path)
    with _open_image(image) as img:
        d = tools.describe(img, path)
    if as_json:
        _json(d)
        return
    echo = click.echo
    echo(f"  Path: {d['path']}")
    echo(f"  Type: {d['type']}    FileID: {d['file_id']}    Parent FileID: {d['parent_file_id']}")
    echo(f"  Size: {d['size']}    Links: {d['nlink']}    Sparse stream: {d['is_sparse']}")
    echo(f"Attributes: {d['attributes']:#x} {' '.join(d['attribute_names'])}")
    p = d["posix"]
    extra = f"    Device: {p['rdev'][0]},{p['rdev'][1]}" if p["rdev"] else ""
    echo(f"  Mode: {p['mode_string']} ({p['mode']})    Uid: {p['uid']}    Gid: {p['gid']}{extra}")
    if p["target"] is not None:
        echo(f"Target: {p['target']}")
    labels = {
        "creation_time": "Created",
        "last_write_time": "Modified",
        "change_time": "Changed",
        "last_access_time": "Accessed",
    }
    for k, label in labels.items():
        t = d["times"][k]
        echo(f"{label:>9}: {t['iso']} ({t['filetime']})")
    sd = d["security_descriptor"]
    if sd:
        echo(f"Security descriptor ({sd['length']} bytes): {sd.get('sddl', '?')}")
        if "decoded" in sd:
            for line in json.dumps(sd["decoded"], indent=2, default=str).splitlines():
                echo(f"    {line}")
        if "error" in sd:
            echo(f"    error: {sd['error']}")
    else:
        echo("Security descriptor: none")
    if isinstance(d["eas"], dict):
        echo(f"EAs: undecodable ({d['eas']['error']})")
    elif d["eas"]:
        echo("EAs:")
        for ea in d["eas"]:
            dec = f" = {ea['decoded']}" if "decoded" in ea else ""
            echo(f"    {ea['name']} (flags {ea['flags']:#x}): {ea['value_hex']}{dec}")
    rp = d["reparse"]
    if rp:
        echo(f"Reparse: tag {rp['tag']} ({rp['tag_name']}), {rp['length']} bytes")
        for k in ("target", "substitute_name", "print_name", "relative", "data_hex", "error"):
            if k in rp:
                echo(f"    {k}: {rp[k]}")
    if d["streams"]:
        echo("Streams:")
        for s in d["streams"]:
            echo(f"    {s['name']}: {s['size']} bytes")


@click.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def info(image, as_json):
    """Format version, region sets and parents, counts, bytes stored and dedup savings.

    \b
    Example:
      cimfs info app.cim --json
    """
    from .. import tools

    with _open_image(image) as img:
        d = tools.image_info(img)
    if as_json:
        _json(d)
        return
    echo = click.echo
    echo(f"Image:        {d.get('path', image)}")
    echo(f"Version:      {d.get('version')}")
    rs = d.get("region_set", {})
    echo(f"Region set:   {rs.get('id')} ({rs.get('count')} region files)")
    parents = d.get("parent_region_sets", [])
    echo(f"Parents:      {len(parents)}")
    for p in parents:
        echo(f"  {p['id']} ({p['count']} region files)")
    c = d["counts"]
    echo(
        f"Entries:      {c['files']} files, {c['directories']} directories, {c['symlinks']} symlinks, "
        f"{c['special']} special, {c['hard_link_names']} extra hard-link names, {c['alternate_streams']} streams"
    )
    echo(f"Content:      {d['bytes_logical']} bytes")
    if "bytes_unique_content" in d:
        echo(f"Unique:       {d['bytes_unique_content']} bytes (dedup saves {d['dedup_savings']})")
    b = d["bytes_stored"]
    echo(
        f"Stored:       {b['all_regions']} bytes in region files ({b['all_regions_allocated']} allocated), "
        f"{b['own_regions']} in this image's own set, .cim {b['cim_file']}"
    )


# ===================================================================== extract / export
@click.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.argument("path", required=False, default="")
def extract(image, dest, path):
    """Extract IMAGE (or PATH inside it) into DEST, restoring POSIX metadata.

    Ownership and device nodes are restored when run as root.  Nothing is ever
    created or written outside DEST, whatever names or links the image holds.

    \b
    Examples:
      cimfs extract base.cim ./rootfs
      cimfs extract base.cim ./etc-copy /etc
    """
    from .. import posix

    path = _image_path_arg(path)
    with _open_image(image) as img:
        ex = posix.Extractor(img, dest, warn=_warn)
        with Progress(0, "extract") as bar:
            if bar.enabled:  # the total costs a walk of the image (~0.9 s for 60 000 files): only for a bar drawn
                bar.total = ex.total_bytes(path)
            ex.progress = bar
            report = ex.run(path)
    if report.problems:
        sys.exit(1)


def _open_output(out: str):
    """(binary file, finish(ok)) writing OUT atomically, compressed by its suffix."""
    import bz2
    import gzip
    import io
    import lzma

    low = out.lower()
    if out == "-":
        raw = click.get_binary_stream("stdout")
        tmp = None
    else:
        directory = os.path.dirname(os.path.abspath(out))
        tmp = os.path.join(directory, f".{os.path.basename(out)}.tmp{os.getpid()}")
        raw = open(tmp, "wb")
    f: io.BufferedIOBase | None
    if low.endswith((".gz", ".tgz")):
        f = gzip.GzipFile(fileobj=raw, mode="wb")
    elif low.endswith((".bz2", ".tbz2")):
        f = bz2.BZ2File(raw, "wb")
    elif low.endswith((".xz", ".txz")):
        f = lzma.LZMAFile(raw, "wb")
    else:
        f = None

    def finish(ok: bool) -> None:
        try:
            if f is not None:
                f.close()
            raw.flush()
            if tmp is not None:
                raw.close()
        finally:
            if tmp is not None:
                if ok:
                    os.replace(tmp, out)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)

    return (f or raw), finish


@click.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("out")
@click.option("--format", "fmt", type=click.Choice(["posix", "windows-layer"]), default="posix", show_default=True)
@click.option(
    "--independent",
    is_flag=True,
    help="windows-layer: IMAGE was made with 'create --independent'; write its tombstones as whiteouts "
    "and its merge links as hard links.",
)
def export(image, out, fmt, independent):
    """Write IMAGE as a tar (OUT, or - for stdout; .gz/.bz2/.xz compress).

    posix: a PAX tar with every type, mode, owner, time (100 ns) and sparse file.
    windows-layer: a Windows container layer tar (Files/, Hives/).

    \b
    Examples:
      cimfs export base.cim rootfs.tar
      cimfs export layer.cim layer.tar.gz --format windows-layer
    """
    import tarfile

    from .. import posix

    if independent and fmt != "windows-layer":
        raise click.UsageError("--independent goes with --format windows-layer")
    with _open_image(image) as img:
        f, finish = _open_output(out)
        ok = False
        try:
            if fmt == "windows-layer":
                from .. import winlayer

                with Progress(0, "export") as bar:
                    winlayer.export_layer(img, f, progress=bar, independent=independent)
                report = None
            else:
                with Progress(0, "export") as bar, tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tf:
                    if bar.enabled:  # a walk of the image: only for a bar drawn
                        bar.total = posix.Extractor(img, ".").total_bytes()
                    report = posix.export_tar(img, tf, progress=bar, warn=_warn)
            ok = True
        finally:
            finish(ok)
    if report is not None and report.problems:
        sys.exit(1)


# ===================================================================== diff / fsck
@click.command(context_settings=CONTEXT)
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def diff(a, b, as_json):
    """Paths added (+), removed (-) and changed (M) from A to B; nothing when identical.

    \b
    Example:
      cimfs diff base.cim app.cim
    """
    from .. import tools

    with _open_image(a) as ia, _open_image(b) as ib:
        d = tools.diff_images(ia, ib)
    if as_json:
        _json(d)
        return
    for p in d["added"]:
        click.echo(f"+ {p}")
    for p in d["removed"]:
        click.echo(f"- {p}")
    for c in d["changed"]:
        click.echo(f"M {c['path']} ({', '.join(c['fields'])})")


@click.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
def fsck(image):
    """Check every structure of IMAGE and read every byte; exit 1 with findings.

    \b
    Example:
      cimfs fsck app.cim && echo clean
    """
    from .. import tools

    _check_image_exists(image)
    findings = tools.fsck(image)
    for f in findings:
        click.echo(f"{image}: {f}", err=True)
    if findings:
        sys.exit(1)
    click.echo(f"{image}: ok")


COMMANDS = (ls, cat, stat, info, diff, fsck, extract, export)
