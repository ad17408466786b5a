"""Concept traces, path scores, patching, trajectories, the concept page and its CLI, on the demo model."""

import importlib.util
import io
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from circuits.cli import main
from circuits.concepts.categories import member_swaps
from circuits.concepts.cells import graph_nodes_by_cell
from circuits.concepts.figures import flow_gif
from circuits.concepts.lens import logit_lens, make_concept, propose_intermediates, trace_concepts
from circuits.concepts.page import render_concepts_html, report_json, write_concepts_page
from circuits.concepts.patching import HOOKS, Patch, grid_patches, patching_grid, run_patches
from circuits.concepts.paths import rank_paths, score_path
from circuits.concepts.report import concept_report, figures, flow_steps
from circuits.concepts.trajectories import fit_pca, funnel, residual_states, spread, trajectories
from circuits.concepts.variants import category_variants, propose_counterfactuals, slot_swaps
from circuits.demo.facts import CATEGORIES, STATE_OF_CITY
from circuits.demo.two_hop import study, two_hop_cases
from circuits.errors import CircuitsError
from circuits.models import DEMO_MODEL_DIR, load_model, prompt_tokens

FLAGSHIP = "Fact: Dallas is in the state whose capital is"
COUNTERFACTUAL = "Fact: Chicago is in the state whose capital is"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Many small forward passes: on a shared 2-core machine one thread is several times faster than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def flagship_traces(demo_model):
    names = ["Dallas", "Texas", "Austin", "California", "Sacramento"]
    specs = [*names, "@states", "Austin ."]
    traces, lens = trace_concepts(demo_model, FLAGSHIP, specs, full_sequence=True, categories=CATEGORIES)
    return {t.concept.name: t for t in traces}, lens


@pytest.fixture(scope="module")
def flagship_report(demo_model):
    return concept_report(
        demo_model,
        FLAGSHIP,
        concepts=["Texas", "@states"],
        paths=[["Dallas", "Texas", "Austin"], ["Dallas", "California", "Sacramento"]],
        counterfactual=COUNTERFACTUAL,
        graph_nodes=[{"node_id": "1_7_5", "layer": "1", "ctx_idx": 5}, {"layer": "E", "feature": 9, "ctx_idx": 3}],
        categories=CATEGORIES,
    )


def test_logit_lens_last_row_is_the_models_own_log_probabilities(demo_model, flagship_traces):
    traces, lens = flagship_traces
    tokens = prompt_tokens(demo_model, FLAGSHIP)
    expected = demo_model(tokens)[0].log_softmax(-1)  # [pos, vocab]
    torch.testing.assert_close(lens[-1].log_softmax(-1), expected, atol=1e-5, rtol=0)
    austin = demo_model.to_single_token("Austin")
    torch.testing.assert_close(traces["Austin"].logprob[-1], expected[:, austin], atol=1e-5, rtol=0)
    torch.testing.assert_close(traces["Austin"].logit[-1], demo_model(tokens)[0, :, austin], atol=1e-4, rtol=0)


def test_rank_and_group_scores_match_direct_computation(demo_model, flagship_traces):
    traces, lens = flagship_traces
    texas = demo_model.to_single_token("Texas")
    order = lens.argsort(-1, descending=True)  # [L+1, pos, vocab]
    expected_rank = (order == texas).int().argmax(-1) + 1
    assert torch.equal(traces["Texas"].rank, expected_rank)
    states = make_concept(demo_model, "@states", CATEGORIES)
    probs = lens.softmax(-1)[..., states.first_tokens]  # [L+1, pos, 50]
    torch.testing.assert_close(traces["states"].prob, probs.sum(-1), atol=1e-6, rtol=1e-5)
    member_ranks = (lens.unsqueeze(-1) > lens[..., states.first_tokens].unsqueeze(-2)).sum(-2) + 1
    assert torch.equal(traces["states"].rank, member_ranks.min(-1).values)
    assert (traces["states"].rank <= traces["Texas"].rank).all()


