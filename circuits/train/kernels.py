"""The two contractions of a training step, each layer done dense or sparse by the density of its
support on the batch (picked per layer and step from the support alone, so resume stays exact):

- `encode`: one layer's pre-activations [F, n] by one dense matmul (every feature's is needed to
  know which are supported), then either the whole layer as dense activations [n, F] (gradients
  by dense matmuls), or only its supported (feature, token) pairs, feature-major (`Support`),
  whose encoder gradient is one sparse [F, n] x [n, d] product;
- `decode`: a source layer's contribution to every layer it writes: dense [n, F] x [F, T * d], or
  `_SparseDecode`, which touches only the supported pairs: the forward a sparse [n, F] x [F, T * d]
  product, the backward a sampled dense-dense product (the activations' gradient, at the support
  only) and a sparse [F, n] x [n, T * d] product (the decoder's gradient).

Feature-major pairs keep a feature's decoder row and the batch's [n, T * d] gradient in cache in
the backward. Profiled on one CPU thread (torch.profiler, `scripts/bench_train.py`'s shapes): the
token-major gathers this replaced (`embedding_bag`, its backward and a sort of the support by
feature) took about half of a step at F 8,192 and L0 90; alone, these products take 5-9x less time
than the dense ones at 1-3% support (F 8,192) and ~4x more at 20% (F 1,024), and whole steps with
either path forced were close at 12-24% (F 1,024, L0 90 and 200): hence DENSE_ABOVE. The support of
a JumpReLU layer includes the threshold's straight-through window: at F 8,192 and L0 90 it is
3.5-6.6% of [n, F], three to five times L0's 1.2%. Operands are passed to torch.sparse detached:
it takes a ~3x slower path for tensors that require grad, even under no_grad.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from circuits.transcoders.clt import JumpReLU

DENSE_ABOVE = 0.15
"""Supported fraction of [n, F] above which a layer's contractions are dense matmuls (float32)."""
DENSE_ABOVE_BF16 = 0.15
"""The same with the dense matmuls in bfloat16 (`precision = "bf16-mixed"`)."""


@dataclass
class Support:
    """One layer's supported (feature, token) pairs in a batch of n tokens, sorted by feature, then
    token: the pattern of a sparse CSR [F, n] matrix."""

    feature: torch.Tensor  # [nnz] long
    token: torch.Tensor  # [nnz] long
    crow: torch.Tensor  # [F + 1] long: where each feature's run starts
    n_tokens: int

    @classmethod
    def of(cls, supported: torch.Tensor) -> Support:
        """The pairs of a boolean [F, n]."""
        return cls.of_pairs(*supported.nonzero(as_tuple=True), *supported.shape)

    @classmethod
    def of_pairs(cls, feature: torch.Tensor, token: torch.Tensor, n_features: int, n_tokens: int) -> Support:
        """The pairs (feature [nnz], token [nnz]), already sorted by feature, then token."""
        crow = feature.new_zeros(n_features + 1)
        crow[1:] = torch.bincount(feature, minlength=n_features).cumsum(0)
        return cls(feature, token, crow, n_tokens)

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """The sparse CSR [F, n] matrix with `values` [nnz] at the pairs."""
        shape = (len(self.crow) - 1, self.n_tokens)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the three products used here are not
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(self.crow, self.token, values, shape, check_invariants=False)

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        """The sparse COO [n, F] matrix with `values` [nnz] at the pairs."""
        indices = torch.stack([self.token, self.feature])
        return torch.sparse_coo_tensor(indices, values, (self.n_tokens, len(self.crow) - 1), check_invariants=False)


