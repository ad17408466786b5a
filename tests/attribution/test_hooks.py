"""Transcoders at every hook pair published ones use (inputs `INPUT_HOOKS`, outputs `OUTPUT_HOOKS`)
on GPT-2-, Llama- and Gemma-2-style random models: each hook is what its authors meant, the graph's
edges are autograd's through the spliced model at those hooks, every node's input is its edges plus
bias, the spliced model moves as the graph predicts; and whatever does not fit is refused in one line."""

from functools import cache

import pytest
import torch

from circuits.attribution.attribute import attribute
from circuits.attribution.graph import Graph
from circuits.attribution.interventions import (
    Intervention,
    predicted_ablation_effects,
    run_with_interventions,
    validate,
)
from circuits.attribution.replacement import _require_finite
from circuits.attribution.splice import clean_state, io_names, splice_hooks, transcoder_inputs, transcoder_outputs
from circuits.errors import CircuitsError
from circuits.transcoders.circuit_tracer import save_transcoder
from circuits.transcoders.clt import INPUT_HOOKS, OUTPUT_HOOKS, CLTConfig, check_fits
from circuits.transcoders.load import load_transcoder
from tests.attribution.test_attribute import GEMMA_LIKE, LLAMA_LIKE, _identity_error, _random_clt, _random_model
from tests.reference import autograd_rows

STYLES = {"gpt2": {}, "llama": LLAMA_LIKE, "gemma2": GEMMA_LIKE}
"""LayerNorm and learned positions; RMSNorm, rotary, grouped-query, gated MLP; and Gemma 2's norms
before and after attention and the MLP with soft caps."""
PAIRS = [(i, o) for i in INPUT_HOOKS for o in OUTPUT_HOOKS]
PROMPT = "Fact : Dallas is in the state whose capital"


@cache
def _pair(style: str, input_hook: str, output_hook: str, cross_layer: bool, dtype: torch.dtype):
    """A random model of `style` and a random skip transcoder at the hooks, both in `dtype`."""
    model = _random_model(**STYLES[style], dtype=dtype)
    clt = _random_clt(model, cross_layer, skip=True, input_hook=input_hook, output_hook=output_hook).to(dtype)
    return model, clt


@pytest.mark.parametrize("cross_layer", [True, False])
@pytest.mark.parametrize("input_hook,output_hook", PAIRS)
@pytest.mark.parametrize("style", STYLES)
def test_edges_are_autograd_at_every_hook_pair(style, input_hook, output_hook, cross_layer):
    """float64: every node's input is its edges plus bias to 1e-12, the edges of features, an
    inhibited feature and a logit are autograd's to 1e-10 of the row's largest, and the short-sum
    and dense backward passes agree."""
    model, clt = _pair(style, input_hook, output_hook, cross_layer, torch.float64)
    graph = attribute(PROMPT, model, clt, dtype="float64", inhibited=2, batch_size=16, progress=False)
    assert graph.n_features > 20 and _identity_error(graph).max() <= 1e-12
    rows = torch.randperm(graph.n_features, generator=torch.Generator().manual_seed(0))[:5].tolist()
    V, inhibited = model.cfg.d_vocab, graph.inhibited[0]
    targets = [tuple(graph.features[i].tolist()) for i in rows]
    targets += [(inhibited["layer"], inhibited["pos"], inhibited["feature"])]
    targets += [torch.eye(V, dtype=torch.float64)[graph.target_tokens[0]] - 1 / V]
    reference = autograd_rows(model, clt, graph.tokens, targets)
    ours = torch.cat([
        graph.adjacency[rows, : reference.shape[1]],
        torch.tensor(inhibited["contributions"], dtype=torch.float64)[None],
        graph.adjacency[graph.target_slice.start, None, : reference.shape[1]],
    ])  # fmt: skip
    assert ((ours - reference).abs() / reference.abs().amax(1, keepdim=True)).max() <= 1e-10
    assert sum(inhibited["contributions"]) + inhibited["bias"] == pytest.approx(inhibited["pre_activation"], abs=1e-10)
    dense = attribute(
        PROMPT, model, clt, dtype="float64", progress=False, backward_terms=False, embedding_image_floats=0
    )
    assert torch.allclose(dense.adjacency, graph.adjacency, rtol=0, atol=1e-12)


