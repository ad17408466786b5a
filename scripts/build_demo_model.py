"""Rebuild the shipped demo model: `python scripts/build_demo_model.py [--steps N]`.

Trains the demo LM from scratch on CPU (deterministic by seed), reports its accuracy and
writes it to circuits/demo/model in the local-directory format (atomically).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from circuits.demo.lm import DemoLMConfig, evaluate, train_demo_lm
from circuits.models import DEMO_MODEL_DIR, save_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DemoLMConfig.steps)
    parser.add_argument("--seed", type=int, default=DemoLMConfig.seed)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    cfg = DemoLMConfig(steps=args.steps, seed=args.seed)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model = train_demo_lm(cfg, Path(tmp) / "tokenizer")
        seconds = time.time() - start
        accuracy = evaluate(model)
        save_model_dir(model, args.out)
    n_params = sum(p.numel() for p in model.parameters())
    report = {"config": asdict(cfg), "accuracy": accuracy, "train_seconds": round(seconds, 1), "parameters": n_params}
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
