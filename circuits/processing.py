"""Weight processing: what TransformerLens did to a model's weights when it was loaded, and what a
transcoder expects. A transcoder means what it means only on a model processed as the one it was
trained on; circuit-tracer's convention, and our default, is "none" (the published weights)."""

from __future__ import annotations

PROCESSING_ATTR = "circuits_processing"
"""The model attribute on which `circuits.models.load_model` records the processing it applied."""

_SAME_AT_THE_HOOKS = {"fold-value-biases": "none"}
"""Folding value biases into b_O changes no hook a transcoder reads or writes."""


def weight_processing(model) -> str:
    """The processing applied to a TransformerLens model: as recorded by `load_model`. Not recorded:
    "none" for a model built directly from a config, but "unknown" when its norms have no weights
    (LNPre, RMSPre: TransformerLens may have folded them in, as `from_pretrained` does by default)."""
    recorded = getattr(model, PROCESSING_ATTR, None)
    if recorded is not None:
        return recorded
    return "unknown" if model.cfg.normalization_type in ("LNPre", "RMSPre") else "none"


def transcoder_processing(cfg) -> str:
    """The processing of the model a transcoder was trained on (`CLTConfig.model_processing`); a
    config that does not say: "none", circuit-tracer's convention (no fold_ln, no centring)."""
    return getattr(cfg, "model_processing", "none")


def same_at_the_hooks(a: str, b: str) -> bool:
    """Whether two processings give the same values at every hook a transcoder uses."""
    return _SAME_AT_THE_HOOKS.get(a, a) == _SAME_AT_THE_HOOKS.get(b, b)
