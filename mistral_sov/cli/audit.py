"""`msov keygen`, `sign`, `verify`, `reproduce`, `manifest show`: the commands of signers and auditors."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import show
from .base import JsonOpt, command, emit, events, manifest_app, warn_if_pin_in_argv


@command()
def keygen(
    out: Optional[Path] = typer.Option(None, "--out", help="KEYBASE: writes KEYBASE.pem (private, 0600) and "
                                       "KEYBASE.pub"),
    pkcs11: Optional[str] = typer.Option(None, "--pkcs11", help="make the key pair inside an HSM instead: "
                                         "pkcs11:token=...;object=... (RFC 7512; PIN from $MSOV_PKCS11_PIN or "
                                         "pin-source=file:...); with --out, KEYBASE.pub is written too"),
    curve: str = typer.Option("P-256", "--curve", help="P-256 | P-384 | P-521"),
    prompt: bool = typer.Option(False, "--passphrase-prompt",
                                help="encrypt the private key with a passphrase typed at a prompt"),
    as_json: bool = JsonOpt,
) -> None:
    """Make an ECDSA key pair for signing outputs (the passphrase, if any, from $MSOV_KEY_PASSPHRASE or a prompt)."""
    from ..errors import UsageError
    from ..trust.keys import generate_keypair, key_hint, load_public_key, passphrase_from_env

    if pkcs11:
        from ..trust.hashing import write_atomic
        from ..trust.pkcs11 import generate_keypair as generate_in_token

        made = generate_in_token(pkcs11, curve=curve)  # the private key never leaves the token
        public = None
        if out is not None:
            public = out.with_name(out.name + ".pub")
            if public.exists():
                raise UsageError(f"{public}: already exists; msov never overwrites a key.")
            write_atomic(public, made["public_pem"].encode("ascii"), mode=0o644)
        emit({"status": "ok", "private_key": made["uri"], "public_key": str(public) if public else None,
              "public_pem": made["public_pem"], "curve": curve, "encrypted": None, "key_hint": made["key_hint"],
              "in_token": True}, show.print_keygen)
        return
    if out is None:
        raise UsageError("keygen: give --out KEYBASE (a key file pair) or --pkcs11 URI (a key pair in an HSM).")
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
    key: str = typer.Option(..., "--key", help="private key (.pem; its passphrase from $MSOV_KEY_PASSPHRASE), or a "
                            "key in an HSM: pkcs11:token=...;object=... (PIN from $MSOV_PKCS11_PIN)"),
    cert: Optional[Path] = typer.Option(None, "--cert", help="the key's X.509 certificate (PEM or DER), issued by "
                                        "your CA: the OMS certificate method instead of the key method"),
    chain: list[Path] = typer.Option([], "--chain", metavar="<path>", help="an intermediate CA certificate "
                                     "between --cert and the root (repeatable; the root itself is the verifier's "
                                     "--ca)"),
    out: Optional[Path] = typer.Option(None, "--out", help="signature file (default: FOLDER.sig beside the folder)"),
    ignore: list[str] = typer.Option([], "--ignore", metavar="<path>", help="leave this path out (exact, relative "
                                     "to FOLDER; repeatable): recorded in the signature, and the verifier must pass "
                                     "it too"),
    tsa: Optional[str] = typer.Option(None, "--tsa", help="an RFC 3161 timestamp authority (http[s]://, on-prem) "
                                      "that vouches for when it was signed"),
    as_json: bool = JsonOpt,
) -> None:
    """Sign every file of a folder: an OpenSSF Model Signing (OMS) bundle that `model_signing` also verifies."""
    from ..errors import UsageError
    from ..trust.oms import check_signature_target, sign_folder
    from ..trust.signer import open_signer

    if chain and cert is None:
        raise UsageError("--chain: intermediate certificates go with a signing certificate; pass --cert too.")
    warn_if_pin_in_argv(key)
    if out is not None:
        check_signature_target(out, folder, Path(key))
    # the key (passphrase, PIN) is reached and a certificate checked against it, its chain linked, before hashing
    signer = open_signer(key, cert=cert, chain=tuple(chain))
    result = sign_folder(folder, signer, sig_path=out, ignore=tuple(ignore), tsa=tsa)
    emit({"status": "ok", **result}, lambda screen, r: show.print_signed(screen, r, folder))


@command()
def verify(
    folder: Path = typer.Argument(..., help="output folder to check"),
    key: Optional[Path] = typer.Option(None, "--key", help="the signer's public key (.pub), for a key-signed "
                                       "folder"),
    ca: list[Path] = typer.Option([], "--ca", metavar="<path>", help="a root CA certificate you trust, for a "
                                  "certificate-signed folder (repeatable; a file may hold several)"),
    sig: Optional[Path] = typer.Option(None, "--sig", help="signature file (default: FOLDER.sig beside the folder)"),
    require: list[Path] = typer.Option([], "--require", metavar="<path>", help="a party (public key, or certificate "
                                       "with --ca) that must have signed or approved these very files (repeatable; "
                                       "instead of --key)"),
    ignore: list[str] = typer.Option([], "--ignore", metavar="<path>", help="a path the signer left out (exact, "
                                     "relative to FOLDER; repeatable); a signature never widens this on its own"),
    ignore_unsigned: bool = typer.Option(False, "--ignore-unsigned-files", help="files the signature does not list "
                                         "are reported, not an error (a changed or missing signed file still is)"),
    tsa_ca: list[Path] = typer.Option([], "--tsa-ca", metavar="<path>", help="root certificate of the timestamp "
                                      "authority: the signature's timestamp is checked and its time reported"),
    explain: bool = typer.Option(False, "--explain", help="also say how it was signed, by whom, and what went into "
                                 "the folder (its provenance)"),
    as_json: bool = JsonOpt,
) -> None:
    """Check every file of a folder against its signature, offline; exit 4 naming what is wrong."""
    from ..errors import UsageError
    from ..trust.oms import verify_folder
    from ..trust.provenance import explain as explain_provenance

    options = dict(sig_path=sig, ca=tuple(ca), ignore=tuple(ignore), ignore_unsigned=ignore_unsigned,
                   tsa_ca=tuple(tsa_ca))
    if require:
        from ..trust.approvals import verify_parties

        if key is not None:
            raise UsageError("verify: --require names every party, the signer's key included; drop --key.")
        report = verify_parties(folder, list(require), **options)
    else:
        if (key is None) == (not ca):
            raise UsageError("verify: give either --key SIGNER.pub (key method) or --ca ROOT.crt (certificate "
                             "method)" + (", not both." if key is not None else "."))
        report = verify_folder(folder, key, **options)
    provenance = report.pop("provenance")
    # Explained only when someone reads it: the JSON document always carries it, the screen with --explain.
    wanted = as_json or explain
    report["provenance"] = explain_provenance(provenance) if provenance and wanted else None
    emit(report, lambda screen, r: show.print_verified(screen, r, folder, explain))


@command()
def approve(
    folder: Path = typer.Argument(..., help="a signed folder to approve for release"),
    key: str = typer.Option(..., "--key", help="the approver's private key (.pem) or HSM key (pkcs11:...)"),
    cert: Optional[Path] = typer.Option(None, "--cert", help="the approver's certificate (certificate method)"),
    chain: list[Path] = typer.Option([], "--chain", metavar="<path>", help="intermediate CA certificate "
                                     "(repeatable)"),
    signed_by: Optional[Path] = typer.Option(None, "--signed-by", help="the trainer's public key: the folder is "
                                             "checked against its signature with it first"),
    ca: list[Path] = typer.Option([], "--ca", metavar="<path>", help="root CA of the trainer's certificate, "
                                  "instead of --signed-by (repeatable)"),
    sig: Optional[Path] = typer.Option(None, "--sig", help="the trainer's signature (default: FOLDER.sig)"),
    as_json: bool = JsonOpt,
) -> None:
    """Countersign a verified folder (a second party's OMS bundle, FOLDER.approval-<fingerprint>.sig beside it)."""
    from ..trust.approvals import approve as approve_folder
    from ..trust.signer import open_signer

    warn_if_pin_in_argv(key)
    signer = open_signer(key, cert=cert, chain=tuple(chain))
    emit(approve_folder(folder, signer, signed_by=signed_by, ca=tuple(ca), sig_path=sig), show.print_approved)


@command()
def reproduce(
    folder: Path = typer.Argument(..., help="a signed adapter folder with msov/provenance.json"),
    key: Path = typer.Option(..., "--key", help="the signer's public key"),
    sig: Optional[Path] = typer.Option(None, "--sig", help="signature file (default: FOLDER.sig)"),
    out: Optional[Path] = typer.Option(None, "--out", help="keep the re-run here (default: a scratch folder)"),
    as_json: bool = JsonOpt,
) -> None:
    """Re-run a signed training from its provenance; check the new adapter equals the signed one (the outcome is
    written beside the folder, to FOLDER.reproduced.json)."""
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
