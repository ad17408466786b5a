"""Reading circuit-tracer's per-layer transcoder sets (`model_kind: transcoder_set`), ours included
(circuit_tracer.py writes them).

    config.yaml             model_kind: transcoder_set, model_name, feature_input_hook, feature_output_hook,
                            [transcoders: [one entry per layer, list index = layer: an hf:// URI or a path]]
    layer_{i}.safetensors   (without a `transcoders:` list) W_enc [F, d], W_dec [F, d], b_enc [F], b_dec [d],
                            activation_function.threshold [F] (or a bare `threshold`) => JumpReLU, else ReLU,
                            W_skip [d_out, d_in] => skip x @ W_skip.T, topk [] (ours: TopK; circuit-tracer refuses it)
    config.json             ours (CLTConfig), when we wrote it

The entries of a `transcoders:` list may be GemmaScope `.npz` files or GemmaScope-2 files: the
caller tells each file's format from the file itself (circuit-tracer decides from the repository's name).
A relative path resolves against the config's directory (circuit-tracer: the process's working directory).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

from circuits.errors import CircuitsError
from circuits.transcoders.clt import CLTConfig
from circuits.transcoders.configs import hooks, read_config_json, read_ct_config
from circuits.transcoders.hub import download_file, parse_ref
from circuits.transcoders.layer import LayerInfo, LayerWeights, present_layers
from circuits.transcoders.tensorfile import read_safetensors, require, safetensors_shapes

FAMILY = "circuit-tracer-transcoder-set"
THRESHOLD_KEYS = ("activation_function.threshold", "threshold")
KEYS = {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip", "topk", *THRESHOLD_KEYS}


def _entry_path(entry: str, directory: Path) -> Path:
    if entry.startswith("hf://"):
        return download_file(parse_ref(entry))
    path = Path(entry)
    return path if path.is_absolute() else directory / path


def layer_files(directory: Path, config: dict) -> dict[int, Path]:
    """{layer: local file}: the config's `transcoders:` list (downloading hf:// entries), else
    layer_{i}.safetensors, which must run from layer 0 without a gap."""
    if "transcoders" in config:
        entries = config["transcoders"]
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries) or not entries:
            raise CircuitsError(f"{directory}/config.yaml: transcoders must be a list of paths or hf:// URIs")
        return {i: _entry_path(e, directory) for i, e in enumerate(entries)}
    found = {int(m.group(1)): p for p in directory.glob("layer_*.safetensors")
             if (m := re.fullmatch(r"layer_(\d+)\.safetensors", p.name))}  # fmt: skip
    missing = sorted(set(range(max(found, default=-1) + 1)) - set(found))
    if not found or missing:
        raise CircuitsError(
            f"{directory}: layer_{missing[0] if missing else 0}.safetensors is missing: the set is incomplete"
        )
    return found


def describe(path: Path) -> LayerInfo:
    """What a circuit-tracer per-layer file declares (its header, and a TopK's k)."""
    shapes = safetensors_shapes(path)
    extra = sorted(set(shapes) - KEYS)
    if extra or not {"W_enc", "W_dec", "b_enc", "b_dec"} <= set(shapes):
        raise CircuitsError(f"{path} has tensors {sorted(shapes)}: not circuit-tracer's per-layer layout "
                            f"(W_enc, W_dec, b_enc, b_dec [, activation_function.threshold, W_skip])")  # fmt: skip
    if all(k in shapes for k in THRESHOLD_KEYS):
        raise CircuitsError(f"{path} has both threshold and activation_function.threshold: keep one")
    topk = int(read_safetensors(path)["topk"]) if "topk" in shapes else None
    return LayerInfo(n_features=shapes["b_enc"][0], d_model=shapes["b_dec"][0],
                     jumprelu=any(k in shapes for k in THRESHOLD_KEYS), skip="W_skip" in shapes, topk=topk)  # fmt: skip


def read_layer(path: Path) -> LayerWeights:
    t = read_safetensors(path)
    threshold = next((t[k] for k in THRESHOLD_KEYS if k in t), None)
    return LayerWeights(
        W_enc=require(t, "W_enc", path), b_enc=require(t, "b_enc", path),
        W_dec=require(t, "W_dec", path).unsqueeze(1), b_dec=require(t, "b_dec", path), threshold=threshold,
        W_skip=t["W_skip"].T if "W_skip" in t else None,
    )  # fmt: skip


Format = tuple[str, Callable[[Path], LayerInfo], Callable[[Path], LayerWeights]]
"""(family, describe, read) of one kind of per-layer file."""


def read_transcoder_set(
    directory: Path, file_format: Callable[[Path], Format]
) -> tuple[CLTConfig, Iterator[tuple[int, LayerWeights]]]:
    """(config, lazy per-layer weights) of a transcoder_set directory; `file_format` tells each
    layer file's format."""
    directory = Path(directory)
    config, ours = read_ct_config(directory), read_config_json(directory)
    files = layer_files(directory, config)
    formats = {l: file_format(p) for l, p in files.items()}
    family, describe, _ = formats[0]
    mixed = sorted(l for l, f in formats.items() if f[0] != family)
    if mixed:
        raise CircuitsError(f"{directory}: layer {mixed[0]} is a {formats[mixed[0]][0]} file but layer 0 is {family}")
    input_hook, output_hook = hooks(config, ours, None, directory)
    if ours is not None:
        cfg = CLTConfig.from_dict(
            {**ours, "input_hook": input_hook, "output_hook": output_hook}, directory / "config.json"
        )
    else:
        info = describe(files[0])
        activation = "jumprelu" if info.jumprelu else "topk" if info.topk else "relu"
        cfg = CLTConfig(n_layers=len(files), d_model=info.d_model, n_features=info.n_features, cross_layer=False,
                        skip=info.skip, activation=activation, topk=info.topk or 16, input_hook=input_hook,
                        output_hook=output_hook, model_name=str(config.get("model_name") or ""))  # fmt: skip
    cfg.family = family
    present = present_layers(cfg)  # our sets of some layers hold zero files for the others
    return cfg, ((l, formats[l][2](p)) for l, p in sorted(files.items()) if l in present)
