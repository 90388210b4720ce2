"""The ``cimfs`` command: build, fork, inspect, verify, extract and mount CimFS images."""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import sys
import tarfile

import click

import cimfs
from . import posix, tools
from .bulk import paused_gc
from .errors import E_INVALIDARG, ERROR_FILE_EXISTS, ERROR_FILE_NOT_FOUND, CimError
from .progress import Progress
from .remote import is_url

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _warn(msg: str) -> None:
    click.echo(f"cimfs: {_one_line(msg)}", err=True)


def _json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _image_location(image: str) -> tuple[str, str]:
    image = os.fspath(image)
    directory, name = os.path.split(os.path.abspath(image))
    if not name:
        raise click.UsageError(f"{image}: an image is a file name")
    return directory, name


def _check_image_exists(path: str) -> None:
    """A missing local image is named before anything else; a URL is checked by opening it."""
    if not is_url(path) and not os.path.exists(path):
        raise CimError(ERROR_FILE_NOT_FOUND, "no such image", path)


@contextlib.contextmanager
def _open_image(path: str):
    _check_image_exists(path)
    with cimfs.open(path) as img:
        yield img


def _image_path_arg(path: str | None) -> str:
    return (path or "").replace("\\", "/").strip("/")


# ===================================================================== group
@click.group(context_settings=CONTEXT)
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


# ===================================================================== create
def _detect_format(fmt: str, tf: tarfile.TarFile) -> str:
    if fmt != "auto":
        return fmt
    try:
        from . import winlayer
    except ImportError:
        return "posix"
    try:
        return "windows-layer" if winlayer.is_windows_layer(tf) else "posix"
    except (tarfile.TarError, EOFError, OSError):
        return "posix"


def _write_options() -> dict:
    """cimfs.create() options of create/fork: consistent images unless
    --no-consistent, times clamped to SOURCE_DATE_EPOCH when it is set."""
    options = {"consistent": click.get_current_context().meta.get("cimfs.consistent", True)}
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None and epoch.strip():
        try:
            seconds = int(epoch.strip())
            if seconds < 0:
                raise ValueError
        except ValueError:
            raise click.UsageError(f"SOURCE_DATE_EPOCH={epoch!r} is not a count of seconds since 1970") from None
        options["clamp_time"] = cimfs.filetime_from_ns(seconds * 1_000_000_000)
    return options


def _remember_consistent(ctx, param, value):
    ctx.meta["cimfs.consistent"] = value


_CONSISTENT_OPTION = click.option(
    "--consistent/--no-consistent", default=True, show_default=True, expose_value=False,
    callback=_remember_consistent,
    help="Write a consistent image (CONSISTENT_CIM): the same input gives the same files, byte for byte and "
         "by name. A POSIX source's atimes and ctimes are not stored (they equal the mtime). "
         "SOURCE_DATE_EPOCH, when set, caps every time.")


def _import_posix(directory, name, base_name, tree, *, mirror: bool, options: dict):
    base_reader = None
    total = tree.total_bytes()
    with Progress(total, "create") as bar:
        with cimfs.create(directory, name, base=base_name, **options) as w:
            if base_name is not None:
                base_reader = cimfs.open(os.path.join(directory, base_name))
            try:
                posix.Importer(w, tree.root, base=base_reader, delete_extra=mirror, progress=bar).run()
            finally:
                if base_reader is not None:
                    base_reader.close()


@cli.command(context_settings=CONTEXT)
@_CONSISTENT_OPTION
@click.argument("src")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--fork-from", "parent", metavar="PARENT.cim",
              help="Make IMAGE a fork of PARENT (same directory) storing only what differs.")
@click.option("--extend", is_flag=True, help="Add SRC into the existing IMAGE in place (merge, nothing deleted).")
@click.option("--format", "fmt", type=click.Choice(["auto", "posix", "windows-layer"]), default="auto",
              show_default=True, help="How to read a tar SRC.")
@click.option("--on-collision", type=click.Choice(["error", "rename", "skip"]), default="error", show_default=True,
              help="Names that differ only in case: fail, rename the later one (name~2), or skip it.")
@click.option("--independent", is_flag=True,
              help="Windows layer tar: convert the layer on its own, to be merged later ('cimfs merge'): "
                   "whiteouts become tombstones, hard links to lower files merge links.")
