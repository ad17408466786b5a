"""Benchmark: our attribution against circuit-tracer (and an autograd reference) on the same model,
CLT and prompts, on CPU with a fixed thread count.

    python scripts/bench_attribution.py --transcoder demo --fire-fraction 0.02 --lengths 8 16 32 57 64 \
        --threads 1 --repeat 3 --ct-python /work/ct-venv/bin/python

Each measurement runs in its own subprocess (so peak memory is that run's own): ours with this
Python, circuit-tracer with `--ct-python` (a virtualenv with `circuit-tracer` installed; it reads
our model directory and our CLT directory, which is circuit-tracer's CLT layout) once per batch size
of `--ct-batch-sizes` (on a CPU its default of 512 is far from its best on short prompts). Prints a
markdown table, a row per prompt length: active features, our time (best of --repeat warm runs
after a cold one), our GFLOP/s (counted by torch's FlopCounterMode), circuit-tracer's time at its
default batch size and at its best one with the ratios, the growth of RSS over the loaded model
during one cold attribution (circuit-tracer's at its default batch size and its least), the peak
RSS (circuit-tracer's at the batch size of least growth), and the largest edge difference
relative to the largest edge against circuit-tracer and against the autograd reference on --sample
rows. circuit-tracer never attributes from position 0 (BOS): edges are compared on the nodes both
graphs have.

`--heads` instead times the head loadings of the pruned graph's links (`circuits trace --heads`) on the
demo flagship and a 64-token prompt, as a ratio to the graph itself:

    python scripts/bench_attribution.py --heads --threads 1 --repeat 3

`--load` instead times loading a transcoder: a Gemma-shaped CLT stand-in (--load-shape, default 26 layers
x 512 features x d 2304 = 1.78 GB of fp32 weights in circuit-tracer's CLT layout, written once into
--load-dir) loaded by our `load_transcoder` and by circuit-tracer's `load_clt` (its defaults: lazy
decoders), each in a fresh subprocess, alternately, --repeat times, from a warm page cache. Reports the
best time and the peak RSS growth over the process's baseline after imports (the peak is reset through
/proc/self/clear_refs), both as a ratio, with the machine's load average:

    python scripts/bench_attribution.py --load --repeat 3 --ct-python /work/ct-venv/bin/python

`--short` instead prints only the time against circuit-tracer at its best batch size, wall and process CPU
time (on a shared machine the CPU time leaves out the waits for a core), best of --repeat warm runs for
circuit-tracer and of --ours-repeat (default 30) for ours, which is cheap (this VM's speed drifts by up to 2x
within seconds even when it is idle: a best of few runs of ours lands in a slow spell), the median CPU times
beside them, our FLOPs (torch's FlopCounterMode: the products) and their rate over our CPU time (far below the
peak rate of large products: the rest is fixed costs and memory traffic), a floor for our algorithm on this CPU
(the forward pass that freezes the prompt, `record_forward` alone, plus our FLOPs at the peak rate of one
[512, 512] x [512, 512] product at this thread count, with nothing else) beside the budget for 30x
(circuit-tracer's best / 30), with the thread count and load average:

    python scripts/bench_attribution.py --short --fire-fraction 0.02 --lengths 8 16 32 --repeat 5 \
        --ct-batch-sizes 8 16 32 64 128

(with `--ct-python ''` ours alone: the rows leave circuit-tracer's columns empty).

`--long` instead attributes long prompts on a random model sized for a CPU machine (4 layers,
d_model 256, 4 heads, n_ctx 4,096, written once into --long-dir with a CLT of 4 x 4,096 features
whose thresholds let about 20 fire per layer and position), random words of --long-lengths tokens,
`max_feature_nodes` --long-features for both tools. Each run is a subprocess under a hard address-space
cap (--memory-cap GB, RLIMIT_AS) and a time limit: a failure is reported as "out of memory at N GB"
instead of taking the machine down. Prints tokens, active features, for each tool the time, the peak RSS,
the RSS after imports and loading the model and transcoder, every weight read once and the C heap trimmed (the
baseline, taken alike for both) and the growth of peak RSS over it during the attribution (the peak is reset to
the baseline through /proc/self/clear_refs), circuit-tracer's
peak and growth as multiples of ours, what our `--estimate` predicted (in the same process, before the
attribution), and the edge agreement on the nodes both graphs kept. circuit-tracer takes minutes where we
take seconds: with `--ct-cache DIR` its results are kept there and reused at the same settings:

    python scripts/bench_attribution.py --long --threads 1 --long-lengths 64 128 256 --ct-cache /tmp/ct_long
    python scripts/bench_attribution.py --long --threads 1 --long-lengths 512 1024 2048 4096 --ct-python ''
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.reference: the autograd reference

SENTENCES = (
    "Fact : Dallas is in the state whose capital is Austin . The capital of Texas is Austin . "
    "Houston is a city in Texas . Fact : Boston is in the state whose capital is Boston . "
)


def prompt_tokens(model, n: int):
    """Exactly n tokens (BOS included) of repeated demo sentences."""
    words = (SENTENCES * 8).split()
    tokens = model.to_tokens(" ".join(words[: n - 1]))[0]
    assert len(tokens) == n, (len(tokens), n)
    return tokens


def _rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not inherited from a parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(run, args) -> tuple:
    """(the graph, timing): `run()` once cold (its peak RSS: one attribution's memory) and
    --repeat times warm (the best time), one graph alive at a time."""
    base, seconds, cpu, peak, graph = _rss_mb(), [], [], 0.0, None
    for _ in range(args.repeat + 1):
        graph = None
        t0, c0 = time.perf_counter(), time.process_time()
        graph = run()
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        peak = peak or _rss_mb()
    return graph, {"seconds": min(seconds[1:]), "cpu_seconds": min(cpu[1:]), "first": seconds[0], "peak_mb": peak,
                   "growth_mb": peak - base, "median_cpu_seconds": statistics.median(cpu[1:])}  # fmt: skip


def _addmm_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _baddbmm_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


def worker_ours(args) -> dict:
    import torch
    from safetensors.torch import save_file
    from torch.utils.flop_counter import FlopCounterMode

    from circuits.attribution.attribute import attribute
    from circuits.pipeline import load_pair

    torch.set_num_threads(args.threads)
    model, clt = load_pair("demo", args.transcoder)
    tokens = prompt_tokens(model, args.length)
    prompt = model.tokenizer.decode(tokens[1:].tolist())
    graph, timing = _timed(lambda: attribute(prompt, model, clt, batch_size=args.batch_size, progress=False), args)
    # FlopCounterMode counts out-of-place products only; ours add many in place (the one walk's edges)
    in_place = {torch.ops.aten.addmm_: _addmm_flops, torch.ops.aten.baddbmm_: _baddbmm_flops}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        attribute(prompt, model, clt, batch_size=args.batch_size, progress=False)
    save_file({"adjacency": graph.adjacency, "features": graph.features}, args.out)
    return {
        **timing, "flops": counter.get_total_flops(), **_floor(model, tokens, args),
        "n_features": graph.n_features, "n_layers": graph.n_layers, "targets": graph.target_tokens.tolist(),
        "tokens": tokens.tolist(),
    }  # fmt: skip


def _floor(model, tokens, args) -> dict:
    """The floor of our attribution of this prompt on this CPU: the forward pass that freezes it
    (`record_forward` alone, best of --ours-repeat) and the peak rate of one large fp32 product
    ([512, 512] x [512, 512], best of 100) at this thread count, at which its FLOPs would run."""
    import torch

    from circuits.attribution.replacement import record_forward

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    with torch.inference_mode():  # the first call of each warms up
        forward = min(timeit.repeat(lambda: record_forward(model, tokens), number=1, repeat=1 + args.ours_repeat))
        product = min(timeit.repeat(lambda: a @ b, number=1, repeat=101))
    return {"forward_seconds": forward, "peak_flops": 2 * 512**3 / product}


def worker_autograd(args) -> dict:
    """The autograd reference on a random sample of rows: their edges and the time per row."""
    import torch
    from safetensors.torch import save_file

    from circuits.attribution.attribute import attribute
    from circuits.pipeline import load_pair
    from tests.reference import autograd_rows

    torch.set_num_threads(args.threads)
    model, clt = load_pair("demo", args.transcoder)
    tokens = prompt_tokens(model, args.length)
    graph = attribute(model.tokenizer.decode(tokens[1:].tolist()), model, clt, progress=False)
    rows = torch.randperm(graph.n_features, generator=torch.Generator().manual_seed(0))[: args.sample].tolist()
    V = model.cfg.d_vocab
    targets = [tuple(graph.features[i].tolist()) for i in rows]
    targets.append(torch.eye(V)[graph.target_tokens[0]] - 1 / V)
    t0 = time.perf_counter()
    reference = autograd_rows(model, clt, graph.tokens, targets)
    seconds = time.perf_counter() - t0
    ours = graph.adjacency[rows + [graph.target_slice.start], : reference.shape[1]]
    save_file({"reference": reference, "ours": ours}, args.out)
    diff = ((ours - reference).abs().max() / reference.abs().max()).item()
    return {"seconds_per_row": seconds / len(targets), "rows": len(targets), "max_rel_diff": diff}


def ct_model(args):
    """circuit-tracer's replacement model of --model-dir and --transcoder-dir (our weights mapped onto
    its names), in eval mode, on --threads threads."""
    import torch
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformerConfig

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir)
    fields = json.loads((model_dir / "config.json").read_text())
    cfg = HookedTransformerConfig(**fields, tokenizer_name=str(model_dir / "tokenizer"), device="cpu")
    clt = load_clt(str(args.transcoder_dir), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    model = TransformerLensReplacementModel.from_config(cfg, clt)
    # circuit-tracer wraps the MLPs and the unembedding: map our state dict onto its names
    state = load_file(str(model_dir / "model.safetensors"))
    names = {k: k.replace(".old_mlp", "").replace("old_unembed.", "") for k in model.state_dict()}
    model.load_state_dict({k: state[v] for k, v in names.items() if v in state}, strict=False)
    unused = set(state) - set(names.values())
    assert not unused, f"weights not loaded into circuit-tracer's model: {sorted(unused)[:5]}"
    return model.eval()


def worker_ct(args) -> dict:
    import torch
    from circuit_tracer import attribute
    from safetensors.torch import save_file

    model = ct_model(args)
    tokens = torch.tensor(json.loads(args.tokens))
    graph, timing = _timed(lambda: attribute(tokens, model, batch_size=args.ct_batch_size, max_feature_nodes=None),
                           args)  # fmt: skip
    features = graph.active_features[graph.selected_features]
    save_file({"adjacency": graph.adjacency_matrix.float().contiguous(), "features": features.contiguous()}, args.out)
    targets = [t.vocab_idx for t in graph.logit_targets]
    return {
        **timing,
        "n_features": len(features),
        "targets": targets,
    }


def _run(python: str, worker: str, extra: list[str], env: dict | None = None) -> tuple[dict, Path]:
    out = Path(tempfile.mkdtemp(prefix="bench_attr_")) / f"{worker}.safetensors"
    cmd = [python, __file__, "--worker", worker, "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{worker} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), out


def compare(ours_path: Path, ct_path: Path, n_layers: int, n_pos: int) -> float:
    """Largest |edge difference| / largest |edge| over the nodes both graphs have."""
    from safetensors.torch import load_file

    a, b = load_file(str(ours_path)), load_file(str(ct_path))
    key_a = {tuple(f): i for i, f in enumerate(a["features"].tolist())}
    common = [(key_a[tuple(f)], j) for j, f in enumerate(b["features"].tolist()) if tuple(f) in key_a]
    na, nb = len(a["features"]), len(b["features"])
    # errors at positions > 0, all tokens, all logits (same order in both layouts)
    for layer in range(n_layers):
        for pos in range(1, n_pos):
            common.append((na + layer * n_pos + pos, nb + layer * n_pos + pos))
    n_tail = len(a["adjacency"]) - na - n_layers * n_pos
    common += [(na + n_layers * n_pos + k, nb + n_layers * n_pos + k) for k in range(n_tail)]
    ia, ib = (list(x) for x in zip(*common, strict=True))
    A, B = a["adjacency"][ia][:, ia], b["adjacency"][ib][:, ib]
    return ((A - B).abs().max() / B.abs().max()).item()


def with_fire_fraction(transcoder: str, fraction: float) -> Path:
    """A copy of the transcoder whose JumpReLU thresholds make each feature fire on about `fraction`
    of demo-corpus tokens (fraction * n_features active features per layer and token), in a
    temporary directory: a denser or sparser variant for timing at a given graph size."""
    import torch

    from circuits.demo.corpus import generate_documents
    from circuits.pipeline import load_pair
    from circuits.transcoders.circuit_tracer import save_transcoder

    model, clt = load_pair("demo", transcoder)
    tokens = model.to_tokens(generate_documents(256, seed=5), padding_side="right")[:, :48]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_mid"))
    with torch.no_grad():
        for l in range(clt.cfg.n_layers):
            pre = cache[f"blocks.{l}.hook_resid_mid"].flatten(0, 1) @ clt.W_enc[l].T + clt.b_enc[l]
            clt.threshold[l] = pre.quantile(1 - fraction, dim=0) + 1e-3  # off any token's exact value
    out = Path(tempfile.mkdtemp(prefix="bench_clt_"))
    save_transcoder(clt, out)
    return out


def _status_mb(field: str) -> float:
    """A /proc/self/status memory field (kB = KiB there) in MB (10^6 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"/proc/self/status has no {field}")


