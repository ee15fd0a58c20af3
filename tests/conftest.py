"""Shared fixtures. Tests that need ``../shared`` (next to the repo root) skip cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACEPIPE_SHARED", REPO_ROOT.parent / "shared"))
ASSETS = SHARED / "assets"

# Tests run on 2 shared cores; pinning torch to one thread avoids oversubscription collapse.
torch.set_num_threads(int(os.environ.get("FACEPIPE_TEST_THREADS", "1")))


def shared_path(*parts: str) -> Path:
    """Path under ``../shared/assets``; skips the calling test when it is not there."""
    path = ASSETS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared asset not available: {path}")
    return path


@pytest.fixture
def assets() -> Path:
    if not ASSETS.is_dir():
        pytest.skip("../shared/assets not available")
    return ASSETS


@pytest.fixture
def golden() -> Path:
    return shared_path("golden")
