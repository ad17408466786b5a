"""Head loadings: each edge s -> t of an attribution graph split, for every attention layer l on its
way, into one part per head of l and the part that does not pass through l's attention.

With patterns and norm scales frozen the map from a source's writes to a target's input is linear,
and attention layer l enters it as one factor (I + sum_h A_{l,h}); expanding that factor splits the
edge exactly. For a batch of targets and a batch of sources:
- backward (one walk down per batch of targets, the frozen attention backward of `Replacement` kept
  per head): g_mid[l] = d input_t / d resid_mid[l] [P, d], g_out[l] = d input_t / d (the transcoder's
  output of layer l) [P, d], and per_head[l, h] = what g_mid[l] sends back to resid_pre[l] through
  head h [P, d];
- forward (one sweep up per batch of sources, no biases): F[l] = what s puts into resid_pre[l] [P, d].
Head h's part at layer l is <per_head[l, h], F[l]>; the rest is <g_mid[l], F[l]> (past l's attention
on the residual stream) plus <g_out[l'], write[l']> for the writes s makes at layers l' >= l (they
enter after l's attention). The parts of every layer sum to the edge; tests check that against the
graph's own edges and each head's part against autograd with that head's output detached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from circuits.attribution.graph import Graph
from circuits.attribution.replacement import Replacement, build_replacement
from circuits.attribution.targets import resolve_targets
from circuits.errors import CircuitsError
from circuits.transcoders.clt import CrossLayerTranscoder


@dataclass
class HeadLoadings:
    """The head loadings of E edges of a graph with L attention layers of H heads."""

    edges: torch.Tensor  # [E, 2] long: (target, source) node indices of the graph
    heads: torch.Tensor  # [E, L, H] each head's part of each edge at each attention layer
    other: torch.Tensor  # [E, L] the part that does not pass through the layer's attention
    on_way: torch.Tensor  # [E, L] bool: the attention layers between the source's writes and the target

    def field(self, e: int) -> dict[str, dict[str, float]]:
        """The graph JSON's `heads` field of edge e: {layer: {head: part, ..., "other": part}} for
        each attention layer on its way; the values of each layer sum to the edge's weight."""
        out = {}
        for l in self.on_way[e].nonzero()[:, 0].tolist():
            parts = {str(h): w for h, w in enumerate(self.heads[e, l].tolist())}
            out[str(l)] = {**parts, "other": self.other[e, l].item()}
        return out


@torch.no_grad()
def head_loadings(
    graph: Graph,
    model: HookedTransformer,
    transcoder: CrossLayerTranscoder,
    edges: torch.Tensor | None = None,
    work_floats: int = 2**24,
) -> HeadLoadings:
    """The head loadings of `edges` [E, 2] ((target, source) node indices of `graph`; default: the
    edges `graph.prune()` keeps), in the graph's dtype, from the model and transcoder it was
    attributed with. `work_floats` bounds the gradients and forward values held at once."""
    if edges is None:
        result = graph.prune()
        edges = (result.edge_mask & (graph.adjacency != 0)).nonzero()
    edges = torch.as_tensor(edges, dtype=torch.long).reshape(-1, 2)
    if ((edges[:, 0] >= graph.error_slice.start) & (edges[:, 0] < graph.target_slice.start)).any():
        raise CircuitsError("an edge target is an error or embedding node (no inputs): pass (target, source) pairs")
    dtype = getattr(torch, graph.config.get("attribution", {}).get("dtype", "float32"))
    rep = build_replacement(model, transcoder, graph.tokens.to(model.W_U.device), dtype)
    targets, sources = _Targets(graph, rep, model), _Sources(graph, rep)
    heads, other = _fill(rep, edges, targets, sources, work_floats)
    return HeadLoadings(edges, heads.cpu(), other.cpu(), _on_way(edges, targets, sources, rep.n_layers).cpu())


