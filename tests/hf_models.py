"""Tiny real-architecture Hugging Face models for tests, built offline.

`write_tiny_hf_model(kind, directory)` writes what a hub snapshot holds: `config.json` naming the
architecture, safetensors weights from transformers' own class (random, seeded, every parameter
perturbed so norms and biases are not trivial), and a byte-level BPE tokenizer trained with
`tokenizers` on a few lines of text. 2 layers, d_model 64, a vocabulary of 384 (!= d_model).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 384
SPECIAL = "<|endoftext|>"  # id 0: BOS, EOS and padding
TEXT = [
    "Fact: Dallas is in the state whose capital is Austin.",
    "The capital of Texas is Austin. The capital of France is Paris.",
    "Dallas is a city in Texas. Seattle is a city in Washington.",
    "The capital of Washington is Olympia; Olympia is a small city.",
    "A model reads tokens, one after another, and predicts the next token.",
    "Circuits trace features through layers: embeddings, attention, MLPs, logits.",
]
PROMPT = "Fact: the capital of the state containing Dallas is"

_ROTARY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.2,
)  # fmt: skip
_SPECIAL_IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
# Each kind exercises the parts of its conversion that a default config would leave untested:
# GQA everywhere; llama3 rope scaling; head_dim != d_model / n_heads; sliding windows shorter than
# the prompt; a query scale != sqrt(d_head) and soft caps small enough to bite.
TINY_CONFIGS: dict[str, tuple[type[PreTrainedModel], type[PretrainedConfig], dict[str, Any]]] = {
    "gpt2": (GPT2LMHeadModel, GPT2Config, dict(
        n_embd=64, n_layer=2, n_head=4, n_positions=128, n_ctx=128, initializer_range=0.2,
    )),
    "llama": (LlamaForCausalLM, LlamaConfig, dict(
        **_ROTARY, rope_theta=500000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    )),
    "mistral": (MistralForCausalLM, MistralConfig, dict(**_ROTARY, sliding_window=5)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(
        **_ROTARY, use_sliding_window=True, sliding_window=4, max_window_layers=1,
    )),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(**_ROTARY, head_dim=32)),
    "gemma": (GemmaForCausalLM, GemmaConfig, dict(**_ROTARY, head_dim=16)),
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, dict(
        **_ROTARY, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
    )),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, dict(
        **_ROTARY, head_dim=16, sliding_window=4, query_pre_attn_scalar=24, rope_theta=1e6,
        rope_local_base_freq=100.0, layer_types=["sliding_attention", "full_attention"],
    )),
    # Not among circuits.models.ARCHITECTURES: loads only by a TransformerLens name, with its config.
    "gpt_neox": (GPTNeoXForCausalLM, GPTNeoXConfig, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5,
        max_position_embeddings=128, initializer_range=0.2,
    )),
}  # fmt: skip


def write_tiny_hf_model(
    kind: str,
    directory: Path,
    seed: int = 0,
    *,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Write a tiny snapshot of `kind` (a key of TINY_CONFIGS) to `directory`; returns `directory`.

    `max_shard_size` (e.g. "40KB") shards the weights with an index file; `overrides` change config fields.
    """
    model_class, config_class, fields = TINY_CONFIGS[kind]
    torch.manual_seed(seed)
    config = config_class(**{**fields, **_SPECIAL_IDS, "vocab_size": VOCAB, **overrides})
    model = model_class(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied weights appear once
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size or "10GB")
    tiny_tokenizer().save_pretrained(directory)
    return directory


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of VOCAB tokens trained on TEXT (deterministic), with SPECIAL as id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=1,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL)


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    """The reference: logits [batch, pos, vocab] of the snapshot run by transformers (eager attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        directory, use_safetensors=True, local_files_only=True, attn_implementation="eager"
    )
    with torch.no_grad():
        return model.eval()(tokens).logits


def write_hub_cache(hf_home: Path, repo_id: str, snapshot: Path, commit: str = "0" * 40) -> Path:
    """Place `snapshot` in a Hugging Face cache under HF_HOME=`hf_home` as `repo_id`'s main revision,
    the layout the hub client leaves (without blobs); returns the snapshot's path in the cache."""
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    target = repo / "snapshots" / commit
    shutil.copytree(snapshot, target)
    return target
