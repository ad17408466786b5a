"""QK attributions: why head h of layer l at query position q looks at key position k.

The pre-softmax score (q . k / attn_scale, before any soft cap and the causal mask) is bilinear in
the residual stream at q and at k. Each side is the sum of what was written there: the token and
positional embeddings, every active feature's decoder writes to the layers below l, the error nodes,
each earlier head's output, the skip transcoder's output, and the constant terms (b_O and the norm
offset after attention, b_dec and the norm offset after the MLP). With l's pre-attention norm scale
(and QK-norm scales) frozen at their values on the prompt, each source projects to its own query or
key vector (the projection's bias and the norm's offset are one more source, `bias_Q` / `bias_K`),
the rotary rotation of q (of k) acts on every query (key) vector alike, and the score is exactly the
sum of one term per (query source, key source).

Source ids follow the graph JSON: features `{layer}_{feature}_{pos}`, errors `{layer}_-1_{pos}`,
embeddings `E_{token}_{pos}`; and `pos_{pos}` (learned positions), `head_{layer}.{head}_{pos}`,
`skip_{layer}_{pos}`, `bias_attn_{layer}_{pos}`, `bias_mlp_{layer}_{pos}`, `bias_Q_{pos}`, `bias_K_{pos}`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from circuits.attribution.norms import hook_normalized
from circuits.attribution.replacement import Replacement, build_replacement
from circuits.errors import CircuitsError
from circuits.models import prompt_tokens
from circuits.transcoders.clt import CrossLayerTranscoder


@dataclass
class ResidualParts:
    """resid_pre of one layer at every position as the sum of what was written there."""

    names: list[list[str]]  # [P] the source ids at each position
    vectors: list[torch.Tensor]  # [P] -> [n_p, d], summing to resid_pre at that position


@dataclass
class QKAttribution:
    layer: int
    head: int
    query: int
    key: int
    score: float  # q . k / attn_scale before any soft cap and mask
    query_sources: list[str]
    key_sources: list[str]
    terms: torch.Tensor  # [n_query_sources, n_key_sources], summing to the score

    def top(self, n: int = 20) -> list[tuple[str, str, float]]:
        """The n largest terms by |value|: (query source, key source, value)."""
        flat = self.terms.flatten()
        order = flat.abs().argsort(descending=True)[:n].tolist()
        k = self.terms.shape[1]
        return [(self.query_sources[i // k], self.key_sources[i % k], flat[i].item()) for i in order]

    def to_dict(self) -> dict:
        """`circuits qk`'s JSON: every term, largest |value| first, and their total."""
        return {
            "layer": self.layer, "head": self.head, "query": self.query, "key": self.key, "score": self.score,
            "terms": [{"query_source": q, "key_source": k, "value": v} for q, k, v in self.top(self.terms.numel())],
            "total": self.terms.sum().item(),
        }  # fmt: skip


@torch.no_grad()
def qk_attribution(
    model: HookedTransformer,
    transcoder: CrossLayerTranscoder,
    prompt: str,
    layer: int,
    head: int,
    query: int,
    key: int,
    dtype: str = "float32",
) -> QKAttribution:
    """The QK attribution of head `head` of `layer` from position `query` to position `key` of
    `prompt` (negative positions count from the end) for `model` with `transcoder`."""
    rep = build_replacement(model, transcoder, prompt_tokens(model, prompt)[0], getattr(torch, dtype))
    query, key = _check(model, rep, layer, head, query, key)
    return qk_terms(model, rep, residual_parts(rep, layer), layer, head, query, key)


def _check(model: HookedTransformer, rep: Replacement, layer: int, head: int, query: int, key: int) -> tuple[int, int]:
    """(query, key) as positions from the start, after refusing what the model or prompt lacks."""
    L, H, P = rep.n_layers, model.cfg.n_heads, rep.n_pos
    if not 0 <= layer < L or not 0 <= head < H:
        raise CircuitsError(f"layer {layer}, head {head}: the model has layers 0..{L - 1} and heads 0..{H - 1}")
    if not -P <= query < P or not -P <= key < P:
        raise CircuitsError(f"query {query}, key {key}: the prompt has positions 0..{P - 1} (or -{P}..-1)")
    query, key = query % P, key % P
    if key > query:
        raise CircuitsError(f"key {key} is after query {query}: attention looks back only; pass key <= query")
    return query, key


