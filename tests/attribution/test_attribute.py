"""Attribution graphs: every edge against autograd through hooks on the real TransformerLens model,
every node's input against the sum of its edges, targets, the feature cap."""

import copy
import json

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.components import LayerNorm

from circuits.attribution import replacement
from circuits.attribution.attribute import AttributionConfig, _feature_influence, attribute
from circuits.attribution.graph import Graph, compute_influence, normalize_matrix
from circuits.attribution.interventions import (
    Intervention,
    predicted_ablation_effects,
    run_with_interventions,
    validate,
)
from circuits.attribution.replacement import build_replacement, record_forward
from circuits.attribution.targets import resolve_targets
from circuits.cli import main
from circuits.errors import CircuitsError
from circuits.models import ARCHITECTURES, DEMO_MODEL_DIR, load_model
from circuits.transcoders.circuit_tracer import save_transcoder
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder
from tests.hf_models import PROMPT as HF_PROMPT
from tests.hf_models import TINY_CONFIGS, write_tiny_hf_model
from tests.reference import autograd_rows, rows_against_autograd

FLAGSHIP = "Fact: Dallas is in the state whose capital is"
MODEL_KINDS = [k for k in TINY_CONFIGS if TINY_CONFIGS[k][0].__name__ in ARCHITECTURES]
PROMPTS = [FLAGSHIP, "The capital of Texas is", "Fact : Boston is a city in"]


def _identity_error(graph) -> torch.Tensor:
    """|input - (sum of incoming edges + bias)| / (sum of |edges| + |bias|) for every target node."""
    rows = torch.cat([graph.adjacency[: graph.n_features], graph.adjacency[graph.target_slice]]).double()
    scale = rows.abs().sum(1) + graph.bias.abs().double()
    return (graph.inputs.double() - rows.sum(1) - graph.bias.double()).abs() / scale


def _random_model(n_layers: int = 3, seed: int = 0, **config) -> HookedTransformer:
    """A small random model (d_vocab 269 != d_model 32) with every bias and norm weight random."""
    cfg = HookedTransformerConfig(**{
        **dict(n_layers=n_layers, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=269, n_ctx=32, act_fn="gelu",
               normalization_type="LN", positional_embedding_type="standard", seed=seed,
               tokenizer_name=str((DEMO_MODEL_DIR / "tokenizer").resolve())),
        **config,
    })  # fmt: skip
    model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".b", "b_O", "b_V", "b_Q", "b_K", "b_in", "b_out", "b_U")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith(".w"):
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _random_clt(model, cross_layer=True, skip=False, n_features=64, seed=0, **config) -> CrossLayerTranscoder:
    """A random CLT for `model` (`config`: other CLTConfig fields, e.g. its hooks)."""
    L, d = model.cfg.n_layers, model.cfg.d_model
    cfg = CLTConfig(n_layers=L, d_model=d, n_features=n_features, cross_layer=cross_layer, skip=skip, **config)
    clt = CrossLayerTranscoder(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(clt.W_enc.shape, generator=gen) / d**0.5)
        clt.b_enc.copy_(torch.randn(clt.b_enc.shape, generator=gen) * 0.1)
        clt.threshold.fill_(0.5)
        for w in clt.W_dec:
            w.copy_(torch.randn(w.shape, generator=gen) * 0.1)
        clt.b_dec.copy_(torch.randn(clt.b_dec.shape, generator=gen) * 0.1)
        if skip:
            clt.W_skip.copy_(torch.randn(clt.W_skip.shape, generator=gen) * 0.05)
    return clt.eval()