@pytest.mark.parametrize("input_hook,output_hook", PAIRS)
@pytest.mark.parametrize("style", STYLES)
def test_identity_in_float32_and_the_spliced_model_at_every_hook_pair(style, input_hook, output_hook):
    """float32: the identity to 1e-5; the spliced model without interventions is the real model;
    steering a feature by 1 + 1e-4 (attention and norms frozen, nothing switches) moves the logit
    by the graph's prediction; validation runs (attention frozen and recomputed)."""
    model, clt = _pair(style, input_hook, output_hook, True, torch.float32)
    graph = attribute(PROMPT, model, clt, progress=False)
    assert _identity_error(graph).max() <= 1e-5
    tokens = graph.tokens
    real = model(tokens[None])[0]
    for frozen in (True, False):
        assert torch.allclose(run_with_interventions(model, clt, tokens, [], frozen), real, atol=1e-4)
    report = validate(graph, model, clt, top_k=3)
    assert len(report.nodes) == 3 and torch.isfinite(torch.tensor(report.actual_free)).all()
    model64, clt64 = _pair(style, input_hook, output_hook, True, torch.float64)
    graph64 = attribute(PROMPT, model64, clt64, dtype="float64", progress=False)
    predicted = predicted_ablation_effects(graph64)[0]
    V, cap = model.cfg.d_vocab, model.cfg.output_logits_soft_cap
    weights = torch.eye(V, dtype=torch.float64)[graph64.target_tokens[0]] - 1 / V

    def target_logit(interventions) -> float:  # before the output soft cap, as the graph's target
        logits = run_with_interventions(model64, clt64, tokens, interventions, state=state)[-1]
        return (weights @ (logits if cap <= 0 else cap * torch.atanh(logits / cap))).item()

    state = clean_state(model64, clt64, tokens)
    base = target_logit([])
    for i in graph64.influence()[: graph64.n_features].topk(3).indices.tolist():
        layer, pos, feat = graph64.features[i].tolist()
        change = target_logit([Intervention(layer, pos, feat, scale=1 + 1e-4)]) - base
        assert change / -1e-4 == pytest.approx(predicted[i].item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("style", STYLES)
def test_the_hooks_are_what_their_authors_meant(style):
    """mlp.hook_in / mlp.hook_out are the MLP's argument and output (circuit-tracer wraps the MLP
    module and hooks exactly those); ln2.hook_normalized is the norm's output before its weight;
    hook_mlp_in is TransformerLens's clone of resid_mid."""
    model = _random_model(**STYLES[style], use_hook_mlp_in=True)
    tokens = model.to_tokens(PROMPT)
    args, outs = [], []  # what circuit-tracer's wrapper hooks: the MLP's argument and its output

    def keep(module, inputs, output) -> None:
        args.append(inputs[0])
        outs.append(output)

    handles = [b.mlp.register_forward_hook(keep) for b in model.blocks]
    _, full = model.run_with_cache(tokens)
    for handle in handles:
        handle.remove()
    L, d = model.cfg.n_layers, model.cfg.d_model

    def at(input_hook="hook_resid_mid", output_hook="hook_mlp_out"):
        cfg = CLTConfig(L, d, 8, input_hook=input_hook, output_hook=output_hook)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in io_names(model, cfg))
        return transcoder_inputs(model, cfg, cache), transcoder_outputs(model, cfg, cache)

    stack = lambda name: torch.stack([full[f"blocks.{l}.{name}"] for l in range(L)], -2)  # noqa: E731
    assert torch.equal(at("mlp.hook_in", "mlp.hook_out")[0], torch.stack(args, -2))
    assert torch.equal(at("mlp.hook_in", "mlp.hook_out")[1], torch.stack(outs, -2))
    assert torch.equal(at("ln2.hook_normalized")[0], stack("ln2.hook_normalized"))
    assert not torch.allclose(stack("ln2.hook_normalized"), torch.stack(args, -2), atol=1e-2)  # the weight is not in it
    assert torch.equal(at("hook_mlp_in")[0], stack("hook_mlp_in"))
    assert torch.equal(stack("hook_mlp_in"), stack("hook_resid_mid"))
    assert torch.equal(at()[1], stack("hook_mlp_out"))
    post_norm = model.cfg.use_normalization_before_and_after
    assert torch.equal(at(output_hook="mlp.hook_out")[1], stack("hook_mlp_out")) != post_norm


def test_splicing_leaves_the_model_as_it_was():
    model, clt = _pair("gemma2", "mlp.hook_in", "mlp.hook_out", True, torch.float32)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    names = set(model.hook_dict)
    run_with_interventions(model, clt, model.to_tokens(PROMPT)[0], [Intervention(1, 3, 0, value=2.0)])
    assert set(model.hook_dict) == names and not any(h.fwd_hooks for h in model.hook_dict.values())
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


