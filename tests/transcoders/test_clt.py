"""The cross-layer transcoder: sparse vs dense training path, scale folding, file formats."""

import json

import pytest
import torch

from circuits.errors import CircuitsError
from circuits.train.config import TrainConfig
from circuits.train.objective import Scales, fold_scales, initialise, losses
from circuits.transcoders.circuit_tracer import save_transcoder
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder
from circuits.transcoders.load import load_transcoder
from circuits.transcoders.saelens import save_saelens

VARIANTS = [
    {},
    {"cross_layer": False},
    {"skip": True},
    {"cross_layer": False, "skip": True},
    {"activation": "relu"},
    {"activation": "topk", "topk": 8},
]


def _random_clt(n_layers=3, d=16, F=64, dtype=torch.float64, **kw) -> CrossLayerTranscoder:
    clt = CrossLayerTranscoder(CLTConfig(n_layers=n_layers, d_model=d, n_features=F, bandwidth=0.5, **kw)).to(dtype)
    with torch.no_grad():
        clt.b_dec.normal_()
        clt.threshold.uniform_(0.05, 0.3)
        if clt.W_skip is not None:
            clt.W_skip.normal_(std=0.1)
    return clt


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "clt")
def test_sparse_path_equals_dense_reference(kw):
    """The training objective through the sparse encoder/decoder (custom autograd functions that
    touch only supported features) equals the dense reference: loss, every gradient, L0, fired."""
    clt = _random_clt(**kw)
    cfg = TrainConfig(sparsity_coef=0.1, preact_coef=0.01)
    x, y = torch.randn(50, 3, 16, dtype=torch.float64), torch.randn(50, 3, 16, dtype=torch.float64)
    initialise(clt, x, TrainConfig(target_fire_fraction=0.2))
    dead = torch.rand(3, 64) < 0.3
    results = []
    for sparse in (True, False):
        clt.zero_grad()
        r = losses(clt, x, y, step=5, cfg=cfg, dead=dead, sparse=sparse)
        r.total.backward()
        grads = {k: p.grad.clone() for k, p in clt.named_parameters() if p.grad is not None}
        results.append((r, grads))
    (rs, gs), (rd, gd) = results
    torch.testing.assert_close(rs.total, rd.total, rtol=1e-12, atol=0)
    assert gs.keys() == gd.keys() and "W_enc" in gs and "W_dec.0" in gs
    for k in gs:
        torch.testing.assert_close(gs[k], gd[k], rtol=1e-10, atol=1e-12, msg=k)
    if kw.get("activation", "jumprelu") == "jumprelu":
        assert gs["threshold"].abs().sum() > 0, "the threshold's straight-through gradient must reach the sparse path"
    torch.testing.assert_close(rs.l0, rd.l0)
    assert torch.equal(rs.fired, rd.fired) and 0 < rs.l0.mean() < 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jumprelu_without_gradients_is_its_forward(dtype):
    """Without gradients the activation skips the autograd Function (a float mask, not a bool one):
    the same values, NaN and infinities included, at and around the threshold, in bfloat16 too."""
    clt = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=4, n_features=6))
    with torch.no_grad():
        clt.threshold.copy_(torch.tensor([[0.5, -0.5, 0.0, 0.5, float("inf"), 0.5]] * 2))
    special = torch.tensor([0.5, -0.5, 0.0, float("nan"), float("inf"), -float("inf")])
    pre = torch.cat([torch.randn(5, 2, 6, generator=torch.Generator().manual_seed(0)), special.expand(1, 2, 6)])
    pre = pre.to(dtype)
    expected = pre * (pre > clt.threshold)
    with torch.no_grad():
        acts = clt.activation(pre)
    assert acts.dtype == dtype and torch.equal(acts.isnan(), expected.isnan())
    assert torch.equal(acts.nan_to_num(), expected.nan_to_num()) and (acts[-1] != 0).sum() > 0