def _check_against_autograd(model, clt, prompt, n_features=6):
    graph = attribute(prompt, model, clt, progress=False)  # every row in one walk (`single_pass`)
    batched = attribute(prompt, model, clt, batch_size=32, progress=False)
    assert torch.allclose(batched.adjacency, graph.adjacency, atol=1e-6 * graph.adjacency.abs().max())
    assert graph.n_features > n_features
    gen = torch.Generator().manual_seed(1)
    rows = torch.randperm(graph.n_features, generator=gen)[:n_features].tolist()
    ours, reference = rows_against_autograd(graph, model, clt, rows)
    largest = reference.abs().amax(1, keepdim=True)
    assert (largest > 0).all()
    assert ((ours - reference).abs() / largest).max() <= 1e-4
    sample = torch.randperm(reference.numel(), generator=gen)[:200]
    big = reference.flatten()[sample].abs() > 1e-3 * largest.expand_as(reference).flatten()[sample]
    relative = (ours.flatten()[sample] - reference.flatten()[sample]).abs() / reference.flatten()[sample].abs()
    assert big.sum() > 10 and relative[big].max() <= 1e-3  # float32; see the float64 test for 1e-4
    return graph


def test_edges_match_autograd_on_the_demo_pair(demo_model, demo_clt):
    _check_against_autograd(demo_model, demo_clt, FLAGSHIP)


@pytest.mark.parametrize("cross_layer,skip", [(True, False), (False, False), (True, True), (False, True)])
def test_edges_match_autograd_on_random_models(cross_layer, skip):
    model = _random_model()
    clt = _random_clt(model, cross_layer, skip)
    _check_against_autograd(model, clt, "The capital of Texas is Austin and")


LLAMA_LIKE = dict(normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2,
                  gated_mlp=True, act_fn="silu")  # fmt: skip
"""Llama's layout: RMSNorm, rotary positions, grouped-query attention, a gated MLP."""


def test_edges_match_autograd_on_a_rotary_rms_grouped_query_model():
    model = _random_model(**LLAMA_LIKE)
    _check_against_autograd(model, _random_clt(model), "The capital of Texas is Austin and")


GEMMA_LIKE = dict(normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2,
                  gated_mlp=True, act_fn="gelu", use_normalization_before_and_after=True, attn_scores_soft_cap=5.0,
                  output_logits_soft_cap=2.0)  # fmt: skip
"""Gemma 2's layout: RMSNorm before and after attention and the MLP, soft-capped scores and logits."""


@pytest.mark.parametrize("post_norm", ["RMS", "LN"])
def test_edges_match_autograd_with_norms_after_attention_and_mlp(post_norm):
    """The norm after attention is frozen like the one before it; the one after the MLP is part of
    what the CLT replaces. Logit targets are the logits before the soft cap, chosen by the
    probabilities after it. TransformerLens builds RMSNorms after; LayerNorms (centring) are
    swapped in by hand."""
    model = _random_model(**GEMMA_LIKE)
    if post_norm == "LN":
        gen = torch.Generator().manual_seed(3)
        for block in model.blocks:
            block.ln1_post, block.ln2_post = LayerNorm(model.cfg), LayerNorm(model.cfg)
            for ln in (block.ln1_post, block.ln2_post):
                ln.w.data = 1 + torch.randn(ln.w.shape, generator=gen) * 0.2
                ln.b.data = torch.randn(ln.b.shape, generator=gen) * 0.1
        model.setup()
    clt, prompt = _random_clt(model), "The capital of Texas is Austin and"
    graph = _check_against_autograd(model, clt, prompt)
    assert _identity_error(graph).max() <= 1e-5
    probs = model(graph.tokens[None])[0, -1].softmax(-1)
    assert torch.allclose(graph.target_probs, probs[graph.target_tokens], atol=1e-6)
    dense = attribute(  # every gradient through layer 0, densely
        prompt, model, clt, batch_size=32, progress=False, backward_terms=False, embedding_image_floats=0
    )
    assert torch.allclose(dense.adjacency, graph.adjacency, atol=1e-5)


