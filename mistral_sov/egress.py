"""The egress guard: while an msov command runs, no Python code in the process may reach past this machine.

Setting HF_HUB_OFFLINE covers the libraries we know; the guard covers the ones we do not (a new dependency, a
telemetry ping, a kernel hub lookup). It wraps the socket layer every Python network client goes through:
`socket.connect`/`connect_ex`, `create_connection` and `getaddrinfo`. Loopback, Unix sockets and the
distributed rendezvous address (MASTER_ADDR, for multi-process runs) are allowed; anything else raises
EgressRefused (exit 5) naming the module that tried, and is counted.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import EnvironmentRefused

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
# Frames inside these modules are plumbing; the caller we name is the first frame outside them.
_PLUMBING = ("socket", "ssl", "urllib", "http", "urllib3", "requests", "httpx", "httpcore", "anyio",
             "asyncio", "selectors", "mistral_sov.egress", "contextlib")


class EgressRefused(EnvironmentRefused):
    pass


@dataclass
class GuardState:
    allowed_hosts: set[str] = field(default_factory=set)
    attempts: list[str] = field(default_factory=list)  # every refused destination, for tests and reports
    lock: threading.Lock = field(default_factory=threading.Lock)


_state: GuardState | None = None
_original = {}


def _is_loopback(host) -> bool:
    if host is None:
        return True  # getaddrinfo(None, port) resolves to a local wildcard address
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).strip("[]").lower()
    if host in _LOOPBACK_NAMES or host == "":
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _allowed(host) -> bool:
    if _is_loopback(host):
        return True
    name = host.decode() if isinstance(host, bytes) else str(host)
    return _state is not None and name.strip("[]").lower() in _state.allowed_hosts


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "?")
        if not module.split(".")[0] in _PLUMBING and not module.startswith(_PLUMBING):
            return f"{module} ({os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})"
        frame = frame.f_back
    return "unknown caller"


def _refuse(what: str) -> None:
    caller = _caller()
    if _state is not None:
        with _state.lock:
            _state.attempts.append(what)
    raise EgressRefused(
        f"network access refused: {caller} tried to reach {what}. msov runs offline; nothing may leave this "
        "machine during a run.",
        hint="If a library needs the network for this, it is not usable with msov as configured; report it. "
        "Multi-node runs may reach only the rendezvous address (MASTER_ADDR).",
    )


def _destination(address) -> object:
    if isinstance(address, tuple) and address:
        return address[0]
    return None  # AF_UNIX path or abstract socket: local by definition


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _allowed(_destination(address)):
        _refuse(f"{address!r}")
    return _original["connect"](self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _allowed(_destination(address)):
        _refuse(f"{address!r}")
    return _original["connect_ex"](self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _allowed(host):
        _refuse(f"DNS lookup of {host!r}")
    return _original["getaddrinfo"](host, *args, **kwargs)


def rendezvous_hosts() -> set[str]:
    """This machine's name and the address a multi-process launcher told us to use (MASTER_ADDR)."""
    hosts = {socket.gethostname().lower()}  # this machine's own name (launchers look it up; /etc/hosts answers)
    host = os.environ.get("MASTER_ADDR", "").strip().lower()
    return hosts | ({host} if host else set())


def install(allowed_hosts: set[str] | None = None) -> GuardState:
    """Activate the guard for the rest of the process (the CLI does this for every command)."""
    global _state
    if _state is None:
        _original.update(connect=socket.socket.connect, connect_ex=socket.socket.connect_ex,
                         getaddrinfo=socket.getaddrinfo)
        socket.socket.connect = _guarded_connect
        socket.socket.connect_ex = _guarded_connect_ex
        socket.getaddrinfo = _guarded_getaddrinfo
        _state = GuardState()
    _state.allowed_hosts |= {h.lower() for h in (allowed_hosts or set()) | rendezvous_hosts()}
    return _state


def uninstall() -> None:
    global _state
    if _state is not None:
        socket.socket.connect = _original["connect"]
        socket.socket.connect_ex = _original["connect_ex"]
        socket.getaddrinfo = _original["getaddrinfo"]
        _state = None


@contextmanager
def egress_guard(allowed_hosts: set[str] | None = None):
    """The guard for the duration of a block; yields its state (`.attempts` lists what was refused)."""
    already = _state is not None
    state = install(allowed_hosts)
    try:
        yield state
    finally:
        if not already:
            uninstall()
