"""The training step's contractions give the dense reference's loss and gradients whichever way
`circuits.train.kernels` picks for them (sparse products below DENSE_ABOVE, dense matmuls above)."""

import pytest
import torch

from circuits.train import kernels
from circuits.train.config import TrainConfig
from circuits.train.objective import initialise, losses
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder


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
    if dense_above == 0.3:
        dense = [a.support is None for a in kernels.encode(clt, x)]
        assert dense == ([False, False, False] if activation == "topk" else [False, True, False])
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
