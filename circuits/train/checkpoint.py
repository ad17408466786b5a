"""A training run's state on disk, so that a killed run resumes exactly where its last checkpoint
left it: `out/checkpoint/` holds the whole CLT (gathered from every rank), Adam's moments, the
normalising scales, each feature's last firing step, the RNG state and the step, written
atomically. `truncate_metrics` drops the metrics a resumed run will log again."""

from __future__ import annotations

import dataclasses
import glob
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from circuits.errors import CircuitsError
from circuits.fileio import atomic_directory, atomic_file, surviving_directory
from circuits.train.parallel import Comm
from circuits.transcoders.clt import CrossLayerTranscoder

if TYPE_CHECKING:  # in annotations only
    from circuits.train.config import TrainConfig
    from circuits.train.objective import Scales, SparsityControl


def save_checkpoint(
    path: Path, clt: CrossLayerTranscoder, opt: torch.optim.Optimizer, scales: Scales, step: int, cfg: TrainConfig,
    last_fired: torch.Tensor, comm: Comm, sparsity: SparsityControl,
) -> None:  # fmt: skip
    """Write the full training state (gathered from every rank; rank 0 writes) atomically."""
    names = [k for k, _ in clt.named_parameters()]
    tensors = {f"clt.{k}": v.detach() for k, v in comm.gather(dict(clt.named_parameters())).items()}
    opt_state = opt.state_dict()
    for i, name in enumerate(names):
        for k, v in opt_state["state"].get(i, {}).items():
            tensors[f"opt.{k}.{name}"] = comm.gather({name: v})[name] if v.dim() else v
    tensors["last_fired"] = comm.gather({"b_enc": last_fired})["b_enc"]  # [L, F]: features on dim 1, like b_enc
    tensors.update({"scales.inp": scales.inp, "scales.out": scales.out, "rng.torch": torch.get_rng_state()})
    tensors["sparsity.u"] = sparsity.u
    meta = {"step": step, "config": dataclasses.asdict(cfg), "opt_param_groups": opt_state["param_groups"]}
    if not comm.is_main:
        return
    with atomic_directory(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))


def load_checkpoint(
    path: Path, clt: CrossLayerTranscoder, opt: torch.optim.Optimizer, comm: Comm, sparsity: SparsityControl
) -> tuple[int, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Restore this rank's part of a checkpoint into `clt` and `opt`, the RNG and the steered
    sparsity coefficients; returns (step, the scales' (inp, out) [L], last_fired [L, F_rank])."""
    path = surviving_directory(path)  # a kill during the last save's swap leaves the previous one
    if not (path / "state.json").exists() or not (path / "state.safetensors").exists():
        raise CircuitsError(f"no checkpoint in {path}: train without --resume first")
    try:
        tensors = load_file(str(path / "state.safetensors"))
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError, SafetensorError) as e:
        raise CircuitsError(f"checkpoint {path} is corrupt or truncated ({e}): delete it and retrain") from None
    names = [k for k, _ in clt.named_parameters()]
    _check_complete(path, meta, tensors, names)
    _check_hooks(path, meta["config"].get("transcoder", {}), clt)
    full = {k: tensors[f"clt.{k}"] for k in names}
    expected = {k: tuple(v.shape) for k, v in comm.gather(dict(clt.named_parameters())).items()}
    if {k: tuple(v.shape) for k, v in full.items()} != expected:
        raise CircuitsError(f"checkpoint {path} holds a transcoder of other shapes: it is from another recipe")
    clt.load_state_dict(comm.shard(full))
    state: dict = {}
    for i, name in enumerate(names):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            v = tensors[f"opt.{k}.{name}"]
            state.setdefault(i, {})[k] = comm.shard({name: v})[name] if v.dim() else v
    opt.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    last_fired = comm.shard({"b_enc": tensors["last_fired"]})["b_enc"]
    sparsity.u = tensors.get("sparsity.u", sparsity.u)  # older checkpoints: not steered
    return meta["step"], (tensors["scales.inp"], tensors["scales.out"]), last_fired


def _check_complete(path: Path, meta: object, tensors: dict[str, torch.Tensor], names: list[str]) -> None:
    """Refuse a checkpoint whose state lacks a field or tensor that resuming restores."""
    fields = ("step", "config", "opt_param_groups")
    keys = [f"clt.{k}" for k in names] + [f"opt.{m}.{k}" for k in names for m in ("step", "exp_avg", "exp_avg_sq")]
    keys += ["last_fired", "scales.inp", "scales.out", "rng.torch"]
    missing = [f for f in fields if not isinstance(meta, dict) or f not in meta] + [k for k in keys if k not in tensors]
    if missing or not isinstance(meta["config"], dict):
        raise CircuitsError(
            f"checkpoint {path} lacks {missing[:4] or ['config']} (written by another version, or edited): "
            "delete it and retrain"
        )


def _check_hooks(path: Path, saved: dict, clt: CrossLayerTranscoder) -> None:
    """Refuse to resume a checkpoint trained at other hooks (same shapes, other activations)."""
    was = (saved.get("input_hook", "hook_resid_mid"), saved.get("output_hook", "hook_mlp_out"))
    now = (clt.cfg.input_hook, clt.cfg.output_hook)
    if was != now:
        raise CircuitsError(
            f"checkpoint {path} was trained at hooks {' -> '.join(was)}, the recipe asks for {' -> '.join(now)}: "
            "resume with the recipe it was trained with, or train into another directory"
        )


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was saved at (what `--resume` continues from)."""
    path = surviving_directory(path)
    if not (path / "state.json").exists() or not (path / "state.safetensors").exists():
        raise CircuitsError(f"no checkpoint in {path}: train without --resume first")
    try:
        meta = json.loads((path / "state.json").read_text())
        with safe_open(str(path / "state.safetensors"), "pt") as f:
            keys = set(f.keys())
    except (OSError, ValueError, SafetensorError) as e:
        raise CircuitsError(f"checkpoint {path} is corrupt or truncated ({e}): delete it and retrain") from None
    fields = ("step", "config", "opt_param_groups")
    missing = [f for f in fields if not isinstance(meta, dict) or f not in meta]
    missing += [k for k in ("last_fired", "scales.inp", "scales.out", "rng.torch") if k not in keys]
    missing += [] if any(k.startswith("clt.") for k in keys) else ["clt.*"]
    if missing:  # the full check, tensor by tensor, comes when the checkpoint is loaded
        raise CircuitsError(
            f"checkpoint {path} lacks {missing[:4]} (written by another version, or edited): delete it and retrain"
        )
    return meta["step"]


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary directories (`.checkpoint.XXXXXXXX`) that a checkpoint write killed
    before its swap leaves beside `path`; the `.checkpoint.old.PID` of a killed swap stays (it is
    the checkpoint `surviving_directory` resumes from)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if tmp.is_dir() and "." not in tmp.name[len(path.name) + 2 :]:
            shutil.rmtree(tmp)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of metrics.jsonl logged up to `step` (a resumed run logs the rest again)."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    with atomic_file(path) as f:
        f.write("".join(line + "\n" for line in kept))
