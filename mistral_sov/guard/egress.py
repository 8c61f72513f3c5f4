"""The egress guard: while an msov command runs, no Python code in the process may reach past this machine.

Setting HF_HUB_OFFLINE covers the libraries we know; the guard covers the ones we do not (a new dependency, a
telemetry ping, a kernel hub lookup). It wraps the socket layer every Python network client goes through:
`connect`/`connect_ex` (so `create_connection` and every TCP client), `sendto`/`sendmsg` (UDP), and the name
lookups `getaddrinfo`, `gethostbyname[_ex]`, `gethostbyaddr` and `getnameinfo` (a DNS query is a message too).
Loopback and Unix sockets are allowed (they do not leave the machine). A multi-node run may also reach exactly
its rendezvous endpoint, MASTER_ADDR:MASTER_PORT as the launcher set them (and look up that name and this
machine's own), and no other port or host. Anything else raises EgressRefused (exit 5) naming the module that
tried, and is counted. Native code (gloo, NCCL) opens its own sockets below Python; for a proof that nothing at
all leaves, run under `unshare -n` (the tests do).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import EnvironmentRefused

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
# Frames inside these modules are plumbing; the caller we name is the first frame outside them.
_PLUMBING = ("socket", "ssl", "urllib", "http", "urllib3", "requests", "httpx", "httpcore", "anyio",
             "asyncio", "selectors", "mistral_sov.guard.egress", "contextlib")


class EgressRefused(EnvironmentRefused):
    pass


@dataclass
class GuardState:
    allowed_hosts: set[str] = field(default_factory=set)  # names that may be looked up (DNS)
    allowed_endpoints: set[tuple[str, int]] = field(default_factory=set)  # (host, port) that may be connected to
    resolved: dict[tuple[str, int], set[str]] = field(default_factory=dict)  # endpoint name -> its addresses
    attempts: list[str] = field(default_factory=list)  # every refused destination, for tests and reports
    destinations: list[str] = field(default_factory=list)  # the same as host:port (host alone for a bare lookup)
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


def _name(host) -> str:
    return (host.decode(errors="replace") if isinstance(host, bytes) else str(host)).strip("[]").lower()


def _allowed_lookup(host) -> bool:
    # An address literal needs no lookup (nothing is sent); the connect that follows is what gets checked.
    return _is_loopback(host) or _is_address(host) or (_state is not None and _name(host) in _state.allowed_hosts)


def _is_address(host) -> bool:
    try:
        ipaddress.ip_address(_name(host).split("%")[0])
    except ValueError:
        return False
    return True


def _allowed_connect(address) -> bool:
    host = _destination(address)
    if _is_loopback(host):
        return True
    if _state is None or not isinstance(address, tuple) or len(address) < 2:
        return False
    destination = (_name(host), int(address[1]))
    return any(destination[1] == endpoint[1]
               and (destination[0] == endpoint[0] or destination[0] in _endpoint_addresses(endpoint))
               for endpoint in _state.allowed_endpoints)


def _endpoint_addresses(endpoint: tuple[str, int]) -> set[str]:
    """The addresses the rendezvous name stands for, looked up once (the lookup of that name is allowed)."""
    with _state.lock:
        if endpoint not in _state.resolved:
            try:
                infos = _original["getaddrinfo"](endpoint[0], endpoint[1], type=socket.SOCK_STREAM)
                _state.resolved[endpoint] = {info[4][0].lower() for info in infos}
            except OSError:
                _state.resolved[endpoint] = set()
        return _state.resolved[endpoint]


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "?")
        if not module.split(".")[0] in _PLUMBING and not module.startswith(_PLUMBING):
            return f"{module} ({os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})"
        frame = frame.f_back
    return "unknown caller"


def _refuse(what: str, destination: str) -> None:
    caller = _caller()
    if _state is not None:
        with _state.lock:
            _state.attempts.append(what)
            _state.destinations.append(destination)
    raise EgressRefused(
        f"network access refused: {caller} tried to reach {what}. msov runs offline; nothing may leave this "
        "machine during a run.",
        hint="If a library needs the network for this, it is not usable with msov as configured; report it. "
        "Multi-node runs may reach only the rendezvous endpoint (MASTER_ADDR:MASTER_PORT).",
    )


def _host_port(host, port=None) -> str:
    name = _name(host) if host is not None else "?"
    name = f"[{name}]" if ":" in name else name  # an IPv6 address, bracketed as in a URL
    return f"{name}:{port}" if port not in (None, "", 0) else name


def _destination(address) -> object:
    if isinstance(address, tuple) and address:
        return address[0]
    return None  # AF_UNIX path or abstract socket: local by definition


def _check_connect(sock, address) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _allowed_connect(address):
        port = address[1] if isinstance(address, tuple) and len(address) > 1 else None
        _refuse(f"{address!r}", _host_port(_destination(address), port))


def _guarded_connect(self, address):
    _check_connect(self, address)
    return _original["connect"](self, address)


def _guarded_connect_ex(self, address):
    _check_connect(self, address)
    return _original["connect_ex"](self, address)


def _guarded_sendto(self, data, *flags_and_address):
    # UDP needs no connect: each datagram names its destination (sendto(data, address) or (data, flags, address)).
    _check_connect(self, flags_and_address[-1] if flags_and_address else None)
    return _original["sendto"](self, data, *flags_and_address)


def _guarded_sendmsg(self, buffers, *args, **kwargs):
    address = kwargs.get("address", args[2] if len(args) > 2 else None)
    if address is not None:
        _check_connect(self, address)
    return _original["sendmsg"](self, buffers, *args, **kwargs)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _allowed_lookup(host):
        _refuse(f"DNS lookup of {host!r}", _host_port(host, args[0] if args else kwargs.get("port")))
    return _original["getaddrinfo"](host, *args, **kwargs)


def _guarded_gethostbyname(host):
    if not _allowed_lookup(host):
        _refuse(f"DNS lookup of {host!r}", _host_port(host))
    return _original["gethostbyname"](host)


def _guarded_gethostbyname_ex(host):
    if not _allowed_lookup(host):
        _refuse(f"DNS lookup of {host!r}", _host_port(host))
    return _original["gethostbyname_ex"](host)


def _guarded_gethostbyaddr(host):
    # A reverse lookup of an address literal is a query too (a PTR record): only local names and addresses.
    if not (_is_loopback(host) or (_state is not None and _name(host) in _state.allowed_hosts)):
        _refuse(f"reverse DNS lookup of {host!r}", _host_port(host))
    return _original["gethostbyaddr"](host)


def _guarded_getnameinfo(sockaddr, flags):
    host = _destination(sockaddr)
    if not (flags & socket.NI_NUMERICHOST or _is_loopback(host)):
        _refuse(f"reverse DNS lookup of {host!r}", _host_port(host, sockaddr[1] if len(sockaddr) > 1 else None))
    return _original["getnameinfo"](sockaddr, flags)


# (owner, attribute, guarded version): every way the standard library sends a packet or resolves a name.
_GUARDED = [
    (socket.socket, "connect", _guarded_connect), (socket.socket, "connect_ex", _guarded_connect_ex),
    (socket.socket, "sendto", _guarded_sendto), (socket.socket, "sendmsg", _guarded_sendmsg),
    (socket, "getaddrinfo", _guarded_getaddrinfo), (socket, "gethostbyname", _guarded_gethostbyname),
    (socket, "gethostbyname_ex", _guarded_gethostbyname_ex), (socket, "gethostbyaddr", _guarded_gethostbyaddr),
    (socket, "getnameinfo", _guarded_getnameinfo),
]


def rendezvous_hosts() -> set[str]:
    """Names that may be looked up: this machine's own and the rendezvous host a launcher set (MASTER_ADDR)."""
    hosts = {socket.gethostname().lower()}  # this machine's own name (launchers look it up; /etc/hosts answers)
    host = os.environ.get("MASTER_ADDR", "").strip().strip("[]").lower()
    return hosts | ({host} if host else set())


