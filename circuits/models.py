"""Load a TransformerLens model: the demo model, a model directory, or a pretrained name.

Sources (see `resolve_model_source`):
- 'demo': the shipped demo model.
- Our model directory: `config.json` (HookedTransformerConfig fields), `model.safetensors`
  (the TransformerLens state dict) and `tokenizer/` (Hugging Face files).
- A Hugging Face snapshot directory: `config.json` naming its `architectures`, safetensors weights
  (one file, or shards listed in `model.safetensors.index.json`) and tokenizer files. transformers
  loads it offline (no remote code, no pickles) and TransformerLens's weight converters convert it.
  The TransformerLens config is built here from config.json, keyed by architecture: TransformerLens
  keys its own by repository name (Llama and Gemma configs are templates of fixed sizes).
- A TransformerLens name ('gpt2', 'google/gemma-2-2b'): its snapshot from the local Hugging Face
  cache (downloaded when online), converted as its directory would be; an architecture not in
  `ARCHITECTURES` (e.g. GPT-NeoX for 'EleutherAI/pythia-70m') with TransformerLens's config for the name.

TransformerLens and transformers are imported by the functions that use them.
Every conversion is checked against the Hugging Face model's log-probabilities on a probe sequence.
Weights are loaded as published ("none", as circuit-tracer and transcoders trained on the Hugging
Face model expect) unless another `PROCESSING` is asked for; `weight_processing(model)` reports it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from circuits.errors import CircuitsError, check_range, check_text
from circuits.fileio import atomic_directory
from circuits.processing import PROCESSING_ATTR, weight_processing

if TYPE_CHECKING:  # imported where they are used: `import circuits.models` stays fast
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"
DEMO_TUNED_DIR = DEMO_MODEL_DIR.parent / "tuned"  # the demo fine-tuned to refuse (scripts/build_demo_tuned.py)
_SAVED_FIELDS = (
    "model_name", "n_layers", "d_model", "n_ctx", "d_head", "n_heads", "d_mlp", "d_vocab", "act_fn",
    "normalization_type", "positional_embedding_type", "default_prepend_bos", "seed",
)  # fmt: skip

_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
PROCESSING: dict[str, dict[str, bool]] = {
    # The weights as published: what transcoders trained on the Hugging Face model read.
    "none": dict.fromkeys(_FLAGS, False),
    # circuit-tracer 0.5.0's loading: no LayerNorm folding or centring, value biases folded into b_O
    # (the residual stream, hook_resid_mid and hook_mlp_out are as with "none"; hook_v and hook_z are not).
    "fold-value-biases": {**dict.fromkeys(_FLAGS, False), "fold_value_biases": True},
    # HookedTransformer.from_pretrained's defaults (and its exceptions, see `_processing_flags`).
    "tl-default": dict.fromkeys(_FLAGS, True),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_ROTARY_CONTEXT = 2048  # n_ctx cap for rotary models, as TransformerLens caps Llama, Mistral and Qwen
# A snapshot's files that loading reads: never the pickled weights (*.bin, *.pt, *.pth) beside them.
_SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_model_source(name: str) -> tuple[str, str]:
    """Which loader serves `name`: ("local", directory) or ("pretrained", official name)."""
    if name == "demo":
        return "local", str(DEMO_MODEL_DIR)
    if name == "demo-tuned":
        return "local", str(DEMO_TUNED_DIR)
    path = Path(name).expanduser()
    if path.is_dir():
        return "local", str(path)
    if name.startswith((".", "/", "~")) or "/" in name and not _looks_like_hub_id(name):
        raise CircuitsError(f"model directory {name!r} does not exist: pass 'demo', a directory or a model name")
    import transformer_lens.loading_from_pretrained as tl_loading

    try:
        return "pretrained", tl_loading.get_official_model_name(name)
    except ValueError:
        raise CircuitsError(
            f"unknown model {name!r}: pass 'demo', a model directory (ours or a Hugging Face snapshot), "
            "or a TransformerLens name such as 'gpt2'"
        ) from None


def _looks_like_hub_id(name: str) -> bool:
    # "EleutherAI/pythia-70m" is a hub id; "runs/model" or "a/b/c" is a path.
    return name.count("/") == 1 and not Path(name.split("/")[0]).exists()


def check_device(device: str | torch.device) -> torch.device:
    """The torch device of `device`; refuses a name torch does not know, or a GPU this machine does not have."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CircuitsError(f"{str(device)!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():  # 0 without CUDA
        raise CircuitsError(f"device {str(device)!r} is not available here (no such CUDA GPU): use cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CircuitsError(f"device {str(device)!r} is not available here: use cpu")
    return dev


def load_model(
    name: str = "demo",
    device: str | torch.device = "cpu",
    *,
    processing: str = "none",
    dtype: str | torch.dtype = "float32",
) -> HookedTransformer:
    """Load a model by name (see `resolve_model_source`); the demo model is the default.

    `processing` is a key of `PROCESSING` ("none": the published weights), recorded on the model
    (`weight_processing`); `dtype` is float32, bfloat16 or float16.
    """
    check_device(device)
    if processing not in PROCESSING:
        raise CircuitsError(f"unknown weight processing {processing!r}: use one of {', '.join(PROCESSING)}")
    dtype = torch_dtype(dtype)
    kind, source = resolve_model_source(name)
    if kind == "pretrained":
        return load_pretrained(source, device, processing, dtype)
    return load_model_dir(Path(source), device, processing=processing, dtype=dtype)


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of "float32", "bfloat16", "float16" (or "torch.float32", or the dtype itself);
    refuses any other in one line."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES or not isinstance(dtype, (str, torch.dtype)):
        raise CircuitsError(f"dtype {str(dtype)!r} is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model_dir(
    directory: Path,
    device: str | torch.device = "cpu",
    *,
    processing: str = "none",
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """Load our model directory, or a Hugging Face snapshot directory (its config.json names a model type)."""
    config = directory / "config.json"
    fields = _read_json(config) if config.is_file() else {}
    if "architectures" in fields or "model_type" in fields:
        return load_hf_snapshot(directory, device, processing, dtype)
    return _load_own_dir(directory, fields, device, processing, dtype)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CircuitsError(f"{path} is not valid JSON ({e}): restore the file") from None
    if not isinstance(fields, dict):
        raise CircuitsError(f"{path} is not a JSON object: restore the file")
    return fields


def _read_weights(path: Path, device: str | torch.device | None = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on `device`, or only its header with device None: shapes
    checked, nothing read); a truncated or corrupt file is refused in one line."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt", device=str(device or "cpu")) as f:
            return {k: f.get_tensor(k) if device else f.get_slice(k) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise CircuitsError(f"{path} is corrupt or truncated ({e}): restore or re-save the weights") from None


_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json")


def check_tokenizer(directory: Path) -> None:
    """Refuse, in one line, tokenizer files that cannot be parsed: its JSON files, and tokenizer.json
    as the tokenizers library reads it."""
    from tokenizers import Tokenizer

    for name in _TOKENIZER_JSON:
        if (directory / name).is_file():
            _read_json(directory / name)
    if (directory / "tokenizer.json").is_file():
        try:
            Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot read
            raise CircuitsError(
                f"{directory}/tokenizer.json is corrupt ({e}): restore the model's tokenizer files"
            ) from None


def _load_own_dir(
    directory: Path, fields: dict[str, Any], device: str | torch.device, processing: str, dtype: torch.dtype
) -> HookedTransformer:
    """Our directory; weights saved after processing load as they are ("none" asks for nothing more)."""
    for required in ("config.json", "model.safetensors", "tokenizer"):
        if not (directory / required).exists():
            raise CircuitsError(f"{directory} is not a model directory: {required} is missing")
    refuse_remote_code(directory, ("config.json", "tokenizer/tokenizer_config.json", "tokenizer/config.json"))
    check_tokenizer(directory / "tokenizer")
    state = _read_weights(directory / "model.safetensors", device)
    model = _build_own_model(directory, fields, processing, device, dtype)
    _check_state(directory, model, state)
    model.load_state_dict(state, strict=False)
    saved = getattr(model, PROCESSING_ATTR)
    applied = saved if processing == "none" else processing
    if applied != saved:
        model.load_and_process_state_dict(model.state_dict(), **_processing_flags(model.cfg, processing))
    setattr(model, PROCESSING_ATTR, applied)
    return model.eval()


def _build_own_model(
    directory: Path, fields: dict[str, Any], processing: str, device: str | torch.device, dtype: torch.dtype
) -> HookedTransformer:
    """The HookedTransformer our config.json describes (random weights, the saved processing recorded);
    fields that are unknown or that TransformerLens cannot build are refused in one line."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    saved = fields.pop(PROCESSING_ATTR, "none")
    known = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CircuitsError(f"{directory}/config.json has unknown fields {unknown}: use HookedTransformerConfig fields")
    if saved != "none" and processing not in ("none", saved):
        raise CircuitsError(f"{directory} holds weights with processing {saved!r}: load it with that")
    for name in ("n_layers", "d_model", "n_ctx", "d_head", "n_heads", "d_vocab"):
        if name in fields:
            check_range(f"{directory}/config.json: {name}", fields[name], 1, integer=True)
    tokenizer = str((directory / "tokenizer").resolve())
    try:
        model = HookedTransformer(
            HookedTransformerConfig(**fields, tokenizer_name=tokenizer, device=str(device), dtype=dtype)
        )
    except (TypeError, ValueError, AssertionError) as e:
        raise CircuitsError(f"{directory}/config.json describes no model TransformerLens can build ({e})") from None
    setattr(model, PROCESSING_ATTR, saved)
    return model


def _check_state(directory: Path, model: HookedTransformer, state: dict[str, torch.Tensor]) -> None:
    """Refuse weights that do not fit the model config.json describes (names or shapes)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith(("IGNORE", ".mask"))}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {expected[k]}" for k in expected if k in state
             and tuple(state[k].shape) != expected[k]]  # fmt: skip
    if missing or unexpected or wrong:
        raise CircuitsError(
            f"{directory}/model.safetensors does not match config.json (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, shapes {wrong[:2]}): fix config.json or re-save the model"
        )


def load_hf_snapshot(
    directory: Path,
    device: str | torch.device = "cpu",
    processing: str = "none",
    dtype: torch.dtype = torch.float32,
    *,
    name: str | None = None,
) -> HookedTransformer:
    """A Hugging Face snapshot directory as a HookedTransformer.

    Its config is built by `hooked_config`, so a model is the same whether given by name or by
    directory; only a TransformerLens `name` of another architecture uses TransformerLens's config.
    """
    architecture = check_snapshot(directory)
    if architecture not in ARCHITECTURES and name is None:
        raise CircuitsError(
            f"{directory}: architecture {architecture} cannot be converted to TransformerLens here; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    hf_model, tokenizer = _load_hf(directory, architecture, dtype)
    import transformer_lens.loading_from_pretrained as tl_loading

    if architecture in ARCHITECTURES:
        cfg = hooked_config(hf_model.config, (name or _snapshot_name(directory)).split("/")[-1], device, dtype)
    else:
        log.info("converting %s with TransformerLens's config for that name", name)
        cfg = tl_loading.get_pretrained_model_config(
            name, hf_cfg=hf_model.config.to_dict(), device=device, dtype=dtype, local_files_only=True
        )
    return _convert(cfg, hf_model, tokenizer, directory, processing)


def _snapshot_name(directory: Path) -> str:
    # A snapshot in the Hugging Face cache lives in models--ORG--NAME/snapshots/COMMIT.
    directory = directory.resolve()
    if directory.parent.name == "snapshots" and directory.parent.parent.name.startswith("models--"):
        return directory.parent.parent.name.split("--")[-1]
    return directory.name


def load_pretrained(
    official_name: str, device: str | torch.device, processing: str, dtype: torch.dtype
) -> HookedTransformer:
    """A TransformerLens name: its snapshot from the local Hugging Face cache, or the hub when online."""
    return load_hf_snapshot(_hub_snapshot(official_name), device, processing, dtype, name=official_name)


def _hub_snapshot(official_name: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(official_name, allow_patterns=_SNAPSHOT_FILES))
    except LocalEntryNotFoundError:
        raise CircuitsError(
            f"model {official_name!r} is not in the local Hugging Face cache and cannot be downloaded here "
            "(no network, or HF_HUB_OFFLINE=1): "
            f"download its snapshot on a machine with internet (hf download {official_name} --local-dir DIR) "
            "and pass DIR as the model"
        ) from None
    except GatedRepoError:
        raise CircuitsError(
            f"model {official_name!r} is gated on the hub: accept its licence there and set HF_TOKEN, "
            "or pass a downloaded snapshot directory"
        ) from None


def refuse_remote_code(directory: Path, names: tuple[str, ...]) -> None:
    """Refuse a folder whose JSON files ask transformers to run the folder's own Python code
    (`auto_map`, `trust_remote_code`): loading a model never executes code from its folder."""
    for name in names:
        fields = _read_json(directory / name) if (directory / name).is_file() else {}
        if "auto_map" in fields or fields.get("trust_remote_code"):
            raise CircuitsError(
                f"{directory}/{name} asks to run the folder's own Python code (auto_map or trust_remote_code): "
                "refused; use a model whose architecture transformers implements"
            )


def check_snapshot(directory: Path) -> str:
    """The architecture a snapshot's config.json names, after refusing remote code and pickled weights."""
    config = _read_json(directory / "config.json")
    refuse_remote_code(directory, ("config.json", "tokenizer_config.json"))
    if not list(directory.glob("*.safetensors")):
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise CircuitsError(
                f"{directory} has only pickled weights ({', '.join(pickles[:3])}), which are never loaded: "
                "convert them to safetensors on a machine you trust, or download the safetensors snapshot"
            )
        raise CircuitsError(f"{directory} has no weights: *.safetensors files are missing")
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise CircuitsError(f"{directory} has no tokenizer: copy the tokenizer files of the model's repository into it")
    check_tokenizer(directory)
    for path in sorted(directory.glob("*.safetensors")):
        _read_weights(path, device=None)  # headers only: a truncated or corrupt file fails here, in one line
    architectures = config.get("architectures") or []
    if len(architectures) != 1:
        raise CircuitsError(f"{directory}/config.json names architectures {architectures}: one is needed")
    return architectures[0]


def _load_hf(directory: Path, architecture: str, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    """The Hugging Face model (on the CPU, eager attention: the reference) and tokenizer of a snapshot."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("loading %s from %s", architecture, directory)
    safe = dict(trust_remote_code=False, local_files_only=True)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            directory, use_safetensors=True, dtype=dtype, attn_implementation="eager", **safe
        )
        tokenizer = AutoTokenizer.from_pretrained(directory, **safe)
    except (OSError, ValueError, TypeError, RuntimeError) as e:  # a config.json that does not fit its weights
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CircuitsError(
            f"{directory}: transformers cannot load this {architecture} ({reason}): "
            "config.json does not describe the weights; restore the snapshot's files"
        ) from None
    if type(hf_model).__name__ != architecture:
        raise CircuitsError(
            f"{directory}/config.json names {architecture} but its model_type builds {type(hf_model).__name__}: "
            "fix config.json"
        )
    hf_model.eval().requires_grad_(False)
    return hf_model, tokenizer


def _convert(
    cfg: HookedTransformerConfig, hf_model: PreTrainedModel, tokenizer: Any, directory: Path, processing: str
) -> HookedTransformer:
    """TransformerLens's weight conversion, the requested processing, and the check against `hf_model`."""
    import transformer_lens.loading_from_pretrained as tl_loading
    from transformer_lens import HookedTransformer

    cfg.tokenizer_name = str(directory.resolve())  # a reload by name finds these files, offline
    state = tl_loading.get_pretrained_state_dict(str(directory), cfg, hf_model, dtype=cfg.dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state, **_processing_flags(cfg, processing))
    model.move_model_modules_to_device()
    model.eval()
    setattr(model, PROCESSING_ATTR, processing)
    check_conversion(model, hf_model)
    return model


def _processing_flags(cfg: HookedTransformerConfig, processing: str) -> dict[str, bool]:
    flags = dict(PROCESSING[processing])
    # The exceptions HookedTransformer.from_pretrained makes, where processing would change the outputs.
    if cfg.output_logits_soft_cap > 0:
        flags["center_unembed"] = False
    if cfg.original_architecture == "Olmo2ForCausalLM" or cfg.positional_embedding_type == "shortformer":
        flags["fold_ln"] = flags["center_writing_weights"] = False
    return flags


_PROBE_TOKENS = 12
# Max |log-prob difference| allowed. A wrong conversion (rope, windows, soft caps, norms) differs by
# 0.3 to 10 on the tiny test models; rounding alone by 1e-5 in float32 but up to 0.2 in bfloat16,
# so in half precision the check catches only gross errors: load in float32 to check closely.
_PROBE_TOLERANCE = {torch.float32: 1e-2, torch.float16: 0.5, torch.bfloat16: 2.0}


def check_conversion(model: HookedTransformer, hf_model: PreTrainedModel) -> float:
    """Max |difference| of the two models' log-probabilities on a probe sequence; refuses a conversion
    that does not reproduce the Hugging Face model (an option in config.json the conversion ignores)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(model.cfg.d_vocab, (1, _PROBE_TOKENS), generator=generator)
    with torch.no_grad():
        ours = model(tokens.to(model.cfg.device)).float().log_softmax(-1).cpu()
        theirs = hf_model(tokens).logits.float().log_softmax(-1)
    diff = (ours - theirs).abs().max().item()
    log.info("converted model: max |log-prob difference| from the Hugging Face model %.2g", diff)
    if not diff <= _PROBE_TOLERANCE[model.cfg.dtype]:
        raise CircuitsError(
            f"TransformerLens's conversion of this {model.cfg.original_architecture} does not reproduce its "
            f"log-probabilities (max difference {diff:.3g}): config.json has an option it does not convert"
        )
    return diff


def hooked_config(
    hf_config: PretrainedConfig, model_name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformerConfig:
    """The HookedTransformerConfig of a Hugging Face config, read field by field (see `ARCHITECTURES`)."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

    architecture = hf_config.architectures[0]
    fields = ARCHITECTURES[architecture](hf_config)
    if fields["act_fn"] not in SUPPORTED_ACTIVATIONS:
        raise CircuitsError(f"activation {fields['act_fn']!r} of this {architecture} is not in TransformerLens")
    return HookedTransformerConfig(
        **fields,
        original_architecture=architecture,
        model_name=model_name,
        init_weights=False,
        device=str(device),
        dtype=dtype,
    )


def _gpt2_fields(hf: PretrainedConfig) -> dict[str, Any]:
    return {
        "d_model": hf.n_embd, "d_head": hf.n_embd // hf.n_head, "n_heads": hf.n_head,
        "d_mlp": hf.n_inner or 4 * hf.n_embd, "n_layers": hf.n_layer, "n_ctx": hf.n_positions,
        "eps": hf.layer_norm_epsilon, "d_vocab": hf.vocab_size, "act_fn": hf.activation_function,
        "use_attn_scale": hf.scale_attn_weights, "normalization_type": "LN",
        "scale_attn_by_inverse_layer_idx": hf.scale_attn_by_inverse_layer_idx,
    }  # fmt: skip


def _rotary_fields(hf: PretrainedConfig) -> dict[str, Any]:
    """A pre-norm decoder with RMSNorm, rotary positions and a gated MLP: Llama and its descendants."""
    d_head = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return {
        "d_model": hf.hidden_size, "d_head": d_head, "n_heads": hf.num_attention_heads,
        "n_key_value_heads": hf.num_key_value_heads or hf.num_attention_heads,
        "d_mlp": hf.intermediate_size, "n_layers": hf.num_hidden_layers,
        "n_ctx": min(hf.max_position_embeddings, MAX_ROTARY_CONTEXT), "eps": hf.rms_norm_eps,
        "d_vocab": hf.vocab_size, "act_fn": getattr(hf, "hidden_act", None), "normalization_type": "RMS",
        "final_rms": True, "gated_mlp": True, "positional_embedding_type": "rotary", "rotary_dim": d_head,
        "rotary_adjacent_pairs": False, "rotary_base": hf.rope_theta,
        **_rope_scaling(hf), **_local_attention(hf),
    }  # fmt: skip


def _rope_scaling(hf: PretrainedConfig) -> dict[str, Any]:
    scaling = getattr(hf, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {}
    if kind == "linear":  # TransformerLens scales global layers only: the probe refuses it with local ones
        return {"rotary_scaling_factor": scaling["factor"]}
    if kind == "llama3":
        return {
            "use_NTK_by_parts_rope": True,
            "NTK_by_parts_factor": scaling["factor"],
            "NTK_by_parts_low_freq_factor": scaling["low_freq_factor"],
            "NTK_by_parts_high_freq_factor": scaling["high_freq_factor"],
            "NTK_original_ctx_len": scaling["original_max_position_embeddings"],
        }
    raise CircuitsError(f"rope scaling {kind!r} in config.json is not converted here: only 'linear' and 'llama3' are")


def _local_attention(hf: PretrainedConfig) -> dict[str, Any]:
    """Sliding-window layers: those `layer_types` marks, or every layer when a window is set without them."""
    window = getattr(hf, "sliding_window", None)
    types = getattr(hf, "layer_types", None) or ["sliding_attention"] * hf.num_hidden_layers
    if window is None or "sliding_attention" not in types:
        return {}
    attn_types = ["local" if t == "sliding_attention" else "global" for t in types]
    return {"use_local_attn": True, "window_size": window, "attn_types": attn_types}


def _qwen_fields(hf: PretrainedConfig) -> dict[str, Any]:
    # Qwen tokenizers add no BOS token, and the models are not trained with one.
    return {**_rotary_fields(hf), "default_prepend_bos": False}


def _gemma2_fields(hf: PretrainedConfig) -> dict[str, Any]:
    return {
        **_rotary_fields(hf),
        "act_fn": hf.hidden_activation,
        "use_normalization_before_and_after": True,
        "attn_scale": hf.query_pre_attn_scalar**0.5,
        "attn_scores_soft_cap": hf.attn_logit_softcapping or -1.0,
        "output_logits_soft_cap": hf.final_logit_softcapping or -1.0,
    }


def _gemma3_fields(hf: PretrainedConfig) -> dict[str, Any]:
    return {**_gemma2_fields(hf), "use_qk_norm": True, "rotary_base_local": hf.rope_local_base_freq}


# Architectures a snapshot directory may have: each reads its HookedTransformerConfig fields from the
# Hugging Face config; the weights go through TransformerLens's converter for the architecture.
ARCHITECTURES = {
    "GPT2LMHeadModel": _gpt2_fields,
    "LlamaForCausalLM": _rotary_fields,
    "MistralForCausalLM": _rotary_fields,
    "Qwen2ForCausalLM": _qwen_fields,
    "Qwen3ForCausalLM": lambda hf: {**_qwen_fields(hf), "use_qk_norm": True},
    "GemmaForCausalLM": _rotary_fields,
    "Gemma2ForCausalLM": _gemma2_fields,
    "Gemma3ForCausalLM": _gemma3_fields,
}


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text, as `tokenizer.decode([id])` gives it: one call for every token with a fast
    (Rust) tokenizer that decodes as transformers' own, one call per token otherwise."""
    from transformers import PreTrainedTokenizerFast

    kind = type(tokenizer)
    own = kind.decode is PreTrainedTokenizerFast.decode and kind._decode is PreTrainedTokenizerFast._decode
    if not (isinstance(tokenizer, PreTrainedTokenizerFast) and own):
        return [tokenizer.decode([t]) for t in ids]
    texts = tokenizer.backend_tokenizer.decode_batch([[t] for t in ids], skip_special_tokens=False)
    return [tokenizer.clean_up_tokenization(t) for t in texts] if tokenizer.clean_up_tokenization_spaces else texts


def prompt_tokens(model: HookedTransformer, prompt: str) -> torch.Tensor:
    """Tokens [1, pos] of a prompt, with BOS; rejects empty and over-long prompts."""
    check_text("the prompt", prompt)
    if not prompt.strip():
        raise CircuitsError("the prompt is empty: pass some text, e.g. 'Fact: Dallas is in the state whose capital is'")
    tokens = _to_tokens(model, prompt)
    if tokens.shape[1] > model.cfg.n_ctx:
        raise CircuitsError(
            f"the prompt has {tokens.shape[1]} tokens but the model's context is {model.cfg.n_ctx}: shorten it"
        )
    return tokens


def _to_tokens(model: HookedTransformer, prompt: str) -> torch.Tensor:
    """`model.to_tokens(prompt, truncate=False)` [1, pos]: straight from a plain fast tokenizer's
    Rust backend where transformers' own call does only that (BOS added by the tokenizer itself or by
    neither; no truncation and no padding to a length or multiple set, which its call would turn off;
    special tokens as configured): the same ids without its Python (0.3 ms of a 10 ms attribution on
    8 tokens)."""
    from transformers import PreTrainedTokenizerFast

    tok, cfg = model.tokenizer, model.cfg
    backend = getattr(tok, "backend_tokenizer", None)
    padding = getattr(backend, "padding", None) or {}
    plain = (
        type(tok) is PreTrainedTokenizerFast and cfg.default_prepend_bos == cfg.tokenizer_prepends_bos
        and backend.truncation is None and padding.get("length") is None and padding.get("pad_to_multiple_of") is None
        and backend.encode_special_tokens == tok.split_special_tokens
    )  # fmt: skip
    if not plain:
        return model.to_tokens(prompt, truncate=False)
    return torch.tensor([backend.encode(prompt).ids], device=cfg.device)


def save_model_dir(model: HookedTransformer, directory: Path) -> None:
    """Write `model` in the local-directory format, atomically (the directory appears whole)."""
    fields = {k: getattr(model.cfg, k) for k in _SAVED_FIELDS}
    fields[PROCESSING_ATTR] = weight_processing(model)
    state = {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.endswith(("IGNORE", ".mask"))
    }
    from safetensors.torch import save_file

    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"))
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