@pytest.mark.parametrize("how", ["in place", "through .data", "a new tensor"])
def test_a_weight_changed_between_two_calls_is_the_second_graphs(how):
    """Nothing derived from the weights outlives a call. A cache keyed on each parameter's data_ptr
    and version would serve a write through `.data` stale (it bumps no version): W_V of layer 1
    changed between two attributions, and the second graph against autograd on the changed model."""
    model = _random_model()
    clt = _random_clt(model)
    prompt = "Fact : Dallas is in the state"
    first = attribute(prompt, model, clt, progress=False)
    attn = model.blocks[1].attn
    version = attn.W_V._version
    with torch.no_grad():
        if how == "in place":
            attn.W_V.mul_(1.5)
        elif how == "through .data":
            attn.W_V.data.mul_(1.5)
        else:
            attn.W_V = torch.nn.Parameter(attn.W_V * 1.5)
    assert (attn.W_V._version == version) == (how == "through .data")  # (a new tensor: a new counter)
    second = attribute(prompt, model, clt, progress=False)
    assert not torch.allclose(first.inputs[-1], second.inputs[-1])
    rows = (second.features[:, 0] == 2).nonzero()[:4, 0].tolist()
    ours, reference = rows_against_autograd(second, model, clt, rows)
    assert len(rows) == 4 and ((ours - reference).abs() / reference.abs().amax(1, keepdim=True)).max() <= 1e-4


def test_edges_match_autograd_on_a_long_prompt(demo_model, demo_clt):
    """40 tokens: late targets' gradients stay sums of terms through three attention layers (25
    terms); their rows against autograd, and the whole graph against the dense backward."""
    prompt = " ".join(["Fact : Dallas is in the state whose capital is Austin ."] * 4)
    graph = attribute(prompt, demo_model, demo_clt, progress=False)
    H = demo_model.cfg.n_heads
    assert graph.n_pos > 40 and build_replacement(demo_model, demo_clt, graph.tokens).terms_are_cheaper(
        (H + 1) ** 2, 40
    )
    layer, pos = graph.features[:, 0], graph.features[:, 1]
    rows = torch.cat([((layer == l) & (pos > 36)).nonzero()[:3, 0] for l in (3, 2)]).tolist()
    ours, reference = rows_against_autograd(graph, demo_model, demo_clt, rows)
    assert ((ours - reference).abs() / reference.abs().amax(1, keepdim=True)).max() <= 1e-4
    dense = attribute(prompt, demo_model, demo_clt, progress=False, backward_terms=False, batch_size=64)  # batched
    assert torch.allclose(dense.adjacency, graph.adjacency, atol=1e-5)
    assert _identity_error(graph).max() <= 1e-5