@dataclass
class LayerActs:
    """One source layer's activations on a batch of n tokens: dense `values` [n, F] (support None),
    or `values` [nnz] at `support`: every active feature plus, for JumpReLU, the inactive ones inside
    the threshold's straight-through window (activation 0, the threshold's gradient is read there)."""

    values: torch.Tensor
    support: Support | None
    n_features: int

    def penalty(self, norms: torch.Tensor, c: float) -> torch.Tensor:
        """sum over tokens and features of tanh(c * a * ||W_dec||), given the norms [F]."""
        scale = c * (norms if self.support is None else norms[self.support.feature])
        return torch.tanh(self.values * scale).sum()

    def activity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([F] bool: features active on some token, a scalar: active (token, feature) pairs)."""
        on = self.values.detach() > 0
        if self.support is None:
            return on.any(0), on.count_nonzero()
        fired = torch.zeros(self.n_features, dtype=torch.bool, device=self.values.device)
        fired[self.support.feature[on]] = True
        return fired, on.count_nonzero()


class _Encode(torch.autograd.Function):
    """Every layer's pre-activations pre[l] [F, n] (computed without autograd, in the matmul dtype)
    as a function of the encoders W [L, F, d] and b [L, F] on inputs x [n, L, d]: per layer all of
    them as [n, F] (support None), or those at its support [nnz], in W's dtype. One function for
    all layers, so that the backward writes each layer's slice of the gradients (a slice per layer
    would allocate [L, F, d] per layer). A dense layer's gradient product runs in the matmul dtype;
    a sparse layer's in W's (torch.sparse's bfloat16 products are slower or missing on CPU)."""

    @staticmethod
    def forward(ctx, W, b, x, pre: list[torch.Tensor], supports: list[Support | None]):
        ctx.save_for_backward(x)
        ctx.supports, ctx.shape, ctx.mm_dtype = supports, W.shape, pre[0].dtype
        values = (p.T if s is None else p[s.feature, s.token] for p, s in zip(pre, supports, strict=True))
        return tuple(v.to(W.dtype) for v in values)

    @staticmethod
    def backward(ctx, *grads):
        (x,) = ctx.saved_tensors
        grad_W, grad_b = x.new_empty(ctx.shape), x.new_zeros(ctx.shape[:2])
        for l, (grad, s) in enumerate(zip(grads, ctx.supports, strict=True)):
            if s is not None:
                grad_W[l] = s.csr(grad) @ x[:, l]
                grad_b[l].index_add_(0, s.feature, grad)
                continue
            grad_b[l] = grad.sum(0)  # grad [n, F]
            if ctx.mm_dtype == x.dtype:
                torch.mm(grad.T, x[:, l], out=grad_W[l])
            else:
                grad_W[l] = grad.T.to(ctx.mm_dtype) @ x[:, l].to(ctx.mm_dtype)
        return grad_W, grad_b, None, None, None


def encode(clt, x: torch.Tensor, dtype: torch.dtype | None = None) -> list[LayerActs]:
    """Every layer's inputs x [n, L, d] -> its activations, dense or at their support, with the
    values and gradients of the dense `CrossLayerTranscoder.encode_layer` at those features. The
    encoder's matmuls run in `dtype` (default: the parameters'), the activations in the parameters'."""
    dtype = dtype or clt.W_enc.dtype
    with torch.no_grad():
        x_mm, W_mm, b_mm = x.to(dtype), clt.W_enc.to(dtype), clt.b_enc.to(dtype)
        pre = [torch.addmm(b_mm[l, :, None], W_mm[l], x_mm[:, l].T) for l in range(x.shape[1])]  # [F, n]
        supports = [_support(clt, p, l, dense_above(dtype)) for l, p in enumerate(pre)]
    values = _Encode.apply(clt.W_enc, clt.b_enc, x, pre, supports)
    return [_activate(clt, l, v, s) for l, (v, s) in enumerate(zip(values, supports, strict=True))]


def dense_above(dtype: torch.dtype) -> float:
    """The supported fraction of [n, F] above which a layer is dense, for matmuls in `dtype`."""
    return DENSE_ABOVE_BF16 if dtype == torch.bfloat16 else DENSE_ABOVE


def _support(clt, pre: torch.Tensor, layer: int, dense_above: float) -> Support | None:
    """The supported pairs of one layer's pre-activations [F, n]: each token's top k (TopK), pre > 0
    (ReLU), or pre inside or above the JumpReLU threshold's straight-through window; None where they
    are over `dense_above` of [F, n] (the layer is then dense)."""
    cfg, (F, n) = clt.cfg, pre.shape
    if cfg.activation == "topk":
        if cfg.topk > dense_above * F:
            return None
        top = pre.T.contiguous().topk(cfg.topk, dim=1).indices.flatten()  # [n * k] (contiguous: ~10x faster)
        token = torch.arange(n, device=pre.device).repeat_interleave(cfg.topk)
        order = (top * n + token).argsort()
        return Support.of_pairs(top[order], token[order], F, n)
    if cfg.activation == "relu":
        supported = pre > 0
    else:
        supported = pre > (clt.threshold[layer].detach() - cfg.bandwidth / 2)[:, None]
    return None if supported.count_nonzero().item() > dense_above * supported.numel() else Support.of(supported)


def _activate(clt, layer: int, pre: torch.Tensor, support: Support | None) -> LayerActs:
    """The activations of one layer's pre-activations: dense [n, F] (support None) or at the support."""
    cfg, F = clt.cfg, clt.W_enc.shape[1]
    if cfg.activation == "topk":
        values = torch.relu(pre)
        if support is None:
            top = pre.detach().topk(cfg.topk, dim=1).indices  # [n, k]
            values = values * torch.zeros_like(pre, dtype=torch.bool).scatter_(1, top, True)
    elif cfg.activation == "relu":
        values = torch.relu(pre)
    else:
        threshold = clt.threshold[layer] if support is None else clt.threshold[layer][support.feature]
        values = JumpReLU.apply(pre, threshold, cfg.bandwidth)
    return LayerActs(values, support, F)


class _SparseDecode(torch.autograd.Function):
    """values [nnz] at a support, decoders W [F, T, d] -> the contribution [n, T, d]."""

    @staticmethod
    def forward(ctx, values, W, support: Support):
        ctx.save_for_backward(values, W)
        ctx.support = support
        out = torch.sparse.mm(support.rows(values.detach()), W.detach().flatten(1))
        return out.view(support.n_tokens, *W.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        values, W = ctx.saved_tensors
        s, flat = ctx.support, grad.reshape(grad.shape[0], -1)  # [n, T * d]
        pattern = s.csr(values)
        grad_values = torch.sparse.sampled_addmm(pattern, W.detach().flatten(1), flat.T, beta=0).values()
        return grad_values, (pattern @ flat).view_as(W), None


def decode(acts: LayerActs, W: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One source layer's decoders W [F, T, d] applied to its activations: [n, T, d] in W's dtype. A
    dense layer's products (forward and backward) run in `dtype` (default W's); a sparse layer's in
    W's (torch.sparse's bfloat16 products are 3-5x slower than its float32 ones on CPU, or missing)."""
    if acts.support is None:
        out = acts.values.to(dtype or W.dtype) @ W.flatten(1).to(dtype or W.dtype)
        return out.to(W.dtype).view(len(acts.values), *W.shape[1:])
    return _SparseDecode.apply(acts.values, W, acts.support)
