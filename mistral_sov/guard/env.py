"""Offline by construction: environment variables set before any HF import, and model references checked local."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import EnvironmentRefused, ModelFolderError

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "DO_NOT_TRACK": "1",
    "WANDB_DISABLED": "true",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def enforce_offline_env() -> None:
    """Must run before transformers / datasets / huggingface_hub are imported: they read these at import time."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value
    # Library code never prints: HF progress bars and advisory logging stay off unless the user asks for them.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


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