def _timed_load(load) -> dict:
    """Time `load()` and the growth of peak RSS over the RSS just before it (imports done)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base, t0 = _status_mb("VmRSS"), time.perf_counter()
    loaded = load()
    seconds = time.perf_counter() - t0
    result = {"seconds": seconds, "growth_mb": _status_mb("VmHWM") - base, "held_mb": _status_mb("VmRSS") - base}
    del loaded
    return result


def worker_load_ours(args) -> dict:
    import numpy  # noqa: F401 -- everything load_transcoder imports, so the baseline holds it
    import safetensors.torch  # noqa: F401
    import torch
    import yaml  # noqa: F401

    from circuits.transcoders.load import load_transcoder

    torch.set_num_threads(args.threads)
    return _timed_load(lambda: load_transcoder(args.transcoder_dir, dtype=args.load_dtype))


def worker_load_ct(args) -> dict:
    import torch
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.load_dtype)
    return _timed_load(lambda: load_clt(str(args.transcoder_dir), device=torch.device("cpu"), dtype=dtype))


def write_standin(directory: Path, n_layers: int, n_features: int, d_model: int) -> int:
    """A random CLT in circuit-tracer's CLT layout, one layer in memory at a time; its bytes on disk."""
    import torch
    from safetensors.torch import save_file

    done = directory / "config.yaml"
    if not done.exists():
        directory.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(0)
        for l in range(n_layers):
            enc = {
                f"W_enc_{l}": torch.randn(n_features, d_model, generator=gen) * d_model**-0.5,
                f"b_enc_{l}": torch.randn(n_features, generator=gen) * 0.1,
                f"b_dec_{l}": torch.randn(d_model, generator=gen) * 0.1,
                f"threshold_{l}": torch.rand(n_features, generator=gen) * 0.5 + 0.1,
            }
            save_file(enc, str(directory / f"W_enc_{l}.safetensors"))
            dec = torch.randn(n_features, n_layers - l, d_model, generator=gen) * n_features**-0.5
            save_file({f"W_dec_{l}": dec}, str(directory / f"W_dec_{l}.safetensors"))
        done.write_text(
            'model_name: "google/gemma-2-2b"\nmodel_kind: cross_layer_transcoder\n'
            "feature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
        )
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def bench_load(args) -> None:
    L, F, d = args.load_shape
    directory = Path(args.load_dir or Path(tempfile.gettempdir()) / f"bench_load_clt_{L}x{F}x{d}")
    size_mb = write_standin(directory, L, F, d) / 1e6
    for path in directory.glob("*.safetensors"):  # a warm page cache for both
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    ct_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    common = ["--transcoder-dir", str(directory), "--load-dtype", args.load_dtype, "--threads", str(args.threads)]
    load_before, runs = os.getloadavg(), {"ours": [], "ct": []}
    for _ in range(args.repeat):
        runs["ours"].append(_run(sys.executable, "load-ours", common, env)[0])
        if args.ct_python:
            runs["ct"].append(_run(args.ct_python, "load-ct", common, ct_env)[0])
    before, after = (" ".join(f"{x:.2f}" for x in avg) for avg in (load_before, os.getloadavg()))
    print(f"{directory}: {L} layers x {F} features x d {d}, {size_mb:,.0f} MB on disk, loaded as {args.load_dtype}; "
          f"best of {args.repeat}, {args.threads} thread(s), {os.cpu_count()} CPUs; "
          f"load average {before} before, {after} after")  # fmt: skip
    print("| loader | time | peak RSS growth | / size on disk | RSS held after |")
    print("|---|---:|---:|---:|---:|")
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items() if v}
    peak = {k: min(r["growth_mb"] for r in v) for k, v in runs.items() if v}
    names = {"ours": "ours: load_transcoder", "ct": "circuit-tracer: load_clt (lazy decoders)"}
    for k, r in best.items():
        print(f"| {names[k]} | {r['seconds']:.3f} s | {peak[k]:,.0f} MB | {peak[k] / size_mb:.2f}x "
              f"| {r['held_mb']:,.0f} MB |")  # fmt: skip
    if "ct" in best:
        print(f"| ours / circuit-tracer | {best['ours']['seconds'] / best['ct']['seconds']:.2f}x "
              f"| {peak['ours'] / peak['ct']:.2f}x | | |")  # fmt: skip


