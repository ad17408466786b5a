"""Load a transcoder by name: the demo CLT, a local directory in any layout we read, or a hub repository."""

from __future__ import annotations

from pathlib import Path

from circuits.errors import CircuitsError
from circuits.transcoders.circuit_tracer import load_clt_dir
from circuits.transcoders.saelens import from_saelens_saes, load_saelens, saelens_release

DEMO_CLT_DIR = Path(__file__).resolve().parent.parent / "demo" / "clt"


def load_transcoder(name: str | Path = "demo", model=None, device: str = "cpu"):
    """Load a CrossLayerTranscoder: 'demo' (shipped with the demo model), a local directory in
    our / circuit-tracer's layout or a SAELens per-layer transcoder set (`layer_{l}/cfg.json`),
    'hf:ORG/REPO' (a circuit-tracer repository on the hub) or 'saelens:RELEASE:SAE_ID' (a SAELens
    release, SAE_ID with `{layer}` for the layer number; needs `n_layers` from `model`).
    With `model`, refuse a transcoder whose shapes or hooks do not fit it."""
    name = str(name)
    if name.startswith("saelens:"):
        if model is None:
            raise CircuitsError("loading a SAELens release needs the model (for its number of layers)")
        release, sae_id = name[len("saelens:") :].split(":", 1)
        return from_saelens_saes(saelens_release(release, sae_id, model.cfg.n_layers), model, device)
    if name == "demo":
        directory = DEMO_CLT_DIR
    elif name.startswith("hf:"):
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(name[3:]))
    else:
        directory = Path(name)
    if (directory / "layer_0" / "cfg.json").exists():
        return load_saelens(directory, model, device)
    if not (directory / "W_enc_0.safetensors").exists():
        raise CircuitsError(f"{directory} holds no transcoder (W_enc_0.safetensors is missing): pass a CLT directory")
    return load_clt_dir(directory, model, device)
