"""`msov doctor`: one screen on whether this machine can run msov offline; `--json` for CI; non-zero when a
required check fails. It must never send a packet: the network check reads local state only."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import REPO


def doctor_json(cli, *args):
    result = cli("doctor", "--json", *args)
    return result, json.loads(result.stdout)


def by_name(report):
    return {check["name"]: check for check in report["checks"]}


def test_doctor_here_is_ready_and_sends_nothing(cli, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("doctor tried to use the network")

    for name in ("create_connection", "getaddrinfo", "gethostbyname"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    result, report = doctor_json(cli, "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert report["ok"] and report["status"] == "ok" and report["failed"] == []
    checks = by_name(report)
    for name in ("msov", "python", "libraries", "other packages", "torch build", "devices", "bitsandbytes", "disk",
                 "memory", "offline variables", "network", "output dir"):
        assert name in checks, name
    assert checks["output dir"]["status"] == "ok" and "can be created" in checks["output dir"]["detail"]
    assert not (tmp_path / "runs").exists()  # checked, not created
    network = checks["network"]
    assert "nothing was sent" in network["detail"]
    assert ("msov will not use it" if network["default_routes"] else "looks offline") in network["detail"]
    torch_pkg = next(p for p in checks["libraries"]["packages"] if p["name"] == "torch")
    assert torch_pkg["version"] and torch_pkg["tested"]


def test_doctor_screen(cli, tmp_path):
    result = cli("doctor", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "ready" in result.stdout and "bitsandbytes" in result.stdout and "offline variables" in result.stdout
    assert len(result.stdout.splitlines()) < 45  # one screen


def test_unwritable_output_dir_fails_with_exit_5(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result, report = doctor_json(cli, "--out", blocker / "runs")
    assert result.exit_code == 5
    assert report["ok"] is False and report["failed"] == ["output dir"]
    assert "is a file" in by_name(report)["output dir"]["detail"]
    screen = cli("doctor", "--out", blocker / "runs")
    assert screen.exit_code == 5 and "not ready" in screen.stdout and "output dir" in screen.stdout


def test_missing_required_library_fails(cli, tmp_path, monkeypatch):
    from mistral_sov.tools import doctor

    monkeypatch.setattr(doctor, "REQUIRED", (*doctor.REQUIRED, "msov-no-such-package"))
    result, report = doctor_json(cli, "--out", tmp_path)
    assert result.exit_code == 5 and report["failed"] == ["libraries"]
    assert "missing: msov-no-such-package" in by_name(report)["libraries"]["detail"]


def test_version_off_the_tested_set_warns_only(cli, tmp_path, monkeypatch):
    from mistral_sov.tools import doctor

    pins = tmp_path / "constraints.txt"
    pins.write_text((REPO / "constraints.txt").read_text().replace("peft==", "peft==0.0.1 # was "))
    monkeypatch.setattr(doctor, "CONSTRAINTS", pins)
    result, report = doctor_json(cli, "--out", tmp_path)
    assert result.exit_code == 0 and "libraries" in report["warnings"]
    assert "peft" in by_name(report)["libraries"]["detail"] and "(tested 0.0.1)" in \
        by_name(report)["libraries"]["detail"]


def test_built_in_tested_versions_match_constraints():
    """Installs without constraints.txt (a wheel) compare against this table; it must not drift."""
    from mistral_sov.tools.doctor import TESTED_FALLBACK, canonical_name, tested_versions

    pins, source = tested_versions()
    assert source.endswith("constraints.txt")
    for name, pinned in TESTED_FALLBACK.items():
        assert pins[canonical_name(name)] == pinned, name


def test_offline_variables_are_read_from_the_launch_environment():
    """msov sets them itself at start, so doctor reads what the shell had from /proc/self/environ."""
    if not os.path.exists("/proc/self/environ"):
        pytest.skip("needs Linux /proc")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-m", "mistral_sov.cli", "doctor", "--json", "--out", "/tmp"],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    check = by_name(json.loads(done.stdout))["offline variables"]
    assert check["shell"]["HF_HUB_OFFLINE"] == "1" and check["shell"]["TRANSFORMERS_OFFLINE"] is None
    assert check["detail"].startswith("1 of 4 set in your shell")


def test_doctor_without_any_network():
    """Under `unshare -n` there is no route at all: doctor says so and is still ready."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -n is not permitted here")
    done = subprocess.run([unshare, "-n", sys.executable, "-m", "mistral_sov.cli", "doctor", "--json", "--out",
                           "/tmp"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    network = by_name(json.loads(done.stdout))["network"]
    assert network["default_routes"] == [] and "looks offline" in network["detail"]


def test_system_commands_import_no_heavy_libraries():
    script = ("import sys\nimport mistral_sov.cli, mistral_sov.cli.machine, mistral_sov.model.memory, mistral_sov.tools.doctor\n"
              "print([m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
