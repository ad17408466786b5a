"""The cross-layer transcoder: sparse features that read the residual stream before each MLP
(`blocks.{l}.hook_resid_mid`) and write to the MLP outputs (`blocks.{l}.hook_mlp_out`) of that
layer and every later one.

Shapes: L layers, F features per layer, d = d_model.
    W_enc      [L, F, d]       encoder of source layer l
    b_enc      [L, F]
    threshold  [L, F]          JumpReLU threshold, fp32, stored directly
    W_dec[l]   [F, L - l, d]   slice k writes layer l + k ([F, 1, d] for a per-layer transcoder)
    b_dec      [L, d]          per target layer
    W_skip     [L, d, d]       optional linear skip path, y_l += x_l @ W_skip[l]

A per-layer transcoder is `cross_layer=False`; a skip transcoder adds `skip=True`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from circuits.errors import CircuitsError, check_range
from circuits.processing import same_at_the_hooks, transcoder_processing, weight_processing


@dataclass
class CLTConfig:
    n_layers: int
    d_model: int
    n_features: int
    cross_layer: bool = True
    """False: a per-layer transcoder, each source writes only its own layer."""
    skip: bool = False
    """Add a learned linear skip path from each layer's input to its output."""
    activation: str = "jumprelu"
    """jumprelu | relu | topk"""
    topk: int = 16
    """Features kept per layer and token with activation = topk."""
    bandwidth: float = 0.05
    """Width of the straight-through window for the JumpReLU threshold gradient, in
    pre-activation units (inputs normalised to E||x|| = sqrt(d) during training)."""
    input_hook: str = "hook_resid_mid"
    output_hook: str = "hook_mlp_out"
    model_name: str = ""
    extra: dict = field(default_factory=dict)
    layers: list[int] | None = None
    """Layers that have a transcoder (None: every layer). The others hold zero encoders, biases,
    thresholds and decoders: pre-activations are exactly 0 and 0 > 0 is false, so their features
    never fire and their whole MLP output is the error node."""
    family: str = "circuits"
    """The file layout it was read from: circuits (built in memory), circuit-tracer-clt,
    circuit-tracer-transcoder-set, gemmascope, gemmascope-2, gemmascope-2-clt, saelens."""
    source: str = ""
    """Where it was read from: a directory, or an hf: reference."""
    model_processing: str = "none"
    """The TransformerLens weight processing of the model whose activations it was trained on:
    'none' = HookedTransformer.from_pretrained(..., fold_ln=False, center_writing_weights=False,
    center_unembed=False), circuit-tracer's convention and ours; otherwise the SAELens
    `model_from_pretrained_kwargs` as JSON, or 'unknown'."""

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model"):
            check_range(name, getattr(self, name), 1, integer=True)
        check_transcoder_fields(self)
        if self.layers is not None and (
            not isinstance(self.layers, list) or not set(self.layers) <= set(range(self.n_layers))
        ):
            raise CircuitsError(f"layers {self.layers!r} are not layers of a {self.n_layers}-layer model")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict, where: str = "the config") -> CLTConfig:
        """The config `to_dict` wrote; refuses fields this version does not know, in one line."""
        unknown = sorted(set(config) - {f.name for f in fields(cls)})
        if unknown:
            raise CircuitsError(f"{where} has fields {unknown} this version does not know: upgrade circuits")
        return cls(**config)

    def n_targets(self, source_layer: int) -> int:
        return self.n_layers - source_layer if self.cross_layer else 1


ACTIVATIONS = ("jumprelu", "relu", "topk")