def _one_line_refusal(call, *needles):
    with pytest.raises(CircuitsError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(n in message for n in needles), message


UNSUPPORTED = [
    ("hook_resid_pre", "hook_mlp_out"),
    ("hook_normalized", "hook_mlp_out"),
    ("hook_resid_mid", "hook_resid_post"),
]


@pytest.mark.parametrize("input_hook,output_hook", UNSUPPORTED)
def test_an_unsupported_hook_is_refused_in_one_line(input_hook, output_hook):
    """hook_normalized: SAELens's `blocks.{l}.ln2.hook_normalized` cut at the last dot."""
    model = _random_model()
    clt = _random_clt(model, input_hook=input_hook, output_hook=output_hook)
    tokens = model.to_tokens(PROMPT)[0]
    for call in (lambda: attribute(PROMPT, model, clt, progress=False), lambda: splice_hooks(model, clt),
                 lambda: clean_state(model, clt, tokens)):  # fmt: skip
        _one_line_refusal(call, f"{input_hook} -> {output_hook}", "supported:", "mlp.hook_in", "mlp.hook_out")


def test_a_weight_processing_mismatch_is_refused_in_one_line():
    model = _random_model()
    clt = _random_clt(model)
    model.circuits_processing = "tl-default"  # as circuits.models.load_model records it
    _one_line_refusal(lambda: attribute(PROMPT, model, clt, progress=False), "'none'", "'tl-default'")
    _one_line_refusal(lambda: splice_hooks(model, clt), "processing='none'")
    clt.cfg.model_processing = "tl-default"  # as the transcoder formats record it
    check_fits(clt.cfg, model)
    model.circuits_processing = "fold-value-biases"  # circuit-tracer's loading: the same numbers at every hook
    clt.cfg.model_processing = "none"
    check_fits(clt.cfg, model)


def test_folded_norms_with_no_record_are_refused_until_the_processing_is_said():
    model = _random_model(normalization_type="LNPre")  # what from_pretrained's fold_ln leaves
    clt = _random_clt(model)
    _one_line_refusal(lambda: attribute(PROMPT, model, clt, progress=False), "unknown", "circuits_processing")
    model.circuits_processing = "none"
    assert _identity_error(attribute(PROMPT, model, clt, progress=False)).max() <= 1e-5


def test_a_normalised_input_needs_a_norm():
    model = _random_model(normalization_type=None)
    _one_line_refusal(lambda: check_fits(_random_clt(model, input_hook="ln2.hook_normalized").cfg, model), "no norm")


def test_the_graph_records_the_hooks_and_the_processing(tmp_path):
    model, clt = _pair("gemma2", "ln2.hook_normalized", "hook_mlp_out", False, torch.float32)
    graph = attribute(PROMPT, model, clt, progress=False)
    graph.save(tmp_path / "g.graph.safetensors")
    config = Graph.load(tmp_path / "g.graph.safetensors").config
    assert config["model_processing"] == "none"
    assert config["transcoder"]["input_hook"] == "ln2.hook_normalized"
    assert config["transcoder"]["output_hook"] == "hook_mlp_out"
    assert config["transcoder"]["model_processing"] == "none"
    meta = graph.to_dict("g")["metadata"]  # the JSON, in circuit-tracer's key names
    assert (meta["feature_input_hook"], meta["feature_output_hook"]) == ("ln2.hook_normalized", "hook_mlp_out")
    assert meta["model_processing"] == meta["transcoder_model_processing"] == "none"


def test_a_transcoder_loaded_without_the_model_is_still_read_at_its_hooks(tmp_path):
    """`load_transcoder(DIR)` checks nothing without `model=`; `attribute` reads its hooks itself."""
    model, clt = _pair("gemma2", "ln2.hook_normalized", "mlp.hook_out", False, torch.float32)
    save_transcoder(clt, tmp_path / "t")
    loaded = load_transcoder(tmp_path / "t")
    assert (loaded.cfg.input_hook, loaded.cfg.output_hook) == ("ln2.hook_normalized", "mlp.hook_out")
    graph, expected = (attribute(PROMPT, model, c, progress=False) for c in (loaded, clt))
    assert torch.equal(graph.adjacency, expected.adjacency)


def test_finite_values_whose_sum_overflows_are_finite():
    """The check sums first (one pass) and looks at each value only when the sum is not finite."""
    _require_finite(torch.full((4,), 3e38), "the values", "nothing")  # their sum is inf
    for bad in (float("nan"), float("inf")):
        with pytest.raises(CircuitsError, match="not finite"):
            _require_finite(torch.tensor([3e38, 3e38, bad]), "the values", "one")


@pytest.mark.parametrize("where", ["W_enc", "b_enc", "W_dec"])
def test_a_non_finite_transcoder_is_stopped_before_it_makes_every_feature_a_node(where, tmp_path):
    """A NaN activation counts as active: a NaN encoder once made all 45,056 features nodes and ran
    the machine out of memory. Non-finite encoders are refused when the files are read, and whatever
    turns non-finite during attribution stops it, each in one line."""
    model = _random_model()
    clt = _random_clt(model)
    with torch.no_grad():
        active = clt.encode_layer(model.run_with_cache(PROMPT)[1]["blocks.0.hook_resid_mid"][0], 0)
        feature = int(active.sum(0).argmax())  # a feature active somewhere on the prompt
        getattr(clt, where)[0][feature] = float("nan")
    _one_line_refusal(lambda: attribute(PROMPT, model, clt, progress=False), "not finite")
    if where != "W_dec":
        save_transcoder(clt, tmp_path / "t")
        _one_line_refusal(lambda: load_transcoder(tmp_path / "t"), "NaN or infinite")
