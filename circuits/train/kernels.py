"""The two contractions of a training step, each done sparse or dense by the density of the batch's
support (picked per layer and step, from the support alone, so resume stays exact):

- `encode`: one layer's supported features (token, feature, pre-activation), the forward one dense
  matmul; the encoder's gradient either gathered over the supported (token, feature) pairs
  (`embedding_bag`, which sorts them by feature) or one dense [F, n] x [n, d] product of the
  gradient scattered into [n, F];
- `decode`: a source layer's contribution to every layer it writes, either gathered rows of its
  decoders (`embedding_bag` over the support) or the activations scattered into [n, F] times the
  decoder [F, T * d].

Profiled on one CPU thread at L0 200 (F 1,024): the gather path spent its time sorting the support
by feature and in `embedding_bag`'s backward (about 60% together), the encoder's matmul about 2%.
At F 8,192 and L0 90 (support ~2%) the dense products still won, 91 against 38 tokens/s in
`scripts/bench_train.py` (a loaded machine); hence the low `DENSE_ABOVE`. The support of a JumpReLU
layer includes the threshold's straight-through window, so it is larger than L0.
"""

from __future__ import annotations

import torch
from torch import nn

from circuits.transcoders.clt import JumpReLU, SparseActs

DENSE_ABOVE = 0.01
"""Supported fraction of [n, F] above which a layer's contractions are dense matmuls."""


class _Encode(torch.autograd.Function):
    """Pre-activations at the support of one layer: (values [nnz], token [nnz], feature [nnz]),
    token-major. Support: each token's top k (k > 0), else pre > cutoff [F]."""

    @staticmethod
    def forward(ctx, x, W, b, cutoff, k: int):
        with torch.no_grad():
            pre = torch.addmm(b, x, W.T)  # [n, F]
            if k:
                values, feature = pre.topk(k, dim=-1)  # [n, k]
                token = torch.arange(len(x), device=x.device).repeat_interleave(k)
                values, feature = values.flatten(), feature.flatten()
            else:
                token, feature = (pre > cutoff).nonzero(as_tuple=True)
                values = pre[token, feature]
        ctx.save_for_backward(x, token, feature)
        ctx.shape = pre.shape
        ctx.dense = len(token) > DENSE_ABOVE * pre.numel()
        ctx.mark_non_differentiable(token, feature)
        return values, token, feature

    @staticmethod
    def backward(ctx, grad, _grad_token, _grad_feature):
        x, token, feature = ctx.saved_tensors
        n, F = ctx.shape
        if ctx.dense:
            scattered = grad.new_zeros(n, F).index_put_((token, feature), grad)
            return None, scattered.T @ x, scattered.sum(0), None, None
        # grad_W[f] = sum over the tokens t where f is supported of grad * x[t]: one bag per feature
        feature_sorted, order = feature.sort(stable=True)
        counts = torch.bincount(feature_sorted, minlength=F)
        grad_W = nn.functional.embedding_bag(
            token[order], x, counts.cumsum(0) - counts, mode="sum", per_sample_weights=grad[order]
        )
        return None, grad_W, grad.new_zeros(F).index_add_(0, feature, grad), None, None


def encode(clt, x: torch.Tensor, layer: int) -> SparseActs:
    """One layer's inputs x [n, d] -> its supported features: the active ones, plus for JumpReLU the
    inactive ones inside the threshold's straight-through window (activation 0). The same values
    and gradients as the dense `CrossLayerTranscoder.encode_layer` at those features."""
    cfg, W, b = clt.cfg, clt.W_enc[layer], clt.b_enc[layer]
    if cfg.activation == "topk":
        pre, token, feature = _Encode.apply(x, W, b, None, cfg.topk)
        return SparseActs(token, feature, torch.relu(pre), len(x))
    if cfg.activation == "relu":
        pre, token, feature = _Encode.apply(x, W, b, torch.zeros_like(clt.threshold[layer]), 0)
        return SparseActs(token, feature, pre, len(x))
    pre, token, feature = _Encode.apply(x, W, b, clt.threshold[layer].detach() - cfg.bandwidth / 2, 0)
    return SparseActs(token, feature, JumpReLU.apply(pre, clt.threshold[layer][feature], cfg.bandwidth), len(x))


def decode(acts: SparseActs, W: torch.Tensor) -> torch.Tensor:
    """One source layer's decoders W [F, T, d] applied to its supported features: [n, T, d]."""
    n, F = acts.n_tokens, W.shape[0]
    if len(acts.feature) > DENSE_ABOVE * n * F:
        dense = acts.values.new_zeros(n, F).index_put((acts.token, acts.feature), acts.values)
        return (dense @ W.flatten(1)).view(n, *W.shape[1:])
    out = nn.functional.embedding_bag(
        acts.feature, W.flatten(1), acts.offsets(), mode="sum", per_sample_weights=acts.values
    )
    return out.view(n, *W.shape[1:])
