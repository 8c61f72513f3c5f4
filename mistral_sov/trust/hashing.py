"""Hashing of files and folders: the digests that provenance and the signed manifest (OMS) are made of.

One file's sha256 is inherently sequential, so files are the unit of parallelism: every core hashes its own
file, largest first, with one reusable buffer per worker (memory stays bounded for any file size). hashlib
releases the GIL while it hashes a large buffer and while the OS copies file pages into it, so threads suffice.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import InputError, MsovError

# 1 MiB keeps the buffer in a core's L2 cache between the kernel's copy into it and sha256 reading it back;
# measured faster than 4-16 MiB on this class of machine (bench/hash_bench.py).
_CHUNK = 1 << 20

# What the reference OMS implementation (model_signing 1.1.1, hashing.Config) leaves out of a key-signed folder
# by default: git metadata. A detached signature lying inside the folder is added to these when signing.
DEFAULT_IGNORE: tuple[str, ...] = (".git", ".gitattributes", ".github", ".gitignore")


@dataclass(frozen=True)
class FileEntry:
    name: str  # relative POSIX path inside the folder
    path: Path
    size: int


def sha256_file(path: str | Path, *, chunk: int = _CHUNK) -> str:
    """Streamed sha256 of one file (hex)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        if hasattr(os, "posix_fadvise"):  # a cold read then streams ahead of the hash instead of waiting on it
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def default_workers() -> int:
    """The cores this process may run on (a container's CPU set, not the host's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def hash_files(paths: Sequence[str | Path], *, workers: int | None = None) -> list[str]:
    """sha256 of each path, in the order given, hashed in parallel.

    Largest files start first so that one big file found last does not leave the other cores idle at the end.
    """
    if not paths:
        return []
    workers = min(workers or default_workers(), len(paths))
    if workers == 1:
        return [sha256_file(p) for p in paths]
    order = sorted(range(len(paths)), key=lambda i: -os.path.getsize(paths[i]))
    results: list[str] = [""] * len(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, digest in zip(order, pool.map(lambda i: sha256_file(paths[i]), order)):
            results[index] = digest
    return results


def digest_folder(folder: str | Path) -> dict[str, str]:
    """sha256 of every regular file under `folder`, keyed by sorted relative POSIX path (hashed in parallel).

    Symlinked files are followed on purpose: a base model in a Hugging Face cache snapshot is a folder of links.
    """
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    digests = hash_files(files)
    return {p.relative_to(root).as_posix(): d for p, d in zip(files, digests)}


def is_ignored(name: str, ignore: Iterable[str]) -> bool:
    """model_signing's rule: an ignore path covers itself and everything below it, relative to the folder."""
    return any(name == path or name.startswith(path.rstrip("/") + "/") for path in ignore)


def list_files(folder: str | Path, *, ignore: Iterable[str] = DEFAULT_IGNORE,
               error: type[MsovError] = InputError) -> list[FileEntry]:
    """Every regular file of `folder`, sorted as OMS lists resources, refusing what a manifest cannot vouch for.

    A symlink (even an ignored one) or a special file raises `error`: a link can point outside the folder and
    change without the folder changing, so the reference verifier refuses them too (allow_symlinks: false).
    """
    root = Path(folder)
    if root.is_symlink():
        raise error(f"{root}: the folder is a symbolic link; sign or verify the real folder it points to.")
    if not root.is_dir():
        raise error(f"{root}: not a folder.")
    ignore = tuple(ignore)
    found: list[FileEntry] = []
    pending = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                name = prefix + entry.name
                if entry.is_symlink():
                    raise error(f"{root}: '{printable(name)}' is a symbolic link; a signed folder holds regular "
                                f"files only.",
                                hint="Replace the link with a copy of the file it points to.")
                try:
                    name.encode("utf-8")
                except UnicodeEncodeError:
                    raise error(f"{root}: a file name under '{prefix or '.'}' is not valid UTF-8 and cannot be "
                                f"listed in a manifest.") from None
                if is_ignored(name, ignore):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), name + "/"))
                elif entry.is_file(follow_symlinks=False):
                    found.append(FileEntry(name, Path(entry.path), entry.stat(follow_symlinks=False).st_size))
                else:
                    raise error(f"{root}: '{printable(name)}' is a special file (device, pipe or socket), not a "
                                f"regular file.")
    return sorted(found, key=lambda f: sort_key(f.name))


