"""Published transcoders by short name: circuit-tracer's presets ('gemma', 'llama') and the
cross-layer transcoders its README lists, each the hub repository circuit-tracer loads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    repo: str
    """The hub reference (ORG/REPO[/FOLDER]) circuit-tracer resolves the name to."""
    model: str
    """The model it was trained on (TransformerLens / Hugging Face name)."""
    what: str


PRESETS = {
    "gemma": Preset("mwhanna/gemma-scope-transcoders", "google/gemma-2-2b",
                    "GemmaScope per-layer transcoders, width 16k, lowest L0 (ln2.hook_normalized -> hook_mlp_out)"),
    "llama": Preset("mntss/transcoder-Llama-3.2-1B", "meta-llama/Llama-3.2-1B", "per-layer transcoders"),
    "clt-gemma-2-2b-426k": Preset("mntss/clt-gemma-2-2b-426k", "google/gemma-2-2b", "CLT, 426k features"),
    "clt-gemma-2-2b-2.5M": Preset("mntss/clt-gemma-2-2b-2.5M", "google/gemma-2-2b", "CLT, 2.5M features"),
    "clt-llama-3.2-1b-524k": Preset("mntss/clt-llama-3.2-1b-524k", "meta-llama/Llama-3.2-1B", "CLT, 524k features"),
    "clt-131k": Preset("mntss/clt-131k", "openai/gpt-oss-20b", "CLT, 131k features"),
}  # fmt: skip


def hub_ref(name: str) -> str | None:
    """The hub reference of a preset name, or None when `name` is not one."""
    preset = PRESETS.get(name)
    return preset.repo if preset else None
