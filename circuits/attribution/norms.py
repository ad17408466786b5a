"""TransformerLens's norms (LayerNorm, RMSNorm, with or without weights) as the attribution sees them:
the same operations as their hooks, and a norm with its scale frozen at its value on the prompt, which
is a linear map (`FrozenNorm`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer


@dataclass
class FrozenNorm:
    """A normalisation with its scale frozen: y = centre(x) / scale * w + b (centre only for LN)."""

    scale: torch.Tensor  # [pos, 1]
    w: torch.Tensor  # [d] (ones without weights)
    b: torch.Tensor  # [d] (zeros without bias)
    centre: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., pos, d] -> normalised [..., pos, d] (the bias included)."""
        return self.linear(x) / self.scale[: x.shape[-2]] + self.b

    def forward_at(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """`forward` for vectors x [B, d] at positions pos [B]."""
        return self.linear(x) / self.scale[pos] + self.b

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """The part that acts on each vector x [..., d] alike, the scale aside: centre(x) * w."""
        return (x - x.mean(-1, keepdim=True) if self.centre else x) * self.w

    def backward(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient [..., pos, d] at the output -> gradient at the input (transpose of the linear part)."""
        g = g * self.w / self.scale[: g.shape[-2]]
        return g - g.mean(-1, keepdim=True) if self.centre else g

    def backward_at(self, g: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """`backward` for gradients g [B, d] at positions pos [B]."""
        g = g * self.w / self.scale[pos]
        return g - g.mean(-1, keepdim=True) if self.centre else g

    def linear_backward(self, g: torch.Tensor) -> torch.Tensor:
        """The transpose of `linear`, g [..., d] -> centre(g * w): `backward` but the scale."""
        g = g * self.w
        return g - g.mean(-1, keepdim=True) if self.centre else g


def frozen_norm(module, scale: torch.Tensor, d: int, dtype) -> FrozenNorm:
    w = getattr(module, "w", None)
    b = getattr(module, "b", None)
    return FrozenNorm(
        scale=scale.to(dtype),
        w=torch.ones(d, dtype=dtype, device=scale.device) if w is None else w.detach().to(dtype),
        b=torch.zeros(d, dtype=dtype, device=scale.device) if b is None else b.detach().to(dtype),
        centre=module.__class__.__name__.startswith("LayerNorm"),
    )


def normalise(module, x: torch.Tensor, weights: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A TransformerLens LayerNorm/RMSNorm applied to x [..., d], with its weight and bias (each if
    it has it) or without (its hook_normalized), and the inverse of its scale [..., 1] (1 / what its
    hook_scale sees): a LayerNorm in float32/64 is one operation, torch's own (the scales of a whole
    forward pass are inverted at once)."""
    if _native(module, x):
        w, b = (getattr(module, "w", None), getattr(module, "b", None)) if weights else (None, None)
        out, _, rstd = torch.native_layer_norm(x, x.shape[-1:], w, b, module.eps)
        return out, rstd
    normalized, scale = hook_normalized(module, x)
    return norm_weights(module, normalized) if weights else normalized, scale.reciprocal()


def hook_normalized(module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a TransformerLens LayerNorm/RMSNorm's hook_normalized [..., d] and hook_scale [..., 1]
    see for x [..., d]: the same operations (in float32 for half-precision models)."""
    if module.cfg.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    if module.__class__.__name__.startswith("LayerNorm"):
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + module.eps).sqrt()
    return (x / scale).to(module.cfg.dtype), scale


def _native(module, x: torch.Tensor) -> bool:
    """Whether `torch.native_layer_norm` computes this norm: a LayerNorm, x in the model's dtype, float32/64."""
    dtype = module.cfg.dtype
    return (
        dtype in (torch.float32, torch.float64)
        and x.dtype == dtype
        and module.__class__.__name__.startswith("LayerNorm")
    )


def norm_weights(module, x: torch.Tensor) -> torch.Tensor:
    """What a TransformerLens norm applies after its hook_normalized: x * w + b (each if it has it)."""
    if hasattr(module, "w"):
        x = x * module.w
    if hasattr(module, "b"):
        x = x + module.b
    return x


def has_post_norm(model: HookedTransformer, output_hook: str) -> bool:
    """Whether a transcoder's output passes through the model's norm after the MLP (mlp.hook_out on
    Gemma 2/3) before it reaches hook_mlp_out."""
    return output_hook == "mlp.hook_out" and model.cfg.use_normalization_before_and_after
