"""Transcoder file formats. Every family circuit-tracer 0.5.0 reads (and SAELens's) is written in its
published layout with random weights (tests/layouts.py) and loaded by `load_transcoder`; its
activations and reconstructions must equal an independent reference computed from the file tensors,
circuit-tracer's own loaders (run in a subprocess with the peer's Python: CIRCUITS_PEER_PYTHON or
/work/ct-venv/bin/python; skipped without one) and SAELens's own `SAE.load_from_disk`. What we write
must be read back by circuit-tracer and SAELens, with the skip intact or refused. Hub loading runs on
a local Hugging Face cache laid out as huggingface_hub leaves it, offline."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from circuits.errors import CircuitsError
from circuits.transcoders.circuit_tracer import save_transcoder
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder
from circuits.transcoders.load import load_transcoder
from circuits.transcoders.presets import PRESETS, hub_ref
from circuits.transcoders.saelens import save_saelens
from tests import layouts

L, D, F, N = 3, 16, 32, 6
PEER = os.environ.get("CIRCUITS_PEER_PYTHON", "/work/ct-venv/bin/python")
needs_peer = pytest.mark.skipif(not Path(PEER).is_file(), reason=f"no circuit-tracer Python at {PEER}")
CT_HOOKS = ("hook_resid_mid", "hook_mlp_out")


@dataclass
class Case:
    writer: object
    opts: dict
    family: str
    hooks: tuple[str, str]
    activation: str
    skip: bool
    layers: list[int] | None = None
    ct: list[str] = field(default_factory=list)  # circuit-tracer routes that must equal ours
    ct_refuses: dict[str, str] = field(default_factory=dict)  # route -> what circuit-tracer raises


RESID, MLP = CT_HOOKS, ("mlp.hook_in", "mlp.hook_out")
GS, GS2 = ("ln2.hook_normalized", "hook_mlp_out"), ("mlp.hook_in", "hook_mlp_out")
CLT, SET, SAE = layouts.write_ct_clt, layouts.write_ct_transcoder_set, layouts.write_saelens_transcoder_set
CT_SET, CACHE, JUMP = "circuit-tracer-transcoder-set", layouts.write_ct_cache, "jumprelu"
GS2_REFUSES = {"load_transcoders": "size mismatch"}  # circuit-tracer 0.5.0 reads L - 1 of the files
CASES = {
    "ct_clt_jumprelu": Case(CLT, {"activation": JUMP}, "circuit-tracer-clt", RESID, JUMP, False, ct=["load_clt"]),
    "ct_clt_relu": Case(CLT, {"activation": "relu"}, "circuit-tracer-clt", RESID, "relu", False, ct=["load_clt"]),
    "ct_set_relu": Case(SET, {"activation": "relu"}, CT_SET, MLP, "relu", False, ct=["load_transcoder_set"]),
    "ct_set_relu_skip": Case(SET, {"activation": "relu", "skip": True}, CT_SET, MLP, "relu", True,
                             ct=["load_transcoder_set"]),
    "ct_set_jumprelu": Case(SET, {"activation": JUMP}, CT_SET, MLP, JUMP, False, ct=["load_transcoder_set"]),
    "ct_set_jumprelu_skip_list": Case(SET, {"activation": JUMP, "skip": True, "transcoders_list": "absolute"}, CT_SET,
                                      MLP, JUMP, True, ct=["load_transcoders"]),
    "ct_set_relative_list": Case(SET, {"activation": "relu", "transcoders_list": "relative"}, CT_SET, MLP, "relu",
                                 False, ct=["load_transcoder_set"]),
    "ct_set_bare_threshold": Case(SET, {"activation": JUMP, "threshold_key": "threshold"}, CT_SET, MLP, JUMP, False,
                                  ct_refuses={"load_transcoder_set": 'Unexpected key(s) in state_dict: "threshold"'}),
    "gemmascope_npz": Case(layouts.write_gemmascope_npz, {"paths": "absolute"}, "gemmascope", GS, JUMP, False,
                           ct=["load_transcoders"]),
    "ct_cache_gemmascope": Case(CACHE, {"source": "gemmascope"}, CT_SET, GS, JUMP, False,
                                ct=["load_transcoders_from_cache"]),
    "ct_cache_gemmascope2": Case(CACHE, {"source": "gemmascope2"}, CT_SET, GS2, JUMP, True,
                                 ct=["load_transcoders_from_cache"]),
    "ct_cache_gemmascope2_clt": Case(CACHE, {"source": "gemmascope2_clt"}, "circuit-tracer-clt", GS2, JUMP, False,
                                     ct=["load_transcoders_from_cache"]),
    "gemmascope2": Case(layouts.write_gemmascope2_transcoders, {"affine": False, "paths": "absolute"}, "gemmascope-2",
                        GS2, JUMP, False, ct=["load_transcoders"]),
    "gemmascope2_affine": Case(layouts.write_gemmascope2_transcoders, {"affine": True, "paths": "absolute"},
                               "gemmascope-2", GS2, JUMP, True, ct=["load_transcoders"]),
    "gemmascope2_clt": Case(layouts.write_gemmascope2_clt, {"affine": False, "paths": "absolute",
                                                            "lower_fill": "random"},
                            "gemmascope-2-clt", GS2, JUMP, False, ct=["load_gemma_scope_2_clt+1"],
                            ct_refuses=GS2_REFUSES),
    "gemmascope2_clt_affine": Case(layouts.write_gemmascope2_clt, {"affine": True, "paths": "absolute"},
                                   "gemmascope-2-clt", GS2, JUMP, True, ct=["load_gemma_scope_2_clt+1"],
                                   ct_refuses=GS2_REFUSES),
    "saelens_single": Case(layouts.write_saelens_transcoder, {"layer": 1}, "saelens", GS, JUMP, False, layers=[1]),
    "saelens_single_skip": Case(layouts.write_saelens_transcoder, {"layer": 0, "skip": True, "activation": "relu"},
                                "saelens", GS, "relu", True),
    "saelens_all": Case(SAE, {}, "saelens", GS, JUMP, False),
    "saelens_subset": Case(SAE, {"layers": [0, 2], "skip": True}, "saelens", GS, JUMP, True, layers=[0, 2]),
    "saelens_negative_thresholds": Case(SAE, {"thresholds": (-0.6, 0.2)}, "saelens", GS, JUMP, False),
    "saelens_expected_average": Case(SAE, {"normalize_activations": "expected_average_only_in",
                                           "subdir": "l{layer}/w16k"}, "saelens", GS, JUMP, False),
}  # fmt: skip
SAELENS_CASES = [name for name, case in CASES.items() if case.family == "saelens"]


def _random_clt(**kw) -> CrossLayerTranscoder:
    torch.manual_seed(3)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=D, n_features=F, model_name="tiny", **kw)).eval()
    with torch.no_grad():
        clt.b_dec.normal_()
        clt.threshold.uniform_(0.05, 0.3)
        if clt.W_skip is not None:
            clt.W_skip.normal_(std=0.1)
        for l in set(range(L)) - set(clt.cfg.layers or range(L)):  # what a layer the transcoder lacks holds
            for t in (clt.W_enc[l], clt.b_enc[l], clt.threshold[l], clt.b_dec[l], clt.W_dec[l]):
                t.zero_()
            if clt.W_skip is not None:
                clt.W_skip[l].zero_()
    return clt


OURS = {  # what we write, for circuit-tracer to read
    "ours_clt": {},
    "ours_clt_relu": {"activation": "relu"},
    "ours_set_skip": {"cross_layer": False, "skip": True},
    "ours_set_relu": {"cross_layer": False, "activation": "relu"},
    "ours_clt_skip": {"skip": True},
    "ours_set_topk": {"cross_layer": False, "activation": "topk", "topk": 4},
    "ours_set_some_layers": {"cross_layer": False, "skip": True, "layers": [0, 2]},
}


def _write(root: Path, name: str, case: Case) -> tuple[Path, dict]:
    """Write a case in its published layout; (directory to load, what was written)."""
    if case.writer is layouts.write_ct_cache:  # circuit-tracer's cache path is <cache_dir>/<hf ref>
        ref = layouts.write_ct_cache(root / "probe", 1, 2, 3, 0, **case.opts)["meta"]["hf_ref"]
        directory = root / name / ref
        return directory, layouts.write_ct_cache(directory, L, D, F, 7, **case.opts)
    return root / name, case.writer(root / name, L, D, F, 7, **case.opts)


def _ct_jobs(name: str, directory: Path, w: dict) -> list[dict]:
    meta, hooks = w["meta"], {"input_hook": w["meta"].get("feature_input_hook"),
                              "output_hook": w["meta"].get("feature_output_hook")}  # fmt: skip
    paths = [str(directory / rel) for rel in sorted(w["files"], key=_layer_of)]
    jobs = []
    for route in [*CASES[name].ct, *CASES[name].ct_refuses]:
        job = {"name": f"{name}:{route}", **hooks}
        if route == "load_clt":
            job.update(kind="clt", dir=str(directory))
        elif route == "load_transcoder_set":
            job.update(kind="set", paths={str(i): p for i, p in enumerate(paths)})
        elif route == "load_transcoders":  # the hub route after download: repo id decides the loader
            repo = "/".join(meta.get("hf_ref", "local/set").split("/")[:2])
            job.update(
                kind="config",
                config={
                    "model_kind": meta["model_kind"],
                    **_ct_hooks(meta),
                    "transcoders": paths,
                    "repo_id": repo,
                    "scan": repo,
                    "revision": None,
                    "subfolder": None,
                },
            )
        elif route == "load_transcoders_from_cache":
            job.update(kind="cache", ref=meta["hf_ref"], cache_dir=str(directory.parents[meta["hf_ref"].count("/")]))
        elif route == "load_gemma_scope_2_clt+1":
            job.update(kind="gs2_clt", paths=paths)
        jobs.append(job)
    return jobs


def _ct_hooks(meta: dict) -> dict:
    return {"feature_input_hook": meta["feature_input_hook"], "feature_output_hook": meta["feature_output_hook"]}


def _layer_of(rel: str) -> int:
    import re

    return int(re.search(r"layer_(\d+)", rel).group(1)) if "layer_" in rel else 0


def _ours_jobs(name: str, directory: Path) -> list[dict]:
    cfg = json.loads((directory / "config.json").read_text())
    hooks = {"input_hook": cfg["input_hook"], "output_hook": cfg["output_hook"]}
    if cfg["cross_layer"]:
        jobs = [{"name": f"{name}:load_clt", "kind": "clt", "dir": str(directory), **hooks}]
    else:
        paths = {str(l): str(directory / f"layer_{l}.safetensors") for l in range(L)}
        jobs = [{"name": f"{name}:load_transcoder_set", "kind": "set", "paths": paths, **hooks}]
    # circuit-tracer's config-reading route: its cache directory <cache_dir>/<ref> holds config.yaml
    jobs.append({"name": f"{name}:cache", "kind": "cache", "ref": directory.name, "cache_dir": str(directory.parent)})
    return jobs


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Every case written once: {name: (directory, written)}, our own writes, and the input x."""
    root = tmp_path_factory.mktemp("formats")
    written = {name: _write(root, name, case) for name, case in CASES.items()}
    ours = {}
    for name, kw in OURS.items():
        clt = _random_clt(**kw)
        save_transcoder(clt, root / "ours" / name)
        ours[name] = (root / "ours" / name, clt)
    x = torch.randn(L, N, D, generator=torch.Generator().manual_seed(11))
    return {"root": root, "written": written, "ours": ours, "x": x}


