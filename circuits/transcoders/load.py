"""Load a transcoder by name: the demo CLT, a preset, a hub repository or a local directory in any
layout circuit-tracer 0.5.0 or SAELens reads. The family is chosen from the files, never from names."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from circuits.errors import CircuitsError
from circuits.models import check_device, torch_dtype
from circuits.transcoders import gemmascope, gemmascope2, saelens, transcoder_set
from circuits.transcoders.assemble import assemble
from circuits.transcoders.circuit_tracer import read_clt_dir
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder, check_fits
from circuits.transcoders.configs import hooks, read_config_json, read_ct_config
from circuits.transcoders.layer import LayerWeights
from circuits.transcoders.presets import PRESETS, hub_ref
from circuits.transcoders.tensorfile import safetensors_shapes

log = logging.getLogger(__name__)

DEMO_CLT_DIR = Path(__file__).resolve().parent.parent / "demo" / "clt"
DEMO_TUNED_CLT_DIR = DEMO_CLT_DIR.parent / "tuned-clt"  # the CLT of `demo-tuned` (training/demo-tuned.toml)
FAMILIES = (
    "a circuit-tracer CLT (W_enc_0.safetensors ...), a transcoder set (config.yaml with layer_*.safetensors "
    "or a `transcoders:` list of circuit-tracer, GemmaScope params.npz or GemmaScope-2 files), a GemmaScope-2 "
    "CLT (config.yaml listing params_layer_*.safetensors) or SAELens transcoders (cfg.json + sae_weights.safetensors)"
)

Layers = Iterator[tuple[int, LayerWeights]]


def file_format(path: Path) -> transcoder_set.Format:
    """How to read one per-layer file of a set, told by its contents."""
    if gemmascope.is_layer_file(path):
        return gemmascope.FAMILY, gemmascope.describe, gemmascope.read_layer
    if gemmascope2.is_layer_file(safetensors_shapes(path)):
        return gemmascope2.FAMILY, gemmascope2.describe, gemmascope2.read_layer
    return transcoder_set.FAMILY, transcoder_set.describe, transcoder_set.read_layer


def read_directory(directory: Path, n_layers: int | None = None) -> tuple[CLTConfig, Layers]:
    """(config, lazy per-layer weights) of a transcoder directory, its family told by its files.
    `n_layers` (the model's) sizes a SAELens set that lacks its last layers."""
    directory = Path(directory)
    config, ours = read_ct_config(directory), read_config_json(directory)
    if "transcoders" in config and str(config.get("model_kind", "")).startswith("cross_layer_transcoder"):
        input_hook, output_hook = hooks(config, None, None, directory)
        files = transcoder_set.layer_files(directory, config)
        return gemmascope2.read_clt(files, input_hook, output_hook, str(config.get("model_name") or ""))
    has_set = "transcoders" in config or any(directory.glob("layer_*.safetensors"))
    if has_set and not (ours or {}).get("cross_layer", False):
        return transcoder_set.read_transcoder_set(directory, file_format)
    if (directory / "W_enc_0.safetensors").exists():
        return read_clt_dir(directory)
    if saelens.folders(directory):
        return saelens.read_saelens(directory, n_layers)
    raise CircuitsError(f"{directory} holds no transcoder: expected {FAMILIES}")


def resolve(name: str) -> tuple[Path, str]:
    """(local directory, source label) of 'demo', 'demo-tuned', a preset, 'hf:ORG/REPO[/FOLDER][@REV]'
    or a path."""
    from circuits.transcoders import hub

    if name == "demo":
        return DEMO_CLT_DIR, "demo"
    if name == "demo-tuned":
        return DEMO_TUNED_CLT_DIR, "demo-tuned"
    ref = hub_ref(name) or (name[3:] if name.startswith("hf:") else None)
    if ref is not None:
        parsed = hub.parse_ref(ref)
        return hub.snapshot(parsed), str(parsed)
    directory = Path(name)
    if not directory.is_dir():
        presets = ", ".join(PRESETS)
        raise CircuitsError(f"{name} holds no transcoder (no such directory): pass a directory, 'demo', "
                            f"'demo-tuned', a preset ({presets}) or hf:ORG/REPO")  # fmt: skip
    return directory, str(directory)


def load_transcoder(
    name: str | Path = "demo",
    model=None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> CrossLayerTranscoder:
    """A CrossLayerTranscoder from 'demo', 'demo-tuned', a preset (circuit-tracer's 'gemma', 'llama' and the CLTs
    in presets.PRESETS), 'hf:ORG/REPO[/FOLDER][@REV]', 'saelens:RELEASE:SAE_ID' (SAE_ID with
    {layer}; needs `model`) or a local directory of any family in FAMILIES.

    Weights come in `dtype` (float32 | bfloat16 | float16; None: the model's dtype with `model`,
    else the files' own) on `device`; thresholds stay float32. Decoders already in that dtype on
    the CPU stay memory-mapped from the files. With `model`, a transcoder that does not fit it
    (layers, width, hooks) is refused before any weight is read."""
    name, dev = str(name), check_device(device)
    dtype = torch_dtype(dtype) if dtype is not None else getattr(getattr(model, "cfg", None), "dtype", None)
    n_layers = model.cfg.n_layers if model is not None else None
    if name.startswith("saelens:"):
        if model is None:
            raise CircuitsError("loading a SAELens release needs the model (for its number of layers)")
        release, _, sae_id = name[len("saelens:") :].partition(":")
        cfg, layers = saelens.read_saelens_release(release, sae_id, n_layers)
        source = name
    else:
        directory, source = resolve(name)
        cfg, layers = read_directory(directory, n_layers)
    cfg.source = source
    if model is not None:
        check_fits(cfg, model)
    clt = assemble(cfg, layers, dtype, dev)
    log.info("loaded %s (%s): %d layers x %d features, %s -> %s", source, cfg.family, cfg.n_layers, cfg.n_features,
             cfg.input_hook, cfg.output_hook)  # fmt: skip
    return clt
