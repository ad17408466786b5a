"""The activation stream for transcoder training: (resid_mid, mlp_out) pairs of every layer,
read from model hooks on the fly and served in shuffled batches.

Text comes from the demo corpus (default), a local .txt (one document per line) or .jsonl
(a "text" field per line) file, or a Hugging Face dataset name (streamed; needs a hub).
The stream is a pure function of (seed, chunk index): chunk c holds the activations of
documents [c * docs_per_chunk, (c + 1) * docs_per_chunk), shuffled by a generator seeded with
(seed, c). A run resumed at any step therefore sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from transformer_lens import HookedTransformer

from circuits.errors import CircuitsError
from circuits.formats import atomic_file


@dataclass
class TextSource:
    name: str = "demo"
    """'demo', a path to a .txt/.jsonl file, or a Hugging Face dataset name ('hf:NAME')."""
    seed: int = 0
    max_tokens_per_doc: int = 64

    def documents(self, start: int, count: int) -> list[str]:
        """Documents [start, start + count) of this source, cycling over finite sources."""
        if self.name == "demo":
            from circuits.demo.corpus import generate_documents

            # Documents are generated in blocks of 1,000 so that any range is cheap and fixed.
            first, last = start // 1000, (start + count - 1) // 1000
            docs = [d for b in range(first, last + 1) for d in generate_documents(1000, seed=self.seed * 100_003 + b)]
            return docs[start - first * 1000 : start - first * 1000 + count]
        if self.name.startswith("hf:"):
            return _hf_documents(self.name[3:], start, count)
        return _file_documents(Path(self.name), start, count)


def _file_documents(path: Path, start: int, count: int) -> list[str]:
    if not path.is_file():
        raise CircuitsError(f"text source {str(path)!r} is not a file: pass 'demo', a .txt/.jsonl file or 'hf:NAME'")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        lines = [json.loads(line)["text"] for line in lines]
    if not lines:
        raise CircuitsError(f"text source {str(path)!r} holds no documents")
    return [lines[i % len(lines)] for i in range(start, start + count)]


@functools.cache
def _hf_stream(dataset: str) -> dict:
    """A streamed dataset's iterator and how many rows it has yielded."""
    return {"position": 0, "rows": None}


def _hf_documents(dataset: str, start: int, count: int) -> list[str]:
    from datasets import load_dataset

    stream = _hf_stream(dataset)
    if stream["rows"] is None or stream["position"] > start:  # reads go forward; restart otherwise
        stream["rows"], stream["position"] = iter(load_dataset(dataset, split="train", streaming=True)), 0
    rows = itertools.islice(stream["rows"], start - stream["position"], start - stream["position"] + count)
    docs = [row["text"] for row in rows]
    stream["position"] = start + len(docs)
    return docs


def token_mask(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, pos] bool: the tokens that train a transcoder (not BOS, not padding)."""
    keep = tokens != model.tokenizer.pad_token_id
    keep[:, 0] = False
    if model.tokenizer.bos_token_id is not None:
        keep &= tokens != model.tokenizer.bos_token_id
    return keep


def document_tokens(model: HookedTransformer, docs: list[str], max_tokens: int) -> torch.Tensor:
    """Tokens [batch, pos] of documents, BOS first, right-padded, cut to `max_tokens`."""
    return model.to_tokens(docs, padding_side="right")[:, :max_tokens]


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
        with atomic_file(meta) as f:
            json.dump(key, f)

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
