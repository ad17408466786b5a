"""SAELens transcoders (SAELens 6.x `SAE.save_model` / `SAE.load_from_disk`).

A folder with cfg.json + sae_weights.safetensors is one layer's transcoder; a folder of such
folders (any names, any depth: SAELens releases name them after hooks) is a set, possibly of some
layers only. The layer is the N of `metadata.hook_name = "blocks.N.<hook>"`.

    sae_weights.safetensors  W_enc [d_in, F]  W_dec [F, d_out]  b_enc [F]  b_dec [d_out]
                             threshold [F] (jumprelu_*)  W_skip [d_out, d_in] (*skip_*: x @ W_skip.T)

Semantics kept exactly: SAELens's JumpReLU relu(pre) * (pre > t) is our pre * (pre > max(t, 0))
for every pre, so thresholds are clamped at 0. `normalize_activations` "none",
"expected_average_only_in" and "covariance_whitening" are the identity in `load_from_disk` (the
trainer folds them into the weights before its final save); "constant_norm_rescale" and
"layer_norm" rescale each token, which no linear encoder reproduces: refused, as are
`apply_b_dec_to_input` and hook_z reshaping. Layers a set lacks become layers whose features
never fire (CLTConfig.layers).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from circuits.errors import CircuitsError
from circuits.fileio import atomic_directory
from circuits.transcoders.clt import CLTConfig
from circuits.transcoders.layer import LayerWeights, present_layers
from circuits.transcoders.tensorfile import read_safetensors

FAMILY = "saelens"
ARCHITECTURES = {  # architecture -> (activation, skip)
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
IDENTITY_NORMS = ("none", "expected_average_only_in", "covariance_whitening")
TL_PROCESSING = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True}  # from_pretrained defaults
NO_PROCESSING = dict.fromkeys(TL_PROCESSING, False)


@dataclass
class SaeInfo:
    """What one SAELens cfg.json declares."""

    where: str
    layer: int
    input_hook: str  # without "blocks.N."
    output_hook: str
    d_model: int
    n_features: int
    activation: str
    skip: bool
    model_name: str
    processing: str


def _defaulted(raw: dict) -> dict:
    """SAELens's handle_config_defaulting, for the fields we use: pre-6.0 configs keep the hook at
    top level (`hook_point`), default apply_b_dec_to_input to True and may hold a bool normalisation."""
    meta = dict(raw.get("metadata") or {})
    version = raw.get("sae_lens_version") or meta.get("sae_lens_version")
    if version and int(str(version).split(".")[0]) >= 6:
        return {**raw, "metadata": meta}
    cfg = {("hook_name" if k == "hook_point" else k): v for k, v in raw.items()}
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("architecture", "standard")
    norm = cfg.get("normalize_activations")
    cfg["normalize_activations"] = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
    keys = ("model_name", "hook_name", "hook_name_out", "model_from_pretrained_kwargs", "hook_head_index")
    cfg["metadata"] = {**{k: cfg[k] for k in keys if k in cfg}, **meta}
    return cfg


def _processing(meta: dict) -> str:
    """The weight processing a SAELens transcoder's model had. SAELens 6 (the first with transcoders)
    loads its model with `HookedTransformer.from_pretrained_no_processing(**model_from_pretrained_kwargs)`
    (sae_lens/load_model.py), so the kwargs turn processing on from none; a config without them does
    not say ("unknown": refused where it meets a model)."""
    kwargs = meta.get("model_from_pretrained_kwargs")
    if kwargs is None:
        return "unknown"
    effective = {**NO_PROCESSING, **{k: v for k, v in kwargs.items() if k in TL_PROCESSING}}
    return "none" if not any(effective.values()) else json.dumps(kwargs, sort_keys=True)


def _info(raw: dict, where: str) -> SaeInfo:
    """Validate one transcoder's config (a cfg.json, or a loaded SAE's cfg.to_dict())."""
    cfg = _defaulted(raw)
    meta, arch = cfg["metadata"], cfg.get("architecture")
    if arch not in ARCHITECTURES:
        raise CircuitsError(
            f"{where}: SAELens architecture {arch!r} is not a transcoder we run: use {sorted(ARCHITECTURES)}"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in IDENTITY_NORMS:
        raise CircuitsError(
            f"{where}: normalize_activations {norm!r} rescales each token, which a linear encoder cannot "
            f"reproduce exactly: use a transcoder with {' or '.join(IDENTITY_NORMS[:2])}"
        )
    if cfg.get("apply_b_dec_to_input"):
        raise CircuitsError(f"{where}: apply_b_dec_to_input is true, which SAELens itself refuses for transcoders")
    if cfg.get("reshape_activations", "none") != "none" or meta.get("hook_head_index") is not None:
        raise CircuitsError(f"{where}: reads one attention head's hook_z, not an MLP's input: not a transcoder we run")
    d_in, d_out = cfg.get("d_in"), cfg.get("d_out", cfg.get("d_in"))
    if d_in != d_out:
        raise CircuitsError(
            f"{where}: d_in {d_in} != d_out {d_out}: a transcoder must write the residual width it reads"
        )
    hook_in, hook_out = meta.get("hook_name") or "", meta.get("hook_name_out") or ""
    m_in, m_out = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_in), re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_out)
    if not (m_in and m_out and m_in.group(1) == m_out.group(1)):
        raise CircuitsError(f"{where}: hooks {hook_in!r} -> {hook_out!r} are not blocks.N.<hook> of one layer N")
    activation, skip = ARCHITECTURES[arch]
    return SaeInfo(where, int(m_in.group(1)), m_in.group(2), m_out.group(2), int(d_in), int(cfg["d_sae"]), activation,
                   skip, str(meta.get("model_name") or ""), _processing(meta))  # fmt: skip


def folders(directory: Path) -> list[Path]:
    """The SAELens transcoder folders in `directory`: itself, or those one or two levels below it
    (`layer_3/`, `blocks.3.ln2.hook_normalized/`, `l3/w16k/`); never a walk of the whole tree."""
    directory = Path(directory)
    if (directory / "cfg.json").is_file():
        return [directory]
    found = [*directory.glob("*/cfg.json"), *directory.glob("*/*/cfg.json")]
    return sorted(p.parent for p in found if (p.parent / "sae_weights.safetensors").is_file())


def _read_info(folder: Path) -> SaeInfo:
    path = folder / "cfg.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CircuitsError(f"{path} is not valid JSON ({e}): re-download it") from None
    return _info(raw, str(folder))


def _weights(t: dict, info: SaeInfo) -> LayerWeights:
    allowed = {"W_enc", "W_dec", "b_enc", "b_dec", "scaling_factor"}
    allowed |= ({"threshold"} if info.activation == "jumprelu" else set()) | ({"W_skip"} if info.skip else set())
    if set(t) - allowed or not {"W_enc", "W_dec", "b_enc", "b_dec"} <= set(t):
        raise CircuitsError(f"{info.where}: weights {sorted(t)} do not match its architecture ({info.activation}, "
                            f"skip={info.skip})")  # fmt: skip
    if "scaling_factor" in t and not torch.equal(t["scaling_factor"], torch.ones_like(t["scaling_factor"])):
        raise CircuitsError(f"{info.where}: a fine-tuning scaling_factor other than 1 is not supported")
    threshold = t.get("threshold")  # relu(pre) * (pre > t) == pre * (pre > max(t, 0)) for every pre
    return LayerWeights(
        W_enc=t["W_enc"].T, b_enc=t["b_enc"], W_dec=t["W_dec"].unsqueeze(1), b_dec=t["b_dec"],
        threshold=None if threshold is None else threshold.float().clamp(min=0),
        W_skip=t["W_skip"].T if info.skip else None,
    )  # fmt: skip


def _config(infos: list[SaeInfo], n_layers: int | None, where: str) -> CLTConfig:
    first, layers = infos[0], sorted(i.layer for i in infos)
    for info in infos:
        differs = [k for k in ("input_hook", "output_hook", "d_model", "n_features", "activation", "skip", "processing")
                   if getattr(info, k) != getattr(first, k)]  # fmt: skip
        if differs:
            raise CircuitsError(f"{info.where}: {differs[0]} differs from {first.where}'s: not one transcoder set")
    if len(set(layers)) != len(layers):
        raise CircuitsError(f"{where}: two folders hold layer {next(l for l in layers if layers.count(l) > 1)}")
    L = n_layers or layers[-1] + 1
    if layers[-1] >= L:
        raise CircuitsError(f"{where}: a transcoder for layer {layers[-1]}, but the model has {L} layers")
    return CLTConfig(n_layers=L, d_model=first.d_model, n_features=first.n_features, cross_layer=False, skip=first.skip,
                     activation=first.activation, input_hook=first.input_hook, output_hook=first.output_hook,
                     model_name=first.model_name, layers=None if len(layers) == L else layers, family=FAMILY,
                     model_processing=first.processing)  # fmt: skip


def read_saelens(directory: Path, n_layers: int | None = None) -> tuple[CLTConfig, Iterator[tuple[int, LayerWeights]]]:
    """(config, lazy per-layer weights) of a SAELens transcoder folder or folder of them; `n_layers`
    (the model's) sizes a set that lacks the last layers."""
    infos = [_read_info(f) for f in folders(directory)]
    if not infos:
        raise CircuitsError(f"{directory} holds no SAELens transcoder (cfg.json + sae_weights.safetensors)")
    cfg = _config(infos, n_layers, str(directory))
    weights = ((i.layer, _weights(read_safetensors(Path(i.where) / "sae_weights.safetensors"), i)) for i in infos)
    return cfg, weights


def read_saelens_release(release: str, sae_id: str, n_layers: int):
    """(config, per-layer weights) of a SAELens registry release, SAE_ID with {layer}; through
    SAE.from_pretrained, which folds a registered normalisation factor into the weights."""
    from sae_lens import SAE

    saes = [SAE.from_pretrained(release, sae_id.format(layer=l), device="cpu") for l in range(n_layers)]
    infos = [_info(sae.cfg.to_dict(), f"saelens:{release}:{sae_id.format(layer=l)}") for l, sae in enumerate(saes)]
    cfg = _config(infos, n_layers, f"saelens:{release}:{sae_id}")
    return cfg, ((i.layer, _weights(dict(sae.state_dict()), i)) for i, sae in zip(infos, saes, strict=True))


def _saelens_classes(cfg: CLTConfig):
    from sae_lens.saes import transcoder as t

    if cfg.activation == "jumprelu":
        return (t.JumpReLUSkipTranscoder, t.JumpReLUSkipTranscoderConfig) if cfg.skip else (
            t.JumpReLUTranscoder, t.JumpReLUTranscoderConfig
        )  # fmt: skip
    if cfg.activation == "relu":
        return (t.SkipTranscoder, t.SkipTranscoderConfig) if cfg.skip else (t.Transcoder, t.TranscoderConfig)
    raise CircuitsError(f"SAELens has no {cfg.activation} transcoder: use jumprelu or relu")


def _pretrained_kwargs(processing: str) -> dict | None:
    """SAELens's model_from_pretrained_kwargs for a CLTConfig.model_processing (None: unknown)."""
    if processing == "none":
        return NO_PROCESSING
    return json.loads(processing) if processing.startswith("{") else None


def save_saelens(clt, directory: Path) -> None:
    """Write a per-layer transcoder (`cross_layer=False`) as one SAELens transcoder folder per
    layer it has (`layer_{l}/`), with SAELens's own classes."""
    from sae_lens.saes.sae import SAEMetadata

    cfg = clt.cfg
    if cfg.cross_layer:
        raise CircuitsError("SAELens holds per-layer transcoders only: train with cross_layer = false")
    cls, cfg_cls = _saelens_classes(cfg)
    negative = [l for l in present_layers(cfg) if cfg.activation == "jumprelu" and (clt.threshold[l] < 0).any()]
    if negative:
        raise CircuitsError(
            f"layer {negative[0]} has negative JumpReLU thresholds, where SAELens's relu(pre) * (pre > t) "
            "differs from ours: save in circuit-tracer's layout (save_transcoder) instead"
        )
    kwargs = _pretrained_kwargs(cfg.model_processing)
    with atomic_directory(directory) as tmp:
        for l in present_layers(cfg):
            meta = {"model_name": cfg.model_name, "hook_name": f"blocks.{l}.{cfg.input_hook}",
                    "hook_name_out": f"blocks.{l}.{cfg.output_hook}"}  # fmt: skip
            if kwargs is not None:
                meta["model_from_pretrained_kwargs"] = kwargs
            d, F = cfg.d_model, cfg.n_features
            sae = cls(cfg_cls(d_in=d, d_sae=F, d_out=d, apply_b_dec_to_input=False, metadata=SAEMetadata(**meta)))
            state = {"W_enc": clt.W_enc[l].T, "b_enc": clt.b_enc[l], "W_dec": clt.W_dec[l][:, 0], "b_dec": clt.b_dec[l]}
            if cfg.activation == "jumprelu":
                state["threshold"] = clt.threshold[l]
            if clt.W_skip is not None:
                state["W_skip"] = clt.W_skip[l].T
            sae.load_state_dict({k: v.detach().cpu().float().contiguous() for k, v in state.items()})
            sae.save_model(tmp / f"layer_{l}")
