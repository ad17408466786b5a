"""Head loadings: every edge's parts sum to the edge at every attention layer, and each head's part
is autograd's edge minus the edge with that head's output detached, on LayerNorm, rotary/RMSNorm/
grouped-query and Gemma-2-style random models, in float64."""

import pytest
import torch

from circuits.attribution.attribute import attribute
from circuits.attribution.heads import head_loadings
from tests.attribution.test_attribute import GEMMA_LIKE, LLAMA_LIKE, _random_clt, _random_model
from tests.reference import autograd_rows

STYLES = {"layernorm": {}, "llama": LLAMA_LIKE, "gemma2": GEMMA_LIKE}
PROMPT = "Fact : Dallas is in the state"


def _pair(style: str, skip: bool = False):
    model = _random_model(seed=2, **STYLES[style]).double()
    model.cfg.dtype = torch.float64
    clt = _random_clt(model, seed=2, skip=skip).double()
    return model, clt, attribute(PROMPT, model, clt, dtype="float64", progress=False)


@pytest.mark.parametrize("style,skip", [("layernorm", False), ("layernorm", True), ("llama", False), ("gemma2", False)])
def test_head_loadings_sum_to_every_edge(style, skip):
    model, clt, graph = _pair(style, skip)
    edges = (graph.adjacency != 0).nonzero()
    edges = edges[torch.randperm(len(edges), generator=torch.Generator().manual_seed(0))[:3000]]
    loadings = head_loadings(graph, model, clt, edges)
    weight = graph.adjacency[edges[:, 0], edges[:, 1]]
    total = loadings.heads.sum(-1) + loadings.other  # [E, L]
    relative = (total - weight[:, None]).abs() / weight.abs()[:, None]
    assert loadings.on_way.any() and relative[loadings.on_way].max() <= 1e-9
    assert (loadings.heads[~loadings.on_way] == 0).all()  # no head below the source's writes
    # information that moved between positions moved through heads: no residual part at a single layer
    moved = (
        graph.features[edges[:, 1].clamp(max=graph.n_features - 1), 1]
        != graph.features[edges[:, 0].clamp(max=graph.n_features - 1), 1]
    )
    moved &= (edges < graph.n_features).all(1)
    one_layer = loadings.on_way.sum(1) == 1
    assert (moved & one_layer).sum() > 5
    only = (moved & one_layer).nonzero()[:, 0]
    layer = loadings.on_way[only].long().argmax(1)
    assert loadings.other[only, layer].abs().max() <= 1e-9 * weight[only].abs().max()
    field = loadings.field(0)
    assert sum(field[next(iter(field))].values()) == pytest.approx(weight[0].item(), rel=1e-9)


def _detach(heads: list[int]):
    """A hook on hook_z [batch, pos, head, d_head] that detaches the output of `heads`."""

    def hook(z, hook):
        cut = torch.zeros(z.shape[2], dtype=torch.bool)
        cut[heads] = True
        return torch.where(cut[:, None], z.detach(), z)

    return hook


@pytest.mark.parametrize("style", STYLES)
def test_each_heads_part_is_autograd_with_that_head_detached(style):
    model, clt, graph = _pair(style)
    L, H, V = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_vocab
    top = (graph.features[:, 0] == L - 1).nonzero()[:, 0]
    rows = top[-2:].tolist()  # features of the top layer (every attention layer is on their way) and a logit
    logit = torch.eye(V, dtype=torch.float64)[graph.target_tokens[0]] - 1 / V
    targets = [tuple(graph.features[i].tolist()) for i in rows] + [logit]
    full = autograd_rows(model, clt, graph.tokens, targets)  # [3, sources]
    nodes = torch.tensor(rows + [graph.target_slice.start])
    edges = torch.cartesian_prod(nodes, torch.arange(full.shape[1]))
    loadings = head_loadings(graph, model, clt, edges)
    ours_heads = loadings.heads.view(len(nodes), -1, L, H)
    ours_other = loadings.other.view(len(nodes), -1, L)
    scale = full.abs().amax(1)[:, None]
    assert (scale > 0).all()
    for l in range(L):
        for h in range(H):
            detached = autograd_rows(model, clt, graph.tokens, targets, [(f"blocks.{l}.attn.hook_z", _detach([h]))])
            assert ((ours_heads[:, :, l, h] - (full - detached)).abs() / scale).max() <= 1e-9
        rest = autograd_rows(model, clt, graph.tokens, targets, [(f"blocks.{l}.attn.hook_z", _detach(list(range(H))))])
        assert ((ours_other[:, :, l] - rest).abs() / scale).max() <= 1e-9
    assert ours_heads.abs().amax() > 1e-3 * scale.min()  # the heads carry something
