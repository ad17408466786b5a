"""The GPU check: the GPU tests, attribution on a Gemma-2-2B-shaped slice in float32 and bfloat16, and
CLT training throughput of the same shape in fp32 and bf16-mixed precision (`training`, `training_bf16`),
on one NVIDIA GPU, into one JSON. Run it through
`scripts/gpu_check.sh` (which prints the commands it runs and installs carried wheels first):

    scripts/gpu_check.sh                 # one GPU, under 8 minutes; writes ${OUT:-.}/gpu_check.json
    scripts/gpu_check.sh --dry-run       # shapes shrunk, on the CPU in seconds (tests/test_gpu_check.py)

The slice: Gemma-2-2B's blocks (d_model 2,304, 8 heads of 256 with 4 key-value heads, d_mlp 9,216, RMS norms
before and after attention and MLP, rotary positions, soft caps) with 4 layers and random weights, the demo
tokenizer's vocabulary (embedding and unembedding are not on the Jacobian rows' path), and a random
cross-layer transcoder of 16,384 features per layer whose thresholds make about --l0 features fire per layer
and position on the demo corpus (`circuits.train.objective.initialise` on the model's own activations).

FLOPs are counted, not modelled: torch.utils.flop_counter.FlopCounterMode over one whole `attribute()` call
(or one training step), 2 FLOPs per multiply-add of every matrix product torch executed (mm, bmm, addmm,
baddbmm, attention), plus the gather-sums of torch.nn.functional.embedding_bag (the trainer's sparse
decoder and encoder backward: 2 x indices x width each, forward and backward). Products over zero rows or
columns count as executed; elementwise work (norms, activations, softmax, Adam) is not counted. The count is
taken in one untimed run; TFLOP/s = that count / the best timed run of the same call.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's circuits, also when it is not installed

from circuits.attribution.attribute import attribute  # noqa: E402
from circuits.demo.corpus import generate_documents  # noqa: E402
from circuits.fileio import write_json  # noqa: E402
from circuits.models import DEMO_MODEL_DIR  # noqa: E402
from circuits.text import TextSource  # noqa: E402
from circuits.train.activations import ActivationStream, collect  # noqa: E402
from circuits.train.config import TrainConfig, TranscoderConfig  # noqa: E402
from circuits.train.objective import Scales, initialise, losses  # noqa: E402
from circuits.transcoders.clt import CrossLayerTranscoder  # noqa: E402


@dataclass
class Shape:
    """The model, transcoder and workloads of one check."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    n_kv_heads: int
    d_mlp: int
    n_features: int
    lengths: tuple[int, ...]  # prompt lengths of the attribution benchmark, BOS included
    l0: float  # features firing per layer and position (training: per token)
    attribution_batch: int  # targets per backward pass (0: the library's automatic choice)
    dense_floats: int  # the attribution's dense-graph limit (0: the library's); the dry run's makes both layouts
    batch_tokens: int  # tokens per training step
    docs_per_chunk: int  # documents per forward pass of the activation stream
    warmup_steps: int
    train_steps: int  # timed, after the warm-up


GEMMA_SLICE = Shape(4, 2304, 8, 256, 4, 9216, 16384, (64, 256), 64, 128, 0, 4096, 512, 5, 40)
DRY = Shape(2, 64, 2, 32, 1, 128, 256, (6, 10), 8, 0, 100_000, 256, 64, 1, 3)  # 6 tokens dense, 10 sparse
PARTS = ["tests", "training", "attribution"]


