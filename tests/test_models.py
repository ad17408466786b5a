"""Loading models: Hugging Face snapshot directories of real architectures (tiny, random, written by
transformers itself) against transformers' own forward pass; weight processing; refusals; the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformer_lens.loading_from_pretrained as tl_loading
from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, PreTrainedTokenizerFast

from circuits.cli import main
from circuits.errors import CircuitsError
from circuits.models import ARCHITECTURES, hooked_config, load_model, prompt_tokens, save_model_dir, token_strings
from circuits.processing import weight_processing
from tests.hf_models import (
    PROMPT,
    TINY_CONFIGS,
    VOCAB,
    hf_logits,
    tiny_tokenizer,
    write_hub_cache,
    write_tiny_hf_model,
)

KINDS = [k for k in TINY_CONFIGS if TINY_CONFIGS[k][0].__name__ in ARCHITECTURES]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def snapshot(tmp_path_factory):
    """snapshot(kind): the directory of a tiny snapshot of that kind, written once per session."""
    made: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in made:
            made[kind] = write_tiny_hf_model(kind, tmp_path_factory.mktemp(kind))
        return made[kind]

    return make


def _copy(snapshot_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(snapshot_dir, tmp_path / "snapshot"))


def _edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_every_supported_architecture_has_a_tiny_model():
    assert sorted(TINY_CONFIGS[k][0].__name__ for k in KINDS) == sorted(ARCHITECTURES)


@pytest.mark.parametrize("kind", KINDS)
def test_snapshot_logits_equal_transformers(kind, snapshot):
    directory = snapshot(kind)
    model = load_model(str(directory))
    tokens = model.to_tokens(PROMPT)
    assert tokens.shape[1] > 8  # longer than the tiny models' sliding windows (4 and 5)
    with torch.no_grad():
        diff = (model(tokens) - hf_logits(directory, tokens)).abs().max().item()
    assert diff < 1e-4, f"{kind}: max |logit difference| {diff:.2e}"
    assert weight_processing(model) == "none"
    assert model.cfg.original_architecture == TINY_CONFIGS[kind][0].__name__
    assert model.cfg.d_vocab == VOCAB and model.cfg.tokenizer_name == str(directory.resolve())


@pytest.mark.parametrize("clean_up", [False, True])
def test_token_strings_are_each_tokens_own_decode(clean_up):
    """Every token decoded in one call (`token_strings`) as `decode([id])` decodes it, with the
    tokenizer's clean-up of spaces before punctuation or without."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([" .", " 's"])
    tokenizer.clean_up_tokenization_spaces = clean_up
    ids = list(range(len(tokenizer)))
    texts = token_strings(tokenizer, ids)
    assert texts == [tokenizer.decode([t]) for t in ids]
    assert (" ." in texts) != clean_up


PROMPTS = ["Fact: Dallas is in the state whose capital is", "  two  spaces\n\nand héllo", "<bos>a<pad> b", "x"]


@pytest.mark.parametrize("kind", ["demo", "gpt2"])
def test_prompt_tokens_are_transformer_lens_own(kind, demo_model, snapshot):
    """`prompt_tokens` against `to_tokens`: straight from the Rust tokenizer where that is all
    transformers does (the demo model's adds BOS itself), through `to_tokens` where TransformerLens
    adds BOS (the tiny GPT-2's) or truncation or padding to a length or multiple is set on the backend."""
    model = demo_model if kind == "demo" else load_model(str(snapshot(kind)))
    fast = type(model.tokenizer) is PreTrainedTokenizerFast
    assert fast and (model.cfg.default_prepend_bos == model.cfg.tokenizer_prepends_bos) == (kind == "demo")
    for prompt in PROMPTS:
        assert torch.equal(prompt_tokens(model, prompt), model.to_tokens(prompt, truncate=False)), prompt
    backend = model.tokenizer.backend_tokenizer
    padding = backend.padding
    assert backend.truncation is None and padding["length"] is None and padding["pad_to_multiple_of"] is None
    try:  # the demo model is the session's: its tokenizer is set back as it was, whatever happens
        for setting in ("truncation", "length", "multiple"):  # each turned off by to_tokens itself
            if setting == "truncation":
                backend.enable_truncation(2)
            else:
                backend.enable_padding(**{"length": 40} if setting == "length" else {"pad_to_multiple_of": 64})
            tokens = prompt_tokens(model, PROMPTS[0])
            assert torch.equal(tokens, model.to_tokens(PROMPTS[0], truncate=False)), setting
            assert 2 < tokens.shape[1] < 40, setting
    finally:
        backend.no_truncation()
        backend.enable_padding(**padding)
    assert backend.truncation is None and backend.padding == padding


