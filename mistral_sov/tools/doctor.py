"""`msov doctor`: can this machine run msov offline? Versions, torch build, bitsandbytes, disk, memory, network.

Every check returns plain data (name, status, detail, required); the CLI renders them. `fail` on a required check
makes the command exit non-zero. Nothing here sends a packet: the network check reads the routing table and the
resolver configuration only, because even a DNS lookup would leave the machine.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .. import __version__
from ..guard.env import OFFLINE_ENV

GiB = 1024**3
REQUIRED = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors", "pydantic",
            "typer", "rich", "PyYAML", "pyarrow", "cryptography")
OPTIONAL = {"bitsandbytes": "QLoRA (the quantization section)"}
TESTED_PYTHON = "3.11"
# The tested versions of the libraries msov calls, for installs without the repository's constraints.txt (a
# wheel). tests/test_doctor.py checks that this table and constraints.txt agree, so the two cannot drift apart.
TESTED_FALLBACK = {
    "torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2", "accelerate": "1.15.0", "datasets": "5.2.0",
    "tokenizers": "0.23.3", "safetensors": "0.8.0", "bitsandbytes": "0.50.2", "pydantic": "2.14.4",
    "typer": "0.29.2", "rich": "15.0.0", "pyyaml": "6.0.4", "pyarrow": "26.0.1", "cryptography": "50.0.2",
}
CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"
DISK_WARN, DISK_FAIL, MEM_WARN = 20 * GiB, 1 * GiB, 4 * GiB


def _check(name: str, status: str, detail: str, *, required: bool = False, **data) -> dict:
    return {"name": name, "status": status, "detail": detail, "required": required, **data}


def canonical_name(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def tested_versions() -> tuple[dict, str]:
    """{package: version} msov was tested with, and where that came from."""
    if CONSTRAINTS.is_file():
        pins = {}
        for line in CONSTRAINTS.read_text().splitlines():
            name, sep, pinned = line.split("#")[0].strip().partition("==")
            if sep:
                pins[canonical_name(name)] = pinned.strip()
        return pins, str(CONSTRAINTS)
    return {canonical_name(k): v for k, v in TESTED_FALLBACK.items()}, "msov's built-in table (no constraints.txt found)"


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def check_python() -> dict:
    current = platform.python_version()
    if sys.version_info < (3, 10):
        return _check("python", "fail", f"{current}: msov needs Python >= 3.10", required=True, version=current)
    same = current.startswith(TESTED_PYTHON + ".")
    return _check("python", "ok" if same else "warn",
                  f"{current} ({sys.executable})" + ("" if same else f"; tested on {TESTED_PYTHON}"),
                  required=True, version=current)


def check_libraries() -> list[dict]:
    """One line for the libraries msov needs, one for everything else pinned in the tested set."""
    tested, source = tested_versions()
    packages, missing, differ = [], [], []
    for name in REQUIRED:
        have, want = _installed(name), tested.get(canonical_name(name))
        packages.append({"name": name, "version": have, "tested": want})
        if have is None:
            missing.append(name)
        elif want is not None and have.split("+")[0] != want:  # torch's +cpu/+cu128 names the build, not version
            differ.append(f"{name} {have} (tested {want})")
    listed = ", ".join(f"{p['name']} {p['version']}" for p in packages if p["version"])
    detail = listed + ("; all as tested" if not differ else "")
    if differ:
        detail += "; differ from the tested set: " + ", ".join(differ)
    if missing:
        detail = f"missing: {', '.join(missing)}; " + detail
    status = "fail" if missing else "warn" if differ else "ok"
    out = [_check("libraries", status, detail, required=True, packages=packages, source=source)]
    known = {canonical_name(x) for x in (*REQUIRED, *OPTIONAL)}
    others = [(n, _installed(n), v) for n, v in sorted(tested.items()) if n not in known]
    other_differ = [f"{n} {have} (tested {v})" for n, have, v in others if have and have.split("+")[0] != v]
    present = sum(1 for _, have, _ in others if have)
    detail = f"{present - len(other_differ)} of {present} other pinned packages match {source}"
    if other_differ:
        detail += f"; differ: {', '.join(other_differ[:6])}" + (" ..." if len(other_differ) > 6 else "")
    out.append(_check("other packages", "warn" if other_differ else "ok", detail, differ=other_differ))
    return out


def check_torch() -> list[dict]:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken torch install is exactly what doctor reports
        return [_check("torch build", "fail", f"import failed: {exc}", required=True)]
    hip = getattr(torch.version, "hip", None)
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {hip}" if hip else "CPU-only"
    cpu = torch.backends.cpu.get_cpu_capability()
    out = [_check("torch build", "ok", f"{torch.__version__}, {build} build; CPU {cpu}, {os.cpu_count()} cores",
                  required=True, cuda=torch.version.cuda, cpu_capability=cpu)]
    if torch.cuda.is_available():
        devices = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append({"index": index, "name": props.name, "memory": props.total_memory,
                            "capability": f"{props.major}.{props.minor}"})
        shown = "; ".join(f"cuda:{d['index']} {d['name']} {d['memory'] / GiB:.0f} GiB (sm {d['capability']})"
                          for d in devices)
        bf16 = torch.cuda.is_bf16_supported()
        out.append(_check("devices", "ok", f"{shown}; bf16 {'yes' if bf16 else 'no (use fp16 or fp32)'}",
                          devices=devices, bf16=bf16))
    else:
        gpu_build = bool(torch.version.cuda or hip)
        why = "GPU build, but no usable GPU or driver" if gpu_build else "CPU-only torch build"
        out.append(_check("devices", "warn" if gpu_build else "ok",
                          f"CPU only ({why}); bf16 works on CPU (fast with AVX512-BF16/AMX, emulated otherwise); "
                          "fp16 training needs CUDA", devices=[], bf16=True))
    return out


def check_bitsandbytes() -> dict:
    have = _installed("bitsandbytes")
    want = tested_versions()[0].get("bitsandbytes")
    if have is None:
        return _check("bitsandbytes", "warn", f"not installed (optional, for {OPTIONAL['bitsandbytes']}): recipes "
                      "with a quantization section are refused", version=None, tested=want)
    from ..errors import MsovError
    from ..model.load import check_quantization, quantization_device
    from ..recipe import QuantizationSection

    device = quantization_device()
    results = {}
    for label, section in (("4-bit nf4", QuantizationSection(bits=4, compute_dtype="float32")),
                           ("8-bit", QuantizationSection(bits=8, compute_dtype="float32"))):
        try:
            check_quantization(section, device=device)
            results[label] = "ok"
        except MsovError as exc:
            results[label] = exc.message
    detail = f"{have}" + ("" if have.split("+")[0] == want or want is None else f" (tested {want})")
    detail += f"; backend on {device}: " + ", ".join(
        f"{label} {'ok' if result == 'ok' else 'refused'}" for label, result in results.items())
    good = all(r == "ok" for r in results.values()) and (want is None or have.split("+")[0] == want)
    return _check("bitsandbytes", "ok" if good else "warn", detail, version=have, tested=want, device=device,
                  backends=results)


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(out_dir: Path) -> dict:
    where = _existing_ancestor(out_dir)
    free = shutil.disk_usage(where).free
    status = "fail" if free < DISK_FAIL else "warn" if free < DISK_WARN else "ok"
    note = {"fail": "too little to write a run", "warn": "a 7B model in bf16 is about 15 GB, a merged export as much "
            "again", "ok": ""}[status]
    return _check("disk", status, f"{free / GiB:.1f} GiB free at {where}" + (f" ({note})" if note else ""),
                  required=True, free=free, path=str(where))


def check_memory() -> dict:
    try:
        import psutil  # a dependency of accelerate

        mem = psutil.virtual_memory()
        total, available = mem.total, mem.available
    except ImportError:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    status = "warn" if available < MEM_WARN else "ok"
    return _check("memory", status, f"{available / GiB:.1f} GiB available of {total / GiB:.1f} GiB",
                  total=total, available=available)


def _launch_environment() -> dict | None:
    """The environment msov was started with: msov sets its offline variables itself before any command runs,
    so os.environ no longer shows what the user's shell had. /proc/self/environ still does (Linux)."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def check_offline_env() -> dict:
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")
    shell = _launch_environment()
    if shell is None:
        return _check("offline variables", "ok", "msov sets " + ", ".join(names) + " for its own runs",
                      shell=None, msov={n: OFFLINE_ENV[n] for n in names})
    have = {n: shell.get(n) for n in names}
    set_ = [n for n, v in have.items() if v == OFFLINE_ENV[n]]
    detail = (f"{len(set_)} of {len(names)} set in your shell; msov sets all of them for its own runs")
    if len(set_) < len(names):
        detail += "; export them too so plain transformers/peft scripts stay offline"
    return _check("offline variables", "ok", detail, shell=have, msov={n: OFFLINE_ENV[n] for n in names})


