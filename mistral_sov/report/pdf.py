"""`msov report --pdf`: the HTML report printed to PDF by headless Chromium.

Chromium rather than WeasyPrint: the PDF is then the page the auditor sees in a browser, laid out by the same engine
with the report's own @media print rules, and msov takes on no Python dependency (WeasyPrint brings its own CSS
engine, Pango and cffi). The browser is the system's (Debian: `apt-get install chromium`), found on PATH or named
by $MSOV_CHROMIUM; it runs with a throw-away profile and its networking pointed nowhere, on a page that holds no
URL anyway.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import InputError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")
PDF_TIMEOUT_S = 120


def find_browser() -> str | None:
    named = os.environ.get("MSOV_CHROMIUM")
    if named:
        return named if Path(named).is_file() or shutil.which(named) else None
    return next((found for found in map(shutil.which, BROWSERS) if found), None)


def offline_flags(profile: Path) -> list[str]:
    """Headless, a fresh profile, and nothing that reaches out: no DNS (every host maps to nothing), a proxy that
    does not exist, no background services. Chromium refuses to run as root without --no-sandbox."""
    flags = ["--headless", f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
             "--disable-gpu", "--disable-extensions", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-default-apps", "--metrics-recording-only", "--mute-audio",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--no-sandbox")
    return flags


def print_pdf(html_path: Path, pdf_path: Path) -> Path:
    browser = find_browser()
    if browser is None:
        raise InputError(f"--pdf: no Chromium found ({', '.join(BROWSERS[:3])} on PATH, or $MSOV_CHROMIUM); the HTML "
                         f"report was written, the PDF was not.",
                         hint="Install it (Debian: apt-get install chromium) or print the HTML from a browser.")
    pdf_path = Path(pdf_path).resolve()
    partial = pdf_path.with_name(pdf_path.name + ".partial")
    with tempfile.TemporaryDirectory(prefix="msov-chromium-") as profile:
        command = [browser, *offline_flags(Path(profile)), "--no-pdf-header-footer", f"--print-to-pdf={partial}",
                   Path(html_path).resolve().as_uri()]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=PDF_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            partial.unlink(missing_ok=True)
            raise InputError(f"--pdf: {browser} did not print the report ({exc}); the HTML report was written.") \
                from None
    if done.returncode != 0 or not partial.is_file() or partial.read_bytes()[:5] != b"%PDF-":
        partial.unlink(missing_ok=True)
        tail = (done.stderr or "").strip().splitlines()[-3:]
        raise InputError(f"--pdf: {browser} exited {done.returncode} without a PDF ({' / '.join(tail)}); the HTML "
                         f"report was written.")
    partial.replace(pdf_path)
    return pdf_path
