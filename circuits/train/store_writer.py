"""Write an activation store (the format read by `circuits.train.store`): `write_store`, the
`circuits activations` command. Under torchrun, rank r writes shards c = r mod N: no rank repeats
another's forward passes; rank 0 writes the held-out data and, once every rank is done, the manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from circuits.errors import CircuitsError
from circuits.fileio import atomic_file, write_json
from circuits.models import check_device, load_model
from circuits.processing import weight_processing
from circuits.text import TextSource, document_tokens, token_mask
from circuits.train.activations import held_out, shuffled_chunk
from circuits.train.parallel import Comm
from circuits.train.store import DTYPES, FORMAT

if TYPE_CHECKING:  # in annotations only
    from transformer_lens import HookedTransformer

    from circuits.train.config import TrainConfig


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
    with Comm.opened("data", cfg.device) as comm:
        return _write(cfg, comm, out, tokens, dtype, model or load_model(cfg.model, device=cfg.device))


def _write(cfg: TrainConfig, comm: Comm, out: Path, tokens: int, dtype: str, model: HookedTransformer) -> Path:
    """This rank's shards, rank 0's held-out documents, then (rank 0) the manifest."""
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
