"""The local replacement model of one prompt: the real model's forward pass with attention
patterns and normalisation scales frozen at their values on the prompt, the CLT in place of every
MLP, and an error term per (layer, position) that makes it reproduce the real model exactly.

Frozen this way the model is linear in its sources (token embeddings, feature activations, error
vectors) plus constant terms. The constant terms are every bias (b_V, b_O, LayerNorm offsets,
b_dec, b_enc, b_U) and the learned positional embeddings: like circuit-tracer, an embedding node
is the token embedding W_E[token] only, and `hook_pos_embed` is a per-position constant counted in
each node's bias. LayerNorm's centring is linear and stays part of the map; only its scale is frozen.

The transcoder reads and writes at its own hooks (`circuits.attribution.splice` says what each is).
Inputs inside or after the pre-MLP norm (ln2.hook_normalized: centre(x) / scale; mlp.hook_in:
centre(x) / scale * w + b) freeze that norm's scale too, so the input is an affine map of resid_mid
at each position: a feature's pre-activation e . N(x) + b_enc is centre(e * w) / scale . x plus the
constant e . b + b_enc, and the targets' gradients start at resid_mid from the encoder rows folded
that way (`encoder_vectors`). An output before the norm after the MLP (mlp.hook_out on Gemma 2/3)
reaches the residual stream through that norm, its scale frozen: gradients at hook_mlp_out pass back
through it before they meet the features' decoder rows and the error nodes, and the error nodes are
the real MLP's own output minus the reconstruction.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from transformer_lens import HookedTransformer
from transformer_lens.components import MLP, Attention, GatedMLP, GroupedQueryAttention

from circuits.attribution.norms import FrozenNorm, frozen_norm, has_post_norm, normalise
from circuits.errors import CircuitsError
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder, check_fits

_NORMS = ("LN", "LNPre", "RMS", "RMSPre")
_POST_NORM_ONLY = ("Olmo2ForCausalLM", "Olmo3ForCausalLM")


@dataclass
class Replacement:
    """Everything the attribution needs about one prompt, frozen. L layers, P positions, d = d_model."""

    tokens: torch.Tensor  # [P]
    embed: torch.Tensor  # [P, d] token embeddings W_E[tokens] (the embedding nodes' values)
    pos_embed: torch.Tensor  # [P, d] (zeros for models without learned positions)
    patterns: torch.Tensor  # [L, H, P, P] attention patterns [query, key]
    ln1: list[FrozenNorm]
    ln_final: FrozenNorm
    W_V: torch.Tensor  # [L, H, d, d_head]
    b_V: torch.Tensor  # [L, H, d_head]
    W_O: torch.Tensor  # [L, H, d_head, d]
    b_O: torch.Tensor  # [L, d]
    resid_mid: torch.Tensor  # [L, P, d] real model
    clt_in: torch.Tensor  # [L, P, d] real model, at the transcoder's input hook
    resid_final: torch.Tensor  # [P, d] real model, before ln_final
    logits: torch.Tensor  # [d_vocab] real model, last position, before any output soft cap
    features: torch.Tensor  # [n, 3] active features (layer, pos, feature), sorted
    activations: torch.Tensor  # [n]
    pre_activations: torch.Tensor  # [n]
    errors: torch.Tensor  # [L, P, d] real - CLT reconstruction, at the transcoder's output hook
    writes: list[torch.Tensor]  # [s] -> [n_s, T_s, d] active features' decoder rows times activation (`feature_writes`)
    decoded: torch.Tensor  # [L, P, d] the writes summed per target layer and position
    clt: CrossLayerTranscoder
    ln1_post: list[FrozenNorm] | None = None  # the norm after attention (Gemma 2/3), None without one
    mlp_in: list[FrozenNorm] | None = None  # resid_mid -> the transcoder's input; None: it reads resid_mid
    mlp_post: list[FrozenNorm] | None = None  # its output -> hook_mlp_out; None: it writes hook_mlp_out

    def __post_init__(self) -> None:
        self._backward_operators()

    @property
    def n_layers(self) -> int:
        return self.patterns.shape[0]

    @property
    def n_pos(self) -> int:
        return self.patterns.shape[-1]

    def layer_counts(self) -> list[int]:
        """The active features of each layer (`layer_counts`)."""
        return layer_counts(self.features, self.n_layers)

    def attention_forward(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        """The frozen attention of `layer`: resid_pre [P, d] -> attention output [P, d] (biases included)."""
        x = self.ln1[layer].forward(resid)
        W_V = self.W_V[layer]  # [H, d, d_head]
        v = torch.baddbmm(self.b_V[layer][:, None], x.expand(len(W_V), *x.shape), W_V)  # [H, P, d_head]
        z = (self.patterns[layer] @ v).transpose(0, 1).flatten(1)  # [P, H * d_head]
        out = torch.addmm(self.b_O[layer], z, self.W_O[layer].flatten(0, 1))
        return out if self.ln1_post is None else self.ln1_post[layer].forward(out)

    def attention_backward(self, layer: int, g: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient at the attention output [B, P', d] -> its contribution to the gradient at
        resid_pre [B, P', d]: two matrix products and one mixing over positions per head, with the
        norm folded in (see `_backward_operators`). Causal patterns let P' < P positions stand alone.
        `rows`: the only rows of g.view(B * P', d) that can be nonzero (targets see no position after
        their own), so that the products skip the others; None: all rows."""
        B, Pp, d = g.shape
        H = self.W_O.shape[1]
        u = _rows_matmul(g.view(B * Pp, d), self.back_O[layer], rows).view(B, Pp, H, -1)  # [B, P', H, d_head]
        u = u.permute(2, 1, 0, 3).reshape(H, Pp, -1)  # [H, P'(query), B * d_head]
        v = (self.back_mix[layer, :, :Pp, :Pp] @ u).view(H, Pp, B, -1)  # [H, P'(key), B, d_head]
        return _rows_matmul(v.permute(2, 1, 0, 3).reshape(B * Pp, -1), self.back_V[layer], rows).view(B, Pp, d)

    def attention_backward_terms(
        self, layer: int, terms: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`attention_backward(layer, g)` for a gradient that is a short sum g = sum_j weights[:, :, j]
        * terms[:, j] (terms [n, J, d], weights [n, P', J]; a one-position injection is J = 1 with
        one-hot weights): the projections act on the J terms instead of on every position, and the
        mixing over positions on the weights. Returns the contribution [n, P', d] and the same as a
        short sum, each term through each head: terms [n, H * J, d] with weights [n, P', H * J]."""
        n, Pp, J = weights.shape
        H, dh, d = self.W_O.shape[1], self.W_O.shape[2], terms.shape[-1]
        u = (terms @ self.back_O[layer]).view(n * J, H, dh).transpose(0, 1)  # [H, n * J, d_head]
        images = torch.bmm(u, self.back_V[layer].view(H, dh, d))  # [H, n * J, d]
        images = images.view(H, n, J, d).transpose(0, 1).reshape(n, H * J, d)
        mixed = _causal_mix(self.back_mix[layer, :, :Pp, :Pp], weights).reshape(n, Pp, H * J)
        return torch.bmm(mixed, images), images, mixed

    def terms_are_cheaper(self, J: int, Pp: int) -> bool:
        """Whether `attention_backward_terms` on J terms takes fewer multiply-adds than
        `attention_backward` at P' positions (per target)."""
        terms, dense = attention_backward_cost(J, Pp, self.W_O.shape[1], self.W_O.shape[2], self.embed.shape[-1])
        return terms < dense

    def embedding_images(self) -> torch.Tensor:
        """What each embedding node adds to resid_mid of layer 0, where every target's gradient
        meets it: [P(key), P(query) * d], row k block q the d-vector that W_E[token k] adds at
        position q (itself at q = k, plus what the frozen attention of layer 0 carries; zero for
        q < k). With it the embedding edges of a gradient g [B, P', d] at resid_mid[0] are one
        product, g.view(B, -1) @ images[:P', :P' * d].T, and no gradient passes layer 0."""
        P, d = self.n_pos, self.embed.shape[-1]
        H, dh = self.W_O.shape[1], self.W_O.shape[2]
        values = (self.embed @ self.back_V[0].T).view(P, H, dh)  # [P(key), H, d_head]
        written = torch.einsum("khe,hed->khd", values, self.W_O[0])  # [P(key), H, d]
        if self.ln1_post is not None:  # the norm after attention, but its scale (in back_mix)
            written = self.ln1_post[0].linear(written)
        images = torch.einsum("hkq,khd->kqd", self.back_mix[0], written)  # [P(key), P(query), d]
        images.diagonal().add_(self.embed.T)  # [d, P] a view of images[k, k]
        return images.reshape(P, P * d)

    def _backward_operators(self) -> None:
        """Precompute the transposed attention maps. For the gradient y at resid_mid, the gradient
        at resid_pre gains C (w * sum_h A_h^T y W_O_h^T W_V_h^T) / scale, where C centres (LayerNorm)
        and scale is the frozen norm scale at the key position: fold w and C into back_V, 1/scale
        into back_mix. A norm after attention (w', C', scale' at the query position) turns y into
        C' (w' * y) / scale': w' and C' fold into back_O, 1/scale' into back_mix."""
        H, dh = self.W_O.shape[1], self.W_O.shape[2]
        L, d = self.n_layers, self.embed.shape[-1]
        self.back_O = self.W_O.permute(0, 3, 1, 2).reshape(L, d, H * dh)  # [L, d, H * d_head]
        w = torch.stack([n.w for n in self.ln1])[:, None, None]  # [L, 1, 1, d]
        back_V = torch.mul(self.W_V.transpose(2, 3), w, out=self.W_V.new_empty(L, H, dh, d))  # one pass, in layout
        if self.ln1[0].centre:
            back_V -= back_V.mean(-1, keepdim=True)
        self.back_V = back_V.view(L, H * dh, d)
        scales = torch.stack([n.scale[:, 0] for n in self.ln1])  # [L, P]
        self.back_mix = self.patterns.transpose(-1, -2) / scales[:, None, :, None]  # [L, H, P(key), P(query)]
        if self.ln1_post is not None:
            if self.ln1_post[0].centre:
                self.back_O = self.back_O - self.back_O.mean(1, keepdim=True)
            self.back_O = self.back_O * torch.stack([n.w for n in self.ln1_post])[:, :, None]
            post_scales = torch.stack([n.scale[:, 0] for n in self.ln1_post])  # [L, P]
            self.back_mix = self.back_mix / post_scales[:, None, None, :]

    def clt_input(self, layer: int, resid_mid: torch.Tensor) -> torch.Tensor:
        """The transcoder's input [P, d] of `layer` in the frozen model, from resid_mid [P, d]."""
        return resid_mid if self.mlp_in is None else self.mlp_in[layer].forward(resid_mid)

    def encoder_vectors(self, layer: int, pos: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """Encoder rows W [B, d] of `layer`'s features at positions pos [B] -> the gradients of their
        pre-activations at resid_mid [B, d]: W itself, or folded through the frozen input norm."""
        return W if self.mlp_in is None else self.mlp_in[layer].backward_at(W, pos)

    def skip_backward(self, layer: int, g: torch.Tensor) -> torch.Tensor:
        """Gradient g [B, P', d] at hook_mlp_out of `layer` -> what reaches resid_mid through the
        skip path: back through the norm after the MLP, W_skip and the input's norm (each if any)."""
        g = g if self.mlp_post is None else self.mlp_post[layer].backward(g)
        g = g @ self.clt.W_skip[layer].detach().T
        return g if self.mlp_in is None else self.mlp_in[layer].backward(g)

    def skip_backward_terms(self, layer: int, terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`skip_backward` of a gradient kept as a sum of terms [n, J, d] (see
        `attention_backward_terms`): the terms' images [n, J, d] and the factor [P] their weights take
        at each position (the frozen norms' 1 / scale; None without norms: the weights stay)."""
        factor = None
        if self.mlp_post is not None:
            terms, factor = self.mlp_post[layer].linear_backward(terms), 1 / self.mlp_post[layer].scale[:, 0]
        terms = terms @ self.clt.W_skip[layer].detach().T
        if self.mlp_in is not None:
            terms = self.mlp_in[layer].linear_backward(terms)
            factor = 1 / self.mlp_in[layer].scale[:, 0] * (1 if factor is None else factor)
        return terms, factor

    def skip_terms(self, layer: int, terms: torch.Tensor | None, weights: torch.Tensor | None):
        """A gradient kept as terms [n, J, d] with weights [n, P', J], plus what it sends through the
        skip path of `layer` (`skip_backward_terms`): each term's image is added to it, or, where
        frozen norms scale it by position, appended as J more terms with rescaled weights."""
        if terms is None:
            return None, None
        images, factor = self.skip_backward_terms(layer, terms)
        if factor is None:
            return terms + images, weights
        return torch.cat([terms, images], 1), torch.cat([weights, weights * factor[: weights.shape[1], None]], 2)

    def linear_forward(self, with_sources: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the frozen linear model: (resid_mid [L, P, d], resid_final [P, d]). With all sources it
        reproduces the real model; without (embeddings, features and errors zeroed) it gives the
        constant terms of every node's input."""
        clt, L = self.clt, self.n_layers
        resid = self.embed + self.pos_embed if with_sources else self.pos_embed
        mids = []
        for l in range(L):
            mid = resid + self.attention_forward(l, resid)
            mlp = clt.b_dec[l] + (self.decoded[l] + self.errors[l]) if with_sources else clt.b_dec[l].expand_as(mid)
            if clt.W_skip is not None:
                mlp = mlp + self.clt_input(l, mid) @ clt.W_skip[l]
            mids.append(mid)
            resid = mid + (mlp if self.mlp_post is None else self.mlp_post[l].forward(mlp))
        return torch.stack(mids), resid


def attention_backward_cost(J: int, Pp: int, H: int, dh: int, d: int) -> tuple[int, int]:
    """Multiply-adds per target of `Replacement.attention_backward_terms` on J terms and of
    `attention_backward` at P' positions (the estimate follows the same choice)."""
    return 2 * J * d * H * dh + Pp * Pp * H * J + Pp * H * J * d, 2 * Pp * d * H * dh + Pp * Pp * H * dh


def _causal_mix(back_mix: torch.Tensor, weights: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """einsum("hkq,nqj->nkhj", back_mix, weights) for causal back_mix [H, P'(key), P'(query)], zero
    where key > query: in chunks of `chunk` queries, each mixed into the keys up to its last only
    (5/8 of the dense product's work at 4 chunks, toward half; the einsum is slower still). -> [n, P', H, J]."""
    H, Pp, _ = back_mix.shape
    n, _, J = weights.shape
    by_query = weights.permute(1, 0, 2).reshape(Pp, n * J)  # [P'(query), n * J]
    out = weights.new_zeros(H, Pp, n * J)
    for q0 in range(0, Pp, chunk):
        q1 = min(q0 + chunk, Pp)
        out[:, :q1] += back_mix[:, :q1, q0:q1] @ by_query[q0:q1]
    return out.view(H, Pp, n, J).permute(2, 1, 0, 3)


def _rows_matmul(x: torch.Tensor, W: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """x [n, a] @ W [a, b], computed for `rows` of x only (the others are zero in x and in the result)."""
    if rows is None:
        return x @ W
    return x.new_zeros(len(x), W.shape[1]).index_copy_(0, rows, x.index_select(0, rows) @ W)


def feature_writes(clt: CrossLayerTranscoder, features: torch.Tensor, acts: torch.Tensor) -> list[torch.Tensor]:
    """What the active features (features [n, 3] sorted, acts [n]) write: per source layer s, their
    `layer_writes` [n_s, T_s, d] (T_s: the layers s writes to)."""
    counts = layer_counts(features, clt.cfg.n_layers)
    return [
        layer_writes(W, f, a)
        for W, f, a in zip(clt.W_dec, features[:, 2].split(counts), acts.split(counts), strict=True)
    ]


def layer_counts(features: torch.Tensor, n_layers: int) -> list[int]:
    """The active features (features [n, 3] (layer, pos, feature), sorted) of each layer: the lengths
    of their runs, to split them a layer at a time (indexing a layer's rows is ~3x faster than
    indexing [layer, feature])."""
    return torch.bincount(features[:, 0], minlength=n_layers).tolist()


def layer_writes(W_dec: torch.Tensor, features: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """The decoder rows of one source layer's `features` [n] (W_dec [F, T, d]) times their
    activations [n]: [n, T, d], touching only their rows."""
    return W_dec.detach().index_select(0, features).mul_(acts[:, None, None])


def sum_writes(writes: list[torch.Tensor], pos: torch.Tensor, P: int) -> torch.Tensor:
    """The features' writes summed per target layer and position (pos [n]: the features'
    positions, in the same order): [L, P, d]."""
    L, d = len(writes), writes[0].shape[-1]
    out = writes[0].new_zeros(L, P, d)
    for s, (w, p) in enumerate(zip(writes, pos.split([len(w) for w in writes]), strict=True)):
        T = w.shape[1]  # summed per position where the rows lie contiguous, then added to each target layer
        out[s : s + T] += w.new_zeros(P, T * d).index_add_(0, p, w.view(len(w), T * d)).view(P, T, d).transpose(0, 1)
    return out


def check_supported(model: HookedTransformer) -> None:
    cfg = model.cfg
    if cfg.normalization_type not in _NORMS:
        raise CircuitsError(f"normalization {cfg.normalization_type!r} is not supported: use one of {_NORMS}")
    if cfg.parallel_attn_mlp or cfg.attn_only or cfg.use_split_qkv_input:
        raise CircuitsError("only sequential attention+MLP blocks are supported (no parallel/attn-only/split-qkv)")
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        raise CircuitsError(f"positional embedding {cfg.positional_embedding_type!r} is not supported")
    if cfg.use_attn_in or cfg.original_architecture in _POST_NORM_ONLY:
        raise CircuitsError(
            "norms after the attention or MLP output without one before (OLMo 2/3) are not supported: "
            "use a model with pre-norms (with or without post-norms, as Gemma 2/3)"
        )


@dataclass
class ForwardRecord:
    """What the replacement freezes from the real model's forward pass on one prompt (P tokens)."""

    embed: torch.Tensor  # [P, d] hook_embed
    pos_embed: torch.Tensor  # [P, d] hook_pos_embed (zeros without learned positions)
    patterns: torch.Tensor  # [L, H, P, P] hook_pattern
    ln1_scales: torch.Tensor  # [L, P, 1] ln1.hook_scale
    attn_post_scales: torch.Tensor | None  # [L, P, 1] ln1_post.hook_scale (a norm after attention), or None
    resid_mid: torch.Tensor  # [L, P, d]
    ln2_scales: torch.Tensor  # [L, P, 1] ln2.hook_scale
    mlp_normalized: torch.Tensor  # [L, P, d] ln2.hook_normalized
    mlp_in: torch.Tensor  # [L, P, d] the MLP's argument (circuit-tracer's mlp.hook_in)
    mlp_raw: torch.Tensor  # [L, P, d] the MLP's output (circuit-tracer's mlp.hook_out)
    mlp_post_scales: torch.Tensor | None  # [L, P, 1] ln2_post.hook_scale (a norm after the MLP), or None
    mlp_out: torch.Tensor  # [L, P, d] hook_mlp_out
    resid_final: torch.Tensor  # [P, d] hook_resid_post of the last block
    final_scale: torch.Tensor  # [P, 1] ln_final.hook_scale
    logits: torch.Tensor  # [d_vocab], last position, before any output soft cap

    def at(self, hook: str) -> torch.Tensor:
        """The values [L, P, d] at a transcoder hook (`INPUT_HOOKS`, `OUTPUT_HOOKS`)."""
        return {
            "hook_resid_mid": self.resid_mid, "hook_mlp_in": self.resid_mid, "ln2.hook_normalized": self.mlp_normalized,
            "mlp.hook_in": self.mlp_in, "mlp.hook_out": self.mlp_raw, "hook_mlp_out": self.mlp_out,
        }[hook]  # fmt: skip


_OWN_QK_NORM = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")  # q/k norms in TransformerLens's forward


def computes_from_weights(model: HookedTransformer) -> bool:
    """Whether `record_forward` computes the blocks from their weights directly: TransformerLens's
    plain and grouped-query attention (causal, unquantised; rotary, soft caps, sliding windows and q/k
    norms included) and its plain and gated MLPs, as checked against `run_with_cache` on the random
    and Hugging Face test models. Any other block runs through TransformerLens's own components."""
    cfg = model.cfg
    blocks = model.blocks
    plain = all(type(b.attn) in (Attention, GroupedQueryAttention) and type(b.mlp) in (MLP, GatedMLP) for b in blocks)
    return (
        plain and cfg.attention_dir == "causal" and not cfg.load_in_4bit and not cfg.is_layer_norm_activation()
        and cfg.original_architecture not in _OWN_QK_NORM
    )  # fmt: skip


def _attention(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TransformerLens's attention from its weights: ln1's output x [P, d] -> (pattern [H, P(query),
    P(key)], output [P, d]), every head in one product per step (no einops, no hooks)."""
    grouped = isinstance(attn, GroupedQueryAttention) and not attn.cfg.ungroup_grouped_query_attention
    # the key and value heads of grouped-query attention once each, repeated after the products
    kv = (attn._W_K, attn._b_K, attn._W_V, attn._b_V) if grouped else (attn.W_K, attn.b_K, attn.W_V, attn.b_V)
    W_K, b_K, W_V, b_V = kv
    q = torch.baddbmm(attn.b_Q[:, None], x.expand(len(attn.W_Q), *x.shape), attn.W_Q)  # [H, P, d_head]
    x = x.expand(len(W_K), *x.shape)
    k, v = torch.baddbmm(b_K[:, None], x, W_K), torch.baddbmm(b_V[:, None], x, W_V)  # [H_kv, P, d_head]
    if attn.cfg.use_qk_norm:
        q, k = normalise(attn.q_norm, q)[0], normalise(attn.k_norm, k)[0]
    if attn.cfg.positional_embedding_type == "rotary":  # TransformerLens's [batch, pos, head, d_head]
        q, k = (attn.apply_rotary(t.transpose(0, 1)[None])[0].transpose(0, 1) for t in (q, k))
    if grouped:
        k, v = k.repeat_interleave(attn.repeat_kv_heads, 0), v.repeat_interleave(attn.repeat_kv_heads, 0)
    scores = q @ k.transpose(1, 2) / attn.attn_scale  # [H, P, P]
    cap = attn.cfg.attn_scores_soft_cap
    if cap > 0:
        scores = cap * torch.tanh(scores / cap)
    P = len(scores[0])  # its mask (causal, or a window) as its apply_causal_mask indexes it
    pattern = torch.where(attn.mask[-P:, -P:], scores, attn.IGNORE).softmax(-1).to(v.dtype)
    z = (pattern @ v).transpose(0, 1).flatten(1)  # [P, H * d_head]
    return pattern, torch.addmm(attn.b_O, z, attn.W_O.flatten(0, 1))


def _mlp(mlp: MLP | GatedMLP, x: torch.Tensor) -> torch.Tensor:
    """TransformerLens's MLP or gated MLP from its weights: x [P, d] -> [P, d]."""
    if isinstance(mlp, GatedMLP):
        post = mlp.act_fn(x @ mlp.W_gate) * (x @ mlp.W_in) + mlp.b_in
    else:
        post = mlp.act_fn(torch.addmm(mlp.b_in, x, mlp.W_in))  # [P, d_mlp]
    return torch.addmm(mlp.b_out, post, mlp.W_out)


def _components_attention(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_attention` through TransformerLens's own components (QKV, rotary, scores and mask, z)."""
    q, k, v = attn.calculate_qkv_matrices(x[None], x[None], x[None])
    if attn.cfg.positional_embedding_type == "rotary":
        q, k = attn.apply_rotary(q, 0, None), attn.apply_rotary(k, 0, None)
    pattern = attn.apply_causal_mask(attn.calculate_attention_scores(q, k), 0, None).softmax(-1)
    z = attn.calculate_z_scores(v, pattern)  # [1, P, H, d_head]
    return pattern[0], (torch.einsum("bphe,hed->bpd", z, attn.W_O) + attn.b_O)[0]


def _components_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    return mlp(x[None])[0]


@torch.no_grad()
def record_forward(model: HookedTransformer, tokens: torch.Tensor) -> ForwardRecord:
    """The real model's forward pass on tokens [P], block by block, keeping what the replacement
    freezes: the blocks from their weights where `computes_from_weights`, else with TransformerLens's
    own components. Written out because on a short prompt `run_with_cache` (hooks, einops) costs
    several times the arithmetic; `tests/attribution/test_attribute.py` checks every record against it."""
    cfg, x = model.cfg, tokens[None]
    post_norms = cfg.use_normalization_before_and_after
    attention, mlp = (_attention, _mlp) if computes_from_weights(model) else (_components_attention, _components_mlp)
    embed = model.embed(x)[0]  # [P, d]
    learned = cfg.positional_embedding_type == "standard"  # its rows, as PosEmbed without a mask or cache
    pos_embed = model.pos_embed.W_pos[: len(tokens)].clone() if learned else torch.zeros_like(embed)
    resid = embed + pos_embed
    keep: dict[str, list[torch.Tensor]] = {}
    for block in model.blocks:  # the norms' inverse scales, inverted at the end
        normed, inverse = normalise(block.ln1, resid)
        pattern, attn_out = attention(block.attn, normed)
        step = {"patterns": pattern, "ln1_scales": inverse}
        if post_norms:
            attn_out, step["attn_post_scales"] = normalise(block.ln1_post, attn_out)
        mid = resid + attn_out
        mlp_in, step["ln2_scales"] = normalise(block.ln2, mid)
        raw = mlp(block.mlp, mlp_in)
        out = raw
        if post_norms:
            out, step["mlp_post_scales"] = normalise(block.ln2_post, raw)
        resid = mid + out
        step.update(resid_mid=mid, mlp_in=mlp_in, mlp_raw=raw, mlp_out=out)
        for name, value in step.items():
            keep.setdefault(name, []).append(value)
    normed, final_inverse = normalise(model.ln_final, resid)
    stacked = {name: torch.stack(values) for name, values in keep.items()}
    for name in ("ln1_scales", "ln2_scales", "attn_post_scales", "mlp_post_scales"):
        if name in stacked:
            stacked[name] = stacked[name].reciprocal()
    # every layer's hook_normalized at once (their ln2 differ only in weights, which it leaves out)
    stacked["mlp_normalized"] = normalise(model.blocks[0].ln2, stacked["resid_mid"], weights=False)[0]
    return ForwardRecord(
        embed=embed,
        pos_embed=pos_embed,
        attn_post_scales=stacked.pop("attn_post_scales", None),
        mlp_post_scales=stacked.pop("mlp_post_scales", None),
        **stacked,
        resid_final=resid,
        final_scale=final_inverse.reciprocal(),
        logits=torch.addmm(model.unembed.b_U, normed[-1:], model.unembed.W_U)[0],  # no [d, d_vocab] copy (Unembed's)
    )


def _mlp_norms(model: HookedTransformer, cfg: CLTConfig, run: ForwardRecord, dtype) -> tuple[list | None, list | None]:
    """The frozen norms on the transcoder's side: resid_mid -> its input (the pre-MLP norm, without
    its weight and bias for ln2.hook_normalized; None for resid_mid), and its output -> hook_mlp_out
    (the norm after the MLP for mlp.hook_out; None for hook_mlp_out or without one)."""
    blocks, d = model.blocks, model.cfg.d_model
    mlp_in = None
    if cfg.input_hook in ("ln2.hook_normalized", "mlp.hook_in"):
        mlp_in = [frozen_norm(b.ln2, scale, d, dtype) for b, scale in zip(blocks, run.ln2_scales, strict=True)]
        if cfg.input_hook == "ln2.hook_normalized":
            mlp_in = [replace(n, w=torch.ones_like(n.w), b=torch.zeros_like(n.b)) for n in mlp_in]
    mlp_post = None
    if has_post_norm(model, cfg.output_hook):
        scales = run.mlp_post_scales
        mlp_post = [frozen_norm(b.ln2_post, scale, d, dtype) for b, scale in zip(blocks, scales, strict=True)]
    return mlp_in, mlp_post


@torch.no_grad()
def _require_finite(t: torch.Tensor, what: str, culprit: str) -> None:
    """Stop before any work that grows with the number of active features: a NaN activation counts
    as active, so a non-finite transcoder would make every feature a node. The sum first (one pass):
    it is finite unless some value is not, or it overflows."""
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise CircuitsError(f"{what} are not finite (NaN or inf): {culprit} hold non-finite values; fix or re-train it")


@torch.no_grad()
def build_replacement(
    model: HookedTransformer, clt: CrossLayerTranscoder, tokens: torch.Tensor, dtype: torch.dtype = torch.float32
) -> Replacement:
    """Run the real model on tokens [P] once and freeze what the attribution needs."""
    check_supported(model)
    check_fits(clt.cfg, model)
    d = model.cfg.d_model
    run = record_forward(model, tokens)
    if clt.W_enc.dtype != dtype:
        clt = copy.deepcopy(clt).to(dtype)
    clt_in = run.at(clt.cfg.input_hook).to(dtype)  # [L, P, d]
    pre = clt.layer_major_pre_activations(clt_in)  # [L, P, F]
    acts = clt.activation(pre.transpose(0, 1)).transpose(0, 1)  # (it takes [P, L, F])
    _require_finite(acts, "the transcoder's activations", "its encoder or the model's activations")
    features = acts.nonzero()  # [n, 3] (layer, pos, feature), row-major order
    activations = acts[tuple(features.T)]
    writes = feature_writes(clt, features, activations)
    decoded = sum_writes(writes, features[:, 1], len(tokens))
    recon = decoded + clt.b_dec[:, None]  # [L, P, d]
    if clt.W_skip is not None:
        recon = recon + clt_in @ clt.W_skip
    _require_finite(recon, "the transcoder's reconstruction", "its decoder rows, b_dec or skip")
    mlp_in, mlp_post = _mlp_norms(model, clt.cfg, run, dtype)
    blocks = model.blocks
    return Replacement(
        tokens=tokens,
        embed=run.embed.to(dtype),
        pos_embed=run.pos_embed.to(dtype),
        patterns=run.patterns.to(dtype),
        ln1=[frozen_norm(b.ln1, scale, d, dtype) for b, scale in zip(blocks, run.ln1_scales, strict=True)],
        ln_final=frozen_norm(model.ln_final, run.final_scale, d, dtype),
        W_V=torch.stack([b.attn.W_V for b in blocks]).detach().to(dtype),
        b_V=torch.stack([b.attn.b_V for b in blocks]).detach().to(dtype),
        W_O=torch.stack([b.attn.W_O for b in blocks]).detach().to(dtype),
        b_O=torch.stack([b.attn.b_O for b in blocks]).detach().to(dtype),
        resid_mid=run.resid_mid.to(dtype),
        clt_in=clt_in,
        resid_final=run.resid_final.to(dtype),
        logits=run.logits.to(dtype),
        features=features,
        activations=activations,
        pre_activations=pre[tuple(features.T)],
        errors=run.at(clt.cfg.output_hook).to(dtype) - recon,
        writes=writes,
        decoded=decoded,
        clt=clt,
        ln1_post=None
        if run.attn_post_scales is None
        else [frozen_norm(b.ln1_post, scale, d, dtype) for b, scale in zip(blocks, run.attn_post_scales, strict=True)],
        mlp_in=mlp_in,
        mlp_post=mlp_post,
    )
