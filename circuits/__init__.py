"""circuits: a sparse-feature circuit tracer for transformer language models.

The public API of every stage, in data-flow order (see the README's layout section). Each name is
imported on first use, so `circuits --help` stays fast; editors see them through the
`TYPE_CHECKING` imports below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    # models and errors
    "CircuitsError": "circuits.errors",
    "load_model": "circuits.models",
    # transcoders
    "CLTConfig": "circuits.transcoders.clt",
    "CrossLayerTranscoder": "circuits.transcoders.clt",
    "load_transcoder": "circuits.transcoders.load",
    "save_transcoder": "circuits.transcoders.circuit_tracer",
    # training (the loop: circuits.train.loop.train; `circuits.train` is the subpackage)
    "TrainConfig": "circuits.train.config",
    "load_recipe": "circuits.train.config",
    # attribution
    "AttributionConfig": "circuits.attribution.attribute",
    "attribute": "circuits.attribution.attribute",
    "Graph": "circuits.attribution.graph",
    "validate": "circuits.attribution.interventions",
    "run_with_interventions": "circuits.attribution.interventions",
    "head_loadings": "circuits.attribution.heads",
    "qk_attribution": "circuits.attribution.qk",
    # concepts
    "concept_report": "circuits.concepts.report",
    # feature cards
    "scan_features": "circuits.features",
    "load_features": "circuits.features",
}

if TYPE_CHECKING:
    from circuits.attribution.attribute import AttributionConfig, attribute
    from circuits.attribution.graph import Graph
    from circuits.attribution.heads import head_loadings
    from circuits.attribution.interventions import run_with_interventions, validate
    from circuits.attribution.qk import qk_attribution
    from circuits.concepts.report import concept_report
    from circuits.errors import CircuitsError
    from circuits.features import load_features, scan_features
    from circuits.models import load_model
    from circuits.train.config import TrainConfig, load_recipe
    from circuits.transcoders.circuit_tracer import save_transcoder
    from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder
    from circuits.transcoders.load import load_transcoder

__all__ = [
    "__version__",
    "CircuitsError",
    "load_model",
    "CLTConfig",
    "CrossLayerTranscoder",
    "load_transcoder",
    "save_transcoder",
    "TrainConfig",
    "load_recipe",
    "AttributionConfig",
    "attribute",
    "Graph",
    "validate",
    "run_with_interventions",
    "head_loadings",
    "qk_attribution",
    "concept_report",
    "scan_features",
    "load_features",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'circuits' has no attribute {name!r}")
