"""`circuits compare`: the demo model against a tiny GPT-2 of another width (d_model 64 vs 128) and depth."""

import json

import pytest
import torch

from circuits.cli import main
from circuits.concepts.compare import compare_models, thinking_style
from circuits.concepts.compare_page import render_compare_html
from circuits.errors import CircuitsError
from circuits.models import load_model, prompt_tokens
from tests.hf_models import write_tiny_hf_model

PROMPTS = [f"Fact: {c} is in the state whose capital is" for c in ("Dallas", "Houston", "Chicago", "Peoria")]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return write_tiny_hf_model("gpt2", tmp_path_factory.mktemp("gpt2"))


def _lens_last(model, prompt: str) -> torch.Tensor:
    """Logit-lens log-probs [L+1, vocab] at the last token, from the residual streams by hand."""
    with torch.no_grad():
        _, cache = model.run_with_cache(prompt_tokens(model, prompt))
        rows = [cache[f"blocks.{l}.hook_resid_pre"][0, -1] for l in range(model.cfg.n_layers)]
        rows.append(cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0, -1])
        return model.unembed(model.ln_final(torch.stack(rows)[None]))[0].log_softmax(-1)


def test_thinking_style_against_a_hand_made_logit_lens(demo_model):
    for prompt in PROMPTS[:2]:
        style = thinking_style(demo_model, prompt)
        logprobs = _lens_last(demo_model, prompt)
        answer = int(logprobs[-1].argmax())
        assert style.answer == demo_model.to_single_str_token(answer)
        top = logprobs.argmax(-1).tolist()
        depth = min(r for r in range(len(top)) if all(t == answer for t in top[r:]))
        assert style.decision_depth == depth
        entropy = torch.distributions.Categorical(logits=logprobs).entropy()
        assert style.ambiguity == pytest.approx(entropy.tolist(), abs=1e-4)
        prob = logprobs[:, answer].exp()
        assert style.commitment_speed == pytest.approx(max((prob[1:] - prob[:-1]).tolist()), abs=1e-5)


def test_models_of_different_width_each_in_their_own_space(demo_model, gpt2_dir):
    small = load_model(str(gpt2_dir))
    views = compare_models({"demo": demo_model, "gpt2": small}, PROMPTS)
    demo, other = views
    assert (demo.d_model, other.d_model, demo.n_layers, other.n_layers) == (128, 64, 4, 2)
    assert demo.trajectories.coords["prompts"].shape == (4, 5, 3)
    assert other.trajectories.coords["prompts"].shape == (4, 3, 3)
    assert demo.trajectories.answers["prompts"] == ["Austin", "Austin", "Springfield", "Springfield"]
    torch.testing.assert_close(
        demo.funnel["within"] + demo.funnel["between"], demo.funnel["total"], rtol=1e-4, atol=1e-3
    )
    assert demo.summary()["decision_depth"] == sum(s.decision_depth for s in demo.styles) / 4
    page = render_compare_html(views)
    assert '"scatter3d"' in page  # the rotatable 3D trajectories
    with pytest.raises(CircuitsError, match="at least two models"):
        compare_models({"demo": demo_model}, PROMPTS)


def test_cli_writes_compare_page_and_json(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--model", "demo", "--model", str(gpt2_dir), "--out", str(out), "--max-prompts", "6"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "compare.html")
    data = json.loads((out / "compare.json").read_text())
    assert [m["d_model"] for m in data["models"]] == [128, 64]
    assert len(data["prompts"]) == 6 and data["prompts"][0] == "Fact: Dallas is in the state whose capital is"
    assert data["models"][0]["answers"][:3] == ["Austin"] * 3  # one prompt: its variants grouped by answer
    assert main(["compare", "--model", "demo", "--out", str(tmp_path / "x")]) == 2
    assert "at least two models" in capsys.readouterr().err
