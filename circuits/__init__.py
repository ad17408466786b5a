"""circuits: a sparse-feature circuit tracer for transformer language models.

Heavy modules import on first use, so `circuits --help` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "circuits.models",
    "load_transcoder": "circuits.formats",
    "CircuitsError": "circuits.errors",
    "CLTConfig": "circuits.clt",
    "CrossLayerTranscoder": "circuits.clt",
    "attribute": "circuits.attribution",
    "Graph": "circuits.graph",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'circuits' has no attribute {name!r}")
