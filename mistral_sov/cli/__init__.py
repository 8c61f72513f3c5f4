"""The msov command line: parse, call the library, render. Heavy imports happen inside commands only."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import typer
from typer.core import TyperGroup

from ..errors import MsovError


class _JsonUsageErrors(TyperGroup):
    """With --json, a usage error (Click's exit 2: unknown option, missing argument) is a JSON document too."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        if "--json" not in argv:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        from typer._click.exceptions import ClickException  # typer 0.29 vendors click as typer._click

        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as exc:
            _print_json_error(exc.exit_code, exc.format_message(), "see --help")
            print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except typer.Abort:
            _print_json_error(1, "aborted", None)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _print_json_error(code: int, message: str, hint: str | None) -> None:
    print(json.dumps({"status": "error", "exit_code": code, "error": message, "hint": hint}))


app = typer.Typer(
    cls=_JsonUsageErrors,
    name="msov",
    help="Sovereign fine-tuning: LoRA/QLoRA on local open-weight LLMs, offline, with verifiable outputs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Check training data before a run: validate, count tokens.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_state = {"debug": False}
PEER_GRACE_S = 5.0

RecipeArg = typer.Argument(..., exists=False, help="recipe YAML file")
SetOpt = typer.Option(None, "--set", help="override a recipe field, e.g. --set train.lr=1e-4 (repeatable)")
JsonOpt = typer.Option(False, "--json", help="print one machine-readable JSON result on stdout")


def _console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _fail(exc: BaseException, code: int, as_json: bool, hint: str | None = None) -> None:
    from rich.markup import escape

    from ..train.ranks import rank, tell_launcher, world_size

    if getattr(exc, "quiet", False) and not _state["debug"]:  # another rank failed first and reports it
        raise typer.Exit(code)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if rank() > 0:  # a failure of this rank alone (rank 0 would have reported one all ranks agreed on)
        message = f"rank {rank()} of {world_size()}: {message}"
    tell_launcher(message)
    if as_json:
        _print_json_error(code, message, hint)
    console = _console()
    console.print(f"[bold red]error:[/] {escape(message)}")
    if hint:
        console.print(f"[dim]hint:[/] {escape(hint)}")
    if _state["debug"]:
        console.print_exception()
    elif code == 1:
        console.print("[dim]run with --debug for the traceback[/]")
    raise typer.Exit(code)


def command(group: typer.Typer = app, name: str | None = None) -> Callable:
    """Register a command whose MsovErrors become one readable message and their exit code."""

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            from ..guard.egress import egress_guard

            as_json = bool(kwargs.get("as_json"))
            captured = io.StringIO()
            try:
                with egress_guard(), contextlib.redirect_stdout(captured) if as_json else contextlib.nullcontext():
                    return func(*args, **kwargs)
            except (typer.Exit, typer.Abort):
                raise
            except MsovError as exc:
                _fail(exc, exc.exit_code, as_json, exc.hint)
            except KeyboardInterrupt:
                _fail(RuntimeError("interrupted"), 130, as_json, "an unfinished run can be continued with --resume")
            except OSError as exc:  # disk full, read-only or missing folder: say which file, not a traceback
                where = f" ({exc.filename})" if exc.filename else ""
                _fail(RuntimeError(f"{exc.strerror or exc}{where}"), 1, as_json,
                      "nothing unfinished was published; fix the cause and run the command again")
            except Exception as exc:  # noqa: BLE001 - the last line of defence renders, never hides
                from ..train.ranks import StoppedWithPeers, is_main_process, is_peer_failure

                if is_peer_failure(exc) and not is_main_process():  # the rank that failed says why
                    _fail(StoppedWithPeers(f"stopped: another rank failed ({exc})", 1), 1, as_json)
                if is_peer_failure(exc):
                    # A launcher on this machine stops rank 0 within moments of a local rank's failure (which that
                    # rank reported); still running after that, the failed rank was elsewhere or died silently.
                    time.sleep(PEER_GRACE_S)
                    _fail(RuntimeError(f"stopped: lost another rank of the run ({exc})"), 1, as_json,
                          "the first error printed by any rank, or the launcher's summary, says why")
                _fail(RuntimeError(f"unexpected {type(exc).__name__}: {exc}"), 1, as_json)
            finally:
                if as_json:
                    _keep_one_json_document(captured.getvalue())

        return group.command(name)(wrapper)

    return decorate


def _keep_one_json_document(text: str) -> None:
    """Under --json, stdout carries the command's document (its last JSON line) and nothing else: what libraries
    print on stdout while the command runs (DeepSpeed's accelerator notice at import) goes to stderr."""
    lines = text.splitlines()
    document = None
    for i in range(len(lines) - 1, -1, -1):
        try:
            json.loads(lines[i])
        except ValueError:
            continue
        document = lines.pop(i)
        break
    if lines:
        print("\n".join(lines), file=sys.stderr)
    if document is not None:
        print(document)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="show tracebacks and library warnings")) -> None:
    import warnings

    from ..guard.env import enforce_offline_env

    _state["debug"] = debug
    if debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")
    else:
        # Deprecation notices from the libraries are for msov's developers, not its users.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    enforce_offline_env()


