"""What a training run is asked to do: `TrainConfig`, with the transcoder's own options nested in
`TranscoderConfig`, and `load_recipe`, which reads one from a TOML recipe.

A recipe sets TrainConfig fields at its top and TranscoderConfig fields in a `[transcoder]` table:

    model = "demo"
    steps = 1500
    [transcoder]
    n_features = 1024
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from circuits.errors import CircuitsError, check_range
from circuits.processing import weight_processing
from circuits.text import TextSource
from circuits.transcoders.clt import INPUT_HOOKS, OUTPUT_HOOKS, CLTConfig, check_fits, check_transcoder_fields

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)


@dataclass
class TranscoderConfig:
    """The transcoder a recipe asks for: every `CLTConfig` field except those read from the model
    (n_layers, d_model, model_name, model_processing) and `extra`."""

    n_features: int = 1024
    """Features per layer."""
    cross_layer: bool = True
    """False: a per-layer transcoder, each source writes only its own layer."""
    skip: bool = False
    """Add a learned linear skip path from each layer's input to its output."""
    activation: str = "jumprelu"
    """jumprelu | relu | topk"""
    topk: int = 16
    """Features kept per layer and token with activation = topk."""
    bandwidth: float = 0.05
    """Width of the straight-through window for the JumpReLU threshold gradient, in pre-activation
    units (inputs normalised to E||x|| = sqrt(d))."""
    input_hook: str = "hook_resid_mid"
    """The hook each layer's features read (`blocks.{l}.<input_hook>`): hook_resid_mid | hook_mlp_in |
    ln2.hook_normalized | mlp.hook_in (the MLP's argument)."""
    output_hook: str = "hook_mlp_out"
    """The hook each layer's reconstruction replaces (`blocks.{l}.<output_hook>`): hook_mlp_out |
    mlp.hook_out (the MLP's output, before Gemma's norm after the MLP)."""

    def __post_init__(self) -> None:
        check_transcoder_fields(self)
        if self.input_hook not in INPUT_HOOKS or self.output_hook not in OUTPUT_HOOKS:
            raise CircuitsError(
                f"hooks {self.input_hook} -> {self.output_hook} are not ones a transcoder reads and writes: "
                f"use {' | '.join(INPUT_HOOKS)} -> {' | '.join(OUTPUT_HOOKS)}"
            )


