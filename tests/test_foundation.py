"""The package, the demo world, model loading and the CLI skeleton."""

import json
import subprocess
import sys

import pytest
import torch

from circuits.demo import corpus, facts
from circuits.demo.lm import evaluate
from circuits.demo.tokenizer import build_tokenizer
from circuits.errors import CircuitsError
from circuits.models import DEMO_MODEL_DIR, load_model, resolve_model_source, save_model_dir

FLAGSHIP = "Fact: Dallas is in the state whose capital is"


def test_facts_table_is_real_sized_and_unambiguous():
    assert len(facts.STATES) >= 40
    assert all(len(s.cities) == 3 for s in facts.STATES)
    names = facts.entity_names()
    assert len(names) == len(set(names)), "a name is reused: cities must determine one state"
    assert facts.STATE_OF_CITY["Dallas"].capital == "Austin"


def test_corpus_is_deterministic_and_holds_out_two_hop_sentences():
    assert corpus.generate_documents(20, seed=3) == corpus.generate_documents(20, seed=3)
    assert corpus.generate_documents(20, seed=3) != corpus.generate_documents(20, seed=4)
    text = " ".join(corpus.generate_documents(3000, seed=0))
    for city in facts.held_out_cities():
        assert f"Fact : {city} is in the state whose" not in text
        assert f"{city} is" in text  # its one-hop fact is there
    assert "Fact : Dallas is in the state whose capital is Austin ." in text


def test_tokenizer_round_trip_and_special_ids(demo_model):
    tok = build_tokenizer()
    assert tok.bos_token_id != 0 and tok.pad_token_id == 0
    assert demo_model.to_str_tokens(FLAGSHIP) == [
        "<bos>", "Fact", ":", "Dallas", "is", "in", "the", "state", "whose", "capital", "is",
    ]  # fmt: skip
    ids = tok("Zanzibar is in Salt Lake City")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "<unk>", "is", "in", "Salt Lake City"]
    assert tok.decode(tok(FLAGSHIP)["input_ids"], skip_special_tokens=True) == FLAGSHIP.replace(":", " :")
    assert demo_model.cfg.d_vocab == len(tok) != demo_model.cfg.d_model


def test_demo_model_meets_accuracy_target(demo_model):
    accuracy = evaluate(demo_model)
    assert accuracy["one_hop_capital"] >= 0.95
    assert accuracy["one_hop_state"] >= 0.95
    assert accuracy["two_hop"] >= 0.95
    # Composition has no target, but the reported number must be the model's own (1.0: 50 of 50 shipped).
    assert accuracy["two_hop_held_out"] == pytest.approx(_held_out_two_hop_accuracy(demo_model), abs=1e-6)
    recorded = json.loads((DEMO_MODEL_DIR / "training.json").read_text())["accuracy"]
    assert recorded == pytest.approx(accuracy, abs=1e-6)


@torch.no_grad()
def _held_out_two_hop_accuracy(model) -> float:
    """Top-1 accuracy on the held-out cities' two-hop prompts, recomputed independently of `evaluate`:
    one prompt per forward pass, typed as a user would, answers read from the facts table."""
    cities = facts.held_out_cities()
    correct = 0
    for city in cities:
        logits = model(model.to_tokens(f"Fact: {city} is in the state whose capital is"))[0, -1]
        correct += model.to_single_str_token(int(logits.argmax())) == facts.STATE_OF_CITY[city].capital
    return correct / len(cities)


def test_flagship_prompt_predicts_austin(demo_model):
    logits = demo_model(demo_model.to_tokens(FLAGSHIP))[0, -1]
    assert demo_model.to_single_str_token(int(logits.argmax())) == "Austin"


def test_local_directory_round_trip(demo_model, tmp_path):
    save_model_dir(demo_model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    loaded = load_model(str(tmp_path / "m"))
    tokens = demo_model.to_tokens(FLAGSHIP)
    torch.testing.assert_close(loaded(tokens), demo_model(tokens), rtol=0, atol=0)
    assert loaded.cfg.tokenizer_name == str((tmp_path / "m" / "tokenizer").resolve())


def test_model_dispatch():
    assert resolve_model_source("demo") == ("local", str(DEMO_MODEL_DIR))
    assert resolve_model_source("gpt2") == ("pretrained", "gpt2")
    assert resolve_model_source("EleutherAI/pythia-70m") == ("pretrained", "EleutherAI/pythia-70m")
    with pytest.raises(CircuitsError, match="unknown model"):
        resolve_model_source("no-such-model-xyz")
    with pytest.raises(CircuitsError, match="does not exist"):
        resolve_model_source("./no/such/dir")


def test_bad_model_directory(tmp_path, demo_model):
    with pytest.raises(CircuitsError, match="model.safetensors is missing"):
        (tmp_path / "config.json").write_text("{}")
        (tmp_path / "tokenizer").mkdir()
        load_model(str(tmp_path))
    save_model_dir(demo_model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "n_layerz": 3}))
    with pytest.raises(CircuitsError, match="unknown fields"):
        load_model(str(tmp_path / "m"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "circuits", *args], capture_output=True, text=True, timeout=300)


def test_cli_help_version_and_predict():
    out = _cli("--help")
    assert out.returncode == 0 and "predict" in out.stdout
    assert _cli("--version").stdout.startswith("circuits ")
    out = _cli("predict", FLAGSHIP)
    assert out.returncode == 0, out.stderr
    assert "'Austin'" in out.stdout.splitlines()[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [(("predict", "   "), "prompt is empty"), (("predict", "x", "--model", "nope-model"), "unknown model")],
)
def test_cli_bad_input_is_one_line_exit_2(args, message):
    out = _cli(*args)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr
