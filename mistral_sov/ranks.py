"""Many processes, one voice: which rank this is, and agreeing on failure before any rank starts training.

Under torchrun / accelerate launch every rank runs the same command on the same inputs. Checked alone, a bad
recipe would print the same error once per rank, and an input only one rank cannot read (a multi-node run
without a shared file system) would leave the others waiting inside the first collective until a timeout.
`all_ranks_agree` runs the input checks on every rank, then exchanges the outcomes: if any rank failed, every
rank stops, rank 0 reports the first failure (naming the rank when only some failed), and the others exit
with the same code, silently.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, TypeVar

from .errors import MsovError

T = TypeVar("T")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Only rank 0 writes outputs and renders progress."""
    return rank() == 0


class StoppedWithPeers(MsovError):
    """This rank stops because another rank failed; rank 0 prints that failure, this rank prints nothing."""

    exit_code = 1
    quiet = True

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def all_ranks_agree(check: Callable[[], T]) -> T:
    """Run `check` on every rank; raise on every rank if it raised on any (see the module docstring)."""
    if world_size() <= 1:
        return check()
    failure, result = None, None
    try:
        result = check()
    except MsovError as exc:
        failure = {"rank": rank(), "exit_code": exc.exit_code, "message": exc.message, "hint": exc.hint,
                   "kind": type(exc).__name__}
    outcomes = _all_gather(failure)
    failures = [f for f in outcomes if f is not None]
    if not failures:
        return result
    first = min(failures, key=lambda f: f["rank"])
    if not is_main_process():
        raise StoppedWithPeers(f"rank {first['rank']} failed: {first['message']}", first["exit_code"])
    same_everywhere = len(failures) == len(outcomes) and len({f["message"] for f in failures}) == 1
    where = "" if same_everywhere else (
        f"rank {first['rank']} of {len(outcomes)}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
        + ": ")
    error = MsovError(where + first["message"], hint=first["hint"])
    error.exit_code = first["exit_code"]
    raise error


def _all_gather(value) -> list:
    """Every rank's `value`, over the process group the Trainer will use (created here if not yet)."""
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    # The same initialisation the Trainer performs (gloo on CPU, NCCL on CUDA); it reuses an existing group.
    PartialState(cpu=not torch.cuda.is_available())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


# What a surviving rank sees when a peer died: the failing rank has already said why.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crash", "Broken pipe",
              "NCCL communicator was aborted", "ProcessGroupNCCL", "DistNetworkError", "DistBackendError")


def is_peer_failure(exc: BaseException) -> bool:
    """Is this error on a multi-process run only the echo of another rank's failure (a broken collective)?"""
    if world_size() <= 1:
        return False
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in _PEER_GONE)


def tell_launcher(message: str) -> None:
    """Put our one-line error where torchrun's failure summary looks (instead of "error_file: <N/A>")."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as handle:
            # torch.distributed.elastic's own error-file layout; its summary shows "py_callstack" as the cause.
            line = f"msov: {message}"
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, handle)
    except OSError:
        pass  # the launcher's summary is a courtesy; the error itself is already on stderr
