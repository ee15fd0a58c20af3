"""Bundled default weights (see README for sources and licences)."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent


def bundled(name: str) -> Path:
    path = WEIGHTS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"bundled weights {name!r} missing from {WEIGHTS_DIR}; reinstall facepipe")
    return path
