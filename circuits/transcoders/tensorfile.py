"""Tensors in transcoder files, read without copying where the format allows.

safetensors: every tensor is a view of a private (copy-on-write) memory map of its file, so
reading costs nothing until a page is touched, and writing to the tensor never changes the file.
`.npz` (GemmaScope): numpy.load(path, allow_pickle=False), member by member; a zip member cannot
be mapped through numpy, so these arrays are read into memory.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from circuits.errors import CircuitsError
from circuits.fileio import atomic_file


def _missing(path: Path) -> CircuitsError:
    return CircuitsError(f"{path} is missing: the transcoder directory is incomplete")


def _corrupt(path: Path, error: Exception) -> CircuitsError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CircuitsError(f"{path} is corrupt or truncated ({reason}): re-download or re-write it")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor in a safetensors file, from its header alone."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise _missing(path)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise _corrupt(path, e) from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a memory-mapped CPU tensor in the file's dtype."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise _missing(path)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise _corrupt(path, e) from None


def require(tensors: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    """tensors[key], or a one-line error naming the file."""
    if key not in tensors:
        raise CircuitsError(f"{path} has no tensor {key!r} (it has {sorted(tensors)}): the files are inconsistent")
    return tensors[key]


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write CPU copies of `tensors` to `path` atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    with atomic_file(path, "wb") as f:
        f.write(data)


def read_npz(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Arrays of an `.npz` file (all, or `keys`) as CPU tensors; never unpickles anything."""
    if not Path(path).is_file():
        raise _missing(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = npz.files if keys is None else [k for k in keys if k in npz.files]
            return {k: torch.from_numpy(npz[k]) for k in names}
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise _corrupt(path, e) from None


def npz_keys(path: Path) -> list[str]:
    """Names of the arrays in an `.npz` file."""
    if not Path(path).is_file():
        raise _missing(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return list(npz.files)
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise _corrupt(path, e) from None
