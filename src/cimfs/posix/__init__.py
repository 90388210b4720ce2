"""POSIX trees and tars <-> CimFS images, with WSL's conventions (spec §18).

A CIM has no Unix mode, owner or special files; WSL stores them as EAs
(``$LXUID``, ``$LXGID``, ``$LXMOD``, ``$LXDEV``) and reparse points (LX symlink,
FIFO, character/block device, socket).  This package maps a POSIX tree (a
directory or a tar) onto those conventions when importing, and back when
extracting or exporting.  It is a client of the public library API only.
One module per concern; every public name is re-exported here:

* :mod:`.names` -- WSL name escaping, name checks, ``fold``, time conversions;
* :mod:`.lx` -- file kinds, reparse tags, ``$LX*`` metadata both ways (``PosixInfo``);
* :mod:`.scan` -- ``Tree``/``Node``, scanning a directory;
* :mod:`.scantar` -- opening and scanning a tar;
* :mod:`.importer` -- ``Importer`` and ``DirectoryImporter``;
* :mod:`.extract` -- ``Extractor``: the walk of an extraction;
* :mod:`.entries` -- making one entry on disk (files, directories, links,
  nodes, their metadata);
* :mod:`.filewriters` -- the forked processes that create the plain files;
* :mod:`.tar` -- ``export_tar``.

Conventions this package chooses (documented in docs/CLI.md):

* times: last write = mtime, change = ctime, last access = atime, creation =
  the tar's ``LIBARCHIVE.creationtime`` if any, else mtime; 100 ns precision.
* names: characters a CIM name cannot hold (``\\ : * ? " < > |`` and 1-31) are
  stored as U+F000 + the character, as WSL does; extraction maps them back.
* a file with holes is stored with the SPARSE_FILE attribute; extraction and
  export keep SPARSE_FILE files sparse (zero runs become holes).
* extraction never follows a link while creating anything: every directory is
  opened relative to its parent with O_NOFOLLOW, every file created with
  O_EXCL|O_NOFOLLOW, and the children of an entry that is a link in the image
  (an LX or NT symlink or a mount point that is also a directory) are skipped.
"""

from typing import TYPE_CHECKING

from ..lazy import exports

# The names are loaded from their module on first use (PEP 562): a reading
# command that needs ``posix_info`` does not pay for the tar reader or the
# extractor (start-up time, tests/test_startup.py).
_EXPORTS = {
    "extract": ("SPARSE_BLOCK", "ExtractReport", "Extractor"),
    "entries": ("_write_sparse",),  # private: the tests reach it here
    "filewriters": ("_FileWriters",),  # private: the tests reach it here
    "importer": ("DirectoryImporter", "Importer", "check_output_outside", "write_node"),
    "lx": (
        "BLK",
        "CHR",
        "DIR",
        "FIFO",
        "FILE",
        "FMT_OF_KIND",
        "SOCK",
        "SPECIAL_TAGS",
        "SYMLINK",
        "TAG_AF_UNIX",
        "TAG_LX_BLK",
        "TAG_LX_CHR",
        "TAG_LX_FIFO",
        "TAG_LX_SYMLINK",
        "TAG_MOUNT_POINT",
        "TAG_SYMLINK",
        "PosixInfo",
        "metadata_matches",
        "node_metadata",
        "plain_file_metadata",
        "posix_info",
    ),
    "names": (
        "FILETIME_UNIX_EPOCH",
        "check_image_name",
        "filetime_to_ns",
        "fold",
        "format_pax_time",
        "name_from_image",
        "name_to_image",
        "ns_to_filetime",
        "parse_pax_time",
    ),
    "scan": (
        "CHUNK",
        "Node",
        "Tree",
        "free_name",
        "open_node",
        "resolve_collision",
        "scan_directory",
        "scan_single",
    ),
    "scantar": ("TAR_READ_ERRORS", "members", "open_tar", "scan_tar"),
    "tar": ("export_tar",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:  # the names as type checkers see them; at run time __getattr__ loads them
    from .extract import SPARSE_BLOCK, Extractor, ExtractReport
    from .importer import DirectoryImporter, Importer, check_output_outside, write_node
    from .lx import (
        BLK,
        CHR,
        DIR,
        FIFO,
        FILE,
        FMT_OF_KIND,
        SOCK,
        SPECIAL_TAGS,
        SYMLINK,
        TAG_AF_UNIX,
        TAG_LX_BLK,
        TAG_LX_CHR,
        TAG_LX_FIFO,
        TAG_LX_SYMLINK,
        TAG_MOUNT_POINT,
        TAG_SYMLINK,
        PosixInfo,
        metadata_matches,
        node_metadata,
        plain_file_metadata,
        posix_info,
    )
    from .names import (
        FILETIME_UNIX_EPOCH,
        check_image_name,
        filetime_to_ns,
        fold,
        format_pax_time,
        name_from_image,
        name_to_image,
        ns_to_filetime,
        parse_pax_time,
    )
    from .scan import (
        CHUNK,
        Node,
        Tree,
        free_name,
        open_node,
        resolve_collision,
        scan_directory,
        scan_single,
    )
    from .scantar import TAR_READ_ERRORS, members, open_tar, scan_tar
    from .tar import export_tar


__getattr__, __dir__ = exports(__name__, globals(), _MODULE_OF)


__all__ = [
    "BLK",
    "CHR",
    "CHUNK",
    "DIR",
    "FIFO",
    "FILE",
    "FILETIME_UNIX_EPOCH",
    "FMT_OF_KIND",
    "SOCK",
    "SPARSE_BLOCK",
    "SPECIAL_TAGS",
    "SYMLINK",
    "TAG_AF_UNIX",
    "TAG_LX_BLK",
    "TAG_LX_CHR",
    "TAG_LX_FIFO",
    "TAG_LX_SYMLINK",
    "TAG_MOUNT_POINT",
    "TAG_SYMLINK",
    "TAR_READ_ERRORS",
    "DirectoryImporter",
    "ExtractReport",
    "Extractor",
    "Importer",
    "Node",
    "PosixInfo",
    "Tree",
    "check_image_name",
    "check_output_outside",
    "export_tar",
    "filetime_to_ns",
    "fold",
    "format_pax_time",
    "free_name",
    "members",
    "metadata_matches",
    "name_from_image",
    "name_to_image",
    "node_metadata",
    "ns_to_filetime",
    "open_node",
    "open_tar",
    "parse_pax_time",
    "plain_file_metadata",
    "posix_info",
    "resolve_collision",
    "scan_directory",
    "scan_single",
    "scan_tar",
    "write_node",
]
