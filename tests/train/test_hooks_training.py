"""Training at every hook pair published transcoders use, on GPT-2- and Gemma-2-style random models:
the activation stream yields the values at the hooks (computed here by their definitions), the
trained transcoder records its hooks and the model's weight processing and attributes with every
node's sum identity, and hooks that do not fit are refused in one line before anything is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuits.attribution.attribute import attribute
from circuits.errors import CircuitsError
from circuits.processing import PROCESSING_ATTR
from circuits.text import TextSource, document_tokens, token_mask
from circuits.train.activations import ActivationStream
from circuits.train.config import TrainConfig, TranscoderConfig
from circuits.train.loop import train
from circuits.transcoders.clt import INPUT_HOOKS, OUTPUT_HOOKS, CLTConfig
from circuits.transcoders.load import load_transcoder
from tests.attribution.test_attribute import GEMMA_LIKE, _identity_error, _random_model

STYLES = {"gpt2": {}, "gemma2": GEMMA_LIKE}
"""LayerNorm, learned positions, no norm after the MLP; Gemma 2's RMSNorms before and after it."""
PROMPT = "Fact : Dallas is in the state whose capital"


def at_the_hooks(model, tokens: torch.Tensor) -> tuple[dict, dict]:
    """Every supported hook's value [b, p, L, d] by its definition, from one full run_with_cache and
    torch forward hooks on each block's pre-MLP norm (its output: mlp.hook_in) and MLP (its output:
    mlp.hook_out). Returns ({input hook: value}, {output hook: value})."""
    ln2_out, mlp_out = [], []
    handles = [b.ln2.register_forward_hook(lambda m, a, out: ln2_out.append(out)) for b in model.blocks]
    handles += [b.mlp.register_forward_hook(lambda m, a, out: mlp_out.append(out)) for b in model.blocks]
    _, cache = model.run_with_cache(tokens)
    for handle in handles:
        handle.remove()
    L = model.cfg.n_layers
    stack = lambda name: torch.stack([cache[f"blocks.{l}.{name}"] for l in range(L)], -2)  # noqa: E731
    inputs = {
        "hook_resid_mid": stack("hook_resid_mid"),
        "ln2.hook_normalized": stack("ln2.hook_normalized"),
        "mlp.hook_in": torch.stack(ln2_out, -2),
    }
    if model.cfg.use_hook_mlp_in:  # TransformerLens's clone of resid_mid fires only then
        inputs["hook_mlp_in"] = stack("hook_mlp_in")
    return inputs, {"hook_mlp_out": stack("hook_mlp_out"), "mlp.hook_out": torch.stack(mlp_out, -2)}


def _rows(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct (x, y) rows of [n, L, d] pairs with their counts: a multiset, order aside."""
    return torch.unique(torch.cat([x.flatten(1), y.flatten(1)], 1), dim=0, return_counts=True)


@pytest.mark.parametrize("output_hook", OUTPUT_HOOKS)
@pytest.mark.parametrize("input_hook", INPUT_HOOKS)
@pytest.mark.parametrize("style", STYLES)
@torch.no_grad()
def test_the_stream_yields_the_values_at_the_hooks(style, input_hook, output_hook):
    model = _random_model(**STYLES[style], use_hook_mlp_in=True)
    cfg = CLTConfig(model.cfg.n_layers, model.cfg.d_model, 8, input_hook=input_hook, output_hook=output_hook)
    source = TextSource("demo", seed=5, max_tokens_per_doc=24)
    tokens = document_tokens(model, source.documents(0, 16), 24)
    keep = token_mask(model, tokens)
    inputs, outputs = at_the_hooks(model, tokens)
    stream = ActivationStream(model, cfg, source, batch_tokens=int(keep.sum()), docs_per_chunk=16)
    x, y = next(stream.batches(0))  # the whole first chunk, shuffled
    want_x, want_y = _rows(inputs[input_hook][keep], outputs[output_hook][keep])
    got_x, got_y = _rows(x, y)
    assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y)
    if style == "gemma2":  # the hooks differ where they should
        assert not torch.allclose(outputs["mlp.hook_out"], outputs["hook_mlp_out"], atol=1e-2)
        assert not torch.allclose(inputs["mlp.hook_in"], inputs["ln2.hook_normalized"], atol=1e-2)


def _tiny(input_hook: str, output_hook: str, **fields) -> TrainConfig:
    return TrainConfig(
        model="tiny-gemma2", steps=4, batch_tokens=64, docs_per_chunk=16, eval_every=4, checkpoint_every=4,
        eval_docs=8, max_tokens_per_doc=24, sparsity_coef=0.05, target_fire_fraction=0.1,
        transcoder=TranscoderConfig(n_features=32, input_hook=input_hook, output_hook=output_hook), **fields,
    )  # fmt: skip


@pytest.mark.parametrize(
    "input_hook,output_hook,processing",
    [("ln2.hook_normalized", "hook_mlp_out", None), ("mlp.hook_in", "mlp.hook_out", "fold-value-biases")],
)
def test_a_transcoder_trained_at_other_hooks_records_them_and_attributes(tmp_path, input_hook, output_hook, processing):
    """A few steps on a Gemma-2-like model: the saved transcoder carries its hooks and the model's
    weight processing (as `load_model` records it, or "none" for a model built from a config), and
    every node of its attribution graph is the sum of its edges; resuming at other hooks is refused."""
    model = _random_model(**GEMMA_LIKE)
    if processing:
        setattr(model, PROCESSING_ATTR, processing)  # what load_model records; it leaves these hooks as they are
    metrics = train(_tiny(input_hook, output_hook), tmp_path / "run", model=model)
    assert all(torch.isfinite(torch.tensor(metrics[k])).all() for k in ("nmse", "l0", "kl"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["input_hook"], saved["output_hook"]) == (input_hook, output_hook)
    assert saved["model_processing"] == (processing or "none")
    clt = load_transcoder(str(tmp_path / "run"), model=model)
    assert (clt.cfg.input_hook, clt.cfg.output_hook, clt.cfg.model_processing) == (
        input_hook, output_hook, processing or "none",
    )  # fmt: skip
    graph = attribute(PROMPT, model, clt, progress=False)
    assert graph.n_features > 0 and _identity_error(graph).max() <= 1e-5
    other = _tiny("hook_resid_mid", "hook_mlp_out")
    with pytest.raises(CircuitsError, match=f"trained at hooks {input_hook} -> {output_hook}, the recipe asks"):
        train(other, tmp_path / "run", resume=True, model=model)


def test_hooks_that_do_not_fit_are_refused_before_anything_is_written(tmp_path):
    no_norms = _random_model(normalization_type=None)
    cfg = _tiny("ln2.hook_normalized", "hook_mlp_out", activation_cache=str(tmp_path / "cache"))
    with pytest.raises(CircuitsError, match="reads ln2.hook_normalized but the model has no norm before its MLPs"):
        train(cfg, tmp_path / "run", model=no_norms)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_bad_hook_in_a_recipe_is_one_line_exit_2_and_nothing_written(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(f'activation_cache = "{tmp_path / "cache"}"\n[transcoder]\ninput_hook = "hook_resid_pre"\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "circuits", "train", str(recipe), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    supported = f"use {' | '.join(INPUT_HOOKS)} -> {' | '.join(OUTPUT_HOOKS)}"
    assert "hooks hook_resid_pre -> hook_mlp_out " in out.stderr and supported in out.stderr
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["bad.toml"]
