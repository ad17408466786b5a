"""Every bad input to the `circuits` command: exit status 2, one line on stderr naming the problem
(no traceback), and nothing written (no file created or changed under the test's folder, the
working directory or the package).

Each case builds its bad input in a fresh folder and returns the command line; the command runs
in-process with that folder as the working directory.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from circuits.cli import main
from tests.hf_models import write_tiny_hf_model

PACKAGE = Path(__file__).resolve().parent.parent / "circuits"
DEMO_MODEL = PACKAGE / "demo" / "model"
DEMO_CLT = PACKAGE / "demo" / "clt"
PROMPT = "Fact: Dallas is in the state whose capital is"
NOT_UTF8 = "Fact: Dallas \udcff is"  # the byte 0xff in argv, as Python decodes it (surrogateescape)
RECIPE = 'model = "demo"\nsteps = 2\nbatch_tokens = 64\neval_every = 1\ncheckpoint_every = 1\neval_docs = 4\n'
Case = Callable[[Path], list[str]]


@pytest.fixture(scope="session")
def hf_snapshot(tmp_path_factory) -> Path:
    return write_tiny_hf_model("gpt2", tmp_path_factory.mktemp("hf") / "gpt2")


@pytest.fixture(scope="session")
def graph_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graph")
    assert main(["trace", PROMPT, "--out", str(out), "--slug", "g", "--no-concepts", "--inhibited", "0"]) == 0
    return out / "g.graph.safetensors"


# ---- builders of bad folders and files ---------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 64)


def _huge_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + data[8:])


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _drop_tensor(path: Path, key: str) -> None:
    tensors = load_file(str(path))
    del tensors[key]
    save_file(tensors, str(path))


def _recipe(d: Path, text: str, name: str = "r.toml") -> list[str]:
    (d / name).write_text(text)
    return ["train", str(d / name), "--out", str(d / "run")]


def _model_dir(d: Path, corrupt: Callable[[Path], None]) -> list[str]:
    model = _copy(DEMO_MODEL, d / "model")
    corrupt(model)
    return ["predict", "--model", str(model)]


def _snapshot(hf: Path, d: Path, corrupt: Callable[[Path], None]) -> list[str]:
    model = _copy(hf, d / "hf")
    corrupt(model)
    return ["predict", "--model", str(model)]


def _clt_dir(d: Path, corrupt: Callable[[Path], None]) -> list[str]:
    clt = _copy(DEMO_CLT, d / "clt")
    corrupt(clt)
    return ["trace", "--transcoder", str(clt), "--out", str(d / "out"), "--no-concepts"]


def _trace(d: Path, *argv: str) -> list[str]:
    return ["trace", PROMPT, "--out", str(d / "out"), *argv]


def _concepts(d: Path, *argv: str) -> list[str]:
    return ["concepts", PROMPT, "--out", str(d / "out"), *argv]


def _a_file(d: Path) -> Path:
    (d / "file").write_text("not a directory\n")
    return d / "file"


def _graph_with(d: Path, graph: Path, **changes) -> Path:
    """A copy of `graph` with tensors removed (None) or fields of its metadata changed (None: removed;
    metadata="garbage": the metadata no longer JSON)."""
    from safetensors import safe_open

    with safe_open(str(graph), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    fields = json.loads(meta["graph"])
    for key, value in changes.items():
        if key in tensors:
            del tensors[key]
        elif value is None:
            del fields[key]
        else:
            fields[key] = value
    meta["graph"] = "{not json" if changes.get("metadata") == "garbage" else json.dumps(fields)
    path = d / f"changed-{len(list(d.iterdir()))}.graph.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _checkpoint_without_fields(d: Path) -> list[str]:
    """A run folder whose checkpoint's state.json has only the step (no config, no optimiser state)."""
    (d / "run" / "checkpoint").mkdir(parents=True)
    (d / "run" / "checkpoint" / "state.json").write_text('{"step": 1}')
    save_file({"last_fired": torch.zeros(4, 8)}, str(d / "run" / "checkpoint" / "state.safetensors"))
    return _recipe(d, RECIPE) + ["--resume"]


# ---- the cases: (id, builder, words the one line must contain) ----------------------------------

