"""Offline by construction: the environment variables that keep the Hugging Face libraries off the network, set
before any of them is imported (they read these at import time). Model references: guard/local.py."""

from __future__ import annotations

import logging
import os

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


def offline_env_in_force() -> dict[str, str | None]:
    """The offline variables as the process holds them now (None: unset): evidence that they were in force, read
    back rather than copied from OFFLINE_ENV. TRANSFORMERS_VERBOSITY is the user's to choose, so it is reported too."""
    return {key: os.environ.get(key) for key in (*OFFLINE_ENV, "TRANSFORMERS_VERBOSITY")}