def check_transcoder_fields(cfg) -> None:
    """Refuse, in one line, the options of a transcoder (a CLTConfig, or a recipe's TranscoderConfig)
    that no transcoder has: no features, an unknown activation, a TopK of none."""
    check_range("n_features", cfg.n_features, 1, integer=True)
    if cfg.activation not in ACTIVATIONS:
        raise CircuitsError(f"activation {cfg.activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if cfg.activation == "topk":
        check_range("topk", cfg.topk, 1, cfg.n_features, integer=True)
    check_range("bandwidth", cfg.bandwidth, 0.0, above=True)


INPUT_HOOKS = ("hook_resid_mid", "hook_mlp_in", "ln2.hook_normalized", "mlp.hook_in")
"""Where a transcoder may read, in block `blocks.{l}` (see `circuits.attribution.splice`)."""
OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")
"""Where it may write."""
_NORMALISED_INPUTS = ("ln2.hook_normalized", "mlp.hook_in")


def check_fits(cfg: CLTConfig, model) -> None:
    """Raise CircuitsError (one line) unless a transcoder config fits the model: its layers and
    width, its hooks (one of `INPUT_HOOKS` -> one of `OUTPUT_HOOKS`) and the weight processing it
    was trained with (`circuits.processing`)."""
    problems = []
    if cfg.n_layers != model.cfg.n_layers:
        problems.append(f"{cfg.n_layers} layers vs the model's {model.cfg.n_layers}")
    if cfg.d_model != model.cfg.d_model:
        problems.append(f"d_model {cfg.d_model} vs the model's {model.cfg.d_model}")
    if cfg.input_hook not in INPUT_HOOKS or cfg.output_hook not in OUTPUT_HOOKS:
        problems.append(
            f"hooks {cfg.input_hook} -> {cfg.output_hook} (supported: {' | '.join(INPUT_HOOKS)} -> "
            f"{' | '.join(OUTPUT_HOOKS)})"
        )
    elif cfg.input_hook in _NORMALISED_INPUTS and model.cfg.normalization_type is None:
        problems.append(f"it reads {cfg.input_hook} but the model has no norm before its MLPs")
    expected, actual = transcoder_processing(cfg), weight_processing(model)
    if actual == "unknown":
        problems.append(
            f"the model's weight processing is unknown (norms without weights, nothing recorded): load it with "
            f"circuits.models.load_model, or set model.circuits_processing = {expected!r} if that is what it had"
        )
    elif expected == "unknown" or expected.startswith("{"):
        problems.append(
            f"its files do not say a processing we can load ({expected}; SAELens's model_from_pretrained_kwargs): "
            "set clt.cfg.model_processing to 'none' or 'tl-default' if you know which its model had"
        )
    elif not same_at_the_hooks(expected, actual):
        problems.append(
            f"it was trained on a model with weight processing {expected!r}, this model has {actual!r} "
            f"(load the model with processing={expected!r})"
        )
    if problems:
        raise CircuitsError("the transcoder does not fit the model: " + "; ".join(problems))


class JumpReLU(torch.autograd.Function):
    """acts = pre * (pre > threshold), exactly circuit-tracer's JumpReLU (no ReLU clamp, strict >);
    the threshold gets a straight-through gradient through a rectangle kernel of width `bandwidth`
    (Rajamanoharan et al., 2024): -(threshold / bandwidth) * sum of grad_out where |pre - threshold|
    < bandwidth / 2. SAELens computes relu(pre) * (pre > t), which is this function with the
    threshold max(t, 0): its readers and writers convert (transcoders/saelens.py). The backward
    reuses the forward's mask and sums before scaling: 6 passes over `pre` instead of 11 (a dense
    training step at F 1,024 spent a sixth of its time in the 11)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        active = pre > threshold
        ctx.save_for_backward(pre, threshold, active)
        ctx.bandwidth = bandwidth
        return pre * active

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pre, threshold, active = ctx.saved_tensors
        window = (pre - threshold).abs_() < ctx.bandwidth / 2
        in_window = torch.where(window, grad_out, 0.0).reshape(-1, *threshold.shape).sum(0)
        return grad_out * active, in_window * (-threshold / ctx.bandwidth), None


class CrossLayerTranscoder(nn.Module):
    def __init__(self, cfg: CLTConfig):
        super().__init__()
        self.cfg = cfg
        L, F, d = cfg.n_layers, cfg.n_features, cfg.d_model
        self.W_enc = nn.Parameter(torch.empty(L, F, d))
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        self.threshold = nn.Parameter(torch.zeros(L, F, dtype=torch.float32))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.empty(F, cfg.n_targets(l), d)) for l in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.W_skip = nn.Parameter(torch.zeros(L, d, d)) if cfg.skip else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        L, F, d = self.cfg.n_layers, self.cfg.n_features, self.cfg.d_model
        with torch.no_grad():
            self.W_enc.uniform_(-(F**-0.5), F**-0.5)
            for w in self.W_dec:
                w.uniform_(-((L * d) ** -0.5), (L * d) ** -0.5)

    # ---- encoder ---------------------------------------------------------------------------

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., L, d] (each layer's resid_mid) -> pre-activations [..., L, F]."""
        return torch.einsum("...ld,lfd->...lf", x, self.W_enc) + self.b_enc

    def layer_major_pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """`pre_activations` with the layers first: x [L, n, d] -> [L, n, F], every layer in one
        batched product."""
        return torch.baddbmm(self.b_enc[:, None], x, self.W_enc.transpose(1, 2))

    def activation(self, pre: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Pre-activations [..., L, F] (or [..., F] of one `layer`) -> activations, same shape."""
        kind = self.cfg.activation
        if kind == "jumprelu":
            threshold = self.threshold if layer is None else self.threshold[layer]
            if torch.is_grad_enabled():
                return JumpReLU.apply(pre, threshold, self.cfg.bandwidth)
            # its forward, the mask written as floats: the same values, 5x faster than a bool mask on CPU
            return torch.gt(pre, threshold, out=torch.empty_like(pre)).mul_(pre)
        if kind == "relu":
            return torch.relu(pre)
        if kind == "topk":
            values, indices = pre.topk(self.cfg.topk, dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        raise ValueError(f"unknown activation {kind!r}: use jumprelu, relu or topk")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., L, d] -> feature activations [..., L, F]."""
        return self.activation(self.pre_activations(x))

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """One layer's resid_mid x [..., d] -> its feature activations [..., F]."""
        return self.activation(x @ self.W_enc[layer].T + self.b_enc[layer], layer)

    # ---- decoder ---------------------------------------------------------------------------

    def decoder(self, source: int, target: int) -> torch.Tensor:
        """Decoder rows of source layer `source` writing to layer `target`: [F, d]."""
        k = target - source if self.cfg.cross_layer else 0
        if not 0 <= k < self.W_dec[source].shape[1] or (not self.cfg.cross_layer and source != target):
            raise ValueError(f"source layer {source} does not write to layer {target}")
        return self.W_dec[source][:, k]

    def sources(self, target: int) -> range:
        """Source layers that write to `target`."""
        return range(target + 1) if self.cfg.cross_layer else range(target, target + 1)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Dense reference decoder: acts [..., L, F] -> reconstruction [..., L, d] (b_dec included,
        skip path excluded)."""
        outs = []
        for t in range(self.cfg.n_layers):
            out = self.b_dec[t].expand(*acts.shape[:-2], -1)
            for s in self.sources(t):
                out = out + acts[..., s, :] @ self.decoder(s, t)
            outs.append(out)
        return torch.stack(outs, dim=-2)

    def skip_out(self, x: torch.Tensor) -> torch.Tensor:
        """The skip path's contribution [..., L, d] (zeros without one)."""
        if self.W_skip is None:
            return torch.zeros_like(x)
        return torch.einsum("...ld,lde->...le", x, self.W_skip)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense reference: x [..., L, d] -> (reconstruction of every layer's mlp_out [..., L, d],
        acts [..., L, F])."""
        acts = self.encode(x)
        return self.decode(acts) + self.skip_out(x), acts

    @torch.no_grad()
    def active_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse activations of x [pos, L, d]: (indices [n_active, 3] as (pos, layer, feature),
        values [n_active])."""
        acts = self.encode(x)
        indices = acts.nonzero()
        return indices, acts[tuple(indices.T)]
