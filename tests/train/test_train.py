"""The CLT trainer: recipes, activation stream, replacement-model metrics, resume after a kill,
torchrun, and the `circuits train` command's errors."""

import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from circuits.demo.corpus import TWO_HOP_PROMPT
from circuits.errors import CircuitsError
from circuits.fileio import atomic_directory, surviving_directory
from circuits.text import TextSource, token_mask
from circuits.train.activations import ActivationStream
from circuits.train.config import TrainConfig, TranscoderConfig, load_recipe
from circuits.train.metrics import replacement_metrics
from circuits.train.objective import initialise
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder

TINY = """steps = {steps}
batch_tokens = 256
docs_per_chunk = 64
eval_every = 10
checkpoint_every = {every}
sparsity_coef = 0.05
eval_docs = 32
threads = 1
{extra}
[transcoder]
n_features = 64
"""


DEMO_HOOKS = CLTConfig(n_layers=4, d_model=128, n_features=1)
"""What the activation stream reads of the demo model: hook_resid_mid -> hook_mlp_out."""


def _recipe(tmp_path: Path, name="tiny.toml", steps=20, every=10, extra="") -> Path:
    """A tiny recipe; `extra` lines are top-level keys."""
    path = tmp_path / name
    path.write_text(TINY.format(steps=steps, every=every, extra=extra))
    return path


def _circuits(*args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "circuits", *map(str, args)], capture_output=True, text=True, env=env, **kw
    )


def _weights(directory: Path) -> dict:
    return {k: v for f in sorted(directory.glob("W_*.safetensors")) for k, v in load_file(str(f)).items()}


def test_activation_stream_is_deterministic_and_skips_bos(demo_model, tmp_path):
    source = TextSource("demo", seed=3)
    stream = ActivationStream(demo_model, DEMO_HOOKS, source, batch_tokens=128, docs_per_chunk=32)
    first = [batch for _, batch in zip(range(12), stream.batches(0), strict=False)]
    assert stream._n_batches(0) < 10  # so that step 10 lies past the first chunk
    for start in (4, 10):  # inside the first chunk; past it (reached by skipping chunk 0 unread)
        resumed = ActivationStream(demo_model, DEMO_HOOKS, source, batch_tokens=128, docs_per_chunk=32).batches(start)
        for step, (x, y) in zip(range(start, start + 2), resumed, strict=False):
            assert torch.equal(x, first[step][0]) and torch.equal(y, first[step][1]), f"resumed at {start}: {step}"
    x, y = first[0]
    assert x.shape == y.shape == (128, 4, 128)
    tokens = demo_model.to_tokens(["Dallas is a city in Texas ."], padding_side="right")
    assert token_mask(demo_model, tokens).tolist() == [[False] + [True] * 7]
    # BOS's residual stream is huge and constant: no BOS row may be in the stream
    _, cache = demo_model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_mid")
    bos = cache["blocks.0.hook_resid_mid"][0, 0]
    assert (x[:, 0] - bos).norm(dim=-1).min() > 1e-3
    # local text files: .txt (a document a line) and .jsonl ("text" field)
    (tmp_path / "a.txt").write_text("Dallas is a city in Texas .\n\nThe capital of Texas is Austin .\n")
    (tmp_path / "a.jsonl").write_text(
        '{"text": "Dallas is a city in Texas ."}\n{"text": "The capital of Texas is Austin ."}\n'
    )
    for name in ("a.txt", "a.jsonl"):
        assert TextSource(str(tmp_path / name)).documents(0, 3) == [
            "Dallas is a city in Texas .", "The capital of Texas is Austin .", "Dallas is a city in Texas .",
        ]  # fmt: skip


def test_hf_text_without_datasets_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what an environment without the package shows
    with pytest.raises(CircuitsError, match=r'pip install "circuits-tracer\[hf\]"'):
        TextSource("hf:monology/pile-uncopyrighted").documents(0, 4)