@command()
def version(as_json: bool = JsonOpt) -> None:
    """Print msov's version and the versions of the libraries it runs on."""
    from ..train.pipeline import environment_versions

    versions = environment_versions()
    if as_json:
        print(json.dumps(versions))
    else:
        for key, value in versions.items():
            print(f"{key:13} {value}")


@command()
def finetune(
    recipe: Path = RecipeArg,
    overrides: Optional[List[str]] = SetOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="validate recipe, model and data; train nothing"),
    resume: bool = typer.Option(False, "--resume", help="continue the unfinished run from its latest checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run at output.dir"),
    sign_key: Optional[Path] = typer.Option(None, "--sign-key", help="sign the adapter with this private key "
                                            "(overrides output.sign_key; passphrase from $MSOV_KEY_PASSPHRASE)"),
    as_json: bool = JsonOpt,
) -> None:
    """Fine-tune a local model with LoRA as the recipe says; write adapter/, metrics.jsonl and run.json."""
    from ..errors import Interrupted
    from ..recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    if dry_run:
        from ..train.pipeline import dry_run as run_dry

        report = run_dry(loaded, on_event=_quiet_events() if as_json else _stage_printer())
        if as_json:
            print(json.dumps(report))
        else:
            from .show import print_dry_run

            print_dry_run(_console(stderr=False), loaded, report)
        return
    try:
        summary = _run_with_progress(loaded, resume=resume, overwrite=overwrite, quiet=as_json,
                                     sign_key=str(sign_key) if sign_key else None)
    except Interrupted as exc:
        sets = "".join(f" --set {o}" for o in overrides or [])
        exc.hint = f"continue with: msov finetune {recipe}{sets} --resume"
        raise
    if "rank" in summary:  # a non-zero rank of a multi-process run: rank 0 reports
        return
    if as_json:
        print(json.dumps(summary))
    else:
        from .show import print_run_summary

        print_run_summary(_console(stderr=False), summary)


@command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="where the tiny model and the run go"),
    as_json: bool = JsonOpt,
) -> None:
    """Build the embedded tiny model, fine-tune it on the sample data, show before/after."""
    from ..recipe import load_recipe
    from ..tools.tiny import DEMO_RECIPE, build_tiny_model
    from ..train.pipeline import quiet_deepspeed_on_cpu

    quiet_deepspeed_on_cpu()
    started = time.monotonic()
    model_dir = out / "tiny-model"
    if not (model_dir / "config.json").is_file():
        if not as_json:
            _console().print(f"[dim]building tiny model in {model_dir}[/]")
        build_tiny_model(model_dir)
    loaded = load_recipe(DEMO_RECIPE, [f"model.path={model_dir.resolve()}", f"output.dir={(out / 'run').resolve()}"])
    summary = _run_with_progress(loaded, resume=False, overwrite=True, quiet=as_json)
    summary["demo_wall_time_s"] = round(time.monotonic() - started, 2)
    if as_json:
        print(json.dumps(summary))
    else:
        from .show import print_run_summary

        print_run_summary(_console(stderr=False), summary, demo=True)


@command(name="tiny-model")
def tiny_model(
    out: Path = typer.Argument(..., help="folder to create"),
    seed: int = typer.Option(0, help="initialisation seed (same seed, same files)"),
    data_dir: Optional[Path] = typer.Option(None, help="text to train the tokenizer on (default: data_samples/)"),
    as_json: bool = JsonOpt,
) -> None:
    """Build a tiny random-init Mistral model and tokenizer locally (for tests, demos, benches)."""
    from ..tools.tiny import build_tiny_model
    from ..trust.hashing import digest_folder

    try:
        build_tiny_model(out, seed=seed, data_dir=data_dir)
    except FileExistsError as exc:
        raise MsovError(str(exc), hint="choose a new folder") from None
    digests = digest_folder(out)
    if as_json:
        print(json.dumps({"status": "ok", "path": str(out), "files": digests}))
    else:
        for name, digest in digests.items():
            print(f"{digest[:16]}  {name}")


