"""An activation store: a model's activations at a transcoder's hooks, written once
(`circuits.train.store_writer`, the `circuits activations` command) and read here by any number of
training runs (`ActivationStore`, a recipe's `activations = "DIR"`) without loading the model.

    DIR/manifest.json              the model, its weight processing, hooks, text source, dtype,
                                   shard sizes and normalisation statistics; written last, so a
                                   store without one is incomplete (writing it again completes it)
    DIR/shard_{c:06d}.safetensors  x, y [n, L, d]: the tokens of documents
                                   [c * docs_per_chunk, (c + 1) * docs_per_chunk), shuffled
    DIR/held_out.safetensors       x, y [n, L, d] of held-out documents (the metrics)

Runs read the shards in an order that is a pure function of (seed, step): epoch e visits the shards
in a permutation drawn from (seed, e), each shard's rows permuted by (seed, e, shard), so a resumed
run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from circuits.errors import CircuitsError
from circuits.text import TextSource
from circuits.transcoders.clt import CLTConfig

FORMAT = "circuits-activations/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ActivationStore:
    """A store written by `write_store`: its manifest, batches and held-out data."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        path = self.directory / "manifest.json"
        if not path.is_file():
            raise CircuitsError(
                f"{self.directory} is not a complete activation store (no manifest.json): "
                "write it with `circuits activations RECIPE --out DIR`"
            )
        self.manifest = json.loads(path.read_text(encoding="utf-8"))
        if self.manifest.get("format") != FORMAT:
            raise CircuitsError(f"{path} is not a {FORMAT} manifest: write the store again")
        self.rows = [s["rows"] for s in self.manifest["shards"]]

    def clt_config(self, transcoder) -> CLTConfig:
        """The transcoder's full config (a recipe's `TranscoderConfig`) at this store's model and hooks;
        raises CircuitsError if the recipe asks for other hooks."""
        m = self.manifest
        asked, stored = (transcoder.input_hook, transcoder.output_hook), (m["input_hook"], m["output_hook"])
        if asked != stored:
            raise CircuitsError(
                f"the recipe's hooks {' -> '.join(asked)} are not the store's {' -> '.join(stored)}: "
                "set them as the store has them, or write another store"
            )
        return CLTConfig(
            n_layers=m["n_layers"], d_model=m["d_model"], model_name=m["model"],
            model_processing=m["model_processing"], **asdict(transcoder),
        )  # fmt: skip

    def text_source(self) -> TextSource:
        return TextSource(**self.manifest["text"])

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors [L] that give the stored x and y a mean norm of sqrt(d) per layer (`Scales`)."""
        stats, d = self.manifest["statistics"], self.manifest["d_model"]
        return d**0.5 / torch.tensor(stats["x_mean_norm"]), d**0.5 / torch.tensor(stats["y_mean_norm"])

    def held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out activations (x, y) [n, L, d] in float32."""
        tensors = load_file(str(self.directory / self.manifest["held_out"]["file"]))
        return tensors["x"].float(), tensors["y"].float()

    def _shard(self, i: int, epoch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = load_file(str(self.directory / self.manifest["shards"][i]["file"]))
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + i)
        perm = torch.randperm(self.rows[i], generator=g)
        return tensors["x"][perm].float(), tensors["y"][perm].float()

    def _order(self, epoch: int, seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def batches(self, batch_tokens: int, seed: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches (x, y) [batch_tokens, L, d] float32 from `start_step` on, for ever (epoch after
        epoch); step k is the same batch in every run with this seed. Each batch lies in one shard."""
        if min(self.rows) < batch_tokens:
            raise CircuitsError(
                f"the store's smallest shard holds {min(self.rows)} tokens, fewer than one batch of {batch_tokens}: "
                "lower batch_tokens or write the store with a larger docs_per_chunk"
            )
        per_epoch = sum(n // batch_tokens for n in self.rows)
        epoch, skip = divmod(start_step, per_epoch)
        while True:
            for i in self._order(epoch, seed):
                n = self.rows[i] // batch_tokens
                if skip >= n:  # a whole shard before the start: not read
                    skip -= n
                    continue
                x, y = self._shard(i, epoch, seed)
                for b in range(skip, n):
                    yield x[b * batch_tokens : (b + 1) * batch_tokens], y[b * batch_tokens : (b + 1) * batch_tokens]
                skip = 0
            epoch += 1
