"""The spliced model: the transcoder in place of the MLPs (TransformerLens hooks), with the clean
prompt's error terms and frozen attention when given."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer

from circuits.transcoders.clt import CrossLayerTranscoder


def _frozen_names(name: str) -> bool:
    return name.endswith(("hook_pattern", "hook_scale"))


@torch.no_grad()
def clean_state(model: HookedTransformer, clt: CrossLayerTranscoder, tokens: torch.Tensor) -> dict:
    """What splicing needs from the clean run on tokens [P]: the frozen patterns and scales, and
    the error terms [L, P, d]."""
    L = model.cfg.n_layers
    _, cache = model.run_with_cache(
        tokens[None], names_filter=lambda n: _frozen_names(n) or n.endswith(("hook_resid_mid", "hook_mlp_out"))
    )
    x = torch.stack([cache[f"blocks.{l}.hook_resid_mid"][0] for l in range(L)], 1)  # [P, L, d]
    recon, _ = clt(x)
    errors = torch.stack([cache[f"blocks.{l}.hook_mlp_out"][0] for l in range(L)], 1) - recon
    frozen = {k: v for k, v in cache.items() if _frozen_names(k)}
    return {"frozen": frozen, "errors": errors.transpose(0, 1)}


def splice_hooks(
    model, clt, state: dict | None = None, edit=None, freeze_attention: bool = True, error_leaves=None
) -> list:
    """Hooks for the spliced model: features read from resid_mid, `edit(layer, acts [.., P, F])`
    may change them, the MLP output is their decoding + skip + the clean error term. Without
    `state` (a `clean_state`): no error term and nothing frozen, i.e. the replacement model."""
    acts: dict[int, torch.Tensor] = {}
    mids: dict[int, torch.Tensor] = {}
    errors = error_leaves if error_leaves is not None else state["errors"] if state else [0.0] * model.cfg.n_layers

    def read(x, hook, l):
        mids[l] = x
        a = clt.encode_layer(x, l)
        acts[l] = a if edit is None else edit(l, a)

    def write(out, hook, l):
        recon = clt.b_dec[l] + sum(acts[s] @ clt.decoder(s, l) for s in clt.sources(l))
        if clt.W_skip is not None:
            recon = recon + mids[l] @ clt.W_skip[l]
        return recon + errors[l]

    hooks = []
    for l in range(model.cfg.n_layers):
        hooks.append((f"blocks.{l}.hook_resid_mid", lambda x, hook, l=l: read(x, hook, l)))
        hooks.append((f"blocks.{l}.hook_mlp_out", lambda o, hook, l=l: write(o, hook, l)))
    if freeze_attention and state:
        for name, value in state["frozen"].items():
            hooks.append((name, lambda x, hook, v=value: v))
    return hooks
