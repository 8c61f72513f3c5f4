"""Hashing of files and folders: the digests that provenance and (later) the signed manifest are made of."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digest_folder(folder: str | Path) -> dict[str, str]:
    """sha256 of every regular file under `folder`, keyed by sorted relative POSIX path (hashed in parallel:
    hashlib releases the GIL on large buffers)."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=4) as pool:
        digests = list(pool.map(sha256_file, files))
    return {p.relative_to(root).as_posix(): d for p, d in zip(files, digests)}
