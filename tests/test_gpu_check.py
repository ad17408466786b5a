"""scripts/gpu_check.sh --dry-run: the GPU check on shrunk shapes (on the CPU here), so it cannot rot:
every part runs and its JSON holds every figure, with values that agree with each other and with
FLOP counts made independently of the check's counter."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    proc = subprocess.run([str(ROOT / "scripts/gpu_check.sh"), "--dry-run"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = out / "gpu_check.json"
    assert proc.stdout.strip().splitlines()[-1] == str(path)
    return json.loads(path.read_text()), proc.stderr


@pytest.mark.slow
def test_the_dry_run_prints_its_commands_and_records_the_machine(dry_run):
    record, stderr = dry_run
    assert "+ " in stderr and "scripts/gpu_check.py --dry-run" in stderr
    env = record["environment"]
    assert env["torch"] == torch.__version__ and env["python"] and env["device_name"]
    assert env["packages"]["transformer-lens"] and record["dry_run"] is True
    on_gpu = torch.cuda.is_available()
    assert env["device"] == ("cuda" if on_gpu else "cpu") and (env["device_memory_bytes"] is not None) == on_gpu
    assert 0 < record["seconds_total"] < 600


@pytest.mark.slow
def test_the_dry_run_runs_the_gpu_tests(dry_run):
    tests = dry_run[0]["tests"]
    assert {"tests/test_gpu.py", "tests/attribution/test_attribute.py"} <= set(tests["files"])
    assert tests["exit_status"] == 0 and tests["failure"] == tests["error"] == 0
    names = [case["test"] for case in tests["cases"]]
    assert len(names) >= 3 and any("test_gpu" in name for name in names)
    assert tests["skipped" if not torch.cuda.is_available() else "passed"] == len(names)


@pytest.mark.slow
def test_the_dry_run_measures_training(dry_run):
    record = dry_run[0]
    shape, train = record["shape"], record["training"]
    n, L, F, d = train["batch_tokens"], shape["n_layers"], shape["n_features"], shape["d_model"]
    assert train["steps"] == shape["train_steps"] and train["seconds"] > 0
    assert train["tokens_per_s"] == pytest.approx(train["steps"] * n / train["seconds"])
    assert train["tflops_per_s"] == pytest.approx(train["flops_per_step"] * train["steps"] / train["seconds"] / 1e12)
    # the dense encoder forward alone is 2 n L F d; with the decoders (at most dense: each layer's features
    # write to it and every later layer, L (L + 1) / 2 blocks of 2 n F d) and the backward, below 3 times both
    dense_forward = 2 * n * L * F * d + 2 * n * F * d * L * (L + 1) // 2
    assert 2 * n * L * F * d <= train["flops_per_step"] <= 3 * dense_forward
    assert shape["l0"] / 2 <= train["l0_per_layer"] <= 2 * shape["l0"]
    assert train["activation_tokens_per_s"] > 0


@pytest.mark.slow
def test_the_dry_run_measures_attribution_in_both_dtypes(dry_run):
    record = dry_run[0]
    shape, rows = record["shape"], record["attribution"]
    expected = [(dtype, n) for dtype in ("float32", "bfloat16") for n in shape["lengths"]]
    assert [(r["dtype"], r["tokens"]) for r in rows] == expected
    L, d = shape["n_layers"], shape["d_model"]
    for r in rows:
        P = r["tokens"]
        assert r["nodes"] == r["feature_nodes"] + L * P + P + r["targets"] and r["edges_finite"]
        assert 0 < r["feature_nodes"] <= r["active_features"] and r["attribution_config"]["dtype"] == r["dtype"]
        # every feature row is at least one d-vector product per source node below it
        assert r["flops"] >= 2 * d * r["feature_nodes"] and r["seconds"] == min(r["seconds_all"])
        assert r["tflops_per_s"] == pytest.approx(r["flops"] / r["seconds"] / 1e12)
        on_gpu = record["environment"]["device"] == "cuda"
        assert (r["peak_memory_bytes"] is not None) == on_gpu and (r["held_memory_bytes"] is not None) == on_gpu
    assert record["transcoder"]["parameters"] > 0 and record["model"]["parameters"] > 0
    assert [r["layout"] for r in rows] == ["dense", "sparse"] * 2  # the long prompts' sparse graphs too


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run in full")
def test_without_a_gpu_the_full_check_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts/gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path / "gpu_check.json")])
    assert gpu_check.main() == 2
    err = capsys.readouterr().err
    assert "--dry-run" in err and len(err.strip().splitlines()) == 1 and not any(tmp_path.iterdir())
