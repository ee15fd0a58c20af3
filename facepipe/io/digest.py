"""Content fingerprints: one way to say "the same bytes" and "the same list" across caches and runs.

Caches are keyed on content, not paths: an edited landmarks file or a replaced image must not reuse features
computed from the old one. ``file_fingerprint`` hashes the bytes (sha256); ``digest_strings`` and
``digest_json`` give order-sensitive digests of keys and settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

_CHUNK = 1 << 20


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_strings(strings: Iterable[str]) -> str:
    """sha256 of the strings in order, each NUL-terminated (file names may hold any byte: surrogate escapes)."""
    digest = hashlib.sha256()
    for text in strings:
        digest.update(text.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def digest_json(value: Any) -> str:
    """sha256 of a JSON-serialisable value with sorted keys (settings dictionaries)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