OPTIONS = [
    ("node-threshold-2", lambda d: _trace(d, "--node-threshold", "2"), "node_threshold"),
    ("node-threshold-negative", lambda d: _trace(d, "--node-threshold", "-1"), "node_threshold"),
    ("node-threshold-nan", lambda d: _trace(d, "--node-threshold", "nan"), "node_threshold"),
    ("edge-threshold-inf", lambda d: _trace(d, "--edge-threshold", "inf"), "edge_threshold"),
    ("inhibited-negative", lambda d: _trace(d, "--inhibited", "-1"), "inhibited"),
    ("max-feature-nodes-0", lambda d: _trace(d, "--max-feature-nodes", "0"), "max_feature_nodes"),
    ("batch-size-0", lambda d: _trace(d, "--batch-size", "0"), "batch_size"),
    ("features-missing", lambda d: _trace(d, "--features", str(d / "none")), "no feature scan"),
    ("concept-unknown", lambda d: _trace(d, "--concept", "Zanzibar"), "Zanzibar"),
    ("path-one-element", lambda d: _trace(d, "--path", "Dallas"), "--path"),
    ("path-empty-element", lambda d: _trace(d, "--path", "Dallas,,Austin"), "concept ''"),
    ("target-unknown", lambda d: _trace(d, "--target", "Atlantis"), "Atlantis"),
    ("out-is-a-file", lambda d: ["trace", PROMPT, "--out", str(_a_file(d))], "not a directory"),
    ("out-under-a-file", lambda d: ["trace", PROMPT, "--out", str(_a_file(d) / "sub")], "not a directory"),
    ("out-not-writable", lambda d: ["trace", PROMPT, "--out", "/proc/sys/circuits-out"], "cannot be written"),
    ("trace-prompt-not-utf8", lambda d: ["trace", NOT_UTF8, "--out", str(d / "out")], "UTF-8"),
    ("trace-prompt-empty", lambda d: ["trace", " ", "--out", str(d / "out")], "prompt is empty"),
    ("trace-model-missing", lambda d: _trace(d, "--model", str(d / "nothing")), "does not exist"),
    ("trace-unknown-flag-value", lambda d: _trace(d, "--inhibited", "many"), "inhibited"),
    ("predict-top-k-0", lambda d: ["predict", "--top-k", "0"], "--top-k"),
    ("predict-top-k-negative", lambda d: ["predict", "--top-k", "-2"], "--top-k"),
    ("predict-top-k-above-vocab", lambda d: ["predict", "--top-k", "100000"], "--top-k"),
    ("predict-prompt-not-utf8", lambda d: ["predict", NOT_UTF8], "UTF-8"),
    ("concepts-counterfactual-empty", lambda d: _concepts(d, "--counterfactual", ""), "counterfactual"),
    ("concepts-counterfactual-not-utf8", lambda d: _concepts(d, "--counterfactual", NOT_UTF8), "UTF-8"),
    ("concepts-path-one-element", lambda d: _concepts(d, "--path", "Texas"), "--path"),
    ("concepts-concept-no-words", lambda d: _concepts(d, "--concept", "name="), "concept ''"),
    ("concepts-concept-unknown", lambda d: _concepts(d, "--concept", "Zanzibar"), "Zanzibar"),
    ("concepts-out-is-a-file", lambda d: ["concepts", PROMPT, "--out", str(_a_file(d))], "not a directory"),
    ("concepts-prompt-not-utf8", lambda d: ["concepts", NOT_UTF8, "--out", str(d / "out")], "UTF-8"),
]

TEXT = [
    ("features-text-not-utf8", "text.txt", b"Dallas is in Texas\n\xff\xfe bad\n", "UTF-8"),
    ("features-jsonl-without-text", "text.jsonl", b'{"body": "Dallas"}\n', '"text"'),
    ("features-jsonl-not-json", "text.jsonl", b'{"text": "Dallas"\n', "JSON"),
    ("features-text-empty", "text.txt", b"\n\n", "no documents"),
]


def _features_text(name: str, content: bytes) -> Case:
    def build(d: Path) -> list[str]:
        (d / name).write_bytes(content)
        return ["features", "--text", str(d / name), "--documents", "4", "--out", str(d / "features")]

    return build


FEATURES = [(case_id, _features_text(name, content), words) for case_id, name, content, words in TEXT] + [
    (
        "features-text-hub-offline",
        lambda d: ["features", "--text", "hf:wikitext", "--out", str(d / "f")],
        "hf:wikitext",
    ),
    ("features-documents-0", lambda d: ["features", "--documents", "0", "--out", str(d / "f")], "n_documents"),
    ("features-top-k-0", lambda d: ["features", "--top-k", "0", "--out", str(d / "f")], "top_k"),
    ("features-out-is-a-file", lambda d: ["features", "--documents", "4", "--out", str(_a_file(d))], "not a directory"),
]


