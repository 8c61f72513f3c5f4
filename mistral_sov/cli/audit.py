"""`msov keygen`, `sign`, `verify`, `reproduce`, `manifest show`: the commands of signers and auditors."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import show
from .base import JsonOpt, command, emit, events, manifest_app


@command()
def keygen(
    out: Path = typer.Option(..., "--out", help="KEYBASE: writes KEYBASE.pem (private, 0600) and KEYBASE.pub"),
    curve: str = typer.Option("P-256", "--curve", help="P-256 | P-384"),
    prompt: bool = typer.Option(False, "--passphrase-prompt",
                                help="encrypt the private key with a passphrase typed at a prompt"),
    as_json: bool = JsonOpt,
) -> None:
    """Make an ECDSA key pair for signing outputs (the passphrase, if any, from $MSOV_KEY_PASSPHRASE or a prompt)."""
    from ..trust.keys import generate_keypair, key_hint, load_public_key, passphrase_from_env

    # Never a CLI argument: argv is visible to every user of the machine and lands in shell history.
    passphrase = passphrase_from_env()
    if passphrase is None and prompt:
        passphrase = typer.prompt("passphrase", hide_input=True, confirmation_prompt=True).encode("utf-8")
    private, public = generate_keypair(out, curve=curve, passphrase=passphrase)
    emit({"status": "ok", "private_key": str(private), "public_key": str(public), "curve": curve,
          "encrypted": bool(passphrase), "key_hint": key_hint(load_public_key(public))}, show.print_keygen)


@command()
def sign(
    folder: Path = typer.Argument(..., help="output folder to sign (adapter or merged model)"),
    key: Path = typer.Option(..., "--key", help="private key (.pem); its passphrase from $MSOV_KEY_PASSPHRASE"),
    out: Optional[Path] = typer.Option(None, "--out", help="signature file (default: FOLDER.sig beside the folder)"),
    as_json: bool = JsonOpt,
) -> None:
    """Sign every file of a folder: an OpenSSF Model Signing (OMS) bundle that `model_signing` also verifies."""
    from ..trust.oms import check_signature_target, sign_folder

    if out is not None:
        check_signature_target(out, folder, key)
    result = sign_folder(folder, key, sig_path=out)
    emit({"status": "ok", **result}, lambda screen, r: show.print_signed(screen, r, folder))


@command()
def verify(
    folder: Path = typer.Argument(..., help="output folder to check"),
    key: Path = typer.Option(..., "--key", help="the signer's public key (.pub)"),
    sig: Optional[Path] = typer.Option(None, "--sig", help="signature file (default: FOLDER.sig beside the folder)"),
    explain: bool = typer.Option(False, "--explain", help="also say what went into the folder (its provenance)"),
    as_json: bool = JsonOpt,
) -> None:
    """Check every file of a folder against its signature, offline; exit 4 naming what is wrong."""
    from ..trust.oms import verify_folder
    from ..trust.provenance import explain as explain_provenance

    report = verify_folder(folder, key, sig_path=sig)
    provenance = report.pop("provenance")
    # Explained only when someone reads it: the JSON document always carries it, the screen with --explain.
    wanted = as_json or explain
    report["provenance"] = explain_provenance(provenance) if provenance and wanted else None
    emit(report, lambda screen, r: show.print_verified(screen, r, folder, explain))


@command()
def reproduce(
    folder: Path = typer.Argument(..., help="a signed adapter folder with msov/provenance.json"),
    key: Path = typer.Option(..., "--key", help="the signer's public key"),
    sig: Optional[Path] = typer.Option(None, "--sig", help="signature file (default: FOLDER.sig)"),
    out: Optional[Path] = typer.Option(None, "--out", help="keep the re-run here (default: a scratch folder)"),
    as_json: bool = JsonOpt,
) -> None:
    """Re-run a signed training from its provenance; check the new adapter equals the signed one."""
    from ..reproduce import reproduce as run_reproduce

    emit(run_reproduce(folder, key, sig_path=sig, out=out, on_event=events(as_json)), show.print_reproduced)


@command(group=manifest_app, name="show")
def manifest_show(
    folder: Path = typer.Argument(..., help="folder to list"),
    as_json: bool = JsonOpt,
) -> None:
    """List every file with its sha256 and size, as a signature would (no signature is checked)."""
    from ..trust.hashing import describe_folder

    emit(describe_folder(folder), lambda screen, described: show.print_manifest(screen, described, folder))