def qk_terms(
    model: HookedTransformer, rep: Replacement, parts: ResidualParts, layer: int, head: int, query: int, key: int
) -> QKAttribution:
    """The QK attribution from `parts` (`residual_parts(rep, layer)`) at positions query >= key."""
    attn = model.blocks[layer].attn
    q_names, q = _side(rep, attn, parts, layer, head, query, "Q")
    k_names, k = _side(rep, attn, parts, layer, head, key, "K")
    terms = q @ k.T / attn.attn_scale  # [n_q, n_k]
    score = q.sum(0) @ k.sum(0) / attn.attn_scale
    return QKAttribution(layer, head, query, key, score.item(), q_names, k_names, terms.cpu())


def _side(rep: Replacement, attn, parts: ResidualParts, layer: int, head: int, pos: int, side: str):
    """The query (side "Q") or key ("K") vector of `head` at `pos`, one row per source: (names, [n + 1, d_head])."""
    dtype = rep.embed.dtype
    W = (attn.W_Q if side == "Q" else attn.W_K)[head].detach().to(dtype)  # [d, d_head] (GQA: expanded)
    b = (attn.b_Q if side == "Q" else attn.b_K)[head].detach().to(dtype)
    ln = rep.ln1[layer]
    rows = torch.cat([ln.linear(parts.vectors[pos]) / ln.scale[pos] @ W, (ln.b @ W + b)[None]])
    if attn.cfg.use_qk_norm:  # its scale frozen at the whole vector's
        norm = attn.q_norm if side == "Q" else attn.k_norm
        _, scale = hook_normalized(norm, rows.sum(0))
        rows = rows / scale.to(dtype) * norm.w.detach().to(dtype)
    if attn.cfg.positional_embedding_type == "rotary":
        rows = _rotate(attn, rows, pos)
    return parts.names[pos] + [f"bias_{side}_{pos}"], rows


def _rotate(attn, x: torch.Tensor, pos: int) -> torch.Tensor:
    """TransformerLens's rotary rotation of position `pos` applied to vectors x [n, d_head]."""
    rd = attn.cfg.rotary_dim
    cos, sin = attn.rotary_cos[pos].to(x.dtype), attn.rotary_sin[pos].to(x.dtype)
    rot = x[:, :rd]
    return torch.cat([rot * cos + attn.rotate_every_two(rot) * sin, x[:, rd:]], -1)


def residual_parts(rep: Replacement, layer: int) -> ResidualParts:
    """resid_pre of `layer` at every position as the sum of its sources (see the module docstring)."""
    P, H = rep.n_pos, rep.W_O.shape[1]
    tokens = rep.tokens.tolist()
    parts = ResidualParts([[f"E_{tokens[p]}_{p}"] for p in range(P)], [[rep.embed[p]] for p in range(P)])
    if rep.pos_embed.any():
        _add(parts, "pos_{p}", rep.pos_embed)
    resid = rep.embed + rep.pos_embed  # [P, d]
    for l in range(layer):
        heads, bias = _attention_parts(rep, l, resid)
        for h in range(H):
            _add(parts, f"head_{l}.{h}_{{p}}", heads[h])
        _add(parts, f"bias_attn_{l}_{{p}}", bias)
        mid = resid + heads.sum(0) + bias
        mlp = {f"{l}_-1_{{p}}": _post(rep, l, rep.errors[l]), f"bias_mlp_{l}_{{p}}": _mlp_bias(rep, l)}
        if rep.clt.W_skip is not None:
            mlp[f"skip_{l}_{{p}}"] = _post(rep, l, rep.clt_input(l, mid) @ rep.clt.W_skip[l].detach())
        for name, value in mlp.items():
            _add(parts, name, value)
        resid = mid + sum(mlp.values()) + _post(rep, l, rep.decoded[l])
    _add_features(parts, rep, layer)
    return ResidualParts(parts.names, [torch.stack(v) for v in parts.vectors])


def _add(parts: ResidualParts, template: str, values: torch.Tensor) -> None:
    """Append one source per position: its id `template` with {p} filled, its vector values[p]."""
    for p in range(len(parts.names)):
        parts.names[p].append(template.format(p=p))
        parts.vectors[p].append(values[p])


