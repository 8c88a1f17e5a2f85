"""The built-in methods and rule kinds: importing every module of this package that defines one registers it
(rules.py holds the kinds several methods share)."""
from __future__ import annotations

_INFRA = {"registry", "plan", "kinds", "apply", "builtin"}    # modules of this package that register nothing


def load_builtin() -> None:
    """Import every method module of this package once (Python caches the imports), so each registers itself."""
    import importlib
    import pkgutil

    from .. import sparsifiers as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name not in _INFRA and not m.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{m.name}")