def test_direct_contributions_add_up_to_the_final_logits(demo_model, flagship_traces):
    traces, _ = flagship_traces
    tokens = prompt_tokens(demo_model, FLAGSHIP)
    logits, cache = demo_model.run_with_cache(tokens)
    austin = demo_model.to_single_token("Austin")
    from circuits.concepts.lens import direct_logits

    embed = direct_logits(demo_model, cache, cache["hook_embed"][0] + cache["hook_pos_embed"][0])[:, austin]
    components = traces["Austin"].attn_direct.sum(0) + traces["Austin"].mlp_direct.sum(0) + embed
    bias = demo_model.ln_final.b @ demo_model.W_U[:, austin] + demo_model.b_U[austin]
    torch.testing.assert_close(components + bias, logits[0, :, austin], atol=1e-3, rtol=1e-4)


def test_a_word_sharing_its_first_token_is_scored_by_its_whole_sequence(demo_model, flagship_traces):
    traces, lens = flagship_traces
    seq = traces["Austin ."]
    assert seq.concept.token_ids[0] == tuple(demo_model.to_tokens(" Austin .", prepend_bos=False)[0].tolist())
    assert seq.whole == (True,) and traces["Austin"].whole == (False,)
    tokens = demo_model.to_tokens(FLAGSHIP + " Austin")
    logprobs = demo_model(tokens)[0].log_softmax(-1).detach()
    expected = logprobs[-2, demo_model.to_single_token("Austin")] + logprobs[-1, demo_model.to_single_token(".")]
    assert seq.logprob[-1, -1].item() == pytest.approx(expected.item(), abs=1e-4)
    # Every layer: the lens's first token, plus the same teacher-forced rest (the final model's).
    rest = (seq.logprob - traces["Austin"].logprob)[:, -1]
    torch.testing.assert_close(rest, torch.full_like(rest, float(logprobs[-1, demo_model.to_single_token(".")])))


def test_path_scores_rank_the_true_path_first_and_halve_out_of_order_baselines(demo_model, flagship_traces):
    traces, _ = flagship_traces
    ranked = rank_paths(traces, [["Dallas", "California", "Sacramento"], ["Dallas", "Texas", "Austin"]], 4)
    assert ranked[0].path == ("Dallas", "Texas", "Austin")
    assert ranked[0].peaks[0] == (0, 3)  # Dallas is anchored at its own token
    assert ranked[0].in_order and ranked[0].completeness == 1.0
    backwards = score_path(traces, ["Austin", "Texas", "Dallas"], 4)
    assert not backwards.in_order
    peaks = zip(backwards.path, backwards.peaks, strict=True)
    probs = [traces[n].prob[l, p].item() if n != "Dallas" else 1.0 for n, (l, p) in peaks]
    geo_mean = math.exp(sum(math.log(p) for p in probs) / 3)
    assert backwards.baseline == pytest.approx(0.5 * geo_mean * backwards.completeness, rel=1e-5)
    assert backwards.score < ranked[0].score
    with pytest.raises(CircuitsError, match="missing"):
        score_path(traces, ["Dallas", "Ohio"], 4)


def test_auto_proposal_finds_the_intermediate_state(demo_model, flagship_traces):
    _, lens = flagship_traces
    assert propose_intermediates(demo_model, prompt_tokens(demo_model, FLAGSHIP), lens)[0] == "Texas"


@pytest.mark.parametrize("kind", ["two_hop_held_out", "two_hop"])
def test_auto_proposal_is_the_true_state_on_trained_and_held_out_prompts(demo_model, kind):
    # San Antonio (held out): the model says "Texas" after "San Antonio is in" (the output row), which a
    # middle-layers-only proposal left out, proposing a competing capital ("Santa Fe") instead.
    cities = ["San Antonio"] * (kind == "two_hop_held_out") + [c for c, k in two_hop_cases() if k == kind][::10]
    for city in cities:
        prompt = f"Fact: {city} is in the state whose capital is"
        tokens = prompt_tokens(demo_model, prompt)
        proposals = propose_intermediates(demo_model, tokens, logit_lens(demo_model, tokens)[0])
        assert proposals[0] == STATE_OF_CITY[city].name, (city, proposals)


