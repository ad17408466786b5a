"""circuit-tracer's two layouts as we write them, and its cross-layer layout as we read it.

Cross-layer transcoders (read here; circuit-tracer's own files have no config.json):
    W_enc_{l}.safetensors   W_enc_{l} [F, d], b_enc_{l} [F], b_dec_{l} [d] (bias of OUTPUT layer l),
                            threshold_{l} [F] (JumpReLU only: circuit-tracer reads ReLU without it),
                            topk_{l} [] (ours, TopK only)
    W_dec_{l}.safetensors   W_dec_{l} [F, L - l, d]  ([F, 1, d] in per-layer directories we wrote before
                            per-layer transcoders moved to the transcoder_set layout)
    W_skip_{l}.safetensors  W_skip_{l} [d, d], y_l += x_l @ W_skip_{l} (ours; circuit-tracer 0.5.0
                            never reads a skip, see configs.ct_model_kind)
    config.yaml             model_kind, model_name, feature_input_hook, feature_output_hook
    config.json             our CLTConfig (absent in circuit-tracer's files: shapes come from the files)

Per-layer transcoders, circuit-tracer's transcoder_set (read in transcoder_set.py):
    layer_{l}.safetensors   W_enc [F, d], W_dec [F, d], b_enc [F], b_dec [d], activation_function.threshold [F]
                            (JumpReLU only), W_skip [d_out, d_in] (circuit-tracer computes x @ W_skip.T),
                            topk [] (ours, TopK only: circuit-tracer's strict loader refuses the key)
    config.yaml, config.json as above
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch

from circuits.errors import CircuitsError
from circuits.transcoders.clt import CLTConfig
from circuits.transcoders.configs import hooks, read_config_json, read_ct_config, write_configs
from circuits.transcoders.layer import LayerWeights, present_layers
from circuits.transcoders.tensorfile import read_safetensors, require, safetensors_shapes, write_safetensors

FAMILY = "circuit-tracer-clt"


def save_transcoder(clt, directory: Path) -> None:
    """Write `clt` (in model units) into `directory`, file by file atomically: a cross-layer
    transcoder in circuit-tracer's CLT layout, a per-layer one in its transcoder_set layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for l in range(clt.cfg.n_layers):
        for name, tensors in (_clt_files if clt.cfg.cross_layer else _set_files)(clt, l).items():
            write_safetensors(directory / f"{name}.safetensors", tensors)
    write_configs(directory, clt.cfg)


def _clt_files(clt, l: int) -> dict[str, dict[str, torch.Tensor]]:
    enc = {f"W_enc_{l}": clt.W_enc[l], f"b_enc_{l}": clt.b_enc[l], f"b_dec_{l}": clt.b_dec[l]}
    if clt.cfg.activation == "jumprelu":
        enc[f"threshold_{l}"] = clt.threshold[l].float()
    if clt.cfg.activation == "topk":
        enc[f"topk_{l}"] = torch.tensor(clt.cfg.topk)
    files = {f"W_enc_{l}": enc, f"W_dec_{l}": {f"W_dec_{l}": clt.W_dec[l]}}
    if clt.W_skip is not None:
        files[f"W_skip_{l}"] = {f"W_skip_{l}": clt.W_skip[l]}
    return files


def _set_files(clt, l: int) -> dict[str, dict[str, torch.Tensor]]:
    t = {"W_enc": clt.W_enc[l], "W_dec": clt.W_dec[l][:, 0], "b_enc": clt.b_enc[l], "b_dec": clt.b_dec[l]}
    if clt.cfg.activation == "jumprelu":
        t["activation_function.threshold"] = clt.threshold[l].float()
    if clt.cfg.activation == "topk":
        t["topk"] = torch.tensor(clt.cfg.topk)
    if clt.W_skip is not None:
        t["W_skip"] = clt.W_skip[l].T  # [d_out, d_in]
    return {f"layer_{l}": t}


def _n_layers(directory: Path) -> int:
    found = sorted(int(m.group(1)) for p in directory.glob("W_enc_*.safetensors")
                   if (m := re.fullmatch(r"W_enc_(\d+)\.safetensors", p.name)))  # fmt: skip
    if found != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise CircuitsError(
            f"{directory}: W_enc_{missing[0]}.safetensors is missing: the transcoder directory is incomplete"
        )
    return len(found)


def _config(directory: Path) -> CLTConfig:
    """The CLTConfig of a CLT-layout directory: our config.json, else what the files declare."""
    ours, config = read_config_json(directory), read_ct_config(directory)
    input_hook, output_hook = hooks(config, ours, ("hook_resid_mid", "hook_mlp_out"), directory)
    if ours is not None:
        return CLTConfig.from_dict(
            {**ours, "input_hook": input_hook, "output_hook": output_hook}, directory / "config.json"
        )
    L = _n_layers(directory)
    enc = safetensors_shapes(directory / "W_enc_0.safetensors")
    n_targets = safetensors_shapes(directory / "W_dec_0.safetensors").get("W_dec_0", (0, 0))[1]
    if "W_enc_0" not in enc or n_targets not in (L, 1):
        raise CircuitsError(
            f"{directory}/W_dec_0.safetensors writes {n_targets} layers of {L}: the files are inconsistent"
        )
    activation = "jumprelu" if "threshold_0" in enc else "topk" if "topk_0" in enc else "relu"
    topk = int(read_safetensors(directory / "W_enc_0.safetensors")["topk_0"]) if activation == "topk" else 16
    F, d = enc["W_enc_0"]
    return CLTConfig(
        n_layers=L, d_model=d, n_features=F, cross_layer=n_targets == L or L == 1,
        skip=(directory / "W_skip_0.safetensors").exists(), activation=activation, topk=topk,
        input_hook=input_hook, output_hook=output_hook, model_name=str(config.get("model_name") or ""),
    )  # fmt: skip


def _layers(directory: Path, cfg: CLTConfig) -> Iterator[tuple[int, LayerWeights]]:
    for l in present_layers(cfg):  # our CLTs of some layers hold zero files for the others
        path = directory / f"W_enc_{l}.safetensors"
        enc = read_safetensors(path)
        dec_path, skip_path = directory / f"W_dec_{l}.safetensors", directory / f"W_skip_{l}.safetensors"
        yield l, LayerWeights(
            W_enc=require(enc, f"W_enc_{l}", path), b_enc=require(enc, f"b_enc_{l}", path),
            W_dec=require(read_safetensors(dec_path), f"W_dec_{l}", dec_path), b_dec=require(enc, f"b_dec_{l}", path),
            threshold=require(enc, f"threshold_{l}", path) if cfg.activation == "jumprelu" else None,
            W_skip=require(read_safetensors(skip_path), f"W_skip_{l}", skip_path) if cfg.skip else None,
        )  # fmt: skip


def read_clt_dir(directory: Path) -> tuple[CLTConfig, Iterator[tuple[int, LayerWeights]]]:
    """(config, lazy per-layer weights) of our / circuit-tracer's CLT directory."""
    directory = Path(directory)
    cfg = _config(directory)
    cfg.family, cfg.model_processing = FAMILY, cfg.model_processing or "none"
    return cfg, _layers(directory, cfg)