@pytest.fixture(scope="session")
def ct(world):
    """circuit-tracer's activations and reconstructions for every job, from one peer subprocess."""
    if not Path(PEER).is_file():
        pytest.skip(f"no circuit-tracer Python at {PEER}")
    root = world["root"]
    jobs = [j for name, (d, w) in world["written"].items() for j in _ct_jobs(name, d, w)]
    jobs += [j for name, (d, _) in world["ours"].items() for j in _ours_jobs(name, d)]
    save_file({"x": world["x"]}, str(root / "x.safetensors"))
    (root / "spec.json").write_text(json.dumps({"input": str(root / "x.safetensors"), "jobs": jobs}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    script = Path(__file__).parents[1] / "layouts.py"
    proc = subprocess.run([PEER, str(script), "ct-peer", str(root / "spec.json"), str(root / "ct")], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "ct.json").read_text()), load_file(str(root / "ct.safetensors"))


def _ours(clt: CrossLayerTranscoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our activations [L, n, F] and reconstruction (skip included) [L, n, d] for x [L, n, d]."""
    with torch.no_grad():
        recon, acts = clt(x[: clt.cfg.n_layers].transpose(0, 1).to(clt.W_enc.dtype))
    return acts.transpose(0, 1).float(), recon.transpose(0, 1).float()


@pytest.mark.parametrize("name", CASES)
def test_family_loads_as_declared_and_equals_reference(world, name):
    case, (directory, w) = CASES[name], world["written"][name]
    clt = load_transcoder(directory)
    cfg = clt.cfg
    assert (cfg.family, cfg.input_hook, cfg.output_hook) == (case.family, *case.hooks)
    assert (cfg.activation, cfg.skip, cfg.layers) == (case.activation, case.skip, case.layers)
    assert cfg.source == str(directory) and cfg.cross_layer == (w["kind"] == "clt")
    assert cfg.model_processing == ("unknown" if case.family == "saelens" else "none")
    assert clt.threshold.dtype == torch.float32 and clt.W_enc.dtype == torch.float32
    acts, recon = _ours(clt, world["x"])
    ref_acts, ref_recon = layouts.reference_forward(w, world["x"])
    for l in range(cfg.n_layers):
        if l in ref_acts:
            torch.testing.assert_close(acts[l], ref_acts[l], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(recon[l], ref_recon[l], atol=1e-5, rtol=1e-5)
        else:  # a layer the set lacks: no feature fires and nothing is reconstructed (all error node)
            assert not acts[l].any() and not recon[l].any()
    assert 0.05 < (acts > 0).float().mean() < 0.8


@needs_peer
@pytest.mark.parametrize("job", [f"{n}:{r}" for n, c in CASES.items() for r in c.ct])
def test_family_equals_circuit_tracer(world, ct, job):
    report, tensors = ct
    name = job.split(":")[0]
    assert report[job]["ok"], report[job]
    clt = load_transcoder(world["written"][name][0])
    assert (report[job]["input_hook"], report[job]["output_hook"]) == (clt.cfg.input_hook, clt.cfg.output_hook)
    assert report[job]["skip"] == clt.cfg.skip
    acts, recon = _ours(clt, world["x"])
    torch.testing.assert_close(acts, tensors[job + ".acts"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon, tensors[job + ".recon"], atol=1e-5, rtol=1e-5)


@needs_peer
@pytest.mark.parametrize("job", [f"{n}:{r}" for n, c in CASES.items() for r in c.ct_refuses])
def test_what_circuit_tracer_cannot_read(ct, job):
    """circuit-tracer 0.5.0 refuses a bare `threshold` key, and fails on GemmaScope-2 CLTs as
    published (it reads L - 1 of the files); we read both exactly (the reference test)."""
    report, _ = ct
    name, route = job.split(":")
    assert not report[job]["ok"] and CASES[name].ct_refuses[route] in report[job]["error"], report[job]


@pytest.mark.parametrize("name", SAELENS_CASES)
def test_saelens_family_equals_saelens(world, name):
    from sae_lens import SAE

    directory, w = world["written"][name]
    clt, x = load_transcoder(directory), world["x"]
    acts, recon = _ours(clt, x)
    for folder in sorted({Path(rel).parent for rel in w["files"]}):
        sae = SAE.load_from_disk(str(directory / folder), device="cpu")
        layer = int(sae.cfg.metadata.hook_name.split(".")[1])
        with torch.no_grad():
            torch.testing.assert_close(acts[layer], sae.encode(x[layer]), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(recon[layer], sae(x[layer]), atol=1e-5, rtol=1e-5)
    if name == "saelens_negative_thresholds":  # circuit-tracer's pre * (pre > t) with these t would differ
        p = w["params"][0]
        pre = x[0] @ p["W_enc"].T + p["b_enc"]
        assert not torch.equal(pre * (pre > p["threshold"]), acts[0])


@pytest.mark.parametrize("name", OURS)
def test_we_read_what_we_write(world, name):
    directory, clt = world["ours"][name]
    back = load_transcoder(directory)
    assert back.cfg.family == ("circuit-tracer-clt" if clt.cfg.cross_layer else "circuit-tracer-transcoder-set")
    for k, v in clt.state_dict().items():
        if k == "threshold" and clt.cfg.activation != "jumprelu":
            continue  # not written: circuit-tracer reads a threshold as JumpReLU
        assert torch.equal(back.state_dict()[k], v), k
    x = world["x"]
    torch.testing.assert_close(_ours(back, x), _ours(clt, x))


@needs_peer
@pytest.mark.parametrize(
    "name", ["ours_clt", "ours_clt_relu", "ours_set_skip", "ours_set_relu", "ours_set_some_layers"]
)
def test_circuit_tracer_reads_what_we_write(world, ct, name):
    report, tensors = ct
    _, clt = world["ours"][name]
    acts, recon = _ours(clt, world["x"])
    route = "load_clt" if clt.cfg.cross_layer else "load_transcoder_set"
    for job in (f"{name}:{route}", f"{name}:cache"):
        assert report[job]["ok"], report[job]
        assert report[job]["skip"] == clt.cfg.skip and report[job]["input_hook"] == clt.cfg.input_hook
        torch.testing.assert_close(tensors[job + ".acts"], acts, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tensors[job + ".recon"], recon, atol=1e-5, rtol=1e-5)


@needs_peer
def test_circuit_tracer_refuses_what_it_would_misread(world, ct):
    """A skip CLT: circuit-tracer 0.5.0's load_clt never reads W_skip, so config.yaml declares a
    model_kind its config-reading loaders refuse; load_clt(dir), which reads no config, still loads it
    without the skip (exactly our output minus the skip). A TopK set: its strict loader refuses."""
    report, tensors = ct
    assert "Unknown model kind" in report["ours_clt_skip:cache"]["error"]
    assert "Unknown model kind" in report["ours_set_topk:cache"]["error"]
    assert "Unexpected key" in report["ours_set_topk:load_transcoder_set"]["error"]
    _, clt = world["ours"]["ours_clt_skip"]
    x = world["x"]
    _, recon = _ours(clt, x)
    skip = torch.einsum("lnd,lde->lne", x, clt.W_skip.detach())
    torch.testing.assert_close(tensors["ours_clt_skip:load_clt.recon"], recon - skip, atol=1e-5, rtol=1e-5)


def test_saelens_reads_what_we_write(tmp_path):
    from sae_lens import SAE

    clt = _random_clt(cross_layer=False, skip=True, layers=[0, 2])  # layer 1 is not written
    save_saelens(clt, tmp_path / "sl")
    assert sorted(p.name for p in (tmp_path / "sl").iterdir()) == ["layer_0", "layer_2"]
    x = torch.randn(5, L, D)
    recon, acts = clt(x)
    for l in (0, 2):
        sae = SAE.load_from_disk(str(tmp_path / "sl" / f"layer_{l}"))
        assert sae.cfg.metadata.model_from_pretrained_kwargs == {
            "fold_ln": False, "center_writing_weights": False, "center_unembed": False}  # fmt: skip
        torch.testing.assert_close(sae(x[:, l]), recon[:, l], atol=1e-5, rtol=1e-5)
    back = load_transcoder(tmp_path / "sl")
    assert back.cfg.layers == [0, 2] and back.cfg.model_processing == "none"
    torch.testing.assert_close(back(x)[0], recon)
    with torch.no_grad():
        clt.threshold[2, 3] = -0.1
    with pytest.raises(CircuitsError, match="negative JumpReLU thresholds"):
        save_saelens(clt, tmp_path / "neg")


def test_presets_are_circuit_tracers_repositories():
    assert hub_ref("gemma") == "mwhanna/gemma-scope-transcoders"  # circuit-tracer 0.5.0 hf_utils, caching
    assert hub_ref("llama") == "mntss/transcoder-Llama-3.2-1B"
    assert {k: v.repo for k, v in PRESETS.items() if k.startswith("clt-")} == {
        "clt-gemma-2-2b-426k": "mntss/clt-gemma-2-2b-426k",
        "clt-gemma-2-2b-2.5M": "mntss/clt-gemma-2-2b-2.5M",
        "clt-llama-3.2-1b-524k": "mntss/clt-llama-3.2-1b-524k",
        "clt-131k": "mntss/clt-131k",
    }
    assert hub_ref("runs/my-clt") is None


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache that huggingface_hub uses, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_presets_and_hub_refs_load_offline_from_the_hub_cache(tmp_path, hub_cache, world):
    x = world["x"]
    # 'gemma': the mwhanna config repo lists hf:// params.npz files of google's weights repo
    src = tmp_path / "gemma"
    w = layouts.write_gemmascope_npz(src, L, D, F, 5, paths="hf")
    layouts.hub_cache_repo(hub_cache, "mwhanna/gemma-scope-transcoders", src, ["config.yaml"])
    layouts.hub_cache_repo(hub_cache, layouts.GEMMASCOPE_REPO, src, list(w["files"]))
    # a circuit-tracer CLT preset, and a transcoder set in a folder of a repository at a tag
    clt_src, set_src = tmp_path / "clt", tmp_path / "set"
    w_clt = layouts.write_ct_clt(clt_src, L, D, F, 6)
    layouts.hub_cache_repo(hub_cache, "mntss/clt-gemma-2-2b-426k", clt_src)
    w_set = layouts.write_ct_transcoder_set(set_src / "sets" / "a", L, D, F, 8, activation="jumprelu", skip=True)
    layouts.hub_cache_repo(hub_cache, "someone/transcoders", set_src, revision="v1")
    # a GemmaScope-2 set: the config in a folder of mwhanna's repo, the weights in google's
    gs2_src = tmp_path / "gs2"
    w_gs2 = layouts.write_gemmascope2_transcoders(gs2_src, L, D, F, 9, affine=True, paths="hf")
    repo, sub = w_gs2["meta"]["hf_ref"].split("/", 2)[:2], w_gs2["meta"]["hf_ref"].split("/", 2)[2]
    (gs2_src / sub).mkdir(parents=True)
    (gs2_src / sub / "config.yaml").write_text(w_gs2["config_files"]["config.yaml"])
    layouts.hub_cache_repo(hub_cache, "/".join(repo), gs2_src, [f"{sub}/config.yaml"])
    layouts.hub_cache_repo(hub_cache, w_gs2["meta"]["weights_repo"], gs2_src, list(w_gs2["files"]))
    for name, written, family, source in [
        ("gemma", w, "gemmascope", "hf:mwhanna/gemma-scope-transcoders"),
        ("clt-gemma-2-2b-426k", w_clt, "circuit-tracer-clt", "hf:mntss/clt-gemma-2-2b-426k"),
        ("hf:someone/transcoders/sets/a@v1", w_set, CT_SET, "hf:someone/transcoders/sets/a@v1"),
        ("hf:" + w_gs2["meta"]["hf_ref"], w_gs2, "gemmascope-2", "hf:" + w_gs2["meta"]["hf_ref"]),
    ]:  # fmt: skip
        clt = load_transcoder(name)
        assert (clt.cfg.family, clt.cfg.source) == (family, source)
        acts, recon = _ours(clt, x)
        ref_acts, ref_recon = layouts.reference_forward(written, x)
        torch.testing.assert_close(acts, torch.stack([ref_acts[l] for l in range(L)]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(recon, torch.stack([ref_recon[l] for l in range(L)]), atol=1e-5, rtol=1e-5)
    with pytest.raises(CircuitsError, match="could not be fetched") as e:
        load_transcoder("hf:nobody/nothing")
    assert "\n" not in str(e.value)


def test_decoders_stay_memory_mapped_and_dtype_applies(world):
    """With the files' dtype on the CPU a decoder is a view of its file (a private mapping listed in
    /proc/self/maps), so loading reads no decoder page; another dtype converts it, thresholds stay fp32."""
    directory, _ = world["written"]["ct_clt_jumprelu"]
    clt = load_transcoder(directory)
    maps = Path("/proc/self/maps").read_text().splitlines() if Path("/proc/self/maps").exists() else []
    if not maps:
        pytest.skip("no /proc/self/maps here")
    ptr = clt.W_dec[1].data_ptr()
    mapped = [m.split()[-1] for m in maps if int(m.split("-")[0], 16) <= ptr < int(m.split()[0].split("-")[1], 16)]
    assert mapped == [str((directory / "W_dec_1.safetensors").resolve())]
    half = load_transcoder(directory, dtype="bfloat16")
    assert half.W_enc.dtype == half.W_dec[0].dtype == half.b_dec.dtype == torch.bfloat16
    assert half.threshold.dtype == torch.float32
    torch.testing.assert_close(half.W_dec[2].float(), clt.W_dec[2].to(torch.bfloat16).float())
    with pytest.raises(CircuitsError, match="dtype 'float64' is not supported"):
        load_transcoder(directory, dtype="float64")


def _one_line(match: str, *args, **kwargs) -> None:
    with pytest.raises(CircuitsError, match=match) as e:
        load_transcoder(*args, **kwargs)
    assert "\n" not in str(e.value), str(e.value)


def test_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    _one_line("holds no transcoder: expected a circuit-tracer CLT", tmp_path / "empty")
    for norm in ("constant_norm_rescale", "layer_norm"):
        layouts.write_saelens_transcoder(tmp_path / norm, L, D, F, 1, normalize_activations=norm)
        _one_line(f"normalize_activations '{norm}' rescales each token", tmp_path / norm)
    layouts.write_saelens_transcoder(tmp_path / "b_dec_in", L, D, F, 1, extra_cfg={"apply_b_dec_to_input": True})
    _one_line("apply_b_dec_to_input is true", tmp_path / "b_dec_in")
    layouts.write_ct_clt(tmp_path / "clt", L, D, F, 1)
    data = (tmp_path / "clt" / "W_dec_1.safetensors").read_bytes()
    (tmp_path / "clt" / "W_dec_1.safetensors").write_bytes(data[: len(data) // 2])
    _one_line("W_dec_1.safetensors is corrupt or truncated", tmp_path / "clt")
    w = layouts.write_gemmascope_npz(tmp_path / "gs", L, D, F, 1, paths="relative")
    npz = tmp_path / "gs" / sorted(w["files"])[1]
    npz.write_bytes(npz.read_bytes()[:1000])
    _one_line("params.npz is corrupt or truncated", tmp_path / "gs")
    save_transcoder(_random_clt(), tmp_path / "newer")
    config = json.loads((tmp_path / "newer" / "config.json").read_text())
    (tmp_path / "newer" / "config.json").write_text(json.dumps({**config, "from_the_future": 1}))
    _one_line("has fields \\['from_the_future'\\] this version does not know", tmp_path / "newer")
    layouts.write_ct_transcoder_set(tmp_path / "gap", L, D, F, 1)
    (tmp_path / "gap" / "layer_1.safetensors").unlink()
    _one_line("layer_1.safetensors is missing", tmp_path / "gap")
    _one_line("holds no transcoder \\(no such directory\\)", tmp_path / "nowhere")