def test_fold_scales_takes_raw_activations():
    """In the CLT's own dtype (float64 here, so to 1e-10) and on its own device."""
    clt = _random_clt(skip=True)
    x, y = torch.randn(20, 3, 16, dtype=torch.float64) * 7, torch.randn(20, 3, 16, dtype=torch.float64) * 3
    scales = Scales.estimate(x, y)
    recon_norm, acts_norm = clt(x * scales.inp[:, None])
    folded = fold_scales(clt, scales)
    assert folded.W_enc.dtype == torch.float64
    recon_raw, acts_raw = folded(x)
    torch.testing.assert_close(acts_raw, acts_norm, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(recon_raw, recon_norm / scales.out[:, None], rtol=1e-10, atol=1e-10)
    on_meta = fold_scales(clt.to("meta"), Scales(scales.inp.to("meta"), scales.out.to("meta")))
    assert on_meta.W_enc.device.type == "meta"  # the device of a CUDA run's CLT, not the CPU (found on an H200)


@pytest.mark.parametrize("cross_layer", [True, False])
def test_circuit_tracer_layout_round_trip(tmp_path, cross_layer):
    clt = _random_clt(n_layers=3, dtype=torch.float32, cross_layer=cross_layer)
    save_transcoder(clt, tmp_path / "clt")
    names = sorted(p.name for p in (tmp_path / "clt").iterdir())
    from safetensors.torch import load_file

    if cross_layer:  # circuit-tracer's CLT layout
        assert names == sorted(
            [f"W_enc_{l}.safetensors" for l in range(3)] + [f"W_dec_{l}.safetensors" for l in range(3)]
            + ["config.json", "config.yaml"]
        )  # fmt: skip
        enc = load_file(str(tmp_path / "clt" / "W_enc_1.safetensors"))
        assert {k: tuple(v.shape) for k, v in enc.items()} == {
            "W_enc_1": (64, 16), "b_enc_1": (64,), "b_dec_1": (16,), "threshold_1": (64,),
        }  # fmt: skip
        assert load_file(str(tmp_path / "clt" / "W_dec_1.safetensors"))["W_dec_1"].shape == (64, 2, 16)
    else:  # circuit-tracer's transcoder_set layout
        assert names == sorted([f"layer_{l}.safetensors" for l in range(3)] + ["config.json", "config.yaml"])
        layer = load_file(str(tmp_path / "clt" / "layer_1.safetensors"))
        assert {k: tuple(v.shape) for k, v in layer.items()} == {
            "W_enc": (64, 16), "W_dec": (64, 16), "b_enc": (64,), "b_dec": (16,),
            "activation_function.threshold": (64,),
        }  # fmt: skip
    yaml = (tmp_path / "clt" / "config.yaml").read_text()
    assert "feature_input_hook: hook_resid_mid" in yaml and "feature_output_hook: hook_mlp_out" in yaml
    assert ("model_kind: cross_layer_transcoder" if cross_layer else "model_kind: transcoder_set") in yaml
    back = load_transcoder(tmp_path / "clt")
    for k, v in clt.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # circuit-tracer's own files carry no config.json: the shapes alone must suffice
    (tmp_path / "clt" / "config.json").unlink()
    again = load_transcoder(tmp_path / "clt")
    assert again.cfg.cross_layer == cross_layer and again.cfg.n_features == 64
    x = torch.randn(5, 3, 16)
    torch.testing.assert_close(again(x)[0], clt(x)[0])


@pytest.mark.parametrize("skip", [False, True])
def test_saelens_round_trip_matches_saelens_forward(tmp_path, skip):
    from sae_lens import SAE

    clt = _random_clt(n_layers=2, dtype=torch.float32, cross_layer=False, skip=skip)
    save_saelens(clt, tmp_path / "sl")
    x = torch.randn(7, 2, 16)
    recon, acts = clt(x)
    for l in range(2):
        sae = SAE.load_from_disk(str(tmp_path / "sl" / f"layer_{l}"))  # SAELens's own classes
        assert sae.cfg.architecture() == ("jumprelu_skip_transcoder" if skip else "jumprelu_transcoder")
        assert sae.cfg.metadata.hook_name == f"blocks.{l}.hook_resid_mid"
        torch.testing.assert_close(sae.encode(x[:, l]), acts[:, l])
        torch.testing.assert_close(sae(x[:, l]), recon[:, l], rtol=1e-5, atol=1e-5)
    back = load_transcoder(tmp_path / "sl")
    for k, v in clt.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with pytest.raises(CircuitsError, match="per-layer"):
        save_saelens(_random_clt(n_layers=2, dtype=torch.float32), tmp_path / "cross")


def test_loading_refuses_mismatch_and_corruption(tmp_path, demo_model):
    clt = _random_clt(n_layers=4, d=64, dtype=torch.float32)
    save_transcoder(clt, tmp_path / "clt")
    with pytest.raises(CircuitsError, match="d_model 64 vs the model's 128"):
        load_transcoder(tmp_path / "clt", model=demo_model)
    cfg = json.loads((tmp_path / "clt" / "config.json").read_text())
    (tmp_path / "clt" / "config.json").write_text(json.dumps({**cfg, "n_features": 32}))
    with pytest.raises(CircuitsError, match="expected"):
        load_transcoder(tmp_path / "clt")
    (tmp_path / "clt" / "config.json").write_text(json.dumps(cfg))
    data = (tmp_path / "clt" / "W_dec_2.safetensors").read_bytes()
    (tmp_path / "clt" / "W_dec_2.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CircuitsError, match="corrupt or truncated"):
        load_transcoder(tmp_path / "clt")
    with pytest.raises(CircuitsError, match="holds no transcoder"):
        load_transcoder(tmp_path)
