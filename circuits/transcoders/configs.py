"""The two config files beside transcoder weights: circuit-tracer's config.yaml (what its loaders
read: model_kind and the hooks) and our config.json (the CLTConfig)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from circuits.errors import CircuitsError
from circuits.fileio import atomic_file

if TYPE_CHECKING:
    from circuits.transcoders.clt import CLTConfig

CT_KINDS = ("cross_layer_transcoder", "transcoder_set")


def ct_model_kind(cfg: CLTConfig) -> str:
    """circuit-tracer's model_kind when circuit-tracer 0.5.0 computes this transcoder exactly;
    otherwise a kind of ours, which its config-reading loaders refuse ('Unknown model kind')."""
    kind = CT_KINDS[0] if cfg.cross_layer else CT_KINDS[1]
    if cfg.activation == "topk":
        return kind + "_topk"  # circuit-tracer has no TopK loader: it would read ReLU
    if cfg.cross_layer and cfg.skip:
        return kind + "_with_skip"  # circuit-tracer 0.5.0's load_clt never reads W_skip
    return kind


def known_kind(kind: str) -> bool:
    return kind in CT_KINDS or any(kind == k + s for k in CT_KINDS for s in ("_topk", "_with_skip"))


def write_configs(directory: Path, cfg: CLTConfig) -> None:
    """config.yaml (circuit-tracer) and config.json (ours) into `directory`, atomically."""
    kind = ct_model_kind(cfg)
    lines = []
    if kind not in CT_KINDS:
        lines.append("# circuit-tracer 0.5.0 cannot compute this transcoder exactly (a skip CLT or TopK), so")
        lines.append("# model_kind is not one of its kinds and its config-reading loaders refuse it.")
    lines += [
        f"model_kind: {kind}",
        f"model_name: {json.dumps(cfg.model_name)}",
        f"feature_input_hook: {cfg.input_hook}",  # hook names are plain YAML scalars (letters, digits, _ and .)
        f"feature_output_hook: {cfg.output_hook}",
        "scan: null",
    ]
    with atomic_file(directory / "config.yaml") as f:
        f.write("\n".join(lines) + "\n")
    with atomic_file(directory / "config.json") as f:
        json.dump(cfg.to_dict(), f, indent=2)


def read_config_json(directory: Path) -> dict | None:
    """Our CLTConfig fields from config.json (CLTConfig.from_dict checks them), or None without one."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CircuitsError(f"{path} is not valid JSON ({e}): re-write it") from None
    if not isinstance(config, dict):
        raise CircuitsError(f"{path} is not a JSON object of CLTConfig fields: re-write it")
    return config


def read_yaml(path: Path) -> dict:
    """A YAML mapping (circuit-tracer's config.yaml), parsed safely."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        reason = str(e).splitlines()[0]
        raise CircuitsError(f"{path} is corrupt or truncated ({reason}): re-download or re-write it") from None
    if not isinstance(data, dict):
        raise CircuitsError(f"{path} is not a YAML mapping: expected model_kind, feature_input_hook, ...")
    return data


def read_ct_config(directory: Path) -> dict:
    """circuit-tracer's config.yaml as a dict ({} without one); refuses a model_kind we do not know."""
    path = Path(directory) / "config.yaml"
    if not path.is_file():
        return {}
    config = read_yaml(path)
    kind = config.get("model_kind")
    if kind is not None and not known_kind(str(kind)):
        raise CircuitsError(f"{path} declares model_kind {kind!r}: expected cross_layer_transcoder or transcoder_set")
    return config


def hooks(config: dict, ours: dict | None, default: tuple[str, str] | None, where: Path) -> tuple[str, str]:
    """(input hook, output hook) as config.yaml declares them, else as our config.json does, else
    `default` (circuit-tracer's load_clt defaults); refuses when none says."""
    if "feature_input_hook" in config and "feature_output_hook" in config:
        return str(config["feature_input_hook"]), str(config["feature_output_hook"])
    if ours is not None:
        return ours.get("input_hook", "hook_resid_mid"), ours.get("output_hook", "hook_mlp_out")
    if default is None:
        raise CircuitsError(
            f"{where} declares no hooks: add config.yaml with feature_input_hook and feature_output_hook"
        )
    return default
