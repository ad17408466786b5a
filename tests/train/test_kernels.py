"""The training step's contractions give the dense reference's loss and gradients whichever way
`circuits.train.kernels` picks for them (sparse products below DENSE_ABOVE, dense matmuls above)."""

import dataclasses
import weakref

import pytest
import torch

from circuits.train import kernels
from circuits.train.config import TrainConfig
from circuits.train.objective import decoder_norms, initialise, losses
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder, JumpReLU


@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk"])
@pytest.mark.parametrize("dense_above", [0.0, 0.3, 1.0])  # always dense; layer 1 dense, the rest sparse; always sparse
def test_either_contraction_equals_the_dense_reference(activation, dense_above, monkeypatch):
    monkeypatch.setattr(kernels, "DENSE_ABOVE", dense_above)
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=3, d_model=16, n_features=64, activation=activation, topk=5))
    clt = clt.double()
    x, y = torch.randn(50, 3, 16, dtype=torch.float64), torch.randn(50, 3, 16, dtype=torch.float64)
    initialise(clt, x, TrainConfig(target_fire_fraction=0.1))
    with torch.no_grad():
        clt.b_enc[1] += 1.0  # layer 1 fires on most tokens
        clt.W_dec[0][3] = clt.W_dec[1][5] = 0.0  # zero rows: norm 0, its gradient 0
    if dense_above == 0.3:
        acts = kernels.encode(clt, x)
        assert [_is_dense(a) for a in acts] == ([False, False, False] if activation == "topk" else [False, True, False])
    if activation == "jumprelu" and dense_above == 1.0:  # the window's inactive pairs and active ones in it
        pairs = [a.pairs for a in kernels.encode(clt, x)]
        assert all(len(p.window.feature) > 5 and len(p.near) > 5 for p in pairs)
    cfg, dead = TrainConfig(sparsity_coef=0.1, preact_coef=0.01), torch.rand(3, 64) < 0.3
    results = []
    for sparse in (True, False):
        clt.zero_grad()
        r = losses(clt, x, y, step=5, cfg=cfg, dead=dead, sparse=sparse)
        r.total.backward()
        results.append((r, {k: p.grad.clone() for k, p in clt.named_parameters() if p.grad is not None}))
    (rs, gs), (rd, gd) = results
    torch.testing.assert_close(rs.total, rd.total, rtol=1e-12, atol=0)
    assert gs.keys() == gd.keys() and {"W_enc", "b_enc", "W_dec.0", "W_dec.2"} <= gs.keys()
    for k in gs:
        torch.testing.assert_close(gs[k], gd[k], rtol=1e-10, atol=1e-12, msg=k)
    assert torch.equal(rs.fired, rd.fired) and 0 < rs.l0.mean() < 64


@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk"])
def test_a_steps_pairs_are_freed_after_its_backward(activation, monkeypatch):
    """Nothing of a step outlives it: the sparse layers' pairs are freed with the loss and its graph,
    without Python's cycle collector (which cannot see a cycle through an autograd node)."""
    monkeypatch.setattr(kernels, "DENSE_ABOVE", 1.0)
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=8, n_features=32, activation=activation, topk=3))
    x = torch.randn(20, 2, 8)
    initialise(clt, x, TrainConfig(target_fire_fraction=0.1))
    acts = kernels.encode(clt, x)
    supports = [weakref.ref(a.pairs.support if activation == "jumprelu" else a.support) for a in acts]
    loss = sum(a.terms(clt.W_dec[l], 1.0, torch.float32).out.square().sum() for l, a in enumerate(acts))
    loss.backward()
    del acts, loss
    assert [s() for s in supports] == [None, None]


def _is_dense(acts) -> bool:
    return isinstance(acts, kernels.DenseJumpReLU) or (isinstance(acts, kernels.LayerActs) and acts.support is None)


@pytest.mark.parametrize("shape", [(40, 64), (30, 3, 64)])  # a layer's [n, F]; the reference's [n, L, F] with [L, F]
def test_jumprelu_gradients_are_the_straight_through_estimator(shape):
    """pre's gradient passes where a feature is on; the threshold's is -(threshold / bandwidth) times the
    sum of grad_out over the tokens where (pre - threshold) / bandwidth lies in the rectangle (-1/2, 1/2)."""
    torch.manual_seed(0)
    bandwidth = 0.3
    pre = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    threshold = (torch.rand(shape[1:], dtype=torch.float64) * 0.5).requires_grad_()
    grad_out = torch.randn(shape, dtype=torch.float64)
    acts = JumpReLU.apply(pre, threshold, bandwidth)
    acts.backward(grad_out)
    on = pre.detach() > threshold.detach()
    torch.testing.assert_close(acts, pre.detach() * on, rtol=0, atol=0)
    torch.testing.assert_close(pre.grad, grad_out * on, rtol=0, atol=0)
    u = (pre.detach() - threshold.detach()) / bandwidth
    rectangle = ((u > -0.5) & (u < 0.5)).double()
    expected = (-(threshold.detach() / bandwidth) * rectangle * grad_out).sum(0)
    assert rectangle.sum() > 10
    torch.testing.assert_close(threshold.grad, expected, rtol=1e-12, atol=1e-14)