def _default_routes() -> list[str]:
    """Interfaces holding a default route, from the kernel's routing tables: no packet is sent."""
    routes = []
    try:
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 7 and fields[1] == "00000000" and fields[7] == "00000000":
                routes.append(f"{fields[0]} (IPv4)")
    except OSError:
        pass
    try:
        for line in Path("/proc/net/ipv6_route").read_text().splitlines():
            fields = line.split()
            if len(fields) == 10 and fields[0] == "0" * 32 and fields[1] == "00" and fields[9] != "lo":
                routes.append(f"{fields[9]} (IPv6)")
    except OSError:
        pass
    return sorted(set(routes))


def _nameservers() -> list[str]:
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return []
    return [line.split()[1] for line in lines if line.startswith("nameserver") and len(line.split()) > 1]


def check_network() -> dict:
    routes, servers = _default_routes(), _nameservers()
    if routes:
        detail = (f"default route via {', '.join(routes)}; the network may be reachable. msov will not use it: "
                  "model and data paths must be local folders and the HF libraries run offline")
    else:
        detail = "no default route: this machine looks offline (msov needs no network)"
    detail += " (checked the routing table only; nothing was sent)"
    return _check("network", "ok", detail, default_routes=routes, nameservers=len(servers))


def check_output_dir(out_dir: Path) -> dict:
    target = out_dir.expanduser().absolute()
    where = _existing_ancestor(target)
    if not where.is_dir():
        return _check("output dir", "fail", f"{where} is a file, not a folder", required=True, path=str(target))
    try:  # os.access ignores read-only mounts and some ACLs; creating a file is the real test
        handle, probe = tempfile.mkstemp(prefix=".msov-doctor-", dir=where)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        return _check("output dir", "fail", f"cannot write in {where}: {exc.strerror}", required=True,
                      path=str(target))
    detail = f"{target} is writable" if where == target else f"{target} can be created (in {where})"
    return _check("output dir", "ok", detail, required=True, path=str(target))


def run_checks(out_dir: str | Path = "runs") -> dict:
    """All checks, in the order they are shown. `ok` is false when a required check failed."""
    out_dir = Path(out_dir)
    checks = [_check("msov", "ok", __version__, version=__version__), check_python(), *check_libraries(),
              *check_torch(), check_bitsandbytes(), check_disk(out_dir), check_memory(), check_offline_env(),
              check_network(), check_output_dir(out_dir)]
    failed = [c["name"] for c in checks if c["status"] == "fail" and c["required"]]
    return {"status": "ok" if not failed else "failed", "ok": not failed, "failed": failed,
            "warnings": [c["name"] for c in checks if c["status"] == "warn"], "checks": checks}
