"""Every published transcoder family, end to end on a tiny real-architecture Hugging Face model: the
family's files in their published layout (random weights, real config fields, `tests/layouts.py`) sized
for the model and at the hooks the family publishes, loaded with `load_transcoder(dir, model=model)`,
attributed, and checked against the sum identity and autograd through the spliced model. One `circuits
trace` run per architecture writes the graph JSON naming the hooks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from circuits.attribution.attribute import attribute
from circuits.cli import main
from circuits.errors import CircuitsError
from circuits.models import load_model
from circuits.transcoders.load import load_transcoder
from tests import layouts
from tests.attribution.test_attribute import _identity_error
from tests.hf_models import PROMPT, write_tiny_hf_model
from tests.reference import rows_against_autograd

N_FEATURES = 16
"""Few features: with the writers' scales (encoder rows ~ N(0, 1/d), thresholds U(0.1, 0.6)) about a
third fire on each of the prompt's tokens, so every layer has active features."""
NO_PROCESSING = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False}
"""SAELens's metadata.model_from_pretrained_kwargs for a model loaded with the published weights."""


@dataclass
class Family:
    """A published family: its writer and options, the tiny model it runs on, and its hooks."""

    writer: object
    model: str
    hooks: tuple[str, str]
    options: dict = field(default_factory=dict)


FAMILIES = {
    # circuit-tracer CLTs (mntss/clt-gemma-2-2b-426k, mntss/clt-llama-3.2-1b-524k)
    "ct_clt_jumprelu": Family(layouts.write_ct_clt, "gpt2", ("hook_resid_mid", "hook_mlp_out"), {"model_name": "gpt2"}),
    "ct_clt_relu": Family(layouts.write_ct_clt, "llama", ("hook_resid_mid", "hook_mlp_out"), {"activation": "relu"}),
    # circuit-tracer transcoder sets (mntss/transcoder-Llama-3.2-1B, mwhanna/qwen3-*-transcoders)
    "ct_plt_relu_skip": Family(layouts.write_ct_transcoder_set, "llama", ("mlp.hook_in", "mlp.hook_out"),
                               {"activation": "relu", "skip": True}),
    "ct_plt_jumprelu": Family(layouts.write_ct_transcoder_set, "qwen3", ("mlp.hook_in", "mlp.hook_out"),
                              {"activation": "jumprelu", "model_name": "Qwen/Qwen3-0.6B"}),
    "ct_plt_jumprelu_skip_list": Family(layouts.write_ct_transcoder_set, "qwen3", ("mlp.hook_in", "mlp.hook_out"),
                                        {"activation": "jumprelu", "skip": True, "transcoders_list": "absolute",
                                         "model_name": "Qwen/Qwen3-0.6B"}),
    # GemmaScope (google/gemma-scope-2b-pt-transcoders + mwhanna/gemma-scope-transcoders' config)
    "gemmascope_npz": Family(layouts.write_gemmascope_npz, "gemma2", ("ln2.hook_normalized", "hook_mlp_out"),
                             {"paths": "relative"}),
    "ct_cache_gemmascope": Family(layouts.write_ct_cache, "gemma2", ("ln2.hook_normalized", "hook_mlp_out"),
                                  {"source": "gemmascope"}),
    # GemmaScope-2 (google/gemma-scope-2-270m-pt), on the Gemma-3 architecture it was published for
    "gemmascope2_plt_affine": Family(layouts.write_gemmascope2_transcoders, "gemma3", ("mlp.hook_in", "hook_mlp_out"),
                                     {"affine": True, "paths": "relative"}),
    "gemmascope2_plt": Family(layouts.write_gemmascope2_transcoders, "gemma3", ("mlp.hook_in", "hook_mlp_out"),
                              {"affine": False, "paths": "relative"}),
    "gemmascope2_clt": Family(layouts.write_gemmascope2_clt, "gemma3", ("mlp.hook_in", "hook_mlp_out"),
                              {"affine": False, "paths": "relative", "lower_fill": "random"}),
    "gemmascope2_clt_affine": Family(layouts.write_gemmascope2_clt, "gemma3", ("mlp.hook_in", "hook_mlp_out"),
                                     {"affine": True, "paths": "relative", "lower_fill": "random"}),
    "ct_cache_gemmascope2": Family(layouts.write_ct_cache, "gemma3", ("mlp.hook_in", "hook_mlp_out"),
                                   {"source": "gemmascope2"}),
    # SAELens transcoders (jacobdunefsky/gpt2-small transcoders read ln2.hook_normalized -> hook_mlp_out)
    "saelens_single": Family(layouts.write_saelens_transcoder, "gpt2", ("ln2.hook_normalized", "hook_mlp_out"),
                             {"layer": 1, "model_name": "gpt2"}),
    "saelens_single_skip": Family(layouts.write_saelens_transcoder, "gpt2", ("ln2.hook_normalized", "hook_mlp_out"),
                                  {"layer": 0, "skip": True, "activation": "relu", "model_name": "gpt2"}),
    "saelens_all": Family(layouts.write_saelens_transcoder_set, "llama", ("ln2.hook_normalized", "hook_mlp_out"),
                          {"model_name": "meta-llama/Llama-3.2-1B"}),
    "saelens_subset": Family(layouts.write_saelens_transcoder_set, "gpt2", ("ln2.hook_normalized", "hook_mlp_out"),
                             {"layers": [0], "skip": True, "model_name": "gpt2"}),
}  # fmt: skip
ARCHITECTURES = {"gpt2": "ct_clt_jumprelu", "llama": "ct_plt_relu_skip", "qwen3": "ct_plt_jumprelu",
                 "gemma2": "gemmascope_npz", "gemma3": "gemmascope2_clt_affine"}  # fmt: skip