def gemma2_slice(shape: Shape, device: str):
    """A random Gemma-2-style HookedTransformer of `shape` with the demo tokenizer (TransformerLens's
    google/gemma-2-2b config, fewer layers; its local layers' window of 4,096 is longer than these
    prompts, so they attend as the global ones do)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    n_ctx = max(*shape.lengths, 64)  # 64: the documents of the activation stream, uncut
    cfg = HookedTransformerConfig(
        model_name="gemma-2-2b-slice", n_layers=shape.n_layers, d_model=shape.d_model, n_heads=shape.n_heads,
        d_head=shape.d_head, n_key_value_heads=shape.n_kv_heads, d_mlp=shape.d_mlp, n_ctx=n_ctx,
        eps=1e-6, act_fn="gelu_pytorch_tanh", normalization_type="RMS", rotary_base=10000.0,
        positional_embedding_type="rotary", use_attn_scale=True, window_size=4096, use_local_attn=True,
        attn_types=(["global", "local"] * shape.n_layers)[: shape.n_layers], attn_scores_soft_cap=50.0,
        output_logits_soft_cap=30.0, gated_mlp=True, final_rms=True, use_normalization_before_and_after=True,
        tokenizer_name=str(DEMO_MODEL_DIR / "tokenizer"), default_prepend_bos=True, seed=0, device=device,
    )  # fmt: skip
    return HookedTransformer(cfg).eval()


def random_clt(model, shape: Shape) -> CrossLayerTranscoder:
    """A random CLT of `shape.n_features` per layer whose b_enc makes each feature fire on l0 / F of the
    demo corpus's tokens (so about l0 features fire per layer and position)."""
    train_cfg = TrainConfig(transcoder=TranscoderConfig(n_features=shape.n_features),
                            target_fire_fraction=shape.l0 / shape.n_features)  # fmt: skip
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(train_cfg.clt_config(model)).to(model.cfg.device).eval()
    x, _ = collect(model, clt.cfg, generate_documents(64, seed=3), max_tokens=64)  # [n, L, d]
    initialise(clt, x[:1024], train_cfg)
    return clt


def prompt_of(model, n: int) -> str:
    """A demo-corpus text of exactly n tokens, BOS included."""
    tokens = model.to_tokens(" ".join(generate_documents(n, seed=11)))[0, :n]
    prompt = model.tokenizer.decode(tokens[1:].tolist())
    assert model.to_tokens(prompt).shape[1] == n
    return prompt


def _embedding_bag_flops(weight_or_grad, indices, *args, **kwargs) -> int:
    """2 x indices x width: one multiply-add per gathered (or scattered) element."""
    return 2 * indices[0] * weight_or_grad[-1]


def _per_sample_weights_flops(grad, weight, indices, *args, **kwargs) -> int:
    return 2 * indices[0] * weight[-1]


_aten = torch.ops.aten
EXTRA_FLOPS = {
    _aten._embedding_bag: _embedding_bag_flops,
    _aten._embedding_bag_forward_only: _embedding_bag_flops,
    _aten._embedding_bag_backward: _embedding_bag_flops,
    _aten._embedding_bag_dense_backward: _embedding_bag_flops,
    _aten._embedding_bag_per_sample_weights_backward: _per_sample_weights_flops,
}


