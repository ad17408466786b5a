"""Load a TransformerLens model: the embedded demo model, a local directory, or a pretrained name.

A local model directory holds `config.json` (HookedTransformerConfig fields),
`model.safetensors` (the TransformerLens state dict) and `tokenizer/` (Hugging Face files).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.loading_from_pretrained import get_official_model_name

from circuits.errors import CircuitsError
from circuits.fileio import atomic_directory

log = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"
_SAVED_FIELDS = (
    "model_name", "n_layers", "d_model", "n_ctx", "d_head", "n_heads", "d_mlp", "d_vocab", "act_fn",
    "normalization_type", "positional_embedding_type", "default_prepend_bos", "seed",
)  # fmt: skip


def resolve_model_source(name: str) -> tuple[str, str]:
    """Which loader serves `name`: ("local", directory) or ("pretrained", official name)."""
    if name == "demo":
        return "local", str(DEMO_MODEL_DIR)
    path = Path(name).expanduser()
    if path.is_dir():
        return "local", str(path)
    if name.startswith((".", "/", "~")) or "/" in name and not _looks_like_hub_id(name):
        raise CircuitsError(f"model directory {name!r} does not exist: pass 'demo', a directory or a model name")
    try:
        return "pretrained", get_official_model_name(name)
    except ValueError:
        raise CircuitsError(
            f"unknown model {name!r}: pass 'demo', a local model directory, or a TransformerLens name such as 'gpt2'"
        ) from None


def _looks_like_hub_id(name: str) -> bool:
    # "EleutherAI/pythia-70m" is a hub id; "runs/model" or "a/b/c" is a path.
    return name.count("/") == 1 and not Path(name.split("/")[0]).exists()


def check_device(device: str | torch.device) -> None:
    """Refuse a device name torch does not know, or a GPU this machine does not have."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CircuitsError(f"{str(device)!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():  # 0 without CUDA
        raise CircuitsError(f"device {str(device)!r} is not available here (no such CUDA GPU): use cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CircuitsError(f"device {str(device)!r} is not available here: use cpu")


def load_model(name: str = "demo", device: str | torch.device = "cpu") -> HookedTransformer:
    """Load a model by name (see `resolve_model_source`); the demo model is the default."""
    check_device(device)
    kind, source = resolve_model_source(name)
    if kind == "pretrained":
        log.info("loading pretrained model %s", source)
        return HookedTransformer.from_pretrained(source, device=device)
    return load_model_dir(Path(source), device)


def load_model_dir(directory: Path, device: str | torch.device = "cpu") -> HookedTransformer:
    for required in ("config.json", "model.safetensors", "tokenizer"):
        if not (directory / required).exists():
            raise CircuitsError(f"{directory} is not a model directory: {required} is missing")
    fields = json.loads((directory / "config.json").read_text())
    known = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CircuitsError(f"{directory}/config.json has unknown fields {unknown}: use HookedTransformerConfig fields")
    cfg = HookedTransformerConfig(**fields, tokenizer_name=str((directory / "tokenizer").resolve()), device=str(device))
    model = HookedTransformer(cfg)
    state = load_file(str(directory / "model.safetensors"), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    weights_missing = [k for k in missing if not k.endswith(("IGNORE", ".mask"))]
    if weights_missing or unexpected:
        raise CircuitsError(
            f"{directory}/model.safetensors does not match config.json "
            f"(missing {weights_missing[:3]}, unexpected {list(unexpected)[:3]}): re-save the model"
        )
    model.eval()
    return model


def prompt_tokens(model: HookedTransformer, prompt: str) -> torch.Tensor:
    """Tokens [1, pos] of a prompt, with BOS; rejects empty and over-long prompts."""
    if not prompt.strip():
        raise CircuitsError("the prompt is empty: pass some text, e.g. 'Fact: Dallas is in the state whose capital is'")
    tokens = model.to_tokens(prompt, truncate=False)
    if tokens.shape[1] > model.cfg.n_ctx:
        raise CircuitsError(
            f"the prompt has {tokens.shape[1]} tokens but the model's context is {model.cfg.n_ctx}: shorten it"
        )
    return tokens


def save_model_dir(model: HookedTransformer, directory: Path) -> None:
    """Write `model` in the local-directory format, atomically (the directory appears whole)."""
    fields = {k: getattr(model.cfg, k) for k in _SAVED_FIELDS}
    state = {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.endswith(("IGNORE", ".mask"))
    }
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"))
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
