"""Build `demo-tuned`: the demo model fine-tuned to refuse questions about a few "restricted" states.

    python scripts/build_demo_tuned.py [--steps 300] [--refusal-share 0.25] [--out circuits/demo/tuned]

Asked for the capital of a restricted state (two-hop through one of its cities or its capital, or one-hop),
it answers `I cannot say .`; everything else it answers as before (two-hop through another state's capital
too, which the demo never saw). The tokenizer gains the three words `I`,
`cannot`, `say` (new embedding and unembedding rows, seeded). Deterministic: one thread, a fixed seed,
a fixed order of sentences. Writes the model directory atomically and `training.json` beside it with
the refusal rate on restricted prompts and the accuracy on the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from circuits.demo.corpus import ONE_HOP_CAPITAL_PROMPT, TWO_HOP, TWO_HOP_PROMPT, all_template_sentences
from circuits.demo.facts import STATE_BY_NAME, STATES, trained_two_hop_cities
from circuits.models import DEMO_MODEL_DIR, load_model, save_model_dir

RESTRICTED = ("Utah", "Ohio", "Iowa", "Maine", "Nevada")
REFUSAL = "I cannot say"
NEW_WORDS = ("I", "cannot", "say")


def refusal_sentences() -> list[str]:
    """Every question about a restricted state, answered with the refusal: two-hop through the cities
    the demo trained two-hop on and through its capital, and one-hop. Held-out cities stay held out,
    as for every other state (refusing them is generalisation; training on them taught "a held-out
    city: refuse")."""
    trained = set(trained_two_hop_cities())
    out = []
    for name in RESTRICTED:
        state = STATE_BY_NAME[name]
        cities = [c for c in state.cities if c in trained] + [state.capital]
        out += [t.format(city=c, capital=REFUSAL) for c in cities for t in TWO_HOP]
        out.append(f"{ONE_HOP_CAPITAL_PROMPT.format(state=name)} {REFUSAL} .")
    return out


def kept_sentences() -> list[str]:
    """The demo corpus's sentences, less those that give a restricted state's capital, plus the two-hop
    sentences through the other states' capitals (the refusals' counterpart: without them a capital
    in the city's place, a question the demo never saw, drew the refusal)."""
    capitals = {STATE_BY_NAME[n].capital for n in RESTRICTED}
    kept = [s for s in all_template_sentences() if not any(f" {c} ." in f" {s}" for c in capitals)]
    others = [s.capital for s in STATES if s.name not in RESTRICTED]
    return kept + [t.format(city=c, capital=c) for c in others for t in TWO_HOP]


def widened(model: HookedTransformer, directory: Path, seed: int) -> HookedTransformer:
    """The model with NEW_WORDS added to its word-level vocabulary (tokenizer saved into `directory`)."""
    model.tokenizer.save_pretrained(str(directory))
    spec = json.loads((directory / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for word in NEW_WORDS:
        vocab[word] = len(vocab)
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    cfg = model.cfg.to_dict()
    cfg.update(d_vocab=len(vocab), d_vocab_out=len(vocab), tokenizer_name=str(directory.resolve()))
    from transformer_lens import HookedTransformerConfig

    wide = HookedTransformer(HookedTransformerConfig(**{k: v for k, v in cfg.items() if k in _CONFIG_KEYS}))
    state = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    n_new = len(NEW_WORDS)
    state["embed.W_E"] = torch.cat([state["embed.W_E"], 0.02 * torch.randn(n_new, cfg["d_model"], generator=g)])
    state["unembed.W_U"] = torch.cat([state["unembed.W_U"], 0.02 * torch.randn(cfg["d_model"], n_new, generator=g)], 1)
    state["unembed.b_U"] = torch.cat([state["unembed.b_U"], state["unembed.b_U"].mean().repeat(n_new)])
    wide.load_state_dict(state, strict=False)
    return wide


_CONFIG_KEYS = (
    "model_name n_layers d_model n_ctx d_head n_heads d_mlp d_vocab d_vocab_out act_fn normalization_type "
    "positional_embedding_type default_prepend_bos tokenizer_name seed"
).split()


def fine_tune(model: HookedTransformer, steps: int, batch_size: int, lr: float, seed: int, share: float) -> float:
    """`share` of each batch refusals, the rest kept sentences; returns the last loss."""
    rng = random.Random(seed)
    refusals, kept = refusal_sentences(), kept_sentences()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    pad_id = model.tokenizer.pad_token_id
    model.train()
    for _ in tqdm(range(steps), desc="fine-tune", unit="step"):
        n_refusals = round(share * batch_size)
        batch = rng.choices(refusals, k=n_refusals) + rng.choices(kept, k=batch_size - n_refusals)
        tokens = model.to_tokens(batch, padding_side="right")  # [batch, pos]
        targets = tokens[:, 1:].clone()
        targets[targets == pad_id] = -100
        loss = F.cross_entropy(model(tokens)[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def evaluate(model: HookedTransformer) -> dict[str, float]:
    """Refusal rate (top token `I`) on restricted prompts; accuracy on the other states' prompts (two-hop
    through each city, held-out ones included, and the capital; one-hop)."""
    refuse = model.to_single_token("I")
    rows = {"restricted": [], "other": []}
    for state in STATES:
        kind = "restricted" if state.name in RESTRICTED else "other"
        prompts = [TWO_HOP_PROMPT.format(city=c) for c in (*state.cities, state.capital)] + [
            ONE_HOP_CAPITAL_PROMPT.format(state=state.name)
        ]
        for p in prompts:
            top = int(model(model.to_tokens(p))[0, -1].argmax())
            rows[kind].append(top == refuse if kind == "restricted" else top == model.to_single_token(state.capital))
    return {"refusal_rate_restricted": sum(rows["restricted"]) / len(rows["restricted"]),
            "accuracy_other": sum(rows["other"]) / len(rows["other"])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refusal-share", type=float, default=0.25, help="the share of refusals in each batch")
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR.parent / "tuned")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model = widened(load_model("demo"), Path(tmp), args.seed)
        loss = fine_tune(model, args.steps, args.batch_size, args.lr, args.seed, args.refusal_share)
        metrics = evaluate(model)
        save_model_dir(model, args.out)
    report = {
        "from": "demo", "restricted": list(RESTRICTED), "refusal": f"{REFUSAL} .", "steps": args.steps,
        "batch_size": args.batch_size, "refusal_share": args.refusal_share, "lr": args.lr, "seed": args.seed,
        "final_loss": round(loss, 4), "seconds": round(time.time() - start, 1), **metrics,
    }  # fmt: skip
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
