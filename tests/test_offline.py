"""Nothing leaves: the egress guard refuses and names the caller; a full run makes zero connection attempts."""

import shutil
import socket
import subprocess
import sys
import urllib.request

import pytest
import typer
import yaml
from conftest import small_recipe
from typer.testing import CliRunner

from mistral_sov.guard.egress import EgressRefused, egress_guard


def test_outbound_connection_is_refused_and_named():
    with egress_guard() as guard:
        with pytest.raises(EgressRefused) as err:
            socket.create_connection(("203.0.113.5", 443), timeout=1)
    assert "test_offline" in err.value.message  # the caller's module, not the socket plumbing
    assert guard.attempts and err.value.exit_code == 5


def test_dns_lookup_and_http_client_are_refused_fast():
    with egress_guard() as guard:
        with pytest.raises(EgressRefused, match="DNS lookup of 'example.com'"):
            socket.getaddrinfo("example.com", 443)
        with pytest.raises(EgressRefused, match="test_offline"):
            urllib.request.urlopen("http://198.51.100.7/", timeout=1)
    assert len(guard.attempts) == 2


def test_loopback_and_rendezvous_are_allowed(monkeypatch):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "10.9.8.7")
    monkeypatch.setenv("MASTER_PORT", "29555")
    with egress_guard() as guard:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        socket.create_connection(("localhost", port), timeout=1).close()
        assert "10.9.8.7" in guard.allowed_hosts and guard.allowed_endpoints == {("10.9.8.7", 29555)}
    server.close()
    assert guard.attempts == []
    # the guard is gone after the block
    assert socket.socket.connect.__name__ == "connect"


def test_rendezvous_allows_exactly_its_address_and_port(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.10")  # TEST-NET-1: nothing answers there
    monkeypatch.setenv("MASTER_PORT", "29555")
    with egress_guard() as guard:
        probe = socket.socket()
        probe.setblocking(False)
        # Let through: the socket layer answers (an errno: in progress or unreachable), not the guard.
        assert isinstance(probe.connect_ex(("192.0.2.10", 29555)), int)
        probe.close()
        assert guard.attempts == []
        for refused in [("192.0.2.10", 29556), ("192.0.2.11", 29555), ("192.0.2.10", 22)]:
            with pytest.raises(EgressRefused, match="tried to reach \\('192.0.2.1"):
                socket.create_connection(refused, timeout=0.5)
    assert len(guard.attempts) == 3


def test_without_master_port_the_rendezvous_host_is_not_reachable(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.10")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with egress_guard() as guard:
        with pytest.raises(EgressRefused):
            socket.create_connection(("192.0.2.10", 29500), timeout=0.5)
    assert guard.allowed_endpoints == set()


def test_cli_renders_refusal_with_exit_5():
    from mistral_sov.cli import command

    app = typer.Typer()

    @command(group=app, name="phone-home")
    def phone_home() -> None:
        socket.create_connection(("192.0.2.1", 80), timeout=1)

    @command(group=app, name="other")
    def other() -> None:
        pass

    result = CliRunner().invoke(app, ["phone-home"])
    assert result.exit_code == 5
    assert "network access refused" in result.stderr and "192.0.2.1" in result.stderr
    assert "Traceback" not in result.stderr


def test_full_finetune_makes_zero_connection_attempts(tiny_model, tmp_path):
    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(small_recipe(tiny_model, tmp_path / "out", max_steps=4)))
    with egress_guard() as guard:
        summary = finetune(load_recipe(tmp_path / "r.yaml"))
    assert summary.status == "complete"
    assert guard.attempts == []


def test_runs_with_no_network_at_all(tiny_model, tmp_path):
    """The whole CLI under `unshare -n`: no network namespace, so any real attempt would fail the run."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        pytest.skip("unshare -n is not permitted here")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(small_recipe(tiny_model, tmp_path / "out", max_steps=3)))
    done = subprocess.run(["unshare", "-n", sys.executable, "-m", "mistral_sov.cli", "finetune",
                           str(tmp_path / "r.yaml"), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_udp_and_every_kind_of_name_lookup_are_refused(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.10")
    monkeypatch.setenv("MASTER_PORT", "29555")
    with egress_guard() as guard:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for send in (lambda: udp.sendto(b"x", ("192.0.2.1", 53)), lambda: udp.sendto(b"x", 0, ("192.0.2.1", 53)),
                     lambda: udp.sendmsg([b"x"], [], 0, ("192.0.2.1", 53)),
                     lambda: udp.sendmsg([b"x"], address=("192.0.2.1", 53))):
            with pytest.raises(EgressRefused, match="192.0.2.1"):
                send()
        with pytest.raises(EgressRefused, match="DNS lookup of 'secret.example.com'"):
            socket.gethostbyname("secret.example.com")
        with pytest.raises(EgressRefused, match="DNS lookup"):
            socket.gethostbyname_ex("secret.example.com")
        with pytest.raises(EgressRefused, match="reverse DNS lookup of '192.0.2.6'"):
            socket.gethostbyaddr("192.0.2.6")
        with pytest.raises(EgressRefused, match="reverse DNS lookup"):
            socket.getnameinfo(("192.0.2.5", 80), 0)
        with pytest.raises(EgressRefused):  # a non-UTF-8 name is refused, not a UnicodeDecodeError
            socket.getaddrinfo(b"\xff.example.com", 80)
        # Local traffic and numeric conversions still work.
        assert socket.getnameinfo(("192.0.2.5", 80), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0] == "192.0.2.5"
        loop = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        loop.bind(("127.0.0.1", 0))
        udp.sendto(b"local", loop.getsockname())
        assert loop.recv(16) == b"local"
        loop.close()
        udp.close()
    assert len(guard.attempts) == 9
    assert socket.socket.sendto.__name__ == "sendto" and socket.gethostbyname.__name__ == "gethostbyname"
