"""One source layer's transcoder as a format reader hands it over, in our orientation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from circuits.transcoders.clt import CLTConfig


@dataclass
class LayerWeights:
    """One source layer's transcoder, in our orientation, tensors as read (file dtype, possibly
    memory-mapped views)."""

    W_enc: torch.Tensor  # [F, d]: pre = x @ W_enc.T + b_enc
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, T, d]: slice k writes output layer l + k (T = 1 per-layer)
    b_dec: torch.Tensor  # [d]: bias of output layer l
    threshold: torch.Tensor | None = None  # [F]: JumpReLU pre * (pre > threshold)
    W_skip: torch.Tensor | None = None  # [d, d]: skip = x @ W_skip


@dataclass
class LayerInfo:
    """What one per-layer file declares, read from its header (no weights)."""

    n_features: int
    d_model: int
    jumprelu: bool
    skip: bool
    topk: int | None = None


def present_layers(cfg: CLTConfig) -> list[int]:
    """The layers that have a transcoder."""
    return list(range(cfg.n_layers)) if cfg.layers is None else list(cfg.layers)
