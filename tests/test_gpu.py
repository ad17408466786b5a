"""On a CUDA GPU (skipped without one): attribution and training give the CPU's numbers there.
`scripts/gpu_check.sh` runs these with the other tests skipped without CUDA."""

import copy
import dataclasses

import pytest
import torch

from circuits.attribution.attribute import attribute
from circuits.train.config import TrainConfig, TranscoderConfig
from circuits.train.loop import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FLAGSHIP = "Fact: Dallas is in the state whose capital is"


def test_gpu_edges_equal_the_cpu_float64_edges(demo_model, demo_clt):
    """The model runs in the graph's dtype on both sides (the forward pass is in the model's dtype)."""
    reference = attribute(FLAGSHIP, copy.deepcopy(demo_model).to(torch.float64), demo_clt, dtype="float64",
                          progress=False)  # fmt: skip
    largest = reference.adjacency.abs().max()
    for dtype, tolerance in (("float64", 1e-10), ("float32", 1e-5)):
        model = copy.deepcopy(demo_model).to(getattr(torch, dtype)).to("cuda")
        graph = attribute(FLAGSHIP, model, copy.deepcopy(demo_clt).to("cuda"), dtype=dtype, device="cuda",
                          progress=False)  # fmt: skip
        assert torch.equal(graph.features, reference.features)
        assert (graph.adjacency.double() - reference.adjacency).abs().max() <= tolerance * largest


def test_gpu_training_steps_give_the_cpu_metrics(tmp_path, demo_model):
    cfg = TrainConfig(
        steps=4, batch_tokens=256, eval_every=4, checkpoint_every=4, eval_docs=16, docs_per_chunk=64,
        transcoder=TranscoderConfig(n_features=64),
    )  # fmt: skip
    cpu = train(cfg, tmp_path / "cpu", model=demo_model)
    gpu_model = copy.deepcopy(demo_model).to("cuda")
    gpu = train(dataclasses.replace(cfg, device="cuda"), tmp_path / "gpu", model=gpu_model)
    assert gpu["step"] == cpu["step"] == 4
    assert gpu["nmse"] == pytest.approx(cpu["nmse"], rel=0.02)
    assert gpu["l0"] == pytest.approx(cpu["l0"], rel=0.05, abs=0.2)
    assert (tmp_path / "gpu" / "training.json").exists()
