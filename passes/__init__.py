"""lmc passes: one module per pass or pass family, each registered by name.

Importing this package imports every module in it, so each pass registers itself with
`@register_pass`; a new pass module needs no edit here (several engineers add passes at once).
"""
import importlib as _importlib
import pkgutil as _pkgutil

for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_info.name}")