def _rounded(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bfloat16 in the forward, in float64; the gradient passes unchanged."""
    t = t.double()
    return t + (t.detach().bfloat16().double() - t.detach())


def _bf16_mixed_emulated(clt, x, y, coef: float, c: float) -> torch.Tensor:
    """The bf16-mixed objective in float64 with explicit roundings where its products round: operands
    and outputs of the encoder matmul and of each source layer's decoder product (dense or sparse)."""
    pre = _rounded(torch.einsum("nld,lfd->nlf", _rounded(x), _rounded(clt.W_enc)) + _rounded(clt.b_enc))
    acts = JumpReLU.apply(pre, clt.threshold.double(), clt.cfg.bandwidth)  # [n, L, F]
    recon = clt.b_dec.double().expand(len(x), -1, -1).clone()
    for s, W in enumerate(clt.W_dec):
        out = _rounded(acts[:, s]) @ _rounded(W).flatten(1)  # [n, T * d]
        recon[:, s:] = recon[:, s:] + _rounded(out).view(len(x), -1, W.shape[-1])
    norms = torch.stack([torch.linalg.vector_norm(w.double(), dim=(1, 2)) for w in clt.W_dec])  # [L, F]
    sparsity = torch.tanh(c * acts * norms).sum()
    return (((recon - y.double()) ** 2).sum() + coef * sparsity) / len(x)


@pytest.mark.parametrize(
    ("dense_above", "sampled_below"), [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)]
)  # every layer dense; every layer sparse, its activations' gradient a dense bfloat16 product, or sampled
def test_bf16_mixed_is_the_objective_with_its_products_rounded_to_bfloat16(dense_above, sampled_below, monkeypatch):
    monkeypatch.setattr(kernels, "DENSE_ABOVE_BF16", dense_above)
    monkeypatch.setattr(kernels, "SAMPLED_BELOW_BF16", sampled_below)
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=3, d_model=16, n_features=64))
    x = torch.randn(50, 3, 16)
    initialise(clt, x, TrainConfig(target_fire_fraction=0.1))
    y = clt(x)[0].detach() + 0.01 * torch.randn(50, 3, 16)  # close: the loss is then mostly the roundings' error
    cfg, dead = TrainConfig(sparsity_coef=0.01, precision="bf16-mixed"), torch.zeros(3, 64, dtype=torch.bool)
    r = losses(clt, x, y, step=cfg.steps - 1, cfg=cfg, dead=dead)
    r.total.backward()
    ours = {k: p.grad.clone() for k, p in clt.named_parameters()}
    clt.zero_grad()
    reference = _bf16_mixed_emulated(clt, x, y, cfg.sparsity_coef, cfg.sparsity_c)
    reference.backward()
    torch.testing.assert_close(r.total.double(), reference.detach(), rtol=1e-5, atol=0)
    fp32 = losses(clt, x, y, step=cfg.steps - 1, cfg=dataclasses.replace(cfg, precision="fp32"), dead=dead).total
    assert abs(fp32 - r.total) > 1e-4 * fp32  # the products did run in bfloat16
    for k, p in clt.named_parameters():  # ours also rounds the backward's products: ~0.4% an element
        assert ours[k].dtype == torch.float32, k
        assert (ours[k] - p.grad).norm() < 2e-2 * p.grad.norm(), k


def test_a_bfloat16_bound_compares_as_the_float32_one():
    """The support of bfloat16 pre-activations is found against bounds rounded down to bfloat16."""
    torch.manual_seed(0)
    bound = torch.randn(200) * 0.3
    pre = (bound[:, None] + torch.randn(200, 300) * 0.01).bfloat16()  # [F, n], many within a bfloat16 step
    assert torch.equal(pre > kernels._at_most(bound, torch.bfloat16), pre.float() > bound[:, None])
    assert kernels._at_most(bound, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_support_is_torchs_comparison_and_nonzero(dtype):
    """On a CPU the support is found by comparing the floats' bits as integers (numpy): the same pairs as
    torch's comparison and nonzero, with negative, zero and negative-zero bounds and values."""
    torch.manual_seed(0)
    bound = torch.randn(300) * 0.3
    bound[:4], bound[4] = 0.0, -0.0
    pre = (bound[:, None] + torch.randn(300, 200) * 0.05).to(dtype)  # [F, n]
    pre[:8, :3], pre[:8, 3:6] = 0.0, -0.0
    low = kernels._at_most(bound, dtype)
    assert (low < 0).sum() > 50 and (low > 0).sum() > 50
    for p in (pre, pre[:, ::3]):  # a layer, a strided view
        assert torch.equal(kernels._above(p, low), p > low)
        assert torch.equal(kernels._above(p, 0.0), p > 0)
        assert kernels._count(p > low) == (p > low).sum().item()
    support, (feature, token) = kernels.Support.of(pre > low), (pre > low).nonzero(as_tuple=True)
    assert torch.equal(support.feature, feature) and torch.equal(support.token, token)
    assert torch.equal(support.crow[1:], (pre > low).sum(1).cumsum(0))


def test_a_bfloat16_upper_bound_compares_as_the_float64_one():
    """The dense layer's window |pre - threshold| < bandwidth / 2 is pre against bounds computed in
    float64 and rounded up (this one) or down to bfloat16."""
    torch.manual_seed(0)
    bound = torch.randn(200, dtype=torch.float64) * 0.3
    pre = (bound[:, None] + torch.randn(200, 300, dtype=torch.float64) * 0.01).bfloat16()  # [F, n]
    assert torch.equal(pre < kernels._at_least(bound, torch.bfloat16), pre.double() < bound[:, None])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [200, 256, 1_000])
