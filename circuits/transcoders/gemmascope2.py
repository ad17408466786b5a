"""GemmaScope-2 (Gemma-3) transcoders, google/gemma-scope-2-{size}-{pt|it}, listed by a
circuit-tracer config.yaml (mwhanna/gemma-scope-2-* repos; hooks mlp.hook_in -> hook_mlp_out).

Per-layer, `transcoder_all/layer_{i}_width_{W}_l0_{l0}[_affine]/params.safetensors`:
    w_enc [d, F]  w_dec [F, d]  b_enc [F]  b_dec [d]  threshold [F]  [affine_skip_connection [d, d]: x @ A]
Cross-layer, `clt/width_{W}_l0_{l0}[_affine]/params_layer_{i}.safetensors` (i = source layer):
    the same keys with w_dec [F, L, d] over ALL L output layers, of which layer i uses [:, i:, :];
    b_dec is the bias of output layer i and the skip adds x_i @ A_i to output layer i.
circuit-tracer 0.5.0 reads only L - 1 of the CLT files (range(max(paths))) and then fails; we read all L.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from circuits.errors import CircuitsError
from circuits.transcoders.clt import CLTConfig
from circuits.transcoders.layer import LayerInfo, LayerWeights
from circuits.transcoders.tensorfile import read_safetensors, safetensors_shapes

FAMILY = "gemmascope-2"
CLT_FAMILY = "gemmascope-2-clt"
KEYS = {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"}
SKIP = "affine_skip_connection"


def is_layer_file(shapes: dict) -> bool:
    return "w_enc" in shapes


def _check_keys(path: Path, keys) -> None:
    if not KEYS <= set(keys) <= KEYS | {SKIP}:
        raise CircuitsError(f"{path} has tensors {sorted(keys)}, expected GemmaScope-2's {sorted(KEYS)} [+ {SKIP}]")


def describe(path: Path) -> LayerInfo:
    shapes = safetensors_shapes(path)
    _check_keys(path, shapes)
    return LayerInfo(n_features=shapes["b_enc"][0], d_model=shapes["b_dec"][0], jumprelu=True, skip=SKIP in shapes)


def _weights(t: dict, W_dec) -> LayerWeights:
    return LayerWeights(W_enc=t["w_enc"].T, b_enc=t["b_enc"], W_dec=W_dec, b_dec=t["b_dec"], threshold=t["threshold"],
                        W_skip=t.get(SKIP))  # fmt: skip


def read_layer(path: Path) -> LayerWeights:
    t = read_safetensors(path)
    _check_keys(path, t)
    return _weights(t, t["w_dec"].unsqueeze(1))


def read_clt(files: dict[int, Path], input_hook: str, output_hook: str, model_name: str):
    """(config, lazy per-layer weights) of a GemmaScope-2 CLT from its per-source-layer files."""
    L, info = len(files), describe(files[0])
    w_dec = safetensors_shapes(files[0])["w_dec"]
    if len(w_dec) != 3 or w_dec[1] != L:
        raise CircuitsError(f"{files[0]}: w_dec has shape {w_dec}, expected [F, {L}, d] for {L} listed layers")
    cfg = CLTConfig(n_layers=L, d_model=info.d_model, n_features=info.n_features, cross_layer=True, skip=info.skip,
                    activation="jumprelu", input_hook=input_hook, output_hook=output_hook, model_name=model_name,
                    family=CLT_FAMILY)  # fmt: skip
    return cfg, _clt_layers(files)


def _clt_layers(files: dict[int, Path]) -> Iterator[tuple[int, LayerWeights]]:
    for l, path in sorted(files.items()):
        t = read_safetensors(path)
        _check_keys(path, t)
        if t["w_dec"].dim() != 3 or t["w_dec"].shape[1] != len(files):
            raise CircuitsError(f"{path}: w_dec is not [F, {len(files)}, d]: the files are inconsistent")
        yield l, _weights(t, t["w_dec"][:, l:, :])  # a copy unless l == 0 (assemble makes it contiguous)