def test_bad_concepts_are_rejected(demo_model):
    with pytest.raises(CircuitsError, match="not in the model's vocabulary"):
        make_concept(demo_model, "Zanzibar")
    with pytest.raises(
        CircuitsError, match=r"unknown concept category @planets \(known: @cities, @states, @capitals\)"
    ):
        make_concept(demo_model, "@planets", CATEGORIES)
    with pytest.raises(CircuitsError, match="empty"):
        prompt_tokens(demo_model, "   ")


def _reference_patch(model, clean_cache, corrupt, patch, answer, foil):
    """One forward pass for one patch, with its own plain hook."""
    name = HOOKS[patch.kind].format(layer=patch.layer)

    def hook(act, hook):
        if patch.head is None:
            act[:, list(patch.positions)] = clean_cache[name][:, list(patch.positions)]
        else:
            act[:, list(patch.positions), patch.head] = clean_cache[name][:, list(patch.positions), patch.head]
        return act

    logits = model.run_with_hooks(corrupt, fwd_hooks=[(name, hook)])
    return (logits[0, -1, answer] - logits[0, -1, foil]).item()


@torch.no_grad()
def test_patching_endpoints_and_batched_equals_one_at_a_time(demo_model):
    clean, corrupt = demo_model.to_tokens(FLAGSHIP), demo_model.to_tokens(COUNTERFACTUAL)
    _, cache = demo_model.run_with_cache(clean)
    answer, foil = demo_model.to_single_token("Austin"), demo_model.to_single_token("Springfield")
    n_pos = clean.shape[1]
    clean_diff = (demo_model(clean)[0, -1, answer] - demo_model(clean)[0, -1, foil]).item()
    everything, nothing = Patch("resid_pre", 0, tuple(range(n_pos))), Patch("mlp_out", 0, ())
    ends = run_patches(demo_model, cache, corrupt, [everything, nothing], answer, foil)
    corrupt_logits = demo_model(corrupt)[0, -1]
    assert ends[0].item() == pytest.approx(clean_diff, abs=1e-4)
    assert ends[1].item() == pytest.approx((corrupt_logits[answer] - corrupt_logits[foil]).item(), abs=1e-4)
    for kind in HOOKS:
        patches = grid_patches(kind, demo_model.cfg.n_layers, n_pos, demo_model.cfg.n_heads)
        batched = run_patches(demo_model, cache, corrupt, patches, answer, foil, batch_size=50)
        sample = random.Random(0).sample(range(len(patches)), 10)  # the reference is one forward pass per patch
        one_by_one = [_reference_patch(demo_model, cache, corrupt, patches[i], answer, foil) for i in sample]
        torch.testing.assert_close(batched[sample], torch.tensor(one_by_one), atol=1e-4, rtol=1e-5)
        assert batched.std() > 0.1  # the patches do differ


def test_patching_grid_is_normalised_and_checks_its_input(demo_model, flagship_report):
    result = flagship_report.patching
    assert (result.answer, result.foil) == ("Austin", "Springfield")
    assert result.grids["resid_pre"].shape == (4, 11) and result.grids["head"].shape == (4, 4, 11)
    # The city token is the only difference, so layer 0 there carries everything; late in the last position
    # nearly everything (the last block's attention still reads the corrupted earlier positions).
    assert result.grids["resid_pre"][0, 3].item() == pytest.approx(1.0, abs=1e-4)
    assert result.grids["resid_pre"][-1, -1].item() == pytest.approx(1.0, abs=0.05)
    assert result.grids["resid_pre"][:, :3].abs().max() < 1e-4  # before the city nothing differs
    with pytest.raises(CircuitsError, match="same token length"):
        patching_grid(demo_model, FLAGSHIP, "Fact: Dallas is in the state whose capital city is")
    with pytest.raises(CircuitsError, match="predicts the same token"):
        patching_grid(demo_model, FLAGSHIP, "Fact: Houston is in the state whose capital is")


