"""The activation store: what `write_store` keeps (the model's values at the hooks, computed here by
TransformerLens's own cache), the order runs read it in, training from it without the model, an
exact resume after Ctrl-C, and steering to a target L0."""

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from circuits.errors import CircuitsError
from circuits.text import TextSource, document_tokens, token_mask
from circuits.train import loop
from circuits.train.config import TrainConfig, TranscoderConfig
from circuits.train.store import ActivationStore
from circuits.train.store_writer import write_store

STORE_CFG = TrainConfig(docs_per_chunk=32, eval_docs=16, seed=5, threads=1)


@pytest.fixture(scope="module")
def store_dir(demo_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "acts"
    write_store(STORE_CFG, out, tokens=3000, model=demo_model)
    return out


def _rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The rows of (x, y) [n, L, d] as a sorted multiset: order aside."""
    return torch.unique(torch.cat([x.flatten(1), y.flatten(1)], 1), dim=0)


def test_store_holds_the_models_activations(demo_model, store_dir, tmp_path):
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert manifest["model"] == "demo" and manifest["model_processing"] == "none"
    assert (manifest["input_hook"], manifest["output_hook"]) == ("hook_resid_mid", "hook_mlp_out")
    assert manifest["text"] == {"name": "demo", "seed": 5, "max_tokens_per_doc": 64} and manifest["dtype"] == "float32"
    assert sum(s["rows"] for s in manifest["shards"]) >= 3000 and len(manifest["shards"]) >= 2
    source = TextSource("demo", seed=5)
    for c, shard in enumerate(manifest["shards"]):
        tokens = document_tokens(demo_model, source.documents(32 * c, 32), 64)
        _, cache = demo_model.run_with_cache(tokens)
        keep = token_mask(demo_model, tokens)
        x = torch.stack([cache[f"blocks.{l}.hook_resid_mid"] for l in range(4)], -2)[keep]
        y = torch.stack([cache[f"blocks.{l}.hook_mlp_out"] for l in range(4)], -2)[keep]
        stored = load_file(str(store_dir / shard["file"]))
        assert shard["rows"] == len(x) == len(stored["x"])
        assert not torch.equal(stored["x"], x), "rows are shuffled"
        torch.testing.assert_close(_rows(stored["x"], stored["y"]), _rows(x, y), rtol=1e-5, atol=1e-5)
    store = ActivationStore(store_dir)
    every = [load_file(str(store_dir / s["file"])) for s in manifest["shards"]]
    norms = torch.cat([t["x"] for t in every]).norm(dim=-1).mean(0)
    torch.testing.assert_close(store.scales()[0], 128**0.5 / norms)
    hx, hy = store.held_out()
    assert hx.shape == hy.shape and hx.shape[1:] == (4, 128) and len(hx) == manifest["held_out"]["rows"]
    # bfloat16: the same values, rounded; a second store in the same directory is refused
    small = dataclasses.replace(STORE_CFG, eval_docs=4)
    write_store(small, tmp_path / "bf16", tokens=100, dtype="bfloat16", model=demo_model)
    half = load_file(str(tmp_path / "bf16" / "shard_000000.safetensors"))
    assert half["x"].dtype == torch.bfloat16
    assert torch.equal(half["x"], load_file(str(store_dir / "shard_000000.safetensors"))["x"].bfloat16())
    with pytest.raises(CircuitsError, match="already holds an activation store"):
        write_store(small, tmp_path / "bf16", tokens=100, model=demo_model)
    with pytest.raises(CircuitsError, match="dtype 'float16' is not supported"):
        write_store(small, tmp_path / "f16", tokens=100, dtype="float16", model=demo_model)
    assert not (tmp_path / "f16").exists()


def test_store_order_is_a_pure_function_of_seed_and_step(store_dir):
    store = ActivationStore(store_dir)
    per_epoch = sum(n // 256 for n in store.rows)
    first = [b for _, b in zip(range(2 * per_epoch + 1), store.batches(256, seed=1), strict=False)]
    for start in (3, per_epoch - 1, per_epoch + 2):  # inside the first epoch, across its end, in the second
        for k, (x, y) in zip(range(start, start + 2), store.batches(256, seed=1, start_step=start), strict=False):
            assert torch.equal(x, first[k][0]) and torch.equal(y, first[k][1]), (start, k)
    key = torch.randn(4 * 128, dtype=torch.float64)  # a row's fingerprint
    shards = [load_file(str(store_dir / s["file"]))["x"].flatten(1).double() @ key for s in store.manifest["shards"]]
    homes = [
        [i for i, shard in enumerate(shards) if torch.isin(x.flatten(1).double() @ key, shard).all()] for x, _ in first
    ]
    assert all(len(h) == 1 for h in homes), "each batch lies in one shard"
    visits = [h[0] for h in homes[:per_epoch]]
    assert [visits.count(i) for i in range(len(shards))] == [n // 256 for n in store.rows]
    other = next(store.batches(256, seed=2))[0]
    assert not torch.equal(other, first[0][0]) and not torch.equal(first[per_epoch][0], first[0][0])
    with pytest.raises(CircuitsError, match="fewer than one batch"):
        next(store.batches(10**6, seed=1))


def _store_recipe(store_dir: Path, **fields) -> TrainConfig:
    base = {"activations": str(store_dir), "model": "", "steps": 60, "batch_tokens": 256, "eval_every": 10,
            "checkpoint_every": 1000, "sparsity_coef": 0.05, "eval_docs": 16, "threads": 1}  # fmt: skip
    return TrainConfig.from_dict({**base, **fields, "transcoder": {"n_features": 64}})


def _weights(directory: Path) -> dict:
    return {k: v for f in sorted(directory.glob("W_*.safetensors")) for k, v in load_file(str(f)).items()}


def test_training_from_a_store_loads_no_model_and_resumes_exactly_after_ctrl_c(store_dir, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a store run without a model must not load one")

    monkeypatch.setattr(loop, "load_model", no_model)
    cfg = _store_recipe(store_dir)
    metrics = loop.train(cfg, tmp_path / "full")
    assert "kl" not in metrics and metrics["step"] == 60 and sum(metrics["nmse"]) / 4 < 1

    def interrupt_after_first_eval():
        metrics_file = tmp_path / "cut" / "metrics.jsonl"
        while not (metrics_file.exists() and metrics_file.stat().st_size):  # the first evaluation, at step 10
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_first_eval, daemon=True).start()
    with pytest.raises(loop.Interrupted) as stopped:
        loop.train(cfg, tmp_path / "cut")
    cut = stopped.value.step
    assert 10 <= cut < 60 and str(stopped.value) == f"saved step {cut}; resume with --resume"
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == cut
    assert not (tmp_path / "cut" / "W_enc_0.safetensors").exists()
    stale = tmp_path / "cut" / ".checkpoint.k1ll3d0x"  # what a checkpoint write killed mid-way leaves
    stale.mkdir()
    loop.train(cfg, tmp_path / "cut", resume=True)
    assert not stale.exists()
    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert full.keys() == resumed.keys() and len(full) == 20
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # the recipe's model must be the store's, or "" (no replacement-model metrics)
    with pytest.raises(CircuitsError, match="is not the store's"):
        loop.train(dataclasses.replace(cfg, model="gpt2"), tmp_path / "other")
    other_hooks = dataclasses.replace(cfg, transcoder=TranscoderConfig(n_features=64, output_hook="mlp.hook_out"))
    with pytest.raises(CircuitsError, match="are not the store's"):
        loop.train(other_hooks, tmp_path / "hooks")
    assert not (tmp_path / "other").exists() and not (tmp_path / "hooks").exists()


def test_target_l0_steers_each_layer_to_it(store_dir, tmp_path, demo_model):
    cfg = _store_recipe(store_dir, steps=200, eval_every=200, target_l0=6.0, lr=2e-3, model="demo")
    cfg = dataclasses.replace(cfg, transcoder=TranscoderConfig(n_features=128))
    metrics = loop.train(cfg, tmp_path / "l0", model=demo_model)
    l0 = torch.tensor(metrics["l0"])  # held-out, per layer
    assert abs(l0.mean() / 6 - 1) < 0.1 and ((l0 / 6 - 1).abs() < 0.2).all(), metrics["l0"]
    assert "kl" in metrics  # a model given: the replacement-model metrics too


def test_topk_recipes_need_no_sparsity_coefficient(tmp_path):
    topk = {"transcoder": {"activation": "topk", "topk": 8}}
    assert TrainConfig.from_dict(topk).sparsity_coef == 0.0
    assert TrainConfig.from_dict({**topk, "sparsity_coef": 0.2}).sparsity_coef == 0.2
    assert TrainConfig.from_dict({}).sparsity_coef == 0.4
    with pytest.raises(CircuitsError, match="set transcoder.topk instead of target_l0"):
        loop.train(TrainConfig.from_dict({**topk, "target_l0": 8.0}), tmp_path / "out")
    assert not (tmp_path / "out").exists()
