"""GemmaScope (Gemma-2) per-layer transcoders: google/gemma-scope-2b-pt-transcoders, one
`layer_{i}/width_{W}/average_l0_{n}/params.npz` per layer, listed by a circuit-tracer config.yaml
(mwhanna/gemma-scope-transcoders, preset 'gemma'; hooks ln2.hook_normalized -> hook_mlp_out).

    W_enc [d, F] (d-major)   W_dec [F, d]   b_enc [F]   b_dec [d]   threshold [F] (JumpReLU)

No skip, no b_dec subtraction, no input normalisation (circuit-tracer's load_gemma_scope_transcoder).
"""

from __future__ import annotations

from pathlib import Path

from circuits.errors import CircuitsError
from circuits.transcoders.layer import LayerInfo, LayerWeights
from circuits.transcoders.tensorfile import npz_keys, read_npz

FAMILY = "gemmascope"
KEYS = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}


def is_layer_file(path: Path) -> bool:
    return Path(path).suffix == ".npz"


def _check_keys(path: Path, keys) -> None:
    if set(keys) != KEYS:
        raise CircuitsError(f"{path} has arrays {sorted(keys)}, expected GemmaScope's {sorted(KEYS)}")


def describe(path: Path) -> LayerInfo:
    _check_keys(path, npz_keys(path))
    small = read_npz(path, ("b_enc", "b_dec"))
    return LayerInfo(n_features=small["b_enc"].shape[0], d_model=small["b_dec"].shape[0], jumprelu=True, skip=False)


def read_layer(path: Path) -> LayerWeights:
    a = read_npz(path)
    _check_keys(path, a)
    return LayerWeights(W_enc=a["W_enc"].T, b_enc=a["b_enc"], W_dec=a["W_dec"].unsqueeze(1), b_dec=a["b_dec"],
                        threshold=a["threshold"])  # fmt: skip