def test_proposed_counterfactuals_have_equal_length_and_change_the_answer(demo_model):
    proposals = propose_counterfactuals(demo_model, FLAGSHIP, CATEGORIES, n=3)
    assert len(proposals) == 3
    clean = demo_model.to_tokens(FLAGSHIP)
    for p in proposals:
        tokens = demo_model.to_tokens(p)
        assert tokens.shape == clean.shape and (tokens != clean).sum() == 1
        assert demo_model(tokens)[0, -1].argmax() != demo_model(clean)[0, -1].argmax()


def test_trajectories_shapes_pca_and_funnel_two_ways(demo_model):
    prompts = [f"Fact: {c} is in the state whose capital is" for c in ("Dallas", "Houston", "Chicago", "Peoria")]
    prompts.append("The capital of Texas is")  # a different length shares the batch logic
    traj = trajectories(demo_model, {"two-hop": prompts[:4], "one-hop": prompts[4:]})
    assert traj.states["two-hop"].shape == (4, 5, 128) and traj.coords["one-hop"].shape == (1, 5, 2)
    assert traj.answers["two-hop"] == ["Austin", "Austin", "Springfield", "Springfield"]
    single = demo_model.run_with_cache(demo_model.to_tokens(prompts[4]))[1]
    torch.testing.assert_close(traj.states["one-hop"][0, 2], single["blocks.2.hook_resid_pre"][0, -1])
    pooled = torch.cat([s.flatten(0, 1) for s in traj.states.values()])  # [25, d]
    torch.testing.assert_close(traj.pca.components @ traj.pca.components.T, torch.eye(2), atol=1e-5, rtol=0)
    projected_variance = traj.pca.project(pooled).var(0, unbiased=False).sum()
    assert projected_variance / (pooled - pooled.mean(0)).pow(2).sum(-1).mean() == pytest.approx(
        traj.pca.explained.sum().item(), rel=1e-4
    )
    stats = funnel(traj.states["two-hop"], traj.answers["two-hop"])
    x = traj.states["two-hop"]
    for layer in range(5):  # mean squared pairwise distance over all ordered pairs = 2 x spread around the centroid
        pairs = [torch.cdist(x[g, layer], x[g, layer]).pow(2).mean() / 2 for g in ([0, 1], [2, 3])]
        assert stats["within"][layer].item() == pytest.approx(torch.stack(pairs).mean().item(), rel=1e-4)
        all_pairs = torch.cdist(x[:, layer], x[:, layer]).pow(2).mean() / 2
        assert stats["total"][layer].item() == pytest.approx(all_pairs.item(), rel=1e-4)
    assert stats["total"][0] == 0 and stats["ratio"][0] == 0  # every prompt ends in the same token "is"
    assert stats["ratio"][-1] < stats["ratio"][1]  # then same-answer prompts converge
    with pytest.raises(CircuitsError, match="same answer"):
        funnel(x[:3:2], ["a", "b"])
    with pytest.raises(CircuitsError, match="outside"):
        residual_states(demo_model, prompts[:1], position=40)
    assert spread(x).shape == (5,)


def test_pca_matches_an_independent_eigendecomposition():
    x = torch.randn(200, 6) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    pca = fit_pca(x, k=3)
    eigvals, eigvecs = torch.linalg.eigh(torch.cov(x.T, correction=0))
    top = eigvecs[:, eigvals.argsort(descending=True)[:3]].T
    torch.testing.assert_close(pca.components.abs(), top.abs(), atol=1e-4, rtol=0)
    expected = eigvals.sort(descending=True).values[:3] / eigvals.sum()
    assert pca.explained.tolist() == pytest.approx(expected.tolist(), rel=1e-5)


def test_graph_nodes_map_to_trace_cells():
    nodes = [
        {"node_id": "E_1_0", "layer": "E", "ctx_idx": 0},
        {"node_id": "0_12_3", "layer": "0", "ctx_idx": 3},
        {"layer": 2, "feature": 5, "ctx_idx": 3},
        {"node_id": "5_777_10", "layer": "5", "ctx_idx": 10},  # a logit node (layer n_layers + 1)
    ]
    cells = graph_nodes_by_cell(nodes, n_layers=4)
    assert cells == {(0, 0): ["E_1_0"], (1, 3): ["0_12_3"], (3, 3): ["2_5_3"], (4, 10): ["5_777_10"]}