def test_active_tokens_are_counted_exactly(dtype, n):
    mask = torch.rand(64, n) < 0.95  # rows of up to 1,000 ones: above 256, bfloat16 sums round
    assert torch.equal(kernels._count_rows(mask.to(dtype)), mask.sum(1).float())


def test_decoder_norms_have_autograds_gradient():
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=3, d_model=8, n_features=16)).double()
    with torch.no_grad():
        clt.W_dec[1][3] = 0.0  # a zero row: gradient 0, as autograd's masked fill gives
    weights = torch.randn(3, 16, dtype=torch.float64)
    (decoder_norms(clt) * weights).sum().backward()
    ours = [w.grad.clone() for w in clt.W_dec]
    reference = torch.stack([torch.linalg.vector_norm(w, dim=(1, 2)) for w in clt.W_dec])
    grads = torch.autograd.grad((reference * weights).sum(), list(clt.W_dec))
    for a, b in zip(ours, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert torch.equal(ours[1][3], torch.zeros_like(ours[1][3]))


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_a_screened_layer_has_the_pairs_of_its_whole_product(activation, monkeypatch):
    """float32 pairs found by the bfloat16 product with its margin (`_screened`) are those of the whole
    float32 product, with thousands of pre-activations nearer their bound than the bfloat16 product's
    rounding (which alone misplaces some), none within float32 rounding of it."""
    monkeypatch.setattr(kernels, "DENSE_ABOVE", 1.0)
    torch.manual_seed(0)
    cfg = CLTConfig(n_layers=2, d_model=128, n_features=256, activation=activation, bandwidth=1e-4)
    clt = CrossLayerTranscoder(cfg)
    x = torch.randn(400, 2, 128)
    with torch.no_grad():
        pre = torch.einsum("nld,lfd->lfn", x.double(), clt.W_enc.double()) + clt.b_enc.double()[..., None]
        ordered = pre.sort(-1).values  # [L, F, n]
        low = ordered[..., 200] - 2**-10 * pre.abs().amax()  # [L, F]: within bfloat16's rounding of a median
        close = (pre - low[..., None]).abs().amin(-1) < 2**-13 * pre.abs().amax()  # [L, F]: within float32's
        low = torch.where(close, ordered[..., 0] - 1.0, low)  # those features on every token instead
        if activation == "relu":
            clt.b_enc -= low.float()
            low = torch.zeros_like(low)
            pre = torch.einsum("nld,lfd->lfn", x.double(), clt.W_enc.double()) + clt.b_enc.double()[..., None]
        else:
            clt.threshold.copy_(low + clt.cfg.bandwidth / 2)
            low = kernels._at_most(clt.threshold.double().flatten() - clt.cfg.bandwidth / 2, torch.float32).view(2, -1)
    gap = (pre - low.double()[..., None]).abs()
    rough = torch.einsum("nld,lfd->lfn", x.bfloat16(), clt.W_enc.bfloat16()) + clt.b_enc.bfloat16()[..., None]
    assert gap.min() > 2**-15 * pre.abs().amax() and (gap < 2**-8 * pre.abs().amax()).sum() > 1000
    assert ((rough > low[..., None]) != (pre > low.double()[..., None])).sum() > 10  # bfloat16 alone misplaces some
    with torch.no_grad():
        monkeypatch.setattr(kernels, "_screens", lambda *args: True)  # on CPUs without bfloat16 dot products too
        screened = kernels.encode(clt, x)
        monkeypatch.setattr(kernels, "_screens", lambda *args: False)
        whole = kernels.encode(clt, x)
    for s, w in zip(screened, whole, strict=True):
        a, b = (s.pairs.support, w.pairs.support) if activation == "jumprelu" else (s.support, w.support)
        assert torch.equal(a.feature, b.feature) and torch.equal(a.token, b.token)
        torch.testing.assert_close(s.values, w.values, rtol=1e-5, atol=1e-5)
