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


def test_two_traces_of_one_slug_leave_the_files_of_one_of_them(tmp_path, monkeypatch):
    """Both runs compute while the test holds the output folder's lock: neither writes until it is
    released, and then the JSON, the graph and the page all hold the same prompt."""
    import threading

    from circuits import pipeline
    from circuits.attribution.graph import Graph
    from circuits.fileio import locked

    prompts = [PROMPT, "Fact: Seattle is in the state whose capital is"]
    rendered = [threading.Event(), threading.Event()]
    render = pipeline.render_page

    def render_and_tell(data, **kwargs):
        page = render(data, **kwargs)
        rendered[prompts.index(data["metadata"]["prompt"])].set()
        return page

    monkeypatch.setattr(pipeline, "render_page", render_and_tell)
    out = tmp_path / "out"
    options = pipeline.TraceOptions(out=out, slug="same", concept_traces=False, inhibited=0)
    pairs = [load_pair() for _ in prompts]  # one model each: hooks are per model
    runs = [
        threading.Thread(target=pipeline.trace, args=(p, *pair, options))
        for p, pair in zip(prompts, pairs, strict=True)
    ]
    with locked(out):
        for run in runs:
            run.start()
        assert all(event.wait(600) for event in rendered)
        assert not list(out.iterdir())  # both computed everything; neither has written
    for run in runs:
        run.join(600)
    prompt = json.loads((out / "same.json").read_text())["metadata"]["prompt"]
    assert prompt in prompts and Graph.load(out / "same.graph.safetensors").prompt == prompt
    assert f"<title>{prompt}</title>" in (out / "same.html").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["same.graph.safetensors", "same.html", "same.json"]
