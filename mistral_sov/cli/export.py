"""CLI commands for exports: `msov export` (merged checkpoint or versioned adapter) and `msov registry list`.

Registered on the main Typer app in cli.py. Heavy imports (torch, safetensors, peft) happen inside commands only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError
from . import JsonOpt, _console, app, command

registry_app = typer.Typer(help="Versioned adapters in a registry folder (DIR/<name>/<version>/).",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@command()
def export(
    run: Path = typer.Argument(..., help="a finished run folder (output.dir), or a PEFT adapter folder"),
    merge: bool = typer.Option(False, "--merge", help="write base + adapter merged: a standard HF model folder"),
    adapter: bool = typer.Option(False, "--adapter", help="write the adapter with card, provenance, signature"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder to create (its signature: OUT.sig beside it)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="--merge: bf16 | fp16 | fp32 (default: as stored)"),
    shard_size: str = typer.Option("5GB", "--shard-size", help="--merge: largest weight file, e.g. 5GB, 500MB"),
    fmt: str = typer.Option("hf", "--format", help="--merge: hf (Hugging Face folder) | mistral "
                            "(consolidated.safetensors + params.json + tokenizer file)"),
    registry: Optional[Path] = typer.Option(None, "--registry", help="--adapter: publish to DIR/<name>/<version>/"),
    version: Optional[str] = typer.Option(None, "--version", help="--adapter --registry: semantic version, 1.4.0"),
    name: Optional[str] = typer.Option(None, "--name", help="--registry: adapter name (default: the run's name)"),
    key: Optional[Path] = typer.Option(None, "--key", help="sign with this private key (.pem); passphrase from "
                                       "$MSOV_KEY_PASSPHRASE"),
    base: Optional[Path] = typer.Option(None, "--base", help="the base model folder, when it moved since training"),
    include_paths: bool = typer.Option(False, "--include-paths", help="name local paths in the model card"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out folder (never a "
                                   "registry version)"),
    as_json: bool = JsonOpt,
) -> None:
    """Export a run: a merged checkpoint (streamed, bounded memory) or a versioned, signed adapter."""
    if merge == adapter:
        raise UsageError("export: pass exactly one of --merge or --adapter.")
    if merge and (registry or version):
        raise UsageError("--registry/--version publish adapters; a merged checkpoint goes to --out DIR.")
    if merge and out is None:
        raise UsageError("--merge needs --out DIR.")
    if adapter and (dtype or shard_size != "5GB" or fmt != "hf"):
        raise UsageError("--dtype, --shard-size and --format apply to --merge only.")
    if fmt not in ("hf", "mistral"):
        raise UsageError(f"--format {fmt}: expected hf or mistral.")
    if adapter and version and registry is None:
        raise UsageError("--version needs --registry DIR.")
    if adapter and registry is not None and overwrite:
        raise UsageError("--overwrite: a registry version is never overwritten; publish a new --version.")
    events = (lambda kind, payload: None) if as_json else _stages()
    if merge:
        from ..export.merged import export_merged

        result = export_merged(run, out, dtype=dtype, shard_size=shard_size, key=key, base=base,
                               include_paths=include_paths, overwrite=overwrite, on_event=events, fmt=fmt)
    else:
        from ..export.adapter import export_adapter

        result = export_adapter(run, out=out, registry=registry, version=version, name=name, key=key, base=base,
                                include_paths=include_paths, overwrite=overwrite, on_event=events)
    if as_json:
        print(json.dumps(result))
        return
    console = _console(stderr=False)
    where = result.get("out") or result.get("path")
    if result.get("kind") == "merged":
        console.print(f"[green]merged[/] {result['merged_tensors']} LoRA targets into {len(result['files'])} "
                      f"weight file(s), {_bytes(result['total_size'])} ({result['dtype']}) in "
                      f"{result['wall_time_s']} s", markup=True)
        console.print(f"folder          {where}", markup=False)
        console.print(f"merged into     {result['merged_into']}", markup=False)
        console.print(f"adapter id      sha256:{result['adapter_id']}", markup=False)
    else:
        verb = "already published, identical" if result["status"] == "unchanged" else "published"
        label = f"{result['name']} {result['version']}" if result.get("version") else result["name"]
        console.print(f"[green]{verb}[/] {label}")
        console.print(f"folder          {where}", markup=False)
        console.print(f"adapter id      sha256:{result['adapter_id']}", markup=False)
    if result.get("sig"):
        console.print(f"signature       {result['sig']}  (key SHA256:{result.get('key_hint')})", markup=False)
    else:
        console.print("signature       none (pass --key KEY.pem to sign)", markup=False)


@command(group=registry_app, name="list")
def registry_list(
    registry: Path = typer.Argument(..., help="the registry folder"),
    pub: Optional[Path] = typer.Option(None, "--pub", help="verify every signature with this public key"),
    as_json: bool = JsonOpt,
) -> None:
    """Name, version, digest, base model digest, date and signer of every adapter in a registry."""
    from ..export.registry import list_registry

    entries = list_registry(registry, pub=pub)
    failed = [e for e in entries if e["status"].startswith(("FAILED", "MODIFIED", "unreadable"))]
    if as_json:
        print(json.dumps({"status": "failed" if failed else "ok", "registry": str(registry), "adapters": entries}))
        if failed:
            raise typer.Exit(4)
        return
    # Plain columns rather than a rich table: a narrow terminal or a CI log must not wrap digests mid-word.
    rows = [("name", "version", "digest", "base model", "date", "signed by", "status")]
    rows += [(e["name"], e["version"], _short(e["digest"]), _short(e["base_model_digest"]), (e["date"] or "-")[:10],
              f"SHA256:{_short(e['signed_by'])}" if e["signed_by"] else "-", e["status"]) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows if entries else []:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    if not entries:
        print(f"{registry}: no adapters yet")
    if failed:  # every entry was listed; the exit code tells CI that at least one is not what it claims
        raise typer.Exit(4)


def _bytes(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "-"


def _stages():
    console = _console()

    def on_event(kind: str, payload: dict) -> None:
        if kind == "stage":
            console.print(f"[dim]· {payload['text']}[/]")

    return on_event
