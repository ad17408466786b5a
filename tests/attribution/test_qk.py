"""QK attributions: the terms sum to the score, the score is TransformerLens's own attention score
(hook_attn_scores, after the soft cap where the model has one; q . k of hook_rot_q and hook_rot_k
before it), and each position's sources sum to the residual stream, on LayerNorm, rotary/RMSNorm/
grouped-query and Gemma-2-style random models in float64; and the `circuits qk` command."""

import json
import math

import pytest
import torch

from circuits.attribution.qk import qk_attribution, qk_terms, residual_parts
from circuits.attribution.replacement import build_replacement
from circuits.cli import main
from tests.attribution.test_attribute import GEMMA_LIKE, LLAMA_LIKE, _random_clt, _random_model

STYLES = {"layernorm": {}, "llama": LLAMA_LIKE, "gemma2": GEMMA_LIKE}
PROMPT = "Fact : Dallas is in the state"


@pytest.mark.parametrize("style,skip", [("layernorm", False), ("layernorm", True), ("llama", False), ("gemma2", True)])
def test_qk_terms_sum_to_transformer_lens_scores(style, skip):
    model = _random_model(seed=2, **STYLES[style]).double()
    model.cfg.dtype = torch.float64
    clt = _random_clt(model, seed=2, skip=skip).double()
    tokens = model.to_tokens(PROMPT)[0]
    _, cache = model.run_with_cache(tokens[None])
    rep = build_replacement(model, clt, tokens, torch.float64)
    cap, H = model.cfg.attn_scores_soft_cap, model.cfg.n_heads
    group = H // (model.cfg.n_key_value_heads or H)
    rotary = model.cfg.positional_embedding_type == "rotary"
    for layer in range(model.cfg.n_layers):
        parts = residual_parts(rep, layer)
        resid = cache[f"blocks.{layer}.hook_resid_pre"][0]
        assert torch.allclose(torch.stack([v.sum(0) for v in parts.vectors]), resid, rtol=0, atol=1e-12)
        q_hook, k_hook = (f"blocks.{layer}.attn.hook_{'rot_' if rotary else ''}{x}" for x in "qk")
        for head in range(H):
            for query, key in ((6, 3), (7, 0), (5, 5), (7, 7)):
                qk = qk_terms(model, rep, parts, layer, head, query, key)
                assert qk.terms.sum().item() == pytest.approx(qk.score, rel=1e-12, abs=1e-12)
                before_cap = cache[q_hook][0, query, head] @ cache[k_hook][0, key, head // group]
                assert qk.score == pytest.approx((before_cap / model.blocks[layer].attn.attn_scale).item(), abs=1e-12)
                capped = qk.score if cap <= 0 else cap * math.tanh(qk.score / cap)
                reference = cache[f"blocks.{layer}.attn.hook_attn_scores"][0, head, query, key].item()
                assert capped == pytest.approx(reference, rel=1e-12, abs=1e-12)
    names = set(qk.query_sources) | set(qk.key_sources)
    assert {f"head_0.{H - 1}_7", "bias_Q_7", "bias_K_7", "0_-1_7"} <= names
    assert any(n.split("_")[0].isdigit() and n.split("_")[1] != "-1" for n in names)  # feature sources


def test_the_qk_command(tmp_path, capsys):
    out = tmp_path / "qk.json"
    assert main(["qk", "Fact: Dallas is in the state whose capital is", "--layer", "0", "--head", "2",
                 "--key", "3", "--top", "3", "--json", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    data = json.loads(out.read_text())
    assert set(data) == {"layer", "head", "query", "key", "score", "terms", "total"}
    assert (data["layer"], data["head"], data["query"], data["key"]) == (0, 2, 10, 3)
    assert data["total"] == pytest.approx(sum(t["value"] for t in data["terms"]))
    assert data["total"] == pytest.approx(data["score"], rel=1e-5)
    assert {"E_57_3", "pos_3", "bias_K_3"} == {t["key_source"] for t in data["terms"]}  # layer 0: embeddings only
    assert "'Dallas'" in printed[0] and len(printed) == 5
    assert main(["qk", "--layer", "0", "--head", "9", "--key", "3"]) == 2
    assert main(["qk", "--layer", "1", "--head", "0", "--query", "2", "--key", "3"]) == 2
    assert "after query" in capsys.readouterr().err


def test_qk_attribution_api_matches_the_hooked_model(demo_model, demo_clt):
    prompt = "Fact: Dallas is in the state whose capital is"
    qk = qk_attribution(demo_model, demo_clt, prompt, layer=2, head=1, query=-1, key=3)
    _, cache = demo_model.run_with_cache(prompt)
    assert qk.score == pytest.approx(cache["blocks.2.attn.hook_attn_scores"][0, 1, 10, 3].item(), abs=1e-4)
    assert any(q.startswith(("0_", "1_")) and not q.startswith(("0_-1", "1_-1")) for q in qk.query_sources)