def test_recipes_nest_the_transcoder_and_still_read_flat_keys(tmp_path, caplog, demo_model):
    nested = _recipe(tmp_path, "nested.toml", extra='model = "demo"\n')
    flat = tmp_path / "flat.toml"
    flat.write_text('model = "demo"\nn_features = 64\nsteps = 20\n')
    cfg = load_recipe(nested)
    assert cfg.transcoder == TranscoderConfig(n_features=64) and cfg.steps == 20 and not caplog.records
    with caplog.at_level(logging.WARNING):
        old = load_recipe(flat)
    assert old.transcoder == cfg.transcoder and old.steps == 20
    assert [r.getMessage() for r in caplog.records] == [
        "recipe keys ['n_features'] are deprecated at the top level: move them under [transcoder]"
    ]
    # train_config.json / training.json hold the nested config, and read back as the same config
    assert json.loads(json.dumps(dataclasses.asdict(cfg)))["transcoder"]["n_features"] == 64
    assert TrainConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    clt_cfg = cfg.clt_config(demo_model)
    assert (clt_cfg.n_layers, clt_cfg.d_model, clt_cfg.n_features, clt_cfg.model_name) == (4, 128, 64, "demo")
    # a recipe can set every transcoder option, except what the model decides and what loading records
    options = {f.name for f in dataclasses.fields(TranscoderConfig)}
    from_model = {"n_layers", "d_model", "model_name", "model_processing", "extra"}
    from_loading = {"layers", "family", "source"}
    assert options == {f.name for f in dataclasses.fields(CLTConfig)} - from_model - from_loading
    assert clt_cfg.model_processing == "none"  # as the demo model was loaded
    for fields, message in [
        ({"transcoder": {"n_featurez": 3}}, "unknown recipe keys ['transcoder.n_featurez']"),
        ({"transcoder": {"n_features": "many"}}, "recipe key 'transcoder.n_features' must be int, not 'many'"),
        ({"transcoder": 3}, "recipe key 'transcoder' must be a table"),
        ({"n_features": 3, "transcoder": {"n_features": 4}}, "recipe keys ['n_features'] are set both at the top"),
        ({"precision": "bf16"}, "precision is 'bf16': use 'fp32' or 'bf16-mixed'"),
    ]:
        with pytest.raises(CircuitsError, match=re.escape(message)):
            TrainConfig.from_dict(fields)


def test_shipped_recipes_load_without_warnings(caplog):
    recipes = sorted((Path(__file__).parents[2] / "training").glob("*.toml"))
    with caplog.at_level(logging.WARNING):
        configs = [load_recipe(path) for path in recipes]
    assert len(configs) == 5 and not caplog.records
    assert [c.transcoder.n_features for c in configs] == [256, 1024, 16384, 8192, 8192]


def _manual_replacement_logits(model, clt, tokens):
    """The replacement model computed layer by layer from TransformerLens's components and the
    CLT's dense forward: layer l's MLP output is the CLT's reconstruction from the resid_mid of
    layers 0..l of this same computation."""
    resid = model.embed(tokens) + model.pos_embed(tokens)
    mids = torch.zeros(*tokens.shape, model.cfg.n_layers, model.cfg.d_model)
    for l, block in enumerate(model.blocks):
        h = block.ln1(resid)
        mids[:, :, l] = resid + block.attn(h, h, h)
        resid = mids[:, :, l] + clt(mids)[0][:, :, l]  # later layers' inputs are zero: unused by layer l
    return model.unembed(model.ln_final(resid))


@torch.no_grad()
def test_replacement_metrics_match_a_direct_computation(demo_model):
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=4, d_model=128, n_features=256, skip=True))
    tokens = demo_model.to_tokens([TWO_HOP_PROMPT.format(city=c) for c in ("Dallas", "Tampa", "Boulder")])
    x = torch.stack(
        [demo_model.run_with_cache(tokens)[1][f"blocks.{l}.hook_resid_mid"].flatten(0, 1) for l in range(4)], 1
    )
    initialise(clt, x, TrainConfig(target_fire_fraction=0.05))
    with torch.no_grad():
        clt.W_skip.normal_(std=0.02)
    mask = token_mask(demo_model, tokens)
    got = replacement_metrics(demo_model, clt, tokens, mask)
    real = demo_model(tokens).log_softmax(-1)
    repl = _manual_replacement_logits(demo_model, clt, tokens).log_softmax(-1)
    kl = (real.exp() * (real - repl)).sum(-1)[mask].mean()
    nxt = tokens[:, 1:]
    ce_repl = -repl[:, :-1].gather(-1, nxt[..., None])[..., 0][mask[:, :-1]].mean()
    assert got["kl"] == pytest.approx(kl.item(), rel=1e-4) and got["kl"] > 0.01
    assert got["ce_replacement"] == pytest.approx(ce_repl.item(), rel=1e-5)
    assert got["top1_agreement"] == pytest.approx((real.argmax(-1) == repl.argmax(-1))[mask].float().mean().item())


