"""Train and evaluate the demo language model: a small HookedTransformer on the demo corpus."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuits.demo.corpus import eval_prompts, generate_documents
from circuits.demo.tokenizer import build_tokenizer

log = logging.getLogger(__name__)


@dataclass
class DemoLMConfig:
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 128
    steps: int = 800
    batch_size: int = 64
    sentences_per_document: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    seed: int = 0


def build_model(cfg: DemoLMConfig, tokenizer_dir: Path) -> HookedTransformer:
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(tokenizer_dir))
    model_cfg = HookedTransformerConfig(
        model_name="circuits-demo",
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_ctx=cfg.n_ctx,
        d_head=cfg.d_model // cfg.n_heads,
        n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp,
        d_vocab=len(tokenizer),
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        default_prepend_bos=True,
        tokenizer_name=str(tokenizer_dir.resolve()),
        seed=cfg.seed,
    )
    return HookedTransformer(model_cfg)


def _lr_factor(step: int, cfg: DemoLMConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def train_demo_lm(cfg: DemoLMConfig, tokenizer_dir: Path) -> HookedTransformer:
    """Train the demo model from scratch on CPU; deterministic for a given config."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tokenizer_dir)
    docs = generate_documents(
        cfg.steps * cfg.batch_size, seed=cfg.seed, sentences_per_document=cfg.sentences_per_document
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    pad_id = model.tokenizer.pad_token_id
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="demo LM", unit="step")
    for step in bar:
        batch = docs[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        tokens = model.to_tokens(batch, padding_side="right")  # [batch, pos]
        logits = model(tokens)  # [batch, pos, vocab]
        targets = tokens[:, 1:].clone()
        targets[targets == pad_id] = -100
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    log.info("trained demo LM in %.1f s, final loss %.4f", time.time() - start, loss.item())
    model.eval()
    return model


@torch.no_grad()
def evaluate(model: HookedTransformer) -> dict[str, float]:
    """Top-1 accuracy of the next token per prompt kind (one-hop, two-hop, held-out two-hop)."""
    by_kind: dict[str, list] = {}
    for p in eval_prompts():
        by_kind.setdefault(p.kind, []).append(p)
    accuracy = {}
    for kind, prompts in by_kind.items():
        tokens = model.to_tokens([p.prompt for p in prompts])  # same length within a kind
        predicted = model(tokens)[:, -1].argmax(-1)
        answers = torch.tensor([model.to_single_token(p.answer) for p in prompts])
        accuracy[kind] = (predicted == answers).float().mean().item()
    return accuracy


def config_dict(cfg: DemoLMConfig) -> dict:
    return asdict(cfg)
