"""Activation patching: which (layer, position) of the clean run restores its answer in a corrupted run.

The corrupted run reads a counterfactual prompt of the same token length (Dallas -> Chicago). A patch
copies clean activations into it at one hook, layer, position (and head); the metric is the recovered
fraction of the logit difference, (patched - corrupt) / (clean - corrupt): 0 = no effect, 1 = all of it.
Many patches share one forward pass: the batch dimension holds different patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from circuits.errors import CircuitsError
from circuits.models import prompt_tokens

# Where each kind of patch reads and writes; "head" patches one head's output (hook_z) at a time.
HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "head": "blocks.{layer}.attn.hook_z",
}


@dataclass(frozen=True)
class Patch:
    """Copy the clean activation of `kind` at `layer` into the corrupted run at `positions` (and `head`)."""

    kind: str
    layer: int
    positions: tuple[int, ...]
    head: int | None = None


@dataclass
class PatchingResult:
    """Recovered logit-difference fraction per kind: [L, pos], heads [L, n_heads, pos]."""

    clean_prompt: str
    corrupt_prompt: str
    answer: str  # the clean run's top token
    foil: str  # the corrupted run's top token
    clean_diff: float  # logit(answer) - logit(foil) in the clean run
    corrupt_diff: float
    grids: dict[str, torch.Tensor]


def logit_diffs(logits: torch.Tensor, answer: int, foil: int) -> torch.Tensor:
    """logit(answer) - logit(foil) at the last position: [batch]."""
    return logits[:, -1, answer] - logits[:, -1, foil]


@torch.no_grad()
def run_patches(
    model: HookedTransformer,
    clean_cache: dict[str, torch.Tensor],
    corrupt_tokens: torch.Tensor,
    patches: list[Patch],
    answer: int,
    foil: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """Logit difference [n_patches] of the corrupted run under each patch; `batch_size` patches per pass."""
    out = []
    for start in tqdm(range(0, len(patches), batch_size), desc="patching", unit="batch", leave=False):
        chunk = patches[start : start + batch_size]
        hooks = [(name, _patch_hook(clean_cache[name], rows)) for name, rows in _group_by_hook(chunk).items()]
        logits = model.run_with_hooks(corrupt_tokens.expand(len(chunk), -1), fwd_hooks=hooks)
        out.append(logit_diffs(logits, answer, foil))
    return torch.cat(out) if out else torch.zeros(0)


def _group_by_hook(chunk: list[Patch]) -> dict[str, list[tuple[int, Patch]]]:
    by_hook: dict[str, list[tuple[int, Patch]]] = {}
    for row, patch in enumerate(chunk):
        by_hook.setdefault(HOOKS[patch.kind].format(layer=patch.layer), []).append((row, patch))
    return by_hook


def _patch_hook(clean: torch.Tensor, rows: list[tuple[int, Patch]]):
    """A hook writing clean[0, positions(, head)] into the given batch rows of the activation."""

    def hook(act: torch.Tensor, hook) -> torch.Tensor:  # act [batch, pos, ...]
        act = act.clone()
        for row, patch in rows:
            pos = list(patch.positions)
            if patch.head is None:
                act[row, pos] = clean[0, pos]
            else:
                act[row, pos, patch.head] = clean[0, pos, patch.head]
        return act

    return hook


def grid_patches(kind: str, n_layers: int, n_pos: int, n_heads: int) -> list[Patch]:
    """One patch per (layer, position), or per (layer, head, position) for heads, in grid order."""
    if kind == "head":
        return [Patch(kind, l, (p,), h) for l in range(n_layers) for h in range(n_heads) for p in range(n_pos)]
    return [Patch(kind, l, (p,)) for l in range(n_layers) for p in range(n_pos)]


@torch.no_grad()
def patching_grid(
    model: HookedTransformer,
    clean_prompt: str,
    corrupt_prompt: str,
    kinds: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "head"),
    batch_size: int = 64,
) -> PatchingResult:
    """Patch every (layer, position) of each kind; answer = clean top token, foil = corrupted top token."""
    clean, corrupt = prompt_tokens(model, clean_prompt), prompt_tokens(model, corrupt_prompt)
    if clean.shape != corrupt.shape:
        raise CircuitsError(
            f"the counterfactual has {corrupt.shape[1]} tokens but the prompt has {clean.shape[1]}: "
            "swap a word for one of the same token length"
        )
    unknown = [k for k in kinds if k not in HOOKS]
    if unknown:
        raise CircuitsError(f"unknown patch kinds {unknown}: use {', '.join(HOOKS)}")
    L, n_pos, H = model.cfg.n_layers, clean.shape[1], model.cfg.n_heads
    names = {hook.format(layer=l) for hook in HOOKS.values() for l in range(L)}
    clean_logits, cache = model.run_with_cache(clean, names_filter=lambda name: name in names)
    corrupt_logits = model(corrupt)
    answer, foil = int(clean_logits[0, -1].argmax()), int(corrupt_logits[0, -1].argmax())
    if answer == foil:
        raise CircuitsError(
            f"the counterfactual predicts the same token {model.to_single_str_token(answer)!r}: "
            "pick one whose answer differs"
        )
    clean_diff = float(logit_diffs(clean_logits, answer, foil))
    corrupt_diff = float(logit_diffs(corrupt_logits, answer, foil))
    grids = {}
    for kind in kinds:
        diffs = run_patches(model, cache, corrupt, grid_patches(kind, L, n_pos, H), answer, foil, batch_size)
        shape = (L, H, n_pos) if kind == "head" else (L, n_pos)
        grids[kind] = ((diffs - corrupt_diff) / (clean_diff - corrupt_diff)).reshape(shape)
    return PatchingResult(
        clean_prompt=clean_prompt,
        corrupt_prompt=corrupt_prompt,
        answer=model.to_single_str_token(answer),
        foil=model.to_single_str_token(foil),
        clean_diff=clean_diff,
        corrupt_diff=corrupt_diff,
        grids=grids,
    )
