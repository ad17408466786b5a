"""One CrossLayerTranscoder from per-layer tensors read by any format reader.

The module is built on the `meta` device (no random initialisation, no memory) and receives its
tensors with `load_state_dict(assign=True)`. Encoders, biases and thresholds are copied layer by
layer into stacked tensors; a decoder that already has the target dtype and device (and is
contiguous) is kept as it was read, i.e. memory-mapped, so loading reads no decoder page.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from circuits.errors import CircuitsError
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder
from circuits.transcoders.layer import LayerWeights, present_layers


def _expected_shapes(cfg: CLTConfig, layer: int) -> dict[str, tuple[int, ...]]:
    F, d = cfg.n_features, cfg.d_model
    return {"W_enc": (F, d), "b_enc": (F,), "W_dec": (F, cfg.n_targets(layer), d), "b_dec": (d,),
            "threshold": (F,), "W_skip": (d, d)}  # fmt: skip


def _check_layer(cfg: CLTConfig, layer: int, w: LayerWeights) -> None:
    where = f"{cfg.source or 'the transcoder'}: layer {layer}"
    if layer not in present_layers(cfg):
        raise CircuitsError(
            f"{where} is not one of the declared layers {present_layers(cfg)}: the files are inconsistent"
        )
    for key, expected in _expected_shapes(cfg, layer).items():
        t = getattr(w, key)
        if t is not None and tuple(t.shape) != expected:
            raise CircuitsError(
                f"{where} {key} has shape {tuple(t.shape)}, expected {expected}: the files are inconsistent"
            )
        if t is not None and not t.is_floating_point():
            raise CircuitsError(f"{where} {key} is {t.dtype}, expected floating point: the file is not a transcoder")
    if (w.threshold is None) == (cfg.activation == "jumprelu"):
        has = "no threshold" if w.threshold is None else "a threshold"
        raise CircuitsError(
            f"{where} has {has} but the transcoder's activation is {cfg.activation}: the files are inconsistent"
        )
    if (w.W_skip is None) == cfg.skip:
        has = "no skip" if w.W_skip is None else "a skip"
        raise CircuitsError(f"{where} has {has} unlike the other layers: the files are inconsistent")


def _empty_state(cfg: CLTConfig, dtype: torch.dtype, device: torch.device) -> dict:
    """Zero tensors (calloc: no page is touched until written); layers without a transcoder keep them."""
    L, F, d = cfg.n_layers, cfg.n_features, cfg.d_model
    state = {
        "W_enc": torch.zeros(L, F, d, dtype=dtype, device=device),
        "b_enc": torch.zeros(L, F, dtype=dtype, device=device),
        "threshold": torch.zeros(L, F, dtype=torch.float32, device=device),
        "b_dec": torch.zeros(L, d, dtype=dtype, device=device),
    }
    if cfg.skip:
        state["W_skip"] = torch.zeros(L, d, d, dtype=dtype, device=device)
    return state


def _put(state: dict, layer: int, w: LayerWeights, dtype: torch.dtype, device: torch.device) -> None:
    state["W_enc"][layer].copy_(w.W_enc)  # copy_ converts dtype and device, and transposed views
    state["b_enc"][layer].copy_(w.b_enc)
    state["b_dec"][layer].copy_(w.b_dec)
    if w.threshold is not None:
        state["threshold"][layer].copy_(w.threshold)
    if w.W_skip is not None:
        state["W_skip"][layer].copy_(w.W_skip)
    # .to() and .contiguous() return the tensor itself when nothing changes: a mapped decoder stays mapped
    state[f"W_dec.{layer}"] = w.W_dec.to(device=device, dtype=dtype).contiguous()


def _check_finite(cfg: CLTConfig, layer: int, state: dict) -> None:
    """Refuse non-finite encoder-side weights of `layer` (read whole anyway; the decoders stay mapped
    and are checked where attribution uses them)."""
    for key in ("W_enc", "b_enc", "threshold", "b_dec", "W_skip"):
        if key in state and not torch.isfinite(state[key][layer]).all():
            raise CircuitsError(
                f"{cfg.source or 'the transcoder'}: layer {layer} {key} holds NaN or infinite values: "
                "the file is corrupt; re-download or re-train it"
            )


def assemble(
    cfg: CLTConfig,
    layers: Iterable[tuple[int, LayerWeights]],
    dtype: torch.dtype | None,
    device: torch.device,
) -> CrossLayerTranscoder:
    """The transcoder of `cfg` from (layer, weights) pairs, read one layer at a time. `dtype` None:
    the decoders' dtype in the files. Thresholds are float32 whatever the dtype."""
    state, seen = None, []
    for layer, w in layers:
        _check_layer(cfg, layer, w)
        if layer in seen:
            raise CircuitsError(f"{cfg.source}: layer {layer} appears twice: the files are inconsistent")
        if state is None:
            dtype = dtype or w.W_dec.dtype
            state = _empty_state(cfg, dtype, device)
        _put(state, layer, w, dtype, device)
        _check_finite(cfg, layer, state)
        seen.append(layer)
    missing = sorted(set(present_layers(cfg)) - set(seen))
    if state is None or missing:
        raise CircuitsError(f"{cfg.source}: no weights for layers {missing}: the transcoder directory is incomplete")
    for layer in range(cfg.n_layers):
        if f"W_dec.{layer}" not in state:
            state[f"W_dec.{layer}"] = torch.zeros(cfg.n_features, cfg.n_targets(layer), cfg.d_model, dtype=dtype,
                                                  device=device)  # fmt: skip
    with torch.device("meta"):
        clt = CrossLayerTranscoder(cfg)
    clt.load_state_dict(state, assign=True)
    return clt.eval()
