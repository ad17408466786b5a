"""The two contractions of a training step, each layer done dense or sparse by the density of its
support on the batch (picked per layer and step from the pre-activations alone, so resume stays
exact; on a GPU bfloat16 layers are always dense, float32 ones above 2%: `DENSE_ABOVE_CUDA`), and
in the matmul dtype of the run's precision (float32, or bfloat16 with `precision = "bf16-mixed"`;
the penalty, loss and parameter gradients stay in the parameters' dtype, and so do
the activations except a dense JumpReLU layer's, exact in the matmul dtype):

- `encode`: every layer's pre-activations [F, n] by one batched dense matmul, the bias as the
  weight of an input of 1 (every feature's is needed to know which are supported; rounded once, as
  addmm does, which took 2.5x as long as the product alone in bfloat16), then per layer either the
  whole layer dense, or only its supported (feature, token) pairs, feature-major (`Support`; found
  on a CPU by numpy, `_above` and `Support.of`: 12 instead of 40 ms a layer at F 8,192), whose
  encoder gradient is an embedding bag over the pairs (`Support.collect`). With float32 (or
  float64) matmuls on a CPU the batched matmul is a bfloat16 one with a margin that bounds its
  rounding (`_screened`: candidates 13-31% more than the supported pairs at F 8,192, L0 200), and
  the candidates' exact pre-activations are sampled products: ~12 ms for the bfloat16 product and
  5-7 a layer for the sampled ones instead of ~72 for the float32 matmul (one thread). The whole
  encode (in-process A/B, load 2-3): 144 instead of 174 ms in a steady step (3% supported), 281
  against 257 at 7% (step 2), at F 1,024 L0 90 (10%) 41 against 39; the sampled products cost about
  as much as the whole product from ~8% on, and taking the whole product above 5% candidates was
  slower still (303, 45: the bfloat16 product then spent for nothing);
- a JumpReLU layer computes its activations, penalty, decoding and their gradients in one function:
  dense (`_DenseJumpReLU`) on feature-major [F, n] tensors, or sparse (`_SparseJumpReLU`) over its
  active pairs; the window of its threshold's straight-through gradient holds inactive pairs too
  (activation 0: 15-20% as many pairs again as the active ones once `target_l0` has settled the
  thresholds, 50-140% in the first steps),
  which only the threshold's gradient reads: the sampled product at them (`Pairs.window`). The
  decoder norms' gradient is added to the decoder's in place (`_add_norms_gradient`);
- ReLU and TopK layers decode through autograd, a sparse one by `_SparseDecode` (in the parameters'
  dtype);
- a sparse layer's decoder products are embedding bags, a JumpReLU layer's in the matmul dtype
  (fbgemm's, which sum bfloat16 rows in float32): the forward [n, F] x [F, T * d] over the pairs in token order
  (`Support.spread`: a radix argsort of the tokens), the decoder's gradient [F, n] x [n, T * d]
  over them in feature order (`Support.collect`), so each reads its [F, T * d] or [n, T * d]
  operand's rows once per pair and writes its output row by row. The activations' gradient at the
  pairs is a sampled product (torch.sparse, float32: no faster bfloat16 one on CPU), or in bf16-mixed,
  above SAMPLED_BELOW_BF16, one dense bfloat16 [F, T * d] x [T * d, n] product read at them.

Measured at F 8,192 L0 200 (one CPU thread, layer 0: 2.8% of [F, n] supported, 2.5% active, T * d
512, 2026-12): the forward 56 ms as a torch.sparse COO product over the active pairs, 15 as a
bfloat16 embedding bag (32 in float32), the decoder's gradient 30 ms as CSR @ dense over the support,
12 as a bfloat16 embedding bag over the active pairs (16 in float32), the encoder's 6 and 2.7 ms; the
sampled product 23 ms, the dense bfloat16 one read at the pairs 25 (at 7.5% supported: 59 and 24). A
whole forward and backward then took 430-480 instead of 940-1050 ms dense in bf16-mixed at 2.8%,
800 against 920 at 7.3%, 1,020-1,140 against 940-1,080 at 9.8%, hence DENSE_ABOVE_BF16 9%; in fp32
(sparse then in float32 throughout) sparse was faster up to 16% (1,770 against 2,020 ms), and at F
1,024 L0 90 (11.7%) 180 against 221 ms (bf16-mixed: 172 against 159 dense), at L0 200 (24%) 318
against 236: hence DENSE_ABOVE 15% (loads 1.2-2; before these products the crossings were 5% and 8%).
Re-measured in fp32 after the leak fix (406806b) and with `_screened` (load 2.8-3, forward and
backward): F 1,024 L0 90 (9-10% supported) sparse 104 against dense 147 ms, L0 200 (20-23%) 217
against 153, F 8,192 L0 200 at 6-7.6% 616 against 1,045 and at 2.7% 332 against 1,058: the crossing
stays near 15%.
Operands are passed to torch.sparse detached: it takes a ~3x slower path for tensors that require
grad, even under no_grad. Tried and left out: torch.sparse COO, CSR and CSR-transposed products for the
forward (1.3-3.7x the embedding bag's time), an embedding bag over the pairs in token order in float32
(2x the bfloat16 one: W's rows are read at random), a sparse layer's decoder as dense bfloat16
products over the features supported in the batch, finding the support by the nonzero 64-bit words
first (slower: numpy's nonzero costs ~40 ns a set element on this CPU either way).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.functional import embedding_bag

DENSE_ABOVE = 0.15
"""Supported fraction of [n, F] above which a layer's contractions are dense matmuls (float32)."""
DENSE_ABOVE_BF16 = 0.09
"""The same with the dense matmuls in bfloat16 (`precision = "bf16-mixed"`): 3-4x faster than float32
ones on CPUs with AMX, while the sparse layer's embedding bags gain less (~2x) and its sampled product
nothing."""