@pytest.mark.parametrize("kind", ["gpt2", "gemma2"])
@pytest.mark.parametrize("processing", ["fold-value-biases", "tl-default"])
def test_processing_keeps_log_probs_and_is_recorded(kind, processing, snapshot):
    directory = snapshot(kind)
    model = load_model(str(directory), processing=processing)
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
    torch.testing.assert_close(ours, hf_logits(directory, tokens).log_softmax(-1), rtol=0, atol=1e-4)
    assert weight_processing(model) == processing
    assert model.blocks[0].attn.b_V.abs().max() == 0  # folded into b_O
    folded = model.cfg.normalization_type.endswith("Pre")
    assert folded == (processing == "tl-default")


def test_unprocessed_weights_are_the_published_ones(snapshot):
    model = load_model(str(snapshot("gpt2")))
    assert model.cfg.normalization_type == "LN"
    assert model.blocks[0].attn.b_V.abs().max() > 0
    assert model.W_U.mean(-1).abs().max() > 1e-3  # not centred


def test_sharded_snapshot(tmp_path):
    directory = write_tiny_hf_model("llama", tmp_path / "llama", max_shard_size="60KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    model = load_model(str(directory))
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        assert (model(tokens) - hf_logits(directory, tokens)).abs().max() < 1e-4


def test_dtype(snapshot):
    model = load_model(str(snapshot("qwen3")), dtype="bfloat16")
    assert model.cfg.dtype == torch.bfloat16 and model.W_E.dtype == torch.bfloat16
    assert weight_processing(model) == "none"
    with pytest.raises(CircuitsError, match="dtype 'float64' is not supported"):
        load_model(str(snapshot("qwen3")), dtype="float64")
    with pytest.raises(CircuitsError, match="unknown weight processing 'folded'"):
        load_model(str(snapshot("qwen3")), processing="folded")


@pytest.mark.parametrize("config", ["config.json", "tokenizer_config.json"])
def test_refuses_remote_code(config, snapshot, tmp_path):
    directory = _copy(snapshot("llama"), tmp_path)
    _edit_json(directory / config, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    with pytest.raises(CircuitsError, match="auto_map") as excinfo:
        load_model(str(directory))
    assert config in _one_line_error(excinfo)


def test_refuses_pickled_weights(snapshot, tmp_path):
    directory = _copy(snapshot("gpt2"), tmp_path)
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(CircuitsError, match=r"only pickled weights \(pytorch_model.bin\)") as excinfo:
        load_model(str(directory))
    assert "safetensors" in _one_line_error(excinfo)
    (directory / "pytorch_model.bin").unlink()
    with pytest.raises(CircuitsError, match="has no weights"):
        load_model(str(directory))


def test_refuses_unsupported_architecture(snapshot, tmp_path):
    directory = _copy(snapshot("gpt2"), tmp_path)
    _edit_json(directory / "config.json", architectures=["FalconForCausalLM"])
    with pytest.raises(CircuitsError, match="architecture FalconForCausalLM cannot be converted") as excinfo:
        load_model(str(directory))
    assert "supported: GPT2LMHeadModel, LlamaForCausalLM" in _one_line_error(excinfo)
    # An architecture TransformerLens converts only by name: a directory of it is refused too.
    with pytest.raises(CircuitsError, match="architecture GPTNeoXForCausalLM cannot be converted"):
        load_model(str(write_tiny_hf_model("gpt_neox", tmp_path / "neox")))


def test_refuses_a_conversion_that_changes_the_model(tmp_path):
    # TransformerLens's Llama converter drops attention biases: the probe sees the difference.
    directory = write_tiny_hf_model("llama", tmp_path / "llama", attention_bias=True)
    with pytest.raises(CircuitsError, match="does not reproduce its log-probabilities") as excinfo:
        load_model(str(directory))
    _one_line_error(excinfo)


def test_rope_scaling(tmp_path):
    directory = write_tiny_hf_model("llama", tmp_path / "linear", rope_scaling=dict(rope_type="linear", factor=4.0))
    model = load_model(str(directory))
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        assert (model(tokens) - hf_logits(directory, tokens)).abs().max() < 1e-4
    scaling = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)
    directory = write_tiny_hf_model("qwen3", tmp_path / "yarn", rope_scaling=scaling)
    with pytest.raises(CircuitsError, match="rope scaling 'yarn'"):
        load_model(str(directory))


def test_own_directory_records_processing(snapshot, tmp_path):
    model = load_model(str(snapshot("gpt2")), processing="tl-default")
    save_model_dir(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["circuits_processing"] == "tl-default"
    loaded = load_model(str(tmp_path / "m"))
    assert weight_processing(loaded) == "tl-default"
    tokens = model.to_tokens(PROMPT)
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=1e-5)
    with pytest.raises(CircuitsError, match="processing 'tl-default': load it with that"):
        load_model(str(tmp_path / "m"), processing="fold-value-biases")


def test_demo_model_processing(demo_model):
    assert weight_processing(demo_model) == "none"
    processed = load_model("demo", processing="tl-default")
    assert weight_processing(processed) == "tl-default" and processed.cfg.normalization_type == "LNPre"
    tokens = demo_model.to_tokens("Fact: Dallas is in the state whose capital is")
    with torch.no_grad():
        torch.testing.assert_close(
            processed(tokens).log_softmax(-1), demo_model(tokens).log_softmax(-1), rtol=0, atol=1e-4
        )


def test_config_agrees_with_transformer_lens_templates():
    """The field-by-field conversion gives TransformerLens's own configs for Llama-3.2-1B, gemma-2-2b
    and gemma-3-1b (templates keyed by name), but for the context cap and Gemma-2's layer order."""
    llama = LlamaConfig(
        architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
        vocab_size=128256, rope_theta=500000.0, head_dim=64, rope_scaling=dict(
            rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    )  # fmt: skip
    gemma2 = Gemma2Config(architectures=["Gemma2ForCausalLM"])  # the defaults are gemma-2-2b's
    gemma3 = Gemma3TextConfig(
        architectures=["Gemma3ForCausalLM"], hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, vocab_size=262144, sliding_window=512,
        max_position_embeddings=32768, rope_scaling=None,
    )  # fmt: skip
    expected = {"meta-llama/Llama-3.2-1B": set(), "google/gemma-2-2b": {"n_ctx", "attn_types"}}
    for name, hf_config in [("meta-llama/Llama-3.2-1B", llama), ("google/gemma-2-2b", gemma2),
                            ("google/gemma-3-1b-pt", gemma3)]:  # fmt: skip
        ours = hooked_config(hf_config, name).to_dict()
        theirs = tl_loading.convert_hf_model_config(name)
        differ = {k for k, v in theirs.items() if ours[k] != v} - {"tokenizer_name", "initializer_range"}
        assert differ == expected.get(name, {"n_ctx"}), name
    # TransformerLens issue #778: its gemma-2 template starts with a global layer; HF's layer 0 slides.
    assert hooked_config(gemma2, "g").attn_types[:2] == ["local", "global"]


def test_cli_predict_on_a_snapshot(snapshot, capsys):
    assert main(["predict", "--model", str(snapshot("qwen2")), "--top-k", "3", PROMPT]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"prompt: {PROMPT!r}") and len(out) == 4


def _run(code: str, hf_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=hf_home
    )


@pytest.mark.slow
def test_cli_hub_name_offline_is_one_line(tmp_path):
    result = _run("from circuits.cli import main; raise SystemExit(main(['predict', '--model', 'gpt2']))", tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("circuits: error: model 'gpt2' is not in the local Hugging Face cache")
    assert "--local-dir DIR" in line


@pytest.mark.slow
def test_hub_names_load_from_the_local_cache(tmp_path):
    """TransformerLens names resolve to snapshots in the Hugging Face cache: GPT-2 through the
    field-by-field conversion, GPT-NeoX (not in ARCHITECTURES) through TransformerLens's config."""
    write_hub_cache(tmp_path / "home", "gpt2", write_tiny_hf_model("gpt2", tmp_path / "gpt2"))
    write_hub_cache(tmp_path / "home", "EleutherAI/pythia-14m", write_tiny_hf_model("gpt_neox", tmp_path / "neox"))
    code = textwrap.dedent("""
        from huggingface_hub import snapshot_download
        from circuits.models import load_model
        from circuits.processing import weight_processing
        from tests.hf_models import PROMPT, hf_logits
        for name in ["gpt2", "EleutherAI/pythia-14m"]:
            model = load_model(name)
            tokens = model.to_tokens(PROMPT)
            diff = (model(tokens) - hf_logits(snapshot_download(name), tokens)).abs().max().item()
            print(name, model.cfg.model_name, weight_processing(model), diff < 1e-4)
    """)
    result = _run(code, tmp_path / "home")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["gpt2 gpt2 none True", "EleutherAI/pythia-14m pythia-14m none True"]


@pytest.mark.parametrize("ask", ["trust_remote_code", "auto_map"])
def test_our_model_directory_never_runs_code_from_its_folder(ask, demo_model, tmp_path):
    """The reproducer: config.json asks for remote code and the tokenizer's config points at a .py file
    in the folder that would leave a marker; loading is refused in one line and the file never runs."""
    directory = tmp_path / "m"
    save_model_dir(demo_model, directory)
    marker = tmp_path / "ran"
    (directory / "tokenizer" / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    tokenizer_fields = {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}} if ask == "auto_map" else {}
    _edit_json(directory / "tokenizer" / "tokenizer_config.json", **tokenizer_fields)
    _edit_json(directory / "config.json", **({"trust_remote_code": True} if ask == "trust_remote_code" else {}))
    with pytest.raises(CircuitsError, match="own Python code") as excinfo:
        load_model(str(directory))
    _one_line_error(excinfo)
    assert not marker.exists()