def _with(old: str, new: str) -> Case:
    """A recipe with `old` replaced by `new` (appended when `old` is empty)."""
    return lambda d: _recipe(d, RECIPE.replace(old, new) if old else RECIPE + new)


def _not_utf8_recipe(d: Path) -> list[str]:
    (d / "r.toml").write_bytes(b"steps = 2 # \xff\n")
    return ["train", str(d / "r.toml")]


def _text_recipe(name: str, content: bytes) -> Case:
    def build(d: Path) -> list[str]:
        (d / name).write_bytes(content)
        return _recipe(d, RECIPE + f'text = "{d / name}"\n')

    return build


RECIPES = [
    ("recipe-lr-negative", _with("", "lr = -1.0\n"), "lr"),
    ("recipe-lr-nan", _with("", "lr = nan\n"), "lr"),
    ("recipe-n-features-0", _with("", "[transcoder]\nn_features = 0\n"), "n_features"),
    ("recipe-batch-tokens-0", _with("batch_tokens = 64", "batch_tokens = 0"), "batch_tokens"),
    ("recipe-eval-every-0", _with("eval_every = 1", "eval_every = 0"), "eval_every"),
    ("recipe-checkpoint-every-0", _with("checkpoint_every = 1", "checkpoint_every = 0"), "checkpoint_every"),
    ("recipe-steps-0", _with("steps = 2", "steps = 0"), "steps"),
    ("recipe-steps-negative", _with("steps = 2", "steps = -5"), "steps"),
    ("recipe-activation-unknown", _with("", '[transcoder]\nactivation = "swish"\n'), "activation"),
    ("recipe-topk-0", _with("", '[transcoder]\nactivation = "topk"\ntopk = 0\n'), "topk"),
    ("recipe-parallel-unknown", _with("", 'parallel = "tensor"\n'), "parallel"),
    ("recipe-warmup-above-1", _with("", "warmup_fraction = 1.5\n"), "warmup_fraction"),
    ("recipe-eval-docs-0", _with("eval_docs = 4", "eval_docs = 0"), "eval_docs"),
    ("recipe-hook-unknown", _with("", '[transcoder]\ninput_hook = "hook_bogus"\n'), "hook"),
    ("recipe-not-utf8", _not_utf8_recipe, "UTF-8"),
    ("recipe-text-hub-offline", _with("", 'text = "hf:wikitext"\n'), "hf:wikitext"),
    ("recipe-out-is-a-file", lambda d: _recipe(d, RECIPE)[:2] + ["--out", str(_a_file(d))], "not a directory"),
    ("recipe-resume-checkpoint-lacks-fields", _checkpoint_without_fields, "lacks"),
    ("recipe-jsonl-without-text", _text_recipe("t.jsonl", b'{"body": "Dallas is in Texas"}\n'), '"text"'),
    ("recipe-text-not-utf8", _text_recipe("t.txt", b"Dallas is in Texas\n\xff\n"), "UTF-8"),
]


def _model(corrupt: Callable[[Path], None]) -> Case:
    return lambda d: _model_dir(d, corrupt)


WEIGHTS, TOKENIZER = "model.safetensors", "tokenizer/tokenizer.json"
MODEL_DIRS = [
    ("model-truncated", _model(lambda m: _truncate(m / WEIGHTS)), WEIGHTS),
    ("model-random-bytes", _model(lambda m: _random_bytes(m / WEIGHTS)), WEIGHTS),
    ("model-huge-header", _model(lambda m: _huge_header(m / WEIGHTS)), WEIGHTS),
    ("model-config-not-json", _model(lambda m: (m / "config.json").write_text("{oops")), "config.json"),
    ("model-config-a-list", _model(lambda m: (m / "config.json").write_text("[1, 2]")), "config.json"),
    ("model-config-not-utf8", _model(lambda m: (m / "config.json").write_bytes(b'{"a": "\xff"}')), "config.json"),
    ("model-d-model-disagrees", _model(lambda m: _edit_json(m / "config.json", d_model=64)), WEIGHTS),
    ("model-n-heads-disagrees", _model(lambda m: _edit_json(m / "config.json", n_heads=8)), WEIGHTS),
    ("model-n-layers-wrong-type", _model(lambda m: _edit_json(m / "config.json", n_layers="four")), "n_layers"),
    ("model-act-fn-unknown", _model(lambda m: _edit_json(m / "config.json", act_fn="swoosh")), "config.json"),
    ("model-tokenizer-corrupt", _model(lambda m: (m / TOKENIZER).write_text('{"model": 3}')), "tokenizer"),
    ("model-tokenizer-truncated", _model(lambda m: _truncate(m / TOKENIZER)), "tokenizer"),
]


