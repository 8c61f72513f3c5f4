"""Errors msov raises on purpose. The CLI renders each as one paragraph plus a hint and exits with its code.

Exit codes (DESIGN.md): 0 ok, 2 usage, 3 bad input, 4 verification failed, 5 environment refused, 1 unexpected.
"""

from __future__ import annotations


class MsovError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(MsovError):
    exit_code = 2


class InputError(MsovError):
    """Bad recipe, data or model folder: the user's input, not our code, is wrong."""

    exit_code = 3


class RecipeError(InputError):
    pass


class DataError(InputError):
    pass


class ModelFolderError(InputError):
    pass


class VerificationError(MsovError):
    exit_code = 4


class EnvironmentRefused(MsovError):
    """Network, remote model id, missing dependency: msov refuses rather than reaching out."""

    exit_code = 5


class Interrupted(MsovError):
    """Ctrl-C during training: a checkpoint was saved; `--resume` continues. 130 is the shell's code for SIGINT."""

    exit_code = 130
