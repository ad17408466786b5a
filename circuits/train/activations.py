"""The activation stream for transcoder training: (resid_mid, mlp_out) pairs of every layer,
read from model hooks on the fly and served in shuffled batches.

Text comes from the demo corpus (default), a local .txt (one document per line) or .jsonl
(a "text" field per line) file, or a Hugging Face dataset name (streamed; needs a hub and the
`datasets` package: pip install "circuits-tracer[hf]").
The stream is a pure function of (seed, chunk index): chunk c holds the activations of
documents [c * docs_per_chunk, (c + 1) * docs_per_chunk), shuffled by a generator seeded with
(seed, c). A run resumed at any step therefore sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from transformer_lens import HookedTransformer

from circuits.errors import CircuitsError
from circuits.fileio import atomic_file, write_json
from circuits.text import TextSource, document_tokens, token_mask


@torch.no_grad()
def collect(model: HookedTransformer, docs: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `docs` through the model; return (x, y), each [n_tokens, L, d]: every layer's
    resid_mid and mlp_out at every real token (BOS and padding excluded)."""
    L = model.cfg.n_layers
    tokens = document_tokens(model, docs, max_tokens)  # [batch, pos]
    names = [f"blocks.{l}.hook_resid_mid" for l in range(L)] + [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    keep = token_mask(model, tokens)
    x = torch.stack([cache[f"blocks.{l}.hook_resid_mid"][keep] for l in range(L)], dim=1)
    y = torch.stack([cache[f"blocks.{l}.hook_mlp_out"][keep] for l in range(L)], dim=1)
    return x, y


class ActivationStream:
    """Shuffled batches of (x, y) [batch_tokens, L, d], deterministic by (seed, step).

    With `cache_dir`, each chunk's shuffled activations are kept as a safetensors shard
    (`chunk_{c}.safetensors`) and read back by later runs with the same text settings, so a
    hyperparameter sweep runs the model once."""

    def __init__(
        self, model: HookedTransformer, source: TextSource, batch_tokens: int, docs_per_chunk: int = 512,
        cache_dir: Path | None = None,
    ):  # fmt: skip
        self.model, self.source = model, source
        self.batch_tokens, self.docs_per_chunk = batch_tokens, docs_per_chunk
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self._check_cache()

    def _check_cache(self) -> None:
        key = {"model": self.model.cfg.model_name, **asdict(self.source), "docs_per_chunk": self.docs_per_chunk}
        meta = self.cache_dir / "cache.json"
        if meta.exists() and json.loads(meta.read_text()) != key:
            raise CircuitsError(
                f"activation cache {self.cache_dir} was made with other settings ({meta.read_text().strip()}): "
                "use another directory"
            )
        write_json(meta, key)

    def _load_chunk(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard = self.cache_dir / f"chunk_{c:06d}.safetensors" if self.cache_dir else None
        if shard and shard.exists():
            tensors = load_file(str(shard))
            return tensors["x"], tensors["y"]
        docs = self.source.documents(c * self.docs_per_chunk, self.docs_per_chunk)
        x, y = collect(self.model, docs, self.source.max_tokens_per_doc)
        g = torch.Generator().manual_seed(self.source.seed * 1_000_003 + c)
        perm = torch.randperm(len(x), generator=g)
        x, y = x[perm].contiguous(), y[perm].contiguous()
        if shard:
            with atomic_file(shard, "wb") as f:
                f.write(save({"x": x, "y": y}))
        return x, y

    def _n_batches(self, c: int) -> int:
        """Batches in chunk c, from the tokenizer alone (no forward pass)."""
        docs = self.source.documents(c * self.docs_per_chunk, self.docs_per_chunk)
        tokens = document_tokens(self.model, docs, self.source.max_tokens_per_doc)
        n_tokens = int(token_mask(self.model, tokens).sum())
        if n_tokens < self.batch_tokens:
            raise CircuitsError("a chunk of documents holds fewer tokens than one batch: lower batch_tokens")
        return n_tokens // self.batch_tokens

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from `start_step` on; step k is the same batch in every run."""
        c, step = 0, 0
        while step + self._n_batches(c) <= start_step:  # skip whole chunks without running the model
            step += self._n_batches(c)
            c += 1
        while True:
            x, y = self._load_chunk(c)
            for i in range(len(x) // self.batch_tokens):
                if step >= start_step:
                    sl = slice(i * self.batch_tokens, (i + 1) * self.batch_tokens)
                    yield x[sl], y[sl]
                step += 1
            c += 1


def held_out_documents(source: TextSource, n_docs: int) -> list[str]:
    """Documents never used for training: the demo corpus drawn with another seed; file and
    dataset sources read far from the training start."""
    other = TextSource(source.name, seed=source.seed + 7919, max_tokens_per_doc=source.max_tokens_per_doc)
    return other.documents(0 if source.name == "demo" else 10**6, n_docs)


def held_out(model: HookedTransformer, source: TextSource, n_docs: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (x, y) [n_tokens, L, d] of held-out documents."""
    return collect(model, held_out_documents(source, n_docs), source.max_tokens_per_doc)


def held_out_tokens(
    model: HookedTransformer, source: TextSource, n_docs: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [batch, pos] of held-out documents and the mask [batch, pos] of those that count."""
    tokens = document_tokens(model, held_out_documents(source, n_docs), source.max_tokens_per_doc)
    return tokens, token_mask(model, tokens)
