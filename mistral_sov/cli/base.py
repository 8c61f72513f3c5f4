"""What every msov command runs inside: the Typer app and its groups, the shared options, the exit-code policy
(`command`) and `emit`, the one place a result becomes either one JSON document or screen output.

The command modules import from here and register themselves on `app`; this module imports none of them. Heavy
imports (torch, transformers, rich's renderables) happen inside commands only, so `msov --help` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import sys
from typing import Any, Callable

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
manifest_app = typer.Typer(help="Look at an output folder's file list and digests.", no_args_is_help=True)
registry_app = typer.Typer(help="Versioned adapters in a registry folder (DIR/<name>/<version>/).",
                           no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(manifest_app, name="manifest")
app.add_typer(registry_app, name="registry")

# --debug is global (set by the app's callback); --json is the running command's (set by `command`, read by `emit`).
_state = {"debug": False, "json": False}

RecipeArg = typer.Argument(..., exists=False, help="recipe YAML file")
SetOpt = typer.Option(None, "--set", help="override a recipe field, e.g. --set train.lr=1e-4 (repeatable)")
JsonOpt = typer.Option(False, "--json", help="print one machine-readable JSON result on stdout")


def console(stderr: bool = True):
    """Progress and errors go to stderr; results to stdout (stderr=False)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def emit(result: Any, printer: Callable[[Any, Any], None]) -> None:
    """A command's result: under --json exactly one JSON document on stdout (`result.to_json()` when the result
    has it, else the result itself), otherwise `printer(console, result)` on stdout."""
    if _state["json"]:
        print(json.dumps(result.to_json() if hasattr(result, "to_json") else result))
    else:
        printer(console(stderr=False), result)


def stage_printer() -> Callable[[str, dict], None]:
    """An event sink that shows the library's stages and warnings on stderr, dimmed, one line each."""
    err = console()

    def on_event(kind: str, payload: dict) -> None:
        if kind == "stage":
            err.print(f"[dim]· {payload['text']}[/]")
        elif kind == "warning":
            err.print(f"[yellow]warning:[/] {payload['text']}")

    return on_event


def warn_if_pin_in_argv(key) -> None:
    """A PIN given as pin-value in a --key URI sits in argv, which every user of the machine can read (ps) and the
    shell keeps in its history: it still works, but the user is told, on stderr (a --json stdout stays one
    document)."""
    if key is not None and str(key)[:7].lower() == "pkcs11:" and "pin-value=" in str(key).lower():
        console().print("[yellow]warning:[/] a PIN on the command line (pin-value) is visible to other users and "
                        "kept in shell history; use pin-source=file:PATH or $MSOV_PKCS11_PIN")


def events(as_json: bool) -> Callable[[str, dict], None]:
    """Under --json stderr stays free of progress; otherwise the stages are shown."""
    from ..events import no_events

    return no_events if as_json else stage_printer()


def _fail(failure, as_json: bool) -> None:
    """Report a failure (a train.ranks.Failure) as one error line and hint on stderr (and a JSON error document
    under --json), then exit with its code. Called inside the `except` block, so --debug can show the traceback."""
    from rich.markup import escape

    from ..train.ranks import as_reported

    if failure.quiet and not _state["debug"]:  # another rank failed first and reports it
        raise typer.Exit(failure.exit_code)
    failure = as_reported(failure)
    if as_json:
        _print_json_error(failure.exit_code, failure.message, failure.hint)
    err = console()
    err.print(f"[bold red]error:[/] {escape(failure.message)}")
    if failure.hint:
        err.print(f"[dim]hint:[/] {escape(failure.hint)}")
    if _state["debug"]:
        err.print_exception()
    elif failure.exit_code == 1:
        err.print("[dim]run with --debug for the traceback[/]")
    raise typer.Exit(failure.exit_code)


def command(group: typer.Typer = app, name: str | None = None) -> Callable:
    """Register a command under the exit-code policy: an MsovError exits with its own code and hint, an interrupt
    with 130, an OS error (disk full, read-only or missing folder) and anything unexpected with 1, each as one
    readable message, never a traceback (unless --debug). Under --json, stdout carries one document only."""

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            from ..guard.egress import egress_guard
            from ..train.ranks import Failure, unexpected_failure

            as_json = bool(kwargs.get("as_json"))
            _state["json"] = as_json
            captured = io.StringIO()
            try:
                with egress_guard(), contextlib.redirect_stdout(captured) if as_json else contextlib.nullcontext():
                    return func(*args, **kwargs)
            except (typer.Exit, typer.Abort):
                raise
            except MsovError as exc:
                _fail(Failure(_message(exc), exc.exit_code, exc.hint, quiet=getattr(exc, "quiet", False)), as_json)
            except KeyboardInterrupt:
                _fail(Failure("interrupted", 130, "an unfinished run can be continued with --resume"), as_json)
            except OSError as exc:  # say which file, not a traceback
                where = f" ({exc.filename})" if exc.filename else ""
                _fail(Failure(f"{exc.strerror or exc}{where}", 1,
                              "nothing unfinished was published; fix the cause and run the command again"), as_json)
            except Exception as exc:  # noqa: BLE001 - the last line of defence renders, never hides
                _fail(unexpected_failure(exc), as_json)  # a multi-process run's policy: train/ranks.py
            finally:
                _state["json"] = False
                if as_json:
                    _keep_one_json_document(captured.getvalue())

        return group.command(name)(wrapper)

    return decorate


def _message(exc: MsovError) -> str:
    return exc.message or str(exc) or type(exc).__name__


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
