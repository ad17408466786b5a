"""Test helper: write random transcoders in the exact on-disk layouts that circuit-tracer 0.5.0
(and, for the SAELens family, SAELens 6.x) reads, lay repositories out in a Hugging Face cache,
and run circuit-tracer's own loaders on them (`python tests/layouts.py ct-peer SPEC OUT` with a
Python that has circuit-tracer installed), or its whole attribution on a model rebuilt from a config and
a state dict (`python tests/layouts.py ct-attribute SPEC OUT_DIR`).

Standalone: depends only on torch, safetensors and numpy (and circuit-tracer for ct-peer), so the
peer's Python can run it. YAML/JSON configs are written as text (no pyyaml needed).

Every ``write_<family>(directory, n_layers, d_model, n_features, seed, **options)``
writes into ``directory`` and returns a dict::

    {
      "family": str,
      "files": {relative_path: {tensor_key: torch.Tensor (file orientation, file dtype)}},
      "config_files": {relative_path: text},          # config.yaml / config.json / cfg.json
      "layers": [int, ...],                            # layers that have a transcoder
      "kind": "clt" | "plt",
      "meta": {...},                                   # hooks, activation, skip, hf_ref, ...
      "params": {layer: {...canonical...}},            # see below
    }

``params`` is a canonical float32 view, identical for every family, which is what a
loader should end up with (circuit-tracer's semantics):

    W_enc     [F, d]           pre = x @ W_enc.T + b_enc
    b_enc     [F]
    threshold [F] or None      act = pre * (pre > threshold)   (JumpReLU, no ReLU clamp)
                               act = relu(pre) * (pre > threshold)   (SAELens families, meta["saelens"])
                               act = relu(pre)                  (threshold None)
    W_dec     PLT: [F, d]      CLT: [F, L - layer, d] (output layers layer..L-1)
    b_dec     [d]              bias of the output at this layer
    W_skip    [d_in, d_out] or None: skip = x @ W_skip  (already in "x @ M" orientation)

``reference_forward(written, x)`` applies those semantics (numpy-free torch) so tests can
compare any loader against them; x is [L, n_pos, d] (one input per layer).

Weight scales: encoder rows ~ N(0, 1/d) so for inputs with entries ~ N(0, 1) (norm ~ sqrt(d))
pre-activations are ~ N(b_enc, 1); thresholds ~ U(0.1, 0.6) (SAELens writers: `thresholds=(lo, hi)`)
so roughly 30-45 % of features fire (50 % for ReLU).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

__all__ = [
    "write_ct_clt",
    "write_ct_transcoder_set",
    "write_gemmascope_npz",
    "write_ct_cache",
    "write_gemmascope2_transcoders",
    "write_gemmascope2_clt",
    "write_saelens_transcoder",
    "write_saelens_transcoder_set",
    "reference_forward",
    "hub_cache_repo",
    "ct_peer",
    "ct_attribute",
    "FAMILIES",
]

GEMMASCOPE_REPO = "google/gemma-scope-2b-pt-transcoders"
# average_l0 per layer chosen by mwhanna/gemma-scope-transcoders (and mntss/gemma-scope-transcoders)
GEMMASCOPE_L0S = [76, 65, 49, 54, 88, 87, 95, 70, 52, 72, 88, 5, 6, 8, 8, 8, 10, 12, 13, 12, 11, 13, 15, 25, 37, 41]

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    torch.float32: torch.float32,
    torch.float16: torch.float16,
    torch.bfloat16: torch.bfloat16,
}


# ----------------------------------------------------------------------------- helpers


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float32) * scale


def _rand(g, *shape, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float32)


def _layer_params(g, d_model, n_features, *, n_out=None, jumprelu=True, skip=False, thresholds=(0.1, 0.6)):
    """Canonical float32 parameters for one layer (see module doc)."""
    d, F = d_model, n_features
    p = {
        "W_enc": _randn(g, F, d, scale=d**-0.5),
        "b_enc": _randn(g, F, scale=0.1),
        "threshold": _rand(g, F, lo=thresholds[0], hi=thresholds[1]) if jumprelu else None,
        "b_dec": _randn(g, d, scale=0.1),
        "W_skip": _randn(g, d, d, scale=0.1 * d**-0.5) if skip else None,
    }
    if n_out is None:
        p["W_dec"] = _randn(g, F, d, scale=F**-0.5)
    else:
        p["W_dec"] = _randn(g, F, n_out, d, scale=F**-0.5)
    return p


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(_DTYPES[dtype]).contiguous()


def _canon(p: dict, dtype) -> dict:
    """What a loader reading the file (stored in `dtype`) and upcasting gets."""
    return {k: (None if v is None else _cast(v, dtype).float()) for k, v in p.items()}


def _save_st(directory: Path, rel: str, tensors: dict, files: dict):
    path = directory / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path))
    files[rel] = tensors


def _save_npz(directory: Path, rel: str, arrays: dict, files: dict):
    path = directory / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(str(path), **{k: v.numpy() for k, v in arrays.items()})
    files[rel] = {k: v.clone() for k, v in arrays.items()}


def _q(s) -> str:
    """YAML scalar."""
    if s is None:
        return "null"
    if isinstance(s, bool):
        return "true" if s else "false"
    if isinstance(s, (int, float)):
        return str(s)
    return json.dumps(str(s))  # double-quoted YAML string


def _yaml(fields: list[tuple[str, object]], header: str | None = None) -> str:
    lines = [f"# {header}"] if header else []
    for k, v in fields:
        if isinstance(v, list):
            lines.append(f"{k}:")
            lines.extend(f"  - {_q(item)}" for item in v)
        else:
            lines.append(f"{k}: {_q(v)}")
    return "\n".join(lines) + "\n"


def _write_text(directory: Path, rel: str, text: str, config_files: dict):
    path = directory / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    config_files[rel] = text


def _width_label(F: int) -> str:
    return f"{F // 1024}k" if F % 1024 == 0 else str(F)


def _paths_for(mode: str, directory: Path, rels: list[str], hf_repo: str | None):
    if mode == "hf":
        assert hf_repo is not None
        return [f"hf://{hf_repo}/{r}" for r in rels]
    if mode == "absolute":
        return [str((directory / r).resolve()) for r in rels]
    if mode == "relative":
        return list(rels)
    raise ValueError(f"unknown path mode {mode!r}")


def _result(family, kind, files, config_files, layers, meta, params):
    return {
        "family": family,
        "kind": kind,
        "files": files,
        "config_files": config_files,
        "layers": list(layers),
        "meta": meta,
        "params": params,
    }


# ----------------------------------------------------------------------------- CLT (circuit-tracer)


def write_ct_clt(
    directory,
    n_layers,
    d_model,
    n_features,
    seed,
    *,
    activation="jumprelu",
    dtype="float32",
    model_name="google/gemma-2-2b",
    feature_input_hook="hook_resid_mid",
    feature_output_hook="hook_mlp_out",
    write_config=True,
    extra_keys=False,
):
    """circuit-tracer cross-layer transcoder (mntss/clt-gemma-2-2b-426k, mntss/clt-llama-3.2-1b-524k,
    mntss/clt-131k layout; also what CrossLayerTranscoder.to_safetensors writes)::

        config.yaml               model_name / model_kind: cross_layer_transcoder / hooks
        W_enc_{l}.safetensors     W_enc_{l} [F, d], b_enc_{l} [F], b_dec_{l} [d], threshold_{l} [F] (JumpReLU only)
        W_dec_{l}.safetensors     W_dec_{l} [F, L - l, d]

    activation: "jumprelu" (threshold_{l} present) | "relu" (absent).
    extra_keys: also write a W_skip_{l} [d, d] into W_enc_{l}.safetensors -- circuit-tracer
    IGNORES it (its _load_state_dict never reads W_skip); params["W_skip"] stays None.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = _gen(seed)
    jump = activation == "jumprelu"
    files, cfgs, params = {}, {}, {}
    for l in range(n_layers):
        p = _layer_params(g, d_model, n_features, n_out=n_layers - l, jumprelu=jump)
        enc = {
            f"W_enc_{l}": _cast(p["W_enc"], dtype),
            f"b_enc_{l}": _cast(p["b_enc"], dtype),
            f"b_dec_{l}": _cast(p["b_dec"], dtype),
        }
        if jump:
            enc[f"threshold_{l}"] = _cast(p["threshold"], dtype)
        if extra_keys:
            enc[f"W_skip_{l}"] = _cast(_randn(g, d_model, d_model, scale=0.01), dtype)
        _save_st(directory, f"W_enc_{l}.safetensors", enc, files)
        _save_st(directory, f"W_dec_{l}.safetensors", {f"W_dec_{l}": _cast(p["W_dec"], dtype)}, files)
        params[l] = _canon(p, dtype)
    meta = {
        "model_name": model_name,
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": feature_input_hook,
        "feature_output_hook": feature_output_hook,
        "activation": activation,
        "skip": False,
        "dtype": str(dtype),
    }
    if write_config:
        _write_text(
            directory,
            "config.yaml",
            _yaml(
                [
                    ("model_name", model_name),
                    ("model_kind", "cross_layer_transcoder"),
                    ("feature_input_hook", feature_input_hook),
                    ("feature_output_hook", feature_output_hook),
                ]
            ),
            cfgs,
        )
    return _result("ct_clt_" + activation, "clt", files, cfgs, range(n_layers), meta, params)