def _step(state: Path) -> int:
    """The step of a checkpoint's state.json, -1 while there is none (or mid-swap)."""
    try:
        return json.loads(state.read_text())["step"]
    except FileNotFoundError:
        return -1


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_resume_after_sigkill_reaches_the_same_weights(tmp_path, precision):
    recipe = _recipe(tmp_path, steps=40, every=5, extra=f'precision = "{precision}"\n')
    assert _circuits("train", recipe, "--out", tmp_path / "full", timeout=600).returncode == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "circuits", "train", str(recipe), "--out", str(tmp_path / "killed")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    state = tmp_path / "killed" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while _step(state) < 10 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoint = surviving_directory(state.parent)  # the kill may land between the two renames of a save
    killed_at = json.loads((checkpoint / "state.json").read_text())["step"]
    assert killed_at < 40 and not (tmp_path / "killed" / "training.json").exists(), "it finished before the kill"
    if checkpoint == state.parent:  # and make sure resuming recovers from exactly that moment
        checkpoint.rename(checkpoint.with_name(".checkpoint.old.1"))
    out = _circuits("train", recipe, "--out", tmp_path / "killed", "--resume", timeout=600)
    assert out.returncode == 0, out.stderr
    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "killed")
    assert full.keys() == resumed.keys() and len(full) == 20
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40]
    assert not list((tmp_path / "killed").glob(".checkpoint.old.*"))  # the next save removed it