def create(src, image, parent, extend, fmt, on_collision, independent):
    """Build IMAGE from SRC: a directory, a tar file (any compression), or - for a tar on stdin.

    For a directory or POSIX tar the image mirrors SRC exactly: contents, symlinks,
    hard links, FIFOs, devices, sockets, mode, owner and times (WSL conventions).
    With --fork-from the image is a fork of PARENT that mirrors SRC and stores only
    what the parent chain does not already hold.  A Windows container layer tar is
    applied on top of PARENT (whiteouts included), as container runtimes do.

    \b
    Examples:
      cimfs create ./rootfs base.cim
      cimfs create ./rootfs-v2 v2.cim --fork-from base.cim
      tar -C ./rootfs -c . | cimfs create - base.cim
      cimfs create layer.tar layer.cim --format windows-layer --fork-from base.cim
      cimfs create ./extra base.cim --extend
    """
    directory, name = _image_location(image)
    if extend and parent:
        raise click.UsageError("--extend and --fork-from cannot be combined")
    if independent and (parent or extend):
        raise click.UsageError("--independent makes a layer without a parent: no --fork-from or --extend")
    if independent and fmt == "posix":
        raise click.UsageError("--independent is for Windows layer tars")
    base_name = None
    if parent:
        pdir, pname = _image_location(parent)
        if not os.path.exists(parent):
            raise CimError(ERROR_FILE_NOT_FOUND, "no such image", parent)
        if os.path.realpath(pdir) != os.path.realpath(directory):
            raise click.UsageError(f"{parent}: a fork's parent must be in the same directory as the fork")
        base_name = pname
    if extend:
        if not os.path.exists(image):
            raise CimError(ERROR_FILE_NOT_FOUND, "no such image to extend", image)
        base_name = name
    elif os.path.lexists(image):
        raise CimError(ERROR_FILE_EXISTS, "already exists (remove it with 'cimfs rm' or use --extend)", image)
    if not os.path.isdir(directory):
        raise CimError(ERROR_FILE_NOT_FOUND, "directory does not exist", directory)
    options = _write_options()

    if src != "-" and os.path.isdir(src):
        if independent:
            raise click.UsageError(f"{src}: --independent needs a Windows layer tar")
        if fmt == "windows-layer":
            raise click.UsageError(f"{src}: --format windows-layer needs a tar")
        posix.check_output_outside(src, directory)
        if base_name is None:
            # A new image: written while the directory is scanned (bounded
            # memory; the total is not known up front, so progress counts up).
            # One GC pause from the scan to the tree's release after the
            # commit: in between, the first collection would scan every node.
            with paused_gc(), Progress(0, "create") as bar, cimfs.create(directory, name, **options) as w:
                posix.DirectoryImporter(w, src, on_collision=on_collision, report=_warn, progress=bar).run()
            return
        tree = posix.scan_directory(src, posix.Tree(on_collision, report=_warn))
        _import_posix(directory, name, base_name, tree, mirror=bool(parent), options=options)
        return
    if src != "-" and not os.path.exists(src):
        raise CimError(ERROR_FILE_NOT_FOUND, "no such file or directory", src)
    tf = posix.open_tar(src)
    with tf:
        kind = _detect_format(fmt, tf)
        if kind == "windows-layer":
            from . import winlayer
            with Progress(0, "create") as bar:
                if src == "-":
                    tf.spool.seek(0)
                    winlayer.import_layer(tf.spool, directory, name, parent=base_name, progress=bar,
                                          independent=independent, **options)
                else:
                    winlayer.import_layer(src, directory, name, parent=base_name, progress=bar,
                                          independent=independent, **options)
            return
        if independent:
            raise click.UsageError(f"{src}: --independent needs a Windows layer tar (this is a POSIX tar)")
        label = "stdin" if src == "-" else src
        tree = posix.scan_tar(tf, posix.Tree(on_collision, report=_warn), label)
        _import_posix(directory, name, base_name, tree, mirror=bool(parent), options=options)


# ===================================================================== merge
@cli.command(context_settings=CONTEXT)
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("sources", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--consistent/--no-consistent", default=True, show_default=True,
              help="The same sources give the same OUT, byte for byte (a region set id derived from the "
                   "contents); --no-consistent: a random one.")