def _hf(corrupt: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    return lambda d, hf: _snapshot(hf, d, corrupt)


SNAPSHOTS = [
    ("hf-truncated", _hf(lambda m: _truncate(m / WEIGHTS)), WEIGHTS),
    ("hf-random-bytes", _hf(lambda m: _random_bytes(m / WEIGHTS)), WEIGHTS),
    ("hf-huge-header", _hf(lambda m: _huge_header(m / WEIGHTS)), WEIGHTS),
    ("hf-config-not-json", _hf(lambda m: (m / "config.json").write_text("{oops")), "config.json"),
    ("hf-d-model-disagrees", _hf(lambda m: _edit_json(m / "config.json", n_embd=32)), "config.json"),
    ("hf-n-heads-disagrees", _hf(lambda m: _edit_json(m / "config.json", n_head=5)), "config.json"),
    ("hf-vocab-disagrees", _hf(lambda m: _edit_json(m / "config.json", vocab_size=100)), "config.json"),
    ("hf-tokenizer-corrupt", _hf(lambda m: (m / "tokenizer.json").write_text('{"model": 3}')), "tokenizer"),
    ("hf-tokenizer-truncated", _hf(lambda m: _truncate(m / "tokenizer.json")), "tokenizer"),
]


def _clt(corrupt: Callable[[Path], None]) -> Case:
    return lambda d: _clt_dir(d, corrupt)


CLT_DIRS = [
    ("clt-missing-b-enc", _clt(lambda c: _drop_tensor(c / "W_enc_0.safetensors", "b_enc_0")), "b_enc_0"),
    ("clt-header-too-large", _clt(lambda c: _huge_header(c / "W_enc_0.safetensors")), "W_enc_0"),
    ("clt-decoder-truncated", _clt(lambda c: _truncate(c / "W_dec_1.safetensors")), "W_dec_1"),
    ("clt-decoder-missing", _clt(lambda c: (c / "W_dec_2.safetensors").unlink()), "W_dec_2"),
    ("clt-config-unknown-keys", _clt(lambda c: _edit_json(c / "config.json", colour="red")), "colour"),
    ("clt-config-not-json", _clt(lambda c: (c / "config.json").write_text("{oops")), "config.json"),
    ("clt-config-a-list", _clt(lambda c: (c / "config.json").write_text("[]")), "config.json"),
    ("clt-config-wrong-type", _clt(lambda c: _edit_json(c / "config.json", n_features="many")), "n_features"),
    ("clt-config-negative-layers", _clt(lambda c: _edit_json(c / "config.json", n_layers=-1)), "n_layers"),
    ("clt-config-yaml-garbage", _clt(lambda c: (c / "config.yaml").write_text("a: [b\n")), "config.yaml"),
    ("clt-activation-unknown", _clt(lambda c: _edit_json(c / "config.json", activation="swish")), "activation"),
]


def _aggregate(*graphs: Path, out: Path) -> list[str]:
    return ["aggregate", *map(str, graphs), "--out", str(out)]


def _random_graph(d: Path) -> Path:
    _random_bytes(d / "x.graph.safetensors")
    return d / "x.graph.safetensors"


AGGREGATE = [
    ("aggregate-bad-metadata", lambda d, g: _aggregate(_graph_with(d, g, metadata="garbage"), out=d / "a"), "graph"),
    ("aggregate-field-missing", lambda d, g: _aggregate(_graph_with(d, g, prompt=None), out=d / "a"), "prompt"),
    ("aggregate-missing-tensor", lambda d, g: _aggregate(_graph_with(d, g, adjacency=None), out=d / "a"), "adjacency"),
    ("aggregate-out-is-a-directory", lambda d, g: _aggregate(g, out=d), "directory"),
    ("aggregate-other-transcoders", lambda d, g: _aggregate(g, _graph_with(d, g, config={}), out=d / "a"), "different"),
    (
        "aggregate-min-prompts-negative",
        lambda d, g: _aggregate(g, out=d / "a") + ["--min-prompts", "-1"],
        "min_prompts",
    ),
    ("aggregate-min-prompts-above", lambda d, g: _aggregate(g, out=d / "a") + ["--min-prompts", "3"], "min_prompts"),
    ("aggregate-random-bytes", lambda d, g: _aggregate(_random_graph(d), out=d / "a"), "graph"),
]


def _tree(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in root.rglob("*")}


def _check(argv: list[str], words: str, folder: Path, capsys, monkeypatch) -> None:
    cwd = folder / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _tree(folder, PACKAGE / "demo")
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    assert status == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("circuits: error: ") and words in lines[0], lines[0]
    assert captured.out == ""
    assert _tree(folder, PACKAGE / "demo") == before  # nothing written, nothing left behind


@pytest.mark.parametrize("build, words", [c[1:] for c in OPTIONS + FEATURES + RECIPES + MODEL_DIRS + CLT_DIRS],
                         ids=[c[0] for c in OPTIONS + FEATURES + RECIPES + MODEL_DIRS + CLT_DIRS])  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_nothing_written(build, words, tmp_path, capsys, monkeypatch):
    _check(build(tmp_path), words, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("build, words", [c[1:] for c in SNAPSHOTS], ids=[c[0] for c in SNAPSHOTS])
def test_bad_snapshot_is_one_line(build, words, hf_snapshot, tmp_path, capsys, monkeypatch):
    _check(build(tmp_path, hf_snapshot), words, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("build, words", [c[1:] for c in AGGREGATE], ids=[c[0] for c in AGGREGATE])
def test_bad_aggregate_is_one_line(build, words, graph_file, tmp_path, capsys, monkeypatch):
    _check(build(tmp_path, graph_file), words, tmp_path, capsys, monkeypatch)


HEAVY = ("transformer_lens", "transformers", "sae_lens")


@pytest.mark.parametrize(
    "code",
    [
        "import circuits.cli",
        "from circuits.cli import main; main(['trace', '--node-threshold', '2'])",
        "from circuits.cli import main; main(['train', 'missing.toml'])",
        "from circuits.cli import main; main(['trace', '--inhibited', 'many'])",
    ],
)
def test_help_and_argument_errors_import_no_model_library(code, tmp_path):
    """`circuits --help` and one-line argument errors never wait for TransformerLens (about 10 s)."""
    import subprocess
    import sys

    imported = f"print(sorted(m for m in {HEAVY} if m in sys.modules))"
    check = f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\n{imported}"
    env = {"PYTHONPATH": str(PACKAGE.parent), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_features_by_default_write_to_the_user_cache_not_the_package(tmp_path, monkeypatch, capsys):
    from circuits.features import DEMO_FEATURES_DIR, default_features_dir, features_for, load_features

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    shipped = _tree(DEMO_FEATURES_DIR)
    assert main(["features", "--documents", "8", "--top-k", "2"]) == 0
    written = tmp_path / "cache" / "circuits" / "features" / "demo"
    assert capsys.readouterr().out.strip() == str(written) == str(default_features_dir("demo"))
    assert _tree(DEMO_FEATURES_DIR) == shipped  # the shipped cards are untouched
    from circuits.transcoders.load import load_transcoder

    clt = load_transcoder("demo")
    assert features_for("demo", clt).config.n_documents == 8  # the user's scan, not the shipped one
    assert load_features("demo", clt).config.n_documents != 8  # 'demo' still names the shipped cards


def test_a_write_the_system_refuses_is_one_line_and_leaves_nothing(tmp_path):
    """A file-size limit (the stand-in for a full disk: the write fails with EFBIG) mid-way through
    writing a trace: one line, exit 2, no temporary file left in --out."""
    import subprocess
    import sys

    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from circuits.cli import main\n"
        f"sys.exit(main(['trace', {PROMPT!r}, '--out', {str(tmp_path / 'out')!r}, '--no-concepts']))\n"
    )
    env = {
        "PYTHONPATH": str(PACKAGE.parent),
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }  # fmt: skip  (the limit would truncate the .pyc files it writes)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    errors = [line for line in out.stderr.splitlines() if line.strip() and "attribution:" not in line]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert errors[0].startswith("circuits: error: File too large (") and "free space or choose" in errors[0]
    assert not list((tmp_path / "out").glob("*")) and not list((tmp_path / "out").glob(".*"))