def counted(fn):
    """(fn()'s result, the FLOPs it executed; see the module's docstring)."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOPS) as counter:
        result = fn()
    return result, counter.get_total_flops()


def timed(fn, device: str):
    """(fn()'s result, seconds, peak device memory in bytes during it; None on the CPU)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    return result, time.perf_counter() - start, torch.cuda.max_memory_allocated() if cuda else None


def held_bytes(device: str) -> int | None:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else None


def finite(adjacency: torch.Tensor) -> bool:
    """Whether every stored edge is finite (the sparse layout of long prompts: its values)."""
    values = adjacency.coalesce().values() if adjacency.is_sparse else adjacency
    return bool(values.isfinite().all())


def attribution_run(model, clt, prompt: str, dtype: str, shape: Shape, repeat: int, device: str) -> dict:
    """One prompt in one dtype: a counted cold run, then `repeat` timed runs."""
    options = {"dtype": dtype, "device": device, "progress": False}
    if shape.attribution_batch:
        options["batch_size"] = shape.attribution_batch
    if shape.dense_floats:
        options["dense_floats"] = shape.dense_floats
    held = held_bytes(device)
    graph, flops = counted(lambda: attribute(prompt, model, clt, **options))
    runs = []
    for _ in range(repeat):
        graph = None  # one graph alive at a time
        graph, seconds, peak = timed(lambda: attribute(prompt, model, clt, **options), device)
        runs.append((seconds, peak))
    best = min(s for s, _ in runs)
    peak = max((p for _, p in runs), default=None) if device.startswith("cuda") else None
    return {
        "dtype": dtype, "tokens": len(graph.tokens), "active_features": graph.config["n_active_features"],
        "feature_nodes": graph.n_features, "nodes": len(graph.adjacency), "targets": len(graph.target_tokens),
        "seconds": best, "seconds_all": [s for s, _ in runs], "flops": flops, "tflops_per_s": flops / best / 1e12,
        "peak_memory_bytes": peak, "held_memory_bytes": held, "edges_finite": finite(graph.adjacency),
        "layout": "sparse" if graph.adjacency.is_sparse else "dense",
        "attribution_config": graph.config["attribution"],
    }  # fmt: skip


def attribution_bench(model, clt, shape: Shape, repeat: int, device: str, deadline: float, report) -> list[dict]:
    """Every prompt length in float32, then bfloat16 (model and CLT converted: their own weights in
    that dtype), shortest first. A length is skipped when its predicted time would pass the deadline:
    the last length's best time, grown by the square of the length ratio, times `repeat` + 2 runs (the
    counted run taken as two)."""
    results = []
    for dtype in ("float32", "bfloat16"):
        model, clt = model.to(getattr(torch, dtype)), clt.to(getattr(torch, dtype))
        last = None
        for n in shape.lengths:
            predicted = 0.0 if last is None else last["seconds"] * (repeat + 2) * (n / last["tokens"]) ** 2
            if time.time() + predicted > deadline:
                results.append({"dtype": dtype, "tokens": n, "skipped": f"predicted {predicted:.0f} s: over budget"})
                continue
            last = attribution_run(model, clt, prompt_of(model, n), dtype, shape, repeat, device)
            results.append(last)
            report()
    return results


def training_bench(model, shape: Shape, device: str, precision: str = "fp32") -> dict:
    """Training steps of the objective (`circuits.train.objective.losses`, backward, gradient clipping,
    Adam, the threshold clamp: what `circuits.train.loop` runs per step) on the model's own
    activations, pre-collected (their collection timed apart), in `precision` (a recipe's: fp32 or
    bf16-mixed). lr is tiny so L0 stays where `initialise` put it (about --l0 per layer and token): a
    step's cost depends on L0, not on lr."""
    cfg = TrainConfig(
        transcoder=TranscoderConfig(n_features=shape.n_features), target_fire_fraction=shape.l0 / shape.n_features,
        lr=1e-7, batch_tokens=shape.batch_tokens, docs_per_chunk=shape.docs_per_chunk,
        steps=shape.warmup_steps + shape.train_steps + 1, device=device, precision=precision,
    )  # fmt: skip
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(cfg.clt_config(model)).to(device)
    stream = ActivationStream(model, clt.cfg, TextSource("demo"), cfg.batch_tokens, cfg.docs_per_chunk)
    n_batches = min(8, cfg.steps)
    batches, collect_seconds, _ = timed(lambda: list(itertools.islice(stream.batches(0), n_batches)), device)
    scales = Scales.estimate(*batches[0])
    batches = [(x * scales.inp[:, None], y * scales.out[:, None]) for x, y in batches]
    initialise(clt, batches[0][0], cfg)
    opt = torch.optim.Adam(clt.parameters(), lr=cfg.lr)
    dead = torch.zeros_like(clt.b_enc, dtype=torch.bool)

    def step(i: int) -> float:
        x, y = batches[i % len(batches)]
        result = losses(clt, x, y, i, cfg, dead)
        opt.zero_grad(set_to_none=True)
        result.total.backward()
        torch.nn.utils.clip_grad_norm_(clt.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            clt.threshold.clamp_(min=0.0)
        return result.l0.mean()

    for i in range(shape.warmup_steps):
        step(i)
    _, flops = counted(lambda: step(shape.warmup_steps))
    start = shape.warmup_steps + 1
    l0s, seconds, peak = timed(lambda: [step(i) for i in range(start, start + shape.train_steps)], device)
    tokens = shape.train_steps * cfg.batch_tokens
    return {
        "dtype": "float32", "precision": precision, "n_features": shape.n_features, "batch_tokens": cfg.batch_tokens,
        "warmup_steps": shape.warmup_steps, "steps": shape.train_steps, "seconds": seconds,
        "tokens_per_s": tokens / seconds, "flops_per_step": flops,
        "tflops_per_s": flops * shape.train_steps / seconds / 1e12,
        "l0_per_layer": torch.stack(l0s).mean().item(), "peak_memory_bytes": peak,
        "activation_tokens_per_s": n_batches * cfg.batch_tokens / collect_seconds,
    }  # fmt: skip


def gpu_test_files() -> list[str]:
    """The test files that hold tests skipped without CUDA (this check's own test excluded)."""
    files = sorted((ROOT / "tests").rglob("test_*.py"))
    return [str(f.relative_to(ROOT)) for f in files if "skipif(not torch.cuda.is_available()" in f.read_text()]


def gpu_tests() -> dict:
    """Run the tests named gpu or cuda in those files (every test of tests/test_gpu.py): their outcomes."""
    files = gpu_test_files()
    xml = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "gpu or cuda", f"--junitxml={xml}"]
    print("+", " ".join(cmd + files), flush=True)
    proc = subprocess.run(cmd + files, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", flush=True)
    cases = []
    for case in ET.parse(xml).iter("testcase") if xml.exists() else []:
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        cases.append({"test": f"{case.get('classname')}.{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0))})  # fmt: skip
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failure", "error", "skipped")}
    return {"files": files, "exit_status": proc.returncode, **counts, "cases": cases}


def environment(device: str) -> dict:
    cuda = device.startswith("cuda")
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "device": device, "device_name": props.name if cuda else platform.processor() or platform.machine(),
        "device_memory_bytes": props.total_memory if cuda else None,
        "compute_capability": f"{props.major}.{props.minor}" if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "packages": {name: importlib.metadata.version(name) for name in ("transformer-lens", "transformers", "numpy")},
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="shapes shrunk, runs on the CPU in seconds")
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "gpu_check.json"))
    parser.add_argument("--lengths", type=int, nargs="+", help="prompt lengths (default: 64 256; dry run: 8 16)")
    parser.add_argument("--l0", type=float, help="features firing per layer and position (default 64; dry run 8)")
    parser.add_argument("--attribution-batch", type=int, help="targets per backward pass (0: automatic; default 128)")
    parser.add_argument("--train-steps", type=int, help="timed training steps (default 40)")
    parser.add_argument("--repeat", type=int, help="timed attribution runs per prompt, the best counts (default 2)")
    parser.add_argument("--budget", type=float, default=420, help="seconds: skip attribution lengths past it")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="what to run (default: all)")
    args = parser.parse_args()
    started = time.time()
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA GPU: run on a GPU machine, or pass --dry-run",
              file=sys.stderr)  # fmt: skip
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = DRY if args.dry_run else GEMMA_SLICE
    overrides = {"lengths": tuple(args.lengths or ()), "l0": args.l0, "attribution_batch": args.attribution_batch,
                 "train_steps": args.train_steps}  # fmt: skip
    shape = dataclasses.replace(shape, **{k: v for k, v in overrides.items() if v})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"dry_run": args.dry_run, "environment": environment(device), "shape": dataclasses.asdict(shape)}

    def report() -> None:
        record["seconds_total"] = time.time() - started
        write_json(out, record, indent=2)  # after each part: a run cut short keeps what it measured

    report()
    print(f"gpu_check: {record['environment']['device_name']}, torch {torch.__version__}; writing {out}", flush=True)
    if "tests" in args.parts:
        record["tests"] = gpu_tests()
        report()
    model = gemma2_slice(shape, device)
    record["model"] = {"parameters": sum(p.numel() for p in model.parameters()), "d_vocab": model.cfg.d_vocab}
    if "training" in args.parts:
        record["training"] = training_bench(model, shape, device)
        report()
        record["training_bf16"] = training_bench(model, shape, device, "bf16-mixed")  # matmuls in bfloat16
        report()
        print(json.dumps(record["training"]), json.dumps(record["training_bf16"]), sep="\n", flush=True)
    if "attribution" in args.parts:
        clt = random_clt(model, shape)
        record["transcoder"] = {"parameters": sum(p.numel() for p in clt.parameters())}
        repeat = args.repeat or (1 if args.dry_run else 2)
        record["attribution"] = attribution_bench(model, clt, shape, repeat, device, started + args.budget, report)
        report()
        for row in record["attribution"]:
            print(json.dumps({k: v for k, v in row.items() if k != "attribution_config"}), flush=True)
    print(out.resolve())
    return 1 if "tests" in record and record["tests"]["exit_status"] != 0 else 0  # 5: no GPU test found


if __name__ == "__main__":
    sys.exit(main())
