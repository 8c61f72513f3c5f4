"""Where a report may be written, and how it is signed: always beside the folder it describes, never inside it.

A report inside the folder would change the very files its verdict is about (and fail the next verification). A
signed report is an OMS bundle like any other msov output, so it is signed as a folder of its own: the folder that
holds report.html (and report.pdf) and nothing else, into DIR.sig beside it. `msov verify DIR --key SIGNER.pub`
checks it, and `msov approve DIR` records a second party's signature over its digest.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..trust.keys import is_within
from ..trust.oms import sign_folder


def check_out(out: Path, folder: Path) -> None:
    target, described = Path(out).resolve(), Path(folder).resolve()
    if is_within(target, described) or is_within(described, target):
        raise InputError(f"{out}: lies inside {folder}, the folder the report describes; a report never sits inside "
                         f"what it is about (it would change the signed files).",
                         hint="Write it beside the folder, e.g. --out dossier/report.html.")
    if target.is_dir():
        raise InputError(f"{out}: is a folder; --out names the HTML file to write.")


def sign_report(out: Path, key: str, written: list[Path]) -> dict:
    """Sign the report's own folder. It must hold only what this command wrote: anything else there would be signed
    with it without the signer having seen it."""
    folder = Path(out).resolve().parent
    ours = {p.resolve() for p in written}
    others = sorted(p.name for p in folder.iterdir() if p.resolve() not in ours)
    if others:
        raise InputError(f"--sign-key: {folder} holds more than the report ({', '.join(others[:5])}); the report is "
                         f"signed as a folder of its own and those files would be signed with it.",
                         hint="Give --out a path in a folder of its own, e.g. --out dossier/report.html.")
    return sign_folder(folder, key)