def rendezvous_endpoint() -> tuple[str, int] | None:
    """MASTER_ADDR:MASTER_PORT, the one remote endpoint a multi-node run may connect to; None when not set."""
    host = os.environ.get("MASTER_ADDR", "").strip().strip("[]").lower()
    port = os.environ.get("MASTER_PORT", "").strip()
    if not host or not port.isdigit():
        return None
    return host, int(port)


def install(allowed_hosts: set[str] | None = None) -> GuardState:
    """Activate the guard for the rest of the process (the CLI does this for every command)."""
    global _state
    if _state is None:
        for owner, name, guarded in _GUARDED:
            _original[name] = getattr(owner, name)
            setattr(owner, name, guarded)
        _state = GuardState()
    _state.allowed_hosts |= {h.lower() for h in (allowed_hosts or set()) | rendezvous_hosts()}
    endpoint = rendezvous_endpoint()
    if endpoint is not None:
        _state.allowed_endpoints.add(endpoint)
    return _state


def uninstall() -> None:
    global _state
    if _state is not None:
        for owner, name, _guarded in _GUARDED:
            setattr(owner, name, _original[name])
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


REPORTED_DESTINATIONS = 10  # a run record names the first ten; the count covers every one


def refusals_mark() -> tuple[GuardState, int] | None:
    """Where the guard's count stands now (None: no guard active): a run reports what was refused after it."""
    return None if _state is None else (_state, len(_state.destinations))


def refusals_since(mark: tuple[GuardState, int] | None) -> dict:
    """What the guard refused since `mark` (from refusals_mark): whether it was active throughout, how many
    attempts, and the first destinations as host:port. Evidence for a run record, not a setting."""
    if mark is None or _state is not mark[0]:  # not guarded, or the guard was removed (and maybe replaced) since
        return {"active": False, "refused": 0, "refused_destinations": []}
    with _state.lock:
        destinations = _state.destinations[mark[1]:]
    return {"active": True, "refused": len(destinations),
            "refused_destinations": destinations[:REPORTED_DESTINATIONS]}
