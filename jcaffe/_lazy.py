"""Module attributes imported on first use (PEP 562), so package imports stay cheap."""

from __future__ import annotations

import importlib


def lazy_attributes(package: str, names: dict[str, str], namespace: dict):
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps an attribute to the module
    defining it (or, for a submodule ``package.name``, the submodule itself); the first access
    imports it and caches it in ``namespace``."""

    def __getattr__(name):
        mod = names.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(mod)
        value = module if mod == f"{package}.{name}" else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(list(namespace) + list(names))

    return __getattr__, __dir__
