"""An activation store: a model's activations at a transcoder's hooks, written once
(`write_store`, the `circuits activations` command) and read by any number of training runs
(`ActivationStore`, a recipe's `activations = "DIR"`) without loading the model.

    DIR/manifest.json              the model, its weight processing, hooks, text source, dtype,
                                   shard sizes and normalisation statistics; written last, so a
                                   store without one is incomplete (writing it again completes it)
    DIR/shard_{c:06d}.safetensors  x, y [n, L, d]: the tokens of documents
                                   [c * docs_per_chunk, (c + 1) * docs_per_chunk), shuffled
    DIR/held_out.safetensors       x, y [n, L, d] of held-out documents (the metrics)

Runs read the shards in an order that is a pure function of (seed, step): epoch e visits the shards
in a permutation drawn from (seed, e), each shard's rows permuted by (seed, e, shard), so a resumed
run sees exactly the batches it would have seen. Under torchrun, rank r writes shards c = r mod N:
no rank repeats another's forward passes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from circuits.errors import CircuitsError
from circuits.fileio import atomic_file, write_json
from circuits.models import check_device, load_model
from circuits.processing import weight_processing
from circuits.text import TextSource, document_tokens, token_mask
from circuits.train.activations import held_out, shuffled_chunk
from circuits.train.objective import Scales
from circuits.train.parallel import Comm
from circuits.transcoders.clt import CLTConfig

if TYPE_CHECKING:  # in annotations only
    from transformer_lens import HookedTransformer

    from circuits.train.config import TrainConfig

log = logging.getLogger(__name__)

FORMAT = "circuits-activations/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def write_store(
    cfg: TrainConfig, out: Path, tokens: int, dtype: str = "float32", model: HookedTransformer | None = None
) -> Path:
    """Write at least `tokens` training tokens of the recipe's model, text and hooks to `out`
    (plus `cfg.eval_docs` held-out documents), stored as `dtype` (float32 | bfloat16). Shards
    already written by an interrupted call are kept. Returns the manifest's path (rank 0)."""
    out = Path(out)
    if dtype not in DTYPES:
        raise CircuitsError(f"activation dtype {dtype!r} is not supported: use {' or '.join(DTYPES)}")
    if (out / "manifest.json").exists():
        raise CircuitsError(f"{out} already holds an activation store: write to another directory")
    check_device(cfg.device)
    comm = Comm.from_env("data", cfg.device)
    model = model or load_model(cfg.model, device=cfg.device)
    clt_cfg = cfg.clt_config(model)  # refuses hooks that do not fit the model, before any work
    source = TextSource(cfg.text, seed=cfg.seed, max_tokens_per_doc=cfg.max_tokens_per_doc)
    n_chunks = _chunks_for(model, source, cfg.docs_per_chunk, tokens)
    mine = range(comm.rank, n_chunks, comm.world)
    for c in tqdm(mine, desc="activations", unit="shard", disable=not comm.is_main):
        shard = out / f"shard_{c:06d}.safetensors"
        if not shard.exists():
            x, y = shuffled_chunk(model, clt_cfg, source, cfg.docs_per_chunk, c)
            _write_shard(shard, x.to(DTYPES[dtype]), y.to(DTYPES[dtype]))
    if comm.is_main:
        x, y = held_out(model, clt_cfg, source, cfg.eval_docs)
        _write_shard(out / "held_out.safetensors", x.to(DTYPES[dtype]), y.to(DTYPES[dtype]))
    comm.barrier()
    if not comm.is_main:
        return out / "manifest.json"
    files = [f"shard_{c:06d}.safetensors" for c in range(n_chunks)]
    sizes = [_rows(out / f) for f in files]
    sums = [json.loads(_meta(out / f)["norm_sums"]) for f in files]
    manifest = {
        "format": FORMAT,
        "model": cfg.model,
        "model_processing": weight_processing(model),
        "n_layers": clt_cfg.n_layers,
        "d_model": clt_cfg.d_model,
        "input_hook": clt_cfg.input_hook,
        "output_hook": clt_cfg.output_hook,
        "text": asdict(source),
        "docs_per_chunk": cfg.docs_per_chunk,
        "dtype": dtype,
        "shards": [{"file": f, "rows": n} for f, n in zip(files, sizes, strict=True)],
        "held_out": {"file": "held_out.safetensors", "rows": _rows(out / "held_out.safetensors")},
        "statistics": {  # mean ||x|| and ||y|| per layer over every stored training token
            "x_mean_norm": [sum(s["x"][l] for s in sums) / sum(sizes) for l in range(clt_cfg.n_layers)],
            "y_mean_norm": [sum(s["y"][l] for s in sums) / sum(sizes) for l in range(clt_cfg.n_layers)],
        },
    }
    write_json(out / "manifest.json", manifest, indent=2)
    return out / "manifest.json"


def _chunks_for(model: HookedTransformer, source: TextSource, docs_per_chunk: int, tokens: int) -> int:
    """How many chunks of documents hold `tokens` training tokens (from the tokenizer alone)."""
    n_chunks, total = 0, 0
    while total < tokens:
        docs = source.documents(n_chunks * docs_per_chunk, docs_per_chunk)
        total += int(token_mask(model, document_tokens(model, docs, source.max_tokens_per_doc)).sum())
        n_chunks += 1
    return n_chunks


def _write_shard(path: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    """x, y [n, L, d] to a safetensors file (atomically), with each layer's sum of norms in its metadata."""
    norm_sums = {"x": x.float().norm(dim=-1).sum(0).tolist(), "y": y.float().norm(dim=-1).sum(0).tolist()}
    with atomic_file(path, "wb") as f:
        f.write(save({"x": x.contiguous(), "y": y.contiguous()}, metadata={"norm_sums": json.dumps(norm_sums)}))


def _meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _rows(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return f.get_slice("x").get_shape()[0]


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

    def scales(self) -> Scales:
        """The factors that give the stored x and y a mean norm of sqrt(d) per layer."""
        stats, d = self.manifest["statistics"], self.manifest["d_model"]
        return Scales(d**0.5 / torch.tensor(stats["x_mean_norm"]), d**0.5 / torch.tensor(stats["y_mean_norm"]))

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
