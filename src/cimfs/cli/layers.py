"""The layer store commands: ``import-image``, ``images``, ``rmi`` and
``export-image`` -- container images kept as layer images in a store directory
(:mod:`cimfs.oci`).

The library modules are imported inside the commands (start-up time, see
:mod:`cimfs.cli`)."""

from __future__ import annotations

# Function-local imports: a command imports the library modules it uses (start-up time, cli/__init__.py).
import os

import click

from .common import CONTEXT, _json, _warn


@click.command("import-image", context_settings=CONTEXT)
@click.argument("src")
@click.argument("store_dir", type=click.Path(file_okay=False))
@click.option(
    "--platform",
    metavar="OS/ARCH[:VERSION]",
    help="Which image of a multi-platform index (default: the only Windows one).",
)
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="With 2 or more, a second process reads, decompresses, verifies and parses the layers ahead of their import.",
)
@click.option("--ref", "reference", metavar="NAME", help="Also name the image NAME in the store.")
@click.option(
    "--independent",
    is_flag=True,
    help="Each layer an independent image (named by diff ID, shared by any image), plus a merged top.",
)
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
    from .. import oci

    stream = click.get_binary_stream("stdin") if src == "-" else src
    report = oci.import_image(
        stream, store_dir, platform=platform, jobs=jobs, warn=_warn, reference=reference, independent=independent
    )
    if as_json:
        _json(report)
        return
    new = sum(1 for layer in report["layers"] if layer["status"] == "new")
    click.echo(f"{report['id']} {' '.join(report['refs'])}".rstrip())
    click.echo(
        f"  {len(report['layers'])} layers ({new} new, {len(report['layers']) - new} reused), top {report['top']}"
    )


@click.command(context_settings=CONTEXT)
@click.argument("store_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def images(store_dir, as_json):
    """List the images in the layer store STORE_DIR.

    \b
    Example:
      cimfs images ./store
    """
    from .. import oci

    items = oci.list_images(store_dir)
    if as_json:
        _json(items)
        return
    for rec in items:
        top = os.path.join(os.path.abspath(store_dir), "layers", rec["top"]) if rec.get("top") else "-"
        click.echo(
            f"{rec['id'][:19]}  {rec.get('platform', '')}  {len(rec.get('layers', []))} layers  "
            f"{','.join(rec.get('refs') or ['<none>'])}  {top}"
        )


@click.command(context_settings=CONTEXT)
@click.argument("store_dir", type=click.Path(file_okay=False))
@click.argument("ref")
@click.option("-v", "--verbose", is_flag=True, help="List the layers removed.")
def rmi(store_dir, ref, verbose):
    """Remove REF from the store; with its last name (or a digest) the image and the layers only it used.

    \b
    Example:
      cimfs rmi ./store app:1.0
    """
    from .. import oci

    result = oci.remove_image(store_dir, ref)
    if verbose:
        for c in result["removed_layers"]:
            click.echo(c)


@click.command("export-image", context_settings=CONTEXT)
@click.argument("store_dir", type=click.Path(file_okay=False))
@click.argument("ref")
@click.argument("out")
@click.option("--format", "fmt", type=click.Choice(["oci", "docker-archive"]), default="oci", show_default=True)
@click.option(
    "--compress",
    type=click.Choice(["gzip", "zstd", "none"]),
    default=None,
    help="Layer compression [default: gzip for oci, none for docker-archive].",
)
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
    from .. import oci

    report = oci.export_image(store_dir, ref, out, fmt=fmt, compress=compress)
    if as_json:
        _json(report)


COMMANDS = (import_image, images, rmi, export_image)