@dataclass
class TrainConfig:
    """One training run: the model, its text, the transcoder, the optimisation and where it runs."""

    model: str = "demo"
    """'demo', a local model directory or a TransformerLens model name."""
    text: str = "demo"
    """Training text: 'demo', a .txt/.jsonl file, or 'hf:DATASET' (needs circuits-tracer[hf])."""
    transcoder: TranscoderConfig = field(default_factory=TranscoderConfig)
    """The transcoder to train (the recipe's [transcoder] table)."""
    steps: int = 2000
    batch_tokens: int = 1024
    """Tokens per optimiser step (the global batch, split across torchrun ranks)."""
    lr: float = 1e-3
    warmup_fraction: float = 0.05
    """Fraction of the steps over which lr rises linearly from 0."""
    decay_fraction: float = 0.2
    """Fraction of the steps, at the end, over which lr falls linearly to 0."""
    sparsity_coef: float = 0.4
    """lambda_S at the end of the ramp (with `target_l0`: its scale; it starts at 0). A recipe with
    activation = "topk" that does not set it gets 0: TopK needs no penalty."""
    target_l0: float = 0.0
    """Active features per layer and token to steer towards (0: off). Each layer's lambda_S is then
    set by feedback from the L0 of each batch, with no ramp (JumpReLU and ReLU transcoders)."""
    sparsity_c: float = 4.0
    """c in the sparsity penalty tanh(c * a * ||W_dec||)."""
    preact_coef: float = 3e-4
    """lambda_P of the pre-activation loss on dead features."""
    initial_threshold: float = 0.1
    target_fire_fraction: float = 0.02
    """Initial b_enc makes each feature fire on about this fraction of tokens."""
    grad_clip: float = 1.0
    parallel: str = "data"
    """Under torchrun: 'data' (each rank holds the whole CLT) or 'feature' (each rank owns F/N
    features of every layer)."""
    dead_after_tokens: int = 200_000
    """A feature that has not fired for this many tokens is dead and gets the pre-activation loss."""
    eval_every: int = 200
    checkpoint_every: int = 500
    docs_per_chunk: int = 512
    """Documents run through the model at a time; their tokens are shuffled together."""
    activations: str = ""
    """An activation store written by `circuits activations` to train from: the model is then not
    run (`model` may be "", or the store's model, loaded only for the replacement-model metrics)."""
    activation_cache: str = ""
    """A directory for safetensors shards of the activations (read back by runs with the same text
    settings, e.g. a sweep); empty: no cache."""
    eval_docs: int = 256
    """Held-out documents for the metrics (reconstruction and replacement model)."""
    max_tokens_per_doc: int = 64
    seed: int = 0
    threads: int = 0
    """torch threads (0: leave torch's default)."""
    device: str = "cpu"
    precision: str = "fp32"
    """fp32 | bf16-mixed: the step's dense encoder and decoder matmuls (forward and backward) in
    bfloat16, with float32 weights, Adam state, activations, loss and sums (on one CPU thread with
    AMX: matmuls 3-4x faster, a step at F 1,024 1.3-1.4x; the same held-out NMSE at the same L0)."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse values no run can use, in one line, before any work."""
        for name in ("steps", "batch_tokens", "eval_every", "checkpoint_every", "docs_per_chunk", "eval_docs",
                     "dead_after_tokens"):  # fmt: skip
            check_range(name, getattr(self, name), 1, integer=True)
        check_range("max_tokens_per_doc", self.max_tokens_per_doc, 2, integer=True)  # BOS and one token
        check_range("threads", self.threads, 0, integer=True)
        for name in ("lr", "sparsity_c", "grad_clip"):
            check_range(name, getattr(self, name), 0.0, above=True)
        check_range("target_fire_fraction", self.target_fire_fraction, 0.0, 1.0, above=True)
        for name in ("sparsity_coef", "preact_coef", "initial_threshold"):
            check_range(name, getattr(self, name), 0.0)
        check_range("warmup_fraction", self.warmup_fraction, 0.0, 1.0)
        check_range("decay_fraction", self.decay_fraction, 0.0, 1.0 - self.warmup_fraction)
        if self.precision not in ("fp32", "bf16-mixed"):
            raise CircuitsError(f"precision is {self.precision!r}: use 'fp32' or 'bf16-mixed'")
        if self.parallel not in ("data", "feature"):
            raise CircuitsError(f"parallel is {self.parallel!r}: use 'data' or 'feature'")
        TextSource(self.text)  # a text that cannot be read is refused now, before any work

    @classmethod
    def from_dict(cls, fields: dict) -> TrainConfig:
        """A TrainConfig from a recipe's keys (tables for the nested configs). Raises CircuitsError
        on unknown keys and wrong types; moves old top-level transcoder keys under `transcoder`."""
        checked = _checked(cls, _move_flat_transcoder_keys(fields))
        if checked.get("transcoder", TranscoderConfig()).activation == "topk":
            checked.setdefault("sparsity_coef", 0.0)
        return cls(**checked)

    def clt_config(self, model: HookedTransformer) -> CLTConfig:
        """The transcoder's full config for `model` (layers, width and weight processing read from
        it). Raises CircuitsError (one line) if its hooks do not fit the model."""
        cfg = CLTConfig(
            n_layers=model.cfg.n_layers,
            d_model=model.cfg.d_model,
            model_name=self.model,
            model_processing=weight_processing(model),
            **dataclasses.asdict(self.transcoder),
        )
        check_fits(cfg, model)
        return cfg


def load_recipe(path: Path) -> TrainConfig:
    """A TrainConfig from a TOML recipe of its fields."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        raise CircuitsError(f"recipe {str(path)!r} does not exist: pass a TOML file such as training/demo.toml")
    try:
        fields = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CircuitsError(f"recipe {str(path)!r} is not valid UTF-8 TOML ({e})") from None
    return TrainConfig.from_dict(fields)


def _checked(cls: type, fields: dict, prefix: str = "") -> dict:
    """`fields` as keyword arguments of dataclass `cls`, each nested table built into its own
    dataclass; keys are named in errors by their dotted path (`transcoder.n_features`)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(prefix + key for key in set(fields) - known)
    if unknown:
        raise CircuitsError(f"unknown recipe keys {unknown}: valid keys are {sorted(prefix + k for k in known)}")
    defaults, checked = cls(), {}
    for key, value in fields.items():
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default):
            table = _table(value, prefix + key)
            checked[key] = type(default)(**_checked(type(default), table, f"{prefix}{key}."))
            continue
        expected = type(default)
        if not isinstance(value, expected) and not (expected is float and isinstance(value, int)):
            raise CircuitsError(f"recipe key {prefix + key!r} must be {expected.__name__}, not {value!r}")
        checked[key] = value
    return checked


def _table(value, key: str) -> dict:
    if not isinstance(value, dict):
        raise CircuitsError(f"recipe key {key!r} must be a table ([{key}]), not {value!r}")
    return value


def _move_flat_transcoder_keys(fields: dict) -> dict:
    """Recipes written before the [transcoder] table set its keys at the top: move them under it,
    with one warning."""
    flat = sorted(set(fields) & {f.name for f in dataclasses.fields(TranscoderConfig)})
    if not flat:
        return fields
    log.warning("recipe keys %s are deprecated at the top level: move them under [transcoder]", flat)
    nested = _table(fields.get("transcoder", {}), "transcoder")
    both = sorted(set(flat) & set(nested))
    if both:
        raise CircuitsError(f"recipe keys {both} are set both at the top and under [transcoder]: keep one")
    moved = {key: value for key, value in fields.items() if key not in flat}
    return {**moved, "transcoder": {**{key: fields[key] for key in flat}, **nested}}
