"""A merged view's private directory, and errors told in the user's terms.

Mounting a merged view (FUSE or kernel engine) first writes the merged image
of the sources into a private directory in the runtime directory, next to
links to the sources and their region files; the engines remove it once
they hold what they need.  Errors met inside that directory name paths the
user never saw: :func:`in_user_terms` names the sources instead.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from ..errors import E_INVALIDARG, ERROR_FILE_NOT_FOUND, CimError, CimFormatError
from ..merged import merge
from ..reader import Image, find_region_file
from .registry import registry_dir


def merged_view(paths: list) -> tuple[str, str]:
    """A private directory holding the merged image of ``paths`` (top first):
    links to each source ``.cim`` and to every region file they list (sources
    may live in different directories), and the merged image's own metadata
    region.  Returns (directory, merged .cim path).  Its region files are
    links: open it with ``Image(path, private_links=True)`` (the directory is
    made 0700 by mkdtemp, so only the caller made them)."""
    if not paths:
        raise CimError(E_INVALIDARG, "a merged mount needs at least one image")
    directory = tempfile.mkdtemp(prefix="merged-", dir=registry_dir())
    try:
        names = []
        for i, p in enumerate(paths):
            src = os.path.abspath(os.fspath(p))
            if not os.path.isfile(src):
                raise CimError(ERROR_FILE_NOT_FOUND, "image not found", src)
            name = f"layer{i}.cim"
            os.symlink(src, os.path.join(directory, name))
            with Image(src) as img:
                for region, _ in img.region_names:
                    link = os.path.join(directory, region)
                    if os.path.lexists(link):
                        continue  # a set shared by a fork chain
                    assert img.directory is not None  # a local image's
                    found = find_region_file(img.directory, region)
                    if found is None:
                        raise CimFormatError(f"region file {region} is missing", src)
                    # The reader (private_links) follows this link one level and opens the
                    # source's region file, in its real directory, with O_NOFOLLOW.
                    os.symlink(found, link)
            names.append(name)
        return directory, merge(directory, "merged.cim", names, sync=False)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def in_user_terms(e: CimError, paths: list) -> CimError:
    """``e`` with every path inside a merged view's private directory (gone
    by now, and never the user's) replaced by the source it stands for:
    ``layerN.cim`` by the N-th source, a region file by the source's own, the
    merged image by the source whose region file the reason names (else the
    top source)."""
    sources = [os.path.abspath(os.fspath(p)) for p in paths]
    sep = re.escape(os.sep)
    private = re.compile(re.escape(os.path.join(registry_dir(), "merged-")) + f"[^{sep}]+{sep}([^{sep}\\s:]+)")

    def owner(region: str) -> str | None:
        """The first source (top first) listing region file ``region``."""
        for src in sources:
            try:
                with Image(src) as img:
                    if any(n == region for n, _ in img.region_names):
                        return src
            except CimError:
                continue
        return None

    def source_of(match: re.Match) -> str:
        name = match.group(1)
        layer = re.fullmatch(r"layer(\d+)\.cim", name)
        if layer and int(layer.group(1)) < len(sources):
            return sources[int(layer.group(1))]
        if name.lower().startswith("region_"):
            src = owner(name)
            found = src and find_region_file(os.path.dirname(src), name)
            return found or match.group(0)
        named = re.search(r"region file (\S+)", e.strerror or "")
        return (named and owner(named.group(1))) or sources[0]

    if isinstance(e.filename, str):
        e.filename = private.sub(source_of, e.filename)
    if isinstance(e.strerror, str):
        e.strerror = private.sub(source_of, e.strerror)
    return e