def bench_heads(args) -> None:
    """`--heads`: the head loadings of the pruned graph's links (what `circuits trace --heads` adds)
    on the demo flagship and a 64-token prompt, best of --repeat after a warm-up, as a ratio to the
    attribution of the graph itself, in this process."""
    import torch

    from circuits.attribution.attribute import attribute
    from circuits.attribution.heads import head_loadings
    from circuits.pipeline import load_pair

    torch.set_num_threads(args.threads)
    if args.fire_fraction:
        args.transcoder = str(with_fire_fraction(args.transcoder, args.fire_fraction))
    model, clt = load_pair("demo", args.transcoder)
    prompts = {
        "flagship": "Fact: Dallas is in the state whose capital is",
        "64 tokens": " ".join((SENTENCES * 8).split()[:63]),
    }
    print(f"threads={args.threads} transcoder={args.transcoder} load average {os.getloadavg()[0]:.2f}")
    print("| prompt | tokens | features | links | graph | head loadings | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, prompt in prompts.items():
        graph_times, head_times = [], []
        for _ in range(args.repeat + 1):
            start = time.perf_counter()
            graph = attribute(prompt, model, clt, batch_size=args.batch_size, progress=False)
            graph_times.append(time.perf_counter() - start)
            result = graph.prune()
            edges = (result.edge_mask & (graph.adjacency != 0)).nonzero()
            start = time.perf_counter()
            head_loadings(graph, model, clt, edges)
            head_times.append(time.perf_counter() - start)
        g, h = min(graph_times[1:]), min(head_times[1:])
        print(
            f"| {name} | {graph.n_pos} | {graph.n_features:,} | {len(edges):,} | {g:.3f} s | {h:.3f} s | {h / g:.2f}x |"
        )
    print(f"load average {os.getloadavg()[0]:.2f}")


LONG_SHAPE = dict(n_layers=4, d_model=256, n_heads=4, d_head=64, d_mlp=1024, n_ctx=4096, d_features=4096)


def write_long_pair(directory: Path, fire: int = 20) -> tuple[Path, Path]:
    """A random model directory (our layout, which circuit-tracer's worker reads too) and a random
    CLT (circuit-tracer's layout) whose per-feature thresholds let about `fire` features fire per
    layer and position on random words; written once."""
    import torch
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from circuits.models import DEMO_MODEL_DIR
    from circuits.transcoders.circuit_tracer import save_transcoder
    from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder

    model_dir, clt_dir = directory / "model", directory / "clt"
    if (clt_dir / "config.yaml").exists():
        return model_dir, clt_dir
    shape = {k: v for k, v in LONG_SHAPE.items() if k != "d_features"}
    fields = dict(model_name="bench-long", **shape, d_vocab=269, act_fn="gelu", normalization_type="LN",
                  positional_embedding_type="standard", default_prepend_bos=True, seed=0)  # fmt: skip
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(DEMO_MODEL_DIR / "tokenizer", model_dir / "tokenizer", dirs_exist_ok=True)
    model = HookedTransformer(HookedTransformerConfig(**fields, tokenizer_name=str(model_dir / "tokenizer"))).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith(("IGNORE", ".mask"))}
    save_file(state, str(model_dir / "model.safetensors"))  # the buffers are rebuilt from the config
    (model_dir / "config.json").write_text(json.dumps(fields, indent=2))
    L, d, F = shape["n_layers"], shape["d_model"], LONG_SHAPE["d_features"]
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=d, n_features=F)).eval()
    gen = torch.Generator().manual_seed(0)
    tokens = long_tokens(model, shape["n_ctx"], seed=99)  # every position: the resid statistics vary with it
    _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n.endswith("hook_resid_mid"))
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(clt.W_enc.shape, generator=gen) / d**0.5)
        clt.b_enc.zero_()
        for w in clt.W_dec:
            w.copy_(torch.randn(w.shape, generator=gen) / (L * d) ** 0.5)
        for l in range(L):
            pre = cache[f"blocks.{l}.hook_resid_mid"][0] @ clt.W_enc[l].T  # [pos, F]
            rank = len(pre) - len(pre) * fire // F  # each feature fires on fire / F of the positions
            clt.threshold[l] = pre.kthvalue(rank, dim=0).values.clamp(min=1e-3) + 1e-4
    save_transcoder(clt, clt_dir)
    return model_dir, clt_dir


