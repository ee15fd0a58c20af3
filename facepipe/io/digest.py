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


def weights_fingerprint(weights: str | os.PathLike | None) -> str:
    """What a model's outputs depend on: the weights file's bytes; ``None`` (the bundled defaults) digests every
    bundled weights file, so that a changed bundled file invalidates what was computed with it."""
    if weights is not None:
        return file_fingerprint(weights)
    from facepipe.weights import WEIGHTS_DIR

    bundled = sorted(p for p in WEIGHTS_DIR.iterdir() if p.is_file() and p.suffix in (".pt", ".pth", ".onnx"))
    return digest_strings(f"{p.name}:{file_fingerprint(p)}" for p in bundled)
