"""`msov report`: the auditor's dossier of a signed run, checked as text and in a real headless browser.

The browser is Debian's Chromium, driven over the DevTools protocol on `--remote-debugging-pipe` (plain JSON over
two file descriptors: no websocket library, no playwright). It counts every request the page makes while loading
(Network.requestWillBeSent) and keeps a screenshot of each report under $MSOV_TEST_ARTIFACTS (default: this
session's pytest temp folder, `artifacts/`).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import small_recipe

SECTION_IDS = ("verdict", "chain", "data", "training", "evaluation", "environment", "controls", "compute", "annex-iv",
               "limits")


def _invoke(*args):
    from typer.testing import CliRunner

    from mistral_sov.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def signed_run(tiny_model, tmp_path_factory) -> dict:
    """One tiny signed run (2 steps) shared by the module; tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("report")
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe(tiny_model, root / "run", max_steps=2)))
    assert _invoke("keygen", "--out", root / "keys" / "signer").exit_code == 0
    trained = _invoke("finetune", recipe, "--sign-key", root / "keys" / "signer.pem", "--json")
    assert trained.exit_code == 0, trained.output
    return {"root": root, "adapter": root / "run" / "adapter", "pub": root / "keys" / "signer.pub",
            "key": root / "keys" / "signer.pem"}


def _copy_run(signed_run, tmp_path) -> Path:
    shutil.copytree(signed_run["root"] / "run", tmp_path / "run")
    return tmp_path / "run" / "adapter"