def long_tokens(model, n: int, seed: int = 0):
    """BOS and n - 1 random words of the model's vocabulary (no special tokens)."""
    import torch

    words = [i for i in range(model.cfg.d_vocab) if not model.tokenizer.convert_ids_to_tokens(i).startswith("<")]
    pick = torch.randint(len(words), (n - 1,), generator=torch.Generator().manual_seed(seed))
    return torch.tensor([model.tokenizer.bos_token_id] + [words[i] for i in pick.tolist()])


def _save_edges(path: str, features, rows, n_nodes: int) -> None:
    """The feature and logit rows of a graph as edges (target, source, weight), node indices in its
    own order, with its features [k, 3] and node count."""
    import torch
    from safetensors.torch import save_file

    targets, sources, weights = rows
    save_file({"targets": targets.int().contiguous(), "sources": sources.int().contiguous(),
               "weights": weights.float().contiguous(), "features": features.contiguous(),
               "n_nodes": torch.tensor([n_nodes])}, path)  # fmt: skip


def _long_attribution(run, modules: list) -> tuple:
    """(run(), its time, the process's peak RSS, its RSS just before (imports done, model and transcoder
    loaded) and the growth of peak RSS over that baseline): the peak is reset to the baseline through
    /proc/self/clear_refs, so that what loading took does not count as the attribution's. Every
    parameter and buffer of `modules` is read first, so that both tools hold all of their weights in
    the baseline (ours maps the decoder from its file and would read its pages in during the
    attribution; circuit-tracer's `load_clt(lazy_decoder=False)` copies it into memory), and the C
    heap's free pages are handed back (glibc's malloc_trim), so that the baseline holds none of the
    holes that loading left (ours trims the heap after each backward pass, which would release them)."""
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.detach().sum()
    ctypes.CDLL(None).malloc_trim(0)  # heap.release_heap's call, without importing ours into the peer's process
    before = _status_mb("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base, t0 = _status_mb("VmRSS"), time.perf_counter()
    result = run()
    seconds, peak = time.perf_counter() - t0, _status_mb("VmHWM")
    return result, {"seconds": seconds, "peak_mb": max(before, peak), "baseline_mb": base, "growth_mb": peak - base}


def worker_long_ours(args) -> dict:
    import torch

    from circuits.attribution.attribute import attribute
    from circuits.attribution.estimate import estimate
    from circuits.pipeline import load_pair

    torch.set_num_threads(args.threads)
    model, clt = load_pair(args.model_dir, args.transcoder_dir)
    tokens = torch.tensor(json.loads(args.tokens))
    prompt = model.tokenizer.decode(tokens[1:].tolist())
    assert torch.equal(model.to_tokens(prompt)[0], tokens)
    predicted = estimate(prompt, model, clt, max_feature_nodes=args.long_features)  # its forward pass: small
    graph, memory = _long_attribution(
        lambda: attribute(prompt, model, clt, max_feature_nodes=args.long_features, progress=False), [model, clt]
    )
    _save_edges(args.out, graph.features, graph.edges(), graph.n_nodes)
    return {**memory, "n_active": graph.config["n_active_features"], "sparse": graph.adjacency.is_sparse,
            "estimate_seconds": predicted.seconds, "estimate_mb": predicted.peak_bytes / 1e6}  # fmt: skip


def worker_long_ct(args) -> dict:
    import torch
    from circuit_tracer import attribute

    model = ct_model(args)
    tokens = torch.tensor(json.loads(args.tokens))
    graph, memory = _long_attribution(
        lambda: attribute(tokens, model, batch_size=args.ct_batch_size, max_feature_nodes=args.long_features),
        [model],
    )
    A = graph.adjacency_matrix
    k = len(graph.selected_features)
    rows = torch.cat([torch.arange(k), torch.arange(len(A) - len(graph.logit_targets), len(A))])
    sub = A[rows]
    t, src = sub.nonzero(as_tuple=True)
    _save_edges(args.out, graph.active_features[graph.selected_features], (rows[t], src, sub[t, src]), len(A))
    return {**memory, "n_active": len(graph.active_features)}


def _run_capped(python: str, worker: str, extra: list[str], env: dict, cap_gb: float, timeout: float):
    """`_run` in a subprocess whose address space is capped at `cap_gb` (RLIMIT_AS) and whose time is
    limited: (result, edges file) or (a one-line failure, None)."""
    out = Path(tempfile.mkdtemp(prefix="bench_long_")) / f"{worker}.safetensors"
    cmd = [python, __file__, "--worker", worker, "--out", str(out), *extra]
    cap = int(cap_gb * 1e9)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=limit, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"stopped after {timeout / 60:.0f} min", None
    if proc.returncode != 0:
        memory = ("can't allocate memory", "MemoryError", "out of memory", "std::bad_alloc", "Cannot allocate")
        if any(m in proc.stderr for m in memory) or proc.returncode in (-9, 137):
            return f"out of memory at {cap_gb:g} GB", None
        return "failed: " + proc.stderr.strip().splitlines()[-1][:200], None
    return json.loads(proc.stdout.strip().splitlines()[-1]), out


def long_agreement(ours_path: Path, ct_path: Path, n_layers: int, n_pos: int) -> tuple[float, float, int]:
    """Edge agreement on the nodes both graphs kept (features both selected, errors and tokens at
    positions >= 1, logits): (largest |difference| / largest |edge| over circuit-tracer's edges
    between them, the same over the edges ours stores, the number of common features)."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(ours_path)), load_file(str(ct_path))
    keys = {}
    for name, g in (("a", a), ("b", b)):
        k = len(g["features"])
        n = int(g["n_nodes"][0])
        ids = [("f", *f) for f in g["features"].tolist()]
        ids += [("e", l, p) for l in range(n_layers) for p in range(n_pos)] + [("t", p) for p in range(n_pos)]
        ids += [("l", i) for i in range(n - k - (n_layers + 1) * n_pos)]
        keys[name] = ids
    common = set(keys["a"]) & set(keys["b"])
    common = {c for c in common if not (c[0] in "et" and c[-1] == 0) and not (c[0] == "f" and c[2] == 0)}

    def edges(g, ids):
        pairs = {}
        for t, s, w in zip(g["targets"].tolist(), g["sources"].tolist(), g["weights"].tolist(), strict=True):
            if ids[t] in common and ids[s] in common:
                pairs[(ids[t], ids[s])] = w
        return pairs

    ours, theirs = edges(a, keys["a"]), edges(b, keys["b"])
    largest = max(abs(w) for w in theirs.values())
    everywhere = max(abs(ours.get(p, 0.0) - w) for p, w in theirs.items()) / largest
    stored = max((abs(w - theirs.get(p, 0.0)) for p, w in ours.items()), default=0.0) / largest
    n_common = sum(1 for c in common if c[0] == "f")
    del torch
    return everywhere, stored, n_common


def bench_long(args) -> None:
    directory = Path(args.long_dir or Path(tempfile.gettempdir()) / "bench_long_pair")
    model_dir, clt_dir = write_long_pair(directory)
    from circuits.pipeline import load_pair

    model, _ = load_pair(str(model_dir), str(clt_dir))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    ct_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    print(f"random model {LONG_SHAPE}, CLT thresholds for ~20 active per layer and position; "
          f"max_feature_nodes {args.long_features}; {args.threads} thread(s), {os.cpu_count()} CPUs; "
          f"each run capped at {args.memory_cap:g} GB (RLIMIT_AS) and {args.long_timeout / 60:.0f} min; "
          f"circuit-tracer batch {args.ct_long_batch}")  # fmt: skip
    print(
        "| tokens | active features | ours: time / peak RSS / baseline / growth | `--estimate`: time / peak "
        "| circuit-tracer: time / peak RSS / baseline / growth | memory ratio: peak / growth "
        "| edge diff (ct's edges / ours stored) | load average (ours / ct) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for n in args.long_lengths:
        tokens = json.dumps(long_tokens(model, n).tolist())
        common = ["--model-dir", str(model_dir), "--transcoder-dir", str(clt_dir), "--tokens", tokens,
                  "--threads", str(args.threads), "--long-features", str(args.long_features)]  # fmt: skip
        ours, ours_path = _run_capped(sys.executable, "long-ours", common, env, args.memory_cap, args.long_timeout)
        ours_load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        ct, ct_path = (None, None)
        if args.ct_python:
            ct_args = common + ["--ct-batch-size", str(args.ct_long_batch)]
            ct, ct_path = _long_ct(args, n, ct_args, ct_env)
        features = next((r["n_active"] for r in (ours, ct) if isinstance(r, dict)), "-")
        cell = {k: _long_cell(r) for k, r in (("ours", ours), ("ct", ct))}
        ratio, agreement = "-", "-"
        if isinstance(ours, dict) and isinstance(ct, dict):
            ratio = f"{ct['peak_mb'] / ours['peak_mb']:.1f}x / {ct['growth_mb'] / ours['growth_mb']:.1f}x"
            everywhere, stored, k = long_agreement(ours_path, ct_path, LONG_SHAPE["n_layers"], n)
            agreement = f"{everywhere:.1e} / {stored:.1e} ({k} common features)"
        predicted = "-"
        if isinstance(ours, dict):
            predicted = f"{ours['estimate_seconds']:.0f} s / {ours['estimate_mb'] / 1e3:.2f} GB"
        ct_load = ct.get("load", "-") if isinstance(ct, dict) else "-"
        print(f"| {n:,} | {features:,} | {cell['ours']} | {predicted} | {cell['ct']} | {ratio} | {agreement} "
              f"| {ours_load} / {ct_load} |", flush=True)  # fmt: skip


def _long_cell(result: dict | str | None) -> str:
    """A --long run as 'time / peak RSS / baseline / growth', or its failure."""
    if not isinstance(result, dict):
        return result or "-"
    gb = {k: result[k] / 1e3 for k in ("peak_mb", "baseline_mb", "growth_mb")}
    return f"{result['seconds']:.1f} s / {gb['peak_mb']:.2f} / {gb['baseline_mb']:.2f} / +{gb['growth_mb']:.2f} GB"


def _long_ct(args, n: int, ct_args: list[str], env: dict) -> tuple[dict | str, Path | None]:
    """circuit-tracer's --long run on n tokens, or its result kept in --ct-cache by an earlier run at
    the same settings (its edges beside it; a failure is not kept). It takes minutes where ours takes
    seconds: keeping it lets ours be measured again alone."""
    key = f"ct-{n}-tokens-{args.long_features}-features-batch-{args.ct_long_batch}-{args.threads}-threads"
    cached = Path(args.ct_cache) / key if args.ct_cache else None
    if cached and cached.with_suffix(".json").exists():
        return json.loads(cached.with_suffix(".json").read_text()), cached.with_suffix(".safetensors")
    ct, path = _run_capped(args.ct_python, "long-ct", ct_args, env, args.memory_cap, args.long_timeout)
    if isinstance(ct, dict):
        ct["load"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            path = Path(shutil.copy(path, cached.with_suffix(".safetensors")))
            cached.with_suffix(".json").write_text(json.dumps(ct))
    return ct, path


def bench_short(args) -> None:
    """`--short`: our time against circuit-tracer's at its best batch size, per prompt length: wall
    time (best of --repeat warm runs; ours of --ours-repeat) and process CPU time (best likewise; on a
    shared machine it leaves out the time spent waiting for a core), the median CPU times, with the
    load average at each row."""
    from circuits.models import DEMO_MODEL_DIR
    from circuits.transcoders.load import DEMO_CLT_DIR

    if args.fire_fraction:
        args.transcoder = str(with_fire_fraction(args.transcoder, args.fire_fraction))
    transcoder_dir = DEMO_CLT_DIR if args.transcoder == "demo" else Path(args.transcoder).resolve()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    ct_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    common = ["--transcoder", str(args.transcoder), "--threads", str(args.threads)]
    ours_repeat = max(args.repeat, args.ours_repeat)
    print(f"threads={args.threads}, best of {ours_repeat} warm runs (circuit-tracer {args.repeat}), "
          f"circuit-tracer batch sizes {args.ct_batch_sizes}")  # fmt: skip
    print("| tokens | active features | ours | circuit-tracer best (batch) | ratio | CPU time: ours / circuit-tracer "
          "| ratio | median CPU time: ours / circuit-tracer | ratio | ours: GFLOP, GFLOP/s of CPU time | threads "
          "| floor: forward + products at peak | budget for 30x | edge diff | load average |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for n in args.lengths:
        ours, ours_path = _run(sys.executable, "ours", common + ["--length", str(n), "--repeat", str(ours_repeat)], env)
        ct_time, ratio, ct_cpu, cpu_ratio, diff = "-", "-", "", "-", "-"  # with `--ct-python ''`: ours alone
        ct_median, median_ratio, budget = "", "-", "-"
        if args.ct_python:
            ct_args = common + ["--tokens", json.dumps(ours["tokens"]), "--model-dir", str(DEMO_MODEL_DIR),
                                "--transcoder-dir", str(transcoder_dir)]  # fmt: skip
            runs = {b: _run(args.ct_python, "ct", [*ct_args, "--ct-batch-size", str(b), "--repeat", str(args.repeat)],
                            ct_env) for b in args.ct_batch_sizes}  # fmt: skip
            best = min(runs, key=lambda b: runs[b][0]["seconds"])
            ct = runs[best][0]
            cpu_best = min(r["cpu_seconds"] for r, _ in runs.values())
            ct_time, ratio = f"{ct['seconds'] * 1e3:.0f} ms ({best})", f"{ct['seconds'] / ours['seconds']:.1f}x"
            ct_cpu, cpu_ratio = f" / {cpu_best * 1e3:.0f}", f"{cpu_best / ours['cpu_seconds']:.1f}x"
            median_best = min(r["median_cpu_seconds"] for r, _ in runs.values())
            ct_median = f" / {median_best * 1e3:.0f}"
            median_ratio = f"{median_best / ours['median_cpu_seconds']:.1f}x"
            diff = f"{compare(ours_path, runs[best][1], ours['n_layers'], n):.1e}"
            budget = f"{ct['seconds'] / 30 * 1e3:.1f} ms"
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"| {n} | {ours['n_features']:,} | {ours['seconds'] * 1e3:.1f} ms | {ct_time} | {ratio} "
              f"| {ours['cpu_seconds'] * 1e3:.1f}{ct_cpu} ms | {cpu_ratio} "
              f"| {ours['median_cpu_seconds'] * 1e3:.1f}{ct_median} ms | {median_ratio} "
              f"| {ours['flops'] / 1e9:.2f}, {ours['flops'] / ours['cpu_seconds'] / 1e9:.0f} "
              f"| {args.threads} | {_floor_text(ours)} | {budget} | {diff} | {load} |", flush=True)  # fmt: skip


def _floor_text(ours: dict) -> str:
    """`_floor` as 'forward + FLOPs at the peak rate = sum (the peak rate)', in ms."""
    forward, products = ours["forward_seconds"] * 1e3, ours["flops"] / ours["peak_flops"] * 1e3
    return f"{forward:.2f} + {products:.2f} = {forward + products:.2f} ms ({ours['peak_flops'] / 1e9:.0f} GFLOP/s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transcoder", default="demo")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None, help="ours (default: automatic)")
    parser.add_argument(
        "--ct-batch-sizes",
        type=int,
        nargs="+",
        default=[32, 128, 512],
        help="circuit-tracer runs at each (512 is its default); its best time is the reference",
    )
    parser.add_argument(
        "--ct-python", default="/work/ct-venv/bin/python", help="a Python with circuit-tracer ('' to skip)"
    )
    parser.add_argument(
        "--fire-fraction",
        type=float,
        default=None,
        help="reset thresholds: each feature fires on this fraction of tokens",
    )
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs (both implementations)")
    parser.add_argument("--ours-repeat", type=int, default=30,
                        help="--short: ours runs this many times at least (cheap; the VM's speed drifts)")  # fmt: skip
    parser.add_argument("--sample", type=int, default=8, help="rows checked against autograd per length")
    parser.add_argument("--load", action="store_true", help="benchmark loading a transcoder instead (see above)")
    parser.add_argument("--load-dir", default=None, help="where the --load stand-in CLT is (written if absent)")
    parser.add_argument("--load-shape", type=int, nargs=3, default=[26, 512, 2304], metavar=("L", "F", "D"))
    parser.add_argument("--load-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--heads", action="store_true", help="benchmark head loadings against the graph instead")
    parser.add_argument("--long", action="store_true", help="benchmark long prompts instead (see above)")
    parser.add_argument("--short", action="store_true", help="only the time against circuit-tracer (see above)")
    parser.add_argument("--long-lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--long-features", type=int, default=2000, help="max_feature_nodes of both tools")
    parser.add_argument("--long-dir", default=None, help="where the --long model and CLT are (written if absent)")
    parser.add_argument("--memory-cap", type=float, default=10.0, help="GB of address space per --long run")
    parser.add_argument("--long-timeout", type=float, default=1800.0, help="seconds per --long run")
    parser.add_argument("--ct-long-batch", type=int, default=64, help="circuit-tracer's batch size in --long")
    parser.add_argument("--ct-cache", default=None, help="--long: keep circuit-tracer's results here, reuse them")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ct-batch-size", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--transcoder-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        workers = {"ours": worker_ours, "autograd": worker_autograd, "ct": worker_ct, "load-ours": worker_load_ours,
                   "load-ct": worker_load_ct, "long-ours": worker_long_ours, "long-ct": worker_long_ct}  # fmt: skip
        print(json.dumps(workers[args.worker](args)))
        return
    if args.load:
        return bench_load(args)
    if args.heads:
        return bench_heads(args)
    if args.long:
        return bench_long(args)
    if args.short:
        return bench_short(args)

    from circuits.models import DEMO_MODEL_DIR
    from circuits.transcoders.load import DEMO_CLT_DIR

    if args.fire_fraction:
        args.transcoder = str(with_fire_fraction(args.transcoder, args.fire_fraction))
    transcoder_dir = DEMO_CLT_DIR if args.transcoder == "demo" else Path(args.transcoder).resolve()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    common = ["--transcoder", str(args.transcoder), "--threads", str(args.threads), "--repeat", str(args.repeat)]
    ours_args = common + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
    print(f"threads={args.threads} transcoder={transcoder_dir} batch size: ours {args.batch_size or 'automatic'}, "
          f"circuit-tracer {args.ct_batch_sizes}")  # fmt: skip
    print(
        "| tokens | features | ours | GFLOP/s | circuit-tracer default (512) | ratio | circuit-tracer best (batch) "
        "| ratio | RSS growth ours / circuit-tracer default / least (batch) | peak RSS ours / circuit-tracer least "
        "| edge diff vs circuit-tracer / autograd |"
    )
    print("|---:" * 11 + "|")
    for n in args.lengths:
        length = ["--length", str(n)]
        ours, ours_path = _run(sys.executable, "ours", ours_args + length, env)
        ag, _ = _run(sys.executable, "autograd", ours_args + length + ["--sample", str(args.sample)], env)
        row = f"| {n} | {ours['n_features']:,} | {ours['seconds']:.3f} s | {ours['flops'] / ours['seconds'] / 1e9:.1f} "
        if args.ct_python:
            ct_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
            runs = {}
            for batch in args.ct_batch_sizes:
                ct_args = common + length + ["--tokens", json.dumps(ours["tokens"]), "--model-dir", str(DEMO_MODEL_DIR)]
                ct_args += ["--transcoder-dir", str(transcoder_dir), "--ct-batch-size", str(batch)]
                runs[batch] = _run(args.ct_python, "ct", ct_args, ct_env)
            best = min(runs, key=lambda b: runs[b][0]["seconds"])
            diff = compare(ours_path, runs[best][1], ours["n_layers"], n)
            ct, default = runs[best][0], runs.get(512, (None,))[0]
            least = min(runs, key=lambda b: runs[b][0]["growth_mb"])
            default_time = (
                f"{default['seconds']:.3f} s | {default['seconds'] / ours['seconds']:.1f}x" if default else "- | -"
            )
            default_growth = f"+{default['growth_mb']:,.0f}" if default else "-"
            row += (
                f"| {default_time} | {ct['seconds']:.3f} s ({best}) | {ct['seconds'] / ours['seconds']:.1f}x "
                f"| +{ours['growth_mb']:,.0f} / {default_growth} / +{runs[least][0]['growth_mb']:,.0f} ({least}) MB "
                f"| {ours['peak_mb']:,.0f} / {runs[least][0]['peak_mb']:,.0f} MB "
                f"| {diff:.1e} / {ag['max_rel_diff']:.1e} |"
            )
        else:
            memory = f"{ours['peak_mb']:,.0f} MB (+{ours['growth_mb']:,.0f})"
            row += f"| - | - | - | - | {memory} | - | - / {ag['max_rel_diff']:.1e} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
