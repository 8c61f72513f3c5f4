"""`msov export` (a merged checkpoint or a versioned, signed adapter), `msov registry list`, and `msov convert`
(a native Mistral folder to a Hugging Face one: the inverse of `export --merge --format mistral`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError
from . import show
from .base import JsonOpt, command, emit, events, registry_app


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
    on_event = events(as_json)
    if merge:
        from ..export.merged import export_merged

        result = export_merged(run, out, dtype=dtype, shard_size=shard_size, key=key, base=base,
                               include_paths=include_paths, overwrite=overwrite, on_event=on_event, fmt=fmt)
    else:
        from ..export.adapter import export_adapter

        result = export_adapter(run, out=out, registry=registry, version=version, name=name, key=key, base=base,
                                include_paths=include_paths, overwrite=overwrite, on_event=on_event)
    emit(result, show.print_export)


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
    emit({"status": "failed" if failed else "ok", "registry": str(registry), "adapters": entries},
         show.print_registry)
    if failed:  # every entry was listed; the exit code tells CI that at least one is not what it claims
        raise typer.Exit(4)


@command()
def convert(
    native: Path = typer.Argument(..., help="native Mistral folder: consolidated.safetensors, params.json, "
                                            "tekken.json or tokenizer.model.v*"),
    out: Path = typer.Option(..., "--out", help="the Hugging Face folder to write (must not exist)"),
    as_json: bool = JsonOpt,
) -> None:
    """Turn a native Mistral folder into a Hugging Face one, streamed tensor by tensor."""
    from ..errors import InputError
    from ..export.stage import check_target, publish, staged
    from ..model.mistral_native import convert_native

    if out.resolve().is_relative_to(native.resolve()):
        raise InputError(f"--out {out} is inside the folder it converts ({native}); write it elsewhere.")
    check_target(out, overwrite=False)
    with staged(out) as stage:
        record = convert_native(native, stage.folder)
        publish(stage.folder, out, overwrite=False)  # whole or not at all
    emit({"status": "ok", "out": str(out), **record},
         lambda screen, result: show.print_converted_model(screen, result, native))
