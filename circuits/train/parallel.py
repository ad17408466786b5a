"""Training across processes launched by `torchrun`: data parallel or feature parallel.

- `data`: every rank holds the whole CLT and trains on its slice of each global batch, its objective
  wrapped in torch's `DistributedDataParallel`, which averages the gradients across ranks during the
  backward (each rank's loss is normalised by its own rows, so the average is the single-process
  gradient).
- `feature`: rank r owns features [r F/N, (r+1) F/N) of every layer (encoder rows, thresholds,
  decoder rows); b_dec and W_skip are replicated. Each rank's slice of the batch is all-gathered
  so every rank encodes every token with its own features; the partial reconstructions are
  reduce-scattered so each rank gets the full reconstruction of its own tokens (torch.distributed
  collectives). The CLT and its optimiser state take 1/N of the memory on each rank.

Every rank reads the same global batch and keeps its slice, so the data order does not depend on
the number of processes. Generating activations on the fly, each rank runs its own 1/N of every
chunk's documents through the model and the ranks all-gather the results (`Comm.all_rows`); an
activation store is read, not generated.

Both give the single-process run's weights (up to float summation order). A single process uses
`Comm` with world size 1, where every method is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from circuits.errors import CircuitsError

REPLICATED = ("b_dec", "W_skip")


def feature_dim(name: str) -> int | None:
    """The dimension that indexes features in CLT parameter `name` (None: replicated)."""
    if name in REPLICATED:
        return None
    return 0 if name.startswith("W_dec.") else 1


class _ReduceScatterRows(torch.autograd.Function):
    """Sum a [world * n, ...] tensor over ranks and keep this rank's n rows; the backward
    all-gathers the row gradients (each rank's loss reads only its own rows)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        ctx.world = world
        n = len(partial) // world
        if dist.get_backend() == "nccl":
            out = partial.new_empty(n, *partial.shape[1:])
            dist.reduce_scatter_tensor(out, partial.contiguous())
            return out
        total = partial.contiguous().clone()  # gloo has no reduce-scatter
        dist.all_reduce(total)
        return total[rank * n : (rank + 1) * n]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = grad.new_empty(ctx.world * len(grad), *grad.shape[1:])
        dist.all_gather_into_tensor(full, grad.contiguous())
        return full, None, None


@dataclass
class Comm:
    mode: str = "single"
    """single | data | feature"""
    rank: int = 0
    world: int = 1

    @classmethod
    @contextmanager
    def opened(cls, parallel: str, device: str) -> Iterator[Comm]:
        """The run's communicator for the length of a with-block: from torchrun's environment, else
        a single process. A process group it starts is destroyed at the end: a gloo group left to
        the interpreter's exit can abort the process ("terminate called without an active
        exception", SIGABRT) after the work is done."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            yield cls()
            return
        if parallel not in ("data", "feature"):
            raise CircuitsError(f"unknown parallel mode {parallel!r}: use 'data' or 'feature'")
        started = not dist.is_initialized()
        if started:
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        try:
            yield cls(parallel, dist.get_rank(), world)
        finally:
            if started:
                dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch [N n, ...] -> [n, ...]."""
        if self.mode == "single":
            return x
        n = len(x) // self.world
        return x[self.rank * n : (self.rank + 1) * n]

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Feature mode: every rank's rows [n, ...] -> the global batch [N n, ...]."""
        if self.mode != "feature":
            return x
        full = x.new_empty(self.world * len(x), *x.shape[1:])
        dist.all_gather_into_tensor(full, x.contiguous())
        return full

    def reduce_rows(self, partial: torch.Tensor) -> torch.Tensor:
        """Feature mode: sum partial reconstructions [N n, ...] over ranks, keep own rows [n, ...]."""
        if self.mode != "feature":
            return partial
        return _ReduceScatterRows.apply(partial, self.rank, self.world)

    def all_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows [n_r, ...] (n_r may differ between ranks), concatenated in rank order."""
        if self.world == 1:
            return x
        sizes = [x.new_zeros(1, dtype=torch.long) for _ in range(self.world)]
        dist.all_gather(sizes, x.new_tensor([len(x)], dtype=torch.long))
        padded = x.new_zeros(int(max(sizes)), *x.shape[1:])
        padded[: len(x)] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)])

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def shard(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a full CLT state dict (or of tensors shaped like its parameters)."""
        if self.mode != "feature":
            return state
        out = {}
        for name, v in state.items():
            dim = feature_dim(name)
            out[name] = v if dim is None else v.chunk(self.world, dim)[self.rank].clone()
        return out

    def gather(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full state dict from every rank's shard (a collective: every rank calls it)."""
        if self.mode != "feature":
            return state
        out = {}
        for name, v in state.items():
            dim = feature_dim(name)
            if dim is None:
                out[name] = v
                continue
            parts = [torch.empty_like(v) for _ in range(self.world)]
            dist.all_gather(parts, v.contiguous())
            out[name] = torch.cat(parts, dim)
        return out

    def sync_grads(self, named_params) -> None:
        """Feature mode: sum the replicated parameters' gradients across ranks. (In data mode
        DistributedDataParallel averages every gradient during the backward.)"""
        if self.mode != "feature":
            return
        for name, p in named_params:
            if p.grad is not None and feature_dim(name) is None:
                dist.all_reduce(p.grad)

    def grad_norm(self, named_params) -> torch.Tensor:
        """The global gradient norm (every shard once, replicated parameters once)."""
        sharded, replicated = 0.0, 0.0
        for name, p in named_params:
            if p.grad is None:
                continue
            sq = p.grad.detach().float().square().sum()
            if self.mode == "feature" and feature_dim(name) is not None:
                sharded = sharded + sq
            else:
                replicated = replicated + sq
        if self.mode == "feature":
            sharded = torch.as_tensor(sharded)
            dist.all_reduce(sharded)
        return torch.sqrt(torch.as_tensor(sharded) + replicated)

    def max_int(self, value: int) -> int:
        """The largest of every rank's `value` (a collective with more than one process)."""
        if self.world == 1:
            return value
        t = torch.tensor([value])
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def global_l0(self, l0: torch.Tensor) -> torch.Tensor:
        """The whole CLT's L0 [L] on the global batch from this rank's: the mean over ranks' tokens
        (data), the sum over ranks' features (feature)."""
        if self.mode == "single":
            return l0
        total = l0.detach().clone()
        dist.all_reduce(total)
        return total / self.world if self.mode == "data" else total

    def any_rank(self, mask: torch.Tensor) -> torch.Tensor:
        """Data mode: a bool mask OR-ed over ranks (features that fired anywhere)."""
        if self.mode != "data":
            return mask
        m = mask.to(torch.uint8)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        return m.bool()
