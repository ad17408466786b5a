"""`Graph`: an attribution graph, its pruning by influence, its scores, and its files (the graph
JSON itself is `circuits.attribution.schema`'s).

Node order (as circuit-tracer): features [n] (sorted by layer, position, feature), error nodes
[L * P] (layer-major), token embeddings [P], logit targets [T]. `adjacency[target, source]` holds
the direct effect of source on target; rows of errors and tokens, and columns of logits, are zero.
A graph of a long prompt holds it as a sparse COO tensor (`attribution` writes one when the dense
matrix would be large); influence, pruning, scores and the files work on either without densifying.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from circuits.attribution import schema
from circuits.errors import CircuitsError, check_range
from circuits.fileio import atomic_file, write_json


def normalize_matrix(A: torch.Tensor) -> torch.Tensor:
    """Row-normalised |A|: each node's incoming edges as fractions of its total absolute input."""
    A = A.abs()
    return A / A.sum(1, keepdim=True).clamp(min=1e-10)


def compute_influence(A: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """weights @ (A + A^2 + ...) for a normalised adjacency A [N, N] of a DAG (nilpotent, so the
    series ends after at most N terms): each node's total influence on the weighted targets [N].
    With `rows` [R], A [R, N] holds only those rows (the others are zero) and weights [R] theirs."""
    term = weights @ A
    influence = term.clone()
    for _ in range(A.shape[1]):
        if not term.any():
            return influence
        term = (term if rows is None else term[rows]) @ A
        influence += term
    raise CircuitsError("the adjacency matrix has a cycle: influence does not converge")


def edge_list(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stored edges of an adjacency, dense or sparse COO [N, N]: (targets, sources, values) [nnz],
    by target then source (a dense matrix: its nonzero entries)."""
    if A.is_sparse:
        A = A.coalesce()
        return A.indices()[0], A.indices()[1], A.values()
    targets, sources = A.nonzero(as_tuple=True)
    return targets, sources, A[targets, sources]


def sparse_adjacency(
    targets: torch.Tensor, sources: torch.Tensor, values: torch.Tensor, N: int, ordered: bool = False
) -> torch.Tensor:
    """A coalesced sparse COO adjacency [N, N] from its edges; `ordered`: they are already sorted by
    target, then source, without repeats (no sorted copy is made)."""
    indices = torch.stack([targets.long(), sources.long()])
    if ordered:
        return torch.sparse_coo_tensor(indices, values, (N, N), check_invariants=False, is_coalesced=True)
    return torch.sparse_coo_tensor(indices, values, (N, N), check_invariants=False).coalesce()


def normalize_edges(targets: torch.Tensor, values: torch.Tensor, N: int) -> torch.Tensor:
    """`normalize_matrix` on edges: |value| / the target's total absolute input, [nnz]."""
    totals = values.new_zeros(N).index_add_(0, targets, values.abs())
    return values.abs() / totals.clamp(min=1e-10)[targets]


def edge_influence(
    targets: torch.Tensor,
    sources: torch.Tensor | Callable[[slice], torch.Tensor],
    A: torch.Tensor,
    weights: torch.Tensor,
    totals: torch.Tensor | None = None,
    chunk: int = 2**20,
) -> torch.Tensor:
    """`compute_influence` on edges: weights [N] @ (A + A^2 + ...) for the normalised edge values A
    [nnz] of a DAG, in O(nnz) per term: [N]. Edges grouped by target may come as targets [R] with
    sources and A [R, K] (`sources` may be a function of a slice of the rows that gives their sources
    [rows, K], for sources stored packed); then with `totals` [R], A holds their values, each
    normalised as it is read (|value| / its target's total, as `normalize_matrix`). Each term runs
    over about `chunk` edges at a time: its temporaries are of that size, not of the edges'."""
    R, K = len(targets), A.numel() // max(1, len(targets))  # K = 1 for edges one by one
    A, step = A.view(R, K), max(1, chunk // max(1, K))
    sources_of = sources if callable(sources) else sources.view(R, K).__getitem__
    term, influence = weights, torch.zeros_like(weights)
    for _ in range(len(weights)):
        passed = torch.zeros_like(weights)
        for a in range(0, R, step):
            shares = A[a : a + step] if totals is None else A[a : a + step].abs() / totals[a : a + step, None]
            edges = shares * term[targets[a : a + step], None]  # [step, K]
            passed.index_add_(0, sources_of(slice(a, min(a + step, R))).flatten(), edges.flatten())
        term = passed
        if not term.any():
            return influence
        influence += term
    raise CircuitsError("the adjacency matrix has a cycle: influence does not converge")


def _cumulative(influence: torch.Tensor) -> torch.Tensor:
    """[N]: each node's share of the total influence summed over it and every node more
    influential (circuit-tracer's `influence` of a node in the graph JSON)."""
    order = influence.sort(descending=True)
    cumulative = torch.zeros_like(influence)
    cumulative[order.indices] = order.values.cumsum(0) / order.values.sum().clamp(min=1e-30)
    return cumulative


def _cutoff(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The score that keeps the highest scores up to `threshold` of their cumulative sum."""
    ordered = scores.flatten().sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    index = int(torch.searchsorted(cumulative, torch.tensor(threshold, dtype=cumulative.dtype)))
    n_nonzero = int((ordered > 0).sum())
    return ordered[min(index, max(n_nonzero - 1, 0))]


class PruneResult(NamedTuple):
    node_mask: torch.Tensor  # [N] bool
    edge_mask: torch.Tensor  # [N, N] bool, [target, source]
    cumulative_scores: torch.Tensor  # [N] each node's cumulative influence rank in (0, 1]


@dataclass
class Graph:
    prompt: str
    tokens: torch.Tensor  # [P] long
    token_strs: list[str]
    features: torch.Tensor  # [n, 3] long: (layer, position, feature index)
    activations: torch.Tensor  # [n]
    adjacency: torch.Tensor  # [N, N]: [target, source]
    target_tokens: torch.Tensor  # [T] vocabulary id (d_vocab + k for a virtual target such as a logit difference)
    target_names: list[str]
    target_probs: torch.Tensor  # [T]
    inputs: torch.Tensor  # [n + T]: feature pre-activations, then target logits (demeaned)
    bias: torch.Tensor  # [n + T]: the constant part of each input (inputs = incoming edges + bias)
    n_layers: int
    config: dict = field(default_factory=dict)
    inhibited: list[dict] = field(default_factory=list)
    """Optional: inactive features the graph's feature nodes suppress (see `attribution.inhibited_features`)."""

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_targets(self) -> int:
        return len(self.target_tokens)

    @property
    def error_slice(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_layers * self.n_pos)

    @property
    def token_slice(self) -> slice:
        start = self.error_slice.stop
        return slice(start, start + self.n_pos)

    @property
    def target_slice(self) -> slice:
        start = self.token_slice.stop
        return slice(start, start + self.n_targets)

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    def target_weights(self) -> torch.Tensor:
        """[N]: each target's probability, zero elsewhere (the weights of influence)."""
        w = torch.zeros(self.n_nodes, dtype=self.adjacency.dtype)
        w[self.target_slice] = self.target_probs.to(w.dtype)
        return w

    def influence(self) -> torch.Tensor:
        """Each node's influence on the targets through the row-normalised |adjacency|: [N]."""
        if self.adjacency.is_sparse:
            targets, sources, values = edge_list(self.adjacency)
            A = normalize_edges(targets, values, self.n_nodes)
            return edge_influence(targets, sources, A, self.target_weights())
        return compute_influence(normalize_matrix(self.adjacency), self.target_weights())

    def dense_adjacency(self) -> torch.Tensor:
        """The adjacency as a dense [N, N] matrix (N^2 numbers: for small graphs)."""
        return self.adjacency.to_dense() if self.adjacency.is_sparse else self.adjacency

    def edges(self, result: PruneResult | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(targets, sources, weights) [n_edges] of the nonzero edges, or of those `result` keeps
        between the nodes it keeps; by target, then source."""
        targets, sources, values = edge_list(self.adjacency)
        keep = values != 0
        if result is not None:
            keep &= result.node_mask[targets] & result.node_mask[sources]
            if result.edge_mask.is_sparse:
                kept_targets, kept_sources, _ = edge_list(result.edge_mask)
                N = self.n_nodes
                keep &= torch.isin(targets * N + sources, kept_targets * N + kept_sources)
            else:
                keep &= result.edge_mask[targets, sources]
        return targets[keep], sources[keep], values[keep]

    # ---- pruning and scores ------------------------------------------------------------------

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
        """Keep the nodes carrying `node_threshold` of the influence on the targets (tokens and
        targets always), then the edges carrying `edge_threshold` of the influence among them;
        then drop, until nothing changes, features and errors without kept outgoing edges and
        features without kept incoming edges."""
        for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
            if not 0.0 <= value <= 1.0:
                raise CircuitsError(f"{name} is {value}: pass a fraction between 0 and 1")
        if self.adjacency.is_sparse:
            return self._prune_sparse(node_threshold, edge_threshold)
        weights = self.target_weights()
        influence = compute_influence(normalize_matrix(self.adjacency), weights)
        node_mask = influence >= _cutoff(influence, node_threshold)
        node_mask[self.token_slice.start :] = True
        pruned = self.adjacency.clone()
        pruned[~node_mask] = 0
        pruned[:, ~node_mask] = 0
        normalized = normalize_matrix(pruned)
        edge_scores = normalized * (compute_influence(normalized, weights) + weights)[:, None]
        edge_mask = edge_scores >= _cutoff(edge_scores, edge_threshold)
        inner, n = self.token_slice.start, self.n_features
        while True:
            edge_mask &= node_mask[:, None] & node_mask[None, :]
            new_mask = node_mask.clone()
            new_mask[:inner] &= edge_mask[:, :inner].any(0)
            new_mask[:n] &= edge_mask[:n].any(1)
            if torch.equal(new_mask, node_mask):
                break
            node_mask = new_mask
        return PruneResult(node_mask, edge_mask, _cumulative(influence))

    def _prune_sparse(self, node_threshold: float, edge_threshold: float) -> PruneResult:
        """`prune` on a sparse adjacency, the same steps on its edges; the edge mask is a sparse
        boolean COO tensor [N, N]."""
        N, weights = self.n_nodes, self.target_weights()
        targets, sources, values = edge_list(self.adjacency)
        influence = edge_influence(targets, sources, normalize_edges(targets, values, N), weights)
        node_mask = influence >= _cutoff(influence, node_threshold)
        node_mask[self.token_slice.start :] = True
        values = values * (node_mask[targets] & node_mask[sources])
        A = normalize_edges(targets, values, N)
        scores = A * (edge_influence(targets, sources, A, weights) + weights)[targets]
        edge_mask = scores >= _cutoff(scores, edge_threshold)
        inner, n = self.token_slice.start, self.n_features
        while True:
            edge_mask &= node_mask[targets] & node_mask[sources]
            sends, receives = torch.zeros(N, dtype=torch.bool), torch.zeros(N, dtype=torch.bool)
            sends[sources[edge_mask]], receives[targets[edge_mask]] = True, True
            new_mask = node_mask.clone()
            new_mask[:inner] &= sends[:inner]
            new_mask[:n] &= receives[:n]
            if torch.equal(new_mask, node_mask):
                break
            node_mask = new_mask
        kept = sparse_adjacency(
            targets[edge_mask], sources[edge_mask], torch.ones(int(edge_mask.sum()), dtype=torch.bool), N
        )
        return PruneResult(node_mask, kept, _cumulative(influence))

    def unpruned(self) -> PruneResult:
        """Every node and every nonzero edge, with the cumulative influence scores `prune` gives."""
        everything = torch.ones(self.n_nodes, dtype=torch.bool)
        if self.adjacency.is_sparse:
            targets, sources, values = edge_list(self.adjacency)
            keep = values != 0
            edges = sparse_adjacency(
                targets[keep], sources[keep], torch.ones(int(keep.sum()), dtype=torch.bool), self.n_nodes
            )
            return PruneResult(everything, edges, _cumulative(self.influence()))
        return PruneResult(everything, self.adjacency != 0, _cumulative(self.influence()))

    def scores(self) -> tuple[float, float]:
        """(replacement score, completeness score), as circuit-tracer computes them: the share of
        the tokens' and errors' influence on the targets that comes from tokens, and the
        influence-weighted share of every node's normalised input that does not come from errors."""
        weights, influence = self.target_weights(), self.influence()
        token, error = influence[self.token_slice].sum(), influence[self.error_slice].sum()
        replacement = token / (token + error)
        targets, sources, values = edge_list(self.adjacency)
        from_errors = (sources >= self.error_slice.start) & (sources < self.error_slice.stop)
        A = normalize_edges(targets, values, self.n_nodes) * from_errors
        non_error = 1 - torch.zeros_like(weights).index_add_(0, targets, A)
        output = influence + weights
        completeness = (non_error * output).sum() / output.sum()
        return replacement.item(), completeness.item()

    # ---- node table ----------------------------------------------------------------------------

    def nodes(self) -> list[dict]:
        """One record per node, in adjacency order: kind, layer, pos, feature, activation, token, id."""
        records = []
        for (layer, pos, feat), act in zip(self.features.tolist(), self.activations.tolist(), strict=True):
            records.append(
                dict(kind="feature", layer=layer, pos=pos, feature=feat, activation=act, id=f"{layer}_{feat}_{pos}")
            )
        for layer in range(self.n_layers):
            for pos in range(self.n_pos):
                records.append(dict(kind="error", layer=layer, pos=pos, feature=-1, id=f"{layer}_-1_{pos}"))
        for pos, tok in enumerate(self.tokens.tolist()):
            records.append(
                dict(kind="embedding", layer=-1, pos=pos, feature=tok, token=self.token_strs[pos], id=f"E_{tok}_{pos}")
            )
        last = self.n_pos - 1
        for k, tok in enumerate(self.target_tokens.tolist()):
            records.append(
                dict(
                    kind="logit", layer=self.n_layers, pos=last, feature=tok, token=self.target_names[k],
                    prob=self.target_probs[k].item(), id=f"{self.n_layers + 1}_{tok}_{last}",
                )
            )  # fmt: skip
        return records

    def to_networkx(self, result: PruneResult | None = None):
        """A networkx DiGraph (source -> target, attribute `weight`), all nodes or those kept by `result`."""
        import networkx as nx

        nodes = self.nodes()
        node_mask = torch.ones(len(nodes), dtype=torch.bool) if result is None else result.node_mask
        g = nx.DiGraph(prompt=self.prompt)
        for i in node_mask.nonzero()[:, 0].tolist():
            g.add_node(nodes[i]["id"], **nodes[i])
        targets, sources, weights = self.edges(result)
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights.tolist(), strict=True):
            g.add_edge(nodes[s]["id"], nodes[t]["id"], weight=w)
        return g

    # ---- files ---------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """One safetensors file: the tensors, and everything else as JSON in its metadata."""
        from safetensors.torch import save

        tensors = {k: getattr(self, k).contiguous() for k in _TENSORS if k != "adjacency"}
        if self.adjacency.is_sparse:  # the sparse layout: the edges, by target then source
            targets, sources, values = edge_list(self.adjacency)
            tensors["adjacency_indices"] = torch.stack([targets, sources]).int().contiguous()
            tensors["adjacency_values"] = values.contiguous()
        else:
            tensors["adjacency"] = self.adjacency.contiguous()
        meta = {k: getattr(self, k) for k in _FIELDS}
        with atomic_file(Path(path), "wb") as f:
            f.write(save(tensors, metadata={"graph": json.dumps(meta), "schema_version": str(schema.SCHEMA_VERSION)}))

    @classmethod
    def load(cls, path: Path) -> Graph:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.exists():
            raise CircuitsError(f"{path} does not exist: pass a .graph.safetensors file written by `circuits trace`")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise CircuitsError(f"{path} is not a readable graph file ({e}): re-run `circuits trace`") from None
        if "graph" not in meta:
            raise CircuitsError(f"{path} is a safetensors file but not a graph: re-run `circuits trace`")
        try:
            fields = json.loads(meta["graph"])
        except json.JSONDecodeError as e:
            raise CircuitsError(f"{path} has unreadable graph metadata ({e}): re-run `circuits trace`") from None
        if not isinstance(fields, dict):
            raise CircuitsError(f"{path} has graph metadata that is not an object: re-run `circuits trace`")
        sparse = {"adjacency_indices", "adjacency_values"}
        if sparse <= set(tensors):  # the sparse layout (long prompts); else the dense matrix
            present = set(tensors) - sparse | {"adjacency"}
        else:
            present = set(tensors)
        missing = sorted((set(_TENSORS) - present) | (set(_FIELDS) - {"config", "inhibited"} - set(fields)))
        unknown = sorted((present - set(_TENSORS)) | (set(fields) - set(_FIELDS)))
        if missing or unknown:
            raise CircuitsError(f"{path} is not a graph of this version (missing {missing}, unknown {unknown}): "
                                "re-run `circuits trace`")  # fmt: skip
        if "adjacency" not in tensors:
            (targets, sources), values = tensors.pop("adjacency_indices"), tensors.pop("adjacency_values")
            tensors["adjacency"] = torch.empty(0)  # the sparse matrix, once the graph knows its size
            graph = cls(**tensors, **fields)
            graph.adjacency = sparse_adjacency(targets, sources, values, graph.target_slice.stop)
        else:
            graph = cls(**tensors, **fields)
        if graph.adjacency.shape != (graph.target_slice.stop,) * 2:
            shape = tuple(graph.adjacency.shape)
            raise CircuitsError(
                f"{path} has an adjacency of shape {shape} that does not fit its nodes: re-run `circuits trace`"
            )
        return graph

    def to_dict(self, slug: str, **options: str | float | bool) -> dict:
        """The graph JSON (circuit-tracer's schema): `circuits.attribution.schema.to_dict(self, slug, **options)`."""
        return schema.to_dict(self, slug, **options)

    def to_json(self, path: Path, slug: str | None = None, **options: str | float | bool) -> None:
        """Write `to_dict` to `path` atomically; the slug defaults to the file name without `.json`."""
        data = self.to_dict(slug or Path(path).name.removesuffix(".json"), **options)
        write_json(Path(path), data)


_TENSORS = ("tokens", "features", "activations", "adjacency", "target_tokens", "target_probs", "inputs", "bias")
_FIELDS = ("prompt", "token_strs", "target_names", "n_layers", "config", "inhibited")


def check_one_source(graphs: list[Graph]) -> None:
    """Refuse graphs of different models or transcoders: one feature id would name different features."""
    sources = {json.dumps([g.config.get("model"), g.config.get("transcoder")], sort_keys=True) for g in graphs}
    if len(sources) > 1:
        raise CircuitsError(
            f"the graphs come from {len(sources)} different model and transcoder pairs (their feature ids name "
            "different features): aggregate graphs traced with one model and one transcoder"
        )


def aggregate(graphs: list[Graph], min_prompts: int = 1) -> dict:
    """Merge graphs of many prompts into one graph of features (position-free: a node is
    (layer, feature), or a target token). Within a prompt, a pair's edges over all positions are
    summed; across prompts, edges are averaged over the prompts where the pair has an edge (both
    ends active, the source at or before the target).
    Returns JSON-ready {"prompts", "nodes", "links"}; nodes and links seen in fewer than
    `min_prompts` prompts are left out. Graphs of different models or transcoders are refused: the
    same feature id would name different features."""
    check_range("min_prompts", min_prompts, 1, len(graphs), integer=True)
    check_one_source(graphs)
    nodes: dict[str, dict] = {}
    links: dict[tuple[str, str], list[float]] = {}
    for graph in graphs:
        keys = [f"{l}_{f}" for l, _, f in graph.features.tolist()] + [f"L_{name}" for name in graph.target_names]
        rows = list(range(graph.n_features)) + list(range(graph.target_slice.start, graph.target_slice.stop))
        present: dict[str, float] = {}
        for key, act in zip(keys, graph.activations.tolist() + [0.0] * graph.n_targets, strict=True):
            present[key] = present.get(key, 0.0) + act
        for key, act in present.items():
            node = nodes.setdefault(key, {"id": key, "prompts": 0, "activation_sum": 0.0})
            node["prompts"] += 1
            node["activation_sum"] += act
        row_of = {node: i for i, node in enumerate(rows)}
        summed: dict[tuple[str, str], float] = {}
        targets, sources, weights = graph.edges()
        between = sources < graph.n_features  # rows of errors and tokens are empty: every target is a row
        for t, s, w in zip(
            targets[between].tolist(), sources[between].tolist(), weights[between].tolist(), strict=True
        ):
            pair = (keys[s], keys[row_of[t]])
            summed[pair] = summed.get(pair, 0.0) + w
        for pair, w in summed.items():
            links.setdefault(pair, []).append(w)
    kept = {k: n for k, n in nodes.items() if n["prompts"] >= min_prompts}
    node_list = [
        {"id": k, "prompts": n["prompts"], "mean_activation": n["activation_sum"] / n["prompts"]}
        for k, n in kept.items()
    ]
    link_list = [
        {"source": s, "target": t, "weight": sum(ws) / len(ws), "prompts": len(ws)}
        for (s, t), ws in links.items()
        if len(ws) >= min_prompts and s in kept and t in kept
    ]
    link_list.sort(key=lambda link: -abs(link["weight"]))
    return {"prompts": [g.prompt for g in graphs], "nodes": node_list, "links": link_list}
