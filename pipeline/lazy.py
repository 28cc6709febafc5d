"""Registry entries named "package.module:ATTRIBUTE", imported only when asked for, so that the
CLI lists a registry's names without importing torch or pydicom (pipeline/heads/registry.py,
pipeline/data/layouts.py)."""

from __future__ import annotations

import importlib


def resolve(entry):
    """The object a "module:attribute" entry names; any other entry (an object a test registered)
    is returned as is."""
    if not isinstance(entry, str):
        return entry
    module, _, attribute = entry.partition(":")
    return getattr(importlib.import_module(module), attribute)
