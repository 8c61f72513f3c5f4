"""The msov command line: parse, call the library, render. The app, its options and policies live in `base`,
the commands in one module per area (each registers itself on `app` when imported), every printer in `show`.

The console script is `mistral_sov.cli:app`; `python -m mistral_sov` and `python -m mistral_sov.cli` run the same.
"""

from __future__ import annotations

from .base import app, command

# Imported last, for their side effect: each module's commands register on `app` (and its groups).
from . import machine, train, audit, eval, export, data, report  # noqa: E402,F401,I001

# The order `msov --help` has always listed the commands in, whatever order the modules register them in (a
# command not named here comes last).
HELP_ORDER = ("version", "finetune", "demo", "tiny-model", "keygen", "sign", "verify", "reproduce", "report", "eval",
              "generate", "export", "plan", "doctor", "convert")


def _help_rank(info) -> int:
    name = info.name or info.callback.__name__.replace("_", "-")
    return HELP_ORDER.index(name) if name in HELP_ORDER else len(HELP_ORDER)


app.registered_commands.sort(key=_help_rank)

__all__ = ["app", "command"]
