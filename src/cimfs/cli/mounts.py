"""The mount commands: ``mount``, ``umount`` and ``to-erofs`` -- serving an
image as a file system (FUSE or the kernel's EROFS) and writing its EROFS index.

The library modules are imported inside the commands (start-up time, and the
FUSE binding is an optional dependency: the 'mount' extra; see :mod:`cimfs.cli`)."""

from __future__ import annotations

# Function-local imports: a command imports the library modules it uses (start-up time, cli/__init__.py).
import click

from ..errors import E_INVALIDARG, CimError
from .common import CONTEXT, _check_image_exists, _open_image


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


@click.command(context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-f", "foreground", is_flag=True, help="Stay in the foreground until unmounted.")
@click.option("-o", "options", multiple=True, metavar="uid=N,gid=N,umask=OOO,allow_other")
@click.option(
    "--engine",
    type=click.Choice(["fuse", "kernel", "auto"]),
    default="fuse",
    show_default=True,
    help="fuse: the FUSE daemon; kernel: an EROFS index over the region files, served by the "
    "kernel (root only); auto: kernel when it can.",
)
@click.option("--kernel", "kernel", is_flag=True, help="Same as --engine kernel.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep the blocks of a remote IMAGE fetched by reads in this local directory.",
)
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
        from .. import mount as _mount
    except ImportError as e:
        raise CimError(
            E_INVALIDARG, f"mounting needs the 'mount' extra (pip install cimfs[mount]): {e}", images[0]
        ) from None
    engine = "kernel" if kernel else engine
    if len(images) > 1:
        vid = _mount.mount_merged(list(images), mountpoint, foreground=foreground, engine=engine, **opts)
    else:
        vid = _mount.mount(images[0], mountpoint, foreground=foreground, engine=engine, **opts)
    if vid is not None and not foreground:
        click.echo(str(vid))


@click.command(context_settings=CONTEXT)
@click.argument("mountpoint", type=click.Path(file_okay=False))
def umount(mountpoint):
    """Unmount a CimFS image mounted at MOUNTPOINT.

    \b
    Example:
      cimfs umount /mnt/app
    """
    try:
        from .. import mount as _mount
    except ImportError as e:
        raise CimError(E_INVALIDARG, f"mounting needs the 'mount' extra: {e}", mountpoint) from None
    _mount.unmount(mountpoint)


@click.command("to-erofs", context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--standalone", is_flag=True, help="Copy all contents in: a self-contained EROFS image.")
@click.option(
    "--block-size",
    type=click.Choice(["auto", "512", "4096"]),
    default="auto",
    show_default=True,
    help="EROFS block size (auto: 512 only when that addresses every object in place).",
)
@click.option(
    "-o",
    "options",
    multiple=True,
    metavar="uid=N,gid=N,umask=OOO",
    help="Owner and umask of entries without WSL metadata (default: yours, 222).",
)
def to_erofs(image, out, standalone, block_size, options):
    """Write IMAGE as an EROFS image OUT: by default an index whose file
    contents stay in IMAGE's region files (mount it with each region file
    listed on stderr as a device=), with --standalone a self-contained image.

    \b
    Examples:
      cimfs to-erofs app.cim app.erofs
      cimfs to-erofs --standalone app.cim app.erofs && mount -t erofs -o loop app.erofs /mnt
    """
    from .. import erofs
    from ..mount.view import Options

    opts = _mount_options(options)
    opts.pop("allow_other", None)
    bits = {"auto": None, "512": 9, "4096": 12}[block_size]
    with _open_image(image) as im:
        info = erofs.write_index(im, out, standalone=standalone, options=Options(**opts), block_bits=bits)
    click.echo(
        f"{out}: {info['size']} bytes, {info['inodes']} inodes, block size {info['block_size']}, "
        f"{info['in_place_files']} files in place, {info['copied_files']} copied "
        f"({info['copied_bytes']} bytes)",
        err=True,
    )
    for dev in info["devices"]:
        click.echo(f"device={dev}", err=True)


COMMANDS = (mount, umount, to_erofs)
