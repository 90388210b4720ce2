"""The ``cimfs`` command: build, fork, inspect, verify, extract and mount CimFS images.

One module per command family, each a tuple of click commands (``COMMANDS``)
that the ``cimfs`` group loads when one of them is run (:data:`FAMILIES`):

* :mod:`.images` -- create, fork, merge, rm, gc;
* :mod:`.reading` -- ls, cat, stat, info, diff, fsck, extract, export;
* :mod:`.mounts` -- mount, umount, to-erofs;
* :mod:`.layers` -- the layer store: import-image, images, rmi, export-image;
* :mod:`.hive` -- registry hives: hive ls, hive export, hive merge;
* :mod:`.common` -- the group, shared helpers and options, and the program's
  end: every failure as one ``cimfs: ...`` line (:func:`main`, :func:`entry_point`).

Start-up convention: a family module imports only click and light modules
(errors, progress, bulk) at its top; the library modules a command needs
(reader, writer, posix, tools, oci, mount, winlayer, tarfile, ...) are imported
inside that command's function.  ``cimfs --version`` and ``--help`` then load
no library module, and each command loads only its family and what it uses:
start-up time, checked by tests/test_startup.py.  ``import cimfs`` is itself lazy (PEP 562).
"""

from __future__ import annotations

from .common import cli, entry_point, main

# The command families of this package and the commands each defines (its
# COMMANDS tuple); a command's module is loaded when it is run or listed.  A
# new family is one module and one line here (the hive commands: "hive": ("hive",)).
FAMILIES = {
    "images": ("create", "fork", "merge", "rm", "gc"),
    "reading": ("ls", "cat", "stat", "info", "diff", "fsck", "extract", "export"),
    "mounts": ("mount", "umount", "to-erofs"),
    "layers": ("import-image", "images", "rmi", "export-image"),
    "hive": ("hive",),
}
cli.families.update({name: f"{__name__}.{family}" for family, names in FAMILIES.items() for name in names})

__all__ = ["cli", "main", "entry_point", "FAMILIES"]
