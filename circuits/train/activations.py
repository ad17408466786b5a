"""The activation stream for transcoder training: (input, output) pairs of every layer at the
transcoder's own hooks (`CLTConfig.input_hook`, `output_hook`; see `circuits.attribution.splice`),
read from the model on the fly and served in shuffled batches.

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
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from transformer_lens import HookedTransformer

from circuits.attribution.norms import has_post_norm
from circuits.attribution.splice import io_names, read_point, transcoder_inputs, transcoder_outputs
from circuits.errors import CircuitsError
from circuits.fileio import atomic_file, write_json
from circuits.processing import weight_processing
from circuits.text import TextSource, document_tokens, token_mask
from circuits.train.parallel import Comm
from circuits.transcoders.clt import CLTConfig


@torch.no_grad()
def collect(
    model: HookedTransformer, cfg: CLTConfig, docs: list[str], max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `docs` through the model's blocks (not the unembedding); return (x, y), each [n_tokens, L, d]:
    every layer's value at the transcoder's input and output hooks, at every real token (BOS and
    padding excluded)."""
    tokens = document_tokens(model, docs, max_tokens)  # [batch, pos]
    keep = token_mask(model, tokens)
    L = model.cfg.n_layers
    if not has_post_norm(model, cfg.output_hook):
        names = io_names(model, cfg)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names, stop_at_layer=L)
        return transcoder_inputs(model, cfg, cache)[keep], transcoder_outputs(model, cfg, cache)[keep]
    names = {read_point(model, cfg.input_hook, l)[0] for l in range(L)}
    with _mlp_outputs(model) as outs:  # mlp.hook_out before the norm after the MLP: as the MLPs return it
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names, stop_at_layer=L)
    return transcoder_inputs(model, cfg, cache)[keep], torch.stack(outs, -2)[keep]


@contextmanager
def _mlp_outputs(model: HookedTransformer) -> Iterator[list[torch.Tensor]]:
    """Each block's MLP output [batch, pos, d] in layer order, as its forward returns it (no TransformerLens
    hook sees it before the norm after the MLP): what `transcoder_outputs` recomputes, without a second pass."""
    outs: list[torch.Tensor] = []
    handles = [block.mlp.register_forward_hook(lambda m, args, out: outs.append(out)) for block in model.blocks]
    try:
        yield outs
    finally:
        for handle in handles:
            handle.remove()


def shuffled_chunk(
    model: HookedTransformer, cfg: CLTConfig, source: TextSource, docs_per_chunk: int, c: int, comm: Comm | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk c's activations (x, y) [n, L, d]: every training token of documents
    [c * docs_per_chunk, (c + 1) * docs_per_chunk), rows shuffled by (seed, c). Under torchrun
    (`comm`), rank r runs only its contiguous 1/N of the documents and the ranks all-gather the
    rows in rank order: the same rows as one process, with no forward pass repeated."""
    comm = comm or Comm()
    docs = source.documents(c * docs_per_chunk, docs_per_chunk)
    share = -(-len(docs) // comm.world)
    x, y = collect(model, cfg, docs[comm.rank * share : (comm.rank + 1) * share], source.max_tokens_per_doc)
    x, y = comm.all_rows(x), comm.all_rows(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(source.seed * 1_000_003 + c))
    return x[perm].contiguous(), y[perm].contiguous()


class ActivationStream:
    """Shuffled batches of (x, y) [batch_tokens, L, d] at the hooks of transcoder config `cfg`,
    deterministic by (seed, step). Under torchrun (`comm`), each rank runs its share of every
    chunk's documents through the model and the ranks exchange the activations.

    With `cache_dir`, each chunk's shuffled activations are kept as a safetensors shard
    (`chunk_{c}.safetensors`) and read back by later runs with the same model, hooks and text
    settings, so a hyperparameter sweep runs the model once."""

    def __init__(
        self, model: HookedTransformer, cfg: CLTConfig, source: TextSource, batch_tokens: int,
        docs_per_chunk: int = 512, cache_dir: Path | None = None, comm: Comm | None = None,
    ):  # fmt: skip
        self.model, self.cfg, self.source, self.comm = model, cfg, source, comm or Comm()
        self.batch_tokens, self.docs_per_chunk = batch_tokens, docs_per_chunk
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self._check_cache()

    def _check_cache(self) -> None:
        key = {
            "model": self.model.cfg.model_name, "model_processing": weight_processing(self.model),
            "input_hook": self.cfg.input_hook, "output_hook": self.cfg.output_hook,
            **asdict(self.source), "docs_per_chunk": self.docs_per_chunk,
        }  # fmt: skip
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
        x, y = shuffled_chunk(self.model, self.cfg, self.source, self.docs_per_chunk, c, self.comm)
        if shard and self.comm.is_main:
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


def held_out(
    model: HookedTransformer, cfg: CLTConfig, source: TextSource, n_docs: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (x, y) [n_tokens, L, d] of held-out documents at the hooks of `cfg`."""
    return collect(model, cfg, held_out_documents(source, n_docs), source.max_tokens_per_doc)


def held_out_tokens(
    model: HookedTransformer, source: TextSource, n_docs: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [batch, pos] of held-out documents and the mask [batch, pos] of those that count."""
    tokens = document_tokens(model, held_out_documents(source, n_docs), source.max_tokens_per_doc)
    return tokens, token_mask(model, tokens)