def _fill(rep: Replacement, edges: torch.Tensor, targets: _Targets, sources: _Sources, work_floats: int):
    """The parts of edges [E, 2]: (heads [E, L, H], other [E, L]). Targets of one layer at a time, a
    batch of them per backward walk, and for each batch its sources a batch per forward sweep."""
    L, H, P, d = rep.n_layers, rep.W_O.shape[1], rep.n_pos, rep.embed.shape[-1]
    heads, other = rep.embed.new_zeros(len(edges), L, H), rep.embed.new_zeros(len(edges), L)
    per_target = max(1, work_floats // (L * (H + 2) * P * d))
    per_source = max(1, work_floats // (L * P * d))
    layer_of_edge = targets.layer[edges[:, 0]]
    for t_layer in layer_of_edge.unique().tolist():
        at_layer = (layer_of_edge == t_layer).nonzero()[:, 0]
        nodes = edges[at_layer, 0].unique()
        for a in range(0, len(nodes), per_target):
            chunk = nodes[a : a + per_target]
            grads = _backward(rep, t_layer, targets.pos[chunk], targets.vectors(chunk))
            mine = at_layer[torch.isin(edges[at_layer, 0], chunk)]
            srcs = edges[mine, 1].unique()
            for b in range(0, len(srcs), per_source):
                s_chunk = srcs[b : b + per_source]
                here = mine[torch.isin(edges[mine, 1], s_chunk)]
                local = torch.stack(
                    [here, torch.searchsorted(chunk, edges[here, 0]), torch.searchsorted(s_chunk, edges[here, 1])], 1
                )
                embed, writes, pos = sources.injections(s_chunk)
                F = _forward(rep, embed, writes, pos)
                _contract(local.to(heads.device), grads, (F, writes, pos), (heads, other), work_floats)
    return heads, other


class _Targets:
    """The graph's target nodes (features, logits) as gradients: their layer, position and vector at
    resid_mid of their layer (the final residual stream for logits, layer L)."""

    def __init__(self, graph: Graph, rep: Replacement, model: HookedTransformer):
        n, L, N = graph.n_features, rep.n_layers, len(graph.adjacency)
        self.rep, self.graph, self.model = rep, graph, model
        self.layer = torch.full((N,), -1, dtype=torch.long)
        self.pos = torch.full((N,), -1, dtype=torch.long)
        self.layer[:n], self.pos[:n] = graph.features[:, 0], graph.features[:, 1]
        self.layer[graph.target_slice], self.pos[graph.target_slice] = L, rep.n_pos - 1
        weights = torch.stack([t.weights for t in self._logit_targets()])  # [T, d_vocab]
        directions = weights @ model.W_U.detach().to(weights.dtype).T  # [T, d] at the final norm's output
        last = torch.full((len(directions),), rep.n_pos - 1, device=directions.device)
        self._logits = rep.ln_final.backward_at(directions, last)

    def _logit_targets(self):
        """The graph's logit targets, resolved again as `attribute` resolved them."""
        cfg, rep, cap = self.graph.config.get("attribution", {}), self.rep, self.model.cfg.output_logits_soft_cap
        logits = rep.logits if cap <= 0 else cap * torch.tanh(rep.logits / cap)
        found = resolve_targets(
            self.model, logits, cfg.get("targets", []), cfg.get("target_probability", 0.95), cfg.get("max_targets", 10)
        )
        if [t.token for t in found] != self.graph.target_tokens.tolist():
            raise CircuitsError("the graph's logit targets are not this model's: pass the model it was attributed with")
        return found

    def vectors(self, nodes: torch.Tensor) -> torch.Tensor:
        """The gradients [k, d] of the target nodes `nodes` [k] (one layer) at resid_mid of their layer."""
        graph, rep = self.graph, self.rep
        if nodes[0] >= graph.target_slice.start:
            return self._logits[nodes - graph.target_slice.start]
        layer, pos, feature = graph.features[nodes].T
        l = int(layer[0])
        return rep.encoder_vectors(l, pos, rep.clt.W_enc[l, feature].detach())


class _Sources:
    """The graph's source nodes as what they inject: a feature's decoder rows times its activation
    into the transcoder's output of its layer and later ones, an error node's vector into its layer's,
    a token's embedding into resid_pre[0]; each at its own position."""

    def __init__(self, graph: Graph, rep: Replacement):
        self.graph, self.rep = graph, rep
        n, L, P = graph.n_features, rep.n_layers, rep.n_pos
        N = len(graph.adjacency)
        self.first = torch.full((N,), L, dtype=torch.long)  # the first attention layer the source passes
        self.pos = torch.zeros(N, dtype=torch.long)
        self.first[:n], self.pos[:n] = graph.features[:, 0] + 1, graph.features[:, 1]
        errors = torch.arange(L * P)
        self.first[graph.error_slice], self.pos[graph.error_slice] = errors // P + 1, errors % P
        self.first[graph.token_slice], self.pos[graph.token_slice] = 0, torch.arange(P)

    def injections(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For source nodes `nodes` [S]: (embeddings at resid_pre[0] [S, d], writes into the
        transcoder's output of each layer [S, L, d], positions [S])."""
        graph, rep = self.graph, self.rep
        L, d, n = rep.n_layers, rep.embed.shape[-1], graph.n_features
        embed = rep.embed.new_zeros(len(nodes), d)
        writes = rep.embed.new_zeros(len(nodes), L, d)
        pos = self.pos[nodes].to(rep.embed.device)
        for i, node in enumerate(nodes.tolist()):
            if node < n:
                layer, _, feature = graph.features[node].tolist()
                w_dec = rep.clt.W_dec[layer][feature].detach().to(rep.embed.dtype)  # [T, d]
                writes[i, layer : layer + len(w_dec)] = w_dec * graph.activations[node].item()
            elif node < graph.token_slice.start:
                layer = (node - n) // rep.n_pos
                writes[i, layer] = rep.errors[layer, pos[i]]
            else:
                embed[i] = rep.embed[pos[i]]
        return embed, writes, pos


@dataclass
class _Gradients:
    per_head: torch.Tensor  # [B, L, H, P, d] what g_mid[l] sends back to resid_pre[l] through each head
    mid: torch.Tensor  # [B, L, P, d] at resid_mid[l]
    out: torch.Tensor  # [B, L, P, d] at the transcoder's output of layer l


def head_backward(rep: Replacement, layer: int, g: torch.Tensor) -> torch.Tensor:
    """`Replacement.attention_backward` kept per head: the gradient g [B, P, d] at the attention
    output of `layer` -> what reaches resid_pre through each head [B, H, P, d] (their sum is
    `attention_backward(layer, g)`)."""
    B, P, d = g.shape
    H, dh = rep.W_O.shape[1], rep.W_O.shape[2]
    u = (g @ rep.back_O[layer]).view(B, P, H, dh)
    mixed = torch.einsum("hkq,bqhe->bhke", rep.back_mix[layer, :, :P, :P], u)
    return torch.einsum("bhke,hed->bhkd", mixed, rep.back_V[layer].view(H, dh, d))


def _backward(rep: Replacement, t: int, pos: torch.Tensor, vec: torch.Tensor) -> _Gradients:
    """The gradients of targets at layer t (L: logits) at positions pos [B] with vectors vec [B, d]."""
    B, d = vec.shape
    L, H, P = rep.n_layers, rep.W_O.shape[1], rep.n_pos
    grads = _Gradients(vec.new_zeros(B, L, H, P, d), vec.new_zeros(B, L, P, d), vec.new_zeros(B, L, P, d))
    g = vec.new_zeros(B, P, d)
    g[torch.arange(B), pos.to(vec.device)] = vec
    if t < L:  # the target reads resid_mid[t]: attention t is on the way
        grads.mid[:, t], grads.per_head[:, t] = g, head_backward(rep, t, g)
        g = g + grads.per_head[:, t].sum(1)
    for l in range(t - 1, -1, -1):  # g is at resid_pre[l + 1] = resid_mid[l] + the output of layer l
        grads.out[:, l] = g if rep.mlp_post is None else rep.mlp_post[l].backward(g)
        if rep.clt.W_skip is not None:
            g = g + rep.skip_backward(l, g)
        grads.mid[:, l], grads.per_head[:, l] = g, head_backward(rep, l, g)
        g = g + grads.per_head[:, l].sum(1)
    return grads


def attention_linear(rep: Replacement, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The frozen attention of `layer` without its constant terms (biases, norm offsets): x [S, P, d]
    at resid_pre -> its linear image [S, P, d] at the attention output."""
    xn = rep.ln1[layer].linear(x) / rep.ln1[layer].scale
    v = torch.einsum("spd,hde->shpe", xn, rep.W_V[layer])
    out = torch.einsum("shpe,hed->spd", rep.patterns[layer] @ v, rep.W_O[layer])
    return out if rep.ln1_post is None else rep.ln1_post[layer].linear(out) / rep.ln1_post[layer].scale


def _forward(rep: Replacement, embed: torch.Tensor, writes: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """What each source puts into resid_pre of every layer, F [S, L, P, d], from its injections
    (`_Sources.injections`), carried up by the frozen model without its constant terms."""
    S, L, d = writes.shape
    rows = torch.arange(S, device=pos.device)
    x = embed.new_zeros(S, rep.n_pos, d)
    x[rows, pos] = embed
    F = []
    for l in range(L):
        F.append(x)
        mid = x + attention_linear(rep, l, x)
        out = torch.zeros_like(x)
        out[rows, pos] = writes[:, l]
        if rep.clt.W_skip is not None:
            read = mid if rep.mlp_in is None else rep.mlp_in[l].linear(mid) / rep.mlp_in[l].scale
            out = out + read @ rep.clt.W_skip[l].detach()
        x = mid + (out if rep.mlp_post is None else rep.mlp_post[l].linear(out) / rep.mlp_post[l].scale)
    return torch.stack(F, 1)


def _contract(
    edges: torch.Tensor, grads: _Gradients, forward: tuple, out: tuple[torch.Tensor, torch.Tensor], work: int
) -> None:
    """Write the parts of edges [k, 3] (edge index, target i in grads, source j in forward) into
    out = (heads [E, L, H], other [E, L]), a few edges at a time (their gradients and forward values
    gathered, about `work` numbers): source j has forward values F[j] [L, P, d] and writes[j]
    [L, d] at position pos[j] (forward = (F, writes, pos))."""
    F, writes, pos = forward
    heads, other = out
    L, H = heads.shape[1:]
    step = max(1, work // (L * (H + 2) * F[0, 0].numel()))
    for a in range(0, len(edges), step):
        e, i, j = edges[a : a + step].T
        f = F[j].flatten(-2)  # [k, L, P * d]
        heads[e] = torch.einsum("klhx,klx->klh", grads.per_head[i].flatten(-2), f)
        late = torch.einsum("kld,kld->kl", grads.out[i, :, pos[j]], writes[j])  # the writes at each layer
        other[e] = torch.einsum("klx,klx->kl", grads.mid[i].flatten(-2), f) + late.flip(1).cumsum(1).flip(1)


def _on_way(edges: torch.Tensor, targets: _Targets, sources: _Sources, L: int) -> torch.Tensor:
    """[E, L] bool: the attention layers each edge's source reaches its target through (from the
    first after the source's own writes to the target's own layer, or the last layer for logits)."""
    layers = torch.arange(L)
    first = sources.first[edges[:, 1]][:, None]
    last = targets.layer[edges[:, 0]].clamp(max=L - 1)[:, None]
    return (layers >= first) & (layers <= last)


def annotate_links(data: dict, graph: Graph, model: HookedTransformer, transcoder: CrossLayerTranscoder) -> None:
    """Add to every link of the graph JSON `data` (made from `graph` by `schema.to_dict`) its head
    loadings, in place: `"heads": {layer: {head: part, ..., "other": part}}`."""
    index = {record["id"]: i for i, record in enumerate(graph.nodes())}
    links = data["links"]
    edges = torch.tensor([[index[link["target"]], index[link["source"]]] for link in links], dtype=torch.long)
    loadings = head_loadings(graph, model, transcoder, edges)
    for e, link in enumerate(links):
        link["heads"] = loadings.field(e)
