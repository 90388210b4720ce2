"""Names a package loads from its modules on first use (PEP 562).

``cimfs``, ``cimfs.posix`` and ``cimfs.oci`` re-export many names; importing
each from its module up front made every command pay for modules it never
used (start-up time, tests/test_startup.py).  A package gives :func:`exports`
its name -> module table and installs the two functions it returns as its
module ``__getattr__`` and ``__dir__``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any


def exports(
    package: str, namespace: MutableMapping[str, Any], module_of: Mapping[str, str], *, submodules: bool = False
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: a name of ``module_of``
    is imported from its module once and kept in ``namespace``; with
    ``submodules``, any other public name that is a submodule is imported too."""

    def __getattr__(name: str) -> Any:
        module = module_of.get(name)
        if module is not None:
            value = getattr(importlib.import_module(f".{module}", package), name)
            namespace[name] = value
            return value
        if submodules and not name.startswith("_"):
            try:
                return importlib.import_module(f".{name}", package)
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(module_of))

    return __getattr__, __dir__
