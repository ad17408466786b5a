"""Feature cards: what each transcoder feature responds to and what it writes.

`scan_features` runs a corpus through the model, encodes every layer's value at the transcoder's
own input hook (`CLTConfig.input_hook`, read as `circuits.attribution.splice` reads it) with the CLT
and keeps, per feature: the top-k activating contexts (one per document, a window of tokens
around the maximum with the feature's activation on every token), an activation histogram, the
fraction of tokens it fires on, its top output logits and a short automatic label.

Output logits: a feature's decoders write into the residual stream at its source layer and every
later one, and all of that reaches the unembedding directly through the residual path. We take
the sum of its decoder rows over every target layer, pass it through the final norm's linear part
(centring for LayerNorm, the elementwise weight) and `W_U`, and centre over the vocabulary: the
direct effect of one unit of activation on the logits, ignoring the norm's scale and any path
through attention or later MLPs. A transcoder that writes `mlp.hook_out` on a model with a norm
after the MLP (Gemma 2/3) writes before that norm: each decoder row first goes through that
layer's post-MLP norm's linear part (its elementwise weight turns the direction, so it changes
which tokens rank first); that norm's scale, a positive number per token and layer, is ignored
like the final norm's (for a cross-layer feature it would only reweight the target layers).
Everywhere else the decoders write the residual stream directly and nothing changes.

Saved as `features.safetensors` (tensors) + `features.json` (config, token strings, labels, the
fingerprint of the CLT they were computed from); no pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from circuits.attribution.norms import has_post_norm
from circuits.attribution.splice import read_point, transcoder_inputs
from circuits.errors import CircuitsError, check_range
from circuits.fileio import atomic_directory
from circuits.text import TextSource, token_mask
from circuits.transcoders.clt import CrossLayerTranscoder, check_fits

log = logging.getLogger(__name__)
DEMO_FEATURES_DIR = Path(__file__).parent / "demo" / "features"
SHIPPED_FEATURES = {"demo": DEMO_FEATURES_DIR, "demo-tuned": DEMO_FEATURES_DIR.parent / "tuned-features"}
"""The scans shipped for the shipped transcoders, by transcoder name."""


@dataclass
class FeatureScanConfig:
    text: str = "demo"
    """Corpus: 'demo', a .txt/.jsonl file or 'hf:DATASET' (see circuits.activations.TextSource)."""
    n_documents: int = 2048
    seed: int = 1
    """Corpus seed (the demo CLT trains on seed 0: these are other documents of the same world)."""
    max_tokens_per_doc: int = 64
    batch_size: int = 64
    top_k: int = 8
    """Top activating contexts kept per feature (at most one per document, no repeated window)."""
    before: int = 12
    """Tokens of context kept before the maximum."""
    after: int = 3
    """Tokens kept after it."""
    n_bins: int = 24
    """Histogram bins over (0, the feature's maximum activation]."""
    n_logits: int = 8
    """Top (and bottom) output logits kept."""

    def __post_init__(self) -> None:
        for name in ("n_documents", "max_tokens_per_doc", "batch_size", "top_k", "n_bins", "n_logits"):
            check_range(name, getattr(self, name), 1, integer=True)
        check_range("before", self.before, 0, integer=True)
        check_range("after", self.after, 0, integer=True)
        TextSource(self.text)  # a text that cannot be read is refused now, before any work

    @property
    def window(self) -> int:
        return self.before + 1 + self.after


@dataclass
class FeatureScan:
    """Per-feature statistics of one CLT; tensors are indexed [layer, feature, ...]."""

    config: FeatureScanConfig
    clt_name: str
    clt_fingerprint: str
    model_name: str
    n_tokens: int
    context_tokens: torch.Tensor  # [L, F, k, window] int32 token ids, -1 outside the document
    context_acts: torch.Tensor  # [L, F, k, window] float16 (display only), the feature's activation on each token
    context_max: torch.Tensor  # [L, F, k] float32, 0 where fewer than k documents activate it
    histogram: torch.Tensor  # [L, F, n_bins] int32 counts of positive activations
    max_activation: torch.Tensor  # [L, F] float32
    frequency: torch.Tensor  # [L, F] fraction of scanned tokens where it fires (activation > 0)
    logit_ids: torch.Tensor  # [L, F, 2 * n_logits] int32: top n_logits, then bottom n_logits
    logit_values: torch.Tensor  # [L, F, 2 * n_logits] float32
    vocab: dict[int, str]
    labels: list[list[str]]

    def card(self, layer: int, feature: int) -> dict:
        """Everything the page shows for one feature, as plain JSON-able values."""
        n = self.config.n_logits
        ids, values = self.logit_ids[layer, feature].tolist(), self.logit_values[layer, feature].tolist()
        logits = [[self.vocab[i], round(v, 4)] for i, v in zip(ids, values, strict=True)]
        contexts = []
        for tokens, acts, peak in zip(
            self.context_tokens[layer, feature].tolist(),
            self.context_acts[layer, feature].tolist(),
            self.context_max[layer, feature].tolist(),
            strict=True,
        ):
            if peak > 0:
                keep = [i for i, t in enumerate(tokens) if t >= 0]
                contexts.append(
                    {"tokens": [self.vocab[tokens[i]] for i in keep], "acts": [round(acts[i], 4) for i in keep]}
                )
        return {
            "layer": layer,
            "feature": feature,
            "label": self.labels[layer][feature],
            "frequency": self.frequency[layer, feature].item(),
            "max_activation": self.max_activation[layer, feature].item(),
            "histogram": self.histogram[layer, feature].tolist(),
            "top_logits": logits[:n],
            "bottom_logits": logits[n:],
            "contexts": contexts,
        }

    def save(self, directory: Path) -> None:
        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        meta = {
            "config": dataclasses.asdict(self.config),
            "clt_name": self.clt_name,
            "clt_fingerprint": self.clt_fingerprint,
            "model_name": self.model_name,
            "n_tokens": self.n_tokens,
            "vocab": {str(i): s for i, s in sorted(self.vocab.items())},
            "labels": self.labels,
        }
        with atomic_directory(Path(directory)) as tmp:
            (tmp / "features.safetensors").write_bytes(save(tensors))
            (tmp / "features.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")


_TENSORS = (
    "context_tokens", "context_acts", "context_max", "histogram", "max_activation", "frequency",
    "logit_ids", "logit_values",
)  # fmt: skip


def clt_fingerprint(clt: CrossLayerTranscoder) -> str:
    """A short hash of the encoder weights at bfloat16 precision: features computed for another CLT
    are refused, and the same CLT loaded in float32, bfloat16 or float16 is the same."""
    h = hashlib.sha256()
    for t in (clt.W_enc, clt.b_enc, clt.threshold):
        h.update(t.detach().cpu().to(torch.bfloat16).float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_features(directory: str | Path = "demo", clt: CrossLayerTranscoder | None = None) -> FeatureScan:
    """Load a saved scan ('demo': the one shipped for the demo CLT). With `clt`, refuse a scan
    computed from a different transcoder."""
    directory = scan_dir(directory)
    meta = json.loads((directory / "features.json").read_text(encoding="utf-8"))
    if clt is not None and meta["clt_fingerprint"] != clt_fingerprint(clt):
        raise CircuitsError(
            f"the features in {directory} were computed for another transcoder: re-run `circuits features`"
        )
    tensors = load_file(str(directory / "features.safetensors"))
    return FeatureScan(
        config=FeatureScanConfig(**meta["config"]),
        clt_name=meta["clt_name"],
        clt_fingerprint=meta["clt_fingerprint"],
        model_name=meta["model_name"],
        n_tokens=meta["n_tokens"],
        vocab={int(i): s for i, s in meta["vocab"].items()},
        labels=meta["labels"],
        **{name: tensors[name] for name in _TENSORS},
    )


def scan_dir(directory: str | Path) -> Path:
    """The folder of a saved scan ('demo', 'demo-tuned': the one shipped for that CLT); refuses a
    folder without one in one line."""
    directory = SHIPPED_FEATURES.get(str(directory), Path(directory))
    if not (directory / "features.json").is_file() or not (directory / "features.safetensors").is_file():
        raise CircuitsError(f"no feature scan in {directory}: run `circuits features` for this transcoder first")
    return directory


def features_for(clt_name: str | Path, clt: CrossLayerTranscoder) -> FeatureScan | None:
    """The scan in the transcoder's default features folder (for the shipped CLTs, the shipped one
    until `circuits features` writes one into the user cache), or None when there is none (pages
    then show no feature cards); a scan of another transcoder is refused."""
    directory = default_features_dir(clt_name)
    if not (directory / "features.json").exists() and str(clt_name) in SHIPPED_FEATURES:
        directory = SHIPPED_FEATURES[str(clt_name)]
    if not (directory / "features.json").exists():
        log.warning("no feature scan in %s: run `circuits features` for feature cards", directory)
        return None
    return load_features(directory, clt)


def default_features_dir(clt_name: str | Path) -> Path:
    """Where `circuits features` writes by default: a `features` folder inside a CLT directory;
    for any other name (the demo CLT, a preset, hf:..., saelens:...) a folder of the user cache,
    $XDG_CACHE_HOME/circuits/features/NAME (default ~/.cache): never into the installed package."""
    if Path(clt_name).is_dir() and str(clt_name) != "demo":
        return Path(clt_name) / "features"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "circuits" / "features" / re.sub(r"[^A-Za-z0-9._-]+", "_", str(clt_name))


# ---- the scan --------------------------------------------------------------------------------


@torch.no_grad()
def scan_features(
    model: HookedTransformer, clt: CrossLayerTranscoder, cfg: FeatureScanConfig, clt_name: str = "demo"
) -> FeatureScan:
    """Scan `cfg.n_documents` documents of `cfg.text`; see the module docstring."""
    check_fits(clt.cfg, model)
    source = TextSource(cfg.text, seed=cfg.seed, max_tokens_per_doc=cfg.max_tokens_per_doc)
    source.documents(0, 1)  # a source that cannot be read (hf: offline) fails here, before the progress bars
    L, F, k, W = clt.cfg.n_layers, clt.cfg.n_features, cfg.top_k, cfg.window
    top = _TopContexts(L, F, k, W)
    fired = torch.zeros(L, F)
    n_tokens = 0
    batches = range(0, cfg.n_documents, cfg.batch_size)
    for start in tqdm(batches, desc="features: top contexts", unit="batch"):
        tokens, keep, acts = _batch_acts(model, clt, source, start, min(cfg.batch_size, cfg.n_documents - start), cfg)
        n_tokens += int(keep.sum())
        for l in range(L):
            fired[l] += (acts[l] > 0).sum((0, 1))
            top.add(l, tokens.masked_fill(tokens == model.tokenizer.pad_token_id, -1), acts[l], cfg.before)
    max_activation = top.values[..., 0].clone()
    histogram = torch.zeros(L, F, cfg.n_bins, dtype=torch.int32)
    for start in tqdm(batches, desc="features: histograms", unit="batch"):
        _, _, acts = _batch_acts(model, clt, source, start, min(cfg.batch_size, cfg.n_documents - start), cfg)
        for l in range(L):
            histogram[l] += _histogram(acts[l], max_activation[l], cfg.n_bins)
    logit_ids, logit_values = output_logits(model, clt, cfg.n_logits)
    used = set(top.tokens[top.tokens >= 0].tolist()) | set(logit_ids.flatten().tolist())
    vocab = {i: model.to_single_str_token(i) for i in sorted(used)}
    scan = FeatureScan(
        config=cfg,
        clt_name=str(clt_name),
        clt_fingerprint=clt_fingerprint(clt),
        model_name=model.cfg.model_name,
        n_tokens=n_tokens,
        context_tokens=top.tokens,
        context_acts=top.acts.half(),
        context_max=top.values,
        histogram=histogram,
        max_activation=max_activation,
        frequency=fired / max(n_tokens, 1),
        logit_ids=logit_ids,
        logit_values=logit_values,
        vocab=vocab,
        labels=[],
    )
    scan.labels = [[auto_label(scan, l, f) for f in range(F)] for l in range(L)]
    return scan


def _batch_acts(model, clt, source: TextSource, start: int, count: int, cfg: FeatureScanConfig):
    """tokens [b, p], keep [b, p] (real tokens, not BOS/padding), acts [L, b, p, F] (zero off `keep`)."""
    docs = source.documents(start, count)
    tokens = model.to_tokens(docs, padding_side="right")[:, : cfg.max_tokens_per_doc]
    keep = token_mask(model, tokens)
    L = clt.cfg.n_layers
    names = {read_point(model, clt.cfg.input_hook, l)[0] for l in range(L)}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names, stop_at_layer=L)
    x = transcoder_inputs(model, clt.cfg, cache)  # [b, p, L, d]
    acts = torch.stack([clt.encode_layer(x[..., l, :], l) for l in range(L)])
    return tokens, keep, acts * keep[None, :, :, None]


class _TopContexts:
    """Running top-k documents per feature by their maximum activation, with a token window
    around that maximum. Windows that repeat a stronger one token for token are dropped (the demo
    corpus repeats its sentences; k copies of one context would say nothing more)."""

    def __init__(self, L: int, F: int, k: int, W: int):
        self.values = torch.zeros(L, F, k)
        self.tokens = torch.full((L, F, k, W), -1, dtype=torch.int32)
        self.acts = torch.zeros(L, F, k, W)
        self.mix = torch.randint(1, 2**62, (W,), generator=torch.Generator().manual_seed(0))  # window hash

    def add(self, layer: int, tokens: torch.Tensor, acts: torch.Tensor, before: int) -> None:
        """tokens [b, p] (-1 at padding), acts [b, p, F] of one layer."""
        b, p, F = acts.shape
        k, W = self.tokens.shape[-2:]
        peak, arg = acts.max(1)  # [b, F]
        pos = arg[..., None] - before + torch.arange(W)  # [b, F, W] window positions
        inside = (pos >= 0) & (pos < p)
        pos = pos.clamp(0, p - 1)
        win_tokens = torch.where(inside, tokens[:, None, :].expand(b, F, p).gather(2, pos), -1)
        win_acts = acts.transpose(1, 2).gather(2, pos) * inside  # [b, F, W]
        values = torch.cat([self.values[layer], peak.T], 1)  # [F, M = k + b]
        all_tokens = torch.cat([self.tokens[layer], win_tokens.transpose(0, 1).int()], 1)  # [F, M, W]
        all_acts = torch.cat([self.acts[layer], win_acts.transpose(0, 1)], 1)
        order = values.argsort(dim=1, descending=True)  # strongest first
        hashes = ((all_tokens.long() + 2) * self.mix).sum(-1).gather(1, order)  # [F, M], wraps around in int64
        M = hashes.shape[1]
        earlier = torch.ones(M, M, dtype=torch.bool).tril(-1)  # [i, j]: j comes before i
        repeat = ((hashes[:, :, None] == hashes[:, None, :]) & earlier).any(-1)  # [F, M]
        ranked = values.gather(1, order).masked_fill(repeat, 0.0)
        top = ranked.topk(k, dim=1)
        best = order.gather(1, top.indices)  # [F, k]
        self.values[layer] = top.values
        index = best[..., None].expand(-1, -1, W)
        self.tokens[layer] = all_tokens.gather(1, index)
        self.acts[layer] = all_acts.gather(1, index)


def _histogram(acts: torch.Tensor, max_activation: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Counts [F, n_bins] of the positive activations in acts [b, p, F], bins of width max / n_bins
    (a JumpReLU feature with a negative threshold can also output small negative values: not counted,
    as in `frequency`)."""
    F = acts.shape[-1]
    positive = acts > 0
    _, _, f = positive.nonzero(as_tuple=True)
    values = acts[positive]
    bins = (values / max_activation[f] * n_bins).ceil().long().clamp(1, n_bins) - 1
    return torch.bincount(f * n_bins + bins, minlength=F * n_bins).view(F, n_bins).int()


@torch.no_grad()
def output_logits(model: HookedTransformer, clt: CrossLayerTranscoder, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each feature's direct effect on the logits (see the module docstring): token ids and values
    [L, F, 2n], the n most promoted tokens then the n most suppressed (special tokens left out)."""
    ln = getattr(model, "ln_final", None)
    post_norm = has_post_norm(model, clt.cfg.output_hook)
    ids, values = [], []
    for l in range(clt.cfg.n_layers):
        writes = clt.W_dec[l]  # [F, T, d]: every target layer's write reaches the unembedding
        if post_norm:  # written before each target layer's norm after the MLP
            targets = range(l, l + writes.shape[1]) if clt.cfg.cross_layer else [l]
            posts = [model.blocks[t].ln2_post for t in targets]
            writes = torch.stack([_norm_linear(post, writes[:, k]) for k, post in enumerate(posts)], 1)
        direction = _norm_linear(ln, writes.sum(1))  # [F, d]
        logits = direction @ model.W_U  # [F, vocab]
        logits = logits - logits.mean(-1, keepdim=True)
        special = torch.zeros(logits.shape[-1], dtype=torch.bool)
        special[model.tokenizer.all_special_ids] = True  # <pad>, <bos>, ... are no readable output
        top = logits.masked_fill(special, -torch.inf).topk(n, dim=-1).indices
        bottom = (-logits).masked_fill(special, -torch.inf).topk(n, dim=-1).indices
        order = torch.cat([top, bottom], -1)
        ids.append(order.int())
        values.append(logits.gather(-1, order))
    return torch.stack(ids), torch.stack(values)


def _norm_linear(norm, v: torch.Tensor) -> torch.Tensor:
    """A TransformerLens norm's linear part, its scale aside, on v [..., d]: centred (LayerNorm),
    times its weight (if it has one). No norm (None): v."""
    if norm is not None and norm.__class__.__name__.startswith("LayerNorm"):
        v = v - v.mean(-1, keepdim=True)
    return v * norm.w if hasattr(norm, "w") else v


def auto_label(scan: FeatureScan, layer: int, feature: int) -> str:
    """A short label: the tokens it peaks on in its top contexts, then the logits it promotes,
    e.g. `"Dallas" → Texas, Austin`."""
    before = scan.config.before
    peaks = Counter(
        scan.vocab[int(tokens[before])]
        for tokens, peak in zip(scan.context_tokens[layer, feature], scan.context_max[layer, feature], strict=True)
        if peak > 0
    )
    if not peaks:
        return "inactive on the corpus"
    (first, count), *rest = peaks.most_common(2)
    on = f'"{first}"' if count * 2 >= peaks.total() or not rest else f'"{first}"/"{rest[0][0]}"'
    promoted = [scan.vocab[int(i)] for i in scan.logit_ids[layer, feature, :2]]
    return f"{on} → {', '.join(promoted)}"
