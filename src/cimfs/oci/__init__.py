"""Windows container images (OCI image layouts, ``docker save`` archives) in
and out of a content-addressed store of CIM layers (docs/WINDOWS-LAYERS.md,
*Images and the layer store*).

    from cimfs import oci
    report = oci.import_image("ubuntu-oci/", "store")          # or a docker archive, or sys.stdin.buffer
    oci.list_images("store")
    oci.export_image("store", "app:1.0", "out-oci", fmt="oci", compress="gzip")
    oci.remove_image("store", "app:1.0")
    oci.prune("store")                                          # what no image reaches

A client of the public library API and :mod:`cimfs.winlayer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import exports
from .storefiles import is_store

# Loaded on first use (start-up time: `cimfs gc` asks is_store() without them).
_MODULE_OF = {"chain_ids": "blobs", "export_image": "export", "LayerStore": "store"}

if TYPE_CHECKING:  # the names as type checkers see them; at run time __getattr__ loads them
    from .blobs import chain_ids
    from .export import export_image
    from .store import LayerStore


__getattr__, __dir__ = exports(__name__, globals(), _MODULE_OF)


def import_image(
    src, store_dir, *, platform=None, jobs=1, warn=None, progress_stream=None, reference=None, independent=False
) -> dict:
    """Import ``src`` (an OCI layout directory, a docker archive path, or a binary
    stream holding a docker archive) into the store ``store_dir`` (created if
    needed).  Returns a report (layers, digests, chain IDs, bytes, reused/new)."""
    from .store import LayerStore  # start-up time (see above)

    return LayerStore(store_dir, create=True).import_image(
        src,
        platform=platform,
        jobs=jobs,
        warn=warn,
        progress_stream=progress_stream,
        reference=reference,
        independent=independent,
    )


def list_images(store_dir) -> list[dict]:
    from .store import LayerStore  # start-up time (see above)

    return LayerStore(store_dir).images()


def remove_image(store_dir, ref: str) -> dict:
    """Remove a reference; when it was the image's last name (or ``ref`` is a
    digest), the image and every layer no other image uses."""
    from .store import LayerStore  # start-up time (see above)

    return LayerStore(store_dir).remove(ref)


def prune(store_dir, *, dry_run=False, warn=None) -> list[tuple[str, int]]:
    """Remove every layer image and blob that no image of the store reaches (left
    by a killed run of an older cimfs, or by hand), then the region files no layer
    image needs; first ends a killed import (rolled back) or rmi (finished).
    Returns [(path, bytes)] removed, or that would be with ``dry_run``."""
    from .store import LayerStore  # start-up time (see above)

    return LayerStore(store_dir).prune(dry_run=dry_run, warn=warn)


__all__ = [
    "import_image",
    "export_image",
    "list_images",
    "remove_image",
    "prune",
    "is_store",
    "chain_ids",
    "LayerStore",
]