def _section(page: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert match, f"section {sid} missing"
    return match.group(1)


def test_intact_report_has_every_section_and_a_green_verdict(signed_run, tmp_path, cli):
    out = tmp_path / "dossier" / "report.html"
    result = cli("report", signed_run["adapter"], "--key", signed_run["pub"], "--out", out, "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["status"] == "intact" and answer["report"] == str(out)
    page = out.read_text()
    for sid in SECTION_IDS:
        _section(page, sid)
    verdict = _section(page, "verdict")
    assert 'class="verdict ok"' in verdict and "INTACT" in verdict and answer["subject_digest"] in verdict
    assert "adapter_model.safetensors" in verdict  # the signed file list
    # the loss plot is embedded, and said to be outside the signature
    training = _section(page, "training")
    assert 'src="data:image/png;base64,' in training and "not covered by the signature" in training
    # the provenance chain carries the digests
    chain = _section(page, "chain")
    assert re.search(r"[0-9a-f]{64}", chain) and "helpdesk_chat.jsonl" in chain
    # the controls, compute and ML-BOM: shown when this msov records them, said to be absent otherwise
    controls, compute, environment = (_section(page, s) for s in ("controls", "compute", "environment"))
    assert "not recorded by this msov version" in controls or "egress guard" in controls
    assert "not recorded by this msov version" in compute or "formula" in compute
    assert "bom.cdx.json: <span" in environment or "bom.cdx.json</code> <span class=\"tag signed\">" in environment
    annex = _section(page, "annex-iv")
    assert "2(d)" in annex and "2(g)" in annex and "Annex XI" in annex


def test_report_is_self_contained_with_no_script_and_no_url(signed_run, tmp_path, cli):
    out = tmp_path / "report.html"
    assert cli("report", signed_run["adapter"], "--key", signed_run["pub"], "--out", out).exit_code == 0
    page = out.read_text()
    assert "<script" not in page.lower()
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"(?i)\b(https?|ftp|wss?|file):|//[a-z0-9]", text)
    assert not re.search(r'(?i)\b(src|href)\s*=\s*"(?!data:image/png;base64,|#)', page)  # only data: and #anchors
    assert "@import" not in page and "url(" not in page
    assert "default-src 'none'; img-src data:; style-src 'unsafe-inline'" in page
    assert "@media print" in page and "break-before: page" in page


def test_tampered_folder_gives_a_red_report_naming_the_file_and_exit_4(signed_run, tmp_path, cli):
    adapter = _copy_run(signed_run, tmp_path)
    config = adapter / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 16', '"r": 17'))
    out = tmp_path / "dossier" / "report.html"
    result = cli("report", adapter, "--key", signed_run["pub"], "--out", out)
    assert result.exit_code == 4, result.output
    assert "adapter_config.json" in result.stderr and str(out) in result.stderr.replace("\n", "")
    page = out.read_text()
    verdict = _section(page, "verdict")
    assert 'class="verdict bad"' in verdict and "NOT INTACT" in verdict and "adapter_config.json" in verdict
    assert 'class="verdict ok"' not in page
    for sid in SECTION_IDS:  # the claims are still shown, marked as unverified
        _section(page, sid)
    assert "UNVERIFIED" in _section(page, "chain")


def test_out_inside_the_folder_is_refused(signed_run, cli):
    inside = signed_run["adapter"] / "report.html"
    result = cli("report", signed_run["adapter"], "--key", signed_run["pub"], "--out", inside)
    assert result.exit_code == 3 and "inside" in result.stderr
    assert not inside.exists()


def test_key_or_ca_is_required(signed_run, tmp_path, cli):
    assert cli("report", signed_run["adapter"], "--out", tmp_path / "r.html").exit_code == 2


def test_hostile_strings_are_escaped(signed_run):
    from mistral_sov.report.facts import gather
    from mistral_sov.report.html import render

    facts = gather(signed_run["adapter"], key=signed_run["pub"])
    hostile = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    facts["provenance"]["datasets"][0]["path"] = f"/data/{hostile}.jsonl"
    facts["provenance"]["recipe_name"] = hostile
    facts["verdict"]["signer"] = {"method": "certificate", "subject": f"CN={hostile}", "issuers": [hostile],
                                  "path": "/ca.crt"}
    facts["provenance"]["controls"] = {"scan": {"fail_on": hostile, "counts": {hostile: 1}}}
    page = render(facts)
    assert "<script" not in page and "<img src=x" not in page and "onerror=alert" not in page.replace(
        "onerror=alert(2)&gt;", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;script&gt;" in page  # quotes too: an attribute cannot be closed


def test_facts_of_newer_versions_are_rendered(signed_run, tmp_path):
    """compute, controls, FOLDER.reproduced.json and bom.cdx.json, when present, are shown (and a base above 10^23
    FLOP makes the Annex XI table apply)."""
    from mistral_sov.report.facts import gather
    from mistral_sov.report.html import render

    adapter = _copy_run(signed_run, tmp_path)
    digest = gather(adapter, key=signed_run["pub"])["verdict"]["subject_digest"]
    (adapter.parent / "adapter.reproduced.json").write_text(json.dumps(
        {"status": "reproduced", "checked_at": "2026-01-01T00:00:00+00:00", "expected_digest": digest,
         "got_digest": digest}))
    facts = gather(adapter, key=signed_run["pub"])
    assert facts["reproduced"]["matches_verified"] is True
    facts["provenance"]["compute"] = {"flops": 1.2e15, "tokens_processed": 2403, "total_parameters": 268608,
                                      "trainable_parameters": 38912, "formula": "6 * N_trainable * D",
                                      "base_training_flops": 3.0e24, "ratio": 4e-10, "threshold": 0.3333,
                                      "above_threshold": False}
    facts["provenance"]["controls"] = {"egress_guard": {"active": True, "refused": 0, "refused_destinations": []},
                                       "offline_env": {"HF_HUB_OFFLINE": "1"},
                                       "scan": {"fail_on": "secrets", "redact": False, "counts": {"email": 3}},
                                       "seed": 7}
    page = render(facts)
    assert "reproduced" in _section(page, "verdict") and "refers to the digest verified above" in page
    compute = _section(page, "compute")
    assert "1.2e+15" in compute and "a general-purpose AI model" in compute and "below the threshold" in compute
    assert "egress guard" in _section(page, "controls") and "email: 3" in _section(page, "data")
    assert "Annex XI (general-purpose AI models, Article 53(1)(a)): applies" in page

    for key in ("compute", "controls"):  # a provenance from an older msov: said to be absent, never failed on
        facts["provenance"].pop(key, None)
    facts["bom"] = facts["reproduced"] = facts["loss_plot"] = facts["data_scan"] = None
    page = render(facts)
    for sid in ("controls", "compute", "environment", "data"):
        assert "not recorded by this msov version" in _section(page, sid), sid
    assert "not established that it applies" in page


def test_sign_key_signs_the_report_as_its_own_folder(signed_run, tmp_path, cli):
    dossier = tmp_path / "dossier"
    result = cli("report", signed_run["adapter"], "--key", signed_run["pub"], "--out", dossier / "report.html",
                 "--sign-key", signed_run["key"], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["signature"] == str(tmp_path / "dossier.sig")
    assert cli("verify", dossier, "--key", signed_run["pub"]).exit_code == 0
    (dossier / "notes.txt").write_text("not part of the report")
    refused = cli("report", signed_run["adapter"], "--key", signed_run["pub"], "--out", dossier / "report.html",
                  "--sign-key", signed_run["key"])
    assert refused.exit_code == 3 and "notes.txt" in refused.stderr


def test_pdf_without_a_browser_fails_clearly_after_the_html(signed_run, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("MSOV_CHROMIUM", str(tmp_path / "no-such-browser"))
    out = tmp_path / "report.html"
    result = cli("report", signed_run["adapter"], "--key", signed_run["pub"], "--out", out, "--pdf")
    assert result.exit_code == 3 and "Chromium" in result.stderr
    assert out.is_file() and not out.with_suffix(".pdf").exists()


# --- in a real browser ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium: found, or installed here (as root, with a time limit); skipped, with why, otherwise."""
    from mistral_sov.report.pdf import find_browser

    found = find_browser()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no Chromium, and it cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, check=False)
            if done.returncode != 0:
                pytest.skip(f"could not install Chromium: {' '.join(command)} exited {done.returncode}: "
                            f"{done.stderr.strip()[-300:]}")
    except subprocess.TimeoutExpired as exc:
        pytest.skip(f"could not install Chromium: {' '.join(exc.cmd)} took over {exc.timeout} s")
    return find_browser() or pytest.skip("apt-get installed chromium, but no browser binary is on PATH")


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("MSOV_TEST_ARTIFACTS") or tmp_path_factory.getbasetemp() / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class DevTools:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe: Chromium reads commands on its fd 3
    and writes replies and events on its fd 4, each a JSON message ended by a NUL byte."""

    def __init__(self, browser: str, profile: Path):
        from mistral_sov.report.pdf import offline_flags

        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()

        def on_fds_3_and_4():  # via fds above 100, so that dup2 never meets an fd already numbered 3 or 4
            high_in, high_out = fcntl.fcntl(to_child, fcntl.F_DUPFD, 100), fcntl.fcntl(from_child, fcntl.F_DUPFD, 100)
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        self.process = subprocess.Popen(
            [browser, *offline_flags(profile), "--remote-debugging-pipe", "--window-size=1200,900", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=False,
            preexec_fn=on_fds_3_and_4)
        os.close(to_child)
        os.close(from_child)
        self._buffer, self._next_id, self.events = b"", 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == message["id"], timeout)
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply.get("result", {})

    def wait(self, predicate, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if predicate(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed the DevTools pipe: " + self.process.stderr.read().decode()[-500:])
            self._buffer += chunk

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except (OSError, TimeoutError, EOFError, AssertionError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._write)
        os.close(self._read)


def load_in_browser(browser: str, page: Path, screenshot: Path | None = None) -> dict:
    """Open `page`, wait for its load event, and return every URL it requested, what the DOM holds, and (optional)
    a full-page screenshot."""
    with tempfile.TemporaryDirectory(prefix="msov-cdp-") as profile:
        tools = DevTools(browser, Path(profile))
        try:
            target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            tools.send("Network.enable", session=session)
            tools.send("Page.enable", session=session)
            tools.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            tools.wait(lambda m: m.get("method") == "Page.loadEventFired" and m.get("sessionId") == session)
            requested = [m["params"]["request"]["url"] for m in tools.events
                         if m.get("method") == "Network.requestWillBeSent" and m.get("sessionId") == session]
            dom = tools.send("Runtime.evaluate", {"returnByValue": True, "expression": (
                "JSON.stringify({ids: [...document.querySelectorAll('section[id]')].map(s => s.id),"
                " verdict: document.querySelector('#verdict .verdict').className,"
                " verdictText: document.querySelector('#verdict').innerText,"
                " scripts: document.scripts.length,"
                " images: [...document.images].map(i => [i.complete, i.naturalWidth])})")}, session=session)
            shot = None
            if screenshot is not None:
                size = tools.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
                data = tools.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
                    "x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 16000), "scale": 1}},
                    session=session, timeout=60)["data"]
                screenshot.write_bytes(base64.b64decode(data))
                shot = screenshot
        finally:
            tools.close()
    return {"requested": requested, "dom": json.loads(dom["result"]["value"]), "screenshot": shot}


def _external(requested: list[str], page: Path) -> list[str]:
    return [url for url in requested if url != page.resolve().as_uri() and not url.startswith("data:")]


def test_the_browser_counter_sees_requests(chromium, tmp_path):
    """The check below means something: a page with one outside image is seen making that request."""
    planted = tmp_path / "planted.html"
    planted.write_text('<!DOCTYPE html><html><body><section id="verdict"><div class="verdict">x</div></section>'
                       '<img src="http://192.0.2.1/pixel.png"></body></html>')
    seen = load_in_browser(chromium, planted)
    assert _external(seen["requested"], planted) == ["http://192.0.2.1/pixel.png"]


@pytest.mark.parametrize("state", ["intact", "tampered"])
def test_report_in_a_headless_browser(state, chromium, signed_run, tmp_path, artifacts, cli):
    adapter = signed_run["adapter"]
    if state == "tampered":
        adapter = _copy_run(signed_run, tmp_path)
        with (adapter / "adapter_model.safetensors").open("r+b") as handle:
            handle.seek(-1, 2)
            last = handle.read(1)
            handle.seek(-1, 2)
            handle.write(bytes([last[0] ^ 1]))
    out = tmp_path / "dossier" / "report.html"
    result = cli("report", adapter, "--key", signed_run["pub"], "--out", out)
    assert result.exit_code == (0 if state == "intact" else 4), result.output

    seen = load_in_browser(chromium, out, artifacts / f"report-{state}.png")
    assert _external(seen["requested"], out) == [], seen["requested"]  # zero network requests
    dom = seen["dom"]
    assert dom["ids"] == list(SECTION_IDS) and dom["scripts"] == 0
    assert dom["images"] and all(done and width > 100 for done, width in dom["images"])  # the plot decoded inline
    if state == "intact":
        assert dom["verdict"] == "verdict ok" and "INTACT" in dom["verdictText"]
    else:
        assert dom["verdict"] == "verdict bad" and "adapter_model.safetensors" in dom["verdictText"]
    png = seen["screenshot"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 50_000


def test_pdf_is_printed_by_chromium(chromium, signed_run, tmp_path, cli):
    out = tmp_path / "dossier" / "report.html"
    result = cli("report", signed_run["adapter"], "--key", signed_run["pub"], "--out", out, "--pdf", "--json")
    assert result.exit_code == 0, result.output
    pdf = Path(json.loads(result.stdout)["pdf"])
    assert pdf == out.with_suffix(".pdf") and pdf.read_bytes().startswith(b"%PDF-") and pdf.stat().st_size > 20_000


def test_report_runs_without_a_network(signed_run, tmp_path):
    """The whole command in a network namespace with no interface up (`unshare -n`), PDF included when a browser
    is there."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-n", "true"], capture_output=True,
                                                     check=False).returncode != 0:
        pytest.skip("unshare -n is not available here (needs root or user namespaces)")
    from mistral_sov.report.pdf import find_browser

    out = tmp_path / "report.html"
    command = ["unshare", "-n", sys.executable, "-m", "mistral_sov", "report", str(signed_run["adapter"]), "--key",
               str(signed_run["pub"]), "--out", str(out)] + (["--pdf"] if find_browser() else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert 'class="verdict ok"' in out.read_text()