# ----------------------------------------------------------------------------- PLT set (circuit-tracer)


def write_ct_transcoder_set(
    directory,
    n_layers,
    d_model,
    n_features,
    seed,
    *,
    activation="relu",
    skip=False,
    threshold_key="activation_function.threshold",
    transcoders_list=None,
    dtype="float32",
    model_name="meta-llama/Llama-3.2-1B",
    feature_input_hook="mlp.hook_in",
    feature_output_hook="mlp.hook_out",
    hf_repo=None,
    write_config=True,
):
    """circuit-tracer per-layer transcoder set (mntss/transcoder-Llama-3.2-1B, mwhanna/qwen3-*-transcoders,
    and every TranscoderSet.to_safetensors / save_transcoders_to_cache output)::

        config.yaml              model_name / model_kind: transcoder_set / hooks [/ transcoders: [...]]
        layer_{i}.safetensors    W_enc [F, d], W_dec [F, d], b_enc [F], b_dec [d],
                                 activation_function.threshold [F] (JumpReLU only),
                                 W_skip [d, d] (optional; applied as x @ W_skip.T)

    activation: "relu" | "jumprelu".
    threshold_key: "activation_function.threshold" (what circuit-tracer reads) or "threshold"
        (circuit-tracer 0.5.0 then FAILS: load_state_dict 'Unexpected key(s) ... "threshold"').
    transcoders_list: None (no `transcoders:` key; circuit-tracer globs layer_*.safetensors) |
        "relative" | "absolute" | "hf" (hf://<hf_repo>/layer_{i}.safetensors). Note: a relative
        entry is resolved by circuit-tracer against the *process CWD*, not the config's folder.
    params["W_skip"] is stored transposed (x @ params W_skip == x @ file W_skip.T).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = _gen(seed)
    jump = activation == "jumprelu"
    files, cfgs, params = {}, {}, {}
    rels = []
    for l in range(n_layers):
        p = _layer_params(g, d_model, n_features, jumprelu=jump, skip=skip)
        t = {
            "W_enc": _cast(p["W_enc"], dtype),
            "W_dec": _cast(p["W_dec"], dtype),
            "b_enc": _cast(p["b_enc"], dtype),
            "b_dec": _cast(p["b_dec"], dtype),
        }
        if jump:
            t[threshold_key] = _cast(p["threshold"], dtype)
        if skip:
            t["W_skip"] = _cast(p["W_skip"].T, dtype)  # file: [d_out, d_in]
        rel = f"layer_{l}.safetensors"
        _save_st(directory, rel, t, files)
        rels.append(rel)
        params[l] = _canon(p, dtype)
    fields = [
        ("model_name", model_name),
        ("model_kind", "transcoder_set"),
        ("feature_input_hook", feature_input_hook),
        ("feature_output_hook", feature_output_hook),
    ]
    if transcoders_list:
        fields.append(("transcoders", _paths_for(transcoders_list, directory, rels, hf_repo)))
    if write_config:
        _write_text(directory, "config.yaml", _yaml(fields), cfgs)
    meta = {
        "model_name": model_name,
        "model_kind": "transcoder_set",
        "feature_input_hook": feature_input_hook,
        "feature_output_hook": feature_output_hook,
        "activation": activation,
        "skip": skip,
        "threshold_key": threshold_key,
        "transcoders_list": transcoders_list,
        "dtype": str(dtype),
    }
    return _result(f"ct_plt_{activation}{'_skip' if skip else ''}", "plt", files, cfgs, range(n_layers), meta, params)


# ----------------------------------------------------------------------------- GemmaScope (npz)


def write_gemmascope_npz(
    directory,
    n_layers,
    d_model,
    n_features,
    seed,
    *,
    paths="hf",
    config_name="config.yaml",
    write_config=True,
    model_name="google/gemma-2-2b",
):
    """google/gemma-scope-2b-pt-transcoders layout + the mwhanna/gemma-scope-transcoders config::

        layer_{i}/width_{W}/average_l0_{n}/params.npz   (np.savez, float32)
            W_enc [d, F]   (note: d-major, transposed vs circuit-tracer)
            W_dec [F, d]
            b_enc [F], b_dec [d], threshold [F]
        config.yaml   (the mwhanna repo's file; written into `directory` for convenience)
            model_name: "google/gemma-2-2b"
            model_kind: "transcoder_set"
            feature_input_hook: "ln2.hook_normalized"
            feature_output_hook: "hook_mlp_out"
            transcoders:
              - "hf://google/gemma-scope-2b-pt-transcoders/layer_0/width_16k/average_l0_76/params.npz"

    paths: "hf" (published form) | "absolute" | "relative" -- the form of `transcoders` entries.
    circuit-tracer only uses load_gemma_scope_transcoder when the config's repo_id contains
    "gemma-scope" AND the config has `transcoders` AND the path ends in .npz.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = _gen(seed)
    files, cfgs, params, rels = {}, {}, {}, []
    for l in range(n_layers):
        p = _layer_params(g, d_model, n_features, jumprelu=True)
        l0 = GEMMASCOPE_L0S[l] if l < len(GEMMASCOPE_L0S) else 50
        rel = f"layer_{l}/width_{_width_label(n_features)}/average_l0_{l0}/params.npz"
        _save_npz(
            directory,
            rel,
            {
                "W_enc": p["W_enc"].T.contiguous(),
                "W_dec": p["W_dec"],
                "b_enc": p["b_enc"],
                "b_dec": p["b_dec"],
                "threshold": p["threshold"],
            },
            files,
        )
        rels.append(rel)
        params[l] = _canon(p, "float32")
    meta = {
        "model_name": model_name,
        "model_kind": "transcoder_set",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "activation": "jumprelu",
        "skip": False,
        "hf_ref": "mwhanna/gemma-scope-transcoders",
        "weights_repo": GEMMASCOPE_REPO,
        "paths": paths,
        "dtype": "float32",
    }
    if write_config:
        _write_text(
            directory,
            config_name,
            _yaml(
                [
                    ("model_name", model_name),
                    ("model_kind", "transcoder_set"),
                    ("feature_input_hook", "ln2.hook_normalized"),
                    ("feature_output_hook", "hook_mlp_out"),
                    ("transcoders", _paths_for(paths, directory, rels, GEMMASCOPE_REPO)),
                ],
                header="Transcoder Configuration Gemma Scope Transcoders (lowest L0)",
            ),
            cfgs,
        )
    return _result("gemmascope_npz", "plt", files, cfgs, range(n_layers), meta, params)


# ----------------------------------------------------------------------------- circuit-tracer cache


def write_ct_cache(
    directory, n_layers, d_model, n_features, seed, *, source="gemmascope", hf_ref=None, dtype="float32"
):
    """What circuit_tracer.utils.caching.save_transcoders_to_cache(hf_ref, cache_dir) leaves in
    `<cache_dir>/<hf_ref>/` (write it with directory = cache_dir/hf_ref). source:

      "gemmascope"   -> mwhanna/gemma-scope-transcoders converted via load_gemma_scope_transcoder
      "gemmascope2"  -> a GemmaScope-2 PLT set (with affine skip) via load_gemma_scope_2_transcoder
      "gemmascope2_clt" -> a GemmaScope-2 CLT via load_gemma_scope_2_clt + CLT.to_safetensors

    PLT sources write layer_{i}.safetensors = SingleLayerTranscoder.to_safetensors:
        W_enc [F, d], W_dec [F, d], b_enc [F], b_dec [d], activation_function.threshold [F],
        W_skip [d, d] (x @ W_skip.T) when the source has a skip.
    CLT source writes W_enc_{l}/W_dec_{l}.safetensors (see write_ct_clt; thresholds present).
    config.yaml = yaml.dump(config minus transcoders/repo_id/subfolder): sorted keys, with
        revision: null and scan: <hf_ref>.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    defaults = {
        "gemmascope": (
            "mwhanna/gemma-scope-transcoders",
            "google/gemma-2-2b",
            "transcoder_set",
            "ln2.hook_normalized",
            "hook_mlp_out",
            False,
        ),
        "gemmascope2": (
            "mwhanna/gemma-scope-2-270m-pt/transcoder_all/width_16k_l0_small_affine",
            "google/gemma-3-270m",
            "transcoder_set",
            "mlp.hook_in",
            "hook_mlp_out",
            True,
        ),
        "gemmascope2_clt": (
            "mwhanna/gemma-scope-2-270m-pt/clt/width_262k_l0_medium_affine",
            "google/gemma-3-270m",
            "cross_layer_transcoder",
            "mlp.hook_in",
            "hook_mlp_out",
            False,
        ),
    }
    ref, model_name, kind, hin, hout, skip = defaults[source]
    hf_ref = hf_ref or ref
    parts = hf_ref.split("/")  # circuit-tracer: scan = repo_id [+ "//" + subfolder]
    scan = "/".join(parts[:2]) + ("//" + "/".join(parts[2:]) if len(parts) > 2 else "")
    files, cfgs, params = {}, {}, {}
    g = _gen(seed)
    if kind == "cross_layer_transcoder":
        w = write_ct_clt(
            directory, n_layers, d_model, n_features, seed, activation="jumprelu", dtype=dtype, write_config=False
        )
        files, params = w["files"], w["params"]
    else:
        for l in range(n_layers):
            p = _layer_params(g, d_model, n_features, jumprelu=True, skip=skip)
            t = {
                "W_enc": _cast(p["W_enc"], dtype),
                "W_dec": _cast(p["W_dec"], dtype),
                "b_enc": _cast(p["b_enc"], dtype),
                "b_dec": _cast(p["b_dec"], dtype),
                "activation_function.threshold": _cast(p["threshold"], dtype),
            }
            if skip:
                t["W_skip"] = _cast(p["W_skip"].T, dtype)
            _save_st(directory, f"layer_{l}.safetensors", t, files)
            params[l] = _canon(p, dtype)
    # yaml.dump(sort_keys=True) of the simplified config
    text = (
        f"feature_input_hook: {hin}\nfeature_output_hook: {hout}\nmodel_kind: {kind}\n"
        f"model_name: {model_name}\nrevision: null\nscan: {scan}\n"
    )
    _write_text(directory, "config.yaml", text, cfgs)
    meta = {
        "model_name": model_name,
        "model_kind": kind,
        "feature_input_hook": hin,
        "feature_output_hook": hout,
        "activation": "jumprelu",
        "skip": skip,
        "hf_ref": hf_ref,
        "scan": scan,
        "dtype": str(dtype),
    }
    return _result(
        f"ct_cache_{source}",
        "clt" if kind == "cross_layer_transcoder" else "plt",
        files,
        cfgs,
        range(n_layers),
        meta,
        params,
    )


# ----------------------------------------------------------------------------- GemmaScope 2


def _gs2_model(model_size: str, variant: str) -> str:
    # the 270m base model is published without the -pt suffix (as SAELens notes)
    if model_size == "270m" and variant == "pt":
        return "google/gemma-3-270m"
    return f"google/gemma-3-{model_size}-{variant}"


def _gs2_tensors(p: dict, w_dec: torch.Tensor, affine: bool, dtype) -> dict:
    """One GemmaScope-2 params file: d-major w_enc, the decoder as given, and the affine skip as
    published ([d_in, d_out], applied as x @ A)."""
    t = {
        "w_enc": _cast(p["W_enc"].T, dtype),
        "w_dec": _cast(w_dec, dtype),
        "b_enc": _cast(p["b_enc"], dtype),
        "b_dec": _cast(p["b_dec"], dtype),
        "threshold": _cast(p["threshold"], dtype),
    }
    if affine:
        t["affine_skip_connection"] = _cast(p["W_skip"], dtype)
    return t


def _gs2_config(directory, cfgs, kind, model, rels, hf_repo, hf_ref, paths, affine, dtype, write_config) -> dict:
    """circuit-tracer's config.yaml for a GemmaScope-2 set or CLT (mlp.hook_in -> hook_mlp_out, a
    `transcoders` list) when `write_config`, and the metadata the writers return."""
    if write_config:
        _write_text(
            directory,
            "config.yaml",
            _yaml(
                [
                    ("model_name", model),
                    ("model_kind", kind),
                    ("feature_input_hook", "mlp.hook_in"),
                    ("feature_output_hook", "hook_mlp_out"),
                    ("transcoders", _paths_for(paths, directory, rels, hf_repo)),
                ]
            ),
            cfgs,
        )
    return {
        "model_name": model,
        "model_kind": kind,
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out",
        "activation": "jumprelu",
        "skip": affine,
        "hf_ref": hf_ref,
        "weights_repo": hf_repo,
        "paths": paths,
        "dtype": str(dtype),
    }


def write_gemmascope2_transcoders(
    directory,
    n_layers,
    d_model,
    n_features,
    seed,
    *,
    affine=True,
    l0="small",
    model_size="270m",
    variant="pt",
    paths="hf",
    write_config=True,
    dtype="float32",
):
    """google/gemma-scope-2-{size}-{pt|it} per-layer transcoders + circuit-tracer config.yaml::

    transcoder_all/layer_{i}_width_{W}_l0_{small|medium|big}[_affine]/params.safetensors
        w_enc [d, F]  (d-major)   w_dec [F, d]   b_enc [F]   b_dec [d]   threshold [F]
        affine_skip_connection [d_in, d_out]  (only *_affine; applied as x @ A, NOT A.T)
    transcoder_all/layer_{i}_.../config.json
        {"width", "model_name", "architecture": "jump_relu", "l0", "affine_connection",
         "hf_hook_point_in": "model.layers.{i}.pre_feedforward_layernorm.output",
         "hf_hook_point_out": "model.layers.{i}.post_feedforward_layernorm.output",
         "type": "transcoder"}
    config.yaml (mwhanna/gemma-scope-2-* style; circuit-tracer needs "gemma-scope-2" in the
        repo id AND a `transcoders` list to pick load_gemma_scope_2_transcoder)
        model_kind: transcoder_set, feature_input_hook: mlp.hook_in,
        feature_output_hook: hook_mlp_out, transcoders: [hf://google/gemma-scope-2-.../params.safetensors]
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = _gen(seed)
    files, cfgs, params, rels = {}, {}, {}, []
    model = _gs2_model(model_size, variant)
    hf_repo = f"google/gemma-scope-2-{model_size}-{variant}"
    suffix = "_affine" if affine else ""
    for l in range(n_layers):
        p = _layer_params(g, d_model, n_features, jumprelu=True, skip=affine)
        folder = f"transcoder_all/layer_{l}_width_{_width_label(n_features)}_l0_{l0}{suffix}"
        t = _gs2_tensors(p, p["W_dec"], affine, dtype)
        _save_st(directory, f"{folder}/params.safetensors", t, files)
        _write_text(
            directory,
            f"{folder}/config.json",
            json.dumps(
                {
                    "width": n_features,
                    "model_name": model,
                    "architecture": "jump_relu",
                    "l0": {"small": 20, "medium": 60, "big": 150}.get(l0, 20),
                    "affine_connection": bool(affine),
                    "hf_hook_point_in": f"model.layers.{l}.pre_feedforward_layernorm.output",
                    "hf_hook_point_out": f"model.layers.{l}.post_feedforward_layernorm.output",
                    "type": "transcoder",
                }
            ),
            cfgs,
        )
        rels.append(f"{folder}/params.safetensors")
        params[l] = _canon(p, dtype)
    hf_ref = (
        f"mwhanna/gemma-scope-2-{model_size}-{variant}/transcoder_all/width_{_width_label(n_features)}_l0_{l0}{suffix}"
    )
    meta = _gs2_config(
        directory, cfgs, "transcoder_set", model, rels, hf_repo, hf_ref, paths, affine, dtype, write_config
    )
    return _result("gemmascope2_plt" + suffix, "plt", files, cfgs, range(n_layers), meta, params)


def write_gemmascope2_clt(
    directory,
    n_layers,
    d_model,
    n_features,
    seed,
    *,
    affine=False,
    l0="medium",
    model_size="270m",
    variant="pt",
    paths="hf",
    lower_fill="zeros",
    write_config=True,
    dtype="float32",
):
    """google/gemma-scope-2-{size}-{pt|it} cross-layer transcoder + circuit-tracer config.yaml::

    clt/width_{W}_l0_{l0}[_affine]/params_layer_{i}.safetensors   (one file per SOURCE layer i)
        w_enc [d, F]     b_enc [F]     threshold [F]     b_dec [d]  (bias of OUTPUT layer i)
        w_dec [F, L, d]  (all L output layers; only [:, i:, :] is used -- lower_fill decides
                          what is written in [:, :i, :]: "zeros" or "random" junk)
        affine_skip_connection [d, d] (only *_affine; x_i @ A_i added to output layer i)
    clt/width_.../config.json
    config.yaml  model_kind: cross_layer_transcoder, hooks mlp.hook_in -> hook_mlp_out,
                 transcoders: [.../params_layer_{i}.safetensors for i in 0..L-1]
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = _gen(seed)
    files, cfgs, params, rels = {}, {}, {}, []
    model = _gs2_model(model_size, variant)
    hf_repo = f"google/gemma-scope-2-{model_size}-{variant}"
    suffix = "_affine" if affine else ""
    folder = f"clt/width_{_width_label(n_features)}_l0_{l0}{suffix}"
    for l in range(n_layers):
        p = _layer_params(g, d_model, n_features, n_out=n_layers - l, jumprelu=True, skip=affine)
        full = torch.zeros(n_features, n_layers, d_model)
        if lower_fill == "random" and l > 0:
            full[:, :l, :] = _randn(g, n_features, l, d_model)
        full[:, l:, :] = p["W_dec"]
        t = _gs2_tensors(p, full, affine, dtype)
        rel = f"{folder}/params_layer_{l}.safetensors"
        _save_st(directory, rel, t, files)
        rels.append(rel)
        params[l] = _canon(p, dtype)
    _write_text(
        directory,
        f"{folder}/config.json",
        json.dumps(
            {
                "width": n_features,
                "model_name": model,
                "architecture": "jump_relu",
                "l0": {"small": 20, "medium": 60, "big": 150}.get(l0, 60),
                "affine_connection": bool(affine),
                "type": "clt",
            }
        ),
        cfgs,
    )
    hf_ref = f"mwhanna/gemma-scope-2-{model_size}-{variant}/{folder}"
    meta = _gs2_config(
        directory, cfgs, "cross_layer_transcoder", model, rels, hf_repo, hf_ref, paths, affine, dtype, write_config
    )
    return _result("gemmascope2_clt" + suffix, "clt", files, cfgs, range(n_layers), meta, params)


# ----------------------------------------------------------------------------- SAELens

_SAELENS_ARCH = {
    ("relu", False): "transcoder",
    ("relu", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
}


def _saelens_one(
    directory: Path,
    rel_folder: str,
    g,
    layer,
    d_model,
    n_features,
    activation,
    skip,
    hook_in,
    hook_out,
    model_name,
    dtype,
    normalize_activations,
    files,
    cfgs,
    thresholds=(0.1, 0.6),
    extra_cfg=None,
):
    jump = activation == "jumprelu"
    p = _layer_params(g, d_model, n_features, jumprelu=jump, skip=skip, thresholds=thresholds)
    t = {
        "W_enc": _cast(p["W_enc"].T, dtype),  # [d_in, d_sae]
        "W_dec": _cast(p["W_dec"], dtype),  # [d_sae, d_out]
        "b_enc": _cast(p["b_enc"], dtype),
        "b_dec": _cast(p["b_dec"], dtype),
    }
    if jump:
        t["threshold"] = _cast(p["threshold"], dtype)
    if skip:
        t["W_skip"] = _cast(p["W_skip"].T, dtype)  # [d_out, d_in]; skip = x @ W_skip.T
    prefix = f"{rel_folder}/" if rel_folder else ""
    _save_st(directory, prefix + "sae_weights.safetensors", t, files)
    cfg = {
        "d_in": d_model,
        "d_sae": n_features,
        "dtype": str(dtype),
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": normalize_activations,
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "sae_lens_training_version": "6.54.12",
            "model_name": model_name,
            "hook_name": hook_in.format(layer=layer),
            "hook_name_out": hook_out.format(layer=layer),
        },
        "d_out": d_model,
        "architecture": _SAELENS_ARCH[(activation, bool(skip))],
    }
    cfg.update(extra_cfg or {})
    _write_text(directory, prefix + "cfg.json", json.dumps(cfg), cfgs)
    return _canon(p, dtype)


def write_saelens_transcoder(
    directory,
    n_layers,
    d_model,
    n_features,
    seed,
    *,
    layer=0,
    activation="jumprelu",
    skip=False,
    hook_in="blocks.{layer}.ln2.hook_normalized",
    hook_out="blocks.{layer}.hook_mlp_out",
    model_name="gemma-2-2b",
    dtype="float32",
    normalize_activations="none",
    thresholds=(0.1, 0.6),
    extra_cfg=None,
):
    """One SAELens 6.x transcoder folder (exactly what SAE.save_model writes)::

        cfg.json                 {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input": false,
                                  "normalize_activations": "none", "reshape_activations": "none",
                                  "metadata": {"sae_lens_version", "sae_lens_training_version",
                                               "model_name", "hook_name", "hook_name_out"},
                                  "d_out", "architecture": transcoder | skip_transcoder |
                                  jumprelu_transcoder | jumprelu_skip_transcoder}
        sae_weights.safetensors  W_enc [d_in, F], W_dec [F, d_out], b_enc [F], b_dec [d_out],
                                 threshold [F] (jumprelu_*), W_skip [d_out, d_in] (skip_*; x @ W_skip.T)

    The layer is only recorded in metadata.hook_name ("blocks.{layer}.<hook>"). n_layers is
    unused (kept for a uniform signature). SAELens JumpReLU is relu(pre) * (pre > threshold);
    equal to circuit-tracer's pre * (pre > threshold) while thresholds are >= 0 (they are here).
    circuit-tracer 0.5.0 has NO SAELens loader.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files, cfgs = {}, {}
    p = _saelens_one(
        directory,
        "",
        _gen(seed),
        layer,
        d_model,
        n_features,
        activation,
        skip,
        hook_in,
        hook_out,
        model_name,
        dtype,
        normalize_activations,
        files,
        cfgs,
        thresholds,
        extra_cfg,
    )
    meta = {
        "model_name": model_name,
        "feature_input_hook": hook_in.format(layer=layer),
        "feature_output_hook": hook_out.format(layer=layer),
        "activation": activation,
        "skip": skip,
        "dtype": str(dtype),
        "normalize_activations": normalize_activations,
        "saelens": True,
    }
    return _result("saelens_single", "plt", files, cfgs, [layer], meta, {layer: p})


def write_saelens_transcoder_set(
    directory,
    n_layers,
    d_model,
    n_features,
    seed,
    *,
    layers=None,
    subdir="blocks.{layer}.ln2.hook_normalized",
    activation="jumprelu",
    skip=False,
    hook_in="blocks.{layer}.ln2.hook_normalized",
    hook_out="blocks.{layer}.hook_mlp_out",
    model_name="gemma-2-2b",
    dtype="float32",
    normalize_activations="none",
    thresholds=(0.1, 0.6),
):
    """A directory of SAELens transcoder folders, one per layer (`layers`=None: every layer
    0..n_layers-1; else the given subset). Each subfolder (name from `subdir`, default the
    input hook name as in many SAELens HF releases) is a write_saelens_transcoder folder.
    There is no index file: a loader must discover subfolders holding cfg.json and take the
    layer from metadata.hook_name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = list(range(n_layers)) if layers is None else sorted(layers)
    g = _gen(seed)
    files, cfgs, params = {}, {}, {}
    for l in layers:
        params[l] = _saelens_one(
            directory,
            subdir.format(layer=l),
            g,
            l,
            d_model,
            n_features,
            activation,
            skip,
            hook_in,
            hook_out,
            model_name,
            dtype,
            normalize_activations,
            files,
            cfgs,
            thresholds,
        )
    meta = {
        "model_name": model_name,
        "feature_input_hook": hook_in.split(".", 2)[-1],
        "feature_output_hook": hook_out.split(".", 2)[-1],
        "activation": activation,
        "skip": skip,
        "dtype": str(dtype),
        "normalize_activations": normalize_activations,
        "subdir": subdir,
        "saelens": True,
    }
    fam = "saelens_all" if len(layers) == n_layers else "saelens_subset"
    return _result(fam, "plt", files, cfgs, layers, meta, params)


# ----------------------------------------------------------------------------- reference semantics


def _act(pre, thr, saelens=False):
    if thr is None:
        return torch.relu(pre)
    return torch.relu(pre) * (pre > thr) if saelens else pre * (pre > thr)


def reference_forward(written: dict, x: torch.Tensor):
    """circuit-tracer semantics on the canonical params (SAELens's JumpReLU for SAELens families).

    x: [L_total, n_pos, d] -- x[l] is the input at layer l (rows for layers without a transcoder
    are ignored). Returns (acts, recon): acts {layer: [n_pos, F]}, recon {layer: [n_pos, d]}.
    PLT: recon[l] = acts[l] @ W_dec + b_dec + x[l] @ W_skip.
    CLT: recon[j] = sum_{l<=j} acts[l] @ W_dec_l[:, j-l] + b_dec_j + x[j] @ W_skip_j.
    """
    x = x.float()
    P = written["params"]
    saelens = written["meta"].get("saelens", False)
    acts = {l: _act(x[l] @ p["W_enc"].T + p["b_enc"], p["threshold"], saelens) for l, p in P.items()}
    recon = {}
    if written["kind"] == "plt":
        for l, p in P.items():
            r = acts[l] @ p["W_dec"] + p["b_dec"]
            if p["W_skip"] is not None:
                r = r + x[l] @ p["W_skip"]
            recon[l] = r
    else:
        L = len(P)
        for j in range(L):
            r = P[j]["b_dec"].expand(x.shape[1], -1).clone()
            for l in range(j + 1):
                r = r + acts[l] @ P[l]["W_dec"][:, j - l, :]
            if P[j]["W_skip"] is not None:
                r = r + x[j] @ P[j]["W_skip"]
            recon[j] = r
    return acts, recon


FAMILIES = {
    "ct_clt_jumprelu": (write_ct_clt, {"activation": "jumprelu"}),
    "ct_clt_relu": (write_ct_clt, {"activation": "relu"}),
    "ct_plt_relu": (write_ct_transcoder_set, {"activation": "relu"}),
    "ct_plt_relu_skip": (write_ct_transcoder_set, {"activation": "relu", "skip": True}),
    "ct_plt_jumprelu": (write_ct_transcoder_set, {"activation": "jumprelu"}),
    "ct_plt_jumprelu_skip_list": (
        write_ct_transcoder_set,
        {"activation": "jumprelu", "skip": True, "transcoders_list": "absolute"},
    ),
    "ct_plt_jumprelu_bare_threshold": (
        write_ct_transcoder_set,
        {"activation": "jumprelu", "threshold_key": "threshold"},
    ),
    "gemmascope_npz": (write_gemmascope_npz, {}),
    "ct_cache_gemmascope": (write_ct_cache, {"source": "gemmascope"}),
    "ct_cache_gemmascope2": (write_ct_cache, {"source": "gemmascope2"}),
    "gemmascope2_plt_affine": (write_gemmascope2_transcoders, {"affine": True}),
    "gemmascope2_plt": (write_gemmascope2_transcoders, {"affine": False}),
    "gemmascope2_clt": (write_gemmascope2_clt, {"affine": False}),
    "gemmascope2_clt_affine": (write_gemmascope2_clt, {"affine": True}),
    "saelens_single": (write_saelens_transcoder, {"layer": 1}),
    "saelens_single_skip": (write_saelens_transcoder, {"layer": 0, "skip": True, "activation": "relu"}),
    "saelens_all": (write_saelens_transcoder_set, {}),
    "saelens_subset": (write_saelens_transcoder_set, {"layers": [0, 2]}),
}


# ----------------------------------------------------------------------------- Hugging Face cache


def hub_cache_repo(cache_dir, repo_id, src, rels=None, revision="main"):
    """Lay files of `src` out in a huggingface_hub cache as model repository `repo_id` at
    `revision`, as the hub client leaves them: blobs/<sha256>, snapshots/<commit>/<path> (a
    relative symlink to its blob) and refs/<revision> holding the commit. Calling again for the
    same repository adds files to the same snapshot. Returns the commit hash."""
    import hashlib

    src = Path(src)
    base = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    if rels is None:
        rels = [str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()]
    for rel in rels:
        data = (src / rel).read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = base / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / revision).write_text(commit)
    return commit


# ----------------------------------------------------------------------------- circuit-tracer as a peer


def _ct_load(job):
    """One of circuit-tracer 0.5.0's own loaders, as the job names it."""
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt, load_gemma_scope_2_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    from circuit_tracer.utils import hf_utils
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    cpu, kind = torch.device("cpu"), job["kind"]
    hooks = {"feature_input_hook": job.get("input_hook"), "feature_output_hook": job.get("output_hook")}
    if kind == "clt":
        return load_clt(job["dir"], device=cpu, dtype=torch.float32)
    if kind == "set":
        paths = {int(k): v for k, v in job["paths"].items()}
        return load_transcoder_set(
            paths, scan="test", device=cpu, dtype=torch.float32, special_load_fn=job.get("special"), **hooks
        )
    if kind == "config":
        return hf_utils.load_transcoders(job["config"], device=cpu, dtype=torch.float32)
    if kind == "cache":
        return load_transcoders_from_cache(job["ref"], cache_dir=job["cache_dir"], device=cpu)[0]
    if kind == "gs2_clt":  # 0.5.0 reads range(max(paths)): one key past the last layer works around it
        paths = dict(enumerate(job["paths"]))
        paths[len(paths)] = "<never read>"
        return load_gemma_scope_2_clt(paths, device=cpu, dtype=torch.float32, **hooks)
    raise ValueError(f"unknown job kind {kind!r}")


def _ct_run(obj, x):
    """circuit-tracer's activations [L, n, F] and reconstruction [L, n, d] (b_dec and skip included)."""
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    with torch.no_grad():
        if isinstance(obj, CrossLayerTranscoder):
            acts = obj.encode(x.to(obj.dtype))
            return acts.float(), obj.decode(acts, input_acts=x.to(obj.dtype)).float()
        acts = obj.encode(x)
        return acts.float(), obj.decode(acts, x).float()


def ct_peer(spec_path, out_path):
    """Run every job of a JSON spec ({"input": x.safetensors, "jobs": [...]}) through circuit-tracer;
    write <out>.safetensors ({name}.acts, {name}.recon) and <out>.json ({name}: what loaded, or the
    error circuit-tracer raised: a refusal is a result some tests expect)."""
    from safetensors.torch import load_file

    spec = json.loads(Path(spec_path).read_text())
    x = load_file(spec["input"])["x"]
    tensors, report = {}, {}
    for job in spec["jobs"]:
        try:
            obj = _ct_load(job)
            obj = obj[0] if isinstance(obj, tuple) else obj
            acts, recon = _ct_run(obj, x[: obj.n_layers])
        except Exception as e:  # noqa: BLE001 -- recorded as the job's result
            report[job["name"]] = {"ok": False, "error": f"{type(e).__name__}: {e}".replace("\n", " ")[:500]}
            continue
        tensors[job["name"] + ".acts"], tensors[job["name"] + ".recon"] = acts.contiguous(), recon.contiguous()
        report[job["name"]] = {
            "ok": True,
            "skip": bool(obj.skip_connection),
            "n_layers": obj.n_layers,
            "input_hook": obj.feature_input_hook,
            "output_hook": obj.feature_output_hook,
        }
    save_file(tensors, f"{out_path}.safetensors")
    Path(f"{out_path}.json").write_text(json.dumps(report, indent=1))


def ct_attribute(spec_path, out_dir):
    """Run circuit-tracer's own attribution for every job of a JSON spec ({"jobs": [...]}; a job: name,
    model_config (HookedTransformerConfig.to_dict(), dtype as a string), model_weights (safetensors
    of the state dict), transcoder (a `_ct_load` job), tokens, targets (vocabulary ids)) on the
    model rebuilt from config and weights with no weight processing. Writes <out>/<name>.safetensors
    (adjacency [target, source]; features [n, 3]: (layer, position, feature) in node order; targets
    [T] vocabulary ids) and <out>/report.json ({name}: ok, or the error circuit-tracer raised)."""
    from circuit_tracer import attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformerConfig

    spec, out, report = json.loads(Path(spec_path).read_text()), Path(out_dir), {}
    for job in spec["jobs"]:
        try:
            fields = dict(job["model_config"], dtype=_DTYPES[job["model_config"]["dtype"]], device="cpu")
            transcoders = _ct_load(job["transcoder"])
            transcoders = transcoders[0] if isinstance(transcoders, tuple) else transcoders
            model = TransformerLensReplacementModel.from_config(HookedTransformerConfig(**fields), transcoders)
            # circuit-tracer wraps the MLPs and the unembedding: map the state dict onto its names
            state = load_file(job["model_weights"])
            names = {k: k.replace(".old_mlp", "").replace("old_unembed.", "") for k in model.state_dict()}
            model.load_state_dict({k: state[v] for k, v in names.items() if v in state}, strict=False)
            unused = set(state) - set(names.values())
            assert not unused, f"weights not loaded into circuit-tracer's model: {sorted(unused)[:5]}"
            model.eval()
            graph = attribute(torch.tensor(job["tokens"]), model, attribution_targets=torch.tensor(job["targets"]),
                              max_feature_nodes=None)  # fmt: skip
        except Exception as e:  # noqa: BLE001 -- recorded as the job's result
            report[job["name"]] = {"ok": False, "error": f"{type(e).__name__}: {e}".replace("\n", " ")[:1000]}
            continue
        save_file(
            {
                "adjacency": graph.adjacency_matrix.float().contiguous(),
                "features": graph.active_features[graph.selected_features].long().contiguous(),
                "targets": torch.tensor([t.vocab_idx for t in graph.logit_targets]),
            },
            str(out / f"{job['name']}.safetensors"),
        )
        report[job["name"]] = {"ok": True}
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    import sys

    commands = {"ct-peer": ct_peer, "ct-attribute": ct_attribute}
    if len(sys.argv) != 4 or sys.argv[1] not in commands:
        raise SystemExit("usage: python tests/layouts.py ct-peer SPEC.json OUT_PREFIX | ct-attribute SPEC.json OUT_DIR")
    commands[sys.argv[1]](sys.argv[2], sys.argv[3])