"""One family per tiny architecture for the command-line run."""


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """kind -> (snapshot directory, model loaded from it), built once per session."""
    cache: dict[str, tuple[Path, object]] = {}

    def get(kind: str):
        if kind not in cache:
            directory = write_tiny_hf_model(kind, tmp_path_factory.mktemp(kind))
            cache[kind] = directory, load_model(str(directory))
        return cache[kind]

    return get


def _declare_processing(directory: Path, kwargs: dict | None) -> None:
    """Record in every SAELens cfg.json the model_from_pretrained_kwargs a SAELens run stores in
    metadata (the writers leave it out: then the model's processing is unknown)."""
    for cfg in directory.rglob("cfg.json"):
        raw = json.loads(cfg.read_text())
        raw["metadata"]["model_from_pretrained_kwargs"] = kwargs
        cfg.write_text(json.dumps(raw))


def _write(name: str, directory: Path, model) -> Path:
    family = FAMILIES[name]
    family.writer(directory, model.cfg.n_layers, model.cfg.d_model, N_FEATURES, 0, **family.options)
    if name.startswith("saelens"):
        _declare_processing(directory, NO_PROCESSING)
    return directory


@pytest.mark.parametrize("name", FAMILIES)
def test_published_family_attributes_like_autograd(name, tiny, tmp_path):
    family = FAMILIES[name]
    _, model = tiny(family.model)
    clt = load_transcoder(_write(name, tmp_path / name, model), model=model)
    assert (clt.cfg.input_hook, clt.cfg.output_hook) == family.hooks
    graph = attribute(PROMPT, model, clt, progress=False)
    assert graph.n_features > 0
    assert _identity_error(graph).max() <= 1e-5
    rows = torch.randperm(graph.n_features, generator=torch.Generator().manual_seed(1))[:6].tolist()
    ours, reference = rows_against_autograd(graph, model, clt, rows)
    largest = reference.abs().amax(1, keepdim=True)
    assert (largest > 0).all()
    assert ((ours - reference).abs() / largest).max() <= 1e-4


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_trace_cli_on_each_architecture(kind, tiny, tmp_path, capsys):
    name = ARCHITECTURES[kind]
    hf_dir, model = tiny(kind)
    tdir = _write(name, tmp_path / name, model)
    out = tmp_path / "graphs"
    argv = ["trace", PROMPT, "--model", str(hf_dir), "--transcoder", str(tdir), "--out", str(out), "--no-concepts"]
    assert main(argv) == 0, capsys.readouterr().err
    (path,) = out.glob("*.json")
    meta = json.loads(path.read_text())["metadata"]
    hooks = FAMILIES[name].hooks
    assert (meta["feature_input_hook"], meta["feature_output_hook"]) == hooks
    assert meta["model_processing"] == "none"


def test_saelens_folder_without_its_model_kwargs_is_refused(tiny, tmp_path):
    """A SAELens cfg.json that does not record model_from_pretrained_kwargs does not say how its
    model's weights were processed: refused in one line, not guessed."""
    _, model = tiny("gpt2")
    directory = tmp_path / "sl"
    layouts.write_saelens_transcoder(directory, 2, model.cfg.d_model, N_FEATURES, 0, layer=1, model_name="gpt2")
    with pytest.raises(CircuitsError, match="do not say a processing we can load") as err:
        load_transcoder(directory, model=model)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("kwargs", [{}, {"center_writing_weights": False}, {"fold_ln": False}])
def test_saelens_training_defaults_mean_no_processing(kwargs, tiny, tmp_path):
    """SAELens 6 records {"center_writing_weights": False} (HookedTransformer) or {} (others) when
    a run sets nothing; both are the published weights."""
    _, model = tiny("gpt2")
    directory = tmp_path / "sl"
    layouts.write_saelens_transcoder(directory, 2, model.cfg.d_model, N_FEATURES, 0, layer=1, model_name="gpt2")
    _declare_processing(directory, kwargs)
    assert load_transcoder(directory, model=model).cfg.model_processing == "none"


def test_saelens_kwargs_that_turn_processing_on_are_refused_in_one_line(tiny, tmp_path):
    """SAELens loads with from_pretrained_no_processing(**kwargs): {"fold_ln": True} folds the norms,
    which no model we load has."""
    _, model = tiny("gpt2")
    directory = tmp_path / "sl"
    layouts.write_saelens_transcoder(directory, 2, model.cfg.d_model, N_FEATURES, 0, layer=1, model_name="gpt2")
    _declare_processing(directory, {"fold_ln": True})
    with pytest.raises(CircuitsError, match="processing") as excinfo:
        load_transcoder(directory, model=model)
    assert "\n" not in str(excinfo.value)


def test_trace_takes_a_dtype_and_refuses_one_it_cannot_load(tiny, tmp_path, capsys):
    hf_dir, _ = tiny("gpt2")
    with pytest.raises(SystemExit) as exit_:
        main(["trace", PROMPT, "--model", str(hf_dir), "--dtype", "float64", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "--dtype" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