def test_edges_match_autograd_in_float64_per_edge():
    model = _random_model(seed=2).double()
    clt = _random_clt(model, seed=2).double()
    graph = attribute("Fact : Dallas is in", model, clt, dtype="float64", progress=False)
    rows = list(range(0, graph.n_features, max(1, graph.n_features // 5)))
    reference = autograd_rows(model, clt, graph.tokens, [tuple(graph.features[i].tolist()) for i in rows])
    ours = graph.adjacency[rows, : reference.shape[1]]
    nonzero = reference.abs() > 1e-12
    assert nonzero.sum() > 50
    assert ((ours - reference).abs()[nonzero] / reference.abs()[nonzero]).max() <= 1e-4
    assert (ours[~nonzero].abs() <= 1e-12).all()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_every_node_input_is_its_edges_plus_bias(demo_model, demo_clt, prompt):
    graph = attribute(prompt, demo_model, demo_clt, progress=False)
    assert _identity_error(graph).max() <= 1e-5
    # the inputs are the real model's own numbers, not the linear model's
    logits = demo_model(graph.tokens[None])[0, -1]
    tok = graph.target_tokens[0]
    assert graph.inputs[-graph.n_targets].item() == pytest.approx((logits[tok] - logits.mean()).item(), abs=1e-4)


def test_replacement_reproduces_the_real_model(demo_model, demo_clt):
    tokens = demo_model.to_tokens(FLAGSHIP)[0]
    rep = build_replacement(demo_model, demo_clt, tokens)
    mid, final = rep.linear_forward()
    assert torch.allclose(mid, rep.resid_mid, atol=1e-4)
    assert torch.allclose(final, rep.resid_final, atol=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        {},  # the random model: LayerNorm, learned positions, every bias random
        LLAMA_LIKE,
        dict(normalization_type="LNPre", attn_scores_soft_cap=5.0, final_rms=False),
        GEMMA_LIKE,
    ],
)  # fmt: skip
@pytest.mark.parametrize("from_weights", [True, False])
def test_the_recorded_forward_pass_is_transformer_lens_own(config, from_weights, monkeypatch):
    """Both ways of recording: the blocks from their weights, and through TransformerLens's components."""
    model = _random_model(**config)
    assert replacement.computes_from_weights(model)
    if not from_weights:
        monkeypatch.setattr(replacement, "computes_from_weights", lambda model: False)
    _check_record(model, model.to_tokens("Fact : Dallas is in the state whose capital is")[0])


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_the_recorded_forward_pass_of_each_architecture_is_transformer_lens_own(kind, tmp_path):
    """The tiny Hugging Face models of every supported architecture (GQA, rope scaling, sliding
    windows, q/k norms, soft caps, post-norms), recorded from their weights."""
    model = load_model(str(write_tiny_hf_model(kind, tmp_path / kind)))
    assert replacement.computes_from_weights(model)
    _check_record(model, model.to_tokens(HF_PROMPT)[0])


def _check_record(model: HookedTransformer, tokens: torch.Tensor) -> None:
    """Every tensor `record_forward` keeps against `run_with_cache` (and forward hooks on the MLPs)."""
    run = record_forward(model, tokens)
    L = model.cfg.n_layers
    mlp_args, mlp_outs = [], []  # what circuit-tracer's mlp.hook_in / mlp.hook_out see: the MLP's argument and output

    def keep(module, inputs, output) -> None:
        mlp_args.append(inputs[0][0])
        mlp_outs.append(output[0])

    handles = [b.mlp.register_forward_hook(keep) for b in model.blocks]
    logits, cache = model.run_with_cache(tokens[None])
    for handle in handles:
        handle.remove()
    expected = {
        "embed": cache["hook_embed"][0],
        "patterns": torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0] for l in range(L)]),
        "ln1_scales": torch.stack([cache[f"blocks.{l}.ln1.hook_scale"][0] for l in range(L)]),
        "resid_mid": torch.stack([cache[f"blocks.{l}.hook_resid_mid"][0] for l in range(L)]),
        "ln2_scales": torch.stack([cache[f"blocks.{l}.ln2.hook_scale"][0] for l in range(L)]),
        "mlp_normalized": torch.stack([cache[f"blocks.{l}.ln2.hook_normalized"][0] for l in range(L)]),
        "mlp_in": torch.stack(mlp_args),
        "mlp_raw": torch.stack(mlp_outs),
        "mlp_out": torch.stack([cache[f"blocks.{l}.hook_mlp_out"][0] for l in range(L)]),
        "resid_final": cache[f"blocks.{L - 1}.hook_resid_post"][0],
        "final_scale": cache["ln_final.hook_scale"][0],
        "logits": logits[0, -1],
    }
    if "hook_pos_embed" in cache:
        expected["pos_embed"] = cache["hook_pos_embed"][0]
    if model.cfg.use_normalization_before_and_after:
        expected["attn_post_scales"] = torch.stack([cache[f"blocks.{l}.ln1_post.hook_scale"][0] for l in range(L)])
        expected["mlp_post_scales"] = torch.stack([cache[f"blocks.{l}.ln2_post.hook_scale"][0] for l in range(L)])
    cap = model.cfg.output_logits_soft_cap
    if cap > 0:  # the record keeps the logits before the soft cap
        run.logits = cap * torch.tanh(run.logits / cap)
    for name, value in expected.items():
        assert torch.allclose(getattr(run, name), value, atol=1e-5), name