def sort_key(name: str) -> tuple[str, ...]:
    """model_signing orders resources as PurePosixPath does (component by component), so 'a/b' < 'a.txt'."""
    return tuple(name.split("/"))


def build_manifest(folder: str | Path, *, ignore: Iterable[str] = DEFAULT_IGNORE,
                   error: type[MsovError] = InputError, workers: int | None = None,
                   known: dict[str, str] | None = None) -> list[dict]:
    """[{name, digest, size}] for every file of the folder, in OMS resource order."""
    return manifest_of(list_files(folder, ignore=ignore, error=error), known=known, workers=workers)


def manifest_of(files: Sequence[FileEntry], *, known: dict[str, str] | None = None,
                workers: int | None = None) -> list[dict]:
    """[{name, digest, size}] of listed files. `known` ({name: sha256}) is for a caller that hashed the very bytes
    it just wrote (the merge): those files are not read again. Verification never trusts it."""
    known = known or {}
    todo = [f for f in files if f.name not in known]
    digests = {**dict(zip((f.name for f in todo), hash_files([f.path for f in todo], workers=workers))), **known}
    return [{"name": f.name, "digest": digests[f.name], "size": f.size} for f in files]


def folder_digest(folder: str | Path, *, ignore: Iterable[str] = DEFAULT_IGNORE,
                  known: dict[str, str] | None = None) -> str:
    """A folder's OMS subject digest (what its signature's subject would be): an export's or adapter's id."""
    return subject_digest(f["digest"] for f in build_manifest(folder, ignore=ignore, known=known))


def subject_digest(digests: Iterable[str]) -> str:
    """OMS subject digest: sha256 over the raw (not hex) resource digests, in the order they are listed."""
    hasher = hashlib.sha256()
    for digest in digests:
        hasher.update(bytes.fromhex(digest))
    return hasher.hexdigest()


def describe_folder(folder: str | Path, *, ignore: Iterable[str] = DEFAULT_IGNORE) -> dict:
    """What `msov manifest show` prints: the files, their digests and sizes, and the folder's subject digest."""
    files = build_manifest(folder, ignore=ignore)
    return {
        "folder": str(folder),
        "name": Path(folder).resolve().name,
        "files": files,
        "total_bytes": sum(f["size"] for f in files),
        "subject_digest": subject_digest(f["digest"] for f in files),
        "ignore_paths": sorted(ignore),
    }


def printable(name: str) -> str:
    """A file name as it may be shown to a person: control characters (newlines, terminal escape sequences) and
    backslashes escaped, so that a hostile name can neither fake an output line nor drive the terminal."""
    if name.isprintable() and "\\" not in name:
        return name
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
                   for c in name)


def compare_manifests(expected: dict[str, str], actual: dict[str, str], *, limit: int = 10) -> list[str]:
    """Human-readable differences; a file that only moved (same digest) is reported as renamed."""
    removed = [n for n in sorted(expected, key=sort_key) if n not in actual]
    added = [n for n in sorted(actual, key=sort_key) if n not in expected]
    unsigned_by_digest: dict[str, list[str]] = {}
    for name in added:
        unsigned_by_digest.setdefault(actual[name], []).append(name)
    renamed = []
    for old in list(removed):
        if unsigned_by_digest.get(expected[old]):
            new = unsigned_by_digest[expected[old]].pop(0)
            renamed.append(f"{printable(old)} -> {printable(new)}")
            removed.remove(old)
            added.remove(new)
    changed = [f"{printable(n)} (sha256 {expected[n][:12]}… signed, {actual[n][:12]}… on disk)"
               for n in sorted(expected, key=sort_key) if n in actual and actual[n] != expected[n]]

    def show(label: str, names: list[str], shown: bool = False) -> list[str]:
        if not names:
            return []
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return [f"{label}: {', '.join(names[:limit] if shown else map(printable, names[:limit]))}{more}"]

    return show("changed", changed, shown=True) + show("added (not signed)", added) + show("removed", removed) \
        + show("renamed", renamed, shown=True)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write to PATH.tmp-<pid> created with its final mode (a private key is never readable by others, not even
    for a moment), fsync, then rename over PATH: a reader sees the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