def merge(out, sources, consistent):
    """Write OUT, the merged image of SOURCES (top layer first, base last).

    OUT holds only metadata: its file tables point into the sources' region
    files, so all images must be in one directory.  Tombstones hide what is
    below them, merge links become hard links and directories merge.  The
    same sources give the same OUT, byte for byte (unless --no-consistent).

    \b
    Examples:
      cimfs merge merged.cim app.cim runtime.cim base.cim
    """
    directory, name = _image_location(out)
    for src in sources:
        if not os.path.exists(src):
            raise CimError(ERROR_FILE_NOT_FOUND, "no such image", src)
        if os.path.realpath(_image_location(src)[0]) != os.path.realpath(directory):
            raise click.UsageError(f"{src}: the sources of a merged image must be in its directory")
    if os.path.lexists(out):
        raise CimError(ERROR_FILE_EXISTS, "already exists (remove it with 'cimfs rm')", out)
    cimfs.merge(directory, name, [_image_location(s)[1] for s in sources], consistent=consistent)


# ===================================================================== fork
def _split_add(spec: str) -> tuple[str, str | None]:
    if os.path.lexists(spec) or ":" not in spec:
        return spec, None
    src, _, dest = spec.rpartition(":")
    return src, dest


@cli.command(context_settings=CONTEXT)
@_CONSISTENT_OPTION
@click.argument("parent", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@click.option("--add", "adds", multiple=True, metavar="SRC[:IMAGE_PATH]",
              help="Add a local file or directory (default: /<basename of SRC>). A directory is merged into "
                   "IMAGE_PATH. Repeatable.")
@click.option("--delete", "deletes", multiple=True, metavar="IMAGE_PATH",
              help="Delete a file or directory (recursively). Repeatable; applied before the additions.")
@click.option("--on-collision", type=click.Choice(["error", "rename", "skip"]), default="error", show_default=True)
@click.option("--replace", is_flag=True,
              help="Let an addition replace an entry of another kind: a file on the way to IMAGE_PATH becomes a "
                   "directory, a directory becomes a file. Without it that is an error.")
def fork(parent, new, adds, deletes, on_collision, replace):
    """Create NEW as a fork of PARENT plus the given additions and deletions.

    NEW shares PARENT's region files (both must be in one directory) and stores
    only what changed.

    \b
    Examples:
      cimfs fork base.cim app.cim --add ./app:/opt/app
      cimfs fork base.cim slim.cim --delete /usr/share/doc --delete /var/cache
      cimfs fork base.cim v2.cim --add ./motd:/etc/motd
    """
    pdir, pname = _image_location(parent)
    directory, name = _image_location(new)
    if not os.path.exists(parent):
        raise CimError(ERROR_FILE_NOT_FOUND, "no such image", parent)
    if os.path.realpath(pdir) != os.path.realpath(directory):
        raise click.UsageError(f"{new}: a fork must be in the same directory as its parent")
    if os.path.lexists(new):
        raise CimError(ERROR_FILE_EXISTS, "already exists", new)
    plans = []
    for spec in adds:
        src, dest = _split_add(spec)
        if not os.path.lexists(src):
            raise CimError(ERROR_FILE_NOT_FOUND, "no such file or directory", src)
        if dest is None:
            dest = os.path.basename(os.path.normpath(os.path.abspath(src)))
        dest = _image_path_arg(dest)
        if os.path.isdir(src) and not os.path.islink(src):
            tree = posix.scan_directory(src, posix.Tree(on_collision, report=_warn))
            plans.append((tree.root, dest, tree.total_bytes()))
        else:
            if not dest:
                raise click.UsageError(f"{spec}: a file cannot replace the root directory")
            tree = posix.Tree(on_collision, report=_warn)
            node = posix.scan_single(src, tree)
            plans.append((node, dest, node.size))
    total = sum(t for _, _, t in plans)
    options = _write_options()
    with Progress(total, "fork") as bar, cimfs.create(directory, name, base=pname, **options) as w, \
            cimfs.open(os.path.join(directory, pname)) as base:
        hidden = set()
        for d in deletes:
            p = _image_path_arg(d)
            if not p:
                raise click.UsageError("--delete cannot delete the root")
            w.delete(p)
            hidden.add(posix.fold(p))
        for node, dest, _ in plans:
            imp = posix.Importer(w, node, base=base, at=dest, progress=bar, hidden=hidden, replace_kind=replace)
            imp.run()
            hidden |= imp.written_keys()


# ===================================================================== reading
def _entry_json(path: str, st) -> dict:
    info = posix.posix_info(st)
    return {
        "path": path, "name": path.rsplit("/", 1)[-1] if path else "", "file_id": st.file_id, "type": info.kind,
        "mode": f"{info.mode:o}", "mode_string": tools.mode_string(info.mode), "uid": info.uid, "gid": info.gid,
        "nlink": st.nlink, "size": st.size, "attributes": st.attributes,
        "mtime": tools.filetime_iso(st.last_write_time), "last_write_time": st.last_write_time,
        "target": info.target, "rdev": list(info.rdev) if info.kind in ("chr", "blk") else None,
    }


def _long_line(name: str, st) -> str:
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


@cli.command(context_settings=CONTEXT)
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
                rel = p[len(path) + 1:] if path else p
                rows.append((rel, p, cst))
        else:
            for e in img.scandir(path):
                rows.append((e.name, f"{path}/{e.name}" if path else e.name, img.stat(e.file_id, links=links)))
        if as_json:
            _json([_entry_json(p, s) for _, p, s in rows])
            return
        for name, _, s in rows:
            click.echo(_long_line(name, s) if long else name)


@cli.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("path")
def cat(image, path):
    """Write the contents of PATH (or PATH:stream, an alternate data stream) to stdout.

    \b
    Examples:
      cimfs cat base.cim /etc/os-release
      cimfs cat layer.cim 'Files/readme.txt:Zone.Identifier'
    """
    path = path.replace("\\", "/").lstrip("/")
    with _open_image(image) as img:
        fpath, stream = tools.split_stream(path)
        st = img.stat(fpath, links=False)
        if st.is_dir and stream is None:
            raise CimError(E_INVALIDARG, "is a directory", path)
        out = click.get_binary_stream("stdout")
        with img.open(fpath, stream=stream) as f:
            while True:
                buf = f.read(posix.CHUNK)
                if not buf:
                    break
                out.write(buf)
        out.flush()


@cli.command(context_settings=CONTEXT)
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
    labels = {"creation_time": "Created", "last_write_time": "Modified", "change_time": "Changed",
              "last_access_time": "Accessed"}
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


@cli.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def info(image, as_json):
    """Format version, region sets and parents, counts, bytes stored and dedup savings.

    \b
    Example:
      cimfs info app.cim --json
    """
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
    echo(f"Entries:      {c['files']} files, {c['directories']} directories, {c['symlinks']} symlinks, "
         f"{c['special']} special, {c['hard_link_names']} extra hard-link names, {c['alternate_streams']} streams")
    echo(f"Content:      {d['bytes_logical']} bytes")
    if "bytes_unique_content" in d:
        echo(f"Unique:       {d['bytes_unique_content']} bytes (dedup saves {d['dedup_savings']})")
    b = d["bytes_stored"]
    echo(f"Stored:       {b['all_regions']} bytes in region files ({b['all_regions_allocated']} allocated), "
         f"{b['own_regions']} in this image's own set, .cim {b['cim_file']}")


# ===================================================================== extract / export
@cli.command(context_settings=CONTEXT)
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
    import gzip, bz2, lzma  # noqa: E401
    low = out.lower()
    if out == "-":
        raw = click.get_binary_stream("stdout")
        tmp = None
    else:
        directory = os.path.dirname(os.path.abspath(out))
        tmp = os.path.join(directory, f".{os.path.basename(out)}.tmp{os.getpid()}")
        raw = open(tmp, "wb")
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


@cli.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("out")
@click.option("--format", "fmt", type=click.Choice(["posix", "windows-layer"]), default="posix", show_default=True)
@click.option("--independent", is_flag=True,
              help="windows-layer: IMAGE was made with 'create --independent'; write its tombstones as whiteouts "
                   "and its merge links as hard links.")
def export(image, out, fmt, independent):
    """Write IMAGE as a tar (OUT, or - for stdout; .gz/.bz2/.xz compress).

    posix: a PAX tar with every type, mode, owner, time (100 ns) and sparse file.
    windows-layer: a Windows container layer tar (Files/, Hives/).

    \b
    Examples:
      cimfs export base.cim rootfs.tar
      cimfs export layer.cim layer.tar.gz --format windows-layer
    """
    if independent and fmt != "windows-layer":
        raise click.UsageError("--independent goes with --format windows-layer")
    with _open_image(image) as img:
        f, finish = _open_output(out)
        ok = False
        try:
            if fmt == "windows-layer":
                from . import winlayer
                with Progress(0, "export") as bar:
                    winlayer.export_layer(img, f, progress=bar, independent=independent)
                report = None
            else:
                with Progress(0, "export") as bar, \
                        tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tf:
                    if bar.enabled:  # a walk of the image: only for a bar drawn
                        bar.total = posix.Extractor(img, ".").total_bytes()
                    report = posix.export_tar(img, tf, progress=bar, warn=_warn)
            ok = True
        finally:
            finish(ok)
    if report is not None and report.problems:
        sys.exit(1)


# ===================================================================== diff / fsck
@cli.command(context_settings=CONTEXT)
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def diff(a, b, as_json):
    """Paths added (+), removed (-) and changed (M) from A to B; nothing when identical.

    \b
    Example:
      cimfs diff base.cim app.cim
    """
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


@cli.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
def fsck(image):
    """Check every structure of IMAGE and read every byte; exit 1 with findings.

    \b
    Example:
      cimfs fsck app.cim && echo clean
    """
    _check_image_exists(image)
    findings = tools.fsck(image)
    for f in findings:
        click.echo(f"{image}: {f}", err=True)
    if findings:
        sys.exit(1)
    click.echo(f"{image}: ok")


# ===================================================================== rm / gc
@cli.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-n", "--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("-v", "--verbose", is_flag=True, help="List the files removed.")
@click.option("--force", is_flag=True, help="Remove IMAGE even while it is mounted.")
def rm(image, dry_run, verbose, force):
    """Remove IMAGE and the region/object ID files no other image in its directory needs.

    Every file of the directory with a CIM image header counts as an image,
    whatever its name. A mounted IMAGE is refused unless --force.

    \b
    Example:
      cimfs rm old.cim
    """
    removed = tools.rm_image(image, dry_run=dry_run, force=force, warn=_warn)
    if verbose or dry_run:
        for p, _ in removed:
            click.echo(p)


@cli.command(context_settings=CONTEXT)
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("-n", "--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("-v", "--verbose", is_flag=True, help="List the files removed.")
def gc(directory, dry_run, verbose):
    """Remove region/object ID files in DIRECTORY that no image there refers to.

    Every file with a CIM image header is an image, whatever its name; the
    temporary files of commits that were killed are removed too.  In a layer
    store (an import-image STORE_DIR) it removes the layer images and blobs no
    image of the store reaches, then their region files.

    \b
    Example:
      cimfs gc ./images
      cimfs gc ./store
    """
    from . import oci
    if oci.is_store(directory):
        removed = oci.prune(directory, dry_run=dry_run, warn=_warn)
    else:
        removed = tools.gc(directory, dry_run=dry_run, warn=_warn)
    if verbose or dry_run:
        for p, _ in removed:
            click.echo(p)
    if not dry_run:
        click.echo(f"removed {len(removed)} files, {sum(s for _, s in removed)} bytes", err=True)


# ===================================================================== images
@cli.command("import-image", context_settings=CONTEXT)
@click.argument("src")
@click.argument("store_dir", type=click.Path(file_okay=False))
@click.option("--platform", metavar="OS/ARCH[:VERSION]",
              help="Which image of a multi-platform index (default: the only Windows one).")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Threads: with 2 or more, each layer is read, decompressed and verified ahead of its import.")
@click.option("--ref", "reference", metavar="NAME", help="Also name the image NAME in the store.")
@click.option("--independent", is_flag=True,
              help="Each layer an independent image (named by diff ID, shared by any image), plus a merged top.")
@click.option("--json", "as_json", is_flag=True, help="Report layers, digests, chain IDs, bytes, reused/new.")
def import_image(src, store_dir, platform, jobs, reference, independent, as_json):
    """Import a Windows container image into the layer store STORE_DIR.

    SRC is an OCI image layout directory, a `docker save` archive, an OCI
    archive (a layout in a tar), or - for an archive on stdin.  Each layer becomes one image named by its chain ID, a fork
    of the layer below; layers already in the store are reused.  Every blob is
    checked against its digest and every layer against its diff ID while it is
    imported: on a mismatch the store is left as it was.

    \b
    Examples:
      skopeo copy docker://mcr.microsoft.com/windows/nanoserver:ltsc2022 oci:nano
      cimfs import-image nano ./store --jobs 2
      docker save app:1.0 | cimfs import-image - ./store --json
    """
    from . import oci
    stream = click.get_binary_stream("stdin") if src == "-" else src
    report = oci.import_image(stream, store_dir, platform=platform, jobs=jobs, warn=_warn, reference=reference,
                              independent=independent)
    if as_json:
        _json(report)
        return
    new = sum(1 for layer in report["layers"] if layer["status"] == "new")
    click.echo(f"{report['id']} {' '.join(report['refs'])}".rstrip())
    click.echo(f"  {len(report['layers'])} layers ({new} new, {len(report['layers']) - new} reused), "
               f"top {report['top']}")


@cli.command(context_settings=CONTEXT)
@click.argument("store_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def images(store_dir, as_json):
    """List the images in the layer store STORE_DIR.

    \b
    Example:
      cimfs images ./store
    """
    from . import oci
    items = oci.list_images(store_dir)
    if as_json:
        _json(items)
        return
    for rec in items:
        top = os.path.join(os.path.abspath(store_dir), "layers", rec["top"]) if rec.get("top") else "-"
        click.echo(f"{rec['id'][:19]}  {rec.get('platform', '')}  {len(rec.get('layers', []))} layers  "
                   f"{','.join(rec.get('refs') or ['<none>'])}  {top}")


@cli.command(context_settings=CONTEXT)
@click.argument("store_dir", type=click.Path(file_okay=False))
@click.argument("ref")
@click.option("-v", "--verbose", is_flag=True, help="List the layers removed.")
def rmi(store_dir, ref, verbose):
    """Remove REF from the store; with its last name (or a digest) the image and the layers only it used.

    \b
    Example:
      cimfs rmi ./store app:1.0
    """
    from . import oci
    result = oci.remove_image(store_dir, ref)
    if verbose:
        for c in result["removed_layers"]:
            click.echo(c)


@cli.command("export-image", context_settings=CONTEXT)
@click.argument("store_dir", type=click.Path(file_okay=False))
@click.argument("ref")
@click.argument("out")
@click.option("--format", "fmt", type=click.Choice(["oci", "docker-archive"]), default="oci", show_default=True)
@click.option("--compress", type=click.Choice(["gzip", "zstd", "none"]), default=None,
              help="Layer compression [default: gzip for oci, none for docker-archive].")
@click.option("--json", "as_json", is_flag=True)
def export_image(store_dir, ref, out, fmt, compress, as_json):
    """Write image REF of STORE_DIR as an OCI layout directory or a docker archive OUT.

    Each layer holds its own changes (whiteouts for what it removes); the
    output is deterministic (the same digests every time).

    \b
    Examples:
      cimfs export-image ./store app:1.0 ./app-oci
      cimfs export-image ./store app:1.0 app.tar --format docker-archive
    """
    from . import oci
    report = oci.export_image(store_dir, ref, out, fmt=fmt, compress=compress)
    if as_json:
        _json(report)


# ===================================================================== mount
def _mount_options(opts: tuple[str, ...]) -> dict:
    out: dict = {}
    for group in opts:
        for item in filter(None, group.split(",")):
            key, eq, val = item.partition("=")
            key = key.strip()
            try:
                if key in ("uid", "gid"):
                    out[key] = int(val)
                elif key == "umask":
                    out[key] = int(val, 8)
                elif key == "allow_other" and not eq:
                    out["allow_other"] = True
                else:
                    raise click.BadParameter(f"unknown mount option {item!r}", param_hint="-o")
            except ValueError:
                raise click.BadParameter(f"bad value in {item!r}", param_hint="-o") from None
    return out


@cli.command(context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-f", "foreground", is_flag=True, help="Stay in the foreground until unmounted.")
@click.option("-o", "options", multiple=True, metavar="uid=N,gid=N,umask=OOO,allow_other")
@click.option("--engine", type=click.Choice(["fuse", "kernel", "auto"]), default="fuse", show_default=True,
              help="fuse: the FUSE daemon; kernel: an EROFS index over the region files, served by the "
                   "kernel (root only); auto: kernel when it can.")
@click.option("--kernel", "kernel", is_flag=True, help="Same as --engine kernel.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the blocks of a remote IMAGE fetched by reads in this local directory.")
def mount(images, mountpoint, foreground, options, engine, kernel, cache_dir):
    """Mount IMAGE read-only at MOUNTPOINT (FUSE with pyfuse3, or the kernel's EROFS).

    IMAGE may be an fsspec URL (s3://..., https://...): a lazy FUSE mount,
    fetching contents when they are read.

    With several images (top layer first, base last) the merged view of them
    is mounted, as 'cimfs merge' would build it, without writing a merged image
    (with either engine).

    \b
    Examples:
      cimfs mount app.cim /mnt/app
      cimfs mount app.cim /mnt/app -f -o uid=1000,gid=1000,umask=022
      cimfs mount top.cim mid.cim base.cim /mnt/layers
      cimfs mount --kernel app.cim /mnt/app     # root: EROFS, no daemon
      cimfs mount --kernel top.cim base.cim /mnt/layers
      cimfs mount s3://bucket/layers/app.cim /mnt/app --cache-dir ~/.cache/cimfs
    """
    opts = _mount_options(options)
    for image in images:
        _check_image_exists(image)
    if cache_dir is not None:
        opts["cache_dir"] = cache_dir
    try:
        from . import mount as _mount
    except ImportError as e:
        raise CimError(E_INVALIDARG, f"mounting needs the 'mount' extra (pip install cimfs[mount]): {e}",
                       images[0]) from None
    engine = "kernel" if kernel else engine
    if len(images) > 1:
        vid = _mount.mount_merged(list(images), mountpoint, foreground=foreground, engine=engine, **opts)
    else:
        vid = _mount.mount(images[0], mountpoint, foreground=foreground, engine=engine, **opts)
    if vid is not None and not foreground:
        click.echo(str(vid))


@cli.command(context_settings=CONTEXT)
@click.argument("mountpoint", type=click.Path(file_okay=False))
def umount(mountpoint):
    """Unmount a CimFS image mounted at MOUNTPOINT.

    \b
    Example:
      cimfs umount /mnt/app
    """
    try:
        from . import mount as _mount
    except ImportError as e:
        raise CimError(E_INVALIDARG, f"mounting needs the 'mount' extra: {e}", mountpoint) from None
    _mount.unmount(mountpoint)


@cli.command("to-erofs", context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--standalone", is_flag=True, help="Copy all contents in: a self-contained EROFS image.")
@click.option("--block-size", type=click.Choice(["auto", "512", "4096"]), default="auto", show_default=True,
              help="EROFS block size (auto: 512 only when that addresses every object in place).")
@click.option("-o", "options", multiple=True, metavar="uid=N,gid=N,umask=OOO",
              help="Owner and umask of entries without WSL metadata (default: yours, 222).")
def to_erofs(image, out, standalone, block_size, options):
    """Write IMAGE as an EROFS image OUT: by default an index whose file
    contents stay in IMAGE's region files (mount it with each region file
    listed on stderr as a device=), with --standalone a self-contained image.

    \b
    Examples:
      cimfs to-erofs app.cim app.erofs
      cimfs to-erofs --standalone app.cim app.erofs && mount -t erofs -o loop app.erofs /mnt
    """
    from . import erofs
    from .mount.view import Options

    opts = _mount_options(options)
    opts.pop("allow_other", None)
    bits = {"auto": None, "512": 9, "4096": 12}[block_size]
    with _open_image(image) as im:
        info = erofs.write_index(im, out, standalone=standalone, options=Options(**opts), block_bits=bits)
    click.echo(f"{out}: {info['size']} bytes, {info['inodes']} inodes, block size {info['block_size']}, "
               f"{info['in_place_files']} files in place, {info['copied_files']} copied "
               f"({info['copied_bytes']} bytes)", err=True)
    for dev in info["devices"]:
        click.echo(f"device={dev}", err=True)


from .hive_cli import hive  # noqa: E402 - the `hive` group, in its own module
cli.add_command(hive)


# ===================================================================== entry point
def _escape_unprintable(e: UnicodeEncodeError):
    """Bytes a host name could not decode (surrogateescape) go out as they
    were; any other unencodable character -- a lone UTF-16 surrogate in an
    image's name -- as a ``\\udXXX`` escape."""
    chunk = e.object[e.start:e.end]
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
            sys.stdout = None  # type: ignore[assignment]
        code = 1
    except KeyboardInterrupt:
        click.echo("cimfs: interrupted", err=True)
        code = 130
    except OSError as e:
        where = e.filename if e.filename is not None else "cimfs"
        click.echo(f"cimfs: {where}: {_one_line(e.strerror or e)}", err=True)
        code = 1
    except (tarfile.TarError, EOFError) as e:
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


if __name__ == "__main__":  # pragma: no cover
    entry_point()
