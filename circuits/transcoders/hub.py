"""Transcoder files on the Hugging Face hub, through huggingface_hub's own cache.

References, as circuit-tracer writes them:
    ORG/REPO[/SUB/FOLDER][@REVISION]          a repository (or a folder of one)
    hf://ORG/REPO/PATH/TO/FILE[?revision=R]   one file (entries of a config.yaml `transcoders:` list)
With HF_HUB_OFFLINE=1 both resolve from the local cache alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from circuits.errors import CircuitsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    path: str | None = None  # a folder (repository refs) or a file (hf:// URIs)
    revision: str | None = None

    def __str__(self) -> str:
        return (
            "hf:" + "/".join(p for p in (self.repo_id, self.path) if p) + (f"@{self.revision}" if self.revision else "")
        )


def parse_ref(text: str) -> HubRef:
    """'ORG/REPO[/SUB][@REV]' or 'hf://ORG/REPO/PATH[?revision=R]' -> HubRef."""
    if text.startswith("hf://"):
        url = urlparse(text)
        parts = [url.netloc, *url.path.strip("/").split("/")]
        revision = parse_qs(url.query).get("revision", [None])[0]
    else:
        body, _, revision = text.partition("@")
        parts, revision = body.strip("/").split("/"), revision or None
    if len(parts) < 2 or not all(parts[:2]):
        raise CircuitsError(f"{text!r} is not a hub reference: use ORG/REPO[/FOLDER][@REVISION]")
    return HubRef("/".join(parts[:2]), "/".join(parts[2:]) or None, revision)


def _hub_errors():
    from huggingface_hub import errors

    return (errors.LocalEntryNotFoundError, errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
            errors.EntryNotFoundError, errors.GatedRepoError, errors.OfflineModeIsEnabled)  # fmt: skip


def _not_found(ref: HubRef, error: Exception) -> CircuitsError:
    reason = str(error).splitlines()[0]
    return CircuitsError(f"{ref} could not be fetched ({type(error).__name__}: {reason}): "
                         "check the name, or download it while online (HF_HUB_OFFLINE=0)")  # fmt: skip


def snapshot(ref: HubRef) -> Path:
    """The local directory of a repository (or of its folder `ref.path`), downloaded or cached."""
    from huggingface_hub import snapshot_download

    prefix = f"{ref.path}/" if ref.path else ""  # huggingface_hub's patterns: * matches / too
    patterns = [f"{prefix}*.{ext}" for ext in ("safetensors", "npz", "yaml", "json")]  # what the readers read
    log.info("fetching %s", ref)
    try:
        root = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns))
    except _hub_errors() as e:
        raise _not_found(ref, e) from None
    directory = root / ref.path if ref.path else root
    if not directory.is_dir():
        raise CircuitsError(f"{ref}: the repository has no folder {ref.path!r} (or it is not in the local cache)")
    return directory


def download_file(ref: HubRef) -> Path:
    """The local path of one file of a repository, downloaded or cached."""
    from huggingface_hub import hf_hub_download

    if not ref.path:
        raise CircuitsError(f"{ref} names no file: use hf://ORG/REPO/PATH/TO/FILE")
    try:
        return Path(hf_hub_download(ref.repo_id, ref.path, revision=ref.revision))
    except _hub_errors() as e:
        raise _not_found(ref, e) from None
