"""SAELens per-layer transcoders: one SAELens directory per layer (`layer_{l}/cfg.json` + `sae_weights.safetensors`),
written and read by SAELens's own classes."""

from __future__ import annotations

from pathlib import Path

import torch

from circuits.errors import CircuitsError
from circuits.fileio import atomic_directory
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder, check_fits


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
    return from_saelens_saes(saes, model, device)


def saelens_release(release: str, sae_id: str, n_layers: int) -> list:
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


def from_saelens_saes(saes: list, model, device: str):
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
        check_fits(cfg, model)
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
