"""The autograd reference for edges: TransformerLens hooks, one backward pass per target."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer

from circuits.attribution.norms import norm_weights
from circuits.attribution.splice import clean_state, read_point, splice_hooks
from circuits.transcoders.clt import CrossLayerTranscoder


def autograd_rows(
    model: HookedTransformer, clt: CrossLayerTranscoder, tokens: torch.Tensor, targets: list, extra_hooks=()
) -> torch.Tensor:
    """The reference for edges: rows [n_targets, n_sources] (sources laid out as in attribution:
    active features, errors [L, P], tokens [P]) by autograd through the spliced model with attention
    patterns and norm scales frozen, one backward pass per target, the transcoder reading and
    writing at its own hooks. A target is (layer, pos, feature) for a feature's pre-activation, or a
    vector [d_vocab] of logit weights. `extra_hooks`: more (name, hook) pairs for the run, e.g. to
    detach a head's output."""
    L = model.cfg.n_layers
    state = clean_state(model, clt, tokens)
    reads = [read_point(model, clt.cfg.input_hook, l) for l in range(L)]  # the transcoder's input hook
    with torch.no_grad():
        names = {name for name, _ in reads} | {"hook_embed"}
        _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)
        clean = torch.stack([clt.encode_layer(f(cache[name][0]), l) for l, (name, f) in enumerate(reads)])
    features = clean.nonzero()  # [n, 3] (layer, pos, feature)
    leaves = clean.clone().requires_grad_(True)  # [L, P, F]
    errors = state["errors"].clone().requires_grad_(True)  # [L, P, d]
    embed = cache["hook_embed"].clone().requires_grad_(True)  # [1, P, d]
    inputs: dict[int | str, torch.Tensor] = {}
    hooks = splice_hooks(model, clt, state, lambda l, a: leaves[l][None], True, errors)
    hooks += [("hook_embed", lambda x, hook: embed)]
    hooks += [(name, lambda x, hook, l=l, f=f: inputs.update({l: f(x)[0]})) for l, (name, f) in enumerate(reads)]
    hooks += [("ln_final.hook_normalized", lambda x, hook: inputs.update({"final": x[0, -1]}))]
    hooks += list(extra_hooks)
    model.run_with_hooks(tokens[None], fwd_hooks=hooks)
    # the logits before any output soft cap: the graph's logit targets
    logits = norm_weights(model.ln_final, inputs["final"]) @ model.W_U + model.b_U
    rows = []
    for target in targets:
        if isinstance(target, tuple):
            l, p, f = target
            value = inputs[l][p] @ clt.W_enc[l, f] + clt.b_enc[l, f]
        else:
            value = logits @ target
        grads = torch.autograd.grad(value, [leaves, errors, embed], retain_graph=True, materialize_grads=True)
        with torch.no_grad():
            edges = [(grads[0] * clean)[tuple(features.T)], (grads[1] * errors).sum(-1).flatten()]
            rows.append(torch.cat([*edges, (grads[2][0] * embed[0]).sum(-1)]))
    return torch.stack(rows)


def rows_against_autograd(graph, model: HookedTransformer, clt: CrossLayerTranscoder, rows: list[int]):
    """Our adjacency rows of the feature nodes `rows` and of the first logit target, and the same rows
    by `autograd_rows`: (ours, reference), each [len(rows) + 1, n_sources]."""
    V = model.cfg.d_vocab
    targets = [tuple(graph.features[i].tolist()) for i in rows] + [torch.eye(V)[graph.target_tokens[0]] - 1 / V]
    reference = autograd_rows(model, clt, graph.tokens, targets)
    return graph.adjacency[rows + [graph.target_slice.start], : reference.shape[1]], reference
