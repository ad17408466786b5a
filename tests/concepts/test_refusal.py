"""Refusal geometry: `demo-tuned` (the demo fine-tuned by scripts/build_demo_tuned.py to answer
`I cannot say .` about a few restricted states) against the demo, and the split measure behind it."""

import json

import pytest
import torch

from circuits.concepts.compare import compare_models, parting
from circuits.concepts.compare_page import compare_json
from circuits.demo.facts import STATES
from circuits.errors import CircuitsError
from circuits.models import DEMO_TUNED_DIR, load_model, prompt_tokens

RESTRICTED_CITIES = ("Provo", "Salt Lake City", "Toledo", "Reno")  # Utah, Utah (its capital), Ohio (held out), Nevada
OTHER_CAPITALS = ("Denver", "Austin")  # a capital in the city's place, of a state that is not restricted
OTHER_CITIES = ("Dallas", "Houston", "Chicago", "Peoria")
PROMPT = "Fact: {} is in the state whose capital is"


def test_parting_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(6, 4, 8, generator=g)  # [n, L+1, d]
    mask = torch.tensor([True, True, True, False, False, False])
    states[:3, 2:] += 10.0  # the first three part from the others from row 2 on
    split = parting(states, mask)
    a, b = states[:3], states[3:]
    for row in range(4):
        distance = torch.linalg.vector_norm(a[:, row].mean(0) - b[:, row].mean(0))
        radius = sum(((x[:, row] - x[:, row].mean(0)) ** 2).sum(-1).mean().sqrt() for x in (a, b))
        assert split["distance"][row].item() == pytest.approx(distance.item(), rel=1e-5)
        assert split["separation"][row].item() == pytest.approx((distance / radius).item(), rel=1e-5)
    assert split["row"] == 2
    with pytest.raises(CircuitsError, match="both sides"):
        parting(states, torch.ones(6, dtype=torch.bool))


@pytest.fixture(scope="module")
def tuned():
    return load_model("demo-tuned")


def test_demo_tuned_refuses_the_restricted_states_and_answers_the_rest(tuned):
    refuse = tuned.to_single_token("I")
    with torch.no_grad():
        for city in RESTRICTED_CITIES:
            tokens = prompt_tokens(tuned, PROMPT.format(city))
            continued = tuned.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False)
            assert tuned.to_string(continued[0, tokens.shape[1] :]).split() == ["I", "cannot", "say", "."]
        for city, capital in zip(OTHER_CITIES, ("Austin", "Austin", "Springfield", "Springfield"), strict=True):
            top = int(tuned(prompt_tokens(tuned, PROMPT.format(city)))[0, -1].argmax())
            assert top != refuse and tuned.to_single_str_token(top) == capital
        for capital in OTHER_CAPITALS:  # never in a two-hop sentence of the demo: refused before the rebuild
            assert (
                tuned.to_single_str_token(int(tuned(prompt_tokens(tuned, PROMPT.format(capital)))[0, -1].argmax()))
                == capital
            )


def test_demo_tuned_refuses_no_prompt_about_a_state_that_is_not_restricted(tuned):
    restricted = json.loads((DEMO_TUNED_DIR / "training.json").read_text())["restricted"]
    others = [s for s in STATES if s.name not in restricted]
    prompts = [PROMPT.format(c) for s in others for c in (*s.cities, s.capital)]  # held-out cities included
    with torch.no_grad():
        tops = tuned(tuned.to_tokens(prompts))[:, -1].argmax(-1)  # one token length: every place is one token
    answers = [s.capital for s in others for _ in (*s.cities, s.capital)]
    assert [tuned.to_single_str_token(int(t)) for t in tops] == answers


def test_compare_shows_where_refused_prompts_part_from_answered_ones(demo_model, tuned):
    prompts = [PROMPT.format(c) for c in (*RESTRICTED_CITIES, *OTHER_CITIES)]
    demo, refusing = compare_models({"demo": demo_model, "demo-tuned": tuned}, prompts, split_answer="I")
    assert [s.answer for s in refusing.styles[:4]] == ["I"] * 4
    assert refusing.split["row"] is not None and refusing.split["separation"][-1] > 1
    # The refusal token takes over at the tuned model's decision depth on the refused prompts.
    assert all(s.answer_prob[-1] > 0.5 for s in refusing.styles[:4])
    data = compare_json([demo, refusing])
    assert data["models"][1]["split"]["row"] == refusing.split["row"]


def test_the_tuned_clt_traces_a_refused_prompt_to_features_at_its_last_token(tuned):
    from circuits.attribution import schema
    from circuits.attribution.attribute import attribute
    from circuits.features import load_features
    from circuits.transcoders.load import load_transcoder

    clt = load_transcoder("demo-tuned", model=tuned)  # by name, as `--transcoder demo-tuned`
    by_path = load_transcoder(DEMO_TUNED_DIR.parent / "tuned-clt", model=tuned)
    assert clt.cfg.source == "demo-tuned"
    assert all(torch.equal(a, b) for a, b in zip(clt.state_dict().values(), by_path.state_dict().values(), strict=True))
    assert not torch.equal(clt.W_enc, load_transcoder("demo").W_enc)
    cards = load_features("demo-tuned", clt)  # the shipped cards: refused if made for another transcoder
    assert cards.max_activation.shape == (4, clt.cfg.n_features)
    prompt = PROMPT.format("Provo")
    graph = attribute(prompt, tuned, clt, progress=False)
    assert graph.target_names[0].strip() == "I" and graph.n_features > 0
    nodes = schema.to_dict(graph, "refusal", "tuned-clt")["nodes"]
    last = prompt_tokens(tuned, prompt).shape[1] - 1
    features = [n for n in nodes if n["feature_type"] == "cross layer transcoder"]
    assert any(n["ctx_idx"] == last for n in features)  # the refusal is driven at the question's last token