@command(group=data_app, name="validate")
def data_validate(
    files: List[Path] = typer.Argument(..., help="data files (.jsonl, .json, .csv, .parquet)"),
    fmt: str = typer.Option("auto", "--format", help="auto | chat | sharegpt | instruction | completion | preference"),
    split: Optional[str] = typer.Option(None, "--split", help="the split of a `datasets` DatasetDict folder"),
    as_json: bool = JsonOpt,
) -> None:
    """Check data files row by row; report every problem as file:line: field: problem."""
    from ..data import load_data_file

    results = []
    for path in files:
        loaded = load_data_file(path, fmt, sft=False, split=split, keep_records=False)
        results.append({"path": str(path), "format": loaded.format, "rows": loaded.rows, "sha256": loaded.sha256,
                        "roles": loaded.roles, "fields": loaded.fields})
    if as_json:
        print(json.dumps({"status": "ok", "files": results}))
    else:
        for r in results:
            roles = f", roles {'/'.join(r['roles'])}" if r["roles"] else ""
            print(f"ok  {r['path']}: format {r['format']}, {r['rows']:,} rows{roles}; fields {', '.join(r['fields'])}")


@command(group=data_app, name="scan")
def data_scan(
    files: List[Path] = typer.Argument(..., help="data files (.jsonl, .json, .csv, .parquet)"),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="exit 3 if any of these kinds is found: "
                                          "comma-separated kinds, or 'any'"),
    redact_to: Optional[Path] = typer.Option(None, "--redact", help="write a redacted copy: a file for one "
                                             "input, a folder for several"),
    as_json: bool = JsonOpt,
) -> None:
    """Find likely personal data and secrets (e-mail, phone, IBAN, card, IP, API keys, private keys, IDs)."""
    from ..data.scan import KINDS, redact_files, scan_files
    from ..errors import DataError, UsageError

    wanted = set()
    if fail_on:
        wanted = set(KINDS) if fail_on.strip() == "any" else {k.strip() for k in fail_on.split(",") if k.strip()}
        unknown = wanted - set(KINDS)
        if unknown:
            raise UsageError(f"--fail-on: unknown kind(s) {', '.join(sorted(unknown))}; expected any or "
                             f"{', '.join(KINDS)}")
    if redact_to is None:
        report = scan_files(files)
    else:
        report = redact_files(files, redact_to)
    failing = sorted(k for k in wanted if report.counts.get(k))
    if as_json:
        print(json.dumps({**report.summary(), "examples": [vars(f) for f in report.examples],
                          "redacted_to": str(redact_to) if redact_to else None, "failed_on": failing}))
    else:
        from .show import print_scan

        print_scan(_console(stderr=False), report, redact_to)
    if failing:
        raise DataError(f"--fail-on: found {', '.join(f'{report.counts[k]} {k}' for k in failing)} in the data.",
                        hint="Remove or redact them (msov data scan FILE --redact OUT) before training.")


@command(group=data_app, name="stats")
def data_stats(
    recipe: Path = RecipeArg,
    overrides: Optional[List[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Token statistics of a recipe's data with its model's tokenizer and chat template."""
    from ..recipe import load_recipe
    from ..train.pipeline import prepare_inputs

    prepared = prepare_inputs(load_recipe(recipe, overrides))
    stats = {"train": prepared.train.stats.as_dict(),
             "eval": prepared.eval.stats.as_dict() if prepared.eval else None}
    if as_json:
        print(json.dumps(stats))
    else:
        from .show import print_token_stats

        print_token_stats(_console(stderr=False), stats)


def _quiet_events():
    return lambda kind, payload: None


def _stage_printer():
    console = _console()

    def on_event(kind: str, payload: dict) -> None:
        if kind == "stage":
            console.print(f"[dim]· {payload['text']}[/]")
        elif kind == "warning":
            console.print(f"[yellow]warning:[/] {payload['text']}")

    return on_event


def _run_with_progress(recipe, *, resume: bool, overwrite: bool, quiet: bool, sign_key: str | None = None) -> dict:
    from ..train.pipeline import finetune as run_finetune
    from ..train.ranks import is_main_process

    if quiet or not is_main_process():  # one progress bar per run: rank 0's
        return run_finetune(recipe, resume=resume, overwrite=overwrite, on_event=_quiet_events(), sign_key=sign_key)
    from .show import TrainingProgress

    with TrainingProgress(_console(), _stage_printer()) as progress:
        return run_finetune(recipe, resume=resume, overwrite=overwrite, on_event=progress.on_event,
                            sign_key=sign_key)


# Commands of other areas live in their own modules and register themselves on `app` when imported.
from . import audit, data_commands, eval, export, machine, model  # noqa: E402,F401

if __name__ == "__main__":  # `python -m mistral_sov.cli`: the area modules registered on the importable copy
    from mistral_sov.cli import app as registered_app

    sys.exit(registered_app())
