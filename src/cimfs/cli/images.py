"""The image commands: ``create``, ``fork``, ``merge``, ``rm`` and ``gc`` --
everything that writes or removes an image of a directory.

The library modules are imported inside the commands (start-up time, see
:mod:`cimfs.cli`)."""

from __future__ import annotations

# Function-local imports: a command imports the library modules it uses (start-up time, cli/__init__.py).
import os

import click

import cimfs

from ..bulk import paused_gc
from ..errors import ERROR_FILE_EXISTS, ERROR_FILE_NOT_FOUND, CimError
from ..progress import Progress
from .common import CONTEXT, _image_location, _image_path_arg, _warn


# ===================================================================== create
def _detect_format(fmt: str, tf) -> str:
    import tarfile

    if fmt != "auto":
        return fmt
    try:
        from .. import winlayer
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
    "--consistent/--no-consistent",
    default=True,
    show_default=True,
    expose_value=False,
    callback=_remember_consistent,
    help="Write a consistent image (CONSISTENT_CIM): the same input gives the same files, byte for byte and "
    "by name. A POSIX source's atimes and ctimes are not stored (they equal the mtime). "
    "SOURCE_DATE_EPOCH, when set, caps every time.",
)


# Forking the writer's data processes (multiprocessing's import included)
# costs ~25 ms of start-up: a few small files are copied sooner by this
# process.  The image is the same either way (writer.create's data_process).
_IN_PROCESS_FILES = 256
_IN_PROCESS_BYTES = 8 << 20


def _data_process(roots: list, total_bytes: int) -> bool:
    """Whether the writer's data processes should copy the regular files of the trees below ``roots``."""
    from .. import posix

    if total_bytes > _IN_PROCESS_BYTES:
        return True
    files = 0
    stack = list(roots)
    while stack:
        node = stack.pop()
        files += node.kind == posix.FILE
        if files > _IN_PROCESS_FILES:
            return True
        stack.extend(node.children.values())
    return False


def _import_posix(directory, name, base_name, tree, *, mirror: bool, options: dict):
    from .. import posix

    total = tree.total_bytes()
    options = dict(options, data_process=_data_process([tree.root], total))
    with Progress(total, "create") as bar:
        with cimfs.create(directory, name, base=base_name, **options) as w:
            # the writer's own reader on the base (None without one): no second open of it
            posix.Importer(w, tree.root, base=w.base, delete_extra=mirror, progress=bar).run()


@click.command(context_settings=CONTEXT)
@_CONSISTENT_OPTION
@click.argument("src")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option(
    "--fork-from",
    "parent",
    metavar="PARENT.cim",
    help="Make IMAGE a fork of PARENT (same directory) storing only what differs.",
)
@click.option("--extend", is_flag=True, help="Add SRC into the existing IMAGE in place (merge, nothing deleted).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "posix", "windows-layer"]),
    default="auto",
    show_default=True,
    help="How to read a tar SRC.",
)
@click.option(
    "--on-collision",
    type=click.Choice(["error", "rename", "skip"]),
    default="error",
    show_default=True,
    help="Names that differ only in case: fail, rename the later one (name~2), or skip it.",
)
@click.option(
    "--independent",
    is_flag=True,
    help="Windows layer tar: convert the layer on its own, to be merged later ('cimfs merge'): "
    "whiteouts become tombstones, hard links to lower files merge links.",
)
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
    from .. import posix

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
            from .. import winlayer

            with Progress(0, "create") as bar:
                if src == "-":
                    tf.spool.seek(0)
                    winlayer.import_layer(
                        tf.spool, directory, name, parent=base_name, progress=bar, independent=independent, **options
                    )
                else:
                    winlayer.import_layer(
                        src, directory, name, parent=base_name, progress=bar, independent=independent, **options
                    )
            return
        if independent:
            raise click.UsageError(f"{src}: --independent needs a Windows layer tar (this is a POSIX tar)")
        label = "stdin" if src == "-" else src
        tree = posix.scan_tar(tf, posix.Tree(on_collision, report=_warn), label)
        _import_posix(directory, name, base_name, tree, mirror=bool(parent), options=options)


# ===================================================================== merge
@click.command(context_settings=CONTEXT)
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("sources", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--consistent/--no-consistent",
    default=True,
    show_default=True,
    help="The same sources give the same OUT, byte for byte (a region set id derived from the "
    "contents); --no-consistent: a random one.",
)
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


@click.command(context_settings=CONTEXT)
@_CONSISTENT_OPTION
@click.argument("parent", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@click.option(
    "--add",
    "adds",
    multiple=True,
    metavar="SRC[:IMAGE_PATH]",
    help="Add a local file or directory (default: /<basename of SRC>). A directory is merged into "
    "IMAGE_PATH. Repeatable.",
)
@click.option(
    "--delete",
    "deletes",
    multiple=True,
    metavar="IMAGE_PATH",
    help="Delete a file or directory (recursively). Repeatable; applied before the additions.",
)
@click.option("--on-collision", type=click.Choice(["error", "rename", "skip"]), default="error", show_default=True)
@click.option(
    "--replace",
    is_flag=True,
    help="Let an addition replace an entry of another kind: a file on the way to IMAGE_PATH becomes a "
    "directory, a directory becomes a file. Without it that is an error.",
)
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
    from .. import posix

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
    options["data_process"] = _data_process([node for node, _, _ in plans], total)
    with Progress(total, "fork") as bar, cimfs.create(directory, name, base=pname, **options) as w:
        base = w.base  # the writer's own reader on the parent: opening it a second time costs start-up time
        listings: dict = {}  # the parent's directories folded once for all the --add (see Importer)
        hidden = set()
        for d in deletes:
            p = _image_path_arg(d)
            if not p:
                raise click.UsageError("--delete cannot delete the root")
            w.delete(p)
            hidden.add(posix.fold(p))
        for node, dest, _ in plans:
            imp = posix.Importer(
                w, node, base=base, at=dest, progress=bar, hidden=hidden, replace_kind=replace, listings=listings
            )
            imp.run()
            hidden |= imp.written_keys()


# ===================================================================== rm / gc
@click.command(context_settings=CONTEXT)
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
    from .. import tools

    removed = tools.rm_image(image, dry_run=dry_run, force=force, warn=_warn)
    if verbose or dry_run:
        for p, _ in removed:
            click.echo(p)


@click.command(context_settings=CONTEXT)
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
    from ..oci.storefiles import is_store

    if is_store(directory):
        from .. import oci

        removed = oci.prune(directory, dry_run=dry_run, warn=_warn)
    else:
        from .. import tools

        removed = tools.gc(directory, dry_run=dry_run, warn=_warn)
    if verbose or dry_run:
        for p, _ in removed:
            click.echo(p)
    if not dry_run:
        click.echo(f"removed {len(removed)} files, {sum(s for _, s in removed)} bytes", err=True)


COMMANDS = (create, fork, merge, rm, gc)