@pytest.mark.parametrize("default_paths", [True, False])
def test_identity_holds_for_per_layer_and_skip_transcoders(default_paths):
    # not the default paths: no embedding images, one contraction product per (layer, position)
    cfg = AttributionConfig() if default_paths else AttributionConfig(embedding_image_floats=0, merge_below=0)
    model = _random_model()
    for cross_layer, skip in [(False, False), (True, True), (False, True)]:
        graph = attribute("Fact : Dallas is in the", model, _random_clt(model, cross_layer, skip), cfg, progress=False)
        assert _identity_error(graph).max() <= 1e-5


@pytest.mark.parametrize("batch_size", [1, 7])
def test_every_way_through_the_backward_pass_gives_the_same_graph(demo_model, demo_clt, batch_size):
    """Every row in one walk (the default here), or in batches: small batches see few positions (the
    dense attention backward on every row); the contraction by position or by (layer, position);
    without the embedding images every gradient passes layer 0. The walk in runs of a few rows
    (crossing from feature to logit rows) or of a few positions, densely, through layer 0. Same edges
    every way."""
    reference = attribute(FLAGSHIP, demo_model, demo_clt, progress=False)

    def same(**overrides):
        graph = attribute(FLAGSHIP, demo_model, demo_clt, progress=False, **overrides)
        assert torch.allclose(graph.adjacency, reference.adjacency, atol=1e-5)
        return graph

    same(batch_size=batch_size)
    same(batch_size=batch_size, merge_below=0)  # one contraction product per (layer, position)
    assert _identity_error(same(batch_size=batch_size, merge_below=0, embedding_image_floats=0)).max() <= 1e-5
    same(work_floats=2**15)
    same(single_pass_span=3)  # runs of the rows at 3 positions, each walking only the positions below its last
    assert _identity_error(same(backward_terms=False, embedding_image_floats=0)).max() <= 1e-5


@pytest.mark.parametrize(
    "overrides", [{}, {"batch_size": 16}, {"max_feature_nodes": 40}, {"dense_floats": 1000}, {"inhibited": 2}]
)
def test_a_graph_holds_normal_tensors(demo_model, demo_clt, overrides):
    """The attribution runs in inference mode; the graph it returns holds normal tensors (one pass,
    batched, capped, sparse), which can be changed in place and take part in autograd."""
    graph = attribute(FLAGSHIP, demo_model, demo_clt, progress=False, **overrides)
    tensors = {k: v for k, v in vars(graph).items() if isinstance(v, torch.Tensor)}
    assert {"adjacency", "features", "activations", "inputs", "bias", "tokens"} <= tensors.keys()
    for name, t in tensors.items():
        parts = [t._indices(), t._values()] if t.is_sparse else [t]
        assert not any(part.is_inference() for part in parts), name
    values = graph.adjacency._values() if graph.adjacency.is_sparse else graph.adjacency
    values.mul_(1.0)
    weight = torch.ones((), requires_grad=True)
    (graph.activations * weight).sum().backward()
    assert weight.grad == graph.activations.sum()
    assert not demo_clt.W_enc.is_inference() and not demo_model.W_U.is_inference()


def test_named_and_difference_targets(demo_model, demo_clt):
    graph = attribute(
        FLAGSHIP, demo_model, demo_clt, targets=["Austin", "Springfield", "Austin-Springfield"], progress=False
    )
    a, b, diff = graph.adjacency[graph.target_slice]
    assert graph.target_names == ["Austin", "Springfield", "Austin - Springfield"]
    assert graph.target_tokens[2] == demo_model.cfg.d_vocab + 2  # virtual: d_vocab + its place, as circuit-tracer
    assert torch.allclose(a - b, diff, atol=1e-5)
    assert _identity_error(graph).max() <= 1e-5
    with pytest.raises(CircuitsError, match="not a single token"):
        attribute(FLAGSHIP, demo_model, demo_clt, targets=["Atlantis"], progress=False)