def _attention_parts(rep: Replacement, layer: int, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen attention of `layer` on resid [P, d] as each head's output [H, P, d] (its value
    bias included) and the rest [P, d] (b_O, and the norm after attention's offset); their sum is
    `rep.attention_forward(layer, resid)`."""
    v = torch.einsum("pd,hde->hpe", rep.ln1[layer].forward(resid), rep.W_V[layer]) + rep.b_V[layer][:, None]
    heads = torch.einsum("hpe,hed->hpd", rep.patterns[layer] @ v, rep.W_O[layer])
    bias = rep.b_O[layer].expand_as(resid)
    if rep.ln1_post is None:
        return heads, bias
    post = rep.ln1_post[layer]
    return post.linear(heads) / post.scale, post.linear(bias) / post.scale + post.b


def _post(rep: Replacement, layer: int, x: torch.Tensor) -> torch.Tensor:
    """x [..., P, d] at the transcoder's output of `layer` -> what it adds to the residual stream
    (through the frozen norm after the MLP, without its offset, when it writes before that norm)."""
    return x if rep.mlp_post is None else rep.mlp_post[layer].linear(x) / rep.mlp_post[layer].scale


def _mlp_bias(rep: Replacement, layer: int) -> torch.Tensor:
    """The constant part of `layer`'s MLP output in the residual stream [P, d]: b_dec (and the norm
    after the MLP's offset)."""
    bias = _post(rep, layer, rep.clt.b_dec[layer].detach().expand_as(rep.embed))
    return bias if rep.mlp_post is None else bias + rep.mlp_post[layer].b


def _add_features(parts: ResidualParts, rep: Replacement, layer: int) -> None:
    """Append each active feature below `layer`: its decoder writes to the layers below `layer`
    (times its activation), summed as they reach resid_pre[layer] at its position."""
    start = 0
    for s, writes in enumerate(rep.writes):  # [n_s, T_s, d]
        features = rep.features[start : start + len(writes)]
        start += len(writes)
        if s >= layer:
            continue
        for i, (_, p, f) in enumerate(features.tolist()):
            below = writes[i, : layer - s]  # [layer - s, d]: to layers s .. layer - 1
            total = sum(w if rep.mlp_post is None else _post(rep, s + j, w)[p] for j, w in enumerate(below))
            parts.names[p].append(f"{s}_{f}_{p}")
            parts.vectors[p].append(total)


@torch.no_grad()
def attention_page(
    model: HookedTransformer,
    transcoder: CrossLayerTranscoder,
    tokens: torch.Tensor,
    links: list[dict],
    dtype: str = "float32",
    n_heads: int = 6,
    n_keys: int = 5,
    n_terms: int = 8,
) -> dict:
    """What the page shows of attention, for the prompt's tokens [P] and the links of its graph JSON,
    with their head loadings (`heads.annotate_links`): each link's loadings by "source|target"; and for
    the `n_heads` heads
    carrying the most |weight| over all links, their attention pattern [query][key] and, at every
    query position where they carry a link, the top `n_terms` QK terms of the `n_keys` keys they
    attend to most, each as {"score", "terms": [[query source, key source, value], ...]}."""
    carried: dict[str, float] = {}
    queries: dict[str, set[int]] = {}
    for link in links:
        query = int(link["target"].split("_")[-1])
        for layer, parts in link.get("heads", {}).items():
            for head, w in parts.items():
                if head != "other":
                    name = f"{layer}.{head}"
                    carried[name] = carried.get(name, 0.0) + abs(w)
                    queries.setdefault(name, set()).add(query)
    top = sorted(carried, key=lambda name: -carried[name])[:n_heads]
    rep = build_replacement(model, transcoder, tokens.to(model.W_U.device), getattr(torch, dtype))
    heads = {}
    for name in top:
        layer, head = (int(x) for x in name.split("."))
        parts = residual_parts(rep, layer)
        pattern = rep.patterns[layer, head]  # [query, key]
        qk = {}
        for q in sorted(queries[name]):
            keys = pattern[q, : q + 1].topk(min(n_keys, q + 1)).indices.tolist()
            qk[str(q)] = {str(k): _terms_json(qk_terms(model, rep, parts, layer, head, q, k), n_terms) for k in keys}
        heads[name] = {"carried": carried[name], "pattern": pattern.round(decimals=4).tolist(), "qk": qk}
    loadings = {f"{link['source']}|{link['target']}": link["heads"] for link in links if "heads" in link}
    return {"links": loadings, "heads": heads}


def _terms_json(qk: QKAttribution, n: int) -> dict:
    return {"score": qk.score, "terms": [[q, k, v] for q, k, v in qk.top(n)]}


def feature_sources(page: dict) -> list[tuple[str, int, int]]:
    """(id, layer, feature index) of every feature among the QK terms of `attention_page`'s result."""
    ids = set()
    for head in page["heads"].values():
        for keys in head["qk"].values():
            for qk in keys.values():
                ids.update(source for q, k, _ in qk["terms"] for source in (q, k))
    parts = [source.split("_") for source in sorted(ids)]
    return [("_".join(p), int(p[0]), int(p[1])) for p in parts if len(p) == 3 and p[0].isdigit() and p[1] != "-1"]
