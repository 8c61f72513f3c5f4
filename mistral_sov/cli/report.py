"""`msov report`: the auditor's dossier, one self-contained HTML file (and a PDF with --pdf)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .base import JsonOpt, command, emit


@command()
def report(
    folder: Path = typer.Argument(..., help="a signed output folder (adapter or merged model)"),
    out: Path = typer.Option(..., "--out", help="the HTML file to write, outside FOLDER (e.g. dossier/report.html)"),
    key: Optional[Path] = typer.Option(None, "--key", help="the signer's public key (.pub), for a key-signed folder"),
    ca: list[Path] = typer.Option([], "--ca", metavar="<path>", help="a root CA certificate you trust, for a "
                                  "certificate-signed folder (repeatable)"),
    require: list[Path] = typer.Option([], "--require", metavar="<path>", help="a party (public key, or certificate "
                                       "with --ca) that must have signed or approved these files (repeatable; "
                                       "instead of --key)"),
    sig: Optional[Path] = typer.Option(None, "--sig", help="signature file (default: FOLDER.sig beside the folder)"),
    tsa_ca: list[Path] = typer.Option([], "--tsa-ca", metavar="<path>", help="root certificate of the timestamp "
                                      "authority: the signature's timestamp is checked and its time reported"),
    pdf: bool = typer.Option(False, "--pdf", help="also write OUT with .pdf, printed by headless Chromium"),
    sign_key: Optional[str] = typer.Option(None, "--sign-key", help="sign the report: OUT's folder (holding only the "
                                           "report) is signed into FOLDER.sig beside it; verify it with `msov "
                                           "verify`, approve it with `msov approve`"),
    as_json: bool = JsonOpt,
) -> None:
    """Write an offline audit dossier of a signed folder: verdict, provenance chain, data, training, evaluation,
    environment, controls, compute, EU AI Act Annex IV/XI mapping, and what it cannot establish. A folder that fails
    verification still gets its report, with a red verdict, and the command exits 4."""
    from ..errors import InputError, UsageError, VerificationError
    from ..report.facts import gather
    from ..report.html import render
    from ..report.sign import check_out, sign_report
    from ..trust.hashing import write_atomic

    if require and key is not None:
        raise UsageError("report: --require names every party, the signer's key included; drop --key.")
    if not require and (key is None) == (not ca):
        raise UsageError("report: give either --key SIGNER.pub (key method) or --ca ROOT.crt (certificate method)"
                         + (", not both." if key is not None else "."))
    check_out(out, folder)
    if sign_key is not None:
        from ..trust.signer import check_signer

        check_signer(sign_key, outside=(folder,))  # a wrong passphrase or PIN fails before the work, not after

    facts = gather(folder, key=key, ca=tuple(ca), require=tuple(require), sig=sig, tsa_ca=tuple(tsa_ca))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, render(facts).encode("utf-8"))
    written, pdf_path, pdf_error = [out], None, None
    if pdf:
        from ..report.pdf import print_pdf

        try:
            pdf_path = print_pdf(out, out.with_suffix(".pdf"))
            written.append(pdf_path)
        except InputError as exc:
            pdf_error = exc
    signed = sign_report(out, sign_key, written) if sign_key is not None and pdf_error is None else None

    verdict = facts["verdict"]
    if not verdict["ok"]:
        also = f" (and --pdf failed: {pdf_error.message})" if pdf_error else ""
        raise VerificationError(f"{verdict['error']}", hint=f"The report, with a red verdict, was written to {out}"
                                f"{also}.")
    if pdf_error is not None:
        raise pdf_error
    emit({"status": "intact", "report": str(out), "pdf": str(pdf_path) if pdf_path else None,
          "signature": signed["sig"] if signed else None, "subject_digest": verdict["subject_digest"],
          "signer": verdict["signer"].get("fingerprint") or verdict["signer"].get("subject")}, _print_report)


def _print_report(console, result: dict) -> None:
    from rich.markup import escape

    console.print(f"[bold green]intact[/]: report written to {escape(result['report'])}")
    if result["pdf"]:
        print(f"pdf             {result['pdf']}")
    if result["signature"]:
        print(f"report signed   {result['signature']}")
    print(f"subject digest  sha256:{result['subject_digest']}")