def test_report_json_and_figures(flagship_report):
    data = json.loads(json.dumps(report_json(flagship_report)))
    assert [p["path"] for p in data["paths"]][0] == ["Dallas", "Texas", "Austin"]
    assert data["graph_cells"] == {"0,3": ["E_9_3"], "2,5": ["1_7_5"]}
    texas = next(c for c in data["concepts"] if c["name"] == "Texas")
    assert texas["peak"]["position"] == 5 and len(texas["prob"]) == 5
    figs = figures(flagship_report)
    assert {"trace:Texas", "writers:Texas", "paths", "flow", "patching:head", "trajectories", "funnel"} <= set(figs)
    assert json.loads(json.dumps(figs)) == figs  # plain JSON chart specs
    traces = [name for name in figs if name.startswith("trace:")]
    assert traces[0] == "trace:Texas" and traces[-1] == "trace:Dallas"  # the intermediate first, prompt words last
    trace = figs["trace:Texas"]
    prob = flagship_report.trace("Texas").prob
    torch.testing.assert_close(torch.tensor(trace["grids"][0]["z"]), prob.float(), atol=6e-5, rtol=0)
    assert trace["marks"] == [{"row": 2, "col": 5, "text": "peak"}]
    # one numbering: residual row r is the stream after block r - 1, where layer r - 1's features write
    assert trace["y"] == ["embed", "after block 0", "after block 1", "after block 2", "after block 3"]
    assert figs["patching:resid_pre"]["y"] == trace["y"][:-1] and figs["funnel"]["x"] == trace["y"]
    assert figs["writers:Texas"]["y"] == ["block 0", "block 1", "block 2", "block 3"]
    flow = figs["flow"]
    assert flow["y"] == trace["y"] and [s["concept"] for s in flow["steps"]] == ["Dallas", "Texas", "Austin"]
    assert [(s["row"], s["col"]) for s in flow["steps"]] == [tuple(p) for p in data["paths"][0]["peaks"]]


def test_flow_gif_has_one_frame_per_hop(flagship_report):
    steps = flow_steps(flagship_report)
    gif = Image.open(io.BytesIO(flow_gif(steps, flagship_report.tokens, 4)))
    assert gif.format == "GIF" and gif.n_frames == len(steps) == 3


def test_html_is_offline_and_escapes_hostile_strings(demo_model, tmp_path):
    hostile = 'Fact: <script>alert("x")</script> Dallas is in the state whose capital is'
    spec = '<img src=x onerror="alert(1)">=Texas|Ohio'
    report = concept_report(demo_model, hostile, concepts=[spec], categories=CATEGORIES)
    page = render_concepts_html(report)
    assert not re.search(r"<(script|link|img|iframe)[^>]*(src|href)\s*=\s*[\"']?(https?:)?//", page, re.I)
    assert "<img src=x" not in page and '<script>alert("x")' not in page
    assert page.count("<script>") == 2  # the charts' script and the drawing loop, nothing else
    assert len(page) < 100_000  # no plotting library inlined
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    path = write_concepts_page(report, tmp_path / "out")
    assert path.read_text(encoding="utf-8") == page
    assert json.loads((tmp_path / "out" / "concepts.json").read_text())["prompt"] == hostile


