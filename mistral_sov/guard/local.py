"""Local only: a model reference must name a folder on this machine. A hub id or URL is refused before any
network-capable code runs (exit 5); a missing local folder is the user's input to fix (exit 3)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import EnvironmentRefused, ModelFolderError


def require_local_model(ref: str | os.PathLike, *, field: str = "model.path") -> Path:
    """A model reference must be an existing local folder. A hub id is refused before any network-capable code.

    Hub id (exit 5): a URL, or 'org/name' written without ./ ../ / ~ whose 'org' is no folder here. Anything else
    is a local path, so a missing folder or a file is the user's input to fix (exit 3)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    text = str(ref)
    looks_remote = "://" in text or (
        not text.startswith((".", "/", "~")) and text.count("/") == 1 and not path.parent.exists()
    )
    if looks_remote:
        raise EnvironmentRefused(
            f"{field}: '{text}' is not a local folder; it looks like a hub id or URL, and msov never downloads.",
            hint="Copy the model's files (config.json, tokenizer, *.safetensors) onto this machine and point "
            "model.path at that folder.",
        )
    if path.exists():
        raise ModelFolderError(f"{field}: '{text}' is a file, expected a model folder.")
    raise ModelFolderError(
        f"{field}: model folder '{text}' does not exist.",
        hint="msov only loads models from local folders; check the path (relative paths are resolved from the "
        "recipe's folder).",
    )