def test_default_targets_cover_the_probability(demo_model, demo_clt):
    graph = attribute("The capital of", demo_model, demo_clt, progress=False)
    probs = demo_model(graph.tokens[None])[0, -1].softmax(-1)
    top = probs.sort(descending=True)
    k = graph.n_targets
    assert graph.target_tokens.tolist() == top.indices[:k].tolist()
    assert k == 10 or (top.values[:k].sum() >= 0.95 and top.values[: k - 1].sum() < 0.95)


def test_targets_of_a_large_vocabulary_are_vectors_not_an_identity(demo_model):
    """A target's logit weights are one [d_vocab] vector: a d_vocab x d_vocab identity (4 TB here)
    must never be built."""
    V = 1_000_000
    logits = torch.full((V,), -20.0)
    logits[[11, 7]] = torch.tensor([5.0, 4.0])
    first, second = resolve_targets(demo_model, logits, [])
    assert (first.token, second.token) == (11, 7)
    assert first.weights[11] == pytest.approx(1 - 1 / V) and first.weights[7] == pytest.approx(-1 / V)
    assert first.weights.sum().abs() < 1e-3  # demeaned
    (diff,) = resolve_targets(demo_model, logits, ["Austin-Springfield"])
    assert diff.weights.abs().sum() == 2 and diff.weights.sum() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_graph_on_the_gpu_is_the_graph_on_the_cpu(demo_model, demo_clt):
    model, clt = copy.deepcopy(demo_model).to("cuda"), copy.deepcopy(demo_clt).to("cuda")
    for kwargs in ({"inhibited": 3}, {"max_feature_nodes": 40, "batch_size": 16}):
        cpu = attribute(FLAGSHIP, demo_model, demo_clt, progress=False, **kwargs)
        gpu = attribute(FLAGSHIP, model, clt, device="cuda", progress=False, **kwargs)
        assert torch.equal(gpu.features, cpu.features)
        assert torch.allclose(gpu.adjacency, cpu.adjacency, atol=1e-4)
    assert validate(gpu, model, clt).corr_frozen > 0.9


def test_feature_cap_keeps_exact_rows_of_the_most_influential(demo_model, demo_clt):
    full = attribute(FLAGSHIP, demo_model, demo_clt, progress=False)
    capped = attribute(FLAGSHIP, demo_model, demo_clt, max_feature_nodes=40, batch_size=16, progress=False)
    assert capped.n_features == 40
    index = {tuple(f): i for i, f in enumerate(full.features.tolist())}
    picked = torch.tensor([index[tuple(f)] for f in capped.features.tolist()])
    columns = torch.cat([picked, torch.arange(full.n_features, len(full.adjacency))])
    assert torch.allclose(capped.adjacency[:40], full.adjacency[picked][:, columns], atol=1e-6)
    logit_rows = full.adjacency[-full.n_targets :][:, columns]
    assert torch.allclose(capped.adjacency[-capped.n_targets :], logit_rows, atol=1e-6)
    # the kept features carry most of the influence of the full graph
    influence = full.influence()[: full.n_features]
    assert influence[picked].sum() >= 0.5 * influence.topk(40).values.sum()


def test_feature_cap_estimates_influence_from_the_computed_rows_alone(demo_model, demo_clt):
    """The capped attribution's estimate, from the done features' and the targets' rows only,
    against the series over the whole adjacency with every other feature row zeroed."""
    graph = attribute(FLAGSHIP, demo_model, demo_clt, progress=False)
    n, T = graph.n_features, graph.n_targets
    done = torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.3
    A = graph.adjacency.clone()
    A[:n] *= done[:, None]
    weights = torch.zeros(len(A))
    weights[-T:] = graph.target_probs
    expected = compute_influence(normalize_matrix(A), weights)[:n]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    ids = order[done[order]]  # the computed features, in some order of computation
    direct = graph.target_probs @ normalize_matrix(graph.adjacency[-T:])[:, :n]
    estimate = _feature_influence(direct, normalize_matrix(graph.adjacency[ids])[:, :n], ids)
    assert expected[done].abs().max() > 0 and expected[~done].abs().max() > 0
    assert torch.allclose(estimate, expected, atol=1e-6)


