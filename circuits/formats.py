"""Save and load: atomic file and directory writes shared by every artifact."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from circuits.errors import CircuitsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(directory: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `directory` whole. Replacing
    takes two renames: a process killed between them leaves no `directory`, and its previous
    version in `.{name}.old.{pid}` (`surviving_directory` finds it; the next success removes it)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any new directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old.{os.getpid()}")
        directory.rename(old)
    tmp.rename(directory)
    for stale in directory.parent.glob(f".{glob.escape(directory.name)}.old.*"):  # ours, and any a killed swap left
        shutil.rmtree(stale)


def surviving_directory(directory: Path) -> Path:
    """`directory`, or when a swap of `atomic_directory` was killed between its renames, the
    previous version it left (the newest)."""
    directory = Path(directory)
    if directory.exists():
        return directory
    old = sorted(directory.parent.glob(f".{glob.escape(directory.name)}.old.*"), key=lambda p: p.stat().st_mtime)
    return old[-1] if old else directory


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator:
    """Open a temporary sibling of `path` for writing; it replaces `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---- transcoders -----------------------------------------------------------------------------
# Our directory is circuit-tracer's CLT layout plus our own config.json:
#   W_enc_{l}.safetensors: W_enc_{l} [F, d], b_enc_{l} [F], b_dec_{l} [d], threshold_{l} [F]
#   W_dec_{l}.safetensors: W_dec_{l} [F, L - l, d]   ([F, 1, d] for a per-layer transcoder)
#   W_skip_{l}.safetensors: W_skip_{l} [d, d]        (skip transcoders only)
#   config.yaml (circuit-tracer), config.json (CLTConfig)

DEMO_CLT_DIR = Path(__file__).parent / "demo" / "clt"


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
    with atomic_file(directory / "config.json") as f:
        json.dump(clt.cfg.to_dict(), f, indent=2)


def _safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


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
        return _from_saelens_saes(_saelens_release(release, sae_id, model.cfg.n_layers), model, device)
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
    return _load_clt_dir(directory, model, device)


def _load_clt_dir(directory: Path, model, device: str):
    from circuits.clt import CLTConfig, CrossLayerTranscoder

    cfg = _read_transcoder_config(directory)
    if model is not None:
        check_fits(cfg, model)
    clt = CrossLayerTranscoder(CLTConfig(**cfg)).to(device)
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


def check_fits(cfg: dict, model) -> None:
    """Raise CircuitsError unless a transcoder config fits the model's layers, width and hooks."""
    problems = []
    if cfg["n_layers"] != model.cfg.n_layers:
        problems.append(f"{cfg['n_layers']} layers vs the model's {model.cfg.n_layers}")
    if cfg["d_model"] != model.cfg.d_model:
        problems.append(f"d_model {cfg['d_model']} vs the model's {model.cfg.d_model}")
    if (cfg.get("input_hook", "hook_resid_mid"), cfg.get("output_hook", "hook_mlp_out")) != (
        "hook_resid_mid",
        "hook_mlp_out",
    ):
        hooks = f"{cfg.get('input_hook')} -> {cfg.get('output_hook')}"
        problems.append(f"hooks {hooks} (need hook_resid_mid -> hook_mlp_out)")
    if problems:
        raise CircuitsError("the transcoder does not fit the model: " + "; ".join(problems))


# ---- SAELens per-layer transcoders -------------------------------------------------------------
# One SAELens directory per layer: layer_{l}/cfg.json + layer_{l}/sae_weights.safetensors, written
# and read by SAELens's own classes (architecture jumprelu_transcoder, transcoder, or their skip
# variants), W_enc [d, F], W_dec [F, d], W_skip [d_out, d_in].


def save_saelens(clt, directory: Path) -> None:
    """Write a per-layer transcoder (`cross_layer=False`) as one SAELens transcoder per layer."""
    from sae_lens.saes.sae import SAEMetadata

    if clt.cfg.cross_layer:
        raise CircuitsError("SAELens holds per-layer transcoders only: train with cross_layer = false")
    cls, cfg_cls = _saelens_classes(clt.cfg)
    with atomic_directory(directory) as tmp:
        for l in range(clt.cfg.n_layers):
            metadata = SAEMetadata(
                model_name=clt.cfg.model_name,
                hook_name=f"blocks.{l}.{clt.cfg.input_hook}",
                hook_name_out=f"blocks.{l}.{clt.cfg.output_hook}",
            )
            d, F = clt.cfg.d_model, clt.cfg.n_features
            sae_cfg = cfg_cls(d_in=d, d_sae=F, d_out=d, apply_b_dec_to_input=False, metadata=metadata)
            sae = cls(sae_cfg)
            state = {"W_enc": clt.W_enc[l].T, "b_enc": clt.b_enc[l], "W_dec": clt.W_dec[l][:, 0], "b_dec": clt.b_dec[l]}
            if clt.cfg.activation == "jumprelu":
                state["threshold"] = clt.threshold[l]
            if clt.W_skip is not None:
                state["W_skip"] = clt.W_skip[l].T
            sae.load_state_dict({k: v.detach().cpu().float().contiguous() for k, v in state.items()})
            sae.save_model(tmp / f"layer_{l}")


def load_saelens(directory: Path, model=None, device: str = "cpu"):
    """Read a SAELens per-layer transcoder set (`layer_{l}/` directories) into a CrossLayerTranscoder."""
    from sae_lens import SAE

    n_layers = len(list(Path(directory).glob("layer_*/cfg.json")))
    saes = [SAE.load_from_disk(str(Path(directory) / f"layer_{l}"), device="cpu") for l in range(n_layers)]
    return _from_saelens_saes(saes, model, device)


def _saelens_release(release: str, sae_id: str, n_layers: int) -> list:
    from sae_lens import SAE

    return [SAE.from_pretrained(release, sae_id.format(layer=l), device="cpu") for l in range(n_layers)]


def _saelens_classes(cfg):
    from sae_lens.saes import transcoder as t

    if cfg.activation == "jumprelu":
        return (t.JumpReLUSkipTranscoder, t.JumpReLUSkipTranscoderConfig) if cfg.skip else (
            t.JumpReLUTranscoder, t.JumpReLUTranscoderConfig
        )  # fmt: skip
    if cfg.activation == "relu":
        return (t.SkipTranscoder, t.SkipTranscoderConfig) if cfg.skip else (t.Transcoder, t.TranscoderConfig)
    raise CircuitsError(f"SAELens has no {cfg.activation} transcoder: use jumprelu or relu")


def _from_saelens_saes(saes: list, model, device: str):
    from circuits.clt import CLTConfig, CrossLayerTranscoder

    first = saes[0]
    arch = first.cfg.architecture()
    if arch not in ("jumprelu_transcoder", "jumprelu_skip_transcoder", "transcoder", "skip_transcoder"):
        raise CircuitsError(f"SAELens architecture {arch!r} is not a transcoder: pass a transcoder release")
    hook_in = (first.cfg.metadata.hook_name or "blocks.0.hook_resid_mid").split(".")[-1]
    hook_out = (first.cfg.metadata.hook_name_out or "blocks.0.hook_mlp_out").split(".")[-1]
    cfg = CLTConfig(
        n_layers=len(saes),
        d_model=first.cfg.d_in,
        n_features=first.cfg.d_sae,
        cross_layer=False,
        skip="skip" in arch,
        activation="jumprelu" if arch.startswith("jumprelu") else "relu",
        input_hook=hook_in,
        output_hook=hook_out,
        model_name=first.cfg.metadata.model_name or "",
    )
    if model is not None:
        check_fits(cfg.to_dict(), model)
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        for l, sae in enumerate(saes):
            if (sae.W_enc.shape, sae.W_dec.shape) != ((cfg.d_model, cfg.n_features), (cfg.n_features, cfg.d_model)):
                raise CircuitsError(f"SAELens layer {l} has shapes {tuple(sae.W_enc.shape)}, expected layer 0's")
            clt.W_enc[l] = sae.W_enc.T
            clt.b_enc[l] = sae.b_enc
            clt.W_dec[l][:, 0] = sae.W_dec
            clt.b_dec[l] = sae.b_dec
            clt.threshold[l] = sae.threshold if cfg.activation == "jumprelu" else 0.0
            if cfg.skip:
                clt.W_skip[l] = sae.W_skip.T
    return clt.to(device).eval()
