"""bfloat16 attribution on the CPU: the adjacency is allocated in bfloat16 (numpy has no such type)
and the graph is float32's up to bfloat16 rounding."""

import torch

from circuits.attribution.attribute import attribute, untouched_zeros

FLAGSHIP = "Fact: Dallas is in the state whose capital is"


def test_untouched_zeros_in_every_float_width():
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for huge_pages in (False, True):
            zeros = untouched_zeros(3, 5, dtype=dtype, huge_pages=huge_pages)
            assert zeros.dtype == dtype and zeros.shape == (3, 5) and not zeros.any()


def test_untouched_zeros_in_huge_pages_hold_what_is_written_and_nothing_else():
    a, b = (untouched_zeros(700, 1024, dtype=torch.float32, huge_pages=True) for _ in range(2))  # 2.8 MB each
    a[:600] = torch.arange(1024.0)
    assert a[:600].equal(torch.arange(1024.0).expand(600, -1)) and not a[600:].any() and not b.any()


def test_a_bfloat16_graph_on_the_cpu_is_the_float32_graph_rounded(demo_model, demo_clt):
    full = attribute(FLAGSHIP, demo_model, demo_clt, progress=False)
    half = attribute(FLAGSHIP, demo_model, demo_clt, progress=False, dtype="bfloat16")
    assert half.adjacency.dtype == torch.bfloat16
    # features at their threshold may flip: compare the nodes both graphs have
    index = {tuple(f): i for i, f in enumerate(half.features.tolist())}
    both = [(i, index[tuple(f)]) for i, f in enumerate(full.features.tolist()) if tuple(f) in index]
    assert len(both) >= 0.95 * full.n_features
    tail = range(len(full.adjacency) - full.n_features)  # errors, tokens, logits: the same layout
    a = [i for i, _ in both] + [full.n_features + k for k in tail]
    b = [j for _, j in both] + [half.n_features + k for k in tail]
    expected, got = full.adjacency[a][:, a], half.adjacency[b][:, b].float()
    assert (got - expected).abs().max() <= 0.01 * expected.abs().max()
    for x, y in zip(half.scores(), full.scores(), strict=True):
        assert abs(x - y) < 0.01
