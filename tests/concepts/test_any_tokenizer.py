"""Concepts on any model: a byte-level BPE tokenizer (a tiny GPT-2 built offline) with words of many tokens,
words that share their first token (a bare space), prompt words spanning several tokens; and groups, a
vocabulary file and a transcoder's graph nodes as the CLI's inputs on a model that is not `demo`."""

import json
import logging

import pytest
import torch

from circuits.cli import main
from circuits.concepts.categories import parse_group, read_vocabulary
from circuits.concepts.lens import propose_intermediates, trace_concepts, word_anchor
from circuits.errors import CircuitsError
from circuits.models import DEMO_MODEL_DIR, load_model, prompt_tokens
from tests.hf_models import hf_logits, write_tiny_hf_model

PROMPT = "The capital of Pennsylvania is"
SHARED = ["Harrisburg", "Philadelphia", "Houston"]  # each starts with the bare-space token ' '


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    directory = write_tiny_hf_model("gpt2", tmp_path_factory.mktemp("bpe"))
    return directory, load_model(str(directory))


def test_the_words_share_a_blank_first_token(bpe):
    _, model = bpe
    firsts = {model.to_tokens(" " + w, prepend_bos=False)[0, 0].item() for w in SHARED}
    assert len(firsts) == 1 and model.to_single_str_token(firsts.pop()) == " "


def test_words_sharing_a_first_token_are_scored_whole_and_warned_about(bpe, caplog):
    directory, model = bpe
    with caplog.at_level(logging.WARNING, logger="circuits.concepts.lens"):
        traces, lens = trace_concepts(model, PROMPT, [*SHARED, "Dallas"])
    assert "--full-sequence" in caplog.text and "'Harrisburg'" in caplog.text
    by_name = {t.concept.name: t for t in traces}
    assert [by_name[w].whole for w in SHARED] == [(True,)] * 3 and by_name["Dallas"].whole == (False,)
    for a, b in [(0, 1), (0, 2), (1, 2)]:  # the traces differ wherever they are compared
        assert (by_name[SHARED[a]].logprob - by_name[SHARED[b]].logprob).abs().min() > 1e-3
    # The last row is the model's own probability of the whole word after each prefix, checked against
    # transformers running the snapshot on prefix + word.
    tokens = prompt_tokens(model, PROMPT)
    ids = list(by_name["Harrisburg"].concept.token_ids[0])
    for p in range(tokens.shape[1]):
        extended = torch.cat([tokens[:, : p + 1], torch.tensor([ids])], 1)
        logprobs = hf_logits(directory, extended)[0].log_softmax(-1)
        expected = sum(float(logprobs[p + i, t]) for i, t in enumerate(ids))
        assert by_name["Harrisburg"].logprob[-1, p].item() == pytest.approx(expected, abs=1e-3)
    # Rank among single tokens, the word's own first token left out: at least as many tokens as beat it.
    t = by_name["Houston"]
    above = (lens.log_softmax(-1) > t.logprob.unsqueeze(-1)).sum(-1)  # [L+1, pos]
    first = model.to_tokens(" Houston", prepend_bos=False)[0, 0]
    torch.testing.assert_close(t.rank, above + 1 - (lens.log_softmax(-1)[..., first] > t.logprob).long())


def test_full_sequence_scores_every_multi_token_word_whole(bpe):
    _, model = bpe
    traces, _ = trace_concepts(model, PROMPT, ["Seattle"], full_sequence=True)
    assert traces[0].whole == (True,) and len(traces[0].concept.token_ids[0]) == 2
    alone, _ = trace_concepts(model, PROMPT, ["Seattle"])  # ' Seat' is a word piece of its own: first token
    assert alone[0].whole == (False,)
    assert (alone[0].logprob - traces[0].logprob).min() > 0  # P(first token) > P(whole word)


