"""Many processes, one voice: which rank this is, and agreeing on failure before any rank starts training.

Under torchrun / accelerate launch every rank runs the same command on the same inputs. Checked alone, a bad
recipe would print the same error once per rank, and an input only one rank cannot read (a multi-node run
without a shared file system) would leave the others waiting inside the first collective until a timeout.
`all_ranks_agree` runs the input checks on every rank, then exchanges the outcomes: if any rank failed, every
rank stops, rank 0 reports the first failure (naming the rank when only some failed), and the others exit
with the same code, silently.

A failure during training has no such agreement: `unexpected_failure` and `as_reported` decide what each rank
says about it (a `Failure`), so that the one rank that failed speaks and its peers, which only see a broken
collective, stay quiet. The CLI renders the `Failure`; nothing here prints.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Callable, TypeVar

from ..errors import MsovError

T = TypeVar("T")
DDP_TIMEOUT_S = 1800  # transformers' TrainingArguments.ddp_timeout default


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


def all_ranks_agree(check: Callable[[], T], fingerprint: Callable[[T], object] | None = None) -> T:
    """Run `check` on every rank; raise on every rank if it raised on any (see the module docstring).

    `fingerprint(result)` says what every rank must have found the same (the recipe, the data digests, the
    checkpoint to resume from): a rank that differs from rank 0 would train something else or fall out of step.
    """
    if world_size() <= 1:
        return check()
    failure, result, mark = None, None, None
    try:
        result = check()
        mark = fingerprint(result) if fingerprint else None
    except MsovError as exc:
        failure = {"rank": rank(), "exit_code": exc.exit_code, "message": exc.message, "hint": exc.hint}
    except Exception as exc:  # noqa: BLE001 - an unreadable file on one node must stop the others too
        failure = {"rank": rank(), "exit_code": 1, "message": f"unexpected {type(exc).__name__}: {exc}",
                   "hint": None}
    outcomes = all_gather({"failure": failure, "fingerprint": mark})
    failures = [o["failure"] for o in outcomes if o["failure"] is not None]
    same_everywhere = len(failures) == len(outcomes) and len({f["message"] for f in failures}) == 1
    if not failures:
        differ = [r for r, o in enumerate(outcomes) if o["fingerprint"] != outcomes[0]["fingerprint"]]
        if not differ:
            return result
        failures = [{"rank": r, "exit_code": 3, "hint": "Every rank must see the same recipe, data files and "
                     "checkpoints (a shared file system, or identical copies on every node).",
                     "message": "found different inputs than rank 0: "
                                + _differences(outcomes[r]["fingerprint"], outcomes[0]["fingerprint"])}
                    for r in differ]
    first = min(failures, key=lambda f: f["rank"])
    if not is_main_process():
        raise StoppedWithPeers(f"rank {first['rank']} failed: {first['message']}", first["exit_code"])
    where = "" if same_everywhere else (
        f"rank {first['rank']} of {len(outcomes)}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
        + ": ")
    error = MsovError(where + first["message"], hint=first["hint"])
    error.exit_code = first["exit_code"]
    raise error


def _differences(mine, reference) -> str:
    """Which named parts of two fingerprints differ, values shortened: 'checkpoint: None, rank 0: checkpoint-5'."""
    def short(value) -> str:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    if not (isinstance(mine, dict) and isinstance(reference, dict)):
        return f"{short(mine)}, rank 0: {short(reference)}"
    return "; ".join(f"{key}: {short(mine.get(key))}, rank 0: {short(reference.get(key))}"
                     for key in sorted(set(mine) | set(reference)) if mine.get(key) != reference.get(key))


def all_gather(value) -> list:
    """Every rank's `value`, over the process group the Trainer will use (created here if not yet)."""
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    # The same initialisation the Trainer performs (gloo on CPU, NCCL on CUDA, the Trainer's default ddp_timeout):
    # the Trainer reuses this group, so its timeout is the run's.
    PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=DDP_TIMEOUT_S))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


# What a surviving rank sees when a peer died: the failing rank has already said why. Only these texts: a
# backend error of any other kind (bad NCCL interface, a CUDA fault inside a collective) is every rank's own.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
# A launcher on this machine stops rank 0 within moments of a local rank's failure (which that rank reported);
# still running after this long, the failed rank was elsewhere or died silently.
PEER_GRACE_S = 5.0


def is_peer_failure(exc: BaseException) -> bool:
    """Is this error of a multi-process run the echo of another rank's failure (a broken collective)?"""
    return world_size() > 1 and any(marker in str(exc) for marker in _PEER_GONE)


@dataclass(frozen=True)
class Failure:
    """What one rank reports when a command fails. The CLI renders it; `quiet` means another rank reports the
    failure and this one exits with `exit_code`, saying nothing."""

    message: str
    exit_code: int
    hint: str | None = None
    quiet: bool = False


def unexpected_failure(exc: Exception) -> Failure:
    """The report for an exception msov did not anticipate (not an MsovError): in a multi-process run, the echo
    of another rank's failure is left to that rank (or, on rank 0, named as a lost rank after a grace period in
    which the launcher may stop this process); anything else is this rank's own unexpected error."""
    if is_peer_failure(exc) and not is_main_process():  # the rank that failed says why
        return Failure(f"stopped: another rank failed ({exc})", 1, quiet=True)
    if is_peer_failure(exc):
        time.sleep(PEER_GRACE_S)
        return Failure(f"stopped: lost another rank of the run ({exc})", 1,
                       "the first error printed by any rank, or the launcher's summary, says why")
    return Failure(f"unexpected {type(exc).__name__}: {exc}", 1)


def as_reported(failure: Failure) -> Failure:
    """The failure as this rank reports it: named by rank on a rank other than 0 (rank 0 reports failures all
    ranks agreed on), and written where the launcher's failure summary looks."""
    message = failure.message
    if rank() > 0:
        message = f"rank {rank()} of {world_size()}: {message}"
    tell_launcher(message)
    return replace(failure, message=message)


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
