"""CLI commands for auditors and signers: keygen, sign, verify, manifest show (registered on the main app).

Heavy imports (cryptography, rich) happen inside commands only, so `msov --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from . import JsonOpt, _console, app, command

manifest_app = typer.Typer(help="Look at an output folder's file list and digests.", no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")


@command()
def keygen(
    out: Path = typer.Option(..., "--out", help="KEYBASE: writes KEYBASE.pem (private, 0600) and KEYBASE.pub"),
    curve: str = typer.Option("P-256", "--curve", help="P-256 | P-384"),
    prompt: bool = typer.Option(False, "--passphrase-prompt",
                                help="encrypt the private key with a passphrase typed at a prompt"),
    as_json: bool = JsonOpt,
) -> None:
    """Make an ECDSA key pair for signing outputs (the passphrase, if any, from $MSOV_KEY_PASSPHRASE or a prompt)."""
    from ..trust.keys import PASSPHRASE_ENV, generate_keypair, key_hint, load_public_key, passphrase_from_env

    # Never a CLI argument: argv is visible to every user of the machine and lands in shell history.
    passphrase = passphrase_from_env()
    if passphrase is None and prompt:
        passphrase = typer.prompt("passphrase", hide_input=True, confirmation_prompt=True).encode("utf-8")
    private, public = generate_keypair(out, curve=curve, passphrase=passphrase)
    result = {"status": "ok", "private_key": str(private), "public_key": str(public), "curve": curve,
              "encrypted": bool(passphrase), "key_hint": key_hint(load_public_key(public))}
    if as_json:
        print(json.dumps(result))
        return
    console = _console(stderr=False)
    console.print(f"private key  {private}  (mode 0600{', encrypted' if passphrase else ''}; keep it secret, "
                  f"outside every output folder)")
    console.print(f"public key   {public}  (give this to auditors)")
    console.print(f"fingerprint  SHA256:{result['key_hint']}")
    if not passphrase:
        console.print(f"[dim]the private key is not encrypted; set {PASSPHRASE_ENV} or pass --passphrase-prompt "
                      f"to encrypt it[/]")


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
    if as_json:
        print(json.dumps({"status": "ok", **result}))
        return
    console = _console(stderr=False)
    console.print(f"[green]signed[/] {result['files']} files of {folder}")
    console.print(f"signature       {result['sig']}")
    console.print(f"subject digest  sha256:{result['subject_digest']}")
    console.print(f"key             SHA256:{result['key_hint']}")


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
    if as_json:
        report["provenance"] = explain_provenance(provenance) if provenance else None
        print(json.dumps(report))
        return
    console = _console(stderr=False)
    console.print(f"[bold green]verified[/] {len(report['files'])} files of {folder} against {report['sig']}")
    console.print(f"subject digest  sha256:{report['subject_digest']}")
    console.print(f"signer key      {report['key']['fingerprint']} ({report['key']['curve']})")
    if explain:
        if provenance is None:
            console.print("[yellow]no msov/provenance.json in this folder: nothing to say about its inputs[/]")
        else:
            _print_explanation(console, explain_provenance(provenance))


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
    from . import _stage_printer

    report = run_reproduce(folder, key, sig_path=sig, out=out,
                           on_event=(lambda *_: None) if as_json else _stage_printer())
    if as_json:
        print(json.dumps(report))
        return
    console = _console(stderr=False)
    if report["status"] == "identical":
        console.print("[bold green]reproduced[/]: the re-run's weights are byte-identical to the signed ones")
    else:
        console.print("[bold yellow]equivalent[/]: not byte-identical (" + "; ".join(report["reasons"])
                      + f"); eval loss {report['eval_loss']['recorded']:.4f} -> "
                      f"{report['eval_loss']['reproduced']:.4f}")
    for name, digest in report["reproduced"].items():
        console.print(f"  {name}  sha256:{digest}")


@command(group=manifest_app, name="show")
def manifest_show(
    folder: Path = typer.Argument(..., help="folder to list"),
    as_json: bool = JsonOpt,
) -> None:
    """List every file with its sha256 and size, as a signature would (no signature is checked)."""
    from ..trust.hashing import describe_folder, printable

    described = describe_folder(folder)
    if as_json:
        print(json.dumps(described))
        return
    console = _console(stderr=False)
    # One line per file, digest first (as sha256sum prints it), full digests: an auditor compares them by eye or
    # by grep, so nothing is truncated to fit a table.
    console.print(f"{folder}: {len(described['files'])} files, {_size(described['total_bytes'])}", markup=False)
    for item in described["files"]:
        console.print(f"{item['digest']}  {_size(item['size']):>10}  {printable(item['name'])}", markup=False)
    console.print(f"subject digest  sha256:{described['subject_digest']}  (ignoring "
                  f"{', '.join(described['ignore_paths'])})")


def _print_explanation(console, facts: dict) -> None:
    """The provenance for a person: what an auditor asks first, in the order they ask it."""
    from rich.markup import escape as markup_escape

    from ..trust.hashing import printable

    def escape(text: str) -> str:
        return markup_escape(printable(text))

    base = facts["base_model"]
    console.print()
    console.print("[bold]what went into it[/] (msov/provenance.json, covered by the signature)")
    console.print(f"base model   {escape(str(base.get('path')))}  ({base.get('architecture') or '?'}, "
                  f"{len(base['files'])} files)")
    for item in base["files"]:
        console.print(f"  {item['sha256'][:16]}  {escape(item['name'])}")
    console.print("datasets")
    for item in facts["datasets"]:
        console.print(f"  {item['sha256'][:16]}  {escape(item['path'])}  ({item.get('split')}, "
                      f"{item.get('rows')} rows, {item.get('format')})")
    console.print(f"recipe       {escape(str(facts.get('recipe_name')))}  sha256:{facts.get('recipe_digest')}  "
                  f"seed {facts.get('seed')}")
    versions = facts["versions"]
    console.print("versions     " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "platform"))
    hardware = facts.get("hardware") or {}
    accelerators = ", ".join(hardware.get("accelerators") or []) or "no accelerator"
    console.print(f"machine      {hardware.get('cpu') or hardware.get('machine')} × {hardware.get('cpu_count')}, "
                  f"{accelerators}; {versions.get('platform', '')}")
    console.print(f"times        {facts.get('started')} → {facts.get('finished')}")
    metrics = facts.get("metrics") or {}
    train, evaluation = metrics.get("train") or {}, metrics.get("eval") or {}
    before, after = evaluation.get("before") or {}, evaluation.get("after") or {}
    if train or before or after:
        console.print(f"metrics      {train.get('steps')} steps, final train loss {_num(train.get('final_loss'))}; "
                      f"eval loss {_num(before.get('loss'))} → {_num(after.get('loss'))}")
    for item in facts["weights"]:
        console.print(f"weights      {item['sha256'][:16]}  {escape(item['name'])}")
    export = facts.get("export")
    seal = (export or {}).get("training_seal")
    if export is None:
        console.print("sealed at training time: everything above (the training run wrote this provenance)")
    elif seal:
        signer = (f"signed at training time by key SHA256:{seal['training_key_hint']}" if seal["signed_at_training"]
                  else "NOT signed at training time: someone able to rewrite the run folder could have rewritten "
                       "its record too")
        console.print(f"sealed at training time: base model, datasets, recipe, seed, versions, machine, metrics "
                      f"(the run's {seal['record']}, sha256:{seal['record_sha256'][:16]}…; {signer})")
        console.print("sealed at export time: the weights, how they were merged (dtype, base digest)")
    else:
        console.print("sealed at export time: everything above (a bare adapter: no training record existed)")


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)
