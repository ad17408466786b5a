"""Document sources (the demo corpus, local .txt/.jsonl files, Hugging Face datasets with the `hf`
extra) and their tokens."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from circuits.errors import CircuitsError

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer


@dataclass
class TextSource:
    name: str = "demo"
    """'demo', a path to a .txt/.jsonl file, or a Hugging Face dataset name ('hf:NAME')."""
    seed: int = 0
    max_tokens_per_doc: int = 64

    def __post_init__(self) -> None:
        """Refuse, before any work, a source that cannot be read: a missing, empty or unreadable file
        (read once here), or hf: without the datasets package."""
        if self.name.startswith("hf:"):
            _check_datasets(self.name)  # the stream is opened by the first read (a recipe loads offline)
        elif self.name != "demo":
            _file_documents(Path(self.name), 0, 1)

    def documents(self, start: int, count: int) -> list[str]:
        """Documents [start, start + count) of this source, cycling over finite sources."""
        if self.name == "demo":
            from circuits.demo.corpus import generate_documents

            # Documents are generated in blocks of 1,000 so that any range is cheap and fixed.
            first, last = start // 1000, (start + count - 1) // 1000
            docs = [d for b in range(first, last + 1) for d in generate_documents(1000, seed=self.seed * 100_003 + b)]
            return docs[start - first * 1000 : start - first * 1000 + count]
        if self.name.startswith("hf:"):
            return _hf_documents(self.name[3:], start, count)
        return _file_documents(Path(self.name), start, count)


def _file_documents(path: Path, start: int, count: int) -> list[str]:
    if not path.is_file():
        raise CircuitsError(f"text source {str(path)!r} is not a file: pass 'demo', a .txt/.jsonl file or 'hf:NAME'")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise CircuitsError(f"text source {str(path)!r} is not UTF-8 (byte {e.start}): convert it to UTF-8") from None
    if path.suffix == ".jsonl":
        lines = [_jsonl_text(path, i, line) for i, line in enumerate(lines, 1)]
    if not lines:
        raise CircuitsError(f"text source {str(path)!r} holds no documents: pass a file with text in it")
    return [lines[i % len(lines)] for i in range(start, start + count)]


def _jsonl_text(path: Path, number: int, line: str) -> str:
    """The "text" field of line `number` of a .jsonl file."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise CircuitsError(f"line {number} of {str(path)!r} is not JSON ({e}): one JSON object per line") from None
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise CircuitsError(f'line {number} of {str(path)!r} has no "text" string: each line needs {{"text": "..."}}')
    return row["text"]


@functools.cache
def _hf_stream(dataset: str) -> dict:
    """A streamed dataset's iterator and how many rows it has yielded."""
    return {"position": 0, "rows": None}


def _check_datasets(name: str) -> None:
    if importlib.util.find_spec("datasets") is None:
        raise CircuitsError(f'text source {name} needs the datasets package: pip install "circuits-tracer[hf]"')


def _hf_documents(dataset: str, start: int, count: int) -> list[str]:
    _check_datasets(f"hf:{dataset}")
    from datasets import load_dataset

    stream = _hf_stream(dataset)
    if stream["rows"] is None or stream["position"] > start:  # reads go forward; restart otherwise
        try:
            stream["rows"], stream["position"] = iter(load_dataset(dataset, split="train", streaming=True)), 0
        except (ConnectionError, FileNotFoundError, ValueError) as e:  # offline and not cached, or no such dataset
            raise CircuitsError(
                f"text source hf:{dataset} cannot be read here ({str(e).splitlines()[0]}): pass a .txt/.jsonl file, "
                "or run where the hub or its datasets cache is reachable"
            ) from None
    rows = itertools.islice(stream["rows"], start - stream["position"], start - stream["position"] + count)
    docs = [row["text"] for row in rows]
    stream["position"] = start + len(docs)
    return docs


def token_mask(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, pos] bool: the tokens that train a transcoder (not BOS, not padding)."""
    keep = tokens != model.tokenizer.pad_token_id
    keep[:, 0] = False
    if model.tokenizer.bos_token_id is not None:
        keep &= tokens != model.tokenizer.bos_token_id
    return keep


def document_tokens(model: HookedTransformer, docs: list[str], max_tokens: int) -> torch.Tensor:
    """Tokens [batch, pos] of documents, BOS first, right-padded, cut to `max_tokens`."""
    return model.to_tokens(docs, padding_side="right")[:, :max_tokens]