def test_bad_input(demo_model, demo_clt):
    with pytest.raises(CircuitsError, match="empty"):
        attribute("  ", demo_model, demo_clt)
    with pytest.raises(CircuitsError, match="context"):
        attribute("Texas " * 200, demo_model, demo_clt)


# ---- interventions and the CLI ------------------------------------------------------------------


def test_spliced_model_without_interventions_is_the_real_model(demo_model, demo_clt):
    tokens = demo_model.to_tokens(FLAGSHIP)[0]
    real = demo_model(tokens[None])[0]
    for frozen in (True, False):
        assert torch.allclose(run_with_interventions(demo_model, demo_clt, tokens, [], frozen), real, atol=1e-4)


def test_predicted_ablation_effects_are_the_dense_solve(demo_model, demo_clt):
    """The triangular solve for the targets' rows against (I - M)^-1 A over every node."""
    graph = attribute(FLAGSHIP, demo_model, demo_clt, progress=False)
    A, n = graph.adjacency.double(), graph.n_features
    M = torch.zeros_like(A)
    M[:, :n] = A[:, :n] / graph.activations.double()
    dense = -torch.linalg.solve(torch.eye(len(A), dtype=A.dtype) - M, A[:, :n])[-graph.n_targets :]
    assert (dense + A[-graph.n_targets :, :n]).abs().max() > 1e-3  # some effects run through other features
    assert torch.allclose(predicted_ablation_effects(graph).double(), dense, atol=1e-6)


def test_ablations_match_the_graph_where_nothing_downstream_can_switch():
    model = _random_model()
    clt = _random_clt(model)
    graph = attribute("Fact : Dallas is in the state", model, clt, progress=False)
    tokens, L, last = graph.tokens, graph.n_layers, graph.n_pos - 1
    predicted = predicted_ablation_effects(graph)[0]
    tok = graph.target_tokens[0]
    base = run_with_interventions(model, clt, tokens, [])[-1]
    # features of the last layer at the last position write straight into the logits
    final = [i for i, (l, p, _) in enumerate(graph.features.tolist()) if l == L - 1 and p == last][:3]
    assert final
    for i in final:
        layer, pos, feat = graph.features[i].tolist()
        logits = run_with_interventions(model, clt, tokens, [Intervention(layer, pos, feat, value=0.0)])[-1]
        change = (logits[tok] - logits.mean()) - (base[tok] - base.mean())
        assert change.item() == pytest.approx(predicted[i].item(), abs=1e-4)
        assert predicted[i].item() == pytest.approx(-graph.adjacency[graph.target_slice.start, i].item(), abs=1e-5)
    # steering by a scale of 1, or setting the current value, changes nothing
    layer, pos, feat = graph.features[final[0]].tolist()
    value = graph.activations[final[0]].item()
    for iv in [Intervention(layer, pos, feat, scale=1.0), Intervention(layer, pos, feat, value=value)]:
        assert torch.allclose(run_with_interventions(model, clt, tokens, [iv])[-1], base, atol=1e-5)
    # scaling by 2 moves the logit by the edge once more
    logits = run_with_interventions(model, clt, tokens, [Intervention(layer, pos, feat, scale=2.0)])[-1]
    change = (logits[tok] - logits.mean()) - (base[tok] - base.mean())
    assert change.item() == pytest.approx(graph.adjacency[graph.target_slice.start, final[0]].item(), abs=1e-4)


