"""Our transcoder directory, which is circuit-tracer's CLT layout plus our own config.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from circuits.errors import CircuitsError
from circuits.fileio import atomic_file, write_json
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder, check_fits

# Layout:
#   W_enc_{l}.safetensors: W_enc_{l} [F, d], b_enc_{l} [F], b_dec_{l} [d], threshold_{l} [F]
#   W_dec_{l}.safetensors: W_dec_{l} [F, L - l, d]   ([F, 1, d] for a per-layer transcoder)
#   W_skip_{l}.safetensors: W_skip_{l} [d, d]        (skip transcoders only)
#   config.yaml (circuit-tracer), config.json (CLTConfig)


def save_transcoder(clt, directory: Path) -> None:
    """Write `clt` (a CrossLayerTranscoder, in model units) into `directory`, file by file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for l in range(clt.cfg.n_layers):
        enc = {
            f"W_enc_{l}": clt.W_enc[l],
            f"b_enc_{l}": clt.b_enc[l],
            f"b_dec_{l}": clt.b_dec[l],
            f"threshold_{l}": clt.threshold[l].float(),
        }
        files = {f"W_enc_{l}": enc, f"W_dec_{l}": {f"W_dec_{l}": clt.W_dec[l]}}
        if clt.W_skip is not None:
            files[f"W_skip_{l}"] = {f"W_skip_{l}": clt.W_skip[l]}
        for name, tensors in files.items():
            with atomic_file(directory / f"{name}.safetensors", "wb") as f:
                f.write(_safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
    kind = "cross_layer_transcoder" if clt.cfg.cross_layer else "transcoder_set"
    yaml_lines = [
        f"model_kind: {kind}",
        f"model_name: {json.dumps(clt.cfg.model_name)}",
        f"feature_input_hook: {clt.cfg.input_hook}",
        f"feature_output_hook: {clt.cfg.output_hook}",
        "scan: null",
    ]
    with atomic_file(directory / "config.yaml") as f:
        f.write("\n".join(yaml_lines) + "\n")
    write_json(directory / "config.json", clt.cfg.to_dict(), indent=2)


def _safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def load_clt_dir(directory: Path, model=None, device: str = "cpu"):
    """A CrossLayerTranscoder from our / circuit-tracer's CLT directory; with `model`, refuse one
    that does not fit it."""
    cfg = CLTConfig(**_read_transcoder_config(directory))
    if model is not None:
        check_fits(cfg, model)
    clt = CrossLayerTranscoder(cfg).to(device)
    state = {}
    for l in range(clt.cfg.n_layers):
        enc = _load(directory / f"W_enc_{l}.safetensors", device)
        state[f"W_dec.{l}"] = _load(directory / f"W_dec_{l}.safetensors", device)[f"W_dec_{l}"]
        for key in ("W_enc", "b_enc", "b_dec", "threshold"):
            state.setdefault(key, []).append(enc[f"{key}_{l}"])
        if clt.W_skip is not None:
            state.setdefault("W_skip", []).append(_load(directory / f"W_skip_{l}.safetensors", device)[f"W_skip_{l}"])
    for key in ("W_enc", "b_enc", "b_dec", "threshold", "W_skip"):
        if key in state:
            state[key] = torch.stack(state[key])
    expected = {k: tuple(v.shape) for k, v in clt.state_dict().items()}
    for k, v in state.items():
        if tuple(v.shape) != expected[k]:
            raise CircuitsError(
                f"{directory}: {k} has shape {tuple(v.shape)}, expected {expected[k]}: the files are inconsistent"
            )
    clt.load_state_dict(state)
    clt.threshold.data = clt.threshold.data.float()
    return clt.eval()


def _load(path: Path, device: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise CircuitsError(f"{path} is missing: the transcoder directory is incomplete")
    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:
        raise CircuitsError(f"{path} is corrupt or truncated ({e}): re-download or re-train it") from None


def _read_transcoder_config(directory: Path) -> dict:
    if (directory / "config.json").exists():
        return json.loads((directory / "config.json").read_text())
    # circuit-tracer layout without our config: read the shapes from the files.
    from safetensors import safe_open

    n_layers = len(list(directory.glob("W_enc_*.safetensors")))
    with safe_open(str(directory / "W_enc_0.safetensors"), "pt") as f:
        n_features, d_model = f.get_slice("W_enc_0").get_shape()
    with safe_open(str(directory / "W_dec_0.safetensors"), "pt") as f:
        n_targets = f.get_slice("W_dec_0").get_shape()[1]
    text = (directory / "config.yaml").read_text() if (directory / "config.yaml").exists() else ""
    hooks = dict(line.split(": ", 1) for line in text.splitlines() if line.startswith("feature_"))
    return {
        "n_layers": n_layers,
        "d_model": d_model,
        "n_features": n_features,
        "cross_layer": n_targets == n_layers,
        "input_hook": hooks.get("feature_input_hook", "hook_resid_mid").strip(),
        "output_hook": hooks.get("feature_output_hook", "hook_mlp_out").strip(),
    }
