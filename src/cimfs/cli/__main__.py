"""``python -m cimfs.cli``: the ``cimfs`` program."""

from . import entry_point

entry_point()