@pytest.mark.parametrize("targets", [None, ["Austin-Sacramento"]])
def test_validation_report_on_the_demo_pair(demo_model, demo_clt, targets):
    """For a token target and for a logit difference (a virtual target with no vocabulary id)."""
    graph = attribute(FLAGSHIP, demo_model, demo_clt, targets=targets, progress=False)
    report = validate(graph, demo_model, demo_clt, top_k=8)
    assert len(report.nodes) == 8 and report.corr_frozen > 0.8
    assert "correlation" in report.lines()[-1]


@pytest.fixture(scope="module")
def clt_dir(demo_clt, tmp_path_factory):
    path = tmp_path_factory.mktemp("clt")
    save_transcoder(demo_clt, path)
    return path


@pytest.mark.slow
def test_trace_cli_writes_the_graph_files(clt_dir, tmp_path, capsys):
    out = tmp_path / "graphs"
    assert main(["trace", FLAGSHIP, "--transcoder", str(clt_dir), "--out", str(out), "--slug", "dallas"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    written = [str(out / f"dallas{suffix}") for suffix in (".json", ".graph.safetensors", ".html")]
    assert lines[-3:] == written  # every file written, the page's path last
    assert "replacement score" in lines[1]
    data = json.loads((out / "dallas.json").read_text())
    assert data["metadata"]["slug"] == "dallas" and data["links"]
    graph = Graph.load(out / "dallas.graph.safetensors")
    assert graph.prompt == FLAGSHIP and graph.target_names == ["Austin"]
    assert sorted(p.name for p in out.iterdir()) == ["dallas.graph.safetensors", "dallas.html", "dallas.json"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["  "], "prompt is empty"),
        (["Texas " * 200], "context"),
        ([FLAGSHIP, "--target", "Atlantis"], "not a single token"),
        ([FLAGSHIP, "--transcoder", "MISFIT"], "does not fit"),
        ([FLAGSHIP, "--transcoder", "/nonexistent/clt"], "holds no transcoder"),
        ([FLAGSHIP, "--batch-size", "0"], "batch_size is 0"),
        ([FLAGSHIP, "--max-feature-nodes", "-3"], "max_feature_nodes is -3"),
        ([FLAGSHIP, "--device", "banana"], "'banana' is not a device"),
        ([FLAGSHIP, "--device", f"cuda:{torch.cuda.device_count()}"], "is not available here"),
    ],
)
def test_trace_cli_bad_input(argv, message, clt_dir, tmp_path, capsys):
    if "MISFIT" in argv:
        misfit = tmp_path / "misfit"
        save_transcoder(_random_clt(_random_model()), misfit)
        argv = [a.replace("MISFIT", str(misfit)) for a in argv]
    if "--transcoder" not in argv:
        argv = [*argv, "--transcoder", str(clt_dir)]
    assert main(["trace", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_inhibited_features_are_inactive_and_their_inputs_add_up(demo_model, demo_clt):
    graph = attribute(FLAGSHIP, demo_model, demo_clt, inhibited=5, progress=False)
    assert len(graph.inhibited) == 5
    active = {tuple(f) for f in graph.features.tolist()}
    for r in graph.inhibited:
        assert (r["layer"], r["pos"], r["feature"]) not in active
        assert r["inhibition"] < 0 and r["pre_activation"] <= demo_clt.threshold[r["layer"], r["feature"]]
        total = sum(r["contributions"]) + r["bias"]
        assert total == pytest.approx(r["pre_activation"], abs=1e-4 * (1 + sum(map(abs, r["contributions"]))))
        assert sum(r["contributions"][: graph.n_features]) == pytest.approx(r["inhibition"], rel=1e-4, abs=1e-5)
    # the contributions are edges like any other: check one against autograd
    r = graph.inhibited[0]
    reference = autograd_rows(demo_model, demo_clt, graph.tokens, [(r["layer"], r["pos"], r["feature"])])[0]
    ours = torch.tensor(r["contributions"])
    assert ((ours - reference).abs().max() / reference.abs().max()) <= 1e-4
