"""The pipeline's loading: a (model, transcoder) pair in a dtype, the model processed as the transcoder expects."""

import json

import pytest
import torch

from circuits.cli import main
from circuits.errors import CircuitsError
from circuits.pipeline import load_pair

PROMPT = "Fact: Dallas is in the state whose capital is"


def test_a_pair_loads_in_bfloat16_and_traces_the_same_story(tmp_path):
    model, clt = load_pair("demo", "demo", dtype="bfloat16")
    assert model.W_U.dtype == torch.bfloat16 and clt.W_enc.dtype == torch.bfloat16
    assert clt.threshold.dtype == torch.float32  # thresholds stay float32
    assert main(["trace", PROMPT, "--dtype", "bfloat16", "--out", str(tmp_path / "b"), "--no-concepts"]) == 0
    assert main(["trace", PROMPT, "--out", str(tmp_path / "f"), "--no-concepts"]) == 0
    (half,), (full,) = (list((tmp_path / d).glob("*.json")) for d in "bf")
    half, full = json.loads(half.read_text())["metadata"], json.loads(full.read_text())["metadata"]
    assert abs(half["replacement_score"] - full["replacement_score"]) < 0.01
    assert half["model_processing"] == half["transcoder_model_processing"] == "none"


def test_a_transcoder_that_expects_another_processing_loads_its_model_that_way(tmp_path, demo_clt):
    from circuits.processing import weight_processing
    from circuits.transcoders.circuit_tracer import save_transcoder

    clt = demo_clt
    clt.cfg.model_processing = "tl-default"
    try:
        save_transcoder(clt, tmp_path / "t")
    finally:
        clt.cfg.model_processing = "none"
    model, loaded = load_pair("demo", str(tmp_path / "t"))
    assert weight_processing(model) == loaded.cfg.model_processing == "tl-default"


def test_an_unknown_dtype_is_one_line():
    with pytest.raises(CircuitsError, match="dtype"):
        load_pair("demo", "demo", dtype="float64")


@pytest.mark.parametrize("slug", ["../escape", "/tmp/abs", "a/b", "..", ".", "", "a\\b"])
def test_a_slug_that_is_not_a_file_name_is_refused_before_any_work(slug, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["trace", PROMPT, "--slug", slug, "--out", str(out), "--no-concepts"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a file name" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
