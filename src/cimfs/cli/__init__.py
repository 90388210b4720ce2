"""The ``cimfs`` command: build, fork, inspect, verify, extract and mount CimFS images.

One module per command family, each a list of click commands (``COMMANDS``)
that this package adds to the ``cimfs`` group:

* :mod:`.images` -- create, fork, merge, rm, gc;
* :mod:`.reading` -- ls, cat, stat, info, diff, fsck, extract, export;
* :mod:`.mounts` -- mount, umount, to-erofs;
* :mod:`.layers` -- the layer store: import-image, images, rmi, export-image;
* :mod:`.common` -- the group, shared helpers and options, and the program's
  end: every failure as one ``cimfs: ...`` line (:func:`main`, :func:`entry_point`).

Start-up convention: a family module imports only click and light modules
(errors, progress, bulk) at its top; the library modules a command needs
(reader, writer, posix, tools, oci, mount, winlayer, tarfile, ...) are imported
inside that command's function.  ``cimfs --version`` and ``--help`` then load
no library module, and each command loads only what it uses: start-up time,
checked by tests/test_startup.py.  ``import cimfs`` is itself lazy (PEP 562).
"""

from __future__ import annotations

import importlib

from .common import cli, entry_point, main

# The command families, in this package.  A new family is one module with a
# COMMANDS tuple and one name here (the hive commands go in as "hive").
FAMILIES = ("images", "reading", "mounts", "layers")

for _family in FAMILIES:
    for _command in importlib.import_module(f".{_family}", __name__).COMMANDS:
        cli.add_command(_command)
del _family, _command

__all__ = ["cli", "main", "entry_point"]