def test_a_kill_while_removing_the_previous_checkpoint_leaves_nothing_to_resume_from_by_mistake(tmp_path, monkeypatch):
    """CI caught this: SIGKILL landed while a save deleted `.checkpoint.old.PID`; the half-deleted
    tree, newer than any other, was what `surviving_directory` chose once the checkpoint was gone."""
    directory = tmp_path / "checkpoint"

    def save(step: int) -> None:
        with atomic_directory(directory) as tmp:
            (tmp / "state.json").write_text(json.dumps({"step": step}))
            (tmp / "weights").write_bytes(b"x" * 100)

    def killed(path, *args, **kwargs):  # deletes one file, then the process dies
        next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
        raise KeyboardInterrupt

    save(5)
    save(10)
    monkeypatch.setattr("circuits.fileio.shutil.rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        save(15)
    monkeypatch.undo()
    directory.rename(directory.with_name(".checkpoint.old.1"))  # a later kill between the two renames of a save
    survivor = surviving_directory(directory)
    assert json.loads((survivor / "state.json").read_text())["step"] == 15


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["data", "feature"])
def test_torchrun_two_processes_match_one(tmp_path, parallel):
    recipe = _recipe(tmp_path, steps=10, every=10, extra=f'parallel = "{parallel}"\n')
    assert _circuits("train", recipe, "--out", tmp_path / "one", timeout=600).returncode == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port: a fixed one can still be held by an earlier run
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    out = subprocess.run(
        [*cmd, "-m", "circuits", "train", str(recipe), "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5 * one[k].abs().max().item(), msg=k)
    assert not torch.equal(one["W_enc_0"], _weights(tmp_path / "one")["W_dec_0"][:, 0, :].T[:1])  # trained, non-trivial


@pytest.mark.slow
def test_train_cli_errors_are_one_line_exit_2(tmp_path):
    bad, typo, nested = tmp_path / "bad.toml", tmp_path / "typo.toml", tmp_path / "nested.toml"
    bad.write_text("n_featurez = 3\n")
    typo.write_text('steps = "many"\n')
    nested.write_text('[transcoder]\nn_features = "many"\n')
    for args, message in [
        (("train", bad), "unknown recipe keys ['n_featurez']"),
        (("train", typo), "recipe key 'steps' must be int"),
        (("train", nested), "recipe key 'transcoder.n_features' must be int"),
        (("train", tmp_path / "none.toml"), "does not exist"),
        (("train", _recipe(tmp_path), "--out", tmp_path / "fresh", "--resume"), "no checkpoint"),
        (("train", _recipe(tmp_path, "banana.toml", extra='device = "banana"\n')), "'banana' is not a device"),
    ]:
        out = _circuits(*args, timeout=300)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    # a NaN loss stops training and keeps the last good checkpoint
    nan = _recipe(tmp_path, "nan.toml", steps=20, every=1, extra="lr = 1e30\n")
    out = _circuits("train", nan, "--out", tmp_path / "nan", timeout=300)
    assert out.returncode == 2 and "the loss became" in out.stderr, out.stderr
    state = load_file(str(tmp_path / "nan" / "checkpoint" / "state.safetensors"))
    assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("clt."))
    # a truncated checkpoint is refused on resume
    path = tmp_path / "nan" / "checkpoint" / "state.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    out = _circuits("train", nan, "--out", tmp_path / "nan", "--resume", timeout=300)
    assert out.returncode == 2 and "corrupt or truncated" in out.stderr, out.stderr


def test_shipped_demo_clt_meets_its_targets(demo_model):
    """Recomputed here on held-out demo text (not read from training.json): mean normalised MSE
    <= 0.15 and replacement-model top-1 agreement >= 90%, at a low L0."""
    from circuits.train.activations import held_out, held_out_tokens
    from circuits.train.metrics import reconstruction_metrics
    from circuits.transcoders.load import load_transcoder

    clt = load_transcoder("demo", model=demo_model)
    assert (clt.threshold >= 0).all(), "a negative JumpReLU threshold makes an always-on feature"
    source = TextSource("demo")
    x, y = held_out(demo_model, clt.cfg, source, n_docs=64)
    rec = reconstruction_metrics(clt, x, y)
    assert sum(rec["nmse"]) / 4 <= 0.15 and sum(rec["l0"]) / 4 <= 50
    tokens, mask = held_out_tokens(demo_model, source, n_docs=64)
    assert replacement_metrics(demo_model, clt, tokens, mask)["top1_agreement"] >= 0.9


def test_activation_cache_shards_are_read_back(demo_model, tmp_path):
    from safetensors.torch import save_file

    source = TextSource("demo", seed=1)
    plain = [
        b for _, b in zip(range(5), ActivationStream(demo_model, DEMO_HOOKS, source, 128, 32).batches(0), strict=False)
    ]
    cached = ActivationStream(demo_model, DEMO_HOOKS, source, 128, 32, cache_dir=tmp_path / "cache")
    first = [b for _, b in zip(range(5), cached.batches(0), strict=False)]
    assert all(torch.equal(p[0], f[0]) and torch.equal(p[1], f[1]) for p, f in zip(plain, first, strict=True))
    shard = tmp_path / "cache" / "chunk_000000.safetensors"
    x, y = first[0]
    save_file({"x": -x.repeat(40, 1, 1), "y": y.repeat(40, 1, 1)}, str(shard))  # the next run must read this file
    reread = next(ActivationStream(demo_model, DEMO_HOOKS, source, 128, 32, cache_dir=tmp_path / "cache").batches(0))
    assert torch.equal(reread[0], -x)
    with pytest.raises(CircuitsError, match="other settings"):
        ActivationStream(demo_model, DEMO_HOOKS, TextSource("demo", seed=2), 128, 32, cache_dir=tmp_path / "cache")
    for hooks in ({"input_hook": "ln2.hook_normalized"}, {"output_hook": "mlp.hook_out"}):  # another hook pair
        other = dataclasses.replace(DEMO_HOOKS, **hooks)
        with pytest.raises(CircuitsError, match="other settings"):
            ActivationStream(demo_model, other, source, 128, 32, cache_dir=tmp_path / "cache")


@pytest.mark.slow
def test_cli_store_then_sigterm_saves_and_resume_says_where(tmp_path):
    recipe = _recipe(tmp_path, steps=100, every=1000)
    out = _circuits("activations", recipe, "--out", tmp_path / "store", "--tokens", "600", timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == str(tmp_path / "store"), out.stderr
    recipe.write_text(f'model = ""\nactivations = "{tmp_path / "store"}"\n' + recipe.read_text())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "circuits", "train", str(recipe), "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.startswith("saved step")]
    assert proc.returncode == 128 + signal.SIGTERM and len(lines) == 1 and "Traceback" not in stderr, stderr
    step = int(lines[0].split()[2].rstrip(";"))
    assert lines[0] == f"saved step {step}; resume with --resume" and 10 <= step < 100
    resumed = _circuits("train", recipe, "--out", tmp_path / "run", "--resume", timeout=600)
    assert resumed.returncode == 0 and f"resuming from step {step} of 100" in resumed.stderr, resumed.stderr
    assert "kl" not in resumed.stdout and resumed.stdout.startswith("nmse")  # no model: no replacement metrics