def test_a_prompt_word_is_anchored_to_all_its_tokens(bpe):
    _, model = bpe
    tokens = prompt_tokens(model, PROMPT)
    n = len(model.to_tokens(" Pennsylvania", prepend_bos=False)[0])
    assert n > 5
    traces, _ = trace_concepts(model, PROMPT, ["Pennsylvania", "capital"])
    penn, capital = traces
    assert penn.anchor == (4, 4 + n - 1) and penn.peak() == (0, 4 + n - 1)
    assert capital.anchor == (2, 2)
    assert word_anchor(model, tokens, "Harrisburg") is None
    assert word_anchor(model, prompt_tokens(model, "Pennsylvania is"), "Pennsylvania") == (1, n - 1)  # at the start


def test_cli_on_the_bpe_model_notes_the_whole_words(bpe, tmp_path, capsys):
    directory, _ = bpe
    out = tmp_path / "out"
    argv = ["concepts", PROMPT, "--model", str(directory), "--concept", "Harrisburg", "--concept", "Philadelphia"]
    assert main([*argv, "--path", "Pennsylvania,Harrisburg", "--out", str(out)]) == 0
    data = json.loads((out / "concepts.json").read_text())
    assert [c["scored_whole"] for c in data["concepts"][:2]] == [[True], [True]]
    assert "Philadelphia" in data["notes"][0]
    assert data["concepts"][0]["logprob"] != data["concepts"][1]["logprob"]
    assert "first token" in (out / "concepts.html").read_text()


def test_groups_and_vocabulary_files_are_inputs(tmp_path):
    assert parse_group("towns = Dallas|Chicago| Moab") == ("towns", ["Dallas", "Chicago", "Moab"])
    (tmp_path / "v.txt").write_text("# mine\ntowns=Dallas|Chicago\n\nbig=Texas\n")
    assert read_vocabulary(tmp_path / "v.txt") == {"towns": ["Dallas", "Chicago"], "big": ["Texas"]}
    (tmp_path / "v.json").write_text('{"towns": ["Dallas"]}')
    assert read_vocabulary(tmp_path / "v.json") == {"towns": ["Dallas"]}
    for bad in ("towns", "=a|b", "towns=|"):
        with pytest.raises(CircuitsError, match="NAME=word1"):
            parse_group(bad)
    (tmp_path / "bad.json").write_text('{"towns": "Dallas"}')
    with pytest.raises(CircuitsError, match="non-empty word lists"):
        read_vocabulary(tmp_path / "bad.json")


def test_cli_groups_and_the_transcoders_graph_nodes_beside_the_trace(tmp_path, capsys):
    (tmp_path / "v.txt").write_text("towns=Dallas|Chicago|Moab\n")
    out = tmp_path / "out"
    argv = ["concepts", "Fact: Dallas is in the state whose capital is", "--model", str(DEMO_MODEL_DIR)]
    argv += ["--vocabulary", str(tmp_path / "v.txt"), "--group", "big=Texas|California", "--concept", "@big"]
    assert main([*argv, "--concept", "Austin", "--transcoder", "demo", "--out", str(out)]) == 0
    data = json.loads((out / "concepts.json").read_text())
    assert data["patching"]["corrupt_prompt"] == "Fact: Chicago is in the state whose capital is"  # from @towns
    assert [c["words"] for c in data["concepts"]] == [["Texas", "California"], ["Austin"]]
    austin = data["concepts"][1]["peak"]
    n_layers = data["n_layers"]
    # The logit node of Austin sits in the last row at the last position: beside Austin's peak.
    assert (austin["layer"], austin["position"]) == (n_layers, 10)
    assert any(i.startswith(f"{n_layers + 1}_") for i in data["graph_cells"][f"{n_layers},10"])
    assert "Graph nodes at each peak" in (out / "concepts.html").read_text()


def test_proposals_are_words_on_a_subword_tokenizer(bpe):
    _, model = bpe
    tokens = prompt_tokens(model, PROMPT)
    _, lens = trace_concepts(model, PROMPT, [])
    proposals = propose_intermediates(model, tokens, lens, k=5)
    vocab = {model.to_single_str_token(i): i for i in range(model.cfg.d_vocab)}
    assert proposals and all(" " + p in vocab for p in proposals)  # each a token that begins a word
