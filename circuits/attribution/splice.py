"""The spliced model: the transcoder in place of the MLPs (TransformerLens hooks), with the clean
prompt's error terms and frozen attention when given.

The transcoder reads and writes at its own hooks (`CLTConfig.input_hook`, `output_hook`, block l),
each realised with the hook points TransformerLens 3.2.1 has, so the model is never modified:
- `hook_resid_mid`: itself. `hook_mlp_in`: TransformerLens's clone of resid_mid (it fires only with
  `cfg.use_hook_mlp_in`), read at hook_resid_mid: the same numbers.
- `ln2.hook_normalized`: itself, inside the pre-MLP norm: resid_mid centred (LayerNorm) and divided
  by the norm's scale, before its weight and bias (TransformerLens's LayerNorm and RMSNorm alike).
- `mlp.hook_in` (circuit-tracer's, made by wrapping each block's MLP): the MLP's argument, the
  pre-MLP norm's whole output: ln2.hook_normalized times the norm's weight plus its bias, the
  operations the norm itself does next.
- `hook_mlp_out`: itself. `mlp.hook_out` (circuit-tracer's): the MLP's own output, before the norm
  after it (Gemma 2/3): the splice writes hook_mlp_out as that norm (the model's own module, whose
  scale hook is frozen with the others) of the transcoder's output; without a norm after the MLP
  it is hook_mlp_out.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from transformer_lens import HookedTransformer

from circuits.attribution.norms import has_post_norm, norm_weights
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder, check_fits


def _frozen_names(name: str) -> bool:
    return name.endswith(("hook_pattern", "hook_scale"))


def read_point(model: HookedTransformer, hook: str, layer: int) -> tuple[str, Callable]:
    """Where the transcoder input `hook` of `layer` is read: the TransformerLens hook point's
    name and the map from its value [..., pos, d] to the transcoder's input [..., pos, d]."""
    if hook == "mlp.hook_in":
        ln2 = model.blocks[layer].ln2
        return f"blocks.{layer}.ln2.hook_normalized", lambda x: norm_weights(ln2, x.to(ln2.cfg.dtype))
    name = "hook_resid_mid" if hook == "hook_mlp_in" else hook
    return f"blocks.{layer}.{name}", lambda x: x


def io_names(model: HookedTransformer, cfg: CLTConfig) -> set[str]:
    """The hook points to cache for `transcoder_inputs` and `transcoder_outputs`."""
    names = {read_point(model, cfg.input_hook, l)[0] for l in range(cfg.n_layers)}
    if has_post_norm(model, cfg.output_hook):
        return names | {read_point(model, "mlp.hook_in", l)[0] for l in range(cfg.n_layers)}
    return names | {f"blocks.{l}.hook_mlp_out" for l in range(cfg.n_layers)}


def transcoder_inputs(model: HookedTransformer, cfg: CLTConfig, cache) -> torch.Tensor:
    """The transcoder's inputs from a cache of `io_names`: [..., pos, L, d]."""
    reads = [read_point(model, cfg.input_hook, l) for l in range(cfg.n_layers)]
    return torch.stack([f(cache[name]) for name, f in reads], -2)


def transcoder_outputs(model: HookedTransformer, cfg: CLTConfig, cache) -> torch.Tensor:
    """What the transcoder should write, from a cache of `io_names`: [..., pos, L, d]. The MLP's own
    output (mlp.hook_out before a norm) is the model's MLP run again on its cached argument."""
    L = cfg.n_layers
    if not has_post_norm(model, cfg.output_hook):
        return torch.stack([cache[f"blocks.{l}.hook_mlp_out"] for l in range(L)], -2)
    reads = [read_point(model, "mlp.hook_in", l) for l in range(L)]
    return torch.stack([model.blocks[l].mlp(f(cache[name])) for l, (name, f) in enumerate(reads)], -2)


@torch.no_grad()
def clean_state(model: HookedTransformer, clt: CrossLayerTranscoder, tokens: torch.Tensor) -> dict:
    """What splicing needs from the clean run on tokens [P]: the frozen patterns and scales, and
    the error terms at the transcoder's output hook [L, P, d]."""
    check_fits(clt.cfg, model)
    names = io_names(model, clt.cfg)
    _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: _frozen_names(n) or n in names)
    x = transcoder_inputs(model, clt.cfg, cache)[0]  # [P, L, d]
    recon, _ = clt(x)
    errors = transcoder_outputs(model, clt.cfg, cache)[0] - recon
    frozen = {k: v for k, v in cache.items() if _frozen_names(k)}
    return {"frozen": frozen, "errors": errors.transpose(0, 1)}


def splice_hooks(
    model, clt, state: dict | None = None, edit=None, freeze_attention: bool = True, error_leaves=None
) -> list:
    """Hooks for the spliced model: features read at the transcoder's input hook, `edit(layer,
    acts [.., P, F])` may change them, its output hook gets their decoding + skip + the clean error
    term. Without `state` (a `clean_state`): no error term and nothing frozen, i.e. the
    replacement model."""
    check_fits(clt.cfg, model)
    acts: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}
    errors = error_leaves if error_leaves is not None else state["errors"] if state else [0.0] * model.cfg.n_layers

    def read(x, hook, l, to_input):
        inputs[l] = to_input(x)
        a = clt.encode_layer(inputs[l], l)
        acts[l] = a if edit is None else edit(l, a)

    def write(out, hook, l, to_mlp_out):
        recon = clt.b_dec[l] + sum(acts[s] @ clt.decoder(s, l) for s in clt.sources(l))
        if clt.W_skip is not None:
            recon = recon + inputs[l] @ clt.W_skip[l]
        return to_mlp_out(recon + errors[l])

    hooks = []
    for l in range(model.cfg.n_layers):
        name, to_input = read_point(model, clt.cfg.input_hook, l)
        post = model.blocks[l].ln2_post if has_post_norm(model, clt.cfg.output_hook) else (lambda y: y)
        hooks.append((name, partial(read, l=l, to_input=to_input)))
        hooks.append((f"blocks.{l}.hook_mlp_out", partial(write, l=l, to_mlp_out=post)))
    if freeze_attention and state:
        for name, value in state["frozen"].items():
            hooks.append((name, lambda x, hook, v=value: v))
    return hooks