DENSE_ABOVE_CUDA = 0.02
"""On a GPU (float32 matmuls, TF32 off): there dense products are fast and a sparse layer's many small
kernels, host synchronisations and sorts are not. Measured on an H200 (scripts/gpu_check.py's slice, F
16,384 x 4 layers, d 2,304, 4,096 tokens a step, 2026-12-04), ms a step sparse / dense: L0 16 78 / 260,
L0 64 104 / 259, L0 256 (1.6%) 217 / 260, L0 1,024 (6.2%) 662 / 260."""
DENSE_ABOVE_BF16_CUDA = 0.0
"""On a GPU in bfloat16 every layer is dense: 55 ms a step at every L0 of the same runs, against sparse
65 (L0 16, 0.1%), 88 (64), 196 (256) and 575 (1,024)."""

SAMPLED_BELOW_BF16 = 0.04
"""With bfloat16 matmuls: the share of [F, n] (active and window pairs) below which a sparse JumpReLU
layer's activations' gradient is a sampled float32 product at its pairs, above which one dense bfloat16
product read at them."""


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
        """The pairs of a boolean [F, n]. On a CPU by numpy's nonzero: 9 instead of torch's 27 ms at
        [8,192, 1,024] with 3.6% set (one thread, 2026-12)."""
        if supported.device.type != "cpu":
            return cls.of_pairs(*supported.nonzero(as_tuple=True), *supported.shape)
        feature, token = np.divmod(np.flatnonzero(supported.numpy()), supported.shape[1])
        return cls.of_pairs(torch.from_numpy(feature), torch.from_numpy(token), *supported.shape)

    @classmethod
    def of_pairs(cls, feature: torch.Tensor, token: torch.Tensor, n_features: int, n_tokens: int) -> Support:
        """The pairs (feature [nnz], token [nnz]), already sorted by feature, then token."""
        crow = feature.new_zeros(n_features + 1)
        crow[1:] = torch.bincount(feature, minlength=n_features).cumsum(0)
        return cls(feature, token, crow, n_tokens)

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """The entries of a [F, n] tensor at the pairs: [nnz]."""
        return dense.reshape(-1).index_select(0, self.feature * self.n_tokens + self.token)

    def split(self, keep: torch.Tensor) -> tuple[Support, Support, torch.Tensor]:
        """(the pairs where `keep` [nnz] bool is set, the others, the kept ones' places [nnz_kept])."""
        kept = _nonzero(keep)
        return self._at(kept), self._at(_nonzero(~keep)), kept

    def _at(self, places: torch.Tensor) -> Support:
        feature, token = self.feature.index_select(0, places), self.token.index_select(0, places)
        return Support.of_pairs(feature, token, len(self.crow) - 1, self.n_tokens)

    @functools.cached_property
    def by_token(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pairs sorted by token, then feature: (the order [nnz], their features [nnz], where each
        token's run starts [n]). On a CPU by numpy's stable argsort of 16-bit tokens (a radix sort)."""
        if self.token.device.type == "cpu":
            small = np.int16 if self.n_tokens <= 2**15 else np.int64
            order = torch.from_numpy(np.argsort(self.token.numpy().astype(small), kind="stable"))
        else:
            order = torch.sort(self.token, stable=True).indices
        starts = self.token.new_zeros(self.n_tokens)
        starts[1:] = torch.bincount(self.token, minlength=self.n_tokens)[:-1].cumsum(0)
        return order, self.feature.index_select(0, order), starts

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """The sparse CSR [F, n] matrix with `values` [nnz] at the pairs."""
        shape = (len(self.crow) - 1, self.n_tokens)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the sampled product used here is not
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(self.crow, self.token, values, shape, check_invariants=False)

    def spread(self, values: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """sum over the pairs of values [nnz] * W[feature] [F, D] in each pair's token row: [n, D]. An
        embedding bag over the pairs in token order (the product [n, F] x [F, D] at the pairs)."""
        order, feature, starts = self.by_token
        return embedding_bag(feature, W, starts, mode="sum", per_sample_weights=values.index_select(0, order))

    def collect(self, values: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """sum over the pairs of values [nnz] * g[token] [n, D] in each pair's feature row: [F, D]. An
        embedding bag over the pairs in feature order (the product [F, n] x [n, D] at the pairs)."""
        return embedding_bag(self.token, g, self.crow[:-1], mode="sum", per_sample_weights=values)

    def sampled(self, W: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """W[feature] . g[token] at the pairs, from W [F, D] and g [n, D]: [nnz] (the product [F, D] x
        [D, n] at the pairs only)."""
        pattern = self.csr(W.new_zeros(len(self.feature)))
        return torch.sparse.sampled_addmm(pattern, W, g.T, beta=0).values()


@dataclass
class Pairs:
    """A sparse layer's pairs on a batch: `values` [nnz], the pre-activations (in the parameters' dtype)
    at `support`, where its activations and the encoder's gradient live. For JumpReLU, `support` holds
    the active pairs only; `window` the inactive ones inside the threshold's straight-through window
    (activation 0: only the threshold's gradient reads them) and `near` [k] the places in `support` of
    the active ones inside it."""

    values: torch.Tensor
    support: Support
    window: Support | None = None
    near: torch.Tensor | None = None  # [k] long


@dataclass
class LayerTerms:
    """What one source layer adds to the objective on a batch of n tokens."""

    out: torch.Tensor  # [n, T, d] its decoders' contribution to the layers it writes
    penalty: torch.Tensor  # scalar: sum over tokens and features of tanh(c * a * ||W_dec||)
    fired: torch.Tensor  # [F] bool: features active on some token
    active: torch.Tensor  # scalar: active (token, feature) pairs


@dataclass
class LayerActs:
    """One ReLU or TopK layer's activations on a batch of n tokens: dense `values` [n, F] (support
    None), or `values` [nnz] at `support` (ReLU: pre > 0; TopK: each token's top k)."""

    values: torch.Tensor
    support: Support | None
    n_features: int

    def terms(self, W: torch.Tensor, c: float, dtype: torch.dtype) -> LayerTerms:
        """Its terms with decoders W [F, T, d], dense products in `dtype`."""
        return LayerTerms(decode(self, W, dtype), self.penalty(decoder_norm(W), c), *self.activity())

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


@dataclass
class DenseJumpReLU:
    """A dense JumpReLU layer: its pre-activations [F, n] (feature-major, in the matmul dtype), whose
    activations, penalty and decoding `_DenseJumpReLU` computes in one function."""

    pre: torch.Tensor
    threshold: torch.Tensor  # [F]
    bandwidth: float

    def terms(self, W: torch.Tensor, c: float, dtype: torch.dtype) -> LayerTerms:
        """Its terms with decoders W [F, T, d], the products in `dtype`."""
        out, penalty, counts = _DenseJumpReLU.apply(self.pre, self.threshold, W, c, self.bandwidth)
        return LayerTerms(out, penalty, counts > 0, counts.sum().long())


class _DenseJumpReLU(torch.autograd.Function):
    """pre [F, n], threshold [F], decoders W [F, T, d] -> (the contribution [n, T, d], the penalty sum
    tanh(c * a * ||W_f||), [F] active tokens per feature) with a = JumpReLU(pre) and its straight-through
    threshold gradient, the two products in pre's dtype (the matmul dtype); the norms' gradient is added
    to the decoder's in place (`_add_norms_gradient`).

    Written out as one function on feature-major [F, n] tensors (pre's layout, and the decoder
    gradient's when computed as W @ grad.T), every operation within one dtype, with the masks as 0/1
    numbers written by the comparisons themselves: on one CPU thread an operation that reads or writes
    a bool tensor or mixes two dtypes takes 4-10x as long as a plain one (a * mask 5.2 ms, a *
    float_mask 0.8 ms, torch.where 7 ms, bfloat16 * float32 5 ms at [1,024, 1,024]). What is exact in
    the matmul dtype runs there: the masks (pre against its bounds rounded as `_at_most` and `_at_least`
    do; the window's bounds computed in float64, where threshold -+ bandwidth / 2 rounds no bfloat16
    or float32 pre across them), the activations pre * active, which the decoder product reads as they
    are, and the whole backward: the decoder's gradient plus the penalty's, masked and summed, which in
    bf16-mixed rounds the penalty's derivative to bfloat16 before the sum that the encoder's bfloat16
    product then reads (the float32 sum was rounded there anyway), and the penalty's sum against the
    activations for the norms' gradient (a bfloat16 sum: ~0.4% of that term). Only tanh and its
    derivative run in the parameters' dtype, in the forward. In bf16-mixed 12 of the 16 passes over
    [F, n] are bfloat16 ones, with 2 casts instead of 4: the 4 dense layers' forward and backward at
    F 1,024, L0 200 took 59 instead of 68 ms (median, load 1.4), a whole step ~10% less (in-process A/B
    against the float32 passes, alternating steps, load 1-7)."""

    @staticmethod
    def forward(ctx, pre, threshold, W, c: float, bandwidth: float):
        mm, threshold, W, norms = pre.dtype, threshold.detach(), W.detach(), torch.linalg.vector_norm(W, dim=(1, 2))
        W_mm = W.flatten(1).to(mm)  # [F, T * d]
        active = torch.gt(pre, _at_most(threshold, mm), out=torch.empty_like(pre))  # [F, n] 0/1
        values = pre * active  # exact in pre's dtype
        low, high = threshold.double() - bandwidth / 2, threshold.double() + bandwidth / 2  # float64: see above
        window = torch.gt(pre, _at_most(low, mm), out=torch.empty_like(pre))  # |pre - threshold| < bandwidth / 2
        upper = torch.lt(pre, _at_least(high, mm), out=torch.empty_like(pre))
        window.mul_(upper)
        counts = _count_rows(active)
        scale = (c * norms)[:, None]  # [F, 1]
        a = values.to(W.dtype)
        t = torch.mul(a, scale, out=upper if upper.dtype == a.dtype else None).tanh_()  # into upper once spent
        penalty = t.sum()
        sech2 = torch.addcmul(t.new_ones(()), t, t, value=-1, out=t)  # 1 - tanh^2
        ctx.save_for_backward(threshold, values, active, window, sech2.to(mm), scale, W_mm, W, norms)
        ctx.c, ctx.bandwidth, ctx.shape = c, bandwidth, W.shape
        out = (values.T @ W_mm).to(W.dtype).view(pre.shape[1], *W.shape[1:])
        ctx.mark_non_differentiable(counts)
        return out, penalty, counts

    @staticmethod
    def backward(ctx, grad_out, grad_penalty, _):
        threshold, values, active, window, sech2, scale, W_mm, W, norms = ctx.saved_tensors
        g = grad_out.reshape(grad_out.shape[0], -1).to(W_mm.dtype)  # [n, T * d]
        grad_W = (values @ g).to(grad_out.dtype).view(ctx.shape)
        grad_norms = grad_penalty * ctx.c * values.mul_(sech2).sum(1).to(grad_out.dtype)  # in the spent activations
        _add_norms_gradient(grad_W, W, norms, grad_norms)
        grad_values = torch.mm(W_mm, g.T, out=values)  # [F, n], into the spent activations
        grad_values.addcmul_(sech2, (scale * grad_penalty).to(sech2.dtype))
        grad_threshold = window.mul_(grad_values).sum(1).to(threshold.dtype) * (-threshold / ctx.bandwidth)
        return grad_values.mul_(active), grad_threshold, grad_W, None, None


def decoder_norm(W: torch.Tensor) -> torch.Tensor:
    """||W_f|| over each feature's decoders W [F, T, d]: [F]."""
    return _Norms.apply(W)


class _Norms(torch.autograd.Function):
    """W [F, T, d] -> ||W_f|| [F]; the backward is W * (grad / norm) in one pass over W (autograd's
    vector_norm backward makes three and a masked fill: ~7% of a step at F 8,192)."""

    @staticmethod
    def forward(ctx, W: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(W, dim=(1, 2))
        ctx.save_for_backward(W, norms)
        return norms

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        W, norms = ctx.saved_tensors
        return _add_norms_gradient(torch.zeros_like(W), W, norms, grad)


def _add_norms_gradient(grad_W: torch.Tensor, W: torch.Tensor, norms: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad_W [F, T, d] plus, in place, the gradient W * grad / norms that grad [F] on the norms ||W_f|| [F]
    gives W (a zero row's: 0). Within a layer's function: one pass over W instead of autograd's product
    and sum of two [F, T, d] tensors."""
    return grad_W.addcmul_(W, torch.where(norms > 0, grad / norms, 0.0)[:, None, None])


def _count_rows(mask: torch.Tensor) -> torch.Tensor:
    """The ones in each row of a 0/1 [F, n], exactly, as float32 [F]: sums of at most as many ones as
    are exact in mask's dtype (256 in bfloat16; a float32 sum of a bfloat16 tensor takes 3x as long)."""
    exact = round(2 / torch.finfo(mask.dtype).eps)  # 2 ** (mantissa bits + 1)
    if mask.shape[1] <= exact:
        return mask.sum(1).float()
    whole = mask.shape[1] // exact * exact
    blocks = mask[:, :whole].unflatten(1, (-1, exact)).sum(2).float().sum(1)
    return blocks + mask[:, whole:].sum(1).float()


@dataclass
class SparseJumpReLU:
    """A sparse JumpReLU layer: its active pre-activations (`Pairs.values`, which are its activations)
    and the pairs, whose penalty and decoding `_SparseJumpReLU` computes in one function."""

    values: torch.Tensor  # [nnz] at pairs.support
    pairs: Pairs
    threshold: torch.Tensor  # [F]
    bandwidth: float

    def terms(self, W: torch.Tensor, c: float, dtype: torch.dtype) -> LayerTerms:
        """Its terms with decoders W [F, T, d], the decoder's products in `dtype`."""
        s, args = self.pairs.support, (self.threshold, W, c, self.bandwidth, self.pairs, dtype)
        out, penalty = _SparseJumpReLU.apply(self.values, *args)
        return LayerTerms(out, penalty, s.crow.diff() > 0, torch.tensor(len(s.feature), device=s.feature.device))


class _SparseJumpReLU(torch.autograd.Function):
    """values a [nnz] at the active pairs, threshold [F], decoders W [F, T, d] -> (the contribution
    [n, T, d], the penalty sum tanh(c * a * ||W_f||)), with the straight-through threshold
    gradient read at the active pairs inside the window and at the inactive ones there (`Pairs.window`).
    The decoder's products (`Support.spread`, `Support.collect`) run in `dtype`, over the active pairs
    only; the activations' gradient (`Support.sampled`) in W's dtype, at the active and window pairs."""

    @staticmethod
    def forward(ctx, values, threshold, W, c: float, bandwidth: float, pairs: Pairs, dtype: torch.dtype):
        s, values, W = pairs.support, values.detach(), W.detach()
        W_flat, norms = W.flatten(1), torch.linalg.vector_norm(W, dim=(1, 2))
        W_mm = W_flat.to(dtype)
        out = s.spread(values.to(dtype), W_mm).to(W.dtype).view(s.n_tokens, *W.shape[1:])
        scale = c * norms.index_select(0, s.feature)  # [nnz]
        t = torch.tanh(values * scale)
        sech2 = 1 - t * t
        ctx.save_for_backward(values, threshold.detach(), norms, scale, sech2, W_flat, W_mm)
        ctx.c, ctx.bandwidth, ctx.pairs, ctx.shape = c, bandwidth, pairs, W.shape
        return out, t.sum()

    @staticmethod
    def backward(ctx, grad_out, grad_penalty):
        values, threshold, norms, scale, sech2, W_flat, W_mm = ctx.saved_tensors
        s, window, near = ctx.pairs.support, ctx.pairs.window, ctx.pairs.near
        g = grad_out.reshape(grad_out.shape[0], -1)  # [n, T * d]
        grad_W = s.collect(values.to(W_mm.dtype), g.to(W_mm.dtype)).to(g.dtype).view(ctx.shape)
        grad_norms = norms.new_zeros(len(norms)).index_add_(0, s.feature, values * sech2) * (ctx.c * grad_penalty)
        _add_norms_gradient(grad_W, W_flat.view(ctx.shape), norms, grad_norms)
        grad_values, grad_window = _decoded_at([s, window], W_flat, W_mm, g)
        grad_values += grad_penalty * scale * sech2
        grad_window += grad_penalty * ctx.c * norms.index_select(0, window.feature)
        near_features, near_grads = s.feature.index_select(0, near), grad_values.index_select(0, near)
        in_window = norms.new_zeros(len(norms)).index_add_(0, near_features, near_grads)
        grad_threshold = in_window.index_add_(0, window.feature, grad_window) * (-threshold / ctx.bandwidth)
        return grad_values, grad_threshold, grad_W, None, None, None, None


def _decoded_at(supports: list[Support], W: torch.Tensor, W_mm: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """W[feature] . g[token] at each support's pairs ([nnz] each, in W's dtype) for decoders W [F, D] and
    gradients g [n, D]: sampled products in W's dtype, or, where W_mm (W in the matmul dtype) is bfloat16
    and the pairs cover over SAMPLED_BELOW_BF16 of [F, n], one dense product W_mm @ g.T read at them."""
    F, n = W.shape[0], g.shape[0]
    if W_mm.dtype != torch.bfloat16 or sum(len(s.feature) for s in supports) <= SAMPLED_BELOW_BF16 * F * n:
        return [s.sampled(W, g) for s in supports]
    full = W_mm @ g.to(W_mm.dtype).T  # [F, n]
    return [s.gather(full).to(W.dtype) for s in supports]


class _Encode(torch.autograd.Function):
    """Every layer's pre-activations pre[l] [F, n] (computed without autograd, in the matmul dtype)
    as a function of the encoders W [L, F, d] and b [L, F] on inputs x [n, L, d]: per layer all of
    them as they are (pairs None), or those at its pairs (`Pairs.values`, in W's dtype; its pre may
    then be None). One function
    for all layers, so that the backward writes each layer's slice of the gradients (a slice per layer
    would allocate [L, F, d] per layer). A dense layer's gradient product runs in the matmul dtype; a
    sparse layer's in W's (`Support.collect`).

    The context keeps the supports, not the `Pairs`: their values are this function's outputs, whose
    node would then hold them in a cycle through the context that Python's garbage collector cannot
    see (each step's pairs stayed in memory: +33 MB a step at F 8,192, L0 200)."""

    @staticmethod
    def forward(ctx, W, b, x, pre: list[torch.Tensor | None], pairs: list[Pairs | None], mm_dtype: torch.dtype):
        ctx.save_for_backward(x)
        ctx.supports = [None if p is None else p.support for p in pairs]
        ctx.shape, ctx.mm_dtype = W.shape, mm_dtype
        return tuple(p if s is None else s.values for p, s in zip(pre, pairs, strict=True))

    @staticmethod
    def backward(ctx, *grads):
        (x,) = ctx.saved_tensors
        grad_W, grad_b = x.new_empty(ctx.shape), x.new_zeros(ctx.shape[:2])
        for l, (grad, s) in enumerate(zip(grads, ctx.supports, strict=True)):
            if s is not None:
                grad_W[l] = s.collect(grad, x[:, l].contiguous())
                grad_b[l].index_add_(0, s.feature, grad)
                continue
            grad_b[l] = grad.sum(1)  # grad [F, n]
            if ctx.mm_dtype == x.dtype:
                torch.mm(grad, x[:, l], out=grad_W[l])
            else:
                grad_W[l] = grad.to(ctx.mm_dtype) @ x[:, l].to(ctx.mm_dtype)
        return grad_W, grad_b, None, None, None, None


def encode(clt, x: torch.Tensor, dtype: torch.dtype | None = None) -> list[LayerActs | DenseJumpReLU | SparseJumpReLU]:
    """Every layer's inputs x [n, L, d] -> its activations, dense or at their support, with the
    values and gradients of the dense `CrossLayerTranscoder.encode_layer` at those features. The
    encoder's matmuls run in `dtype` (default: the parameters'), the activations in the parameters'."""
    dtype = dtype or clt.W_enc.dtype
    with torch.no_grad():
        W_mm = torch.cat([clt.W_enc.to(dtype), clt.b_enc[..., None].to(dtype)], -1)  # [L, F, d + 1]: b, an input of 1
        x_mm = torch.cat([x, x.new_ones(*x.shape[:2], 1)], -1).to(dtype).permute(1, 2, 0).contiguous()  # [L, d + 1, n]
        if _screens(clt, dtype, x.device):
            pre, pairs = _screened(clt, W_mm, x_mm, dense_above(dtype, x.device))
        else:
            pre = torch.bmm(W_mm, x_mm).unbind(0)  # [F, n] each, rounded once as addmm's (1.5x as fast in bfloat16)
            pairs = [_pairs(clt, p, l, dense_above(dtype, x.device)) for l, p in enumerate(pre)]
    values = _Encode.apply(clt.W_enc, clt.b_enc, x, pre, pairs, dtype)
    return [_activate(clt, l, v, s) for l, (v, s) in enumerate(zip(values, pairs, strict=True))]


def _screens(clt, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a step's pairs are screened by a bfloat16 product (`_screened`): JumpReLU and ReLU layers
    with float32 or float64 matmuls on a CPU with bfloat16 dot products (AVX512-BF16 or AMX; elsewhere
    bfloat16 matmuls are emulated, slower than the float32 product they would save), of d_model below
    SCREEN_MARGIN's bound."""
    screened = dtype in (torch.float32, torch.float64) and clt.cfg.activation != "topk" and clt.cfg.d_model < 28_000
    return screened and device.type == "cpu" and torch.cpu._is_avx512_bf16_supported()


SCREEN_MARGIN = 2.0**-6
"""`_screened`'s margin, in units of S = ||(w_f, b_f)|| * ||(x_n, 1)|| >= sum_i |w_i x_i|: a bfloat16 product
(unit roundoff u = 2^-8; its operands rounded, the products summed in float32, the sum rounded once, as
oneDNN's bfloat16 matmuls do) is within (2u + u^2) S + (d + 2) 2^-24 S + u (S + margin) of the exact one,
and the float32 product (d + 1) 2^-24 S of it; the margin, itself a bfloat16 product, is at least
4 (1 - u)^2 u S > 3.9 u S, which exceeds the sum of both (3.02 u S + (2d + 3) 2^-24 S) for every d below
28,000 (3.09 u S at d 2,304). Seen on random operands: at most 1.16 * 2^-9 S between a bfloat16
product and that of its rounded operands."""


def _screened(
    clt, W_mm: torch.Tensor, x_mm: torch.Tensor, dense_above: float
) -> tuple[list[torch.Tensor | None], list[Pairs | None]]:
    """Every layer's pairs from encoders W_mm [L, F, d + 1] on inputs x_mm [L, d + 1, n] (float32 or
    float64, the bias as the weight of an input of 1) without their whole product: a bfloat16 one, with
    SCREEN_MARGIN * ||w_f|| * ||x_n|| added as one more term, is above the pairs' bound wherever the
    exact product is (there are the candidates); the candidates' exact values are then sampled products
    (`Support.sampled`) and compared as `_pairs` compares them. A dense layer (candidates over
    `dense_above` of [F, n]) gets its whole product. At F 8,192 (4 layers, d + 1 = 129, 1,024 tokens,
    one thread, 2026-12): the bfloat16 product takes ~12 ms, the float32 one ~72. Returns (pre [F, n]
    of the dense layers, else None; the pairs of the sparse layers, else None)."""
    norms_w, norms_x = torch.linalg.vector_norm(W_mm, dim=2), torch.linalg.vector_norm(x_mm, dim=1)  # [L, F], [L, n]
    W_screen = torch.cat([W_mm, (SCREEN_MARGIN * norms_w)[..., None]], -1).bfloat16()  # [L, F, d + 2]
    x_screen = torch.cat([x_mm, norms_x[:, None]], 1).bfloat16()  # [L, d + 2, n]
    rough = torch.bmm(W_screen, x_screen).unbind(0)  # [F, n] each, bfloat16
    pre, pairs = [], []
    for l, r in enumerate(rough):
        candidates = _above(r, _low(clt, l, torch.bfloat16))  # [F, n] bool
        if _count(candidates) > dense_above * candidates.numel():
            pre.append(W_mm[l] @ x_mm[l])
            pairs.append(None)
            continue
        s = Support.of(candidates)
        values = s.sampled(W_mm[l], x_mm[l].T)  # [nnz], the exact pre-activations
        low = _low(clt, l, values.dtype)
        kept = _nonzero(values > (low if isinstance(low, float) else low[:, 0].index_select(0, s.feature)))
        pre.append(None)
        pairs.append(_split(clt, l, s._at(kept), values.index_select(0, kept)))
    return pre, pairs


def dense_above(dtype: torch.dtype, device: torch.device) -> float:
    """The supported fraction of [n, F] above which a layer is dense, for matmuls in `dtype` on `device`."""
    if device.type == "cuda":
        return DENSE_ABOVE_BF16_CUDA if dtype == torch.bfloat16 else DENSE_ABOVE_CUDA
    return DENSE_ABOVE_BF16 if dtype == torch.bfloat16 else DENSE_ABOVE


def _pairs(clt, pre: torch.Tensor, layer: int, dense_above: float) -> Pairs | None:
    """The pairs of one layer's pre-activations [F, n]: each token's top k (TopK), pre > 0 (ReLU), or pre
    inside or above the JumpReLU threshold's straight-through window; None where they are over
    `dense_above` of [F, n] (the layer is then dense)."""
    cfg, (F, n), param = clt.cfg, pre.shape, clt.W_enc.dtype
    if cfg.activation == "topk":
        if cfg.topk > dense_above * F:
            return None
        top = pre.T.contiguous().topk(cfg.topk, dim=1).indices.flatten()  # [n * k] (contiguous: ~10x faster)
        token = torch.arange(n, device=pre.device).repeat_interleave(cfg.topk)
        order = (top * n + token).argsort()
        s = Support.of_pairs(top[order], token[order], F, n)
        return Pairs(s.gather(pre).to(param), s)
    supported = _above(pre, _low(clt, layer, pre.dtype))  # [F, n] bool
    if _count(supported) > dense_above * supported.numel():
        return None
    s = Support.of(supported)
    return _split(clt, layer, s, s.gather(pre))


def _low(clt, layer: int, dtype: torch.dtype) -> torch.Tensor | float:
    """The bound above which a pre-activation in `dtype` is supported: 0 (ReLU), or the largest value of
    `dtype` at most the lower bound of the JumpReLU threshold's straight-through window [F, 1]."""
    if clt.cfg.activation == "relu":
        return 0.0
    return _at_most(clt.threshold[layer].detach().double() - clt.cfg.bandwidth / 2, dtype)


def _split(clt, layer: int, s: Support, values: torch.Tensor) -> Pairs:
    """A layer's pairs from its supported pairs `s` and their pre-activations [nnz] in the matmul dtype:
    JumpReLU's split into the active ones and the window's inactive ones."""
    param, dtype = clt.W_enc.dtype, values.dtype
    if clt.cfg.activation == "relu":
        return Pairs(values.to(param), s)
    threshold = clt.threshold[layer].detach()
    active = values > _at_most(threshold, dtype)[:, 0].index_select(0, s.feature)  # as JumpReLU's pre > threshold
    on, window, places = s.split(active)
    values = values.index_select(0, places)
    high = _at_least(threshold.double() + clt.cfg.bandwidth / 2, dtype)[:, 0].index_select(0, on.feature)
    return Pairs(values.to(param), on, window, _nonzero(values < high))


def _count(mask: torch.Tensor) -> int:
    """The set elements of a bool tensor; on a CPU by numpy (torch's count_nonzero: 5.2 instead of 0.4 ms
    at [8,192, 1,024], one thread, 2026-12)."""
    if mask.device.type != "cpu":
        return int(mask.count_nonzero())
    return int(np.count_nonzero(mask.numpy()))


def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    """The places [k] where a bool [nnz] is set; on a CPU by numpy (torch's nonzero: ~65 ns a pair)."""
    if mask.device.type != "cpu":
        return mask.nonzero()[:, 0]
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.half: torch.int16}
"""A float dtype -> the integer dtype of its bits."""


def _above(pre: torch.Tensor, low: torch.Tensor | float) -> torch.Tensor:
    """pre [F, n] > low [F, 1] (or a scalar), both in one float dtype: bool [F, n]. On a CPU numpy
    compares the floats' bits as integers, which order the non-negative floats as their values (rows
    with a negative bound are compared as floats): 3 instead of torch's 13 ms at [8,192, 1,024] in
    bfloat16 (one thread, 2026-12)."""
    if pre.device.type != "cpu":
        return pre > low
    low = torch.as_tensor(low, dtype=pre.dtype).expand(len(pre), 1)
    bits = _BITS[pre.dtype]
    above = torch.from_numpy(pre.view(bits).numpy() > low.view(bits).numpy())
    negative = torch.signbit(low[:, 0]).nonzero()[:, 0]  # their bits order the other way
    if len(negative):
        above[negative] = pre[negative] > low[negative]
    return above


def _at_most(bound: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest values of `dtype` <= bound [F], as [F, 1]: for p in `dtype`, p > bound exactly where
    p > this (comparing within one dtype: 30 instead of 54 ms at [8,192, 1,024] bfloat16)."""
    rounded = bound.to(dtype)
    below = torch.nextafter(rounded, torch.full_like(rounded, -torch.inf))
    return torch.where(rounded.to(bound.dtype) > bound, below, rounded)[:, None]


def _at_least(bound: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest values of `dtype` >= bound [F], as [F, 1]: for p in `dtype`, p < bound exactly where
    p < this: `_at_most` mirrored (negation and rounding to nearest are exact mirror images)."""
    return -_at_most(-bound, dtype)


def _activate(clt, layer: int, pre: torch.Tensor, pairs: Pairs | None) -> LayerActs | DenseJumpReLU | SparseJumpReLU:
    """The activations of one layer's pre-activations: [F, n] in the matmul dtype (pairs None) or
    [nnz] at the pairs."""
    cfg, F = clt.cfg, clt.W_enc.shape[1]
    if cfg.activation == "jumprelu":
        if pairs is None:
            return DenseJumpReLU(pre, clt.threshold[layer], cfg.bandwidth)
        return SparseJumpReLU(pre, pairs, clt.threshold[layer], cfg.bandwidth)
    if pairs is None:
        pre = pre.T.to(clt.W_enc.dtype)  # [n, F]
    values = torch.relu(pre)
    if cfg.activation == "topk" and pairs is None:
        top = pre.detach().topk(cfg.topk, dim=1).indices  # [n, k]
        values = values * torch.zeros_like(pre, dtype=torch.bool).scatter_(1, top, True)
    return LayerActs(values, None if pairs is None else pairs.support, F)


class _SparseDecode(torch.autograd.Function):
    """values [nnz] at a support, decoders W [F, T, d] -> the contribution [n, T, d], every product in
    W's dtype (a ReLU or TopK layer: TopK 32 of 8,192 is 0.4% of [F, n], where bfloat16 embedding bags
    gained less than casting W and its gradient cost: 5-15% slower whole steps)."""

    @staticmethod
    def forward(ctx, values, W, support: Support):
        W_flat = W.detach().flatten(1)
        ctx.save_for_backward(values, W_flat)
        ctx.support, ctx.shape = support, W.shape
        return support.spread(values.detach(), W_flat).view(support.n_tokens, *W.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        values, W_flat = ctx.saved_tensors
        s, g = ctx.support, grad.reshape(grad.shape[0], -1)  # [n, T * d]
        return s.sampled(W_flat, g), s.collect(values.detach(), g).view(ctx.shape), None


def decode(acts: LayerActs, W: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One source layer's decoders W [F, T, d] applied to its activations: [n, T, d] in W's dtype, a
    dense layer's products (forward and backward) in `dtype` (default W's), a sparse one's in W's."""
    if acts.support is None:
        dtype = dtype or W.dtype
        out = acts.values.to(dtype) @ W.flatten(1).to(dtype)
        return out.to(W.dtype).view(len(acts.values), *W.shape[1:])
    return _SparseDecode.apply(acts.values, W, acts.support)