def test_cli_writes_the_page_and_prints_its_path_last(tmp_path, capsys):
    out = tmp_path / "page"
    argv = ["concepts", FLAGSHIP, "--concept", "Texas", "--concept", "@states", "--path", "Dallas,Texas,Austin"]
    argv += ["--auto", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(out / "concepts.html")
    assert {p.name for p in out.iterdir()} == {"concepts.html", "concepts.json", "flow.gif"}
    data = json.loads((out / "concepts.json").read_text())
    assert "states" in [c["name"] for c in data["concepts"]]  # --model demo: the demo's categories
    assert data["patching"]["corrupt_prompt"] == "Fact: Birmingham is in the state whose capital is"  # @cities


@pytest.mark.parametrize(
    "argv, message",
    [
        (["concepts", FLAGSHIP, "--concept", "Zanzibar"], "not in the model's vocabulary"),
        (["concepts", FLAGSHIP, "--counterfactual", "Fact: Dallas is in the capital"], "same token length"),
        (["concepts", ""], "prompt is empty"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_two_hop_prompts_the_true_path_ranks_first_and_the_state_peaks_at_in(demo_model):
    cases = two_hop_cases()
    subset = cases[:100:10] + cases[100::10]  # 10 trained cities, 5 held-out ones
    results = study(demo_model, subset)
    assert sum(r.true_rank_among_paths == 1 for r in results) / len(results) >= 0.9
    assert sum(r.true_score > r.wrong_score for r in results) / len(results) >= 0.9
    assert all(r.state_peak[1] == 5 and r.state_peak[0] >= 1 for r in results)  # at "in", after >= 1 block
    # At the last token, the true state leads all other states from the third residual row on.
    assert sum(r.state_rank_last_position[3] == 1 for r in results) / len(results) >= 0.9


def test_trajectories_overlay_two_models_in_one_space(demo_model):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from circuits.concepts.figures import trajectories_figure
    from circuits.models import load_model

    other = load_model("demo")
    with torch.no_grad():
        other.blocks[1].mlp.W_out.mul_(0.5)  # a different model with the same shapes
    prompts = [f"Fact: {c} is in the state whose capital is" for c in ("Dallas", "Houston", "Chicago")]
    traj = trajectories(demo_model, {"demo": prompts, "other": prompts}, k=3, other_model=other)
    torch.testing.assert_close(traj.states["other"], residual_states(other, prompts))
    torch.testing.assert_close(traj.states["demo"][:, :2], traj.states["other"][:, :2])  # same until block 1 writes
    assert not torch.allclose(traj.states["demo"][:, 2:], traj.states["other"][:, 2:])
    fig = trajectories_figure(traj, demo_model.cfg.n_layers + 1)
    assert len(fig["series"]) == 6 and fig["zlabel"].startswith("PC3")  # drawn rotatable
    torch.testing.assert_close(torch.tensor(fig["series"][4]["z"]), traj.coords["other"][1, :, 2], atol=6e-5, rtol=0)
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=64, n_ctx=32, d_head=16, n_heads=4, d_vocab=demo_model.cfg.d_vocab, act_fn="gelu",
        tokenizer_name=str(DEMO_MODEL_DIR / "tokenizer"),
    )  # fmt: skip
    with pytest.raises(CircuitsError, match="different d_model"):
        trajectories(demo_model, {"demo": prompts, "small": prompts}, other_model=HookedTransformer(cfg))


def test_the_state_peak_at_in_is_not_causal_but_the_last_token_is(demo_model):
    from circuits.demo.two_hop import patching_at_state_peak

    # Measured on the demo model (scripts/concepts_report.py): the lens peak of the state at "in" is the one-hop
    # prediction "Dallas is in [Texas]", unused for the answer; the last token at that layer carries it all.
    for result in study(demo_model, [("Dallas", "two_hop"), ("Moab", "two_hop_held_out")]):
        at_peak, at_last = patching_at_state_peak(demo_model, result)
        assert abs(at_peak) < 0.1 and at_last > 0.9


def test_report_paths_through_groups_and_extra_trajectory_sets(demo_model):
    one_hop = ["The capital of Texas is", "The capital of Ohio is", "The capital of Utah is"]
    report = concept_report(
        demo_model,
        FLAGSHIP,
        concepts=["@states"],
        paths=[["Dallas", "states", "Austin"], ["Dallas", "@capitals"]],
        counterfactual=COUNTERFACTUAL,
        trajectory_sets={"one-hop": one_hop},
        categories=CATEGORIES,
    )
    assert {p.path for p in report.paths} == {("Dallas", "states", "Austin"), ("Dallas", "capitals")}
    assert report.trajectories.answers["one-hop"] == ["Austin", "Columbus", "Salt Lake City"]
    n = len(report.trajectories.sets["prompt and variants"])
    assert report.trajectories.coords["one-hop"].shape == (3, 5, 2) and n == 24


TOWNS = {"towns": ["Dallas", "Chicago", "Moab"]}  # a category of the caller's own, across three states


def test_categories_are_inputs_to_concepts_and_counterfactuals(demo_model):
    traces, lens = trace_concepts(demo_model, FLAGSHIP, ["@towns"], categories=TOWNS)
    ids = [demo_model.to_single_token(w) for w in TOWNS["towns"]]
    assert traces[0].concept.name == "towns" and traces[0].concept.first_tokens == ids
    torch.testing.assert_close(traces[0].prob, lens.softmax(-1)[..., ids].sum(-1), atol=1e-6, rtol=1e-5)
    swapped = [FLAGSHIP.replace("Dallas", town) for town in ("Chicago", "Moab")]
    assert category_variants(demo_model, FLAGSHIP, TOWNS) == swapped
    assert propose_counterfactuals(demo_model, FLAGSHIP, TOWNS) == swapped  # Springfield and Salt Lake City
    assert category_variants(demo_model, FLAGSHIP, {}) == []
    assert member_swaps("in Dallas now", {"odd": ["Dallas", r"\1 & \g<0>"]}) == [r"in \1 & \g<0> now"]  # literal


def test_without_categories_a_category_is_a_one_line_error_and_the_model_proposes_swaps(demo_model, tmp_path, capsys):
    with pytest.raises(CircuitsError, match=r"unknown concept category @states \(known: none\): pass categories=") as e:
        make_concept(demo_model, "@states")
    assert len(str(e.value).splitlines()) == 1
    # No categories: the counterfactual swaps the traced prompt word (Dallas) for another word the model itself
    # ranks high in that slot, of the same token length, whose answer differs.
    report = concept_report(demo_model, FLAGSHIP, concepts=["Dallas", "Texas"])
    corrupt = report.patching.corrupt_prompt
    new = demo_model.to_str_tokens(corrupt)[3]
    assert corrupt == FLAGSHIP.replace("Dallas", new) and new != "Dallas"
    tokens = prompt_tokens(demo_model, FLAGSHIP)
    ranked = demo_model(tokens)[0, 2].topk(16).indices.tolist()
    assert demo_model.to_single_token(new) in ranked
    assert report.patching.foil.strip() != report.prediction
    variants = report.trajectories.sets["prompt and variants"]
    assert len(variants) == 9 and {prompt_tokens(demo_model, v).shape for v in variants} == {tokens.shape}
    assert slot_swaps(demo_model, FLAGSHIP, [3], per_slot=3) == [FLAGSHIP.replace("Dallas", c) for c in _top_cities(3)]
    # The CLI passes the demo's categories for `--model demo` only: the same model from its directory has none.
    argv = ["concepts", FLAGSHIP, "--concept", "@states", "--model", str(DEMO_MODEL_DIR), "--out", str(tmp_path)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "known: none" in err


def _top_cities(n: int) -> list[str]:
    """The demo model's top-ranked capitalised words after "Fact:", by a plain loop over its ranking."""
    model = load_model("demo")
    logits = model(prompt_tokens(model, "Fact:"))[0, -1]
    words = [model.to_single_str_token(i) for i in logits.argsort(descending=True).tolist()]
    return [w for w in words if w[:1].isupper() and w != "Dallas"][:n]


def _import_graph():
    """scripts/import_graph.py as a module."""
    spec = importlib.util.spec_from_file_location("import_graph", Path(__file__).parents[2] / "scripts/import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_concepts_never_import_the_demo_and_sit_on_their_floors():
    graph = _import_graph()
    modules = graph.module_names()
    edges = {name: graph.imports(path, name, set(modules)) for name, path in modules.items()}
    edges["circuits"] = set()  # as in the script: the lazy root re-exports every stage, it is no floor

    def floor(name: str, seen: tuple[str, ...] = ()) -> int:
        return 0 if name in seen else 1 + max((floor(d, (*seen, name)) for d in edges[name]), default=0)

    concepts = [name for name in modules if name.startswith("circuits.concepts.")]
    assert [(n, d) for n in concepts for d in edges[n] if d.startswith("circuits.demo")] == []
    assert [loop for loop in graph.folder_loops(edges, modules) if "circuits.concepts" in loop] == []
    floors = {name.rpartition(".")[2]: floor(name) for name in concepts}
    assert max(floors[m] for m in ("lens", "paths", "patching", "trajectories", "figures")) <= 3
    assert floors["report"] <= 4 and floors["page"] <= 5


def _patched_recovery(model, hook_name: str, pos: int) -> float:
    """Recovered fraction of logit(Austin) - logit(foil) when the clean activation at one hook and position is
    written into the counterfactual run, by a plain hook (independent of run_patches)."""
    clean, corrupt = prompt_tokens(model, FLAGSHIP), prompt_tokens(model, COUNTERFACTUAL)
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean)
        corrupt_logits = model(corrupt)
        answer, foil = int(clean_logits[0, -1].argmax()), int(corrupt_logits[0, -1].argmax())

        def put(act, hook):
            act[:, pos] = cache[hook_name][:, pos]
            return act

        patched = model.run_with_hooks(corrupt, fwd_hooks=[(hook_name, put)])
    diff = [float(x[0, -1, answer] - x[0, -1, foil]) for x in (clean_logits, corrupt_logits, patched)]
    return (diff[2] - diff[1]) / (diff[0] - diff[1])


def test_causal_path_score_carries_the_recovery_at_each_peak(demo_model, flagship_report):
    true = next(p for p in flagship_report.paths if p.path == ("Dallas", "Texas", "Austin"))
    assert true.peaks == [(0, 3), (2, 5), (4, 10)]
    expected = [
        _patched_recovery(demo_model, "blocks.0.hook_resid_pre", 3),
        _patched_recovery(demo_model, "blocks.2.hook_resid_pre", 5),
        _patched_recovery(demo_model, "blocks.3.hook_resid_post", 10),  # row L: the final residual
    ]
    assert true.recoveries == pytest.approx(expected, abs=1e-4)
    assert expected[0] > 0.9 and abs(expected[1]) < 0.05 and expected[2] == pytest.approx(1.0, abs=1e-4)
    # Texas is read by the lens at "in" (rank 1) but that cell does not carry the answer: flagged.
    assert true.agrees == [True, False, True]
    clipped = [min(max(r, 0.0), 1.0) for r in expected]
    assert true.causal_score == pytest.approx(true.score * sum(clipped) / 3, rel=1e-4)
    data = report_json(flagship_report)["paths"]
    assert {tuple(p["path"]): p["agrees"] for p in data}[("Dallas", "Texas", "Austin")] == [True, False, True]
    page = render_concepts_html(flagship_report)
    assert "causal score" in page and "<mark" in page


def test_the_default_funnel_groups_variants_by_answer_within_plus_between_is_total(demo_model):
    report = concept_report(demo_model, FLAGSHIP, concepts=["Texas"], categories=CATEGORIES, three_d=True)
    answers = report.trajectories.answers["prompt and variants"]
    assert answers[:3] == ["Austin"] * 3 and len(answers) == 24  # the prompt's own answer has partners
    assert all(answers.count(a) >= 2 for a in answers)
    assert report.trajectories.coords["prompt and variants"].shape == (24, 5, 3)  # three_d: 3 components
    f = report.funnel
    torch.testing.assert_close(f["within"] + f["between"], f["total"], rtol=1e-4, atol=1e-3)
    x = report.trajectories.states["prompt and variants"]  # [24, 5, d]: 8 answers of 3 prompts
    centroids = x.reshape(8, 3, *x.shape[1:]).mean(1)  # [8, 5, d]
    between = (centroids - x.mean(0)).pow(2).sum(-1).mean(0)
    torch.testing.assert_close(f["between"], between, rtol=1e-4, atol=1e-3)
    assert (f["between"][1:] > 3 * f["within"][1:]).all()  # answers part more than same-answer prompts spread
